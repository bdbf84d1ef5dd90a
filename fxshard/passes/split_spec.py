"""Where a plan's cuts fall against the model's modules: upstream split points and per-stage module names.

Analyses, pure and side-effect free: a captured graph and a plan in, JSON-able data out. A
node's modules come from ``node.meta["nn_module_stack"]``. :func:`split_points` says which
stage boundaries ``torch.distributed.pipelining``'s ``split_spec`` can express;
:func:`stage_modules` gives torchtitan-style module names per stage. ``fxshard export``
writes both (see :mod:`fxshard.export`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxshard.capture import CapturedGraph
from fxshard.errors import ExportError
from fxshard.modules import module_paths
from fxshard.plan import Plan

__all__ = ["check_plan_matches", "split_points", "stage_modules"]

_SKIP_OPS = ("placeholder", "output", "get_attr")


def _compute_nodes(captured: CapturedGraph) -> list[torch.fx.Node]:
    """Nodes that compute, in graph order (inputs, outputs and attribute reads left out:
    attributes are replicated on every stage that reads them)."""
    return [n for n in captured.gm.graph.nodes if n.op not in _SKIP_OPS]


def check_plan_matches(captured: CapturedGraph, plan: Plan) -> dict[str, int]:
    """The plan's node -> stage map, once the plan is known to be made for ``captured``.

    Raises:
        ExportError: the graph fingerprints differ, or a computing node has no stage.
    """
    stage_of = plan.stage_of()
    missing = [n.name for n in _compute_nodes(captured) if n.name not in stage_of]
    if plan.model.fingerprint != captured.fingerprint() or missing:
        raise ExportError(
            f"the plan was made for {plan.model.name} (fingerprint {plan.model.fingerprint}, {plan.model.nodes} "
            f"nodes); this graph is {captured.model_name} (fingerprint {captured.fingerprint()}, "
            f"{len(captured.nodes)} nodes{', e.g. ' + repr(missing[0]) + ' has no stage' if missing else ''}). "
            f"Export the plan together with the graph it was made from")
    return stage_of


def _members(nodes: list[torch.fx.Node]) -> dict[str, list[int]]:
    """Module path -> positions (in ``nodes``) of the nodes inside it."""
    members: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for path in module_paths(node):
            members.setdefault(path, []).append(i)
    return members


def split_points(captured: CapturedGraph, plan: Plan) -> dict[str, Any]:
    """The plan's stage boundaries as ``torch.distributed.pipelining`` split points.

    Upstream ``pipeline(model, ..., split_spec={"layers.8": SplitPoint.BEGINNING})`` cuts the
    graph order just before the named submodule's call: everything before goes to earlier
    stages, everything after to later ones. A boundary b (where stage b begins) is expressible
    that way when the plan's stages < b all come before stages >= b in graph order and the
    first node of stage b is the first node of a module whose nodes all lie in stages >= b;
    the outermost such module is named. Other boundaries go under ``not_on_module_boundary``
    with the nodes either side, so the user knows an upstream split would differ.

    Returns:
        ``{"split_spec": {fqn: "BEGINNING"}, "boundaries": [...], "not_on_module_boundary": [...]}``.
    """
    stage_of = check_plan_matches(captured, plan)
    nodes = _compute_nodes(captured)
    stage = [stage_of[n.name] for n in nodes]
    members = _members(nodes)
    spec: dict[str, str] = {}
    boundaries, off = [], []
    for b in range(1, plan.num_stages):
        later = [i for i, s in enumerate(stage) if s >= b]
        earlier = [i for i, s in enumerate(stage) if s < b]
        entry: dict[str, Any] = {"stage": b, "first_module": plan.stages[b].first_module,
                                 "previous_last_module": plan.stages[b - 1].last_module}
        if not later or not earlier:
            off.append({**entry, "reason": f"stage {b} or every stage before it has no computing node"})
            continue
        first = later[0]
        entry.update(first_node=nodes[first].name, last_node_before=nodes[earlier[-1]].name)
        strays = [nodes[i].name for i in earlier if i > first]
        if strays:
            off.append({**entry, "reason": f"stages 0..{b - 1} are not all before stage {b} in graph order: "
                                           f"{len(strays)} node(s) of earlier stages come after {nodes[first].name}",
                        "out_of_order_nodes": strays[:20]})
            continue
        module = next((p for p in module_paths(nodes[first]) if members[p][0] == first), None)
        if module is None:
            inside = _common_module(nodes[earlier[-1]], nodes[first])
            where = f"inside module {inside!r}" if inside else "outside any module"
            off.append({**entry, "inside_module": inside,
                        "reason": f"stage {b} begins at node {nodes[first].name!r}, {where}, which no submodule "
                                  f"begins with; an upstream split_spec cannot cut there"})
            continue
        spec[module] = "BEGINNING"
        boundaries.append({**entry, "module": module})
    return {"model": plan.model.name, "num_stages": plan.num_stages, "split_spec": spec,
            "boundaries": boundaries, "not_on_module_boundary": off}


def _common_module(a: torch.fx.Node, b: torch.fx.Node) -> str:
    """The innermost module enclosing both nodes, or ""."""
    common = ""
    for pa, pb in zip(module_paths(a), module_paths(b)):
        if pa != pb:
            break
        common = pa
    return common


def stage_modules(captured: CapturedGraph, plan: Plan) -> dict[str, Any]:
    """Torchtitan-style module names per stage.

    For each stage, the outermost module FQNs whose every node lies in that stage, in graph
    order; the computing nodes no such module covers (top-level ops, the parts of a block that
    a cut splits); and the attributes (parameters, buffers) the stage reads directly. A module
    is named by at most one stage.

    Returns:
        ``{"module_names_per_stage": [[fqn, ...], ...], "stages": [{...}, ...]}``.
    """
    stage_of = check_plan_matches(captured, plan)
    nodes = _compute_nodes(captured)
    members = _members(nodes)
    stages_of_module = {p: {stage_of[nodes[i].name] for i in idx} for p, idx in members.items()}
    names: list[list[str]] = [[] for _ in range(plan.num_stages)]
    uncovered: list[list[str]] = [[] for _ in range(plan.num_stages)]
    for node in nodes:
        s = stage_of[node.name]
        module = next((p for p in module_paths(node) if stages_of_module[p] == {s}), None)
        if module is None:
            uncovered[s].append(node.name)
        elif module not in names[s]:
            names[s].append(module)
    attributes: list[list[str]] = [[] for _ in range(plan.num_stages)]
    for node in captured.gm.graph.nodes:
        if node.op == "get_attr":
            for s in sorted({stage_of[u.name] for u in node.users if u.name in stage_of}):
                if str(node.target) not in attributes[s]:
                    attributes[s].append(str(node.target))
    stages = [{"index": st.index, "devices": list(st.devices), "modules": names[st.index],
               "uncovered_nodes": uncovered[st.index], "attributes": attributes[st.index],
               "first_module": st.first_module, "last_module": st.last_module} for st in plan.stages]
    return {"model": plan.model.name, "num_stages": plan.num_stages, "module_names_per_stage": names,
            "stages": stages}
