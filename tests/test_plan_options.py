"""PlanOptions and the request checks: the memory levers (activation checkpointing, data
parallel), their contradictions, and check_request's rules for fsdp and gradient accumulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxshard
from fxshard.cluster import Cluster
from fxshard.errors import PlanError
from fxshard.plan_options import STRATEGY_ORDER, PlanOptions, check_request


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    return fxshard.capture(model, (torch.randn(8, 8),))


def test_strategies_simplest_first():
    assert list(STRATEGY_ORDER) == ["single", "ddp", "fsdp", "pipeline", "hybrid"]
    assert PlanOptions(strategy="fsdp").strategy == "fsdp"


@pytest.mark.parametrize("policy", [None, "none", "selective", "full"])
@pytest.mark.parametrize("dp", [None, "ddp", "fsdp"])
def test_levers_accepted(policy, dp):
    opts = PlanOptions(activation_checkpointing=policy, data_parallel=dp)
    assert (opts.activation_checkpointing, opts.data_parallel) == (policy, dp)


@pytest.mark.parametrize("options, words", [
    ({"activation_checkpointing": "some"}, ["activation_checkpointing='some'", "'none', 'selective', 'full'"]),
    ({"activation_checkpointing": True}, ["activation_checkpointing=True", "None (auto)"]),
    ({"data_parallel": "zero3"}, ["data_parallel='zero3'", "'ddp'", "'fsdp'"]),
    ({"strategy": "zero"}, ["strategy='zero'", "single, ddp, fsdp, pipeline, hybrid"]),
    ({"activation_checkpointing": "full", "training": False}, ["training=False", "nothing to recompute", "'none'"]),
    ({"data_parallel": "fsdp", "strategy": "ddp"}, ["data_parallel='fsdp' with strategy='ddp'", "replicated",
                                                     "strategy='fsdp' or 'hybrid'", "drop data_parallel="]),
    ({"data_parallel": "ddp", "strategy": "fsdp"}, ["data_parallel='ddp' with strategy='fsdp'", "sharded",
                                                     "strategy='ddp' or 'hybrid'"]),
    ({"data_parallel": "fsdp", "strategy": "single"}, ["single plans have no data-parallel group"]),
    ({"data_parallel": "ddp", "strategy": "pipeline"}, ["pipeline plans have no data-parallel group"]),
    ({"stages": 2, "strategy": "fsdp"}, ["stages=2 with strategy='fsdp'", "one stage", "'hybrid'"]),
])
def test_contradictions_refused_with_a_way_out(options, words):
    with pytest.raises(PlanError) as e:
        PlanOptions(**options)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("strategy, dp", [("hybrid", "ddp"), ("hybrid", "fsdp"), ("fsdp", "fsdp"), ("ddp", "ddp")])
def test_matching_strategy_and_data_parallel(strategy, dp):
    assert PlanOptions(strategy=strategy, data_parallel=dp).data_parallel == dp


def test_fixed_batch_refuses_fsdp_and_forced_data_parallel(mlp):
    captured = dataclasses.replace(mlp, fixed_batch=4)  # as torch.export leaves a model that branches on it
    cluster = Cluster.parse("2xcpu:1GB")
    for opts in (PlanOptions(strategy="fsdp"), PlanOptions(data_parallel="fsdp")):
        with pytest.raises(PlanError, match="batch fixed at 4") as e:
            check_request(captured, cluster, 4, opts)
        assert "replica shards" in str(e.value)
    check_request(captured, cluster, 4, PlanOptions(strategy="pipeline", activation_checkpointing="full"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_must_divide_a_replicas_share(mlp, strategy):
    cluster = Cluster.parse("2xcpu:1GB")
    check_request(mlp, cluster, 8, PlanOptions(strategy=strategy, microbatches=4))  # 2 replicas x 4 x 1 sample
    with pytest.raises(PlanError, match="microbatches=8 does not divide the batch of 8 into replicas' equal shares"):
        check_request(mlp, cluster, 8, PlanOptions(strategy=strategy, microbatches=8))


def test_plan_and_compile_take_the_levers():
    # unknown-option errors list the fields: the levers are among them
    with pytest.raises(PlanError, match="activation_checkpointing") as e:
        fxshard.plan(nn.Linear(2, 2), 1, (torch.randn(2, 2),), activation_checkpoint="full")
    assert "data_parallel" in str(e.value)
