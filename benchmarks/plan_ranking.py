"""Does the planner rank plans as they run? Candidate plans of one model, predicted against measured step time.

GPT-2 (``cpu_calibration.py:gpt2_cpu``: 4 layers x 256, vocabulary 50257, batch 8 x 64) on 2
gloo ranks of this CPU, one torch thread each. The candidates follow one rule, fixed before any
measurement: every pipeline the planner offers for 2 ranks (its 2-stage pick and its
4-stages-on-2-ranks interleaved and zero-bubble alternatives, its own micro-batch counts), the
planner's 2-stage split under the other schedule and micro-batch counts a user would try
(1F1B at 4, GPipe at 2), and the splits a user writes by hand: equal layers per stage
(torchtitan's default, the ``layers`` baseline) under 1F1B and GPipe, and a skewed one (the
embedding and the first block alone on rank 0). ``ddp`` and ``fsdp``, which the planner also
lists, are left out: :func:`fxshard.calibrate_dist.run_plan` runs pipelines only.

Each plan is predicted twice, by simulating its schedule (:func:`fxshard.simulate_plan`) over
stage times priced by the analytical model (the planner's own figures) and by the profiled
model at the plan's micro-batch on one thread, timed on the thread's CPU clock so that other
processes' load stays out of it (:func:`fxshard.calibrate_dist.reprice`; ``--clock wall``: wall
time), every micro-batch size the plans run measured in one measurement whose samples are
taken in turns and shared by all the plans, as one planner call measures and shares it
(``Pricer.prepare``), and measured under torchrun (:func:`fxshard.calibrate_dist.run_plan`:
median over timed steps of the slowest rank's step). With ``--rounds R`` every plan runs R times in rotating order and
the median is kept. The report gives Kendall's tau between predicted and measured step times
for both pricings, every discordant pair with how far apart its two plans measured (pairs
under ~5% apart are coin tosses on a shared machine), and each run's load (the stages' wall
over thread CPU time: ~1 on idle cores).

    python benchmarks/plan_ranking.py --md ranking.md --json ranking.json
    python benchmarks/plan_ranking.py --quick      # a tiny GPT-2, 1 step: structure only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ranking_stats import COIN_TOSS, _gap, decisive_tau, reproducibility, split_half  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = f"{HERE / 'cpu_calibration.py'}:gpt2_cpu"
QUICK_MODEL = f"{HERE / 'cpu_calibration.py'}:gpt2_quick"
DEVICES = "2xcpu:4GB"
SKEWED = "first-block-alone"  # the hand-written skewed split, registered while the benchmark runs
QUICK = (0, 5, 6)  # --quick runs these candidates: the planner's pick, equal layers under 1F1B and GPipe
# Profiling passes that rank the plans alike at least this well (Kendall tau) measured a machine that
# held still: 0.96 between every two passes of a quiet run, -0.04 to 0.82 in a run whose prediction
# then ranked the plans at 0.43 (docs/calibration.md, "Ranking plans").
PROFILES_AGREE = 0.9


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One plan to rank: how it is asked of the planner, and why it is in the list."""

    name: str
    why: str
    options: dict[str, Any]


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("metis 2st 1F1B auto-mb", "planner's 2-stage pipeline", dict(stages=2, schedule="1f1b")),
    Candidate("metis 2st 1F1B mb4", "planner's split, fewer micro-batches",
              dict(stages=2, schedule="1f1b", microbatches=4)),
    Candidate("metis 2st GPipe mb2", "planner's split, GPipe", dict(stages=2, schedule="gpipe", microbatches=2)),
    Candidate("metis 4st Interleaved1F1B", "planner's interleaved alternative", dict(schedule="interleaved1f1b")),
    Candidate("metis 4st ZBV", "planner's zero-bubble alternative", dict(schedule="zbv")),
    Candidate("layers 2st 1F1B mb4", "equal layers by hand (torchtitan)",
              dict(stages=2, schedule="1f1b", microbatches=4, partitioner="layers")),
    Candidate("layers 2st GPipe mb8", "equal layers by hand, GPipe",
              dict(stages=2, schedule="gpipe", microbatches=8, partitioner="layers")),
    Candidate("skewed 2st 1F1B mb4", "embedding + first block alone (skewed)",
              dict(stages=2, schedule="1f1b", microbatches=4, partitioner=SKEWED)),
)


