"""Pictures of a plan: per-stage costs, memory and the simulated schedule as a PNG, the stage graph as DOT.

The top floor beside the CLI: it reads a :class:`~fxshard.plan.Plan` and draws it, and can
re-simulate the plan from its own figures (:func:`simulate_plan`) for what-if questions such as
"what would 8 micro-batches or GPipe do?". Matplotlib is imported only inside the drawing
functions and always draws with its Agg canvas, so importing this module changes nothing and
needs no display. See docs/planning.md for how the planner itself simulates schedules.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster, format_bytes
from fxshard.plan import Plan, PlanFormatError, StagePlan
from fxshard.simulate import SCHEDULES, SimResult, SimulationError, StageTiming, rank_actions, schedule_name, simulate

__all__ = ["GraphOutline", "graph_outline", "plan_dot", "plan_png", "simulate_plan", "simulation_text", "timeline_png"]

_DPI = 110
_FONT = 9  # points; nothing is drawn below 8
# Action kind -> (colour, legend text). F and B share their colours with the stage-time bars.
_KINDS = {"F": ("#4c78a8", "F forward"), "B": ("#f58518", "B backward"), "I": ("#e8a33d", "I input grad"),
          "W": ("#8e6bb0", "W weight grad"), "R": ("#7f7f7f", "R all-reduce")}
_OVER = "#d62728"
_PEAK = "#72a7c9"
# Stage colours of the DOT picture (pastel, so black labels stay readable); they cycle.
_STAGE_FILL = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
               "#9edae5", "#d9d9d9")


# -- re-simulation ---------------------------------------------------------------------------


def simulate_plan(plan: Plan, *, schedule: str | None = None, microbatches: int | None = None) -> SimResult:
    """Re-simulate one training step of ``plan`` from the figures stored in it.

    Each stage runs on its first device: forward and backward take ``fwd_time_s`` and
    ``bwd_time_s`` per micro-batch, activations and their gradients cross to the next stage in
    ``cluster.link(a, b).transfer_time(send_bytes)`` (nothing when both stages share a device),
    and data-parallel replicas add the part of the ring all-reduce of each stage's parameters
    that one micro-batch's backward does not hide, as the planner prices it. Without overrides
    this repeats the planner's own simulation, so ``step_time_s`` equals
    ``plan.estimate.step_time_s``. Single-device and DDP plans are one stage whose micro-batches
    run one after another (gradient accumulation); they have no pipeline schedule, so they take
    no ``schedule`` what-if. :func:`simulation_text` says what a result simulated.

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
    _check_layout(plan, key, m)
    return simulate(key, _timings(plan, cluster, plan.microbatches / m), m)


def _check_layout(plan: Plan, key: str, m: int) -> None:
    """The schedule must put on each rank exactly the stages that share a device in the plan."""
    per_rank = SCHEDULES[key][1]
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
    """The planner's stage timings (planner._stage_timings), rebuilt from the plan's figures."""
    out = []
    stages = plan.stages
    for s, st in enumerate(stages):
        send = 0.0
        if s + 1 < len(stages) and st.device_indices[0] != stages[s + 1].device_indices[0]:
            send = cluster.link(st.device_indices[0], stages[s + 1].device_indices[0]).transfer_time(
                st.send_bytes * scale)
        bwd = st.bwd_time_s * scale if plan.training else 0.0
        out.append(StageTiming(fwd_s=st.fwd_time_s * scale, bwd_s=bwd, send_fwd_s=send,
                               send_bwd_s=send if plan.training else 0.0, activation_bytes=0.0,
                               static_bytes=st.peak_memory_bytes, reduce_s=_exposed_allreduce(plan, cluster, st, bwd)))
    return out


def _exposed_allreduce(plan: Plan, cluster: Cluster, st: StagePlan, bwd: float) -> float:
    """Ring all-reduce of the stage's parameters over its replicas, less the backward that hides it."""
    n = len(st.device_indices)
    if not plan.training or n <= 1 or st.param_bytes <= 0:
        return 0.0
    from fxshard.planner import group_link, ring_allreduce_time

    bandwidth, latency = group_link(cluster, tuple(st.device_indices))
    return max(0.0, ring_allreduce_time(st.param_bytes, n, bandwidth, latency) - bwd)


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


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:,.0f} ms"


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
        _timeline(ax, result, _timeline_title(result, plan))
        fig.suptitle(_plan_title(plan), fontweight="bold")
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
        _timeline(ax, result, title or _timeline_title(result, None))
        fig.draw_without_rendering()
        _label_boxes(ax, result)
        _save(fig, path)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def simulation_text(plan: Plan, result: SimResult) -> str:
    """What ``result`` (a :func:`simulate_plan` of ``plan``) simulated, in words.

    Pipelines give the schedule and their shape, so that stages / stages per device x replicas
    = devices reads off it ("zbv, 4 stages, 2 per device, on 2 devices x 4 replicas = 8 devices,
    2 micro-batches"); single and ddp plans say they have no pipeline schedule.
    """
    mbs = _plural(result.microbatches, "micro-batch", "micro-batches")
    if plan.strategy not in ("pipeline", "hybrid"):
        where = "1 device" if plan.strategy == "single" else f"{plan.replicas} data-parallel replicas"
        one_by_one = " one after another (gradient accumulation)" if result.microbatches > 1 else ""
        return f"{plan.strategy} ({where}, no pipeline schedule), {mbs}{one_by_one}"
    per = result.stages // max(result.ranks, 1)
    shape = _plural(result.stages, "stage") + (f", {per} per device" if per > 1 else "")
    shape += f", on {_plural(result.ranks, 'device')}"
    if plan.replicas > 1:
        shape += f" x {plan.replicas} replicas = {result.ranks * plan.replicas} devices"
    return f"{result.schedule}, {shape}, {mbs}"


