"""Every registered partitioner on one suite: public instances, zoo models on clusters, a 1e5-node DAG.

Three parts, one row per (item, partitioner):

- ``public``: the four instances of Tarnawski et al. (NeurIPS 2020) in
  ``benchmarks/data/dnn-partitioning`` (vendored, MIT), under their own max-load objective (``objective="direct"``),
  next to the reference values that directory's README publishes and the optimum the ``milp``
  partitioner proves (where it is registered and proves one within its time limit).
- ``zoo``: the built-in models, captured and priced once per (model, device), on realistic
  clusters in training with Adam (pipeline objective). The cost graph is built once per
  (model, cluster) exactly as ``partition_model`` builds it, so the seconds measure
  ``partition_graph`` alone (problem compilation + partitioner).
- ``scale``: a seeded random DAG of 1e5 nodes (a chain plus random forward skips), k = 8,
  timed end to end through ``partition_graph``.

Usage::

    python benchmarks/partitioners.py                         # everything (a few minutes)
    python benchmarks/partitioners.py --quick                 # public instances, resnet and gpt2
    python benchmarks/partitioners.py --md out.md --csv out.csv --data path/to/dnn-partitioning

Results and how to read them: docs/benchmarks.md, "Partitioners".
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import networkx as nx
import numpy as np
from _suite import machine, publish

import fxshard
from fxshard.errors import FxshardError

__all__ = ["PUBLIC_REFERENCE", "ZOO_CASES", "Row", "ZooCase", "check_plan", "main", "run_public", "run_scale",
           "run_zoo"]

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "dnn-partitioning"
BASELINES = ("uniform", "params", "layers")
# Exact solvers for a few hundred units, with a time limit: run on the public instances only
# (the zoo graphs and the 1e5-node graph are over their unit limit or would take the limit each).
PUBLIC_ONLY = ("milp",)
MILP_TIME_LIMIT = 60.0

# Reference values for k = maxFPGAs = 6, copied from data/dnn-partitioning/README.md
# ("Reference values"): the authors' exact DP optimum over contiguous splits, and what
# PipeDream's partitioner reaches. None where the README gives no number (the exact DP on
# inceptionv3 runs > 10 min; PipeDream was not reported on resnet50).
PUBLIC_REFERENCE: dict[str, tuple[float | None, float | None]] = {
    "bert24_inference": (17.790, 17.790),
    "gnmt_inference": (32.911, 33.031),
    "resnet50_inference": (34.223, None),
    "inceptionv3_inference": (None, 60.417),
}


@dataclass(frozen=True, kw_only=True)
class ZooCase:
    """One model on one cluster: micro-batch shape, stages and activation memory factor.

    ``activation_factor`` is the number of micro-batches whose activations a stage keeps
    (1F1B: the first stage holds k of them, so k is the worst case).
    """

    model: str
    cluster: str
    k: int
    batch: int
    seq: int | None = None
    activation_factor: float = 1.0
    group: Literal["heavy-head", "unet", "uniform-decoder", "vision"] = "vision"

    @property
    def item(self) -> str:
        shape = f"b{self.batch}" + (f" s{self.seq}" if self.seq else "")
        return f"{self.model} ({shape})"

    @property
    def config(self) -> str:
        return f"{self.cluster}, k={self.k}, act x{self.activation_factor:g}"


# Micro-batch shapes are picked so that Adam state + activations of k micro-batches in flight
# fit; llama-70b does not fit that way on 16 x 80 GB (the error row says by how much), so it
# also runs with one micro-batch of activations per stage.
ZOO_CASES: tuple[ZooCase, ...] = tuple(
    ZooCase(model=m, cluster=c, k=k, batch=b, seq=t, activation_factor=a, group=g)
    for m, c, k, b, t, a, g in (
        ("resnet", "4xA100-80GB", 4, 32, None, 4, "vision"),
        ("resnet", "4xV100-32GB", 4, 32, None, 4, "vision"),
        ("unet", "4xA100-80GB", 4, 16, None, 4, "unet"),
        ("unet", "4xV100-32GB", 4, 16, None, 4, "unet"),
        ("inception", "4xA100-80GB", 4, 32, None, 4, "vision"),
        ("inception", "4xV100-32GB", 4, 32, None, 4, "vision"),
        ("gpt2", "4xA100-80GB", 4, 8, 1024, 4, "heavy-head"),
        ("gpt2", "8xL4", 8, 8, 1024, 8, "heavy-head"),
        ("gpt2-xl", "8xA100-40GB", 8, 8, 1024, 8, "heavy-head"),
        ("llama-7b", "8xH100-80GB", 8, 2, 2048, 8, "uniform-decoder"),
        ("llama-7b", "2x4xA100-80GB", 8, 2, 2048, 8, "uniform-decoder"),
        ("llama-70b", "2x8xH100-80GB", 16, 1, 4096, 16, "uniform-decoder"),
        ("llama-70b", "2x8xH100-80GB", 16, 1, 4096, 1, "uniform-decoder"),
    ))
QUICK_MODELS = ("resnet", "gpt2")


@dataclass(frozen=True, kw_only=True)
class Row:
    """One partitioner on one suite item; times in seconds, memory in bytes (raw units on ``public``)."""

    suite: Literal["public", "zoo", "scale"]
    item: str
    config: str
    partitioner: str
    bottleneck: float = math.nan
    lower_bound: float = math.nan
    ratio_best: float = math.nan  # filled in once the item's rows are all in
    cut: float = math.nan
    cut_bytes: float = math.nan  # zoo only: bytes sent between stages per micro-batch
    max_stage_memory: float = math.nan
    memory_limit: float = math.nan  # the smallest stage's limit
    acyclic: bool | None = None  # recomputed from the graph by check_plan
    colocated: bool | None = None
    fits_memory: bool | None = None
    agrees: bool | None = None  # check_plan agrees with Partition.is_acyclic / fits_memory
    seconds: float = math.nan  # partition_graph end to end (scale: best of the repeats)
    seconds_median: float = math.nan  # scale only: median of the repeats
    cpu_seconds: float = math.nan  # process CPU time of the same call (scale: best); what others' load can't inflate
    partitioner_seconds: float = math.nan  # the partitioner function alone
    optimum: float | None = None  # public only (README)
    proven: float | None = None  # public only: the optimum milp proves (None: not registered, not proven)
    pipedream: float | None = None  # public only (README)
    group: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def valid(self) -> bool:
        return bool(self.acyclic and self.colocated and self.fits_memory)

    @property
    def ratio_lb(self) -> float:
        return self.bottleneck / self.lower_bound if self.lower_bound > 0 else math.nan

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(ratio_lb=self.ratio_lb, valid=self.valid if self.ok else None)
        return data


def check_plan(graph: nx.DiGraph, stage_of: Mapping, k: int, limits: float | Sequence[float] | None) -> dict:
    """Validity recomputed from the graph, independently of the library's own flags.

    acyclic: every edge goes to the same or a later stage and pins hold; colocated: nodes sharing
    a ``colocate`` value share a stage; fits_memory: every stage within its limit.
    """
    acyclic = all(stage_of[u] <= stage_of[v] for u, v in graph.edges)
    groups: dict = {}
    memory = np.zeros(k)
    for n, d in graph.nodes(data=True):
        pin = d.get("pin")
        if (pin == "first" and stage_of[n] != 0) or (pin == "last" and stage_of[n] != k - 1):
            acyclic = False
        if d.get("colocate") is not None:
            groups.setdefault(d["colocate"], set()).add(stage_of[n])
        memory[stage_of[n]] += d.get("memory") or 0.0
    limit = np.broadcast_to(np.asarray(math.inf if limits is None else limits, dtype=float), (k,))
    return {"acyclic": acyclic, "colocated": all(len(v) == 1 for v in groups.values()),
            "fits_memory": bool(np.all(memory <= limit * (1 + 1e-9)))}


def _measure(row: Row, run: Callable[[], fxshard.Partition], graph: nx.DiGraph,
             limits: float | Sequence[float] | None, *, cut_bytes: bool = False) -> Row:
    """Run one partition (timed), fill the row from it (or from its error), check it independently."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        part = run()
    except FxshardError as e:
        return replace(row, seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    check = check_plan(graph, part.stage_of, part.k, limits)
    if cut_bytes:
        from fxshard.passes.cost_graph import stage_bytes

        check["cut_bytes"] = stage_bytes(graph, part.stage_of)
    agrees = (part.is_acyclic, part.fits_memory) == (check["acyclic"] and check["colocated"], check["fits_memory"])
    return replace(row, bottleneck=part.bottleneck, lower_bound=part.lower_bound, cut=part.cut,
                   max_stage_memory=max(part.stage_memory), seconds=seconds, cpu_seconds=cpu,
                   partitioner_seconds=part.seconds,
                   agrees=agrees, **check)


def with_ratio_best(rows: list[Row]) -> list[Row]:
    """The rows with ratio_best: bottleneck over the best valid bottleneck on the same item and config."""
    best: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r.ok and r.valid:
            key = (r.suite, r.item, r.config)
            best[key] = min(best.get(key, math.inf), r.bottleneck)
    return [replace(r, ratio_best=r.bottleneck / best[(r.suite, r.item, r.config)])
            if r.ok and (r.suite, r.item, r.config) in best else r for r in rows]


# ---------------------------------------------------------------- public instances


def proven_optimum(inst) -> float | None:
    """The optimum the ``milp`` partitioner proves on an instance, or None (not registered, too
    many units, or stopped by its time limit)."""
    if "milp" not in fxshard.partitioners():
        return None
    from fxshard.passes.partition.milp import milp_solve

    from fxshard.passes.partition import build_problem

    problem = build_problem(inst.graph, inst.k, memory_limit=inst.memory_limit, objective="direct")
    try:
        result = milp_solve(problem, time_limit=MILP_TIME_LIMIT)
    except FxshardError:
        return None
    return result.objective if result.status == "optimal" else None


def run_public(data_dir: Path, names: Sequence[str]) -> list[Row]:
    """Every partitioner on every public instance, objective ``direct``."""
    from fxshard.passes.partition.instances import load_tarnawski

    if not data_dir.is_dir():
        raise SystemExit(f"no instance directory at {data_dir}; pass --data DIR (the dnn-partitioning data)")
    rows = []
    for name, (optimum, pipedream) in PUBLIC_REFERENCE.items():
        inst = load_tarnawski(data_dir / f"{name}.json")
        proven = proven_optimum(inst)
        for p in names:
            row = Row(suite="public", item=name, config=str(inst.k), partitioner=p, optimum=optimum, proven=proven,
                      pipedream=pipedream, memory_limit=inst.memory_limit)
            rows.append(_measure(row, partial(fxshard.partition_graph, inst.graph, inst.k, partitioner=p,
                                              memory_limit=inst.memory_limit, objective="direct"),
                                 inst.graph, inst.memory_limit))
        print(f"  public {name}: done", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- zoo models


@dataclass
class _Priced:
    """A captured model with its analysis and its costs per device name."""

    captured: object
    works: list
    costs: dict = field(default_factory=dict)
    seconds: float = 0.0
    dtype: str = ""
    params: int = 0


def _price(cache: dict, case: ZooCase, spec: fxshard.DeviceSpec) -> _Priced:
    from fxshard.capture import capture
    from fxshard.cost_models import analyze, estimate
    from fxshard.zoo import build

    key = (case.model, case.batch, case.seq)
    if key not in cache:
        start = time.perf_counter()
        z = build(case.model, batch_size=case.batch, seq_len=case.seq)
        captured = capture(z.model, z.example_inputs)
        dtype = str(next(z.model.parameters()).dtype).removeprefix("torch.")
        cache[key] = _Priced(captured=captured, works=analyze(captured), seconds=time.perf_counter() - start,
                             dtype=dtype, params=z.num_params)
    priced = cache[key]
    if spec.name not in priced.costs:
        start = time.perf_counter()
        priced.costs[spec.name] = estimate(priced.captured, spec, works=priced.works)
        priced.seconds += time.perf_counter() - start
    return priced


def block_share(graph: nx.DiGraph) -> float:
    """Compute outside the repeated blocks (embeddings, LM head, stems) over one mean block's."""
    per_block: dict[str, float] = {}
    outside = 0.0
    for _, d in graph.nodes(data=True):
        if d.get("layer"):
            per_block[d["layer"]] = per_block.get(d["layer"], 0.0) + d["compute"]
        else:
            outside += d["compute"]
    if not per_block:
        return math.nan
    return outside / (sum(per_block.values()) / len(per_block))


def has_unique_order(graph: nx.DiGraph) -> bool:
    """True if the DAG has one topological order: then every acyclic split is a contiguous split of
    it, and ``dp`` (exact over that order) is the exact optimum."""
    order = list(nx.topological_sort(graph))
    return all(graph.has_edge(a, b) for a, b in itertools.pairwise(order))


def run_zoo(cases: Sequence[ZooCase], names: Sequence[str]) -> tuple[list[Row], dict[str, dict]]:
    """Every partitioner on every case; returns rows and per-case facts (nodes, block share, pricing time)."""
    from fxshard.passes.cost_graph import cost_graph, placement

    cache: dict = {}
    facts: dict[str, dict] = {}
    rows = []
    for case in cases:
        cluster = fxshard.Cluster.parse(case.cluster)
        base = {"suite": "zoo", "item": case.item, "config": case.config, "group": case.group}
        try:
            place = placement(cluster, case.k)  # homogeneous devices: no re-analysis
            priced = _price(cache, case, place.reference)
            if len({cluster.devices[d].spec.name for d in place.devices}) > 1:  # speeds need the graph
                place = placement(cluster, case.k, captured=priced.captured, works=priced.works)
            graph = cost_graph(priced.captured, priced.costs[place.reference.name], link=place.reference_link,
                               training=True, optimizer="adam", activation_factor=case.activation_factor)
        except FxshardError as e:
            rows += [Row(partitioner=p, error=f"{type(e).__name__}: {e}", **base) for p in names]
            continue
        facts[f"{case.item} / {case.config}"] = {
            "nodes": graph.number_of_nodes(), "block_share": block_share(graph), "pricing_s": priced.seconds,
            "dtype": priced.dtype, "params": priced.params, "unique_order": has_unique_order(graph),
            "memory": sum(d["memory"] for _, d in graph.nodes(data=True)), "limit": sum(place.memory_limit)}
        for p in names:
            row = Row(partitioner=p, memory_limit=min(place.memory_limit), **base)
            rows.append(_measure(row, partial(fxshard.partition_graph, graph, case.k, partitioner=p,
                                              memory_limit=place.memory_limit, speeds=place.speeds,
                                              link=place.link), graph, place.memory_limit, cut_bytes=True))
        print(f"  zoo {case.item} on {case.config}: done", file=sys.stderr, flush=True)
    return rows, facts


# ---------------------------------------------------------------- synthetic scale


def random_dag(n: int, *, seed: int = 0, skips: float = 0.5, max_span: int = 200) -> nx.DiGraph:
    """A chain 0 -> 1 -> ... -> n-1 plus ``skips * n`` random forward edges spanning up to ``max_span``."""
    rng = np.random.default_rng(seed)
    compute = rng.lognormal(0.0, 0.5, n)
    memory = rng.uniform(0.5, 1.5, n) * 1e6
    comm = rng.uniform(0.0, 0.2, n)
    src = rng.integers(0, n - 2, int(skips * n))
    dst = np.minimum(src + rng.integers(2, max_span + 1, src.size), n - 1)
    g = nx.DiGraph()
    g.add_nodes_from((i, {"compute": float(compute[i]), "memory": float(memory[i])}) for i in range(n))
    g.add_edges_from((i, i + 1, {"comm": float(comm[i])}) for i in range(n - 1))
    g.add_edges_from((int(a), int(b), {"comm": float(comm[a])}) for a, b in zip(src, dst))
    return g


def run_scale(n: int, k: int, names: Sequence[str], *, repeat: int = 5, seed: int = 0) -> tuple[list[Row], dict]:
    """Time ``partition_graph`` (problem build + partitioner) on a random n-node DAG, best of ``repeat``.

    Twice: without memory limits, and with every stage limited to 1.5x the average memory.
    """
    start = time.perf_counter()
    g = random_dag(n, seed=seed)
    gen_s = time.perf_counter() - start
    total_mem = sum(d["memory"] for _, d in g.nodes(data=True))
    item = f"random DAG n={n} e={g.number_of_edges()}"
    rows, times = [], {}
    for config, limit in ((f"k={k}, no memory limit", None), (f"k={k}, memory 1.5x avg", 1.5 * total_mem / k)):
        for p in names:
            runs = []
            for _ in range(repeat):
                row = Row(suite="scale", item=item, config=config, partitioner=p,
                          memory_limit=math.inf if limit is None else limit)
                runs.append(_measure(row, partial(fxshard.partition_graph, g, k, partitioner=p,
                                                  memory_limit=limit, seed=seed), g, limit))
            secs = [r.seconds for r in runs]
            times[(config, p)] = secs
            # Best of the repeats, as timeit advises (other processes only ever add time); median kept too.
            rows.append(replace(runs[-1], seconds=min(secs), seconds_median=statistics.median(secs),
                                cpu_seconds=min(r.cpu_seconds for r in runs),
                                partitioner_seconds=min(r.partitioner_seconds for r in runs)))
            print(f"  scale {config} {p}: {', '.join(f'{s:.2f}' for s in secs)} s", file=sys.stderr, flush=True)
    return rows, {"generate_s": gen_s, "times": times, "edges": g.number_of_edges()}


# ---------------------------------------------------------------- rendering


def _num(x: float | None, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return format(x, fmt)


def _bytes(x: float) -> str:
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "none"
    return f"{x / 2**30:.1f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def _valid(r: Row) -> str:
    if r.valid:
        return "yes"
    why = [w for w, bad in (("cyclic", not r.acyclic), ("colocation split", not r.colocated),
                            ("over memory", not r.fits_memory)) if bad]
    return "NO (" + ", ".join(why) + ")"


def _optimum(r: Row) -> float | None:
    """The README's optimum, else the one milp proved."""
    return r.optimum or r.proven


Column = tuple[str, Callable[[Row], str]]
_LEAD: tuple[Column, ...] = (("item", lambda r: r.item), ("config", lambda r: r.config),
                             ("partitioner", lambda r: r.partitioner))
PUBLIC_COLUMNS: tuple[Column, ...] = (
    ("max-load", lambda r: _num(r.bottleneck, ".3f")), ("/ lower bound", lambda r: _num(r.ratio_lb, ".3f")),
    ("/ best", lambda r: _num(r.ratio_best, ".3f")), ("README optimum", lambda r: _num(r.optimum, ".3f") or "unknown"),
    ("milp optimum", lambda r: _num(r.proven, ".3f") or "-"),
    ("/ optimum", lambda r: _num(r.bottleneck / _optimum(r), ".3f") if _optimum(r) else ""),
    ("PipeDream", lambda r: _num(r.pipedream, ".3f") or "-"),
    ("/ PipeDream", lambda r: _num(r.bottleneck / r.pipedream, ".3f") if r.pipedream else ""),
    ("cut", lambda r: _num(r.cut, ".2f")), ("max stage mem", lambda r: _bytes(r.max_stage_memory)),
    ("valid", lambda r: _valid(r)), ("seconds", lambda r: _num(r.seconds, ".3f")))
ZOO_COLUMNS: tuple[Column, ...] = (
    ("bottleneck ms", lambda r: _num(1e3 * r.bottleneck, ".4g")), ("/ lower bound", lambda r: _num(r.ratio_lb, ".3f")),
    ("/ best", lambda r: _num(r.ratio_best, ".3f")), ("cut ms", lambda r: _num(1e3 * r.cut, ".3g")),
    ("cut MB", lambda r: _num(r.cut_bytes / 1e6, ".4g")),
    ("max stage mem (limit)", lambda r: f"{_bytes(r.max_stage_memory)} ({_bytes(r.memory_limit)})"),
    ("valid", lambda r: _valid(r)), ("seconds", lambda r: _num(r.seconds, ".3f")))
SCALE_COLUMNS: tuple[Column, ...] = (
    ("bottleneck", lambda r: _num(r.bottleneck, ".5g")), ("/ lower bound", lambda r: _num(r.ratio_lb, ".4f")),
    ("/ best", lambda r: _num(r.ratio_best, ".4f")), ("cut", lambda r: _num(r.cut, ".4g")),
    ("valid", lambda r: _valid(r)), ("seconds (best)", lambda r: _num(r.seconds, ".3f")),
    ("seconds (median)", lambda r: _num(r.seconds_median, ".3f")), ("CPU s (best)", lambda r: _num(r.cpu_seconds, ".3f")),
    ("partitioner alone s (best)", lambda r: _num(r.partitioner_seconds, ".3f")))


def render(rows: list[Row], columns: Sequence[Column], lead_names: Sequence[str]) -> str:
    """A markdown table; when every partitioner failed the same way on an item, one row says so."""
    head = list(lead_names) + [h for h, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shown: set[tuple[str, str]] = set()
    for r in rows:
        cells = [f(r) for _, f in _LEAD]
        if r.ok:
            cells += [f(r) for _, f in columns]
        else:
            if all(o.error == r.error for o in rows if (o.item, o.config) == (r.item, r.config)):
                if (r.item, r.config) in shown:
                    continue
                shown.add((r.item, r.config))
                cells[-1] = "all"
            cells += [f"error: {r.error}"] + [""] * (len(columns) - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    """The machine and versions (benchmarks/_suite.py), with numpy's, networkx's and the load at the end."""
    import os

    return (f"{machine()}, numpy {np.__version__}, networkx {nx.__version__}; load average at the "
            f"end {os.getloadavg()[0]:.1f}")


def _revision() -> str:
    """The commit measured, and the library files that differed from it (others' edits in flight)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxshard"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"commit `{head}`" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def _find(rows: list[Row], **want: str) -> list[Row]:
    return [r for r in rows if all(getattr(r, k) == v for k, v in want.items())]


def summary(rows: list[Row], zoo_facts: dict, scale_facts: dict | None) -> str:
    """One line per target: met / NOT met / not checked, with the numbers."""
    out = []

    def verdict(ok: bool | None) -> str:
        return "not checked" if ok is None else ("met" if ok else "NOT met")

    # 1. metis within 1% of the exact optimum on every public instance; inceptionv3 within 2% of sum/k.
    public = _find(rows, suite="public", partitioner="metis")
    if public:
        parts, ok, unknown = [], True, False
        for r in public:
            best = _optimum(r)
            if not r.ok:
                parts.append(f"{r.item}: error")
                ok = False
            elif best:
                gap = r.bottleneck / best - 1
                ok &= gap <= 0.01
                source = "README" if r.optimum else "milp-proven"
                parts.append(f"{r.item} {r.bottleneck:.3f} vs {source} {best:.3f} ({100 * gap:+.2f}%)")
            else:
                unknown = True
                parts.append(f"{r.item} {r.bottleneck:.3f}: optimum unknown, {100 * (r.ratio_lb - 1):+.2f}% over "
                             f"the lower bound {r.lower_bound:.3f} (so at most that far from the optimum)")
        out.append(f"- metis within 1% of the exact optimum on every public instance: "
                   f"{verdict(None if ok and unknown else ok)}; "
                   + "; ".join(parts) + ".")
        inc = [r for r in public if r.item == "inceptionv3_inference" and r.ok]
        if inc:
            r = inc[0]
            out.append(f"- inceptionv3 at or below 1.02x the sum/k bound ({r.lower_bound:.2f}): "
                       f"{verdict(r.ratio_lb <= 1.02)} (metis {r.bottleneck:.3f}, {r.ratio_lb:.4f}x); below "
                       f"PipeDream's {r.pipedream:.3f}: {verdict(r.bottleneck < r.pipedream)} "
                       f"({100 * (r.bottleneck / r.pipedream - 1):+.1f}%).")

    # 2. every plan acyclic.
    done = [r for r in rows if r.ok]
    acyclic = sum(1 for r in done if r.acyclic)
    fits = sum(1 for r in done if r.fits_memory)
    errors = len(rows) - len(done)
    agree = sum(1 for r in done if r.agrees)
    out.append(f"- 100% of plans acyclic: {verdict(acyclic == len(done))} ({acyclic}/{len(done)} plans, rechecked "
               f"edge by edge on the input graph; {fits}/{len(done)} also fit memory; the recheck agrees with the "
               f"library's is_acyclic / fits_memory on {agree}/{len(done)}; {errors} runs raised an error and "
               "returned no plan).")

    # 3. 1e5 nodes in under 1 s.
    if scale_facts:
        scale = _find(rows, suite="scale")
        parts, ok = [], True
        for config in dict.fromkeys(r.config for r in scale):
            for r in (r for r in scale if r.config == config and r.partitioner in ("metis", "dp")):
                secs = scale_facts["times"][(config, r.partitioner)]
                ok &= r.ok and r.seconds < 1.0
                parts.append(f"{r.partitioner} with {config.split(', ', 1)[1]}: {verdict(r.ok and r.seconds < 1.0)}, "
                             f"best {r.seconds:.2f} s, median {r.seconds_median:.2f} s of {len(secs)} runs, "
                             f"CPU {r.cpu_seconds:.2f} s (partitioner alone {r.partitioner_seconds:.2f} s)")
        out.append(f"- a 1e5-node graph in under 1 s, partition_graph end to end: {verdict(ok)}; {scale[0].item}, "
                   f"k={scale[0].config.split(',')[0].removeprefix('k=')}: " + "; ".join(parts)
                   + f" (building the networkx graph, not counted: {scale_facts['generate_s']:.1f} s).")

    # 4. heavy heads and U-Net: metis >= 1.3x better than every baseline.
    zoo_groups = {}
    for r in _find(rows, suite="zoo"):
        zoo_groups.setdefault((r.item, r.config), {})[r.partitioner] = r
    heavy, uniform = [], []
    for (item, config), by_p in zoo_groups.items():
        m = by_p.get("metis")
        if m is None or not m.ok:
            continue
        share = zoo_facts.get(f"{item} / {config}", {}).get("block_share", math.nan)
        if m.group in ("heavy-head", "unet"):
            # The best any plan can do against a baseline: its bottleneck over the lower bound, or
            # over the exact optimum (dp) when the graph has a single topological order.
            fact = zoo_facts.get(f"{item} / {config}", {})
            floor = by_p["dp"].bottleneck if fact.get("unique_order") and by_p.get("dp", m).ok else m.lower_bound
            factors = {p: (by_p[p].bottleneck / m.bottleneck, by_p[p].bottleneck / floor) for p in BASELINES
                       if p in by_p and by_p[p].ok}
            heavy.append((item, config, factors, share))
        elif m.group == "uniform-decoder" and "layers" in by_p and by_p["layers"].ok:
            uniform.append((item, config, m.bottleneck / by_p["layers"].bottleneck - 1, share, by_p["layers"]))
    if heavy:
        ok = all(f >= 1.3 for _, _, factors, _ in heavy for f, _ in factors.values())
        parts = [f"{item} on {config}: " + ", ".join(
                     f"{p} {f:.2f}x" + (f" (no plan can exceed {cap:.2f}x)" if f < 1.3 else "")
                     for p, (f, cap) in factors.items())
                 + (f"; non-block compute = {share:.1f} blocks" if not math.isnan(share) else "")
                 for item, config, factors, share in heavy]
        out.append("- heavy embeddings / LM heads and U-Net, metis >= 1.3x better than uniform, params and layers: "
                   f"{verdict(ok)}; baseline bottleneck / metis bottleneck (the cap is the baseline's bottleneck over "
                   "the lower bound, or over the exact optimum where the graph has one topological order): "
                   + "; ".join(parts) + ".")
    if uniform:
        ok = all(d <= 0.01 for _, _, d, _, _ in uniform)
        parts = [f"{item} on {config}: {100 * d:+.2f}%" + ("" if lay.valid else " (layers plan over memory)")
                 + f" (non-block compute = {share:.2f} blocks)" for item, config, d, share, lay in uniform]
        out.append(f"- uniform decoders, metis never more than 1% worse than layers: {verdict(ok)}; metis vs layers: "
                   + "; ".join(parts) + ".")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"instance directory (default {DEFAULT_DATA})")
    p.add_argument("--quick", action="store_true", help=f"public instances and {' and '.join(QUICK_MODELS)} only")
    p.add_argument("--models", nargs="+", choices=sorted({c.model for c in ZOO_CASES}),
                   help="zoo models to run (default: all in the suite)")
    p.add_argument("--partitioners", nargs="+", help="default: every registered one")
    p.add_argument("--scale-nodes", type=int, default=100_000)
    p.add_argument("--scale-k", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5, help="timing repeats on the scale graph (best and median shown)")
    p.add_argument("--md", type=Path, help="also write the markdown tables and summary")
    p.add_argument("--csv", type=Path, help="also write every row as CSV")
    args = p.parse_args(argv)

    names = args.partitioners or fxshard.partitioners()
    models = args.models or (QUICK_MODELS if args.quick else sorted({c.model for c in ZOO_CASES}))
    cases = [c for c in ZOO_CASES if c.model in models]

    start = time.perf_counter()
    rows = run_public(args.data, names)
    big = [p for p in names if p not in PUBLIC_ONLY]
    zoo_rows, zoo_facts = run_zoo(cases, big)
    rows += zoo_rows
    scale_facts = None
    if not args.quick:
        scale_rows, scale_facts = run_scale(args.scale_nodes, args.scale_k, big, repeat=args.repeat)
        rows += scale_rows
    rows = with_ratio_best(rows)
    elapsed = time.perf_counter() - start

    table = render(_find(rows, suite="public"), PUBLIC_COLUMNS, ("instance", "k", "partitioner"))
    sections = [f"Public instances (objective `direct`, units of the files):\n\n{table}"]
    if zoo_rows:
        notes = "\n".join(f"- {key}: {f['params'] / 1e6:,.0f}M params in {f['dtype']}, {f['nodes']} nodes, "
                          f"{'one topological order (dp exact), ' if f['unique_order'] else ''}"
                          f"non-block compute = {f['block_share']:.2f} mean blocks, "
                          f"memory {f['memory'] / 2**30:.0f} GiB of {f['limit'] / 2**30:.0f} GiB, "
                          f"capture+analyze+estimate {f['pricing_s']:.1f} s (shared across clusters)"
                          for key, f in zoo_facts.items())
        table = render(_find(rows, suite="zoo"), ZOO_COLUMNS, ("model (micro-batch)", "cluster, k, activations",
                                                               "partitioner"))
        sections.append(f"Zoo models (training, Adam, objective `pipeline`):\n\n{table}\n{notes}\n")
    if scale_facts:
        table = render(_find(rows, suite="scale"), SCALE_COLUMNS, ("graph", "k, memory", "partitioner"))
        sections.append(f"Synthetic scale:\n\n{table}")
    sections.append(f"Targets:\n\n{summary(rows, zoo_facts, scale_facts)}")
    sections.append(f"Total wall time {elapsed:.0f} s at {_revision()}, on {_machine()}.\n")
    publish("\n".join(sections), [r.as_dict() for r in rows], md=args.md, csv_path=args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
