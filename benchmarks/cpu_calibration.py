"""Whole plans under torchrun on this CPU: measured per-stage, step and per-rank memory against predictions.

For GPT-2 (real 50257-token vocabulary, so the tied head is heavy), a LLaMA-style decoder, the
ResNet and the U-Net, each shrunk to a ~0.5-1.5 s training step on one thread, fxshard plans a
pipeline (``strategy="pipeline"``, stages = ranks, 1F1B, micro-batches = 2 x stages where they
divide the batch) on ``RANKSxcpu`` and :func:`fxshard.calibrate_dist.run_plan` runs it under
torchrun (gloo, one torch thread per rank) and holds it against the analytical and the profiled
predictions. The profiled model is measured twice: by every rank right after its timed steps,
each stage held against its own rank's profile (``profile_in_ranks``: the same cores at the same
minute), and in this process after the run, as a planner profiles. One row per model and rank count:

- per-stage fwd+bwd median abs error of each pricing against the measured wall time, and of the
  profiled model against each rank's thread CPU time (robust to a loaded machine);
- how far apart the ranks' prices of the same whole plan were, taken at the same moment on
  their own cores (the machine's disagreement with itself);
- the step's error, the step simulated over the *measured* stage times (its gap to the measured
  step is what the simulator leaves out, whatever the stage predictions) and Adam's step time on
  the slowest rank (timed here on one thread, scaled by the rank's parameter bytes);
- each rank's peak above its baseline against the planner's peak for its stages, and autograd's
  saved bytes against the predicted activations per micro-batch.

Four ranks on a 2-core machine oversubscribe it (two ranks per core): the report says so, and
gives the stages' wall / thread-time ratio, ~1 on an idle core, ~2 when two ranks share one.

The models are factories of this file (``"benchmarks/cpu_calibration.py:gpt2_cpu"``), so every
torchrun rank builds the same model by reference; the module imports nothing but torch and
fxshard at import time, as a factory file must.

    python benchmarks/cpu_calibration.py --md cal.md --json cal.json
    python benchmarks/cpu_calibration.py --models gpt2 llama --ranks 2
    python benchmarks/cpu_calibration.py --quick      # tiny models, 2 ranks, 2 steps: structure only
"""

from __future__ import annotations

import torch

from fxshard.models import GPT2, GPT2Config, Llama, LlamaConfig, ResNet, ResNetConfig, UNet, UNetConfig

__all__ = ["gpt2_cpu", "gpt2_quick", "llama_cpu", "llama_quick", "resnet_cpu", "resnet_quick", "unet_cpu",
           "unet_quick"]

_VOCAB = 50257  # GPT-2's own: the tied embedding and head are a real share of the work and the memory


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), dtype=torch.long)


# Sized for one torch thread per rank on this 2-core machine: a whole training step (fwd, bwd,
# Adam) of 0.5-1.3 s on one thread, 30-80 MB of parameters and 50-100 MB of saved activations.

def gpt2_cpu() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """GPT-2, 4 layers x 256 wide, vocabulary 50257, batch 8 x 64 tokens (64 MB of weights)."""
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=_VOCAB, block_size=64)
    return GPT2(cfg), (_tokens(_VOCAB, 8, 64),)


def llama_cpu() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, 2 kv heads), 6 layers x 256, vocabulary 32000, 8 x 64."""
    cfg = LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=32000,
                      max_seq_len=64)
    return Llama(cfg), (_tokens(32000, 8, 64),)


def resnet_cpu() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Bottleneck ResNet (2, 2, 2, 2) blocks, width 64, 1000 classes, 16 images of 64 x 64."""
    return ResNet(ResNetConfig(layers=(2, 2, 2, 2), width=64)), (torch.randn(16, 3, 64, 64),)


def unet_cpu() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """U-Net, 4 levels from width 32, 8 classes, 4 images of 96 x 96."""
    return UNet(UNetConfig(base_width=32, depth=4, num_classes=8)), (torch.randn(4, 3, 96, 96),)


