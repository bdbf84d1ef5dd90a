"""The step's passes outside the graph: the optimizer step and gradient accumulation.

The optimizer step's temporaries and time, per optimizer and device, and the time a
micro-batch's backward spends adding its gradients into those of the micro-batches before it.

Both follow torch.optim's implementations as torch 2.x ships them (torch/optim/adam.py, sgd.py,
optimizer.py); docs/cost_models.md quotes the lines. ``torch.optim.Adam()`` built with the
defaults picks its implementation in ``_default_to_fused_or_foreach``: the multi-tensor
("foreach") path when every parameter is on a device of
``_get_foreach_kernels_supported_devices()`` (cuda, xpu, mtia, the privateuse1 backend; ROCm
is "cuda" to torch), else the single-tensor loop (the CPU). Fused Adam is opt-in.

- single-tensor Adam (``_single_tensor_adam``) updates one parameter at a time and computes
  ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``: ``sqrt()`` and the
  division each allocate a tensor the size of the parameter, so the step holds two at once:
  2 x the largest parameter.
- foreach Adam (``_multi_tensor_adam``) computes ``exp_avg_sq_sqrt =
  torch._foreach_sqrt(device_exp_avg_sqs)`` for the whole group, then divides and adds in
  place: one copy of all the group's parameters.
- fused Adam and SGD without momentum (torch's default, ``param.add_(grad, alpha=-lr)``)
  allocate nothing; "none" (the user's own in-place step) is priced as nothing.

The step is a memory-bound pass: its time is the bytes its kernels read and write over the
device's roofline memory bandwidth (:func:`fxshard.cost_models.analytical.roofline_time`).
Measured on the CPU (docs/cost_models.md), the temporaries live after the last backward has
freed the activations, so they are a phase of their own: a stage's peak is
``state + max(in-flight activations + transient, optimizer temporaries)``.

Gradient accumulation follows autograd's ``AccumulateGrad``
(torch/csrc/autograd/functions/accumulate_grad.h): the first backward of a step finds
``.grad`` unset and steals the new gradient (Case 1.1: no copy); every later micro-batch finds
it set and runs ``variable_grad += new_grad`` (Case 2.3): a pass reading both gradients and
writing one, 3 x the gradient bytes, while the new gradient is alive next to the accumulated
one. A pipeline stage pays it on every backward but its first of the step.

:class:`StepRates` prices both passes for one device: by the roofline's memory term (the
analytical model) or at the seconds per byte a cost model measured (the profiled model times
``g += new`` and ``optimizer.step()`` on the local device, :func:`measure_step_rates`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from fxshard.cost_models.analytical import RooflineFactors, factors_for, roofline_time
from fxshard.cost_models.timing import Clock, median_time
from fxshard.devices import DeviceSpec
from fxshard.errors import CostModelError

__all__ = ["ACCUMULATE_ACCESSES", "Implementation", "StepRates", "accumulate_time", "measure_step_rates",
           "optimizer_implementation", "optimizer_step_bytes", "optimizer_step_time", "optimizer_step_transient_bytes"]

Implementation = Literal["single", "foreach", "fused", "none"]

# Device kinds whose tensors take torch's foreach path by default (optimizer.py,
# _default_to_fused_or_foreach with _get_foreach_kernels_supported_devices(); "rocm" is torch's "cuda").
_FOREACH_KINDS = ("cuda", "rocm", "xpu", "mtia")

# Per parameter element, in units of the parameter's size: what the step's kernels read and
# write (an in-place op reads and writes its tensor). Adam, single-tensor or foreach, runs the
# same seven element-wise kernels: exp_avg.lerp_(grad) 3, exp_avg_sq.mul_(beta2) 2,
# .addcmul_(grad, grad) 3, sqrt 2, / bias_correction2_sqrt 2, .add_(eps) 2,
# param.addcdiv_(exp_avg, denom) 4 = 18; fused Adam is one kernel reading param, grad and the two
# moments and writing param and the moments: 7; SGD without momentum: param.add_(grad) 3.
_ACCESSES = {("adam", "single"): 18, ("adam", "foreach"): 18, ("adam", "fused"): 7,
             ("sgd", "single"): 3, ("sgd", "foreach"): 3, ("sgd", "fused"): 3}
_KERNELS = {"adam": 7, "sgd": 1}  # element-wise kernels of one pass
ACCUMULATE_ACCESSES = 3  # variable_grad += new_grad: reads both, writes one, per gradient byte


def optimizer_implementation(optimizer: str, device_kind: str, *, fused: bool = False) -> Implementation:
    """The implementation torch.optim picks by default for ``optimizer`` on a device of ``device_kind``.

    Raises:
        CostModelError: an unknown optimizer.
    """
    if optimizer not in ("adam", "sgd", "none"):
        raise CostModelError(f"optimizer={optimizer!r} is unknown; use one of 'adam', 'sgd', 'none'")
    if optimizer == "none":
        return "none"
    if fused:
        return "fused"
    return "foreach" if device_kind in _FOREACH_KINDS else "single"


def optimizer_step_transient_bytes(optimizer: str, param_sizes: Sequence[float], device_kind: str, *,
                                   fused: bool = False) -> float:
    """Bytes the optimizer step allocates on top of the state it keeps.

    Args:
        optimizer: "adam", "sgd" or "none".
        param_sizes: bytes of each parameter tensor the step updates (for mixed precision, the
            fp32 master copies).
        device_kind: the devices' kind ("cpu", "cuda", ...): it picks torch's implementation.
        fused: Adam built with ``fused=True``.

    Example::

        optimizer_step_transient_bytes("adam", [4e6, 1e6], "cpu")   # 8e6: sqrt and the division
        optimizer_step_transient_bytes("adam", [4e6, 1e6], "cuda")  # 5e6: _foreach_sqrt of the group
    """
    impl = optimizer_implementation(optimizer, device_kind, fused=fused)
    if optimizer != "adam" or impl == "fused" or not param_sizes:
        return 0.0
    return 2.0 * max(param_sizes) if impl == "single" else float(sum(param_sizes))


def optimizer_step_bytes(optimizer: str, param_bytes: float, device_kind: str, *, fused: bool = False) -> float:
    """Bytes the step's kernels read and write for parameters of ``param_bytes`` in all."""
    impl = optimizer_implementation(optimizer, device_kind, fused=fused)
    return 0.0 if impl == "none" else _ACCESSES[optimizer, impl] * float(param_bytes)


