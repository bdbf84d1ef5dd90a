"""Simulate a pipeline schedule: step time, busy and idle time per rank, bubble, memory.

The per-rank action orders come from ``torch.distributed.pipelining``'s own schedule
classes (read in ``fxshard.schedule_orders``), never re-derived:

- single-stage schedules (GPipe, 1F1B) are run for real (``_step_microbatches``) against a
  recording stand-in for the stage, so the order is exactly what the runtime executes;
- multi-stage schedules (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble,
  DualPipeV) publish their order as ``pipeline_order``.

Every order is checked (each stage runs each micro-batch's forward and backward exactly once)
before it is timed. The simulation then executes each rank's actions in order, each starting
when its rank is free and its inputs have arrived: a forward needs the previous stage's
forward plus the transfer, a backward needs this stage's forward and the next stage's
backward plus the transfer; a weight-gradient action (W) follows its input-gradient action
(I). See docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from fxshard.errors import SimulationError  # defined there, re-exported here
from fxshard.schedule_orders import SCHEDULES, SPLIT_BACKWARD, Schedule, rank_actions, schedule_name
from fxshard.schedule_orders import schedule_class as _schedule_class

if TYPE_CHECKING:
    from fxshard.cluster import Cluster

__all__ = [
    "BWD_INPUT_SHARE",
    "SCHEDULES",
    "SPLIT_BACKWARD",
    "Schedule",
    "SimResult",
    "SimulationError",
    "StageFigures",
    "StageTiming",
    "TimedAction",
    "rank_actions",
    "schedule_name",
    "simulate",
    "stage_timings",
    "to_chrome_trace",
]




BWD_INPUT_SHARE = 0.5  # a split backward's input-gradient part (I); the weight-gradient part (W) is the rest


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageTiming:
    """Seconds per micro-batch of one stage, and what it sends to the next.

    Attributes:
        fwd_s, bwd_s: forward and full backward compute.
        bwd_input_share: fraction of ``bwd_s`` spent on input gradients (the I action of
            zero-bubble schedules); the rest is the weight gradient (W).
        send_fwd_s: transfer of the activations to the next stage; ``send_bwd_s``: of their
            gradients back to this stage.
        activation_bytes: bytes kept per micro-batch in flight; ``static_bytes``: parameters,
            gradients, optimizer state; ``transient_bytes``: the largest temporary.
        reduce_s: gradient all-reduce at the end of the step (data-parallel replicas).
        optimizer_s: the optimizer step, after the all-reduce; ``optimizer_transient_bytes``: its
            temporaries, a phase of its own after the activations are freed
            (fxshard/cost_models/optimizer_step.py).
        accumulate_s: what a backward (B, or W of a split one) adds when an earlier micro-batch's
            gradients are already there to add into: every backward of the step but the stage's
            first; ``accumulate_bytes``: the new gradient alive next to them meanwhile, in the
            peak when a step has more than one micro-batch.
    """

    fwd_s: float
    bwd_s: float
    bwd_input_share: float = BWD_INPUT_SHARE
    send_fwd_s: float = 0.0
    send_bwd_s: float = 0.0
    activation_bytes: float = 0.0
    static_bytes: float = 0.0
    transient_bytes: float = 0.0
    reduce_s: float = 0.0
    optimizer_s: float = 0.0
    optimizer_transient_bytes: float = 0.0
    accumulate_s: float = 0.0
    accumulate_bytes: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageFigures:
    """One stage's figures per micro-batch, as the planner prices them and a plan stores them.

    ``device`` is the stage's first device (where it runs); ``send_bytes`` cross to the next
    stage's; the rest become the :class:`StageTiming` fields of the same meaning.
    """

    device: int
    fwd_s: float
    bwd_s: float
    send_bytes: float
    activation_bytes: float = 0.0
    static_bytes: float = 0.0
    transient_bytes: float = 0.0
    reduce_s: float = 0.0
    optimizer_s: float = 0.0
    optimizer_transient_bytes: float = 0.0
    accumulate_s: float = 0.0
    accumulate_bytes: float = 0.0


def stage_timings(stages: Sequence[StageFigures], cluster: Cluster, *, training: bool) -> list[StageTiming]:
    """The :class:`StageTiming` rows of a pipeline: sends take the link's transfer time when
    neighbouring stages run on different devices (nothing on one device), and inference has no
    backward or backward sends."""
    out = []
    for s, st in enumerate(stages):
        send = 0.0
        if s + 1 < len(stages) and st.device != stages[s + 1].device:
            send = cluster.link(st.device, stages[s + 1].device).transfer_time(st.send_bytes)
        out.append(StageTiming(fwd_s=st.fwd_s, bwd_s=st.bwd_s if training else 0.0, send_fwd_s=send,
                               send_bwd_s=send if training else 0.0, activation_bytes=st.activation_bytes,
                               static_bytes=st.static_bytes, transient_bytes=st.transient_bytes,
                               reduce_s=st.reduce_s, optimizer_s=st.optimizer_s if training else 0.0,
                               optimizer_transient_bytes=st.optimizer_transient_bytes if training else 0.0,
                               accumulate_s=st.accumulate_s if training else 0.0,
                               accumulate_bytes=st.accumulate_bytes if training else 0.0))
    return out


@dataclasses.dataclass(frozen=True)
class TimedAction:
    """One executed action: rank, stage, kind (F, B, I, W, R), micro-batch, start, end."""

    rank: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float

    def label(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch if self.microbatch >= 0 else ''}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimResult:
    """What a simulated step costs.

    Attributes:
        step_time_s: from the first action to the last.
        busy_s, idle_s: per rank.
        bubble_fraction: idle share of all ranks' time.
        peak_inflight: per stage, the most micro-batches whose activations are held at once.
        peak_memory_bytes: per stage, static + max(peak_inflight x activation + transient,
            optimizer temporaries).
        timeline: every action with its times.
    """

    schedule: str
    ranks: int
    stages: int
    microbatches: int
    step_time_s: float
    busy_s: tuple[float, ...]
    idle_s: tuple[float, ...]
    bubble_fraction: float
    peak_inflight: tuple[int, ...]
    peak_memory_bytes: tuple[float, ...]
    timeline: tuple[TimedAction, ...]


def simulate(schedule: str, stages: Sequence[StageTiming], microbatches: int, *,
             syncs: Sequence[tuple[Sequence[int], float]] = ()) -> SimResult:
    """Time one training step of ``len(stages)`` stages under a torch schedule.

    Interleaved schedules place stage s on rank ``s % ranks`` (and the V-shaped ones as their
    order says); ``len(stages)`` must be the ranks times the schedule's stages per rank.
    ``syncs``: collectives among the ranks of some stages after the schedule and the replicas'
    all-reduce, before the optimizer steps, as (stages, seconds): a tied parameter's gradient sum
    (:mod:`fxshard.passes.tied`), which starts when the last of those ranks is ready.

    Example::

        r = simulate("1f1b", [StageTiming(fwd_s=1, bwd_s=2)] * 4, 8)
        r.bubble_fraction  # 3 / 11
    """
    schedule = schedule_name(schedule)
    _, per_rank = _schedule_class(schedule)
    if len(stages) % per_rank:
        raise SimulationError(f"{schedule} runs {per_rank} stages per rank; {len(stages)} stages do not divide")
    ranks = len(stages) // per_rank
    orders = rank_actions(schedule, ranks, microbatches)
    n_stages = len(stages)
    timeline, clock, peak = _play(schedule, stages, orders)
    for s, t in enumerate(stages):
        if t.reduce_s > 0:
            rank = _rank_of(orders, s)
            start = clock[rank]
            clock[rank] = start + t.reduce_s
            timeline.append(TimedAction(rank, s, "R", -1, start, clock[rank]))
    for members, seconds in syncs:
        ranks_of = sorted({_rank_of(orders, s): s for s in members}.items())
        if len(ranks_of) < 2 or seconds <= 0:
            continue
        start = max(clock[rank] for rank, _ in ranks_of)
        for rank, s in ranks_of:
            clock[rank] = start + seconds
            timeline.append(TimedAction(rank, s, "T", -1, start, clock[rank]))
    for s, t in enumerate(stages):  # each rank steps its stages' parameters once its gradients are final
        if t.optimizer_s > 0:
            rank = _rank_of(orders, s)
            start = clock[rank]
            clock[rank] = start + t.optimizer_s
            timeline.append(TimedAction(rank, s, "O", -1, start, clock[rank]))
    step = max(clock) if timeline else 0.0
    busy = [0.0] * ranks
    for a in timeline:
        busy[a.rank] += a.end - a.start
    idle = [step - b for b in busy]
    bubble = sum(idle) / (ranks * step) if step > 0 else 0.0
    accumulating = microbatches > 1
    memory = tuple(t.static_bytes + max(peak[s] * t.activation_bytes + t.transient_bytes
                                        + (t.accumulate_bytes if accumulating else 0.0), t.optimizer_transient_bytes)
                   for s, t in enumerate(stages))
    return SimResult(schedule=schedule, ranks=ranks, stages=n_stages, microbatches=microbatches, step_time_s=step,
                     busy_s=tuple(busy), idle_s=tuple(idle), bubble_fraction=bubble, peak_inflight=tuple(peak),
                     peak_memory_bytes=memory, timeline=tuple(sorted(timeline, key=lambda a: (a.start, a.rank))))


class _Played(NamedTuple):
    timeline: list[TimedAction]
    clock: list[float]  # when each rank finishes its last action
    peak: list[int]  # most micro-batches in flight per stage


def _play(schedule: str, stages: Sequence[StageTiming], orders: list[list[tuple[int, str, int]]]) -> _Played:
    """Run each rank's actions in order, each when its rank is free and its inputs have arrived."""
    n_stages = len(stages)
    done: dict[tuple[int, str, int], float] = {}
    ranks = len(orders)
    clock = [0.0] * ranks
    cursor = [0] * ranks
    timeline: list[TimedAction] = []
    inflight = [0] * n_stages
    peak = [0] * n_stages
    has_grads = [False] * n_stages  # a backward has left gradients to add into
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for rank in range(ranks):
            while cursor[rank] < len(orders[rank]):
                s, kind, i = orders[rank][cursor[rank]]
                ready = _ready_time(done, stages, s, kind, i, n_stages)
                if ready is None:
                    break
                t = stages[s]
                duration = {"F": t.fwd_s, "B": t.bwd_s, "I": t.bwd_s * t.bwd_input_share,
                            "W": t.bwd_s * (1 - t.bwd_input_share)}[kind]
                if kind in ("B", "W"):
                    duration += t.accumulate_s if has_grads[s] else 0.0
                    has_grads[s] = True
                start = max(clock[rank], ready)
                end = start + duration
                done[(s, kind, i)] = end
                clock[rank] = end
                timeline.append(TimedAction(rank, s, kind, i, start, end))
                if kind == "F":
                    inflight[s] += 1
                    peak[s] = max(peak[s], inflight[s])
                elif kind in ("B", "W"):
                    inflight[s] -= 1
                cursor[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][cursor[r]] for r in range(ranks) if cursor[r] < len(orders[r])}
            raise SimulationError(f"{schedule} order deadlocks in simulation; next actions: {stuck}")
    return _Played(timeline, clock, peak)


