"""The profiled cost model: the graph timed for real as it runs, forward and backward.

By default (``method="segments"``) the graph is timed segment by segment at the micro-batch
the plan runs (:mod:`fxshard.cost_models.segments`): each numbered block and each run of nodes
between blocks runs as one module, forward and then backward, on real values that flow from
segment to segment, and structurally identical blocks are timed once. Every segment at every
micro-batch size told to :meth:`ProfiledCostModel.prepare` is timed in one measurement whose
samples are taken in turns, so a drift of the machine's speed falls on all alike. A segment's measured
forward and backward seconds are spread over its nodes in proportion to their analytical
times, so a stage's sum is the sum of the segments it holds. ``method="nodes"`` (and the
fallback for a segment that cannot run, recorded in ``segment_fallbacks``) times every node
alone, as before: random inputs of its captured shapes, a private copy of its module.

Times are the median of ``repeats`` runs after ``warmup`` runs, measured with CUDA events on
GPUs and ``time.perf_counter`` on CPUs, under ``threads`` torch threads on the CPU (default:
the process's current count, which is what stages run with in this process). A model on
``meta`` is profiled with materialised copies of its weights. The user's parameters and
buffers are never touched, BatchNorm statistics included.

The step's passes outside the graph (a micro-batch's gradients added into the accumulated ones,
the optimizer step) are measured too, once per device (:meth:`ProfiledCostModel.step_rates`,
:func:`fxshard.cost_models.optimizer_step.measure_step_rates`).

It measures the local machine, so it prices only a device the machine has: a preset of
another kind or GPU model is refused (the analytical model prices those). Nodes that cannot
run on random inputs get their analytical time, marked in ``NodeTime.estimated``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.node import map_arg

from fxshard.capture import CapturedGraph
from fxshard.capture.diagnose import first_line
from fxshard.cost_models.analysis import NodeWork, tensor_bytes
from fxshard.cost_models.analytical import AnalyticalCostModel
from fxshard.cost_models.base import NodeTime, register_cost_model
from fxshard.cost_models.host_memory import retained_heap
from fxshard.cost_models.optimizer_step import StepRates, measure_step_rates
from fxshard.cost_models.segments import SegmentTime, time_segments
from fxshard.cost_models.timing import (  # re-exported: the old home
    Clock,
    StepTime,
    interleaved_step_times,
    median_time,
    step_times,
    stopwatch,
)
from fxshard.devices import local_gpu_spec
from fxshard.errors import CostModelError
from fxshard.modules import has_meta_state

if TYPE_CHECKING:
    from fxshard.cluster import DeviceSpec

__all__ = ["Clock", "ProfiledCostModel", "StepTime", "check_local", "median_time", "step_times", "stopwatch"]

_SKIP_OPS = ("placeholder", "get_attr", "output")


class ProfiledCostModel:
    """Measure the graph on a real device.

    Args:
        device: the torch device to time on; default: the model's device, or CUDA (else
            CPU) for a model on ``meta``.
        warmup: untimed runs before measuring.
        repeats: timed runs; the median is kept.
        method: ``"segments"`` (time blocks as they run, at the micro-batch) or ``"nodes"``
            (every node alone, at the captured batch, scaled to the micro-batch).
        batch_fraction: the micro-batch to measure at, over the captured batch; default: the
            one the ``works`` it is given are at (``scale_batch`` scales the inputs' bytes by
            it). Times are always those of the given ``works``: measured at another fraction,
            they are scaled linearly to it (a pricer that asks for the full batch and scales,
            as the planner's does, then scales a measurement at this fraction).
        threads: torch CPU threads to measure with (default: the current count).
        clock: on the CPU, ``"wall"`` (``perf_counter``) or ``"cpu"`` (the calling thread's CPU
            time: with one thread, the compute a step needs, steady on a shared machine).
        stage_of: node name -> stage of a known plan (calibration): segments also end at its
            stage boundaries, so a block the plan cuts is timed as the parts its stages hold
            instead of spread over them in proportion to analytical times.
    """

    name = "profiled"

    def __init__(self, *, device: str | torch.device | None = None, warmup: int = 2, repeats: int = 5,
                 method: Literal["segments", "nodes"] = "segments", batch_fraction: float | None = None,
                 threads: int | None = None, clock: Clock = "wall",
                 stage_of: Mapping[str, int] | None = None) -> None:
        if warmup < 0 or repeats < 1:
            raise CostModelError(f"warmup={warmup}, repeats={repeats}: need warmup >= 0 and repeats >= 1")
        if method not in ("segments", "nodes"):
            raise CostModelError(f"method={method!r}: use 'segments' (blocks timed as they run) or 'nodes'")
        if batch_fraction is not None and not 0 < batch_fraction <= 1:
            raise CostModelError(f"batch_fraction={batch_fraction}: must be in (0, 1] (micro-batch over batch)")
        if threads is not None and threads < 1:
            raise CostModelError(f"threads={threads}: need at least 1, or None for the current count")
        if clock not in ("wall", "cpu"):
            raise CostModelError(f"clock={clock!r}: use 'wall' (perf_counter) or 'cpu' (the thread's CPU time)")
        self.clock: Clock = clock
        self.stage_of = dict(stage_of) if stage_of is not None else None
        self.device = torch.device(device) if device is not None else None
        self.warmup = warmup
        self.repeats = repeats
        self.method = method
        self.batch_fraction = batch_fraction
        self.threads = threads
        self.threads_used: int | None = None  # torch.get_num_threads() during the last measurement
        self.cache: dict[tuple, NodeTime] = {}
        self.fallbacks: dict[str, str] = {}  # node name -> why it got its analytical time
        self.segment_fallbacks: dict[str, str] = {}  # first node of a segment -> why it was timed node by node
        self.segments: list[SegmentTime] = []  # the last graph's segments, as measured
        # (id of the graph, run device, micro-batch fraction) -> (the graph, its segments measured there)
        self._profiles: dict[tuple[int, str, float], tuple[torch.fx.GraphModule, list[SegmentTime]]] = {}
        self._failed: dict[tuple, str] = {}  # cache key -> why it could not be measured
        self._rates: dict[tuple[str, str], StepRates] = {}  # (device spec, run device) -> measured rates

    def node_times(self, captured: CapturedGraph, works: Sequence[NodeWork],
                   device: DeviceSpec) -> list[NodeTime]:
        run_device = self.device or _run_device(captured.gm, device)
        check_local(run_device, device)
        fallback = AnalyticalCostModel().node_times(captured, works, device)
        priced = _batch_fraction(captured, works)
        with self._measuring(run_device):
            if self.method == "nodes":  # measured at the captured shapes, scaled to the works' micro-batch
                return [self._node_time(node, work, guess, captured.gm, run_device, priced)
                        for node, work, guess in zip(captured.gm.graph.nodes, works, fallback)]
            fraction = self.batch_fraction or priced
            times = self._segment_times(captured, works, fallback, run_device, fraction)
        if fraction == priced:
            return times
        # Measured at the model's own micro-batch, priced at the works': linearly, never twice
        # (an analytical stand-in is already the works' own).
        scale = priced / fraction
        return [t if t.estimated else dataclasses.replace(t, fwd_s=t.fwd_s * scale, bwd_s=t.bwd_s * scale)
                for t in times]

    def step_rates(self, device: DeviceSpec) -> StepRates:
        """Seconds per byte of gradient accumulation and of each optimizer's step, measured once
        on the device that prices ``device``, under the model's threads and clock."""
        run_device = self.device or torch.device("cpu" if device.kind == "cpu" else "cuda")
        check_local(run_device, device)
        key = (device.name, str(run_device))
        if key not in self._rates:
            with self._measuring(run_device):
                self._rates[key] = measure_step_rates(device, run_device, repeats=self.repeats, clock=self.clock)
        return self._rates[key]

    @contextlib.contextmanager
    def _measuring(self, dev: torch.device) -> Iterator[None]:
        """The model's threads, and on the CPU freed memory kept in the heap, as fxshard's CPU
        ranks run (``host_memory.retain_freed_memory``; docs/calibration.md, "The CPU heap")."""
        before = torch.get_num_threads()
        if self.threads is not None and dev.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            self.threads_used = torch.get_num_threads()
            with retained_heap(dev):
                yield
        finally:
            torch.set_num_threads(before)

    def prepare(self, captured: CapturedGraph, device: DeviceSpec, fractions: Sequence[float]) -> None:
        """Measure ``captured`` at every micro-batch (``fractions`` of the captured batch) that
        will be priced on ``device``, in one measurement whose samples are taken in turns
        (``timing.interleaved_step_times``), so a drift of the machine's speed falls on every
        size alike; :meth:`node_times` then reads it. The planner calls this with every size
        its search may price before it prices any. A no-op for ``method="nodes"``."""
        if self.method != "segments":
            return
        run_device = self.device or _run_device(captured.gm, device)
        check_local(run_device, device)
        with self._measuring(run_device):
            self._profile(captured, run_device, [self._measured_at(captured, f) for f in fractions])

    def _measured_at(self, captured: CapturedGraph, fraction: float) -> float:
        """The micro-batch measured to price ``fraction``: a graph specialised on its batch runs
        at the captured batch only."""
        return 1.0 if captured.fixed_batch is not None else (self.batch_fraction or fraction)

    def _profile(self, captured: CapturedGraph, dev: torch.device, fractions: Sequence[float]) -> None:
        """The segments of ``captured`` at each of ``fractions`` not measured yet, measured together."""
        gm = captured.gm
        todo = {_profile_key(gm, dev, f): f for f in fractions}
        todo = {k: f for k, f in todo.items() if self._profiles.get(k, (None,))[0] is not gm}
        if not todo:
            return
        measured = time_segments(gm, [_inputs(gm, dev, f) for f in todo.values()], dev,
                                 lambda jobs: interleaved_step_times(jobs, dev, warmup=self.warmup,
                                                                     repeats=self.repeats, clock=self.clock),
                                 stage_of=self.stage_of)
        for k, segs in zip(todo, measured):
            self._profiles[k] = (gm, segs)

    def _segment_times(self, captured: CapturedGraph, works: Sequence[NodeWork], guesses: Sequence[NodeTime],
                       dev: torch.device, fraction: float) -> list[NodeTime]:
        gm = captured.gm
        nodes = list(gm.graph.nodes)
        index = {n.name: i for i, n in enumerate(nodes)}
        measured_at = self._measured_at(captured, fraction)
        scale = fraction / measured_at  # 1, but for a graph specialised on its batch
        self._profile(captured, dev, [measured_at])
        self.segments = self._profiles[_profile_key(gm, dev, measured_at)][1]
        times = [NodeTime(fwd_s=0.0, bwd_s=0.0)] * len(nodes)
        for seg in self.segments:
            members = [index[n] for n in seg.segment.nodes]
            if seg.error:
                self.segment_fallbacks[seg.segment.nodes[0]] = seg.error
                for i in members:
                    times[i] = self._node_time(nodes[i], works[i], guesses[i], gm, dev, fraction)
                continue
            for i, (fwd, bwd) in zip(members, _spread(seg, [guesses[i] for i in members],
                                                       [works[i].is_view for i in members])):
                times[i] = NodeTime(fwd_s=fwd * scale, bwd_s=bwd * scale)
        return times

    def _node_time(self, node: torch.fx.Node, work: NodeWork, guess: NodeTime, gm: torch.fx.GraphModule,
                   dev: torch.device, fraction: float) -> NodeTime:
        """One node timed alone at its captured shapes, scaled linearly to the micro-batch."""
        if node.op in _SKIP_OPS or work.is_view:
            return NodeTime(fwd_s=0.0, bwd_s=0.0)
        key = _cache_key(node, gm, dev)
        if key not in self.cache and key not in self._failed:
            try:
                self.cache[key] = self._measure(node, gm, dev)
            except Exception as e:  # noqa: BLE001 - an op that cannot run on random inputs
                self._failed[key] = f"could not run on random inputs: {type(e).__name__}: {first_line(e)}"
        if key in self._failed:
            self.fallbacks[node.name] = self._failed[key]
            return NodeTime(fwd_s=guess.fwd_s, bwd_s=guess.bwd_s, estimated=self._failed[key])
        t = self.cache[key]
        return NodeTime(fwd_s=t.fwd_s * fraction, bwd_s=t.bwd_s * fraction)

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
        return median_time(fn, dev, warmup=self.warmup, repeats=self.repeats, clock=self.clock)


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


def _profile_key(gm: torch.fx.GraphModule, dev: torch.device, fraction: float) -> tuple[int, str, float]:
    """Where a measurement of ``gm`` at ``fraction`` is kept (the fraction to 12 digits: a fraction
    read back from the works' bytes is the same micro-batch)."""
    return id(gm), str(dev), round(fraction, 12)


def _batch_fraction(captured: CapturedGraph, works: Sequence[NodeWork]) -> float:
    """The micro-batch over the captured batch, as ``scale_batch`` wrote it into the inputs' bytes."""
    for node, work in zip(captured.gm.graph.nodes, works):
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() > 0 and tensor_bytes(val):
            return min(1.0, max(work.output_bytes / tensor_bytes(val), 1.0 / val.shape[0]))
    return 1.0


def _inputs(gm: torch.fx.GraphModule, dev: torch.device, fraction: float) -> list[Any]:
    """Random graph inputs of the captured shapes, the batch dimension cut to ``fraction``.

    The batch is the first dimension of the first input that has one, and only inputs with
    that first dimension are cut (as ``runtime.local.split_microbatches`` cuts them)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [_materialise(n, gm, dev) for n in placeholders]
    batch = next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if batch is None or fraction >= 1:
        return values
    micro = max(1, round(batch * fraction))
    return [v.narrow(0, 0, micro).detach().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v for v in values]


def _spread(seg: SegmentTime, guesses: Sequence[NodeTime], views: Sequence[bool]) -> list[tuple[float, float]]:
    """A segment's measured seconds over its nodes, in proportion to their analytical times
    (evenly over the nodes that are not views when the analytical times are all 0)."""
    def shares(weights: list[float]) -> list[float]:
        total = sum(weights)
        if total > 0:
            return [w / total for w in weights]
        even = [0.0 if v else 1.0 for v in views]
        if not any(even):
            even = [1.0] * len(views)
        return [e / sum(even) for e in even]

    fwd = shares([g.fwd_s for g in guesses])
    bwd = shares([g.bwd_s for g in guesses])
    return [(f * seg.fwd_s, b * seg.bwd_s) for f, b in zip(fwd, bwd)]


@register_cost_model("profiled")
def _profiled() -> ProfiledCostModel:
    return ProfiledCostModel()
