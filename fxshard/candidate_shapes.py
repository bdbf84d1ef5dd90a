"""The pipeline shapes the planner searches, in search order, and a bound to prune them by.

A candidate's *shape* (:class:`Shape`: strategy, pipeline depth, replicas, stages per device,
schedule, micro-batches) says what would run; :func:`pipeline_groups` yields the pipeline
shapes the options allow, grouped by the partition they share, from plain numbers, in the
order the planner searches them. :func:`shape_bound` is a partition-free lower bound on a
shape's step time, by which the search skips shapes that cannot beat the best found
(docs/planning.md, "Pruning"). Pricing a shape is fxshard/candidates.py's work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fxshard.cluster import Cluster
from fxshard.cost_models import GraphCosts
from fxshard.levers import Levers
from fxshard.plan_options import PlanOptions, divisors
from fxshard.simulate import BWD_INPUT_SHARE, SCHEDULES, SPLIT_BACKWARD

if TYPE_CHECKING:
    from fxshard.candidates import Pricer

__all__ = ["MAX_MICROBATCHES", "PipelineGroup", "Shape", "microbatch_counts", "pipeline_groups", "rank_devices",
           "shape_bound", "stage_counts", "stage_devices_of"]

MAX_MICROBATCHES = 128  # the most micro-batches the planner tries
# How torch places a schedule's stages on ranks: one per rank ("flat"), looped (stage s on rank
# s % depth) or V-shaped (rank r holds stages r and 2 x depth - 1 - r); placements in this order.
_STAGE_PLACEMENT = {"gpipe": "flat", "1f1b": "flat", "interleaved1f1b": "loop", "loopedbfs": "loop",
                    "interleavedzb": "loop", "zbv": "v"}
_PLACEMENT_ORDER = ("flat", "loop", "v")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """What a candidate runs: ``depth`` devices per pipeline (1: the whole model on each),
    ``replicas`` copies, ``stages_per_device`` stages on each device, a schedule, micro-batches."""

    strategy: str
    replicas: int = 1
    depth: int = 1
    stages_per_device: int = 1
    schedule: str | None = None
    microbatches: int = 1
    levers: Levers = Levers()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineGroup:
    """Pipelines of one partition: ``depth`` devices per replica, the schedules that place
    stages on them alike (``placement``), and the micro-batch counts each schedule takes."""

    depth: int
    replicas: int
    placement: str
    schedules: tuple[str, ...]
    microbatches: tuple[tuple[int, ...], ...]  # per schedule

    @property
    def stages_per_device(self) -> int:
        return SCHEDULES[self.schedules[0]].stages_per_rank

    @property
    def strategy(self) -> str:
        return "pipeline" if self.replicas == 1 else "hybrid"

    def shapes(self) -> Iterator[Shape]:
        for schedule, counts in zip(self.schedules, self.microbatches):
            for m in counts:
                yield Shape(strategy=self.strategy, replicas=self.replicas, depth=self.depth,
                            stages_per_device=self.stages_per_device, schedule=schedule, microbatches=m)


def stage_counts(n_devices: int, replicas: int) -> list[int]:
    """The pipeline depths tried on ``n_devices`` with ``replicas`` replicas."""
    top = n_devices // replicas
    counts = {k for k in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if k <= top}
    if top >= 2:
        counts.add(top)
    return sorted(counts)


def microbatch_counts(per_replica: int, depth: int, schedule: str, opts: PlanOptions,
                      fixed_batch: int | None = None) -> list[int]:
    """The micro-batch counts tried for a replica's share of the batch under ``schedule``."""
    if fixed_batch is not None:
        return [1]  # the graph runs only at its captured batch size
    if opts.microbatches is not None:
        return [opts.microbatches] if per_replica % opts.microbatches == 0 else []
    counts = [m for m in divisors(per_replica) if m <= MAX_MICROBATCHES]
    if schedule != "gpipe":
        counts = [m for m in counts if m >= depth]
    return counts[-4:] if len(counts) > 4 else counts


