"""Capture: a model and example inputs become an fx graph with shapes.

``capture`` traces with ``torch.fx.symbolic_trace`` and falls back to non-strict
``torch.export``. Either way the result is a plain :class:`torch.fx.GraphModule` that
takes one flat positional argument per placeholder, returns a flat tuple, and holds the
user's own ``Parameter`` and buffer objects (so a split of it trains the user's model).
Shapes come from fake-tensor propagation (``torch.fx.passes.shape_prop.ShapeProp`` with a
``FakeTensorMode``): nothing is computed and nothing is allocated, so a model on the
``meta`` device captures too. See docs/architecture.md.

Example::

    graph = capture(model, (tokens,))
    for node in graph.gm.graph.nodes:
        print(node.name, node.meta["tensor_meta"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.immutable_collections import immutable_dict

from fxshard.diagnose import data_dependence, quiet_torch, source_line
from fxshard.errors import CaptureError
from fxshard.propagate import ValueProp, fake_copy, fakeify, first_line, propagation_device

__all__ = ["CapturedGraph", "OutputSpec", "capture", "node_values"]

Method = Literal["auto", "symbolic_trace", "export"]


# ---------------------------------------------------------------------------------------
# Output structure: the captured graph returns a flat tuple; OutputSpec rebuilds the
# model's own structure around it with torch's pytree (tensor, tuple, list, namedtuple,
# dict, dict subclasses such as HF ModelOutput, dataclasses; constants kept aside).
# ---------------------------------------------------------------------------------------


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
        if arg.op == "call_function" and target is _build_mapping:
            typ, keys, values = arg.args
            return _build_mapping(typ, keys, tuple(_model_structure(v) for v in values))
        return arg
    if isinstance(arg, (tuple, list)):
        items = [_model_structure(a) for a in arg]
        # fx stores a returned list as its own read-only list type: give the model's back.
        if isinstance(arg, list) or type(arg) is tuple:
            return items if isinstance(arg, list) else tuple(items)
        return type(arg)(*items)  # namedtuple
    if isinstance(arg, Mapping):
        typ = dict if isinstance(arg, immutable_dict) else type(arg)
        return _build_mapping(typ, tuple(arg.keys()), tuple(_model_structure(v) for v in arg.values()))
    return arg


def _build_mapping(typ: type, keys: tuple, values: tuple) -> Any:
    """Rebuild a dict subclass inside a traced graph (fx would turn it into a plain dict)."""
    out = typ()
    for key, value in zip(keys, values):
        out[key] = value
    return out


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
    return _build_mapping(typ, tuple(keys), tuple(values))


# ---------------------------------------------------------------------------------------
# The captured graph
# ---------------------------------------------------------------------------------------


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
            h.update(repr((node.name, node.op, _target_name(node), args, shape)).encode())
        return h.hexdigest()[:16]


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def node_values(node: torch.fx.Node) -> list[torch.Tensor]:
    """The tensors a node produces (its ``meta["val"]``, flattened)."""
    return [v for v in pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------


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
            return self.create_node("call_function", _build_mapping, (type(a), keys, values), {})
        return super().create_arg(a)


def _trace_symbolic(model: torch.nn.Module, leaf_modules: tuple) -> torch.fx.Graph:
    return _Tracer(leaf_modules).trace(model)


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


def _trace_export(model: torch.nn.Module, args: tuple,
                  kwargs: dict) -> tuple[torch.fx.Graph, torch.nn.Module, Any, int | None]:
    """Export with the batch dimension left symbolic where the model allows it, so that the
    graph runs on micro-batches and replica shards; returns the graph, the unlifted module,
    the call spec and the batch size the graph is fixed to (None when it is not)."""
    state = list(model.parameters()) + list(model.buffers())
    if any(t.device.type == "meta" for t in state + pytree.tree_leaves((args, kwargs))
           if isinstance(t, torch.Tensor)):
        # Export a fake copy on one real device (propagate.fake_copy): cheaper than on meta,
        # and the graph's device constants agree with fake propagation's.
        device = propagation_device(model, pytree.tree_leaves((args, kwargs)))
        try:
            copied = fake_copy(model, (args, kwargs), device)
        except Exception:  # noqa: BLE001 - a model that does not deep-copy is exported as it is
            copied = None
        if copied is not None:
            model, (args, kwargs) = copied
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
    fixed = None
    if batch is not None and batch > 1:
        user_inputs = set(exported.graph_signature.user_inputs)
        for node in exported.graph.nodes:
            val = node.meta.get("val")
            if (node.op == "placeholder" and node.name in user_inputs and isinstance(val, torch.Tensor)
                    and val.dim() > 0 and not _is_symbolic(val.shape[0]) and val.shape[0] == batch):
                fixed = batch  # the model specialised on its batch size
    unlifted = exported.module()
    graph = torch.fx.Graph()
    out = graph.graph_copy(unlifted.graph, {})
    graph.output(out)
    for node in list(graph.nodes):
        # export's input-guard check is a module of the unlifted wrapper, not of the model.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return graph, unlifted, exported.call_spec, fixed


def _no_stderr() -> contextlib.AbstractContextManager:
    """torch.export prints the partial graph to sys.stderr when it fails; capture's own error
    says what failed and where, so that print is held back."""
    return contextlib.redirect_stderr(io.StringIO())


def _flatten_output_node(graph: torch.fx.Graph) -> OutputSpec:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves, spec = _flatten_structure(_model_structure(output.args[0]))
    output.args = (tuple(x for x in leaves if isinstance(x, torch.fx.Node)),)
    _erase_unused_constructors(graph)
    return OutputSpec(spec, {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.fx.Node)})


def _erase_unused_constructors(graph: torch.fx.Graph) -> None:
    # Only the structure-building nodes the output flattening made dead; nothing else is
    # removed (an unused in-place update of a buffer must stay).
    for node in reversed(list(graph.nodes)):
        if (node.op == "call_function" and not node.users
                and (node.target is _build_mapping
                     or (isinstance(node.target, type) and dataclasses.is_dataclass(node.target)))):
            graph.erase_node(node)


def _output_spec_from_pytree(graph: torch.fx.Graph, out_spec: pytree.TreeSpec) -> OutputSpec:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    output.args = (tuple(leaves),)
    return OutputSpec(out_spec)


def _build_root(graph: torch.fx.Graph, model: torch.nn.Module,
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


def _pytree_flattener(in_spec: Any, num_inputs: int, model_name: str) -> Callable:
    def flatten(args: tuple, kwargs: dict) -> list:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != in_spec:
            raise CaptureError(f"inputs have structure {spec}, but {model_name} was captured with "
                               f"{in_spec}; call it with the same argument structure as the example")
        return leaves[:num_inputs]

    return flatten


def _canonical_names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    return names


def capture(model: torch.nn.Module, example_inputs: tuple | Mapping[str, Any] | Any = (),
            *, example_kwargs: Mapping[str, Any] | None = None, method: Method = "auto",
            leaf_modules: Iterable[type | str] = ()) -> CapturedGraph:
    """Trace ``model`` into a flat fx graph with shapes, without running it for real.

    Args:
        model: the module; on a real device or on ``meta``. It is never mutated.
        example_inputs: positional inputs (a tuple; a single tensor is accepted), or a dict
            of keyword inputs.
        example_kwargs: keyword inputs, besides positional ones.
        method: ``"auto"`` (symbolic_trace, then torch.export), or force one of them.
        leaf_modules: module types or qualified names to keep as single nodes.

    Returns:
        A :class:`CapturedGraph`.

    Raises:
        CaptureError: the model cannot be traced (both reasons are given for ``auto``), or
            the example inputs do not fit the model; the message names the model's failing
            line and, for code that depends on tensor values, the way around it. torch's
            logging and warnings are held back while capture runs (docs/robustness.md).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    if method not in ("auto", "symbolic_trace", "export"):
        raise CaptureError(f"method={method!r} is unknown; use 'auto', 'symbolic_trace' or 'export'")
    args, kwargs = _split_inputs(example_inputs, example_kwargs)
    with quiet_torch():
        return _capture(model, args, kwargs, method, tuple(leaf_modules))


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, method: Method,
             leaf_modules: tuple) -> CapturedGraph:
    name = type(model).__name__
    reasons: dict[str, str] = {}
    errors: list[BaseException] = []
    if method in ("auto", "symbolic_trace"):
        try:
            with _state_guard(model):
                return _finish_symbolic(model, args, kwargs, leaf_modules)
        except CaptureError:
            raise
        except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError...
            reasons["symbolic_trace"] = f"{type(e).__name__}: {first_line(e)}"
            errors.append(e)
            if method == "symbolic_trace":
                line = source_line(e)
                raise CaptureError(
                    f"torch.fx.symbolic_trace failed on {name}"
                    f"{f' at {line}' if line else ''}: {reasons['symbolic_trace']}. "
                    f"Try method='export', or mark the failing submodule as a leaf with "
                    f"leaf_modules=(ItsClass,)") from e
    try:
        return _finish_export(model, args, kwargs, reasons.get("symbolic_trace", ""))
    except CaptureError:
        raise
    except Exception as e:
        reasons["torch.export"] = f"{type(e).__name__}: {first_line(e)}"
        detail = "; ".join(f"{k} failed with {v}" for k, v in reasons.items())
        cache = re.search(r"<class '([\w.]*Cache)'>", str(e))
        if cache:
            raise CaptureError(
                f"cannot capture {name}: it returns a key/value cache ({cache.group(1).rsplit('.', 1)[-1]}), which "
                f"a pipeline does not carry between steps. Pass use_cache=False with the inputs, or set "
                f"model.config.use_cache = False ({detail})") from e
        # torch.export ran forward as Python, so its traceback holds the model's failing line.
        line = source_line(e) or next((x for x in map(source_line, errors) if x), None)
        cause = data_dependence(e, line=line)
        if cause:
            raise CaptureError(f"cannot capture {name}{f' at {line}' if line else ''}: {cause} ({detail})") from e
        raise CaptureError(
            f"cannot capture {name}{f' (failing at {line})' if line else ''}: {detail}. Ways out: make "
            f"data-dependent control flow depend on shapes only or use torch.cond; mark untraceable submodules "
            f"with leaf_modules=(...); for Hugging Face-style models pass use_cache=False and "
            f"return_dict=True in the config; pass example inputs of the real types") from e


