"""Plan time against cluster size: ``fxshard plan llama-70b --devices Nx8xH100-80GB`` (LLaMA-70B
training at the zoo's default batch) on 4x8 to 128x8 H100s.

Each cluster is planned in its own child process, so each peak RSS is that run's alone. A child
builds the zoo model on meta, captures it once, then times ``plan_captured`` (the search: cost,
partition, simulate) by wall clock and by this process's CPU time; the capture is timed apart, as
it does not depend on the cluster. ``--exhaustive`` plans with ``exhaustive=True`` too (no
pruning), in the same child, to check the pruned search's plan against it. The parent renders a
markdown table and, with ``--plot``, a PNG of plan time against devices.

Usage::

    python benchmarks/plan_clusters.py                             # 4x8 .. 128x8
    python benchmarks/plan_clusters.py --machines 4 8 16 --exhaustive
    python benchmarks/plan_clusters.py --per-device 1                # batch = one sample per device
    python benchmarks/plan_clusters.py --plot docs/img/plan_clusters.png --md out.md --csv out.csv
    python benchmarks/plan_clusters.py --plot docs/img/plan_clusters.png --plot-csv a.csv b.csv c.csv
    python benchmarks/plan_clusters.py --one 16                    # child: one JSON line

Results and how to read them: docs/benchmarks.md, "Plan time against cluster size".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _suite import ChildError, machine, max_rss_mb, publish, run_child

__all__ = ["main", "measure", "to_markdown"]

MACHINES = (4, 8, 16, 32, 64, 128)
GPUS_PER_MACHINE = 8
MODEL = "llama-70b"
CHILD_TIMEOUT_S = 1800


def measure(machines: int, *, exhaustive: bool, per_device: int | None = None) -> dict:
    """One cluster (in this process): capture time, then plan time (wall and CPU), peak RSS, the plan.

    ``per_device``: the batch is that many samples per device (a global batch that grows with the
    cluster, as it does in practice) instead of the zoo's default."""
    from fxshard.capture import capture
    from fxshard.cluster import Cluster
    from fxshard.plan_options import PlanOptions
    from fxshard.planner import batch_size_of, plan_captured
    from fxshard.zoo import resolve

    devices = f"{machines}x{GPUS_PER_MACHINE}xH100-80GB"
    built = resolve(MODEL, batch_size=per_device * machines * GPUS_PER_MACHINE if per_device else None)
    start = time.perf_counter()
    captured = capture(built.model, built.example_inputs, example_kwargs=built.example_kwargs)
    capture_s = time.perf_counter() - start
    batch = batch_size_of(captured, built.example_inputs, built.example_kwargs)
    cluster = Cluster.parse(devices)
    row = {"cluster": f"{machines}x{GPUS_PER_MACHINE}", "devices": machines * GPUS_PER_MACHINE, "batch": batch,
           "capture_s": round(capture_s, 2)}
    for label, opts in (("", PlanOptions(name=built.name)),
                        *((("exhaustive_", PlanOptions(name=built.name, exhaustive=True)),) if exhaustive else ())):
        wall, cpu = time.perf_counter(), time.process_time()
        plan = plan_captured(captured, cluster, batch, opts)
        row[f"{label}plan_s"] = round(time.perf_counter() - wall, 2)
        row[f"{label}plan_cpu_s"] = round(time.process_time() - cpu, 2)
        row[f"{label}step_s"] = plan.estimate.step_time_s
        row[f"{label}shape"] = (f"{plan.strategy} {len(plan.stages)}x{plan.replicas} {plan.schedule} "
                                f"m={plan.microbatches} {plan.data_parallel or '-'}/"
                                f"{plan.stages[0].activation_checkpointing}")
    row["peak_rss_mb"] = round(max_rss_mb(), 1)
    return row


