"""How much memory a model needs, and the fewest devices a pipeline of it can run on.

The arithmetic behind a refusal's floors ("at least N devices"): :class:`Needs` counts the
model's memory as the planner does, in all and per node; :func:`pipeline_floor` is a lower
bound on the devices, over the replica counts, micro-batch counts and schedules the options
allow. See docs/planning.md ("When nothing fits").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from fxshard.candidates import MAX_MICROBATCHES
from fxshard.capture import CapturedGraph
from fxshard.cluster import format_bytes
from fxshard.cost_models import GraphCosts
from fxshard.cost_models.checkpointing import checkpoint_cost
from fxshard.cost_models.sharding import in_flight_bytes
from fxshard.levers import ModelFacts
from fxshard.passes.cost_graph import state_factor
from fxshard.passes.stages import summarize_stages
from fxshard.plan_options import divisors

__all__ = ["Floor", "Needs", "fsdp_floor", "lever_floor", "model_needs", "needs_of", "pipeline_floor", "replica_samples"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Needs:
    """The model's memory at the request's batch, as the planner counts it: in all, and per node
    (what the stage holding that node holds at least because of it)."""

    state_bytes: float  # parameters, gradients, optimizer state and buffers, each tensor once
    activation_bytes: float  # saved for backward by the whole batch (0 in inference)
    transient_bytes: float  # the largest node output and its gradient, for the whole batch
    node_names: tuple[str, ...] = ()
    node_state: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    node_activations: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    node_transient: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    # the memory levers: saved bytes of the whole batch with every repeated block fully
    # checkpointed, the largest block's recomputation, and FSDP's unsharded units in flight
    checkpointed_bytes: float = 0.0
    recompute_bytes: float = 0.0
    in_flight_bytes: float = 0.0

    @property
    def total(self) -> float:
        return self.state_bytes + self.activation_bytes + self.transient_bytes

    def at(self, fraction: float) -> Needs:
        """The same model on ``fraction`` of the batch: activations scale, state does not."""
        return dataclasses.replace(self, activation_bytes=self.activation_bytes * fraction,
                                   transient_bytes=self.transient_bytes * fraction,
                                   node_activations=self.node_activations * fraction,
                                   node_transient=self.node_transient * fraction,
                                   checkpointed_bytes=self.checkpointed_bytes * fraction,
                                   recompute_bytes=self.recompute_bytes * fraction)


def needs_of(captured: CapturedGraph, costs: GraphCosts, *, training: bool, optimizer: str,
             state_bytes: float, activation_bytes: float, transient_bytes: float) -> Needs:
    """:class:`Needs` with the per-node figures, counted as passes/stages.py counts a stage:
    a node's stage holds the node's parameters and those of the get_attr nodes it reads (with
    their training state), the tensors it saves for backward (the allocating node's output for
    a view), and, at least, its own output and gradient as the stage's largest temporary."""
    names, state, acts, temps = [], [], [], []
    for node in captured.gm.graph.nodes:
        if node.op in ("get_attr", "placeholder", "output"):
            continue
        w = costs[node.name].work
        held = {name: (size, w.dtype, True) for name, size in zip(w.params, w.param_sizes)}
        held.update({name: (size, w.dtype, False) for name, size in zip(w.buffers, w.buffer_sizes)})
        for source in node.all_input_nodes:
            if source.op == "get_attr":
                sw = costs[source.name].work
                held.update({name: (size, sw.dtype, True) for name, size in zip(sw.params, sw.param_sizes)})
                held.update({name: (size, sw.dtype, False) for name, size in zip(sw.buffers, sw.buffer_sizes)})
        total = 0.0
        for size, dtype, is_param in held.values():
            if is_param:
                total += size * state_factor(dtype, training=training, optimizer=optimizer)
            else:
                total += size
        saved = 0.0
        if training:
            owners = {costs.storage_owner(v) for v in w.saved_values}
            saved = w.saved_bytes + sum(costs[o].work.output_bytes for o in owners)
        names.append(node.name)
        state.append(total)
        acts.append(saved)
        temps.append(2.0 * w.output_bytes)
    return Needs(state_bytes=state_bytes, activation_bytes=activation_bytes, transient_bytes=transient_bytes,
                 node_names=tuple(names), node_state=np.array(state, dtype=float),
                 node_activations=np.array(acts, dtype=float), node_transient=np.array(temps, dtype=float))


