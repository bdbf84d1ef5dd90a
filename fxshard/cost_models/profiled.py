"""The profiled cost model: every node timed for real, forward and backward.

Each node runs alone on the profiling device with random inputs of its captured shapes and
a private copy of its module or tensors (the user's parameters and buffers are never
touched, BatchNorm statistics included). Times are the median of ``repeats`` runs after
``warmup`` runs, measured with CUDA events on GPUs and ``time.perf_counter`` on CPUs, and
cached per (operator, module signature, input shapes, device), so the 80 identical layers
of a decoder are timed once. A model on ``meta`` is profiled with materialised copies of
one node's weights at a time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.node import map_arg

from fxshard.capture import CapturedGraph
from fxshard.cost_models.analysis import NodeWork
from fxshard.cost_models.analytical import AnalyticalCostModel
from fxshard.cost_models.base import NodeTime, register_cost_model
from fxshard.errors import CostModelError

if TYPE_CHECKING:
    from fxshard.cluster import DeviceSpec

__all__ = ["ProfiledCostModel", "median_time"]

_SKIP_OPS = ("placeholder", "get_attr", "output")


class ProfiledCostModel:
    """Measure every node on a real device.

    Args:
        device: the torch device to time on; default: the model's device, or CUDA (else
            CPU) for a model on ``meta``.
        warmup: untimed runs before measuring.
        repeats: timed runs; the median is kept.
    """

    name = "profiled"

    def __init__(self, *, device: str | torch.device | None = None, warmup: int = 2,
                 repeats: int = 5) -> None:
        if warmup < 0 or repeats < 1:
            raise CostModelError(f"warmup={warmup}, repeats={repeats}: need warmup >= 0 and repeats >= 1")
        self.device = torch.device(device) if device is not None else None
        self.warmup = warmup
        self.repeats = repeats
        self.cache: dict[tuple, NodeTime] = {}
        self.fallbacks: dict[str, str] = {}

    def node_times(self, captured: CapturedGraph, works: Sequence[NodeWork],
                   device: DeviceSpec) -> list[NodeTime]:
        run_device = self.device or _model_device(captured.gm)
        if run_device.type == "cuda" and not torch.cuda.is_available():
            raise CostModelError(f"profiling on {run_device} needs CUDA, which this machine lacks; "
                                 f"use device='cpu' or cost_model='analytical'")
        fallback = AnalyticalCostModel().node_times(captured, works, device)
        times = []
        for node, work, guess in zip(captured.gm.graph.nodes, works, fallback):
            if node.op in _SKIP_OPS or work.is_view:
                times.append(NodeTime(fwd_s=0.0, bwd_s=0.0))
                continue
            key = _cache_key(node, captured.gm, run_device)
            if key not in self.cache:
                try:
                    self.cache[key] = self._measure(node, captured.gm, run_device)
                except Exception as e:  # an op that cannot run on random inputs
                    self.fallbacks[node.name] = f"{type(e).__name__}: {e}"
                    self.cache[key] = guess
            times.append(self.cache[key])
        return times

    def _measure(self, node: torch.fx.Node, gm: torch.fx.GraphModule, dev: torch.device) -> NodeTime:
        fn = _node_callable(node, gm, dev)
        env = {n: _materialise(n, gm, dev) for n in node.all_input_nodes}
        args = map_arg(node.args, lambda n: env[n])
        kwargs = map_arg(node.kwargs, lambda n: env[n])
        fwd_s = self._time(lambda: fn(*args, **kwargs), dev)
        out = fn(*args, **kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        wrt = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if isinstance(fn, torch.nn.Module):
            wrt += [p for p in fn.parameters() if p.requires_grad]
        if not outs or not wrt:
            return NodeTime(fwd_s=fwd_s, bwd_s=0.0)
        grads = [torch.ones_like(t) for t in outs]
        bwd_s = self._time(lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True,
                                                       allow_unused=True), dev)
        return NodeTime(fwd_s=fwd_s, bwd_s=bwd_s)

    def _time(self, fn: Callable[[], Any], dev: torch.device) -> float:
        return median_time(fn, dev, warmup=self.warmup, repeats=self.repeats)


def median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` untimed runs: CUDA events on GPUs, else perf_counter."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _model_device(gm: torch.nn.Module) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _node_callable(node: torch.fx.Node, gm: torch.fx.GraphModule, dev: torch.device) -> Callable:
    if node.op == "call_module":
        original = gm.get_submodule(node.target)
        if any(t.device.type == "meta" for t in list(original.parameters()) + list(original.buffers())):
            mod = copy.deepcopy(original).to_empty(device=dev)
            with torch.no_grad():
                for t in list(mod.parameters()) + list(mod.buffers()):
                    _fill(t)
        else:
            mod = copy.deepcopy(original).to(dev)  # a private copy: BatchNorm stats stay put
        return mod
    if node.op == "call_method":
        return lambda self_, *a, **k: getattr(self_, node.target)(*a, **k)
    return node.target


def _fill(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.normal_(0.0, 0.02)
    else:
        t.zero_()


def _materialise(node: torch.fx.Node, gm: torch.fx.GraphModule, dev: torch.device) -> Any:
    """A real value shaped like ``node``'s output, on ``dev``."""

    def make(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        out = torch.empty(v.shape, dtype=v.dtype, device=dev)
        if out.is_floating_point():
            out.normal_()
        else:
            out.zero_()  # zeros are a valid index for embeddings and gathers
        return out.requires_grad_(v.requires_grad and out.is_floating_point())

    return pytree.tree_map(make, node.meta.get("val"))


def _signature(value: Any) -> Any:
    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), str(v.dtype), v.requires_grad)
        if isinstance(v, (int, float, bool, str, type(None))):
            return v
        return type(v).__name__

    return pytree.tree_map(sig, value)


def _cache_key(node: torch.fx.Node, gm: torch.fx.GraphModule, dev: torch.device) -> tuple:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        what = (type(mod).__qualname__, mod.extra_repr(), mod.training,
                tuple((n, tuple(p.shape), str(p.dtype)) for n, p in mod.named_parameters()))
    else:
        what = (node.op, str(node.target))
    args = map_arg((node.args, node.kwargs), lambda n: _signature(n.meta.get("val")))
    return what, repr(args), str(dev)


@register_cost_model("profiled")
def _profiled() -> ProfiledCostModel:
    return ProfiledCostModel()
