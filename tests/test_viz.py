"""Pictures of a plan: titles and texts of simulations, PNGs, DOT (re-simulation: test_simulate_plan.py)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fxshard
from fxshard import viz, viz_dot, viz_text
from fxshard.plan import PlanFormatError
from fxshard.simulate_plan import simulate_plan
from fxshard.viz import graph_outline, plan_dot, plan_png, timeline_png


@pytest.fixture(scope="module")
def pipe_png(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("viz") / "plan.png"
    plan_png(pipe, path)
    return path


@pytest.fixture(scope="module")
def outline(gpt2):
    return graph_outline(fxshard.capture(gpt2.model, gpt2.example_inputs))


def read_png(path):
    with Image.open(path) as im:
        im.load()
        return im.format, im.size, im.convert("RGB")


@pytest.fixture(scope="module")
def ddp(gpt2):
    return fxshard.plan(gpt2.model, "4xcpu:64MB", gpt2.example_inputs, strategy="ddp")


def test_a_ddp_plan_is_not_called_gpipe(ddp):
    # Issue 12, item 10: `fxshard simulate` labelled a DDP plan "gpipe".
    assert (ddp.strategy, ddp.replicas) == ("ddp", 4)
    r = simulate_plan(ddp)
    for text in (viz.simulation_text(ddp, r), viz_text.timeline_title(r, ddp), viz_text.plan_title(ddp), plan_dot(ddp)):
        assert "gpipe" not in text.lower() and "schedule none" not in text
    assert viz.simulation_text(ddp, r) == "ddp (4 data-parallel replicas, no pipeline schedule), 1 micro-batch"
    more = simulate_plan(ddp, microbatches=2)
    assert viz.simulation_text(ddp, more).endswith("2 micro-batches one after another (gradient accumulation)")
    assert viz_text.timeline_title(more, ddp).startswith("what-if: ddp")


def test_virtual_stages_are_named_in_every_title(gpt2):
    # Two stages per device under ZBV: 4 stages on 2 devices, which titles must make add up.
    p = fxshard.plan(gpt2.model, "2xcpu:4MB", gpt2.example_inputs, strategy="pipeline", schedule="zbv")
    assert (p.num_stages, p.num_devices, p.stages_per_device) == (4, 2, 2)
    r = simulate_plan(p)
    assert "pipeline (4 stages, 2 stages per device (zbv), 2 devices)" in viz_text.plan_title(p)
    assert "pipeline (4 stages, 2 stages per device (zbv), 2 devices)" in plan_dot(p)
    assert viz.simulation_text(p, r) == f"zbv, 4 stages, 2 per device, on 2 devices, {p.microbatches} micro-batches"


def test_hybrid_simulation_text_multiplies_out_to_the_devices(gpt2):
    p = fxshard.plan(gpt2.model, "4xcpu:3MB", gpt2.example_inputs, strategy="hybrid", stages=2, schedule="1f1b")
    assert (p.num_stages, p.replicas, p.num_devices) == (2, 2, 4)
    assert ", on 2 devices x 2 replicas = 4 devices," in viz.simulation_text(p, simulate_plan(p))


# -- PNG -------------------------------------------------------------------------------------


def test_plan_png(pipe_png):
    path = pipe_png
    fmt, (w, h), _ = read_png(path)
    assert fmt == "PNG" and path.stat().st_size > 10_000
    assert 900 <= w <= 2400 and 500 <= h <= 2000 and w > h


def test_plan_png_of_a_what_if_and_a_single_device(pipe, single, tmp_path):
    plan_png(pipe, tmp_path / "m8.png", result=simulate_plan(pipe, microbatches=8))
    plan_png(single, tmp_path / "single.png")
    for name in ("m8.png", "single.png"):
        fmt, (w, h), _ = read_png(tmp_path / name)
        assert fmt == "PNG" and 900 <= w <= 2400 and 400 <= h <= 2000


def test_plan_png_marks_a_stage_over_capacity_red(pipe, pipe_png, tmp_path):
    over = dataclasses.replace(pipe.stages[1], peak_memory_bytes=2 * pipe.stages[1].memory_capacity_bytes)
    plan_png(dataclasses.replace(pipe, stages=(pipe.stages[0], over, *pipe.stages[2:])), tmp_path / "over.png")

    def red(path):
        rgb = np.asarray(read_png(path)[2]).astype(int)
        return int(((rgb[..., 0] > 190) & (rgb[..., 1] < 70) & (rgb[..., 2] < 70)).sum())

    assert red(tmp_path / "over.png") > 1000 and red(pipe_png) == 0


def test_timeline_png(pipe, tmp_path):
    path = tmp_path / "timeline.png"
    timeline_png(simulate_plan(pipe), path, title="1f1b on 4 ranks")
    fmt, (w, h), _ = read_png(path)
    assert fmt == "PNG" and path.stat().st_size > 5_000
    assert 900 <= w <= 2400 and 200 <= h <= 1000 and w > 2 * h


def test_figures_grow_with_ranks_and_stay_capped(pipe, tmp_path):
    timeline_png(simulate_plan(pipe), tmp_path / "four.png")
    single_rank = dataclasses.replace(simulate_plan(pipe), ranks=1, timeline=())
    timeline_png(single_rank, tmp_path / "one.png")
    assert read_png(tmp_path / "four.png")[1][1] > read_png(tmp_path / "one.png")[1][1]


def test_matplotlib_is_imported_only_inside_functions():
    trees = [ast.parse(Path(m.__file__).read_text()) for m in (viz, viz_dot, viz_text)]
    top = [n for tree in trees for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("matplotlib", "PIL")]


# -- DOT -------------------------------------------------------------------------------------

_NODE = re.compile(r'^\s*("(?:[^"\\]|\\.)*")\s*\[label=')
_EDGE = re.compile(r'^\s*("(?:[^"\\]|\\.)*")\s*->\s*("(?:[^"\\]|\\.)*")')


def check_dot(text: str) -> tuple[set[str], list[tuple[str, str, str]]]:
    """Basic DOT structure: one digraph, balanced braces and quotes, edges between declared nodes."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    depth = 0
    nodes: set[str] = set()
    edges = []
    for line in text.splitlines():
        assert len(re.findall(r'(?<!\\)"', line)) % 2 == 0, line
        unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)
        depth += unquoted.count("{") - unquoted.count("}")
        assert depth >= 0
        if m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2), line))
        elif m := _NODE.match(line):
            nodes.add(m.group(1))
    assert depth == 0
    assert all(a in nodes and b in nodes for a, b, _ in edges)
    return nodes, edges