def _replica_counts(n_devices: int, batch: int, opts: PlanOptions, fixed_batch: int | None) -> list[int]:
    counts = [1] if opts.strategy == "pipeline" or fixed_batch else divisors(batch)
    if opts.strategy == "hybrid":
        counts = [r for r in counts if r >= 2]
    if opts.strategy is None:
        counts = [r for r in counts if r <= n_devices // 2]
    return counts


def pipeline_groups(n_devices: int, batch: int, opts: PlanOptions,
                    fixed_batch: int | None = None) -> Iterator[PipelineGroup]:
    """Every pipeline the options allow on ``n_devices``, one group per partition to compute."""
    schedules = [opts.schedule] if opts.schedule else ["gpipe", "1f1b", "interleaved1f1b", "zbv"]
    if not opts.training:
        schedules = ["gpipe"]  # forward only: every schedule reduces to filling the pipe
    for replicas in _replica_counts(n_devices, batch, opts, fixed_batch):
        depths = stage_counts(n_devices, replicas)
        if opts.stages is not None:
            depths = [opts.stages] if opts.stages * replicas <= n_devices else []
        for depth in depths:
            for placement in _PLACEMENT_ORDER:
                alike = tuple(s for s in schedules if _STAGE_PLACEMENT[s] == placement)
                counts = tuple(tuple(microbatch_counts(batch // replicas, depth, s, opts, fixed_batch))
                               for s in alike)
                if any(counts):  # else no micro-batch count these schedules take (1F1B: one per stage at least)
                    yield PipelineGroup(depth=depth, replicas=replicas, placement=placement, schedules=alike,
                                        microbatches=counts)


def rank_devices(group: PipelineGroup) -> tuple[tuple[int, ...], ...]:
    """Each pipeline rank's devices, one per replica: consecutive ranks, so replicas share a
    machine when their count divides the machine size."""
    return tuple(tuple(range(r * group.replicas, (r + 1) * group.replicas)) for r in range(group.depth))


def stage_devices_of(group: PipelineGroup) -> tuple[tuple[int, ...], ...]:
    """Each stage's devices, the stages placed on the ranks as the group's schedules place them."""
    depth, ranks = group.depth, rank_devices(group)
    n_stages = depth * group.stages_per_device
    if group.placement == "flat":
        return ranks
    if group.placement == "v":  # ZBVZeroBubble: rank r holds stages r and 2 x depth - 1 - r
        return tuple(ranks[s] if s < depth else ranks[2 * depth - 1 - s] for s in range(n_stages))
    return tuple(ranks[s % depth] for s in range(n_stages))  # looped: stage s on rank s % depth


def shape_bound(pricer: Pricer, cluster: Cluster, group: PipelineGroup, shape: Shape, opts: PlanOptions) -> float:
    """A lower bound on the step time of ``shape`` under any partition and any levers, from
    partition-free figures: W, one micro-batch's compute through the whole model (forward F plus
    backward B) on the group's fastest device; the stages' times sum to at least W, and sends and
    levers only add. See :func:`step_lower_bound`; tests/test_plan_scale.py checks it against
    every simulated step of small searches and of every schedule on equal stages.
    """
    fraction = 1.0 / (shape.replicas * shape.microbatches)
    specs = {cluster.devices[devs[0]].spec.name: cluster.devices[devs[0]].spec for devs in rank_devices(group)}
    costs = [pricer.costs(spec, fraction) for _, spec in sorted(specs.items())]
    work = min(_compute_time(c, opts.training) for c in costs)
    forward = min(c.fwd_time_s for c in costs)
    return step_lower_bound(shape.schedule, work=work, forward=forward, microbatches=shape.microbatches,
                            depth=group.depth, training=opts.training)


def step_lower_bound(schedule: str, *, work: float, forward: float, microbatches: int, depth: int,
                     training: bool) -> float:
    """A lower bound on a step of ``schedule`` with m = ``microbatches`` on ``depth`` ranks, when
    one micro-batch's compute through all stages is ``work`` (W), its forward part ``forward`` (F):

    - every schedule: the busiest rank does at least m x W / depth;
    - micro-batch 0's chain: every stage's forward, then every stage's backward, so step >= W;
      zero-bubble schedules split each backward into an input-gradient part (I, the share
      :data:`~fxshard.simulate.BWD_INPUT_SHARE` of it) on the chain and a weight-gradient part
      (W) they may defer, so their chain is only F + share x (W - F);
    - GPipe: the busiest stage r starts after micro-batch 0 has run the stages before it, runs
      m forwards, then waits for micro-batch 0's backward to come back from the stages after it
      (they run all their forwards first), runs m backwards, and micro-batch m-1's backward
      still crosses the stages before it: step >= W + (m - 1) x t_r >= W + (m - 1) x W / depth
      (forward only, with one stage per rank: the same with backward zero);
    - 1F1B: the same path through the stage r of the largest forward, whose backwards may
      overlap the wait: step >= W + (m - 1) x F / depth.
    """
    m = microbatches
    chain = forward + BWD_INPUT_SHARE * (work - forward) if training and schedule in SPLIT_BACKWARD else work
    bound = max(chain, m * work / depth)
    if schedule == "gpipe" or not training and SCHEDULES[schedule].stages_per_rank == 1:
        bound = max(bound, work + (m - 1) * work / depth)
    elif schedule == "1f1b":
        bound = max(bound, work + (m - 1) * forward / depth)
    return bound


def _compute_time(costs: GraphCosts, training: bool) -> float:
    return costs.fwd_time_s + (costs.bwd_time_s if training else 0.0)
