"""The planner: single device, DDP, pipeline or pipeline x DDP, chosen by simulation.

``plan(model, devices, example_inputs, **options)`` captures the model once, prices it,
then enumerates candidates and keeps the fastest that fits:

- ``single``: the model on one device;
- ``ddp``: R replicas (R divides the batch), each step costs forward + backward on B/R plus
  the part of the ring all-reduce of the gradients that backward cannot hide;
- ``pipeline``: k stages from the partitioner, m micro-batches, a torch schedule, timed by
  :func:`fxshard.simulate.simulate` with per-stage memory under that schedule;
- ``hybrid``: k stages x d replicas, each stage's replicas inside one machine where possible.

Every candidate is kept, ranked, in ``plan.alternatives``. See docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster, DeviceSpec, format_bytes
from fxshard.cost_models import GraphCosts, analyze, cost_models, estimate, scale_batch
from fxshard.errors import CostModelError, PartitionerError, PartitionError, PlanError
from fxshard.passes.cost_graph import cost_graph, placement
from fxshard.passes.partition import partition_graph, partitioners
from fxshard.passes.stages import StageSummary, summarize_stages
from fxshard.plan import Alternative, Estimate, EstimatedNode, ModelInfo, Plan, StagePlan
from fxshard.refusal import Accepted, Needs, Probe, Request, needs_of, refuse
from fxshard.simulate import SCHEDULES, SimulationError, StageTiming, schedule_name, simulate

__all__ = ["PlanOptions", "batch_size_of", "group_link", "plan", "plan_captured", "ring_allreduce_time"]

_ORDER = {"single": 0, "ddp": 1, "pipeline": 2, "hybrid": 3}
# Where torch puts a schedule's stages: one per rank, looped (stage s on rank s % k), or V-shaped.
_LAYOUT = {"gpipe": "flat", "1f1b": "flat", "interleaved1f1b": "loop", "loopedbfs": "loop",
           "interleavedzb": "loop", "zbv": "v"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What to plan for (SPEC: the keyword options of ``fxshard.plan``)."""

    training: bool = True
    optimizer: str = "adam"
    microbatches: int | None = None
    schedule: str | None = None
    partitioner: str = "metis"
    cost_model: str = "analytical"
    strategy: str | None = None
    stages: int | None = None
    loss_fn: Any = None
    seed: int = 0
    memory_reserve: float = 0.05
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.training, bool):
            raise PlanError(f"training={self.training!r}; use True or False")
        if self.schedule is not None:
            try:  # one spelling rule for every entry point: "Interleaved1F1B", "interleaved-1f1b", ...
                object.__setattr__(self, "schedule", schedule_name(self.schedule))
            except SimulationError as e:
                raise PlanError(f"schedule={self.schedule!r} is not a schedule fxshard knows; use None (auto) or "
                                f"one of {', '.join(SCHEDULES)} (torch's names, such as 'Interleaved1F1B', work too, "
                                f"in any case)") from e
        if self.microbatches is not None and (isinstance(self.microbatches, bool)
                                              or not isinstance(self.microbatches, int)):
            raise PlanError(f"microbatches={self.microbatches!r}; use None (auto) or a positive integer")
        if not self.training and self.schedule not in (None, "gpipe"):
            raise PlanError(f"schedule={self.schedule!r} with training=False: inference runs forward only, where "
                            f"every schedule is GPipe's fill and drain; drop schedule= or use 'gpipe'")
        if self.optimizer not in ("adam", "sgd", "none"):
            raise PlanError(f"optimizer={self.optimizer!r}; use 'adam', 'sgd' or 'none'")
        if self.strategy not in (None, *_ORDER):
            raise PlanError(f"strategy={self.strategy!r}; use None (auto) or one of {', '.join(_ORDER)}")
        if self.microbatches is not None and (isinstance(self.microbatches, bool) or self.microbatches < 1):
            raise PlanError(f"microbatches={self.microbatches!r}; use None (auto) or a positive integer")
        if self.stages is not None and (isinstance(self.stages, bool) or not isinstance(self.stages, int)
                                        or self.stages < 2):
            raise PlanError(f"stages={self.stages!r}; use None (auto) or a pipeline depth of at least 2 "
                            f"(one stage is strategy='single' or 'ddp')")
        if self.stages is not None and self.strategy in ("single", "ddp"):
            raise PlanError(f"stages={self.stages} with strategy={self.strategy!r}: {self.strategy} plans have one "
                            f"stage; use strategy='pipeline' or 'hybrid', or drop stages=")
        if self.partitioner not in partitioners():
            raise PlanError(f"partitioner={self.partitioner!r} is not registered; known: {', '.join(partitioners())}")
        if isinstance(self.cost_model, str) and self.cost_model not in cost_models():
            raise CostModelError(f"cost_model={self.cost_model!r} is not registered; known: "
                                 f"{', '.join(cost_models())} (register your own with fxshard.register_cost_model)")
        if not 0 <= self.memory_reserve < 1:
            raise PlanError(f"memory_reserve={self.memory_reserve}; it is a fraction of each device, in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Candidate:
    strategy: str
    stages: tuple[StageSummary, ...]
    devices: tuple[tuple[int, ...], ...]  # per stage: one device per replica
    replicas: int
    microbatches: int
    schedule: str | None
    step_time_s: float
    bubble: float
    allreduce_s: float
    peak: tuple[float, ...]
    capacity: tuple[float, ...]
    partitioner: str
    note: str = ""
    refused: bool = False

    @property
    def fits(self) -> bool:
        return all(p <= c for p, c in zip(self.peak, self.capacity))


class _Pricer:
    """Costs of the captured graph per (device spec, batch fraction), computed once each."""

    def __init__(self, captured: CapturedGraph, cost_model: str, batch: int) -> None:
        self.captured = captured
        self.batch = batch
        self.cost_model = cost_model
        self.works = analyze(captured)
        self._cache: dict[tuple[str, float], GraphCosts] = {}
        self._scale = 1.0  # this pricer's batch over the captured one (smaller batches: refusal probes)
        self._smaller: dict[int, _Pricer] = {}

    def at_batch(self, batch: int) -> _Pricer:
        """The same graph priced at a smaller batch, by the micro-batch scaling the planner uses."""
        if batch == self.batch:
            return self
        if batch not in self._smaller:
            other = object.__new__(_Pricer)
            other.__dict__.update(self.__dict__, batch=batch, _scale=self._scale * batch / self.batch, _smaller={})
            self._smaller[batch] = other  # shares the works and the cost cache (keyed by absolute fraction)
        return self._smaller[batch]

    def costs(self, spec: DeviceSpec, fraction: float = 1.0) -> GraphCosts:
        fraction *= self._scale
        key = (spec.name, fraction)
        if key not in self._cache:
            if self.cost_model == "analytical" or fraction == 1.0:
                works = self.works if fraction == 1.0 else scale_batch(self.works, fraction)
                self._cache[key] = estimate(self.captured, spec, cost_model=self.cost_model, works=works)
            else:  # measured costs: measured once at the full batch, scaled linearly
                full = self.costs(spec, 1.0 / self._scale)
                scaled = scale_batch(self.works, fraction)
                self._cache[key] = dataclasses.replace(full, nodes=tuple(
                    dataclasses.replace(c, work=w, fwd_time_s=c.fwd_time_s * fraction, bwd_time_s=c.bwd_time_s * fraction)
                    for c, w in zip(full.nodes, scaled)))
        return self._cache[key]

    def estimated(self, specs: set[str]) -> tuple[EstimatedNode, ...]:
        """Nodes whose times on these device specs are stand-ins (``NodeTime.estimated``), and why."""
        found: dict[str, str] = {}
        for (name, _), costs in self._cache.items():
            if name in specs:
                for node, reason in costs.estimated.items():
                    found.setdefault(node, reason)
        return tuple(EstimatedNode(node=node, reason=reason) for node, reason in found.items())


def batch_size_of(captured: CapturedGraph, example_inputs: Any, example_kwargs: Mapping | None) -> int:
    """The batch size: the first dimension of the first tensor among the example inputs."""
    for leaf in pytree.tree_leaves((example_inputs, dict(example_kwargs or {}))):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] == 0:
                raise PlanError(f"{captured.model_name}'s example batch is empty (first input has shape "
                                f"{tuple(leaf.shape)}); pass a batch of the size you will train or serve with")
            return int(leaf.shape[0])
    raise PlanError(f"{captured.model_name}'s example inputs hold no tensor with a batch dimension; "
                    f"pass at least one tensor input whose first dimension is the batch")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` over n ranks: 2(n-1)/n x bytes / bandwidth
    plus 2(n-1) latencies."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def group_link(cluster: Cluster, devices: tuple[int, ...]) -> tuple[float, float]:
    """(bandwidth, latency) of the link a group of devices all-reduces over."""
    machines = {cluster.devices[d].machine for d in devices}
    link = cluster.intra_link if len(machines) == 1 else cluster.inter_link
    return link.bandwidth, link.latency_s


def _capacity(cluster: Cluster, d: int, reserve: float, share: int = 1) -> float:
    return cluster.devices[d].spec.memory_bytes * (1 - reserve) / share


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
            partitioner, cost_model, strategy, loss_fn, seed, memory_reserve, name).

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
    _check_request(captured, cluster, batch, opts)
    pricer = _Pricer(captured, opts.cost_model, batch)
    ranked = _search(pricer, cluster, batch, opts)
    best = ranked[0]
    if not best.fits and all(c.refused for c in ranked):
        raise PlanError(f"no schedule runs with these options: {ranked[0].note.rstrip('.')}. Use more micro-batches "
                        f"(microbatches=None picks them), fewer stages, or schedule='gpipe', which takes any count")
    if not best.fits:
        raise _nothing_fits(pricer, cluster, batch, opts, ranked)
    return _assemble(captured, cluster, batch, opts, best, ranked, pricer)


def _search(pricer: _Pricer, cluster: Cluster, batch: int, opts: PlanOptions) -> list[_Candidate]:
    """Every candidate the options allow, best first (those that fit, then by step time)."""
    n = cluster.num_devices
    fixed = pricer.captured.fixed_batch
    candidates: list[_Candidate] = []
    if opts.strategy in (None, "single") and opts.stages is None:
        candidates.append(_data_parallel(pricer, cluster, batch, 1, opts))
    if opts.strategy in (None, "ddp") and n > 1 and opts.stages is None and fixed is None:
        candidates += [_data_parallel(pricer, cluster, batch, r, opts) for r in _divisors(batch) if 2 <= r <= n]
    if opts.strategy in (None, "pipeline", "hybrid") and n > 1:
        candidates += _pipelines(pricer, cluster, batch, opts)
    if not candidates:
        raise PlanError(f"strategy={opts.strategy!r} needs more than {n} device(s) and a batch of {batch} that "
                        f"splits; use more devices or strategy=None")
    return sorted(candidates, key=lambda c: (not c.fits, c.step_time_s * (1 + 1e-9 * _ORDER[c.strategy]),
                                             _ORDER[c.strategy], len(c.devices) * c.replicas))


def _stage_timings(stages: tuple[StageSummary, ...], cluster: Cluster, devices: tuple[tuple[int, ...], ...],
                   training: bool, reduce: tuple[float, ...]) -> list[StageTiming]:
    out = []
    for s, st in enumerate(stages):
        send = 0.0
        if s + 1 < len(stages) and devices[s][0] != devices[s + 1][0]:
            send = cluster.link(devices[s][0], devices[s + 1][0]).transfer_time(st.send_bytes)
        out.append(StageTiming(fwd_s=st.fwd_time_s, bwd_s=st.bwd_time_s if training else 0.0,
                               send_fwd_s=send, send_bwd_s=send if training else 0.0,
                               activation_bytes=st.activation_bytes, static_bytes=st.state_bytes,
                               transient_bytes=st.transient_bytes, reduce_s=reduce[s]))
    return out


def _data_parallel(pricer: _Pricer, cluster: Cluster, batch: int, replicas: int, opts: PlanOptions) -> _Candidate:
    used = tuple(range(replicas))
    spec_costs = {cluster.devices[d].spec.name: pricer.costs(cluster.devices[d].spec, 1 / replicas) for d in used}
    slowest = max(spec_costs.values(), key=lambda c: c.fwd_time_s + c.bwd_time_s)
    stage = summarize_stages(pricer.captured, slowest, {}, 1, training=opts.training, optimizer=opts.optimizer)[0]
    allreduce = 0.0
    if opts.training and replicas > 1:
        bw, lat = group_link(cluster, used)
        allreduce = ring_allreduce_time(stage.param_bytes, replicas, bw, lat)
    bwd = stage.bwd_time_s if opts.training else 0.0
    exposed = max(0.0, allreduce - bwd)  # DDP overlaps the bucketed all-reduce with backward
    step = stage.fwd_time_s + bwd + exposed
    peak = stage.state_bytes + stage.activation_bytes + stage.transient_bytes
    return _Candidate(strategy="single" if replicas == 1 else "ddp", stages=(stage,), devices=(used,),
                      replicas=replicas, microbatches=1, schedule=None, step_time_s=step, bubble=0.0,
                      allreduce_s=exposed, peak=(peak,) * 1,
                      capacity=(min(_capacity(cluster, d, opts.memory_reserve) for d in used),),
                      partitioner=opts.partitioner)


def _check_request(captured: CapturedGraph, cluster: Cluster, batch: int, opts: PlanOptions) -> None:
    """Refuse requests no plan can meet, saying why, before any pricing or search."""
    name = captured.model_name
    n = cluster.num_devices
    fixed = captured.fixed_batch
    if fixed is not None and ((opts.microbatches or 1) > 1 or opts.strategy in ("ddp", "hybrid")):
        raise PlanError(
            f"{name} captured with its batch fixed at {fixed} (torch.export had to specialise on the batch size: "
            f"the model branches on it), so its graph cannot run on micro-batches or replica shards, which "
            f"microbatches={opts.microbatches} strategy={opts.strategy!r} need. Use microbatches=1 with strategy "
            f"'single' or 'pipeline', or remove the branch on the batch size from the model")
    if opts.stages is not None and opts.stages > n:
        raise PlanError(f"stages={opts.stages} needs at least {opts.stages} devices; the cluster has {n}. Use "
                        f"stages<={n} or more devices")
    if opts.training and not any(p.requires_grad for p in captured.gm.parameters()):
        raise PlanError(f"{name} has no trainable parameters, so there is nothing to train (or to split by "
                        f"weight); plan it with training=False (--inference), or check that the model was built "
                        f"(an empty nn.Sequential?) and that its parameters have requires_grad=True")
    ops = sum(1 for n in captured.nodes if n.op in ("call_function", "call_method", "call_module"))
    if opts.stages is not None and opts.stages > ops:
        raise PlanError(f"stages={opts.stages} but {name} has only {ops} operation(s) to place "
                        f"({len(captured.nodes)} graph nodes with inputs and outputs); use stages<={max(ops, 2)} "
                        f"or a larger model")
    if opts.microbatches is not None and opts.strategy in ("pipeline", "hybrid"):
        replicas = [1] if opts.strategy == "pipeline" else [d for d in _divisors(batch) if d >= 2]
        if not any((batch // d) % opts.microbatches == 0 for d in replicas):
            raise PlanError(f"microbatches={opts.microbatches} does not divide the batch of {batch}"
                            + (" into replicas' equal shares" if opts.strategy == "hybrid" else "")
                            + f"; use one of {', '.join(map(str, _divisors(batch)))}")


def _stage_counts(n_devices: int, replicas: int) -> list[int]:
    top = n_devices // replicas
    counts = {k for k in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if k <= top}
    if top >= 2:
        counts.add(top)
    return sorted(counts)


def _replica_layout(cluster: Cluster, k: int, d: int) -> tuple[tuple[int, ...], ...]:
    """Devices of each stage's d replicas: consecutive ranks, so replicas share a machine when
    d divides the machine size."""
    return tuple(tuple(range(s * d, s * d + d)) for s in range(k))


def _pipelines(pricer: _Pricer, cluster: Cluster, batch: int, opts: PlanOptions) -> list[_Candidate]:
    n = cluster.num_devices
    out: list[_Candidate] = []
    replica_options = [1] if opts.strategy == "pipeline" or pricer.captured.fixed_batch else _divisors(batch)
    if opts.strategy == "hybrid":
        replica_options = [r for r in replica_options if r >= 2]
    if opts.strategy is None:
        replica_options = [r for r in replica_options if r <= n // 2]
    schedules = [opts.schedule] if opts.schedule else ["gpipe", "1f1b", "interleaved1f1b", "zbv"]
    if not opts.training:
        schedules = ["gpipe"]  # forward only: every schedule reduces to filling the pipe
    for d in replica_options:
        per_replica = batch // d
        counts = _stage_counts(n, d)
        if opts.stages is not None:
            counts = [opts.stages] if opts.stages * d <= n else []
        for k in counts:
            layout = _replica_layout(cluster, k, d)
            for shape in sorted({_LAYOUT[s] for s in schedules}):
                group = [s for s in schedules if _LAYOUT[s] == shape]
                virtual = SCHEDULES[group[0]][1]
                if not any(_microbatch_options(per_replica, k, s, opts, pricer.captured.fixed_batch) for s in group):
                    continue  # no micro-batch count these schedules take (1F1B: at least one per stage)
                try:
                    stage_of, stage_devices = _partition(pricer, cluster, k, virtual, shape, layout, group, opts,
                                                         per_replica)
                except PartitionerError:
                    raise  # a broken plug-in partitioner, not a model that does not fit
                except PartitionError as e:
                    out.append(_unfit(d, k, group[0], str(e), layout, opts))
                    continue
                for sched in group:
                    for m in _microbatch_options(per_replica, k, sched, opts, pricer.captured.fixed_batch):
                        out.append(_simulate_candidate(pricer, cluster, stage_of, stage_devices, d, m, sched, opts))
    return out


def _unfit(d: int, k: int, sched: str, why: str, layout: tuple, opts: PlanOptions, *,
           refused: bool = False) -> _Candidate:
    """A candidate that cannot run: its partition does not fit, or (``refused``) torch's
    schedule refuses its stage and micro-batch counts."""
    return _Candidate(strategy="pipeline" if d == 1 else "hybrid", stages=(), devices=layout, replicas=d,
                      microbatches=1, schedule=sched, step_time_s=math.inf, bubble=0.0, allreduce_s=0.0,
                      peak=(math.inf,), capacity=(0.0,), partitioner=opts.partitioner, note=why, refused=refused)


def _microbatch_options(per_replica: int, k: int, sched: str, opts: PlanOptions,
                        fixed_batch: int | None = None) -> list[int]:
    if fixed_batch is not None:
        return [1]  # the graph runs only at its captured batch size
    if opts.microbatches is not None:
        return [opts.microbatches] if per_replica % opts.microbatches == 0 else []
    options = [m for m in _divisors(per_replica) if m <= 128]
    if sched != "gpipe":
        options = [m for m in options if m >= k]
    return options[-4:] if len(options) > 4 else options


def _partition(pricer: _Pricer, cluster: Cluster, k: int, virtual: int, shape: str, layout: tuple,
               schedules: list[str], opts: PlanOptions,
               per_replica: int) -> tuple[dict[str, int], tuple[tuple[int, ...], ...]]:
    """Partition into k x virtual stages; returns node -> stage and each stage's devices."""
    n_stages = k * virtual
    if shape == "flat":
        stage_devices = layout
    elif shape == "v":  # V shape (ZBVZeroBubble): rank r holds stages r and 2k - 1 - r
        stage_devices = tuple(layout[s] if s < k else layout[2 * k - 1 - s] for s in range(n_stages))
    else:  # looped (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble): stage s on rank s % k
        stage_devices = tuple(layout[s % k] for s in range(n_stages))
    reps = [devs[0] for devs in stage_devices]
    place = placement(cluster, n_stages, captured=pricer.captured, works=pricer.works, devices=reps,
                      memory_reserve=opts.memory_reserve)
    costs = pricer.costs(place.reference, 1.0)
    # Costs are at the captured batch; a stage holds about min(stages, m) micro-batches of
    # batch / (replicas x m) each under 1F1B, so the partitioner sees that share of the
    # full-batch activations (the exact per-schedule memory is checked after simulation).
    d = pricer.batch // per_replica
    m_max = max(_microbatch_options(per_replica, k, schedules[0], opts, pricer.captured.fixed_batch) or [1])
    factor = min(1.0, n_stages / m_max) / d
    graph = cost_graph(pricer.captured, costs, link=place.reference_link, training=opts.training,
                       optimizer=opts.optimizer, activation_factor=factor)
    part = partition_graph(graph, n_stages, partitioner=opts.partitioner, memory_limit=place.memory_limit,
                           seed=opts.seed, speeds=place.speeds, link=place.link)
    if not part.is_acyclic:
        u, v = next((u, v) for u, v in graph.edges if part.stage_of[u] > part.stage_of[v])
        raise PlanError(f"partitioner {opts.partitioner!r} put {u!r} on stage {part.stage_of[u]} and its consumer "
                        f"{v!r} on stage {part.stage_of[v]}: a pipeline stage may only read from earlier stages. "
                        f"Fix the partitioner (fxshard.passes.partition.refine.repair(problem, labels) makes any "
                        f"assignment acyclic) or use partitioner='metis'")
    return dict(part.stage_of), stage_devices


def _simulate_candidate(pricer: _Pricer, cluster: Cluster, stage_of: dict[str, int],
                        stage_devices: tuple[tuple[int, ...], ...], d: int, m: int, sched: str,
                        opts: PlanOptions) -> _Candidate:
    n_stages = len(stage_devices)
    fraction = 1.0 / (d * m)
    ref = cluster.devices[stage_devices[0][0]].spec
    base = pricer.costs(ref, fraction)
    per_stage = [pricer.costs(cluster.devices[devs[0]].spec, fraction) for devs in stage_devices]
    stages = summarize_stages(pricer.captured, base, stage_of, n_stages, training=opts.training,
                              optimizer=opts.optimizer, stage_costs=per_stage)
    reduce = []
    for st, devs in zip(stages, stage_devices):
        if opts.training and d > 1:
            bw, lat = group_link(cluster, devs)
            reduce.append(max(0.0, ring_allreduce_time(st.param_bytes, d, bw, lat) - st.bwd_time_s))
        else:
            reduce.append(0.0)
    try:
        result = simulate(sched, _stage_timings(tuple(stages), cluster, stage_devices, opts.training, tuple(reduce)), m)
    except SimulationError as e:
        return _unfit(d, n_stages, sched, str(e), stage_devices, opts, refused=True)
    share = {devs[0]: sum(1 for x in stage_devices if x[0] == devs[0]) for devs in stage_devices}
    capacity = tuple(min(_capacity(cluster, dv, opts.memory_reserve, share[devs[0]]) for dv in devs)
                     for devs in stage_devices)
    return _Candidate(strategy="pipeline" if d == 1 else "hybrid", stages=tuple(stages), devices=stage_devices,
                      replicas=d, microbatches=m, schedule=sched, step_time_s=result.step_time_s,
                      bubble=result.bubble_fraction, allreduce_s=max(reduce) if reduce else 0.0,
                      peak=result.peak_memory_bytes, capacity=capacity, partitioner=opts.partitioner)


def _device_name(cluster: Cluster, d: int) -> str:
    dev = cluster.devices[d]
    return dev.torch_device if cluster.num_machines == 1 else f"m{dev.machine}/{dev.torch_device}"


def _lower_bound(pricer: _Pricer, cluster: Cluster, used: set[int], training: bool) -> float:
    rate = 0.0
    for d in used:
        c = pricer.costs(cluster.devices[d].spec, 1.0)
        rate += 1.0 / (c.fwd_time_s + (c.bwd_time_s if training else 0.0))
    return 1.0 / rate


def _alternative(c: _Candidate, batch: int) -> Alternative:
    return Alternative(strategy=c.strategy, stages=len(c.devices), replicas=c.replicas, microbatches=c.microbatches,
                       schedule=c.schedule, step_time_s=c.step_time_s if math.isfinite(c.step_time_s) else -1.0,
                       samples_per_s=batch / c.step_time_s if math.isfinite(c.step_time_s) and c.step_time_s > 0 else 0.0,
                       peak_memory_bytes=max(c.peak) if all(math.isfinite(p) for p in c.peak) else -1.0,
                       fits=c.fits, note=c.note or ("" if c.fits else _over(c)))


def _over(c: _Candidate) -> str:
    worst = max(range(len(c.peak)), key=lambda i: c.peak[i] - c.capacity[i])
    return (f"stage {worst} needs {format_bytes(c.peak[worst])}, device has {format_bytes(c.capacity[worst])}")


def _assemble(captured: CapturedGraph, cluster: Cluster, batch: int, opts: PlanOptions, best: _Candidate,
              ranked: list[_Candidate], pricer: _Pricer) -> Plan:
    used = {d for devs in best.devices for d in devs}
    stages = []
    for st, devs, peak, cap in zip(best.stages, best.devices, best.peak, best.capacity):
        stages.append(StagePlan(index=st.index, devices=tuple(_device_name(cluster, d) for d in devs),
                                device_indices=tuple(devs), nodes=st.nodes, flops=st.fwd_flops,
                                param_bytes=st.param_bytes, peak_memory_bytes=float(peak),
                                memory_capacity_bytes=float(cap), fwd_time_s=st.fwd_time_s,
                                bwd_time_s=st.bwd_time_s, send_bytes=st.send_bytes,
                                first_module=st.first_module, last_module=st.last_module))
    full = pricer.costs(cluster.devices[0].spec, 1.0)
    estimate_ = Estimate(step_time_s=best.step_time_s, bubble_fraction=best.bubble,
                         samples_per_s=batch / best.step_time_s if best.step_time_s > 0 else 0.0,
                         lower_bound_step_time_s=_lower_bound(pricer, cluster, used, opts.training),
                         allreduce_time_s=best.allreduce_s)
    seen, alternatives = set(), []
    for c in ranked:
        key = (c.strategy, len(c.devices), c.replicas, c.microbatches, c.schedule)
        if key not in seen:
            seen.add(key)
            alternatives.append(_alternative(c, batch))
    return Plan(strategy=best.strategy, partitioner=best.partitioner, schedule=best.schedule,
                microbatches=best.microbatches, replicas=best.replicas, batch_size=batch, training=opts.training,
                optimizer=opts.optimizer if opts.training else "none", cluster=cluster.to_dict(),
                model=ModelInfo(name=opts.name or captured.model_name, nodes=len(captured.nodes),
                                param_bytes=full.param_bytes, fingerprint=captured.fingerprint(),
                                method=captured.method),
                stages=tuple(stages), estimate=estimate_, reason=_reason(best, ranked, cluster, batch, opts),
                alternatives=tuple(alternatives[:16]),
                estimated_nodes=pricer.estimated({cluster.devices[d].spec.name for d in used}))


def _reason(best: _Candidate, ranked: list[_Candidate], cluster: Cluster, batch: int, opts: PlanOptions) -> str:
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
    used = _devices_used(best)
    if used < cluster.num_devices:
        better = [c for c in ranked if c.fits and _devices_used(c) > used]
        if best.strategy == "ddp" and batch % cluster.num_devices:
            parts.append(f"uses {used} of {cluster.num_devices} devices: replicas must divide the batch of {batch}")
        elif better:
            parts.append(f"uses {used} of {cluster.num_devices} devices: more devices were slower "
                         f"(best with more: {batch / better[0].step_time_s:.1f} samples/s)")
        else:
            parts.append(f"uses {used} of {cluster.num_devices} devices")
    runner = next((c for c in ranked[1:] if c.fits), None)
    if runner is not None:
        parts.append(f"next best: {runner.strategy} ({_shape(runner)}) at {batch / runner.step_time_s:.1f} samples/s")
    return "; ".join(parts)


def _shape(c: _Candidate) -> str:
    """A candidate's shape as ``Plan.shape_text`` words it, with its schedule."""
    if c.strategy in ("single", "ddp"):
        return "1 device" if c.replicas == 1 else f"{c.replicas} data-parallel replicas"
    k = len(c.devices)
    shape = f"{k} stage{'s' if k > 1 else ''}" + (f" x {c.replicas} replicas" if c.replicas > 1 else "")
    per = SCHEDULES[c.schedule][1] if c.schedule else 1
    shape += f", {per} stages per device ({c.schedule})" if per > 1 else f", {c.schedule}" if c.schedule else ""
    used = _devices_used(c)
    return f"{shape}, {used} device{'s' if used > 1 else ''}"


def _devices_used(c: _Candidate) -> int:
    return len({d for devs in c.devices for d in devs})


def _nothing_fits(pricer: _Pricer, cluster: Cluster, batch: int, opts: PlanOptions,
                  ranked: list[_Candidate]) -> PlanError:
    """The refusal: numbers, floors and ways out, each way out checked by :func:`_probe`
    (fxshard/refusal.py)."""
    full = pricer.costs(cluster.devices[0].spec, 1.0)

    def needs(optimizer: str, training: bool) -> Needs:
        one = summarize_stages(pricer.captured, full, {}, 1, training=training, optimizer=optimizer)[0]
        return needs_of(pricer.captured, full, training=training, optimizer=optimizer, state_bytes=one.state_bytes,
                        activation_bytes=one.activation_bytes, transient_bytes=one.transient_bytes)

    simulated = [c for c in ranked if c.stages and c.strategy in ("pipeline", "hybrid")]
    unfit = [c for c in ranked if not c.stages and c.note]
    hint = ""
    if simulated:
        closest = min(simulated, key=_overflow)
        hint = (f"; the closest pipeline ({len(closest.devices)} stages, {closest.schedule}, "
                f"{closest.microbatches} micro-batches): {_over(closest)}")
    elif unfit:
        widest = max(unfit, key=lambda c: len(c.devices))
        hint = f"; a pipeline of {len(widest.devices)} stages: {widest.note.split('; use at least')[0]}"
    request = Request(name=pricer.captured.model_name, cluster=cluster, batch=batch, opts=opts,
                      fixed_batch=pricer.captured.fixed_batch)
    return refuse(request, needs, lambda c, b, o, depth: _probe(pricer, c, b, o, depth), hint)


def _overflow(c: _Candidate) -> float:
    return max(p / q if q > 0 else math.inf for p, q in zip(c.peak, c.capacity))


def _probe(pricer: _Pricer, cluster: Cluster, batch: int, opts: PlanOptions, depth: int | None = None) -> Probe:
    """What :func:`plan_captured` would find for another cluster, batch or options (a refusal's
    way out), sharing ``pricer``'s costs (a smaller batch is priced by scaling). With ``depth``,
    only pipelines of the first depth >= ``depth`` that the full search tries are searched: a
    part of the full search, so a plan found there is one the full search finds too."""
    n = cluster.num_devices
    trial, keep = opts, None
    if depth is not None:
        depths = [k for k in _stage_counts(n, 1) if k >= depth]
        if not depths:
            return Probe(accepted=None)
        trial = dataclasses.replace(opts, stages=depths[0])
        keep = lambda c: _devices_used(c) // c.replicas in _stage_counts(n, c.replicas)
    try:
        _check_request(pricer.captured, cluster, batch, trial)
        ranked = _search(pricer.at_batch(batch), cluster, batch, trial)
    except (PlanError, PartitionError):
        return Probe(accepted=None)
    ranked = [c for c in ranked if keep is None or not c.stages or keep(c)]
    best = next((c for c in ranked if c.fits), None)
    if best is None:
        pipelines = [c for c in ranked if c.stages and c.strategy in ("pipeline", "hybrid")]
        return Probe(accepted=None, overflow=min((_overflow(c) for c in pipelines), default=math.inf))
    worst = max(range(len(best.peak)), key=lambda i: best.peak[i] / best.capacity[i])
    return Probe(accepted=Accepted(strategy=best.strategy, stages=len(best.devices), replicas=best.replicas,
                                   depth=_devices_used(best) // best.replicas,
                                   schedule=best.schedule, microbatches=best.microbatches,
                                   peak_bytes=float(best.peak[worst]), capacity_bytes=float(best.capacity[worst])))
