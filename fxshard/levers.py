"""The memory levers applied to a candidate's stage figures: activation checkpointing (saved
activations down, recomputation added to backward) and sharded data parallelism (FSDP2: state
sharded over the group, unsharded units in flight, all-gathers and reduce-scatters).

The planner prices a shape once without levers (fxshard/candidates.py) and turns the same
:class:`StageSummary` records into each lever combination here, arithmetically: no graph is
re-partitioned or re-analysed. The figures come from fxshard/cost_models/checkpointing.py and
fxshard/cost_models/sharding.py; see docs/planning.md ("Memory levers") and docs/cost_models.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster
from fxshard.comm import group_link, ring_reduce_scatter_time
from fxshard.cost_models import GraphCosts
from fxshard.cost_models.checkpointing import kept_nodes
from fxshard.cost_models.sharding import ParamSpec, Unit, fsdp_time, in_flight_bytes, sharded_state
from fxshard.passes.cost_graph import StateFn, state_factor
from fxshard.passes.regions import Region, regions_within, repeated_blocks
from fxshard.passes.stages import StageSummary

if TYPE_CHECKING:
    from fxshard.plan_options import PlanOptions

__all__ = ["CheckpointCostFn", "Levers", "ModelFacts", "PartitionBound", "checkpointed", "fsdp_stage", "fsdp_step",
           "lever_choices", "partition_bound", "pipeline_fsdp"]

# (costs, nodes, blocks, policy) -> an object with saved_bytes, recompute_fwd_s and
# transient_bytes: fxshard.cost_models.checkpointing.checkpoint_cost.
CheckpointCostFn = Callable[[GraphCosts, Sequence[str], Sequence[Region], str], Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Levers:
    """How a candidate's data-parallel groups hold the model, and its checkpointing policy."""

    data_parallel: str | None = None  # None (no group), "ddp" or "fsdp"
    checkpointing: str = "none"
    reshard_after_forward: bool = True


class ModelFacts:
    """What the levers need to know of a captured graph, computed once: its repeated blocks and
    the shape and size of every parameter and buffer."""

    def __init__(self, captured: CapturedGraph) -> None:
        self.captured = captured

    @functools.cached_property
    def regions(self) -> tuple[Region, ...]:
        return repeated_blocks(self.captured)

    @functools.cached_property
    def specs(self) -> dict[str, ParamSpec]:
        gm = self.captured.gm
        out = {name: ParamSpec(name=name, shape=tuple(p.shape), itemsize=p.element_size(), trainable=p.requires_grad)
               for name, p in gm.named_parameters()}
        out.update({name: ParamSpec(name=name, shape=tuple(b.shape), itemsize=b.element_size(), buffer=True)
                    for name, b in gm.named_buffers()})
        return out

    def held(self, costs: GraphCosts, nodes: Sequence[str]) -> list[ParamSpec]:
        """The parameters and buffers a node set reads, each once."""
        names: dict[str, None] = {}
        for n in nodes:
            w = costs[n].work
            names.update(dict.fromkeys(w.params))
            names.update(dict.fromkeys(w.buffers))
        return [self.specs[k] for k in names if k in self.specs]

    def unit_bytes(self, region: Region) -> float:
        return float(sum(self.specs[k].numel * self.specs[k].itemsize for k in region.params
                         if k in self.specs and not self.specs[k].buffer))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartitionBound:
    """What each node costs its stage under the most permissive levers a group may pull, for
    the partitioner's memory bound (``partition_model``'s ``activations`` and ``state``)."""

    policy: str  # the checkpointing policy the activations assume
    shards: int  # the data-parallel group a stage's state is sharded over (1: replicated or none)
    activations: dict[str, float] | None = None  # None: the default accounting (no checkpointing)
    state: StateFn | None = None  # None: the default training state
    colocate: dict[str, str] | None = None  # node -> its repeated block, kept whole when checkpointed


