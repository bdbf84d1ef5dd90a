"""Pipelines under torchrun: each rank builds and runs only its own stage(s).

Rank r is the plan's device r (global rank order, machine by machine). The ranks form a
``DeviceMesh`` of (pipeline ranks, data-parallel replicas): stage s's replicas are the plan's
``devices`` of that stage. Each rank builds its stages (:mod:`fxshard.runtime.stages`) and
runs them with the plan's ``torch.distributed.pipelining`` schedule (``pipeline`` and
``hybrid`` plans; the whole model per rank is :mod:`fxshard.runtime.replicas`).

Every rank calls ``step`` with the same whole batch: a pipeline's first stage reads the
inputs, its last the target; a replica takes its share of the batch. After backward, a
stage's replicas average their gradients (:mod:`fxshard.runtime.data_parallel`), and a
parameter held by several stages (a tied embedding and LM head) has its gradients summed over
the ranks holding it, as Megatron does for embeddings. A failure on one rank stops every rank
(:mod:`fxshard.runtime.failures`). See docs/runtime.md.
"""

from __future__ import annotations

import datetime
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from fxshard.capture import CapturedGraph
from fxshard.errors import ExecutionError
from fxshard.passes.regions import repeated_blocks
from fxshard.passes.split import split_graph
from fxshard.plan import Plan
from fxshard.runtime.data_parallel import all_reduce_gradients
from fxshard.runtime.fsdp import StageSharding
from fxshard.runtime.local import to_device
from fxshard.runtime.loss import LossCall, call_loss
from fxshard.runtime.ranks import RankExecution, rank_device
from fxshard.runtime.stages import build_rank_stages
from fxshard.simulate import SCHEDULES

__all__ = ["DistributedPipeline", "init_process_group_from_env", "rank_device"]

_ZERO_BUBBLE = ("zbv", "interleavedzb")
"""Schedules that split backward into input- and weight-gradient steps."""


def init_process_group_from_env(timeout_s: float = 120.0) -> None:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on GPU)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