class _StateMutated(RuntimeError):
    """symbolic_trace ran an in-place update of the model's state as plain Python."""


@contextlib.contextmanager
def _state_guard(model: torch.nn.Module) -> Iterator[None]:
    """symbolic_trace runs ``self.buf += 1`` or ``self.ema.mul_(...)`` on the real tensors,
    once, and leaves the update out of the graph. Undo such an update and refuse the graph
    (capture then falls back to torch.export, which records state updates in the graph)."""
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    versions = {name: t._version for name, t in state.items()}
    saved = {name: b.detach().clone() for name, b in model.named_buffers(remove_duplicate=False)
             if b.device.type != "meta"}
    try:
        yield
    finally:
        changed = sorted(name for name, t in state.items() if t._version != versions[name])
        with torch.no_grad():
            for name in changed:
                if name in saved:
                    state[name].copy_(saved[name])
    if changed:
        restored = [n for n in changed if n in saved or state[n].device.type == "meta"]
        lost = [n for n in changed if n not in restored]
        if lost:
            raise CaptureError(f"tracing {type(model).__name__} changed its parameters {lost[:3]} in place, outside "
                               f"torch.no_grad() bookkeeping fxshard can undo; move that update out of forward")
        raise _StateMutated(f"forward updates {', '.join(changed[:3])} in place, which symbolic_trace runs once "
                            f"instead of recording")


