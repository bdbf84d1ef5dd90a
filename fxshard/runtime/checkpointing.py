"""Activation checkpointing of a graph's repeated blocks, names and Parameters unchanged.

:func:`apply_checkpointing` outlines each region (:func:`fxshard.passes.regions.outline`) and
makes its block module run under non-reentrant ``torch.utils.checkpoint.checkpoint``:

- ``"full"``: the block keeps only its inputs; everything inside is recomputed in backward;
- ``"selective"``: torch's selective-checkpoint policy keeps the outputs of matmul-like and
  attention operators and recomputes the rest (element-wise ops, norms, views);
- ``"none"``: the graph is returned as it is.

The checkpointed block is a :class:`CheckpointedBlock` at the block's own path, holding the
block's own submodules, parameters and buffers, so ``state_dict`` keys, parameter names and
Parameter objects do not change. It is the unit FSDP2's ``fully_shard`` wraps: its hooks run
on the module call, the checkpoint inside its forward. Recomputation restores the RNG state
(dropout draws the same mask twice). See docs/runtime.md, "Activation checkpointing".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils.checkpoint as torch_checkpoint

from fxshard.capture import CapturedGraph
from fxshard.cost_models.checkpointing import SELECTIVE_KEPT_OPS
from fxshard.errors import ExecutionError
from fxshard.passes.regions import Region, outline, regions_within, repeated_blocks
from fxshard.passes.split import SplitGraph
from fxshard.plan import Plan

__all__ = ["POLICIES", "CheckpointedBlock", "apply_checkpointing", "checkpoint_stages", "kept_by_selective"]

POLICIES = ("none", "selective", "full")


@functools.cache
def _kept_ops() -> frozenset:
    # The cost model's list (fxshard.cost_models.checkpointing): what it counts as kept is what
    # the policy keeps. Names absent from a torch build are skipped.
    return frozenset(getattr(torch.ops.aten, n) for n in SELECTIVE_KEPT_OPS if hasattr(torch.ops.aten, n))


def kept_by_selective(op: Any) -> bool:
    """Whether selective checkpointing keeps the output of the aten operator ``op`` (an
    OpOverload or OpOverloadPacket)."""
    return getattr(op, "overloadpacket", op) in _kept_ops()


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    policy = torch_checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if kept_by_selective(op) else policy.PREFER_RECOMPUTE


def _selective_context() -> tuple:
    create = getattr(torch_checkpoint, "create_selective_checkpoint_contexts", None)
    if create is None or not hasattr(torch_checkpoint, "CheckpointPolicy"):
        raise ExecutionError(f"selective activation checkpointing needs torch's selective-checkpoint API "
                             f"(torch >= 2.4); torch {torch.__version__} lacks it: use "
                             f"activation_checkpointing='full'")
    return create(_selective_policy)


class CheckpointedBlock(torch.nn.Module):
    """One outlined block run under activation checkpointing.

    It holds the block module's own submodules, parameters and buffers (so names are those of
    the block) and runs the block's generated code on itself inside
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.
    """

    def __init__(self, block: torch.fx.GraphModule, policy: str) -> None:
        super().__init__()
        if policy not in ("selective", "full"):
            raise ExecutionError(f"a checkpointed block's policy is 'selective' or 'full', not {policy!r}")
        for name, module in block.named_children():
            self.add_module(name, module)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in block.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in block._non_persistent_buffers_set)
        for name, value in vars(block).items():
            if isinstance(value, torch.Tensor) and name not in self._parameters and name not in self._buffers:
                setattr(self, name, value)  # constants export lifted into plain attributes
        self.policy = policy
        self.code = block.code
        self._run: Callable = type(block).forward  # the block's code; reads its state from self

    def forward(self, *args: Any) -> Any:
        context = {"context_fn": _selective_context} if self.policy == "selective" else {}
        return torch_checkpoint.checkpoint(self._run, self, *args, use_reentrant=False, **context)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def apply_checkpointing(gm: torch.fx.GraphModule, regions: Sequence[Region], policy: str) -> torch.fx.GraphModule:
    """``gm`` with each region in it run under activation checkpointing ``policy``.

    Args:
        gm: a captured graph or a stage's module (not modified).
        regions: the repeated blocks (:func:`fxshard.passes.regions.repeated_blocks`, or
            :func:`~fxshard.passes.regions.regions_within` a stage); regions whose nodes ``gm``
            lacks are skipped.
        policy: ``"none"`` (``gm`` is returned), ``"selective"`` or ``"full"``.

    Returns:
        A GraphModule computing the same values with the same parameter names and objects.

    Raises:
        ExecutionError: an unknown policy.

    Example::

        gm = apply_checkpointing(captured.gm, repeated_blocks(captured), "full")
        loss = loss_fn(captured.output_spec.rebuild(gm(*flat)), target)
    """
    if policy not in POLICIES:
        raise ExecutionError(f"activation checkpointing policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "none":
        return gm
    if policy == "selective":
        _selective_context()  # refuse early on a torch without the API
    outlined = outline(gm, regions)
    called = {str(n.target) for n in outlined.graph.nodes if n.op == "call_module"}
    for region in regions:
        if region.module in called:
            block = outlined.get_submodule(region.module)
            _set_submodule(outlined, region.module, CheckpointedBlock(block, policy))
    return outlined


def checkpoint_stages(split: SplitGraph, captured: CapturedGraph, plan: Plan,
                      regions: Sequence[Region] | None = None) -> SplitGraph:
    """``split`` with each stage's module checkpointed per its StagePlan's policy, over the
    repeated blocks lying wholly inside the stage (``regions`` default: those of ``captured``)."""
    if all(s.activation_checkpointing == "none" for s in plan.stages):
        return split
    regions = repeated_blocks(captured) if regions is None else regions
    stage_of = plan.stage_of()
    stages = []
    for stage, stage_plan in zip(split.stages, plan.stages):
        nodes = [n for n, s in stage_of.items() if s == stage.index]
        module = apply_checkpointing(stage.module, regions_within(regions, nodes), stage_plan.activation_checkpointing)
        stages.append(dataclasses.replace(stage, module=module))
    return SplitGraph(stages=tuple(stages))
