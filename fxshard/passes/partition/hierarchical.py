"""Hierarchical multi-machine partitioning: METIS picks each machine's units, the DP the stages within.

On a multi-machine cluster the link factors between stages on different machines are large
(intra-machine bandwidth over inter-machine bandwidth, often 10-100x), so the machine
boundaries dominate: what crosses them should be a small cut, whatever topological order
that needs. The flat DP splits one order optimally but cannot change the order. Here:

1. **Machines from links** (:func:`machine_groups`): stages s and s+1 are on one machine when
   ``max(link[s, s+1], link[s+1, s]) <= 1``: ``placement`` (passes/cost_graph.py) measures factors
   against the intra-machine link, so 1 means the same machine and 0 the same device; anything
   above 1 is a slower, inter-machine link. One machine: the flat search (``metis``) runs instead.
2. **Machine parts**: pymetis cuts the undirected unit graph into m parts (and 2m, two per
   machine), edge weight = communication x the mean inter-machine factor, vertex weights compute
   and memory, target weights each machine's total speed, two imbalance factors. Each labelling
   is repaired into an acyclic order of parts: parts ranked in a topological order of the part
   graph (mean topological position among parts on a cycle), squeezed onto the m machines in
   that order, units pushed forward to their predecessors' machine.
3. **Stages within machines**: each machine's units form a sub-problem over its stages, with its
   speeds, memory limits and links, priced exactly under the ``pipeline`` objective: values from
   earlier machines enter at the part's first unit (in topological order), values for later
   machines leave from its last, those two units are pinned to the machine's first and last
   stage, and the fixed cost of the machine boundaries is charged to them. ``metis_partition``
   solves it: the exact DP (dp.py) over the part's own order, and its search over other orders.
   Under ``direct`` the sub-problem keeps the ``pipeline`` pricing (a heuristic there); every
   candidate is scored on the real objective.
4. **Refinement**: the flat exact DP over the order the machine parts define (which contains
   step 3's split, so is no worse), then ``refine.refine`` (single-unit moves across the
   bottleneck's boundaries, machine boundaries included), then step 3 again on the moved
   machine parts, while the bottleneck drops.
5. **Candidates**: the answers of the flat searches, ``dp`` (the graph's own order) and ``metis``
   (its order search), compete with the METIS machine parts; step 4 improves the best two. The
   result is never worse than ``dp`` or ``metis``; :func:`hierarchical_search` says which
   candidate won.

See docs/partitioning.md.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np

from fxshard.errors import PartitionError
from fxshard.passes.partition.dp import dp_split
from fxshard.passes.partition.evaluate import evaluate
from fxshard.passes.partition.metis import metis_partition, part_graph, undirected
from fxshard.passes.partition.problem import PIN_FIRST, PIN_LAST, Problem
from fxshard.passes.partition.refine import priority_order, refine

__all__ = ["HierarchicalResult", "hierarchical_partition", "hierarchical_search", "machine_groups"]

_REFINE_LIMIT = 3000  # units; beyond this refine's single-unit moves cost more than they find
_ROUNDS = 3  # rounds of (flat DP over the order, refine, per-machine search) per candidate
_UFACTORS = (30, 300)  # METIS imbalance, in 1/1000 over the target weights
_IMPROVE = 2  # candidates that step 4 improves, the best first


@dataclasses.dataclass(frozen=True, kw_only=True)
class HierarchicalResult:
    """What the hierarchical search found.

    Attributes:
        stage: the stage of every unit (the winner's).
        machines: per machine, its stages (``range`` of stage indices).
        winner: the winning candidate: ``"flat dp"`` or ``"flat metis"`` (the flat searches'
            answers, improved by step 4), ``"flat"`` (one machine: the ``metis`` search alone), or
            ``"metis parts=<p> ufactor=<u>"`` (METIS machine parts).
        bottleneck: the winner's bottleneck.
        candidates: every candidate's name and bottleneck (inf: no split fitted memory), in the
            order tried; ties go to the earliest.
    """

    stage: np.ndarray
    machines: tuple[range, ...]
    winner: str
    bottleneck: float
    candidates: tuple[tuple[str, float], ...]


def machine_groups(link: np.ndarray) -> tuple[range, ...]:
    """The machines of a k-stage placement, as runs of consecutive stages.

    Stages s and s+1 share a machine when ``max(link[s, s+1], link[s+1, s]) <= 1`` (factors are
    relative to the intra-machine link: 1 for another device on the machine, 0 for the same
    device). Stages are placed machine by machine, so each machine is one run.

    Example::

        >>> link = np.ones((4, 4)); link[:2, 2:] = link[2:, :2] = 16.0
        >>> machine_groups(link)
        (range(0, 2), range(2, 4))
    """
    link = np.asarray(link, dtype=np.float64)
    k = link.shape[0]
    cuts = [s + 1 for s in range(k - 1) if max(link[s, s + 1], link[s + 1, s]) > 1.0 + 1e-9]
    bounds = [0, *cuts, k]
    return tuple(range(a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def _score(problem: Problem, stage: np.ndarray | None) -> tuple[float, float]:
    if stage is None:
        return np.inf, np.inf
    costs = evaluate(problem, stage)
    if np.any(costs.memory > problem.mem_limit * (1 + 1e-12)):
        return np.inf, np.inf
    return costs.bottleneck, costs.cut


def _inter_factor(problem: Problem, machines: tuple[range, ...]) -> float:
    """The mean link factor across the machine boundaries (METIS's weight on a cut edge)."""
    return float(np.mean([problem.link[m.stop - 1, m.stop] for m in machines[:-1]]))


def _machine_labels(problem: Problem, machines: tuple[range, ...], *, parts: int, seed: int,
                    ufactor: int) -> np.ndarray:
    """pymetis labels (0..parts-1, parts a multiple of the machines): a minimum link-weighted cut
    balanced by each machine's speed (split evenly among a machine's parts)."""
    n = problem.num_units
    ptr, cols, eweights = undirected(problem)
    # Every cut edge here crosses machines; the factor matters once inter-machine links differ.
    eweights = np.maximum(1, np.rint(eweights * _inter_factor(problem, machines))).astype(np.int64)
    eweights = np.minimum(eweights, (1 << 30) // max(1, n))  # METIS sums weights in 32-bit integers
    share = np.repeat([problem.speeds[g].sum() for g in machines], parts // len(machines))
    return part_graph(problem, parts, (ptr, cols, eweights), share / share.sum(), seed=seed, ufactor=ufactor)


def _machine_of(problem: Problem, labels: np.ndarray, m: int) -> np.ndarray:
    """An acyclic machine per unit from METIS's labels: parts ranked in a topological order of the
    part graph, then every unit pushed forward to its latest predecessor's machine.

    ``refine.repair`` ranks parts by mean topological position instead; on parallel branches
    (a fork, branches numbered interleaved, a join) every part has about the same mean, and the
    part holding the fork may rank last, pushing every branch onto one machine. Here the part
    graph's condensation is sorted topologically (ties: mean position), so acyclic part graphs
    keep every unit where METIS put it; parts on a cycle are ranked by mean position.
    """
    n = problem.num_units
    pos = np.empty(n, dtype=np.int64)
    pos[problem.order] = np.arange(n)
    uniq, inv = np.unique(labels, return_inverse=True)
    mean_pos = np.bincount(inv, weights=pos) / np.bincount(inv)
    src = np.repeat(np.arange(n), np.diff(problem.succ_ptr))
    a, b = inv[src], inv[problem.succ]
    quotient = nx.DiGraph()
    quotient.add_nodes_from(range(len(uniq)))
    quotient.add_edges_from(zip(a[a != b].tolist(), b[a != b].tolist()))
    condensed = nx.condensation(quotient)
    key = {c: min(mean_pos[p] for p in condensed.nodes[c]["members"]) for c in condensed}
    ranked = [p for c in nx.lexicographical_topological_sort(condensed, key=key.__getitem__)
              for p in sorted(condensed.nodes[c]["members"], key=lambda p: (mean_pos[p], p))]
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[ranked] = np.arange(len(uniq))
    want = (rank[inv] * m) // len(uniq)
    want[problem.pin == PIN_FIRST] = 0
    pred_ptr, pred = problem.predecessors_csr()
    ptr, plist, out = pred_ptr.tolist(), pred.tolist(), want.tolist()
    for u in problem.order.tolist():
        for p in plist[ptr[u]:ptr[u + 1]]:
            if out[p] > out[u]:
                out[u] = out[p]
    machine = np.array(out, dtype=np.int64)
    machine[problem.pin == PIN_LAST] = m - 1
    return machine


def _sub_problem(problem: Problem, machine: np.ndarray, mid: int, stages: range, part: np.ndarray) -> Problem:
    """Machine ``mid``'s units ``part`` (in topological order) over its ``stages``, exactly priced.

    Values from earlier machines are produced, in the sub-problem, by the part's first unit and
    values for later machines consumed by its last (under ``pipeline`` they cross the same
    internal boundaries); the boundary to the previous (next) machine costs its crossing
    communication times its link, charged to the first (last) unit's compute.
    """
    n_sub = part.size
    local = np.full(problem.num_units, -1, dtype=np.int64)
    local[part] = np.arange(n_sub)
    s0, s1 = stages.start, stages.stop
    vid = np.repeat(np.arange(problem.val_src.size), np.diff(problem.val_ptr))
    # Per value: the producer's machine, the last consuming machine, and (within this machine)
    # the consumer latest in topological order.
    src_m = machine[problem.val_src]
    last_m = np.full(problem.val_src.size, -1, dtype=np.int64)
    np.maximum.at(last_m, vid, machine[problem.val_dst])
    here = machine[problem.val_dst] == mid
    last_here = np.full(problem.val_src.size, -1, dtype=np.int64)
    np.maximum.at(last_here, vid[here], local[problem.val_dst[here]])  # part is in topological order
    a = np.where(src_m < mid, 0, local[problem.val_src])
    b = np.where(last_m > mid, n_sub - 1, last_here)
    keep = (src_m <= mid) & (last_m >= mid) & (b > a)
    comm = problem.val_comm[keep]
    compute = problem.compute[part].astype(np.float64).copy()
    if s0 > 0:  # receive from the previous machine
        incoming = (src_m < mid) & (last_m >= mid)
        compute[0] += problem.val_comm[incoming].sum() * problem.link[s0 - 1, s0] * problem.speeds[s0]
    if s1 < problem.k:  # send to the next machine
        outgoing = (src_m <= mid) & (last_m > mid)
        compute[-1] += problem.val_comm[outgoing].sum() * problem.link[s1 - 1, s1] * problem.speeds[s1 - 1]
    pin = problem.pin[part].copy()
    if s0 > 0:
        pin[pin == PIN_FIRST] = 0
    if s1 < problem.k:
        pin[pin == PIN_LAST] = 0
    if n_sub > 1 and pin[0] != PIN_LAST and pin[-1] != PIN_FIRST:
        # The first unit stands for the earlier machines and the last for the later ones: pinned
        # to the machine's first and last stage, the pricing stays exact in any order of the part.
        pin[0], pin[-1] = PIN_FIRST, PIN_LAST
    # Edges inside the part (CSR), for a well-formed Problem; the DP reads only the values.
    src = np.repeat(np.arange(problem.num_units), np.diff(problem.succ_ptr))
    inside = (local[src] >= 0) & (local[problem.succ] >= 0)
    es, ed = local[src[inside]], local[problem.succ[inside]]
    eorder = np.lexsort((ed, es))
    succ_ptr = np.zeros(n_sub + 1, dtype=np.int64)
    np.add.at(succ_ptr, es + 1, 1)
    k_sub = len(stages)
    return Problem(k=k_sub, nodes=tuple(int(u) for u in part), unit_of=np.arange(n_sub),
                   members=tuple((i,) for i in range(n_sub)), order=np.arange(n_sub), compute=compute,
                   memory=problem.memory[part], params=problem.params[part], pin=pin,
                   layer=tuple(problem.layer[u] for u in part), succ_ptr=np.cumsum(succ_ptr),
                   succ=ed[eorder].astype(np.int64), val_src=a[keep], val_comm=comm,
                   val_ptr=np.arange(comm.size + 1, dtype=np.int64), val_dst=b[keep],
                   speeds=problem.speeds[s0:s1], mem_limit=problem.mem_limit[s0:s1],
                   link=problem.link[s0:s1, s0:s1], objective="pipeline")


def _stages_within(problem: Problem, machines: tuple[range, ...], machine: np.ndarray, seed: int) -> np.ndarray | None:
    """Step 3: the exact DP inside each machine's part; None when a part cannot hold its stages."""
    pos = np.empty(problem.num_units, dtype=np.int64)
    pos[problem.order] = np.arange(problem.num_units)
    stage = np.empty(problem.num_units, dtype=np.int64)
    for mid, stages in enumerate(machines):
        part = np.flatnonzero(machine == mid)
        if part.size < len(stages):
            return None
        part = part[np.argsort(pos[part], kind="stable")]
        sub = _sub_problem(problem, machine, mid, stages, part)
        exact_any_order = part.size == 1 or (sub.pin[0] == PIN_FIRST and sub.pin[-1] == PIN_LAST)
        try:
            # metis_partition searches orders of the part (its first candidate is the DP over this one).
            stage[part] = stages.start + (metis_partition(sub, seed) if exact_any_order else dp_split(sub))
        except PartitionError:
            return None
    return stage


def _machine_of_stage(machines: tuple[range, ...], k: int) -> np.ndarray:
    out = np.empty(k, dtype=np.int64)
    for mid, stages in enumerate(machines):
        out[stages.start:stages.stop] = mid
    return out


def _improve(problem: Problem, machines: tuple[range, ...], stage: np.ndarray, seed: int) -> np.ndarray:
    """Step 4: the flat DP over the stages' order, refine, the per-machine DP; while it helps."""
    of_stage = _machine_of_stage(machines, problem.k)
    best, best_score = stage, _score(problem, stage)
    for _ in range(_ROUNDS):
        trials = []
        try:
            trials.append(dp_split(problem, priority_order(problem, best)))
        except PartitionError:
            pass
        if problem.num_units <= _REFINE_LIMIT:
            trials.append(refine(problem, trials[-1] if trials else best))
        within = _stages_within(problem, machines, of_stage[trials[-1] if trials else best], seed)
        if within is not None:
            trials.append(within)
        improved = False
        for trial in trials:
            score = _score(problem, trial)
            if score < best_score:
                best, best_score, improved = trial, score, True
        if not improved:
            break
    return best


def hierarchical_search(problem: Problem, seed: int = 0) -> HierarchicalResult:
    """Every candidate of the hierarchical search, scored; the best (lowest bottleneck, then cut) wins.

    Example::

        import fxshard
        from fxshard.passes.partition.hierarchical import hierarchical_search

        problem = fxshard.build_problem(graph, 8, link=link)  # link: 2 machines of 4 stages
        result = hierarchical_search(problem)
        result.winner, result.bottleneck
    """
    machines = machine_groups(problem.link)
    if len(machines) == 1 or problem.k == 1:
        stage = metis_partition(problem, seed)
        bottleneck = _score(problem, stage)[0]
        return HierarchicalResult(stage=stage, machines=machines, winner="flat", bottleneck=bottleneck,
                                  candidates=(("flat", bottleneck),))
    names, stages = [], []
    for name, flat_search in (("flat dp", lambda: dp_split(problem)), ("flat metis", lambda: metis_partition(problem, seed))):
        try:
            flat = flat_search()
        except PartitionError:
            continue  # no split of the graph's own order fits memory; the machine parts may
        names.append(name)
        stages.append(flat)
    m = len(machines)
    seen: set[bytes] = set()
    for parts in (m, 2 * m):
        if problem.num_units < 2 * parts:
            break
        for ufactor in _UFACTORS:
            labels = _machine_labels(problem, machines, parts=parts, seed=seed, ufactor=ufactor)
            machine = _machine_of(problem, labels, m)
            if machine.tobytes() in seen:
                continue
            seen.add(machine.tobytes())
            stage = _stages_within(problem, machines, machine, seed)
            if stage is None:
                continue
            names.append(f"metis parts={parts} ufactor={ufactor}")
            stages.append(stage)
    scores = [_score(problem, st) for st in stages]
    # Step 4 on the best few only: it costs several searches per candidate.
    for i in sorted(range(len(stages)), key=lambda i: (scores[i][0], scores[i][1], i))[:_IMPROVE]:
        stages[i] = _improve(problem, machines, stages[i], seed)
        scores[i] = _score(problem, stages[i])
    if not stages or not np.isfinite(min(sc[0] for sc in scores)):
        raise PartitionError(f"no hierarchical split of the {problem.num_units} units over {m} machines "
                             f"({problem.k} stages) fits the memory limits; use more stages or larger devices")
    best = min(range(len(stages)), key=lambda i: (scores[i][0], scores[i][1], i))
    return HierarchicalResult(stage=stages[best], machines=machines, winner=names[best],
                              bottleneck=float(scores[best][0]),
                              candidates=tuple((nm, float(sc[0])) for nm, sc in zip(names, scores)))


def hierarchical_partition(problem: Problem, seed: int = 0) -> np.ndarray:
    """The ``hierarchical`` partitioner: the stage per unit of :func:`hierarchical_search`."""
    return hierarchical_search(problem, seed).stage
