"""The exact ``milp`` partitioner: brute force on tiny graphs, refusals, the time-limit record."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import fxshard
from fxshard.errors import PartitionError
from fxshard.passes.partition import build_problem, partition_graph, partition_problem
from fxshard.passes.partition.evaluate import evaluate, is_acyclic
from fxshard.passes.partition.instances import load_tarnawski
from fxshard.passes.partition.milp import MAX_UNITS, milp_solve

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "dnn-partitioning"


def brute_force(problem) -> float:
    """The best bottleneck over every valid assignment (all k stages used, as every partitioner does)."""
    best = math.inf
    for stages in itertools.product(range(problem.k), repeat=problem.num_units):
        stage = np.array(stages)
        if len(set(stages)) < problem.k or not is_acyclic(problem, stage):
            continue
        costs = evaluate(problem, stage)
        if np.all(costs.memory <= problem.mem_limit * (1 + 1e-12)):
            best = min(best, costs.bottleneck)
    return best


def random_case(seed: int, objective: str):
    """A random DAG of 4..7 nodes with k = 2..3, pins, speeds, links and memory limits drawn by seed."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(4, 8)), int(rng.integers(2, 4))
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(i, compute=float(rng.integers(1, 10)), memory=float(rng.integers(1, 5)))
    for i, j in itertools.combinations(range(n), 2):
        if rng.random() < 0.4:
            g.add_edge(i, j)
    for i in range(n):
        comm = float(rng.integers(0, 6))
        for j in g.successors(i):
            g[i][j]["comm"] = comm
    if seed % 3 == 0:
        g.nodes[0]["pin"] = "first"
    if seed % 4 == 1:
        g.nodes[n - 1]["pin"] = "last"
    if seed % 5 == 2:
        g.nodes[1]["colocate"] = "a"
        g.nodes[n - 2]["colocate"] = "a"
    link = rng.integers(1, 4, size=(k, k)).astype(float) if seed % 2 else None
    speeds = rng.integers(1, 3, size=k).astype(float) if seed % 3 == 1 else None
    memory = float(sum(d["memory"] for _, d in g.nodes(data=True)) / k * 1.3) if seed % 4 >= 2 else None
    return build_problem(g, k, objective=objective, link=link, speeds=speeds, memory_limit=memory)


@pytest.mark.parametrize("objective", ["pipeline", "direct"])
@pytest.mark.parametrize("seed", range(10))
def test_milp_equals_brute_force(seed, objective):
    problem = random_case(seed, objective)
    best = brute_force(problem)
    result = milp_solve(problem)
    if math.isinf(best):
        assert result.status == "infeasible" and result.stage is None
        return
    assert result.status == "optimal"
    assert result.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert evaluate(problem, result.stage).bottleneck == result.objective
    assert result.bound <= result.objective and result.gap <= 1e-6
    if not math.isnan(result.model_value):
        # The model charges exactly what evaluate() charges.
        assert result.model_value == pytest.approx(result.objective, rel=1e-6, abs=1e-9)


def test_milp_beats_the_order_on_a_diamond():
    # Two branches of a diamond: any order interleaves or not; the MILP puts one branch per stage.
    g = nx.DiGraph()
    g.add_nodes_from(["s", "t"], compute=0.0)
    for branch in "ab":
        g.add_node(f"{branch}0", compute=1.0)
        g.add_node(f"{branch}1", compute=1.0)
        g.add_edges_from([("s", f"{branch}0"), (f"{branch}0", f"{branch}1"), (f"{branch}1", "t")], comm=0.1)
    g.add_edges_from([("a0", "b1")], comm=0.1)
    for objective in ("pipeline", "direct"):
        problem = build_problem(g, 2, objective=objective)
        result = milp_solve(problem)
        assert result.objective == pytest.approx(brute_force(problem))
        assert result.objective <= partition_problem(problem, "dp").bottleneck + 1e-12


