"""A run's plan priced again: by any cost model (:func:`reprice`), and by the profiled cost model
measured where the plan ran, on its ranks, right after their timed steps (:func:`rank_priced`).

:func:`fxshard.calibrate_dist.compare_run` prices a run's plan with the profiled cost model in
the calling process, after the run. On a shared machine that compares a run and a profile taken
on other cores, up to a minute apart, and a core's speed moves within a minute while two cores
differ at the same moment (by up to 40% on the 2-core CPU of docs/calibration.md, "Profiled on
the ranks"). The error then holds the machine's drift as well as the cost model's.

With ``run_plan(..., profile_in_ranks=True)`` every rank, after its timed steps and after a
barrier, prices the whole plan with the profiled cost model (:func:`profile_on_rank`): all ranks
at once, so every core is as busy as while the plan trained. :func:`rank_priced` then prices each
stage with the profile of the rank that ran it and simulates the step from those. Because each
rank priced the same plan on its own core at the same moment, the spread of their step prices
(:func:`profile_spread`) is the machine's own disagreement, measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster
from fxshard.cost_models import estimate, scale_batch
from fxshard.cost_models.analysis import analyze
from fxshard.cost_models.loss import LossGraph
from fxshard.errors import ExecutionError
from fxshard.passes.stages import StageSummary, summarize_stages
from fxshard.plan import Plan

if TYPE_CHECKING:
    from fxshard.cost_models import ProfiledCostModel

__all__ = ["priced_with_summaries", "profile_on_rank", "profile_spread", "profiled_model", "rank_priced",
           "reprice"]


def priced_with_summaries(captured: CapturedGraph, plan: Plan, cost_model: Any,
                          loss: LossGraph | None = None) -> tuple[Plan, tuple[StageSummary, ...]]:
    """:func:`reprice`, with the stage summaries (activation bytes per micro-batch) it priced."""
    from fxshard.candidate_shapes import PipelineGroup, Shape
    from fxshard.candidates import Pricer, price_pipeline
    from fxshard.levers import Levers
    from fxshard.plan_options import PlanOptions

    if plan.strategy not in ("pipeline", "hybrid"):
        raise ExecutionError(f"reprice prices pipeline stages; this is a {plan.strategy} plan")
    cluster = Cluster.from_dict(plan.cluster)
    fraction = 1.0 / (plan.replicas * plan.microbatches)
    # As the planner prices a shape (candidates._pipeline_figures), at the plan's micro-batch.
    works = analyze(captured)
    works = scale_batch(works, fraction) if fraction < 1 else works
    by_spec: dict[str, Any] = {}
    stage_devices = tuple(s.device_indices for s in plan.stages)
    specs = [cluster.devices[devs[0]].spec for devs in stage_devices]
    for spec in specs:
        if spec.name not in by_spec:
            by_spec[spec.name] = estimate(captured, spec, cost_model=cost_model, works=works)
    per_stage = [by_spec[spec.name] for spec in specs]
    stage_of, n = plan.stage_of(), plan.num_stages
    plain = tuple(summarize_stages(captured, per_stage[0], stage_of, n, training=plan.training,
                                   optimizer=plan.optimizer, stage_costs=per_stage))
    depth = len({devs[0] for devs in stage_devices})
    policies = {s.activation_checkpointing for s in plan.stages}
    levers = Levers(data_parallel=plan.data_parallel if plan.replicas > 1 else None,
                    checkpointing=policies.pop() if len(policies) == 1 else "none",
                    reshard_after_forward=plan.reshard_after_forward)
    shape = Shape(strategy=plan.strategy, replicas=plan.replicas, depth=depth, stages_per_device=n // depth,
                  schedule=plan.schedule, microbatches=plan.microbatches, levers=levers)
    group = PipelineGroup(depth=depth, replicas=plan.replicas, placement="flat", schedules=(plan.schedule,),
                          microbatches=((plan.microbatches,),))
    opts = PlanOptions(training=plan.training, optimizer=plan.optimizer)
    priced = price_pipeline(Pricer(captured, cost_model, plan.batch_size, loss=loss), cluster, group, stage_of,
                            stage_devices, shape, opts, plain=(per_stage, plain))
    if priced.refused or not priced.stages:
        raise ExecutionError(f"the plan's schedule cannot be priced: {priced.note}")
    stages = tuple(dataclasses.replace(s, fwd_time_s=st.fwd_time_s, bwd_time_s=st.bwd_time_s, flops=st.fwd_flops,
                                       param_bytes=st.param_bytes, peak_memory_bytes=float(peak),
                                       send_bytes=st.send_bytes, optimizer_time_s=st.optimizer_time_s,
                                       accumulate_time_s=st.accumulate_time_s)
                   for s, st, peak in zip(plan.stages, priced.stages, priced.peak))
    return _simulated(dataclasses.replace(plan, stages=stages)), priced.stages


def _simulated(plan: Plan) -> Plan:
    """``plan`` with its estimate's step time (and bubble, throughput) simulated from its stages."""
    from fxshard.simulate_plan import simulate_plan

    sim = simulate_plan(plan)
    step = sim.step_time_s
    return dataclasses.replace(plan, estimate=dataclasses.replace(
        plan.estimate, step_time_s=step, bubble_fraction=sim.bubble_fraction,
        samples_per_s=plan.batch_size / step if step > 0 else 0.0))


