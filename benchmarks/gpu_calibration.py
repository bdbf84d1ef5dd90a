"""One GPU run of everything issues 16 and 17 need measured: per-stage times and memory of 4-stage
plans against the analytical and profiled predictions, with and without activation checkpointing,
the raw per-node times the roofline factors are fitted to, and compile overhead.

Run it once on the GPU machine (it also runs on a CPU, with --quick, as a smoke test):

    python benchmarks/gpu_calibration.py --out $OUT                  # GPU: realistic sizes, 6-8 min on an H200
    python benchmarks/gpu_calibration.py --out /tmp/cal --quick      # CPU smoke test

For each model (GPT-2 medium, a LLaMA-style decoder of ~0.9B parameters in bf16 with SDPA
attention, the ResNet-50-like CNN, the U-Net) it plans a 4-stage pipeline (``stages=4``,
schedule 1F1B: one stage per rank, 4 micro-batches) and runs ``fxshard.calibrate.calibrate``
three times: activation checkpointing none, full and selective (each guarded: a failure is
written into the results and the run goes on). Each gives per-stage forward and backward seconds
measured as a training step runs them (gradients set to None, a fresh forward then backward per
repeat), peak memory per stage on CUDA (``max_memory_allocated`` over those steps, plus the
weights) against the predicted peak of the same step (weights + gradients + one micro-batch's
activations + transient) and the plan's peak (with optimizer state and 1F1B's in-flight
micro-batches), and the analytical and profiled (segment-timed) predictions; the "none" variant also
keeps every node's isolated forward and backward time with its FLOPs and bytes (the samples the
roofline factors are fitted to) and the fitted factors. Then training throughput: eager against
``fxshard.compile(strategy="single")`` and against the local pipeline with every stage on the one
device (median steps/s). Files under ``--out`` (flat, at most 6): ``summary.json`` (everything,
with the environment and the progress log), ``summary.md`` (the tables, the environment and the
log) and one predicted-against-measured ``<model>.png`` per model.

Each model gets ``--budget-s`` seconds (default 90) and no step starts after ``--deadline-s`` (default
480) of the whole run: a step (but a model's first variant) that would start later is skipped and
recorded as skipped, and ``summary.json``/``summary.md`` are rewritten after every model, so a
run cut short keeps what it measured. Expect 6-8 minutes on an H200. Progress goes to
stderr, flushed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import fxshard
from fxshard.calibrate import CalibrationReport, calibrate
from fxshard.capture import capture
from fxshard.models import GPT2, GPT2Config, Llama, LlamaConfig, ResNet, ResNetConfig, UNet, UNetConfig
from fxshard.viz import calibration_png

VARIANTS = ("none", "full", "selective")
STAGES = 4
MICROBATCHES = 4


def _models(quick: bool, device: torch.device) -> dict[str, Callable[[], tuple]]:
    """name -> factory returning (model, inputs, loss target)."""
    b_lm, t = (4, 64) if quick else (8, 1024)
    b_cnn, hw = (4, 64) if quick else (32, 224)
    b_unet, hw_u = (4, 64) if quick else (8, 256)
    gpt = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64) if quick else \
        GPT2Config(n_layer=24, n_head=16, n_embd=1024)
    llama = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172, vocab_size=256, max_seq_len=64) \
        if quick else LlamaConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden=5632, max_seq_len=1024)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    def lm(cls: type, cfg: Any) -> Callable[[], tuple]:
        def make() -> tuple:
            torch.manual_seed(0)
            model = cls(cfg).to(device=device, dtype=dtype)
            tokens = torch.randint(0, cfg.vocab_size, (b_lm, t), device=device)
            return model, (tokens,), tokens
        return make

    def vision(cls: type, cfg: Any, batch: int, size: int) -> Callable[[], tuple]:
        def make() -> tuple:
            torch.manual_seed(0)
            model = cls(cfg).to(device=device, dtype=dtype)
            x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            return model, (x,), None
        return make

    return {"gpt2-medium": lm(GPT2, gpt), "llama-decoder": lm(Llama, llama),
            "resnet50": vision(ResNet, ResNetConfig(), b_cnn, hw), "unet": vision(UNet, UNetConfig(), b_unet, hw_u)}


def _loss(output: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    if target is None:
        return output.float().pow(2).mean()
    return F.cross_entropy(output.flatten(0, 1).float(), target.flatten())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps_per_s(step: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def overhead(make: Callable[[], tuple], devices: Any, device: torch.device, repeats: int) -> dict:
    """Training steps per second: eager, compile(strategy='single'), local pipeline on one device."""
    model, inputs, target = make()
    eager_model = copy.deepcopy(model)

    def eager_step() -> None:
        eager_model.zero_grad(set_to_none=True)
        _loss(eager_model(*inputs), target).backward()

    out = {"eager_steps_per_s": _steps_per_s(eager_step, repeats, device)}
    del eager_model
    single = fxshard.compile(copy.deepcopy(model), str(device) if device.type == "cuda" else devices, inputs,
                             strategy="single", loss_fn=_loss)
    out["single_steps_per_s"] = _steps_per_s(lambda: single.step(*inputs, target=target), repeats, device)
    del single
    pipe_plan = fxshard.plan(model, devices, inputs, strategy="pipeline", stages=STAGES, schedule="gpipe",
                             microbatches=1)
    if device.type == "cuda":  # every stage on the one local GPU: the overhead, not the split, is measured
        pipe_plan = dataclasses.replace(pipe_plan, stages=tuple(
            dataclasses.replace(s, devices=(str(device),)) for s in pipe_plan.stages))
    pipe = fxshard.compile(copy.deepcopy(model), str(device), inputs, plan=pipe_plan, loss_fn=_loss)
    out["pipeline_steps_per_s"] = _steps_per_s(lambda: pipe.step(*inputs, target=target), repeats, device)
    out["pipeline_stages"] = pipe.plan.num_stages
    return out


def _stage_rows(report: CalibrationReport) -> list[dict]:
    """Per stage (and the whole model, index -1): forward and backward, measured and predicted."""
    rows = []
    for s in (*report.stages, report.whole):
        rows.append({
            "stage": s.index, "measured_fwd_s": s.measured_fwd_s, "measured_bwd_s": s.measured_bwd_s,
            "analytical_fwd_s": s.analytical_fwd_s, "analytical_bwd_s": s.analytical_s - s.analytical_fwd_s,
            "profiled_fwd_s": s.profiled_fwd_s,
            "profiled_bwd_s": (s.profiled_s - s.profiled_fwd_s) if s.profiled_s is not None and s.profiled_fwd_s is not None
            else None,
            "measured_peak_bytes": s.measured_peak_bytes, "predicted_peak_bytes": s.predicted_peak_bytes,
            "plan_peak_bytes": s.plan_peak_bytes, "host_fwd_s": s.host_fwd_s, "host_bwd_s": s.host_bwd_s})
    return rows


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _stage_table(report: CalibrationReport) -> list[str]:
    lines = ["| stage | fwd measured | fwd analytical | fwd profiled | bwd measured | bwd analytical | bwd profiled "
             "| host fwd / bwd (no sync) | step peak MiB measured / predicted | plan's peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _stage_rows(report):
        lines.append(f"| {'whole' if r['stage'] < 0 else r['stage']} | {_ms(r['measured_fwd_s'])} | "
                     f"{_ms(r['analytical_fwd_s'])} | {_ms(r['profiled_fwd_s'])} | {_ms(r['measured_bwd_s'])} | "
                     f"{_ms(r['analytical_bwd_s'])} | {_ms(r['profiled_bwd_s'])} | "
                     f"{_ms(r['host_fwd_s'])} / {_ms(r['host_bwd_s'])} | "
                     f"{_mib(r['measured_peak_bytes'])} / {_mib(r['predicted_peak_bytes'])} | "
                     f"{_mib(r['plan_peak_bytes'])} |")
    return lines


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}


def run_model(name: str, make: Callable[[], tuple], devices: Any, device: torch.device, *, repeats: int,
              budget_s: float, out: Path, overhead_devices: Any, log: Callable[[str], None],
              variants: tuple[str, ...] = VARIANTS, deadline: float = float("inf")) -> tuple[dict, list[str]]:
    """Every variant and the overhead of one model, each guarded; (results, markdown lines)."""
    start = time.perf_counter()
    result: dict[str, Any] = {"variants": {}, "seconds": {}}
    lines = [f"## {name}", ""]

    def left() -> float:  # the model's budget, or the whole run's deadline (perf_counter time), whichever is nearer
        now = time.perf_counter()
        return min(budget_s - (now - start), deadline - now)

    try:
        model, inputs, _ = make()
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["batch"] = list(inputs[0].shape)
        t0 = time.perf_counter()
        plan = fxshard.plan(model, devices, inputs, strategy="pipeline", stages=STAGES, schedule="1f1b",
                            microbatches=MICROBATCHES, name=name)
        captured = capture(model, inputs)
        result["seconds"]["plan_and_capture"] = time.perf_counter() - t0
        result["plan"] = {"stages": plan.num_stages, "microbatches": plan.microbatches, "schedule": plan.schedule,
                          "stage_nodes": [len(s.nodes) for s in plan.stages]}
        log(f"[{name}] planned {plan.num_stages} stages in {result['seconds']['plan_and_capture']:.1f} s; "
            f"{result['parameters'] / 1e6:.0f}M parameters, batch {result['batch']}")
    except Exception as e:  # noqa: BLE001 - one model's failure must not lose the run
        result["error"] = _error(e)
        log(f"[{name}] FAILED to plan: {result['error']['error']}")
        return result, [*lines, f"planning failed: {result['error']['error']}", ""]
    for variant in variants:
        if left() <= 0 and variant != variants[0]:  # the first variant always runs: every model gets one
            result["variants"][variant] = {"skipped": f"the model's budget ({budget_s:.0f} s) or the run's deadline was reached"}
            log(f"[{name}] {variant}: skipped (budget)")
            continue
        log(f"[{name}] calibrating, activation checkpointing {variant} ({left():.0f} s of budget left)")
        t0 = time.perf_counter()
        try:
            report = calibrate(captured, plan, inputs, device=device, repeats=repeats, checkpointing=variant,
                               fit=variant == "none")
            doc = report.to_dict()
            doc["stage_rows"] = _stage_rows(report)
            result["variants"][variant] = doc
            lines += [f"### activation checkpointing: {variant}", "", report.to_markdown(), "", *_stage_table(report), ""]
            if variant == variants[0]:
                calibration_png(report, out / f"{name}.png")
        except Exception as e:  # noqa: BLE001
            result["variants"][variant] = _error(e)
            lines += [f"### activation checkpointing: {variant}", "", f"failed: {result['variants'][variant]['error']}", ""]
            log(f"[{name}] {variant} FAILED: {result['variants'][variant]['error']}")
        result["seconds"][variant] = time.perf_counter() - t0
        log(f"[{name}] {variant}: {result['seconds'][variant]:.1f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model, captured
    if left() <= 0:
        result["overhead"] = {"skipped": f"the model's budget ({budget_s:.0f} s) or the run's deadline was reached"}
        return result, [*lines, "overhead: skipped (budget)", ""]
    log(f"[{name}] overhead")
    t0 = time.perf_counter()
    try:
        over = overhead(make, overhead_devices, device, repeats)
        result["overhead"] = over
        lines.append(f"overhead: eager {over['eager_steps_per_s']:.2f} steps/s; compile single "
                     f"{over['single_steps_per_s'] / over['eager_steps_per_s']:.3f}x; local pipeline "
                     f"({over['pipeline_stages']} stages on one device) "
                     f"{over['pipeline_steps_per_s'] / over['eager_steps_per_s']:.3f}x")
    except Exception as e:  # noqa: BLE001
        result["overhead"] = _error(e)
        lines.append(f"overhead failed: {result['overhead']['error']}")
        log(f"[{name}] overhead FAILED: {result['overhead']['error']}")
    result["seconds"]["overhead"] = time.perf_counter() - t0
    result["seconds"]["total"] = time.perf_counter() - start
    log(f"[{name}] done in {result['seconds']['total']:.1f} s")
    return result, [*lines, ""]


def _summary_table(models: dict) -> list[str]:
    lines = ["| model | checkpointing | analytical: median abs error, tau | profiled: median abs error, tau |",
             "|---|---|---|---|"]
    for name, res in models.items():
        if "variants" not in res:
            why = res.get("skipped") or res.get("error", {}).get("error", "?")
            lines.append(f"| {name} | - | {why[:80]} | |")
        for variant, doc in res.get("variants", {}).items():
            if "stages" not in doc:
                lines.append(f"| {name} | {variant} | {doc.get('error', doc.get('skipped', '?'))[:80]} | |")
                continue

            def cell(which: str) -> str:
                err, tau = doc[f"median_abs_error_{which}"], doc[f"kendall_tau_{which}"]
                return "-" if err is None else f"{err:.1%}, {tau:.2f}" if tau is not None else f"{err:.1%}"

            lines.append(f"| {name} | {variant} | {cell('analytical')} | {cell('profiled')} |")
    return lines


def _environment(device: torch.device) -> dict:
    """What the numbers were measured on (in the summary, so no separate environment file)."""
    env = {"python": sys.version, "torch": torch.__version__, "cuda": torch.version.cuda,
           "platform": platform.platform(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"not run: {e}"
    return env


def _appendix(summary: dict) -> list[str]:
    env = summary["environment"]
    return ["", "## Environment", "", *(f"- {k}: {str(v).splitlines()[0]}" for k, v in env.items()),
            "", "## Run log", "", "```", *summary["log"], "```"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=90.0, help="seconds per model (default 90)")
    parser.add_argument("--deadline-s", type=float, default=480.0,
                        help="no step starts after this many seconds of the whole run (default 480)")
    parser.add_argument("--models", nargs="+", help="a subset of the models (default: all)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="activation-checkpointing policies to calibrate (default: all three)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    progress: list[str] = []

    def log(text: str) -> None:
        progress.append(f"[{time.perf_counter() - started:6.1f} s] {text}")
        print(progress[-1], file=sys.stderr, flush=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = fxshard.Cluster.local().devices[0].spec
    # Four devices of the local type, memory as large as needed: the point is the split.
    devices = fxshard.Cluster.parse(f"{STAGES}x{spec.name}" if spec.name != "cpu" else f"{STAGES}xcpu:64GB")
    summary: dict = {"device": str(device), "spec": spec.name, "torch": torch.__version__,
                     "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                     "stages": STAGES, "microbatches": MICROBATCHES, "repeats": args.repeats,
                     "budget_s_per_model": args.budget_s, "environment": _environment(device),
                     "log": progress, "models": {}}
    lines = [f"# Calibration and overhead on {spec.name} ({summary['gpu'] or device}), torch {torch.__version__}", "",
             f"4-stage pipeline plans (1F1B, {MICROBATCHES} micro-batches, one stage per rank), each stage timed on one "
             f"micro-batch; repeats {args.repeats}; torch threads {summary['torch_threads']}.", ""]
    body: list[str] = []
    log(f"device {summary['gpu'] or device}, torch {torch.__version__}, budget {args.budget_s:.0f} s per model")
    for name, make in _models(args.quick, device).items():
        if args.models and name not in args.models:
            continue
        if time.perf_counter() - started > args.deadline_s:
            summary["models"][name] = {"skipped": f"the run's deadline of {args.deadline_s:.0f} s had passed"}
            log(f"[{name}] skipped (deadline)")
            continue
        result, md = run_model(name, make, devices, device, repeats=args.repeats, budget_s=args.budget_s,
                               out=args.out, overhead_devices=devices if device.type == "cuda" else "4xcpu:64GB",
                               log=log, variants=tuple(args.variants), deadline=started + args.deadline_s)
        summary["models"][name] = result
        body += md
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Written after every model: a run cut short still leaves what it measured.
        summary["seconds"] = time.perf_counter() - started
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (args.out / "summary.md").write_text("\n".join([*lines, *_summary_table(summary["models"]), "", *body,
                                                       *_appendix(summary)]))
    summary["seconds"] = time.perf_counter() - started
    log(f"finished in {summary['seconds']:.0f} s")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    text = "\n".join([*lines, *_summary_table(summary["models"]), "", *body, *_appendix(summary)])
    (args.out / "summary.md").write_text(text)
    print("\n".join([*lines, *_summary_table(summary["models"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
