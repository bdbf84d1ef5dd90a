"""Baseline partitioners, as users of other tools get them.

All three cut the graph's topological order into k contiguous pieces (so every result is a
valid pipeline) and differ only in what they balance:

- ``uniform``: equal numbers of graph nodes per stage (PiPPy's ``split_into_equal_size``
  idea applied to nodes).
- ``params``: equal parameter bytes per stage (DeepSpeed's default ``partition_method``);
  falls back to memory when the graph carries no ``params`` attribute.
- ``layers``: equal numbers of repeated blocks per stage (torchtitan's default): nodes are
  grouped by their ``layer`` label; nodes before the first block stay with the first stage,
  nodes after the last with the last. Without labels it is ``uniform``.

None of them looks at compute or communication: that is the point of comparing against them.
"""

from __future__ import annotations

import numpy as np

from fxshard.passes.partition.dp import split_to_stages, valid_boundaries
from fxshard.passes.partition.problem import Problem

__all__ = ["balanced_bounds", "layers_partition", "params_partition", "uniform_partition"]


def balanced_bounds(weights: np.ndarray, k: int, valid: np.ndarray) -> list[int]:
    """k - 1 increasing cut positions splitting ``weights`` (in order) into near-equal parts.

    Each cut goes to the valid position closest to its ideal share, keeping at least one item
    per part.
    """
    n = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(weights)])
    total = prefix[-1]
    if total <= 0:
        prefix = np.arange(n + 1, dtype=np.float64)
        total = float(n)
    candidates = np.flatnonzero(valid[1:n]) + 1
    bounds: list[int] = []
    prev = 0
    for s in range(1, k):
        remaining = k - s  # parts still to place after this cut
        allowed = candidates[(candidates > prev) & (candidates <= n - remaining)]
        if allowed.size == 0:
            allowed = np.array([min(max(prev + 1, 1), n - remaining)])
        target = total * s / k
        cut = int(allowed[np.argmin(np.abs(prefix[allowed] - target))])
        bounds.append(cut)
        prev = cut
    return bounds


def _split(problem: Problem, weights_per_unit: np.ndarray) -> np.ndarray:
    order = problem.order
    bounds = balanced_bounds(weights_per_unit[order], problem.k, valid_boundaries(problem, order))
    return split_to_stages(problem, order, bounds)


def uniform_partition(problem: Problem, seed: int = 0) -> np.ndarray:
    """Equal node counts per stage."""
    sizes = np.array([len(m) for m in problem.members], dtype=np.float64)
    return _split(problem, sizes)


def params_partition(problem: Problem, seed: int = 0) -> np.ndarray:
    """Equal parameter bytes per stage (memory when there are no parameters)."""
    weights = problem.params if problem.params.sum() > 0 else problem.memory
    return _split(problem, weights)


def layers_partition(problem: Problem, seed: int = 0) -> np.ndarray:
    """Equal numbers of repeated blocks per stage."""
    order = problem.order
    labels = [problem.layer[u] for u in order]
    seen: dict[str, int] = {}
    for lab in labels:
        if lab and lab not in seen:
            seen[lab] = len(seen)
    if len(seen) < problem.k:
        return uniform_partition(problem, seed)
    # Weight each block's first unit by 1: cutting "equal weight" then means equal blocks.
    weights = np.zeros(len(order))
    first_of: dict[str, int] = {}
    for p, lab in enumerate(labels):
        if lab and lab not in first_of:
            first_of[lab] = p
            weights[p] = 1.0
    valid = valid_boundaries(problem, order).copy()
    starts = np.zeros(len(order) + 1, dtype=bool)
    starts[list(first_of.values())] = True
    valid &= starts  # cut only where a block begins
    valid[0] = valid[len(order)] = True
    # A block's weight sits on its first unit, so the prefix at a cut counts the blocks before it.
    bounds = balanced_bounds(weights, problem.k, valid)
    return split_to_stages(problem, order, bounds)