# Tiny twins for --quick (the structure-only test): a step of milliseconds.

def gpt2_quick() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """GPT-2, 2 layers x 32 wide, vocabulary 512, 8 x 8 tokens."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=512, block_size=8)
    return GPT2(cfg), (_tokens(512, 8, 8),)


def llama_quick() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """LLaMA-style, 2 layers x 32 wide, vocabulary 512, 4 x 16 tokens."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=512, max_seq_len=16)
    return Llama(cfg), (_tokens(512, 4, 16),)


def resnet_quick() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Bottleneck ResNet (1, 1) blocks, width 8, 10 classes, 4 images of 16 x 16."""
    return ResNet(ResNetConfig(layers=(1, 1), width=8, num_classes=10)), (torch.randn(4, 3, 16, 16),)


def unet_quick() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """U-Net, 2 levels from width 4, 2 classes, 4 images of 16 x 16."""
    return UNet(UNetConfig(base_width=4, depth=2, num_classes=2)), (torch.randn(4, 3, 16, 16),)


# -- the benchmark -----------------------------------------------------------------------------

MODELS = ("gpt2", "llama", "resnet", "unet")
TARGET = 0.15  # issue 16: per-stage, step and per-rank memory errors of at most 15%


def model_ref(name: str, *, quick: bool = False) -> str:
    """The factory reference torchrun ranks build ``name`` from (an absolute path: any working directory)."""
    import os

    return f"{os.path.abspath(__file__)}:{name}_{'quick' if quick else 'cpu'}"


def pipeline_plan(ref: str, ranks: int) -> object:
    """fxshard's pipeline for ``ranks`` CPU ranks: one stage per rank, 1F1B, 2 x stages micro-batches
    where they divide the batch (else one per stage), with the loss the ranks train with priced."""
    import fxshard
    from fxshard import zoo
    from fxshard.calibrate_dist import run_objective
    from fxshard.capture import capture

    zm = zoo.resolve(ref)
    batch = zm.example_inputs[0].shape[0]
    microbatches = 2 * ranks if batch % (2 * ranks) == 0 else ranks
    loss_fn, target = run_objective(capture(zm.model, zm.example_inputs))
    return fxshard.plan(zm.model, f"{ranks}xcpu:4GB", zm.example_inputs, strategy="pipeline", stages=ranks,
                        schedule="1f1b", microbatches=microbatches, loss_fn=loss_fn, example_target=target)


def adam_step_s(ref: str, param_bytes: list[int], *, repeats: int = 3) -> float:
    """Seconds of ``torch.optim.Adam.step`` on one thread for the slowest rank, from the model's whole
    parameter set timed here (thread CPU time, so other processes' load does not count) and scaled by
    each rank's parameter bytes (the step is memory-bound: linear in the bytes)."""
    import time

    from fxshard import zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = [p for p in zoo.resolve(ref).model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer = torch.optim.Adam(params, lr=1e-4)
        optimizer.step()  # the first step allocates the moments
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            optimizer.step()
            times.append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    total = sum(p.numel() * p.element_size() for p in params)
    return min(times) / total * max(param_bytes)


def summary(name: str, report: object, adam_s: float | None = None, here: object | None = None) -> dict:
    """One row of the summary table from a :class:`fxshard.calibrate_dist.DistCalibrationReport`
    (``here``: the same run against the profiled model measured in this process after it)."""
    import os
    import statistics

    walls = sum(s.measured_s for s in report.stages)
    cpus = sum(s.fwd_cpu_s + s.bwd_cpu_s for s in report.stages)
    saved = [s.saved_bytes / s.predicted_activation_bytes for s in report.stages if s.predicted_activation_bytes > 0]
    mem = report.memory_errors()
    return {
        "model": name, "ranks": report.world, "cores": os.cpu_count(),
        "oversubscribed": report.world > (os.cpu_count() or 1),
        "schedule": report.schedule, "microbatches": report.microbatches, "batch_size": report.batch_size,
        "load_average": report.load_average, "wall_over_cpu": walls / cpus if cpus > 0 else None,
        "stage_error_analytical": report.median_abs_error("analytical"),
        "stage_error_profiled": report.median_abs_error("profiled"),
        "stage_tau_profiled": report.tau("profiled"),
        # against the ranks' thread CPU time: on a loaded machine, the compute without the waits for a core
        "stage_error_profiled_cpu_clock": report.median_abs_error("profiled", "cpu"),
        "profile_clock": report.profile_clock,
        "measured_step_s": report.measured_step_s,
        "analytical_step_s": report.analytical_step_s, "step_error_analytical": report.step_error("analytical"),
        "profiled_step_s": report.profiled_step_s, "step_error_profiled": report.step_error("profiled"),
        "profile_where": report.profile_where, "profile_spread": report.profile_spread,
        "stage_error_profiled_here": here.median_abs_error("profiled") if here else None,
        "profiled_step_here_s": here.profiled_step_s if here else None,
        "step_error_profiled_here": here.step_error("profiled") if here else None,
        # the plan simulated over the measured stage times: its gap to the measured step is what the
        # simulator leaves out (optimizer step, loss, tied weights' all-reduce, the schedule's overheads)
        "step_from_measured_stages_s": report.simulated_measured_step_s,
        "adam_step_s": adam_s,
        "memory_error_median": report.median_abs_memory_error(),
        "memory_error_worst": max(mem, key=abs) if mem else None,
        "measured_peak_mib": [r.measured_peak_bytes / 2**20 for r in report.ranks],
        "predicted_peak_mib": [r.predicted_peak_bytes / 2**20 for r in report.ranks],
        "saved_over_predicted_activations": statistics.median(saved) if saved else None,
    }


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    mark = "" if abs(x) <= TARGET else " ✗"
    return (f"{x:+.0%}" if signed else f"{x:.0%}") + mark


def _gist(error: Exception) -> str:
    """A failure in one line: the first line of the message and the last (a failing rank's own error)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.startswith("Command:")]
    gist = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return gist[:400].replace("|", "/")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _spread(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"  # a measurement of the machine, not a target


def summary_markdown(rows: list[dict]) -> str:
    """The summary table: one row per model and rank count (✗: over the 15% target)."""
    lines = ["| model | ranks | plan | load (wall/cpu) | stage err analytical | stage err profiled | "
             "stage err profiled vs rank CPU time | "
             "step measured | step err analytical | step err profiled | "
             "profiled here after the run: stage err, step err | ranks' prices apart | "
             "step simulated from measured stages | "
             "Adam step (slowest rank) | memory err per rank (median, worst) | "
             "peak per rank measured / predicted (MiB) | saved / predicted activations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['ranks']} | failed: {r['error']} |" + " - |" * 14)
            continue
        ranks = f"{r['ranks']}" + (f" (on {r['cores']} cores)" if r["oversubscribed"] else "")
        load = "-" if r["wall_over_cpu"] is None else f"{r['wall_over_cpu']:.2f}"
        peaks = ", ".join(f"{m:.0f} / {p:.0f}" for m, p in zip(r["measured_peak_mib"], r["predicted_peak_mib"]))
        saved = "-" if r["saved_over_predicted_activations"] is None else f"{r['saved_over_predicted_activations']:.2f}"
        lines.append(f"| {r['model']} | {ranks} | {r['schedule']} x{r['microbatches']} mb of {r['batch_size']} | "
                     f"{load} | {_pct(r['stage_error_analytical'])} | {_pct(r['stage_error_profiled'])} | "
                     f"{_pct(r['stage_error_profiled_cpu_clock'])} | "
                     f"{r['measured_step_s'] * 1e3:.0f} ms | {_pct(r['step_error_analytical'], True)} | "
                     f"{_pct(r['step_error_profiled'], True)} | {_pct(r.get('stage_error_profiled_here'))}, "
                     f"{_pct(r.get('step_error_profiled_here'), True)} | {_spread(r.get('profile_spread'))} | "
                     f"{_ms(r['step_from_measured_stages_s'])} | "
                     f"{_ms(r['adam_step_s'])} | {_pct(r['memory_error_median'])}, "
                     f"{_pct(r['memory_error_worst'], True)} | {peaks} | {saved} |")
    return "\n".join(lines) + "\n"


def run(models: list[str], ranks: list[int], *, quick: bool, steps: int, warmup: int,
        profiled: bool = True) -> tuple[list[dict], list[dict]]:
    """Plan and calibrate every model on every rank count: (summary rows, full reports as dicts)."""
    import sys
    import time

    from fxshard.calibrate_dist import capture_model, compare_run, run_plan
    from fxshard.errors import FxshardError

    rows, reports = [], []
    for name in models:
        for n in ranks:
            ref = model_ref(name, quick=quick)
            t0 = time.perf_counter()
            try:
                plan = pipeline_plan(ref, n)
                # The profiled model measured on the ranks right after their timed steps (each stage
                # against its own rank's), and in this process after the run, as a planner would.
                measured = run_plan(ref, plan, steps=steps, warmup=warmup, threads=1, profile_in_ranks=profiled)
                captured = capture_model(ref, plan)
                report = compare_run(measured, captured, model=ref, profiled=profiled)
                here = compare_run(measured, captured, model=ref, where="here") if profiled else None
            except FxshardError as e:
                rows.append({"model": name, "ranks": n, "error": f"{type(e).__name__}: {_gist(e)}"})
                print(f"{name} on {n} ranks failed: {rows[-1]['error']}", file=sys.stderr, flush=True)
                continue
            rows.append(summary(name, report, adam_step_s(ref, [r.param_bytes for r in report.ranks]), here))
            reports.append({"model": name, "ranks": n, "report": report.to_dict(), "markdown": report.to_markdown(),
                            "profiled_here": here.to_dict() if here else None})
            print(f"{name} on {n} ranks: {time.perf_counter() - t0:.0f} s\n{report.to_markdown()}\n",
                  file=sys.stderr, flush=True)
    return rows, reports


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on 2 ranks, 2 steps: structure only")
    parser.add_argument("--models", nargs="+", choices=MODELS, help=f"default: all ({', '.join(MODELS)})")
    parser.add_argument("--ranks", nargs="+", type=int, help="rank counts (default: 2 4; --quick: 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 5; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default 2)")
    parser.add_argument("--no-profiled", action="store_true", help="skip the profiled prediction")
    parser.add_argument("--md", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    models = args.models or list(MODELS)
    ranks = args.ranks or ([2] if args.quick else [2, 4])
    if any(n < 2 for n in ranks):
        parser.error(f"--ranks {ranks}: a pipeline needs at least 2 ranks")
    steps = args.steps or (2 if args.quick else 5)
    rows, reports = run(models, ranks, quick=args.quick, steps=steps, warmup=args.warmup,
                        profiled=not args.no_profiled)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _suite import machine

    command = "python benchmarks/cpu_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"`{command.strip()}`\n\n{machine()}; gloo, 1 torch thread per rank; load average "
            f"{os.getloadavg()[0]:.1f} at the end. Errors are (predicted - measured) / measured; ✗: over 15%.\n\n")
    text = head + summary_markdown(rows) + "".join(f"\n### {r['model']} on {r['ranks']} ranks\n\n{r['markdown']}\n"
                                                   for r in reports)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command.strip(), "machine": machine(), "summary": rows,
                                         "runs": [{k: v for k, v in r.items() if k != "markdown"} for r in reports]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
