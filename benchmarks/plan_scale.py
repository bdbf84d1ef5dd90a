"""Plan time and peak RSS of ``fxshard.plan`` for decoder LMs from 124M to 70B parameters, next to
upstream ``torch.distributed.pipelining.pipeline()`` with hand-given split points on the 70B model.

Every model is built on the meta device in bfloat16 (the shapes and the build in benchmarks/_suite.py,
shared with benchmarks/capture_scale.py) and measured in its own subprocess, so each peak RSS is
that run's alone. The fxshard side times ``fxshard.plan(model, devices, (tokens,), **options)`` end to end
(capture, cost, partition, search) on a realistic cluster per size; a model for which no training
plan fits (``PlanError``) is planned again for inference in a fresh child, so there is a plan time
to report. The upstream side times ``pipeline(module=model, mb_args=(micro_batch_tokens,),
split_spec=...)`` with a split point at the start of every ``n_layers / stages``-th block.
The parent only collects the children's JSON lines, renders the table and the ratio
fxshard seconds / upstream seconds, both measured in the same run.

Usage::

    python benchmarks/plan_scale.py                          # the whole suite, upstream on llama2-70b
    python benchmarks/plan_scale.py --models gpt2-small llama2-70b --md out.md --csv out.csv
    python benchmarks/plan_scale.py --models llama-7b --upstream-model llama-7b --upstream-stages 4 8
    python benchmarks/plan_scale.py --one llama2-70b --mode inference     # child: one JSON line
    python benchmarks/plan_scale.py --one llama2-70b --tool upstream --upstream-stages 8  # child

Results and how to read them: docs/benchmarks.md, "Plan scale".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from _suite import (
    BY_NAME,
    ChildError,
    ModelSpec,
    build,
    count,
    current_rss_mb,
    machine,
    max_rss_mb,
    publish,
    run_child,
)

__all__ = ["SUITE", "ModelSpec", "Result", "main", "measure_fxshard", "measure_upstream", "ratio_lines",
           "run_suite", "split_spec", "to_markdown"]

CHILD_TIMEOUT_S = 600
RSS_GOAL_MB = 2000  # "under 2 GB RSS"

# The shared suite less llama-30b; each model is planned on the cluster its ``devices`` names.
SUITE: tuple[ModelSpec, ...] = tuple(
    BY_NAME[n] for n in ("gpt2-small", "gpt2-medium", "gpt2-xl", "llama-7b", "llama-13b", "llama2-70b"))
_BY_NAME = {s.name: s for s in SUITE}


@dataclass(frozen=True, kw_only=True)
class Result:
    """One run (one table row): ``fxshard.plan`` in one mode, or upstream ``pipeline()`` at one stage count."""

    model: str
    tool: Literal["fxshard", "upstream"]
    mode: str  # training / inference (fxshard); "manual split" (upstream traces the forward only)
    devices: str  # the cluster planned for (fxshard); "" for upstream, which places nothing
    params: int
    batch: int
    seq: int
    nodes: int  # captured graph (fxshard); call_function ops over all stage (sub)graphs (upstream)
    seconds: float  # fxshard.plan or pipeline() alone; the model build is not counted (fastest of repeats)
    peak_rss_mb: float
    baseline_rss_mb: float
    strategy: str = ""
    stages: int = 0  # pipeline stages, virtual ones included (zbv and interleaved put 2 on each rank)
    replicas: int = 0
    devices_used: int = 0  # distinct devices in the plan
    microbatches: int = 0
    schedule: str = ""
    samples_per_s: float = math.nan  # fxshard's estimate
    step_time_s: float = math.nan
    seconds_all: tuple[float, ...] = ()  # every repeat in order (``seconds`` is the fastest)
    plan_error: str = ""  # fxshard.PlanError: an answer (nothing fits), timed like a plan
    error: str = ""  # the run failed: crash, timeout, or upstream's exception


def measure_fxshard(name: str, *, batch: int, seq: int | None, training: bool, **options) -> Result:
    """Build ``name`` on meta and time ``fxshard.plan`` on its cluster; runs in the calling process."""
    import fxshard

    baseline = current_rss_mb()
    spec = _BY_NAME[name]
    built = build(spec, batch=batch, seq=seq)
    params, seq = built.params, built.seq

    t0 = time.perf_counter()
    try:
        p = fxshard.plan(built.model, spec.devices, (built.tokens,), training=training, **options)
    except fxshard.PlanError as e:
        seconds = time.perf_counter() - t0
        return Result(model=name, tool="fxshard", mode="training" if training else "inference",
                      devices=spec.devices, params=params, batch=batch, seq=seq, nodes=0, seconds=seconds,
                      peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline, plan_error=str(e))
    seconds = time.perf_counter() - t0
    return Result(model=name, tool="fxshard", mode="training" if training else "inference", devices=spec.devices,
                  params=params, batch=batch, seq=seq, nodes=p.model.nodes, seconds=seconds,
                  peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline, strategy=p.strategy, stages=len(p.stages),
                  replicas=p.replicas, devices_used=len({d for st in p.stages for d in st.device_indices}),
                  microbatches=p.microbatches, schedule=p.schedule or "",
                  samples_per_s=p.estimate.samples_per_s, step_time_s=p.estimate.step_time_s)


def split_spec(spec: ModelSpec, stages: int) -> dict[str, object]:
    """A split point at the start of blocks ``i * n_layers // stages``, i = 1 .. stages - 1."""
    from torch.distributed.pipelining import SplitPoint

    if not 2 <= stages <= spec.n_layers:
        raise ValueError(f"stages={stages}: {spec.name} has {spec.n_layers} blocks; use 2 .. {spec.n_layers}")
    return {f"{spec.blocks}.{i * spec.n_layers // stages}": SplitPoint.BEGINNING for i in range(1, stages)}


