"""Ways out of a refusal, each one checked by planning it, and the refusal's text.

When every candidate overflows a device, the planner hands :func:`refuse` the request, the
model's memory needs and a *probe*: a function that runs the planner's own search on another
cluster, batch or set of options. A way out is offered only when its probe returned a plan; the
floors the message states come from fxshard/refusal/floors.py. See docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from fxshard.cluster import Cluster, format_bytes, parse_bytes
from fxshard.devices import format_budget
from fxshard.errors import PlanError
from fxshard.plan_options import PlanOptions, divisors
from fxshard.refusal.floors import Floor, Needs, pipeline_floor, replica_samples

__all__ = ["Accepted", "NeedsFn", "Probe", "ProbeFn", "Request", "WayOut", "refuse"]

_TRIES = 3  # device counts or batch sizes probed per lever: each probe is a search of the planner
_MAX_DEVICES = 1 << 14  # the largest cluster a way out proposes
_NEAR = 1.1  # a deepest pipeline within 10% of fitting: grow the count rather than search it all


@dataclasses.dataclass(frozen=True, kw_only=True)
class Accepted:
    """The plan a probe found."""

    strategy: str
    stages: int
    depth: int  # devices per pipeline (the ``stages=`` option): stages / stages per device
    replicas: int
    schedule: str | None
    microbatches: int
    peak_bytes: float
    capacity_bytes: float

    def describe(self) -> str:
        if self.strategy in ("single", "ddp"):
            shape = "1 device" if self.replicas == 1 else f"{self.replicas} replicas"
        else:
            shape = (f"{self.stages} stages" + (f" x {self.replicas} replicas" if self.replicas > 1 else "")
                     + (f", {self.stages // self.depth} stages per device" if self.stages != self.depth else "")
                     + f", {self.schedule}, {self.microbatches} micro-batch{'es' if self.microbatches > 1 else ''}")
        return (f"{self.strategy}, {shape}, peak {format_bytes(self.peak_bytes)} of "
                f"{format_bytes(self.capacity_bytes)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe:
    """A probe's answer: the plan found, or by how much the closest pipeline overflowed (its
    worst stage's peak over capacity; inf when no pipeline was simulated)."""

    accepted: Accepted | None
    overflow: float = math.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class WayOut:
    """One change to the request that the planner accepted when asked.

    Follow it by planning the same model on ``cluster`` (when given), with example inputs of
    ``batch`` samples (when given) and the options updated with ``kwargs``.
    """

    lever: str  # devices, batch, optimizer, inference, strategy, stages, microbatches, schedule, memory
    text: str
    plan: Accepted
    cluster: Cluster | None = None
    devices: str | None = None  # ``cluster`` as a cluster string
    batch: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """The plan options this way out changes."""
        return dict(self.options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """What was asked: the model's name, the devices, the batch and the plan options."""

    name: str
    cluster: Cluster
    batch: int
    opts: PlanOptions
    fixed_batch: int | None = None


ProbeFn = Callable[[Cluster, int, Any, "int | None"], Probe]  # (devices, batch, options, depth hint)
NeedsFn = Callable[[str, bool], Needs]  # (optimizer, training) -> needs at the request's batch


def _spelled(nbytes: int) -> int:
    """The least budget of at least ``nbytes`` that a cluster string spells exactly."""
    while (written := parse_bytes(format_budget(nbytes))) < nbytes:
        nbytes += max(1, nbytes // 1000)
    return written


def _grow(cluster: Cluster, n: int) -> Cluster:
    """n or more devices of the cluster's largest kind, in machines of the cluster's machine size."""
    spec = max((d.spec for d in cluster.devices), key=lambda s: s.memory_bytes)
    per = len(cluster.devices_on(0)) if cluster.num_machines > 1 else n
    machines = math.ceil(n / per)
    return Cluster.homogeneous(spec, machines=machines, devices_per_machine=per if machines > 1 else n,
                               intra_link=cluster.intra_link, inter_link=cluster.inter_link)


class _Refusal:
    """Builds one refusal: the floors, the probes, the text."""

    def __init__(self, request: Request, needs: NeedsFn, probe: ProbeFn) -> None:
        self.req = request
        self.opts = request.opts
        self.needs_of = needs
        self.probe = probe
        self.needs = needs(self.opts.optimizer, self.opts.training)
        self.caps = [d.spec.memory_bytes * (1 - self.opts.memory_reserve) for d in request.cluster.devices]
        self.cap = max(self.caps)
        self.ways: list[WayOut] = []
        self.short: list[str] = []  # levers that are not enough on their own, and why
        self.floors: list[str] = []  # the arithmetic behind the device counts

    def _floor(self, needs: Needs, batch: int, opts: Any) -> Floor:
        return pipeline_floor(needs, batch, self.cap, opts, fixed_batch=self.req.fixed_batch)

    def _check(self, cluster: Cluster, batch: int, opts: Any, depth: float | None = None) -> Probe:
        """The planner's answer: first among pipelines of the floor's depth (a part of its search
        that usually holds the plan, and cheap), then the whole search."""
        if depth is not None and math.isfinite(depth) and opts.strategy not in ("single", "ddp") \
                and opts.stages is None:
            found = self.probe(cluster, batch, opts, max(2, int(depth)))
            if found.accepted is not None:
                return found
        return self.probe(cluster, batch, opts, None)

    def _depth(self, needs: Needs, batch: int, opts: Any) -> float | None:
        floor = self._floor(needs, batch, opts)
        return math.ceil(floor.devices / floor.replicas) if math.isfinite(floor.devices) else None

    # -- levers ---------------------------------------------------------------------------------

    def _more_devices(self, start: int, opts: Any, covers: str, *, replicas: int = 1, concrete: bool = False) -> None:
        """Probe growing device counts from ``start``; offer the first that plans."""
        n = self.req.cluster.num_devices
        count, last, tried, counts = max(start, n + 1), math.inf, 0, 0
        deep, deep_last = opts.strategy in (None, "pipeline", "hybrid") and opts.stages is None, math.inf
        for _ in range(_TRIES):
            if count > _MAX_DEVICES:
                break
            grown = _grow(self.req.cluster, count)
            total = tried = grown.num_devices
            counts += 1
            found = Probe(accepted=None)
            if deep:  # the deepest pipeline these devices give the floor's replicas: cheap, and usually fits
                found = self.probe(grown, self.req.batch, opts, max(2, total // replicas))
                deep = found.accepted is not None or not math.isfinite(found.overflow) or found.overflow < deep_last
                deep_last = found.overflow
            if found.accepted is None and found.overflow > _NEAR:
                # the whole search: replicas of shallower pipelines may fit where the deepest does not
                # (not worth it when the deepest nearly fits: a few more devices will do)
                whole = self.probe(grown, self.req.batch, opts, None)
                found = whole if whole.accepted is not None or whole.overflow < found.overflow else found
            way = None
            if found.accepted is not None and concrete:
                way = self._concrete(grown, found.accepted, f"instead of strategy={self.opts.strategy!r}: {covers}")
            elif found.accepted is not None:
                way = WayOut(lever="devices", cluster=grown, devices=grown.describe(), plan=found.accepted,
                             text=(f"{total} devices ('{grown.describe()}': {covers}; fits as "
                                   f"{found.accepted.describe()})"))
            if way is not None:
                self.ways.append(way)
                return
            if math.isfinite(found.overflow) and found.overflow >= last:
                break  # more devices did not bring the closest stage nearer: one part stays too big
            last = found.overflow
            factor = min(max(found.overflow, 1.05), 2.0) if math.isfinite(found.overflow) else 1.1
            count = max(total + 1, math.ceil(total * factor))
        self.short.append(f"more devices (no plan found on the {counts} count(s) tried, up to {tried} devices of "
                          f"{format_bytes(self.cap)})" if tried else
                          f"more devices (over {_MAX_DEVICES} of {format_bytes(self.cap)} needed)")

    def devices(self) -> None:
        opts, req = self.opts, self.req
        if opts.stages is not None or opts.strategy == "single":
            return  # the stages= and strategy= levers say what to drop
        if opts.strategy == "ddp":
            self._ddp_devices()
            return
        floor = self._floor(self.needs, req.batch, opts)
        if not math.isfinite(floor.devices):
            self.floors.append(f"No device count of this size holds a pipeline of it: {floor.why}")
            return
        self.floors.append(f"A pipeline of it needs at least {floor.devices} devices of {format_bytes(self.cap)}: "
                           f"{floor.why}")
        self._more_devices(int(floor.devices), opts, "holds the state and this batch's activations",
                           replicas=floor.replicas)

    def _ddp_devices(self) -> None:
        req, one = self.req, self.needs.at(1 / self.req.batch)
        per_sample = one.activation_bytes + one.transient_bytes
        samples = replica_samples(one, self.cap)
        if samples == 0:
            self.floors.append(
                f"Each DDP replica holds the whole model: {format_bytes(one.state_bytes)} of parameters and "
                f"optimizer state plus {format_bytes(per_sample)} per sample, more than one device's "
                f"{format_bytes(self.cap)} even at one sample, so no device count helps ddp; pipeline and hybrid "
                f"plans split the model over devices")
            return
        replicas = next((r for r in divisors(req.batch) if req.batch // r <= samples), req.batch)
        self.floors.append(
            f"Each DDP replica holds the whole model ({format_bytes(one.state_bytes)} of parameters and optimizer "
            f"state) plus {format_bytes(per_sample)} per sample of its share: a device of {format_bytes(self.cap)} "
            f"holds at most {samples} samples, so the batch of {req.batch} needs at least {replicas} replicas "
            f"(replicas divide the batch)")
        if replicas > req.cluster.num_devices:
            self._more_devices(replicas, self.opts, f"{replicas} replicas of {req.batch // replicas} samples")

    def smaller_batch(self) -> None:
        req, opts = self.req, self.opts
        if req.fixed_batch is not None or req.batch == 1:
            return
        candidates = self._batch_candidates()
        for b in candidates[:_TRIES]:
            found = self._check(req.cluster, b, opts, self._depth(self.needs.at(b / req.batch), b, opts))
            if found.accepted is not None:
                self.ways.append(WayOut(lever="batch", batch=b, plan=found.accepted,
                                        text=f"a batch of {b} instead of {req.batch} "
                                             f"(fits as {found.accepted.describe()})"))
                return
        if candidates:
            self.short.append(f"a smaller batch (batch {candidates[:_TRIES][-1]} did not plan either)")

    def _batch_candidates(self) -> list[int]:
        """Batch sizes below the request's that the floors allow on these devices: the largest,
        then halving, so a few probes span the range."""
        req, opts, n = self.req, self.opts, self.req.cluster.num_devices
        one = self.needs.at(1 / req.batch)
        best, why = 0, ""
        if opts.strategy in (None, "single", "ddp") and opts.stages is None:
            cap = min(self.caps)
            samples = replica_samples(one, cap)
            if opts.strategy in (None, "single"):
                best = max(best, min(samples, req.batch - 1))
            if opts.strategy in (None, "ddp"):
                best = max([best] + [r * min(samples, (req.batch - 1) // r) for r in range(2, n + 1)])
            why = f"one sample needs {format_bytes(one.total)} on one device of {format_bytes(cap)}"
        if opts.strategy in (None, "pipeline", "hybrid") and n >= 2:
            def fits(b: int) -> bool:
                return self._floor(self.needs.at(b / req.batch), b, opts).devices <= n

            if fits(1):  # no batch fits where one sample does not (b micro-batches of one hold as much)
                low, high = 1, req.batch - 1  # the largest batch the floor allows, by bisection
                while low < high:
                    mid = (low + high + 1) // 2
                    low, high = (mid, high) if fits(mid) else (low, mid - 1)
                best = max(best, low)
            else:
                floor = self._floor(one, 1, opts)
                why = (f"a pipeline of one sample needs at least {floor.devices} devices of {format_bytes(self.cap)}"
                       if math.isfinite(floor.devices) else f"a pipeline of one sample: {floor.why}")
        if best < 1:
            if why:
                self.short.append(f"a smaller batch ({why})")
            return []
        out = [best]
        while out[-1] > 1:
            out.append(out[-1] // 2)
        return out

    def lighter_optimizer(self) -> None:
        opts = self.opts
        if not opts.training or opts.optimizer != "adam":
            return
        lighter = self.needs_of("sgd", True)
        what = (f"optimizer='sgd' ({format_bytes(lighter.state_bytes)} of parameters and state instead of "
                f"{format_bytes(self.needs.state_bytes)}")
        trial = dataclasses.replace(opts, optimizer="sgd")
        if opts.strategy not in ("single", "ddp"):
            floor = self._floor(lighter, self.req.batch, trial)
            if floor.devices > self.req.cluster.num_devices:
                self.short.append(f"{what}: a pipeline still needs at least {floor.devices} devices)"
                                  if math.isfinite(floor.devices) else f"{what}: {floor.why})")
                return
        found = self._check(self.req.cluster, self.req.batch, trial, self._depth(lighter, self.req.batch, trial))
        if found.accepted is not None:
            self.ways.append(WayOut(lever="optimizer", options=(("optimizer", "sgd"),), plan=found.accepted,
                                    text=f"{what}; fits as {found.accepted.describe()})"))
        else:
            self.short.append(f"{what}: not enough here)")

    def inference(self) -> None:
        opts = self.opts
        if not opts.training:
            return
        weights = self.needs_of(opts.optimizer, False)
        changes: dict[str, Any] = {"training": False}
        if opts.schedule not in (None, "gpipe"):
            changes["schedule"] = None  # forward only: every schedule is GPipe's fill and drain
        trial = dataclasses.replace(opts, **changes)
        found = self._check(self.req.cluster, self.req.batch, trial, self._depth(weights, self.req.batch, trial))
        what = (f"inference (training=False: {format_bytes(weights.state_bytes)} of weights, no gradients, "
                f"optimizer state or saved activations")
        if found.accepted is not None:
            self.ways.append(WayOut(lever="inference", options=tuple(changes.items()), plan=found.accepted,
                                    text=f"{what}; fits as {found.accepted.describe()})"))
        else:
            self.short.append(f"{what}: not enough here)")

    def forced(self) -> None:
        """Drop each option the request fixed, one at a time."""
        opts = self.opts
        for name in ("strategy", "stages", "microbatches", "schedule"):
            value = getattr(opts, name)
            if value is None:
                continue
            free = dataclasses.replace(opts, **{name: None})
            found = self._check(self.req.cluster, self.req.batch, free, self._depth(self.needs, self.req.batch, free))
            if found.accepted is not None and name == "strategy":
                way = self._concrete(self.req.cluster, found.accepted, f"instead of strategy={value!r}")
                if way is not None:
                    self.ways.append(way)
                    continue
            elif found.accepted is not None:
                self.ways.append(WayOut(lever=name, options=((name, None),), plan=found.accepted,
                                        text=f"{name}=None instead of {value!r} (fits as {found.accepted.describe()})"))
                continue
            self.short.append(f"{name}=None (no plan on these devices either)")
            if name == "strategy" and value in ("single", "ddp") and opts.stages is None:
                floor = self._floor(self.needs, self.req.batch, free)
                if math.isfinite(floor.devices):
                    self.floors.append(f"A pipeline needs at least {floor.devices} devices of "
                                       f"{format_bytes(self.cap)}: {floor.why}")
                    self._more_devices(int(floor.devices), free, "a pipeline splits the model",
                                       replicas=floor.replicas, concrete=True)

    def _concrete(self, cluster: Cluster, found: Accepted, why: str) -> WayOut | None:
        """The strategy (and pipeline depth) a probe found, as options checked on their own."""
        changes: dict[str, Any] = {"strategy": found.strategy,
                                   "stages": found.depth if found.strategy in ("pipeline", "hybrid") else None}
        check = self.probe(cluster, self.req.batch, dataclasses.replace(self.opts, **changes), None)
        if check.accepted is None:
            return None
        said = ", ".join(f"{k}={v!r}" for k, v in changes.items() if v is not None)
        grown = cluster if cluster is not self.req.cluster else None
        where = f"{cluster.num_devices} devices ('{cluster.describe()}'), " if grown is not None else ""
        return WayOut(lever="devices" if grown is not None else "strategy", cluster=grown,
                      devices=grown.describe() if grown is not None else None, options=tuple(changes.items()),
                      plan=check.accepted, text=f"{where}{said} {why} (fits as {check.accepted.describe()})")

    def more_memory(self) -> None:
        """The last resort: devices large enough to hold the whole model, checked like the rest."""
        cluster = self.req.cluster
        spec = max((d.spec for d in cluster.devices), key=lambda s: s.memory_bytes)
        memory = self.needs.total / (1 - self.opts.memory_reserve)
        for _ in range(_TRIES):
            larger = dataclasses.replace(spec, memory_bytes=_spelled(math.ceil(memory)))
            bigger = Cluster.homogeneous(larger, machines=cluster.num_machines,
                                         devices_per_machine=len(cluster.devices_on(0)),
                                         intra_link=cluster.intra_link, inter_link=cluster.inter_link)
            found = self._check(bigger, self.req.batch, self.opts, self._depth(self.needs, self.req.batch, self.opts))
            if found.accepted is not None:
                self.ways.append(WayOut(lever="memory", cluster=bigger, devices=bigger.describe(), plan=found.accepted,
                                        text=f"devices of {format_bytes(larger.memory_bytes)} ('{bigger.describe()}': "
                                             f"fits as {found.accepted.describe()})"))
                return
            memory *= 2

    # -- the message ------------------------------------------------------------------------------

    def error(self, hint: str) -> PlanError:
        req, needs, opts = self.req, self.needs, self.opts
        self.devices()
        self.smaller_batch()
        self.lighter_optimizer()
        self.inference()
        self.forced()
        if not self.ways:
            self.more_memory()
        head = (f"{req.name} needs {format_bytes(needs.total)} for "
                f"{'training with ' + opts.optimizer if opts.training else 'inference'} at batch {req.batch} "
                f"on one device ({format_bytes(needs.state_bytes)} of parameters and optimizer state, "
                f"{format_bytes(needs.activation_bytes)} of activations, {format_bytes(needs.transient_bytes)} "
                f"of temporaries); {req.cluster.describe()} gives {format_bytes(self.caps[0])} per device "
                f"({1 - opts.memory_reserve:.0%} of each), {format_bytes(sum(self.caps))} in all{hint}.")
        parts = [head] + [f + "." for f in self.floors]
        if self.ways:
            parts.append("Ways out, each checked by planning it: " + "; ".join(w.text for w in self.ways) + ".")
        else:
            parts.append("Ways out: none found by changing one of device count, batch, optimizer, mode, forced "
                         "options or device memory.")
        if self.short:
            parts.append("Not enough on its own: " + "; ".join(self.short) + ".")
        error = PlanError(" ".join(parts))
        error.ways_out = tuple(self.ways)  # the ways out as data, to follow them from code
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
    return _Refusal(request, needs, probe).error(hint)
