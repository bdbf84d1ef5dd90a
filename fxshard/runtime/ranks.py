"""What every way of running a plan under torchrun shares: one rank's part of the job.

:class:`RankExecution` is the base of the torchrun executions (the whole model replicated,
:mod:`fxshard.runtime.replicas`; sharded, :mod:`fxshard.runtime.fsdp`; split into stages,
:mod:`fxshard.runtime.distributed`). It checks, on every rank alike, that the rank can run
the plan, guards each call so a failure on one rank stops all, cuts the rank's share of the
batch (and a share into micro-batches), averages the loss over the replicas, and keeps state
under the original model's names: tied tensors under every alias, sharded ones (``DTensor``)
gathered to full tensors with ``gather=True`` and sharded back on load. A subclass says
which modules it holds and how it runs them. A CPU rank keeps freed memory in its heap for
reuse, as a GPU's caching allocator does (``host_memory.retain_freed_memory``; set
``FXSHARD_CPU_HEAP=release`` to leave glibc's thresholds alone). See docs/runtime.md.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from fxshard.capture import CapturedGraph
from fxshard.cost_models.host_memory import retain_freed_memory
from fxshard.errors import ExecutionError
from fxshard.plan import Plan
from fxshard.runtime.agreement import agree, device_mismatch, fingerprint_mismatch
from fxshard.runtime.failures import FailureGuard
from fxshard.runtime.local import split_tree
from fxshard.runtime.loss import LossCall, check_loss_call, leading_rows
from fxshard.runtime.stages import unwrap

__all__ = ["CPU_HEAP_ENV", "RankExecution", "full_tensor", "rank_device", "rows_part", "shard_like"]

CPU_HEAP_ENV = "FXSHARD_CPU_HEAP"
"""``keep`` (default): a CPU rank keeps freed memory in its heap; ``release``: glibc's thresholds as they are."""


