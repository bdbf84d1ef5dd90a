"""Calibration: run a plan's stages for real on the local device and compare with predictions.

For each stage of a plan (and for the whole model), the stage module runs forward and backward
on one micro-batch on the local device: warm-up, then the median of ``repeats`` timed runs
(CUDA events on GPUs, ``time.perf_counter`` on CPUs), and, on CUDA, the peak memory from
``torch.cuda.max_memory_allocated``. The same stages are priced by the ``analytical`` and
``profiled`` cost models for the local device, and the report gives each stage's error, the
median absolute relative error and Kendall's tau between predicted and measured stage times.
With ``checkpointing=`` every stage runs (and is priced) under that activation-checkpointing
policy. The report keeps every node's isolated forward and backward time at the captured batch
with its FLOPs and bytes, the samples the roofline factors are fitted to. See
docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch

from fxshard.calibrate_report import CalibrationReport, StageMeasurement, kendall_tau
from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster
from fxshard.cost_models import FittedFactors, NodeTime, ProfiledCostModel, estimate, load_factors, scale_batch
from fxshard.cost_models.analysis import analyze
from fxshard.cost_models.analytical import AnalyticalCostModel, FactorFit, RooflineFactors, fit_factors
from fxshard.cost_models.checkpointing import checkpoint_cost
from fxshard.cost_models.host_memory import ResidentPeak, SavedTensors, released_heap, retained_heap, trim_heap
from fxshard.cost_models.timing import Clock, StepTime, step_times
from fxshard.errors import CostModelError, ExecutionError
from fxshard.modules import has_meta_state
from fxshard.passes.regions import Region, regions_within, repeated_blocks
from fxshard.passes.split import split_graph
from fxshard.passes.stages import StageSummary, summarize_stages
from fxshard.plan import Plan
from fxshard.runtime.checkpointing import POLICIES, checkpoint_stages
from fxshard.runtime.local import split_microbatches

__all__ = ["CalibrationReport", "StageMeasurement", "calibrate", "fitted_factors", "kendall_tau", "save_factors"]


@dataclasses.dataclass(frozen=True)
class _Run:
    """One module measured on one micro-batch (``_measure_module``)."""

    times: StepTime
    peak_bytes: float | None  # step peak: weights + gradients + saved activations + transients
    saved_bytes: int  # autograd's saved bytes of one forward, parameters and buffers excluded
    outputs: tuple  # the forward's outputs, detached


def _leaves(inputs: Sequence[Any]) -> list[Any]:
    return [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]


def _measure_module(module: torch.nn.Module, inputs: Sequence[Any], device: torch.device, warmup: int,
                    repeats: int) -> _Run:
    """Times, step peak memory (CUDA) and saved bytes of one module on one micro-batch.

    Timed as a training step runs (``timing.step_times``): gradients set to None, a fresh
    forward, then backward, each timed in the same step. On CUDA the peak is
    ``max_memory_allocated`` over those steps above what was allocated before them, plus the
    module's parameter bytes: its weights, gradients, one micro-batch's saved activations and
    the transients (the previous step's gradients are freed before each step); on the CPU it is
    measured apart, before any timing (:func:`_cpu_step_peaks`). A last forward counts what
    autograd saves (``host_memory.SavedTensors``) and gives the outputs.
    """
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = step_times(module, lambda: _leaves(inputs), device, warmup=warmup, repeats=repeats)
    peak = None
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device) - base + _param_bytes(module))
    saved = SavedTensors(exclude=[*module.parameters(), *module.buffers()])
    with saved.counting():
        outputs = module(*_leaves(inputs))
    module.zero_grad(set_to_none=True)
    outputs = tuple(outputs) if isinstance(outputs, tuple) else (outputs,)
    return _Run(times=times, peak_bytes=peak, saved_bytes=saved.bytes,
                outputs=tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in outputs))


def _step_peak_bytes(captured: CapturedGraph, costs: Any, stage: StageSummary) -> float:
    """The predicted peak of one training step of ``stage`` on one micro-batch: its weights,
    plus the most gradients and saved activations alive at once, plus the largest transient.

    Backward runs the nodes in reverse: a node's parameter gradients are written when its
    backward runs (a ``get_attr``'s at its last user's), and a saved activation is freed after
    the backward of the first node, in forward order, that saved it. So the gradients of the
    last nodes and the activations of the first are never all alive together, and weights +
    gradients + activations (what the plan's peak adds up, right when other micro-batches'
    activations are in flight while gradients accumulate) overstates one micro-batch's step by up
    to the smaller of the two. The forward's end (every activation saved, no gradient yet) is
    the first candidate.
    """
    names = list(stage.nodes)
    position = {name: i for i, name in enumerate(names)}
    graph = {n.name: n for n in captured.gm.graph.nodes}
    grads_at, freed_at = [0.0] * len(names), [0.0] * len(names)
    seen: set[str] = set()
    first_saver: dict[str, int] = {}
    for i, name in enumerate(names):
        work = costs[name].work
        freed_at[i] += work.saved_bytes
        for value in work.saved_values:
            first_saver.setdefault(costs.storage_owner(value), i)
        at = i
        if work.op == "get_attr":
            at = max((position[u.name] for u in graph[name].users if u.name in position), default=i)
        for param, size in zip(work.params, work.param_sizes):
            if param not in seen:
                seen.add(param)
                grads_at[at] += size
    for owner, i in first_saver.items():
        freed_at[i] += costs[owner].work.output_bytes
    alive, grads = sum(freed_at), 0.0
    peak = alive
    for i in reversed(range(len(names))):
        grads += grads_at[i]
        peak = max(peak, grads + alive)
        alive -= freed_at[i]
    return stage.param_bytes + peak + stage.transient_bytes


def _stage_modules(split: Any, gm: torch.nn.Module, micro: Sequence[Any],
                   device: torch.device) -> list[tuple[torch.nn.Module, Sequence[Any]]]:
    """Each stage's module on ``device`` with the micro-batch values it receives (a forward of the
    stages before it, without gradients), then the whole model with the micro-batch."""
    modules: list[tuple[torch.nn.Module, Sequence[Any]]] = []
    values: Sequence[Any] = micro
    for stage in split.stages:
        module = stage.module.to(device)
        modules.append((module, values))
        with torch.no_grad():
            out = module(*_leaves(values))
        out = out if isinstance(out, tuple) else (out,)
        values = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in out)
    modules.append((gm, micro))
    return modules


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _cpu_step_peaks(runs: Sequence[tuple[torch.nn.Module, Sequence[Any]]]) -> list[float] | None:
    """The step peak of each (module, micro-batch inputs) on the CPU, or None where the system
    cannot reset the resident set's high-water mark (``host_memory.ResidentPeak``).

    One training step each, gradients None before it: the high-water mark above the resident
    set at its start, plus the module's parameter bytes. glibc's thresholds are pinned low for
    these steps (``host_memory.released_heap``), so every freed tensor leaves the resident set;
    that costs page faults (GPT-2's backward measured 15-20% slower pinned, on one thread), so the
    timing runs apart, after these steps. malloc serves a request from its free lists before it
    maps anything, so call this before anything has kept freed memory in the heap, and the heap's
    free pages are given back (``malloc_trim``) before each step: a tensor that reuses them
    faults them in again, and counts. See docs/calibration.md.
    """
    if not ResidentPeak.available():
        return None
    with released_heap():
        peaks = []
        for module, inputs in runs:
            probe = ResidentPeak()
            module.zero_grad(set_to_none=True)
            # One untimed step first: what the first run of a module allocates once (oneDNN's
            # primitive caches, lazily built state) is not the step's.
            step_times(module, lambda: _leaves(inputs), torch.device("cpu"), warmup=1, repeats=1,
                       on_timed=lambda: (trim_heap(), probe.start()))
            peaks.append(float(probe.peak_bytes() + _param_bytes(module)))
            module.zero_grad(set_to_none=True)
        return peaks


def _one_microbatch(captured: CapturedGraph, plan: Plan, flat: list[Any]) -> tuple[list[Any], float, Any]:
    """The first of the plan's micro-batches (replicas x micro-batches per step), its fraction of
    the batch, and the graph's work at that fraction. The micro-batch is a copy, not a view of
    the batch, as a rank receives it: a saved view would count the whole batch's storage."""
    m = plan.microbatches * plan.replicas
    fraction = 1.0 / m
    works = scale_batch(analyze(captured), fraction) if fraction < 1 else analyze(captured)
    micro = split_microbatches(flat, m)[0] if m > 1 else flat
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in micro], fraction, works


