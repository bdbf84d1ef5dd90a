"""Calibration on the CPU: stages run for real, predictions compared, report written."""

from __future__ import annotations

import json
import time

import pytest
import torch

import fxshard
from fxshard.calibrate import calibrate, kendall_tau
from fxshard.capture import capture
from fxshard.cli import main
from fxshard.errors import CostModelError, ExecutionError
from fxshard.zoo import build


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    z = build("gpt2-tiny", batch_size=8)
    plan = fxshard.plan(z.model, "4xcpu:3MB", z.example_inputs, strategy="pipeline", schedule="1f1b")
    return plan, calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs, repeats=3, warmup=1)


def test_every_stage_is_measured_and_predicted(report):
    """Structure, and positivity of what is positive by construction (no timing comparisons:
    the machine may be loaded): every median_time sample runs until the clock has moved, and
    forward and backward are timed separately, never one as a difference of two timings."""
    plan, rep = report
    assert [s.index for s in rep.stages] == list(range(plan.num_stages)) and rep.whole.index == -1
    for stage in (*rep.stages, rep.whole):
        assert stage.measured_fwd_s > 0 and stage.measured_bwd_s > 0  # every gpt2 stage holds weights
        assert stage.analytical_s > 0 and stage.profiled_s > 0
        # CUDA's allocator and, on the CPU, the resident set's high-water mark give a peak.
        if rep.memory:
            assert stage.measured_peak_bytes is not None and stage.measured_peak_bytes > 0
        assert stage.measured_saved_bytes > 0 and stage.predicted_activation_bytes > 0
    assert all(s.predicted_peak_bytes > 0 for s in rep.stages)
    assert rep.microbatch_fraction == pytest.approx(1 / plan.microbatches)


class _CoarseClock:
    """A stand-in for the ``time`` module whose clock ticks once per 63 reads, 1 ms a tick: any
    call between two adjacent reads looks like it took 0 s, as on a clock coarser than the call.
    (63, not 64: a training step reads the clock 4 times, and a period that is a multiple of 4
    would put every tick between two steps, never inside a forward or a backward.)"""

    get_clock_info = staticmethod(time.get_clock_info)
    thread_time = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return (self.reads // 63) * 1e-3


def test_median_time_is_never_zero_on_a_coarse_clock(monkeypatch):
    from fxshard.cost_models import timing

    clock = _CoarseClock()
    monkeypatch.setattr(timing, "time", clock)
    calls = []
    seconds = timing.median_time(lambda: calls.append(1), torch.device("cpu"), warmup=0, repeats=5)
    assert seconds > 0
    # Several calls shared each tick; the time per call is the tick over the calls in it.
    assert seconds < 1e-3 and len(calls) > 5


def test_stage_measurements_are_never_zero_on_a_coarse_clock(monkeypatch):
    """The flaky failure: backward was (forward+backward) - forward, 0.0 whenever the two
    medians came out equal or inverted; a coarse clock makes that happen every time."""
    from fxshard.calibrate import _measure_module
    from fxshard.cost_models import timing

    monkeypatch.setattr(timing, "time", _CoarseClock())
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    run = _measure_module(module, [torch.randn(4, 8)], torch.device("cpu"), warmup=1, repeats=3)
    assert run.times.fwd_s > 0 and run.times.bwd_s > 0
    assert run.outputs[0].shape == (4, 8) and not run.outputs[0].requires_grad
    assert all(p.grad is None for p in module.parameters())  # measuring leaves no gradients behind


def test_a_frozen_clock_is_an_error_not_a_hang(monkeypatch):
    from fxshard.cost_models import timing

    frozen = _CoarseClock()
    frozen.perf_counter = lambda: 0.0
    monkeypatch.setattr(timing, "time", frozen)
    monkeypatch.setattr(timing, "_MAX_CALLS_PER_SAMPLE", 1000)
    with pytest.raises(CostModelError, match="did not move in 1,0"):
        timing.median_time(lambda: None, torch.device("cpu"), warmup=0, repeats=1)


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
    with pytest.raises(CostModelError, match="lengths 1 and 1"):
        kendall_tau([1], [1])


def test_meta_models_cannot_be_calibrated():
    z = build("llama-tiny", device="meta", batch_size=2, seq_len=8)
    plan = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", schedule="gpipe")
    with pytest.raises(ExecutionError, match="meta"):
        calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs)


