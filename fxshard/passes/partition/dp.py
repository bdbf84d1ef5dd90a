"""Exact optimum over contiguous splits of one topological order (chains-on-chains).

Under the ``pipeline`` objective the cost of a stage holding positions [i, j) of the order is
separable: ``(C[j] - C[i]) / speed + X[i] * f_in + X[j] * f_out``, where C is the prefix sum
of compute and X[b] the communication crossing position b. The min-max split is then found
by bisection on the bottleneck T, each probe a vectorised reachability sweep with a
range-maximum table: O(k n log n) per probe, fast enough for 1e5 units. The stages besides
the bottleneck are then balanced too: the costliest stage keeps its segment and the stretches
before and after it are split again for their own smallest bottleneck, and so on within them
(searches sweeping at most the first one's stage-positions in all), so a dominant last stage
does not leave all but one unit on stage 0.

Under the ``direct`` objective a stage's communication depends on the whole segment, so the
segment costs are tabulated (O(n^2) memory) and a plain min-max DP runs over them; it is
meant for graphs of a few thousand units, such as the public benchmark instances. It is exact
for uniform links only: with per-pair link factors a consumer's cost depends on the stage of
every producer, which no segment table captures, so the cuts are chosen for uniform links and
the result is then evaluated (and reported) with the real ones.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from fxshard.errors import PartitionError
from fxshard.passes.partition.problem import PIN_FIRST, PIN_LAST, Problem

__all__ = ["dp_split", "split_to_stages", "valid_boundaries"]

_DIRECT_LIMIT = 6000


def split_to_stages(problem: Problem, order: np.ndarray, bounds: list[int]) -> np.ndarray:
    """Per-unit stages from increasing boundary positions (k - 1 of them) over ``order``."""
    pos_stage = np.zeros(len(order), dtype=np.int64)
    for b in bounds:
        pos_stage[b:] += 1
    stage = np.empty(problem.num_units, dtype=np.int64)
    stage[order] = pos_stage
    return stage


def valid_boundaries(problem: Problem, order: np.ndarray) -> np.ndarray:
    """valid[b] for b in 0..n: a stage may start at position b (pins respected)."""
    n = len(order)
    pin = problem.pin[order]
    valid = np.ones(n + 1, dtype=bool)
    first = np.flatnonzero(pin == PIN_FIRST)
    last = np.flatnonzero(pin == PIN_LAST)
    if first.size:
        valid[: first.max() + 1] = False
    if last.size:
        valid[last.min() + 1:] = False
    valid[0] = valid[n] = True
    return valid


def _crossing(problem: Problem, order: np.ndarray) -> np.ndarray:
    """X[b]: communication of values produced before position b and consumed at or after it."""
    n = len(order)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    diff = np.zeros(n + 2)
    if problem.val_src.size:
        vid = np.repeat(np.arange(problem.val_src.size), np.diff(problem.val_ptr))
        last = np.full(problem.val_src.size, -1, dtype=np.int64)
        np.maximum.at(last, vid, pos[problem.val_dst])
        a = pos[problem.val_src]
        np.add.at(diff, a + 1, problem.val_comm)
        np.add.at(diff, last + 1, -problem.val_comm)
    return np.cumsum(diff)[: n + 1]


class _WindowMax:
    """max(a[lo[j]..hi[j]]) (inclusive; -inf for an empty window) for fixed windows over arrays
    ``a`` that change from call to call: the DP asks it once per stage and probe, with the same
    memory windows every time, so the sparse table's levels and gather indices are computed once.
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray) -> None:
        size = len(lo)
        self.ok = np.flatnonzero(lo <= hi)
        lo, hi = lo[self.ok], hi[self.ok]
        level = np.zeros(lo.shape, dtype=np.int64)
        if lo.size:
            level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
        self.levels = int(level.max()) + 1 if level.size else 1
        self.size = size
        self.first = level * size + lo
        self.second = level * size + hi - (1 << level) + 1

    def __call__(self, a: np.ndarray) -> np.ndarray:
        size = self.size
        table = np.empty((self.levels, size))  # the tail of a level past its last window is never read
        table[0] = a
        step = 1
        for lv in range(1, self.levels):
            np.maximum(table[lv - 1, :size - step], table[lv - 1, step:], out=table[lv, :size - step])
            step *= 2
        flat = table.reshape(-1)
        out = np.full(size, -np.inf)
        out[self.ok] = np.maximum(flat[self.first], flat[self.second])
        return out


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """The DP's feasibility test for a probe bottleneck ``t``, with what does not depend on ``t``
    computed once per stage: per boundary, a stage's start and end terms (``begin``, ``end``), the
    range of starts its memory allows (``window``, None when unlimited) and where it may end."""

    begin: list[np.ndarray]
    end: list[np.ndarray]
    window: list[_WindowMax | None]
    ends: list[np.ndarray]

    def __call__(self, t: float, keep: bool) -> list[np.ndarray] | None:
        """Per stage, the boundaries reachable with every stage within ``t`` (all kept when
        ``keep``, for backtracking); None when the last stage cannot end."""
        n = len(self.ends[0]) - 1
        neg_inf = np.full(n + 1, -np.inf)
        reach = np.zeros(n + 1, dtype=bool)
        reach[0] = True
        history = [reach]
        tol = t * (1 + 1e-12) + 1e-300
        for s in range(len(self.ends)):
            b_val = np.where(reach, self.begin[s], neg_inf)
            if self.window[s] is None:
                best = np.empty(n + 1)
                best[0] = -np.inf
                np.maximum.accumulate(b_val[:-1], out=best[1:])
            else:
                best = self.window[s](b_val)
            reach = (best >= self.end[s] - tol) & self.ends[s]
            if not reach.any():
                return None
            if keep:
                history.append(reach)
        return history