def calibrate(captured: CapturedGraph, plan: Plan, example_inputs: tuple, *, device: str | torch.device | None = None,
              warmup: int = 2, repeats: int = 5, profiled: bool = True,
              checkpointing: str | None = None, fit: bool = True,
              factors: str | os.PathLike | FittedFactors | None = None, threads: int | None = None) -> CalibrationReport:
    """Measure each of ``plan``'s stages on one local device and compare with predictions.

    Args:
        captured: the model's captured graph (its parameters must be real, on any device).
        plan: the plan whose stage split is measured (any strategy; single/ddp: one stage).
        example_inputs: one batch of the model's positional inputs.
        device: where to run (default: CUDA if present, else the CPU).
        warmup, repeats: untimed and timed runs per measurement (median kept).
        profiled: also price with the profiled cost model (times every segment at the
            micro-batch, and every node alone for the roofline fit: slower).
        checkpointing: run and price every stage under this activation-checkpointing policy
            ("none", "selective", "full"); default: each stage's policy in ``plan``.
        fit: with ``profiled``, also time every node alone and fit the roofline factors.
        factors: a factors file (or FittedFactors): the analytical predictions, and the
            "before" of the fit, use its factors for the presets it names.
        threads: torch CPU threads to measure and profile with (the previous count is restored
            after); default: the current count. One thread gives steady CPU timings.

    Raises:
        ExecutionError: a model on the meta device (nothing real to run), an unknown policy,
            or ``threads`` < 1.

    Example::

        report = calibrate(capture(model, inputs), plan, inputs, threads=1)
        print(report.to_markdown())
    """
    if threads is not None and threads < 1:
        raise ExecutionError(f"threads={threads}: need at least 1 torch thread, or None for the current count "
                             f"({torch.get_num_threads()})")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _calibrate(captured, plan, example_inputs, device=device, warmup=warmup, repeats=repeats,
                          profiled=profiled, checkpointing=checkpointing, fit=fit, factors=factors)
    finally:
        torch.set_num_threads(before)


