"""The stage graph of a plan as Graphviz DOT text: one coloured cluster per stage, modules collapsed.

Text only (nothing to install): ``fxshard plan --dot`` writes it; :mod:`fxshard.viz` re-exports
:func:`plan_dot` and :func:`graph_outline`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Mapping, Sequence

from fxshard.capture import CapturedGraph
from fxshard.modules import module_of
from fxshard.plan import Plan, PlanFormatError, StagePlan
from fxshard.units import format_bytes, format_time
from fxshard.viz_text import plan_title

__all__ = ["GraphOutline", "graph_outline", "plan_dot"]

# Stage colours of the DOT picture (pastel, so black labels stay readable); they cycle.
_STAGE_FILL = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
               "#9edae5", "#d9d9d9")


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
    edges = tuple((node.name, user.name) for node in captured.nodes for user in node.users)
    return GraphOutline(edges=edges, node_module={node.name: module_of(node) for node in captured.gm.graph.nodes})


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
    boxes = _boxes(plan, node_module, modules)
    box_of = {name: box.id for box in boxes for name in box.nodes}
    lines = [f"digraph {_quote('fxshard plan ' + plan.model.name)} {{",
             f"  label={_quote(plan_title(plan))};",
             "  labelloc=t; fontname=Helvetica; fontsize=12; rankdir=TB; compound=true;",
             '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
             "  edge [fontname=Helvetica, fontsize=9];"]
    for st in plan.stages:
        fill = _STAGE_FILL[st.index % len(_STAGE_FILL)]
        lines.append(f"  subgraph cluster_stage_{st.index} {{")
        lines.append(f"    label={_quote(_stage_cluster_label(st, plan.data_parallel))}; style=rounded; "
                     f"color={_quote(fill)};"
                     " penwidth=2;")
        for box in boxes:
            if box.stage == st.index:
                lines.append(f"    {_quote(box.id)} [label={_quote(box.label)}, fillcolor={_quote(fill)}];")
        lines.append("  }")
    lines += _dot_edges(plan, boxes, box_of, stage_of, graph_edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _boxes(plan: Plan, node_module: Mapping[str, str] | None, modules: bool) -> list[_Box]:
    """The boxes :func:`plan_dot` draws, in stage and graph order (see its docstring)."""
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
    return boxes


def _checkpointing(st: StagePlan) -> str:
    """", full activation checkpointing" where the stage recomputes, else ""."""
    return f", {st.activation_checkpointing} activation checkpointing" if st.activation_checkpointing != "none" else ""


def _stage_box_label(st: StagePlan) -> str:
    span = f"{st.first_module or '-'} .. {st.last_module or '-'}"
    return f"stage {st.index}\n{span}\n{len(st.nodes)} nodes" + _checkpointing(st).replace(", ", "\n", 1)


def _stage_cluster_label(st: StagePlan, data_parallel: str | None) -> str:
    where = f"{','.join(st.devices)} (device{'s' if len(st.devices) > 1 else ''} " \
            f"{','.join(map(str, st.device_indices))}"
    if len(st.devices) > 1 and data_parallel:
        where += ", FSDP-sharded" if data_parallel == "fsdp" else ", replicated"
    return (f"stage {st.index} on {where}): fwd {format_time(st.fwd_time_s)}, bwd {format_time(st.bwd_time_s)}, "
            f"peak {format_bytes(st.peak_memory_bytes)}" + _checkpointing(st))


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
