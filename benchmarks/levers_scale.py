"""The memory levers at scale: what the planner picks with activation checkpointing, FSDP and
gradient accumulation in its search, against the pipeline-only search it had before them.

Three parts, each planned in this process from one capture per model and batch (zoo models on
the meta device; nothing runs):

- ``llama70b``: LLaMA-2-70B (``fxshard.zoo`` "llama-70b", seq 4096, bf16), training with Adam at
  batch 8 on 2x8xH100-80GB, refused before the levers.
- ``scale``: the same model on 4x8, 8x8 and 16x8 H100-80GB: the planner's plan against the
  pipeline-only plan (``data_parallel="ddp"``, ``activation_checkpointing="none"``, the same
  options otherwise), predicted step times and their ratio.
- ``table``: zoo models x {1, 8, 16, 64} H100-80GB: strategy, checkpointing, step time, MFU and
  peak memory per device.

MFU is model FLOPs per step over devices used x peak FLOP/s x predicted step time. Model FLOPs are the
cost model's forward plus backward FLOPs of the captured graph at the whole batch (recomputation
not counted, as MFU conventionally excludes it); peak FLOP/s is the device preset's dense figure
for the model's dtype (bfloat16 for gpt2-xl and the LLaMAs, float32 for the others, as the cost
model prices them). Every number is a prediction of fxshard's cost model: nothing here is
measured on a GPU, and no factor is fitted.

Usage::

    python benchmarks/levers_scale.py --parts llama70b scale table --md out.md --json out.jsonl

Results and commands: docs/benchmarks.md, "Memory levers at scale".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import fxshard
from fxshard import zoo
from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster, format_bytes
from fxshard.cost_models import estimate
from fxshard.planner import PlanOptions, plan_captured

__all__ = ["Row", "main", "plan_row"]

NO_LEVERS = {"data_parallel": "ddp", "activation_checkpointing": "none"}  # the search before issue 14
TABLE_MODELS = ("mlp", "resnet", "gpt2", "gpt2-xl", "llama-7b", "llama-70b")
TABLE_DEVICES = ("1xH100-80GB", "8xH100-80GB", "2x8xH100-80GB", "8x8xH100-80GB")
SCALE_DEVICES = ("4x8xH100-80GB", "8x8xH100-80GB", "16x8xH100-80GB")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One plan (or refusal) of one model on one cluster."""

    model: str
    batch: int
    devices: str
    options: str
    plan_s: float
    shape: str = ""
    strategy: str = ""
    data_parallel: str | None = None
    checkpointing: str = ""
    schedule: str | None = None
    microbatches: int = 0
    step_s: float = 0.0
    bubble: float = 0.0
    mfu: float = 0.0
    peak_bytes: float = 0.0
    used: int = 0  # devices the plan uses (MFU is over these)
    refused: str = ""


