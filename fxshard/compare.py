"""Compare plans of one captured model: single, ddp and fsdp beside each partitioner's best pipeline.

``compare(captured, cluster, batch, options, partitioners)`` asks the planner for the best
``single``, ``ddp`` and ``fsdp`` plans (one each: the partitioner plays no part in them) and, per
partitioner, the best ``pipeline`` or ``hybrid`` plan; a strategy forced in ``options`` keeps
only its own rows, a forced ``data_parallel`` only the strategies that take it. Each row says
how data-parallel groups hold the model (``data_parallel``) and its activation checkpointing.
Rows are ranked as the planner ranks candidates (step time, then the simpler strategy, then
fewer devices), so the best row is the plan ``fxshard.plan`` picks with the same options and
that row's partitioner. The ``fxshard compare`` command renders the rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster
from fxshard.errors import FxshardError
from fxshard.plan import STRATEGIES, Plan
from fxshard.plan_options import DATA_PARALLEL_GROUPS
from fxshard.planner import PlanOptions, plan_captured

__all__ = ["CompareRow", "checkpointing_of", "compare", "rank_key"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareRow:
    """One row: a plan (``partitioner`` None for single, ddp and fsdp), or why none exists."""

    partitioner: str | None
    plan: Plan | None
    plan_seconds: float = 0.0
    error: str = ""
    best: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ``fxshard compare --json`` row (SPEC: partitioner, step_time_s,
        bottleneck_stage_time_s, lower_bound_step_time_s, cut_bytes, max_stage_memory_bytes,
        plan_seconds, and more)."""
        p = self.plan
        if p is None:
            return {"partitioner": self.partitioner, "error": self.error, "best": False}
        return {"partitioner": self.partitioner, "strategy": p.strategy, "stages": p.num_stages,
                "replicas": p.replicas, "devices": p.num_devices, "stages_per_device": p.stages_per_device,
                "schedule": p.schedule, "microbatches": p.microbatches, "data_parallel": p.data_parallel,
                "activation_checkpointing": checkpointing_of(p), "reshard_after_forward":
                    p.reshard_after_forward if p.data_parallel == "fsdp" else None,
                "step_time_s": p.estimate.step_time_s, "samples_per_s": p.estimate.samples_per_s,
                "bottleneck_stage_time_s": max(s.fwd_time_s + s.bwd_time_s for s in p.stages),
                "lower_bound_step_time_s": p.estimate.lower_bound_step_time_s,
                "cut_bytes": sum(s.send_bytes for s in p.stages) * p.microbatches,
                "max_stage_memory_bytes": max(s.peak_memory_bytes for s in p.stages),
                "plan_seconds": self.plan_seconds, "best": self.best}


def checkpointing_of(plan: Plan) -> str:
    """The plan's activation checkpointing: the stages' policy where they agree ("full"), else
    each stage's in order, joined by "/" ("full/full/none")."""
    policies = [s.activation_checkpointing for s in plan.stages]
    return policies[0] if len(set(policies)) == 1 else "/".join(policies)


def rank_key(plan: Plan) -> tuple:
    """The planner's order among plans that fit: step time, then the simpler strategy, then
    fewer devices (planner.plan_captured ranks its candidates so)."""
    order = STRATEGIES.index(plan.strategy)
    return plan.estimate.step_time_s * (1 + 1e-9 * order), order, plan.num_devices


def compare(captured: CapturedGraph, cluster: Cluster, batch: int, options: PlanOptions,
            partitioners: Sequence[str]) -> list[CompareRow]:
    """Rows for single, ddp and fsdp where they apply (they fit, and ddp and fsdp have devices and
    a batch to split), then one per partitioner: its best pipeline or hybrid plan, or the reason it has none.

    Example::

        rows = compare(captured, Cluster.parse("4xA100-80GB"), 32, PlanOptions(), ["metis", "dp"])
        best = next(r for r in rows if r.best).plan
    """
    rows: list[CompareRow] = []
    whole = [s for s in ("single", "ddp", "fsdp") if _applies(s, options) and options.stages is None]
    for strategy in whole:
        try:
            plan, seconds = _timed(captured, cluster, batch, dataclasses.replace(options, strategy=strategy))
        except FxshardError:
            continue  # does not fit, or nothing to replicate over: the strategy does not apply
        rows.append(CompareRow(partitioner=None, plan=plan, plan_seconds=seconds))
    piped = [s for s in ("pipeline", "hybrid") if _applies(s, options)]
    for name in partitioners if piped else ():
        found, errors, seconds = [], [], 0.0
        for strategy in piped:
            try:
                plan, took = _timed(captured, cluster, batch,
                                    dataclasses.replace(options, strategy=strategy, partitioner=name))
            except FxshardError as e:
                errors.append(str(e))
                continue
            found.append(plan)
            seconds += took
        rows.append(CompareRow(partitioner=name, plan=min(found, key=rank_key), plan_seconds=seconds) if found
                    else CompareRow(partitioner=name, plan=None, error=errors[0]))
    planned = [r for r in rows if r.plan is not None]
    if planned:
        best = min(planned, key=lambda r: rank_key(r.plan))
        rows = [dataclasses.replace(r, best=r is best) for r in rows]
    return rows


def _applies(strategy: str, options: PlanOptions) -> bool:
    """Whether ``options`` leave room for ``strategy``: not another forced strategy, and a forced
    data_parallel its data-parallel groups can take."""
    return (options.strategy in (None, strategy)
            and (options.data_parallel is None or options.data_parallel in DATA_PARALLEL_GROUPS[strategy]))


def _timed(captured: CapturedGraph, cluster: Cluster, batch: int, options: PlanOptions) -> tuple[Plan, float]:
    start = time.perf_counter()
    plan = plan_captured(captured, cluster, batch, options)
    return plan, time.perf_counter() - start
