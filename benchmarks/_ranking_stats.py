"""Kendall-tau statistics of benchmarks/plan_ranking.py: the pairs a noisy machine can order,
and how well the machine's own measurements of the same plans agree with each other.

Rows are any objects with ``rounds_s`` (the step of every round), ``error``, and per pricing
``analytical_s`` / ``profiled_s`` (None: not priced) besides the measured attribute asked for.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any

COIN_TOSS = 0.05  # measured step times closer than this (relative) are within the machine's noise


def _gap(a: float, b: float) -> float:
    """How far apart two positive times are, relative to the smaller."""
    return abs(a - b) / min(a, b)


def decisive_tau(rows: Sequence[Any], *, measured: str = "paired_s") -> dict[str, tuple[float | None, int]]:
    """Per pricing, Kendall's tau over the pairs whose ``measured`` steps are at least ``COIN_TOSS``
    apart (the pairs this machine can order), and how many such pairs there are: (concordant -
    discordant) / decisive pairs; None where there are none."""
    ran = [r for r in rows if getattr(r, measured) is not None]
    out: dict[str, tuple[float | None, int]] = {}
    for which in ("analytical", "profiled"):
        sub = [r for r in ran if getattr(r, f"{which}_s") is not None]
        score, n = 0, 0
        for i, a in enumerate(sub):
            for b in sub[i + 1:]:
                ma, mb = getattr(a, measured), getattr(b, measured)
                if _gap(ma, mb) < COIN_TOSS:
                    continue
                n += 1
                score += 1 if (getattr(a, f"{which}_s") - getattr(b, f"{which}_s")) * (ma - mb) > 0 else -1
        out[which] = (score / n if n else None, n)
    return out


def reproducibility(rows: Sequence[Any]) -> dict[str, tuple[float, float, float]]:
    """Each round as a plan ranking to predict, over the plans that ran in every round (3 rounds
    or more; else empty): Kendall's tau of that round's steps against ``"machine"``, the median of
    the other rounds (the ceiling this machine's noise puts on any prediction held against one
    round), and against each pricing's prediction; per predictor (median, lowest, highest) over
    rounds."""
    from fxshard.calibrate import kendall_tau

    full = [r for r in rows if not r.error and r.rounds_s]
    rounds = min((len(r.rounds_s) for r in full), default=0)
    if len(full) < 2 or rounds < 3:
        return {}
    predictors = {"machine": lambda r, k: statistics.median(r.rounds_s[j] for j in range(rounds) if j != k)}
    for which in ("analytical", "profiled"):
        if all(getattr(r, f"{which}_s") is not None for r in full):
            predictors[which] = lambda r, k, which=which: getattr(r, f"{which}_s")
    out = {}
    for name, predictor in predictors.items():
        taus = [kendall_tau([predictor(r, k) for r in full], [r.rounds_s[k] for r in full]) for k in range(rounds)]
        out[name] = (statistics.median(taus), min(taus), max(taus))
    return out


def split_half(rows: Sequence[Any]) -> tuple[float, float, float] | None:
    """The machine against itself at the benchmark's own resolution: for every way to split the
    rounds into two halves (the smaller of ``n // 2`` rounds, the rest), Kendall's tau between
    the plans' medians over one half and over the other, over the plans that ran in every round;
    (median, lowest, highest) over the splits, or None under 4 rounds in common. A prediction
    held against the median of all rounds cannot be expected to agree with it much better than
    its halves agree with each other."""
    from fxshard.calibrate import kendall_tau

    full = [r for r in rows if not r.error and r.rounds_s]
    rounds = min((len(r.rounds_s) for r in full), default=0)
    if len(full) < 2 or rounds < 4:
        return None
    taus = []
    for half in itertools.combinations(range(rounds), rounds // 2):
        rest = [k for k in range(rounds) if k not in half]
        taus.append(kendall_tau([statistics.median(r.rounds_s[k] for k in half) for r in full],
                                [statistics.median(r.rounds_s[k] for k in rest) for r in full]))
    return statistics.median(taus), min(taus), max(taus)
