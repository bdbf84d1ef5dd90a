"""Which of the model's modules a graph node belongs to, and whether a module's state is real.

A traced or exported node records its enclosing modules in ``node.meta["nn_module_stack"]``
(outermost first); Dynamo-style paths (``L['self'].layers[0]``) read as plain qualified names
(``layers.0``). Used by the cost analysis, the partitioner's layer labels, export and the CLI.
"""

from __future__ import annotations

import re

import torch
import torch.fx

__all__ = ["has_meta_state", "module_of", "module_paths", "qualified_name", "stack_paths"]


def qualified_name(path: str) -> str:
    """A module-stack path as a plain qualified name: ``"L['self'].layers[0]"`` -> ``"layers.0"``."""
    path = path.removeprefix("L['self']").removeprefix("L__self__").lstrip(".")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.lstrip(".")


def stack_paths(node: torch.fx.Node) -> tuple[str, ...]:
    """The qualified names of the modules on ``node``'s module stack, outermost first (root left out)."""
    paths: list[str] = []
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = qualified_name(value[0] if isinstance(value, tuple) else str(value))
        if path and path not in paths:
            paths.append(path)
    return tuple(paths)


def module_paths(node: torch.fx.Node) -> tuple[str, ...]:
    """The modules enclosing ``node``, outermost first, ending with the module a ``call_module`` node calls."""
    paths = stack_paths(node)
    if node.op == "call_module" and str(node.target) not in paths:
        paths += (str(node.target),)
    return paths


def module_of(node: torch.fx.Node) -> str:
    """The innermost module ``node`` belongs to ("" for the root): the called module, the owner of
    an attribute read, else the innermost entry of the module stack."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    paths = stack_paths(node)
    return paths[-1] if paths else ""


def has_meta_state(module: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device (shapes, no values)."""
    return any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])
