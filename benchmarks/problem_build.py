"""Time ``build_problem`` on a 1e5-node random DAG, with its node ids in and out of topological order.

The partitioners' problem compiler takes a fast path when the graph's node order is already a
topological order; this measures the other path too (node ids reversed, and with pins), where the
units are sorted by Kahn's algorithm. ``--against`` times another copy of ``problem.py`` (e.g. an
older revision, from ``git show REV:fxshard/passes/partition/problem.py``) interleaved with this one
and checks both build the same arrays.

Usage::

    python benchmarks/problem_build.py [--repeat 5] [--against /tmp/problem_old.py]

Results: docs/benchmarks.md, "Problem build with nodes out of order".
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import time
from pathlib import Path

import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from partitioners import random_dag  # noqa: E402

from fxshard.passes.partition import problem  # noqa: E402

__all__ = ["graphs", "main"]


def graphs(n: int = 100_000) -> dict[str, nx.DiGraph]:
    """The benchmark's graph in node order, reversed, reversed with 50 nodes pinned last."""
    ordered = random_dag(n, seed=0)
    reversed_ = nx.DiGraph()
    reversed_.add_nodes_from(reversed(list(ordered.nodes(data=True))))
    reversed_.add_edges_from(ordered.edges(data=True))
    pinned = reversed_.copy()
    for i in range(n // 2, n // 2 + 50):
        pinned.nodes[i]["pin"] = "last"
    return {"in order": ordered, "reversed": reversed_, "reversed, 50 pinned last": pinned}


def _digest(pr: problem.Problem) -> str:
    h = hashlib.sha256()
    for a in (pr.order, pr.unit_of, pr.succ_ptr, pr.succ, pr.val_src, pr.val_dst, pr.val_ptr, pr.compute, pr.pin):
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def _load(path: str):
    spec = importlib.util.spec_from_file_location("problem_against", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["problem_against"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--against", help="another problem.py to time alongside this one")
    args = parser.parse_args()
    versions = {"this": problem} | ({"against": _load(args.against)} if args.against else {})
    print("| graph | version | CPU s (best) | CPU s (median) | digest |\n|---|---|---|---|---|")
    for name, graph in graphs().items():
        times: dict[str, list[float]] = {v: [] for v in versions}
        for _ in range(args.repeat):
            for label, module in versions.items():  # interleaved, so load changes hit both alike
                start = time.process_time()
                module.build_problem(graph, 8)
                times[label].append(time.process_time() - start)
        for label, module in versions.items():
            ts = sorted(times[label])
            print(f"| {name} | {label} | {ts[0]:.2f} | {ts[len(ts) // 2]:.2f} | "
                  f"{_digest(module.build_problem(graph, 8))} |", flush=True)


if __name__ == "__main__":
    main()
