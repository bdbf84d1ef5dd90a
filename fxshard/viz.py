"""Pictures of a plan: per-stage costs, memory and the simulated schedule as a PNG.

The top floor beside the CLI: it takes a :class:`~fxshard.plan.Plan` and simulations of it
(:func:`fxshard.simulate_plan.simulate_plan` answers what-ifs such as "what would 8 micro-batches
or GPipe do?") and draws them; it simulates nothing itself. The stage graph as DOT lives in
:mod:`fxshard.viz_dot`, the titles in :mod:`fxshard.viz_text`; both are re-exported here.
Matplotlib is imported only inside the drawing functions and always draws with its Agg canvas,
so importing this module changes nothing and needs no display. See docs/planning.md for how the
planner itself simulates schedules.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from fxshard.plan import Plan
from fxshard.simulate import SimResult
from fxshard.simulate_plan import simulate_plan  # re-exported here; the default simulation plan_png draws
from fxshard.units import byte_unit, format_bytes
from fxshard.viz_dot import GraphOutline, graph_outline, plan_dot  # re-exported here
from fxshard.viz_text import plan_title, simulation_text, timeline_title  # simulation_text re-exported here

__all__ = ["GraphOutline", "graph_outline", "plan_dot", "plan_png", "simulate_plan", "simulation_text", "timeline_png"]

_DPI = 110
_FONT = 9  # points; nothing is drawn below 8
# Action kind -> (colour, legend text). F and B share their colours with the stage-time bars.
_KINDS = {"F": ("#4c78a8", "F forward"), "B": ("#f58518", "B backward"), "I": ("#e8a33d", "I input grad"),
          "W": ("#8e6bb0", "W weight grad"), "R": ("#7f7f7f", "R all-reduce"),
          "T": ("#b279a2", "T tied gradient sum"), "O": ("#54a24b", "O optimizer step")}
_OVER = "#d62728"
_PEAK = "#72a7c9"


# -- PNG -------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # draw with Agg whatever pyplot's backend is
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    fig.savefig(os.fspath(path), format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)


def _rc() -> Any:
    import matplotlib

    return matplotlib.rc_context({"font.size": _FONT, "axes.titlesize": _FONT + 1, "axes.labelsize": _FONT,
                                  "xtick.labelsize": _FONT - 1, "ytick.labelsize": _FONT - 1,
                                  "legend.fontsize": _FONT - 1, "figure.titlesize": _FONT + 3})


def _timeline_height(ranks: int) -> float:
    return min(0.9 + 0.34 * ranks, 16.0)


def _width(stages: int, result: SimResult) -> float:
    """Inches: wider for many stages, or many actions per rank, up to 20."""
    per_rank = len(result.timeline) / max(result.ranks, 1)
    return min(max(11.0 + 0.12 * max(0, stages - 8), 4.0 + 0.16 * per_rank), 20.0)


def _tick_step(count: int, room: int = 32) -> int:
    return max(1, -(-count // room))


def plan_png(plan: Plan, path: str | os.PathLike, *, result: SimResult | None = None) -> None:
    """Draw ``plan`` into a PNG at ``path``: stage times and memory on top, the simulated schedule below.

    Args:
        plan: the plan.
        path: where to write the PNG (overwritten).
        result: the simulation to draw; default :func:`simulate_plan` of the plan (pass a
            what-if result to draw that instead; the timeline's title says which).

    Example::

        plan_png(p, "plan.png", result=simulate_plan(p, microbatches=16))
    """
    result = simulate_plan(plan) if result is None else result
    n = plan.num_stages
    top = 3.3
    height = top + _timeline_height(result.ranks) + 0.8
    with _rc():
        fig = _figure(_width(n, result), height)
        grid = fig.add_gridspec(2, 2, height_ratios=[top, height - top - 0.8], width_ratios=[1, 1])
        _stage_times(fig.add_subplot(grid[0, 0]), plan)
        _stage_memory(fig.add_subplot(grid[0, 1]), plan)
        ax = fig.add_subplot(grid[1, :])
        _timeline(ax, result, timeline_title(result, plan))
        fig.suptitle(plan_title(plan), fontweight="bold")
        fig.draw_without_rendering()  # lay out, so the boxes' widths are known
        _label_boxes(ax, result)
        _save(fig, path)


def timeline_png(result: SimResult, path: str | os.PathLike, *, title: str = "") -> None:
    """Draw the simulated schedule of ``result`` alone into a PNG at ``path``: one row per rank, x in ms.

    Example::

        timeline_png(simulate_plan(p, schedule="gpipe"), "gpipe.png", title="GPipe what-if")
    """
    with _rc():
        fig = _figure(_width(result.ranks, result), _timeline_height(result.ranks) + 0.9)
        ax = fig.add_subplot(1, 1, 1)
        _timeline(ax, result, title or timeline_title(result, None))
        fig.draw_without_rendering()
        _label_boxes(ax, result)
        _save(fig, path)


# Activation checkpointing under a stage's tick: "full" -> "full ckpt"; none says nothing.
_CKPT_TICK = {"none": "", "selective": "\nselective ckpt", "full": "\nfull ckpt"}


def _stage_ticks(ax: Any, plan: Plan) -> None:
    n = plan.num_stages
    step = _tick_step(n)
    ticks = range(0, n, step)
    ax.set_xticks(ticks)
    if any(s.activation_checkpointing != "none" for s in plan.stages):
        ax.set_xticklabels([f"{i}{_CKPT_TICK[plan.stages[i].activation_checkpointing]}" for i in ticks])
    ax.set_xlabel("stage")
    pad = max(0.0, (3 - n) / 2)  # one or two stages: keep the bars from spanning the panel
    ax.set_xlim(-0.6 - pad, n - 0.4 + pad)


def _stage_times(ax: Any, plan: Plan) -> None:
    n = plan.num_stages
    x = range(n)
    fwd = [s.fwd_time_s * 1e3 for s in plan.stages]
    bwd = [s.bwd_time_s * 1e3 for s in plan.stages]
    width = 0.4 if plan.training else 0.7
    ax.bar([i - width / 2 if plan.training else i for i in x], fwd, width, color=_KINDS["F"][0], label="forward")
    if plan.training:
        ax.bar([i + width / 2 for i in x], bwd, width, color=_KINDS["B"][0], label="backward")
    ax.set_ylabel("ms per micro-batch")
    ax.set_title("compute time per stage")
    ax.set_ylim(0, max(fwd + bwd + [1e-9]) * 1.3)  # headroom for the legend
    ax.legend(loc="upper right", ncol=2, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    _stage_ticks(ax, plan)


def _stage_memory(ax: Any, plan: Plan) -> None:
    n = plan.num_stages
    peaks = [s.peak_memory_bytes for s in plan.stages]
    caps = [s.memory_capacity_bytes for s in plan.stages]
    scale, unit = byte_unit(max(peaks + caps))
    over = [p > c for p, c in zip(peaks, caps)]
    ax.bar(range(n), [p / scale for p in peaks], 0.6, color=[_OVER if o else _PEAK for o in over])
    line = ax.hlines([c / scale for c in caps], [i - 0.4 for i in range(n)], [i + 0.4 for i in range(n)],
                     colors="black", linewidth=1.6, label="capacity")
    handles = [_patch(_PEAK, "peak"), line] + ([_patch(_OVER, "over capacity")] if any(over) else [])
    if n <= 12:  # share of capacity, written above the bar or the capacity line, whichever is higher
        for i, (p, c) in enumerate(zip(peaks, caps)):
            ax.annotate(f"{p / c:.0%}" if c > 0 else format_bytes(p), (i, max(p, c) / scale), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=_FONT - 1)
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title("peak memory against capacity" + (", state FSDP-sharded" if plan.data_parallel == "fsdp" else ""))
    ax.set_ylim(0, max(peaks + caps + [1.0]) / scale * 1.3)  # headroom for the labels and legend
    ax.legend(handles=handles, loc="upper right", ncol=3, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    _stage_ticks(ax, plan)


def _lighten(colour: str, amount: float) -> str:
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def _timeline(ax: Any, result: SimResult, title: str) -> None:
    step_ms = max(result.step_time_s * 1e3, 1e-12)
    ranks = result.ranks
    stages_of: dict[int, list[int]] = collections.defaultdict(list)
    for a in result.timeline:
        if a.stage not in stages_of[a.rank]:
            stages_of[a.rank].append(a.stage)
    for held in stages_of.values():
        held.sort()
    boxes: dict[tuple[int, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for a in result.timeline:
        if a.end <= a.start:  # the empty backward of an inference plan
            continue
        chunk = stages_of[a.rank].index(a.stage)  # a rank's later stages (interleaved) drawn lighter
        boxes[(chunk, a.kind)].append((a.start * 1e3, (a.end - a.start) * 1e3, a.rank))
    for (chunk, kind), spans in sorted(boxes.items()):
        colour = _lighten(_KINDS[kind][0], 0.45 * chunk)
        for rank in {r for _, _, r in spans}:
            ax.broken_barh([(s, w) for s, w, r in spans if r == rank], (rank - 0.4, 0.8), facecolors=colour,
                           edgecolors="white", linewidth=0.6)
    kinds = [k for k in _KINDS if any(key[1] == k for key in boxes)]
    handles = [_patch(_KINDS[k][0], _KINDS[k][1]) for k in kinds]
    if any(chunk > 0 for chunk, _ in boxes):
        handles.append(_patch(_lighten("#555555", 0.45), "lighter: rank's later stage"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), framealpha=0.9, borderaxespad=0.0)
    ax.set_ylim(ranks - 0.5, -0.5)
    step = _tick_step(ranks, 40)
    ax.set_yticks(range(0, ranks, step))
    ax.set_yticklabels([_rank_label(r, stages_of.get(r, []), ranks) for r in range(0, ranks, step)])
    ax.set_xlim(0, step_ms * 1.02)
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _label_boxes(ax: Any, result: SimResult) -> None:
    """Write micro-batch numbers in the boxes wide enough for them; call once the layout is done."""
    x0, x1 = ax.get_xlim()
    points_per_ms = ax.get_window_extent().width / ax.figure.dpi * 72 / (x1 - x0)
    first = {}
    for a in result.timeline:
        first.setdefault(a.rank, set()).add(a.stage)
    # Room for the longest number in every labelled box, so labels do not stop at micro-batch 9.
    need = len(str(max(result.microbatches - 1, 0))) * (_FONT - 1) * 0.62 + 4
    for a in result.timeline:
        if a.microbatch < 0 or (a.end - a.start) * 1e3 * points_per_ms < need:
            continue
        dark = a.kind in ("F", "W") and a.stage == min(first[a.rank])  # white on the darker fills
        ax.text((a.start + a.end) / 2 * 1e3, a.rank, str(a.microbatch), ha="center", va="center", fontsize=_FONT - 1,
                color="white" if dark else "black", clip_on=True)


def _rank_label(rank: int, stages: list[int], ranks: int) -> str:
    if ranks > 16 or not stages:
        return f"rank {rank}"
    return f"rank {rank} (stage{'s' if len(stages) > 1 else ''} {','.join(map(str, stages))})"


def _patch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, label=label)


def calibration_png(report: Any, path: Any) -> None:
    """Predicted against measured stage times (log-log), one point per stage and model."""
    fig = _figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    measured = [s.measured_s * 1e3 for s in report.stages]
    for which, marker, colour in (("analytical", "o", "#4c78a8"), ("profiled", "s", "#f58518")):
        predicted = [(s.analytical_s if which == "analytical" else s.profiled_s) for s in report.stages]
        if any(p is None for p in predicted):
            continue
        ax.scatter(measured, [p * 1e3 for p in predicted], marker=marker, color=colour, label=which, zorder=3)
        for s, x, y in zip(report.stages, measured, predicted):
            ax.annotate(str(s.index), (x, y * 1e3), textcoords="offset points", xytext=(4, 4), fontsize=8)
    values = [v for v in measured if v > 0]
    lo, hi = min(values) / 3, max(values) * 3
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="exact")
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_minor_formatter(FormatStrFormatter("%g"))
        axis.set_tick_params(which="both", labelsize=8)
    ax.set_xlabel("measured fwd + bwd per micro-batch (ms)", fontsize=9)
    ax.set_ylabel("predicted (ms)", fontsize=9)
    ax.set_title(f"{report.model} on {report.device} ({report.device_spec}): stage times", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