def _sweep(problem: Problem, comp: np.ndarray, mem: np.ndarray, cross: np.ndarray, valid: np.ndarray,
           f_link: np.ndarray, stages: range) -> _Sweep:
    """The feasibility test for splitting the positions of ``comp`` (prefix sums over a stretch of
    the order) into the consecutive ``stages``."""
    n = len(comp) - 1
    begin, end, window = [], [], []
    positions = np.arange(n + 1)
    for s in stages:
        sp = problem.speeds[s]
        begin.append(comp / sp - cross * (f_link[s - 1] if s > 0 else 0.0))
        end.append(comp / sp + cross * f_link[s])
        if math.isinf(problem.mem_limit[s]):
            window.append(None)
        else:
            first = np.searchsorted(mem, mem - problem.mem_limit[s] * (1 + 1e-12), side="left")
            window.append(_WindowMax(first, positions - 1))
    m = len(stages)
    ends = [valid.copy() for _ in range(m)]
    for i in range(m):
        ends[i][0] = False
        if i < m - 1:
            ends[i][n] = False
        else:
            ends[i][:n] = False
    return _Sweep(begin=begin, end=end, window=window, ends=ends)


def _pipeline_dp(problem: Problem, order: np.ndarray) -> list[int]:
    k, n = problem.k, len(order)
    comp = np.concatenate([[0.0], np.cumsum(problem.compute[order])])
    mem = np.concatenate([[0.0], np.cumsum(problem.memory[order])])
    cross = _crossing(problem, order)
    valid = valid_boundaries(problem, order)
    f_link = np.array([problem.link[s, s + 1] for s in range(k - 1)] + [0.0])
    sweep = _sweep(problem, comp, mem, cross, valid, f_link, range(k))

    total = comp[-1] / problem.speeds.min() + 2 * cross.max() * max(f_link.max(), 1.0)
    hi = total * 1.000001 + 1e-12
    guess = _equal_compute_bound(comp, cross, f_link, mem, valid, problem)
    if (guess is None or guess >= hi) and sweep(hi, False) is None:  # a guess is a split that fits
        raise PartitionError(
            f"no split of the {n} units into {k} contiguous stages fits the memory limits "
            f"({', '.join(f'{x:.4g}' for x in problem.mem_limit)} bytes; the graph needs "
            f"{mem[-1]:.4g}); use more stages or larger devices")
    if guess is not None and guess < hi:
        hi = guess * (1 + 1e-12) + 1e-300
    bounds = _min_max(problem, comp, mem, cross, f_link, sweep, range(k), hi)
    return _balanced(problem, comp, mem, cross, valid, f_link, [0, *bounds, n])


def _min_max(problem: Problem, comp: np.ndarray, mem: np.ndarray, cross: np.ndarray, f_link: np.ndarray,
             sweep: _Sweep, stages: range, hi: float) -> list[int]:
    """The inner cuts of the split with the smallest bottleneck (bisection from ``hi``, which fits)."""
    lo = float(max((comp[-1] - comp[0]) / problem.speeds[stages.start:stages.stop].sum(), 0.0))
    for _ in range(200):
        if hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        if sweep(mid, False) is None:
            lo = mid
        else:
            hi = mid
    history = sweep(hi, True)
    assert history is not None
    return _backtrack(problem, comp, mem, cross, f_link, history, hi, stages)