def first_block_alone(problem: Any, seed: int = 0) -> np.ndarray:
    """Two stages: everything before the second repeated block on stage 0, the rest on stage 1.

    The split a user writes by putting "the embedding and one layer" on the first rank: as
    skewed as a layer-boundary split gets for a decoder with a heavy head.
    """
    from fxshard.errors import PartitionError
    from fxshard.passes.partition.dp import split_to_stages, valid_boundaries

    order = problem.order
    starts: list[int] = []
    seen: set[str] = set()
    for pos, unit in enumerate(order):
        label = problem.layer[unit]
        if label and label not in seen:
            seen.add(label)
            starts.append(pos)
    if problem.k != 2 or len(starts) < 2 or not valid_boundaries(problem, order)[starts[1]]:
        raise PartitionError(f"{SKEWED!r} splits 2 stages at the second repeated block; got k={problem.k} and "
                             f"{len(starts)} blocks: use it with stages=2 on a model with 2 or more blocks")
    return split_to_stages(problem, order, [starts[1]])


@dataclasses.dataclass(frozen=True)
class Row:
    """One candidate: its plan's shape, its two predictions and its measurements."""

    name: str
    why: str
    shape: str  # stages, schedule, micro-batches and where the stages cut
    analytical_s: float
    profiled_s: float | None
    measured_s: float | None  # median over rounds of run_plan's step_s
    rounds_s: tuple[float, ...]
    load: float | None  # stages' wall / thread CPU time, mean over rounds
    error: str = ""
    # Round-paired: per round, the step over the geometric mean of that round's steps (every plan that
    # ran in every round), median over rounds, times the geometric mean over all rounds. This machine's
    # speed drifts 10-20% over minutes, thread CPU time included (load ~1.0 throughout), and a round of
    # 8 plans runs within 2 minutes, so the ratio within a round cancels the drift between rounds.
    paired_s: float | None = None

    @property
    def normalised_s(self) -> float | None:
        """The measured step over the run's load (its stages' wall / CPU time): an estimate of the step on
        idle cores, where every rank's compute and the waits for it stretch alike with the load."""
        if self.measured_s is None or not self.load:
            return None
        return self.measured_s / max(self.load, 1.0)


def _shape(plan: Any) -> str:
    cuts = " / ".join(f"r{s.device_indices[0]}: {s.first_module}..{s.last_module}" for s in plan.stages)
    return f"{plan.num_stages} stages, {plan.schedule}, {plan.microbatches} mb; {cuts}"


