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
import csv
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

__all__ = ["SUITE", "ModelSpec", "Result", "main", "measure_one", "run_suite"]

DEVICE = "H100-80GB"
CHILD_TIMEOUT_S = 600


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A published decoder shape; ``seq_len`` is the default sequence length for it."""

    name: str
    family: Literal["gpt2", "llama"]
    n_layers: int
    dim: int
    n_heads: int
    seq_len: int
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None  # llama only
    vocab_size: int = 50257


SUITE: tuple[ModelSpec, ...] = (
    ModelSpec(name="gpt2-small", family="gpt2", n_layers=12, dim=768, n_heads=12, seq_len=1024),
    ModelSpec(name="gpt2-medium", family="gpt2", n_layers=24, dim=1024, n_heads=16, seq_len=1024),
    ModelSpec(name="gpt2-xl", family="gpt2", n_layers=48, dim=1600, n_heads=25, seq_len=1024),
    ModelSpec(name="llama-7b", family="llama", n_layers=32, dim=4096, n_heads=32, ffn_hidden=11008,
              vocab_size=32000, seq_len=2048),
    ModelSpec(name="llama-13b", family="llama", n_layers=40, dim=5120, n_heads=40, ffn_hidden=13824,
              vocab_size=32000, seq_len=2048),
    ModelSpec(name="llama-30b", family="llama", n_layers=60, dim=6656, n_heads=52, ffn_hidden=17920,
              vocab_size=32000, seq_len=2048),
    ModelSpec(name="llama2-70b", family="llama", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8,
              ffn_hidden=28672, vocab_size=32000, seq_len=2048),
)
_BY_NAME = {s.name: s for s in SUITE}


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


def _max_rss_mb() -> float:
    import resource

    # ru_maxrss is KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:  # not Linux: fall back on the peak so far
        return _max_rss_mb()
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _expected_fwd_flops(spec: ModelSpec, params: int, batch: int, seq: int) -> int:
    """2 * params * tokens for the matmuls, plus QK^T and PV (causal mask not exploited)."""
    tokens = batch * seq
    attention = spec.n_layers * 2 * 2 * batch * seq * seq * spec.dim
    return 2 * params * tokens + attention


def measure_one(name: str, *, batch: int, seq: int | None) -> Result:
    """Build ``name`` on meta, capture it and price it; runs in the calling process."""
    import torch

    import fxshard  # noqa: F401  (counted in the baseline)

    baseline = _current_rss_mb()
    from fxshard.capture import capture
    from fxshard.cluster import get_preset
    from fxshard.cost_models import analyze, estimate
    from fxshard.models import GPT2, GPT2Config, Llama, LlamaConfig

    spec = _BY_NAME[name]
    seq = seq or spec.seq_len
    with torch.device("meta"):
        if spec.family == "gpt2":
            model = GPT2(GPT2Config(n_layer=spec.n_layers, n_head=spec.n_heads, n_embd=spec.dim,
                                    vocab_size=spec.vocab_size, block_size=max(seq, 1024)))
        else:
            model = Llama(LlamaConfig(dim=spec.dim, n_layers=spec.n_layers, n_heads=spec.n_heads,
                                      n_kv_heads=spec.n_kv_heads, ffn_hidden=spec.ffn_hidden,
                                      vocab_size=spec.vocab_size, max_seq_len=max(seq, 2048)))
    model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, spec.vocab_size, (batch, seq), device="meta")

    t0 = time.perf_counter()
    captured = capture(model, (idx,))
    t1 = time.perf_counter()
    works = analyze(captured)
    costs = estimate(captured, get_preset(DEVICE), works=works)
    t2 = time.perf_counter()

    return Result(model=name, params=params, batch=batch, seq=seq, nodes=len(costs),
                  capture_s=t1 - t0, cost_s=t2 - t1, total_s=t2 - t0,
                  peak_rss_mb=_max_rss_mb(), baseline_rss_mb=baseline,
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--batch-size", str(batch)]
        if seq is not None:
            cmd += ["--seq-len", str(seq)]
        eff_seq = seq or _BY_NAME[name].seq_len
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            results.append(_failed(name, batch, eff_seq, f"timed out after {timeout_s:.0f} s"))
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            results.append(_failed(name, batch, eff_seq, f"exit {proc.returncode}: {tail}"))
            continue
        results.append(Result(**json.loads(lines[-1])))
        print(f"  {name}: {results[-1].total_s:.1f} s, {results[-1].peak_rss_mb:.0f} MB", file=sys.stderr)
    return results


def _human(n: float, units: tuple[str, ...] = ("", "K", "M", "G", "T", "P", "E")) -> str:
    for unit in units:
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}Z"


def _count(n: int) -> str:
    """Parameter counts the way papers write them: 124M, 1.56B, 69.0B."""
    return f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:#.3g}B"


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
            f"| {r.model} | {_count(r.params)} | {r.batch} x {r.seq} | {r.nodes} | {r.capture_s:.2f} "
            f"| {r.cost_s:.2f} | {r.total_s:.2f} | {1000 * r.total_s / r.nodes:.1f} | {r.peak_rss_mb:.0f} "
            f"| {r.baseline_rss_mb:.0f} | {_human(r.fwd_flops)} | {r.fwd_flops / r.fwd_flops_expected:.3f} "
            f"| {r.step_time_s:.3g} |")
    return "\n".join(rows) + "\n"


def write_csv(results: list[Result], path: Path) -> None:
    fields = list(Result.__dataclass_fields__)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(asdict(r) for r in results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(_BY_NAME), default=list(_BY_NAME),
                   help="subset of the suite (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None,
                   help="override the sequence length (default: 1024 for GPT-2, 2048 for LLaMA)")
    p.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds per child")
    p.add_argument("--csv", type=Path, help="also write the results as CSV")
    p.add_argument("--md", type=Path, help="also write the markdown table")
    p.add_argument("--one", choices=list(_BY_NAME), help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)

    if args.one:
        print(json.dumps(asdict(measure_one(args.one, batch=args.batch_size, seq=args.seq_len))))
        return 0

    results = run_suite(args.models, batch=args.batch_size, seq=args.seq_len, timeout_s=args.timeout)
    table = to_markdown(results)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.csv:
        write_csv(results, args.csv)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
