"""Device-independent work of every node: FLOPs, bytes moved, parameters, saved activations.

Each node is re-run alone on fake tensors (no compute, no memory) under
``torch.utils.flop_counter.FlopCounterMode``: once forward, once backward with
``torch.autograd.grad``. Saved-for-backward tensors are seen through
``torch.autograd.graph.saved_tensors_hooks``. Nothing here knows about devices; the cost
models turn this work into time (docs/cost_models.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fxshard.capture import CapturedGraph, node_values
from fxshard.cost_models.conv_workspace import ConvWorkspace, conv_backward_workspace, onednn_float32_convolution
from fxshard.errors import CostModelError
from fxshard.modules import module_of

__all__ = ["NodeWork", "analyze", "conv_backward_workspace", "onednn_float32_convolution", "scale_batch",
           "tensor_bytes"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeWork:
    """What one fx node does, independent of the device it runs on.

    Attributes:
        name, op, target: the fx node's name, opcode and target (as text).
        module: the qualified name of the module the node belongs to ("" at top level).
        dtype: the dtype that sets the node's compute rate (its widest floating input).
        fwd_flops, bwd_flops: floating-point operations forward and backward.
        fwd_bytes, bwd_bytes: bytes read plus written by the node's kernels.
        fwd_kernels, bwd_kernels: kernel launches (0 for views, getitem, placeholders).
        params, param_sizes: canonical names and bytes of the parameters the node holds
            directly (a parameter reachable under two names has its first name).
        buffers, buffer_sizes: the same for buffers (and constant tensors).
        param_bytes, buffer_bytes: their sums.
        output_bytes: bytes of the node's output tensors (what an edge out of it carries).
        saved_bytes: bytes of intermediate tensors the node saves for backward (neither its
            inputs nor its outputs, e.g. BatchNorm's batch statistics, max-pool indices).
        saved_values: names of nodes whose outputs this node saves for backward, its own
            name included when it saves its output (a ReLU does); each output counts once
            in a graph's total however many nodes save it.
        flop_ops: the aten operators that carry the forward FLOPs (e.g. "aten.mm").
        is_view: the outputs alias the inputs (no data moves).
        view_of: for a view, the input node whose storage it shares.
        requires_grad: some output takes part in backward.
        backward_workspace_bytes: bytes the node's backward kernels hold beyond the gradients
            they return, alive only while that backward runs (a transient, not an activation):
            on the CPU, oneDNN's copies of a convolution's tensors in its blocked layout
            (:func:`conv_backward_workspace`). 0 for operators where none was measured.
    """

    name: str
    op: str
    target: str
    module: str = ""
    dtype: str = "float32"
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_bytes: int = 0
    bwd_bytes: int = 0
    fwd_kernels: int = 0
    bwd_kernels: int = 0
    params: tuple[str, ...] = ()
    param_sizes: tuple[int, ...] = ()
    buffers: tuple[str, ...] = ()
    buffer_sizes: tuple[int, ...] = ()
    param_bytes: int = 0
    buffer_bytes: int = 0
    output_bytes: int = 0
    saved_bytes: int = 0
    saved_values: tuple[str, ...] = ()
    flop_ops: tuple[str, ...] = ()
    is_view: bool = False
    view_of: str = ""
    requires_grad: bool = False
    backward_workspace_bytes: int = 0


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (its view, not its whole storage)."""
    return t.numel() * t.element_size()


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any,
                             out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels; the CPU one gets the same formula.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)