def _calibrate(captured: CapturedGraph, plan: Plan, example_inputs: tuple, *, device: str | torch.device | None,
               warmup: int, repeats: int, profiled: bool, checkpointing: str | None, fit: bool,
               factors: str | os.PathLike | FittedFactors | None) -> CalibrationReport:
    """:func:`calibrate` under the torch thread count it set."""
    plan = _under_policy(plan, checkpointing)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if has_meta_state(captured.gm):
        raise ExecutionError("calibration runs the model for real: build it on a real device, not on meta")
    spec = Cluster.parse([str(dev)]).devices[0].spec
    gm = captured.gm.to(dev)
    flat = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in captured.flatten_inputs(tuple(example_inputs), {})]
    micro, fraction, works = _one_microbatch(captured, plan, flat)
    roofline = load_factors(factors).cost_model() if factors is not None else AnalyticalCostModel()
    analytical = estimate(captured, spec, works=works, cost_model=roofline)
    # With one CPU thread all of a step's work runs on this thread: its CPU time is the compute,
    # without the waits for a core that a loaded machine adds to the wall time.
    clock = "cpu" if dev.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    regions = repeated_blocks(captured)
    split = checkpoint_stages(split_graph(captured, plan.stage_of(), plan.num_stages), captured, plan, regions)
    policies = [s.activation_checkpointing for s in plan.stages]
    modules = _stage_modules(split, gm, micro, dev)  # each stage and the whole model, with its inputs
    # Memory first, before any timing keeps freed memory: a heap that holds free blocks lends them to
    # the measured step, where pages freed in its middle stay resident (docs/calibration.md, "The CPU heap").
    peaks = _cpu_step_peaks(modules) if dev.type == "cpu" else None
    profiler = ProfiledCostModel(device=dev, batch_fraction=fraction, threads=torch.get_num_threads(), clock=clock,
                                 stage_of=plan.stage_of())
    measured_profile = estimate(captured, spec, works=works, cost_model=profiler) if profiled else None
    predicted = _predict_stages(captured, plan, analytical, regions)
    profiled_stages = (_predict_stages(captured, plan, measured_profile, regions) if measured_profile is not None
                       else None)
    with retained_heap(dev):  # as fxshard's CPU ranks run (host_memory.retain_freed_memory)
        runs = [_measure_module(module, inputs, dev, warmup, repeats) for module, inputs in modules]
        fitted, kernels = (_fit_kernels(captured, spec, dev, warmup, repeats, roofline.factors_of(spec), clock)
                           if measured_profile is not None and fit else (None, ()))
    if peaks is not None:
        runs = [dataclasses.replace(r, peak_bytes=p) for r, p in zip(runs, peaks)]
    stages = []
    for s, run in enumerate(runs[:-1]):
        pred = predicted[s]
        stages.append(_measurement(
            s, run, pred, profiled_stages[s] if profiled_stages else None,
            predicted_peak_bytes=_step_peak_bytes(captured, analytical, pred),
            plan_peak_bytes=plan.stages[s].peak_memory_bytes, predicted_activation_bytes=pred.activation_bytes))
    one = summarize_stages(captured, analytical, {n.name: 0 for n in captured.gm.graph.nodes}, 1,
                           training=plan.training, optimizer=plan.optimizer)[0]
    whole = _measurement(-1, runs[-1], analytical, measured_profile or None,
                         predicted_activation_bytes=one.activation_bytes,
                         predicted_peak_bytes=_step_peak_bytes(captured, analytical, one))
    return CalibrationReport(model=plan.model.name, device=str(dev), device_spec=spec.name,
                             microbatch_fraction=fraction, stages=tuple(stages), whole=whole, fit=fitted,
                             checkpointing=policies[0] if len(set(policies)) == 1 else "per stage",
                             threads=torch.get_num_threads(), kernels=kernels, memory=_memory_method(dev),
                             profile_clock=clock)


