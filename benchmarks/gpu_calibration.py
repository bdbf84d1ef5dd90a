"""Everything issue 7 measures, in one run: calibration reports and compile overhead.

Run it once on the GPU machine (it also runs on a CPU, with --quick, as a smoke test):

    python benchmarks/gpu_calibration.py --out $OUT            # GPU: realistic sizes
    python benchmarks/gpu_calibration.py --out /tmp/cal --quick  # CPU smoke test

For each model (GPT-2 medium, a LLaMA-style decoder, the ResNet-50-like CNN, the U-Net) it plans
a 4-stage pipeline for the local device type, runs ``fxshard.calibrate.calibrate`` (per-stage
measured against analytical and profiled predictions, peak memory on CUDA, fitted roofline
factors) and writes ``<model>.json``, ``<model>.md`` and ``<model>.png``. Then it measures
throughput overhead: eager against ``fxshard.compile`` with strategy "single", and against the
local pipeline with every stage on the same device, training steps per second, median of
``--repeats``. Everything lands in ``summary.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxshard
from fxshard.calibrate import calibrate
from fxshard.capture import capture
from fxshard.models import GPT2, GPT2Config, Llama, LlamaConfig, ResNet, ResNetConfig, UNet, UNetConfig
from fxshard.viz import calibration_png


def _models(quick: bool, device: torch.device) -> dict:
    """name -> (factory returning (model, inputs, loss target), stages)."""
    b_lm, t = (2, 64) if quick else (8, 1024)
    b_cnn, hw = (2, 64) if quick else (32, 224)
    b_unet, hw_u = (2, 64) if quick else (8, 256)
    gpt = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64) if quick else \
        GPT2Config(n_layer=24, n_head=16, n_embd=1024)
    llama = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172, vocab_size=256, max_seq_len=64) \
        if quick else LlamaConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden=5632, max_seq_len=1024)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    def lm(cls, cfg):
        def make():
            torch.manual_seed(0)
            model = cls(cfg).to(device=device, dtype=dtype)
            tokens = torch.randint(0, cfg.vocab_size, (b_lm, t), device=device)
            return model, (tokens,), tokens
        return make

    def vision(cls, cfg, batch, size):
        def make():
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


def _steps_per_s(step, repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def overhead(make, devices: str, device: torch.device, repeats: int) -> dict:
    """Training steps per second: eager, compile(strategy='single'), local pipeline on one device."""
    model, inputs, target = make()
    eager_model = copy.deepcopy(model)

    def eager_step():
        eager_model.zero_grad(set_to_none=True)
        _loss(eager_model(*inputs), target).backward()

    single = fxshard.compile(copy.deepcopy(model), str(device) if device.type == "cuda" else devices, inputs, strategy="single", loss_fn=_loss)
    pipe_plan = fxshard.plan(model, devices, inputs, strategy="pipeline", schedule="gpipe", microbatches=1)
    if device.type == "cuda":  # every stage on the one local GPU: the overhead, not the split, is measured
        pipe_plan = dataclasses.replace(pipe_plan, stages=tuple(
            dataclasses.replace(s, devices=(str(device),)) for s in pipe_plan.stages))
    pipe = fxshard.compile(copy.deepcopy(model), str(device), inputs, plan=pipe_plan, loss_fn=_loss)
    return {"eager_steps_per_s": _steps_per_s(eager_step, repeats, device),
            "single_steps_per_s": _steps_per_s(lambda: single.step(*inputs, target=target), repeats, device),
            "pipeline_steps_per_s": _steps_per_s(lambda: pipe.step(*inputs, target=target), repeats, device),
            "pipeline_stages": pipe.plan.num_stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = fxshard.Cluster.local()
    spec = local.devices[0].spec
    # Four stages on one device type, memory as large as needed: the point is the split.
    devices = fxshard.Cluster.parse(f"4x{spec.name}" if spec.name != "cpu" else "4xcpu:64GB")
    summary: dict = {"device": str(device), "spec": spec.name, "torch": torch.__version__, "models": {}}
    lines = [f"# Calibration and overhead on {spec.name} ({device}), torch {torch.__version__}", ""]
    for name, make in _models(args.quick, device).items():
        if args.models and name not in args.models:
            continue
        print(f"[{name}] calibrating", file=sys.stderr, flush=True)
        model, inputs, _ = make()
        plan = fxshard.plan(model, devices, inputs, strategy="pipeline", name=name)
        report = calibrate(capture(model, inputs), plan, inputs, device=device, repeats=args.repeats)
        (args.out / f"{name}.json").write_text(report.to_json())
        (args.out / f"{name}.md").write_text(report.to_markdown() + "\n")
        calibration_png(report, args.out / f"{name}.png")
        print(f"[{name}] overhead", file=sys.stderr, flush=True)
        over = overhead(make, devices if device.type == "cuda" else "4xcpu:64GB", device, args.repeats)
        summary["models"][name] = {"calibration": report.to_dict(), "overhead": over}
        ratio_single = over["single_steps_per_s"] / over["eager_steps_per_s"]
        ratio_pipe = over["pipeline_steps_per_s"] / over["eager_steps_per_s"]
        lines += [report.to_markdown(), "",
                  (f"overhead: eager {over['eager_steps_per_s']:.2f} steps/s; compile single {ratio_single:.3f}x; "
                   f"local pipeline ({over['pipeline_stages']} stages on one device) {ratio_pipe:.3f}x"), ""]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