def measure_upstream(name: str, *, batch: int, seq: int | None, stages: int, microbatches: int) -> Result:
    """Build ``name`` on meta and time upstream ``pipeline()`` with manual split points."""
    import torch
    import torch.fx
    from torch.distributed.pipelining import pipeline

    import fxshard.models  # noqa: F401  (counted in the baseline, as on the fxshard side)

    baseline = current_rss_mb()
    spec = _BY_NAME[name]
    if batch % microbatches:
        raise ValueError(f"--upstream-microbatches {microbatches} does not divide the batch of {batch}")
    built = build(spec, batch=batch // microbatches, seq=seq)
    params, seq = built.params, built.seq
    splits = split_spec(spec, stages)

    t0 = time.perf_counter()
    try:
        pipe = pipeline(module=built.model, mb_args=(built.tokens,), split_spec=splits)
    except Exception as e:  # noqa: BLE001  (upstream's failure is the measurement: keep it verbatim)
        seconds, nodes, got_stages = time.perf_counter() - t0, 0, stages
        chain, cause = [f"{type(e).__name__}: {e}"], e.__cause__
        while cause is not None:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__
        error = " <- caused by ".join(chain)
    else:
        seconds, error, got_stages = time.perf_counter() - t0, "", pipe.num_stages
        # Stages are unflattened (InterpreterModules nested per submodule): count the ops in all of them.
        graphs = [m.graph for m in pipe.split_gm.modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]
        nodes = sum(n.op == "call_function" for g in graphs for n in g.nodes)
    return Result(model=name, tool="upstream", mode="manual split", devices="", params=params, batch=batch, seq=seq,
                  nodes=nodes, seconds=seconds, peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline,
                  strategy="pipeline", stages=got_stages, microbatches=microbatches, error=error)


def _failed(template: Result, error: str) -> Result:
    return Result(**{**asdict(template), "error": error})


def _child(args: list[str], template: Result, timeout_s: float) -> Result:
    try:
        return Result(**{**run_child(__file__, args, timeout_s=timeout_s), "seconds_all": ()})
    except ChildError as e:
        return _failed(template, str(e))


def run_suite(names: list[str], *, batch: int, seq: int | None, options: list[str], upstream_model: str | None,
              upstream_stages: list[int], upstream_microbatches: int, repeat: int = 1,
              timeout_s: float = CHILD_TIMEOUT_S) -> list[Result]:
    """Measure each run in a fresh ``sys.executable`` subprocess, one after another.

    ``options`` are child command-line flags passed through to ``fxshard.plan`` (e.g.
    ``["--partitioner", "metis"]``). The upstream runs come last, right after the largest model.
    With ``repeat`` > 1 the whole sequence runs that many times (so load drift on a shared machine
    hits both sides alike) and each row keeps its fastest run, with every run in ``seconds_all``.
    """
    passes = [_one_pass(names, batch=batch, seq=seq, options=options, upstream_model=upstream_model,
                        upstream_stages=upstream_stages, upstream_microbatches=upstream_microbatches,
                        timeout_s=timeout_s) for _ in range(repeat)]
    merged = []
    for first in passes[0]:
        same = [r for run in passes for r in run if _key(r) == _key(first)]
        ok = [r for r in same if not r.error] or same
        best = min(ok, key=lambda r: r.seconds if not math.isnan(r.seconds) else math.inf)
        merged.append(replace(best, seconds_all=tuple(r.seconds for r in same)))
    return merged


def _key(r: Result) -> tuple:
    return r.model, r.tool, r.mode, r.stages if r.tool == "upstream" else 0


def _one_pass(names: list[str], *, batch: int, seq: int | None, options: list[str], upstream_model: str | None,
              upstream_stages: list[int], upstream_microbatches: int, timeout_s: float) -> list[Result]:
    common = ["--batch-size", str(batch)] + (["--seq-len", str(seq)] if seq is not None else [])
    results: list[Result] = []

    def record(r: Result) -> None:
        results.append(r)
        what = f"{r.model} {r.tool} {r.mode}" + (f" {r.stages} stages" if r.tool == "upstream" else "")
        status = r.error or ("PlanError" if r.plan_error else r.strategy)
        print(f"  {what}: {r.seconds:.1f} s, {r.peak_rss_mb:.0f} MB, {status}", file=sys.stderr)

    for name in names:
        eff_seq = seq or _BY_NAME[name].seq_len
        for mode in ("training", "inference"):
            template = Result(model=name, tool="fxshard", mode=mode, devices=_BY_NAME[name].devices, params=0,
                              batch=batch, seq=eff_seq, nodes=0, seconds=math.nan, peak_rss_mb=math.nan,
                              baseline_rss_mb=math.nan)
            record(_child(["--one", name, "--mode", mode, *common, *options], template, timeout_s))
            if not results[-1].plan_error:  # inference only where no training plan fits
                break
    if upstream_model:
        eff_seq = seq or _BY_NAME[upstream_model].seq_len
        for k in upstream_stages:
            template = Result(model=upstream_model, tool="upstream", mode="manual split", devices="", params=0,
                              batch=batch, seq=eff_seq, nodes=0, seconds=math.nan, peak_rss_mb=math.nan,
                              baseline_rss_mb=math.nan, stages=k, microbatches=upstream_microbatches)
            record(_child(["--one", upstream_model, "--tool", "upstream", "--upstream-stages", str(k),
                           "--upstream-microbatches", str(upstream_microbatches), *common], template, timeout_s))
    return results


def ratio_lines(results: list[Result]) -> list[str]:
    """fxshard seconds / upstream seconds, per model measured on both sides in this run."""
    lines = []
    for up in (r for r in results if r.tool == "upstream" and not r.error):
        for fx in (r for r in results if r.tool == "fxshard" and r.model == up.model and not r.error):
            what = "PlanError" if fx.plan_error else f"{fx.strategy} plan"
            per_run = [f"{a / b:.2f}" for a, b in zip(fx.seconds_all, up.seconds_all, strict=False)]
            lines.append(f"ratio {up.model}: fxshard.plan {fx.mode} on {fx.devices} ({what}) {fx.seconds:.2f} s / "
                         f"upstream pipeline() {up.stages} stages {up.seconds:.2f} s = {fx.seconds / up.seconds:.2f}"
                         + (f" (run by run: {', '.join(per_run)})" if len(per_run) > 1 else "") + " (goal <= 1)")
    return lines


def to_markdown(results: list[Result]) -> str:
    """The results as a markdown table, then the PlanError and error messages it refers to."""
    head = ("| model | params | batch x seq | tool | mode | devices | nodes | seconds (fastest) | slowest s "
            "| peak RSS MB | baseline RSS MB | strategy | stages | replicas | devices used | micro-batches | schedule "
            "| est. samples/s | est. step s | outcome |")
    rows = [head, "|" + "---|" * (head.count(" | ") + 1)]
    notes = []
    for r in results:
        outcome = "plan"
        if r.error or r.plan_error:
            notes.append(f"{len(notes) + 1}. {r.model} {r.tool} {r.mode}: "
                         + (f"error: {r.error}" if r.error else f"`PlanError`: {r.plan_error}"))
            outcome = f"{'error' if r.error else 'PlanError'} ({len(notes)})"
        elif r.tool == "upstream":
            outcome = "Pipe"
        fits = r.tool == "fxshard" and not r.error and not r.plan_error

        def num(x: float, fmt: str) -> str:
            return "" if math.isnan(x) else format(x, fmt)

        rows.append(
            f"| {r.model} | {count(r.params) if r.params else ''} | {r.batch} x {r.seq} | {r.tool} | {r.mode} "
            f"| {r.devices} | {r.nodes or ''} | {num(r.seconds, '.2f')} "
            f"| {num(max(r.seconds_all, default=math.nan), '.2f')} "
            f"| {num(r.peak_rss_mb, '.0f')} "
            f"| {num(r.baseline_rss_mb, '.0f')} | {r.strategy} | {r.stages or ''} | {r.replicas if fits else ''} "
            f"| {r.devices_used or ''} "
            f"| {r.microbatches or ''} | {r.schedule} | {num(r.samples_per_s, '.1f') if fits else ''} "
            f"| {num(r.step_time_s, '.3g') if fits else ''} | {outcome} |")
    out = "\n".join(rows) + "\n"
    if notes:
        out += "\n" + "\n".join(notes) + "\n"
    return out


def _emit_child(result: Result, fd: int) -> int:
    os.write(fd, (json.dumps(asdict(result)) + "\n").encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(_BY_NAME), default=list(_BY_NAME),
                   help="subset of the suite for fxshard.plan (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None,
                   help="override the sequence length (default: 1024 for GPT-2, 2048 for LLaMA)")
    p.add_argument("--partitioner", default=None, help="fxshard.plan partitioner (default: the planner's)")
    p.add_argument("--optimizer", default=None, help="fxshard.plan optimizer (default: the planner's, adam)")
    p.add_argument("--upstream-model", choices=[*_BY_NAME, "none"], default="llama2-70b",
                   help="model for upstream pipeline() (default: llama2-70b; 'none' skips it)")
    p.add_argument("--upstream-stages", type=int, nargs="+", default=[8, 16],
                   help="stage counts for upstream pipeline() (default: 8 16)")
    p.add_argument("--upstream-microbatches", type=int, default=8,
                   help="upstream traces one micro-batch of batch / this many samples (default: 8)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole sequence this many times; each row keeps its fastest (default: 1)")
    p.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds per child")
    p.add_argument("--csv", type=Path, help="also write the results as CSV")
    p.add_argument("--md", type=Path, help="also write the markdown table and the ratio lines")
    p.add_argument("--one", choices=list(_BY_NAME), help=argparse.SUPPRESS)  # child mode
    p.add_argument("--mode", choices=["training", "inference"], default="training", help=argparse.SUPPRESS)
    p.add_argument("--tool", choices=["fxshard", "upstream"], default="fxshard", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: use 1 or more")
    options = {k: v for k, v in (("partitioner", args.partitioner), ("optimizer", args.optimizer)) if v}

    if args.one:
        # C libraries print to fd 1 (METIS did: "***Cannot bisect a graph with 0 vertices!"); send
        # fd 1 to stderr so that the JSON line is the child's only stdout.
        json_fd = os.dup(1)
        sys.stdout.flush()
        os.dup2(2, 1)
        if args.tool == "upstream":
            return _emit_child(measure_upstream(args.one, batch=args.batch_size, seq=args.seq_len,
                                                stages=args.upstream_stages[0],
                                                microbatches=args.upstream_microbatches), json_fd)
        return _emit_child(measure_fxshard(args.one, batch=args.batch_size, seq=args.seq_len,
                                           training=args.mode == "training", **options), json_fd)

    flags = [x for k, v in options.items() for x in (f"--{k}", v)]
    load_before = os.getloadavg()[0]
    results = run_suite(args.models, batch=args.batch_size, seq=args.seq_len, options=flags,
                        upstream_model=None if args.upstream_model == "none" else args.upstream_model,
                        upstream_stages=args.upstream_stages, upstream_microbatches=args.upstream_microbatches,
                        repeat=args.repeat, timeout_s=args.timeout)
    rss = [r.peak_rss_mb for r in results if r.tool == "fxshard" and not r.error]
    summary = ratio_lines(results)
    if rss:
        summary.append(f"fxshard peak RSS: max {max(rss):.0f} MB (goal < {RSS_GOAL_MB} MB)")
    summary.append(f"machine: {machine()}; load average {load_before:.1f} at the start, "
                   f"{os.getloadavg()[0]:.1f} at the end")
    publish(to_markdown(results) + "\n" + "\n".join(summary) + "\n", [asdict(r) for r in results], md=args.md,
            csv_path=args.csv)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
