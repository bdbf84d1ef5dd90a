"""What every way out of a refusal shares: the request's figures, the probes, and what a lever found.

A way out (fxshard/refusal/ways_out.py) is a function of one frozen :class:`Context` that
returns a :class:`Found`: the ways out it checked, the levers not enough on their own, and the
floors behind its device counts. The helpers here probe growing device counts and pin a found
strategy down as options. See docs/planning.md ("When nothing fits").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fxshard.cluster import Cluster, format_bytes, parse_bytes
from fxshard.devices import format_budget
from fxshard.plan_options import DATA_PARALLEL_GROUPS
from fxshard.refusal.floors import Floor, Needs, pipeline_floor
from fxshard.refusal.records import Accepted, NeedsFn, Probe, ProbeFn, Request, WayOut

__all__ = ["TRIES", "Context", "Found", "concrete", "grow", "more_devices", "spelled"]

TRIES = 3  # device counts or batch sizes probed per lever: each probe is a search of the planner
_MAX_DEVICES = 1 << 14  # the largest cluster a way out proposes
_NEAR = 1.1  # a deepest pipeline within 10% of fitting: grow the count rather than search it all


@dataclasses.dataclass(frozen=True, kw_only=True)
class Found:
    """What one lever found: ways out (each checked by planning it), levers not enough on their
    own (and why), and the arithmetic behind the device counts; ``+`` keeps each in order."""

    ways: tuple[WayOut, ...] = ()
    short: tuple[str, ...] = ()
    floors: tuple[str, ...] = ()

    def __add__(self, other: Found) -> Found:
        return Found(ways=self.ways + other.ways, short=self.short + other.short, floors=self.floors + other.floors)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Context:
    """One refusal's shared figures: the request, the model's needs and the planner's probe."""

    req: Request
    needs_of: NeedsFn
    probe: ProbeFn
    needs: Needs  # at the request's batch, optimizer and mode
    caps: tuple[float, ...]  # usable bytes per device

    @classmethod
    def of(cls, request: Request, needs: NeedsFn, probe: ProbeFn) -> Context:
        opts = request.opts
        return cls(req=request, needs_of=needs, probe=probe, needs=needs(opts.optimizer, opts.training),
                   caps=tuple(d.spec.memory_bytes * (1 - opts.memory_reserve) for d in request.cluster.devices))

    @property
    def opts(self) -> Any:
        return self.req.opts

    @property
    def cap(self) -> float:
        return max(self.caps)

    def floor(self, needs: Needs, batch: int, opts: Any) -> Floor:
        return pipeline_floor(needs, batch, self.cap, opts, fixed_batch=self.req.fixed_batch)

    def depth(self, needs: Needs, batch: int, opts: Any) -> float | None:
        floor = self.floor(needs, batch, opts)
        return math.ceil(floor.devices / floor.replicas) if math.isfinite(floor.devices) else None

    def check(self, cluster: Cluster, batch: int, opts: Any, depth: float | None = None) -> Probe:
        """The planner's answer: first among pipelines of the floor's depth (a part of its search
        that usually holds the plan, and cheap), then the whole search."""
        if depth is not None and math.isfinite(depth) and opts.strategy not in ("single", "ddp") \
                and opts.stages is None:
            found = self.probe(cluster, batch, opts, max(2, int(depth)))
            if found.accepted is not None:
                return found
        return self.probe(cluster, batch, opts, None)


