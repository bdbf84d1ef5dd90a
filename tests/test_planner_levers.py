"""The planner's memory levers: FSDP where replicas do not fit, gradient accumulation where a
replica's batch does not, activation checkpointing where nothing else does, forced options
respected. Small models on cpu:N clusters, no processes."""

from __future__ import annotations

import types

import pytest
import torch

import fxshard
import fxshard.candidates
from fxshard.cost_models.sharding import ParamSpec, sharded_state

GIB = 1 << 30


def _blocks(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
                                 for _ in range(depth)))


def _devices(n: int, nbytes: float) -> str:
    return f"{n}xcpu:{nbytes / GIB * 1.05:.6f}GB"  # the planner keeps 5% in reserve


def _state(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) * 16  # fp32 Adam


def test_fsdp_where_replicas_do_not_fit() -> None:
    model = _blocks(512, 8)  # 8.4 MB of weights, 33.6 MB of state with Adam
    x = torch.randn(8, 512)
    spec = _devices(4, 0.6 * _state(model))
    p = fxshard.plan(model, spec, (x,), strategy="fsdp")
    assert p.strategy == "fsdp" and p.data_parallel == "fsdp" and p.replicas >= 2
    specs = [ParamSpec(name=k, shape=tuple(v.shape), itemsize=4) for k, v in model.named_parameters()]
    shards = sharded_state(specs, p.replicas, 0).total
    assert shards <= p.stages[0].peak_memory_bytes <= p.stages[0].memory_capacity_bytes
    with pytest.raises(fxshard.PlanError):
        fxshard.plan(model, spec, (x,), strategy="ddp", activation_checkpointing="none")
    auto = fxshard.plan(model, spec, (x,))
    assert all(s.peak_memory_bytes <= s.memory_capacity_bytes for s in auto.stages)


def test_forced_levers_are_respected() -> None:
    model = _blocks(256, 4)
    x = torch.randn(8, 256)
    p = fxshard.plan(model, "4xcpu:1GB", (x,), data_parallel="ddp")
    assert all(a.data_parallel in (None, "ddp") for a in p.alternatives)
    q = fxshard.plan(model, "4xcpu:1GB", (x,), data_parallel="fsdp")
    assert all(a.data_parallel in (None, "fsdp") for a in q.alternatives)
    r = fxshard.plan(model, "4xcpu:1GB", (x,), activation_checkpointing="full")
    assert all(s.activation_checkpointing == "full" for s in r.stages)
    assert all(a.activation_checkpointing == "full" for a in r.alternatives)


def test_ddp_accumulates_when_the_batch_does_not_fit() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 64))
    x = torch.randn(256, 64)
    whole = fxshard.plan(model, "2xcpu:4GB", (x,), strategy="ddp", microbatches=1)
    spec = _devices(2, 0.8 * whole.stages[0].peak_memory_bytes)
    p = fxshard.plan(model, spec, (x,), strategy="ddp", activation_checkpointing="none")
    assert p.strategy == "ddp" and p.microbatches > 1 and p.replicas == 2
    assert p.stages[0].peak_memory_bytes <= p.stages[0].memory_capacity_bytes
    # more work in smaller pieces: never faster than the whole batch at once
    assert p.estimate.step_time_s >= whole.estimate.step_time_s * (1 - 1e-9)


def _stand_in(costs, nodes, blocks, policy):
    """Checkpointing costs for this test only: full keeps a tenth of the activations."""
    saved = costs.saved_activation_bytes(nodes) if hasattr(costs, "saved_activation_bytes") else 0.0
    keep = {"none": 1.0, "selective": 0.6, "full": 0.1}[policy]
    fwd = sum(costs[n].fwd_time_s for n in nodes)
    return types.SimpleNamespace(saved_bytes=keep * saved, recompute_fwd_s=(1 - keep) * fwd, transient_bytes=0.0)