def optimizer_step_time(optimizer: str, param_bytes: float, device: DeviceSpec, *,
                        training: bool = True, fused: bool = False, factors: RooflineFactors | None = None) -> float:
    """Seconds of one optimizer step over parameters of ``param_bytes`` in all on ``device``.

    A memory-bound pass priced by the roofline's memory term, plus one launch per kernel of a
    group (a plan keeps no parameter count, and the single-tensor path's launches per parameter,
    microseconds each, are small beside the pass). Inference: 0.
    """
    if not training or param_bytes <= 0:
        return 0.0
    impl = optimizer_implementation(optimizer, device.kind, fused=fused)
    if impl == "none":
        return 0.0
    kernels = 1 if impl == "fused" else _KERNELS[optimizer]
    return roofline_time(0.0, optimizer_step_bytes(optimizer, param_bytes, device.kind, fused=fused), kernels,
                         torch.float32, device, factors or factors_for(device))


def accumulate_time(grad_bytes: float, device: DeviceSpec, *, factors: RooflineFactors | None = None) -> float:
    """Seconds one backward spends adding gradients of ``grad_bytes`` in all into the ones
    already accumulated (``variable_grad += new_grad``), by the roofline's memory term, one
    kernel (a plan keeps no parameter count)."""
    if grad_bytes <= 0:
        return 0.0
    return roofline_time(0.0, ACCUMULATE_ACCESSES * float(grad_bytes), 1, torch.float32, device,
                         factors or factors_for(device))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepRates:
    """What the step's passes outside the graph cost on one device.

    ``accumulate_s_per_byte`` and ``optimizer_s_per_byte`` (by optimizer name) are seconds per
    gradient or parameter byte measured on the device (:func:`measure_step_rates`); where a rate
    is absent the pass is priced by the roofline of ``device`` under ``factors`` (the device's
    own when None). ``source`` says which, for reports.
    """

    device: DeviceSpec
    factors: RooflineFactors | None = None
    accumulate_s_per_byte: float | None = None
    optimizer_s_per_byte: tuple[tuple[str, float], ...] = ()
    source: str = "roofline"

    def accumulate_s(self, grad_bytes: float) -> float:
        """Seconds of one accumulating backward's ``+=`` over gradients of ``grad_bytes``."""
        if self.accumulate_s_per_byte is None:
            return accumulate_time(grad_bytes, self.device, factors=self.factors)
        return self.accumulate_s_per_byte * max(0.0, float(grad_bytes))

    def optimizer_s(self, optimizer: str, param_bytes: float, *, training: bool = True) -> float:
        """Seconds of one optimizer step over parameters of ``param_bytes`` in all."""
        measured = dict(self.optimizer_s_per_byte).get(optimizer)
        if measured is None or not training or optimizer == "none":
            return optimizer_step_time(optimizer, param_bytes, self.device, training=training, factors=self.factors)
        return measured * max(0.0, float(param_bytes))


def measure_step_rates(spec: DeviceSpec, dev: torch.device, *, numel: int = 1 << 23, repeats: int = 5,
                       clock: Clock = "wall", optimizers: Sequence[str] = ("adam", "sgd")) -> StepRates:
    """Seconds per byte of ``g += new`` and of ``optimizer.step()`` measured on ``dev``.

    One float32 parameter of ``numel`` elements (32 MiB by default: past the caches, as a
    stage's gradients are), its gradient set, each pass run once untimed and then ``repeats``
    times; the median over the parameter's bytes is the rate. The optimizers are torch.optim's
    with their defaults, so torch picks the implementation it would pick for a stage on ``dev``
    (single-tensor on the CPU, foreach on CUDA). Per-tensor overheads are left out: a stage's
    step over many small tensors is priced as over one of their total size.
    """
    param = torch.nn.Parameter(torch.full((numel,), 0.5, device=dev))
    new = torch.full((numel,), 0.25, device=dev)
    nbytes = float(param.numel() * param.element_size())

    def rate(fn: Callable[[], object]) -> float:
        return median_time(fn, dev, warmup=1, repeats=repeats, clock=clock) / nbytes

    param.grad = torch.full((numel,), 0.125, device=dev)
    grad = param.grad
    accumulate = rate(lambda: grad.add_(new))
    per_optimizer = []
    for name in optimizers:
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]([param], lr=1e-6)
        per_optimizer.append((name, rate(opt.step)))
    return StepRates(device=spec, accumulate_s_per_byte=accumulate, optimizer_s_per_byte=tuple(per_optimizer),
                     source=f"measured on {dev.type}")
