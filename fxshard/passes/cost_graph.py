"""From a captured, priced fx graph to the cost graph every partitioner takes.

The fx path and the research path share one interface: this pass turns a
:class:`CapturedGraph` and its :class:`GraphCosts` into the networkx DAG of SPEC
("Partitioning any graph"), and :func:`partition_model` runs any registered partitioner on it
for a :class:`Cluster`, with per-device speeds and memory and per-link communication factors.

What each node carries (docs/partitioning.md):

- ``compute``: forward + backward seconds in training, forward in inference.
- ``memory``: parameter bytes times the training state per parameter (weights, gradients,
  optimizer state; see cost_models/memory.py), buffers, and, in training, the activations the
  node keeps for backward times ``activation_factor`` (micro-batches in flight).
- ``params``, ``layer`` (the repeated block it belongs to), ``pin`` (inputs first, outputs last).
- edges: ``comm`` = seconds to send the producer's output over the reference link, twice in
  training (its gradient comes back).

A memory lever changes what a node costs its stage: ``activations`` replaces the saved bytes
per node (e.g. under activation checkpointing) and ``state`` the bytes a node's parameters and
buffers hold (e.g. sharded over a data-parallel group); ``colocate`` keeps groups of nodes on
one stage (a checkpointed block must not be cut). The planner passes the most permissive levers
its options allow, so a partition is refused only when no lever could make it fit
(docs/planning.md, "Memory levers").

``get_attr`` nodes (parameters and buffers read by several nodes, e.g. rotary tables) are not
partitioned: one with a single consumer joins it; one with several is replicated on every
stage that reads it, so its bytes are charged to each consumer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch

from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster, DeviceSpec, Link
from fxshard.cost_models import GraphCosts, analyze, estimate
from fxshard.cost_models.memory import bytes_per_parameter
from fxshard.errors import PartitionError
from fxshard.modules import stack_paths
from fxshard.passes.partition import Partition, partition_graph

__all__ = ["StateFn", "StagePlacement", "cost_graph", "layer_label", "layer_labels", "partition_model", "placement",
           "stage_bytes", "state_factor"]

_SIXTEEN_BIT = ("bfloat16", "float16")


def layer_label(node: torch.fx.Node) -> str:
    """The repeated block a node belongs to ("layers.3"): the outermost module-stack entry
    whose last name is an index (a ModuleList / Sequential child), or ""."""
    for path in stack_paths(node):
        if path.rsplit(".", 1)[-1].isdigit():
            return path
    if node.op == "call_module":
        parts = str(node.target).split(".")
        for i, part in enumerate(parts):
            if part.isdigit() and i > 0:
                return ".".join(parts[: i + 1])
    return ""


def layer_labels(captured: CapturedGraph) -> dict[str, str]:
    """Each node's :func:`layer_label`."""
    return {node.name: layer_label(node) for node in captured.gm.graph.nodes}


def state_factor(dtype: str, *, training: bool, optimizer: str) -> float:
    """Bytes held per byte of parameter: 16-bit weights train in mixed precision."""
    mixed = dtype in _SIXTEEN_BIT
    per_param = bytes_per_parameter(optimizer, "mixed" if mixed else "fp32", training=training)
    return per_param / (2 if mixed else 4)


def _state_bytes(work: Any, *, training: bool, optimizer: str) -> float:
    """A node's parameters with their training state, and its buffers."""
    return work.param_bytes * state_factor(work.dtype, training=training, optimizer=optimizer) + work.buffer_bytes


StateFn = Callable[[Any], float]  # a node's NodeWork -> bytes its parameters and buffers hold on a stage


