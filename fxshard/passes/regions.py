"""Repeated blocks of a captured graph ("regions"), and the graph with each block outlined.

A region is one member of a family of >= 2 sibling modules of one class under one parent that
a ``ModuleList`` or ``Sequential`` numbers (``h.0``, ``h.1``, ...; ``model.layers.3``): the
transformer blocks, the ResNet stages' blocks. A node belongs to the outermost such block on
its module stack. Regions are the units of activation checkpointing and of FSDP2's
``fully_shard`` (docs/runtime.md, "Repeated blocks").

A block is left out when it cannot be cut out cleanly: its nodes are not contiguous in graph
order, it has fewer than two nodes, or a node outside it reads one of its modules or
parameters (the block would not own them).

Example::

    regions = repeated_blocks(captured)          # (Region(module="h.0", ...), ...)
    outlined = outline(captured.gm, regions)     # h.0 is now one call_module
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx

from fxshard.capture import CapturedGraph
from fxshard.modules import qualified_name, stack_paths

__all__ = ["Region", "outline", "regions_within", "repeated_blocks"]

_INDEXED = re.compile(r"^(.*?)\.?(\d+)$")


@dataclasses.dataclass(frozen=True)
class Region:
    """One repeated block of a graph.

    Attributes:
        module: the block's qualified name ("h.0", "model.layers.3").
        nodes: its graph nodes, in graph order (get_attr nodes left out).
        inputs: nodes outside the block whose values it reads, in order of first use.
        outputs: block nodes read outside it, in graph order.
        params: qualified names of the parameters and buffers the block owns (only it uses them).
    """

    module: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...]


def _module_classes(nodes: Iterable[torch.fx.Node]) -> dict[str, str]:
    """Qualified module name -> its class, as the graph's module stacks record it."""
    classes: dict[str, str] = {}
    for node in nodes:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            if not isinstance(value, tuple) or len(value) < 2:
                continue
            cls = value[1]
            name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)
            classes.setdefault(qualified_name(str(value[0])), name)
    return classes


def _families(classes: dict[str, str]) -> set[str]:
    """The modules that belong to a numbered family of >= 2 siblings of one class."""
    members: dict[tuple[str, str], list[str]] = {}
    for path, cls in classes.items():
        match = _INDEXED.match(path)
        if match and path:
            members.setdefault((match.group(1), cls), []).append(path)
    return {p for group in members.values() if len(group) >= 2 for p in group}


def _owned_by(target: str, block: str) -> bool:
    return target == block or target.startswith(block + ".")


