"""Repair an arbitrary assignment into a valid pipeline, and refine it by boundary moves.

``repair`` turns any per-unit labelling (a METIS partition, say, whose stage graph is cyclic
on most real DAGs) into an acyclic one: labels are ranked by the mean topological position of
their units, then every unit is pushed to at least the stage of its latest predecessor.

``refine`` then moves single units across the boundaries of the bottleneck stage (to the
neighbouring stage, only where every predecessor / successor already allows it, so the
order stays acyclic and pins hold), in Fiduccia-Mattheyses passes: the best move by the
vector of stage costs sorted in decreasing order, even an uphill one, each unit once per
pass, then back to the pass's best. When no move across the bottleneck's boundaries lowers
that vector, the first of the other stages (costliest first) with a move that does gets it, so
the stages below the bottleneck are evened out too (a dominant LM head would otherwise leave
them arbitrary). The bottleneck never rises and the loop terminates.
"""

from __future__ import annotations

import numpy as np

from fxshard.passes.partition.evaluate import StageCosts, evaluate
from fxshard.passes.partition.problem import PIN_FIRST, PIN_LAST, Problem

__all__ = ["priority_order", "refine", "repair"]


def repair(problem: Problem, labels: np.ndarray) -> np.ndarray:
    """An acyclic stage assignment close to ``labels`` (any integers, one per unit)."""
    order = problem.order
    pos = np.empty(problem.num_units, dtype=np.int64)
    pos[order] = np.arange(len(order))
    uniq, inv = np.unique(labels, return_inverse=True)
    mean_pos = np.bincount(inv, weights=pos) / np.bincount(inv)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(mean_pos, kind="stable")] = np.arange(len(uniq))
    want = rank[inv]
    # Squeeze the label ranks onto k stages in proportion (more labels than stages is fine).
    want = (want * problem.k) // len(uniq)
    want[problem.pin == PIN_FIRST] = 0
    pred_ptr, pred = problem.predecessors_csr()
    ptr, plist = pred_ptr.tolist(), pred.tolist()
    out = want.tolist()
    for u in order.tolist():
        for p in plist[ptr[u]:ptr[u + 1]]:
            if out[p] > out[u]:
                out[u] = out[p]
    stage = np.array(out, dtype=np.int64)
    stage[problem.pin == PIN_LAST] = problem.k - 1
    return stage


def priority_order(problem: Problem, stage: np.ndarray) -> np.ndarray:
    """A topological order of the units that keeps each stage contiguous (stage, then position)."""
    pos = np.empty(problem.num_units, dtype=np.int64)
    pos[problem.order] = np.arange(problem.num_units)
    return np.lexsort((pos, stage))


def _key(total: np.ndarray) -> tuple:
    return tuple(np.sort(total)[::-1])


def refine(problem: Problem, stage: np.ndarray, *, max_moves: int | None = None,
           patience: int | None = None) -> np.ndarray:
    """Lower the sorted stage costs by passes of single-unit moves, the bottleneck's boundaries first.

    Each move is the one whose result has the lexicographically smallest vector of stage costs
    (sorted in decreasing order), taken even when that is worse than the current vector, each
    unit at most once per pass (Fiduccia-Mattheyses); where no move across the bottleneck
    stage's boundaries lowers that vector, a lowering move across the next stage's (in
    decreasing cost) is taken instead, before any uphill one; after ``patience`` moves without a new
    best the pass returns to its best assignment, and passes repeat while one improves. Every
    move keeps each edge forward, the pins and the memory limits. Never worse than ``stage``.

    Args:
        max_moves: cap on the moves over all passes (default 4 n + 50 k).
        patience: moves without a new best before a pass ends (default by graph size: 40 up to
            500 units, 10 up to 1,500, then 0, a plain descent).
    """
    k, n = problem.k, problem.num_units
    if k == 1:
        return stage
    if patience is None:
        patience = 40 if n <= 500 else 10 if n <= 1500 else 0
    best = stage.copy()
    pred_ptr, pred = problem.predecessors_csr()
    best_key = _key(evaluate(problem, best).total)
    budget = max_moves if max_moves is not None else 4 * n + 50 * k
    while budget > 0:
        stage, key, moves = _pass(problem, best, best_key, patience, budget, pred_ptr, pred)
        budget -= moves
        if not key < best_key:
            break
        best, best_key = stage, key
    return best


