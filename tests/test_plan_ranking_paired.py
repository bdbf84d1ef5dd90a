"""benchmarks/plan_ranking.py's round-paired steps: drift between rounds cancels, order within rounds stays."""

from __future__ import annotations

import dataclasses

import pytest

from tests.benchmark_scripts import load


def _script():
    return load("plan_ranking")


def _row(pr, name, rounds, error=""):
    return pr.Row(name=name, why="", shape="", analytical_s=1.0, profiled_s=1.0,
                  measured_s=sorted(rounds)[len(rounds) // 2] if rounds else None, rounds_s=tuple(rounds), load=1.0,
                  error=error)


def test_a_slow_round_moves_every_plan_alike_and_pairing_cancels_it():
    pr = _script()
    # In every round b runs 10% and c 5% slower than a; round 1 ran 30% slower for all, round 2 2% faster.
    a = _row(pr, "a", [1.00, 1.30, 0.98])
    b = _row(pr, "b", [1.10, 1.43, 1.078])
    c = _row(pr, "c", [1.05, 1.365, 1.029])
    failed = _row(pr, "failed", [], error="ExecutionError: boom")
    out = {r.name: r for r in pr.paired((a, b, c, failed))}
    assert out["failed"].paired_s is None
    assert out["a"].paired_s < out["c"].paired_s < out["b"].paired_s
    assert out["b"].paired_s / out["a"].paired_s == pytest.approx(1.10, rel=1e-9)
    assert out["c"].paired_s / out["a"].paired_s == pytest.approx(1.05, rel=1e-9)


def test_one_round_pairs_to_the_measured_steps():
    pr = _script()
    rows = pr.paired((_row(pr, "a", [2.0]), _row(pr, "b", [3.0])))
    assert [r.paired_s for r in rows] == pytest.approx([2.0, 3.0])


def test_decisive_tau_counts_only_pairs_measured_apart():
    pr = _script()

    def row(name, measured, predicted):
        return pr.Row(name=name, why="", shape="", analytical_s=predicted, profiled_s=None, measured_s=measured,
                      rounds_s=(measured,), load=1.0, paired_s=measured)

    # a and b measure 2% apart (a coin toss) and are predicted the wrong way round; c is 20% slower
    # than both and predicted slowest: both decisive pairs are concordant.
    rows = (row("a", 1.00, 1.1), row("b", 1.02, 1.0), row("c", 1.22, 1.5))
    out = pr.decisive_tau(rows)
    assert out["analytical"] == (1.0, 2)
    assert out["profiled"] == (None, 0)
    rows = (row("a", 1.00, 1.6), row("b", 1.02, 1.0), row("c", 1.22, 1.5))  # a now predicted slowest
    assert pr.decisive_tau(rows)["analytical"] == (0.0, 2)


def test_each_round_is_a_ranking_to_predict_and_the_other_rounds_bound_it():
    pr = _script()

    def row(name, rounds, predicted):
        return dataclasses.replace(_row(pr, name, rounds), analytical_s=predicted, profiled_s=None)

    # Three plans 10% apart, measured in the same order every round: the machine ranks them perfectly,
    # and so does a prediction in that order.
    steady = (row("a", [1.0, 1.3, 0.9], 1.0), row("b", [1.1, 1.43, 0.99], 2.0), row("c", [1.2, 1.56, 1.08], 3.0))
    out = pr.reproducibility(steady)
    assert out["machine"] == (1.0, 1.0, 1.0) and out["analytical"] == (1.0, 1.0, 1.0)
    assert "profiled" not in out  # not predicted
    # a and b swap places from round to round: no round ranks them as the others do, nor as any
    # fixed prediction does.
    noisy = (row("a", [1.0, 1.1, 1.0], 1.0), row("b", [1.1, 1.0, 1.05], 1.1), row("c", [2.0, 2.0, 2.0], 2.0))
    out = pr.reproducibility(noisy)
    assert out["machine"][1] < 1.0 and out["machine"][0] < 1.0
    assert out["analytical"][1] < 1.0 < out["analytical"][2] + 1e-9  # right in some rounds, wrong in one
    assert pr.reproducibility(steady[:2] + (row("c", [1.2, 1.5], 3.0),)) == {}  # under 3 rounds in common


def test_the_rounds_split_in_halves_bound_what_a_median_of_rounds_can_be_held_to():
    pr = _script()
    # Three plans in the same order in every round, whatever the round's speed: every split agrees.
    steady = (_row(pr, "a", [1.0, 1.3, 0.9, 1.1]), _row(pr, "b", [1.1, 1.43, 0.99, 1.21]),
              _row(pr, "c", [1.2, 1.56, 1.08, 1.32]))
    assert pr.split_half(steady) == (1.0, 1.0, 1.0)
    # a and b trade places: rounds 0 and 1 put a first, rounds 2 and 3 put b first; the split
    # {0, 1} against {2, 3} disagrees on them, the others tie them in one half or both.
    swapping = (_row(pr, "a", [1.0, 1.0, 1.2, 1.2]), _row(pr, "b", [1.2, 1.2, 1.0, 1.0]),
                _row(pr, "c", [2.0, 2.0, 2.0, 2.0]))
    mid, lo, hi = pr.split_half(swapping)
    assert lo < mid < 1.0 and hi < 1.0
    assert pr.split_half(steady[:2] + (_row(pr, "c", [1.2, 1.5, 1.1], ),)) is None  # under 4 rounds in common
    report = pr.to_markdown(pr.Ranking(model="m.py:f", devices="2xcpu", rows=steady, tau={}, discordant={},
                                       machine="here", command="python x", tau_halves=pr.split_half(swapping)))
    assert "the machine against itself in halves" in report and f"median {mid:.2f}" in report


def test_a_report_whose_profiling_passes_disagree_says_so():
    pr = _script()
    row = _row(pr, "a", [1.0])

    def report(taus):
        return pr.to_markdown(pr.Ranking(model="m.py:f", devices="2xcpu", rows=(row,), tau={}, discordant={},
                                         machine="here", command="python x", tau_profiles=taus,
                                         profiled_passes_s=((1.0, 1.1, 1.2),)))

    assert "disagree" not in report((0.96, 0.96, 0.96))
    assert "**the profiling passes disagree**" in report((-0.04, 0.11, 0.82))


def test_profile_drift_spread_ignores_a_drift_that_moves_every_plan_alike():
    drift = load("profile_drift")
    alike = [[1.0, 1.2, 0.9], [2.0, 2.4, 1.8], [3.0, 3.6, 2.7]]  # plans x passes: every pass scales all
    assert drift.spread(alike) == pytest.approx((0.0, 0.0), abs=1e-12)
    one_moves = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.6]]  # the third plan alone 20% dearer in pass 2
    median, worst = drift.spread(one_moves)
    assert median == 0.0 and worst == pytest.approx(0.3 / 1.65)