def spelled(nbytes: int) -> int:
    """The least budget of at least ``nbytes`` that a cluster string spells exactly."""
    while (written := parse_bytes(format_budget(nbytes))) < nbytes:
        nbytes += max(1, nbytes // 1000)
    return written


def grow(cluster: Cluster, n: int) -> Cluster:
    """n or more devices of the cluster's largest kind, in machines of the cluster's machine size."""
    spec = max((d.spec for d in cluster.devices), key=lambda s: s.memory_bytes)
    per = len(cluster.devices_on(0)) if cluster.num_machines > 1 else n
    machines = math.ceil(n / per)
    return Cluster.homogeneous(spec, machines=machines, devices_per_machine=per if machines > 1 else n,
                               intra_link=cluster.intra_link, inter_link=cluster.inter_link)


def _whole(ctx: Context, grown: Cluster, opts: Any, found: Probe) -> Probe:
    """The whole search on ``grown`` unless ``found`` (the deepest pipeline) fit or nearly fit:
    replicas of shallower pipelines may fit where the deepest does not (not worth it when the
    deepest nearly fits: a few more devices will do)."""
    if found.accepted is None and found.overflow > _NEAR:
        whole = ctx.probe(grown, ctx.req.batch, opts, None)
        return whole if whole.accepted is not None or whole.overflow < found.overflow else found
    return found


def more_devices(ctx: Context, start: int, opts: Any, covers: str, *, replicas: int = 1,
                 concrete_options: bool = False) -> Found:
    """Probe growing device counts from ``start``; offer the first that plans."""
    count, last, tried, counts = max(start, ctx.req.cluster.num_devices + 1), math.inf, 0, 0
    deep, deep_last = opts.strategy in (None, "pipeline", "hybrid") and opts.stages is None, math.inf
    for _ in range(TRIES):
        if count > _MAX_DEVICES:
            break
        grown = grow(ctx.req.cluster, count)
        total = tried = grown.num_devices
        counts += 1
        found = Probe(accepted=None)
        if deep:  # the deepest pipeline these devices give the floor's replicas: cheap, and usually fits
            found = ctx.probe(grown, ctx.req.batch, opts, max(2, total // replicas))
            deep = found.accepted is not None or not math.isfinite(found.overflow) or found.overflow < deep_last
            deep_last = found.overflow
        found = _whole(ctx, grown, opts, found)
        way = None
        if found.accepted is not None and concrete_options:
            way = concrete(ctx, grown, found.accepted, f"instead of strategy={ctx.opts.strategy!r}: {covers}")
        elif found.accepted is not None:
            way = WayOut(lever="devices", cluster=grown, devices=grown.describe(), plan=found.accepted,
                         text=(f"{total} devices ('{grown.describe()}': {covers}; fits as "
                               f"{found.accepted.describe()})"))
        if way is not None:
            return Found(ways=(way,))
        if math.isfinite(found.overflow) and found.overflow >= last:
            break  # more devices did not bring the closest stage nearer: one part stays too big
        last = found.overflow
        factor = min(max(found.overflow, 1.05), 2.0) if math.isfinite(found.overflow) else 1.1
        count = max(total + 1, math.ceil(total * factor))
    return Found(short=(f"more devices (no plan found on the {counts} count(s) tried, up to {tried} devices of "
                        f"{format_bytes(ctx.cap)})" if tried else
                        f"more devices (over {_MAX_DEVICES} of {format_bytes(ctx.cap)} needed)",))


def concrete(ctx: Context, cluster: Cluster, found: Accepted, why: str) -> WayOut | None:
    """The strategy (and pipeline depth) a probe found, as options checked on their own."""
    changes: dict[str, Any] = {"strategy": found.strategy,
                               "stages": found.depth if found.strategy in ("pipeline", "hybrid") else None}
    if ctx.opts.data_parallel not in (None, *DATA_PARALLEL_GROUPS[found.strategy]):
        changes["data_parallel"] = None  # the forced kind of group is not one this strategy has
    check = ctx.probe(cluster, ctx.req.batch, dataclasses.replace(ctx.opts, **changes), None)
    if check.accepted is None:
        return None
    said = ", ".join(f"{k}={v!r}" for k, v in changes.items() if v is not None or k == "data_parallel")
    grown = cluster if cluster is not ctx.req.cluster else None
    where = f"{cluster.num_devices} devices ('{cluster.describe()}'), " if grown is not None else ""
    return WayOut(lever="devices" if grown is not None else "strategy", cluster=grown,
                  devices=grown.describe() if grown is not None else None, options=tuple(changes.items()),
                  plan=check.accepted, text=f"{where}{said} {why} (fits as {check.accepted.describe()})")
