"""How far every registered partitioner is from the exact optimum, measured with the ``milp`` partitioner.

Two suites, one row per (instance, partitioner):

- ``public``: the four instances of Tarnawski et al. (NeurIPS 2020) in ``benchmarks/data/dnn-partitioning``,
  loaded as benchmarks/partitioners.py loads them: k = their ``maxFPGAs`` (6), their memory limit, their
  max-load objective (``objective="direct"``). They are solved at full resolution, without coarsening:
  the largest, inceptionv3, has 326 units, within the MILP's limit, and HiGHS proves each optimum in seconds.
- ``random``: seeded branchy DAGs (each node reads one to three earlier nodes from a window of recent
  ones, so branches fork and join), 30..150 nodes, k = 3..6, both objectives, every other one with a
  memory limit of 1.3x the even share.

A third suite, ``scale`` (not in ``all``), times the MILP alone on ``random_dag`` graphs of 100..600 nodes,
k = 4 and 6, both objectives, with the unit limit lifted: where it proves optimality, and how long it takes.

For each instance the MILP (:func:`fxshard.passes.partition.milp.milp_solve`) runs first, within the time
limit; ``gap %`` is a partitioner's bottleneck over the MILP's best value, minus one. Where the MILP stopped
at the time limit, its best value may itself be above the optimum: the table then also gives the proven
bound, and ``gap % <= bound`` is the largest the true gap can be.

Usage::

    python benchmarks/optimality_gap.py                      # both suites (a few minutes)
    python benchmarks/optimality_gap.py --suite public       # the public instances (~10 s)
    python benchmarks/optimality_gap.py --md out.md --csv out.csv --time-limit 60
    python benchmarks/optimality_gap.py --suite scale --time-limit 60   # the MILP's own time against size

Results: docs/benchmarks.md, "Optimality gap".
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import networkx as nx
import numpy as np
from _suite import machine, publish

import fxshard
from fxshard.errors import FxshardError
from fxshard.passes.partition import Problem, build_problem, partition_problem
from fxshard.passes.partition.instances import load_tarnawski
from fxshard.passes.partition.milp import MilpResult, milp_solve

__all__ = ["Row", "main", "public_instances", "random_dag", "random_instances", "run", "run_scale"]

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "dnn-partitioning"
PUBLIC = ("bert24_inference", "gnmt_inference", "inceptionv3_inference", "resnet50_inference")
RANDOM_SIZES = (30, 60, 100, 150)
SCALE_SIZES = (100, 200, 300, 400, 600)


@dataclass(frozen=True, kw_only=True)
class Row:
    """One partitioner on one instance, next to the MILP's answer for that instance."""

    suite: str
    instance: str
    units: int
    k: int
    objective: str
    memory_limited: bool
    partitioner: str
    value: float = math.nan  # the partitioner's bottleneck
    valid: bool | None = None  # acyclic and within memory
    milp_value: float = math.nan  # the MILP's best bottleneck (the optimum when milp_status is "optimal")
    milp_bound: float = math.nan  # proven lower bound on every valid bottleneck
    milp_status: str = ""
    milp_seconds: float = math.nan
    seconds: float = math.nan  # the partitioner alone
    error: str = ""

    @property
    def gap_pct(self) -> float:
        """Bottleneck over the MILP's best value, minus one, in percent."""
        return (self.value / self.milp_value - 1) * 100 if self.milp_value > 0 else math.nan

    @property
    def gap_bound_pct(self) -> float:
        """The largest the true gap can be: bottleneck over the proven bound, minus one, in percent."""
        return (self.value / self.milp_bound - 1) * 100 if self.milp_bound > 0 else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "gap_pct": self.gap_pct, "gap_bound_pct": self.gap_bound_pct}


def random_dag(n: int, seed: int) -> nx.DiGraph:
    """A seeded branchy DAG: node i reads 1..3 earlier nodes within a window of 2..16 (forks and joins).

    compute ~ U(0.5, 2), comm ~ U(0.05, 1) per producing node, memory ~ U(1, 3).
    """
    rng = np.random.default_rng(seed)
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(i, compute=float(rng.uniform(0.5, 2.0)), memory=float(rng.uniform(1.0, 3.0)))
    comm = rng.uniform(0.05, 1.0, size=n)
    for i in range(1, n):
        recent = np.arange(max(0, i - int(rng.integers(2, 17))), i)
        preds = rng.choice(recent, size=min(recent.size, int(rng.integers(1, 4))), replace=False)
        for j in sorted(int(p) for p in preds):
            g.add_edge(j, i, comm=float(comm[j]))
    return g


def public_instances(data_dir: Path) -> Iterator[tuple[str, Problem]]:
    """The public instances, as benchmarks/partitioners.py runs them (their k, memory limit, "direct")."""
    for name in PUBLIC:
        inst = load_tarnawski(data_dir / f"{name}.json")
        yield name, build_problem(inst.graph, inst.k, memory_limit=inst.memory_limit, objective="direct")


def random_instances() -> Iterator[tuple[str, Problem]]:
    """Branchy random DAGs: each size with two k (3 and 5, or 4 and 6), both objectives; half the
    instances of each objective have a memory limit of 1.3x the even share."""
    for i, n in enumerate(RANDOM_SIZES):
        for j, k in enumerate((3 + i % 2, 5 + i % 2)):
            seed = 1000 + 10 * i + j
            graph = random_dag(n, seed=seed)
            total = sum(d["memory"] for _, d in graph.nodes(data=True))
            for objective in ("pipeline", "direct"):
                limited = (j + (objective == "direct")) % 2 == 1
                name = f"dag{n}-s{seed}" + (" mem" if limited else "")
                yield name, build_problem(graph, k, memory_limit=1.3 * total / k if limited else None,
                                          objective=objective)