def test_calibrate_command(tmp_path, capsys):
    assert main(["calibrate", "mlp", "--devices", "2xcpu:1GB", "--batch-size", "8", "--strategy", "pipeline",
                 "--no-profiled", "--repeats", "2", "--threads", "1", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["stages"]) >= 2 and doc["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert doc["threads"] == 1


def test_fitted_factors_lower_the_error_on_the_measured_kernels(report):
    _, rep = report
    assert rep.fit is not None and rep.fit.samples >= 3
    assert rep.fit.error_after <= rep.fit.error_before  # by construction: the current factors are a candidate
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


def test_the_report_keeps_each_nodes_isolated_time_for_the_fit(report):
    _, rep = report
    assert rep.threads >= 1 and rep.checkpointing == "none"
    assert len(rep.kernels) >= rep.fit.samples // 2
    row = rep.kernels[0]
    assert {"name", "op", "fwd_flops", "fwd_bytes", "fwd_s", "bwd_s"} <= set(row)
    assert all(s.profiled_fwd_s > 0 and s.analytical_fwd_s > 0 for s in rep.stages)
    assert json.loads(rep.to_json())["kernels"][0]["name"] == row["name"]


def test_stages_run_and_are_priced_under_activation_checkpointing():
    torch.manual_seed(0)
    z = build("gpt2-tiny", batch_size=4)
    plan = fxshard.plan(z.model, "2xcpu:3MB", z.example_inputs, strategy="pipeline", schedule="gpipe")
    captured = capture(z.model, z.example_inputs)
    plain = calibrate(captured, plan, z.example_inputs, repeats=1, warmup=0, profiled=False)
    full = calibrate(captured, plan, z.example_inputs, repeats=1, warmup=0, profiled=False, checkpointing="full")
    assert full.checkpointing == "full" and "activation checkpointing full" in full.to_markdown()
    # A stage holding a whole block recomputes its forward in backward: priced dearer, same forward.
    assert any(f.analytical_s > p.analytical_s for f, p in zip(full.stages, plain.stages))
    assert [f.analytical_fwd_s for f in full.stages] == [p.analytical_fwd_s for p in plain.stages]
    assert all(s.measured_bwd_s > 0 for s in full.stages)
    selective = calibrate(captured, plan, z.example_inputs, repeats=1, warmup=0, profiled=False,
                          checkpointing="selective")  # one backward per forward: timed after fresh forwards
    assert all(s.measured_bwd_s > 0 for s in selective.stages)
    with pytest.raises(ExecutionError, match="checkpointing='most'"):
        calibrate(captured, plan, z.example_inputs, checkpointing="most")


@pytest.mark.slow  # about 4 s alone, 11 s on a loaded 2-core machine
def test_gpu_calibration_script_quick_path(tmp_path):
    """The GPU run's script, on one tiny model and the selective-checkpointing variant (whose
    backward needs a fresh forward each time), its budget spent before the overhead step (a budget
    of 0 s: the first variant always runs, and the overhead is skipped however fast the machine)."""
    from tests.benchmark_scripts import load

    script = load("gpu_calibration")
    assert script.main(["--out", str(tmp_path), "--quick", "--models", "gpt2-medium", "--variants", "selective",
                        "--repeats", "1", "--budget-s", "0"]) == 0
    doc = json.loads((tmp_path / "summary.json").read_text())
    result = doc["models"]["gpt2-medium"]
    assert result["plan"]["stages"] == 4
    variant = result["variants"]["selective"]
    assert "error" not in variant, variant.get("error")
    assert variant["checkpointing"] == "selective" and len(variant["stage_rows"]) == 5
    assert all(r["measured_bwd_s"] > 0 for r in variant["stage_rows"])
    assert "skipped" in result["overhead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-medium.png", "summary.json", "summary.md"]
    assert doc["environment"]["torch"] == torch.__version__ and doc["log"][-1].endswith("s")  # no separate env/log files
    assert all("plan_peak_bytes" in r for r in variant["stage_rows"])


def test_cpu_step_memory_and_saved_activations_of_an_mlp():
    """On the CPU the step peak is measured (resident-set high-water mark) and holds at least
    the weights; autograd's saved bytes are what can be counted by hand: each Linear saves its
    input, each Tanh its output (the next Linear's input, the same tensor), parameters excluded."""
    from fxshard.calibrate import _cpu_step_peaks, _measure_module
    from fxshard.cost_models.host_memory import ResidentPeak

    torch.manual_seed(0)
    width, batch, layers = 256, 64, 3
    module = torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.Tanh())])
    x = torch.randn(batch, width)
    run = _measure_module(module, [x], torch.device("cpu"), warmup=1, repeats=2)
    activation = batch * width * 4
    # Saved: the input, then each Tanh's output (the last one too: Tanh's backward needs it).
    assert run.saved_bytes == activation * (layers + 1)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    peaks = _cpu_step_peaks([(module, [x])])
    assert (peaks is None) == (not ResidentPeak.available())
    if peaks is not None:
        assert peaks[0] >= weights
    assert all(p.grad is None for p in module.parameters())


def test_saved_bytes_match_the_predicted_activations():
    """The measured saved bytes of each stage equal the analysis' activation bytes (within 5%)
    on an MLP whose tensors are all above the pinned mmap threshold, and so is the peak (25%)."""
    torch.manual_seed(0)
    z = build("mlp", batch_size=64)
    plan = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline", schedule="gpipe",
                        microbatches=2)
    rep = calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs, repeats=1, warmup=1,
                    profiled=False, threads=1)
    assert rep.threads == 1 and "1 thread(s)" in rep.to_markdown()
    for s in (*rep.stages, rep.whole):
        assert s.measured_saved_bytes == pytest.approx(s.predicted_activation_bytes, rel=0.05)
        if rep.memory:
            assert s.measured_peak_bytes == pytest.approx(s.predicted_peak_bytes, rel=0.25)
    doc = json.loads(rep.to_json())
    assert doc["stages"][0]["measured_saved_bytes"] > 0 and doc["threads"] == 1


def test_threads_are_set_for_the_measurement_and_restored():
    before = torch.get_num_threads()
    z = build("mlp", batch_size=8)
    plan = fxshard.plan(z.model, "2xcpu:1GB", z.example_inputs, strategy="pipeline")
    rep = calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs, repeats=1, warmup=0,
                    profiled=False, threads=1)
    assert rep.threads == 1 and torch.get_num_threads() == before
    with pytest.raises(ExecutionError, match="threads=0"):
        calibrate(capture(z.model, z.example_inputs), plan, z.example_inputs, threads=0)
