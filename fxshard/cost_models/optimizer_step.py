"""The optimizer step: the temporaries it allocates and the time it takes, per optimizer and device.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from fxshard.cost_models.analytical import factors_for, roofline_time
from fxshard.devices import DeviceSpec
from fxshard.errors import CostModelError

__all__ = ["Implementation", "optimizer_implementation", "optimizer_step_bytes", "optimizer_step_time",
           "optimizer_step_transient_bytes"]

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
                        training: bool = True, fused: bool = False) -> float:
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
                         torch.float32, device, factors_for(device))