def fitted_factors(report: CalibrationReport) -> FittedFactors:
    """The report's fitted roofline factors for its device preset, with their provenance: what
    ``fxshard calibrate --save-factors`` writes and ``fxshard.plan(..., factors=)`` reads.

    Raises:
        CostModelError: the report has no fit (calibrated with ``profiled=False`` or ``fit=False``,
            or too few kernels).
    """
    if report.fit is None:
        raise CostModelError(f"the calibration of {report.model} on {report.device} fitted no roofline factors; "
                             f"calibrate with profiled=True and fit=True (not --no-profiled), on a model with at "
                             f"least 3 timed kernels")
    fit = report.fit
    provenance = {"model": report.model, "device": report.device, "torch": torch.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "kernels": fit.samples, "threads": report.threads,
                  "median_log_error_before": fit.error_before, "median_log_error_after": fit.error_after}
    return FittedFactors(factors={report.device_spec: fit.factors}, provenance={report.device_spec: provenance})


def save_factors(report: CalibrationReport, path: str | os.PathLike, *, merge: bool = True) -> FittedFactors:
    """Write the report's fitted factors to the factors file ``path`` (see :func:`fitted_factors`).

    With ``merge``, an existing file keeps the presets it names that this report does not, so one
    file can hold a calibration per device; the report's preset is replaced. Returns what was written.

    Example::

        report = calibrate(captured, plan, inputs)
        save_factors(report, "factors.json")
        fxshard.plan(model, "4xcpu:3GB", inputs, factors="factors.json")
    """
    fitted = fitted_factors(report)
    if merge and os.path.exists(path):
        fitted = FittedFactors.load(path).merged(fitted)
    fitted.save(path)
    return fitted


def _under_policy(plan: Plan, checkpointing: str | None) -> Plan:
    """``plan`` with every stage under the activation-checkpointing policy ``checkpointing``
    (``plan`` itself for None).

    Raises:
        ExecutionError: an unknown policy.
    """
    if checkpointing is not None and checkpointing not in POLICIES:
        raise ExecutionError(f"checkpointing={checkpointing!r}: use one of {', '.join(POLICIES)}, or None for the plan's")
    if checkpointing is None:
        return plan
    return dataclasses.replace(plan, stages=tuple(dataclasses.replace(s, activation_checkpointing=checkpointing)
                                                  for s in plan.stages))