def reprice(captured: CapturedGraph, plan: Plan, cost_model: Any, *, loss: LossGraph | None = None) -> Plan:
    """``plan`` (its split, schedule, micro-batches and levers) priced by ``cost_model``.

    Every stage's forward and backward seconds and memory are priced as the planner prices a
    pipeline (:func:`fxshard.candidates.price_pipeline`: the stage summaries at the plan's
    micro-batch, its levers, the schedule's in-flight activations in the peak), and the
    estimate's step time is :func:`fxshard.simulate_plan.simulate_plan` of the result. Priced
    with the cost model the plan was made with, the figures are the plan's own.

    Args:
        captured: the model's captured graph (real weights for a measuring cost model).
        plan: a ``pipeline`` or ``hybrid`` plan of it.
        cost_model: a registered name or a cost model, e.g.
            ``ProfiledCostModel(threads=1, batch_fraction=1 / plan.microbatches)``.
        loss: the training loss on the last stage (:func:`fxshard.cost_models.loss.capture_loss`;
            :func:`fxshard.calibrate_dist.run_loss` gives the one
            :func:`fxshard.calibrate_dist.run_plan` trains with); None: not priced.

    Raises:
        ExecutionError: another strategy, or a schedule the plan's counts cannot run.
    """
    return priced_with_summaries(captured, plan, cost_model, loss)[0]


def profiled_model(plan: Plan, threads: int) -> ProfiledCostModel:
    """The profiled cost model a run of ``plan`` on CPU ranks of ``threads`` threads is held against.

    It measures at the plan's micro-batch, with segments ending at the plan's stage boundaries
    (a block the plan cuts is timed as its stages hold it), on thread CPU time when the ranks ran
    one thread each (the compute, without the waits for a core of a loaded machine:
    cost_models/timing.py), else on the wall clock.
    """
    from fxshard.cost_models import ProfiledCostModel

    fraction = 1.0 / (plan.replicas * plan.microbatches)
    return ProfiledCostModel(device="cpu", threads=threads, batch_fraction=fraction,
                             clock="cpu" if threads == 1 else "wall", stage_of=plan.stage_of())


def profile_on_rank(job: dict, plan: Plan) -> str:
    """``plan`` priced by :func:`profiled_model` in this process, as JSON (run by each rank).

    The model is built for real from ``job`` (the reference, batch, length and keywords the rank
    trained), and the training loss priced on the last stage, as
    :func:`fxshard.calibrate_dist.compare_run` prices it in the calling process.
    """
    from fxshard.calibrate_dist import capture_model, run_loss

    captured = capture_model(job["model"], plan, batch_size=job.get("batch_size"), seq_len=job.get("seq_len"),
                             model_kwargs=job.get("model_kwargs") or None)
    return reprice(captured, plan, profiled_model(plan, job["threads"]), loss=run_loss(captured)).to_json()


def _rank_plans(ranks: Sequence[Any]) -> list[Plan]:
    missing = [r.rank for r in ranks if not r.profile]
    if missing:
        raise ExecutionError(f"ranks {missing} of the run carry no profile of the plan: run it with "
                             f"run_plan(..., profile_in_ranks=True) to price it on its ranks")
    return [Plan.from_json(r.profile) for r in ranks]


def rank_priced(plan: Plan, ranks: Sequence[Any]) -> Plan:
    """``plan`` with each stage's priced figures (times, peak, optimizer and accumulation) from the
    profile of the rank that ran it, and its step simulated from them
    (:func:`fxshard.simulate_plan.simulate_plan`).

    Args:
        plan: the plan that ran.
        ranks: the run's :class:`fxshard.calibrate_dist.RankRun` rows, each with its ``profile``.

    Raises:
        ExecutionError: a rank without a profile (the run was not made with ``profile_in_ranks``).
    """
    priced = _rank_plans(ranks)
    owner = {i: p for r, p in zip(ranks, priced) for i in r.stages}
    return _simulated(dataclasses.replace(plan, stages=tuple(owner[s.index].stages[s.index] for s in plan.stages)))


def profile_spread(ranks: Sequence[Any]) -> float:
    """How far the ranks' cores disagreed at the same moment: the slowest rank's price of the
    whole plan's step over the fastest's, less one (0: they agree)."""
    steps = [p.estimate.step_time_s for p in _rank_plans(ranks)]
    return max(steps) / min(steps) - 1.0 if min(steps) > 0 else 0.0
