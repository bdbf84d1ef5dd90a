"""Training throughput of ``fxshard.compile(strategy="single")`` against the eager model, on the CPU.

For GPT-2, a LLaMA-style decoder, the ResNet and the U-Net at CPU sizes, with one torch thread:
two copies of the model (same weights), each with its own Adam. A training step is
``zero_grad(set_to_none=True)``, forward, loss, backward, ``optimizer.step()``; the eager copy
runs it by hand, the compiled copy through ``CompiledModel.step`` (the plan: one device, one
micro-batch). After warm-up the two alternate, eager then compiled, ``--rounds`` times, so load
on a shared machine falls on both alike; the ratio is compiled throughput over eager
throughput, from the medians and, paired, the median of each round's eager / compiled. Wall
seconds and the thread's CPU seconds (``time.thread_time``) are both kept: wall / CPU well
above 1 means the core was shared. See docs/calibration.md ("compile(single) overhead").

    python benchmarks/runtime_overhead.py [--rounds 10] [--models gpt2 llama] [--md F] [--json F]
    python benchmarks/runtime_overhead.py --quick      # tiny models, 2 rounds: a structure check
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fxshard
from fxshard.models.language import GPT2, GPT2Config, Llama, LlamaConfig
from fxshard.models.vision import ResNet, ResNetConfig, UNet, UNetConfig

__all__ = ["MODELS", "Row", "gpt2_cpu", "llama_cpu", "main", "measure", "resnet_cpu", "unet_cpu"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


@dataclass(frozen=True)
class Workload:
    """A model factory, its inputs and target, and its loss."""

    description: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # (input, target)
    loss: Loss


def _tokens(vocab: int, batch: int, seq: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq)))


def _images(batch: int, side: int, classes: int, dense: bool) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    shape = (batch, side, side) if dense else (batch,)
    return lambda: (torch.randn(batch, 3, side, side), torch.randint(0, classes, shape))


# CPU sizes: a step of a few hundred ms on one thread. The quick sizes only check the structure.
MODELS: dict[str, Workload] = {
    "gpt2": Workload("GPT-2, 4 layers x 256 wide, vocabulary 50257, batch 8 x 64 tokens",
                     lambda: GPT2(GPT2Config(n_layer=4, n_head=4, n_embd=256, block_size=64)),
                     _tokens(50257, 8, 64), _lm_loss),
    "llama": Workload("LLaMA-style, 6 layers x 256 wide, GQA 8/2 heads, vocabulary 32000, batch 8 x 64 tokens",
                      lambda: Llama(LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, ffn_hidden=688,
                                                vocab_size=32000, max_seq_len=64)),
                      _tokens(32000, 8, 64), _lm_loss),
    "resnet": Workload("ResNet-18-like (2, 2, 2, 2) x 64 wide, batch 16 x 3 x 64 x 64",
                       lambda: ResNet(ResNetConfig(layers=(2, 2, 2, 2), width=64)),
                       _images(16, 64, 1000, dense=False), F.cross_entropy),
    "unet": Workload("U-Net, 4 levels, base width 32, 8 classes, batch 4 x 3 x 96 x 96",
                     lambda: UNet(UNetConfig(base_width=32, depth=4, num_classes=8)),
                     _images(4, 96, 8, dense=True), F.cross_entropy),
}
QUICK: dict[str, Workload] = {
    "gpt2": Workload("GPT-2, 2 x 32 wide, vocabulary 512, batch 4 x 8", lambda: GPT2(GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=512, block_size=8)), _tokens(512, 4, 8), _lm_loss),
    "llama": Workload("LLaMA-style, 2 x 32 wide, vocabulary 512, batch 4 x 8", lambda: Llama(LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=512, max_seq_len=16)),
        _tokens(512, 4, 8), _lm_loss),
    "resnet": Workload("ResNet, 1 x 1 blocks, 8 wide, batch 4 x 3 x 16 x 16", lambda: ResNet(ResNetConfig(
        layers=(1, 1), width=8, num_classes=10)), _images(4, 16, 10, dense=False), F.cross_entropy),
    "unet": Workload("U-Net, 2 levels, base width 4, batch 4 x 3 x 16 x 16", lambda: UNet(UNetConfig(
        base_width=4, depth=2, num_classes=2)), _images(4, 16, 2, dense=True), F.cross_entropy),
}


def _factory(name: str) -> Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor]]]:
    def build() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
        torch.manual_seed(0)
        work = MODELS[name]
        return work.build(), (work.inputs()[0],)

    build.__doc__ = f"{MODELS[name].description}: a factory for 'fxshard calibrate FILE:{name}_cpu'."
    return build


# The same CPU sizes as factories: fxshard calibrate benchmarks/runtime_overhead.py:llama_cpu ...
gpt2_cpu, llama_cpu, resnet_cpu, unet_cpu = (_factory(n) for n in ("gpt2", "llama", "resnet", "unet"))


@dataclass(frozen=True)
class Row:
    """One model's medians: seconds per training step, wall and thread CPU, eager and compiled."""

    model: str
    description: str
    rounds: int
    microbatches: int
    eager_s: float
    compiled_s: float
    eager_cpu_s: float
    compiled_cpu_s: float
    ratio: float  # compiled throughput / eager throughput, from the medians
    cpu_ratio: float  # the same from the thread's CPU seconds (steadier on a shared machine)
    paired_ratio: float  # median over rounds of eager / compiled
    compile_s: float  # capture + plan + bind, once

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    step()
    return time.perf_counter() - wall, time.thread_time() - cpu


