"""Data-parallel replicas of a stage: their gradients, averaged once per step.

A pipeline stage's replicas average their gradients over the mesh's data-parallel group after
the schedule's step, in buckets (as DDP's reducer does), not one all-reduce per parameter.
DDP itself cannot wrap the stage: its reducer expects one backward per forward and the
schedule runs several per step, one per micro-batch (``tests/test_data_parallel.py``
keeps a reproduction, to retire this path when torch lifts the limitation). The same
bucketed sum adds up a tied parameter's gradients over the stages holding it. A whole-model
replica (a ``ddp`` plan under torchrun) is wrapped in ``DistributedDataParallel`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["BUCKET_BYTES", "all_reduce_gradients", "wrap_replica"]

BUCKET_BYTES = 25 * 2**20
"""Gradient bytes per all-reduce, DDP's default ``bucket_cap_mb``."""


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], group: Any, *, divide_by: int = 1,
                         bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum ``params``' gradients over ``group`` (and divide by ``divide_by``), in buckets.

    A parameter without a gradient joins with zeros, so every rank reduces the same buckets.
    Gradients are grouped by device and dtype, and each bucket of up to ``bucket_bytes`` is
    flattened into one tensor, all-reduced once and copied back. A sharded gradient
    (``DTensor``) takes part with its local shard: the ranks of ``group`` must hold the same
    shard of it (the same data-parallel index).
    """
    from torch.distributed.tensor import DTensor

    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
    for grads in by_kind.values():
        for bucket in _buckets(grads, bucket_bytes):
            if len(bucket) == 1 and bucket[0].is_contiguous():
                # One tensor (a tied embedding's gradient is often a bucket of its own): reduce it
                # in place; flattening would copy it out and back (2 x 51 MB per step for GPT-2's).
                dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
                if divide_by != 1:
                    bucket[0].div_(divide_by)
                continue
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            if divide_by != 1:
                flat /= divide_by
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(reduced)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``tensors`` of at most ``bucket_bytes`` each (a larger tensor alone)."""
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return [b for b in buckets if b]


def wrap_replica(module: torch.nn.Module, device: torch.device, replicas: int) -> torch.nn.Module:
    """The whole model as one data-parallel replica: DDP over the default group when there
    are several (a single forward and backward per step, as DDP expects), else the module."""
    if replicas <= 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