def model_needs(captured: CapturedGraph, costs: GraphCosts, *, training: bool, optimizer: str) -> Needs:
    """:func:`needs_of` with the totals of the whole model as one stage (passes/stages.py), and
    what the memory levers leave of them (cost_models/checkpointing.py, cost_models/sharding.py)."""
    whole = summarize_stages(captured, costs, {}, 1, training=training, optimizer=optimizer)[0]
    needs = needs_of(captured, costs, training=training, optimizer=optimizer, state_bytes=whole.state_bytes,
                     activation_bytes=whole.activation_bytes, transient_bytes=whole.transient_bytes)
    facts = ModelFacts(captured)
    blocks = [facts.unit_bytes(r) for r in facts.regions]
    params = sum(s.numel * s.itemsize for s in facts.specs.values() if not s.buffer)
    flight = in_flight_bytes([max(0.0, params - sum(blocks)), *blocks], training=training)
    if not training:
        return dataclasses.replace(needs, in_flight_bytes=flight)
    full = checkpoint_cost(costs, whole.nodes, facts.regions, "full")
    return dataclasses.replace(needs, checkpointed_bytes=full.saved_bytes, recompute_bytes=full.transient_bytes,
                               in_flight_bytes=flight)


def fsdp_floor(needs: Needs, batch: int, cap: float) -> Floor:
    """The fewest devices of ``cap`` bytes FSDP (the whole model sharded) with full activation
    checkpointing can hold the model on: each of n ranks holds 1/n of the state, FSDP's
    unsharded units in flight, and at least one sample's checkpointed activations (gradient
    accumulation runs a rank's share one sample at a time), the largest block's recomputation
    and temporaries."""
    one = needs.at(1 / batch)
    sample = one.checkpointed_bytes + one.recompute_bytes + one.transient_bytes
    room = cap - needs.in_flight_bytes - sample
    held = (f"{format_bytes(needs.in_flight_bytes)} of unsharded units in flight and {format_bytes(sample)} for one "
            f"sample under full checkpointing")
    if room <= 0:
        return Floor(devices=math.inf, replicas=1, why=f"{held} exceed a device's {format_bytes(cap)}")
    n = max(2, math.ceil(needs.state_bytes / room))
    return Floor(devices=n, replicas=n, why=f"FSDP shards {format_bytes(needs.state_bytes)} of parameters and "
                                            f"optimizer state {format_bytes(needs.state_bytes / n)} per device beside "
                                            f"{held}")


def lever_floor(needs: Needs, batch: int, cap: float, opts: Any, *, fixed_batch: int | None = None) -> Floor:
    """The fewest of one device, :func:`fsdp_floor` and a pipeline's floor (:func:`pipeline_floor`)
    with every repeated block fully checkpointed (the batch's saved bytes are the checkpointed
    ones; no node is charged activations of its own, which keeps it a lower bound)."""
    one = needs.state_bytes + needs.checkpointed_bytes + needs.recompute_bytes + needs.transient_bytes
    if one <= cap:
        return Floor(devices=1, replicas=1, why=f"one device holds {format_bytes(one)} under full checkpointing "
                                                f"({format_bytes(needs.checkpointed_bytes)} of activations)")
    whole = fsdp_floor(needs, batch, cap)
    checkpointed = dataclasses.replace(needs, activation_bytes=needs.checkpointed_bytes,
                                       transient_bytes=needs.transient_bytes + needs.recompute_bytes,
                                       node_activations=np.zeros_like(needs.node_activations))
    piped = pipeline_floor(checkpointed, batch, cap, opts, fixed_batch=fixed_batch)
    if math.isfinite(piped.devices) and piped.devices < whole.devices:
        return dataclasses.replace(piped, why=f"a pipeline under full checkpointing holds {piped.why}")
    return whole


@dataclasses.dataclass(frozen=True, kw_only=True)
class Floor:
    """The fewest devices a pipeline can run on, the replicas that reach it, and why."""

    devices: float  # math.inf when no pipeline of these devices can run
    replicas: int
    why: str


