"""Which schedules fxshard knows, and the per-rank action orders torch's own schedule classes
run for them, never re-derived here:

- single-stage schedules (GPipe, 1F1B) are run for real (``_step_microbatches``) against a
  recording stand-in for the stage, so the order is exactly what the runtime executes;
- multi-stage schedules (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble)
  publish their order as ``pipeline_order``.

Every order is checked (each stage runs each micro-batch's forward and backward exactly once).
``fxshard.simulate`` times them and re-exports these names. See docs/planning.md.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from fxshard.errors import SimulationError

__all__ = ["SCHEDULES", "SPLIT_BACKWARD", "Schedule", "rank_actions", "schedule_class", "schedule_name"]


class Schedule(NamedTuple):
    """A schedule fxshard knows: torch's class name and how many stages each rank holds."""

    torch_class: str
    stages_per_rank: int


SPLIT_BACKWARD = frozenset({"interleavedzb", "zbv"})  # schedules whose orders run a backward as I and W

# fxshard name -> the schedule
SCHEDULES: dict[str, Schedule] = {
    "gpipe": Schedule("GPipe", 1),
    "1f1b": Schedule("1F1B", 1),
    "interleaved1f1b": Schedule("Interleaved1F1B", 2),
    "loopedbfs": Schedule("LoopedBFS", 2),
    "interleavedzb": Schedule("InterleavedZeroBubble", 2),
    "zbv": Schedule("ZBVZeroBubble", 2),
}


# Other spellings of the same schedules: torch's class names (with or without "Schedule") and
# words users write. Keys are compared after lower-casing and dropping "-", "_", " " and ".".
_ALIASES: dict[str, str] = {
    "zbvzerobubble": "zbv",
    "zerobubblev": "zbv",
    "interleavedzerobubble": "interleavedzb",
}


def schedule_name(schedule: str) -> str:
    """The fxshard name (a key of :data:`SCHEDULES`) of a schedule, however it is spelt.

    Case, "-", "_", spaces and a "Schedule" prefix are ignored, and torch's class names are
    accepted: "Interleaved1F1B", "interleaved-1f1b", "ScheduleInterleaved1F1B" all give
    "interleaved1f1b"; "GPipe" gives "gpipe"; "ZBVZeroBubble" and "zero-bubble-v" give "zbv".
    Every entry point (``plan``, ``compile``, ``simulate``, the CLI) goes through here.

    Raises:
        SimulationError: not a string, or a schedule fxshard does not know.
    """
    if not isinstance(schedule, str):
        raise SimulationError(f"schedule {schedule!r} is a {type(schedule).__name__}; give a name, one of "
                              f"{', '.join(SCHEDULES)}")
    key = "".join(ch for ch in schedule.lower() if ch not in "-_ .")
    if key.startswith("schedule") and key != "schedule":
        key = key.removeprefix("schedule")
    key = _ALIASES.get(key, key)
    if key not in SCHEDULES:
        torch_names = ", ".join(name for name, _ in SCHEDULES.values())
        raise SimulationError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} (torch's names "
                              f"{torch_names} work too, in any case)")
    return key


def schedule_class(schedule: str) -> tuple[type, int]:
    from torch.distributed.pipelining import schedules as sched

    key = schedule_name(schedule)
    name, per_rank = SCHEDULES[key]
    try:
        return sched.get_schedule_class(name), per_rank
    except ValueError as e:
        raise SimulationError(f"this torch has no {name} schedule ({e}); use 'gpipe' or '1f1b'") from e


class _RecordingStage:
    """A stand-in for torch's ``PipelineStage``: the attributes and methods torch's schedules
    read and call, with no model and no communication; forward and backward calls are logged
    as (stage, kind, micro-batch)."""

    def __init__(self, rank: int, ranks: int, num_stages: int, stage_index: int,
                 log: list[tuple[int, str, int]] | None = None) -> None:
        self.group_rank, self.group_size, self.submod = rank, ranks, None
        self.num_stages, self.stage_index, self.device = num_stages, stage_index, "cpu"
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.has_backward = True
        self.output_chunks: list[Any] = []
        self.stage_index_to_group_rank: dict[int, int] = {}
        self._log = log if log is not None else []

    def forward_one_chunk(self, i: int, *args: Any, **kwargs: Any) -> None:
        self._log.append((self.stage_index, "F", i))

    def backward_one_chunk(self, i: int, *args: Any, **kwargs: Any) -> None:
        self._log.append((self.stage_index, "B", i))

    def get_fwd_recv_ops(self, i: int) -> list:
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def clear_runtime_states(self) -> None:
        pass

    def perform_reduce_grad(self, *args: Any, **kwargs: Any) -> None:
        pass


