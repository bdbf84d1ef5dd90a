"""Hierarchical multi-machine partitioning against the flat DP and METIS, on clusters with slow links between machines.

Clusters of H100-80GB machines (NVLink4 inside a machine, 450 GB/s) joined by 100 Gb/s or 25 Gb/s
links (12.5 or 3.125 GB/s: link factors 36 and 144), 2x4, 2x8 and 4x8 devices, one stage per
device. Two suites, one row per (item, cluster, partitioner):

- ``zoo``: resnet, unet, inception, gpt2, llama-7b (on meta), training with Adam, one micro-batch of
  activations per stage; the cost graph is built once per (model, cluster) as ``partition_model``
  builds it (benchmarks/partitioners.py's pricing helper), so the seconds are ``partition_graph``'s.
- ``dag``: seeded random graphs: ``branchy`` (12 fork/join blocks of 4 parallel branches, heavy
  activations inside a branch and light ones at the forks and joins, numbered branch-interleaved
  as a breadth-first trace would), ``parallel chains`` (one block of 8 long branches: every machine
  boundary must run along branches) and ``chain`` (benchmarks/partitioners.py's chain with random
  skips, nearly one topological order).

Columns: the bottleneck, it over the flat DP's, the time spent on machine boundaries (the sum over
values of comm x link factor for each machine boundary the value crosses; the stage costs pay it
on both sides), the bytes crossing machines (zoo), seconds, and which candidate won (hierarchical).

Usage::

    python benchmarks/hierarchical.py            # everything (a few minutes)
    python benchmarks/hierarchical.py --quick    # 2x8 only, resnet, gpt2 and the random DAGs
    python benchmarks/hierarchical.py --md out.md --csv out.csv

Results and how to read them: docs/benchmarks.md, "Hierarchical partitioning".
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import networkx as nx
import numpy as np
from _suite import machine, publish
from partitioners import ZooCase, _price, check_plan, random_dag

import fxshard
from fxshard.errors import FxshardError
from fxshard.passes.partition import build_problem
from fxshard.passes.partition.hierarchical import hierarchical_search, machine_groups

__all__ = ["CLUSTERS", "INTER", "MODELS", "Row", "branchy_dag", "main", "run_dags", "run_zoo"]

CLUSTERS = ("2x4xH100-80GB", "2x8xH100-80GB", "4x8xH100-80GB")
INTER = {"100 Gb/s": 12.5e9, "25 Gb/s": 3.125e9}  # bytes/s between machines
PARTITIONERS = ("dp", "metis", "hierarchical")
# (model, micro-batch, sequence length)
MODELS = (("resnet", 32, None), ("unet", 16, None), ("inception", 32, None), ("gpt2", 8, 1024),
          ("llama-7b", 2, 2048))


@dataclass(frozen=True, kw_only=True)
class Row:
    """One partitioner on one (item, cluster, inter-machine link); times in seconds."""

    suite: str
    item: str
    cluster: str
    inter: str
    partitioner: str
    bottleneck: float = math.nan
    vs_dp: float = math.nan
    machine_cut: float = math.nan  # seconds on machine boundaries, summed over values and boundaries
    machine_bytes: float = math.nan
    seconds: float = math.nan
    winner: str = ""
    valid: bool | None = None
    error: str = ""


def branchy_dag(blocks: int, width: int, depth: int, *, seed: int = 0) -> nx.DiGraph:
    """``blocks`` fork/join blocks of ``width`` parallel chains of ``depth`` nodes, numbered interleaved.

    Inside a chain the activations are heavy (comm 0.5-1.5), at forks and joins light (0.01-0.05):
    the cheap machine cut runs along the chains, which the graph's own (interleaved) order splits.
    """
    rng = np.random.default_rng(seed)
    g = nx.DiGraph()

    def node(name: str) -> str:
        g.add_node(name, compute=float(rng.lognormal(0.0, 0.5)), memory=float(rng.uniform(0.5, 1.5)) * 1e6)
        return name

    prev = node("in")
    for b in range(blocks):
        lengths = rng.integers(max(1, depth // 2), depth + 1, width)
        chains = [[f"b{b}.{w}.{i}" for i in range(lengths[w])] for w in range(width)]
        for i in range(int(lengths.max())):  # interleaved: every chain's i-th node, then the (i+1)-th
            for w in range(width):
                if i < lengths[w]:
                    node(chains[w][i])
        join = node(f"b{b}.join")
        for chain in chains:
            g.add_edge(prev, chain[0], comm=float(rng.uniform(0.01, 0.05)))
            g.add_edges_from((x, y, {"comm": float(rng.uniform(0.5, 1.5))}) for x, y in zip(chain, chain[1:]))
            g.add_edge(chain[-1], join, comm=float(rng.uniform(0.01, 0.05)))
        prev = join
    return g


def machine_crossing(graph: nx.DiGraph, stage_of: Mapping, link: np.ndarray) -> tuple[float, float]:
    """(seconds, bytes) crossing machine boundaries: each value from its stage to its last consumer's,
    once per machine boundary on the way (the ``pipeline`` objective's forwarding)."""
    bounds = [g.stop - 1 for g in machine_groups(link)[:-1]]
    seconds = nbytes = 0.0
    for u in graph.nodes:
        out = list(graph.out_edges(u, data=True))
        if not out:
            continue
        a, b = stage_of[u], max(stage_of[v] for _, v, _ in out)
        crossed = [s for s in bounds if a <= s < b]
        if crossed:
            comm = max(d.get("comm") or 0.0 for _, _, d in out)
            seconds += sum(comm * link[s, s + 1] for s in crossed)
            nbytes += (out[0][2].get("bytes") or 0.0) * len(crossed)
    return seconds, nbytes


def _link(machines: int, per: int, factor: float) -> np.ndarray:
    m = np.repeat(np.arange(machines), per)
    return np.where(m[:, None] == m[None, :], 1.0, factor)


def _run(base: Row, graph: nx.DiGraph, k: int, *, limits: Sequence[float] | None, speeds: Sequence[float] | None,
         link: np.ndarray) -> list[Row]:
    rows = []
    for p in PARTITIONERS:
        row = replace(base, partitioner=p)
        start = time.perf_counter()
        try:
            part = fxshard.partition_graph(graph, k, partitioner=p, memory_limit=limits, speeds=speeds, link=link)
        except FxshardError as e:
            rows.append(replace(row, seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {e}"))
            continue
        seconds = time.perf_counter() - start
        winner = ""
        if p == "hierarchical":  # the search again, for its report (not timed)
            problem = build_problem(graph, k, memory_limit=limits, speeds=speeds, link=link)
            winner = hierarchical_search(problem).winner
        check = check_plan(graph, part.stage_of, k, limits)
        cut_s, cut_b = machine_crossing(graph, part.stage_of, link)
        rows.append(replace(row, bottleneck=part.bottleneck, machine_cut=cut_s, machine_bytes=cut_b, seconds=seconds,
                            winner=winner, valid=all(check.values())))
    dp = next((r for r in rows if r.partitioner == "dp" and not r.error), None)
    return [replace(r, vs_dp=r.bottleneck / dp.bottleneck) if dp and not r.error else r for r in rows]


def run_zoo(models: Sequence[tuple[str, int, int | None]], clusters: Sequence[str]) -> list[Row]:
    """Every partitioner on every (model, cluster, inter-machine link)."""
    from fxshard.devices import Link
    from fxshard.passes.cost_graph import cost_graph, placement

    cache: dict = {}
    rows = []
    for model, batch, seq in models:
        for spec in clusters:
            for inter, bandwidth in INTER.items():
                cluster = fxshard.Cluster.parse(spec, inter_link=Link(bandwidth=bandwidth, latency_s=5e-6, name=inter))
                k = cluster.num_devices
                case = ZooCase(model=model, cluster=spec, k=k, batch=batch, seq=seq)
                base = Row(suite="zoo", item=case.item, cluster=spec, inter=inter, partitioner="")
                try:
                    place = placement(cluster, k)
                    priced = _price(cache, case, place.reference)
                    graph = cost_graph(priced.captured, priced.costs[place.reference.name], link=place.reference_link,
                                       training=True, optimizer="adam", activation_factor=1.0)
                except FxshardError as e:
                    rows += [replace(base, partitioner=p, error=f"{type(e).__name__}: {e}") for p in PARTITIONERS]
                    continue
                rows += _run(base, graph, k, limits=place.memory_limit, speeds=place.speeds, link=place.link)
                print(f"  zoo {case.item} on {spec}, {inter}: done", file=sys.stderr, flush=True)
    return rows


def run_dags(clusters: Sequence[str], *, seeds: Sequence[int] = (0, 1)) -> list[Row]:
    """Every partitioner on the random DAGs, link factors built directly (intra 450 GB/s)."""
    rows = []
    graphs = {f"branchy 12x4x12 seed {s}": branchy_dag(12, 4, 12, seed=s) for s in seeds}
    graphs.update({f"parallel chains 1x8x48 seed {s}": branchy_dag(1, 8, 48, seed=s) for s in seeds})
    graphs.update({f"chain+skips n=2000 seed {s}": random_dag(2000, seed=s, max_span=50) for s in seeds})
    for name, graph in graphs.items():
        for spec in clusters:
            machines, per = (int(x) for x in spec.split("x")[:2])
            for inter, bandwidth in INTER.items():
                base = Row(suite="dag", item=name, cluster=spec.rsplit("x", 1)[0], inter=inter, partitioner="")
                rows += _run(base, graph, machines * per, limits=None, speeds=None,
                             link=_link(machines, per, 450e9 / bandwidth))
            print(f"  dag {name} on {spec}: done", file=sys.stderr, flush=True)
    return rows


def _num(x: float, fmt: str) -> str:
    return "" if x is None or math.isnan(x) else format(x, fmt)


def render(rows: Sequence[Row], *, zoo: bool) -> str:
    head = ["item", "cluster", "between machines", "partitioner", "bottleneck" + (" ms" if zoo else ""),
            "/ flat dp", "machine-boundary time" + (" ms" if zoo else "")]
    head += ["bytes across machines (MB)"] if zoo else []
    head += ["valid", "seconds", "winner"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    scale = 1e3 if zoo else 1.0
    for r in rows:
        cells = [r.item, r.cluster, r.inter, r.partitioner]
        if r.error:
            cells += [f"error: {r.error}"] + [""] * (len(head) - 5)
        else:
            cells += [_num(scale * r.bottleneck, ".4g"), _num(r.vs_dp, ".3f"), _num(scale * r.machine_cut, ".4g")]
            cells += [_num(r.machine_bytes / 1e6, ".4g")] if zoo else []
            cells += ["yes" if r.valid else "NO", _num(r.seconds, ".3f"), r.winner]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: Sequence[Row]) -> str:
    """Per suite: where hierarchical beats the flat DP and metis, by how much, and how often it ties."""
    out = []
    for suite in ("zoo", "dag"):
        by: dict[tuple, dict[str, Row]] = {}
        for r in rows:
            if r.suite == suite and not r.error:
                by.setdefault((r.item, r.cluster, r.inter), {})[r.partitioner] = r
        cases = [v for v in by.values() if {"dp", "metis", "hierarchical"} <= set(v)]
        if not cases:
            continue
        vs_dp = [v["hierarchical"].bottleneck / v["dp"].bottleneck for v in cases]
        vs_metis = [v["hierarchical"].bottleneck / v["metis"].bottleneck for v in cases]
        slower = [v["hierarchical"].seconds / v["metis"].seconds for v in cases]
        wins: dict[str, int] = {}
        for v in cases:
            wins[v["hierarchical"].winner] = wins.get(v["hierarchical"].winner, 0) + 1
        out.append(f"- {suite}: hierarchical / flat dp: below 1 on {sum(x < 1 - 1e-9 for x in vs_dp)}/{len(cases)} "
                   f"cases, best {min(vs_dp):.3f}, median {float(np.median(vs_dp)):.3f}, worst {max(vs_dp):.3f}; "
                   f"hierarchical / metis: below 1 on {sum(x < 1 - 1e-9 for x in vs_metis)}/{len(cases)}, best "
                   f"{min(vs_metis):.3f}, worst {max(vs_metis):.3f}; seconds / metis's: median "
                   f"{float(np.median(slower)):.1f}x; winning candidates: "
                   + ", ".join(f"{w} {c}" for w, c in sorted(wins.items())) + ".")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2x8 only; resnet, gpt2 and the random DAGs")
    p.add_argument("--models", nargs="+", choices=[m for m, _, _ in MODELS], help="zoo models (default: all)")
    p.add_argument("--md", help="also write the markdown")
    p.add_argument("--csv", help="also write every row as CSV")
    args = p.parse_args(argv)
    clusters = ("2x8xH100-80GB",) if args.quick else CLUSTERS
    wanted = args.models or (("resnet", "gpt2") if args.quick else [m for m, _, _ in MODELS])
    start = time.perf_counter()
    zoo = run_zoo([m for m in MODELS if m[0] in wanted], clusters)
    dags = run_dags(clusters)
    elapsed = time.perf_counter() - start
    text = (f"Zoo models (training, Adam, one micro-batch of activations per stage; H100-80GB machines):\n\n"
            f"{render(zoo, zoo=True)}\nRandom DAGs (units of the graph; intra-machine link 450 GB/s):\n\n"
            f"{render(dags, zoo=False)}\nSummary:\n\n{summary(zoo + dags)}\n"
            f"Total wall time {elapsed:.0f} s on {machine()}.\n")
    from pathlib import Path

    publish(text, [asdict(r) for r in zoo + dags], md=Path(args.md) if args.md else None,
            csv_path=Path(args.csv) if args.csv else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
