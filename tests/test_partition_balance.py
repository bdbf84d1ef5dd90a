"""Balance beyond the bottleneck: when one pinned-last unit (an LM head) is the bottleneck, the
partitioners still spread the rest evenly over the other stages instead of leaving all but a
unit or two on stage 0 (docs/calibration.md, "Degenerate 4-stage plans")."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

import fxshard
from fxshard.models import GPT2, GPT2Config
from fxshard.passes.partition import build_problem, partition_graph
from fxshard.passes.partition.evaluate import evaluate, is_acyclic
from fxshard.passes.partition.refine import refine

HEAD = 100.0  # the pinned-last unit's compute: more than all the rest together


def _chain_with_head(n: int, *, residual: bool = False) -> nx.DiGraph:
    """n unit-cost nodes in a chain (every second one also reading the node two back, a
    residual, when ``residual``), then a dominant head pinned to the last stage."""
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(i, compute=1.0, memory=1.0)
        if i:
            g.add_edge(i - 1, i, comm=0.01)
        if residual and i >= 2 and i % 2 == 0:
            g.add_edge(i - 2, i, comm=0.01)
    g.add_node("head", compute=HEAD, memory=1.0, pin="last")
    g.add_edge(n - 1, "head", comm=0.01)
    return g


def _spread(costs: np.ndarray, bottleneck: int) -> float:
    rest = np.delete(costs, bottleneck)
    return float(rest.max() / rest.min())


@pytest.mark.parametrize("partitioner", ["dp", "metis"])
@pytest.mark.parametrize("residual", [False, True])
def test_stages_besides_a_dominant_head_are_balanced(partitioner, residual):
    part = partition_graph(_chain_with_head(30, residual=residual), 4, partitioner=partitioner)
    costs = np.array(part.stage_cost)
    assert part.is_valid
    assert part.bottleneck_stage == 3 and part.bottleneck == pytest.approx(HEAD + 0.01)
    # 30 unit-cost nodes on 3 stages: 10 each (the residual's extra send may shift one node).
    assert _spread(costs, 3) <= 11.1 / 8.9
    assert [len(s) for s in part.stages[:3]] in ([10, 10, 10], [9, 11, 10], [10, 11, 9], [11, 10, 9],
                                                 [9, 10, 11], [10, 9, 11], [11, 9, 10])


def test_refine_evens_out_the_stages_below_the_bottleneck():
    """From all but two nodes on stage 0, no move across the head's stage helps; the moves across
    the other stages' boundaries balance them, and the head's stage is untouched."""
    problem = build_problem(_chain_with_head(30, residual=True), 4)
    order = problem.order
    start = np.zeros(problem.num_units, dtype=np.int64)
    start[order[-3]], start[order[-2]], start[order[-1]] = 1, 2, 3
    before = evaluate(problem, start).total
    stage = refine(problem, start)
    after = evaluate(problem, stage).total
    assert is_acyclic(problem, stage)
    assert after[3] == before[3] and int(np.argmax(after)) == 3
    assert tuple(np.sort(after)[::-1]) < tuple(np.sort(before)[::-1])
    assert _spread(after, 3) <= 11.1 / 8.9
    assert np.array_equal(stage, refine(problem, start))  # deterministic


def test_memory_limits_still_hold_while_balancing():
    """A memory limit that stage 1 can only meet with a few nodes keeps it small."""
    g = _chain_with_head(30)
    limits = [40.0, 4.0, 40.0, 40.0]
    for partitioner in ("dp", "metis"):
        part = partition_graph(g, 4, partitioner=partitioner, memory_limit=limits)
        assert part.is_valid and part.bottleneck == pytest.approx(HEAD + 0.01)
        assert part.stage_memory[1] <= 4.0


def _nodes_per_stage(plan: fxshard.Plan) -> list[int]:
    return [len(s.nodes) for s in plan.stages]


def test_gpt2_pipeline_spreads_its_blocks_when_the_head_is_the_bottleneck():
    """A small GPT-2 whose LM head outweighs its blocks: on 4 stages the blocks spread over stages
    0-2 (no stage of one residual add), and the predicted step is no worse than that degenerate split."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=4, n_head=2, n_embd=64, vocab_size=8192, block_size=16))
    x = torch.randint(0, 8192, (4, 16))
    options = dict(strategy="pipeline", stages=4, schedule="1f1b", microbatches=4, activation_checkpointing="none")
    plan = fxshard.plan(model, "4xcpu:16GB", (x,), **options)
    counts = _nodes_per_stage(plan)
    assert min(counts) >= 2 and min(counts[:3]) > 8, counts
    stage_of = plan.stage_of()
    assert {s for n, s in stage_of.items() if n.startswith("h_")} == {0, 1, 2}
    # The degenerate split the bottleneck alone allows: everything but the last two nodes before
    # the head's stage on stage 0, one on stage 1, one on stage 2.
    head = set(plan.stages[3].nodes)
    rest = [n for s in plan.stages[:3] for n in s.nodes]
    degenerate = {n: 0 for n in rest} | {rest[-2]: 1, rest[-1]: 2} | {n: 3 for n in head}
    fxshard.register_partitioner("_degenerate", lambda problem, seed=0: {n: degenerate[n] for n in problem.nodes})
    try:
        old = fxshard.plan(model, "4xcpu:16GB", (x,), partitioner="_degenerate", **options)
    finally:
        fxshard.unregister_partitioner("_degenerate")
    assert _nodes_per_stage(old)[1:3] == [1, 1]
    assert plan.estimate.step_time_s <= old.estimate.step_time_s * (1 + 1e-9)
