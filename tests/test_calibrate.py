"""Calibration on the CPU: stages run for real, predictions compared, report written."""

from __future__ import annotations

import json

import pytest
import torch

import fxshard
from fxshard.calibrate import calibrate, kendall_tau
from fxshard.capture import capture
from fxshard.cli import main
from fxshard.errors import ExecutionError
from fxshard.zoo import build


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    z = build("gpt2-tiny", batch_size=8)
    plan = fxshard.plan(z.model, "4xcpu:3MB", z.example_inputs, strategy="pipeline", schedule="1f1b")
    return plan, calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs, repeats=3, warmup=1)


def test_every_stage_is_measured_and_predicted(report):
    plan, rep = report
    assert len(rep.stages) == plan.num_stages
    for stage in rep.stages:
        assert stage.measured_fwd_s > 0 and stage.measured_bwd_s > 0
        assert stage.analytical_s > 0 and stage.profiled_s > 0
        assert stage.measured_peak_bytes is None  # the CPU reports no peak; CUDA does
    assert rep.whole.measured_s > 0
    assert rep.microbatch_fraction == pytest.approx(1 / plan.microbatches)


def test_report_forms(report, tmp_path):
    _, rep = report
    doc = json.loads(rep.to_json())
    assert {"stages", "whole", "median_abs_error_analytical", "kendall_tau_profiled"} <= set(doc)
    text = rep.to_markdown()
    assert "whole model" in text and "Kendall tau" in text
    from fxshard.viz import calibration_png
    import matplotlib.image

    calibration_png(rep, tmp_path / "c.png")
    assert matplotlib.image.imread(tmp_path / "c.png").shape[0] > 200


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    with pytest.raises(ValueError):
        kendall_tau([1], [1])


def test_meta_models_cannot_be_calibrated():
    z = build("llama-tiny", device="meta", batch_size=2, seq_len=8)
    plan = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", schedule="gpipe")
    with pytest.raises(ExecutionError, match="meta"):
        calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs)


def test_calibrate_command(tmp_path, capsys):
    assert main(["calibrate", "mlp", "--devices", "2xcpu:1GB", "--batch-size", "8", "--strategy", "pipeline",
                 "--no-profiled", "--repeats", "2", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["stages"]) >= 2 and doc["device"] == "cpu"


def test_fitted_factors_lower_the_error_on_the_measured_kernels(report):
    _, rep = report
    assert rep.fit is not None and rep.fit.samples >= 3
    assert rep.fit.error_after <= rep.fit.error_before
    assert 0 < rep.fit.factors.matmul_eff <= 1 and 0 < rep.fit.factors.memory_eff <= 1
    assert "fitted" in rep.to_markdown()


def test_fit_recovers_known_factors():
    from fxshard.cluster import get_preset
    from fxshard.cost_models import AnalyticalCostModel, RooflineFactors, analyze
    from fxshard.cost_models.analytical import fit_factors

    z = build("gpt2-tiny", batch_size=8)
    captured = capture(z.model, z.example_inputs)
    works = analyze(captured)
    truth = RooflineFactors(matmul_eff=0.4, memory_eff=0.6, launch_overhead_s=1e-5)
    times = AnalyticalCostModel(truth).node_times(captured, works, get_preset("A100-80GB"))
    fit = fit_factors(works, times, get_preset("A100-80GB"))
    assert fit.error_after < 0.05
    assert fit.factors.launch_overhead_s == pytest.approx(1e-5, rel=0.3)