def _plan_title(plan: Plan) -> str:
    e = plan.estimate
    mode = f"training ({plan.optimizer})" if plan.training else "inference"
    return (f"{plan.model.name}: {plan.strategy} ({plan.shape_text()})"
            + (f", schedule {plan.schedule}" if plan.schedule else "")
            + f", {_plural(plan.microbatches, 'micro-batch', 'micro-batches')}\n"
            f"batch {plan.batch_size}, {mode}: estimated {e.samples_per_s:,.1f} samples/s, "
            f"step {_ms(e.step_time_s)}, bubble {e.bubble_fraction:.1%}")


def _timeline_title(result: SimResult, plan: Plan | None) -> str:
    cost = f"step {_ms(result.step_time_s)}, bubble {result.bubble_fraction:.1%}"
    if plan is None:
        return (f"simulated {result.schedule}, {_plural(result.microbatches, 'micro-batch', 'micro-batches')} "
                f"on {_plural(result.ranks, 'rank')}: {cost}")
    pipelined = plan.strategy in ("pipeline", "hybrid")
    what_if = (pipelined and (plan.schedule or "gpipe") != result.schedule) or plan.microbatches != result.microbatches
    return f"{'what-if: ' if what_if else 'simulated '}{simulation_text(plan, result)}: {cost}"


def _stage_ticks(ax: Any, n: int) -> None:
    step = _tick_step(n)
    ax.set_xticks(range(0, n, step))
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
    _stage_ticks(ax, n)


def _byte_unit(value: float) -> tuple[float, str]:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return scale, unit
    return 1, "B"


