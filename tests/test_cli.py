"""The fxshard command line, in-process and through the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fxshard.cli import main


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


@pytest.mark.parametrize("command", [[], ["devices"], ["inspect"]])
def test_help_through_the_entry_point(command):
    result = subprocess.run([sys.executable, "-m", "fxshard.cli", *command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "usage: fxshard" in result.stdout


def test_console_script_runs_inspect():
    result = subprocess.run(["fxshard", "inspect", "llama-tiny", "--json", "-"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["name"] == "llama-tiny"


def test_plan_json_round_trips_and_prints_a_table(tmp_path, capsys):
    from fxshard.plan import Plan

    dest = tmp_path / "plan.json"
    assert main(["plan", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8", "--json", str(dest)]) == 0
    out = capsys.readouterr().out
    plan = Plan.from_json(dest.read_text())
    assert plan.strategy in ("pipeline", "hybrid")
    assert "alternatives considered" in out and "why:" in out and "samples/s" in out
    for stage in plan.stages:
        assert f"{stage.index}" in out


def test_plan_json_to_stdout_is_pure_json(capsys):
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--batch-size", "4", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fxshard_plan"] == 1 and doc["strategy"] in ("single", "ddp", "pipeline", "hybrid")


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
    assert "stages=3 needs at least 3 devices" in capsys.readouterr().err


def test_compare_rows_have_the_spec_fields(capsys):
    assert main(["compare", "gpt2-tiny", "--devices", "4xcpu:3MB", "--batch-size", "8",
                 "--partitioners", "metis,uniform", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["partitioner"] for r in rows] == ["metis", "uniform"]
    for row in rows:
        for key in ("partitioner", "step_time_s", "bottleneck_stage_time_s", "lower_bound_step_time_s",
                    "cut_bytes", "max_stage_memory_bytes", "plan_seconds"):
            assert key in row
    assert sum(r["best"] for r in rows) == 1


def test_compare_unknown_partitioner_is_an_error(capsys):
    assert main(["compare", "mlp", "--devices", "2xcpu:1GB", "--partitioners", "metis,nope"]) == 1
    assert "nope" in capsys.readouterr().err


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
    assert main(["simulate", str(plan_file), "--schedule", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "absent.json")]) == 2
    assert "fxshard plan" in capsys.readouterr().err


def test_export_through_the_console_script(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(["fxshard", "export", "gpt2-tiny", "--devices", "2xcpu:1GB", "--batch-size", "4",
                             "--strategy", "pipeline", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("plan.json", "launch.sh", "train.py", "split_spec.json", "stages.json", "stage_0.py", "stage_1.py"):
        assert (out / name).exists(), name
    json.loads((out / "split_spec.json").read_text())
