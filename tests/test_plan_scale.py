"""Planning at scale: the pruned search finds the exhaustive search's plan, its lower bound is
below every simulated step, partitions are computed once per distinct input, and the schedule
orders come from torch's own classes. Small models on cpu clusters, no processes."""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
import torch

import fxshard
from fxshard.candidates import Pricer, partition_group, pipeline_groups, price_levers, shape_bound
from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster
from fxshard.plan_options import PlanOptions
from fxshard.planner import plan_captured
from fxshard.candidate_shapes import step_lower_bound
from fxshard.simulate import SCHEDULES, SPLIT_BACKWARD, SimulationError, StageTiming, rank_actions, simulate
from tests.tiny_models import hf_llama


def _blocks(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
                                 for _ in range(depth)))


@functools.cache
def _captured(name: str) -> tuple[CapturedGraph, int]:
    """One capture per model for the whole file (the search is what these tests exercise)."""
    if name == "mlp":
        return capture(_blocks(512, 8), (torch.randn(16, 512),)), 16
    model, tokens = hf_llama(4, 8)
    return capture(model, (tokens,)), 8


# 30 MB devices: the MLP's Adam state (17 MB) and the tiny Llama's do not always fit one, so
# pipelines and hybrids compete with data parallelism. The exact DP partitioner keeps it quick.
@pytest.mark.parametrize("model", ["mlp", "llama"])
@pytest.mark.parametrize("devices", ["8xcpu:0.03GB", "2x4xcpu:0.03GB", "4x8xcpu:0.03GB"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_pruned_search_finds_the_exhaustive_plan(model: str, devices: str, training: bool) -> None:
    captured, batch = _captured(model)
    cluster = Cluster.parse(devices)
    opts = PlanOptions(training=training, partitioner="dp")
    fast = plan_captured(captured, cluster, batch, opts)
    full = plan_captured(captured, cluster, batch, dataclasses.replace(opts, exhaustive=True))
    assert fast.estimate.step_time_s <= full.estimate.step_time_s * 1.01
    # the bound is exact (nothing that could win is left out), so the very plan is found

    def shape(p: fxshard.Plan) -> tuple:
        return (p.strategy, len(p.stages), p.replicas, p.microbatches, p.schedule, p.data_parallel,
                p.stages[0].activation_checkpointing, p.estimate.step_time_s)
    assert shape(fast) == shape(full)
    assert len(fast.alternatives) <= len(full.alternatives)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_shape_bound_is_below_every_simulated_step(training: bool) -> None:
    captured, _ = _captured("llama")
    cluster = Cluster.parse("2x4xcpu:0.03GB")
    opts = PlanOptions(training=training, partitioner="dp", exhaustive=True)
    pricer = Pricer(captured, opts.cost_model, 8)
    checked = 0
    for group in pipeline_groups(cluster.num_devices, 8, opts):
        stage_of, stage_devices = partition_group(pricer, cluster, group, opts)
        for shape in group.shapes():
            bound = shape_bound(pricer, cluster, group, shape, opts)
            for priced in price_levers(pricer, cluster, group, stage_of, stage_devices, shape, opts):
                if not priced.refused:
                    assert 0 < bound <= priced.step_time_s * (1 + 1e-12), (shape, bound, priced.step_time_s)
                    checked += 1
    assert checked >= 10


def test_partitions_are_computed_once_per_distinct_input() -> None:
    captured, _ = _captured("mlp")
    cluster = Cluster.parse("2x4xcpu:0.03GB")
    opts = PlanOptions(partitioner="dp")
    pricer = Pricer(captured, opts.cost_model, 16)
    first = pricer.partition(cluster, 4, [0, 1, 2, 3], 0.5, opts)
    assert pricer.partition(cluster, 4, [0, 1, 2, 3], 0.5, opts) is first
    across = pricer.partition(cluster, 4, [0, 2, 4, 6], 0.5, opts)  # a machine boundary moves: a new problem
    assert across is not first
    assert pricer.partition(cluster, 4, [0, 1, 2, 3], 0.25, opts)[1] is not first[1]  # another activation factor


def test_exhaustive_must_be_a_bool() -> None:
    with pytest.raises(fxshard.PlanError, match="exhaustive"):
        PlanOptions(exhaustive="yes")
    assert dataclasses.replace(PlanOptions(), exhaustive=True).exhaustive


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_recorded_orders_run_every_action_once(schedule: str) -> None:
    per_rank = SCHEDULES[schedule].stages_per_rank
    for ranks, microbatches in ((1, 1), (2, 4), (4, 8), (16, 16)):
        orders = rank_actions(schedule, ranks, microbatches)
        assert len(orders) == ranks
        forwards = sorted((s, i) for rank in orders for s, kind, i in rank if kind == "F")
        assert forwards == [(s, i) for s in range(ranks * per_rank) for i in range(microbatches)]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_step_lower_bound_is_below_the_simulated_step_on_any_stages(schedule: str) -> None:
    # Zero-bubble schedules defer weight gradients off micro-batch 0's chain: a bound of F + B
    # there pruned zbv plans it should have kept (2 ranks, 1 micro-batch: 12 against 10).
    per_rank = SCHEDULES[schedule].stages_per_rank
    rng = random.Random(schedule)
    checked = 0
    for ranks in (1, 2, 3, 4):
        for m in (1, 2, 3, 4, 8):
            for skew in (False, True):
                n = ranks * per_rank
                stages = [StageTiming(fwd_s=rng.uniform(0.2, 2.0) if skew else 1.0,
                                      bwd_s=rng.uniform(0.2, 4.0) if skew else 2.0) for _ in range(n)]
                try:
                    step = simulate(schedule, stages, m).step_time_s
                except SimulationError:
                    continue  # counts this schedule refuses
                for training in (True, False):
                    timed = stages if training else [dataclasses.replace(t, bwd_s=0.0) for t in stages]
                    work = sum(t.fwd_s + t.bwd_s for t in timed)
                    forward = sum(t.fwd_s for t in timed)
                    actual = step if training else simulate(schedule, timed, m).step_time_s
                    bound = step_lower_bound(schedule, work=work, forward=forward, microbatches=m, depth=ranks,
                                             training=training)
                    assert 0 < bound <= actual * (1 + 1e-12), (schedule, ranks, m, skew, training, bound, actual)
                    checked += 1
    assert checked >= 20


def test_split_backward_names_the_schedules_whose_orders_split_a_backward() -> None:
    split = {s for s in SCHEDULES for ranks, m in ((2, 2), (2, 4))
             if any(kind in ("I", "W") for rank in rank_actions(s, ranks, m) for _, kind, _ in rank)}
    assert split == set(SPLIT_BACKWARD)