def _stage_memory(ax: Any, plan: Plan) -> None:
    n = plan.num_stages
    peaks = [s.peak_memory_bytes for s in plan.stages]
    caps = [s.memory_capacity_bytes for s in plan.stages]
    scale, unit = _byte_unit(max(peaks + caps))
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
    ax.set_title("peak memory against capacity")
    ax.set_ylim(0, max(peaks + caps + [1.0]) / scale * 1.3)  # headroom for the labels and legend
    ax.legend(handles=handles, loc="upper right", ncol=3, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    _stage_ticks(ax, n)


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


# -- DOT -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraphOutline:
    """What :func:`plan_dot` needs of a captured graph: its data edges and each node's module path."""

    edges: tuple[tuple[str, str], ...]
    node_module: Mapping[str, str]


def graph_outline(captured: CapturedGraph) -> GraphOutline:
    """The edges (producer, user) and node -> module path of a captured graph, for :func:`plan_dot`.

    Example::

        o = graph_outline(fxshard.capture(model, inputs))
        dot = plan_dot(p, list(o.edges), node_module=o.node_module)
    """
    from fxshard.cost_models import analyze

    edges = tuple((node.name, user.name) for node in captured.nodes for user in node.users)
    return GraphOutline(edges=edges, node_module={w.name: w.module for w in analyze(captured)})


def _module_group(module: str) -> str:
    """The top two levels of a module path, and a container index after them: ``h.0.attn.c_attn`` ->
    ``h.0``, ``transformer.h.3.mlp`` -> ``transformer.h.3``."""
    parts = module.split(".") if module else []
    keep = parts[:2]
    if len(parts) > 2 and parts[2].isdigit():
        keep.append(parts[2])
    return ".".join(keep)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclasses.dataclass(kw_only=True)
class _Box:
    id: str
    stage: int
    group: str
    label: str
    nodes: list[str]


def plan_dot(plan: Plan, graph_edges: Sequence[tuple[str, str]] | None = None, *,
             node_module: Mapping[str, str] | None = None, modules: bool = True) -> str:
    """Graphviz DOT text of the plan's graph, coloured by stage, one cluster per stage.

    With ``node_module`` (node name -> module path, see :func:`graph_outline`), consecutive nodes
    of one stage in the same module group (the top two levels of the path, with a container
    index: ``h.0``) collapse into one box labelled with the group and its node count;
    ``modules=False`` draws one box per node instead. With ``graph_edges``, boxes are joined by
    the data edges between them, labelled with their multiplicity (edges across stages drawn
    bold); without edges, boxes are chained in order, dashed. With neither, each stage is one
    box with its first and last module and node count, chained by the bytes it sends.

    Raises:
        PlanFormatError: an edge names a node that is in no stage of the plan.

    Example::

        o = graph_outline(captured)
        Path("plan.dot").write_text(plan_dot(p, list(o.edges), node_module=o.node_module))
    """
    stage_of = plan.stage_of()
    boxes: list[_Box] = []
    detailed = node_module is not None or not modules
    for st in plan.stages:
        if not detailed:
            boxes.append(_Box(id=f"s{st.index}", stage=st.index, group="", label=_stage_box_label(st),
                              nodes=list(st.nodes)))
            continue
        for name in st.nodes:
            group = _module_group((node_module or {}).get(name, "")) if modules else name
            last = boxes[-1] if boxes else None
            if modules and last is not None and (last.stage, last.group) == (st.index, group):
                last.nodes.append(name)
            else:
                boxes.append(_Box(id=f"b{len(boxes)}", stage=st.index, group=group, label=group, nodes=[name]))
    if detailed and modules:
        for box in boxes:
            group = box.group or (box.nodes[0] if len(box.nodes) == 1 else "(model)")
            box.label = f"{group}\n{len(box.nodes)} node{'s' if len(box.nodes) > 1 else ''}"
    box_of = {name: box.id for box in boxes for name in box.nodes}
    lines = [f"digraph {_quote('fxshard plan ' + plan.model.name)} {{",
             f"  label={_quote(_plan_title(plan))};",
             "  labelloc=t; fontname=Helvetica; fontsize=12; rankdir=TB; compound=true;",
             '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
             "  edge [fontname=Helvetica, fontsize=9];"]
    for st in plan.stages:
        fill = _STAGE_FILL[st.index % len(_STAGE_FILL)]
        lines.append(f"  subgraph cluster_stage_{st.index} {{")
        lines.append(f"    label={_quote(_stage_cluster_label(st))}; style=rounded; color={_quote(fill)};"
                     " penwidth=2;")
        for box in boxes:
            if box.stage == st.index:
                lines.append(f"    {_quote(box.id)} [label={_quote(box.label)}, fillcolor={_quote(fill)}];")
        lines.append("  }")
    lines += _dot_edges(plan, boxes, box_of, stage_of, graph_edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _stage_box_label(st: StagePlan) -> str:
    span = f"{st.first_module or '-'} .. {st.last_module or '-'}"
    return f"stage {st.index}\n{span}\n{len(st.nodes)} nodes"


def _stage_cluster_label(st: StagePlan) -> str:
    where = f"{','.join(st.devices)} (device{'s' if len(st.devices) > 1 else ''} " \
            f"{','.join(map(str, st.device_indices))})"
    return (f"stage {st.index} on {where}: fwd {_ms(st.fwd_time_s)}, bwd {_ms(st.bwd_time_s)}, "
            f"peak {format_bytes(st.peak_memory_bytes)}")


def _dot_edges(plan: Plan, boxes: list[_Box], box_of: dict[str, str], stage_of: dict[str, int],
               graph_edges: Sequence[tuple[str, str]] | None) -> list[str]:
    if graph_edges is None:
        lines = []
        for a, b in itertools.pairwise(boxes):
            if a.stage != b.stage and a.id == f"s{a.stage}":  # stage boxes: label the bytes sent
                label = format_bytes(plan.stages[a.stage].send_bytes)
                lines.append(f"  {_quote(a.id)} -> {_quote(b.id)} [label={_quote(label)}, penwidth=2];")
            else:
                lines.append(f"  {_quote(a.id)} -> {_quote(b.id)} [style=dashed];")
        return lines
    count: collections.Counter[tuple[str, str]] = collections.Counter()
    for edge in graph_edges:
        src, dst = edge
        for name in (src, dst):
            if name not in box_of:
                raise PlanFormatError(f"edge {src!r} -> {dst!r} names node {name!r}, which is in no stage of this "
                                      f"plan of {plan.model.name} ({len(stage_of)} nodes); pass the edges of "
                                      f"the graph the plan was made for (graph_outline(captured).edges)")
        if box_of[src] != box_of[dst]:
            count[(box_of[src], box_of[dst])] += 1
    stage_of_box = {box.id: box.stage for box in boxes}
    lines = []
    for (a, b), k in count.items():
        attrs = [f"label={_quote(f'x{k}')}"] if k > 1 else []
        if stage_of_box[a] != stage_of_box[b]:
            attrs.append("penwidth=2")
        lines.append(f"  {_quote(a)} -> {_quote(b)}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    return lines


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
