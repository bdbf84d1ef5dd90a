"""Whole-plan calibration under torchrun (fxshard/calibrate_dist.py): structure and invariants, not speed."""

from __future__ import annotations

import json
import math

import pytest

import fxshard
from fxshard import zoo
from fxshard.calibrate_dist import (
    DistCalibrationReport,
    PlanRun,
    capture_model,
    compare_run,
    reprice,
    run_loss,
    run_objective,
    run_plan,
)
from fxshard.capture import capture
from fxshard.cost_models import ProfiledCostModel
from fxshard.errors import ExecutionError
from fxshard.plan import Plan

MODEL, BATCH = "gpt2-tiny", 4


@pytest.fixture(scope="module")
def plan():
    zm = zoo.resolve(MODEL, batch_size=BATCH)
    loss_fn, target = run_objective(capture(zm.model, zm.example_inputs))  # what the ranks train with, priced
    return fxshard.plan(zm.model, "2xcpu:1GB", zm.example_inputs, strategy="pipeline", schedule="1f1b",
                        microbatches=2, loss_fn=loss_fn, example_target=target)


@pytest.fixture(scope="module")
def run(plan) -> PlanRun:
    return run_plan(MODEL, plan, steps=2, warmup=1, timeout_s=180, profile_in_ranks=True)


def test_every_stage_and_rank_is_measured(plan, run):
    assert run.world == 2 and len(run.steps_s) == 2 and run.step_s > 0
    assert [s.index for s in run.stages] == [0, 1]
    for s in run.stages:
        assert s.rank == plan.stages[s.index].device_indices[0]
        assert s.fwd_s > 0 and s.bwd_s > 0 and s.fwd_cpu_s > 0 and s.bwd_cpu_s > 0
        # two micro-batches of the same shapes save the same activations
        assert len(s.saved_bytes_per_microbatch) == plan.microbatches
        assert s.saved_bytes > 0 and len(set(s.saved_bytes_per_microbatch)) == 1
    assert [r.rank for r in run.ranks] == [0, 1]
    for r in run.ranks:
        assert r.stages == (r.rank,)
        assert r.param_bytes == plan.stages[r.rank].param_bytes
        # the weights are materialised after the baseline: the peak holds at least them
        assert r.peak_bytes >= r.param_bytes > 0
        assert len(r.steps_s) == len(r.steps_cpu_s) == 2 and min(r.steps_cpu_s) > 0
        assert r.optimizer_cpu_s > 0  # each rank's Adam step, timed apart from the pipeline
        assert r.code_bytes >= 0
        # a CPU rank keeps freed memory in its heap while it trains; what it held then covers its weights
        assert r.heap_retained and r.resident_bytes >= r.param_bytes
    # the step is the slowest rank's
    assert run.steps_s == tuple(max(a, b) for a, b in zip(run.ranks[0].steps_s, run.ranks[1].steps_s))


def test_every_rank_profiles_the_whole_plan_after_its_steps(plan, run):
    for r in run.ranks:
        priced = Plan.from_json(r.profile)
        assert [s.nodes for s in priced.stages] == [s.nodes for s in plan.stages]  # the plan's own split
        assert all(s.fwd_time_s > 0 and s.bwd_time_s > 0 for s in priced.stages)
        assert priced.stages[0].fwd_time_s != plan.stages[0].fwd_time_s  # measured, not the analytical plan's


def test_plan_run_round_trips_through_dict(run):
    assert PlanRun.from_dict(run.to_dict()) == run


def test_a_failing_rank_is_reported_with_its_error(plan):
    with pytest.raises(ExecutionError, match="no_such_module_for_fxshard"):
        run_plan("no_such_module_for_fxshard:factory", plan, steps=1, warmup=1, timeout_s=120)


def test_bad_arguments_are_refused_before_launching(plan):
    with pytest.raises(ExecutionError, match="warmup=0"):
        run_plan(MODEL, plan, warmup=0)


@pytest.fixture(scope="module")
def captured(plan):
    return capture_model(MODEL, plan)


@pytest.fixture(scope="module")
def report(run, captured) -> DistCalibrationReport:
    return compare_run(run, captured, model=MODEL)


def test_the_report_holds_each_stage_against_its_own_ranks_profile(plan, run, report, captured):
    assert report.profile_where == "ranks" and report.profile_spread >= 0
    for s in report.stages:
        own = Plan.from_json(run.ranks[s.rank].profile).stages[s.index]
        assert s.profiled_fwd_s == own.fwd_time_s
    here = compare_run(run, captured, model=MODEL, where="here")
    assert here.profile_where == "here" and here.profile_spread is None and here.profiled_step_s > 0
    assert "own rank right after its timed steps" in report.to_markdown()