def _record_single(cls: type, ranks: int, microbatches: int) -> list[list[tuple[int, str, int]]]:
    """Run a single-stage schedule's own step loop on recording stand-in stages.

    The schedule is built once (its constructor works out every rank's order, quadratic in the
    ranks) and its step loop is run once per rank, on that rank's stage."""
    schedule = cls(_RecordingStage(0, ranks, ranks, 0), microbatches, loss_fn=lambda *a, **k: None)
    schedule._stage_forward_initialized = True
    schedule._stage_backward_initialized = True
    orders = []
    for rank in range(ranks):
        log: list[tuple[int, str, int]] = []
        schedule._stage = _RecordingStage(rank, ranks, ranks, rank, log)
        schedule._step_microbatches(target_mbs=[None] * microbatches)
        orders.append(log)
    return orders


def _published_multi(cls: type, ranks: int, microbatches: int, per_rank: int) -> list[list[tuple[int, str, int]]]:
    """A multi-stage schedule's published ``pipeline_order``, flattened to (stage, kind, mb)."""
    stages = [_RecordingStage(0, ranks, ranks * per_rank, i) for i in range(per_rank)]
    schedule = cls(stages, microbatches, loss_fn=lambda *a, **k: None)
    orders = []
    for rank in range(ranks):
        flat: list[tuple[int, str, int]] = []
        for action in schedule.pipeline_order[rank]:
            if action is None:
                continue
            parts = action.sub_actions if action.sub_actions else (action,)
            for a in parts:
                kind = a.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    flat.append((a.stage_index, kind, a.microbatch_index))
        orders.append(flat)
    return orders


def rank_actions(schedule: str, ranks: int, microbatches: int) -> list[list[tuple[int, str, int]]]:
    """Per rank, the ordered (stage, kind, micro-batch) actions torch's schedule runs.

    The order depends only on (schedule, ranks, micro-batches) and is computed once for each.

    Raises:
        SimulationError: unknown schedule, sizes the schedule refuses, or an order that does
            not run every stage's forward and backward once per micro-batch.
    """
    return [list(rank) for rank in _rank_actions(schedule_name(schedule), ranks, microbatches)]


@functools.lru_cache(maxsize=512)
def _rank_actions(schedule: str, ranks: int, microbatches: int) -> tuple[tuple[tuple[int, str, int], ...], ...]:
    cls, per_rank = schedule_class(schedule)
    if ranks < 1 or microbatches < 1:
        raise SimulationError(f"need at least one rank and one micro-batch, got {ranks} and {microbatches}")
    try:
        if per_rank == 1:
            orders = _record_single(cls, ranks, microbatches)
        else:
            orders = _published_multi(cls, ranks, microbatches, per_rank)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise SimulationError(f"torch's {schedule} schedule refuses {ranks} ranks x {microbatches} "
                              f"micro-batches: {e}") from e
    _validate(orders, ranks * per_rank, microbatches, schedule)
    return tuple(tuple(rank) for rank in orders)


def _validate(orders: list[list[tuple[int, str, int]]], stages: int, microbatches: int, schedule: str) -> None:
    seen: dict[tuple[int, str, int], int] = {}
    for actions in orders:
        for key in actions:
            seen[key] = seen.get(key, 0) + 1
    for s in range(stages):
        for i in range(microbatches):
            full = seen.get((s, "B", i), 0)
            split = (seen.get((s, "I", i), 0), seen.get((s, "W", i), 0))
            if seen.get((s, "F", i), 0) != 1 or not (full == 1 and split == (0, 0) or full == 0 and split == (1, 1)):
                raise SimulationError(
                    f"torch's {schedule} order runs stage {s}, micro-batch {i} as F x{seen.get((s, 'F', i), 0)}, "
                    f"B x{full}, I/W x{split}; every stage must run each micro-batch once forward and once backward")
