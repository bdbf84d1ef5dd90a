"""Fitted roofline factors saved to a file and used when planning (calibrate once, plan many times)."""

from __future__ import annotations

import json

import pytest
import torch

import fxshard
from fxshard.calibrate import CalibrationReport, StageMeasurement, fitted_factors, save_factors
from fxshard.cli import main
from fxshard.cost_models import FittedFactors, RooflineFactors, factors_for
from fxshard.cost_models.analytical import FactorFit
from fxshard.devices import PRESETS
from fxshard.errors import CostModelError, PlanError
from fxshard.plan import Plan
from fxshard.plan_options import PlanOptions


def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)]), torch.randn(32, 256)


def _halved(preset: str) -> FittedFactors:
    d = factors_for(PRESETS[preset])
    return FittedFactors(factors={preset: RooflineFactors(matmul_eff=d.matmul_eff / 2, memory_eff=d.memory_eff,
                                                          launch_overhead_s=d.launch_overhead_s)},
                         provenance={preset: {"model": "test"}})


def _report(fit: FactorFit | None) -> CalibrationReport:
    stage = StageMeasurement(index=-1, measured_fwd_s=1e-3, measured_bwd_s=2e-3, analytical_s=1e-3, profiled_s=None,
                             measured_peak_bytes=None, predicted_peak_bytes=None)
    return CalibrationReport(model="mlp", device="cpu", device_spec="cpu", microbatch_fraction=1.0, stages=(stage,),
                             whole=stage, fit=fit, threads=2)


def test_round_trip(tmp_path):
    fitted = _halved("H100-80GB").merged(_halved("cpu"))
    path = tmp_path / "factors.json"
    fitted.save(path)
    loaded = FittedFactors.load(path)
    assert loaded.factors == fitted.factors and loaded.provenance == fitted.provenance
    assert loaded.source == str(path) and list(loaded.factors) == ["H100-80GB", "cpu"]
    data = json.loads(path.read_text())
    assert data["fxshard_factors"] == 1 and data["devices"]["cpu"]["provenance"] == {"model": "test"}


def test_save_from_a_calibration_report(tmp_path):
    fit = FactorFit(factors=RooflineFactors(matmul_eff=0.1, memory_eff=0.2, launch_overhead_s=1e-5), samples=30,
                    error_before=2.0, error_after=0.5)
    path = tmp_path / "f.json"
    _halved("H100-80GB").save(path)
    written = save_factors(_report(fit), path)  # merges: the H100 entry stays, cpu is added
    loaded = FittedFactors.load(path)
    assert set(loaded.factors) == {"H100-80GB", "cpu"} and loaded.factors == written.factors
    assert loaded.factors["cpu"] == fit.factors
    prov = loaded.provenance["cpu"]
    assert prov["model"] == "mlp" and prov["kernels"] == 30 and prov["torch"] == torch.__version__
    assert prov["median_log_error_before"] == 2.0 and prov["median_log_error_after"] == 0.5 and prov["date"]
    with pytest.raises(CostModelError, match="fitted no roofline factors"):
        fitted_factors(_report(None))


def test_halved_matmul_eff_predicts_slower_steps_on_its_preset_only(tmp_path):
    model, x = _mlp()
    path = tmp_path / "h100.json"
    _halved("H100-80GB").save(path)
    opts = {"strategy": "pipeline", "schedule": "gpipe", "microbatches": 2}
    base = fxshard.plan(model, "2xH100-80GB", (x,), **opts)
    fitted = fxshard.plan(model, "2xH100-80GB", (x,), factors=str(path), **opts)
    assert fitted.estimate.step_time_s > base.estimate.step_time_s
    assert str(path) in fitted.reason and "H100-80GB (matmul_eff=0.35" in fitted.reason
    assert "fitted" not in base.reason
    # the saved plan says how it was priced, and still loads
    assert Plan.from_json(fitted.to_json()).reason == fitted.reason
    other = fxshard.plan(model, "2xA100-80GB", (x,), **opts)
    other_fitted = fxshard.plan(model, "2xA100-80GB", (x,), factors=str(path), **opts)
    assert other_fitted.estimate.step_time_s == other.estimate.step_time_s
    assert "A100-80GB kept datasheet factors" in other_fitted.reason


def test_compile_takes_factors():
    model, x = _mlp()
    compiled = fxshard.compile(model, ["cpu"], (x,), factors=_halved("cpu"))
    assert "priced with fitted roofline factors for cpu" in compiled.plan.reason
    assert compiled(x).shape == (32, 256)


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _entry(**changes) -> dict:
    return {"matmul_eff": 0.5, "memory_eff": 0.5, "launch_overhead_s": 1e-6, **changes}


@pytest.mark.parametrize("data, match", [
    ("{not json", "is not JSON"),
    ({"devices": {}}, "not an fxshard factors file"),
    ({"fxshard_factors": 7, "devices": {"cpu": _entry()}}, "version 7"),
    ({"fxshard_factors": 1, "devices": {}}, "names no device"),
    ({"fxshard_factors": 1, "devices": {"cpu": _entry(matmul_eff=1.5)}}, r"matmul_eff=1.5 must be a number in \(0, 1\]"),
    ({"fxshard_factors": 1, "devices": {"cpu": _entry(launch_overhead_s=-1)}}, "launch_overhead_s=-1"),
    ({"fxshard_factors": 1, "devices": {"cpu": {"matmul_eff": 0.5}}}, "lacks memory_eff, launch_overhead_s"),
    ({"fxshard_factors": 1, "devices": {"H100-80G": _entry()}}, "unknown device preset 'H100-80G'.*'H100-80GB'"),
    ({"fxshard_factors": 1, "devices": {"cpu": _entry(provenance="mlp")}}, "'provenance' must be an object"),
    ({"fxshard_factors": 1, "devices": ["cpu"]}, "'devices'.* must map preset names"),
])
def test_bad_files_name_the_file_and_the_fix(tmp_path, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(CostModelError, match=match) as e:
        PlanOptions(factors=path)
    assert path in str(e.value)


def test_missing_file_and_wrong_cost_model(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(CostModelError, match="cannot read the factors file .*--save-factors"):
        PlanOptions(factors=missing)
    with pytest.raises(CostModelError, match="factors=42"):
        PlanOptions(factors=42)
    path = tmp_path / "ok.json"
    _halved("cpu").save(path)
    with pytest.raises(PlanError, match="cost_model='profiled' prices its own way"):
        PlanOptions(factors=str(path), cost_model="profiled")


def test_calibrate_save_factors_then_plan_with_them(tmp_path, capsys):
    factors, plan_json = tmp_path / "cpu.json", tmp_path / "plan.json"
    assert main(["calibrate", "mlp", "--devices", "2xcpu:1GB", "--batch-size", "8", "--strategy", "pipeline",
                 "--repeats", "1", "--save-factors", str(factors)]) == 0
    assert "fitted factors of cpu" in capsys.readouterr().out
    loaded = FittedFactors.load(factors)
    assert list(loaded.factors) == ["cpu"] and loaded.provenance["cpu"]["model"] == "mlp"
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--batch-size", "8", "--factors", str(factors),
                 "--json", str(plan_json)]) == 0
    assert f"priced with fitted roofline factors from {factors} for cpu" in json.loads(plan_json.read_text())["reason"]
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--factors", str(tmp_path / "none.json")]) == 2
    assert "cannot read the factors file" in capsys.readouterr().err
    assert main(["plan", "mlp", "--devices", "2xcpu:1GB", "--factors", str(factors), "--cost-model", "profiled"]) == 2
    assert "--cost-model profiled prices its own way" in capsys.readouterr().err