def _model_flops(captured: CapturedGraph, devices: str) -> tuple[float, float]:
    """(forward + backward FLOPs of the whole batch, the device's peak FLOP/s for its dtype)."""
    spec = Cluster.parse(devices).devices[0].spec
    costs = estimate(captured, spec)
    dtype = next((p.dtype for p in captured.gm.parameters()), None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return float(costs.fwd_flops + costs.bwd_flops), dict(spec.peak_flops)[name]


def plan_row(name: str, captured: CapturedGraph, batch: int, devices: str, **options: Any) -> Row:
    """Plan ``captured`` on ``devices``; the row of its plan, or of its refusal."""
    said = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
    start = time.perf_counter()
    try:
        p = plan_captured(captured, Cluster.parse(devices), batch, PlanOptions(**options))
    except fxshard.PlanError as e:
        return Row(model=name, batch=batch, devices=devices, options=said, plan_s=time.perf_counter() - start,
                   refused=str(e).split("; ")[0])
    seconds = time.perf_counter() - start
    flops, peak = _model_flops(captured, devices)
    step = p.estimate.step_time_s
    checkpointing = sorted({s.activation_checkpointing for s in p.stages})
    return Row(model=name, batch=batch, devices=devices, options=said, plan_s=seconds, shape=p.shape_text(),
               strategy=p.strategy, data_parallel=p.data_parallel, checkpointing="/".join(checkpointing),
               schedule=p.schedule, microbatches=p.microbatches, step_s=step, bubble=p.estimate.bubble_fraction,
               mfu=flops / (p.num_devices * peak * step), peak_bytes=max(s.peak_memory_bytes for s in p.stages),
               used=p.num_devices)


def _captured(name: str, batch: int | None = None) -> tuple[CapturedGraph, int]:
    z = zoo.build(name, batch_size=batch, device="meta") if name not in ("mlp", "resnet") else \
        zoo.build(name, batch_size=batch)
    captured = capture(z.model, z.example_inputs, example_kwargs=z.example_kwargs or None)
    first = next(t for t in z.example_inputs if hasattr(t, "shape"))
    return captured, int(first.shape[0])


def _markdown(rows: list[Row]) -> str:
    head = ("| model | batch | devices | options | plan | checkpointing | step (s) | used | MFU | peak / device | "
            "planning (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.refused:
            lines.append(f"| {r.model} | {r.batch} | {r.devices} | {r.options} | refused: {r.refused} | | | | | | "
                         f"{r.plan_s:.1f} |")
            continue
        what = f"{r.strategy}: {r.shape}" + (f", {r.schedule}" if r.schedule else "") + (
            f", {r.microbatches} micro-batches" if r.microbatches > 1 else "") + (
            f", {r.data_parallel}" if r.data_parallel else "")
        lines.append(f"| {r.model} | {r.batch} | {r.devices} | {r.options} | {what} | {r.checkpointing} | "
                     f"{r.step_s:.3g} | {r.used} | {r.mfu:.1%} | {format_bytes(r.peak_bytes)} | {r.plan_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["llama70b", "scale", "table"],
                        choices=["llama70b", "scale", "table"])
    parser.add_argument("--models", nargs="+", default=list(TABLE_MODELS))
    parser.add_argument("--md", help="write the tables here (markdown)")
    parser.add_argument("--json", help="append one JSON line per row here")
    args = parser.parse_args(argv)
    out: list[str] = []

    def emit(row: Row) -> Row:
        print(json.dumps(dataclasses.asdict(row)), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dataclasses.asdict(row)) + "\n")
        return row

    big: tuple[CapturedGraph, int] | None = None
    if "llama70b" in args.parts or "scale" in args.parts:
        big = _captured("llama-70b", 8)
    if "llama70b" in args.parts:
        rows = [emit(plan_row("llama-70b", big[0], 8, "2x8xH100-80GB", **NO_LEVERS)),
                emit(plan_row("llama-70b", big[0], 8, "2x8xH100-80GB"))]
        out += ["### LLaMA-2-70B, Adam, batch 8, 2x8xH100-80GB", "", _markdown(rows), ""]
    if "scale" in args.parts:
        rows, ratios = [], []
        for devices in SCALE_DEVICES:
            before = emit(plan_row("llama-70b", big[0], 8, devices, **NO_LEVERS))
            after = emit(plan_row("llama-70b", big[0], 8, devices))
            rows += [before, after]
            if before.step_s and after.step_s:
                ratios.append(f"- {devices}: {before.step_s:.3g} s pipeline-only, {after.step_s:.3g} s with the "
                              f"levers: {before.step_s / after.step_s:.2f}x")
        out += ["### LLaMA-2-70B, Adam, batch 8: levers vs pipeline-only", "", _markdown(rows), "", *ratios, ""]
    if "table" in args.parts:
        rows = []
        for name in args.models:
            captured, batch = big if name == "llama-70b" and big is not None else _captured(name)
            for devices in TABLE_DEVICES:
                rows.append(emit(plan_row(name, captured, batch, devices)))
        out += ["### Zoo models x devices (H100-80GB)", "", _markdown(rows), ""]
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(out))
    else:
        print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