def _gist(error: Exception) -> str:
    """A failure in one line: the first line of the message and the last (a failing rank's own error)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.startswith("Command:")]
    gist = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return gist[:400].replace("|", "/")


def _load(run: Any) -> float | None:
    wall = sum(s.fwd_s + s.bwd_s for s in run.stages)
    cpu = sum(s.fwd_cpu_s + s.bwd_cpu_s for s in run.stages)
    return wall / cpu if cpu > 0 else None


def make_plans(model_ref: str, candidates: Sequence[Candidate]) -> tuple[Any, list[Any]]:
    """The captured model and one plan per candidate (the skewed partitioner registered meanwhile)."""
    import fxshard
    from fxshard import zoo
    from fxshard.calibrate_dist import run_objective
    from fxshard.capture import capture
    from fxshard.passes.partition import register_partitioner, unregister_partitioner

    zm = zoo.resolve(model_ref)
    captured = capture(zm.model, zm.example_inputs)
    loss_fn, target = run_objective(captured)  # what the ranks train with, priced
    register_partitioner(SKEWED, first_block_alone)
    try:
        plans = [fxshard.plan(zm.model, DEVICES, zm.example_inputs, strategy="pipeline", loss_fn=loss_fn,
                              example_target=target, **c.options)
                 for c in candidates]
    finally:
        unregister_partitioner(SKEWED)
    return captured, plans


def predict(captured: Any, plans: Sequence[Any], *, profiled: bool = True, clock: str = "cpu",
            passes: int = 1) -> list[tuple[float, float | None, tuple[float, ...]]]:
    """(analytical, profiled, profiled per pass) predicted step seconds per plan.

    Each pass profiles once, as one ``fxshard.plan`` call does: a single profiled model is told
    every micro-batch size the plans run (``Pricer.prepare``), measures them all in one
    measurement whose samples are taken in turns, and prices every plan from it. It times on
    ``clock``: ``"cpu"`` (the thread's CPU seconds, the default) keeps other processes' load on
    this shared machine out of the prediction; ``"wall"`` is the planner's. With ``passes`` > 1
    it profiles that many times, the sizes in rotating order, and the profiled figure is the
    median over passes.
    """
    from fxshard.candidates import Pricer
    from fxshard.cluster import Cluster
    from fxshard.cost_models import ProfiledCostModel
    from fxshard.simulate_plan import simulate_plan

    analytical = [simulate_plan(plan).step_time_s for plan in plans]
    if not profiled:
        return [(a, None, ()) for a in analytical]
    from fxshard.calibrate_dist import reprice, run_loss

    loss = run_loss(captured)
    fractions = list(dict.fromkeys(1.0 / (plan.microbatches * plan.replicas) for plan in plans))
    specs = [d.spec for d in Cluster.from_dict(plans[0].cluster).devices]
    per_pass: list[list[float]] = [[0.0] * passes for _ in plans]
    for k in range(passes):
        model = ProfiledCostModel(device="cpu", threads=1, clock=clock)
        Pricer(captured, model, plans[0].batch_size, loss=loss).prepare(
            specs, fractions[k % len(fractions):] + fractions[:k % len(fractions)])
        for i, plan in enumerate(plans):
            per_pass[i][k] = simulate_plan(reprice(captured, plan, model, loss=loss)).step_time_s
    return [(a, statistics.median(ps), tuple(ps)) for a, ps in zip(analytical, per_pass)]


def measure(model_ref: str, plans: Sequence[Any], *, rounds: int, steps: int, warmup: int,
            timeout_s: float) -> list[tuple[list[float], list[float], str]]:
    """Per plan: step seconds and load of each round (rotating order), and the error if it failed."""
    from fxshard.calibrate_dist import run_plan
    from fxshard.errors import FxshardError

    results: list[tuple[list[float], list[float], str]] = [([], [], "") for _ in plans]
    for r in range(rounds):
        for k in range(len(plans)):
            i = (k + r) % len(plans)  # rotate, so no plan always runs first or after the same one
            if results[i][2]:
                continue
            t0 = time.perf_counter()
            try:
                run = run_plan(model_ref, plans[i], steps=steps, warmup=warmup, threads=1, timeout_s=timeout_s)
            except FxshardError as e:
                results[i] = (results[i][0], results[i][1], f"{type(e).__name__}: {_gist(e)}")
                print(f"  round {r}: plan {i} failed: {results[i][2]}", file=sys.stderr, flush=True)
                continue
            results[i][0].append(run.step_s)
            load = _load(run)
            if load is not None:
                results[i][1].append(load)
            print(f"  round {r}: plan {i}: {run.step_s:.3f} s (load {load or 0:.2f}, "
                  f"{time.perf_counter() - t0:.0f} s with start-up)", file=sys.stderr, flush=True)
    return results


@dataclasses.dataclass(frozen=True)
class Ranking:
    """The candidates' rows, Kendall's tau of each pricing, and the pairs each pricing orders wrongly."""

    model: str
    devices: str
    rows: tuple[Row, ...]
    tau: dict[str, float | None]
    discordant: dict[str, tuple[tuple[str, str, float, float], ...]]  # (a, b, measured gap, predicted gap)
    machine: str
    command: str
    clock: str = "cpu"  # what the profiled model timed

    tau_normalised: dict[str, float | None] = dataclasses.field(default_factory=dict)
    tau_paired: dict[str, float | None] = dataclasses.field(default_factory=dict)
    discordant_paired: dict[str, tuple[tuple[str, str, float, float], ...]] = dataclasses.field(default_factory=dict)
    # Per pricing: tau over the round-paired pairs at least COIN_TOSS apart, and how many pairs that is.
    tau_decisive: dict[str, tuple[float | None, int]] = dataclasses.field(default_factory=dict)
    # Each round as the ranking to predict (:func:`reproducibility`): per predictor ("machine": the other
    # rounds' median), Kendall's tau median, lowest and highest over rounds.
    tau_per_round: dict[str, tuple[float, float, float]] = dataclasses.field(default_factory=dict)
    # The rounds split in halves, each half's median against the other's (:func:`split_half`).
    tau_halves: tuple[float, float, float] | None = None
    # The profiled prediction against itself: Kendall's tau between each two profiling passes, and each
    # plan's prediction per pass (the reported one is their median).
    tau_profiles: tuple[float, ...] = ()
    profiled_passes_s: tuple[tuple[float, ...], ...] = ()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            out["normalised_s"] = row.normalised_s
        return data


def paired(rows: Sequence[Row]) -> tuple[Row, ...]:
    """``rows`` with ``paired_s`` set (:attr:`Row.paired_s`) where every round ran them all; with one
    round it is the measured step."""
    full = [r for r in rows if not r.error and r.rounds_s]
    rounds = min((len(r.rounds_s) for r in full), default=0)
    if len(full) < 2 or rounds == 0:
        return tuple(rows)
    means = [statistics.geometric_mean([r.rounds_s[k] for r in full]) for k in range(rounds)]
    overall = statistics.geometric_mean(means)
    by_name = {r.name: statistics.median(r.rounds_s[k] / means[k] for k in range(rounds)) * overall for r in full}
    return tuple(dataclasses.replace(r, paired_s=by_name.get(r.name)) for r in rows)


def rank(rows: Sequence[Row], *, measured: str = "measured_s") -> tuple[dict[str, float | None], dict[str, tuple]]:
    """Kendall's tau (``fxshard.calibrate.kendall_tau``) of each pricing against the measured step times
    (``measured``: the attribute, ``"normalised_s"`` for the load-normalised ones), over the rows that ran,
    and its discordant pairs."""
    from fxshard.calibrate import kendall_tau

    ran = [dataclasses.replace(r, measured_s=getattr(r, measured)) for r in rows]
    ran = [r for r in ran if r.measured_s is not None]
    tau: dict[str, float | None] = {}
    pairs: dict[str, tuple] = {}
    for which in ("analytical", "profiled"):
        sub = [r for r in ran if getattr(r, f"{which}_s") is not None]
        if len(sub) < 2:
            tau[which], pairs[which] = None, ()
            continue
        pred = [getattr(r, f"{which}_s") for r in sub]
        meas = [r.measured_s for r in sub]
        tau[which] = kendall_tau(pred, meas)
        pairs[which] = tuple((sub[i].name, sub[j].name, _gap(meas[i], meas[j]), _gap(pred[i], pred[j]))
                             for i in range(len(sub)) for j in range(i + 1, len(sub))
                             if (pred[i] - pred[j]) * (meas[i] - meas[j]) < 0)
    return tau, pairs


def to_markdown(result: Ranking) -> str:
    """The ranking table, tau per pricing and the discordant pairs."""
    ran = sorted((r for r in result.rows if r.measured_s is not None), key=lambda r: r.measured_s)
    place = {r.name: i + 1 for i, r in enumerate(ran)}

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f}"

    lines = [f"Plans of `{Path(result.model.split(':')[0]).name}:{result.model.split(':')[-1]}` on {result.devices} "
             f"(gloo, 1 torch thread per rank); {result.machine}. Profiled on the {result.clock} clock.", "",
             f"`{result.command}`", "",
             "| plan | why | shape | predicted analytical (ms) | predicted profiled (ms) | measured (ms) | "
             "measured rank | load (wall/cpu) | measured / load (ms) | round-paired (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        measured = ms(r.measured_s) if not r.error else f"failed: {r.error}"
        spread = f" ({', '.join(ms(x) for x in r.rounds_s)})" if len(r.rounds_s) > 1 else ""
        lines.append(f"| {r.name} | {r.why} | {r.shape} | {ms(r.analytical_s)} | {ms(r.profiled_s)} | "
                     f"{measured}{spread} | {place.get(r.name, '-')} | "
                     f"{'-' if r.load is None else f'{r.load:.2f}'} | {ms(r.normalised_s)} | {ms(r.paired_s)} |")
    lines.append("")
    for which in ("analytical", "profiled"):
        tau = result.tau.get(which)
        pairs = result.discordant.get(which, ())
        if tau is None:
            lines.append(f"- {which}: no tau (fewer than 2 plans ran with this pricing)")
            continue
        n = len(ran)
        lines.append(f"- {which}: Kendall tau {tau:.2f} over {n} plans, {len(pairs)} discordant pair(s) "
                     f"of {n * (n - 1) // 2}" + (":" if pairs else ""))
        for a, b, gap_m, gap_p in pairs:
            toss = " (within the machine's noise)" if gap_m < COIN_TOSS else ""
            lines.append(f"  - {a} vs {b}: measured {gap_m:.0%} apart{toss}, predicted {gap_p:.0%} apart")
    normalised = {k: v for k, v in result.tau_normalised.items() if v is not None}
    if normalised:
        lines.append("- against the load-normalised steps (measured / load): "
                     + ", ".join(f"{k} tau {v:.2f}" for k, v in normalised.items()))
    for which, tau in result.tau_paired.items():
        if tau is None:
            continue
        pairs = result.discordant_paired.get(which, ())
        lines.append(f"- against the round-paired steps (each round's steps over its geometric mean): {which} "
                     f"tau {tau:.2f}, {len(pairs)} discordant pair(s)" + (":" if pairs else ""))
        for a, b, gap_m, gap_p in pairs:
            toss = " (within the machine's noise)" if gap_m < COIN_TOSS else ""
            lines.append(f"  - {a} vs {b}: {gap_m:.0%} apart paired{toss}, predicted {gap_p:.0%} apart")
    for which, (tau, n) in result.tau_decisive.items():
        if tau is not None:
            lines.append(f"- over the {n} pair(s) the round-paired steps put at least {COIN_TOSS:.0%} apart (the "
                         f"pairs this machine orders): {which} tau {tau:.2f}")
    if result.tau_per_round:
        said = {"machine": "the median of the other rounds (the machine against itself: the ceiling its noise "
                           "puts on a prediction)", "analytical": "the analytical prediction",
                "profiled": "the profiled prediction"}
        lines.append("- each round's steps as the ranking to predict, Kendall tau median (lowest to highest) over "
                     "rounds: " + "; ".join(f"{said[k]} {mid:.2f} ({lo:.2f} to {hi:.2f})"
                                            for k, (mid, lo, hi) in result.tau_per_round.items()))
    if result.tau_halves:
        mid, lo, hi = result.tau_halves
        lines.append(f"- the machine against itself in halves (the plans' median over some of the rounds against "
                     f"their median over the others, every split): Kendall tau median {mid:.2f} ({lo:.2f} to "
                     f"{hi:.2f}); a prediction cannot be held to much more")
    if result.tau_profiles:
        passes = ", ".join(f"{t:.2f}" for t in result.tau_profiles)
        lines.append(f"- the profiled prediction against itself ({len(result.profiled_passes_s[0])} profiling "
                     f"passes; the table gives their median): Kendall tau between passes {passes}")
        if min(result.tau_profiles) < PROFILES_AGREE:
            lines.append(f"- **the profiling passes disagree** (tau under {PROFILES_AGREE}): the machine's speed moved "
                         "while they were measured, so the profiled ranking above says more about that than "
                         "about the plans; run again on a quieter machine")
    return "\n".join(lines) + "\n"


def run(model_ref: str, *, rounds: int = 1, steps: int = 5, warmup: int = 2, profiled: bool = True,
        clock: str = "cpu", timeout_s: float = 600.0, candidates: Sequence[Candidate] = CANDIDATES,
        command: str = "", profiles: int = 1) -> Ranking:
    """Plan, predict and measure every candidate; rank them."""
    from fxshard.calibrate import kendall_tau

    captured, plans = make_plans(model_ref, candidates)
    predictions = predict(captured, plans, profiled=profiled, clock=clock, passes=profiles)
    passes = tuple(ps for _, _, ps in predictions) if profiled else ()
    tau_profiles = tuple(kendall_tau([ps[j] for ps in passes], [ps[k] for ps in passes])
                         for j in range(profiles) for k in range(j + 1, profiles)) if profiled else ()
    measured = measure(model_ref, plans, rounds=rounds, steps=steps, warmup=warmup, timeout_s=timeout_s)
    rows = tuple(Row(name=c.name, why=c.why, shape=_shape(p), analytical_s=a, profiled_s=pr,
                     measured_s=statistics.median(times) if times else None, rounds_s=tuple(times),
                     load=statistics.fmean(loads) if loads else None, error=err)
                 for c, p, (a, pr, _), (times, loads, err) in zip(candidates, plans, predictions, measured))
    rows = paired(rows)
    tau, pairs = rank(rows)
    tau_normalised, _ = rank(rows, measured="normalised_s")
    tau_paired, pairs_paired = rank(rows, measured="paired_s")
    decisive = decisive_tau(rows)
    from _suite import machine  # benchmarks/ is on sys.path (above)

    return Ranking(model=model_ref, devices=DEVICES, rows=rows, tau=tau, discordant=pairs,
                   machine=f"{machine()}, load average {os.getloadavg()[0]:.1f} at the end", command=command,
                   clock=clock if profiled else "", tau_normalised=tau_normalised, tau_paired=tau_paired,
                   discordant_paired=pairs_paired, tau_decisive=decisive, tau_per_round=reproducibility(rows),
                   tau_halves=split_half(rows),
                   tau_profiles=tau_profiles, profiled_passes_s=passes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny GPT-2, 3 candidates, 1 round of 1 step: structure only")
    parser.add_argument("--rounds", type=int, default=1, help="runs per plan, in rotating order (median kept)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--no-profiled", action="store_true", help="skip the profiled prediction")
    parser.add_argument("--profiles", type=int, default=1,
                        help="profiling passes, micro-batch sizes in rotating order (median kept; default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the profiled model times: the thread's CPU seconds (default) or wall seconds")
    parser.add_argument("--md", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    command = "python benchmarks/plan_ranking.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.quick:
        result = run(QUICK_MODEL, rounds=1, steps=1, warmup=1, profiled=not args.no_profiled, clock=args.clock,
                     timeout_s=300,
                     candidates=[CANDIDATES[i] for i in QUICK], command=command.strip(), profiles=args.profiles)
    else:
        result = run(MODEL, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                     profiled=not args.no_profiled, clock=args.clock, command=command.strip(),
                     profiles=args.profiles)
    text = to_markdown(result)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