def rank_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK with NCCL, else the CPU."""
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rows_part(values: Any, parts: int, index: int) -> Any:
    """Part ``index`` of ``parts`` equal parts of the batch in ``values`` (as
    :func:`fxshard.runtime.local.split_tree` cuts micro-batches)."""
    if parts == 1:
        return values
    return split_tree(values, parts, what="parts (replicas x micro-batches)")[index]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective over its mesh), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``like``: this rank's shard when ``like`` is a
    ``DTensor`` (cut locally, no message: every rank holds the whole value), else ``value``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(value, DTensor):
        return value
    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


class RankExecution(abc.ABC):
    """This rank's part of a plan under torchrun: the parts every way of running shares.

    A subclass builds its modules in ``__init__`` after calling this one, and implements
    ``_forward``, ``_step`` and ``_modules``.
    """

    def __init__(self, captured: CapturedGraph, plan: Plan, *, loss_fn: Callable | None = None,
                 aliases: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.captured = captured
        self.aliases = dict(aliases or {})
        self.plan = plan
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = rank_device()
        self.loss_fn = loss_fn
        # Refused before the failure guard takes a reference to the job's store: a refusal's
        # traceback keeps this half-built object alive, and a store reference held past
        # destroy_process_group aborted the process at exit ("terminate called without an
        # active exception", seen once in a full run of the GPU-plan refusal test).
        agree(self._objection())
        if self.device.type == "cpu" and os.environ.get(CPU_HEAP_ENV, "keep") == "keep":
            retain_freed_memory()
        self.guard = FailureGuard(self.rank, self.world)
        self.replicas = plan.replicas
        self.replica = self.rank % self.replicas

    def _objection(self) -> str | None:
        """Why this rank cannot run the plan (checked on every rank, agreed before building)."""
        plan, captured = self.plan, self.captured
        heap = os.environ.get(CPU_HEAP_ENV, "keep")
        if heap not in ("keep", "release"):
            return (f"{CPU_HEAP_ENV}={heap!r}: use 'keep' (the default: a CPU rank keeps freed memory in its heap "
                    f"for reuse) or 'release' (glibc's own thresholds)")
        needed = sorted({d for s in plan.stages for d in s.device_indices})
        if self.world != len(needed):
            return (f"the plan runs on {len(needed)} processes ({plan.strategy}, {plan.num_stages} stage(s) x "
                    f"{plan.replicas} replica(s)) but torchrun started {self.world}; run "
                    f"'torchrun --nproc-per-node {len(needed)} ...' or re-plan for {self.world} devices")
        return (fingerprint_mismatch(plan, captured.model_name, captured.fingerprint(), len(captured.nodes))
                or device_mismatch(plan, self.rank, self.device, dist.get_backend()))

    # -- running ------------------------------------------------------------------------

    def forward(self, args: tuple, kwargs: dict) -> Any:
        """Whole-batch forward; the model's outputs where they live, None elsewhere."""
        return self.guard.run("forward", self._forward, args, kwargs)

    def step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        """One forward and backward over the batch; the mean loss where the output lives."""
        return self.guard.run("step", self._step, args, kwargs, target, loss_fn)

    @abc.abstractmethod
    def _forward(self, args: tuple, kwargs: dict) -> Any:
        """This rank's forward of its share of the batch."""

    @abc.abstractmethod
    def _step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        """This rank's forward and backward of its share of the batch."""

    def _shard(self, values: Any) -> Any:
        """This replica's share of the batch."""
        return rows_part(values, self.replicas, self.replica)

    def _loss_call(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> LossCall:
        """How the loss is called this step, checked alike on every rank (each gets the same
        batch and target) before any message."""
        batch = leading_rows(self.captured.flatten_inputs(args, kwargs)) or 0
        how = LossCall(batch=batch, microbatches=self.plan.microbatches, replicas=self.replicas,
                       has_target=target is not None)
        check_loss_call(loss_fn, target, how)
        return how

    def _replica_mean(self, loss: torch.Tensor, group: Any) -> torch.Tensor:
        """The loss over the whole batch: the mean of the replicas' (equal-sized) shares."""
        if self.replicas > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=group)
            loss = loss / self.replicas
        return loss

    # -- parameters and checkpoints --------------------------------------------------------

    @abc.abstractmethod
    def _modules(self) -> list[torch.nn.Module]:
        """The modules this rank holds (stages, or the whole model)."""

    def _hidden(self) -> set[int]:
        """``id`` of parameters held twice on this rank whose copy is not listed (its owner is)."""
        return set()

    def _owner(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor a copy stands for (itself unless it is one)."""
        return t

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters under the original names (shards where the plan shards)."""
        seen = self._hidden()
        for module in self._modules():
            for name, p in unwrap(module).named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def parameter_names(self) -> dict[int, str]:
        """``id(param) -> canonical name`` for this rank's parameters (the same name on every
        rank for a tied parameter)."""
        names: dict[int, str] = {}
        for module in self._modules():
            for name, p in unwrap(module).named_parameters():
                name = self.captured.param_names.get(id(p), name)
                names.setdefault(id(p), self.aliases.get(name, (name,))[0])
        return names

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def state_dict(self, *, gather: bool = False) -> dict[str, torch.Tensor]:
        """This rank's tensors under the original names; all ranks' with ``gather=True``
        (a collective: every rank calls it), sharded ones gathered to full tensors.

        A tied tensor appears under every name the original model's ``state_dict`` gives it
        (``transformer.wte.weight`` and ``lm_head.weight``), whichever name its stage uses."""
        local: dict[str, torch.Tensor] = {}
        copies: dict[int, torch.Tensor] = {}  # a tensor under two names is gathered once
        for module in self._modules():
            for name, t in unwrap(module).state_dict(keep_vars=True).items():
                if name in self.captured.state_names:  # not fxshard's helpers, not non-persistent buffers
                    t = self._owner(t)
                    if id(t) not in copies:
                        copies[id(t)] = (full_tensor(t.detach()) if gather else t.detach()).cpu().clone()
                    for alias in self.aliases.get(name, (name,)):
                        local.setdefault(alias, copies[id(t)])
        if not gather:
            return local
        merged: dict[str, torch.Tensor] = {}
        for part in self.gather_objects(local):
            for name, value in part.items():
                merged.setdefault(name, value)
        return merged

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load this rank's tensors from a state dict under the original names (full tensors,
        as ``state_dict(gather=True)`` gives; sharded tensors take this rank's shard)."""
        missing = []
        for module in self._modules():
            own = unwrap(module).state_dict(keep_vars=True)
            for name, t in own.items():
                if name not in self.captured.state_names:
                    continue
                found = next((alias for alias in self.aliases.get(name, (name,)) if alias in state), None)
                if found is not None:
                    with torch.no_grad():
                        t.copy_(shard_like(state[found], t))
                else:
                    missing.append(name)
        if strict and missing:
            raise ExecutionError(f"state dict lacks {len(missing)} tensors this rank holds, e.g. {missing[:3]}")
        return missing
