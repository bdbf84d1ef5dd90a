"""The fxshard command line, in-process and through the installed entry point."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fxshard.cli import main
from fxshard.plan import Plan


def test_devices_lists_every_preset(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in ("V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L4", "T4", "MI300X", "cpu"):
        assert name in out
    assert "This machine" in out


def test_devices_json(capsys):
    assert main(["devices", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["presets"]["H100-80GB"]["memory_bytes"] == 80 * 2**30
    assert "nvlink4" in doc["links"]


def test_inspect_json_rows(tmp_path):
    dest = tmp_path / "rows.json"
    assert main(["inspect", "gpt2-tiny", "--batch-size", "2", "--json", str(dest)]) == 0
    doc = json.loads(dest.read_text())
    rows = doc["nodes"]
    assert len(rows) == doc["model"]["nodes"] > 10
    for row in rows:
        for key in ("name", "op", "target", "flops", "param_bytes", "output_bytes", "time_s"):
            assert key in row
    # The tied embedding / LM head weight counts once in the total, twice in the rows.
    assert doc["totals"]["param_bytes"] < sum(r["param_bytes"] for r in rows)
    assert doc["totals"]["param_bytes"] == 4 * sum(
        p.numel() for p in __import__("fxshard.zoo").zoo.build("gpt2-tiny").model.parameters())


def test_inspect_table_and_top(capsys):
    assert main(["inspect", "mlp", "--device", "A100-80GB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "A100-80GB" in out and "parameters" in out


def test_inspect_factory_file(tmp_path, capsys):
    factory = tmp_path / "mymodel.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())\n"
        "    return model, (torch.randn(4, 8),)\n")
    assert main(["inspect", f"{factory}:make", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["totals"]["param_bytes"] == (64 + 8) * 4


@pytest.mark.parametrize("argv,code,needle", [
    (["inspect", "gtp2"], 2, "did you mean 'gpt2'"),
    (["inspect", "mlp", "--device", "H100-8GB"], 2, "H100-80GB"),
    (["inspect", "nowhere.py:make"], 2, "nowhere.py"),
])
def test_bad_usage_exits_2_with_a_one_line_reason(argv, code, needle, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["inspect", "mlp", "--batch-size", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_uncapturable_model_exits_1(tmp_path, capsys):
    factory = tmp_path / "bad.py"
    factory.write_text(
        "import torch\n"
        "class Bad(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.sum() > 0 else x\n"
        "def make():\n"
        "    return Bad(), (torch.randn(3),)\n")
    assert main(["inspect", f"{factory}:make"]) == 1
    err = capsys.readouterr().err
    assert "symbolic_trace" in err and "torch.export" in err


@pytest.mark.slow
@pytest.mark.parametrize("command", [[], ["devices"], ["inspect"]])
def test_help_through_the_entry_point(command):
    result = subprocess.run([sys.executable, "-m", "fxshard.cli", *command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "usage: fxshard" in result.stdout


@pytest.mark.slow
def test_console_script_runs_inspect():
    result = subprocess.run(["fxshard", "inspect", "llama-tiny", "--json", "-"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["name"] == "llama-tiny"


def test_plan_json_round_trips_and_prints_a_table(tmp_path, capsys):
    dest = tmp_path / "plan.json"
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8", "--json", str(dest)]) == 0
    out = capsys.readouterr().out
    plan = Plan.from_json(dest.read_text())
    assert plan.strategy != "single"  # 3 MB per device: split, sharded or checkpointed, as the planner picks
    assert "alternatives considered" in out and "why:" in out and "samples/s" in out
    for stage in plan.stages:
        assert f"{stage.index}" in out


def test_plan_json_to_stdout_is_pure_json(capsys):
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--batch-size", "4", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fxshard_plan"] == 2 and doc["strategy"] in ("single", "ddp", "pipeline", "hybrid")


def test_plan_that_cannot_fit_exits_1_with_numbers(capsys):
    assert main(["plan", "mlp", "--devices", "2xcpu:5MB", "--batch-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "needs" in err and "MiB" in err and "Traceback" not in err


def test_plan_options_reach_the_planner(capsys):
    assert main(["plan", "gpt2-tiny", "--devices", "2xcpu:1GB", "--batch-size", "4", "--strategy", "pipeline",
                 "--schedule", "gpipe", "--microbatches", "2", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["strategy"], doc["schedule"], doc["microbatches"]) == ("pipeline", "gpipe", 2)


def test_stages_option_fixes_the_pipeline_depth(capsys):
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:1GB", "--batch-size", "8", "--strategy", "pipeline",
                 "--stages", "3", "--schedule", "1f1b", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["stages"]) == 3
    # Interleaved schedules hold two stages per rank: depth 3 is 6 stages on 3 devices.
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:1GB", "--batch-size", "8", "--strategy", "pipeline",
                 "--stages", "3", "--schedule", "interleaved1f1b", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["stages"]) == 6
    assert {d for st in doc["stages"] for d in st["device_indices"]} == {0, 1, 2}
    with pytest.raises(SystemExit) as info:
        main(["plan", "gpt2-tiny", "--devices", "4xcpu:1GB", "--stages", "0"])
    assert info.value.code == 2
    assert main(["plan", "gpt2-tiny", "--devices", "2xcpu:1GB", "--stages", "3"]) == 1
    assert "--stages 3 needs at least 3 devices" in capsys.readouterr().err  # flags, not Python (issue 12)


def test_compare_rows_have_the_spec_fields(capsys):
    assert main(["compare", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8",
                 "--partitioners", "metis,uniform", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["partitioner"] for r in rows if r["partitioner"] is not None] == ["metis", "uniform"]
    for row in rows:
        for key in ("partitioner", "step_time_s", "bottleneck_stage_time_s", "lower_bound_step_time_s",
                    "cut_bytes", "max_stage_memory_bytes", "plan_seconds"):
            assert key in row
    assert sum(r["best"] for r in rows) == 1


def test_compare_runs_every_partitioner_but_milp_unless_named(capsys):
    # milp is an exact solver with a time limit per partition: a reference, run when named.
    from fxshard.passes.partition import partitioners

    assert main(["compare", "mlp", "--devices", "2xcpu:1GB", "--json", "-"]) == 0
    names = {r["partitioner"] for r in json.loads(capsys.readouterr().out) if r["partitioner"] is not None}
    assert names == set(partitioners()) - {"milp"}
    assert main(["compare", "mlp", "--devices", "2xcpu:1GB", "--partitioners", "milp", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["partitioner"] for r in rows if r["partitioner"] is not None] == ["milp"]


def test_plan_exhaustive_flag_searches_everything_and_picks_the_same_plan(capsys):
    common = ["plan", "gpt2-tiny", "--devices", "2x4xcpu:64MB", "--batch-size", "8", "--json", "-"]
    assert main(common) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert main([*common, "--exhaustive"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert (full["strategy"], full["stages"], full["estimate"]) == (pruned["strategy"], pruned["stages"],
                                                                     pruned["estimate"])
    assert len(full["alternatives"]) >= len(pruned["alternatives"])


def test_exhaustive_flag_reaches_the_plan_options(monkeypatch, capsys):
    import fxshard.planner

    seen = []
    real = fxshard.planner.plan_captured
    monkeypatch.setattr(fxshard.planner, "plan_captured",
                        lambda c, cl, b, opts: seen.append(opts) or real(c, cl, b, opts))
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--exhaustive", "--json", "-"]) == 0
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--json", "-"]) == 0
    assert [o.exhaustive for o in seen] == [True, False]


def test_compare_unknown_partitioner_is_an_error(capsys):
    # Bad usage (exit 2), as the SPEC says; this test pinned exit 1 before issue 12.
    assert main(["compare", "mlp", "--devices", "2xcpu:1GB", "--partitioners", "metis,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("command", [["plan"], ["compare"], ["export"], ["simulate"]])
def test_help_of_every_command(command):
    result = subprocess.run([sys.executable, "-m", "fxshard.cli", *command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: fxshard" in result.stdout


def test_missing_devices_is_bad_usage():
    with pytest.raises(SystemExit) as info:
        main(["plan", "mlp"])
    assert info.value.code == 2


def test_plan_png_and_dot_and_simulate_and_trace(tmp_path, capsys):
    import matplotlib.image

    plan_file, png, dot = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "p.dot"
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8", "--strategy", "pipeline",
                 "--schedule", "1f1b", "--json", str(plan_file), "--png", str(png), "--dot", str(dot)]) == 0
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert dot.read_text().startswith("digraph")
    capsys.readouterr()
    timeline, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["simulate", str(plan_file), "--microbatches", "8", "--png", str(timeline),
                 "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "bubble" in out and "rank 0" in out
    assert matplotlib.image.imread(timeline).shape[1] > 600
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) > 0


def test_simulate_impossible_what_if_and_missing_file_exit_nonzero(tmp_path, capsys):
    plan_file = tmp_path / "p.json"
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8", "--strategy", "pipeline",
                 "--schedule", "1f1b", "--microbatches", "4", "--json", str(plan_file)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(plan_file), "--schedule", "nope"]) == 2  # bad usage (was 1 before issue 12)
    assert "nope" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "absent.json")]) == 2
    assert "fxshard plan" in capsys.readouterr().err


@pytest.mark.slow
def test_export_through_the_console_script(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(["fxshard", "export", "gpt2-tiny", "--devices", "2xcpu:1GB", "--batch-size", "4",
                             "--strategy", "pipeline", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("plan.json", "launch.sh", "train.py", "split_spec.json", "stages.json", "stage_0.py", "stage_1.py"):
        assert (out / name).exists(), name
    json.loads((out / "split_spec.json").read_text())


# -- issue 12: what a new user hits ----------------------------------------------------------

HF_FACTORY = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def _model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def _batch():
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def keywords():
    return _model(), _batch()


def both():
    return _model(), (), _batch()


def positional():
    return _model(), (_batch()["input_ids"],)
"""