def test_plan_dot_stage_boxes(pipe):
    text = plan_dot(pipe)
    nodes, edges = check_dot(text)
    assert len(nodes) == pipe.num_stages and len(edges) == pipe.num_stages - 1
    for s in pipe.stages:
        assert f"cluster_stage_{s.index}" in text and f"stage {s.index}" in text
        assert f"{len(s.nodes)} nodes" in text


def test_plan_dot_collapses_modules(pipe, outline):
    text = plan_dot(pipe, list(outline.edges), node_module=outline.node_module)
    nodes, edges = check_dot(text)
    total = sum(len(s.nodes) for s in pipe.stages)
    assert pipe.num_stages <= len(nodes) < total / 2
    assert all(f"cluster_stage_{s.index}" in text for s in pipe.stages)
    assert 'label="h.0\\n' in text and "x2" in text  # a block collapsed; a residual and its input
    crossing = [line for _, _, line in edges if "penwidth=2" in line]
    assert len(crossing) >= pipe.num_stages - 1


def test_plan_dot_one_box_per_node(pipe, outline):
    nodes, edges = check_dot(plan_dot(pipe, list(outline.edges), modules=False))
    assert len(nodes) == sum(len(s.nodes) for s in pipe.stages)
    assert len(edges) == len(set(outline.edges))


def test_plan_dot_rejects_edges_of_another_graph(pipe):
    with pytest.raises(PlanFormatError, match="not_a_node"):
        plan_dot(pipe, [("not_a_node", pipe.stages[0].nodes[0])])


# -- the memory levers -----------------------------------------------------------------------


def _checkpointed(plan, *policies):
    return tuple(dataclasses.replace(s, activation_checkpointing=policies[min(i, len(policies) - 1)])
                 for i, s in enumerate(plan.stages))


@pytest.fixture(scope="module")
def fsdp(ddp):
    """The ddp plan as FSDP shards with full checkpointing and 2 micro-batches accumulated (hand-made)."""
    return dataclasses.replace(ddp, strategy="fsdp", data_parallel="fsdp", microbatches=2,
                               stages=_checkpointed(ddp, "full"))


def test_titles_name_sharding_checkpointing_and_accumulation(fsdp):
    title = viz_text.plan_title(fsdp).splitlines()[0]
    assert title.endswith("fsdp (4 FSDP shards), full activation checkpointing, 2 micro-batches accumulated, "
                          "reshard after forward")
    r = simulate_plan(fsdp)
    assert viz.simulation_text(fsdp, r).startswith("fsdp (4 FSDP shards, no pipeline schedule)")


def test_hybrid_fsdp_simulation_says_shards(gpt2):
    p = fxshard.plan(gpt2.model, "4xcpu:3MB", gpt2.example_inputs, strategy="hybrid", stages=2, schedule="1f1b")
    sharded = dataclasses.replace(p, data_parallel="fsdp")
    assert ", on 2 devices x 2 FSDP shards = 4 devices," in viz.simulation_text(sharded, simulate_plan(sharded))


def test_dot_names_checkpointing_and_sharding_per_stage(fsdp, pipe):
    dot = plan_dot(fsdp)
    assert "FSDP-sharded" in dot and "full activation checkpointing" in dot
    mixed = dataclasses.replace(pipe, stages=_checkpointed(pipe, "selective", "none"))
    dot = plan_dot(mixed)
    assert 'stage 0\\n' in dot and "selective activation checkpointing" in dot
    assert dot.count("activation checkpointing") == 3  # the title once, stage 0's cluster and box


def test_png_of_a_checkpointed_fsdp_plan(fsdp, tmp_path):
    path = tmp_path / "fsdp.png"
    plan_png(fsdp, path)
    fmt, size, _ = read_png(path)
    assert fmt == "PNG" and min(size) > 100
