"""The fx path to the partitioners: cost graphs from captured models, placement on clusters,
partition_model on gpt2-tiny."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import fxshard
from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.cost_models import analyze, bytes_per_parameter, estimate
from fxshard.errors import PartitionError
from fxshard.passes.cost_graph import cost_graph, layer_label, partition_model, placement, stage_bytes
from fxshard.zoo import build

CPU_CLUSTER = "4xcpu:1GB"


@pytest.fixture(scope="module")
def gpt2():
    z = build("gpt2-tiny")
    return z, capture(z.model, z.example_inputs)


@pytest.fixture(scope="module")
def cluster():
    return Cluster.parse(CPU_CLUSTER)


@pytest.fixture(scope="module")
def costs(gpt2, cluster):
    return estimate(gpt2[1], cluster.devices[0].spec)


@pytest.fixture(scope="module")
def graphs(gpt2, costs, cluster):
    """Cost graphs of gpt2-tiny: (training, optimizer, activation_factor) -> graph."""
    captured = gpt2[1]
    out = {}
    for training, optimizer, factor in [(True, "adam", 1.0), (True, "sgd", 1.0), (True, "none", 1.0),
                                        (True, "adam", 0.0), (True, "adam", 2.0), (False, "adam", 1.0),
                                        (False, "none", 1.0)]:
        out[training, optimizer, factor] = cost_graph(captured, costs, link=cluster.intra_link, training=training,
                                                      optimizer=optimizer, activation_factor=factor)
    return out


def _total(graph: nx.DiGraph, key: str) -> float:
    return sum(d[key] for _, d in graph.nodes(data=True))


# --------------------------------------------------------------------------------------------
# The graph's shape.
# --------------------------------------------------------------------------------------------

def test_every_fx_node_is_a_graph_node(gpt2, graphs):
    captured = gpt2[1]
    nodes = [n for n in captured.gm.graph.nodes if n.op != "get_attr"]
    for graph in graphs.values():
        assert list(graph.nodes) == [n.name for n in nodes]  # graph order is fx order
        assert nx.is_directed_acyclic_graph(graph)
        assert set(graph.edges) == {(n.name, u.name) for n in nodes for u in n.users}
        for _, d in graph.nodes(data=True):
            for key in ("compute", "memory", "params"):
                assert np.isfinite(d[key]) and d[key] >= 0


def test_inputs_pinned_first_output_last(gpt2, graphs):
    graph = graphs[True, "adam", 1.0]
    for node in gpt2[1].gm.graph.nodes:
        if node.op == "get_attr":
            continue
        expected = {"placeholder": "first", "output": "last"}.get(node.op)
        assert graph.nodes[node.name].get("pin") == expected, node.name
        assert graph.nodes[node.name]["op"] == node.op
    assert any(d.get("pin") == "first" for _, d in graph.nodes(data=True))
    assert sum(d.get("pin") == "last" for _, d in graph.nodes(data=True)) == 1


def test_edges_carry_the_producers_bytes(graphs, costs, cluster):
    training, inference = graphs[True, "adam", 1.0], graphs[False, "adam", 1.0]
    link = cluster.intra_link
    positive = 0
    for u, v, d in training.edges(data=True):
        assert d["bytes"] == costs[u].work.output_bytes
        assert (d["comm"] > 0) == (d["bytes"] > 0), (u, v, d)
        assert d["comm"] == pytest.approx(2 * link.transfer_time(d["bytes"]))
        # Training sends the gradient back: twice the inference time.
        assert d["comm"] == pytest.approx(2 * inference.edges[u, v]["comm"])
        assert inference.edges[u, v]["bytes"] == d["bytes"]
        positive += d["bytes"] > 0
    assert positive > training.number_of_edges() // 2
    # SPEC: every edge out of a node carries the same comm.
    for u in training.nodes:
        assert len({d["comm"] for _, _, d in training.out_edges(u, data=True)}) <= 1


def test_compute_is_forward_plus_backward_in_training(graphs, costs):
    training, inference = graphs[True, "adam", 1.0], graphs[False, "adam", 1.0]
    for name, d in training.nodes(data=True):
        c = costs[name]
        assert d["compute"] == pytest.approx(c.fwd_time_s + c.bwd_time_s)
        assert inference.nodes[name]["compute"] == pytest.approx(c.fwd_time_s)
    assert _total(training, "compute") > _total(inference, "compute") > 0


# --------------------------------------------------------------------------------------------
# Memory.
# --------------------------------------------------------------------------------------------

def test_memory_grows_with_the_optimizer_state(graphs):
    adam, sgd, none = graphs[True, "adam", 1.0], graphs[True, "sgd", 1.0], graphs[True, "none", 1.0]
    assert _total(adam, "memory") > _total(sgd, "memory") >= _total(none, "memory")
    assert _total(adam, "memory") > _total(none, "memory")
    # Per node, the difference is exactly the extra state per parameter byte (fp32 weights).
    for optimizer, graph in (("sgd", sgd), ("none", none)):
        extra = (bytes_per_parameter("adam") - bytes_per_parameter(optimizer)) / 4
        for name, d in adam.nodes(data=True):
            assert d["memory"] - graph.nodes[name]["memory"] == pytest.approx(extra * d["params"])
            if d["params"] > 0 and extra > 0:
                assert d["memory"] > graph.nodes[name]["memory"]


def test_inference_memory_is_weights_and_buffers_only(graphs, costs):
    for optimizer in ("adam", "none"):
        inference = graphs[False, optimizer, 1.0]
        for name, d in inference.nodes(data=True):
            w = costs[name].work
            assert d["memory"] == pytest.approx(w.param_bytes + w.buffer_bytes), name
    # Training adds the activations on top of the state.
    training = graphs[True, "adam", 1.0]
    assert _total(training, "memory") > _total(graphs[False, "adam", 1.0], "memory") * bytes_per_parameter() / 4


def test_activations_scale_with_the_activation_factor(graphs, costs):
    zero, one, two = graphs[True, "adam", 0.0], graphs[True, "adam", 1.0], graphs[True, "adam", 2.0]
    activations = {name: one.nodes[name]["memory"] - zero.nodes[name]["memory"] for name in one.nodes}
    assert all(a >= 0 for a in activations.values())
    assert sum(activations.values()) > 0
    for name in one.nodes:
        assert two.nodes[name]["memory"] - zero.nodes[name]["memory"] == pytest.approx(2 * activations[name])
    # Each saved tensor counts once in the graph, as in the cost model's own total.
    assert sum(activations.values()) == pytest.approx(costs.saved_activation_bytes())
    # The state part with factor 0 is the training state alone.
    for name, d in zero.nodes(data=True):
        w = costs[name].work
        assert d["memory"] == pytest.approx(w.param_bytes * bytes_per_parameter("adam") / 4 + w.buffer_bytes)


def test_tied_weight_is_carried_by_each_holder(gpt2, graphs, costs):
    z = gpt2[0]
    graph = graphs[True, "adam", 1.0]
    model_bytes = sum(p.numel() * p.element_size() for p in z.model.parameters())  # tied weight once
    assert costs.param_bytes == model_bytes
    tied = z.model.wte.weight.numel() * z.model.wte.weight.element_size()
    holders = [name for name in graph.nodes if "wte.weight" in costs[name].work.params]
    assert sorted(holders) == ["lm_head", "wte"]
    for name in holders:
        assert graph.nodes[name]["params"] >= tied
    # Each holder carries it (a stage that holds either needs the weight): counted twice here.
    assert _total(graph, "params") == pytest.approx(model_bytes + tied)
    for name, d in graph.nodes(data=True):
        assert d["params"] == costs[name].work.param_bytes


def test_layer_labels(gpt2, graphs):
    graph = graphs[True, "adam", 1.0]
    labels = {d["layer"] for _, d in graph.nodes(data=True)}
    assert {"h.0", "h.1"} <= labels
    assert labels <= {"", "h.0", "h.1"}
    for node in gpt2[1].gm.graph.nodes:
        if node.name.startswith("h_0_"):
            assert layer_label(node) == graph.nodes[node.name]["layer"] == "h.0"
        if node.name.startswith("h_1_"):
            assert layer_label(node) == "h.1"
        if node.op in ("placeholder", "output") or node.name in ("wte", "wpe", "ln_f", "lm_head"):
            assert layer_label(node) == ""


class _SharedState(nn.Module):
    """A parameter read by two nodes (fx makes one get_attr node for it), a buffer read
    twice (fx makes one get_attr node per read) and a buffer read once."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(8))
        self.register_buffer("once", torch.randn(8))
        self.scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        scale = self.scale
        h = self.lin(x) + self.table
        return h * self.table + self.once * scale + scale


