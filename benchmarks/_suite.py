"""What the benchmark scripts share: the decoder shapes, their meta build, RSS probes and child runs.

Imported as ``from _suite import ...``: the scripts run as ``python benchmarks/NAME.py``, so
benchmarks/ is ``sys.path[0]`` for them and for the children they spawn the same way.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["BY_NAME", "SUITE", "Built", "ChildError", "ModelSpec", "build", "count", "current_rss_mb", "machine",
           "max_rss_mb", "publish", "run_child"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A published decoder shape, its default sequence length and the cluster it is planned for, if any."""

    name: str
    family: Literal["gpt2", "llama"]
    n_layers: int
    dim: int
    n_heads: int
    seq_len: int
    devices: str | None = None  # benchmarks/plan_scale.py plans on it; None: not planned
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None  # llama only
    vocab_size: int = 50257

    @property
    def blocks(self) -> str:
        """The ModuleList of decoder blocks, as upstream's split_spec names it."""
        return "h" if self.family == "gpt2" else "layers"


SUITE: tuple[ModelSpec, ...] = (
    ModelSpec(name="gpt2-small", family="gpt2", n_layers=12, dim=768, n_heads=12, seq_len=1024,
              devices="8xA100-80GB"),
    ModelSpec(name="gpt2-medium", family="gpt2", n_layers=24, dim=1024, n_heads=16, seq_len=1024,
              devices="8xA100-80GB"),
    ModelSpec(name="gpt2-xl", family="gpt2", n_layers=48, dim=1600, n_heads=25, seq_len=1024,
              devices="8xA100-80GB"),
    ModelSpec(name="llama-7b", family="llama", n_layers=32, dim=4096, n_heads=32, ffn_hidden=11008,
              vocab_size=32000, seq_len=2048, devices="8xH100-80GB"),
    ModelSpec(name="llama-13b", family="llama", n_layers=40, dim=5120, n_heads=40, ffn_hidden=13824,
              vocab_size=32000, seq_len=2048, devices="8xH100-80GB"),
    ModelSpec(name="llama-30b", family="llama", n_layers=60, dim=6656, n_heads=52, ffn_hidden=17920,
              vocab_size=32000, seq_len=2048),
    ModelSpec(name="llama2-70b", family="llama", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8,
              ffn_hidden=28672, vocab_size=32000, seq_len=2048, devices="2x8xH100-80GB"),
)
BY_NAME = {s.name: s for s in SUITE}


@dataclass(frozen=True, kw_only=True)
class Built:
    """A suite model on meta in bfloat16, its parameter count and a batch of token ids for it."""

    model: torch.nn.Module
    params: int
    seq: int  # the sequence length built for: the one asked for, else the spec's
    tokens: torch.Tensor  # (batch, seq) int64 on meta


def build(spec: ModelSpec, *, batch: int, seq: int | None = None) -> Built:
    """Build ``spec`` on meta (no weights, no memory) in bfloat16, with ``batch`` x ``seq`` meta token ids."""
    import torch

    from fxshard.models import GPT2, GPT2Config, Llama, LlamaConfig

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
    return Built(model=model, params=sum(p.numel() for p in model.parameters()), seq=seq,
                 tokens=torch.randint(0, spec.vocab_size, (batch, seq), device="meta"))


def count(n: int) -> str:
    """Parameter counts the way papers write them: 124M, 1.56B, 69.0B."""
    return f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:#.3g}B"


def max_rss_mb() -> float:
    """This process's peak resident set so far, in MiB."""
    import resource

    # ru_maxrss is KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mb() -> float:
    """This process's resident set now, in MiB (the peak so far where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:  # not Linux: fall back on the peak so far
        return max_rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class ChildError(RuntimeError):
    """A child run timed out, failed, or printed no JSON line; the message is the table's error cell."""


def run_child(script: str | Path, args: Sequence[str], *, timeout_s: float) -> dict:
    """Run ``python script *args`` in a fresh process and return the last JSON line of its stdout.

    Raises:
        ChildError: on a timeout, a non-zero exit (with stderr's last line) or no JSON line.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise ChildError(f"timed out after {timeout_s:.0f} s") from e
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise ChildError(f"exit {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def publish(text: str, rows: Sequence[Mapping], *, md: Path | None, csv_path: Path | None) -> None:
    """Print ``text``; also write it to ``md``, and ``rows`` as CSV (header: the first row's keys) to ``csv_path``."""
    print(text)
    if md:
        md.write_text(text)
    if csv_path:
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            w.writeheader()
            w.writerows(rows)


def machine() -> str:
    """CPU model, cores, memory, OS and versions, for the record (Linux: /proc/cpuinfo)."""
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        cpu = platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores of {cpu}, {mem:.0f} GiB, {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")