def _segment_costs(problem: Problem, comp: np.ndarray, cross: np.ndarray, f_link: np.ndarray,
                   edges: list[int], first: int) -> np.ndarray:
    """The cost of each stage between consecutive ``edges`` (positions), stages numbered from ``first``."""
    costs = []
    for i in range(len(edges) - 1):
        s = first + i
        a, b = edges[i], edges[i + 1]
        f_in = f_link[s - 1] if s > 0 else 0.0
        costs.append((comp[b] - comp[a]) / problem.speeds[s] + cross[a] * f_in + cross[b] * f_link[s])
    return np.array(costs)


def _balanced(problem: Problem, comp: np.ndarray, mem: np.ndarray, cross: np.ndarray, valid: np.ndarray,
              f_link: np.ndarray, edges: list[int]) -> list[int]:
    """Inner cuts as good as ``edges`` (a feasible split of all stages, as positions) with the
    stages besides the costliest balanced too. The bottleneck alone leaves them arbitrary (the
    backtrack makes later stages as short as it can), which puts a lone residual add on a stage of
    its own. The costliest stage keeps its segment and the stretches before and after it are each
    split again for their own smallest bottleneck, then the same within each stretch, breadth first,
    while the searches have swept at most k n stage-positions in all (the first search's width, so
    this about doubles its time at most; peeling one stage at a time down to the last would cost
    k / 2 times as much). A stretch keeps its old cuts unless the new ones lower its bottleneck, so the vector of
    stage costs sorted in decreasing order never rises."""
    k, n = problem.k, len(comp) - 1
    out = edges[:]
    budget = k * n
    queue = collections.deque([(0, k)])
    while queue:
        i, j = queue.popleft()
        costs = _segment_costs(problem, comp, cross, f_link, out[i:j + 1], i)
        b = i + int(np.argmax(costs))
        for lo_i, hi_i in ((i, b), (b + 1, j)):
            a, z = out[lo_i], out[hi_i]
            work = (hi_i - lo_i) * (z - a)
            if hi_i - lo_i < 2 or work > budget:
                continue
            budget -= work
            part = slice(a, z + 1)
            stages = range(lo_i, hi_i)
            sweep = _sweep(problem, comp[part], mem[part], cross[part], valid[part], f_link, stages)
            cap = float(costs[lo_i - i:hi_i - i].max())
            cuts = [a + c for c in _min_max(problem, comp[part], mem[part], cross[part], f_link, sweep, stages,
                                            cap * (1 + 1e-12) + 1e-300)]
            if _segment_costs(problem, comp, cross, f_link, [a, *cuts, z], lo_i).max() < cap:
                out[lo_i + 1:hi_i] = cuts
            queue.append((lo_i, hi_i))
    return out[1:-1]


def _equal_compute_bound(comp: np.ndarray, cross: np.ndarray, f_link: np.ndarray, mem: np.ndarray,
                         valid: np.ndarray, problem: Problem) -> float | None:
    """The bottleneck of cutting where compute (scaled by speed) splits evenly: an upper bound."""
    k, n = problem.k, len(comp) - 1
    share = np.cumsum(problem.speeds)[:-1] / problem.speeds.sum() * comp[-1]
    allowed = np.flatnonzero(valid[1:n]) + 1
    bounds, prev = [0], 0
    for s, target in enumerate(share):
        ok = allowed[(allowed > prev) & (allowed <= n - (k - 1 - s))]
        if ok.size == 0:
            return None
        prev = int(ok[np.argmin(np.abs(comp[ok] - target))])
        bounds.append(prev)
    bounds.append(n)
    worst = 0.0
    for s in range(k):
        i, j = bounds[s], bounds[s + 1]
        if mem[j] - mem[i] > problem.mem_limit[s] * (1 + 1e-12):
            return None
        f_in = f_link[s - 1] if s > 0 else 0.0
        worst = max(worst, (comp[j] - comp[i]) / problem.speeds[s] + cross[i] * f_in + cross[j] * f_link[s])
    return worst


