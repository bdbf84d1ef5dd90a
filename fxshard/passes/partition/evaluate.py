"""The partitioning objective, and the Partition record every partitioner returns.

Stage cost = compute / speed + communication. Communication depends on the objective:

- ``pipeline`` (default): a value produced on stage a and last consumed on stage b > a is
  sent a -> a+1 -> ... -> b, as a real pipeline must forward it: stage a pays one send, each
  stage strictly between pays a receive and a send, stage b pays a receive. The cost of
  crossing boundary s|s+1 is ``comm * link[s, s+1]``.
- ``direct``: the max-load objective of Tarnawski et al. (NeurIPS 2020): the producer's stage
  pays ``comm`` once if any other stage consumes the value, and each other consuming stage
  pays ``comm`` once.

The bottleneck is the largest stage cost; the lower bound is ``max(total compute / total
speed, largest unit / fastest device)``. See docs/partitioning.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping

import numpy as np

from fxshard.passes.partition.problem import PIN_FIRST, PIN_LAST, Problem

__all__ = ["Partition", "StageCosts", "evaluate", "is_acyclic", "lower_bound", "make_partition"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageCosts:
    """Per-stage figures of one assignment."""

    compute: np.ndarray
    comm: np.ndarray
    memory: np.ndarray
    cut: float

    @property
    def total(self) -> np.ndarray:
        return self.compute + self.comm

    @property
    def bottleneck(self) -> float:
        return float(self.total.max())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Partition:
    """A split of a graph into k pipeline stages, with its costs.

    Attributes:
        stage_of: node -> stage index (0..k-1).
        k, partitioner, objective: what was asked.
        stage_compute, stage_comm, stage_memory, stage_cost: per stage.
        bottleneck: the largest stage cost; ``bottleneck_stage`` is its index.
        lower_bound: no split can have a smaller bottleneck.
        cut: total communication time over all sends.
        is_acyclic: every edge goes to the same or a later stage.
        fits_memory: every stage within its memory limit.
        seconds: time the partitioner took.
    """

    stage_of: Mapping[Hashable, int]
    k: int
    partitioner: str
    objective: str
    stage_compute: tuple[float, ...]
    stage_comm: tuple[float, ...]
    stage_memory: tuple[float, ...]
    stage_cost: tuple[float, ...]
    bottleneck: float
    bottleneck_stage: int
    lower_bound: float
    cut: float
    is_acyclic: bool
    fits_memory: bool
    seconds: float = 0.0

    @property
    def is_valid(self) -> bool:
        """Acyclic and within memory."""
        return self.is_acyclic and self.fits_memory

    @property
    def stages(self) -> list[list[Hashable]]:
        """The nodes of each stage, in graph order."""
        out: list[list[Hashable]] = [[] for _ in range(self.k)]
        for node, s in self.stage_of.items():
            out[s].append(node)
        return out

    def to_dict(self) -> dict:
        """JSON-able summary (node ids as strings)."""
        data = dataclasses.asdict(self)
        data["stage_of"] = {str(n): s for n, s in self.stage_of.items()}
        return data


def is_acyclic(problem: Problem, stage: np.ndarray) -> bool:
    """True if every unit edge goes to the same or a later stage and pins are honoured."""
    src = np.repeat(np.arange(problem.num_units), np.diff(problem.succ_ptr))
    if src.size and np.any(stage[src] > stage[problem.succ]):
        return False
    if np.any(stage[problem.pin == PIN_FIRST] != 0) or np.any(stage[problem.pin == PIN_LAST] != problem.k - 1):
        return False
    return True


def lower_bound(problem: Problem) -> float:
    """max(total compute / total speed, largest unit / fastest device)."""
    return float(max(problem.compute.sum() / problem.speeds.sum(), problem.compute.max() / problem.speeds.max()))


def evaluate(problem: Problem, stage: np.ndarray) -> StageCosts:
    """Per-stage compute, communication and memory of a per-unit stage assignment."""
    k = problem.k
    compute = np.bincount(stage, weights=problem.compute, minlength=k) / problem.speeds
    memory = np.bincount(stage, weights=problem.memory, minlength=k)
    comm = np.zeros(k)
    cut = 0.0
    if problem.val_src.size:
        counts = np.diff(problem.val_ptr)
        vid = np.repeat(np.arange(problem.val_src.size), counts)
        dst_stage = stage[problem.val_dst]
        src_stage = stage[problem.val_src]
        if problem.objective == "pipeline":
            last = np.full(problem.val_src.size, -1, dtype=np.int64)
            np.maximum.at(last, vid, dst_stage)
            crossing = last > src_stage
            a, b, c = src_stage[crossing], last[crossing], problem.val_comm[crossing]
            # hops[s] = total comm crossing boundary s|s+1
            diff = np.zeros(k + 1)
            np.add.at(diff, a, c)
            np.add.at(diff, b, -c)
            hops = np.cumsum(diff)[: k - 1]
            factors = problem.link[np.arange(k - 1), np.arange(1, k)] if k > 1 else np.zeros(0)
            boundary = hops * factors
            comm[:-1] += boundary  # send
            comm[1:] += boundary  # receive
            cut = float(boundary.sum())
        else:
            keys = np.unique(vid * k + dst_stage)
            v, d = keys // k, keys % k
            s = src_stage[v]
            other = d != s
            v, d, s = v[other], d[other], s[other]
            c = problem.val_comm[v] * problem.link[s, d]
            np.add.at(comm, d, c)
            send = np.zeros(problem.val_src.size)
            np.maximum.at(send, v, c)
            np.add.at(comm, src_stage, send)
            cut = float(c.sum())
    return StageCosts(compute=compute, comm=comm, memory=memory, cut=cut)


def make_partition(problem: Problem, stage: np.ndarray, *, partitioner: str, seconds: float = 0.0) -> Partition:
    """The :class:`Partition` record of a per-unit assignment."""
    costs = evaluate(problem, stage)
    total = costs.total
    node_stage = stage[problem.unit_of]
    return Partition(
        stage_of={node: int(s) for node, s in zip(problem.nodes, node_stage)},
        k=problem.k, partitioner=partitioner, objective=problem.objective,
        stage_compute=tuple(map(float, costs.compute)), stage_comm=tuple(map(float, costs.comm)),
        stage_memory=tuple(map(float, costs.memory)), stage_cost=tuple(map(float, total)),
        bottleneck=float(total.max()), bottleneck_stage=int(total.argmax()),
        lower_bound=lower_bound(problem), cut=costs.cut, is_acyclic=is_acyclic(problem, stage),
        fits_memory=bool(np.all(costs.memory <= problem.mem_limit * (1 + 1e-12))), seconds=seconds)
