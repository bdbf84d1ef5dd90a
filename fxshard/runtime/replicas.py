"""The whole model on every rank: ``single`` and ``ddp`` plans under torchrun.

Each rank holds the whole captured model and takes its share of the batch; several replicas
run in ``DistributedDataParallel``. With ``plan.microbatches`` = m > 1 a replica runs its
share as m micro-batches one after another (gradient accumulation): the first m - 1
backward passes run under DDP's ``no_sync()``, so gradients are all-reduced once per step,
and each micro-batch's loss is divided by m, so the gradients are those of the mean loss over
the whole batch. See docs/runtime.md.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fxshard.capture import CapturedGraph
from fxshard.plan import Plan
from fxshard.runtime.data_parallel import wrap_replica
from fxshard.runtime.local import accumulate, to_device
from fxshard.runtime.loss import call_loss
from fxshard.runtime.ranks import RankExecution
from fxshard.runtime.stages import materialise

__all__ = ["DataParallelExecution", "WholeModelExecution"]


class WholeModelExecution(RankExecution):
    """The whole model on this rank, run on its share of the batch in ``plan.microbatches``
    micro-batches: what replicas (DDP) and shards (FSDP) share. A subclass builds the module
    (:meth:`_build`) and says how backward passes synchronise (:meth:`_sync`)."""

    def __init__(self, captured: CapturedGraph, plan: Plan, *, loss_fn: Callable | None = None,
                 aliases: Mapping[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(captured, plan, loss_fn=loss_fn, aliases=aliases)
        self.module, self.runner = self._build()

    @abc.abstractmethod
    def _build(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The model as this rank holds it (original names) and the module that runs it."""

    @abc.abstractmethod
    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of a micro-batch's forward and backward (``last``: the step's last)."""

    def _modules(self) -> list[torch.nn.Module]:
        return [self.module]

    def _outputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        flat = self.captured.flatten_inputs(args, kwargs)
        return self.captured.output_spec.rebuild(module(*to_device(flat, self.device)))

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        # Not through DDP: a forward without a backward would leave its reducer waiting.
        return self._outputs(self.module, *self._shard((args, kwargs)))

    def _step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor:
        how = self._loss_call(args, kwargs, target, loss_fn)
        inputs, target = self._shard(((args, kwargs), target))
        self.guard.sending()

        def run(part: tuple[tuple, dict], tgt: Any, i: int) -> torch.Tensor:
            out = self._outputs(self.runner, *part)
            return call_loss(loss_fn, out, to_device(tgt, self.device), how, microbatch=i)

        loss = accumulate(run, inputs, target, self.plan.microbatches, self._sync)
        return self._replica_mean(loss, None)


class DataParallelExecution(WholeModelExecution):
    """This rank's replica of the whole model (a ``single`` or ``ddp`` plan under torchrun)."""

    def _build(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        module = self.captured.gm
        materialise(module, self.device)
        return module, wrap_replica(module, self.device, self.replicas)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        if last or not isinstance(self.runner, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.runner.no_sync()
