"""The planner: single device, DDP, FSDP, pipeline or pipeline x DDP/FSDP, chosen by simulation.

``plan(model, devices, example_inputs, **options)`` captures the model once, prices it,
then enumerates candidates and keeps the fastest that fits:

- ``single``: the model on one device;
- ``ddp``: R replicas (R divides the batch), each step costs forward + backward on B/R plus
  the part of the ring all-reduce of the gradients that backward cannot hide;
- ``pipeline``: k stages from the partitioner, m micro-batches, a torch schedule, timed by
  :func:`fxshard.simulate.simulate` with per-stage memory under that schedule;
- ``hybrid``: k stages x d replicas, each stage's replicas inside one machine where possible.

Each candidate is priced under the memory levers the options allow (``fsdp`` groups instead of
replicas, gradient accumulation, activation checkpointing; fxshard/levers.py), and ``_reason``
says why the plan pulls one.

The options and their checks are in fxshard/plan_options.py, the candidates and their pricing
in fxshard/candidates.py, the refusal when nothing fits in fxshard/refusal.py. Every candidate
is kept, ranked, in ``plan.alternatives``. See docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from fxshard.candidates import (
    PipelineGroup,
    Priced,
    Pricer,
    partition_group,
    pipeline_groups,
    price_levers,
    rank_devices,
    shape_bound,
    stage_counts,
    unfit,
)
from fxshard.candidates_whole import price_whole_model, whole_model_fractions
from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster, format_bytes
from fxshard.comm import group_link, ring_allreduce_time
from fxshard.cost_models.loss import capture_loss
from fxshard.errors import PartitionerError, PartitionError, PlanError
from fxshard.plan import Alternative, Estimate, ModelInfo, Plan, StagePlan
from fxshard.plan_options import STRATEGY_ORDER, PlanOptions, batch_size_of, check_request, divisors
from fxshard.refusal import Accepted, Needs, Probe, Request, model_needs, refuse

__all__ = ["PlanOptions", "batch_size_of", "group_link", "plan", "plan_captured", "ring_allreduce_time"]


def plan(model: torch.nn.Module, devices: Any, example_inputs: Any = None, *,
         example_kwargs: Mapping[str, Any] | None = None, **options: Any) -> Plan:
    """Decide how ``model`` should run on ``devices``; runs nothing.

    Args:
        model: the module (on a real device or on ``meta``).
        devices: an int, a list of device strings, a cluster string such as "8xA100-80GB",
            or a :class:`Cluster` (SPEC).
        example_inputs: positional inputs of one batch (a dict: keyword inputs).
        example_kwargs: keyword inputs besides positional ones (``example_inputs`` may then be
            left out: ``plan(model, devices, example_kwargs=batch)``).
        **options: :class:`PlanOptions` fields (training, optimizer, microbatches, schedule,
            partitioner, cost_model, strategy, activation_checkpointing, data_parallel, loss_fn,
            example_target, seed, memory_reserve, name, exhaustive, factors).

    Returns:
        The best :class:`Plan`, with the ranked alternatives it beat.

    Raises:
        PlanError: nothing fits, or options contradict each other (with the numbers).

    Example::

        p = fxshard.plan(model, "8xA100-80GB", (tokens,))
        print(p)
    """
    try:
        opts = PlanOptions(**options)
    except TypeError as e:
        raise PlanError(f"unknown plan option: {e}; options are {', '.join(f.name for f in dataclasses.fields(PlanOptions))}") from e
    if example_inputs is None and not example_kwargs:
        raise PlanError("plan needs example inputs (a tuple of tensors of one batch) to know shapes; "
                        "fxshard.compile without them plans at the first call")
    if example_inputs is None:
        example_inputs = ()  # keyword inputs only: no positional ones (capture would take None as one)
    cluster = Cluster.parse(devices)
    captured = capture(model, example_inputs, example_kwargs=example_kwargs)
    batch = batch_size_of(captured, example_inputs, example_kwargs)
    return plan_captured(captured, cluster, batch, opts)


def plan_captured(captured: CapturedGraph, cluster: Cluster, batch: int, opts: PlanOptions) -> Plan:
    """:func:`plan` for an already captured graph."""
    check_request(captured, cluster, batch, opts)
    loss = capture_loss(captured, opts.loss_fn if opts.training else None, opts.example_target)
    pricer = Pricer(captured, opts.pricing_model, batch, loss=loss)
    ranked = _search(pricer, cluster, batch, opts)
    best = ranked[0]
    if not best.fits and all(c.refused for c in ranked):
        raise PlanError(f"no schedule runs with these options: {ranked[0].note.rstrip('.')}. Use more micro-batches "
                        f"(microbatches=None picks them), fewer stages, or schedule='gpipe', which takes any count")
    if not best.fits:
        raise _nothing_fits(pricer, cluster, batch, opts, ranked)
    return _assemble(captured, cluster, batch, opts, best, ranked, pricer)


def _search(pricer: Pricer, cluster: Cluster, batch: int, opts: PlanOptions) -> list[Priced]:
    """Every candidate the options allow, best first (those that fit, then by step time);
    pipelines that cannot beat the best found are left out (``opts.exhaustive``: none are)."""
    n = cluster.num_devices
    fixed = pricer.captured.fixed_batch
    whole = [1] if opts.strategy in (None, "single") and opts.stages is None else []
    if opts.strategy in (None, "ddp", "fsdp") and n > 1 and opts.stages is None and fixed is None:
        whole += [r for r in divisors(batch) if 2 <= r <= n]
    groups = list(pipeline_groups(n, batch, opts, fixed)) if opts.strategy in (None, "pipeline", "hybrid") \
        and n > 1 else []
    # Every micro-batch the search may price, measured together by a measuring cost model.
    pricer.prepare([d.spec for d in cluster.devices], [
        *(f for r in whole for f in whole_model_fractions(pricer, r, opts)),
        *(1.0 / (shape.replicas * shape.microbatches) for group in groups for shape in group.shapes())])
    candidates = [c for r in whole for c in price_whole_model(pricer, cluster, r, opts)]
    if groups:
        candidates += _pipelines(pricer, cluster, groups, opts, _best_step(candidates))
    if not candidates:
        raise PlanError(f"strategy={opts.strategy!r} needs more than {n} device(s) and a batch of {batch} that "
                        f"splits; use more devices or strategy=None")
    return sorted(candidates, key=lambda c: (not c.fits, c.step_time_s * (1 + 1e-9 * STRATEGY_ORDER[c.strategy]),
                                             STRATEGY_ORDER[c.strategy], len(c.devices) * c.replicas))


def _best_step(candidates: list[Priced]) -> float:
    return min((c.step_time_s for c in candidates if c.fits), default=math.inf)


def _pipelines(pricer: Pricer, cluster: Cluster, groups: list[PipelineGroup], opts: PlanOptions,
               best: float) -> list[Priced]:
    """Each pipeline group partitioned once, then each of its shapes simulated.

    Groups are searched by their shapes' lower bound (:func:`shape_bound`), most promising
    first; a group or shape whose bound exceeds the best step time found so far (``best``:
    the whole-model candidates') can only lose, so it is neither partitioned nor simulated
    unless ``opts.exhaustive``. The candidates come back in the groups' own order, so ties
    rank as an exhaustive search ranks them."""
    bounds = [{shape: shape_bound(pricer, cluster, group, shape, opts) for shape in group.shapes()}
              for group in groups]
    found: list[list[Priced]] = [[] for _ in groups]
    for g in sorted(range(len(groups)), key=lambda g: (min(bounds[g].values(), default=math.inf), g)):
        group = groups[g]
        if not opts.exhaustive and min(bounds[g].values(), default=math.inf) > best:
            continue
        try:
            stage_of, stage_devices = partition_group(pricer, cluster, group, opts)
        except PartitionerError:
            raise  # a broken plug-in partitioner, not a model that does not fit
        except PartitionError as e:
            found[g].append(unfit(group, rank_devices(group), str(e)))
            continue
        for shape, bound in bounds[g].items():
            if not opts.exhaustive and bound > best:
                continue
            priced = price_levers(pricer, cluster, group, stage_of, stage_devices, shape, opts)
            found[g] += priced
            best = min(best, _best_step(priced))
    return [c for group_found in found for c in group_found]


def _device_name(cluster: Cluster, d: int) -> str:
    dev = cluster.devices[d]
    return dev.torch_device if cluster.num_machines == 1 else f"m{dev.machine}/{dev.torch_device}"


def _lower_bound(pricer: Pricer, cluster: Cluster, used: set[int], training: bool) -> float:
    rate = 0.0
    for d in used:
        c = pricer.costs(cluster.devices[d].spec, 1.0)
        rate += 1.0 / (c.fwd_time_s + (c.bwd_time_s if training else 0.0))
    return 1.0 / rate


def _alternative(c: Priced, batch: int) -> Alternative:
    return Alternative(strategy=c.strategy, stages=len(c.devices), replicas=c.replicas, microbatches=c.microbatches,
                       schedule=c.schedule, step_time_s=c.step_time_s if math.isfinite(c.step_time_s) else -1.0,
                       samples_per_s=batch / c.step_time_s if math.isfinite(c.step_time_s) and c.step_time_s > 0 else 0.0,
                       peak_memory_bytes=max(c.peak) if all(math.isfinite(p) for p in c.peak) else -1.0,
                       fits=c.fits, note=c.note or ("" if c.fits else _over(c)), data_parallel=c.data_parallel,
                       activation_checkpointing=c.checkpointing)


def _over(c: Priced) -> str:
    worst = max(range(len(c.peak)), key=lambda i: c.peak[i] - c.capacity[i])
    return (f"stage {worst} needs {format_bytes(c.peak[worst])}, device has {format_bytes(c.capacity[worst])}")


def _assemble(captured: CapturedGraph, cluster: Cluster, batch: int, opts: PlanOptions, best: Priced,
              ranked: list[Priced], pricer: Pricer) -> Plan:
    used = {d for devs in best.devices for d in devs}
    stages = []
    for st, devs, peak, cap in zip(best.stages, best.devices, best.peak, best.capacity):
        stages.append(StagePlan(index=st.index, devices=tuple(_device_name(cluster, d) for d in devs),
                                device_indices=tuple(devs), nodes=st.nodes, flops=st.fwd_flops,
                                param_bytes=st.param_bytes, peak_memory_bytes=float(peak),
                                memory_capacity_bytes=float(cap), fwd_time_s=st.fwd_time_s,
                                bwd_time_s=st.bwd_time_s, send_bytes=st.send_bytes,
                                first_module=st.first_module, last_module=st.last_module,
                                activation_checkpointing=best.checkpointing,
                                optimizer_time_s=st.optimizer_time_s if opts.training else 0.0,
                                accumulate_time_s=st.accumulate_time_s if opts.training else 0.0))
    full = pricer.costs(cluster.devices[0].spec, 1.0)
    step_estimate = Estimate(step_time_s=best.step_time_s, bubble_fraction=best.bubble,
                             samples_per_s=batch / best.step_time_s if best.step_time_s > 0 else 0.0,
                             lower_bound_step_time_s=_lower_bound(pricer, cluster, used, opts.training),
                             allreduce_time_s=best.allreduce_s)
    seen, alternatives = set(), []
    for c in ranked:
        key = (c.strategy, len(c.devices), c.replicas, c.microbatches, c.schedule, c.data_parallel, c.checkpointing)
        if key not in seen:
            seen.add(key)
            alternatives.append(_alternative(c, batch))
    return Plan(strategy=best.strategy, partitioner=opts.partitioner, schedule=best.schedule,
                microbatches=best.microbatches, replicas=best.replicas, batch_size=batch, training=opts.training,
                optimizer=opts.optimizer if opts.training else "none", cluster=cluster.to_dict(),
                model=ModelInfo(name=opts.name or captured.model_name, nodes=len(captured.nodes),
                                param_bytes=full.param_bytes, fingerprint=captured.fingerprint(),
                                method=captured.method),
                stages=tuple(stages), estimate=step_estimate,
                reason=_reason(best, ranked, cluster, batch, opts, pricer.loss.note),
                data_parallel=best.data_parallel, reshard_after_forward=best.reshard_after_forward,
                alternatives=tuple(alternatives[:16]), tied=best.tied,
                estimated_nodes=pricer.estimated({cluster.devices[d].spec.name for d in used}))


def _reason(best: Priced, ranked: list[Priced], cluster: Cluster, batch: int, opts: PlanOptions,
            loss_note: str = "") -> str:
    rate = batch / best.step_time_s
    parts = []
    if opts.strategy is not None:
        # The search saw only this strategy, so "next best" below is among its own variants.
        parts.append(f"forced by strategy={opts.strategy!r} (only {opts.strategy} plans were compared; "
                     f"strategy=None compares every strategy)")
    single = next((c for c in ranked if c.strategy == "single"), None)
    if single is not None and not single.fits:
        parts.append(f"the model does not fit one device ({format_bytes(single.peak[0])} needed, "
                     f"{format_bytes(single.capacity[0])} available)")
    elif single is not None and best.strategy != "single":
        parts.append(f"{best.strategy} runs {rate:.1f} samples/s against {batch / single.step_time_s:.1f} on one device")
    used = best.devices_used
    if used < cluster.num_devices:
        better = [c for c in ranked if c.fits and c.devices_used > used]
        if best.strategy == "ddp" and batch % cluster.num_devices:
            parts.append(f"uses {used} of {cluster.num_devices} devices: replicas must divide the batch of {batch}")
        elif better:
            parts.append(f"uses {used} of {cluster.num_devices} devices: more devices were slower "
                         f"(best with more: {batch / better[0].step_time_s:.1f} samples/s)")
        else:
            parts.append(f"uses {used} of {cluster.num_devices} devices")
    parts += _lever_reasons(best, ranked, batch)
    runner = next((c for c in ranked[1:] if c.fits), None)
    if runner is not None:
        parts.append(f"next best: {runner.strategy} ({_describe(runner)}) at {batch / runner.step_time_s:.1f} samples/s")
    if opts.factors is not None:  # a saved plan says how it was priced
        parts.append(opts.factors_note(d.spec.name for d in cluster.devices))
    if loss_note:
        parts.append(loss_note)
    return "; ".join(parts)


def _lever_reasons(best: Priced, ranked: list[Priced], batch: int) -> list[str]:
    """Why the plan pulls its memory levers, against the same shape without them."""
    def alike(c: Priced) -> bool:
        return (len(c.devices), c.replicas, c.schedule, c.shape.depth) == \
            (len(best.devices), best.replicas, best.schedule, best.shape.depth)

    parts = []
    if best.checkpointing != "none":
        plain = next((c for c in ranked if alike(c) and c.microbatches == best.microbatches
                      and c.data_parallel == best.data_parallel and c.checkpointing == "none"), None)
        parts.append(f"{best.checkpointing} activation checkpointing"
                     + (f": without it {_over(plain)}" if plain is not None and not plain.fits else ""))
    if best.data_parallel == "fsdp" and best.replicas > 1:
        ddp = next((c for c in ranked if alike(c) and c.data_parallel == "ddp"), None)  # the best ddp variant
        if ddp is not None and not ddp.fits:
            parts.append(f"fsdp: ddp replicas need {format_bytes(max(ddp.peak))} of "
                         f"{format_bytes(min(ddp.capacity))}")
        elif ddp is not None:
            parts.append(f"fsdp: {batch / best.step_time_s:.1f} samples/s against {batch / ddp.step_time_s:.1f} "
                         f"with ddp replicas")
    return parts


def _describe(c: Priced) -> str:
    """A candidate's shape as ``Plan.shape_text`` words it, with its schedule."""
    levers = _levers_text(c)
    if c.strategy in ("single", "ddp", "fsdp"):
        kind = "FSDP shards" if c.strategy == "fsdp" else "data-parallel replicas"
        return ("1 device" if c.replicas == 1 else f"{c.replicas} {kind}") + levers
    k = len(c.devices)
    group = "FSDP shards" if c.data_parallel == "fsdp" else "replicas"
    shape = f"{k} stage{'s' if k > 1 else ''}" + (f" x {c.replicas} {group}" if c.replicas > 1 else "")
    per = c.shape.stages_per_device
    shape += f", {per} stages per device ({c.schedule})" if per > 1 else f", {c.schedule}" if c.schedule else ""
    used = c.devices_used
    return f"{shape}, {used} device{'s' if used > 1 else ''}{levers}"


def _levers_text(c: Priced) -> str:
    """The memory levers a candidate pulls, as words ("" when none)."""
    words = []
    if c.checkpointing != "none":
        words.append(f"{c.checkpointing} activation checkpointing")
    if c.strategy in ("ddp", "fsdp") and c.microbatches > 1:
        words.append(f"{c.microbatches} accumulated micro-batches")
    return f", {', '.join(words)}" if words else ""


def _nothing_fits(pricer: Pricer, cluster: Cluster, batch: int, opts: PlanOptions,
                  ranked: list[Priced]) -> PlanError:
    """The refusal: numbers, floors and ways out, each way out checked by :func:`_probe`
    (fxshard/refusal.py)."""
    full = pricer.costs(cluster.devices[0].spec, 1.0)

    def needs(optimizer: str, training: bool) -> Needs:
        return model_needs(pricer.captured, full, training=training, optimizer=optimizer)

    simulated = [c for c in ranked if c.stages and c.strategy in ("pipeline", "hybrid")]
    unpartitioned = [c for c in ranked if not c.stages and c.note]
    hint = ""
    if simulated:
        closest = min(simulated, key=lambda c: c.overflow)
        hint = (f"; the closest pipeline ({len(closest.devices)} stages, {closest.schedule}, "
                f"{closest.microbatches} micro-batches): {_over(closest)}")
    elif unpartitioned:
        widest = max(unpartitioned, key=lambda c: len(c.devices))
        hint = f"; a pipeline of {len(widest.devices)} stages: {widest.note.split('; use at least')[0]}"
    request = Request(name=pricer.captured.model_name, cluster=cluster, batch=batch, opts=opts,
                      fixed_batch=pricer.captured.fixed_batch)
    return refuse(request, needs, lambda c, b, o, depth: _probe(pricer, c, b, o, depth), hint)


def _probe(pricer: Pricer, cluster: Cluster, batch: int, opts: PlanOptions, depth: int | None = None) -> Probe:
    """What :func:`plan_captured` would find for another cluster, batch or options (a refusal's
    way out), sharing ``pricer``'s costs (a smaller batch is priced by scaling). With ``depth``,
    only pipelines of the first depth >= ``depth`` that the full search tries are searched: a
    part of the full search, so a plan found there is one the full search finds too."""
    n = cluster.num_devices
    trial, keep = opts, None
    if depth is not None:
        depths = [k for k in stage_counts(n, 1) if k >= depth]
        if not depths:
            return Probe(accepted=None)
        trial = dataclasses.replace(opts, stages=depths[0])
        keep = lambda c: c.devices_used // c.replicas in stage_counts(n, c.replicas)
    try:
        check_request(pricer.captured, cluster, batch, trial)
        ranked = _search(pricer.at_batch(batch), cluster, batch, trial)
    except (PlanError, PartitionError):
        return Probe(accepted=None)
    ranked = [c for c in ranked if keep is None or not c.stages or keep(c)]
    best = next((c for c in ranked if c.fits), None)
    if best is None:
        pipelines = [c for c in ranked if c.stages and c.strategy in ("pipeline", "hybrid")]
        return Probe(accepted=None, overflow=min((c.overflow for c in pipelines), default=math.inf))
    worst = max(range(len(best.peak)), key=lambda i: best.peak[i] / best.capacity[i])
    return Probe(accepted=Accepted(strategy=best.strategy, stages=len(best.devices), replicas=best.replicas,
                                   depth=best.devices_used // best.replicas,
                                   schedule=best.schedule, microbatches=best.microbatches,
                                   peak_bytes=float(best.peak[worst]), capacity_bytes=float(best.capacity[worst]),
                                   data_parallel=best.data_parallel, activation_checkpointing=best.checkpointing))