def _saved_under(facts: ModelFacts, costs: GraphCosts, policy: str) -> dict[str, float]:
    """Saved bytes per node when every repeated block runs checkpointed under ``policy``, as
    fxshard/cost_models/checkpointing.py counts a stage: nodes outside blocks save as without
    checkpointing; of a block, its inputs stay (charged to its first node) and, selective, the
    outputs and saved bytes of the nodes whose operators it keeps. Each storage counts once."""
    in_blocks = {n for r in facts.regions for n in r.nodes}
    out: dict[str, float] = {}
    counted: set[str] = set()

    def hold(owner_of: str, at: str) -> None:
        owner = costs.storage_owner(owner_of)
        if owner not in counted and costs[owner].work.op != "get_attr":
            counted.add(owner)
            out[at] = out.get(at, 0.0) + costs[owner].work.output_bytes

    for c in costs:
        if c.name not in in_blocks and c.work.op != "get_attr":
            out[c.name] = out.get(c.name, 0.0) + c.work.saved_bytes
            for v in c.work.saved_values:
                owner = costs.storage_owner(v)
                hold(owner, owner)
    for r in facts.regions:
        for i in r.inputs:
            hold(i, r.nodes[0])
        if policy == "selective":
            for n in kept_nodes(costs, r.nodes):
                out[n] = out.get(n, 0.0) + costs[n].work.saved_bytes
                hold(n, n)
    return out


def partition_bound(facts: ModelFacts, costs: GraphCosts, *, policy: str, shards: int, training: bool,
                    optimizer: str) -> PartitionBound:
    """The memory each node costs a stage under checkpointing ``policy`` and, with ``shards``
    > 1, its state sharded over a pipeline x FSDP group of that many ranks as
    :func:`pipeline_fsdp` holds it (sharded state plus the unsharded parameters and gradients),
    or replicated when that is less. Checkpointed blocks are kept whole: a block cut by a stage
    boundary is not checkpointed (fxshard/passes/regions.py), so a bound that assumes it is
    holds only for uncut blocks."""
    activations = colocate = None
    if training and policy != "none":
        activations = _saved_under(facts, costs, policy)
        colocate = {n: r.module for r in facts.regions for n in r.nodes}
    live = 2.0 if training else 1.0  # unsharded parameters, and gradients in training

    def sharded(w: Any) -> float:
        factor = state_factor(w.dtype, training=training, optimizer=optimizer)
        return w.param_bytes * min(factor, factor / shards + live) + w.buffer_bytes

    return PartitionBound(policy=policy, shards=shards, activations=activations,
                          state=sharded if shards > 1 else None, colocate=colocate)


def checkpointed(facts: ModelFacts, costs: GraphCosts, stage: StageSummary, policy: str,
                 cost_fn: CheckpointCostFn) -> StageSummary:
    """The stage under ``policy``: its saved activations, backward plus recomputation, and the
    transient a block's recomputed activations add."""
    if policy == "none":
        return stage
    cost = cost_fn(costs, stage.nodes, regions_within(facts.regions, stage.nodes), policy)
    return dataclasses.replace(stage, activation_bytes=float(cost.saved_bytes),
                               bwd_time_s=stage.bwd_time_s + float(cost.recompute_fwd_s),
                               transient_bytes=stage.transient_bytes + float(cost.transient_bytes))


def _units(facts: ModelFacts, costs: GraphCosts, stage: StageSummary, plain: StageSummary) -> list[Unit]:
    """The stage's FSDP units: the root (everything outside whole blocks) then each block, with
    compute per micro-batch; recomputation spread over the blocks by their forward time."""
    blocks = regions_within(facts.regions, stage.nodes)
    recompute = stage.bwd_time_s - plain.bwd_time_s
    block_fwd = [sum(costs[n].fwd_time_s for n in r.nodes) for r in blocks]
    total_fwd = sum(block_fwd) or 1.0
    units = [Unit(name=r.module, param_bytes=facts.unit_bytes(r), fwd_s=f,
                  bwd_s=sum(costs[n].bwd_time_s for n in r.nodes) + recompute * f / total_fwd)
             for r, f in zip(blocks, block_fwd)]
    params = sum(s.numel * s.itemsize for s in facts.held(costs, stage.nodes) if not s.buffer)
    root = Unit(name="", param_bytes=max(0.0, params - sum(u.param_bytes for u in units)),
                fwd_s=max(0.0, stage.fwd_time_s - sum(u.fwd_s for u in units)),
                bwd_s=max(0.0, stage.bwd_time_s - sum(u.bwd_s for u in units)))
    return [root, *units]