def test_get_attr_nodes_join_or_replicate_onto_their_consumers():
    captured = capture(_SharedState(), (torch.randn(4, 8),))
    cl = Cluster.parse("1xcpu:1GB")
    attrs = {n.name: n for n in captured.gm.graph.nodes if n.op == "get_attr"}
    assert {"table", "once", "scale"} <= set(attrs)
    assert len(attrs["scale"].users) == 2
    costs = estimate(captured, cl.devices[0].spec)
    adam = bytes_per_parameter("adam") / 4
    assert costs["scale"].work.param_bytes == costs["table"].work.buffer_bytes == 8 * 4
    expected_state: dict[str, float] = {}
    expected_params: dict[str, float] = {}
    for name, node in attrs.items():
        w = costs[name].work
        for user in node.users:
            expected_state[user.name] = expected_state.get(user.name, 0.0) + w.buffer_bytes + w.param_bytes * adam
            if len(node.users) == 1:  # joins its only consumer, parameters and all
                expected_params[user.name] = expected_params.get(user.name, 0.0) + w.param_bytes
    graph = cost_graph(captured, costs, link=cl.intra_link, activation_factor=0.0)
    assert not set(attrs) & set(graph.nodes)
    for name, d in graph.nodes(data=True):
        own = costs[name].work
        assert d["memory"] == pytest.approx(own.param_bytes * adam + own.buffer_bytes + expected_state.get(name, 0.0))
        assert d["params"] == own.param_bytes + expected_params.get(name, 0.0)
    # The shared parameter is charged in full to each of its readers.
    for user in attrs["scale"].users:
        assert graph.nodes[user.name]["memory"] >= 8 * 4 * adam


