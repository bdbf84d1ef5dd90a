"""Runtime under torchrun: each rank builds and runs only its own stage(s).

Rank r is the plan's device r (global rank order, machine by machine). The ranks form a
``DeviceMesh`` of (pipeline ranks, data-parallel replicas): stage s's replicas are the plan's
``devices`` of that stage. Each rank builds its stages (:mod:`fxshard.runtime.stages`) and
runs them with the plan's ``torch.distributed.pipelining`` schedule; a ``single`` or ``ddp``
plan runs the whole model, in ``DistributedDataParallel`` over several replicas.

Every rank calls ``step`` with the same whole batch: a pipeline's first stage reads the
inputs, its last the target; a replica takes its share of the batch. After backward, a
stage's replicas average their gradients (:mod:`fxshard.runtime.data_parallel`), and a
parameter held by several stages (a tied embedding and LM head) has its gradients summed over
the ranks holding it, as Megatron does for embeddings. A failure on one rank stops every rank
(:mod:`fxshard.runtime.failures`). See docs/runtime.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from fxshard.capture import CapturedGraph
from fxshard.errors import ExecutionError
from fxshard.passes.split import split_graph
from fxshard.plan import Plan
from fxshard.runtime.agreement import agree, device_mismatch, fingerprint_mismatch
from fxshard.runtime.data_parallel import all_reduce_gradients, wrap_replica
from fxshard.runtime.failures import FailureGuard
from fxshard.runtime.local import to_device
from fxshard.runtime.loss import LossCall, call_loss, check_loss_call, leading_rows
from fxshard.runtime.stages import RankStages, build_rank_stages, materialise, unwrap
from fxshard.simulate import SCHEDULES

__all__ = ["DistributedPipeline", "init_process_group_from_env", "rank_device"]


def rank_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK with NCCL, else the CPU."""
    import os

    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group_from_env(timeout_s: float = 120.0) -> None:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on GPU)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