def to_markdown(rows: list[dict]) -> str:
    exhaustive = any("exhaustive_plan_s" in r for r in rows)
    head = "| cluster | devices | plan (s) | plan CPU (s) | capture (s) | peak RSS (MiB) | plan | step (s) |"
    head = head.replace("| devices |", "| devices | batch |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    if exhaustive:
        head += " exhaustive plan (s) | exhaustive step (s) |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['cluster']} | {r['devices']} | {r['batch']} | {r['plan_s']:.1f} | {r['plan_cpu_s']:.1f} | {r['capture_s']:.1f} "
                f"| {r['peak_rss_mb']:.0f} | {r['shape']} | {r['step_s']:.3f} |")
        if exhaustive:
            line += (f" {r['exhaustive_plan_s']:.1f} | {r['exhaustive_step_s']:.3f} |" if "exhaustive_plan_s" in r
                     else " - | - |")
        lines.append(line)
    return "\n".join(lines) + f"\n\n{MODEL} training; {machine()}\n"


def _series_label(rows: list[dict]) -> str:
    batches = {int(r["batch"]) for r in rows}
    if len(batches) == 1:
        return f"batch {batches.pop()}"
    per = {int(r["batch"]) // int(r["devices"]) for r in rows}
    return f"batch {per.pop()} per device" if len(per) == 1 else "mixed batches"


def _plot(runs: list[list[dict]], path: Path) -> None:
    """Plan time against devices, one line per run (rows read back from CSV are strings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ticks: set[int] = set()
    for rows in runs:
        rows = sorted(rows, key=lambda r: int(r["devices"]))
        devices = [int(r["devices"]) for r in rows]
        ticks.update(devices)
        label = _series_label(rows)
        ax.plot(devices, [float(r["plan_cpu_s"]) for r in rows], "o-", label=f"{label}: plan (CPU s)")
        ex = [r for r in rows if r.get("exhaustive_plan_cpu_s") not in (None, "")]
        if ex:
            ax.plot([int(r["devices"]) for r in ex], [float(r["exhaustive_plan_cpu_s"]) for r in ex], "^:",
                    label=f"{label}: exhaustive search")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(d) for d in sorted(ticks)])
    ax.set_xlabel("H100 devices (8 per machine)")
    ax.set_ylabel("seconds (plan_captured, capture excluded)")
    ax.set_title(f"fxshard plan {MODEL} (training) against cluster size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, nargs="+", default=list(MACHINES), help="machines of 8 H100s each")
    parser.add_argument("--exhaustive", action="store_true", help="also plan with exhaustive=True (no pruning)")
    parser.add_argument("--per-device", type=int, metavar="K",
                        help="batch of K samples per device (default: the zoo's batch, 8, on every cluster)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one cluster, one JSON line
    parser.add_argument("--md", type=Path)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--plot", type=Path, help="write a PNG of plan time against devices")
    parser.add_argument("--plot-csv", type=Path, nargs="+", metavar="CSV",
                        help="with --plot: draw these earlier runs' CSVs (rows of one batch rule per file; files "
                             "of the same rule are joined) instead of measuring")
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, exhaustive=args.exhaustive, per_device=args.per_device)))
        return 0
    if args.plot_csv:
        runs: dict[str, list[dict]] = {}
        for path in args.plot_csv:
            rows = _read_csv(path)
            runs.setdefault(_series_label(rows), []).extend(rows)
        _plot(list(runs.values()), args.plot or Path("plan_clusters.png"))
        return 0
    rows = []
    for n in args.machines:
        try:
            flags = [*(["--exhaustive"] if args.exhaustive else []),
                     *(["--per-device", str(args.per_device)] if args.per_device else [])]
            rows.append(run_child(__file__, ["--one", str(n), *flags], timeout_s=CHILD_TIMEOUT_S))
        except ChildError as e:
            print(f"{n}x{GPUS_PER_MACHINE}: {e}", file=sys.stderr)
    publish(to_markdown(rows), rows, md=args.md, csv_path=args.csv)
    if args.plot and rows:
        _plot([rows], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
