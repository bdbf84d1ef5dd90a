"""The captured graph: :class:`CapturedGraph`, and how a traced fx graph becomes one.

A traced graph is given the user's own parameters and buffers (:func:`build_root`) and then
shapes, by fake-tensor propagation (:func:`with_shapes`, :mod:`fxshard.capture.propagate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fxshard.capture.diagnose import data_dependence, source_line
from fxshard.capture.outputs import OutputSpec
from fxshard.capture.propagate import ValueProp, fakeify, propagation_device
from fxshard.errors import CaptureError

__all__ = ["CapturedGraph", "build_root", "node_values", "target_name", "with_shapes"]


@dataclasses.dataclass(frozen=True, eq=False)
class CapturedGraph:
    """An fx graph of a model, with shapes, that owns the model's parameters.

    Attributes:
        gm: the graph; one placeholder per flat input, returns a flat tuple. Every node has
            ``meta["val"]`` (fake tensors, or plain values) and ``meta["tensor_meta"]``.
        method: ``"symbolic_trace"`` or ``"export"``.
        model_name: the model's class name.
        input_names: placeholder names, in call order.
        output_spec: rebuilds the model's output structure from the flat outputs.
        fake_mode: the FakeTensorMode the shapes were computed in.
        fake_module: a fake-tensor copy of ``gm`` (for cost models that re-run nodes).
        param_names: ``id(tensor) -> canonical name`` for every parameter and buffer of the
            model (a tensor reachable under two names keeps its first name).
        fallback_reason: why symbolic_trace was not used, when ``method == "export"``.
        state_names: the keys of the model's ``state_dict()`` (what a checkpoint holds).
        fixed_batch: the batch size the graph only runs at, when torch.export had to
            specialise on it (the model branches on its batch size); None when the graph runs
            at any batch size, so on micro-batches and replica shards.
    """

    gm: torch.fx.GraphModule
    method: str
    model_name: str
    input_names: tuple[str, ...]
    output_spec: OutputSpec
    fake_mode: FakeTensorMode
    fake_module: torch.fx.GraphModule
    param_names: Mapping[int, str]
    flatten_inputs: Callable[[tuple, dict], list]
    fallback_reason: str = ""
    state_names: frozenset[str] = frozenset()
    fixed_batch: int | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the captured graph eagerly; returns what the model returns."""
        flat = self.gm(*self.flatten_inputs(args, kwargs))
        return self.output_spec.rebuild(flat)

    @property
    def nodes(self) -> list[torch.fx.Node]:
        """The graph's nodes in topological order."""
        return list(self.gm.graph.nodes)

    def fingerprint(self) -> str:
        """A stable hash of the graph's structure, shapes and dtypes."""
        h = hashlib.sha256()
        for node in self.gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            shape = (tuple(meta.shape), str(meta.dtype)) if hasattr(meta, "shape") else None
            args = [a.name for a in node.all_input_nodes]
            h.update(repr((node.name, node.op, target_name(node), args, shape)).encode())
        return h.hexdigest()[:16]


def target_name(node: torch.fx.Node) -> str:
    """A node's target as text: the attribute path, or the callable's qualified name."""
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def node_values(node: torch.fx.Node) -> list[torch.Tensor]:
    """The tensors a node produces (its ``meta["val"]``, flattened)."""
    return [v for v in pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)]


def build_root(graph: torch.fx.Graph, model: torch.nn.Module,
               extra: torch.nn.Module | None) -> dict[str, Any]:
    """Map every attribute the graph uses to the user's own object where it has one."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        try:
            root[node.target] = operator.attrgetter(node.target)(model)
        except AttributeError:
            if extra is None:
                raise
            # Constants that export lifted out of the code (e.g. _tensor_constant0); fake ones
            # (from exporting a fake copy of a meta model) stay shapes only, on meta.
            value = operator.attrgetter(node.target)(extra)
            if isinstance(value, FakeTensor):
                value = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            root[node.target] = value
    return root


def _canonical_names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    return names


def with_shapes(gm: torch.fx.GraphModule, model: torch.nn.Module, *, method: str,
                input_names: tuple[str, ...], output_spec: OutputSpec, flatten: Callable,
                flat_inputs: list, reason: str,
                stack_trace: Callable[[torch.fx.Node], str | None]) -> CapturedGraph:
    """Propagate fake tensors through ``gm`` and return the :class:`CapturedGraph`.

    Raises:
        CaptureError: propagation failed; names the model's line and, for code that reads
            tensor values, the way around it.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = propagation_device(model, flat_inputs)
    prop = ValueProp(gm, fake_mode, device)
    try:
        prop.run(*fakeify(flat_inputs, fake_mode, device))
    except CaptureError as e:
        name = type(model).__name__
        failed = prop.failed
        line = source_line(stack_trace=stack_trace(failed)) if failed is not None else None
        at = f" at {line}" if line else ""
        cause = data_dependence(e, target=target_name(failed) if failed is not None else "", line=line)
        if cause:
            raise CaptureError(f"cannot capture {name}{at}: {cause} ({method}: {e})") from e
        raise CaptureError(f"{name} ({method}){at}: {str(e).rstrip('.')}. Check that the example inputs have the shapes and "
                           f"dtypes the model expects") from e
    return CapturedGraph(gm=gm, method=method, model_name=type(model).__name__,
                         input_names=input_names, output_spec=output_spec, fake_mode=fake_mode,
                         fake_module=prop.fake_module, param_names=_canonical_names(model),
                         flatten_inputs=flatten, fallback_reason=reason,
                         state_names=frozenset(model.state_dict(keep_vars=True)))
