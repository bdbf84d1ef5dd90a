"""Replica gradient sync (fxshard.runtime.data_parallel) and why it is not DDP's."""

from __future__ import annotations

import sys

import pytest

from tests import dist_harness

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")]


def _ddp_stage_two_steps(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.manual_seed(0)
    own, _ = dist.new_subgroups(group_size=1)  # one stage per rank; the ranks are its replicas
    stage = PipelineStage(torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4)), 0, 1,
                          torch.device("cpu"), group=own)
    schedule = ScheduleGPipe(stage, 2, loss_fn=F.mse_loss)
    for _ in range(2):
        schedule.step(torch.randn(4, 4), target=torch.randn(4, 4), losses=[])


def test_ddp_cannot_wrap_a_pipeline_stage_with_microbatches():
    """Why stage replicas sync with all_reduce_gradients: DDP's reducer asserts once a schedule
    has run two backward passes (two micro-batches) in one step. When this test fails, torch
    has lifted the limitation: wrap stages in DDP and retire the manual path."""
    with pytest.raises(AssertionError, match="rebuilt parameter indices size is not same"):
        dist_harness.run(_ddp_stage_two_steps, 2, timeout=120)


def _bucketed_matches_per_parameter(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    from fxshard.runtime.data_parallel import all_reduce_gradients

    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(7, 3), (5,), (11, 2), (1,)]]
    for p in params[:-1]:
        p.grad = torch.randn_like(p)  # the last has none: it joins with zeros
    expected = []
    for p in params:
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        expected.append(g / world)
    all_reduce_gradients(params, None, divide_by=world, bucket_bytes=64)  # several buckets
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e), (p.grad, e)


def test_bucketed_all_reduce_equals_one_all_reduce_per_parameter():
    dist_harness.run(_bucketed_matches_per_parameter, 2, timeout=120)