def _held_tensors(node: torch.fx.Node, gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """(attribute path, real tensor) for parameters and buffers a node holds directly."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        prefix = f"{node.target}."
        return ([(prefix + n, t) for n, t in mod.named_parameters()]
                + [(prefix + n, t) for n, t in mod.named_buffers()])
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor):
            return [(str(node.target), value)]
    return []


class _NodeRunner(torch.fx.Interpreter):
    """Runs single nodes of the fake module with given fake inputs."""

    def run_one(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        self.env = env
        return self.run_node(node)


def _detach(value: Any) -> Any:
    def go(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            d = v.detach()
            if v.requires_grad and (v.is_floating_point() or v.is_complex()):
                d.requires_grad_(True)
            return d
        return v

    return pytree.tree_map(go, value)


def _nonleaf(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v, value)


def _dtype_of(tensors: list[torch.Tensor]) -> str:
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return str(tensors[0].dtype).removeprefix("torch.") if tensors else "float32"
    widest = max(floats, key=lambda t: t.element_size())
    return str(widest.dtype).removeprefix("torch.")


def analyze(captured: CapturedGraph) -> list[NodeWork]:
    """Return the work of every node of ``captured``, in graph order.

    Raises:
        CostModelError: a node cannot be re-run on fake tensors (the node is named).
    """
    runner = _NodeRunner(captured.fake_module)
    real_nodes = list(captured.gm.graph.nodes)
    fake_nodes = list(captured.fake_module.graph.nodes)
    fake_state = {id(t) for t in captured.fake_module.parameters()}
    fake_state |= {id(t) for t in captured.fake_module.buffers()}
    works = []
    # The 80 identical layers of a decoder repeat the same nodes with other names: each
    # distinct (operator, module shape, input shapes) is run once and its figures reused.
    memo: dict[str, tuple[dict, tuple, tuple]] = {}
    for real, fake in zip(real_nodes, fake_nodes):
        try:
            key = _signature(fake, captured) if real.op not in ("placeholder", "get_attr", "output") else None
            if key is not None and key in memo:
                works.append(_reuse(real, fake, captured, *memo[key]))
                continue
            work = _analyze_node(real, fake, captured, runner, fake_state)
            if key is not None:
                memo[key] = _template(work, real, fake)
            works.append(work)
        except CostModelError:
            raise
        except Exception as e:
            raise CostModelError(f"cannot analyse node {real.name!r} ({real.format_node()}): "
                                 f"{type(e).__name__}: {e}") from e
    return works


_NAMED = ("saved_values", "view_of")


def _val_signature(value: Any) -> Any:
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype), v.requires_grad)
        return v

    return pytree.tree_map(sig, value)


def _signature(fake: torch.fx.Node, captured: CapturedGraph) -> str:
    """What a node's figures depend on: its operator (and module's shape), its inputs' shapes."""
    position = {n: i for i, n in enumerate(fake.all_input_nodes)}
    args = torch.fx.node.map_arg((fake.args, fake.kwargs), lambda n: (
        "N", position[n], n.op == "get_attr", _val_signature(n.meta.get("val"))))
    if fake.op == "call_module":
        sub = captured.fake_module.get_submodule(fake.target)
        state = tuple((n, tuple(t.shape), str(t.dtype), t.requires_grad)
                      for n, t in list(sub.named_parameters()) + list(sub.named_buffers()))
        what: Any = (type(sub).__qualname__, type(sub).__module__, sub.extra_repr(), sub.training, state)
    else:
        target = fake.target if isinstance(fake.target, str) else (
            getattr(fake.target, "__module__", ""), getattr(fake.target, "__qualname__", repr(fake.target)))
        what = (fake.op, target)
    return repr((what, args))


def _template(work: NodeWork, real: torch.fx.Node, fake: torch.fx.Node) -> tuple[dict, tuple, tuple]:
    """A node's figures with its names turned into input positions, for reuse."""
    names = [n.name for n in fake.all_input_nodes]
    fields = {f.name: getattr(work, f.name) for f in dataclasses.fields(NodeWork)
              if f.name not in _NAMED and f.name not in _BASE}
    saved = tuple(("self",) if v == real.name else ("in", names.index(v)) for v in work.saved_values)
    view = ("in", names.index(work.view_of)) if work.view_of else ()
    return fields, saved, view


def _reuse(real: torch.fx.Node, fake: torch.fx.Node, captured: CapturedGraph, fields: dict, saved: tuple,
           view: tuple) -> NodeWork:
    names = [n.name for n in fake.all_input_nodes]
    saved_values = tuple(real.name if ref[0] == "self" else names[ref[1]] for ref in saved)
    return NodeWork(**_base(real, captured), **fields, saved_values=saved_values,
                    view_of=names[view[1]] if view else "")


_BASE = ("name", "op", "target", "module", "params", "param_sizes", "buffers", "buffer_sizes", "param_bytes",
         "buffer_bytes", "output_bytes", "requires_grad")


