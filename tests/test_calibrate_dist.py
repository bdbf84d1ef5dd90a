"""Whole-plan calibration under torchrun (fxshard/calibrate_dist.py): structure and invariants, not speed."""

from __future__ import annotations

import pytest

import fxshard
from fxshard import zoo
from fxshard.calibrate_dist import PlanRun, run_plan
from fxshard.errors import ExecutionError

MODEL, BATCH = "gpt2-tiny", 4


@pytest.fixture(scope="module")
def plan():
    zm = zoo.resolve(MODEL, batch_size=BATCH)
    return fxshard.plan(zm.model, "2xcpu:1GB", zm.example_inputs, strategy="pipeline", schedule="1f1b",
                        microbatches=2)


@pytest.fixture(scope="module")
def run(plan) -> PlanRun:
    return run_plan(MODEL, plan, steps=2, warmup=1, timeout_s=180)


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
        assert len(r.steps_s) == 2
    # the step is the slowest rank's
    assert run.steps_s == tuple(max(a, b) for a, b in zip(run.ranks[0].steps_s, run.ranks[1].steps_s))


def test_plan_run_round_trips_through_dict(run):
    assert PlanRun.from_dict(run.to_dict()) == run


def test_a_failing_rank_is_reported_with_its_error(plan):
    with pytest.raises(ExecutionError, match="no_such_module_for_fxshard"):
        run_plan("no_such_module_for_fxshard:factory", plan, steps=1, warmup=1, timeout_s=120)


def test_bad_arguments_are_refused_before_launching(plan):
    with pytest.raises(ExecutionError, match="warmup=0"):
        run_plan(MODEL, plan, warmup=0)
