"""Timing on the local device: how the profiled cost model and calibration read the clock.

CUDA events on GPUs, ``time.perf_counter`` on CPUs, or there, with ``clock="cpu"``, the calling
thread's CPU time (``time.thread_time``): with one torch thread all of a step's CPU work runs on
the calling thread (intra-op work inline, autograd's CPU backward on the caller), so its CPU time
is the compute the step needs, without the time it waited for a core on a shared machine. A sample runs the timed call (or training
step) back to back until the clock has moved well past its resolution and counts seconds per
call, so nothing faster than the clock's tick is ever timed as 0; the median of the samples is
kept. ``median_time`` times a call (a node alone, in the profiled cost model); ``step_times``
times a module's forward and backward as a training step runs them (a segment, a calibrated
stage). See docs/cost_models.md and docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

try:
    import resource  # Unix only: page-fault counts for the warm-up (_warm_heap)
except ImportError:  # pragma: no cover - Windows
    resource = None

from fxshard.cost_models.host_memory import heap_retained
from fxshard.errors import CostModelError

__all__ = ["Clock", "StepTime", "interleaved_step_times", "median_time", "step_times", "stopwatch"]

Clock = Literal["wall", "cpu"]  # on the CPU: perf_counter, or the calling thread's CPU time

# cudaEventElapsedTime resolves about 0.5 us (CUDA runtime API documentation).
_CUDA_EVENT_RESOLUTION_S = 0.5e-6
_MAX_CALLS_PER_SAMPLE = 1 << 20
_WARM_FAULT_PAGES = 256  # 1 MiB of 4 KiB pages: a step that faults in less runs on a warm heap
_WARM_MAX_STEPS = 12
# One training step's seconds: device forward, device backward (None: no output needs a gradient),
# host forward, host backward, calling thread's CPU forward, CPU backward.
_StepSeconds = tuple[float, float | None, float, float, float, float]


def _min_sample_s(device: torch.device, clock: Clock = "wall") -> float:
    """100 ticks of the clock ``device`` is timed with, so quantisation costs at most 1%."""
    if device.type == "cuda":
        return 100 * _CUDA_EVENT_RESOLUTION_S
    return 100 * time.get_clock_info("thread_time" if clock == "cpu" else "perf_counter").resolution


def median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int,
                min_sample_s: float | None = None, clock: Clock = "wall") -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples, after ``warmup`` untimed calls.

    CUDA events on GPUs, ``time.perf_counter`` on CPUs. Each sample calls ``fn`` back to back
    until at least ``min_sample_s`` has passed and the clock has moved (default: 100 ticks of
    the clock's resolution, so quantisation costs at most 1%), and counts seconds per call: a
    call faster than the clock's tick is never timed as 0. ``clock="cpu"``: on the CPU, the
    calling thread's CPU time.

    Raises:
        CostModelError: the clock did not move in 2**20 calls (a broken or frozen clock).
    """
    if min_sample_s is None:
        min_sample_s = _min_sample_s(device, clock)
    for _ in range(warmup):
        fn()
    batch, samples = 1, []
    for i in range(repeats):
        calls, elapsed = 0, 0.0
        watch = stopwatch(device, clock)
        while (elapsed < min_sample_s or elapsed <= 0) and calls < _MAX_CALLS_PER_SAMPLE:
            for _ in range(batch):
                fn()
            calls += batch
            elapsed = watch()
        if elapsed <= 0:
            raise CostModelError(f"timing on {device}: the clock did not move in {calls:,} calls of {fn!r:.60}; "
                                 f"check the clock, or use cost_model='analytical'")
        if i == 0:
            batch = calls  # the calls one sample needs: later samples read the clock once per that many
        samples.append(elapsed / calls)
    return statistics.median(samples)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTime:
    """Median seconds of a module's forward and backward in a training step (``step_times``),
    on the device's clock and on the host's."""

    fwd_s: float
    bwd_s: float
    host_fwd_s: float = 0.0
    host_bwd_s: float = 0.0
    # CPU seconds of the calling thread (``time.thread_time``): on a CPU run with one torch thread,
    # wall / CPU well above 1 means the core was shared (the machine was loaded).
    cpu_fwd_s: float = 0.0
    cpu_bwd_s: float = 0.0