def _attribute_names(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[str]:
    """Qualified names of the parameters and buffers a get_attr or call_module node holds."""
    if node.op == "call_module":
        sub = gm.get_submodule(str(node.target))
        prefix = f"{node.target}."
        return ([prefix + n for n, _ in sub.named_parameters(remove_duplicate=False)]
                + [prefix + n for n, _ in sub.named_buffers(remove_duplicate=False)])
    if node.op == "get_attr":
        return [str(node.target)] if isinstance(_attr(gm, str(node.target)), torch.Tensor) else []
    return []


def _attr(root: torch.nn.Module, target: str) -> Any:
    return operator.attrgetter(target)(root)


def _region_of(gm: torch.fx.GraphModule, module: str, members: list[torch.fx.Node], position: dict[torch.fx.Node, int],
               attribute_nodes: list[torch.fx.Node]) -> Region | None:
    """The region of one block, or None when it cannot be cut out cleanly. ``position``: each
    non-get_attr node's index in graph order; ``attribute_nodes``: the get_attr and call_module nodes."""
    inside = set(members)
    if len(members) < 2 or position[members[-1]] - position[members[0]] + 1 != len(members):
        return None  # not contiguous in graph order
    inputs: dict[str, None] = {}
    params: dict[str, None] = {}
    for node in members:
        for arg in node.all_input_nodes:
            if arg in inside:
                continue
            if arg.op == "get_attr" and _owned_by(str(arg.target), module):
                if any(u not in inside for u in arg.users):
                    return None  # a parameter of the block read from outside it
                params.update(dict.fromkeys(_attribute_names(gm, arg)))
                continue
            inputs[arg.name] = None
        if node.op == "call_module":
            if not _owned_by(str(node.target), module):
                return None  # the block calls a module that is not its own
            params.update(dict.fromkeys(_attribute_names(gm, node)))
    for node in attribute_nodes:
        if node not in inside and _owned_by(str(node.target), module):
            if node.op == "call_module" or any(u not in inside for u in node.users):
                return None  # a module or parameter of the block used outside it
    outputs = tuple(n.name for n in members if any(u not in inside for u in n.users))
    return Region(module=module, nodes=tuple(n.name for n in members), inputs=tuple(inputs),
                  outputs=outputs, params=tuple(params))


def repeated_blocks(captured: CapturedGraph) -> tuple[Region, ...]:
    """The repeated blocks of ``captured`` that can be cut out cleanly, in graph order.

    Each non-get_attr node belongs to the outermost numbered block on its module stack whose
    family (siblings of one class under one parent) has >= 2 members; blocks that are not
    contiguous, have fewer than two nodes, or whose modules or parameters are read from
    outside them are left out.
    """
    gm = captured.gm
    families = _families(_module_classes(gm.graph.nodes))
    blocks: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "placeholder", "output"):
            continue
        block = next((p for p in stack_paths(node) if p in families), None)
        if block is not None:
            blocks.setdefault(block, []).append(node)
    position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op != "get_attr")}
    attribute_nodes = [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
    regions = (_region_of(gm, module, members, position, attribute_nodes) for module, members in blocks.items())
    return tuple(r for r in regions if r is not None)


def regions_within(regions: Sequence[Region], nodes: Iterable[str]) -> tuple[Region, ...]:
    """The regions lying wholly inside ``nodes`` (a stage's node names); a block cut by a
    stage boundary is not a unit of its own."""
    names = set(nodes)
    return tuple(r for r in regions if names.issuperset(r.nodes))


def _fresh_name(taken: set[str], module: str) -> str:
    base = "block_" + re.sub(r"\W", "_", module)
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _block_module(gm: torch.fx.GraphModule, region: Region, members: list[torch.fx.Node],
                  inputs: list[torch.fx.Node], outputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """A GraphModule running the block's nodes; its attributes are the same objects as
    ``gm``'s, at paths relative to the block."""
    prefix = region.module + "."
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    root: dict[str, Any] = {}
    for node in inputs:
        env[node] = g.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def arg(n: torch.fx.Node) -> Any:
        if n not in env:  # a get_attr of the block's own
            target = str(n.target).removeprefix(prefix)
            root[target] = _attr(gm, str(n.target))
            env[n] = g.get_attr(target)
            env[n].meta = dict(n.meta)
        return env[n]

    for node in members:
        if node.op == "call_module":
            target = str(node.target).removeprefix(prefix)
            root[target] = _attr(gm, str(node.target))
            env[node] = g.node_copy(node, arg)
            env[node].target = target
        else:
            env[node] = g.node_copy(node, arg)
    g.output(tuple(env[n] for n in outputs))
    g.lint()
    return torch.fx.GraphModule(root, g, class_name="Block")


def outline(gm: torch.fx.GraphModule, regions: Sequence[Region]) -> torch.fx.GraphModule:
    """``gm`` with each region's nodes replaced by one ``call_module`` of a block module
    installed at the block's own path, so state_dict keys, parameter names and Parameter
    objects are unchanged. ``gm`` itself is not modified; a region whose nodes ``gm`` lacks
    (another stage's) is skipped.

    The block module returns a tuple of the block's outputs; the outer graph reads them with
    ``getitem`` nodes that keep the original nodes' names.
    """
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    plans: dict[torch.fx.Node, tuple[Region, list[torch.fx.Node]]] = {}
    member_of: dict[torch.fx.Node, Region] = {}
    for region in regions:
        members = [by_name[n] for n in region.nodes if n in by_name]
        if len(members) != len(region.nodes) or not members:
            continue
        plans[members[-1]] = (region, members)
        member_of.update(dict.fromkeys(members, region))
    taken = {n.name for n in nodes}
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    root: dict[str, Any] = {}
    for node in nodes:
        if node in plans:
            region, members = plans[node]
            inside = set(members)
            inputs: dict[torch.fx.Node, None] = {}
            prefix = region.module + "."
            for m in members:
                for a in m.all_input_nodes:
                    if a not in inside and not (a.op == "get_attr" and str(a.target).startswith(prefix)):
                        inputs[a] = None
            outputs = [m for m in members if any(u not in inside for u in m.users)]
            block = _block_module(gm, region, members, list(inputs), outputs)
            root[region.module] = block
            call = g.create_node("call_module", region.module, tuple(env[a] for a in inputs),
                                 name=_fresh_name(taken, region.module))
            call.meta["val"] = tuple(m.meta.get("val") for m in outputs)
            for i, m in enumerate(outputs):
                env[m] = g.create_node("call_function", operator.getitem, (call, i), name=m.name)
                env[m].meta = dict(m.meta)
            continue
        if node in member_of:
            continue
        if node.op == "get_attr" and node.users and all(u in member_of for u in node.users) and any(
                str(node.target).startswith(member_of[u].module + ".") for u in node.users):
            continue  # the block's own attribute: it lives in the block module
        if node.op in ("get_attr", "call_module"):
            root[str(node.target)] = _attr(gm, str(node.target))
        env[node] = g.node_copy(node, lambda n: env[n])
    g.lint()
    return torch.fx.GraphModule(root, g, class_name=type(gm).__name__)
