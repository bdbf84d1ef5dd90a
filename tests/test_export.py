"""``export_plan``: stage sources, plan.json, a torchrun launcher and upstream split specs.

The files are checked for what a user relies on: every stage source is valid Python, plan.json
reads back to an equal Plan, every module named in split_spec.json and stages.json exists in the
model, stages.json names each module at most once and, with its uncovered nodes, accounts for
every node of its stage exactly, and the launcher starts the right number of processes. One
test runs the exported launcher under torchrun with two CPU processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import string
import subprocess
import sys
from pathlib import Path

import pytest

from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.errors import FxshardError
from fxshard.export import ExportError, ExportResult, export_plan, split_points, stage_modules
from fxshard.plan import Plan
from fxshard.planner import PlanOptions, plan_captured
from fxshard.zoo import build

MODELS = ("gpt2-tiny", "llama-tiny")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _planned(name: str, devices: str, **options):
    z = build(name, batch_size=8, seed=0)
    captured = capture(z.model, z.example_inputs)
    plan = plan_captured(captured, Cluster.parse(devices), 8, PlanOptions(strategy="pipeline", **options))
    return z.model, captured, plan


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    """(model, captured, plan, result) for a 4-stage pipeline plan exported to a fresh directory."""
    model, captured, plan = _planned(request.param, "4xcpu:3MB")
    assert plan.strategy == "pipeline" and plan.num_stages == 4, str(plan)
    result = export_plan(captured, plan, tmp_path_factory.mktemp(request.param), model_ref=request.param)
    return model, captured, plan, result


@pytest.fixture(scope="module")
def gpt2_two_stages():
    return _planned("gpt2-tiny", "2xcpu:1GB", schedule="1f1b")


def _recut(captured, plan: Plan, first_of_stage_1: str, *, to_stage_0: tuple[str, ...] = ()) -> Plan:
    """``plan`` (two stages) with stage 1 starting at a chosen node in graph order; nodes in
    ``to_stage_0`` stay on stage 0 even if they come later."""
    names = [n.name for n in captured.gm.graph.nodes]
    cut = names.index(first_of_stage_1)
    stage = {n: int(i >= cut and n not in to_stage_0) for i, n in enumerate(names)}
    stages = tuple(dataclasses.replace(st, nodes=tuple(n for n in names if stage[n] == st.index))
                   for st in plan.stages)
    return dataclasses.replace(plan, stages=stages)


# ---------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------


def test_result_lists_every_file(exported):
    _, _, plan, result = exported
    assert isinstance(result, ExportResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.nproc = 0  # type: ignore[misc]
    names = {p.name for p in result.files}
    expected = {f"stage_{i}.py" for i in range(plan.num_stages)}
    expected |= {"plan.json", "train.py", "launch.sh", "split_spec.json", "stages.json", "README.md"}
    assert names == expected
    assert all(p.is_file() and p.parent == result.out_dir for p in result.files)
    assert result.nproc == 4


def test_stage_sources_compile_and_describe_the_stage(exported):
    _, _, plan, result = exported
    for st in plan.stages:
        text = (result.out_dir / f"stage_{st.index}.py").read_text()
        compile(text, f"stage_{st.index}.py", "exec")
        assert text.startswith(f"# fxshard export: stage {st.index} of {plan.num_stages}")
        assert "def forward(self" in text
        assert "receives" in text and "sends" in text and "parameters held" in text
        assert "does not run on its" in text
    # The first stage receives the model's input; a later one names the producers it receives.
    assert "by producer node: idx" in (result.out_dir / "stage_0.py").read_text()


def test_plan_json_round_trips(exported):
    _, _, plan, result = exported
    assert Plan.from_json((result.out_dir / "plan.json").read_text()) == plan


def test_split_spec_names_existing_modules(exported):
    model, _, plan, result = exported
    doc = json.loads((result.out_dir / "split_spec.json").read_text())
    assert set(doc["split_spec"].values()) <= {"BEGINNING"}
    # Every boundary is accounted for, either as a split point or as a cut inside a module.
    boundaries = sorted([b["stage"] for b in doc["boundaries"]] + [b["stage"] for b in doc["not_on_module_boundary"]])
    assert boundaries == list(range(1, plan.num_stages))
    for b in doc["boundaries"]:
        assert doc["split_spec"][b["module"]] == "BEGINNING"
        model.get_submodule(b["module"])
    for name in doc["split_spec"]:
        model.get_submodule(name)
    for off in doc["not_on_module_boundary"]:
        assert off["first_node"] and off["reason"]


def test_stages_json_covers_each_stage_exactly(exported):
    model, captured, plan, result = exported
    doc = json.loads((result.out_dir / "stages.json").read_text())
    per_stage = doc["module_names_per_stage"]
    assert len(per_stage) == len(doc["stages"]) == plan.num_stages
    named = [m for names in per_stage for m in names]
    assert len(named) == len(set(named)), "a module is listed by two stages"
    for m in named:
        model.get_submodule(m)
    assert not any(b.startswith(a + ".") for a in named for b in named)
    # Listed modules nest in none of each other, and with the uncovered nodes they account
    # for every computing node of the stage exactly once.
    stage_of = plan.stage_of()
    op = {n.name: n.op for n in captured.gm.graph.nodes}
    for s, entry in enumerate(doc["stages"]):
        assert entry["modules"] == per_stage[s]
        covered = list(entry["uncovered_nodes"])
        for node in captured.gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
            if node.op == "call_module":
                paths.append(str(node.target))
            if any(p in entry["modules"] for p in paths):
                assert stage_of[node.name] == s, f"{node.name} is in a module listed for stage {s}"
                covered.append(node.name)
        mine = [n for n in plan.stages[s].nodes if op[n] not in ("placeholder", "output", "get_attr")]
        assert sorted(covered) == sorted(mine)


def test_launcher_runs_torchrun_with_one_process_per_device(exported):
    *_, result = exported
    launch = result.out_dir / "launch.sh"
    assert launch.stat().st_mode & stat.S_IXUSR
    text = launch.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "torchrun --standalone --nproc-per-node 4 " in text and "train.py" in text
    train = (result.out_dir / "train.py").read_text()
    compile(train, "train.py", "exec")
    for needle in ("Plan.from_json", "resolve(MODEL_REF", "CompiledModel(", "plan=plan", "AdamW", "REPLACE"):
        assert needle in train
    readme = (result.out_dir / "README.md").read_text()
    assert result.launch_command in readme
    for name in ("plan.json", "train.py", "launch.sh", "split_spec.json", "stages.json", "stage_0.py"):
        assert name in readme


def test_built_package_ships_the_train_template(tmp_path):
    """setup.py's package_data carries templates/train.py.tmpl, and what it renders is Python."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                   check=True, capture_output=True, timeout=120)
    shipped = tmp_path / "fxshard" / "templates" / "train.py.tmpl"
    assert shipped.read_text() == (root / "fxshard" / "templates" / "train.py.tmpl").read_text()
    text = string.Template(shipped.read_text()).substitute(
        model_name="m", nproc=2, model_ref=repr("gpt2-tiny"), resolve_kwargs=repr({}), loss_kind=repr("lm"),
        loss_doc="a loss", plan_summary="fsdp (2 FSDP shards), full activation checkpointing")
    compile(text, "train.py", "exec")