def test_an_unknown_profile_place_is_refused(run, captured):
    with pytest.raises(ExecutionError, match="where='there'.*'ranks'.*'here'"):
        compare_run(run, captured, where="there")


def test_the_report_has_every_row(plan, run, report):
    assert [s.index for s in report.stages] == [0, 1] and [r.rank for r in report.ranks] == [0, 1]
    for s, m in zip(report.stages, run.stages):
        assert s.measured_s == m.fwd_s + m.bwd_s
        assert s.analytical_fwd_s == plan.stages[s.index].fwd_time_s  # the plan was priced analytically
        assert s.profiled_fwd_s > 0 and s.profiled_bwd_s > 0
        # autograd's saved bytes are what the planner counts as a micro-batch's activations
        assert s.saved_bytes == pytest.approx(s.predicted_activation_bytes, rel=0.1)
    for r in report.ranks:
        assert r.predicted_peak_bytes == plan.stages[r.rank].peak_memory_bytes
    assert report.analytical_step_s == pytest.approx(plan.estimate.step_time_s)
    assert len(report.errors("analytical")) == len(report.errors("profiled")) == 2
    assert report.tau("profiled") in (-1.0, 0.0, 1.0)
    assert len(report.memory_errors()) == 2 and report.step_error("profiled") is not None
    assert report.profile_clock == "cpu"  # one thread per rank: the profiled model times thread CPU time
    assert len(report.errors("profiled", "cpu")) == 2 and report.simulated_measured_step_s > 0
    text = report.to_markdown()
    assert "| 0 | 0 |" in text and "whole step" in text and "median |error|" in text


def test_the_report_round_trips_through_json(report):
    back = DistCalibrationReport.from_dict(json.loads(report.to_json()))
    assert back == report
    assert back.to_dict()["median_abs_error_profiled"] == report.median_abs_error("profiled")


def test_reprice_with_the_plans_own_cost_model_returns_its_figures(plan, captured):
    loss = run_loss(captured)
    assert loss.captured is not None
    same = reprice(captured, plan, "analytical", loss=loss)
    for a, b in zip(plan.stages, same.stages):
        for field in ("fwd_time_s", "bwd_time_s", "peak_memory_bytes", "send_bytes", "param_bytes", "flops"):
            assert math.isclose(getattr(a, field), getattr(b, field), rel_tol=1e-9), field
        assert (a.nodes, a.device_indices) == (b.nodes, b.device_indices)
    assert math.isclose(same.estimate.step_time_s, plan.estimate.step_time_s, rel_tol=1e-9)


def test_reprice_with_another_cost_model_changes_the_times_not_the_split(plan, captured):
    other = reprice(captured, plan, ProfiledCostModel(device="cpu", threads=1, batch_fraction=1 / plan.microbatches),
                    loss=run_loss(captured))
    assert [s.nodes for s in other.stages] == [s.nodes for s in plan.stages]
    assert [s.fwd_time_s for s in other.stages] != [s.fwd_time_s for s in plan.stages]
    assert other.estimate.step_time_s != plan.estimate.step_time_s
    assert [s.peak_memory_bytes for s in other.stages] == pytest.approx([s.peak_memory_bytes for s in plan.stages])


def test_a_plan_for_another_batch_is_refused(plan):
    with pytest.raises(ExecutionError, match="fingerprint"):
        capture_model(MODEL, plan, batch_size=BATCH * 2)


def test_cli_refuses_ranks_that_are_not_the_plans_devices(capsys):
    from fxshard.cli import main

    assert main(["calibrate", MODEL, "--devices", "2xcpu:1GB", "--batch-size", str(BATCH), "--strategy", "pipeline",
                 "--ranks", "3"]) == 2
    err = capsys.readouterr().err
    assert "--ranks 3" in err and "2 device(s)" in err and "--ranks 2" in err


def test_cli_refuses_profile_in_ranks_without_ranks(capsys):
    from fxshard.cli import main

    args = ["calibrate", MODEL, "--devices", "2xcpu:1GB", "--batch-size", str(BATCH), "--strategy", "pipeline",
            "--profile-in-ranks"]
    assert main(args) == 2
    assert "--profile-in-ranks" in (err := capsys.readouterr().err) and "add --ranks N" in err
    assert main([*args, "--ranks", "2", "--no-profiled"]) == 2
    assert "drop --no-profiled" in capsys.readouterr().err


def test_cli_refuses_in_process_options_with_ranks(capsys):
    from fxshard.cli import main

    assert main(["calibrate", MODEL, "--devices", "2xcpu:1GB", "--batch-size", str(BATCH), "--strategy", "pipeline",
                 "--ranks", "2", "--png", "x.png"]) == 2
    assert "--png" in capsys.readouterr().err
