"""How fast the other ranks stop when one rank of a pipeline fails (CPU, gloo, 3 ranks).

    python benchmarks/fault_latency.py [--repeats 3]

Runs the scenarios of tests/test_faults.py (a 3-stage 1F1B pipeline; at step 2 one rank raises
in its loss, the first stage raises in forward, a middle rank dies, or the last rank hangs) and
prints, per scenario, the seconds from the failure to the end of each other rank's process.
The failed rank stays alive, so the others cannot rely on its exit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_faults import _run  # after the path insert above

SCENARIOS = [  # (what, mode, failing rank, process group timeout in s)
    ("last rank raises in its loss", "raise", 2, 60.0),
    ("first stage raises in forward", "raise", 0, 60.0),
    ("middle rank dies", "die", 1, 60.0),
    ("last rank hangs", "hang", 2, 5.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print("| scenario | process group timeout | others stopped after (s) |")
    print("|---|---|---|")
    for what, mode, failing, timeout in SCENARIOS:
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                failed_at, ended, _, _, _ = _run(mode, failing, timeout, Path(d))
                times += [ended[r] - failed_at for r in sorted(ended) if r != failing and failed_at is not None]
        shown = ", ".join(f"{t:.2f}" for t in times) or "did not stop"
        print(f"| {what} | {timeout:.0f} s | {shown} |", flush=True)


if __name__ == "__main__":
    main()
