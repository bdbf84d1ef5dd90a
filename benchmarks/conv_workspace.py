"""What one operator's backward holds on this CPU beyond the gradients it returns, against the rule.

Each row runs one backward alone, on one torch thread, with glibc's mmap threshold pinned (every
tensor its own mapping, so the resident set follows the live bytes), and reports the resident-set
high-water mark of the backward (``host_memory.ResidentPeak``) less the gradients it returns, the
best of ``--reps``. Convolutions are held against
``fxshard.cost_models.conv_workspace.conv_backward_workspace``; batch norm, ReLU and the residual add
are measured for the record (the rule gives them 0). docs/cost_models.md has the results.

Usage::

    python benchmarks/conv_workspace.py            # markdown tables on stdout
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
from torch import nn

from fxshard.cost_models.conv_workspace import conv_backward_workspace, onednn_float32_convolution
from fxshard.cost_models.host_memory import ResidentPeak, pin_mmap_threshold, trim_heap

__all__ = ["CONVS", "main", "measure"]

MiB = 2**20
Built = tuple[torch.Tensor, list[torch.Tensor]]

# (N, C_in, H=W, C_out, kernel, stride): the ResNet (batch 16 at 64 x 64) and U-Net (batch 4 at
# 96 x 96) CPU sizes of benchmarks/cpu_calibration.py, and the channel counts that change the layout.
CONVS = [
    (16, 3, 64, 64, 7, 2), (16, 64, 16, 64, 3, 1), (16, 64, 16, 256, 1, 1), (16, 256, 16, 64, 1, 1),
    (16, 64, 32, 128, 3, 2), (16, 256, 32, 64, 1, 2), (16, 64, 32, 64, 5, 1),
    (4, 3, 96, 32, 3, 1), (4, 4, 96, 32, 3, 1), (4, 8, 96, 32, 3, 1), (4, 24, 96, 32, 3, 1),
    (4, 32, 96, 64, 3, 1), (4, 64, 96, 32, 3, 1), (4, 64, 48, 64, 3, 1),
    (4, 64, 16, 256, 1, 1), (8, 256, 32, 64, 1, 1), (4, 32, 96, 8, 1, 1),  # Slow2d: 1 x 1 on under 16 images
]


def measure(build: Callable[[], Built], reps: int) -> int:
    """Peak resident bytes of one backward of ``build()``'s output, less the new gradients it returns."""
    best = None
    for _ in range(reps):
        out, wrt = build()
        grad_out = torch.randn_like(out)
        gc.collect()
        trim_heap()
        probe = ResidentPeak()
        probe.start()
        grads = torch.autograd.grad([out], wrt, [grad_out])
        # a gradient that is the output gradient itself (an add's) is no new memory
        new = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads
               if g.untyped_storage().data_ptr() != grad_out.untyped_storage().data_ptr()}
        extra = probe.peak_bytes() - sum(new.values())
        best = extra if best is None else min(best, extra)
        del out, wrt, grad_out, grads
    return best


def _conv(n: int, cin: int, size: int, cout: int, k: int, stride: int, input_grad: bool,
          channels_last: bool = False) -> Callable[[], Built]:
    def build() -> Built:
        x = torch.randn(n, cin, size, size)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(input_grad)
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        return conv(x), ([x] if input_grad else []) + [conv.weight]

    return build


def conv_table(reps: int) -> list[str]:
    lines = ["| N | C_in | H=W | C_out | k | stride | backend | input MiB | out grad MiB | gradients | measured MiB | "
             "rule MiB | error | channels-last MiB |", "|" + "---|" * 14]
    for n, cin, size, cout, k, stride in CONVS:
        out = (size + 2 * (k // 2) - k) // stride + 1
        for input_grad in (True, False):
            measured = measure(_conv(n, cin, size, cout, k, stride, input_grad), reps)
            onednn = onednn_float32_convolution((n, cin, size, size), (k, k), stride=(stride, stride), dilation=(1, 1),
                                                groups=1, threads=torch.get_num_threads())
            rule = conv_backward_workspace((n, cin, size, size), (n, cout, out, out), kernel=(k, k),
                                           stride=(stride, stride), element_size=4, input_grad=input_grad,
                                           weight_grad=True, onednn=onednn)
            cl = measure(_conv(n, cin, size, cout, k, stride, input_grad, channels_last=True), reps)
            lines.append(f"| {n} | {cin} | {size} | {cout} | {k} | {stride} | {'oneDNN' if onednn else 'Slow2d'} | "
                         f"{n * cin * size * size * 4 / MiB:.2f} | "
                         f"{n * cout * out * out * 4 / MiB:.2f} | {'input, weight' if input_grad else 'weight'} | "
                         f"{measured / MiB:.2f} | {rule / MiB:.2f} | {(rule - measured) / max(measured, MiB):+.0%} | "
                         f"{cl / MiB:.2f} |")
    return lines


def other_table(reps: int) -> list[str]:
    def batch_norm(shape: tuple[int, ...]) -> Built:
        x = torch.randn(shape).requires_grad_()
        bn = nn.BatchNorm2d(shape[1])
        return bn(x), [x, bn.weight, bn.bias]

    def relu(shape: tuple[int, ...]) -> Built:
        x = torch.randn(shape).requires_grad_()
        return torch.relu(x.clone()), [x]  # clone: a non-leaf input as in a model; its backward copies nothing

    def add(shape: tuple[int, ...]) -> Built:
        a, b = torch.randn(shape).requires_grad_(), torch.randn(shape).requires_grad_()
        return a + b, [a, b]

    lines = ["| op | shape | input MiB | measured MiB |", "|---|---|---|---|"]
    for shape in ((16, 256, 16, 16), (4, 32, 96, 96)):
        for name, op in (("BatchNorm2d (training)", batch_norm), ("relu", relu), ("a + b", add)):
            measured = measure(lambda op=op, shape=shape: op(shape), reps)
            lines.append(f"| {name} | {shape} | {torch.Size(shape).numel() * 4 / MiB:.2f} | {measured / MiB:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="backwards per row; the smallest counts")
    args = parser.parse_args(argv)
    if not ResidentPeak.available() or not pin_mmap_threshold():
        parser.error("needs Linux's resident-set high-water mark (/proc/self/clear_refs) and glibc's mallopt")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread; error relative to "
          "the measured bytes (or 1 MiB if fewer)\n")
    print("\n".join(conv_table(args.reps)) + "\n")
    print("\n".join(other_table(args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
