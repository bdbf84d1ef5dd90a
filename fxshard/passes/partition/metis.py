"""The default partitioner: a search over topological orders, each cut exactly, then refined.

The DP (:mod:`dp`) finds the best contiguous split of one topological order; on a branchy
graph the order decides which splits exist (:mod:`orders`). ``metis_partition``:

1. If the unit DAG has a single topological order (a chain, with or without skip edges),
   every acyclic assignment is a split of it and the DP over it is the answer.
2. Otherwise it cuts several orders with the DP: the graph's own order; depth-first orders
   (each branch laid out whole) with tie-breaks by unit number, reversed unit number,
   heaviest compute and seeded random numbers; and orders laid out part by part from METIS
   labellings with k, 2k and 4k parts. pymetis partitions the undirected unit graph (vertex
   weights compute and memory, edge weights communication, target weights the devices'
   speeds), minimising the edge cut under balance; ``orders.by_labels`` ranks the parts by
   their mean topological position and lays each out as a block as far as the edges allow.
   Where no split of a METIS order fits memory, or links are non-uniform under ``direct``
   (the DP's cuts are then not exact), ``repair`` of the labels is the candidate instead.
3. The best distinct candidates are refined by descent (``refine`` with ``patience=0``:
   single-unit moves across the bottleneck stage's boundaries, or the next costliest stage's
   where none across the bottleneck's helps, that keep every edge forward, pins and memory
   limits), and the best of them by Fiduccia-Mattheyses passes, which take uphill moves too.

The best result wins, ties to the earliest candidate. The search shrinks as the graph grows:
eleven depth-first orders up to 100 units, five up to 2,000, one up to 20,000, then none;
eight refined candidates up to 400 units, three up to 1,500, then one; one METIS labelling past
20,000 units; no refinement past 3,000. Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import pymetis

from fxshard.errors import PartitionError
from fxshard.passes.partition.dp import dp_split
from fxshard.passes.partition.evaluate import evaluate
from fxshard.passes.partition.orders import by_labels, depth_first, has_unique_order
from fxshard.passes.partition.problem import Problem
from fxshard.passes.partition.refine import refine, repair

__all__ = ["metis_labels", "metis_partition", "part_graph", "quiet_stdout", "undirected"]

_SCALE = 1 << 20
_REFINE_LIMIT = 3000  # units; beyond this the DP's cut points are kept as they are


def _scaled(values: np.ndarray) -> np.ndarray:
    top = values.max() if values.size else 0.0
    if top <= 0:
        return np.ones(values.shape, dtype=np.int64)
    return np.maximum(1, np.rint(values / top * _SCALE)).astype(np.int64)


def undirected(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of the symmetric unit graph, with communication as integer edge weights."""
    n = problem.num_units
    vid = np.repeat(np.arange(problem.val_src.size), np.diff(problem.val_ptr))
    prod, cons, comm = problem.val_src[vid], problem.val_dst, problem.val_comm[vid]
    # Every unit edge connects, with or without a value's weight on it.
    src = np.repeat(np.arange(n), np.diff(problem.succ_ptr))
    a = np.concatenate([prod, cons, src, problem.succ])
    b = np.concatenate([cons, prod, problem.succ, src])
    w = np.concatenate([comm, comm, np.zeros(2 * src.size)])
    keys, inv = np.unique(a * n + b, return_inverse=True)
    weight = np.bincount(inv, weights=w)
    rows, cols = keys // n, keys % n
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, rows + 1, 1)
    return np.cumsum(ptr), cols.astype(np.int64), _scaled(weight)