# --------------------------------------------------------------------------------------------
# partition_model and placement.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
def test_partition_model_gives_valid_partitions(gpt2, cluster, k):
    captured = gpt2[1]
    results = {}
    for name in fxshard.partitioners():
        part, graph = partition_model(captured, cluster, k, partitioner=name)
        results[name] = part
        assert part.k == k and part.partitioner == name
        assert set(part.stage_of) == set(graph.nodes)
        assert all(0 <= s < k for s in part.stage_of.values())
        assert part.is_valid, name
        assert all(part.stage_of[u] <= part.stage_of[v] for u, v in graph.edges)
        for node, d in graph.nodes(data=True):
            if d.get("pin") == "first":
                assert part.stage_of[node] == 0
            if d.get("pin") == "last":
                assert part.stage_of[node] == k - 1
        assert max(part.stage_memory) <= cluster.devices[0].spec.memory_bytes
        assert sum(part.stage_memory) == pytest.approx(_total(graph, "memory"))
        assert sum(part.stage_compute) == pytest.approx(_total(graph, "compute"))
        assert part.bottleneck >= part.lower_bound - 1e-15
        assert stage_bytes(graph, part.stage_of) > 0
    assert results["metis"].bottleneck <= results["uniform"].bottleneck * (1 + 1e-9)
    assert results["metis"].bottleneck <= results["dp"].bottleneck * (1 + 1e-9)


