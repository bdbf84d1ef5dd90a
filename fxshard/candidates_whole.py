"""The planner's whole-model candidates: the model on each of ``replicas`` devices.

Each copy runs its share of the batch, possibly as several micro-batches one after another
(gradient accumulation), its data-parallel group replicated (DDP) or sharded (FSDP), under
activation checkpointing where the options allow it (fxshard/levers.py). Pipeline candidates
are in fxshard/candidates.py, which also holds the :class:`Pricer` both use. See
docs/planning.md.
"""

from __future__ import annotations

from fxshard.candidates import (
    MAX_MICROBATCHES,
    Priced,
    Pricer,
    Shape,
    device_capacity,
    lever_choices,
    optimizer_figures,
    step_passes,
)
from fxshard.cluster import Cluster
from fxshard.comm import exposed_allreduce_time
from fxshard.cost_models import GraphCosts
from fxshard.levers import Levers, checkpointed, fsdp_stage, fsdp_step
from fxshard.passes.stages import StageSummary, summarize_stages
from fxshard.plan_options import PlanOptions, divisors

__all__ = ["price_data_parallel", "price_whole_model", "whole_model_fractions"]


def price_data_parallel(pricer: Pricer, cluster: Cluster, replicas: int, opts: PlanOptions, *,
                        microbatches: int = 1, levers: Levers = Levers(),
                        plain: tuple[GraphCosts, StageSummary] | None = None) -> Priced:
    """The whole model on each of the first ``replicas`` devices (one: ``single``), each running
    its share of the batch as ``microbatches`` micro-batches one after another (gradient
    accumulation), replicated (ddp) or sharded (fsdp) as ``levers`` say."""
    used = tuple(range(replicas))
    costs, stage = plain or _whole_model(pricer, cluster, replicas, microbatches, opts)
    # the loss runs after the model on every micro-batch (fxshard/cost_models/loss.py)
    spec, fraction = cluster.devices[used[0]].spec, 1.0 / (replicas * microbatches)
    st = pricer.with_loss(checkpointed(pricer.facts, costs, stage, levers.checkpointing, pricer.checkpoint_cost),
                          spec, fraction, opts)
    stage = pricer.with_loss(stage, spec, fraction, opts)
    backward = st.bwd_time_s if opts.training else 0.0
    if levers.data_parallel == "fsdp":
        st, units = fsdp_stage(pricer.facts, costs, st, stage, replicas, optimizer=opts.optimizer,
                               training=opts.training, reshard_after_forward=levers.reshard_after_forward)
        step, exposed = fsdp_step(units, cluster, used, microbatches=microbatches, training=opts.training,
                                  reshard_after_forward=levers.reshard_after_forward)
    else:
        exposed = 0.0
        if opts.training and replicas > 1:  # synchronised once, behind the last micro-batch's backward
            exposed = exposed_allreduce_time(cluster, used, st.param_bytes, backward)
        step = microbatches * (st.fwd_time_s + backward) + exposed
    # each copy steps its parameters (an FSDP rank its shard) after the gradient sync, in a phase of its own;
    # every micro-batch's backward but the first adds its gradients into the accumulated ones (an FSDP
    # rank into its shard, after each micro-batch's reduce-scatter), the new one alive meanwhile
    shards = replicas if levers.data_parallel == "fsdp" else 1
    st = step_passes([st], [costs], cluster, [used], opts, shards, sharded_gradients=True)[0]
    temporaries = optimizer_figures(stage, cluster.devices[used[0]].spec, opts, shards, rates=costs.rates)[1]
    accumulating = opts.training and microbatches > 1
    if accumulating:
        step += (microbatches - 1) * st.accumulate_time_s
    step += st.optimizer_time_s
    buffer = st.largest_param_bytes / shards if accumulating else 0.0
    peak = st.state_bytes + max(st.activation_bytes + st.transient_bytes + buffer, temporaries)
    strategy = "single" if replicas == 1 else levers.data_parallel or "ddp"
    return Priced(shape=Shape(strategy=strategy, replicas=replicas, microbatches=microbatches, levers=levers),
                  stages=(st,), devices=(used,), step_time_s=step, allreduce_s=exposed, peak=(peak,),
                  capacity=(min(device_capacity(cluster, d, opts.memory_reserve) for d in used),))


def _whole_model(pricer: Pricer, cluster: Cluster, replicas: int, microbatches: int,
                 opts: PlanOptions) -> tuple[GraphCosts, StageSummary]:
    """The whole model's costs and figures at one micro-batch of a replica, on the slowest device."""
    used = range(replicas)
    spec_costs = {cluster.devices[d].spec.name: pricer.costs(cluster.devices[d].spec, 1 / (replicas * microbatches))
                  for d in used}
    slowest = max(spec_costs.values(), key=lambda c: c.fwd_time_s + c.bwd_time_s)
    stage = summarize_stages(pricer.captured, slowest, {}, 1, training=opts.training, optimizer=opts.optimizer)[0]
    return slowest, stage


def _accumulation_counts(pricer: Pricer, replicas: int, opts: PlanOptions) -> list[int]:
    per = pricer.batch // replicas
    if replicas == 1 or pricer.captured.fixed_batch is not None:
        return [1]
    if opts.microbatches is not None:
        return [opts.microbatches] if per % opts.microbatches == 0 else []
    return [m for m in divisors(per) if m <= MAX_MICROBATCHES]


def whole_model_fractions(pricer: Pricer, replicas: int, opts: PlanOptions) -> list[float]:
    """The micro-batches (fractions of the batch) :func:`price_whole_model` may price for ``replicas``."""
    return [1.0 / (replicas * m) for m in _accumulation_counts(pricer, replicas, opts)]


def price_whole_model(pricer: Pricer, cluster: Cluster, replicas: int, opts: PlanOptions) -> list[Priced]:
    """``replicas`` copies of the whole model under each lever combination worth pricing.

    Per data-parallel kind, micro-batch counts ascend and, per count, checkpointing policies go
    from none to full, stopping at the first that fits (checkpointing only adds time and only
    saves memory); the counts stop at the first that fits without checkpointing, or two counts
    after the first that fits at all (more micro-batches only add time). FSDP is priced with
    and without resharding after forward.
    """
    kinds, policies = lever_choices(opts, replicas)
    figures: dict[int, tuple[GraphCosts, StageSummary]] = {}
    out: list[Priced] = []
    for kind in kinds:
        left = None
        for m in _accumulation_counts(pricer, replicas, opts):
            if m not in figures:
                figures[m] = _whole_model(pricer, cluster, replicas, m, opts)
            found = None
            for policy in policies:
                reshards = (True, False) if kind == "fsdp" else (True,)
                priced = [price_data_parallel(pricer, cluster, replicas, opts, microbatches=m, plain=figures[m],
                                              levers=Levers(data_parallel=kind, checkpointing=policy,
                                                            reshard_after_forward=r)) for r in reshards]
                out += priced
                if any(p.fits for p in priced):
                    found = policy
                    break
            if found == policies[0]:
                break
            if found is not None:
                left = 2 if left is None else left - 1
                if left == 0:
                    break
    return out