def _split_inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, list):
        return tuple(example_inputs), kwargs
    if not isinstance(example_inputs, tuple):
        return (example_inputs,), kwargs
    return example_inputs, kwargs


def _finish_symbolic(model: torch.nn.Module, args: tuple, kwargs: dict,
                     leaf_modules: tuple) -> CapturedGraph:
    graph = _trace_symbolic(model, leaf_modules)
    output_spec = _flatten_output_node(graph)
    input_names = tuple(n.target for n in graph.nodes if n.op == "placeholder")
    if any(n.startswith("*") for n in input_names):
        raise TypeError("forward takes *args or **kwargs, which symbolic_trace cannot name")
    gm = torch.fx.GraphModule(_build_root(graph, model, None), graph, class_name=type(model).__name__)
    flatten = _signature_flattener(model, input_names)
    flat_inputs = flatten(args, kwargs)

    def stack_trace(node: torch.fx.Node) -> str | None:
        # Recording stack traces slows every trace; a failure traces again with them on.
        tracer = _Tracer(leaf_modules)
        tracer.record_stack_traces = True
        again = {n.name: n for n in tracer.trace(model).nodes}
        return again[node.name].stack_trace if node.name in again else None

    return _propagate(gm, model, "symbolic_trace", input_names, output_spec, flatten, flat_inputs, "", stack_trace)


def _finish_export(model: torch.nn.Module, args: tuple, kwargs: dict, reason: str) -> CapturedGraph:
    graph, unlifted, call_spec, fixed_batch = _trace_export(model, args, kwargs)
    output_spec = _output_spec_from_pytree(graph, call_spec.out_spec)
    graph.lint()
    gm = torch.fx.GraphModule(_build_root(graph, model, unlifted), graph, class_name=type(model).__name__)
    input_names = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    flatten = _pytree_flattener(call_spec.in_spec, len(input_names), type(model).__name__)
    flat_inputs = flatten(args, kwargs)
    captured = _propagate(gm, model, "export", input_names, output_spec, flatten, flat_inputs, reason,
                          lambda node: node.stack_trace)
    return dataclasses.replace(captured, fixed_batch=fixed_batch) if fixed_batch else captured


def _propagate(gm: torch.fx.GraphModule, model: torch.nn.Module, method: str,
               input_names: tuple[str, ...], output_spec: OutputSpec, flatten: Callable,
               flat_inputs: list, reason: str,
               stack_trace: Callable[[torch.fx.Node], str | None]) -> CapturedGraph:
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
        cause = data_dependence(e, target=_target_name(failed) if failed is not None else "", line=line)
        if cause:
            raise CaptureError(f"cannot capture {name}{at}: {cause} ({method}: {e})") from e
        raise CaptureError(f"{name} ({method}){at}: {str(e).rstrip('.')}. Check that the example inputs have the shapes and "
                           f"dtypes the model expects") from e
    return CapturedGraph(gm=gm, method=method, model_name=type(model).__name__,
                         input_names=input_names, output_spec=output_spec, fake_mode=fake_mode,
                         fake_module=prop.fake_module, param_names=_canonical_names(model),
                         flatten_inputs=flatten, fallback_reason=reason,
                         state_names=frozenset(model.state_dict(keep_vars=True)))
