"""Array algorithms on the unit DAG that :func:`~fxshard.passes.partition.problem.build_problem`
compiles: the convex closure of colocated groups, successor lists in CSR form, and the
topological order that puts pinned units at the ends. Plain numpy arrays in and out.
"""

from __future__ import annotations

import heapq

import networkx as nx
import numpy as np

__all__ = ["convex_closure", "csr", "sorted_unique", "successor_lists", "topo_order"]


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy's hash-based unique is several times slower on 1e5 int64 keys."""
    keys = np.sort(keys)
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys


def convex_closure(group: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Merge groups until the quotient graph is acyclic.

    A path a -> w -> b between two members of one group closes a cycle in the quotient
    graph; every node on it must share the group's stage, so each strongly connected part
    of the quotient merges into its lowest label. The quotient of the merged groups is
    the condensation, which is acyclic: the groups are then convex.
    """
    a, b = group[src], group[dst]
    cross = a != b
    quotient = nx.DiGraph()
    quotient.add_nodes_from(np.unique(group).tolist())
    quotient.add_edges_from(zip(a[cross].tolist(), b[cross].tolist()))
    condensed = nx.condensation(quotient)
    lowest = np.arange(len(group))
    for c in condensed:
        scc = condensed.nodes[c]["members"]
        lowest[list(scc)] = min(scc)
    return lowest[group]


def csr(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Successor lists (CSR, each list sorted) of edges src -> dst over n vertices."""
    order = np.lexsort((dst, src))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, src + 1, 1)
    return np.cumsum(ptr), dst[order].astype(np.int64)


def successor_lists(succ_ptr: np.ndarray, succ: np.ndarray) -> list[list[int]]:
    """The unit DAG's successor lists as Python lists (the CSR arrays, sliced once)."""
    ptr, flat = succ_ptr.tolist(), succ.tolist()
    return [flat[ptr[u]:ptr[u + 1]] for u in range(len(ptr) - 1)]


def topo_order(n: int, succ_ptr: np.ndarray, succ: np.ndarray, pin: np.ndarray) -> np.ndarray:
    """The topological order that takes the ready vertex pinned first, else unpinned, else
    pinned last, lowest-numbered among equals (graph order): pinned vertices sit at the ends
    (``pin``: 0 free, 1 first, 2 last, as :class:`~fxshard.passes.partition.problem.Problem` has them).

    Kahn's algorithm on a heap of ``rank * n + vertex``: the order networkx's
    ``lexicographical_topological_sort`` gives with ``key=(rank, vertex)``, without building the
    unit DAG as an ``nx.DiGraph`` first, which cost more than the sort (docs/benchmarks.md).
    """
    rank = np.choose(pin, [1, 0, 2])
    src = np.repeat(np.arange(n), np.diff(succ_ptr))
    if np.all(src < succ) and np.all(np.diff(rank) >= 0):
        return np.arange(n, dtype=np.int64)  # graph order is already that order
    lists = successor_lists(succ_ptr, succ)
    key = (rank * n + np.arange(n)).tolist()
    indeg = np.bincount(succ, minlength=n).tolist()
    ready = [key[u] for u in range(n) if indeg[u] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        u = heapq.heappop(ready) % n
        order.append(u)
        for v in lists[u]:
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(ready, key[v])
    return np.array(order, dtype=np.int64)
