"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``).

A ``fsdp`` plan holds the whole model on every rank, sharded: each parameter's rows are cut
over the data-parallel group (a 1-D ``DeviceMesh`` of all ranks), and so are its gradient and
optimizer state. The wrapping units come from the graph: each repeated block
(:func:`fxshard.passes.regions.repeated_blocks`) is outlined into a module at its own path,
run under activation checkpointing when the plan says so
(:func:`fxshard.runtime.checkpointing.apply_checkpointing`), and sharded as a unit of its
own; the root unit (embeddings, final norm, head: everything outside the blocks) is sharded
last. Parameter names and ``state_dict`` keys are the original model's.

Gradient accumulation: with ``plan.microbatches`` = m > 1 a rank runs its share of the batch
as m micro-batches one after another, each loss divided by m; FSDP reduce-scatters every
micro-batch's gradients and they accumulate sharded (what torchtitan does), so no rank ever
holds an unsharded gradient for the whole model. A pipeline stage sharded here (pipeline x
FSDP) instead lets torch's ``PipelineStage`` hold gradient sync back until its last
micro-batch. See docs/runtime.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from fxshard.modules import has_meta_state
from fxshard.passes.regions import Region, outline, regions_within, repeated_blocks
from fxshard.plan import Plan
from fxshard.runtime.checkpointing import apply_checkpointing
from fxshard.runtime.replicas import WholeModelExecution
from fxshard.runtime.stages import materialise, unwrap

__all__ = ["FsdpExecution", "StageSharding", "outline_units", "shard_units", "sharded_bytes"]


def outline_units(gm: torch.fx.GraphModule, regions: Sequence[Region], policy: str) -> tuple[torch.fx.GraphModule,
                                                                                               list[str]]:
    """``gm`` with its repeated blocks outlined (and checkpointed under ``policy``), and the
    paths of the block modules it calls: the units to shard."""
    module = outline(gm, regions) if policy == "none" else apply_checkpointing(gm, regions, policy)
    called = {str(n.target) for n in module.graph.nodes if n.op == "call_module"}
    return module, [r.module for r in regions if r.module in called]


def shard_units(root: torch.nn.Module, units: Sequence[torch.nn.Module], mesh: Any, *,
                reshard_after_forward: bool) -> None:
    """``fully_shard`` each unit, then the root (what the units leave), over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward)


def sharded_bytes(params: Sequence[torch.nn.Parameter],
                  optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds of ``params`` (their local shards), of their gradients and of
    ``optimizer``'s per-parameter tensors of the parameters' shape (Adam's moments; not its
    scalar ``step``): ``{"params": ..., "grads": ..., "optimizer": ...}``."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    unique = list({id(p): p for p in params}.values())
    state = 0
    if optimizer is not None:
        for p in unique:
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    state += nbytes(value)
    return {"params": sum(nbytes(p) for p in unique),
            "grads": sum(nbytes(p.grad) for p in unique if p.grad is not None), "optimizer": state}


class FsdpExecution(WholeModelExecution):
    """This rank's shard of the whole model (a ``fsdp`` plan under torchrun)."""

    def _build(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        from torch.distributed.device_mesh import init_device_mesh

        captured, plan = self.captured, self.plan
        mesh = init_device_mesh(self.device.type, (self.replicas,), mesh_dim_names=("dp",))
        # A model on meta is sharded first and then given memory: each rank allocates and
        # initialises its shards only (as torchtitan builds large models).
        meta = has_meta_state(captured.gm)
        if not meta:
            materialise(captured.gm, self.device)
        module, paths = outline_units(captured.gm, repeated_blocks(captured), plan.stages[0].activation_checkpointing)
        shard_units(module, [module.get_submodule(p) for p in paths], mesh,
                    reshard_after_forward=plan.reshard_after_forward)
        if meta:
            materialise(module, self.device)
        return module, module

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        # Every micro-batch's backward reduce-scatters: gradients accumulate sharded.
        return contextlib.nullcontext()


class StageSharding:
    """A pipeline's stages as the plan runs them (:class:`fxshard.runtime.stages.StagePrep`):
    each stage's whole blocks checkpointed under its ``activation_checkpointing``, and with
    ``data_parallel="fsdp"`` each block and then the stage sharded over ``mesh`` (the stage's
    data-parallel group), as torchtitan composes FSDP2 with pipelining."""

    def __init__(self, plan: Plan, regions: Sequence[Region], mesh: Any | None) -> None:
        self.plan = plan
        self.regions = tuple(regions)
        self.mesh = mesh
        self.shards = mesh is not None
        self.units: dict[int, list[str]] = {}

    def rewrite(self, index: int, module: torch.fx.GraphModule) -> torch.fx.GraphModule:
        stage = self.plan.stages[index]
        if stage.activation_checkpointing == "none" and not self.shards:
            self.units[index] = []
            return module
        module, self.units[index] = outline_units(module, regions_within(self.regions, stage.nodes),
                                                  stage.activation_checkpointing)
        return module

    def shard(self, index: int, module: torch.nn.Module) -> None:
        if not self.shards:
            return
        inner = unwrap(module)
        shard_units(module, [inner.get_submodule(p) for p in self.units.get(index, [])], self.mesh,
                    reshard_after_forward=self.plan.reshard_after_forward)
