"""Plan time and peak RSS of ``fxshard.plan`` on Hugging Face LLaMA-2-70B built on the meta device,
next to upstream ``torch.distributed.pipelining.pipeline()`` tracing and splitting the same model.

The model is ``transformers.LlamaForCausalLM`` from a LLaMA-2-70B ``LlamaConfig`` (``use_cache=False``),
built under ``torch.device("meta")`` in bfloat16: no weights, no memory. Every measurement runs in a
fresh ``sys.executable`` child, so each peak RSS is that run's alone:

- **fxshard** times ``fxshard.plan(model, devices, (tokens,), training=...)`` end to end (capture,
  pricing, partitioning, search), for inference and for training with Adam;
- **upstream** times ``pipeline(module=model, mb_args=(micro_batch_tokens,), split_spec=...)`` with a
  ``SplitPoint.BEGINNING`` at ``model.layers.{i * 80 // stages}``, i = 1 .. stages - 1 (torch.export of
  one micro-batch, then the split into stages; no cost model, no placement).

Each child reports wall seconds and CPU seconds of the call alone (the build is not counted), and
``ru_maxrss``. With ``--repeat`` the runs alternate (fxshard inference, fxshard training, upstream,
then again), so load on a shared machine falls on both sides alike; each row keeps its fastest run.

Usage::

    python benchmarks/hf_plan_scale.py                       # 70B, 8xH100-80GB, batch 8 x 2048, 8 stages
    python benchmarks/hf_plan_scale.py --repeat 3 --md hf_plan_scale.md
    python benchmarks/hf_plan_scale.py --layers 8            # a shallower model of the same width
    python benchmarks/hf_plan_scale.py --one fxshard --mode inference   # child: one JSON line

Results: docs/benchmarks.md, "Hugging Face LLaMA-2-70B on meta".
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

from _suite import ChildError, count, current_rss_mb, machine, max_rss_mb, publish, run_child

__all__ = ["Result", "build", "main", "measure_fxshard", "measure_upstream", "to_markdown"]

CHILD_TIMEOUT_S = 900
RSS_GOAL_MB = 2000  # "under 2 GB RSS"
LLAMA2_70B = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096}


@dataclass(frozen=True, kw_only=True)
class Result:
    """One child run: fxshard.plan in one mode, or upstream pipeline()."""

    tool: str  # fxshard / upstream
    mode: str  # inference / training (fxshard); "8 stages" (upstream)
    layers: int
    params: int
    batch: int
    seq: int
    seconds: float  # wall time of the call alone (the fastest of the repeats in a merged row)
    cpu_seconds: float  # this process's CPU time in the call (user + system)
    peak_rss_mb: float
    baseline_rss_mb: float
    nodes: int = 0  # fxshard's captured graph; upstream: call_function ops over all stage graphs
    outcome: str = ""  # fxshard: "<strategy>, <stages> stages" or "PlanError"; upstream: "<k> stages"
    seconds_all: tuple[float, ...] = ()
    cpu_seconds_all: tuple[float, ...] = ()
    error: str = ""


def build(layers: int, batch: int, seq: int):
    """LlamaForCausalLM (LLaMA-2-70B width, ``layers`` blocks) on meta in bfloat16, and meta token ids."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(**{**LLAMA2_70B, "num_hidden_layers": layers}, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model, sum(p.numel() for p in model.parameters()), tokens


def measure_fxshard(*, layers: int, batch: int, seq: int, devices: str, training: bool) -> Result:
    """Build the model and time ``fxshard.plan`` on it, in the calling process."""
    import fxshard

    baseline = current_rss_mb()
    model, params, tokens = build(layers, batch, seq)
    mode = "training" if training else "inference"
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        plan = fxshard.plan(model, devices, (tokens,), training=training)
    except fxshard.PlanError as e:
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Result(tool="fxshard", mode=mode, layers=layers, params=params, batch=batch, seq=seq, seconds=seconds,
                      cpu_seconds=cpu, peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline,
                      outcome=f"PlanError: {str(e)[:160]}...")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if plan.model.param_bytes != params * 2:
        raise SystemExit(f"plan counts {plan.model.param_bytes} parameter bytes; the model has {params * 2}")
    return Result(tool="fxshard", mode=mode, layers=layers, params=params, batch=batch, seq=seq, seconds=seconds,
                  cpu_seconds=cpu, peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline, nodes=plan.model.nodes,
                  outcome=f"{plan.strategy}, {plan.num_stages} stages x {plan.replicas} replicas")