def _memory_method(dev: torch.device) -> str:
    """How ``_measure_module`` measures the step peak on ``dev`` ("" where it cannot)."""
    if dev.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "resident-set high-water mark (VmHWM)" if dev.type == "cpu" and ResidentPeak.available() else ""


def _measurement(index: int, run: _Run, analytical: Any, profiled: Any | None,
                 **predicted: float | None) -> StageMeasurement:
    """One stage's (or, index -1, the whole model's) measurements next to the ``analytical``
    and ``profiled`` predictions (anything with ``fwd_time_s`` and ``bwd_time_s``; profiled may
    be None); ``predicted``: the predicted and plan's peak bytes, the predicted activations."""
    t = run.times
    return StageMeasurement(
        index=index, measured_fwd_s=t.fwd_s, measured_bwd_s=t.bwd_s, host_fwd_s=t.host_fwd_s,
        host_bwd_s=t.host_bwd_s, cpu_fwd_s=t.cpu_fwd_s, cpu_bwd_s=t.cpu_bwd_s,
        analytical_s=analytical.fwd_time_s + analytical.bwd_time_s,
        profiled_s=(profiled.fwd_time_s + profiled.bwd_time_s) if profiled is not None else None,
        analytical_fwd_s=analytical.fwd_time_s, profiled_fwd_s=profiled.fwd_time_s if profiled is not None else None,
        measured_peak_bytes=run.peak_bytes, measured_saved_bytes=float(run.saved_bytes), **predicted)


def _fit_kernels(captured: CapturedGraph, spec: Any, dev: torch.device, warmup: int, repeats: int,
                 current: RooflineFactors, clock: Clock = "wall") -> tuple[FactorFit | None, tuple[dict, ...]]:
    """Every node timed alone at the captured batch, and the roofline factors fitted to them
    (None when there are too few kernels to fit): the fit and the report's kernel rows."""
    kernels = estimate(captured, spec, cost_model=ProfiledCostModel(device=dev, method="nodes", warmup=warmup,
                                                                    repeats=repeats, batch_fraction=1.0, clock=clock))
    node_times = [NodeTime(fwd_s=c.fwd_time_s, bwd_s=c.bwd_time_s) for c in kernels]
    try:
        fitted = fit_factors([c.work for c in kernels], node_times, spec, current=current)
    except CostModelError:
        fitted = None  # too few kernels to fit anything
    return fitted, tuple(_kernel_row(c) for c in kernels if c.fwd_time_s > 0 or c.bwd_time_s > 0)


def _predict_stages(captured: CapturedGraph, plan: Plan, costs: Any, regions: Sequence[Region]) -> list[StageSummary]:
    """Each of ``plan``'s stages as ``costs`` price it, under the stage's activation-checkpointing policy."""
    plain = summarize_stages(captured, costs, plan.stage_of(), plan.num_stages, training=plan.training,
                             optimizer=plan.optimizer)
    return [_checkpointed(costs, st, regions, s.activation_checkpointing) for st, s in zip(plain, plan.stages)]


def _checkpointed(costs: Any, stage: StageSummary, regions: Sequence[Region], policy: str) -> StageSummary:
    """The stage's prediction under ``policy``: saved activations, recomputation added to backward."""
    if policy == "none":
        return stage
    cost = checkpoint_cost(costs, stage.nodes, regions_within(regions, stage.nodes), policy)
    return dataclasses.replace(stage, activation_bytes=float(cost.saved_bytes),
                               bwd_time_s=stage.bwd_time_s + float(cost.recompute_fwd_s),
                               transient_bytes=stage.transient_bytes + float(cost.transient_bytes))


def _kernel_row(c: Any) -> dict:
    w = c.work
    return {"name": w.name, "op": w.op, "target": w.target, "dtype": w.dtype, "fwd_flops": w.fwd_flops,
            "bwd_flops": w.bwd_flops, "fwd_bytes": w.fwd_bytes, "bwd_bytes": w.bwd_bytes,
            "fwd_s": c.fwd_time_s, "bwd_s": c.bwd_time_s, "estimated": c.estimated}
