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
import itertools
import math
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import networkx as nx
import numpy as np

from fxshard.devices import format_bytes
from fxshard.errors import PartitionError
from fxshard.passes.partition.unit_dag import convex_closure, csr, sorted_unique, successor_lists, topo_order

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


_PLAIN = frozenset({int, float, type(None), np.float64, np.float32, np.int64, np.int32})


def _column(raw: list, what: str, where: Callable[[int], str]) -> np.ndarray:
    """One numeric attribute per item (None = 0), checked finite and >= 0; ``where(i)`` names
    item i in the error message."""
    values = None
    kinds = set(map(type, raw))  # one C-level pass: plain numbers take the fast path
    if kinds <= _PLAIN:
        values = np.array([0.0 if x is None else x for x in raw] if type(None) in kinds else raw, dtype=np.float64)
    if values is None or values.shape != (len(raw),) or not np.all(np.isfinite(values) & (values >= 0)):
        # The slow path names the offending item.
        values = np.array([_number(x, what, where(i)) for i, x in enumerate(raw)], dtype=np.float64)
    return values


def _number(value: Any, what: str, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise PartitionError(f"{where}: {what}={value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PartitionError(f"{where}: {what}={value!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise PartitionError(f"{where}: {what}={value!r}; costs must be finite and >= 0")
    return x


def _per_stage(value: Any, k: int, what: str, default: float, *, allow_inf: bool) -> np.ndarray:
    """One positive number per stage, from None (the default), one number, or k numbers."""
    if value is None:
        return np.full(k, default, dtype=np.float64)
    items = [value] * k if np.ndim(value) == 0 and not isinstance(value, str) else value
    try:
        if isinstance(items, str) or any(isinstance(x, (bool, np.bool_, str, bytes)) for x in items):
            raise TypeError("not a number")
        arr = np.asarray(list(items), dtype=np.float64)
    except (TypeError, ValueError):
        raise PartitionError(f"{what}={value!r} is not a number or a list of numbers") from None
    if arr.shape != (k,):
        raise PartitionError(f"{what} has {arr.size} entries for k={k} stages; give one number or {k}")
    ok = (arr > 0) & (np.isfinite(arr) | (allow_inf & (arr == np.inf)))
    if not ok.all():
        limit = "positive numbers (inf allowed)" if allow_inf else "finite positive numbers"
        raise PartitionError(f"{what}={value!r}: every entry must be one of the {limit}")
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
    k = _check_arguments(graph, k, objective)
    nodes = tuple(graph.nodes)
    n = len(nodes)
    if n == 0:
        raise PartitionError("the graph has no nodes; nothing to partition")
    cols = _node_columns(graph, nodes)
    unit_of, members = _units(cols.data, cols.src, cols.dst)
    u_count = len(members)
    if k > u_count:
        what = f"{n} nodes" if u_count == n else f"{n} nodes in {u_count} colocated groups"
        raise PartitionError(f"k={k} stages for {what}: every stage needs at least one; use k <= {u_count}")
    u_pin = _unit_pins(cols.pins, unit_of, members, nodes, k)
    dag = _unit_dag(unit_of, u_count, cols)
    _check_pins(u_pin, dag["succ_ptr"], dag["succ"], members, nodes, k)
    problem = Problem(k=k, nodes=nodes, unit_of=unit_of, members=members,
                      order=topo_order(u_count, dag["succ_ptr"], dag["succ"], u_pin),
                      compute=np.bincount(unit_of, weights=cols.compute, minlength=u_count),
                      memory=np.bincount(unit_of, weights=cols.memory, minlength=u_count),
                      params=np.bincount(unit_of, weights=cols.params, minlength=u_count), pin=u_pin,
                      layer=_layers(cols.data, members),
                      speeds=_per_stage(speeds, k, "speeds", 1.0, allow_inf=False),
                      mem_limit=_per_stage(memory_limit, k, "memory_limit", math.inf, allow_inf=True),
                      link=_link_matrix(link, k), objective=objective, **dag)
    _check_memory(problem)
    return problem


def _check_arguments(graph: Any, k: Any, objective: Any) -> int:
    """Refuse a graph that is not a DiGraph, a bad k or objective; return k as an int."""
    if not isinstance(graph, nx.DiGraph):
        raise PartitionError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PartitionError(f"k={k!r}: the number of stages must be a positive integer")
    if objective not in ("pipeline", "direct"):
        raise PartitionError(f"objective={objective!r}; use 'pipeline' or 'direct'")
    return int(k)


@dataclasses.dataclass(frozen=True)
class _Columns:
    """The graph's node attributes and edges as arrays over node indices (graph order)."""

    data: list[dict]
    compute: np.ndarray
    memory: np.ndarray
    params: np.ndarray
    comm: np.ndarray
    pins: np.ndarray
    src: np.ndarray
    dst: np.ndarray


def _node_columns(graph: nx.DiGraph, nodes: tuple) -> _Columns:
    """Read and check the node and edge attributes; refuse a graph with a cycle."""
    n = len(nodes)
    index = {node: i for i, node in enumerate(nodes)}
    data = [d for _, d in graph.nodes(data=True)]
    compute, memory, params = (_column([d.get(key) for d in data], key, lambda i: f"node {nodes[i]!r}")
                               for key in ("compute", "memory", "params"))
    # The successor dicts read directly, in graph.edges order: networkx's views cost a call per edge.
    succ = graph._succ
    counts = list(map(len, succ.values()))
    dst = np.array([index[v] for nbrs in succ.values() for v in nbrs], dtype=np.int64)
    raw_comm = [d.get("comm") for nbrs in succ.values() for d in nbrs.values()]
    src = np.repeat(np.arange(n, dtype=np.int64), counts)
    edge_comm = _column(raw_comm, "comm", lambda e: f"edge {nodes[src[e]]!r}->{nodes[dst[e]]!r}")
    comm = np.zeros(n)
    np.maximum.at(comm, src, edge_comm)  # SPEC: the same for every edge out of a node
    pins = np.zeros(n, dtype=np.int64)
    raw_pins = [d.get("pin") for d in data]
    for i, pin in enumerate(raw_pins if _any_set(raw_pins) else ()):
        if pin is not None:
            if pin not in ("first", "last"):
                raise PartitionError(f"node {nodes[i]!r}: pin={pin!r}; use 'first' or 'last'")
            pins[i] = PIN_FIRST if pin == "first" else PIN_LAST
    if not np.all(src < dst) and not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise PartitionError(f"the graph has a cycle ({' -> '.join(repr(u) for u, _ in cycle)}); "
                             f"a pipeline needs a DAG")
    return _Columns(data=data, compute=compute, memory=memory, params=params, comm=comm, pins=pins, src=src, dst=dst)


def _layers(data: list[dict], members: tuple) -> tuple[str, ...]:
    """Per unit, the ``layer`` label of its first member ("" if none)."""
    raw = [d.get("layer") for d in data]
    if not _any_set(raw):
        return ("",) * len(members)
    return tuple(str(raw[group[0]] or "") for group in members)


def _any_set(values: list) -> bool:
    """True if any value is not None (one C-level pass)."""
    return any(map(operator.is_not, values, itertools.repeat(None)))


def _unit_pins(pins: np.ndarray, unit_of: np.ndarray, members: tuple, nodes: tuple, k: int) -> np.ndarray:
    """Per unit, the pin of its members; refuse a colocated group pinned both first and last."""
    u_count = len(members)
    u_pin = np.zeros(u_count, dtype=np.int64)
    np.maximum.at(u_pin, unit_of, pins)
    if k > 1 and u_count < len(nodes):
        has_first = np.zeros(u_count, dtype=bool)
        has_first[unit_of[pins == PIN_FIRST]] = True
        clash = np.flatnonzero(has_first & (u_pin == PIN_LAST))
        if clash.size:
            group = [nodes[i] for i in members[clash[0]]][:4]
            raise PartitionError(f"colocated nodes {group} are pinned both first and last; unpin one or "
                                 f"drop the colocation")
    return u_pin


def _unit_dag(unit_of: np.ndarray, u_count: int, cols: _Columns) -> dict[str, np.ndarray]:
    """The unit DAG (CSR) and the values, a value being a node whose output is consumed in
    another unit: :class:`Problem`'s ``succ_ptr``, ``succ``, ``val_*`` fields."""
    src, dst = cols.src, cols.dst
    ua, ub = unit_of[src], unit_of[dst]
    cross = ua != ub
    pairs = sorted_unique(ua[cross] * u_count + ub[cross])
    succ_ptr, succ = csr(u_count, pairs // u_count, pairs % u_count)
    vpairs = sorted_unique(src[cross] * u_count + ub[cross])
    v_node, val_dst = vpairs // u_count, vpairs % u_count
    val_nodes, counts = np.unique(v_node, return_counts=True)
    return {"succ_ptr": succ_ptr, "succ": succ, "val_src": unit_of[val_nodes], "val_comm": cols.comm[val_nodes],
            "val_ptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), "val_dst": val_dst}


def _link_matrix(link: Any, k: int) -> np.ndarray:
    """The k x k link factors (all 1 by default), checked finite and >= 0."""
    try:
        link_arr = np.ones((k, k)) if link is None else np.asarray(link, dtype=np.float64)
    except (TypeError, ValueError):
        raise PartitionError(f"link={link!r:.80} is not a {k}x{k} matrix of numbers") from None
    if link_arr.shape != (k, k) or np.any(~np.isfinite(link_arr)) or np.any(link_arr < 0):
        raise PartitionError(f"link factors must be a {k}x{k} matrix of finite numbers >= 0, got shape "
                             f"{link_arr.shape}")
    return link_arr


def _units(data: list[dict], src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Merge colocated nodes, then merge whatever a path between group members forces in."""
    groups: dict[Hashable, int] = {}
    label = np.arange(len(data))
    keys = [d.get("colocate") for d in data]
    if not _any_set(keys):
        return label, tuple((i,) for i in range(len(data)))
    for i, key in enumerate(keys):
        if key is not None:
            try:
                label[i] = groups.setdefault(key, i)
            except TypeError:
                raise PartitionError(f"node #{i}: colocate={key!r} is not hashable; use a string or a number") from None
    if len(groups) == 0:
        return label, tuple((i,) for i in range(len(data)))
    closure = convex_closure(label, src, dst)
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


def _check_pins(pin: np.ndarray, succ_ptr: np.ndarray, succ: np.ndarray, members: tuple, nodes: tuple,
                k: int) -> None:
    """A node pinned last must not feed a node pinned first (that would need k == 1)."""
    if k == 1 or not (np.any(pin == PIN_LAST) and np.any(pin == PIN_FIRST)):
        return
    lists = successor_lists(succ_ptr, succ)
    reached = set(np.flatnonzero(pin == PIN_LAST).tolist())
    frontier = list(reached)
    while frontier:  # every unit downstream of one pinned last
        for v in lists[frontier.pop()]:
            if v not in reached:
                reached.add(v)
                frontier.append(v)
    late = sorted(v for v in reached if pin[v] == PIN_FIRST)
    if late:
        raise PartitionError(f"node {nodes[members[late[0]][0]]!r} is pinned to the first stage but depends on "
                             f"a node pinned to the last; with k={k} stages no split honours both pins")


def _check_memory(problem: Problem) -> None:
    limit = problem.mem_limit
    if not np.isfinite(limit).any():
        return
    total = problem.memory.sum()
    if total > limit.sum():
        per = limit.max()
        need = math.ceil(total / per) if per > 0 else math.inf
        sizes = sorted(set(limit.tolist()))
        each = (f"{format_bytes(sizes[0])} each" if len(sizes) == 1
                else f"{format_bytes(min(sizes))} to {format_bytes(max(sizes))} each")
        raise PartitionError(
            f"the graph needs {format_bytes(total)} of memory; {problem.k} stages give {format_bytes(limit.sum())} "
            f"({each}); use at least {need} stages of the largest size, or larger devices")
    biggest = int(np.argmax(problem.memory))
    if problem.memory[biggest] > limit.max():
        names = [problem.nodes[i] for i in problem.members[biggest]][:3]
        raise PartitionError(
            f"node {names[0]!r}{' (with its colocated group)' if len(problem.members[biggest]) > 1 else ''} "
            f"needs {format_bytes(problem.memory[biggest])}, more than the largest stage's {format_bytes(limit.max())}; "
            f"no split can hold it: use a device with more memory or split that node")