def step_times(module: torch.nn.Module, make_inputs: Callable[[], Sequence[Any]], device: torch.device, *,
               warmup: int, repeats: int, min_sample_s: float | None = None,
               on_timed: Callable[[], None] | None = None, clock: Clock = "wall") -> StepTime:
    """Median forward and backward seconds of ``module`` in a training step, as training runs it.

    Each step sets the parameters' gradients to None (as ``zero_grad(set_to_none=True)``
    does, so backward writes them rather than adding), runs a fresh forward on
    ``make_inputs()`` and then one backward through it (ones as output gradients), timing
    the two separately in the same step; nothing is replayed through a retained graph (which
    selective checkpointing forbids and which times an accumulation training does not do).
    A sample runs steps until each phase has taken ``min_sample_s`` (default: 100 ticks of
    the clock) and counts seconds per step. Backward is 0 when no output needs a gradient.
    The gradients are None again on return. ``host_fwd_s``/``host_bwd_s`` are the seconds the
    calls took on the host (``perf_counter``, no synchronisation): on CUDA, close to the device
    time when the step is host-bound, far below it when the GPU is the bottleneck;
    ``cpu_fwd_s``/``cpu_bwd_s`` the calling thread's CPU seconds (``time.thread_time``).
    ``on_timed`` is called once after the warm-up steps, with the gradients None again, before
    the first timed step (where a memory probe starts). ``clock="cpu"``: ``fwd_s``/``bwd_s``
    are the thread's CPU seconds on the CPU too (steady on a loaded machine with one torch
    thread). See docs/calibration.md.

    Raises:
        CostModelError: the clock did not move (a broken or frozen clock).
    """
    steps = _Steps(module, make_inputs, device, clock, min_sample_s)
    try:
        steps.warm(warmup)
        if on_timed is not None:
            steps.release()
            on_timed()
        samples = [steps.sample() for _ in range(repeats)]
    finally:
        steps.release()
    return _median(samples)


def interleaved_step_times(jobs: Sequence[tuple[torch.nn.Module, Callable[[], Sequence[Any]]]],
                           device: torch.device, *, warmup: int, repeats: int, min_sample_s: float | None = None,
                           clock: Clock = "wall") -> list[StepTime | Exception]:
    """:func:`step_times` of several modules at once, their samples taken in turns.

    Every job is warmed up first; then each of the ``repeats`` rounds takes one sample of every
    job, in the order given. Each round is divided by its speed (the median over jobs of the
    round's sample over the job's median) and each job keeps the median of its rounds
    (``_round_paired``). A drift of the machine's speed during the measurement (this CPU's moved
    10-25% over minutes, its thread CPU time with it: docs/calibration.md) then falls on every
    job alike instead of on whichever was timed last, so the jobs' times stay comparable with
    each other: a stage's segments, and a segment at each micro-batch size the planner compares.
    A job's gradients are set to None after each of its steps outside a sample and after each
    sample, so only one job's are held at a time. A job that fails (an op that refuses its
    inputs) gets the exception in its place and is timed no further; the others go on.

    Raises:
        CostModelError: the clock did not move (a broken or frozen clock).
    """
    steps = [_Steps(module, make_inputs, device, clock, min_sample_s) for module, make_inputs in jobs]
    failed = [_released(s, s.warm, warmup, heap=False) for s in steps]
    live = [i for i, e in enumerate(failed) if e is None]
    samples: list[list[StepTime]] = [[] for _ in steps]

    def one_round() -> None:  # a step of every live job: the heap's steady state with all of them in it
        for i in live:
            _released(steps[i], steps[i].step)

    if warmup and live and device.type == "cpu" and heap_retained():
        _warm_heap(one_round)
    for _ in range(repeats):
        for i in live:
            if failed[i] is None:
                failed[i] = _released(steps[i], lambda i=i: samples[i].append(steps[i].sample()))
    timed = [i for i in live if failed[i] is None]
    paired = dict(zip(timed, _round_paired([samples[i] for i in timed]))) if timed else {}
    return [e if e is not None else paired[i] for i, e in enumerate(failed)]


def _round_paired(samples: Sequence[Sequence[StepTime]]) -> list[StepTime]:
    """Each job's median over rounds (``samples[job][round]``), every round first divided by its
    speed: the median over jobs of the round's sample over the job's median. A step in the
    machine's speed between rounds then moves no job against another; only the round it falls
    in mixes the two speeds, and the median leaves that round out. With one job it is the plain
    median."""
    def total(t: StepTime) -> float:
        return t.fwd_s + t.bwd_s

    medians = [_median(s) for s in samples]
    speeds = []
    for r in range(len(samples[0])):
        ratios = [total(s[r]) / total(m) for s, m in zip(samples, medians) if total(m) > 0]
        speed = statistics.median(ratios) if ratios else 0.0
        speeds.append(speed if speed > 0 else 1.0)
    return [_median([StepTime(**{f.name: getattr(t, f.name) / speed for f in dataclasses.fields(StepTime)})
                     for t, speed in zip(s, speeds)]) for s in samples]


