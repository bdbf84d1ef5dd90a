"""Plans and their simulations in words: the titles the pictures and the CLI print.

Text only (no matplotlib): :mod:`fxshard.viz` and :mod:`fxshard.viz_dot` draw with these titles,
``fxshard simulate`` prints :func:`simulation_text`.
"""

from __future__ import annotations

from fxshard.plan import Plan
from fxshard.simulate import SimResult
from fxshard.units import format_time

__all__ = ["plan_title", "plural", "simulation_text", "timeline_title"]


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, in the plural (``many``, default word + 's') unless n is 1."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def simulation_text(plan: Plan, result: SimResult) -> str:
    """What ``result`` (a :func:`~fxshard.simulate_plan.simulate_plan` of ``plan``) simulated, in words.

    Pipelines give the schedule and their shape, so that stages / stages per device x replicas
    = devices reads off it ("zbv, 4 stages, 2 per device, on 2 devices x 4 replicas = 8 devices,
    2 micro-batches"); single and ddp plans say they have no pipeline schedule.
    """
    mbs = plural(result.microbatches, "micro-batch", "micro-batches")
    if plan.strategy not in ("pipeline", "hybrid"):
        where = plan.shape_text()  # 1 device, N data-parallel replicas, N FSDP shards
        one_by_one = " one after another (gradient accumulation)" if result.microbatches > 1 else ""
        return f"{plan.strategy} ({where}, no pipeline schedule), {mbs}{one_by_one}"
    per = result.stages // max(result.ranks, 1)
    shape = plural(result.stages, "stage") + (f", {per} per device" if per > 1 else "")
    shape += f", on {plural(result.ranks, 'device')}"
    if plan.replicas > 1:
        group = "FSDP shards" if plan.data_parallel == "fsdp" else "replicas"
        shape += f" x {plan.replicas} {group} = {result.ranks * plan.replicas} devices"
    return f"{result.schedule}, {shape}, {mbs}"


def plan_title(plan: Plan) -> str:
    """The headline of a plan: model, strategy and shape, schedule, micro-batches, the memory
    levers (:meth:`Plan.levers_text`), and its estimate."""
    e = plan.estimate
    mode = f"training ({plan.optimizer})" if plan.training else "inference"
    levers = plan.levers_text()
    accumulated = plan.strategy in ("ddp", "fsdp") and plan.microbatches > 1  # the levers say so
    return (f"{plan.model.name}: {plan.strategy} ({plan.shape_text()})"
            + (f", schedule {plan.schedule}" if plan.schedule else "")
            + ("" if accumulated else f", {plural(plan.microbatches, 'micro-batch', 'micro-batches')}")
            + (f", {levers}" if levers else "") + "\n"
            f"batch {plan.batch_size}, {mode}: estimated {e.samples_per_s:,.1f} samples/s, "
            f"step {format_time(e.step_time_s)}, bubble {e.bubble_fraction:.1%}")


def timeline_title(result: SimResult, plan: Plan | None) -> str:
    """The title of a simulated schedule: what-if or not (against ``plan``), what it ran, step and bubble."""
    cost = f"step {format_time(result.step_time_s)}, bubble {result.bubble_fraction:.1%}"
    if plan is None:
        return (f"simulated {result.schedule}, {plural(result.microbatches, 'micro-batch', 'micro-batches')} "
                f"on {plural(result.ranks, 'rank')}: {cost}")
    pipelined = plan.strategy in ("pipeline", "hybrid")
    what_if = (pipelined and (plan.schedule or "gpipe") != result.schedule) or plan.microbatches != result.microbatches
    return f"{'what-if: ' if what_if else 'simulated '}{simulation_text(plan, result)}: {cost}"
