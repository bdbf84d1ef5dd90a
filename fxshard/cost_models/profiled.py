"""The profiled cost model: every node timed for real, forward and backward.

Each node runs alone on the profiling device with random inputs of its captured shapes and
a private copy of its module or tensors (the user's parameters and buffers are never
touched, BatchNorm statistics included). Times are the median of ``repeats`` runs after
``warmup`` runs, measured with CUDA events on GPUs and ``time.perf_counter`` on CPUs, and
cached per (operator, module signature, input shapes, device), so the 80 identical layers
of a decoder are timed once. A model on ``meta`` is profiled with materialised copies of
one node's weights at a time.

It measures the local machine, so it prices only a device the machine has: a preset of
another kind or GPU model is refused (the analytical model prices those). Nodes that cannot
run on random inputs get their analytical time, marked in ``NodeTime.estimated``.
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
from fxshard.capture.diagnose import first_line
from fxshard.cost_models.analysis import NodeWork
from fxshard.cost_models.analytical import AnalyticalCostModel
from fxshard.cost_models.base import NodeTime, register_cost_model
from fxshard.devices import local_gpu_spec
from fxshard.errors import CostModelError
from fxshard.modules import has_meta_state

if TYPE_CHECKING:
    from fxshard.cluster import DeviceSpec

__all__ = ["ProfiledCostModel", "check_local", "median_time"]

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
        self.fallbacks: dict[str, str] = {}  # node name -> why it got its analytical time
        self._failed: dict[tuple, str] = {}  # cache key -> why it could not be measured

    def node_times(self, captured: CapturedGraph, works: Sequence[NodeWork],
                   device: DeviceSpec) -> list[NodeTime]:
        run_device = self.device or _run_device(captured.gm, device)
        check_local(run_device, device)
        fallback = AnalyticalCostModel().node_times(captured, works, device)
        times = []
        for node, work, guess in zip(captured.gm.graph.nodes, works, fallback):
            if node.op in _SKIP_OPS or work.is_view:
                times.append(NodeTime(fwd_s=0.0, bwd_s=0.0))
                continue
            key = _cache_key(node, captured.gm, run_device)
            if key not in self.cache and key not in self._failed:
                try:
                    self.cache[key] = self._measure(node, captured.gm, run_device)
                except Exception as e:  # noqa: BLE001 - an op that cannot run on random inputs
                    self._failed[key] = f"could not run on random inputs: {type(e).__name__}: {first_line(e)}"
            if key in self._failed:
                self.fallbacks[node.name] = self._failed[key]
                times.append(NodeTime(fwd_s=guess.fwd_s, bwd_s=guess.bwd_s, estimated=self._failed[key]))
            else:
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


# cudaEventElapsedTime resolves about 0.5 us (CUDA runtime API documentation).
_CUDA_EVENT_RESOLUTION_S = 0.5e-6
_MAX_CALLS_PER_SAMPLE = 1 << 20


def median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int,
                min_sample_s: float | None = None) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples, after ``warmup`` untimed calls.

    CUDA events on GPUs, ``time.perf_counter`` on CPUs. Each sample calls ``fn`` back to back
    until at least ``min_sample_s`` has passed and the clock has moved (default: 100 ticks of
    the clock's resolution, so quantisation costs at most 1%), and counts seconds per call: a
    call faster than the clock's tick is never timed as 0.

    Raises:
        CostModelError: the clock did not move in 2**20 calls (a broken or frozen clock).
    """
    if min_sample_s is None:
        tick = _CUDA_EVENT_RESOLUTION_S if device.type == "cuda" else time.get_clock_info("perf_counter").resolution
        min_sample_s = 100 * tick
    for _ in range(warmup):
        fn()
    batch, samples = 1, []
    for i in range(repeats):
        calls, elapsed = 0, 0.0
        stopwatch = _stopwatch(device)
        while (elapsed < min_sample_s or elapsed <= 0) and calls < _MAX_CALLS_PER_SAMPLE:
            for _ in range(batch):
                fn()
            calls += batch
            elapsed = stopwatch()
        if elapsed <= 0:
            raise CostModelError(f"timing on {device}: the clock did not move in {calls:,} calls of {fn!r:.60}; "
                                 f"check the clock, or use cost_model='analytical'")
        if i == 0:
            batch = calls  # the calls one sample needs: later samples read the clock once per that many
        samples.append(elapsed / calls)
    return statistics.median(samples)


def _stopwatch(device: torch.device) -> Callable[[], float]:
    """Start timing now; the returned function gives the seconds since (synchronising CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def cuda_elapsed() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_elapsed
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def check_local(run_device: torch.device, spec: DeviceSpec) -> None:
    """Refuse to time ``spec`` on ``run_device`` unless they are the same kind of device.

    Measured times are only the spec's times when the spec is the local device: a CPU timed
    for an H100 preset would give CPU times labelled H100.

    Raises:
        CostModelError: ``spec`` is not what ``run_device`` is (a CUDA preset on a machine
            without CUDA, a CPU preset for a GPU, another GPU model than the local one).
    """
    ways_out = (f"Use cost_model='analytical' (prices {spec.name} from its datasheet figures), plan for this "
                f"machine's devices (devices=['cpu'] or a count such as 2"
                + (", or ['cuda:0']" if torch.cuda.is_available() else "")
                + f"), or run 'fxshard calibrate' on a machine with {spec.name} to fit the analytical model to it")
    if run_device.type == "cuda":
        if not torch.cuda.is_available():
            raise CostModelError(f"the profiled cost model times nodes on this machine, and {spec.name} is a CUDA "
                                 f"device: profiling on {run_device} needs CUDA, which this machine lacks. {ways_out}")
        index = run_device.index if run_device.index is not None else torch.cuda.current_device()
        local = local_gpu_spec(index)
        if spec.kind == "cpu" or spec.name.casefold() != local.name.casefold():
            raise CostModelError(
                f"the profiled cost model times nodes on this machine's {run_device} "
                f"({torch.cuda.get_device_name(index)}, preset {local.name}), but the plan prices them for "
                f"{spec.name} ({spec.kind}); its times would be labelled {spec.name}. {ways_out}")
    elif spec.kind != "cpu":
        raise CostModelError(
            f"the profiled cost model times nodes on this machine's {run_device.type.upper()}, but the plan prices "
            f"them for {spec.name} ({spec.kind}), which this machine does not have"
            + ("" if torch.cuda.is_available() else " (it has no CUDA)")
            + f"; CPU times would be labelled {spec.name}. {ways_out}")


def _run_device(gm: torch.nn.Module, spec: DeviceSpec) -> torch.device:
    """Where to time nodes priced for ``spec``: the model's own device if it is of the spec's
    kind, else the local device of that kind."""
    wanted = "cpu" if spec.kind == "cpu" else "cuda"
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.device.type == wanted:
            return t.device
    return torch.device(wanted)


def _node_callable(node: torch.fx.Node, gm: torch.fx.GraphModule, dev: torch.device) -> Callable:
    if node.op == "call_module":
        original = gm.get_submodule(node.target)
        if has_meta_state(original):
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
