"""A partitioning instance compiled to arrays: units, values, devices, limits.

A cost graph (SPEC: "Partitioning any graph") is a networkx DAG with ``compute`` and
``memory`` on nodes, optional ``colocate``, and ``comm`` on edges. Partitioners never see
the graph: they see a :class:`Problem`, whose *units* are the nodes after colocated nodes
are merged and every merged group is made convex (a node on a path between two members of
a group joins it, since a valid pipeline would have to put it on the same stage anyway).
The objective is defined in :mod:`evaluate` and docs/partitioning.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import networkx as nx
import numpy as np

from fxshard.errors import PartitionError

__all__ = ["Objective", "Problem", "build_problem"]

Objective = Literal["pipeline", "direct"]
PIN_NONE, PIN_FIRST, PIN_LAST = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Problem:
    """A partitioning instance over units (merged, convex groups of graph nodes).

    Attributes:
        k: number of stages.
        nodes: the graph's node ids, in graph order.
        unit_of: node index -> unit index.
        members: unit -> indices of its nodes.
        order: a deterministic topological order of the units.
        compute, memory, params: per unit, summed over members.
        pin: per unit: 0 free, 1 must be on the first stage, 2 on the last.
        layer: per unit, the repeated-block label of its first member ("" if none).
        succ_ptr, succ: the unit DAG's successor lists (CSR).
        val_src, val_comm: per value (a node whose output leaves its unit): producing unit
            and communication time.
        val_ptr, val_dst: per value, the distinct consumer units (CSR).
        speeds: per stage, the relative speed of its device (compute time is divided by it).
        mem_limit: per stage, bytes (inf when unlimited).
        link: k x k factors on communication time between stages (1.0: the graph's ``comm``).
        objective: "pipeline" (values forwarded stage to stage) or "direct" (sent once to
            each consuming stage; the max-load objective of Tarnawski et al.).
    """

    k: int
    nodes: tuple[Hashable, ...]
    unit_of: np.ndarray
    members: tuple[tuple[int, ...], ...]
    order: np.ndarray
    compute: np.ndarray
    memory: np.ndarray
    params: np.ndarray
    pin: np.ndarray
    layer: tuple[str, ...]
    succ_ptr: np.ndarray
    succ: np.ndarray
    val_src: np.ndarray
    val_comm: np.ndarray
    val_ptr: np.ndarray
    val_dst: np.ndarray
    speeds: np.ndarray
    mem_limit: np.ndarray
    link: np.ndarray
    objective: str

    @property
    def num_units(self) -> int:
        return len(self.members)

    def successors(self, u: int) -> np.ndarray:
        return self.succ[self.succ_ptr[u]:self.succ_ptr[u + 1]]

    def predecessors_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """The unit DAG's predecessor lists (CSR), built on demand."""
        n = self.num_units
        src = np.repeat(np.arange(n), np.diff(self.succ_ptr))
        order = np.argsort(self.succ, kind="stable")
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.add.at(ptr, self.succ + 1, 1)
        return np.cumsum(ptr), src[order]

    def stage_array(self, node_stages: dict) -> np.ndarray:
        """Per-unit stages from a node -> stage mapping (a user partitioner's answer)."""
        stages = np.full(self.num_units, -1, dtype=np.int64)
        index = {node: i for i, node in enumerate(self.nodes)}
        for node, stage in node_stages.items():
            if node not in index:
                raise PartitionError(f"partitioner returned a stage for unknown node {node!r}")
            u = self.unit_of[index[node]]
            if stages[u] not in (-1, stage):
                raise PartitionError(
                    f"partitioner split colocated nodes: {node!r} on stage {stage}, its group on "
                    f"stage {stages[u]}; colocated nodes (and nodes on paths between them) must share a stage")
            stages[u] = stage
        return stages


def _number(value: Any, what: str, node: Hashable) -> float:
    if value is None:
        return 0.0
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PartitionError(f"node {node!r}: {what}={value!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise PartitionError(f"node {node!r}: {what}={value!r}; costs must be finite and >= 0")
    return x


def _per_stage(value: Any, k: int, what: str, default: float) -> np.ndarray:
    if value is None:
        return np.full(k, default, dtype=np.float64)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        arr = np.full(k, float(value))
    else:
        arr = np.asarray(list(value), dtype=np.float64)
        if arr.shape != (k,):
            raise PartitionError(f"{what} has {arr.size} entries for k={k} stages; give one number or {k}")
    if not np.all(np.isfinite(arr) | (arr == np.inf)) or np.any(np.isnan(arr)) or np.any(arr <= 0):
        raise PartitionError(f"{what}={value!r}: every entry must be a positive number")
    return arr


def build_problem(graph: nx.DiGraph, k: int, *, memory_limit: float | Sequence[float] | None = None,
                  speeds: Sequence[float] | None = None, link: Any = None,
                  objective: Objective = "pipeline") -> Problem:
    """Compile a cost graph into a :class:`Problem`.

    Args:
        graph: a networkx DiGraph (a DAG); see SPEC for the attributes. Optional node
            attributes beyond SPEC: ``params`` (parameter bytes, for the ``params``
            baseline), ``layer`` (repeated-block label, for the ``layers`` baseline), ``pin``
            ("first" or "last").
        k: number of stages.
        memory_limit: bytes per stage, one number or one per stage.
        speeds: relative device speed per stage (default all 1).
        link: k x k communication-time factors between stages (default all 1).
        objective: "pipeline" or "direct" (see :class:`Problem`).

    Raises:
        PartitionError: not a DAG, bad attributes, k out of range, impossible memory.
    """
    if not isinstance(graph, nx.DiGraph):
        raise PartitionError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PartitionError(f"k={k!r}: the number of stages must be a positive integer")
    k = int(k)
    if objective not in ("pipeline", "direct"):
        raise PartitionError(f"objective={objective!r}; use 'pipeline' or 'direct'")
    nodes = tuple(graph.nodes)
    n = len(nodes)
    if n == 0:
        raise PartitionError("the graph has no nodes; nothing to partition")
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise PartitionError(f"the graph has a cycle ({' -> '.join(repr(u) for u, _ in cycle)}); "
                             f"a pipeline needs a DAG")
    index = {node: i for i, node in enumerate(nodes)}
    compute = np.array([_number(graph.nodes[v].get("compute"), "compute", v) for v in nodes])
    memory = np.array([_number(graph.nodes[v].get("memory"), "memory", v) for v in nodes])
    params = np.array([_number(graph.nodes[v].get("params"), "params", v) for v in nodes])
    comm = np.zeros(n)
    for u, v, data in graph.edges(data=True):
        c = _number(data.get("comm"), f"comm of edge {u!r}->{v!r}", u)
        comm[index[u]] = max(comm[index[u]], c)  # SPEC: the same for every edge out of a node
    pins = np.zeros(n, dtype=np.int64)
    for v in nodes:
        pin = graph.nodes[v].get("pin")
        if pin not in (None, "first", "last"):
            raise PartitionError(f"node {v!r}: pin={pin!r}; use 'first' or 'last'")
        pins[index[v]] = {None: PIN_NONE, "first": PIN_FIRST, "last": PIN_LAST}[pin]

    unit_of, members = _units(graph, nodes, index)
    u_count = len(members)
    if k > u_count:
        what = f"{n} nodes" if u_count == n else f"{n} nodes in {u_count} colocated groups"
        raise PartitionError(f"k={k} stages for {what}: every stage needs at least one; use k <= {u_count}")
    u_compute = np.bincount(unit_of, weights=compute, minlength=u_count)
    u_memory = np.bincount(unit_of, weights=memory, minlength=u_count)
    u_params = np.bincount(unit_of, weights=params, minlength=u_count)
    u_pin = np.zeros(u_count, dtype=np.int64)
    for u, group in enumerate(members):
        kinds = {int(pins[i]) for i in group} - {PIN_NONE}
        if len(kinds) > 1 and k > 1:
            raise PartitionError(f"colocated nodes {[nodes[i] for i in group][:4]} are pinned both first "
                                 f"and last; unpin one or drop the colocation")
        u_pin[u] = kinds.pop() if kinds else PIN_NONE
    layer = tuple(str(graph.nodes[nodes[group[0]]].get("layer", "") or "") for group in members)

    # Unit DAG and values.
    edges = set()
    consumers: dict[int, set[int]] = {}
    for u, v in graph.edges():
        a, b = unit_of[index[u]], unit_of[index[v]]
        if a != b:
            edges.add((a, b))
            consumers.setdefault(index[u], set()).add(b)
    succ_lists: list[list[int]] = [[] for _ in range(u_count)]
    for a, b in sorted(edges):
        succ_lists[a].append(b)
    succ_ptr = np.zeros(u_count + 1, dtype=np.int64)
    succ_ptr[1:] = np.cumsum([len(s) for s in succ_lists])
    succ = np.array([b for s in succ_lists for b in s], dtype=np.int64)
    val_nodes = sorted(consumers)
    val_src = np.array([unit_of[i] for i in val_nodes], dtype=np.int64)
    val_comm = np.array([comm[i] for i in val_nodes], dtype=np.float64)
    val_ptr = np.zeros(len(val_nodes) + 1, dtype=np.int64)
    val_ptr[1:] = np.cumsum([len(consumers[i]) for i in val_nodes])
    val_dst = np.array([b for i in val_nodes for b in sorted(consumers[i])], dtype=np.int64)

    order = _topo_order(u_count, succ_ptr, succ, unit_of)
    speeds_arr = _per_stage(speeds, k, "speeds", 1.0)
    limit = _per_stage(memory_limit, k, "memory_limit", math.inf)
    link_arr = np.ones((k, k)) if link is None else np.asarray(link, dtype=np.float64)
    if link_arr.shape != (k, k) or np.any(~np.isfinite(link_arr)) or np.any(link_arr < 0):
        raise PartitionError(f"link factors must be a {k}x{k} matrix of finite numbers >= 0, got shape "
                             f"{link_arr.shape}")
    problem = Problem(k=k, nodes=nodes, unit_of=unit_of, members=members, order=order, compute=u_compute,
                      memory=u_memory, params=u_params, pin=u_pin, layer=layer, succ_ptr=succ_ptr, succ=succ,
                      val_src=val_src, val_comm=val_comm, val_ptr=val_ptr, val_dst=val_dst,
                      speeds=speeds_arr, mem_limit=limit, link=link_arr, objective=objective)
    _check_memory(problem)
    return problem


def _units(graph: nx.DiGraph, nodes: tuple, index: dict) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Merge colocated nodes, then merge whatever a path between group members forces in."""
    groups: dict[Hashable, int] = {}
    label = np.arange(len(nodes))
    for i, v in enumerate(nodes):
        key = graph.nodes[v].get("colocate")
        if key is not None:
            label[i] = groups.setdefault(key, i)
    if len(groups) == 0:
        return label, tuple((i,) for i in range(len(nodes)))
    closure = _convex_closure(graph, index, label)
    _, unit_of = np.unique(closure, return_inverse=True)
    members: list[list[int]] = [[] for _ in range(unit_of.max() + 1)]
    for i, u in enumerate(unit_of):
        members[u].append(i)
    # Renumber units by their first member so the numbering follows graph order.
    first = np.array([m[0] for m in members])
    rank = np.empty(len(members), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(members))
    unit_of = rank[unit_of]
    ordered = [None] * len(members)
    for u, m in enumerate(members):
        ordered[rank[u]] = tuple(m)
    return unit_of.astype(np.int64), tuple(ordered)


def _convex_closure(graph: nx.DiGraph, index: dict, group: np.ndarray) -> np.ndarray:
    """Merge groups until the quotient graph is acyclic.

    A path a -> w -> b between two members of one group closes a cycle in the quotient
    graph; every node on it must share the group's stage, so strongly connected parts of
    the quotient merge, until none is left (the groups are then convex).
    """
    label = group.copy()
    while True:
        quotient = nx.DiGraph()
        quotient.add_nodes_from(np.unique(label).tolist())
        quotient.add_edges_from((int(label[index[u]]), int(label[index[v]])) for u, v in graph.edges()
                                if label[index[u]] != label[index[v]])
        comps = [c for c in nx.strongly_connected_components(quotient) if len(c) > 1]
        if not comps:
            return label
        for comp in comps:
            target = min(comp)
            for lab in comp:
                label[label == lab] = target


def _topo_order(n: int, succ_ptr: np.ndarray, succ: np.ndarray, unit_of: np.ndarray) -> np.ndarray:
    """Kahn's algorithm taking the lowest-numbered ready unit first (graph order)."""
    import heapq

    indeg = np.bincount(succ, minlength=n) if succ.size else np.zeros(n, dtype=np.int64)
    ready = [u for u in range(n) if indeg[u] == 0]
    heapq.heapify(ready)
    order = []
    indeg = indeg.copy()
    while ready:
        u = heapq.heappop(ready)
        order.append(u)
        for v in succ[succ_ptr[u]:succ_ptr[u + 1]]:
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(ready, int(v))
    return np.array(order, dtype=np.int64)


def _check_memory(problem: Problem) -> None:
    limit = problem.mem_limit
    if not np.isfinite(limit).any():
        return
    total = problem.memory.sum()
    if total > limit.sum():
        per = limit.max()
        need = math.ceil(total / per) if per > 0 else math.inf
        raise PartitionError(
            f"the graph needs {total:.4g} bytes of memory; {problem.k} stages give {limit.sum():.4g} "
            f"({', '.join(f'{x:.4g}' for x in limit)}); use at least {need} stages or larger devices")
    biggest = int(np.argmax(problem.memory))
    if problem.memory[biggest] > limit.max():
        names = [problem.nodes[i] for i in problem.members[biggest]][:3]
        raise PartitionError(
            f"node {names[0]!r}{' (with its colocated group)' if len(problem.members[biggest]) > 1 else ''} "
            f"needs {problem.memory[biggest]:.4g} bytes, more than the largest stage's {limit.max():.4g}; "
            f"no split can hold it: use a device with more memory or split that node")
