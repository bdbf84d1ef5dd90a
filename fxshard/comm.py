"""Communication times the planner and the simulator's callers price: ring all-reduce,
all-gather and reduce-scatter over a group of devices, and the link such a group talks over.
See docs/planning.md and docs/cost_models.md ("Sharded data parallel")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fxshard.cluster import Cluster

__all__ = ["exposed_allreduce_time", "group_link", "ring_allgather_time", "ring_allreduce_time",
           "ring_reduce_scatter_time", "tied_allreduce_time", "tied_syncs"]


def ring_allreduce_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` over n ranks: 2(n-1)/n x bytes / bandwidth
    plus 2(n-1) latencies."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def ring_allgather_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-gather whose gathered result is ``nbytes`` over n ranks: each rank
    sends and receives (n-1)/n x bytes, in n-1 steps of one latency each."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


def ring_reduce_scatter_time(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring reduce-scatter of ``nbytes`` (the unsharded input) over n ranks: the
    same traffic as an all-gather of the result, (n-1)/n x bytes plus n-1 latencies (an
    all-reduce is the two in sequence)."""
    return ring_allgather_time(nbytes, n, bandwidth, latency)


def group_link(cluster: Cluster, devices: Sequence[int]) -> tuple[float, float]:
    """(bandwidth, latency) of the link a group of devices all-reduces over: the slowest link in
    the group (inter-machine as soon as it spans two machines)."""
    machines = {cluster.devices[d].machine for d in devices}
    link = cluster.intra_link if len(machines) == 1 else cluster.inter_link
    return link.bandwidth, link.latency_s


def exposed_allreduce_time(cluster: Cluster, devices: Sequence[int], nbytes: float, backward_s: float) -> float:
    """The part of the gradients' ring all-reduce over ``devices`` that a backward of
    ``backward_s`` seconds cannot hide (DDP overlaps its bucketed all-reduce with backward)."""
    bandwidth, latency = group_link(cluster, devices)
    return max(0.0, ring_allreduce_time(nbytes, len(devices), bandwidth, latency) - backward_s)


def tied_allreduce_time(cluster: Cluster, devices: Sequence[int], nbytes: float) -> float:
    """Seconds for the ranks on ``devices`` (distinct) to sum a tied parameter's gradients: a ring
    all-reduce over the slowest link among them, after the schedule, hidden by nothing."""
    return exposed_allreduce_time(cluster, devices, nbytes, 0.0)


def tied_syncs(cluster: Cluster, tied: Sequence[Any], devices: Sequence[Sequence[int]],
               shards: int = 1) -> list[tuple[tuple[int, ...], float]]:
    """The simulator's ``syncs`` for tied parameters (:class:`fxshard.plan.TiedParameter`): per
    parameter, its stages and the all-reduce of its gradient (over ``shards`` when FSDP shards it)
    among the distinct devices of those stages, each replica's group at once."""
    return [(tuple(t.stages), tied_allreduce_time(cluster, sorted({devices[s][0] for s in t.stages}),
                                                  t.bytes / shards))
            for t in tied]