def test_registered_and_valid():
    assert "milp" in fxshard.partitioners()
    problem = random_case(3, "pipeline")
    part = partition_problem(problem, "milp")
    assert part.is_valid and part.partitioner == "milp"
    assert part.bottleneck == pytest.approx(brute_force(problem))
    again = partition_problem(problem, "milp")
    assert again.stage_of == part.stage_of


def test_memory_that_no_assignment_fits_is_refused():
    # Each pair of the three big nodes overflows a stage; k = 2 needs two of them together.
    g = nx.DiGraph()
    for i, mem in enumerate([52.0, 0.0, 87.0, 53.0]):
        g.add_node(i, compute=1.0, memory=mem)
    problem = build_problem(g, 2, memory_limit=96.0)
    result = milp_solve(problem)
    assert result.status == "infeasible" and result.stage is None and math.isinf(result.gap)
    with pytest.raises(PartitionError, match="no valid assignment of 4 units to 2 stages"):
        partition_problem(problem, "milp")


def test_too_many_units_is_refused():
    g = nx.path_graph(MAX_UNITS + 1, create_using=nx.DiGraph)
    nx.set_node_attributes(g, 1.0, "compute")
    with pytest.raises(PartitionError, match=f"at most {MAX_UNITS} units; this problem has {MAX_UNITS + 1}") as info:
        partition_graph(g, 4, partitioner="milp")
    assert "coarsen" in str(info.value).lower() and "'dp'" in str(info.value)
    with pytest.raises(PartitionError, match="at most 5 units; this problem has 8"):
        milp_solve(build_problem(nx.path_graph(8, create_using=nx.DiGraph), 2), max_units=5)


def _branchy(n: int, seed: int) -> nx.DiGraph:
    rng = np.random.default_rng(seed)
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(i, compute=float(rng.uniform(0.5, 2.0)), memory=1.0)
    for i in range(1, n):
        comm = float(rng.uniform(0.05, 1.0))
        for j in {int(rng.integers(max(0, i - 12), i)), int(rng.integers(max(0, i - 4), i))}:
            g.add_edge(j, i, comm=comm)
    return g


def test_time_limit_reports_the_gap():
    problem = build_problem(_branchy(120, 0), 6, objective="direct")
    result = milp_solve(problem, time_limit=0.01)
    assert result.status == "time_limit"
    assert result.stage is not None and is_acyclic(problem, result.stage)
    assert result.objective == evaluate(problem, result.stage).bottleneck
    assert result.bound <= result.objective
    assert result.gap == pytest.approx((result.objective - result.bound) / result.objective)
    assert 0.0 <= result.gap < 1.0


def test_public_instance_bert24():
    inst = load_tarnawski(DATA / "bert24_inference.json")
    problem = build_problem(inst.graph, inst.k, memory_limit=inst.memory_limit, objective="direct")
    result = milp_solve(problem, time_limit=600)  # proven in about 1 s; the limit only guards a busy machine
    assert result.status == "optimal"
    assert result.objective == pytest.approx(17.790, abs=1e-3)  # the README's optimum


@pytest.mark.parametrize("factor", [1.0, 1e-9])
def test_public_instance_gnmt_in_any_time_unit(factor):
    # Costs in seconds instead of milliseconds, memory in other units: the same optimum (the model
    # is normalised, so HiGHS's absolute tolerances do not swallow tiny costs).
    inst = load_tarnawski(DATA / "gnmt_inference.json")
    g = inst.graph.copy()
    for _, d in g.nodes(data=True):
        d["compute"] *= factor
        d["memory"] /= factor
    for _, _, d in g.edges(data=True):
        d["comm"] *= factor
    problem = build_problem(g, inst.k, memory_limit=inst.memory_limit / factor, objective="direct")
    result = milp_solve(problem, time_limit=600)  # proven in about 1 s; the limit only guards a busy machine
    assert result.status == "optimal"
    assert result.objective == pytest.approx(32.9107 * factor, rel=1e-5)
    assert result.objective < partition_problem(problem, "dp").bottleneck