def cost_graph(captured: CapturedGraph, costs: GraphCosts, *, link: Link, training: bool = True,
               optimizer: str = "adam", activation_factor: float = 1.0,
               activations: Mapping[str, float] | None = None, state: StateFn | None = None,
               colocate: Mapping[str, str] | None = None, layers: Mapping[str, str] | None = None,
               loss: tuple[float, float] | None = None) -> nx.DiGraph:
    """The partitioner's view of a model: see the module docstring for the attributes.

    Args:
        activations: saved bytes per node at the captured batch, replacing the default
            accounting (nodes left out save nothing); still times ``activation_factor``.
        state: the bytes a node's parameters and buffers hold, replacing their training state.
        colocate: node -> group key; nodes of one group share a stage (``colocate`` attribute).
        layers: node -> :func:`layer_label`, when already computed (:func:`layer_labels`), for
            a caller that builds many cost graphs of one model.
        loss: (seconds, saved bytes) of the training loss at the captured batch
            (fxshard/cost_models/loss.py), on the output node, which is pinned to the last stage
            where the loss runs; the bytes times ``activation_factor``.
    """
    nodes = list(captured.gm.graph.nodes)
    if layers is None:
        layers = layer_labels(captured)
    by_name = {c.name: c for c in costs}
    graph = nx.DiGraph()
    state_of = state or (lambda w: _state_bytes(w, training=training, optimizer=optimizer))
    saved_owner = _saved_owner(costs) if training and activations is None else {}
    replicated: dict[str, int] = {}
    for node in nodes:
        c = by_name[node.name]
        w = c.work
        if node.op == "get_attr":
            if len(node.users) > 1:
                replicated[node.name] = int(state_of(w))
            continue
        saved = (w.saved_bytes + saved_owner.get(node.name, 0)) if activations is None \
            else activations.get(node.name, 0.0)
        attrs = {"compute": c.fwd_time_s + (c.bwd_time_s if training else 0.0),
                 "memory": float(state_of(w) + (saved * activation_factor if training else 0.0)),
                 "params": float(w.param_bytes),
                 "layer": layers[node.name], "op": node.op}
        if colocate and node.name in colocate:
            attrs["colocate"] = colocate[node.name]
        if node.op == "placeholder":
            attrs["pin"] = "first"
        elif node.op == "output":
            attrs["pin"] = "last"
            if loss is not None and training:
                attrs["compute"] += loss[0]
                attrs["memory"] += loss[1] * activation_factor
        graph.add_node(node.name, **attrs)
    _add_edges(graph, nodes, by_name, state_of, replicated, link=link, training=training)
    return graph


def _saved_owner(costs: GraphCosts) -> dict[str, int]:
    """Activation bytes: each saved tensor charged once, to the node that allocated it."""
    saved_owner: dict[str, int] = {}
    for c in costs:
        for name in c.work.saved_values:
            owner = costs.storage_owner(name)
            saved_owner[owner] = costs[owner].work.output_bytes
    return saved_owner


