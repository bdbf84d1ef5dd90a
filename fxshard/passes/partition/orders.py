"""Topological orders of the unit DAG for the contiguous DP to cut.

The DP (:mod:`dp`) is exact over the contiguous splits of one order, and on a branchy graph
(Inception, U-Net, encoder-decoder) which splits exist depends on the order: two branches
laid out one after the other can be cut between them, interleaved they cannot. This module
generates orders that differ where it matters:

- ``depth_first``: Kahn's algorithm taking the most recently readied unit first, so each
  branch is laid out whole before the next starts; tie-breaks by unit number, reversed unit
  number, heaviest compute or seeded random numbers give different branch orders;
- ``by_labels``: units grouped by a labelling (METIS parts, say), the labels ranked by the
  mean position of their units, each label laid out as a block as far as the edges allow.

Every order puts units pinned first at the start and units pinned last at the end, as
:func:`unit_dag.topo_order` does.
"""

from __future__ import annotations

import heapq

import numpy as np

from fxshard.passes.partition.problem import Problem

__all__ = ["by_labels", "depth_first", "has_unique_order", "positions"]


def positions(order: np.ndarray) -> np.ndarray:
    """pos[u]: the position of unit u in ``order``."""
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.arange(len(order))
    return pos


def has_unique_order(problem: Problem) -> bool:
    """True if the unit DAG has one topological order (a Hamiltonian path: every consecutive pair
    of ``problem.order`` is an edge): then every acyclic assignment is a contiguous split of it."""
    n = problem.num_units
    if n <= 1:
        return True
    src = np.repeat(np.arange(n), np.diff(problem.succ_ptr))
    keys = src * n + problem.succ  # sorted: CSR rows in order, each row sorted
    order = problem.order
    need = order[:-1] * n + order[1:]
    at = np.minimum(np.searchsorted(keys, need), max(keys.size - 1, 0))
    return bool(keys.size and np.all(keys[at] == need))


def _pin_rank(problem: Problem) -> np.ndarray:
    return np.choose(problem.pin, [1, 0, 2])


def _kahn(problem: Problem, primary: np.ndarray, tie: np.ndarray, *, depth_first: bool) -> np.ndarray:
    """Kahn's algorithm: the ready unit with the smallest (pin rank, primary, -readied stamp if
    ``depth_first``, tie, unit) goes next."""
    n = problem.num_units
    rank = _pin_rank(problem).tolist()
    primary_l, tie_l = primary.tolist(), tie.tolist()
    ptr, flat = problem.succ_ptr.tolist(), problem.succ.tolist()
    indeg = np.bincount(problem.succ, minlength=n).tolist()
    stamp = 0
    ready = [(rank[u], primary_l[u], 0, tie_l[u], u) for u in range(n) if indeg[u] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        u = heapq.heappop(ready)[-1]
        order.append(u)
        for v in flat[ptr[u]:ptr[u + 1]]:
            indeg[v] -= 1
            if indeg[v] == 0:
                stamp += 1
                heapq.heappush(ready, (rank[v], primary_l[v], -stamp if depth_first else 0, tie_l[v], v))
    return np.array(order, dtype=np.int64)


def depth_first(problem: Problem, tie: np.ndarray) -> np.ndarray:
    """A depth-first topological order; among units readied together, the smallest ``tie`` first."""
    return _kahn(problem, np.zeros(problem.num_units, dtype=np.int64), tie, depth_first=True)


def by_labels(problem: Problem, labels: np.ndarray) -> np.ndarray:
    """A topological order that lays the labels out one after the other, ranked by the mean
    position of their units in ``problem.order``; within a label, ``problem.order``."""
    pos = positions(problem.order)
    uniq, inv = np.unique(labels, return_inverse=True)
    mean_pos = np.bincount(inv, weights=pos) / np.bincount(inv)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(mean_pos, kind="stable")] = np.arange(len(uniq))
    return _kahn(problem, rank[inv], pos, depth_first=False)