def test_checkpointing_where_nothing_else_fits(monkeypatch) -> None:
    monkeypatch.setattr(fxshard.candidates, "default_checkpoint_cost", _stand_in)
    torch.manual_seed(0)
    model = _blocks(256, 4)
    x = torch.randn(4096, 256)
    plain = fxshard.plan(model, "1xcpu:8GB", (x,))
    assert plain.stages[0].activation_checkpointing == "none"
    st = plain.stages[0]
    spec = _devices(1, 0.8 * st.peak_memory_bytes)
    p = fxshard.plan(model, spec, (x,))
    assert p.strategy == "single" and p.stages[0].activation_checkpointing in ("selective", "full")
    assert p.stages[0].bwd_time_s > st.bwd_time_s  # recomputation is paid in backward
    assert p.estimate.step_time_s > plain.estimate.step_time_s


def _mlp_blocks(width: int, depth: int) -> torch.nn.Module:
    """Blocks that save 5 widths per sample each without checkpointing, 1 with it."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.ReLU(),
                                                     torch.nn.Linear(4 * width, width)) for _ in range(depth)))


def test_a_pipeline_no_lever_free_partition_fits_is_partitioned_under_the_levers() -> None:
    """Two stages, GPipe over 2 micro-batches: the state and the whole batch's activations (72 MiB)
    exceed two devices of 33 MiB, so the lever-free partition is refused; the partition bounded
    by full checkpointing keeps each block whole and fits."""
    model, x = _mlp_blocks(256, 4), torch.randn(2048, 256)
    forced = {"strategy": "pipeline", "stages": 2, "schedule": "gpipe", "microbatches": 2}
    full = fxshard.plan(model, "2xcpu:8GB", (x,), activation_checkpointing="full", **forced)
    spec = _devices(2, 1.1 * max(s.peak_memory_bytes for s in full.stages))
    with pytest.raises(fxshard.PlanError, match="a pipeline of 2 stages: the graph needs"):
        fxshard.plan(model, spec, (x,), activation_checkpointing="none", **forced)
    p = fxshard.plan(model, spec, (x,), **forced)
    assert [s.activation_checkpointing for s in p.stages] == ["full", "full"]
    assert [(s.first_module, s.last_module) for s in p.stages] == [("0.0", "1.2"), ("2.0", "3.2")]  # whole blocks
    assert all(s.peak_memory_bytes <= s.memory_capacity_bytes for s in p.stages)
    assert "full activation checkpointing: without it stage" in p.reason


def test_partition_bound_shards_state_and_checkpoints_blocks() -> None:
    from fxshard.capture import capture
    from fxshard.cluster import Cluster
    from fxshard.cost_models import estimate
    from fxshard.levers import ModelFacts, partition_bound

    model, x = _mlp_blocks(64, 3), torch.randn(32, 64)
    captured = capture(model, (x,))
    costs = estimate(captured, Cluster.parse("1xcpu:1GB").devices[0].spec)
    facts = ModelFacts(captured)
    none = partition_bound(facts, costs, policy="none", shards=1, training=True, optimizer="adam")
    assert none.activations is None and none.state is None and none.colocate is None
    bound = partition_bound(facts, costs, policy="full", shards=4, training=True, optimizer="adam")
    assert set(bound.colocate.values()) == {"0", "1", "2"}
    # full checkpointing keeps each block's input: 32 x 64 fp32 values per block
    assert sum(bound.activations.values()) == pytest.approx(3 * 32 * 64 * 4, rel=0.05)
    # fp32 Adam: 16 bytes per parameter replicated; 16 / 4 sharded plus 8 unsharded (weight, gradient)
    work = next(c.work for c in costs if c.work.param_bytes)
    assert bound.state(work) == pytest.approx(work.param_bytes * (4 / 4 + 2) + work.buffer_bytes)


def test_pipeline_stages_sharded_with_fsdp_keep_their_parameters_gathered() -> None:
    """A hybrid plan's FSDP groups are priced with the stage's parameters gathered over the
    step's micro-batches, as torch's PipelineStage keeps them; the plan says so, which the
    runtime needs for zero-bubble schedules to be exact."""
    model = _blocks(256, 8)
    x = torch.randn(8, 256)
    p = fxshard.plan(model, "4xcpu:1GB", (x,), strategy="hybrid", data_parallel="fsdp", stages=2)
    assert p.strategy == "hybrid" and p.data_parallel == "fsdp" and p.reshard_after_forward is False
