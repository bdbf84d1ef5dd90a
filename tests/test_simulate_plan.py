"""Re-simulating a saved plan from its own figures, and what-ifs on it.

The key check is that :func:`simulate_plan` without overrides repeats the planner's own
simulation (the plan keeps every figure the planner timed with), for each strategy."""

from __future__ import annotations

import pytest

import fxshard
from fxshard.plan import Plan
from fxshard.simulate import SimulationError
from fxshard.simulate_plan import simulate_plan


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
    ("2xcpu:4MB", {"strategy": "pipeline", "schedule": "zbv"}),
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
    # Batch-linear scaling: each rank does the same total compute, in more pieces, plus one more
    # gradient accumulation per extra micro-batch.
    extra = 8 - pipe.microbatches
    added = [sum(s.accumulate_time_s for s in pipe.stages if s.device_indices[0] == d) * extra
             for d in sorted({s.device_indices[0] for s in pipe.stages})]
    assert all(a > 0 for a in added)
    assert more.busy_s == pytest.approx([b + a for b, a in zip(base.busy_s, added)], rel=1e-9)


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
    # Gradient accumulation: the same compute in 4 pieces, plus 3 accumulations into the gradients.
    accumulate = single.stages[0].accumulate_time_s
    assert accumulate > 0
    assert simulate_plan(single, microbatches=4).busy_s == pytest.approx(
        (simulate_plan(single).busy_s[0] + (4 - single.microbatches) * accumulate,), rel=1e-9)
    # A single or ddp plan has no pipeline to schedule: a schedule what-if is refused, saying so
    # (it used to simulate one stage and call it by the schedule's name).
    for schedule in ("interleaved1f1b", "1f1b", "gpipe"):
        with pytest.raises(SimulationError, match=r"single plan.*no pipeline to schedule.*strategy='pipeline'"):
            simulate_plan(single, schedule=schedule)
    with pytest.raises(SimulationError, match="unknown schedule 'pipedream'"):
        simulate_plan(single, schedule="pipedream")
