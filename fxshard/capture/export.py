"""Capture by non-strict ``torch.export``: the fallback of :func:`fxshard.capture.capture`.

The batch dimension is left symbolic where the model allows it, so that the graph runs on
micro-batches and replica shards; a model with state on ``meta`` is exported as a fake copy on
one real device (:func:`fxshard.capture.propagate.fake_copy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxshard.capture.graph import CapturedGraph, build_root, with_shapes
from fxshard.capture.outputs import output_spec_from_pytree
from fxshard.capture.propagate import fake_copy, propagation_device
from fxshard.errors import CaptureError

__all__ = ["capture_export"]


def capture_export(model: torch.nn.Module, args: tuple, kwargs: dict, reason: str) -> CapturedGraph:
    """Export ``model`` and propagate shapes; ``reason`` says why symbolic_trace was not used."""
    exported, fixed_batch = _export(*_off_meta(model, args, kwargs))
    graph, unlifted = _unlifted_graph(exported)
    call_spec = exported.call_spec
    output_spec = output_spec_from_pytree(graph, call_spec.out_spec)
    graph.lint()
    gm = torch.fx.GraphModule(build_root(graph, model, unlifted), graph, class_name=type(model).__name__)
    input_names = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    flatten = _pytree_flattener(call_spec.in_spec, len(input_names), type(model).__name__)
    captured = with_shapes(gm, model, method="export", input_names=input_names, output_spec=output_spec,
                           flatten=flatten, flat_inputs=flatten(args, kwargs), reason=reason,
                           stack_trace=lambda node: node.stack_trace)
    return dataclasses.replace(captured, fixed_batch=fixed_batch) if fixed_batch else captured


def _off_meta(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.nn.Module, tuple, dict]:
    """A fake copy on one real device of a model or inputs on meta: cheaper to export than on
    meta, and the graph's device constants agree with fake propagation's; else them as they are."""
    state = list(model.parameters()) + list(model.buffers())
    if not any(t.device.type == "meta" for t in state + pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)):
        return model, args, kwargs
    device = propagation_device(model, pytree.tree_leaves((args, kwargs)))
    try:
        copied, (args, kwargs) = fake_copy(model, (args, kwargs), device)
    except Exception:  # noqa: BLE001 - a model that does not deep-copy is exported as it is
        return model, args, kwargs
    return copied, args, kwargs


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, int | None]:
    """The exported program, and the batch size it is fixed to (None when it is not)."""
    batch = _example_batch(args, kwargs)
    exported = None
    if batch is not None and batch > 1:
        shapes = torch.export.ShapesCollection()
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
                shapes[t] = {0: torch.export.Dim.AUTO}
        try:
            with _no_stderr():
                exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception:  # noqa: BLE001 - a model that refuses a symbolic batch is exported static
            exported = None
    if exported is None:
        with _no_stderr():
            exported = torch.export.export(model, args, kwargs, strict=False)
    return exported, _fixed_batch(exported, batch)


def _fixed_batch(exported: Any, batch: int | None) -> int | None:
    """``batch`` when the model specialised on its batch size, else None."""
    if batch is None or batch <= 1:
        return None
    user_inputs = set(exported.graph_signature.user_inputs)
    for node in exported.graph.nodes:
        val = node.meta.get("val")
        if (node.op == "placeholder" and node.name in user_inputs and isinstance(val, torch.Tensor)
                and val.dim() > 0 and not _is_symbolic(val.shape[0]) and val.shape[0] == batch):
            return batch
    return None


def _unlifted_graph(exported: Any) -> tuple[torch.fx.Graph, torch.nn.Module]:
    """A copy of the unlifted module's graph (parameters as attributes again), and that module."""
    unlifted = exported.module()
    graph = torch.fx.Graph()
    out = graph.graph_copy(unlifted.graph, {})
    graph.output(out)
    for node in list(graph.nodes):
        # export's input-guard check is a module of the unlifted wrapper, not of the model.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return graph, unlifted


def _example_batch(args: Any, kwargs: Mapping[str, Any] | None = None) -> int | None:
    """The first dimension of the first tensor among the inputs (None when none has one)."""
    for leaf in pytree.tree_leaves((args, dict(kwargs or {}))):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _is_symbolic(size: Any) -> bool:
    """A size export kept symbolic (a SymInt with free symbols; a specialised one has none)."""
    if not isinstance(size, torch.SymInt):
        return False
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return bool(free_symbols(size))


def _no_stderr() -> contextlib.AbstractContextManager:
    """torch.export prints the partial graph to sys.stderr when it fails; capture's own error
    says what failed and where, so that print is held back."""
    return contextlib.redirect_stderr(io.StringIO())


def _pytree_flattener(in_spec: Any, num_inputs: int, model_name: str) -> Callable:
    def flatten(args: tuple, kwargs: dict) -> list:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != in_spec:
            raise CaptureError(f"inputs have structure {spec}, but {model_name} was captured with "
                               f"{in_spec}; call it with the same argument structure as the example")
        return leaves[:num_inputs]

    return flatten
