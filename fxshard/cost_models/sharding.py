"""What sharded data parallelism (FSDP2) costs a rank: memory and time.

A data-parallel group of n ranks sharding with ``torch.distributed.fsdp.fully_shard`` holds
per rank (docs/cost_models.md, "Sharded data parallel"):

- its shard of every parameter, its gradient and its optimizer state, each parameter cut on
  dim 0 as FSDP2 cuts it (``torch.chunk``: rank r holds rows [r*c, min((r+1)*c, d0)), with
  c = ceil(d0 / n)); buffers are not sharded;
- the unsharded units in flight: the parameters (and, in backward, gradients) of the unit
  being computed and of the next one, prefetched, plus the root unit's;
- the activations of its micro-batch (the stage's checkpointing policy decides how many).

Time: an all-gather per unit in forward, again in backward when the unit is resharded after
forward, a reduce-scatter per unit in backward, on one communication channel that runs
beside compute; a unit's compute waits for its all-gather, the next unit's all-gather is
issued when the previous unit's compute starts (prefetch of one). What compute cannot hide
is exposed. All functions here are pure arithmetic on plain numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from fxshard.comm import ring_allgather_time, ring_reduce_scatter_time
from fxshard.cost_models.memory import training_memory
from fxshard.errors import CostModelError

__all__ = ["FsdpTime", "ParamSpec", "ShardedState", "Unit", "fsdp_time", "in_flight_bytes", "shard_rows",
           "sharded_state"]

_SIXTEEN_BIT_ITEMSIZE = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One parameter (or buffer) as a shard plan sees it: its shape and element size."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool = True
    buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedState:
    """Bytes one rank holds of the model's state, by what holds them.

    ``optimizer`` is Adam's exp_avg and exp_avg_sq (not its 4-byte ``step`` tensor); for a
    16-bit parameter it also holds the fp32 master copy (mixed precision, as
    fxshard/cost_models/memory.py accounts it)."""

    params: int
    grads: int
    optimizer: int
    buffers: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unit:
    """One FSDP unit (a repeated block, or the root: everything else): its unsharded parameter
    bytes and its compute per micro-batch (backward includes any recomputation)."""

    name: str
    param_bytes: float
    fwd_s: float
    bwd_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class FsdpTime:
    """Seconds of one micro-batch on a sharded rank: forward and backward from first issue to
    last completion, and the part of them that is communication compute did not hide."""

    fwd_s: float
    bwd_s: float
    exposed_s: float
    comm_s: float


def shard_rows(rows: int, n: int, rank: int) -> int:
    """Rows of a dim-0 length ``rows`` that ``rank`` of ``n`` holds, as ``torch.chunk`` cuts
    (and FSDP2 shards): chunks of ceil(rows / n), the last ones short or empty."""
    if n < 1 or not 0 <= rank < n:
        raise CostModelError(f"rank {rank} of {n} ranks; use 0 <= rank < n, n >= 1")
    chunk = -(-rows // n)
    return max(0, min((rank + 1) * chunk, rows) - rank * chunk)


def _local_elements(spec: ParamSpec, n: int, rank: int) -> int:
    if spec.buffer:
        return spec.numel  # FSDP2 shards parameters only; buffers are replicated
    shape = spec.shape or (1,)  # a scalar parameter is one row
    rest = math.prod(shape[1:])
    return shard_rows(shape[0], n, rank) * rest


def sharded_state(specs: Sequence[ParamSpec], n: int, rank: int, *, optimizer: str = "adam",
                  training: bool = True) -> ShardedState:
    """The state bytes ``rank`` of ``n`` holds when every parameter is sharded on dim 0.

    An fp32 (or any non-16-bit) parameter is counted as torch holds it: the local shard, a
    gradient of the same size and dtype, and for Adam two moments of the same size and dtype.
    A 16-bit parameter is counted as mixed precision (16-bit weight and gradient, fp32 master
    copy and moments), the accounting of fxshard/cost_models/memory.py. Frozen parameters have
    no gradient and no optimizer state.

    Args:
        specs: every parameter and buffer once (a tied weight once).
        n, rank: the group size and the rank asked about (rank 0 holds the most).
        optimizer: "adam", "sgd" or "none".
        training: False counts the parameters and buffers only.

    Example::

        sharded_state([ParamSpec(name="w", shape=(5, 3), itemsize=4)], 4, 3)  # rank 3: no rows
    """
    params = grads = state = buffers = 0
    for spec in specs:
        local = _local_elements(spec, n, rank)
        if spec.buffer:
            buffers += local * spec.itemsize
            continue
        params += local * spec.itemsize
        if not (training and spec.trainable):
            continue
        mixed = spec.itemsize == _SIXTEEN_BIT_ITEMSIZE
        per = training_memory(optimizer, "mixed" if mixed else "fp32", param_dtype_bytes=spec.itemsize)
        grads += local * per.gradients
        # torch.optim keeps moments in the parameter's dtype; mixed precision keeps them in fp32
        moments = per.optimizer_state if mixed else per.optimizer_state // 4 * spec.itemsize
        state += local * (moments + per.master_weights)
    return ShardedState(params=params, grads=grads, optimizer=state, buffers=buffers)


def in_flight_bytes(unit_bytes: Sequence[float], *, reshard_after_forward: bool = True,
                    training: bool = True) -> float:
    """Unsharded parameter (and gradient) bytes a rank holds at its peak beside its shards.

    ``unit_bytes[0]`` is the root unit (embeddings, head, everything outside repeated blocks),
    which FSDP2 keeps gathered from forward to backward; the rest are the repeated blocks.
    Assumptions (docs/cost_models.md): the block being computed and the next one, prefetched,
    are gathered at once (the two largest counted); with ``reshard_after_forward=False`` every
    block stays gathered from its forward to its backward; in backward the gradients of the
    root and of two blocks (being computed, being reduce-scattered) are unsharded at once.
    """
    if not unit_bytes:
        return 0.0
    root, blocks = float(unit_bytes[0]), sorted((float(b) for b in unit_bytes[1:]), reverse=True)
    two = sum(blocks[:2])
    params = root + (two if reshard_after_forward else sum(blocks))
    return params + (root + two if training else 0.0)


def _pass_time(compute: Sequence[float], gather: Sequence[float], scatter: Sequence[float]) -> tuple[float, float]:
    """(end, comm) of one pass over units in order on one communication channel.

    Unit j's compute starts when unit j-1's ends and its all-gather has arrived; the all-gather
    of unit j+1 is issued when unit j's compute starts, after the reduce-scatter of unit j-1
    (issued when that unit's compute ended); the channel runs one collective at a time, in
    issue order.
    """
    if not compute:
        return 0.0, 0.0
    channel = gather[0]
    arrived = gather[0]
    done = 0.0
    for j, work in enumerate(compute):
        start = max(done, arrived)
        if j > 0 and scatter[j - 1] > 0:
            channel = max(channel, done) + scatter[j - 1]
        if j + 1 < len(compute):
            channel = max(channel, start) + gather[j + 1]
            arrived = channel
        done = start + work
    if scatter[-1] > 0:
        channel = max(channel, done) + scatter[-1]
    return max(done, channel), sum(gather) + sum(scatter)


def fsdp_time(units: Sequence[Unit], n: int, bandwidth: float, latency: float, *,
              reshard_after_forward: bool = True, training: bool = True) -> FsdpTime:
    """One micro-batch's forward and backward on a rank of a group of ``n`` sharding ``units``
    (``units[0]`` the root, then the blocks in forward order), on a link of ``bandwidth``
    bytes/s and ``latency`` seconds per step.

    Forward gathers root then blocks; backward runs the blocks in reverse, then the root (whose
    gradients FSDP2 reduce-scatters last), re-gathering each block first when it was resharded
    after forward. Every micro-batch gathers and reduce-scatters (gradient accumulation
    included: gradients stay sharded between micro-batches).
    """
    def gather(b: float) -> float:
        return ring_allgather_time(b, n, bandwidth, latency)

    def scatter(b: float) -> float:
        return ring_reduce_scatter_time(b, n, bandwidth, latency)

    fwd_end, fwd_comm = _pass_time([u.fwd_s for u in units], [gather(u.param_bytes) for u in units],
                                   [0.0] * len(units))
    bwd_end = bwd_comm = bwd_work = 0.0
    if training and units:
        order = list(reversed(units[1:])) + [units[0]]
        regather = [gather(u.param_bytes) if reshard_after_forward else 0.0 for u in order[:-1]] + [0.0]
        bwd_end, bwd_comm = _pass_time([u.bwd_s for u in order], regather, [scatter(u.param_bytes) for u in order])
        bwd_work = sum(u.bwd_s for u in order)
    fwd_work = sum(u.fwd_s for u in units)
    exposed = (fwd_end - fwd_work) + (bwd_end - bwd_work)
    return FsdpTime(fwd_s=fwd_end, bwd_s=bwd_end, exposed_s=exposed, comm_s=fwd_comm + bwd_comm)