def measure_upstream(*, layers: int, batch: int, seq: int, stages: int, microbatches: int) -> Result:
    """Build the model and time upstream ``pipeline()`` with manual split points, in the calling process."""
    import torch
    import torch.fx
    from torch.distributed.pipelining import SplitPoint, pipeline

    import fxshard  # noqa: F401  (imported on both sides, so the baselines compare)

    baseline = current_rss_mb()
    if batch % microbatches:
        raise SystemExit(f"--upstream-microbatches {microbatches} does not divide the batch of {batch}")
    model, params, tokens = build(layers, batch // microbatches, seq)
    split = {f"model.layers.{i * layers // stages}": SplitPoint.BEGINNING for i in range(1, stages)}
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = pipeline(module=model, mb_args=(tokens,), split_spec=split)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    graphs = [m.graph for m in pipe.split_gm.modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]
    nodes = sum(n.op == "call_function" for g in graphs for n in g.nodes)
    return Result(tool="upstream", mode=f"{stages} stages", layers=layers, params=params, batch=batch, seq=seq,
                  seconds=seconds, cpu_seconds=cpu, peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline, nodes=nodes,
                  outcome=f"{pipe.num_stages} stages (micro-batch {batch // microbatches} x {seq})")


def _run(args: list[str], template: Result, timeout_s: float) -> Result:
    try:
        return Result(**{**run_child(__file__, args, timeout_s=timeout_s), "seconds_all": (), "cpu_seconds_all": ()})
    except ChildError as e:
        return replace(template, error=str(e))


def run(*, layers: int, batch: int, seq: int, devices: str, stages: int, microbatches: int, repeat: int,
        timeout_s: float) -> list[Result]:
    """Every run in its own child, alternating the three runs ``repeat`` times; each row keeps its fastest."""
    common = ["--layers", str(layers), "--batch-size", str(batch), "--seq-len", str(seq)]
    jobs = [
        (["--one", "fxshard", "--mode", "inference", "--devices", devices], "fxshard", "inference"),
        (["--one", "fxshard", "--mode", "training", "--devices", devices], "fxshard", "training"),
        (["--one", "upstream", "--stages", str(stages), "--upstream-microbatches", str(microbatches)], "upstream",
         f"{stages} stages"),
    ]
    runs: dict[tuple[str, str], list[Result]] = {}
    for _ in range(repeat):
        for args, tool, mode in jobs:
            template = Result(tool=tool, mode=mode, layers=layers, params=0, batch=batch, seq=seq, seconds=math.nan,
                              cpu_seconds=math.nan, peak_rss_mb=math.nan, baseline_rss_mb=math.nan)
            r = _run(args + common, template, timeout_s)
            print(f"  {tool} {mode}: {r.seconds:.1f} s wall, {r.cpu_seconds:.1f} s CPU, {r.peak_rss_mb:.0f} MB"
                  f"{', ' + r.error if r.error else ''}", file=sys.stderr)
            runs.setdefault((tool, mode), []).append(r)
    merged = []
    for same in runs.values():
        ok = [r for r in same if not r.error] or same
        best = min(ok, key=lambda r: r.seconds if not math.isnan(r.seconds) else math.inf)
        merged.append(replace(best, seconds_all=tuple(r.seconds for r in same),
                              cpu_seconds_all=tuple(r.cpu_seconds for r in same)))
    return merged


def to_markdown(results: list[Result]) -> str:
    """The results as a markdown table, then one ratio line per fxshard row."""
    head = ("| tool | mode | params | batch x seq | nodes | wall s (fastest) | wall s (all) | CPU s (fastest) "
            "| peak RSS MB | baseline RSS MB | outcome |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        rows.append(f"| {r.tool} | {r.mode} | {count(r.params) if r.params else ''} | {r.batch} x {r.seq} "
                    f"| {r.nodes or ''} | {r.seconds:.2f} | {', '.join(f'{s:.1f}' for s in r.seconds_all)} "
                    f"| {min(r.cpu_seconds_all or (r.cpu_seconds,)):.2f} | {r.peak_rss_mb:.0f} "
                    f"| {r.baseline_rss_mb:.0f} | {r.error or r.outcome} |")
    lines = ["\n".join(rows), ""]
    up = next((r for r in results if r.tool == "upstream" and not r.error), None)
    for fx in (r for r in results if r.tool == "fxshard" and not r.error):
        if up is not None:
            lines.append(f"ratio fxshard.plan {fx.mode} / upstream pipeline() {up.mode}: wall "
                         f"{fx.seconds:.2f} / {up.seconds:.2f} = {fx.seconds / up.seconds:.2f}, CPU "
                         f"{min(fx.cpu_seconds_all or (fx.cpu_seconds,)):.2f} / "
                         f"{min(up.cpu_seconds_all or (up.cpu_seconds,)):.2f} = "
                         f"{min(fx.cpu_seconds_all or (fx.cpu_seconds,)) / min(up.cpu_seconds_all or (up.cpu_seconds,)):.2f}"
                         f" (goal <= 1)")
    rss = [r.peak_rss_mb for r in results if r.tool == "fxshard" and not r.error]
    if rss:
        lines.append(f"fxshard peak RSS: max {max(rss):.0f} MB (goal < {RSS_GOAL_MB} MB)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=80, help="decoder blocks (default: 80, LLaMA-2-70B)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--devices", default="8xH100-80GB", help="fxshard's cluster (default: 8xH100-80GB)")
    p.add_argument("--stages", type=int, default=8, help="upstream pipeline() stages (default: 8)")
    p.add_argument("--upstream-microbatches", type=int, default=8,
                   help="upstream traces one micro-batch of batch / this many samples (default: 8)")
    p.add_argument("--repeat", type=int, default=1, help="alternate the runs this many times (default: 1)")
    p.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds per child")
    p.add_argument("--md", type=Path, help="also write the table and ratio lines here")
    p.add_argument("--csv", type=Path, help="also write the rows as CSV")
    p.add_argument("--one", choices=["fxshard", "upstream"], help=argparse.SUPPRESS)  # child mode
    p.add_argument("--mode", choices=["inference", "training"], default="inference", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1 or not 2 <= args.stages <= args.layers and args.one != "fxshard":
        p.error(f"--repeat {args.repeat} must be >= 1 and --stages {args.stages} within 2 .. {args.layers}")

    if args.one:
        json_fd = os.dup(1)  # the JSON line is the child's only stdout: anything else goes to stderr
        sys.stdout.flush()
        os.dup2(2, 1)
        if args.one == "fxshard":
            r = measure_fxshard(layers=args.layers, batch=args.batch_size, seq=args.seq_len, devices=args.devices,
                                training=args.mode == "training")
        else:
            r = measure_upstream(layers=args.layers, batch=args.batch_size, seq=args.seq_len, stages=args.stages,
                                 microbatches=args.upstream_microbatches)
        os.write(json_fd, (json.dumps(asdict(r)) + "\n").encode())
        return 0

    load = os.getloadavg()[0]
    results = run(layers=args.layers, batch=args.batch_size, seq=args.seq_len, devices=args.devices,
                  stages=args.stages, microbatches=args.upstream_microbatches, repeat=args.repeat,
                  timeout_s=args.timeout)
    text = to_markdown(results) + (f"machine: {machine()}; load average {load:.1f} at the start, "
                                   f"{os.getloadavg()[0]:.1f} at the end\n")
    publish(text, [asdict(r) for r in results], md=args.md, csv_path=args.csv)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