def _rows_for(suite: str, name: str, problem: Problem, milp: MilpResult, names: Sequence[str]) -> list[Row]:
    base = dict(suite=suite, instance=name, units=problem.num_units, k=problem.k, objective=problem.objective,
                memory_limited=bool(np.isfinite(problem.mem_limit).any()), milp_value=milp.objective,
                milp_bound=milp.bound, milp_status=milp.status, milp_seconds=milp.seconds)
    rows = []
    for p in names:
        try:
            part = partition_problem(problem, p)
        except FxshardError as e:
            rows.append(Row(partitioner=p, error=f"{type(e).__name__}: {e}", **base))
            continue
        rows.append(Row(partitioner=p, value=part.bottleneck, valid=part.is_valid, seconds=part.seconds, **base))
    return rows


def run(instances: Iterator[tuple[str, Problem]], suite: str, names: Sequence[str], time_limit: float) -> list[Row]:
    """The MILP, then every partitioner in ``names``, on each instance."""
    rows: list[Row] = []
    for name, problem in instances:
        milp = milp_solve(problem, time_limit=time_limit)
        rows += _rows_for(suite, name, problem, milp, names)
        print(f"  {suite} {name} k={problem.k} {problem.objective}: milp {milp.status} {milp.objective:.4f} "
              f"({milp.seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def _cell(row: Row) -> str:
    if row.error:
        return "refused"
    if not row.valid:
        return f"{row.value:.4f} (invalid)"
    gap = f"{row.gap_pct:+.2f}%"
    if row.milp_status != "optimal":
        gap += f", <= {row.gap_bound_pct:.2f}%"
    return f"{row.value:.4f} ({gap})"


def markdown(rows: Sequence[Row], names: Sequence[str]) -> str:
    """One table per suite: an instance per line, the MILP's answer, then each partitioner's value (gap %)."""
    out = [f"Machine: {machine()}", ""]
    for suite in dict.fromkeys(r.suite for r in rows):
        mine = [r for r in rows if r.suite == suite]
        out += [f"### {suite}", "",
                "| instance | units | k | objective | memory limit | MILP optimum (bound, s) | "
                + " | ".join(names) + " |",
                "|---" * (6 + len(names)) + "|"]
        for inst in dict.fromkeys((r.instance, r.k, r.objective) for r in mine):
            group = {r.partitioner: r for r in mine if (r.instance, r.k, r.objective) == inst}
            first = next(iter(group.values()))
            if first.milp_status == "optimal":
                opt = f"**{first.milp_value:.4f}** ({first.milp_seconds:.1f} s)"
            elif math.isfinite(first.milp_value):
                opt = (f"{first.milp_value:.4f} >= {first.milp_bound:.4f}, gap "
                       f"{(1 - first.milp_bound / first.milp_value) * 100:.2f}% ({first.milp_seconds:.0f} s limit)")
            else:
                opt = first.milp_status
            out.append(f"| {first.instance} | {first.units} | {first.k} | {first.objective} | "
                       f"{'yes' if first.memory_limited else 'no'} | {opt} | "
                       + " | ".join(_cell(group[p]) for p in names) + " |")
        out.append("")
    return "\n".join(out)


def run_scale(time_limit: float) -> tuple[str, list[dict]]:
    """The MILP alone on ``random_dag(n, seed=n)``: status, proven gap and seconds against size."""
    rows = []
    for n in SCALE_SIZES:
        graph = random_dag(n, seed=n)
        for objective in ("pipeline", "direct"):
            for k in (4, 6):
                r = milp_solve(build_problem(graph, k, objective=objective), time_limit=time_limit,
                               max_units=max(SCALE_SIZES))
                rows.append(dict(units=n, k=k, objective=objective, status=r.status, value=r.objective,
                                 bound=r.bound, gap_pct=r.gap * 100, seconds=r.seconds, variables=r.variables,
                                 constraints=r.constraints))
                print(f"  scale n={n} k={k} {objective}: {r.status} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
    lines = [f"Machine: {machine()}", "", "| units | k | objective | status | value | bound | gap % | seconds | "
             "variables | constraints |", "|---" * 10 + "|"]
    lines += [f"| {r['units']} | {r['k']} | {r['objective']} | {r['status']} | {r['value']:.4f} | {r['bound']:.4f} | "
              f"{r['gap_pct']:.2f} | {r['seconds']:.1f} | {r['variables']} | {r['constraints']} |" for r in rows]
    return "\n".join(lines) + "\n", rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("public", "random", "all", "scale"), default="all")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per MILP solve (default 30)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the dnn-partitioning directory")
    parser.add_argument("--partitioners", nargs="*", help="default: every registered one but milp")
    parser.add_argument("--md", type=Path)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    names = args.partitioners or [p for p in fxshard.partitioners() if p != "milp"]
    if args.suite == "scale":
        text, table = run_scale(args.time_limit)
        publish(text, table, md=args.md, csv_path=args.csv)
        return
    rows: list[Row] = []
    if args.suite in ("public", "all"):
        rows += run(public_instances(args.data), "public", names, args.time_limit)
    if args.suite in ("random", "all"):
        rows += run(random_instances(), "random", names, args.time_limit)
    publish(markdown(rows, names), [r.as_dict() for r in rows], md=args.md, csv_path=args.csv)


if __name__ == "__main__":
    main()
