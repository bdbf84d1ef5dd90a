"""Capture by ``torch.fx`` symbolic tracing: the first way :func:`fxshard.capture.capture` tries.

The graph takes the arguments of ``forward`` by name (bound with its signature) and, once its
output is flattened, holds the user's own submodules, parameters and buffers.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from fxshard.capture.graph import CapturedGraph, build_root, with_shapes
from fxshard.capture.outputs import build_mapping, flatten_output_node
from fxshard.errors import CaptureError

__all__ = ["capture_symbolic"]


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, with user leaf modules and dict subclasses kept typed."""

    def __init__(self, leaf_modules: tuple) -> None:
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, dict) and type(a) is not dict and not dataclasses.is_dataclass(a):
            keys = tuple(a.keys())
            values = tuple(self.create_arg(v) for v in a.values())
            return self.create_node("call_function", build_mapping, (type(a), keys, values), {})
        return super().create_arg(a)


def _signature_flattener(model: torch.nn.Module, input_names: tuple[str, ...]) -> Callable:
    sig = inspect.signature(model.forward)

    def flatten(args: tuple, kwargs: dict) -> list:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise CaptureError(f"inputs do not match {type(model).__name__}.forward{sig}: {e}") from e
        bound.apply_defaults()
        return [bound.arguments[name] for name in input_names]

    return flatten


def capture_symbolic(model: torch.nn.Module, args: tuple, kwargs: dict,
                     leaf_modules: tuple) -> CapturedGraph:
    """Trace ``model`` with symbolic_trace and propagate shapes.

    Raises:
        TypeError: forward takes ``*args`` or ``**kwargs`` (capture falls back to torch.export).
        CaptureError: the inputs do not fit forward, or propagation failed.
    """
    graph = _Tracer(leaf_modules).trace(model)
    output_spec = flatten_output_node(graph)
    input_names = tuple(n.target for n in graph.nodes if n.op == "placeholder")
    if any(n.startswith("*") for n in input_names):
        raise TypeError("forward takes *args or **kwargs, which symbolic_trace cannot name")
    gm = torch.fx.GraphModule(build_root(graph, model, None), graph, class_name=type(model).__name__)
    flatten = _signature_flattener(model, input_names)

    def stack_trace(node: torch.fx.Node) -> str | None:
        # Recording stack traces slows every trace; a failure traces again with them on.
        tracer = _Tracer(leaf_modules)
        tracer.record_stack_traces = True
        again = {n.name: n for n in tracer.trace(model).nodes}
        return again[node.name].stack_trace if node.name in again else None

    return with_shapes(gm, model, method="symbolic_trace", input_names=input_names, output_spec=output_spec,
                       flatten=flatten, flat_inputs=flatten(args, kwargs), reason="", stack_trace=stack_trace)
