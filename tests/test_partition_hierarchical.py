"""The hierarchical multi-machine partitioner: machines from links, METIS parts, DP within machines."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

import fxshard
from fxshard.errors import PartitionError
from fxshard.passes.partition import hierarchical as H
from fxshard.passes.partition.dp import dp_split
from fxshard.passes.partition.evaluate import evaluate, is_acyclic
from fxshard.passes.partition.metis import metis_partition
from fxshard.passes.partition.problem import build_problem


def machines_link(machines: int, per: int, factor: float) -> np.ndarray:
    """k x k link factors: 1 inside a machine, ``factor`` between machines."""
    m = np.repeat(np.arange(machines), per)
    return np.where(m[:, None] == m[None, :], 1.0, factor)


def two_chains(n: int = 12) -> nx.DiGraph:
    """Two independent chains with heavy internal edges, numbered interleaved (a0 b0 a1 b1 ...), so
    every balanced cut of the graph's own order crosses both chains' heavy edges; splitting by chain
    crosses only the light edges at the ends."""
    g = nx.DiGraph()
    g.add_node("in", compute=0.1, memory=1.0)
    g.add_nodes_from((f"{c}{i}", {"compute": 1.0, "memory": 1.0}) for i in range(n) for c in "ab")
    g.add_node("out", compute=0.1, memory=1.0)
    for c in "ab":
        g.add_edge("in", f"{c}0", comm=0.01)
        g.add_edges_from((f"{c}{i}", f"{c}{i + 1}", {"comm": 1.0}) for i in range(n - 1))
        g.add_edge(f"{c}{n - 1}", "out", comm=0.01)
    return g


def branchy_dag(n: int, seed: int) -> nx.DiGraph:
    """A random DAG of parallel branches with skips, numbered in a shuffled topological order."""
    rng = np.random.default_rng(seed)
    g = nx.gnp_random_graph(n, 4.0 / n, seed=seed, directed=True)
    dag = nx.DiGraph((u, v) for u, v in g.edges if u < v)
    dag.add_nodes_from(range(n))
    dag.add_edges_from((i, i + 1) for i in range(0, n - 1, 3))
    for v in dag.nodes:
        dag.nodes[v].update(compute=float(rng.lognormal(0.0, 0.5)), memory=float(rng.uniform(0.5, 1.5)))
    for u, v in dag.edges:
        dag.edges[u, v]["comm"] = float(rng.uniform(0.0, 0.5))
    return dag


def test_machine_groups_from_link_factors():
    assert H.machine_groups(machines_link(2, 4, 16.0)) == (range(0, 4), range(4, 8))
    assert H.machine_groups(machines_link(4, 2, 3.0)) == (range(0, 2), range(2, 4), range(4, 6), range(6, 8))
    assert H.machine_groups(np.ones((5, 5))) == (range(0, 5),)
    same_device = np.ones((4, 4))
    same_device[0, 1] = same_device[1, 0] = 0.0  # two virtual stages on one device
    assert H.machine_groups(same_device) == (range(0, 4),)
    one_way = np.ones((3, 3))
    one_way[2, 1] = 4.0  # a slow link in either direction separates machines
    assert H.machine_groups(one_way) == (range(0, 2), range(2, 3))


def test_strictly_better_than_flat_dp_when_the_order_must_change():
    g, link = two_chains(), machines_link(2, 2, 20.0)
    problem = build_problem(g, 4, link=link)
    result = H.hierarchical_search(problem)
    flat = evaluate(problem, dp_split(problem)).bottleneck
    assert result.bottleneck < 0.5 * flat
    # The METIS machine parts find the chain-by-chain order on their own, not only via metis's search.
    parts = dict(result.candidates)
    assert parts["metis parts=2 ufactor=30"] == pytest.approx(result.bottleneck)
    part = fxshard.partition_graph(g, 4, partitioner="hierarchical", link=link)
    assert part.bottleneck == pytest.approx(result.bottleneck)
    machine_of = {v: s // 2 for v, s in part.stage_of.items()}
    assert len({machine_of[f"a{i}"] for i in range(12)}) == 1  # each chain on one machine
    assert len({machine_of[f"b{i}"] for i in range(12)}) == 1
    assert machine_of["a0"] != machine_of["b0"]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(("machines", "per", "factor"), [(2, 2, 10.0), (2, 4, 30.0), (3, 2, 4.0)])
def test_valid_and_never_worse_than_dp_or_metis(seed, machines, per, factor):
    g = branchy_dag(90, seed)
    k = machines * per
    first, last = min(g.nodes), max(g.nodes)
    g.nodes[first]["pin"] = "first"
    g.nodes[last]["pin"] = "last"
    for v in (10, 11, 12):
        g.nodes[v]["colocate"] = "group"
    total = sum(d["memory"] for _, d in g.nodes(data=True))
    kwargs = dict(link=machines_link(machines, per, factor), memory_limit=1.6 * total / k)
    hier = fxshard.partition_graph(g, k, partitioner="hierarchical", seed=seed, **kwargs)
    dp = fxshard.partition_graph(g, k, partitioner="dp", **kwargs)
    assert hier.is_acyclic and hier.fits_memory
    assert all(hier.stage_of[u] <= hier.stage_of[v] for u, v in g.edges)
    assert hier.stage_of[first] == 0 and hier.stage_of[last] == k - 1
    assert len({hier.stage_of[v] for v in (10, 11, 12)}) == 1
    assert max(hier.stage_memory) <= 1.6 * total / k * (1 + 1e-9)
    assert hier.bottleneck <= dp.bottleneck * (1 + 1e-12)
    metis = fxshard.partition_graph(g, k, partitioner="metis", seed=seed, **kwargs)
    assert hier.bottleneck <= metis.bottleneck * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_machine_sub_problem_is_priced_exactly(seed):
    """Within a machine the DP's stage costs equal the full evaluation's, boundaries included."""
    g = branchy_dag(80, seed)
    link = machines_link(3, 2, 8.0)
    problem = build_problem(g, 6, link=link)
    machines = H.machine_groups(link)
    machine = H._machine_of(problem, H._machine_labels(problem, machines, parts=3, seed=seed, ufactor=100), 3)
    stage = H._stages_within(problem, machines, machine, seed)
    assert stage is not None and is_acyclic(problem, stage)
    full = evaluate(problem, stage).total
    pos = np.empty(problem.num_units, dtype=np.int64)
    pos[problem.order] = np.arange(problem.num_units)
    for mid, stages in enumerate(machines):
        part = np.flatnonzero(machine == mid)
        part = part[np.argsort(pos[part], kind="stable")]
        sub = H._sub_problem(problem, machine, mid, stages, part)
        np.testing.assert_allclose(evaluate(sub, stage[part] - stages.start).total, full[stages.start:stages.stop])


def test_single_machine_falls_back_to_the_flat_search():
    g = branchy_dag(60, 1)
    problem = build_problem(g, 4)
    result = H.hierarchical_search(problem, seed=3)
    assert result.winner == "flat" and result.machines == (range(0, 4),)
    np.testing.assert_array_equal(result.stage, metis_partition(problem, 3))


def test_direct_objective_and_determinism():
    g = branchy_dag(70, 2)
    link = machines_link(2, 2, 12.0)
    runs = [fxshard.partition_graph(g, 4, partitioner="hierarchical", link=link, objective="direct")
            for _ in range(2)]
    dp = fxshard.partition_graph(g, 4, partitioner="dp", link=link, objective="direct")
    assert runs[0].stage_of == runs[1].stage_of
    assert runs[0].is_valid and runs[0].bottleneck <= dp.bottleneck * (1 + 1e-12)


def test_memory_too_small_for_any_split_raises():
    g = nx.DiGraph()
    g.add_nodes_from((i, {"compute": 1.0, "memory": 10.0 if i == 3 else 1.0}) for i in range(8))
    g.add_edges_from((i, i + 1, {"comm": 0.1}) for i in range(7))
    # Unit 3 (10 bytes) fills a 10-byte stage alone; the 2-byte stages hold two units each, so
    # the four units after it cannot all be placed (17 bytes fit 24 in total, but no split fits).
    with pytest.raises(PartitionError):
        fxshard.partition_graph(g, 4, partitioner="hierarchical", link=machines_link(2, 2, 5.0),
                                memory_limit=[10.0, 2.0, 10.0, 2.0])
