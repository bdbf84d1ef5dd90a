"""Time a captured graph as it runs: segment by segment, forward and backward, at the micro-batch.

The graph is cut into segments: each numbered block (``h.3``, ``layers.17``: the outermost
module on a node's stack whose name ends in an index, as a ``ModuleList`` or ``Sequential``
numbers its children) and the runs of nodes between blocks. Each segment becomes its own
``GraphModule`` with a private copy of its parameters (materialised when the model is on
``meta``) and runs as a training step does (a fresh forward, then backward, gradients set to
None before each), on real values: the graph's inputs are random tensors of the captured
shapes cut to the micro-batch, and each segment's inputs are the previous segments' outputs,
so every shape is the one the plan runs.
Structurally identical segments (a decoder's 80 layers) are timed once. Every segment at every
micro-batch asked for is one job of a single timing call (``timing.interleaved_step_times``:
the jobs' samples taken in turns). See
docs/cost_models.md ("The profiled cost model").
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.node import map_arg

from fxshard.modules import has_meta_state, module_paths

__all__ = ["Segment", "SegmentTime", "segment_graph", "segment_module", "time_segments"]

_NUMBERED = re.compile(r"(^|\.)\d+$")
_SKIP_OPS = ("placeholder", "get_attr", "output")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A contiguous run of compute nodes. ``block``: the numbered module it is, "" between blocks."""

    block: str
    nodes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SegmentTime:
    """Measured seconds of one segment at the micro-batch; ``error`` says why it could not run."""

    segment: Segment
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    error: str = ""


def _block_of(node: torch.fx.Node) -> str:
    return next((p for p in module_paths(node) if _NUMBERED.search(p)), "")


def segment_graph(gm: torch.fx.GraphModule, stage_of: Mapping[str, int] | None = None) -> list[Segment]:
    """The segments of ``gm`` in graph order (placeholders, get_attr and output left out).

    With ``stage_of`` (node name -> stage), a segment also ends where the stage changes, so a
    block a plan cuts is timed as the parts its stages hold.
    """
    stage_of = stage_of or {}
    segments: list[Segment] = []
    current: list[str] = []
    block, stage = None, None
    for node in gm.graph.nodes:
        if node.op in _SKIP_OPS:
            continue
        b, st = _block_of(node), stage_of.get(node.name)
        if current and (b != block or st != stage):
            segments.append(Segment(block=block or "", nodes=tuple(current)))
            current = []
        block, stage = b, st
        current.append(node.name)
    if current:
        segments.append(Segment(block=block or "", nodes=tuple(current)))
    return segments