class DistributedPipeline:
    """This rank's part of a plan, run with torch.distributed.pipelining (or DDP)."""

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
        self.guard = FailureGuard(self.rank, self.world)
        self._loss_call = LossCall(batch=0, microbatches=1)
        self._loss_index = 0
        self.replicas = plan.replicas
        self.dp_group: Any = None
        self.schedule: Any = None
        self.local = RankStages(modules=[], stages=[], first=True, last=True, local_copies=[], shared=[])
        self.module: torch.nn.Module = captured.gm
        self.ddp: torch.nn.Module = captured.gm
        if plan.strategy in ("single", "ddp"):
            self.replica = self.rank
            materialise(self.module, self.device)
            self.ddp = wrap_replica(self.module, self.device, self.replicas)
        else:
            self.replica = self.rank % self.replicas
            self._init_pipeline()

    @property
    def local_stages(self) -> list[torch.nn.Module]:
        """This rank's stage modules (empty for a whole-model plan)."""
        return self.local.modules

    def _objection(self) -> str | None:
        """Why this rank cannot run the plan (checked on every rank, agreed before building)."""
        plan, captured = self.plan, self.captured
        needed = sorted({d for s in plan.stages for d in s.device_indices})
        if self.world != len(needed):
            return (f"the plan runs on {len(needed)} processes ({plan.strategy}, {plan.num_stages} stage(s) x "
                    f"{plan.replicas} replica(s)) but torchrun started {self.world}; run "
                    f"'torchrun --nproc-per-node {len(needed)} ...' or re-plan for {self.world} devices")
        return (fingerprint_mismatch(plan, captured.model_name, captured.fingerprint(), len(captured.nodes))
                or device_mismatch(plan, self.rank, self.device, dist.get_backend()))

    def _init_pipeline(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining.schedules import get_schedule_class

        plan = self.plan
        pp = len({s.device_indices[0] for s in plan.stages})
        mesh = init_device_mesh(self.device.type, (pp, plan.replicas), mesh_dim_names=("pp", "dp"))
        self.dp_group = mesh.get_group("dp")
        # Zero-bubble schedules detach stage outputs in place between the input- and weight-
        # gradient steps: every output must then be a tensor of its own.
        split = split_graph(self.captured, plan.stage_of(), plan.num_stages,
                            copy_outputs=plan.schedule in ("zbv", "interleavedzb"))
        self.local = build_rank_stages(self.captured, plan, split, self.rank, self.device, mesh.get_group("pp"))
        name, per_rank = SCHEDULES[plan.schedule]
        stages = self.local.stages
        loss = self._wrapped_loss()
        self.schedule = get_schedule_class(name)(stages[0] if per_rank == 1 else stages, plan.microbatches,
                                                 loss_fn=loss)

    def _wrapped_loss(self) -> Callable | None:
        if self.loss_fn is None:
            return None
        rebuild = self.captured.output_spec.rebuild
        user = self.loss_fn

        def loss(output: Any, target: Any) -> torch.Tensor:
            flat = output if isinstance(output, tuple) else (output,)
            i, self._loss_index = self._loss_index, self._loss_index + 1
            return call_loss(user, rebuild(flat), target, self._loss_call, microbatch=i)

        return loss

    # -- running ------------------------------------------------------------------------

    def _shard(self, values: Any) -> Any:
        if self.replicas == 1:
            return values

        def cut(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                if t.shape[0] % self.replicas:
                    raise ExecutionError(f"a batch of {t.shape[0]} does not split over {self.replicas} replicas")
                size = t.shape[0] // self.replicas
                return t.narrow(0, self.replica * size, size)
            return t

        return pytree.tree_map(cut, values)

    def _flat_tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        flat = self.captured.flatten_inputs(args, kwargs)
        return [v.to(self.device) for v in flat if isinstance(v, torch.Tensor)]

    def forward(self, args: tuple, kwargs: dict) -> Any:
        """Whole-batch forward; the model's outputs on the last stage's ranks, None elsewhere."""
        return self.guard.run("forward", self._forward, args, kwargs)

    def step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        """One forward and backward over the batch; the mean loss on the last stage's ranks."""
        return self.guard.run("step", self._step, args, kwargs, target, loss_fn)

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        args, kwargs = self._shard((args, kwargs))
        if self.schedule is None:
            flat = self.captured.flatten_inputs(args, kwargs)
            return self.captured.output_spec.rebuild(self.module(*to_device(flat, self.device)))
        if not hasattr(self.schedule, "eval"):
            raise ExecutionError("this torch's pipeline schedules have no forward-only eval(); use step()")
        self.guard.sending()
        inputs = self._flat_tensors(args, kwargs) if self.local.first else []
        out = self.schedule.eval(*inputs)
        if not self.local.last:
            return None
        return self.captured.output_spec.rebuild(out if isinstance(out, tuple) else (out,))

    def _step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        if loss_fn is not self.loss_fn and self.schedule is not None:
            raise ExecutionError("under torchrun the loss is part of the pipeline schedule: pass loss_fn to "
                                 "fxshard.compile, not to step")
        if self.schedule is not None and target is not None and not isinstance(target, torch.Tensor):
            raise ExecutionError(f"under torchrun the target must be one tensor (torch.distributed.pipelining splits "
                                 f"it into micro-batches), got {type(target).__name__}; pack it into a tensor")
        # Checked alike on every rank (each gets the same batch and target) before any message.
        batch = leading_rows(self.captured.flatten_inputs(args, kwargs)) or 0
        how = LossCall(batch=batch, microbatches=1 if self.schedule is None else self.plan.microbatches,
                       replicas=self.replicas, has_target=target is not None)
        check_loss_call(loss_fn, target, how)
        args, kwargs, target = self._shard((args, kwargs, target))
        self._loss_call, self._loss_index = how, 0
        self.guard.sending()
        if self.schedule is None:
            flat = self.captured.flatten_inputs(args, kwargs)
            out = self.captured.output_spec.rebuild(self.ddp(*to_device(flat, self.device)))
            loss = call_loss(loss_fn, out, to_device(target, self.device), how)
            loss.backward()
            return self._replica_mean(loss.detach(), None)
        with torch.no_grad():
            for owner, replica in self.local.local_copies:
                replica.copy_(owner)
        losses: list[torch.Tensor] = []
        inputs = self._flat_tensors(args, kwargs) if self.local.first else []
        tgt = to_device(target, self.device) if self.local.last else None
        self.schedule.step(*inputs, target=tgt, losses=losses if self.local.last else None)
        for owner, replica in self.local.local_copies:
            if replica.grad is not None:
                owner.grad = replica.grad.clone() if owner.grad is None else owner.grad + replica.grad
                replica.grad = None
        if self.replicas > 1:
            # Once per step, not in DDP: see fxshard.runtime.data_parallel.
            all_reduce_gradients(self.parameters(), self.dp_group, divide_by=self.replicas)
        for params, group in self.local.shared:
            all_reduce_gradients(params, group)
        if self.local.last:
            return self._replica_mean(torch.stack([loss.detach() for loss in losses]).mean(), self.dp_group)
        return None

    def _replica_mean(self, loss: torch.Tensor, group: Any) -> torch.Tensor:
        """The loss over the whole batch: the mean of the replicas' (equal-sized) shards."""
        if self.replicas > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=group)
            loss = loss / self.replicas
        return loss

    # -- parameters and checkpoints --------------------------------------------------------

    def _modules(self) -> list[torch.nn.Module]:
        return [self.module] if self.schedule is None else self.local_stages

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters (a local copy of a tied one is not listed: its owner is)."""
        seen = {id(replica) for _, replica in self.local.local_copies}
        for module in self._modules():
            inner = unwrap(module)
            for name, p in inner.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def state_dict(self, *, gather: bool = False) -> dict[str, torch.Tensor]:
        """This rank's tensors under the original names; all ranks' with ``gather=True``.

        A tied tensor appears under every name the original model's ``state_dict`` gives it
        (``transformer.wte.weight`` and ``lm_head.weight``), whichever name its stage uses."""
        local: dict[str, torch.Tensor] = {}
        owner_of = {id(replica): owner for owner, replica in self.local.local_copies}
        for module in self._modules():
            for name, t in unwrap(module).state_dict(keep_vars=True).items():
                if name in self.captured.state_names:  # not fxshard's helpers, not non-persistent buffers
                    value = owner_of.get(id(t), t).detach().cpu().clone()
                    for alias in self.aliases.get(name, (name,)):
                        local.setdefault(alias, value)
        if not gather:
            return local
        merged: dict[str, torch.Tensor] = {}
        for part in self.gather_objects(local):
            for name, value in part.items():
                merged.setdefault(name, value)
        return merged

    def parameter_names(self) -> dict[int, str]:
        """``id(param) -> canonical name`` for this rank's parameters (the same name on every
        rank for a tied parameter)."""
        names = {}
        for module in self._modules():
            inner = unwrap(module)
            for name, p in inner.named_parameters():
                name = self.captured.param_names.get(id(p), name)
                names.setdefault(id(p), self.aliases.get(name, (name,))[0])
        return names

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load this rank's tensors from a state dict under the original names."""
        missing = []
        for module in self._modules():
            inner = unwrap(module)
            own = inner.state_dict()
            for name in own:
                if name not in self.captured.state_names:
                    continue
                found = next((alias for alias in self.aliases.get(name, (name,)) if alias in state), None)
                if found is not None:
                    with torch.no_grad():
                        own[name].copy_(state[found])
                else:
                    missing.append(name)
        if strict and missing:
            raise ExecutionError(f"state dict lacks {len(missing)} tensors this rank holds, e.g. {missing[:3]}")
        return missing