def _pass(problem: Problem, start: np.ndarray, start_key: tuple, patience: int, budget: int,
          pred_ptr: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, tuple, int]:
    """One pass from ``start``: its best assignment, that assignment's key, and the moves made."""
    k = problem.k
    stage = start.copy()
    best, best_key = start, start_key
    locked = np.zeros(problem.num_units, dtype=bool)
    costs = evaluate(problem, stage)
    counts = np.bincount(stage, minlength=k)
    limit = problem.mem_limit * (1 + 1e-12)
    since, moves = 0, 0
    key = start_key
    while since <= patience and moves < budget:
        by_cost = np.argsort(-costs.total, kind="stable")  # the bottleneck first, ties to the lower stage
        chosen = _best_move(problem, stage, int(by_cost[0]), costs, counts, locked, limit, pred_ptr, pred)
        if chosen is None or not chosen[0] < key:
            # Nothing across the bottleneck's boundaries helps: even out the stages below it, the
            # costliest first, before any uphill move (the bottleneck alone leaves them arbitrary).
            for s in by_cost[1:].tolist():
                found = _best_move(problem, stage, s, costs, counts, locked, limit, pred_ptr, pred)
                if found is not None and found[0] < key:
                    chosen = found
                    break
        if chosen is None:
            break
        key, u, target, costs = chosen
        counts[stage[u]] -= 1
        counts[target] += 1
        stage[u] = target
        locked[u] = True
        moves += 1
        if key < best_key:
            best, best_key, since = stage.copy(), key, 0
        else:
            since += 1
    return best, best_key, moves


def _best_move(problem: Problem, stage: np.ndarray, s: int, costs: StageCosts, counts: np.ndarray, locked: np.ndarray,
               limit: np.ndarray, pred_ptr: np.ndarray, pred: np.ndarray) -> tuple | None:
    """(key, unit, target, costs) of the move touching stage s with the smallest key, or None."""
    chosen = None
    for u, target in _candidates(problem, stage, s, pred_ptr, pred, problem.succ_ptr, problem.succ):
        origin = stage[u]
        if locked[u] or counts[origin] <= 1 or costs.memory[target] + problem.memory[u] > limit[target]:
            continue
        stage[u] = target
        trial = evaluate(problem, stage)
        stage[u] = origin
        trial_key = _key(trial.total)
        if chosen is None or trial_key < chosen[0]:
            chosen = (trial_key, u, target, trial)
    return chosen


def _candidates(problem: Problem, stage: np.ndarray, s: int, pred_ptr: np.ndarray, pred: np.ndarray,
                succ_ptr: np.ndarray, succ: np.ndarray):
    """(unit, target stage) moves that touch stage s and keep the assignment acyclic."""
    k = problem.k
    for origin in (s, s - 1, s + 1):
        if not 0 <= origin < k:
            continue
        for u in np.flatnonzero(stage == origin):
            if problem.pin[u] != 0:
                continue
            ps = pred[pred_ptr[u]:pred_ptr[u + 1]]
            ss = succ[succ_ptr[u]:succ_ptr[u + 1]]
            down_ok = origin > 0 and (ps.size == 0 or stage[ps].max() <= origin - 1)
            up_ok = origin < k - 1 and (ss.size == 0 or stage[ss].min() >= origin + 1)
            if origin == s:
                if down_ok:
                    yield int(u), origin - 1
                if up_ok:
                    yield int(u), origin + 1
            elif origin == s - 1 and up_ok:
                yield int(u), s
            elif origin == s + 1 and down_ok:
                yield int(u), s