def _attr(root: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def segment_module(gm: torch.fx.GraphModule, segment: Segment) -> tuple[torch.fx.GraphModule, list[torch.fx.Node],
                                                                          list[torch.fx.Node], tuple]:
    """(module, input nodes, output nodes, structural key) of one segment.

    The module's attributes are ``gm``'s own objects (copy it before running it); its targets
    are relative to the block, so identical blocks build identical modules and share a key.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    members = [by_name[n] for n in segment.nodes]
    inside = set(members)
    prefix = segment.block + "." if segment.block else ""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    root: dict[str, Any] = {}
    inputs: list[torch.fx.Node] = []
    local: dict[torch.fx.Node, int] = {}
    key: list[Any] = []

    def rel(target: str) -> str:
        if segment.block and target == segment.block:
            return "block"  # the block is one module: every copy of it installs as "block"
        return target.removeprefix(prefix) if prefix and target.startswith(prefix) else target

    def arg(n: torch.fx.Node) -> Any:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            target = rel(str(n.target))
            value = _attr(gm, str(n.target))
            root[target] = value
            env[n] = g.get_attr(target)
            key.append(("attr", target, tuple(value.shape) if isinstance(value, torch.Tensor) else repr(value)))
        else:
            env[n] = g.placeholder(f"in_{len(inputs)}")
            inputs.append(n)
        local[n] = len(local)
        return env[n]

    for node in members:
        copied = g.node_copy(node, arg)
        target: Any = node.target
        if node.op == "call_module":
            target = rel(str(node.target))
            mod = gm.get_submodule(str(node.target))
            root[target] = mod
            copied.target = target
            target = (target, type(mod).__qualname__, mod.extra_repr(), mod.training)
        elif node.op == "call_function":
            target = getattr(target, "__qualname__", str(target))
        env[node] = copied
        local[node] = len(local)
        args = map_arg((node.args, node.kwargs), lambda n: ("n", local[n]))
        key.append((node.op, target, repr(args)))
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    g.output(tuple(env[n] for n in outputs))
    return torch.fx.GraphModule(root, g, class_name="Segment"), inputs, outputs, tuple(key)


def _private(module: torch.fx.GraphModule, dev: torch.device) -> torch.fx.GraphModule:
    """A copy of ``module`` on ``dev`` with its own parameters (random where they are on meta)."""
    if has_meta_state(module):
        module = copy.deepcopy(module).to_empty(device=dev)
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                t.normal_(0.0, 0.02) if t.is_floating_point() else t.zero_()
        return module
    return copy.deepcopy(module).to(dev)


def _signature(values: Sequence[Any]) -> tuple:
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return "T", tuple(v.shape), str(v.dtype), v.requires_grad
        return v if isinstance(v, (int, float, bool, str, type(None))) else repr(v)

    return tuple(repr(pytree.tree_map(sig, v)) for v in values)


def _leaves(values: Sequence[Any]) -> list[Any]:
    """Fresh autograd leaves for the float tensors that need a gradient (as a stage's inputs are)."""
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().requires_grad_(v.requires_grad and v.is_floating_point())
        return v

    return [pytree.tree_map(leaf, v) for v in values]


# (module, make_inputs) jobs -> each one's StepTime, or the exception it raised
# (``timing.interleaved_step_times``: samples taken in turns).
_Timer = Callable[[list[tuple[torch.nn.Module, Callable[[], Sequence[Any]]]]], Sequence[Any]]


def time_segments(gm: torch.fx.GraphModule, batches: Sequence[Sequence[Any]], dev: torch.device,
                  timer: _Timer, *, stage_of: Mapping[str, int] | None = None) -> list[list[SegmentTime]]:
    """Each segment of ``gm`` timed forward and backward on the values it receives, at each batch.

    Args:
        gm: the captured graph (parameters real or on meta).
        batches: the graph's inputs at each micro-batch to time: one value per placeholder, on
            ``dev`` (random, cut to the micro-batch).
        dev: where to run.
        timer: every (module, make_inputs) job -> its :class:`~fxshard.cost_models.timing.StepTime`
            or the exception it raised (``timing.interleaved_step_times``: fresh forward and
            backward per step, gradients None, the jobs' samples taken in turns).
        stage_of: node name -> stage of a plan: segments also end at its stage boundaries.

    Returns:
        Per batch, the segments in graph order. Every segment at every batch is one job of a
        single ``timer`` call, so a drift of the machine's speed falls on all of them alike.
        A segment that cannot run gets ``error`` set, and so do the segments after it that
        read its values (they have nothing to run on).
    """
    segments = segment_graph(gm, stage_of)
    built = [_attempt(segment_module, gm, segment) for segment in segments]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    private: dict[tuple, torch.fx.GraphModule] = {}  # one copy per distinct segment, shared by every batch
    jobs: dict[tuple, int] = {}  # (structure, input signature) -> job
    work: list[tuple[torch.nn.Module, Callable[[], Sequence[Any]]]] = []
    rows: list[list[int | str]] = []  # per batch, per segment: its job, or why it cannot run
    for inputs in batches:
        values: dict[torch.fx.Node, Any] = dict(zip(placeholders, inputs))
        row: list[int | str] = []
        for made in built:
            if isinstance(made, str):
                row.append(made)
                continue
            module, ins, outs, key = made
            missing = [n.name for n in ins if n not in values]
            if missing:
                row.append(f"its input {missing[0]} could not be computed")
                continue
            args = [values[n] for n in ins]
            results = _attempt(_run_private, private, key, module, args, dev)
            if isinstance(results, str):
                row.append(results)
                continue
            values.update((node, _with_grad(value, node)) for node, value in zip(outs, results))
            job = (key, _signature(args))
            if job not in jobs:
                jobs[job] = len(work)
                work.append((private[key], lambda args=args: _leaves(args)))
            row.append(jobs[job])
        rows.append(row)
    timed = timer(work) if work else []
    return [[SegmentTime(segment, error=j) if isinstance(j, str)
             else SegmentTime(segment, error=_why(timed[j])) if isinstance(timed[j], Exception)
             else SegmentTime(segment, fwd_s=timed[j].fwd_s, bwd_s=timed[j].bwd_s)
             for segment, j in zip(segments, row)] for row in rows]


def _run_private(private: dict[tuple, torch.fx.GraphModule], key: tuple, module: torch.fx.GraphModule,
                 args: Sequence[Any], dev: torch.device) -> Any:
    """``module``'s private copy (made once per structure, kept in ``private``) run forward on
    ``args`` without autograd: the values the next segments run on."""
    if key not in private:
        private[key] = _private(module, dev)
    with torch.no_grad():
        return private[key](*args)


def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or why it failed (a string) where an op refuses random inputs."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any op may refuse random inputs; the caller falls back
        return _why(e)


def _why(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _with_grad(value: Any, node: torch.fx.Node) -> Any:
    """``value`` marked as needing a gradient where the captured value does (as in training)."""
    def mark(v: Any, meta: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            wanted = getattr(meta, "requires_grad", True) if meta is not None else True
            return v.detach().requires_grad_(bool(wanted))
        return v

    meta = node.meta.get("val")
    leaves, spec = pytree.tree_flatten(value)
    metas = pytree.tree_leaves(meta) if meta is not None else []
    if len(metas) != len(leaves):
        metas = [None] * len(leaves)
    return pytree.tree_unflatten([mark(v, m) for v, m in zip(leaves, metas)], spec)
