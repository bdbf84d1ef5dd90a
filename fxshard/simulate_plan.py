"""Re-simulate a saved plan from its own figures, and what-ifs on it (other schedules, micro-batches).

A :class:`~fxshard.plan.Plan` keeps every figure the planner timed its schedule with (per-stage
forward and backward times, bytes sent, parameter bytes, devices), so :func:`simulate_plan`
rebuilds the planner's :class:`~fxshard.simulate.StageTiming` rows and runs
:func:`fxshard.simulate.simulate` on them; ``fxshard simulate PLAN.json`` and the pictures of
:mod:`fxshard.viz` use it. All-reduce is priced by :mod:`fxshard.comm`, as the planner prices it.
See docs/planning.md.
"""

from __future__ import annotations

from fxshard.cluster import Cluster
from fxshard.comm import exposed_allreduce_time, tied_syncs
from fxshard.cost_models.optimizer_step import accumulate_time, optimizer_step_time
from fxshard.plan import Plan
from fxshard.simulate import (
    SCHEDULES,
    SimResult,
    SimulationError,
    StageFigures,
    StageTiming,
    rank_actions,
    schedule_name,
    simulate,
    stage_timings,
)

__all__ = ["simulate_plan"]


def simulate_plan(plan: Plan, *, schedule: str | None = None, microbatches: int | None = None) -> SimResult:
    """Re-simulate one training step of ``plan`` from the figures stored in it.

    Each stage runs on its first device: forward and backward take ``fwd_time_s`` and
    ``bwd_time_s`` per micro-batch, activations and their gradients cross to the next stage in
    ``cluster.link(a, b).transfer_time(send_bytes)`` (nothing when both stages share a device),
    and data-parallel replicas add the part of the ring all-reduce of each stage's parameters
    that one micro-batch's backward does not hide, as the planner prices it; every backward but
    a stage's first adds the stage's ``accumulate_time_s`` (gradient accumulation); the ranks
    holding a tied parameter (``plan.tied``) sum its gradients (:func:`fxshard.comm.tied_syncs`);
    then each rank steps its stages' parameters (``optimizer_time_s``); neither is scaled by a micro-batch
    what-if. Without overrides
    this repeats the planner's own simulation, so ``step_time_s`` equals
    ``plan.estimate.step_time_s``. Single-device and DDP plans are one stage whose micro-batches
    run one after another (gradient accumulation); they have no pipeline schedule, so they take
    no ``schedule`` what-if. :func:`fxshard.viz.simulation_text` says what a result simulated.

    What-ifs are approximations: with ``microbatches`` changed, per-micro-batch times and bytes
    sent scale by ``old / new`` (cost linear in the micro-batch size; link latency does not
    scale), and memory is not re-estimated. The plan keeps only each stage's peak, not its split
    into state and activations, so the result's ``peak_memory_bytes`` is the plan's peak per
    stage whatever the overrides.

    Args:
        plan: the plan to simulate.
        schedule: a schedule of :data:`fxshard.simulate.SCHEDULES` instead of the plan's.
        microbatches: micro-batches per step instead of the plan's; must divide the samples
            each replica gets.

    Returns:
        The :class:`~fxshard.simulate.SimResult` of one step.

    Raises:
        SimulationError: an impossible what-if: an unknown schedule, micro-batches that do not
            divide the batch or that the schedule refuses (1F1B with fewer micro-batches than
            stages), a schedule that places stages on ranks differently from the plan, a
            schedule for a single or ddp plan, or a backward schedule for an inference plan.

    Example::

        base = simulate_plan(p)
        more = simulate_plan(p, microbatches=2 * p.microbatches)
        more.bubble_fraction < base.bubble_fraction  # usually
    """
    cluster = Cluster.from_dict(plan.cluster)
    pipelined = plan.strategy in ("pipeline", "hybrid")
    if schedule is not None and not pipelined:
        key = schedule_name(schedule)  # an unknown name is reported as such first
        raise SimulationError(f"schedule={schedule!r} for a {plan.strategy} plan: it runs the whole model as one "
                              f"stage on each device, with no pipeline to schedule; re-plan with "
                              f"strategy='pipeline' and schedule={key!r} to see that schedule")
    key = schedule_name(schedule if schedule is not None else (plan.schedule if pipelined and plan.schedule
                                                               else "gpipe"))
    if not plan.training and key != "gpipe":
        raise SimulationError(f"schedule={schedule!r} for an inference plan: forward only, every schedule is "
                              f"GPipe's fill and drain; use schedule='gpipe' or None")
    m = _microbatches(plan, microbatches)
    _check_layout(plan, key, m)
    return simulate(key, _timings(plan, cluster, plan.microbatches / m), m, syncs=_syncs(plan, cluster))


