"""The planner's candidates: what each shape costs.

Which shapes the planner tries (:class:`Shape`, :func:`pipeline_groups`) and the bound it prunes
them by (:func:`shape_bound`) are in fxshard/candidate_shapes.py, re-exported here. Pricing
turns a shape into a :class:`Priced` record (step time from :func:`fxshard.simulate.simulate`,
per-stage peak memory and capacity) with the costs a :class:`Pricer` computes once per device
spec and batch share. Each shape is priced under the memory levers the options allow
(:func:`lever_choices`: replicated or sharded data-parallel groups, activation checkpointing,
gradient accumulation), arithmetically on the same stage figures (fxshard/levers.py). The
whole-model candidates (one copy of the model per device) are priced in
fxshard/candidates_whole.py. See docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import networkx as nx

from fxshard.candidate_shapes import (
    MAX_MICROBATCHES,
    PipelineGroup,
    Shape,
    microbatch_counts,
    pipeline_groups,
    rank_devices,
    shape_bound,
    stage_counts,
    stage_devices_of,
)
from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster, DeviceSpec
from fxshard.comm import exposed_allreduce_time, tied_syncs
from fxshard.cost_models import CostModel, GraphCosts, analyze, estimate, get_cost_model, scale_batch
from fxshard.cost_models.checkpointing import checkpoint_cost as default_checkpoint_cost
from fxshard.cost_models.loss import LossGraph, with_loss
from fxshard.cost_models.optimizer_step import StepRates, optimizer_step_transient_bytes
from fxshard.errors import PartitionError, PlanError
from fxshard.levers import (
    CheckpointCostFn,
    Levers,
    ModelFacts,
    PartitionBound,
    checkpointed,
    lever_choices,
    partition_bound,
    pipeline_fsdp,
)
from fxshard.passes.cost_graph import cost_graph, layer_labels, partition_model, placement
from fxshard.passes.partition import Partition
from fxshard.passes.stages import StageSummary, summarize_stages
from fxshard.passes.tied import parameter_readers, tied_parameters
from fxshard.plan import EstimatedNode, TiedParameter
from fxshard.plan_options import PlanOptions
from fxshard.simulate import SimulationError, StageFigures, StageTiming, simulate, stage_timings

__all__ = ["MAX_MICROBATCHES", "PipelineGroup", "Priced", "Pricer", "Shape", "device_capacity", "lever_choices",
           "microbatch_counts", "optimizer_figures", "partition_group", "pipeline_groups", "price_levers",
           "price_pipeline", "rank_devices", "receive_buffer_bytes", "shape_bound", "stage_counts", "step_passes",
           "unfit"]


class Pricer:
    """Costs of the captured graph per (device spec, batch fraction), computed once each."""

    def __init__(self, captured: CapturedGraph, cost_model: str | CostModel, batch: int, *,
                 checkpoint_cost: CheckpointCostFn | None = None, loss: LossGraph | None = None) -> None:
        self.captured = captured
        cost_model = get_cost_model(cost_model)  # one instance: what it measures, it measures once
        # The training loss on the last stage (fxshard/cost_models/loss.py), priced by its own pricer.
        self.loss = loss or LossGraph(None, "")
        self._loss = Pricer(self.loss.captured, cost_model, batch) if self.loss.captured is not None else None
        self.batch = batch
        self.cost_model = cost_model
        self.works = analyze(captured)
        self.facts = ModelFacts(captured)  # repeated blocks and parameter shapes, for the levers
        self.checkpoint_cost = checkpoint_cost or default_checkpoint_cost
        self._cache: dict[tuple[str, float], GraphCosts] = {}
        self._bounds: dict[tuple[str, str, int], PartitionBound] = {}
        self._scale = 1.0  # this pricer's batch over the captured one (smaller batches: refusal probes)
        self._smaller: dict[int, Pricer] = {}
        self._layers: dict[str, str] | None = None
        # Cost graphs and partitions (or why none fits) by the values they are computed from, so
        # shapes with equal partition inputs (replica counts, schedules) share one partition.
        self._graphs: dict[tuple, nx.DiGraph] = {}
        self._partitions: dict[tuple, tuple[Partition, nx.DiGraph] | PartitionError] = {}

    @functools.cached_property
    def readers(self) -> dict[str, tuple[int, tuple[str, ...]]]:  # parameters several nodes read: passes/tied.py
        return parameter_readers(self.captured, self.works)

    def at_batch(self, batch: int) -> Pricer:
        """The same graph priced at a smaller batch, by the micro-batch scaling the planner uses."""
        if batch == self.batch:
            return self
        if batch not in self._smaller:
            other = object.__new__(Pricer)
            other.__dict__.update(self.__dict__, batch=batch, _scale=self._scale * batch / self.batch, _smaller={},
                                  _bounds={}, _graphs={}, _partitions={})
            self._smaller[batch] = other  # shares the works and the cost cache (keyed by absolute fraction)
        return self._smaller[batch]

    def prepare(self, specs: Sequence[DeviceSpec], fractions: Sequence[float]) -> None:
        """Tell a measuring cost model every micro-batch (``fractions`` of this pricer's batch) the
        search may price on ``specs``, before any is priced: its optional ``prepare(captured,
        device, fractions)`` hook measures them together (the profiled model takes their samples
        in turns, so the sizes are compared under the same machine). The loss graph too."""
        hook = getattr(self.cost_model, "prepare", None)
        if not callable(hook):
            return
        for pricer in (self, self._loss) if self._loss is not None else (self,):
            for spec in {s.name: s for s in specs}.values():
                hook(pricer.captured, spec, [f * pricer._scale for f in fractions])

    def costs(self, spec: DeviceSpec, fraction: float = 1.0) -> GraphCosts:
        fraction *= self._scale
        key = (spec.name, fraction)
        if key not in self._cache:
            # Every cost model prices the micro-batch itself (the profiled one measures each size where it runs).
            works = self.works if fraction == 1.0 else scale_batch(self.works, fraction)
            self._cache[key] = estimate(self.captured, spec, cost_model=self.cost_model, works=works)
        return self._cache[key]

    def loss_summary(self, spec: DeviceSpec, fraction: float) -> StageSummary | None:
        """The loss's figures on ``spec`` at ``fraction`` of this pricer's batch (None: no loss priced)."""
        if self._loss is None:
            return None
        costs = self._loss.costs(spec, fraction * self._scale)
        return summarize_stages(self._loss.captured, costs, {}, 1)[0]

    def with_loss(self, stage: StageSummary, spec: DeviceSpec, fraction: float, opts: PlanOptions) -> StageSummary:
        """``stage``, the last of a training step, with the loss computed on it per micro-batch."""
        loss = self.loss_summary(spec, fraction) if opts.training else None
        return with_loss(stage, loss) if loss is not None else stage

    def bound(self, spec: DeviceSpec, group: PipelineGroup, opts: PlanOptions) -> PartitionBound:
        """The partitioner's memory bound for ``group``: its stages under the most permissive
        levers the options allow (the last checkpointing policy; FSDP-sharded state when its
        data-parallel groups may shard), so a partition is refused only when no lever fits it."""
        key = _bound_key(spec, group, opts)
        if key not in self._bounds:
            _, policy, shards = key
            self._bounds[key] = partition_bound(self.facts, self.costs(spec, 1.0), policy=policy, shards=shards,
                                                training=opts.training, optimizer=opts.optimizer)
        return self._bounds[key]

    def partition(self, cluster: Cluster, n_stages: int, devices: list[int], factor: float, opts: PlanOptions,
                  bound_of: PipelineGroup | None = None) -> tuple[Partition, nx.DiGraph]:
        """:func:`partition_model` of the captured graph into ``n_stages`` stages on ``devices``,
        computed once per distinct input (the cost graph once per device spec, activation
        factor and memory bound); ``bound_of``: under the levers' bound for that group
        (:meth:`bound`), else lever-free.

        Raises:
            PartitionError: no partition fits (the same error each time it is asked again).
        """
        spec = cluster.devices[devices[0]].spec
        bound = self.bound(spec, bound_of, opts) if bound_of is not None else None
        if self._layers is None:
            self._layers = layer_labels(self.captured)
        place = placement(cluster, n_stages, captured=self.captured, works=self.works, devices=devices,
                          memory_reserve=opts.memory_reserve)
        graph_key = (spec.name, factor, opts.training, opts.optimizer, place.reference_link,
                     bound_of and _bound_key(spec, bound_of, opts))
        key = (graph_key, n_stages, opts.partitioner, opts.seed, place.speeds, place.memory_limit,
               place.link.tobytes())
        if key not in self._partitions:
            if graph_key not in self._graphs:
                loss = self.loss_summary(spec, 1.0) if opts.training else None
                self._graphs[graph_key] = cost_graph(
                    self.captured, self.costs(spec, 1.0), link=place.reference_link, training=opts.training,
                    optimizer=opts.optimizer, activation_factor=factor, activations=bound and bound.activations,
                    state=bound and bound.state, colocate=bound and bound.colocate, layers=self._layers,
                    loss=(loss.fwd_time_s + loss.bwd_time_s, loss.activation_bytes) if loss is not None else None)
            try:
                self._partitions[key] = partition_model(
                    self.captured, cluster, n_stages, partitioner=opts.partitioner, seed=opts.seed, devices=devices,
                    memory_reserve=opts.memory_reserve, works=self.works, graph=self._graphs[graph_key])
            except PartitionError as e:
                self._partitions[key] = e
        found = self._partitions[key]
        if isinstance(found, PartitionError):
            raise found
        return found

    def estimated(self, specs: set[str]) -> tuple[EstimatedNode, ...]:
        """Nodes whose times on these device specs are stand-ins (``NodeTime.estimated``), and why."""
        found: dict[str, str] = {}
        for (name, _), costs in self._cache.items():
            if name in specs:
                for node, reason in costs.estimated.items():
                    found.setdefault(node, reason)
        return tuple(EstimatedNode(node=node, reason=reason) for node, reason in found.items())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Priced:
    """A shape with its price: per stage its summary, devices (one per replica), peak memory
    and capacity; the step. ``note`` says why it cannot run (``refused``: torch's schedule
    refuses its stage and micro-batch counts)."""

    shape: Shape
    devices: tuple[tuple[int, ...], ...]
    stages: tuple[StageSummary, ...] = ()
    peak: tuple[float, ...] = (math.inf,)
    capacity: tuple[float, ...] = (0.0,)
    step_time_s: float = math.inf
    bubble: float = 0.0
    allreduce_s: float = 0.0
    note: str = ""
    refused: bool = False
    tied: tuple[TiedParameter, ...] = ()  # parameters its stages on several devices read (fxshard/passes/tied.py)

    strategy = property(lambda self: self.shape.strategy)
    replicas = property(lambda self: self.shape.replicas)
    schedule = property(lambda self: self.shape.schedule)
    microbatches = property(lambda self: self.shape.microbatches)
    data_parallel = property(lambda self: self.shape.levers.data_parallel)
    checkpointing = property(lambda self: self.shape.levers.checkpointing)
    reshard_after_forward = property(lambda self: self.shape.levers.reshard_after_forward)

    @property
    def fits(self) -> bool:
        return all(p <= c for p, c in zip(self.peak, self.capacity))

    @property
    def devices_used(self) -> int:
        return len({d for devs in self.devices for d in devs})

    @property
    def overflow(self) -> float:
        """The worst stage's peak over its capacity."""
        return max(p / q if q > 0 else math.inf for p, q in zip(self.peak, self.capacity))


def unfit(group: PipelineGroup, devices: tuple[tuple[int, ...], ...], why: str, *, schedule: str | None = None,
          refused: bool = False) -> Priced:
    """A pipeline that cannot run: its partition does not fit, or (``refused``) torch's
    schedule refuses its stage and micro-batch counts."""
    shape = Shape(strategy=group.strategy, replicas=group.replicas, depth=group.depth,
                  stages_per_device=group.stages_per_device, schedule=schedule or group.schedules[0])
    return Priced(shape=shape, devices=devices, note=why, refused=refused)


def partition_group(pricer: Pricer, cluster: Cluster, group: PipelineGroup,
                    opts: PlanOptions) -> tuple[dict[str, int], tuple[tuple[int, ...], ...]]:
    """Partition a group's pipeline into depth x stages-per-device stages.

    The partitioner's memory bound is first the lever-free one (each node's full training
    state and saved activations: the partition the search always had); when no partition fits
    it, the bound of the most permissive levers the options allow (:meth:`Pricer.bound`), with
    each repeated block kept whole so that it can be checkpointed. Each shape is then priced
    under every lever combination worth it.

    Returns:
        node -> stage, and each stage's devices.
    """
    stage_devices = stage_devices_of(group)
    n_stages = len(stage_devices)
    first = [devs[0] for devs in stage_devices]
    # Costs are at the captured batch; a stage holds about min(stages, m) micro-batches of
    # batch / (replicas x m) each under 1F1B, so the partitioner sees that share of the
    # full-batch activations (the exact per-schedule memory is checked after simulation).
    most_microbatches = max(group.microbatches[0] or (1,))
    factor = min(1.0, n_stages / most_microbatches) / group.replicas
    spec = cluster.devices[first[0]].spec

    try:
        part, graph = pricer.partition(cluster, n_stages, first, factor, opts)
    except PartitionError as e:
        bound = pricer.bound(spec, group, opts)
        if bound.activations is None and bound.state is None:
            raise
        try:  # no lever-free partition fits: the levers' bound, checkpointed blocks kept whole
            part, graph = pricer.partition(cluster, n_stages, first, factor, opts, bound_of=group)
        except PartitionError as again:
            raise again from e
    if not part.is_acyclic:
        u, v = next((u, v) for u, v in graph.edges if part.stage_of[u] > part.stage_of[v])
        raise PlanError(f"partitioner {opts.partitioner!r} put {u!r} on stage {part.stage_of[u]} and its consumer "
                        f"{v!r} on stage {part.stage_of[v]}: a pipeline stage may only read from earlier stages. "
                        f"Fix the partitioner (fxshard.passes.partition.refine.repair(problem, labels) makes any "
                        f"assignment acyclic) or use partitioner='metis'")
    return dict(part.stage_of), stage_devices


def _bound_key(spec: DeviceSpec, group: PipelineGroup, opts: PlanOptions) -> tuple[str, str, int]:
    """What :meth:`Pricer.bound` depends on: the device spec, the most permissive checkpointing
    policy and the data-parallel group a stage's state may be sharded over."""
    kinds, policies = lever_choices(opts, group.replicas)
    return spec.name, policies[-1], group.replicas if "fsdp" in kinds else 1


def device_capacity(cluster: Cluster, device: int, reserve: float, share: int = 1) -> float:
    """Memory of ``device`` left to a stage after the reserve, split among ``share`` stages."""
    return cluster.devices[device].spec.memory_bytes * (1 - reserve) / share


def optimizer_figures(st: StageSummary, spec: DeviceSpec, opts: PlanOptions, shards: int = 1, *,
                      rank_sizes: Sequence[float] | None = None, share: int = 1,
                      rates: StepRates | None = None) -> tuple[float, float]:
    """(seconds, temporary bytes) of the optimizer step over a stage's parameters on a device of
    ``spec``, each of its ``shards`` FSDP ranks stepping its shard (fxshard/cost_models/optimizer_step.py),
    at the cost model's ``rates`` for the device (default: its roofline).

    A rank's one optimizer steps all its stages' parameters together, so with ``rank_sizes`` (every
    tensor of the ``share`` stages on the device) the rank's temporaries are split evenly among its
    stages, as the device's memory is: the stages' peaks add up to it once."""
    if not opts.training:
        return 0.0, 0.0
    sizes = [size / shards for size in (st.optimizer_param_sizes if rank_sizes is None else rank_sizes)]
    rates = rates or StepRates(device=spec)
    return (rates.optimizer_s(opts.optimizer, st.param_bytes / shards),
            optimizer_step_transient_bytes(opts.optimizer, sizes, spec.kind) / share)


def step_passes(stages: Sequence[StageSummary], costs: Sequence[GraphCosts], cluster: Cluster,
                devices: Sequence[Sequence[int]], opts: PlanOptions, shards: int = 1, *,
                sharded_gradients: bool = False) -> list[StageSummary]:
    """The stages with their passes outside the graph priced per rank: ``optimizer_time_s``
    (each of ``shards`` FSDP ranks steps its shard) and ``accumulate_time_s``, at each stage's
    cost-model rates on its device. A pipeline stage's gradients accumulate unsharded over the
    step's micro-batches (torch's PipelineStage runs FSDP2 so); ``sharded_gradients``: each
    rank accumulates its shard (whole-model FSDP reduce-scatters every micro-batch)."""
    out = []
    for st, c, devs in zip(stages, costs, devices):
        spec = cluster.devices[devs[0]].spec
        rates = c.rates or StepRates(device=spec)
        seconds = rates.optimizer_s(opts.optimizer, st.param_bytes / shards, training=opts.training)
        grads = st.param_bytes / shards if sharded_gradients else st.param_bytes
        accumulate = rates.accumulate_s(grads) if opts.training else 0.0
        out.append(dataclasses.replace(st, optimizer_time_s=seconds, accumulate_time_s=accumulate))
    return out


def receive_buffer_bytes(stages: Sequence[StageSummary], devices: Sequence[Sequence[int]], microbatches: int, *,
                         training: bool) -> list[float]:
    """Per stage, what torch's ``PipelineStage`` keeps for what it receives from another device:
    one buffer per micro-batch for the activations from the stage before
    (``_prepare_forward_infra`` builds ``args_recv_info[chunk]`` for every chunk) and, in training,
    for the gradients from the stage after (``_setup_backward_recv_info``, per micro-batch), each
    the size of one micro-batch's boundary, alive for the whole step."""
    out = []
    for s, (st, devs) in enumerate(zip(stages, devices)):
        held = 0.0
        if s > 0 and devices[s - 1][0] != devs[0]:
            held += stages[s - 1].send_bytes
        if training and s + 1 < len(stages) and devices[s + 1][0] != devs[0]:
            held += st.send_bytes
        out.append(microbatches * held)
    return out


def _stage_timings(stages: tuple[StageSummary, ...], cluster: Cluster, devices: tuple[tuple[int, ...], ...],
                   opts: PlanOptions, reduce: tuple[float, ...], shards: int, microbatches: int) -> list[StageTiming]:
    """The simulator's rows of priced stages (:func:`step_passes` has set their step passes); a
    stage's static memory holds its state and its receive buffers (:func:`receive_buffer_bytes`)."""
    buffers = receive_buffer_bytes(stages, devices, microbatches, training=opts.training)
    on_device: dict[int, list[StageSummary]] = {}
    for st, devs in zip(stages, devices):
        on_device.setdefault(devs[0], []).append(st)
    figures = []
    for st, devs, r, held in zip(stages, devices, reduce, buffers):
        mates = on_device[devs[0]]
        temporaries = optimizer_figures(st, cluster.devices[devs[0]].spec, opts, shards, share=len(mates),
                                        rank_sizes=[x for m in mates for x in m.optimizer_param_sizes])[1]
        figures.append(StageFigures(device=devs[0], fwd_s=st.fwd_time_s, bwd_s=st.bwd_time_s, send_bytes=st.send_bytes,
                                    activation_bytes=st.activation_bytes, static_bytes=st.state_bytes + held,
                                    transient_bytes=st.transient_bytes, reduce_s=r, optimizer_s=st.optimizer_time_s,
                                    optimizer_transient_bytes=temporaries, accumulate_s=st.accumulate_time_s,
                                    accumulate_bytes=st.largest_param_bytes))
    return stage_timings(figures, cluster, training=opts.training)


def price_pipeline(pricer: Pricer, cluster: Cluster, group: PipelineGroup, stage_of: dict[str, int],
                   stage_devices: tuple[tuple[int, ...], ...], shape: Shape, opts: PlanOptions, *,
                   plain: tuple[list[GraphCosts], tuple[StageSummary, ...]] | None = None) -> Priced:
    """A pipeline shape of ``group``, partitioned as ``stage_of``, simulated under its schedule,
    with the shape's levers applied to every stage (a stage's data-parallel group sharded with
    FSDP2 as torch's PipelineStage runs it: fxshard/levers.py)."""
    per_stage, plain_stages = plain or _pipeline_figures(pricer, cluster, stage_of, stage_devices, shape, opts)
    levers = shape.levers
    stages, reduce = [], []
    fraction = 1.0 / (shape.replicas * shape.microbatches)
    for costs, st, devs in zip(per_stage, plain_stages, stage_devices):
        lever = checkpointed(pricer.facts, costs, st, levers.checkpointing, pricer.checkpoint_cost)
        sharded = levers.data_parallel == "fsdp" and shape.replicas > 1
        tail = 0.0
        if sharded:
            lever, tail = pipeline_fsdp(pricer.facts, costs, lever, st, cluster, devs, optimizer=opts.optimizer,
                                        training=opts.training)
        if st.index == len(plain_stages) - 1:
            lever = pricer.with_loss(lever, cluster.devices[devs[0]].spec, fraction, opts)
        if opts.training and shape.replicas > 1 and not sharded:
            tail = exposed_allreduce_time(cluster, devs, lever.param_bytes, lever.bwd_time_s)
        stages.append(lever)
        reduce.append(tail)
    shards = shape.replicas if levers.data_parallel == "fsdp" else 1
    stages = step_passes(stages, per_stage, cluster, stage_devices, opts, shards)
    tied = tied_parameters(pricer.readers, stage_of, stage_devices) if opts.training else ()
    try:
        result = simulate(shape.schedule, _stage_timings(tuple(stages), cluster, stage_devices, opts,
                                                         tuple(reduce), shards, shape.microbatches),
                          shape.microbatches, syncs=tied_syncs(cluster, tied, stage_devices, shards))
    except SimulationError as e:
        return unfit(group, stage_devices, str(e), schedule=shape.schedule, refused=True)
    share = {devs[0]: sum(1 for x in stage_devices if x[0] == devs[0]) for devs in stage_devices}
    capacity = tuple(min(device_capacity(cluster, d, opts.memory_reserve, share[devs[0]]) for d in devs)
                     for devs in stage_devices)
    return Priced(shape=shape, stages=tuple(stages), devices=stage_devices, step_time_s=result.step_time_s,
                  bubble=result.bubble_fraction, allreduce_s=max(reduce) if reduce else 0.0,
                  peak=result.peak_memory_bytes, capacity=capacity, tied=tied)


def _pipeline_figures(pricer: Pricer, cluster: Cluster, stage_of: dict[str, int],
                      stage_devices: tuple[tuple[int, ...], ...], shape: Shape,
                      opts: PlanOptions) -> tuple[list[GraphCosts], tuple[StageSummary, ...]]:
    """Each stage's costs (on its device) and figures at one micro-batch, without levers."""
    fraction = 1.0 / (shape.replicas * shape.microbatches)
    base = pricer.costs(cluster.devices[stage_devices[0][0]].spec, fraction)
    per_stage = [pricer.costs(cluster.devices[devs[0]].spec, fraction) for devs in stage_devices]
    return per_stage, tuple(summarize_stages(pricer.captured, base, stage_of, len(stage_devices),
                                             training=opts.training, optimizer=opts.optimizer, stage_costs=per_stage))


def price_levers(pricer: Pricer, cluster: Cluster, group: PipelineGroup, stage_of: dict[str, int],
                 stage_devices: tuple[tuple[int, ...], ...], shape: Shape, opts: PlanOptions) -> list[Priced]:
    """A pipeline shape under each lever combination worth pricing: per data-parallel kind,
    checkpointing policies from none to full, stopping at the first that fits."""
    kinds, policies = lever_choices(opts, shape.replicas)
    plain = _pipeline_figures(pricer, cluster, stage_of, stage_devices, shape, opts)
    out: list[Priced] = []
    for kind in kinds:
        for policy in policies:
            # A stage's FSDP group keeps its parameters gathered over the step's micro-batches (priced
            # so in levers.pipeline_fsdp); zero-bubble schedules are exact only so (runtime/distributed.py).
            levers = Levers(data_parallel=kind, checkpointing=policy, reshard_after_forward=kind != "fsdp")
            levered = dataclasses.replace(shape, levers=levers)
            priced = price_pipeline(pricer, cluster, group, stage_of, stage_devices, levered, opts, plain=plain)
            out.append(priced)
            if priced.fits or priced.refused:
                break
    return out