def pipeline_floor(needs: Needs, batch: int, cap: float, opts: Any, *,
                   fixed_batch: int | None = None) -> Floor:
    """The fewest devices of ``cap`` bytes on which the planner can fit a pipeline.

    A lower bound from the planner's accounting, over the replica counts, micro-batch counts
    and schedules the options allow: each replica holds every parameter's state at least once;
    GPipe holds all micro-batches' activations (the batch's), a 1F1B-like schedule at least one
    micro-batch per stage and runs only with at least as many micro-batches as stages; a stage
    holds at least what each of its nodes needs (:func:`needs_of`) and one stage per replica
    the largest temporary of a micro-batch.
    """
    training = opts.training
    if fixed_batch is not None or opts.strategy == "pipeline":
        replica_counts = [1]
    else:
        replica_counts = [d for d in divisors(batch) if d >= (2 if opts.strategy == "hybrid" else 1)]
    schedules = ["gpipe"] if not training else ([opts.schedule] if opts.schedule else ["gpipe", "1f1b"])
    # The planner offers the 1F1B family only micro-batch counts >= its stages; with a count given,
    # torch itself refuses fewer only for 1F1B (interleaved and zero-bubble ones take any).
    needs_count = opts.microbatches is None or opts.schedule == "1f1b"
    nodes = len(needs.node_names)
    best = Floor(devices=math.inf, replicas=1, why=f"no micro-batch count splits the batch of {batch}")
    node_limited = None  # (node, bytes) of a configuration one node alone overflows
    blocked = 0  # the fewest stages a 1F1B-like schedule would need, beyond its micro-batches
    for d in replica_counts:
        for m in _microbatch_counts(batch // d, opts, fixed_batch):
            for sched in schedules:
                kept = 1.0 if sched == "gpipe" else 1.0 / m  # share of the batch's activations held
                # Micro-batch figures are rounded per node (scale_batch): allow for it, so this stays a floor.
                if nodes:
                    per_node = (needs.node_state + needs.node_activations * kept / d
                                + needs.node_transient / (d * m) - (m + 1))
                    worst = int(np.argmax(per_node))
                    if per_node[worst] > cap:
                        if node_limited is None or per_node[worst] < node_limited[1]:
                            node_limited = (needs.node_names[worst], float(per_node[worst]), d, m, sched)
                        continue
                total = (d * needs.state_bytes + needs.activation_bytes * kept + needs.transient_bytes / m
                         - (nodes + 1) * m * d)
                ranks = max(2, math.ceil(math.ceil(total / cap) / d))
                if nodes and ranks > nodes:
                    continue  # a stage holds at least one operation
                if sched != "gpipe" and needs_count and ranks > m:
                    blocked = min(blocked or ranks, ranks)
                    continue  # torch's 1F1B family needs at least as many micro-batches as stages
                if ranks * d < best.devices:
                    best = Floor(devices=ranks * d, replicas=d, why=_held(needs, kept, sched, d, m))
    return _explained(best, node_limited, blocked, schedules, batch, cap, opts)


def _microbatch_counts(per_replica: int, opts: Any, fixed_batch: int | None) -> list[int]:
    """The micro-batch counts the planner tries on a replica's share of the batch."""
    if fixed_batch is not None:
        return [1]
    if opts.microbatches is not None:
        return [opts.microbatches] if per_replica % opts.microbatches == 0 else []
    return [m for m in divisors(per_replica) if m <= MAX_MICROBATCHES]


def _held(needs: Needs, kept: float, sched: str, d: int, m: int) -> str:
    """What a floor of ``d`` replicas holds under ``sched`` over ``m`` micro-batches, in words."""
    held = needs.activation_bytes * kept
    how = (f"{format_bytes(held)} of activations (GPipe holds the whole batch's)" if sched == "gpipe"
           else f"at least {format_bytes(held)} of activations ({sched} over {m} micro-batches "
                f"holds at least one per stage)")
    state = format_bytes(needs.state_bytes) + (f" on each of {d} replicas" if d > 1 else "")
    return f"{state} of parameters and optimizer state and {how}"


def _explained(best: Floor, node_limited: tuple[str, float, int, int, str] | None, blocked: int,
               schedules: list[str], batch: int, cap: float, opts: Any) -> Floor:
    """The floor with why no pipeline runs (one node too big, or too few micro-batches for the
    1F1B family's stages), or why GPipe's floor is not 1F1B's."""
    if not math.isfinite(best.devices) and node_limited is not None:
        name, size, d, m, sched = node_limited
        return Floor(devices=math.inf, replicas=1,
                     why=f"node {name!r} alone needs {format_bytes(size)} even at its least ({sched}, {d} "
                         f"replica(s), {m} micro-batch(es)), more than a device's {format_bytes(cap)}")
    if not math.isfinite(best.devices) and blocked:
        return Floor(devices=math.inf, replicas=1,
                     why=f"{' or '.join(schedules)} would need {blocked} or more stages, and runs only with as many "
                         f"micro-batches as stages: more than the batch of {batch} splits into"
                         + (f" with microbatches={opts.microbatches}" if opts.microbatches is not None else ""))
    if opts.training and blocked and "GPipe" in best.why:
        best = dataclasses.replace(best, why=best.why + (
            f"; 1F1B would hold less, but runs only with as many micro-batches as stages ({blocked}+), more than "
            f"the batch of {batch} splits into"))
    return best


def replica_samples(one_sample: Needs, cap: float) -> int:
    """The most samples a data-parallel replica fits: the whole model plus its share of the batch."""
    per_sample = one_sample.activation_bytes + one_sample.transient_bytes
    room = cap - one_sample.state_bytes + len(one_sample.node_names) + 1  # the planner rounds per node
    if room < per_sample:
        return 0
    return int(room // per_sample) if per_sample > 0 else 1 << 40