def _base(real: torch.fx.Node, captured: CapturedGraph) -> dict:
    """The figures of a node that need no execution: names, held tensors, output size."""
    params: dict[str, int] = {}
    buffers: dict[str, int] = {}
    for path, t in _held_tensors(real, captured.gm):
        table = params if isinstance(t, torch.nn.Parameter) else buffers
        table.setdefault(captured.param_names.get(id(t), path), tensor_bytes(t))
    outputs = node_values(real)
    return dict(name=real.name, op=real.op, target=_target_text(real), module=module_of(real),
                params=tuple(params), param_sizes=tuple(params.values()),
                buffers=tuple(buffers), buffer_sizes=tuple(buffers.values()),
                param_bytes=sum(params.values()), buffer_bytes=sum(buffers.values()),
                output_bytes=_unique_bytes(outputs),
                requires_grad=any(t.requires_grad for t in outputs))


@dataclasses.dataclass
class _Inputs:
    """A node's fake inputs (non-leaf copies of its producers' values), their tensors, the leaves
    gradients are taken with respect to, and each tensor's producer (by ``id``)."""

    values: dict[torch.fx.Node, Any]
    tensors: list[torch.Tensor]
    leaves: list[torch.Tensor]
    owner: dict[int, str]


def _node_inputs(fake: torch.fx.Node, captured: CapturedGraph) -> _Inputs:
    leaves = {n: _detach(n.meta.get("val")) for n in fake.all_input_nodes}
    # The node sees non-leaf copies of its inputs, as in the real graph, so in-place ops
    # (x += residual) run; gradients are taken with respect to the leaves behind them.
    with captured.fake_mode:
        inputs = {n: _nonleaf(v) for n, v in leaves.items()}
    found = _Inputs(values=inputs, tensors=[], leaves=[], owner={})
    for n in inputs:
        for t, leaf in zip(pytree.tree_leaves(inputs[n]), pytree.tree_leaves(leaves[n])):
            if isinstance(t, torch.Tensor):
                found.tensors.append(t)
                found.leaves.append(leaf)
                found.owner[id(t)] = n.name
    return found


@dataclasses.dataclass
class _Run:
    """One fake forward and backward of a node: what autograd saved, the outputs, the tensors
    backward ran from and to, and the FLOPs counted."""

    saved: list[torch.Tensor]
    outputs: list[torch.Tensor]
    grad_outs: list[torch.Tensor]
    wrt: list[torch.Tensor]
    fwd_flops: int
    flop_ops: tuple[str, ...]
    bwd_flops: int
    workspace: int


def _run_node(fake: torch.fx.Node, captured: CapturedGraph, runner: _NodeRunner, ins: _Inputs,
              module_state: list[torch.Tensor]) -> _Run:
    saved: list[torch.Tensor] = []
    with captured.fake_mode:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with _counter() as fwd_counter:
                result = runner.run_one(fake, dict(ins.values))
        out_tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        grad_outs = [t for t in out_tensors if t.requires_grad and t.grad_fn is not None]
        wrt = [t for t in ins.leaves + [p for p in module_state if p.requires_grad] if t.requires_grad]
        bwd_flops = 0
        workspace = ConvWorkspace()
        if grad_outs and wrt:
            with _counter() as bwd_counter, workspace:
                torch.autograd.grad(grad_outs, wrt, [torch.ones_like(t) for t in grad_outs],
                                    allow_unused=True)
            bwd_flops = bwd_counter.get_total_flops()
    flop_ops = tuple(sorted(str(op) for op, n in fwd_counter.get_flop_counts().get("Global", {}).items() if n))
    return _Run(saved=saved, outputs=out_tensors, grad_outs=grad_outs, wrt=wrt,
                fwd_flops=fwd_counter.get_total_flops(), flop_ops=flop_ops, bwd_flops=bwd_flops,
                workspace=workspace.bytes)


