"""benchmarks/plan_ranking.py's round-paired steps: drift between rounds cancels, order within rounds stays."""

from __future__ import annotations

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


def test_the_machine_against_itself_bounds_what_a_prediction_can_reach():
    pr = _script()
    # Three plans 10% apart, measured in the same order every round: the machine ranks them perfectly.
    steady = (_row(pr, "a", [1.0, 1.3, 0.9]), _row(pr, "b", [1.1, 1.43, 0.99]), _row(pr, "c", [1.2, 1.56, 1.08]))
    assert pr.reproducibility(steady) == (1.0, 1.0, 1.0)
    # a and b swap places from round to round: no round ranks them as the others do.
    noisy = (_row(pr, "a", [1.0, 1.1, 1.0]), _row(pr, "b", [1.1, 1.0, 1.05]), _row(pr, "c", [2.0, 2.0, 2.0]))
    mid, lo, hi = pr.reproducibility(noisy)
    assert lo < 1.0 and mid < 1.0
    assert pr.reproducibility(steady[:2] + (_row(pr, "c", [1.2, 1.5]),)) is None  # under 3 rounds in common