def _rank_of(orders: list[list[tuple[int, str, int]]], stage: int) -> int:
    for rank, actions in enumerate(orders):
        if any(a[0] == stage for a in actions):
            return rank
    raise SimulationError(f"stage {stage} appears in no rank's order")


def _ready_time(done: dict, stages: Sequence[StageTiming], s: int, kind: str, i: int, n: int) -> float | None:
    """When the inputs of action (s, kind, i) are available, or None if not yet known."""
    deps: list[tuple[tuple[int, str, int], float]] = []
    if kind == "F":
        if s > 0:
            deps.append(((s - 1, "F", i), stages[s - 1].send_fwd_s))
    elif kind in ("B", "I"):
        deps.append(((s, "F", i), 0.0))
        if s < n - 1:
            nxt = (s + 1, "B", i) if (s + 1, "B", i) in done else (s + 1, "I", i)
            deps.append((nxt, stages[s].send_bwd_s))
    else:  # W
        deps.append(((s, "I", i), 0.0))
    ready = 0.0
    for key, delay in deps:
        if key not in done:
            return None
        ready = max(ready, done[key] + delay)
    return ready


def to_chrome_trace(result: SimResult, *, title: str | None = None) -> str:
    """The timeline as Chrome trace JSON (chrome://tracing, Perfetto): one row per rank.

    ``title`` names the process row (default: "<schedule> simulation")."""
    names = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weight)", "R": "all-reduce",
             "T": "tied gradient sum", "O": "optimizer step"}
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": title or f"{result.schedule} simulation"}}]
    for rank in range(result.ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
    for a in result.timeline:
        events.append({"name": a.label(), "cat": names[a.kind], "ph": "X", "pid": 0, "tid": a.rank,
                       "ts": a.start * 1e6, "dur": (a.end - a.start) * 1e6,
                       "args": {"stage": a.stage, "microbatch": a.microbatch, "kind": names[a.kind]}})
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms"})
