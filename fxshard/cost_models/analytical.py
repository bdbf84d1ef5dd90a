"""The analytical cost model: a roofline with efficiency factors and a per-kernel overhead.

time = kernels * launch_overhead + max(flops / (peak(dtype) * compute_eff),
                                        bytes / (bandwidth * memory_eff))

FLOPs come only from the operators FlopCounterMode counts (matmul, convolution, attention),
so elementwise work is priced by the bytes it moves. The factors and where they come from
are in docs/cost_models.md; issue-level calibration against measured runs refines them per
device preset (``RooflineFactors`` entries in ``FACTORS``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fxshard.capture import CapturedGraph
from fxshard.cost_models.analysis import NodeWork
from fxshard.cost_models.base import NodeTime, register_cost_model
from fxshard.errors import CostModelError

if TYPE_CHECKING:
    from fxshard.cluster import DeviceSpec

__all__ = ["FACTORS", "AnalyticalCostModel", "FactorFit", "RooflineFactors", "factors_for", "fit_factors",
           "roofline_time"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RooflineFactors:
    """How close real kernels get to a device's datasheet peaks.

    Attributes:
        matmul_eff: fraction of peak FLOP/s reached by matmul/convolution/attention kernels.
        memory_eff: fraction of peak memory bandwidth reached by memory-bound kernels.
        launch_overhead_s: fixed cost per kernel (launch and framework dispatch).
        conv_tf32: fp32 convolutions run on TF32 tensor cores (cuDNN's default in PyTorch;
            fp32 matmuls do not, ``torch.backends.cuda.matmul.allow_tf32`` is off by default).
    """

    matmul_eff: float
    memory_eff: float
    launch_overhead_s: float
    conv_tf32: bool = False

    def __post_init__(self) -> None:
        for name in ("matmul_eff", "memory_eff"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 < value <= 1:
                raise CostModelError(f"RooflineFactors {name}={value!r} must be a number in (0, 1]: it is the "
                                     f"fraction of the device's peak that kernels reach (0.7 is typical on GPUs)")
        if not _is_real(self.launch_overhead_s) or not 0 <= self.launch_overhead_s < math.inf:
            raise CostModelError(f"RooflineFactors launch_overhead_s={self.launch_overhead_s!r} must be a finite "
                                 f"number of seconds >= 0 (a few microseconds, 5e-6, is typical)")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


# Defaults per device kind, then per preset. Sources and reasoning: docs/cost_models.md.
_KIND_DEFAULTS: Mapping[str, RooflineFactors] = {
    "cuda": RooflineFactors(matmul_eff=0.70, memory_eff=0.80, launch_overhead_s=5e-6, conv_tf32=True),
    "rocm": RooflineFactors(matmul_eff=0.55, memory_eff=0.75, launch_overhead_s=8e-6),
    "cpu": RooflineFactors(matmul_eff=0.50, memory_eff=0.60, launch_overhead_s=4e-6),
}
FACTORS: dict[str, RooflineFactors] = {}


def factors_for(device: DeviceSpec) -> RooflineFactors:
    """The roofline factors for a device: its preset's if calibrated, else its kind's."""
    return FACTORS.get(device.name) or _KIND_DEFAULTS.get(device.kind, _KIND_DEFAULTS["cuda"])


_CONV_OPS = ("aten.convolution", "aten.convolution_backward")


def roofline_time(flops: float, nbytes: float, kernels: int, dtype: torch.dtype,
                  device: DeviceSpec, factors: RooflineFactors, *, tf32: bool = False) -> float:
    """Seconds for ``kernels`` kernels doing ``flops`` and moving ``nbytes`` on ``device``."""
    if kernels == 0 and flops == 0:
        return 0.0
    peak = device.peak_flops_for(dtype, allow_tf32=tf32)
    compute = flops / (peak * factors.matmul_eff) if flops else 0.0
    memory = nbytes / (device.memory_bandwidth * factors.memory_eff) if nbytes else 0.0
    return kernels * factors.launch_overhead_s + max(compute, memory)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else torch.float32


class AnalyticalCostModel:
    """Roofline time per node from its FLOPs, bytes and kernel count."""

    name = "analytical"

    def __init__(self, factors: RooflineFactors | None = None, *,
                 by_preset: Mapping[str, RooflineFactors] | None = None) -> None:
        """``factors`` for every device, else ``by_preset[device.name]`` (fitted factors, see
        :mod:`fxshard.cost_models.factors_file`), else the device's own (:func:`factors_for`)."""
        self.factors = factors
        self.by_preset = dict(by_preset or {})

    def factors_of(self, device: DeviceSpec) -> RooflineFactors:
        """The factors this model prices ``device`` with."""
        return self.factors or self.by_preset.get(device.name) or factors_for(device)

    def node_times(self, captured: CapturedGraph, works: Sequence[NodeWork],
                   device: DeviceSpec) -> list[NodeTime]:
        factors = self.factors_of(device)
        times = []
        for w in works:
            dtype = _dtype(w.dtype)
            tf32 = factors.conv_tf32 and any(op in _CONV_OPS for op in w.flop_ops)
            fwd = roofline_time(w.fwd_flops, w.fwd_bytes, w.fwd_kernels, dtype, device, factors, tf32=tf32)
            bwd = roofline_time(w.bwd_flops, w.bwd_bytes, w.bwd_kernels, dtype, device, factors, tf32=tf32)
            times.append(NodeTime(fwd_s=fwd, bwd_s=bwd))
        return times

    def step_rates(self, device: DeviceSpec) -> Any:
        """The step's passes outside the graph by the roofline, under the factors the nodes get."""
        from fxshard.cost_models.optimizer_step import StepRates  # it builds on this module

        return StepRates(device=device, factors=self.factors_of(device))


