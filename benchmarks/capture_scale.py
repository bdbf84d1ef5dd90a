"""Capture and cost-annotation time and peak RSS for decoder LMs from 125M to 70B parameters.

Every model is built on the meta device (no weights, no memory) and measured in its own
subprocess, so the peak RSS reported is that model's alone. The parent only collects the
children's JSON lines and renders the table.

Usage::

    python benchmarks/capture_scale.py                       # the whole suite
    python benchmarks/capture_scale.py --models gpt2-small llama-7b --md out.md --csv out.csv
    python benchmarks/capture_scale.py --one llama-7b        # child mode: one JSON line

Results and how to read them: docs/benchmarks.md, "Capture and cost scale".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _suite import (
    BY_NAME,
    SUITE,
    ChildError,
    ModelSpec,
    build,
    count,
    current_rss_mb,
    max_rss_mb,
    publish,
    run_child,
)

__all__ = ["SUITE", "ModelSpec", "Result", "main", "measure_one", "run_suite"]

DEVICE = "H100-80GB"
CHILD_TIMEOUT_S = 600


@dataclass(frozen=True, kw_only=True)
class Result:
    """One model's measurement (one table row)."""

    model: str
    params: int
    batch: int
    seq: int
    nodes: int
    capture_s: float
    cost_s: float  # analyze + estimate
    total_s: float
    peak_rss_mb: float
    baseline_rss_mb: float
    fwd_flops: int
    fwd_flops_expected: int  # 2 * params * tokens + attention matmuls
    param_bytes: int
    saved_activation_bytes: int
    step_time_s: float  # estimated fwd + bwd on DEVICE
    error: str = ""


def _expected_fwd_flops(spec: ModelSpec, params: int, batch: int, seq: int) -> int:
    """2 * params * tokens for the matmuls, plus QK^T and PV (causal mask not exploited)."""
    tokens = batch * seq
    attention = spec.n_layers * 2 * 2 * batch * seq * seq * spec.dim
    return 2 * params * tokens + attention


def measure_one(name: str, *, batch: int, seq: int | None) -> Result:
    """Build ``name`` on meta, capture it and price it; runs in the calling process."""
    import fxshard  # noqa: F401  (counted in the baseline)

    baseline = current_rss_mb()
    from fxshard.capture import capture
    from fxshard.cluster import get_preset
    from fxshard.cost_models import analyze, estimate

    spec = BY_NAME[name]
    built = build(spec, batch=batch, seq=seq)
    params, seq = built.params, built.seq

    t0 = time.perf_counter()
    captured = capture(built.model, (built.tokens,))
    t1 = time.perf_counter()
    works = analyze(captured)
    costs = estimate(captured, get_preset(DEVICE), works=works)
    t2 = time.perf_counter()

    return Result(model=name, params=params, batch=batch, seq=seq, nodes=len(costs),
                  capture_s=t1 - t0, cost_s=t2 - t1, total_s=t2 - t0,
                  peak_rss_mb=max_rss_mb(), baseline_rss_mb=baseline,
                  fwd_flops=costs.fwd_flops, fwd_flops_expected=_expected_fwd_flops(spec, params, batch, seq),
                  param_bytes=costs.param_bytes, saved_activation_bytes=costs.saved_activation_bytes(),
                  step_time_s=costs.fwd_time_s + costs.bwd_time_s)


def _failed(name: str, batch: int, seq: int, error: str) -> Result:
    nan = float("nan")
    return Result(model=name, params=0, batch=batch, seq=seq, nodes=0, capture_s=nan, cost_s=nan,
                  total_s=nan, peak_rss_mb=nan, baseline_rss_mb=nan, fwd_flops=0, fwd_flops_expected=0,
                  param_bytes=0, saved_activation_bytes=0, step_time_s=nan, error=error)


def run_suite(names: list[str], *, batch: int, seq: int | None, timeout_s: float = CHILD_TIMEOUT_S) -> list[Result]:
    """Measure each model in a fresh ``sys.executable`` subprocess, one after another."""
    results = []
    for name in names:
        args = ["--one", name, "--batch-size", str(batch)] + (["--seq-len", str(seq)] if seq is not None else [])
        try:
            results.append(Result(**run_child(__file__, args, timeout_s=timeout_s)))
        except ChildError as e:
            results.append(_failed(name, batch, seq or BY_NAME[name].seq_len, str(e)))
            continue
        print(f"  {name}: {results[-1].total_s:.1f} s, {results[-1].peak_rss_mb:.0f} MB", file=sys.stderr)
    return results


def _human(n: float, units: tuple[str, ...] = ("", "K", "M", "G", "T", "P", "E")) -> str:
    for unit in units:
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}Z"


def to_markdown(results: list[Result]) -> str:
    """Render the results as a markdown table."""
    head = ("| model | params | batch x seq | nodes | capture s | analyze+estimate s | total s "
            "| ms/node | peak RSS MB | baseline RSS MB | fwd FLOPs | fwd / expected "
            f"| est. fwd+bwd on {DEVICE} s |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        if r.error:
            rows.append(f"| {r.model} | failed: {r.error} |" + " |" * (head.count(" | ") - 1))
            continue
        rows.append(
            f"| {r.model} | {count(r.params)} | {r.batch} x {r.seq} | {r.nodes} | {r.capture_s:.2f} "
            f"| {r.cost_s:.2f} | {r.total_s:.2f} | {1000 * r.total_s / r.nodes:.1f} | {r.peak_rss_mb:.0f} "
            f"| {r.baseline_rss_mb:.0f} | {_human(r.fwd_flops)} | {r.fwd_flops / r.fwd_flops_expected:.3f} "
            f"| {r.step_time_s:.3g} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(BY_NAME), default=list(BY_NAME),
                   help="subset of the suite (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None,
                   help="override the sequence length (default: 1024 for GPT-2, 2048 for LLaMA)")
    p.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds per child")
    p.add_argument("--csv", type=Path, help="also write the results as CSV")
    p.add_argument("--md", type=Path, help="also write the markdown table")
    p.add_argument("--one", choices=list(BY_NAME), help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(asdict(measure_one(args.one, batch=args.batch_size, seq=args.seq_len))))
        return 0

    results = run_suite(args.models, batch=args.batch_size, seq=args.seq_len, timeout_s=args.timeout)
    publish(to_markdown(results), [asdict(r) for r in results], md=args.md, csv_path=args.csv)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