def _released(steps: _Steps, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Exception | None:
    """The exception ``call`` raised (None: it ran), ``steps``' gradients set to None after it;
    a frozen clock is raised, not kept."""
    try:
        call(*args, **kwargs)
    except CostModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any op may refuse its inputs; the caller falls back
        return e
    finally:
        steps.release()
    return None


class _Steps:
    """One module's training steps (``_training_step``), run for warm-up and timed in samples."""

    def __init__(self, module: torch.nn.Module, make_inputs: Callable[[], Sequence[Any]], device: torch.device,
                 clock: Clock, min_sample_s: float | None) -> None:
        self.module, self.make_inputs, self.device, self.clock = module, make_inputs, device, clock
        self.params = list(module.parameters())
        self.min_sample_s = _min_sample_s(device, clock) if min_sample_s is None else min_sample_s

    def step(self) -> _StepSeconds:
        return _training_step(self.module, self.params, self.make_inputs, self.device, self.clock)

    def warm(self, warmup: int, heap: bool = True) -> None:
        """``warmup`` untimed steps; on a CPU heap that keeps freed memory, then more until the
        page faults stop (``_warm_heap``)."""
        for _ in range(warmup):
            self.step()
        if heap and warmup and self.device.type == "cpu" and heap_retained():
            _warm_heap(self.step)

    def sample(self) -> StepTime:
        return _step_sample(self.step, self.module, self.device, self.min_sample_s)

    def release(self) -> None:
        for p in self.params:
            p.grad = None


def _median(samples: Sequence[StepTime]) -> StepTime:
    return StepTime(**{f.name: statistics.median([getattr(s, f.name) for s in samples])
                       for f in dataclasses.fields(StepTime)})


def _training_step(module: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                   make_inputs: Callable[[], Sequence[Any]], device: torch.device, clock: Clock) -> _StepSeconds:
    """One training step of ``module``: (device forward s, device backward s or None when no
    output needs a gradient, host forward s, host backward s, thread CPU forward s, backward s)."""
    for p in params:
        p.grad = None
    inputs = make_inputs()
    watch = stopwatch(device, clock)
    host, cpu = time.perf_counter(), time.thread_time()
    out = module(*inputs)
    host_fwd, cpu_fwd = time.perf_counter() - host, time.thread_time() - cpu
    fwd = watch()
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    if not tensors:
        return fwd, None, host_fwd, 0.0, cpu_fwd, 0.0
    grads = [torch.ones_like(t) for t in tensors]
    watch = stopwatch(device, clock)
    host, cpu = time.perf_counter(), time.thread_time()
    torch.autograd.backward(tensors, grads)
    host_bwd, cpu_bwd = time.perf_counter() - host, time.thread_time() - cpu
    return fwd, watch(), host_fwd, host_bwd, cpu_fwd, cpu_bwd


def _minor_faults() -> int | None:
    """Minor page faults of the calling thread so far (None where the system does not count them)."""
    who = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None
    return resource.getrusage(who).ru_minflt if who is not None else None


def _warm_heap(step: Callable[[], Any]) -> None:
    """More untimed steps, until two in a row fault in fewer than ``_WARM_FAULT_PAGES`` fresh pages
    (at most ``_WARM_MAX_STEPS``): the heap's steady state, which a training process reaches in its
    first steps and keeps. On a heap that keeps freed memory (``host_memory.retain_freed_memory``),
    glibc still placed GPT-2's 51 MB embedding gradient on fresh pages in 5 of its first 7 steps
    after the mode changed, 19-23 ms of faults on a 2.3 ms backward (docs/calibration.md, "The CPU
    heap"). Where the warm-up already reached the steady state, this adds two steps."""
    if _minor_faults() is None:
        return
    quiet = 0
    for _ in range(_WARM_MAX_STEPS):
        before = _minor_faults()
        step()
        quiet = quiet + 1 if _minor_faults() - before < _WARM_FAULT_PAGES else 0
        if quiet == 2:
            return


def _step_sample(step: Callable[[], _StepSeconds], module: torch.nn.Module,
                 device: torch.device, min_sample_s: float) -> StepTime:
    """Seconds per step of one sample: steps run until forward (and backward, when there is
    one) has taken ``min_sample_s`` and the clock has moved.

    Raises:
        CostModelError: the clock did not move in 2**20 steps.
    """
    steps, fwd, bwd, backward, host_fwd, host_bwd, cpu_fwd, cpu_bwd = 0, 0.0, 0.0, True, 0.0, 0.0, 0.0, 0.0
    while (fwd < min_sample_s or fwd <= 0 or (backward and (bwd < min_sample_s or bwd <= 0))) \
            and steps < _MAX_CALLS_PER_SAMPLE:
        f, b, hf, hb, cf, cb = step()
        steps, fwd, backward = steps + 1, fwd + f, b is not None
        bwd, host_fwd, host_bwd = bwd + (b or 0.0), host_fwd + hf, host_bwd + hb
        cpu_fwd, cpu_bwd = cpu_fwd + cf, cpu_bwd + cb
    if fwd <= 0 or (backward and bwd <= 0):
        raise CostModelError(f"timing on {device}: the clock did not move in {steps:,} training steps of "
                             f"{type(module).__name__}; check the clock, or use cost_model='analytical'")
    return StepTime(fwd_s=fwd / steps, bwd_s=bwd / steps, host_fwd_s=host_fwd / steps, host_bwd_s=host_bwd / steps,
                    cpu_fwd_s=cpu_fwd / steps, cpu_bwd_s=cpu_bwd / steps)


def stopwatch(device: torch.device, clock: Clock = "wall") -> Callable[[], float]:
    """Start timing now; the returned function gives the seconds since (synchronising CUDA).
    On the CPU, ``clock="cpu"`` counts the calling thread's CPU seconds instead of wall seconds."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def cuda_elapsed() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_elapsed
    read = time.thread_time if clock == "cpu" else time.perf_counter
    t0 = read()
    return lambda: read() - t0