def _syncs(plan: Plan, cluster: Cluster) -> list[tuple[tuple[int, ...], float]]:
    """The tied parameters' gradient sums, as the planner prices them (fxshard/passes/tied.py)."""
    if not plan.training:
        return []
    shards = plan.replicas if plan.data_parallel == "fsdp" else 1
    return tied_syncs(cluster, plan.tied, [s.device_indices for s in plan.stages], shards)


def _microbatches(plan: Plan, microbatches: int | None) -> int:
    """The what-if's micro-batch count (the plan's by default); it must divide each replica's samples."""
    m = plan.microbatches if microbatches is None else microbatches
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise SimulationError(f"microbatches={microbatches!r}; use None (the plan's {plan.microbatches}) "
                              f"or a positive integer")
    per_replica = plan.batch_size // plan.replicas
    if per_replica % m:
        fits = [d for d in range(1, per_replica + 1) if per_replica % d == 0]
        raise SimulationError(f"{m} micro-batches do not divide the {per_replica} samples each of the "
                              f"{plan.replicas} replica(s) gets per step (batch {plan.batch_size}); "
                              f"use one of {fits}")
    return m


def _check_layout(plan: Plan, key: str, m: int) -> None:
    """The schedule must put on each rank exactly the stages that share a device in the plan."""
    per_rank = SCHEDULES[key].stages_per_rank
    n = plan.num_stages
    if n % per_rank:
        raise SimulationError(f"{key} runs {per_rank} stages per rank; the plan has {n} stage(s), which do not "
                              f"divide; keep the plan's schedule {plan.schedule or 'gpipe'} or re-plan with "
                              f"schedule={key!r}")
    orders = rank_actions(key, n // per_rank, m)  # raises for sizes torch refuses
    owner: dict[int, int] = {}
    for rank, actions in enumerate(orders):
        stages = sorted({s for s, _, _ in actions})
        devices = sorted({plan.stages[s].device_indices[0] for s in stages})
        taken = [d for d in devices if owner.get(d, rank) != rank]
        if len(devices) != 1 or taken:
            layout = ", ".join(f"stage {s.index} on device {s.device_indices[0]}" for s in plan.stages)
            raise SimulationError(f"{key} runs stages {stages} together on rank {rank}, but the plan puts them on "
                                  f"device(s) {devices} ({layout}); a what-if schedule must keep the plan's "
                                  f"placement; re-plan with schedule={key!r} instead")
        owner[devices[0]] = rank


def _timings(plan: Plan, cluster: Cluster, scale: float) -> list[StageTiming]:
    """The planner's stage timings (:func:`fxshard.simulate.stage_timings`) from the plan's figures."""
    figures = []
    for st in plan.stages:
        bwd = st.bwd_time_s * scale if plan.training else 0.0
        # the planner's own price of the all-reduce over the stage's replicas that backward does not hide
        reduce = exposed_allreduce_time(cluster, st.device_indices, st.param_bytes, bwd) if plan.training else 0.0
        # the step's passes outside the graph as the planner priced them (their memory is in the stored
        # peak); a plan written before they were stored: by the device's roofline
        shards = len(st.device_indices) if plan.data_parallel == "fsdp" else 1
        spec = cluster.devices[st.device_indices[0]].spec
        step = st.optimizer_time_s
        if step is None:
            step = optimizer_step_time(plan.optimizer, st.param_bytes / shards, spec, training=plan.training)
        accumulate = st.accumulate_time_s
        if accumulate is None:
            sharded = shards if plan.strategy == "fsdp" else 1  # a pipeline stage accumulates unsharded
            accumulate = accumulate_time(st.param_bytes / sharded, spec) if plan.training else 0.0
        figures.append(StageFigures(device=st.device_indices[0], fwd_s=st.fwd_time_s * scale, bwd_s=bwd,
                                    send_bytes=st.send_bytes * scale, static_bytes=st.peak_memory_bytes,
                                    reduce_s=reduce, optimizer_s=step, accumulate_s=accumulate))
    return stage_timings(figures, cluster, training=plan.training)
