"""Pictures of a plan: re-simulation from the plan's own figures, what-ifs, PNGs, DOT.

The key check is that :func:`simulate_plan` without overrides repeats the planner's own
simulation (the plan keeps every figure the planner timed with), for each strategy."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fxshard
from fxshard import viz
from fxshard.plan import Plan, PlanFormatError
from fxshard.simulate import SimulationError
from fxshard.viz import graph_outline, plan_dot, plan_png, simulate_plan, timeline_png
from fxshard.zoo import build


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2-tiny", batch_size=8)


@pytest.fixture(scope="module")
def pipe(gpt2):
    return fxshard.plan(gpt2.model, "4xcpu:3MB", gpt2.example_inputs, strategy="pipeline", schedule="1f1b",
                        microbatches=4)


@pytest.fixture(scope="module")
def single(gpt2):
    return fxshard.plan(gpt2.model, "1xcpu:64MB", gpt2.example_inputs)


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


# -- re-simulation ---------------------------------------------------------------------------


def test_fixture_is_a_four_stage_1f1b_pipeline(pipe, single):
    assert (pipe.strategy, pipe.num_stages, pipe.schedule, pipe.microbatches) == ("pipeline", 4, "1f1b", 4)
    assert len({s.device_indices[0] for s in pipe.stages}) == 4
    assert (single.strategy, single.num_stages) == ("single", 1)


def test_simulate_plan_repeats_the_planners_estimate(pipe):
    r = simulate_plan(pipe)
    assert (r.schedule, r.ranks, r.stages, r.microbatches) == ("1f1b", 4, 4, 4)
    assert r.step_time_s == pytest.approx(pipe.estimate.step_time_s, rel=1e-9)
    assert r.bubble_fraction == pytest.approx(pipe.estimate.bubble_fraction, rel=1e-9)
    # Memory is not re-estimated: the plan's peaks pass through.
    assert r.peak_memory_bytes == tuple(s.peak_memory_bytes for s in pipe.stages)


def test_simulate_plan_survives_the_json_round_trip(pipe):
    again = simulate_plan(Plan.from_json(pipe.to_json()))
    assert again.step_time_s == pytest.approx(pipe.estimate.step_time_s, rel=1e-9)


@pytest.mark.parametrize("devices,options", [
    ("1xcpu:64MB", {}),
    ("4xcpu:64MB", {"strategy": "ddp"}),
    ("4xcpu:3MB", {"strategy": "hybrid"}),
    ("2xcpu:3MB", {"strategy": "pipeline", "schedule": "zbv"}),
    ("4xcpu:3MB", {"strategy": "pipeline", "training": False}),
], ids=["single", "ddp", "hybrid", "zbv", "inference"])
def test_simulate_plan_repeats_every_strategy(gpt2, devices, options):
    p = fxshard.plan(gpt2.model, devices, gpt2.example_inputs, **options)
    r = simulate_plan(p)
    assert r.step_time_s == pytest.approx(p.estimate.step_time_s, rel=1e-9)
    assert r.stages == p.num_stages
    if p.strategy in ("single", "ddp"):
        assert (r.schedule, r.microbatches) == ("gpipe", 1)


def test_more_microbatches_lower_the_bubble_and_keep_the_work(pipe):
    base, more = simulate_plan(pipe), simulate_plan(pipe, microbatches=8)
    assert more.microbatches == 8
    assert more.bubble_fraction < base.bubble_fraction
    assert more.step_time_s < base.step_time_s
    # Batch-linear scaling: each rank does the same total compute, in twice as many pieces.
    assert more.busy_s == pytest.approx(base.busy_s, rel=1e-9)


def test_what_if_schedule_with_the_same_layout(pipe):
    r = simulate_plan(pipe, schedule="GPipe")
    assert (r.schedule, r.ranks, r.microbatches) == ("gpipe", 4, 4)
    assert r.busy_s == pytest.approx(simulate_plan(pipe).busy_s, rel=1e-12)


@pytest.mark.parametrize("what_if,match", [
    ({"microbatches": 2}, "greater than or equal"),  # 1F1B with fewer micro-batches than stages
    ({"microbatches": 3}, "do not divide"),
    ({"microbatches": 0}, "positive integer"),
    ({"schedule": "interleaved1f1b"}, "placement"),  # two stages per rank on a one-per-device plan
    ({"schedule": "zbv"}, "placement"),
    ({"schedule": "pipedream"}, "unknown schedule"),
])
def test_impossible_what_ifs_raise(pipe, what_if, match):
    with pytest.raises(SimulationError, match=match):
        simulate_plan(pipe, **what_if)


def test_single_device_what_ifs(single):
    assert simulate_plan(single, microbatches=4).busy_s == pytest.approx(simulate_plan(single).busy_s, rel=1e-9)
    # A single or ddp plan has no pipeline to schedule: a schedule what-if is refused, saying so
    # (it used to simulate one stage and call it by the schedule's name).
    for schedule in ("interleaved1f1b", "1f1b", "gpipe"):
        with pytest.raises(SimulationError, match=r"single plan.*no pipeline to schedule.*strategy='pipeline'"):
            simulate_plan(single, schedule=schedule)
    with pytest.raises(SimulationError, match="unknown schedule 'pipedream'"):
        simulate_plan(single, schedule="pipedream")


@pytest.fixture(scope="module")
def ddp(gpt2):
    return fxshard.plan(gpt2.model, "4xcpu:64MB", gpt2.example_inputs, strategy="ddp")


def test_a_ddp_plan_is_not_called_gpipe(ddp):
    # Issue 12, item 10: `fxshard simulate` labelled a DDP plan "gpipe".
    assert (ddp.strategy, ddp.replicas) == ("ddp", 4)
    r = simulate_plan(ddp)
    for text in (viz.simulation_text(ddp, r), viz._timeline_title(r, ddp), viz._plan_title(ddp), plan_dot(ddp)):
        assert "gpipe" not in text.lower() and "schedule none" not in text
    assert viz.simulation_text(ddp, r) == "ddp (4 data-parallel replicas, no pipeline schedule), 1 micro-batch"
    more = simulate_plan(ddp, microbatches=2)
    assert viz.simulation_text(ddp, more).endswith("2 micro-batches one after another (gradient accumulation)")
    assert viz._timeline_title(more, ddp).startswith("what-if: ddp")


def test_virtual_stages_are_named_in_every_title(gpt2):
    # Two stages per device under ZBV: 4 stages on 2 devices, which titles must make add up.
    p = fxshard.plan(gpt2.model, "2xcpu:3MB", gpt2.example_inputs, strategy="pipeline", schedule="zbv")
    assert (p.num_stages, p.num_devices, p.stages_per_device) == (4, 2, 2)
    r = simulate_plan(p)
    assert "pipeline (4 stages, 2 stages per device (zbv), 2 devices)" in viz._plan_title(p)
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
    tree = ast.parse(Path(viz.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
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