def fsdp_stage(facts: ModelFacts, costs: GraphCosts, stage: StageSummary, plain: StageSummary, n: int, *,
               optimizer: str, training: bool, reshard_after_forward: bool) -> tuple[StageSummary, list[Unit]]:
    """The stage as one rank of an FSDP group of ``n`` holds it (the whole model, or a stage of
    a pipeline whose units are resharded per micro-batch): sharded state plus units in flight."""
    units = _units(facts, costs, stage, plain)
    state = sharded_state(facts.held(costs, stage.nodes), n, 0, optimizer=optimizer, training=training).total
    flight = in_flight_bytes([u.param_bytes for u in units], reshard_after_forward=reshard_after_forward,
                             training=training)
    return dataclasses.replace(stage, state_bytes=float(state + flight)), units


def fsdp_step(units: Sequence[Unit], cluster: Cluster, devices: Sequence[int], *, microbatches: int,
              reshard_after_forward: bool, training: bool) -> tuple[float, float]:
    """(step seconds, exposed communication seconds) of ``microbatches`` micro-batches one
    after another on an FSDP group: every micro-batch gathers and reduce-scatters."""
    bandwidth, latency = group_link(cluster, devices)
    t = fsdp_time(units, len(devices), bandwidth, latency, reshard_after_forward=reshard_after_forward,
                  training=training)
    return microbatches * (t.fwd_s + t.bwd_s), microbatches * t.exposed_s


def pipeline_fsdp(facts: ModelFacts, costs: GraphCosts, stage: StageSummary, plain: StageSummary,
                  cluster: Cluster, devices: Sequence[int], *, optimizer: str, training: bool) -> tuple[StageSummary, float]:
    """A pipeline stage sharded over its group as torch's PipelineStage runs FSDP2: the stage's
    parameters gathered at its first forward and its gradients accumulated unsharded over the
    micro-batches (torch turns off resharding after backward and gradient sync until the last
    one), reduce-scattered once at the end of the step.

    Returns:
        The stage's figures (sharded state plus its whole unsharded parameters and gradients)
        and the seconds added at the end of the step: the first forward's exposed all-gathers
        and the final reduce-scatter.
    """
    units = _units(facts, costs, stage, plain)
    n = len(devices)
    specs = facts.held(costs, stage.nodes)
    state = sharded_state(specs, n, 0, optimizer=optimizer, training=training).total
    params = sum(u.param_bytes for u in units)
    flight = params * (2 if training else 1)
    bandwidth, latency = group_link(cluster, devices)
    first = fsdp_time(units, n, bandwidth, latency, reshard_after_forward=False, training=False)
    tail = (first.exposed_s
            + (sum(ring_reduce_scatter_time(u.param_bytes, n, bandwidth, latency) for u in units) if training else 0.0))
    return dataclasses.replace(stage, state_bytes=float(state + flight)), tail


def lever_choices(opts: PlanOptions, replicas: int) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    """The data-parallel kinds and checkpointing policies a candidate with ``replicas`` copies
    may take under ``opts``, policies cheapest first (none, selective, full)."""
    forced_dp = opts.data_parallel
    forced_ck = opts.activation_checkpointing
    if replicas == 1:
        kinds: tuple[str | None, ...] = (None,)
    elif opts.strategy in ("ddp", "fsdp"):
        kinds = (opts.strategy,)
    else:
        kinds = (forced_dp,) if forced_dp else ("ddp", "fsdp")
    if forced_ck:
        policies: tuple[str, ...] = (forced_ck,)
    else:
        policies = ("none", "selective", "full") if opts.training else ("none",)
    return kinds, policies