class DistributedPipeline(RankExecution):
    """This rank's stages of a ``pipeline`` or ``hybrid`` plan, run with torch.distributed.pipelining."""

    def __init__(self, captured: CapturedGraph, plan: Plan, *, loss_fn: Callable | None = None,
                 aliases: Mapping[str, tuple[str, ...]] | None = None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining.schedules import get_schedule_class

        super().__init__(captured, plan, loss_fn=loss_fn, aliases=aliases)
        self._microbatch_call = LossCall(batch=0, microbatches=1)
        self._loss_index = 0
        pp = len({s.device_indices[0] for s in plan.stages})
        mesh = init_device_mesh(self.device.type, (pp, plan.replicas), mesh_dim_names=("pp", "dp"))
        self.dp_group = mesh.get_group("dp")
        # Zero-bubble schedules detach stage outputs in place between the input- and weight-
        # gradient steps: every output must then be a tensor of its own.
        split = split_graph(self.captured, plan.stage_of(), plan.num_stages,
                            copy_outputs=plan.schedule in _ZERO_BUBBLE)
        sharded = plan.data_parallel == "fsdp"
        prepare = StageSharding(plan, repeated_blocks(captured), mesh["dp"] if sharded else None)
        self.local = build_rank_stages(self.captured, plan, split, self.rank, self.device, mesh.get_group("pp"),
                                       prepare=prepare)
        name, per_rank = SCHEDULES[plan.schedule]
        stages = self.local.stages
        self.schedule = get_schedule_class(name)(stages[0] if per_rank == 1 else stages, plan.microbatches,
                                                 loss_fn=self._wrapped_loss())
        # step() returns the loss, not the outputs: without return_outputs=False torch's last stage keeps
        # every micro-batch's output (an LM's logits) to the end of the step and then concatenates
        # them, 2 x the batch's logits held for nothing (measured on GPT-2's head stage under
        # calibrate_dist). A torch whose step() has no such argument keeps them.
        accepts = "return_outputs" in inspect.signature(self.schedule.step).parameters
        self._step_options: dict[str, Any] = {"return_outputs": False} if accepts else {}

    def _objection(self) -> str | None:
        plan = self.plan
        if plan.data_parallel == "fsdp" and plan.schedule in _ZERO_BUBBLE and plan.reshard_after_forward:
            return (f"schedule {plan.schedule!r} with data_parallel='fsdp' and reshard_after_forward=True: a "
                    f"zero-bubble schedule's weight-gradient step, run after FSDP has resharded the stage's "
                    f"parameters, computes wrong gradients (checked against eager); keep the parameters unsharded "
                    f"after forward (reshard_after_forward=False), or use gpipe, 1f1b or interleaved1f1b")
        return super()._objection()

    @property
    def local_stages(self) -> list[torch.nn.Module]:
        """This rank's stage modules."""
        return self.local.modules

    def _wrapped_loss(self) -> Callable | None:
        if self.loss_fn is None:
            return None
        rebuild = self.captured.output_spec.rebuild
        user = self.loss_fn

        def loss(output: Any, target: Any) -> torch.Tensor:
            flat = output if isinstance(output, tuple) else (output,)
            i, self._loss_index = self._loss_index, self._loss_index + 1
            return call_loss(user, rebuild(flat), target, self._microbatch_call, microbatch=i)

        return loss

    # -- running ------------------------------------------------------------------------

    def _flat_tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        flat = self.captured.flatten_inputs(args, kwargs)
        return [v.to(self.device) for v in flat if isinstance(v, torch.Tensor)]

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        args, kwargs = self._shard((args, kwargs))
        if not hasattr(self.schedule, "eval"):
            raise ExecutionError("this torch's pipeline schedules have no forward-only eval(); use step()")
        self.guard.sending()
        inputs = self._flat_tensors(args, kwargs) if self.local.first else []
        out = self.schedule.eval(*inputs)
        if not self.local.last:
            return None
        return self.captured.output_spec.rebuild(out if isinstance(out, tuple) else (out,))

    def _step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        if loss_fn is not self.loss_fn:
            raise ExecutionError("under torchrun the loss is part of the pipeline schedule: pass loss_fn to "
                                 "fxshard.compile, not to step")
        if target is not None and not isinstance(target, torch.Tensor):
            raise ExecutionError(f"under torchrun the target must be one tensor (torch.distributed.pipelining splits "
                                 f"it into micro-batches), got {type(target).__name__}; pack it into a tensor")
        how = self._loss_call(args, kwargs, target, loss_fn)
        args, kwargs, target = self._shard((args, kwargs, target))
        self._microbatch_call, self._loss_index = how, 0
        self.guard.sending()
        with torch.no_grad():
            for owner, replica in self.local.local_copies:
                replica.copy_(owner)
        losses: list[torch.Tensor] = []
        inputs = self._flat_tensors(args, kwargs) if self.local.first else []
        tgt = to_device(target, self.device) if self.local.last else None
        self.schedule.step(*inputs, target=tgt, losses=losses if self.local.last else None, **self._step_options)
        for owner, replica in self.local.local_copies:
            if replica.grad is not None:
                owner.grad = replica.grad.clone() if owner.grad is None else owner.grad + replica.grad
                replica.grad = None
        if self.replicas > 1 and self.plan.data_parallel != "fsdp":  # FSDP reduce-scatters in backward
            # Once per step, not in DDP: see fxshard.runtime.data_parallel.
            all_reduce_gradients(self.parameters(), self.dp_group, divide_by=self.replicas)
        for params, group in self.local.shared:
            all_reduce_gradients(params, group)
        if self.local.last:
            return self._replica_mean(torch.stack([loss.detach() for loss in losses]).mean(), self.dp_group)
        return None

    # -- parameters -------------------------------------------------------------------------

    def _modules(self) -> list[torch.nn.Module]:
        return self.local_stages

    def _hidden(self) -> set[int]:
        return {id(replica) for _, replica in self.local.local_copies}

    def _owner(self, t: torch.Tensor) -> torch.Tensor:
        return next((owner for owner, replica in self.local.local_copies if replica is t), t)
