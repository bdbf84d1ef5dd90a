"""This rank's stages of a plan, ready for ``torch.distributed.pipelining``.

:func:`build_rank_stages` is a function of the plan, the split graph and the rank: it keeps
the rank's stages, moves them to its device (materialising a meta model's weights there
only), gives stage 0 a tensor-only signature, separates a parameter two of the rank's stages
share, finds the parameters other ranks' stages share (a tied embedding and LM head), and
wraps each stage in a ``PipelineStage``. See docs/runtime.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.fx

from fxshard.capture import CapturedGraph
from fxshard.errors import ExecutionError
from fxshard.modules import has_meta_state
from fxshard.passes.split import SplitGraph, carries_numbers, stage_io_examples
from fxshard.plan import Plan
from fxshard.runtime.local import set_parameter

__all__ = ["RankStages", "StagePrep", "build_rank_stages", "materialise", "unwrap"]


class _TensorInputs(torch.nn.Module):
    """Stage 0 as torch pipelining calls it: tensor inputs only, constants filled back in."""

    def __init__(self, stage: torch.nn.Module, template: tuple[tuple[bool, Any], ...]) -> None:
        super().__init__()
        self.stage = stage
        self.template = template

    def forward(self, *tensors: Any) -> Any:
        it = iter(tensors)
        return self.stage(*[next(it) if is_tensor else const for is_tensor, const in self.template])


class StagePrep(Protocol):
    """What :func:`build_rank_stages` does to each stage of this rank beyond splitting."""

    shards: bool
    """Whether :meth:`shard` replaces the stage's parameters (with sharded ones)."""

    def rewrite(self, index: int, module: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Stage ``index``'s graph as it runs (its blocks outlined and checkpointed)."""

    def shard(self, index: int, module: torch.nn.Module) -> None:
        """Shard stage ``index``'s module (as torch pipelining calls it) in place."""


@dataclasses.dataclass(frozen=True)
class RankStages:
    """This rank's part of a pipeline.

    Attributes:
        modules: the rank's stage modules, in stage order (stage 0's wrapped for tensor inputs).
        stages: their ``PipelineStage`` objects.
        first, last: whether the rank holds the first or the last stage.
        local_copies: ``(owner, copy)`` of each parameter two of the rank's stages share: the
            copy's gradient is added into the owner's after every step.
        shared: ``(parameters, group)`` of each parameter other ranks' stages hold too, with
            the group of the ranks (of one replica index) holding it: gradients are summed there.
    """

    modules: list[torch.nn.Module]
    stages: list[Any]
    first: bool
    last: bool
    local_copies: list[tuple[torch.nn.Parameter, torch.nn.Parameter]]
    shared: list[tuple[list[torch.nn.Parameter], Any]]


def build_rank_stages(captured: CapturedGraph, plan: Plan, split: SplitGraph, rank: int, device: torch.device,
                      group: Any, *, prepare: StagePrep | None = None) -> RankStages:
    """Rank ``rank``'s stages of ``split``, on ``device``, talking over ``group`` (the pp group).

    ``prepare`` (see :class:`StagePrep`) rewrites each stage's graph once it is on its device
    (activation checkpointing) and shards the stage before torch's ``PipelineStage`` wraps it.
    """
    from torch.distributed.pipelining import PipelineStage

    mine = [s for s in plan.stages if rank in s.device_indices]
    shared = _shared_groups(captured, plan, split, rank)
    local_ties = _separate_local_ties([split.stages[s.index].module for s in mine])
    examples = _static_examples(captured, plan, split)
    modules, stages = [], []
    for s in mine:
        module: torch.nn.Module = split.stages[s.index].module
        # A sharded stage on meta gets memory after sharding: its rank's shards only.
        late = prepare is not None and prepare.shards and has_meta_state(module)
        if not late:
            materialise(module, device)
        if prepare is not None:
            module = prepare.rewrite(s.index, module)
        if s.index == 0:
            module = _wrap_inputs(captured, module)
        if prepare is not None:
            prepare.shard(s.index, module)
        if late:
            materialise(module, device)
        modules.append(module)
        io = examples[s.index] if examples is not None else None
        static = {} if io is None else {"input_args": io[0], "output_args": io[1]}
        stages.append(PipelineStage(module, s.index, plan.num_stages, device, group=group, **static))
    def param(ref: tuple[int, str]) -> torch.nn.Parameter:
        return unwrap(modules[ref[0]]).get_parameter(ref[1])

    local_copies = [(param(a), param(b)) for a, b in local_ties]
    # A local copy's gradient joins its owner's before the sum over ranks: the owner takes part.
    owner_of = {id(copy): owner for owner, copy in local_copies}
    position = {s.index: k for k, s in enumerate(mine)}
    resolved = []
    for refs, g in shared:
        params = [param((position[i], name)) for i, name in refs]
        params = list({id(p): p for p in (owner_of.get(id(p), p) for p in params)}.values())
        resolved.append((params, g))
    return RankStages(modules=modules, stages=stages, first=any(s.index == 0 for s in mine),
                      last=any(s.index == plan.num_stages - 1 for s in mine), local_copies=local_copies,
                      shared=resolved)


def materialise(module: torch.nn.Module, device: torch.device) -> None:
    """Move a stage to its device; a meta stage gets real memory and its modules' own init."""
    if has_meta_state(module):
        module.to_empty(device=device)
        with torch.no_grad():
            for sub in module.modules():
                if hasattr(sub, "reset_parameters") and sub is not module:
                    sub.reset_parameters()
    else:
        module.to(device)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The stage itself, without DDP or the tensor-input wrapper."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    if isinstance(module, _TensorInputs):
        module = module.stage
    return module


def _wrap_inputs(captured: CapturedGraph, module: torch.nn.Module) -> torch.nn.Module:
    example = [n.meta.get("val") for n in captured.gm.graph.nodes if n.op == "placeholder"]
    template = tuple((isinstance(v, torch.Tensor), None if isinstance(v, torch.Tensor) else v) for v in example)
    return _TensorInputs(module, template) if not all(t for t, _ in template) else module


def _static_examples(captured: CapturedGraph, plan: Plan, split: SplitGraph) -> list | None:
    """Stage input and output metadata for torch's static mode, when a number crosses a
    stage boundary (None otherwise: torch infers it from the first micro-batch).

    torch's dynamic inference runs each stage once on uninitialised buffers; a stage that
    computes with a received number (``x.view(n, -1)`` with ``n = x.size(0)`` from an
    earlier stage) would read garbage there. The metadata comes from a fake-tensor run of
    the captured graph at one micro-batch, which gives the numbers their real values."""
    captured_values = {n.name: n.meta.get("val") for n in captured.gm.graph.nodes}
    if not carries_numbers(split, captured_values):
        return None
    values, flat = _microbatch_values(captured, plan)
    examples = stage_io_examples(split, values, flat)
    if any(e is None for e in examples):
        raise ExecutionError(
            f"{captured.model_name} passes a number between stages and returns a non-tensor output; under "
            f"torchrun the last stage must return tensors only. Return tensors (torch.tensor(n)) from forward")
    return examples


def _microbatch_values(captured: CapturedGraph, plan: Plan) -> tuple[dict[str, Any], list[Any]]:
    """Every node's value at one micro-batch (fake tensors; numbers are real numbers)."""
    share = plan.batch_size // (plan.replicas * plan.microbatches)
    placeholders = [n for n in captured.fake_module.graph.nodes if n.op == "placeholder"]
    flat: list[Any] = []
    with captured.fake_mode:
        for node in placeholders:
            v = node.meta.get("val")
            if (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == plan.batch_size
                    and captured.fixed_batch is None):
                v = torch.empty((share, *v.shape[1:]), dtype=v.dtype, device=v.device)
            flat.append(v)
    values: dict[str, Any] = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = result
            return result

    with captured.fake_mode:
        Record(captured.fake_module).run(*flat)
    return values, flat


def _shared_groups(captured: CapturedGraph, plan: Plan, split: SplitGraph,
                   rank: int) -> list[tuple[list[tuple[int, str]], Any]]:
    """Process groups, one per replica index, of the ranks holding each tensor that several
    stages hold (the replica sync already averages each stage's replicas; these groups add up
    the stages' contributions), with ``(stage index, name)`` of this rank's copies. Every rank
    creates every group, in the same order."""

    def canonical(module: torch.nn.Module, name: str) -> str:
        return captured.param_names.get(id(module.get_parameter(name)), name)

    holders: dict[str, dict[int, set[int]]] = {}
    for stage, plan_stage in zip(split.stages, plan.stages):
        for name, _ in stage.module.named_parameters():
            by_replica = holders.setdefault(canonical(stage.module, name), {})
            for j, r in enumerate(plan_stage.device_indices):
                by_replica.setdefault(j, set()).add(r)
    groups = []
    for name in sorted(holders):
        for j in sorted(holders[name]):
            ranks = sorted(holders[name][j])
            if len(ranks) <= 1:
                continue
            group = dist.new_group(ranks)
            if rank in ranks:
                refs = [(st.index, n) for st in split.stages if rank in plan.stages[st.index].device_indices
                        for n, _ in st.module.named_parameters() if canonical(st.module, n) == name]
                groups.append((refs, group))
    return groups


def _separate_local_ties(modules: list[torch.nn.Module]) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    """Give each of this rank's stages its own copy of a parameter two of them share.

    Schedules that split backward into input and weight steps set each stage's weight
    gradients separately, so two stages sharing one Parameter would overwrite each other;
    the copies' gradients are added into the first stage's after every step. Returns
    ``((stage, name) of the owner, (stage, name) of the copy)`` by position in ``modules``
    (resolved once the stages are built: sharding replaces the Parameter objects).
    """
    owner: dict[int, tuple[int, str]] = {}
    pairs = []
    for k, module in enumerate(modules):
        for name, param in list(module.named_parameters(remove_duplicate=False)):
            if id(param) not in owner:
                owner[id(param)] = (k, name)
                continue
            replica = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            set_parameter(module, name, replica)
            pairs.append((owner[id(param)], (k, name)))
    return pairs
