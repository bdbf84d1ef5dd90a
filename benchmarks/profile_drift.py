"""Does the profile hold still when the machine does not? Profiling passes under an injected drift.

The ranking benchmark's eight GPT-2 plans (``plan_ranking.CANDIDATES``) are priced by the profiled
cost model ``--passes`` times (``plan_ranking.predict``), once per load pattern: a quiet machine,
then a memory-bound load (a second process copying 64 MiB back and forth on one thread) switched
on for ON seconds and off for OFF seconds beside the profile. A machine whose speed moves while
the profile measures is what the ranking benchmark met (docs/calibration.md, "Ranking plans");
the load makes it happen on purpose. For each pattern the report gives Kendall tau between every
two passes' orderings of the plans, and how far each plan's price moved between passes relative
to the others' (each pass divided by its median over plans; the spread of a plan's normalised price, median
and worst over plans). A profile that ranks the plans alike under every pattern is one a
drifting machine cannot reorder.

    python benchmarks/profile_drift.py --md drift.md --json drift.json
    python benchmarks/profile_drift.py --checkout ../old   # another checkout's fxshard, same plans

``--checkout DIR`` imports fxshard and ``plan_ranking`` from another checkout (an earlier commit),
so a change to how the profile measures is compared on the same machine with the same loads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOADS = ("none", "5/5", "1/1")  # seconds on / off of the memory-bound load
_HOG = """
import sys, time, torch
torch.set_num_threads(1)
on, off = float(sys.argv[1]), float(sys.argv[2])
a = torch.ones(8 * 2**20, dtype=torch.float64); b = torch.empty_like(a)
while True:
    t = time.monotonic()
    while time.monotonic() - t < on:
        b.copy_(a); a.copy_(b)
    time.sleep(off)
"""


def spread(passes: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(median, worst) over plans of how far a plan's price moved between passes, each pass divided
    by its median over plans: a drift that slows every plan alike moves nothing."""
    k = len(passes[0])
    levels = [statistics.median(p[j] for p in passes) for j in range(k)]
    moved = [(max(n) - min(n)) / statistics.fmean(n) for n in ([p[j] / levels[j] for j in range(k)] for p in passes)]
    return statistics.median(moved), max(moved)


def profile_under(load: str, passes: int, captured: object, plans: Sequence[object]) -> dict:
    """Profile ``passes`` times with ``load`` ("none" or "ON/OFF" seconds) running beside."""
    from plan_ranking import predict

    from fxshard.calibrate import kendall_tau

    hog = None if load == "none" else subprocess.Popen([sys.executable, "-c", _HOG, *load.split("/")])
    try:
        start = time.perf_counter()
        per_plan = [ps for _, _, ps in predict(captured, plans, passes=passes)]
        seconds = time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    taus = [kendall_tau([p[a] for p in per_plan], [p[b] for p in per_plan])
            for a in range(passes) for b in range(a + 1, passes)]
    median, worst = spread(per_plan)
    return {"load": load, "tau_between_passes": taus, "spread_median": median, "spread_worst": worst,
            "seconds": seconds, "passes_s": per_plan}


def to_markdown(rows: Sequence[dict], checkout: str, command: str) -> str:
    out = [f"`{command}`, fxshard from {checkout}", "",
           "| load (s on / off) | tau between passes | price moved between passes, median / worst | seconds |",
           "|---|---|---|---|"]
    for r in rows:
        taus = ", ".join(f"{t:.2f}" for t in r["tau_between_passes"])
        out.append(f"| {r['load']} | {taus} | {r['spread_median']:.1%} / {r['spread_worst']:.1%} | "
                   f"{r['seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3, help="profiling passes per load (default 3)")
    parser.add_argument("--loads", nargs="+", default=list(LOADS), help="'none' or ON/OFF seconds of load")
    parser.add_argument("--checkout", type=Path, default=HERE.parent,
                        help="the checkout whose fxshard and benchmarks/plan_ranking.py are used")
    parser.add_argument("--md", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    sys.path[:0] = [str(checkout), str(checkout / "benchmarks")]
    from plan_ranking import CANDIDATES, MODEL, make_plans

    import fxshard

    captured, plans = make_plans(MODEL, CANDIDATES)
    rows = [profile_under(load, args.passes, captured, plans) for load in args.loads]
    command = "python benchmarks/profile_drift.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = to_markdown(rows, str(Path(fxshard.__file__).parent.parent), command.strip())
    print(md)
    if args.md:
        args.md.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"checkout": str(checkout), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