def test_partition_model_is_deterministic(gpt2, cluster):
    a, _ = partition_model(gpt2[1], cluster, 3, seed=1)
    b, _ = partition_model(gpt2[1], cluster, 3, seed=1)
    assert a.stage_of == b.stage_of and a.bottleneck == b.bottleneck


def test_partition_model_refuses_too_little_memory(gpt2):
    with pytest.raises(PartitionError, match="memory|bytes"):
        partition_model(gpt2[1], Cluster.parse("2xcpu:1MB"), 2)


def test_stage_bytes(gpt2, cluster, graphs):
    graph = graphs[True, "adam", 1.0]
    assert stage_bytes(graph, {n: 0 for n in graph.nodes}) == 0
    part, _ = partition_model(gpt2[1], cluster, 2)
    expected = 0
    for u in graph.nodes:
        targets = {part.stage_of[v] for v in graph.successors(u)} - {part.stage_of[u]}
        if targets:
            expected += costs_bytes(graph, u) * len(targets)
    assert stage_bytes(graph, part.stage_of) == expected > 0


def costs_bytes(graph: nx.DiGraph, u) -> int:
    return next(iter(graph.out_edges(u, data="bytes")))[2]


def test_placement_across_machines():
    cl = Cluster.parse("2x2xA100-80GB")
    place = placement(cl, 4)
    ratio = cl.intra_link.bandwidth / cl.inter_link.bandwidth
    assert ratio > 1
    assert place.devices == (0, 1, 2, 3)
    assert place.link.shape == (4, 4)
    assert place.link[1, 2] == pytest.approx(ratio) and place.link[2, 1] == pytest.approx(ratio)
    assert place.link[0, 3] == pytest.approx(ratio)
    assert place.link[0, 1] == pytest.approx(1.0) and place.link[2, 3] == pytest.approx(1.0)
    assert place.speeds == (1.0, 1.0, 1.0, 1.0)
    assert place.memory_limit == tuple(float(d.spec.memory_bytes) for d in cl.devices)
    assert place.reference_link == cl.intra_link


def test_placement_on_heterogeneous_devices(gpt2):
    cl = Cluster.parse("1xA100-80GB+1xV100-32GB")
    place = placement(cl, 2, captured=gpt2[1])
    assert place.speeds[0] == 1.0  # the first device is the reference
    assert place.speeds[1] < 1.0  # the V100 is slower
    assert place.memory_limit == (float(cl.devices[0].spec.memory_bytes), float(cl.devices[1].spec.memory_bytes))
    assert place.memory_limit[0] > place.memory_limit[1]
    assert place.reference.name == cl.devices[0].spec.name
    # The order of devices decides the reference.
    flipped = placement(cl, 2, captured=gpt2[1], devices=[1, 0])
    assert flipped.speeds[0] == 1.0 and flipped.speeds[1] > 1.0
    assert flipped.speeds[1] == pytest.approx(1 / place.speeds[1])
    assert flipped.memory_limit == place.memory_limit[::-1]


def test_partition_model_on_heterogeneous_devices(gpt2):
    cl = Cluster.parse("1xA100-80GB+1xV100-32GB")
    part, graph = partition_model(gpt2[1], cl, 2)
    assert part.is_valid
    place = placement(cl, 2, captured=gpt2[1])
    raw = [sum(graph.nodes[n]["compute"] for n in stage) for stage in part.stages]
    assert part.stage_compute == pytest.approx((raw[0] / place.speeds[0], raw[1] / place.speeds[1]))


@pytest.mark.parametrize("kwargs", [{"k": 5}, {"k": 2, "devices": [0, 4]}, {"k": 2, "devices": [0]},
                                    {"k": 2, "devices": [-1, 0]}])
def test_placement_refuses_bad_devices(kwargs):
    with pytest.raises(PartitionError):
        placement(Cluster.parse("4xcpu:1GB"), **kwargs)


def test_analyze_once_is_enough(gpt2, cluster):
    works = analyze(gpt2[1])
    place = placement(cluster, 2, captured=gpt2[1], works=works)
    assert place.speeds == (1.0, 1.0)
