"""The default partitioner: METIS clusters, repaired into a pipeline, cut optimally, refined.

1. pymetis partitions the undirected view of the unit graph: vertex weights are compute and
   memory (two constraints), edge weights the communication between units, target weights
   the devices' relative speeds. METIS minimises the edge cut under balance, which keeps
   heavy edges inside parts but knows nothing about direction.
2. ``repair`` ranks the parts by mean topological position and pushes each unit to at least
   its predecessors' stage: the stage order becomes acyclic.
3. The repaired stages are laid out as one topological order (stage by stage), and the exact
   contiguous DP picks the best cut points of that order: never worse than the repair.
4. ``refine`` moves single units across the bottleneck's boundaries.

This runs for METIS with k, 2k and 4k parts (finer clusters leave the DP more freedom) and
for the graph's own topological order; the best result wins, ties to the earliest candidate.
Everything is deterministic for a given ``seed``.
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
from fxshard.passes.partition.problem import Problem
from fxshard.passes.partition.refine import priority_order, refine, repair

__all__ = ["metis_labels", "metis_partition"]

_SCALE = 1 << 20
_REFINE_LIMIT = 3000  # units; beyond this the DP's cut points are kept as they are


def _scaled(values: np.ndarray) -> np.ndarray:
    top = values.max() if values.size else 0.0
    if top <= 0:
        return np.ones(values.shape, dtype=np.int64)
    return np.maximum(1, np.rint(values / top * _SCALE)).astype(np.int64)


def _undirected(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    ptr, cols, eweights = _undirected(problem)
    ncon = 2 if problem.memory.max() > 0 else 1
    vweights = np.stack([_scaled(problem.compute), _scaled(problem.memory)], axis=1)[:, :ncon].reshape(-1)
    share = np.repeat(problem.speeds / problem.speeds.sum(), max(1, parts // problem.k))
    share = np.resize(share, parts)
    share = share / share.sum()
    tpwgts = share.tolist()
    options = pymetis.Options(seed=seed, ufactor=30)
    kwargs = dict(vweights=vweights.tolist(), eweights=eweights.tolist(), tpwgts=tpwgts, options=options)
    with _quiet_stdout():  # METIS prints its warnings from C straight to file descriptor 1
        if hasattr(pymetis, "CSRAdjacency"):
            result = pymetis.part_graph(parts, pymetis.CSRAdjacency(ptr.tolist(), cols.tolist()), **kwargs)
        else:  # pymetis before 2025.2
            result = pymetis.part_graph(parts, xadj=ptr.tolist(), adjncy=cols.tolist(), **kwargs)
    return np.asarray(result[1] if isinstance(result, tuple) else result.vertex_part, dtype=np.int64)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
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
    """The best of the METIS-guided candidates (see the module docstring)."""
    k = problem.k
    if k == 1:
        return np.zeros(problem.num_units, dtype=np.int64)
    exact_cuts = problem.objective == "pipeline" or bool(np.all(problem.link[~np.eye(k, dtype=bool)] == 1.0))
    candidates = [dp_split(problem)]
    multiples = (1, 2, 4) if problem.num_units <= 20000 else (1,)
    for mult in multiples:
        parts = k * mult
        if 2 * parts > problem.num_units:
            break
        labels = metis_labels(problem, parts, seed=seed)
        repaired = repair(problem, labels)
        if not exact_cuts:
            candidates.append(repaired)
            continue
        try:
            # The repaired stages are one contiguous split of this order: the DP is no worse.
            candidates.append(dp_split(problem, priority_order(problem, repaired)))
        except PartitionError:
            candidates.append(repaired)  # no split of this order fits memory; refine may mend it
    if problem.num_units <= _REFINE_LIMIT:
        candidates = [refine(problem, c) for c in candidates]
    scores = [_score(problem, c) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: (scores[i][0], scores[i][1], i))
    return candidates[best]
