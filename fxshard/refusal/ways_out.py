"""Ways out of a refusal, each one checked by planning it, and the refusal's text.

When every candidate overflows a device, the planner hands :func:`refuse` the request, the
model's memory needs and a *probe*: a function that runs the planner's own search on another
cluster, batch or set of options. A way out is offered only when its probe returned a plan; the
floors the message states come from fxshard/refusal/floors.py. See docs/planning.md.

Each way out is a function of the refusal's :class:`~fxshard.refusal.context.Context` that
returns what it :class:`~fxshard.refusal.context.Found`; :data:`WAYS` lists them in the order
the message gives them, :data:`LAST_RESORTS` those tried only when none of them found a way.
A new way out is one function and one line in a list.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from fxshard.cluster import Cluster, format_bytes
from fxshard.errors import PlanError
from fxshard.plan_options import divisors
from fxshard.refusal.context import TRIES, Context, Found, concrete, more_devices, spelled
from fxshard.refusal.floors import fsdp_floor, lever_floor, replica_samples
from fxshard.refusal.records import Accepted, NeedsFn, Probe, ProbeFn, Request, WayOut

__all__ = ["LAST_RESORTS", "WAYS", "Accepted", "NeedsFn", "Probe", "ProbeFn", "Request", "WayOut", "refuse"]


def devices(ctx: Context) -> Found:
    """More devices: as many as the pipeline floor (or DDP's replica count) says, then more."""
    opts, req = ctx.opts, ctx.req
    if opts.stages is not None or opts.strategy == "single":
        return Found()  # the stages= and strategy= levers say what to drop
    if opts.strategy == "ddp":
        return _ddp_devices(ctx)
    floor = ctx.floor(ctx.needs, req.batch, opts)
    if not math.isfinite(floor.devices):
        return Found(floors=(f"No device count of this size holds a pipeline of it: {floor.why}",))
    said = Found(floors=(f"A pipeline of it needs at least {floor.devices} devices of {format_bytes(ctx.cap)}: "
                         f"{floor.why}",))
    start, replicas = int(floor.devices), floor.replicas
    if _levers_allowed(opts):  # the search pulls them: probe from their floor (stated by memory_levers)
        levers = lever_floor(ctx.needs, req.batch, ctx.cap, opts, fixed_batch=req.fixed_batch)
        if levers.devices < start:
            start, replicas = int(levers.devices), 1
    return said + more_devices(ctx, start, opts, "holds the state and this batch's activations",
                               replicas=replicas)


def _levers_allowed(opts: Any) -> bool:
    """Whether the search may checkpoint fully and shard (the options leave both to it)."""
    return opts.training and opts.activation_checkpointing in (None, "full") and opts.data_parallel in (None, "fsdp")


def _ddp_devices(ctx: Context) -> Found:
    req, one = ctx.req, ctx.needs.at(1 / ctx.req.batch)
    per_sample = one.activation_bytes + one.transient_bytes
    samples = replica_samples(one, ctx.cap)
    if samples == 0:
        return Found(floors=(
            f"Each DDP replica holds the whole model: {format_bytes(one.state_bytes)} of parameters and "
            f"optimizer state plus {format_bytes(per_sample)} per sample, more than one device's "
            f"{format_bytes(ctx.cap)} even at one sample, so no device count helps ddp; pipeline and hybrid "
            f"plans split the model over devices",))
    replicas = next((r for r in divisors(req.batch) if req.batch // r <= samples), req.batch)
    said = Found(floors=(
        f"Each DDP replica holds the whole model ({format_bytes(one.state_bytes)} of parameters and optimizer "
        f"state) plus {format_bytes(per_sample)} per sample of its share: a device of {format_bytes(ctx.cap)} "
        f"holds at most {samples} samples, so the batch of {req.batch} needs at least {replicas} replicas "
        f"(replicas divide the batch)",))
    if replicas > req.cluster.num_devices:
        return said + more_devices(ctx, replicas, ctx.opts, f"{replicas} replicas of {req.batch // replicas} samples")
    return said


def smaller_batch(ctx: Context) -> Found:
    """A smaller batch: the largest the floors allow on these devices, then halving."""
    req, opts = ctx.req, ctx.opts
    if req.fixed_batch is not None or req.batch == 1:
        return Found()
    largest = _largest_batch(ctx)
    if largest.batch < 1:
        return Found(short=(f"a smaller batch ({largest.why})",)) if largest.why else Found()
    candidates = [largest.batch]
    while candidates[-1] > 1:
        candidates.append(candidates[-1] // 2)
    for b in candidates[:TRIES]:
        found = ctx.check(req.cluster, b, opts, ctx.depth(ctx.needs.at(b / req.batch), b, opts))
        if found.accepted is not None:
            return Found(ways=(WayOut(lever="batch", batch=b, plan=found.accepted,
                                      text=f"a batch of {b} instead of {req.batch} "
                                           f"(fits as {found.accepted.describe()})"),))
    return Found(short=(f"a smaller batch (batch {candidates[:TRIES][-1]} did not plan either)",))


class _Largest(NamedTuple):
    batch: int  # 0 when no smaller batch can fit
    why: str  # why none can, when known


def _largest_batch(ctx: Context) -> _Largest:
    """The largest batch below the request's that the floors allow on these devices."""
    req, opts, n = ctx.req, ctx.opts, ctx.req.cluster.num_devices
    one = ctx.needs.at(1 / req.batch)
    best, why = 0, ""
    if opts.strategy in (None, "single", "ddp") and opts.stages is None:
        cap = min(ctx.caps)
        samples = replica_samples(one, cap)
        if opts.strategy in (None, "single"):
            best = max(best, min(samples, req.batch - 1))
        if opts.strategy in (None, "ddp"):
            best = max([best] + [r * min(samples, (req.batch - 1) // r) for r in range(2, n + 1)])
        why = f"one sample needs {format_bytes(one.total)} on one device of {format_bytes(cap)}"
    if opts.strategy in (None, "pipeline", "hybrid") and n >= 2:
        def fits(b: int) -> bool:
            return ctx.floor(ctx.needs.at(b / req.batch), b, opts).devices <= n

        if fits(1):  # no batch fits where one sample does not (b micro-batches of one hold as much)
            low, high = 1, req.batch - 1  # the largest batch the floor allows, by bisection
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(mid) else (low, mid - 1)
            best = max(best, low)
        else:
            floor = ctx.floor(one, 1, opts)
            why = (f"a pipeline of one sample needs at least {floor.devices} devices of {format_bytes(ctx.cap)}"
                   if math.isfinite(floor.devices) else f"a pipeline of one sample: {floor.why}")
    return _Largest(batch=best, why=why)


def lighter_optimizer(ctx: Context) -> Found:
    """SGD instead of Adam: less optimizer state."""
    opts, req = ctx.opts, ctx.req
    if not opts.training or opts.optimizer != "adam":
        return Found()
    lighter = ctx.needs_of("sgd", True)
    what = (f"optimizer='sgd' ({format_bytes(lighter.state_bytes)} of parameters and state instead of "
            f"{format_bytes(ctx.needs.state_bytes)}")
    trial = dataclasses.replace(opts, optimizer="sgd")
    if opts.strategy not in ("single", "ddp"):
        floor = ctx.floor(lighter, req.batch, trial)
        if floor.devices > req.cluster.num_devices:
            return Found(short=(f"{what}: a pipeline still needs at least {floor.devices} devices)"
                                if math.isfinite(floor.devices) else f"{what}: {floor.why})",))
    found = ctx.check(req.cluster, req.batch, trial, ctx.depth(lighter, req.batch, trial))
    if found.accepted is not None:
        return Found(ways=(WayOut(lever="optimizer", options=(("optimizer", "sgd"),), plan=found.accepted,
                                  text=f"{what}; fits as {found.accepted.describe()})"),))
    return Found(short=(f"{what}: not enough here)",))


def inference(ctx: Context) -> Found:
    """Forward only: weights, no gradients, optimizer state or saved activations."""
    opts, req = ctx.opts, ctx.req
    if not opts.training:
        return Found()
    weights = ctx.needs_of(opts.optimizer, False)
    changes: dict[str, Any] = {"training": False}
    if opts.schedule not in (None, "gpipe"):
        changes["schedule"] = None  # forward only: every schedule is GPipe's fill and drain
    trial = dataclasses.replace(opts, **changes)
    found = ctx.check(req.cluster, req.batch, trial, ctx.depth(weights, req.batch, trial))
    what = (f"inference (training=False: {format_bytes(weights.state_bytes)} of weights, no gradients, "
            f"optimizer state or saved activations")
    if found.accepted is not None:
        return Found(ways=(WayOut(lever="inference", options=tuple(changes.items()), plan=found.accepted,
                                  text=f"{what}; fits as {found.accepted.describe()})"),))
    return Found(short=(f"{what}: not enough here)",))


def memory_levers(ctx: Context) -> Found:
    """FSDP and full activation checkpointing: the devices they need at least (offered, each
    count checked, when the request forced them off; else the devices way out already plans
    with them), or on these devices the largest batch up to the request's that plans with them,
    a sharded group's size dividing it."""
    opts, req = ctx.opts, ctx.req
    if not opts.training or opts.strategy in ("single", "ddp") or req.fixed_batch is not None:
        return Found()  # a forced strategy without sharded groups: forced() drops it first
    changes = {k: None for k in ("activation_checkpointing", "data_parallel") if getattr(opts, k) is not None}
    trial = dataclasses.replace(opts, **changes)
    floor = lever_floor(ctx.needs, req.batch, ctx.cap, trial, fixed_batch=req.fixed_batch)
    what = "FSDP and full activation checkpointing"
    if not math.isfinite(floor.devices):
        return Found(short=(f"{what} ({floor.why})",))
    n = req.cluster.num_devices
    said = Found(floors=(f"With {what} it needs at least {floor.devices} devices of {format_bytes(ctx.cap)}: "
                         f"{floor.why}",))
    if floor.devices > n:
        if not changes:
            return said
        found = more_devices(ctx, int(floor.devices), trial, what, replicas=floor.replicas)
        return said + Found(ways=tuple(dataclasses.replace(w, lever="levers", options=tuple(changes.items()))
                                       for w in found.ways), short=found.short)
    top = req.batch if changes else req.batch - 1  # the request's own batch only with levers it forced off
    shards = fsdp_floor(ctx.needs, req.batch, ctx.cap).devices
    batches = sorted(range(1, top + 1), key=lambda b: (not any(shards <= r <= n for r in divisors(b)), -b))
    for b in batches[:TRIES]:
        found = ctx.check(req.cluster, b, trial, ctx.depth(ctx.needs.at(b / req.batch), b, trial))
        if found.accepted is not None:
            dropped = ", ".join(f"{k}=None" for k in changes)
            said_batch = ("this batch" if b == req.batch else f"a batch of {b} instead of {req.batch}") + (
                f" with {dropped}" if dropped else "")
            return said + Found(ways=(WayOut(lever="levers", batch=b if b != req.batch else None,
                                             options=tuple(changes.items()), plan=found.accepted,
                                             text=f"{what}: {said_batch} on these devices (fits as "
                                                  f"{found.accepted.describe()})"),))
    return said + Found(short=(f"{what} on these devices (batches {', '.join(map(str, batches[:TRIES]))} did not "
                               f"plan with them)",))


def forced(ctx: Context) -> Found:
    """Drop each option the request fixed, one at a time."""
    out = Found()
    for name in ("strategy", "stages", "microbatches", "schedule", "activation_checkpointing", "data_parallel"):
        if getattr(ctx.opts, name) is not None:
            out += _unforced(ctx, name)
    return out


def _unforced(ctx: Context, name: str) -> Found:
    opts, req = ctx.opts, ctx.req
    value = getattr(opts, name)
    free = dataclasses.replace(opts, **{name: None})
    found = ctx.check(req.cluster, req.batch, free, ctx.depth(ctx.needs, req.batch, free))
    if found.accepted is not None and name == "strategy":
        way = concrete(ctx, req.cluster, found.accepted, f"instead of strategy={value!r}")
        if way is not None:
            return Found(ways=(way,))
    elif found.accepted is not None:
        return Found(ways=(WayOut(lever=name, options=((name, None),), plan=found.accepted,
                                  text=f"{name}=None instead of {value!r} (fits as {found.accepted.describe()})"),))
    out = Found(short=(f"{name}=None (no plan on these devices either)",))
    if name == "strategy" and value in ("single", "ddp") and opts.stages is None:
        floor = ctx.floor(ctx.needs, req.batch, free)
        if math.isfinite(floor.devices):
            out += Found(floors=(f"A pipeline needs at least {floor.devices} devices of "
                                 f"{format_bytes(ctx.cap)}: {floor.why}",))
            out += more_devices(ctx, int(floor.devices), free, "a pipeline splits the model",
                                replicas=floor.replicas, concrete_options=True)
    return out


def more_memory(ctx: Context) -> Found:
    """The last resort: devices large enough to hold the whole model, checked like the rest."""
    cluster, req = ctx.req.cluster, ctx.req
    spec = max((d.spec for d in cluster.devices), key=lambda s: s.memory_bytes)
    memory = ctx.needs.total / (1 - ctx.opts.memory_reserve)
    for _ in range(TRIES):
        larger = dataclasses.replace(spec, memory_bytes=spelled(math.ceil(memory)))
        bigger = Cluster.homogeneous(larger, machines=cluster.num_machines,
                                     devices_per_machine=len(cluster.devices_on(0)),
                                     intra_link=cluster.intra_link, inter_link=cluster.inter_link)
        found = ctx.check(bigger, req.batch, ctx.opts, ctx.depth(ctx.needs, req.batch, ctx.opts))
        if found.accepted is not None:
            return Found(ways=(WayOut(lever="memory", cluster=bigger, devices=bigger.describe(), plan=found.accepted,
                                      text=f"devices of {format_bytes(larger.memory_bytes)} ('{bigger.describe()}': "
                                           f"fits as {found.accepted.describe()})"),))
        memory *= 2
    return Found()


WayOutFn = Callable[[Context], Found]
WAYS: tuple[WayOutFn, ...] = (devices, memory_levers, smaller_batch, lighter_optimizer, inference, forced)
LAST_RESORTS: tuple[WayOutFn, ...] = (more_memory,)  # tried only when no way of WAYS was found


def _error(ctx: Context, found: Found, hint: str) -> PlanError:
    """The refusal's text: the numbers, the floors, the ways out and the levers short of one."""
    req, needs, opts = ctx.req, ctx.needs, ctx.opts
    head = (f"{req.name} needs {format_bytes(needs.total)} for "
            f"{'training with ' + opts.optimizer if opts.training else 'inference'} at batch {req.batch} "
            f"on one device ({format_bytes(needs.state_bytes)} of parameters and optimizer state, "
            f"{format_bytes(needs.activation_bytes)} of activations, {format_bytes(needs.transient_bytes)} "
            f"of temporaries); {req.cluster.describe()} gives {format_bytes(ctx.caps[0])} per device "
            f"({1 - opts.memory_reserve:.0%} of each), {format_bytes(sum(ctx.caps))} in all{hint}.")
    parts = [head] + [f + "." for f in found.floors]
    if found.ways:
        parts.append("Ways out, each checked by planning it: " + "; ".join(w.text for w in found.ways) + ".")
    else:
        parts.append("Ways out: none found by changing one of device count, memory levers, batch, optimizer, "
                     "mode, forced options or device memory.")
    if found.short:
        parts.append("Not enough on its own: " + "; ".join(found.short) + ".")
    error = PlanError(" ".join(parts))
    error.ways_out = found.ways  # the ways out as data, to follow them from code
    return error


def refuse(request: Request, needs: NeedsFn, probe: ProbeFn, hint: str = "") -> PlanError:
    """The error for a request nothing fits: the numbers, the floors and the checked ways out.

    Args:
        request: what was asked.
        needs: the model's memory at the request's batch, per (optimizer, training).
        probe: the planner's search on (cluster, batch, options): the plan it finds, or how
            close it came.
        hint: what the closest candidate of the failed search lacked (``"; the closest ..."``).

    Returns:
        A :class:`PlanError` whose ``ways_out`` holds the :class:`WayOut` s its text offers.
    """
    ctx = Context.of(request, needs, probe)
    found = Found()
    for way in WAYS:
        found += way(ctx)
    if not found.ways:
        for way in LAST_RESORTS:
            found += way(ctx)
    return _error(ctx, _one_per_lever(found, ctx.opts.strategy), hint)


def _one_per_lever(found: Found, strategy: str | None) -> Found:
    """Each lever once: a forced strategy dropped on more devices is offered under the devices
    lever, and where more devices alone already are, it is the strategy's way out instead."""
    taken: set[str] = set()
    ways = []
    for way in found.ways:
        lever = way.lever
        changes = dict(way.options)
        if lever in taken and strategy is not None and changes.get("strategy") not in (None, strategy):
            lever = "strategy"
        if lever not in taken:
            taken.add(lever)
            ways.append(dataclasses.replace(way, lever=lever))
    return dataclasses.replace(found, ways=tuple(ways))