# ---------------------------------------------------------------------------------------
# Split points on chosen cuts
# ---------------------------------------------------------------------------------------


def test_cut_on_a_block_boundary_is_a_split_point(gpt2_two_stages):
    model, captured, plan = gpt2_two_stages
    doc = split_points(captured, _recut(captured, plan, "h_1_ln_1"))
    model.get_submodule("h.1")
    assert doc["split_spec"] == {"h.1": "BEGINNING"}
    assert doc["not_on_module_boundary"] == []
    # Inside a block, the outermost module that begins there and lies wholly after the cut.
    doc = split_points(captured, _recut(captured, plan, "h_1_mlp_0"))
    assert doc["split_spec"] == {"h.1.mlp": "BEGINNING"}


def test_cut_inside_a_module_is_reported(gpt2_two_stages):
    _, captured, plan = gpt2_two_stages
    doc = split_points(captured, _recut(captured, plan, "scaled_dot_product_attention_1"))
    assert doc["split_spec"] == {}
    [off] = doc["not_on_module_boundary"]
    assert off["stage"] == 1 and off["first_node"] == "scaled_dot_product_attention_1"
    assert off["inside_module"] == "h.1.attn"
    modules = stage_modules(captured, _recut(captured, plan, "scaled_dot_product_attention_1"))
    assert "h.1.attn" not in [m for names in modules["module_names_per_stage"] for m in names]
    assert "scaled_dot_product_attention_1" in modules["stages"][1]["uncovered_nodes"]