def _backtrack(problem: Problem, comp: np.ndarray, mem: np.ndarray, cross: np.ndarray,
               f_link: np.ndarray, history: list[np.ndarray], t: float, stages: range) -> list[int]:
    n = len(comp) - 1
    tol = t * (1 + 1e-12) + 1e-300
    bounds = []
    j = n
    for i_s in range(len(stages) - 1, -1, -1):
        s = stages[i_s]
        sp = problem.speeds[s]
        f_in = f_link[s - 1] if s > 0 else 0.0
        i = np.arange(j)
        cost = (comp[j] - comp[i]) / sp + cross[i] * f_in + cross[j] * f_link[s]
        ok = history[i_s][:j] & (cost <= tol) & (mem[j] - mem[i] <= problem.mem_limit[s] * (1 + 1e-12))
        candidates = np.flatnonzero(ok)
        j = int(candidates.max())
        bounds.append(j)
    return sorted(bounds)[1:]  # drop the leading 0


def _direct_dp(problem: Problem, order: np.ndarray) -> list[int]:
    k, n = problem.k, len(order)
    if n > _DIRECT_LIMIT:
        raise PartitionError(f"the 'direct' objective's DP tabulates n^2 segment costs; {n} units is over "
                             f"its limit of {_DIRECT_LIMIT}; use objective='pipeline'")
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    comp = np.concatenate([[0.0], np.cumsum(problem.compute[order])])
    mem = np.concatenate([[0.0], np.cumsum(problem.memory[order])])
    vid = np.repeat(np.arange(problem.val_src.size), np.diff(problem.val_ptr))
    cpos = pos[problem.val_dst]
    src = pos[problem.val_src]
    last = np.full(problem.val_src.size, -1, dtype=np.int64)
    np.maximum.at(last, vid, cpos)
    # out_[i, j]: values produced in [i, j) with a consumer at or after j.
    # in_[i, j]: values produced before i with a consumer in [i, j).
    comm = np.zeros((n + 1, n + 1))
    w_out = np.zeros(n)
    for j in range(1, n + 1):
        w_out[:] = 0.0
        sel = (src < j) & (last >= j)
        np.add.at(w_out, src[sel], problem.val_comm[sel])
        comm[:j, j] += np.cumsum(w_out[:j][::-1])[::-1]
    for i in range(n):
        sel = (src[vid] < i) & (cpos >= i)
        if not sel.any():
            continue
        first = np.full(problem.val_src.size, n + 1, dtype=np.int64)
        np.minimum.at(first, vid[sel], cpos[sel])
        has = first <= n
        hist = np.zeros(n + 2)
        np.add.at(hist, first[has] + 1, problem.val_comm[has])
        comm[i, :] += np.cumsum(hist)[: n + 1]
    valid = valid_boundaries(problem, order)
    idx = np.arange(n + 1)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((k, n + 1), dtype=np.int64)
    for s in range(k):
        cost = (comp[None, :] - comp[:, None]) / problem.speeds[s] + comm
        feasible = (idx[:, None] < idx[None, :]) & (mem[None, :] - mem[:, None] <= problem.mem_limit[s] * (1 + 1e-12))
        table = np.where(feasible, np.maximum(best[:, None], cost), np.inf)
        choice[s] = np.argmin(table, axis=0)
        best = table[choice[s], idx]
        ends = valid.copy() if s < k - 1 else np.zeros(n + 1, dtype=bool)
        ends[n] = s == k - 1
        ends[0] = False
        best = np.where(ends, best, np.inf)
    if not np.isfinite(best[n]):
        raise PartitionError(f"no split of the {n} units into {k} contiguous stages fits the memory limits "
                             f"({', '.join(f'{x:.4g}' for x in problem.mem_limit)} bytes); use more stages")
    bounds, j = [], n
    for s in range(k - 1, 0, -1):
        j = int(choice[s, j])
        bounds.append(j)
    return sorted(bounds)


def dp_split(problem: Problem, order: np.ndarray | None = None) -> np.ndarray:
    """The optimal contiguous split of ``order`` (default: the problem's own order).

    Returns:
        The stage of every unit.

    Raises:
        PartitionError: no contiguous split fits the memory limits.
    """
    order = problem.order if order is None else order
    if problem.k == 1:
        if problem.memory.sum() > problem.mem_limit[0] * (1 + 1e-12):
            raise PartitionError(f"one stage holds {problem.memory.sum():.4g} bytes, over its limit of "
                                 f"{problem.mem_limit[0]:.4g}; use more stages")
        return np.zeros(problem.num_units, dtype=np.int64)
    bounds = _pipeline_dp(problem, order) if problem.objective == "pipeline" else _direct_dp(problem, order)
    return split_to_stages(problem, order, bounds)