@register_cost_model("analytical")
def _analytical() -> AnalyticalCostModel:
    return AnalyticalCostModel()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactorFit:
    """Roofline factors fitted to measured node times, with the error before and after."""

    factors: RooflineFactors
    samples: int
    error_before: float  # median |log(predicted / measured)| with the device's current factors
    error_after: float


def fit_factors(works: Sequence[NodeWork], measured: Sequence[NodeTime], device: DeviceSpec, *,
                current: RooflineFactors | None = None) -> FactorFit:
    """Fit ``matmul_eff``, ``memory_eff`` and ``launch_overhead_s`` to measured node times.

    Every forward and backward time of a node that runs kernels is a sample; the fit is a grid
    search minimising the median absolute log error of the roofline (robust to the few nodes
    whose timing is noise). The device's current factors are a candidate too, so the fitted
    error never exceeds the current one (``current``: the factors planning uses now, default
    :func:`factors_for`). See docs/calibration.md.

    Raises:
        CostModelError: fewer than three usable samples, or ``works`` and ``measured`` differ in length.
    """
    import numpy as np

    if len(works) != len(measured):
        raise CostModelError(f"fit_factors got {len(works)} nodes and {len(measured)} measured times; pass one "
                             f"NodeTime per node, in the same order")
    rows = []
    for w, t in zip(works, measured):
        for flops, nbytes, kernels, seconds in ((w.fwd_flops, w.fwd_bytes, w.fwd_kernels, t.fwd_s),
                                                (w.bwd_flops, w.bwd_bytes, w.bwd_kernels, t.bwd_s)):
            if kernels and seconds > 0:
                tf32 = any(op in _CONV_OPS for op in w.flop_ops)
                peak = device.peak_flops_for(_dtype(w.dtype), allow_tf32=tf32)
                rows.append((flops / peak, nbytes / device.memory_bandwidth, kernels, seconds))
    if len(rows) < 3:
        raise CostModelError(f"fitting roofline factors needs at least 3 timed kernels (nodes that launch kernels, "
                             f"with a measured time > 0), got {len(rows)}; time a larger model or more nodes")
    compute, memory, kernels, seconds = (np.array(c, dtype=np.float64) for c in zip(*rows))
    log_measured = np.log(seconds)

    def error(a: np.ndarray, b: np.ndarray, o: np.ndarray) -> np.ndarray:
        predicted = kernels * o[..., None] + np.maximum(compute / a[..., None], memory / b[..., None])
        return np.median(np.abs(np.log(np.maximum(predicted, 1e-15)) - log_measured), axis=-1)

    grid = np.linspace(0.02, 1.0, 50)
    overheads = np.concatenate([[0.0], np.geomspace(1e-7, 1e-3, 41)])
    a, b, o = np.meshgrid(grid, grid, overheads, indexing="ij")
    errors = error(a.ravel(), b.ravel(), o.ravel())
    best = int(np.argmin(errors))
    current = current or factors_for(device)
    before = float(error(np.array([current.matmul_eff]), np.array([current.memory_eff]),
                         np.array([current.launch_overhead_s]))[0])
    if before <= errors[best]:  # the current factors are a candidate too: a fit is never worse than none
        return FactorFit(factors=current, samples=len(rows), error_before=before, error_after=before)
    fitted = RooflineFactors(matmul_eff=float(a.ravel()[best]), memory_eff=float(b.ravel()[best]),
                             launch_overhead_s=float(o.ravel()[best]), conv_tf32=current.conv_tf32)
    return FactorFit(factors=fitted, samples=len(rows), error_before=before, error_after=float(errors[best]))
