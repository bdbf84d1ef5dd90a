"""The cost of sharded data parallelism (fxshard/cost_models/sharding.py) and its collectives
(fxshard/comm.py): shards as torch cuts them, state bytes as torch allocates them, and the
time model's limits."""

from __future__ import annotations

import pytest
import torch

from fxshard.comm import ring_allgather_time, ring_allreduce_time, ring_reduce_scatter_time
from fxshard.cost_models.sharding import (
    ParamSpec,
    Unit,
    fsdp_time,
    in_flight_bytes,
    shard_rows,
    sharded_state,
)


@pytest.mark.parametrize("rows", [1, 5, 7, 8, 64, 65])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_shard_rows_are_torch_chunk(rows: int, n: int) -> None:
    chunks = torch.arange(rows).chunk(n)
    for rank in range(n):
        expected = len(chunks[rank]) if rank < len(chunks) else 0
        assert shard_rows(rows, n, rank) == expected
    assert sum(shard_rows(rows, n, r) for r in range(n)) == rows


def _specs(model: torch.nn.Module) -> list[ParamSpec]:
    return [ParamSpec(name=k, shape=tuple(p.shape), itemsize=p.element_size()) for k, p in model.named_parameters()] + [
        ParamSpec(name=k, shape=tuple(b.shape), itemsize=b.element_size(), buffer=True)
        for k, b in model.named_buffers()]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sharded_state_is_what_torch_allocates(n: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3),
                                torch.nn.BatchNorm1d(3))
    specs = _specs(model)
    for rank in range(n):
        # each rank's local shards, their gradients and Adam's moments, as FSDP2 holds them
        shards = [torch.nn.Parameter(p.detach().chunk(n)[rank].clone()) if rank < len(p.detach().chunk(n))
                  else torch.nn.Parameter(p.detach()[:0].clone()) for p in model.parameters()]
        for s in shards:
            s.grad = torch.ones_like(s)
        opt = torch.optim.Adam(shards)
        opt.step()
        moments = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for key, t in st.items() if key in ("exp_avg", "exp_avg_sq"))
        got = sharded_state(specs, n, rank, optimizer="adam")
        assert got.params == sum(s.numel() * s.element_size() for s in shards)
        assert got.grads == sum(s.grad.numel() * s.grad.element_size() for s in shards)
        assert got.optimizer == moments
        assert got.buffers == sum(b.numel() * b.element_size() for b in model.buffers())
    whole = sum(p.numel() * 4 for p in model.parameters())
    assert sum(sharded_state(specs, n, r, optimizer="sgd").params for r in range(n)) == whole
    assert sharded_state(specs, n, 0, optimizer="sgd").optimizer == 0
    assert sharded_state(specs, n, 0, training=False).grads == 0


def test_sixteen_bit_parameters_follow_the_mixed_precision_accounting() -> None:
    spec = ParamSpec(name="w", shape=(8, 4), itemsize=2)
    state = sharded_state([spec], 2, 0, optimizer="adam")
    elements = 16
    assert (state.params, state.grads, state.optimizer) == (2 * elements, 2 * elements, 12 * elements)
    assert state.total == 16 * elements  # ZeRO's 16 bytes per parameter, sharded


def test_in_flight_counts_root_and_two_blocks() -> None:
    units = [10.0, 3.0, 5.0, 4.0]
    assert in_flight_bytes(units) == 10 + 9 + 10 + 9
    assert in_flight_bytes(units, reshard_after_forward=False) == 10 + 12 + 10 + 9
    assert in_flight_bytes(units, training=False) == 10 + 9


def test_collectives_on_a_ring() -> None:
    bw, lat = 1e9, 1e-5
    assert ring_allgather_time(1e9, 4, bw, lat) == pytest.approx(0.75 + 3e-5)
    assert ring_allgather_time(1e9, 1, bw, lat) == 0.0
    assert (ring_allgather_time(1e9, 8, bw, lat) + ring_reduce_scatter_time(1e9, 8, bw, lat)
            == pytest.approx(ring_allreduce_time(1e9, 8, bw, lat)))


def _units(k: int, param_bytes: float, fwd: float) -> list[Unit]:
    return [Unit(name=f"u{i}", param_bytes=param_bytes, fwd_s=fwd, bwd_s=2 * fwd) for i in range(k)]


def test_fsdp_time_hides_small_collectives_and_exposes_large_ones() -> None:
    units = _units(5, 1e6, 1e-2)
    fast = fsdp_time(units, 8, 1e12, 0.0)
    # only the forward's first all-gather, the backward's first re-gather and its last
    # reduce-scatter stick out
    assert fast.exposed_s == pytest.approx(3 * ring_allgather_time(1e6, 8, 1e12, 0.0))
    assert fast.fwd_s + fast.bwd_s == pytest.approx(0.15 + fast.exposed_s)
    slow = fsdp_time(units, 8, 1e6, 0.0)
    # communication bound: the step is the channel's work, compute hidden behind it
    assert slow.fwd_s + slow.bwd_s == pytest.approx(slow.comm_s, rel=0.05)
    assert fsdp_time(units, 1, 1e6, 1e-3).exposed_s == 0.0


def test_keeping_blocks_gathered_saves_the_backward_all_gathers() -> None:
    units = _units(6, 1e8, 1e-4)
    again = fsdp_time(units, 8, 1e10, 1e-6, reshard_after_forward=True)
    kept = fsdp_time(units, 8, 1e10, 1e-6, reshard_after_forward=False)
    assert kept.comm_s < again.comm_s
    assert kept.bwd_s < again.bwd_s
    assert kept.fwd_s == again.fwd_s
    inference = fsdp_time(units, 8, 1e10, 1e-6, training=False)
    assert inference.bwd_s == 0.0 and inference.fwd_s == again.fwd_s