def measure(name: str, work: Workload, *, rounds: int, warmup: int) -> Row:
    """Eager against compiled(single) training steps of one workload, interleaved."""
    torch.manual_seed(0)
    eager = work.build()
    twin = copy.deepcopy(eager)
    x, target = work.inputs()
    eager_opt = torch.optim.Adam(eager.parameters(), lr=1e-4)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-4)
    start = time.perf_counter()
    compiled = fxshard.compile(twin, "1xcpu:64GB", (x,), strategy="single", microbatches=1)
    compile_s = time.perf_counter() - start

    def eager_step() -> None:
        eager_opt.zero_grad(set_to_none=True)
        work.loss(eager(x), target).backward()
        eager_opt.step()

    def compiled_step() -> None:
        twin_opt.zero_grad(set_to_none=True)
        compiled.step(x, target=target, loss_fn=work.loss)
        twin_opt.step()

    for _ in range(warmup):
        eager_step()
        compiled_step()
    e_runs, c_runs = [], []
    for _ in range(rounds):
        e_runs.append(_timed(eager_step))
        c_runs.append(_timed(compiled_step))
    eager_s = statistics.median(w for w, _ in e_runs)
    compiled_s = statistics.median(w for w, _ in c_runs)
    return Row(model=name, description=work.description, rounds=rounds, microbatches=compiled.plan.microbatches,
               eager_s=eager_s, compiled_s=compiled_s,
               eager_cpu_s=statistics.median(c for _, c in e_runs),
               compiled_cpu_s=statistics.median(c for _, c in c_runs),
               ratio=eager_s / compiled_s,
               cpu_ratio=statistics.median(c for _, c in e_runs) / statistics.median(c for _, c in c_runs),
               paired_ratio=statistics.median(e[0] / c[0] for e, c in zip(e_runs, c_runs)),
               compile_s=compile_s)


def fixed_overhead_s(steps: int) -> tuple[float, float]:
    """Median seconds of a training step of a 4 x 4 Linear, eager and compiled, interleaved: the
    compute is ~0, so the difference is what ``CompiledModel.step`` adds per step."""
    torch.manual_seed(0)
    eager, x, target = torch.nn.Linear(4, 4), torch.randn(2, 4), torch.randn(2, 4)
    compiled = fxshard.compile(copy.deepcopy(eager), "1xcpu:1GB", (x,), strategy="single", microbatches=1)
    runs: tuple[list[float], list[float]] = ([], [])
    for i in range(2 * steps):
        start = time.perf_counter()
        if i % 2:
            compiled.step(x, target=target, loss_fn=F.mse_loss)
        else:
            F.mse_loss(eager(x), target).backward()
        runs[i % 2].append(time.perf_counter() - start)
    return statistics.median(runs[0]), statistics.median(runs[1])


def to_markdown(rows: Sequence[Row], command: str, fixed: tuple[float, float]) -> str:
    lines = [f"`{command}` (torch {torch.__version__}, {platform.machine()}, 1 torch thread)", "",
             "| model | eager step | compiled step | throughput ratio (medians) | paired ratio | "
             "CPU-time ratio | wall / CPU eager, compiled | compile (once) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model}: {r.description} | {r.eager_s * 1e3:.1f} ms | {r.compiled_s * 1e3:.1f} ms | "
                     f"{r.ratio:.3f}x | {r.paired_ratio:.3f}x | {r.cpu_ratio:.3f}x | "
                     f"{r.eager_s / max(r.eager_cpu_s, 1e-9):.2f}, "
                     f"{r.compiled_s / max(r.compiled_cpu_s, 1e-9):.2f} | {r.compile_s:.1f} s |")
    lines.append(f"\nFixed cost per step (a 4 x 4 Linear, compute ~0): eager {fixed[0] * 1e6:.0f} us, compiled "
                 f"{fixed[1] * 1e6:.0f} us, so `CompiledModel.step` adds {(fixed[1] - fixed[0]) * 1e6:.0f} us")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10, help="timed steps of each, interleaved (median kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 rounds: checks the structure only")
    parser.add_argument("--md", metavar="FILE", help="write the table as markdown")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds {args.rounds} --warmup {args.warmup}: need rounds >= 1 and warmup >= 0")
    table = QUICK if args.quick else MODELS
    rounds, warmup = (2, 1) if args.quick else (args.rounds, args.warmup)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [measure(name, table[name], rounds=rounds, warmup=warmup) for name in args.models]
        fixed = fixed_overhead_s(20 if args.quick else 500)
    finally:
        torch.set_num_threads(before)
    command = "python benchmarks/runtime_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = to_markdown(rows, command.strip(), fixed)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": 1, "rows": [r.to_dict() for r in rows],
                       "fixed_step_s": {"eager": fixed[0], "compiled": fixed[1]}}, f, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
