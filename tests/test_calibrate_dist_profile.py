"""Each stage priced by the profile of the rank that ran it (fxshard/calibrate_dist_profile.py)."""

from __future__ import annotations

import dataclasses

import pytest

import fxshard
from fxshard import zoo
from fxshard.calibrate_dist import RankRun
from fxshard.calibrate_dist_profile import profile_spread, rank_priced
from fxshard.errors import ExecutionError
from fxshard.simulate_plan import simulate_plan


@pytest.fixture(scope="module")
def plan():
    zm = zoo.resolve("gpt2-tiny", batch_size=4)
    return fxshard.plan(zm.model, "2xcpu:1GB", zm.example_inputs, strategy="pipeline", schedule="1f1b",
                        microbatches=2)


def _scaled(plan, factor: float):
    """The plan as a core ``factor`` times slower would price it (every stage's compute scaled)."""
    stages = tuple(dataclasses.replace(s, fwd_time_s=s.fwd_time_s * factor, bwd_time_s=s.bwd_time_s * factor,
                                       optimizer_time_s=s.optimizer_time_s * factor) for s in plan.stages)
    out = dataclasses.replace(plan, stages=stages)
    return dataclasses.replace(out, estimate=dataclasses.replace(plan.estimate,
                                                                 step_time_s=simulate_plan(out).step_time_s))


def _ranks(*plans):
    return [RankRun(rank=r, stages=(r,), peak_bytes=0, baseline_bytes=0, profile=p.to_json() if p else "")
            for r, p in enumerate(plans)]


def test_each_stage_is_priced_by_its_own_ranks_profile(plan):
    fast, slow = _scaled(plan, 1.0), _scaled(plan, 2.0)
    priced = rank_priced(plan, _ranks(fast, slow))
    assert priced.stages[0].fwd_time_s == pytest.approx(fast.stages[0].fwd_time_s)
    assert priced.stages[1].fwd_time_s == pytest.approx(slow.stages[1].fwd_time_s)
    assert priced.stages[1].bwd_time_s == pytest.approx(2 * plan.stages[1].bwd_time_s)
    # the step is simulated from the mixed stages: between the all-fast and the all-slow plan's
    mixed = simulate_plan(dataclasses.replace(plan, stages=(fast.stages[0], slow.stages[1]))).step_time_s
    assert priced.estimate.step_time_s == pytest.approx(mixed)
    assert fast.estimate.step_time_s < mixed < slow.estimate.step_time_s
    assert priced.estimate.samples_per_s == pytest.approx(plan.batch_size / mixed)


def test_the_spread_is_the_ranks_disagreement_on_the_whole_plan(plan):
    assert profile_spread(_ranks(_scaled(plan, 1.0), _scaled(plan, 1.0))) == pytest.approx(0.0)
    slow, fast = _scaled(plan, 1.3), _scaled(plan, 1.0)
    expected = slow.estimate.step_time_s / fast.estimate.step_time_s - 1
    assert 0.1 < expected <= 0.3  # compute scaled, the links not
    assert profile_spread(_ranks(slow, fast)) == pytest.approx(expected)


def test_a_rank_without_a_profile_is_named(plan):
    with pytest.raises(ExecutionError, match=r"ranks \[1\].*profile_in_ranks=True"):
        rank_priced(plan, _ranks(plan, None))