def metis_labels(problem: Problem, parts: int, *, seed: int = 0) -> np.ndarray:
    """pymetis labels (0..parts-1) for the units."""
    n = problem.num_units
    if parts <= 1 or n < 2 * parts:  # METIS needs a few vertices per part to bisect at all
        return (np.arange(n) * max(parts, 1)) // max(n, 1)
    share = np.repeat(problem.speeds / problem.speeds.sum(), max(1, parts // problem.k))
    share = np.resize(share, parts)
    return part_graph(problem, parts, undirected(problem), share / share.sum(), seed=seed, ufactor=30)


def part_graph(problem: Problem, parts: int, graph: tuple[np.ndarray, np.ndarray, np.ndarray],
               tpwgts: np.ndarray, *, seed: int, ufactor: int) -> np.ndarray:
    """pymetis k-way labels (0..parts-1) of ``graph`` (CSR pointers, columns, integer edge
    weights, as :func:`undirected` builds it), balancing the units' compute and memory (two
    constraints when any unit has memory) to the target shares ``tpwgts``."""
    ptr, cols, eweights = graph
    ncon = 2 if problem.memory.max() > 0 else 1
    vweights = np.stack([_scaled(problem.compute), _scaled(problem.memory)], axis=1)[:, :ncon].reshape(-1)
    options = pymetis.Options(seed=seed, ufactor=ufactor)
    kwargs = dict(vweights=vweights.tolist(), eweights=eweights.tolist(), tpwgts=tpwgts.tolist(), options=options)
    with quiet_stdout():  # METIS prints its warnings from C straight to file descriptor 1
        if hasattr(pymetis, "CSRAdjacency"):
            result = pymetis.part_graph(parts, pymetis.CSRAdjacency(ptr.tolist(), cols.tolist()), **kwargs)
        else:  # pymetis before 2025.2
            result = pymetis.part_graph(parts, xadj=ptr.tolist(), adjncy=cols.tolist(), **kwargs)
    return np.asarray(result[1] if isinstance(result, tuple) else result.vertex_part, dtype=np.int64)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence C-level writes to file descriptor 1 (they would corrupt ``--json -`` output)."""
    fd = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(fd)
    except OSError:
        yield  # no descriptor 1 at all: nothing to protect
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _score(problem: Problem, stage: np.ndarray) -> tuple[float, float]:
    costs = evaluate(problem, stage)
    if np.any(costs.memory > problem.mem_limit * (1 + 1e-12)):
        return np.inf, np.inf
    return costs.bottleneck, costs.cut


def metis_partition(problem: Problem, seed: int = 0) -> np.ndarray:
    """The best of the order-search candidates (see the module docstring)."""
    k = problem.k
    if k == 1:
        return np.zeros(problem.num_units, dtype=np.int64)
    exact_cuts = problem.objective == "pipeline" or bool(np.all(problem.link[~np.eye(k, dtype=bool)] == 1.0))
    if exact_cuts and has_unique_order(problem):
        return dp_split(problem)  # every acyclic assignment is a split of the one order: the DP is exact
    candidates = [dp_split(problem)]
    seen = {problem.order.tobytes()}
    for order, labels in _orders(problem, seed):
        if order is not None and order.tobytes() in seen:
            continue
        if order is not None:
            seen.add(order.tobytes())
        if labels is not None and not exact_cuts:
            candidates.append(repair(problem, labels))
            continue
        try:
            candidates.append(dp_split(problem, order))
        except PartitionError:
            if labels is not None:
                candidates.append(repair(problem, labels))  # no split of this order fits memory; refine may mend it
    candidates = list({c.tobytes(): c for c in candidates}.values())  # first of each distinct answer, in order
    scores = [_score(problem, c) for c in candidates]
    if problem.num_units <= _REFINE_LIMIT:
        keep = sorted(range(len(candidates)), key=lambda i: (scores[i][0], scores[i][1], i))
        keep = sorted(keep[:_refine_count(problem.num_units)])
        candidates = [refine(problem, candidates[i], patience=0) for i in keep]
        scores = [_score(problem, c) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: (scores[i][0], scores[i][1], i))
    if problem.num_units <= _REFINE_LIMIT and np.isfinite(scores[best][0]):
        return refine(problem, candidates[best])  # uphill moves too, from the best descent only
    return candidates[best]


def _refine_count(n: int) -> int:
    """How many of the best cut candidates get refined: all on small graphs, fewer as they grow."""
    return 8 if n <= 400 else 3 if n <= 1500 else 1


def _orders(problem: Problem, seed: int) -> Iterator[tuple[np.ndarray | None, np.ndarray | None]]:
    """(order, labels) pairs to cut: depth-first orders with several tie-breaks, then orders laid out
    part by part from METIS labellings with k, 2k and 4k parts (labels given, the order computed
    lazily). The search shrinks as the graph grows (docs/partitioning.md)."""
    n, k = problem.num_units, problem.k
    rng = np.random.default_rng(seed)
    ties = [np.arange(n), -np.arange(n), -problem.compute]
    ties += [rng.permutation(n) for _ in range(8 if n <= 100 else 2 if n <= 400 else 0)]
    for tie in ties[: 11 if n <= 100 else 5 if n <= 2000 else 1 if n <= 20000 else 0]:
        yield depth_first(problem, tie), None
    for mult in (1, 2, 4) if n <= 20000 else (1,):
        parts = k * mult
        if 2 * parts > n:
            break
        labels = metis_labels(problem, parts, seed=seed)
        yield by_labels(problem, labels), labels