def _saved_activations(real: torch.fx.Node, fake: torch.fx.Node, ins: _Inputs, run: _Run,
                       module_state: list[torch.Tensor], fake_state: set[int]) -> tuple[tuple[str, ...], int]:
    """The values whose tensors backward keeps (inputs' producers, or the node itself), and the
    bytes of the tensors it saves that are no node's value."""
    state_ids = fake_state | {id(t) for t in module_state}
    state_storages = {t.untyped_storage()._cdata for t in module_state}
    new_saved: list[torch.Tensor] = []
    saved_values: dict[str, None] = {}
    input_storages = {t.untyped_storage()._cdata: ins.owner[id(t)] for t in ins.tensors}
    attr_inputs = {n.name for n in fake.all_input_nodes if n.op == "get_attr"}
    out_storages = {t.untyped_storage()._cdata for t in run.outputs}
    for t in run.saved:
        storage = t.untyped_storage()._cdata
        if id(t) in state_ids or storage in state_storages:
            continue  # parameters are counted as parameter memory, not activations
        src = ins.owner.get(id(t)) or input_storages.get(storage)
        if src is not None:
            if src not in attr_inputs:
                saved_values[src] = None
        elif storage in out_storages:
            saved_values[real.name] = None
        else:
            new_saved.append(t)
    return tuple(saved_values), _unique_bytes(new_saved)


def _analyze_node(real: torch.fx.Node, fake: torch.fx.Node, captured: CapturedGraph,
                  runner: _NodeRunner, fake_state: set[int]) -> NodeWork:
    base = _base(real, captured)
    outputs = node_values(real)
    if real.op in ("placeholder", "get_attr", "output"):
        return NodeWork(**base, dtype=_dtype_of(outputs))
    ins = _node_inputs(fake, captured)
    module_state: list[torch.Tensor] = []
    if fake.op == "call_module":
        sub = captured.fake_module.get_submodule(fake.target)
        module_state = list(sub.parameters()) + list(sub.buffers())
    run = _run_node(fake, captured, runner, ins, module_state)
    out_tensors = run.outputs
    is_view = bool(out_tensors) and all(
        any(torch._C._is_alias_of(o, i) for i in ins.tensors + module_state) for o in out_tensors)
    view_of = next((ins.owner[id(i)] for i in ins.tensors if torch._C._is_alias_of(out_tensors[0], i)),
                   "") if is_view else ""
    saved_values, new_saved_bytes = _saved_activations(real, fake, ins, run, module_state, fake_state)
    read_bytes = _unique_bytes(ins.tensors + module_state)
    out_bytes = base["output_bytes"]
    no_backward = is_view or not run.grad_outs
    kernels = 0 if is_view or not out_tensors else 1
    return NodeWork(
        **base,
        dtype=_dtype_of(ins.tensors + module_state or out_tensors),
        fwd_flops=run.fwd_flops, bwd_flops=run.bwd_flops,
        fwd_bytes=0 if is_view else read_bytes + out_bytes,
        bwd_bytes=0 if no_backward else out_bytes + _unique_bytes(run.saved) + _unique_bytes(run.wrt),
        fwd_kernels=kernels, bwd_kernels=0 if no_backward else max(1, len(run.wrt)),
        saved_bytes=new_saved_bytes, saved_values=saved_values,
        flop_ops=run.flop_ops, is_view=is_view, view_of=view_of,
        backward_workspace_bytes=0 if no_backward else run.workspace)


def _target_text(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module and module not in ("builtins", "_operator") else name


def scale_batch(works: list[NodeWork], fraction: float) -> list[NodeWork]:
    """The work of the same graph on ``fraction`` of the batch (a micro-batch).

    FLOPs and activation bytes scale with the batch; parameters, buffers and kernel counts
    do not. Exact for the batch-linear operators that dominate models (matmul, convolution,
    attention, elementwise); the planner uses it to price micro-batches without re-capturing.
    """
    if not 0 < fraction <= 1:
        raise CostModelError(f"batch fraction {fraction} must be in (0, 1]")

    def scale(w: NodeWork) -> NodeWork:
        state = w.param_bytes + w.buffer_bytes
        return dataclasses.replace(
            w,
            fwd_flops=round(w.fwd_flops * fraction), bwd_flops=round(w.bwd_flops * fraction),
            fwd_bytes=round(max(w.fwd_bytes - state, 0) * fraction + min(state, w.fwd_bytes)),
            bwd_bytes=round(max(w.bwd_bytes - w.param_bytes, 0) * fraction + min(w.param_bytes, w.bwd_bytes)),
            output_bytes=w.output_bytes if w.op == "get_attr" else round(w.output_bytes * fraction),
            saved_bytes=round(w.saved_bytes * fraction),
            backward_workspace_bytes=round(w.backward_workspace_bytes * fraction))

    return [scale(w) for w in works]