@pytest.fixture(scope="module")
def hf_factory(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "hf_gpt2.py"
    path.write_text(HF_FACTORY)
    return str(path)


@pytest.mark.parametrize("factory", ["keywords", "both"])
def test_a_factory_with_keyword_inputs_plans(hf_factory, factory, capsys):
    # A Hugging Face model takes keyword inputs: (model, dict) was refused, and (model, (), dict)
    # failed in capture because the CLI passed only the positional inputs.
    assert main(["plan", f"{hf_factory}:{factory}", "--devices", "2xcpu:1GB", "--strategy", "pipeline",
                 "--microbatches", "2", "--json", "-"]) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert (doc["batch_size"], doc["strategy"]) == (4, "pipeline")
    assert {d for st in doc["stages"] for d in st["device_indices"]} == {0, 1}


@pytest.mark.slow
def test_keyword_inputs_reach_compare_export_and_inspect(hf_factory, tmp_path, capsys):
    ref = f"{hf_factory}:keywords"
    assert main(["compare", ref, "--devices", "2xcpu:1GB", "--partitioners", "metis", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["partitioner"] == "metis" and "error" not in r for r in rows)
    out = tmp_path / "run"
    assert main(["export", ref, "--devices", "2xcpu:1GB", "--strategy", "pipeline", "--out", str(out)]) == 0
    assert json.loads((out / "plan.json").read_text())["batch_size"] == 4
    capsys.readouterr()
    assert main(["inspect", ref, "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any(r["op"] == "placeholder" and "attention_mask" in r["name"] for r in doc["nodes"])


def test_factory_return_forms(tmp_path):
    from fxshard.errors import ZooError
    from fxshard.zoo import load_factory

    path = tmp_path / "forms.py"
    path.write_text("import torch\n"
                    "m = torch.nn.Linear(2, 2)\n"
                    "x = torch.randn(3, 2)\n"
                    "def kw(): return m, {'input': x}\n"
                    "def args(): return m, (x,)\n"
                    "def tensor(): return m, x\n"
                    "def both(): return m, (x,), {'extra': 1}\n"
                    "def bad_keys(): return m, {0: x}\n"
                    "def four(): return m, (x,), {}, None\n")
    assert (load_factory(f"{path}:kw").example_inputs, set(load_factory(f"{path}:kw").example_kwargs)) == ((), {"input"})
    assert len(load_factory(f"{path}:args").example_inputs) == 1 and not load_factory(f"{path}:args").example_kwargs
    assert len(load_factory(f"{path}:tensor").example_inputs) == 1
    assert load_factory(f"{path}:both").example_kwargs == {"extra": 1}
    with pytest.raises(ZooError, match="keyed by argument name"):
        load_factory(f"{path}:bad_keys")
    with pytest.raises(ZooError, match=r"tuple of 4 items.*\(model, \{keyword inputs\}\)"):
        load_factory(f"{path}:four")


def test_version():
    import torch

    import fxshard

    result = subprocess.run([sys.executable, "-m", "fxshard.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith(f"fxshard {fxshard.__version__} (torch {torch.__version__}")


@pytest.mark.parametrize("argv,needle", [
    (["plan", "mlp", "--devices", "2xcpu:1GB", "--partitioner", "kmeans"], "unknown partitioner(s) 'kmeans'"),
    (["plan", "mlp", "--devices", "2xcpu:1GB", "--schedule", "1f2b"], "unknown schedule '1f2b'"),
    (["plan", "mlp", "--devices", "2xcpu:1GB", "--cost-model", "roofline2"], "unknown cost model 'roofline2'"),
    (["compare", "mlp", "--devices", "2xcpu:1GB", "--schedule", "1f2b"], "unknown schedule '1f2b'"),
    (["export", "mlp", "--devices", "2xcpu:1GB", "--partitioner", "kmeans", "--out", "x"], "'kmeans'"),
    (["inspect", "mlp", "--cost-model", "roofline2"], "unknown cost model 'roofline2'"),
    (["plan", "mlp", "--devices", "2xcpu:1GB", "--inference", "--schedule", "1f1b"], "--schedule 1f1b with --inference"),
])
def test_unknown_names_are_bad_usage(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_simulate_unknown_schedule_is_bad_usage_before_reading_the_plan(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "absent.json"), "--schedule", "chimera"]) == 2
    assert "unknown schedule 'chimera'" in capsys.readouterr().err


def test_any_registered_cost_model_is_accepted(tmp_path, capsys, scratch_cost_models):
    factory = tmp_path / "with_cost_model.py"
    factory.write_text("import torch\n"
                       "import fxshard\n"
                       "from fxshard.cost_models import AnalyticalCostModel\n"
                       "fxshard.register_cost_model('test-doubled')(AnalyticalCostModel)\n"
                       "def make():\n"
                       "    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (torch.randn(4, 8),)\n")
    # Registered by the factory file, which is imported before the name is checked.
    assert main(["plan", f"{factory}:make", "--devices", "2xcpu:1GB", "--cost-model", "test-doubled",
                 "--json", "-"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["strategy"] in ("single", "ddp")
    assert main(["inspect", f"{factory}:make", "--cost-model", "test-doubled", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["cost_model"] == "analytical"  # the class's own name


@pytest.mark.parametrize("text,words", [
    ("use optimizer='sgd' (state 64 MiB)", "use --optimizer sgd (state 64 MiB)"),
    ("or strategy=None compares every strategy", "or no --strategy compares every strategy"),
    ("plan it with training=False (--inference)", "plan it with --inference"),
    ("inference, training=False (weights 1 GiB)", "inference, --inference (weights 1 GiB)"),
    ("Use stages<=2 or more devices", "Use --stages at most 2 or more devices"),
    ("use microbatches=1 with strategy 'single'", "use --microbatches 1 with strategy 'single'"),
    ("drop stages= or", "drop --stages or"),
    ("cost_model='roofline2' is not registered", "--cost-model roofline2 is not registered"),
    ("fxshard.register_cost_model and schedule.zbv", "fxshard.register_cost_model and schedule.zbv"),
])
def test_cli_words_translates_python_options_to_flags(text, words):
    from fxshard.cli import cli_words

    assert cli_words(text) == words


def test_error_messages_name_flags_not_python(capsys):
    assert main(["plan", "mlp", "--devices", "2xcpu:5MB", "--batch-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "--optimizer sgd" in err and "optimizer='sgd'" not in err


def test_outputs_say_where_they_were_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8", "--strategy", "pipeline",
                 "--schedule", "1f1b", "--json", "p.json", "--png", "p.png", "--dot", "p.dot"]) == 0
    out = capsys.readouterr().out
    for what, name in (("the plan as JSON", "p.json"), ("the plan's picture", "p.png"),
                       ("the stage graph (Graphviz DOT)", "p.dot")):
        assert f"wrote {what} to {tmp_path / name}" in out
    assert main(["simulate", "p.json", "--png", "t.png", "--trace", "t.json"]) == 0
    out = capsys.readouterr().out
    assert f"wrote the timeline to {tmp_path / 't.png'}" in out
    assert f"wrote the Chrome trace to {tmp_path / 't.json'}" in out
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8", "--json", "-"]) == 0
    assert "wrote" not in capsys.readouterr().out  # stdout holds the JSON alone


def test_virtual_stages_are_shown(capsys):
    # Interleaved and V-shaped schedules hold two stages per device; "4 stages" on 2 devices
    # with half of each device's memory per stage must say so.
    assert main(["plan", "gpt2-tiny", "--devices", "2xcpu:4MB", "--batch-size", "8", "--strategy", "pipeline",
                 "--schedule", "zbv"]) == 0
    out = capsys.readouterr().out
    assert "pipeline (4 stages, 2 stages per device (zbv), 2 devices)" in out
    assert "memory shared by the 2 stages it holds" in out
    assert "(2 per device)" in out  # the alternatives' shapes


def test_simulate_names_a_ddp_plan_as_ddp(tmp_path, capsys):
    plan_file = tmp_path / "ddp.json"
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:64MB", "--batch-size", "8", "--strategy", "ddp",
                 "--json", str(plan_file)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(plan_file), "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "ddp (4 data-parallel replicas, no pipeline schedule), 2 micro-batches one after another" in out
    assert "gpipe" not in out.lower()
    assert main(["simulate", str(plan_file), "--schedule", "1f1b"]) == 1
    assert "no pipeline to schedule" in capsys.readouterr().err


def test_a_forced_strategy_says_why_and_what_it_costs(capsys):
    assert main(["plan", "mlp", "--devices", "4xcpu:1GB", "--batch-size", "8", "--json", "-"]) == 0
    free = json.loads(capsys.readouterr().out)
    # force a strategy the planner did not pick (with the optimizer step priced, issue 16, it may pick pipeline)
    forced = "ddp" if free["strategy"] == "pipeline" else "pipeline"
    assert main(["plan", "mlp", "--devices", "4xcpu:1GB", "--batch-size", "8", "--strategy", forced]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"why: forced by --strategy {forced} (only {forced} plans were compared" in out
    assert (f"without --strategy {forced} the planner picks {free['strategy']} "
            f"(") in out and f"{free['estimate']['samples_per_s']:,.1f} samples/s" in out


@pytest.mark.parametrize("devices", ["4xcpu:64MB", "4xcpu:3MB"], ids=["ddp-fits", "pipeline-needed"])
def test_compare_best_row_is_plans_choice(devices, capsys):
    # compare used to force pipelines, so its best row lost to plan's DDP choice.
    common = ["gpt2-tiny", "--devices", devices, "--batch-size", "8"]
    assert main(["plan", *common, "--json", "-"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert main(["compare", *common, "--partitioners", "metis", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    best = [r for r in rows if r["best"]]
    assert len(best) == 1
    assert (best[0]["strategy"], best[0]["stages"], best[0]["replicas"], best[0]["schedule"],
            best[0]["microbatches"]) == (chosen["strategy"], len(chosen["stages"]), chosen["replicas"],
                                         chosen["schedule"], chosen["microbatches"])
    assert best[0]["step_time_s"] == pytest.approx(chosen["estimate"]["step_time_s"], rel=1e-12)
    if devices == "4xcpu:64MB":
        assert {r["strategy"] for r in rows if r["partitioner"] is None} >= {"ddp"}


def _readme_commands() -> list[tuple[list[str], int]]:
    """The ``fxshard`` lines of the README's "Command line" block, with the exit status each
    comment promises (0 unless it says "exit 1")."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        command, _, comment = line.partition(" #")
        if command.startswith("fxshard"):
            commands.append((shlex.split(command)[1:], 1 if "exit 1" in comment else 0))
    return commands


@pytest.mark.slow
def test_readme_commands(tmp_path, monkeypatch, capsys):
    # The README's simulate line failed on the plan its gpt2 line made (a DDP plan of batch 8
    # cannot take 16 micro-batches); every line runs here, in order, as a user pastes them.
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert len(commands) >= 10 and any(argv[0] == "simulate" for argv, _ in commands)
    for argv, status in commands:
        if argv == ["--version"]:
            with pytest.raises(SystemExit) as info:
                main(argv)
            assert info.value.code == 0
            continue
        assert main(argv) == status, (argv, capsys.readouterr().err[-2000:])
        capsys.readouterr()
    for name in ("plan.png", "plan.json", "t.png", "t.json", "cal.png", "run/plan.json"):
        assert (tmp_path / name).is_file(), name


# -- the memory levers -----------------------------------------------------------------------


@pytest.fixture
def fsdp_planner(monkeypatch, gpt2):
    """The planner replaced by one that records its options and returns gpt2-tiny as 4 FSDP
    shards, fully checkpointed, 2 micro-batches accumulated (hand-made: the CLI's part is the
    flags and the text, not the search)."""
    import fxshard
    import fxshard.planner

    ddp = fxshard.plan(gpt2.model, "4xcpu:64MB", gpt2.example_inputs, strategy="ddp")
    plan = dataclasses.replace(ddp, strategy="fsdp", data_parallel="fsdp", microbatches=2,
                               stages=tuple(dataclasses.replace(s, activation_checkpointing="full")
                                            for s in ddp.stages))
    seen = []

    def fake(captured, cluster, batch, opts):
        seen.append(opts)
        return plan

    monkeypatch.setattr(fxshard.planner, "plan_captured", fake)
    return plan, seen


def test_lever_flags_reach_the_planner_and_the_text(fsdp_planner, tmp_path, capsys):
    plan, seen = fsdp_planner
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:64MB", "--batch-size", "8", "--strategy", "fsdp",
                 "--activation-checkpointing", "full", "--data-parallel", "fsdp",
                 "--json", str(tmp_path / "p.json")]) == 0
    forced, unforced = seen
    assert (forced.strategy, forced.activation_checkpointing, forced.data_parallel) == ("fsdp", "full", "fsdp")
    assert (unforced.strategy, unforced.activation_checkpointing, unforced.data_parallel) == (None, None, None)
    out = " ".join(capsys.readouterr().out.split())
    assert ("fsdp (4 FSDP shards), full activation checkpointing, 2 micro-batches accumulated, reshard after "
            "forward") in out
    assert "checkpointing" in out.split("estimate:")[0]  # the stage table's column
    assert ("without --strategy fsdp --data-parallel fsdp --activation-checkpointing full the planner picks this "
            "same plan") in out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["data_parallel"] == "fsdp" and doc["stages"][0]["activation_checkpointing"] == "full"


def test_export_says_the_levers(fsdp_planner, tmp_path, capsys):
    assert main(["export", "gpt2-tiny", "--devices", "4xcpu:64MB", "--batch-size", "8", "--out", str(tmp_path),
                 "--data-parallel", "fsdp", "--activation-checkpointing", "full"]) == 0
    assert fsdp_planner[1][0].data_parallel == "fsdp"
    assert "exported fsdp plan (4 FSDP shards, full activation checkpointing, 2 micro-batches accumulated" in \
        capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--activation-checkpointing", "some"], ["--data-parallel", "zero3"],
                                  ["--strategy", "tensor"]])
@pytest.mark.parametrize("command", ["plan", "compare", "export"])
def test_bad_lever_values_exit_2(command, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "mlp", "--devices", "2xcpu:1GB", *(["--out", "x"] if command == "export" else []), *argv])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--strategy", "ddp", "--data-parallel", "fsdp"], "--data-parallel fsdp with --strategy ddp"),
    (["--strategy", "pipeline", "--data-parallel", "ddp"], "pipeline plans have no data-parallel group"),
    (["--inference", "--activation-checkpointing", "full"], "--activation-checkpointing full with --inference"),
])
def test_contradicting_levers_are_bad_usage(argv, words, capsys):
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", *argv]) == 2
    assert words in " ".join(capsys.readouterr().err.split())


def test_compare_rows_carry_the_levers(capsys):
    assert main(["compare", "gpt2-tiny", "--devices", "4xcpu:64MB", "--batch-size", "8", "--partitioners", "metis",
                 "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row in rows:
        assert row["activation_checkpointing"] in ("none", "selective", "full") or "/" in row["activation_checkpointing"]
        assert row["data_parallel"] in (None, "ddp", "fsdp")
        assert (row["data_parallel"] is None) == (row["strategy"] in ("single", "pipeline"))


def test_simulate_names_an_fsdp_plan_as_fsdp(tmp_path, capsys):
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:64MB", "--batch-size", "8", "--strategy", "ddp",
                 "--json", str(tmp_path / "ddp.json")]) == 0
    ddp = Plan.from_json((tmp_path / "ddp.json").read_text())
    fsdp = dataclasses.replace(ddp, strategy="fsdp", data_parallel="fsdp")
    (tmp_path / "fsdp.json").write_text(fsdp.to_json())
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "fsdp.json"), "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "fsdp (4 FSDP shards, no pipeline schedule), 2 micro-batches one after another" in out
    assert "each device: busy" in out