def _add_edges(graph: nx.DiGraph, nodes: list[torch.fx.Node], by_name: Mapping[str, Any], state_of: StateFn,
               replicated: Mapping[str, int], *, link: Link, training: bool) -> None:
    """Data edges with their transfer times; a get_attr node's state joins its only consumer,
    or is replicated on each of several."""
    factor = 2.0 if training else 1.0
    for node in nodes:
        if node.op == "get_attr":
            users = list(node.users)
            if len(users) == 1:  # joins its only consumer
                user = users[0].name
                w = by_name[node.name].work
                graph.nodes[user]["memory"] += float(state_of(w))
                graph.nodes[user]["params"] += float(w.param_bytes)
            else:
                for user in users:
                    graph.nodes[user.name]["memory"] += float(replicated[node.name])
            continue
        out_bytes = by_name[node.name].work.output_bytes
        for user in node.users:
            graph.add_edge(node.name, user.name, comm=factor * link.transfer_time(out_bytes),
                           bytes=out_bytes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePlacement:
    """Which device runs each stage, and what that means for the partitioner."""

    devices: tuple[int, ...]
    speeds: tuple[float, ...]
    memory_limit: tuple[float, ...]
    link: np.ndarray
    reference: DeviceSpec
    reference_link: Link


def placement(cluster: Cluster, k: int, *, captured: CapturedGraph | None = None,
              works: Sequence | None = None, devices: Sequence[int] | None = None,
              memory_reserve: float = 0.0) -> StagePlacement:
    """Stage s on ``devices[s]`` (default: the first k in rank order, machine by machine).

    Speeds are the ratio of the whole graph's estimated time on the reference device (the
    first one) to its time on each stage's device; link factors are the reference (intra-
    machine) bandwidth over each pair's bandwidth. A device may hold several stages (the
    virtual stages of interleaved schedules): they share its memory, and pass values to each
    other for free.
    """
    chosen = tuple(range(k)) if devices is None else tuple(int(d) for d in devices)
    if len(chosen) != k or not all(0 <= d < cluster.num_devices for d in chosen):
        raise PartitionError(f"need one device of the cluster's {cluster.num_devices} for each of {k} stages, "
                             f"got {chosen}")
    specs = [cluster.devices[d].spec for d in chosen]
    reference = specs[0]
    speeds = [1.0] * k
    if captured is None and len({s.name for s in specs}) > 1:
        raise PartitionError(f"stages on different devices ({', '.join(sorted({s.name for s in specs}))}) need the "
                             f"captured graph to weigh their speeds: pass captured=")
    if captured is not None and len({s.name for s in specs}) > 1:
        works = list(works) if works is not None else analyze(captured)
        times: dict[str, float] = {}
        for spec in specs:
            if spec.name not in times:
                g = estimate(captured, spec, works=works)
                times[spec.name] = g.fwd_time_s + g.bwd_time_s
        speeds = [times[reference.name] / times[s.name] for s in specs]
    ref_link = cluster.intra_link
    # cluster.link(a, b) is free on one device, intra- or inter-machine otherwise: the k x k
    # factors from those three cases at once (k reaches the cluster's size).
    device = np.asarray(chosen)
    machine = np.asarray([cluster.devices[d].machine for d in chosen])
    link = np.where(machine[:, None] == machine[None, :], ref_link.bandwidth / cluster.intra_link.bandwidth,
                    ref_link.bandwidth / cluster.inter_link.bandwidth)
    link[device[:, None] == device[None, :]] = 0.0
    share = {d: chosen.count(d) for d in chosen}
    limits = tuple(float(s.memory_bytes) * (1 - memory_reserve) / share[d] for s, d in zip(specs, chosen))
    return StagePlacement(devices=chosen, speeds=tuple(speeds), memory_limit=limits, link=link,
                          reference=reference, reference_link=ref_link)


def partition_model(captured: CapturedGraph, cluster: Cluster, k: int, *, partitioner: str = "metis",
                    training: bool = True, optimizer: str = "adam", activation_factor: float = 1.0,
                    costs: GraphCosts | None = None, cost_model: str = "analytical", seed: int = 0,
                    devices: Sequence[int] | None = None, memory_reserve: float = 0.0,
                    works: Sequence | None = None, activations: Mapping[str, float] | None = None,
                    state: StateFn | None = None, colocate: Mapping[str, str] | None = None,
                    graph: nx.DiGraph | None = None) -> tuple[Partition, nx.DiGraph]:
    """Partition a captured model into k stages on the first k devices of ``cluster`` (or on
    ``devices``): the one road from a captured graph to a partition, which the planner
    (fxshard/candidates.py) and the benchmarks both take.

    ``costs`` (on the first stage's device) and ``works`` (from :func:`analyze`) are computed
    when not given; pass them to partition one model many times. ``activations``, ``state`` and
    ``colocate`` are the memory levers' view of the nodes (:func:`cost_graph`). ``graph``: the
    cost graph of these arguments, already built (it is then used as given, not rebuilt).

    Returns:
        The partition and the cost graph it was computed on.
    """
    if works is None and (costs is None or len({cluster.devices[d].spec.name for d in (devices or range(k))}) > 1):
        works = analyze(captured)
    place = placement(cluster, k, captured=captured, works=works, devices=devices, memory_reserve=memory_reserve)
    if graph is None:
        if costs is None:
            costs = estimate(captured, place.reference, cost_model=cost_model, works=works)
        graph = cost_graph(captured, costs, link=place.reference_link, training=training, optimizer=optimizer,
                           activation_factor=activation_factor, activations=activations, state=state,
                           colocate=colocate)
    part = partition_graph(graph, k, partitioner=partitioner, memory_limit=place.memory_limit, seed=seed,
                           speeds=place.speeds, link=place.link)
    return part, graph


def stage_bytes(graph: nx.DiGraph, stage_of: Mapping[str, int]) -> float:
    """Bytes sent between stages (each value once per consuming stage)."""
    total = 0.0
    for u in graph.nodes:
        targets = {stage_of[v] for v in graph.successors(u)} - {stage_of[u]}
        if targets:
            nbytes = next(iter(graph.out_edges(u, data="bytes")))[2] or 0
            total += nbytes * len(targets)
    return total