def test_stages_out_of_graph_order_are_reported():
    z = build("llama-tiny", batch_size=2, seq_len=8, seed=0)
    captured = capture(z.model, z.example_inputs)
    plan = plan_captured(captured, Cluster.parse("2xcpu:1GB"), 2, PlanOptions(strategy="pipeline"))
    # The rope tables (top-level narrow/to nodes after the embedding) stay on stage 0.
    rope = tuple(n.name for n in captured.gm.graph.nodes
                 if n.op == "get_attr" or (n.op != "placeholder" and not n.meta.get("nn_module_stack")
                                           and n.name not in ("size", "output_1")))
    doc = split_points(captured, _recut(captured, plan, "tok_embeddings", to_stage_0=rope))
    assert doc["split_spec"] == {}
    [off] = doc["not_on_module_boundary"]
    assert off["out_of_order_nodes"] and "graph order" in off["reason"]


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


def test_the_levers_are_carried_and_said(tmp_path, gpt2_two_stages):
    """A hybrid plan sharded with FSDP, stage 0 fully checkpointed: plan.json carries it, and the
    launcher, train.py, the README and each stage source say it."""
    _, captured, plan = gpt2_two_stages
    stages = tuple(dataclasses.replace(s, activation_checkpointing=("full", "none")[s.index]) for s in plan.stages)
    sharded = dataclasses.replace(plan, strategy="hybrid", data_parallel="fsdp", replicas=2, stages=stages,
                                  reshard_after_forward=False)
    export_plan(captured, sharded, tmp_path, model_ref="gpt2-tiny")
    assert Plan.from_json((tmp_path / "plan.json").read_text()) == sharded
    summary = ("hybrid (2 stages x 2 FSDP shards, 2 devices), activation checkpointing full on stage 0, none on "
               "stage 1, parameters kept gathered from forward to backward")
    assert f"# The plan: {summary}." in (tmp_path / "launch.sh").read_text()
    train = (tmp_path / "train.py").read_text()
    assert f"The plan: {summary}." in train
    compile(train, "train.py", "exec")
    assert summary in (tmp_path / "README.md").read_text()
    assert "FSDP2 fully_shard" in (tmp_path / "README.md").read_text()
    first, second = ((tmp_path / f"stage_{i}.py").read_text() for i in (0, 1))
    assert "# activation checkpointing: full (each repeated block runs under torch.utils.checkpoint" in first
    assert "# activation checkpointing: none" in second
    assert "# data parallel: fsdp over 2 device(s) per stage" in first


def test_plan_for_another_graph_is_refused(tmp_path, gpt2_two_stages):
    _, _, plan = gpt2_two_stages
    z = build("llama-tiny", batch_size=8, seed=0)
    other = capture(z.model, z.example_inputs)
    with pytest.raises(ExportError, match="fingerprint") as info:
        export_plan(other, plan, tmp_path / "out", model_ref="llama-tiny")
    assert isinstance(info.value, FxshardError)
    assert not (tmp_path / "out").exists()


def test_unwritable_directory_is_refused(tmp_path, gpt2_two_stages):
    _, captured, plan = gpt2_two_stages
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="cannot write"):
        export_plan(captured, plan, tmp_path / "file", model_ref="gpt2-tiny")
    with pytest.raises(ExportError, match="model_ref"):
        export_plan(captured, plan, tmp_path / "out", model_ref="")


def test_relative_factory_reference_becomes_absolute(tmp_path, gpt2_two_stages, monkeypatch):
    _, captured, plan = gpt2_two_stages
    monkeypatch.chdir(tmp_path)
    result = export_plan(captured, plan, "out", model_ref="models/mine.py:make")
    train = (tmp_path / "out" / "train.py").read_text()
    assert f"MODEL_REF = {str(tmp_path / 'models' / 'mine.py') + ':make'!r}" in train
    assert "RESOLVE_KWARGS = {}" in train
    assert any("mine.py" in note for note in result.notes)


# ---------------------------------------------------------------------------------------
# The launcher, for real
# ---------------------------------------------------------------------------------------


def _torchrun() -> list[str]:
    beside = Path(sys.executable).with_name("torchrun")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_exported_launcher_trains_under_torchrun(tmp_path, gpt2_two_stages):
    _, captured, plan = gpt2_two_stages
    assert plan.schedule == "1f1b" and plan.num_stages == 2
    result = export_plan(captured, plan, tmp_path / "export", model_ref="gpt2-tiny")
    assert result.nproc == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([*_torchrun(), "--standalone", "--nproc-per-node", "2", "train.py", "--steps", "1"],
                          check=False, cwd=result.out_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 step 0 loss" in proc.stdout
