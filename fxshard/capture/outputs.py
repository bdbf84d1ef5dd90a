"""Output structure: the captured graph returns a flat tuple; :class:`OutputSpec` rebuilds the
model's own structure around it with torch's pytree (tensor, tuple, list, namedtuple, dict, dict
subclasses such as HF ModelOutput, dataclasses; constants kept aside)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.immutable_collections import immutable_dict

__all__ = ["OutputSpec", "build_mapping", "flatten_output_node", "output_spec_from_pytree"]


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """How to rebuild the model's output structure from the flat tuple the graph returns.

    ``spec`` is the structure's :class:`torch.utils._pytree.TreeSpec`; ``constants`` maps
    the positions of its leaves that are not graph values (``None``, numbers, strings) to
    their values; the graph returns the other leaves, in order.
    """

    spec: pytree.TreeSpec
    constants: Mapping[int, Any] = dataclasses.field(default_factory=dict)

    def rebuild(self, flat: tuple | list) -> Any:
        """Return the model-shaped output for the graph's flat outputs."""
        values = iter(flat)
        leaves = [self.constants[i] if i in self.constants else next(values) for i in range(self.spec.num_leaves)]
        return pytree.tree_unflatten(leaves, self.spec)


def build_mapping(typ: type, keys: tuple, values: tuple) -> Any:
    """Rebuild a dict subclass inside a traced graph (fx would turn it into a plain dict)."""
    out = typ()
    for key, value in zip(keys, values):
        out[key] = value
    return out


def flatten_output_node(graph: torch.fx.Graph) -> OutputSpec:
    """Make a symbolically traced graph return a flat tuple; the spec rebuilds the model's output."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves, spec = _flatten_structure(_model_structure(output.args[0]))
    output.args = (tuple(x for x in leaves if isinstance(x, torch.fx.Node)),)
    _erase_unused_constructors(graph)
    return OutputSpec(spec, {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.fx.Node)})


def output_spec_from_pytree(graph: torch.fx.Graph, out_spec: pytree.TreeSpec) -> OutputSpec:
    """Make an exported graph return a flat tuple; torch.export's ``out_spec`` rebuilds the output."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    output.args = (tuple(leaves),)
    return OutputSpec(out_spec)


def _model_structure(arg: Any) -> Any:
    """The output node's argument as the model built it, with fx nodes for its values."""
    if isinstance(arg, torch.fx.Node):
        target = arg.target
        if (arg.op == "call_function" and isinstance(target, type)
                and dataclasses.is_dataclass(target)):
            # fx records `return Out(logits=x)` as a call to the dataclass: look inside.
            names = [f.name for f in dataclasses.fields(target)]
            bound = dict(zip(names, arg.args)) | dict(arg.kwargs)
            return target(**{n: _model_structure(v) for n, v in bound.items()})
        if arg.op == "call_function" and target is build_mapping:
            typ, keys, values = arg.args
            return build_mapping(typ, keys, tuple(_model_structure(v) for v in values))
        return arg
    if isinstance(arg, (tuple, list)):
        items = [_model_structure(a) for a in arg]
        # fx stores a returned list as its own read-only list type: give the model's back.
        if isinstance(arg, list) or type(arg) is tuple:
            return items if isinstance(arg, list) else tuple(items)
        return type(arg)(*items)  # namedtuple
    if isinstance(arg, Mapping):
        typ = dict if isinstance(arg, immutable_dict) else type(arg)
        return build_mapping(typ, tuple(arg.keys()), tuple(_model_structure(v) for v in arg.values()))
    return arg


def _flatten_structure(structure: Any) -> tuple[list, pytree.TreeSpec]:
    """``pytree.tree_flatten``, after registering the dataclasses and dict subclasses in
    ``structure`` that torch (or transformers, for ModelOutput) has not registered."""
    while True:
        leaves, spec = pytree.tree_flatten(structure)
        new = {type(x) for x in leaves if dataclasses.is_dataclass(x) or isinstance(x, dict)}
        if not new:
            return leaves, spec
        for typ in new:
            if dataclasses.is_dataclass(typ):
                pytree.register_dataclass(typ)
            else:
                pytree.register_pytree_node(typ, lambda d: (list(d.values()), list(d.keys())),
                                            functools.partial(_unflatten_mapping, typ))


def _unflatten_mapping(typ: type, values: Iterable, keys: list) -> Any:
    return build_mapping(typ, tuple(keys), tuple(values))


def _erase_unused_constructors(graph: torch.fx.Graph) -> None:
    # Only the structure-building nodes the output flattening made dead; nothing else is
    # removed (an unused in-place update of a buffer must stay).
    for node in reversed(list(graph.nodes)):
        if (node.op == "call_function" and not node.users
                and (node.target is build_mapping
                     or (isinstance(node.target, type) and dataclasses.is_dataclass(node.target)))):
            graph.erase_node(node)
