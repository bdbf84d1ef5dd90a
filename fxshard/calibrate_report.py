"""The calibration report: each stage's measured and predicted times and memory on one device.

``calibrate.calibrate`` fills it; ``to_markdown`` and ``to_json`` are what ``fxshard calibrate``
prints and saves; ``kendall_tau`` is the rank agreement every calibration report uses. See
docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence

from fxshard.cost_models.analytical import FactorFit
from fxshard.errors import CostModelError

__all__ = ["CalibrationReport", "StageMeasurement", "kendall_tau"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageMeasurement:
    """One stage (index -1: the whole model): measured and predicted forward + backward seconds
    per micro-batch, peak memory, and the activations saved for backward.

    ``measured_peak_bytes`` and ``predicted_peak_bytes`` are the same situation, one training
    step of the stage alone on one micro-batch: weights, their gradients, that micro-batch's
    saved activations and the largest transient (no optimizer state, no other micro-batch in
    flight). ``plan_peak_bytes`` is the plan's peak for the stage, with both.
    ``measured_saved_bytes`` (what autograd saved in one forward, ``host_memory.SavedTensors``)
    is the measured side of ``predicted_activation_bytes``.
    """

    index: int
    measured_fwd_s: float
    measured_bwd_s: float
    analytical_s: float
    profiled_s: float | None
    measured_peak_bytes: float | None
    predicted_peak_bytes: float | None
    analytical_fwd_s: float = 0.0
    profiled_fwd_s: float | None = None
    plan_peak_bytes: float | None = None  # the plan's peak: optimizer state, 1F1B's in-flight micro-batches
    # Host seconds of the forward and backward calls (no sync): near the measured times on CUDA = host-bound.
    host_fwd_s: float | None = None
    host_bwd_s: float | None = None
    # CPU seconds of the calling thread: on the CPU with one thread, measured / CPU >> 1 = a loaded machine.
    cpu_fwd_s: float | None = None
    cpu_bwd_s: float | None = None
    # Autograd's saved bytes of one micro-batch's forward (parameters excluded), and the prediction.
    measured_saved_bytes: float | None = None
    predicted_activation_bytes: float | None = None

    @property
    def measured_s(self) -> float:
        return self.measured_fwd_s + self.measured_bwd_s

    @property
    def measured_cpu_s(self) -> float | None:
        """The thread's CPU seconds of forward + backward (None where not recorded)."""
        return self.cpu_fwd_s + self.cpu_bwd_s if self.cpu_fwd_s is not None and self.cpu_bwd_s is not None else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationReport:
    """Predicted against measured stage times on one device."""

    model: str
    device: str
    device_spec: str
    microbatch_fraction: float
    stages: tuple[StageMeasurement, ...]
    whole: StageMeasurement
    fit: FactorFit | None = None  # roofline factors fitted to the profiled node times
    checkpointing: str = "none"  # the activation-checkpointing policy every stage ran under
    threads: int = 0  # torch CPU threads the measurements ran with
    memory: str = ""  # how measured_peak_bytes was measured ("" where it was not)
    profile_clock: str = "wall"  # the profiled model's clock: "cpu" (thread CPU time) with one CPU thread
    kernels: tuple[dict, ...] = ()  # every node timed alone at the captured batch: the fit's samples

    def errors(self, which: str = "analytical", clock: str = "wall") -> list[float]:
        """Relative error per stage, (predicted - measured) / measured; ``clock="cpu"``: against
        the thread's CPU seconds (on a loaded CPU with one thread, the compute without the waits)."""
        out = []
        for s in self.stages:
            predicted = s.analytical_s if which == "analytical" else s.profiled_s
            measured = s.measured_cpu_s if clock == "cpu" else s.measured_s
            if predicted is not None and measured:
                out.append((predicted - measured) / measured)
        return out

    def median_abs_error(self, which: str = "analytical", clock: str = "wall") -> float | None:
        errors = [abs(e) for e in self.errors(which, clock)]
        return statistics.median(errors) if errors else None

    def tau(self, which: str = "analytical") -> float | None:
        predicted = [s.analytical_s if which == "analytical" else s.profiled_s for s in self.stages]
        if any(p is None for p in predicted) or len(predicted) < 2:
            return None
        return kendall_tau(predicted, [s.measured_s for s in self.stages])

    def memory_errors(self) -> list[float]:
        """Relative error of the predicted step peak per stage, where both are known."""
        return [(s.predicted_peak_bytes - s.measured_peak_bytes) / s.measured_peak_bytes for s in self.stages
                if s.measured_peak_bytes and s.predicted_peak_bytes is not None]

    def median_abs_memory_error(self) -> float | None:
        errors = [abs(e) for e in self.memory_errors()]
        return statistics.median(errors) if errors else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["median_abs_error_memory"] = self.median_abs_memory_error()
        if self.device == "cpu":
            for which in ("analytical", "profiled"):
                data[f"median_abs_error_{which}_cpu_time"] = self.median_abs_error(which, "cpu")
        for which in ("analytical", "profiled"):
            data[f"median_abs_error_{which}"] = self.median_abs_error(which)
            data[f"kendall_tau_{which}"] = self.tau(which)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        ckpt = f", activation checkpointing {self.checkpointing}" if self.checkpointing != "none" else ""
        lines = [f"Calibration of {self.model} on {self.device} ({self.device_spec}){ckpt}, {self.threads} "
                 f"thread(s), seconds per micro-batch (fwd + bwd)", "",
                 "| stage | measured | analytical | error | profiled | error | "
                 "step peak memory (measured / predicted) | saved activations (measured / predicted) | plan's peak |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for s in (*self.stages, self.whole):
            name = "whole model" if s.index < 0 else str(s.index)
            a_err = (s.analytical_s - s.measured_s) / s.measured_s if s.measured_s else 0.0
            p_err = (s.profiled_s - s.measured_s) / s.measured_s if s.profiled_s and s.measured_s else None
            mem = (f"{s.measured_peak_bytes / 2**20:.1f} / {s.predicted_peak_bytes / 2**20:.1f} MiB"
                   if s.measured_peak_bytes is not None and s.predicted_peak_bytes is not None else "n/a on this device")
            saved = (f"{s.measured_saved_bytes / 2**20:.2f} / {s.predicted_activation_bytes / 2**20:.2f} MiB"
                     if s.measured_saved_bytes is not None and s.predicted_activation_bytes is not None else "-")
            lines.append(f"| {name} | {s.measured_s * 1e3:.3f} ms | {s.analytical_s * 1e3:.3f} ms | {a_err:+.0%} | "
                         + (f"{s.profiled_s * 1e3:.3f} ms | {p_err:+.0%}" if p_err is not None else "- | -")
                         + f" | {mem} | {saved} | "
                         + (f"{s.plan_peak_bytes / 2**20:.1f} MiB |" if s.plan_peak_bytes is not None else "- |"))
        for which in ("analytical", "profiled"):
            err, tau = self.median_abs_error(which), self.tau(which)
            if err is not None:
                lines.append(f"\n{which}: median |error| {err:.1%}"
                             + (f", Kendall tau {tau:.2f}" if tau is not None else ""))
        if self.device == "cpu":
            cpu = {w: self.median_abs_error(w, "cpu") for w in ("analytical", "profiled")}
            walls = [s.measured_s / s.measured_cpu_s for s in self.stages if s.measured_cpu_s]
            if cpu["analytical"] is not None and walls:
                lines.append(f"\nagainst the thread's CPU time (wall / CPU {min(walls):.2f}-{max(walls):.2f}): median "
                             f"|error| analytical {cpu['analytical']:.1%}"
                             + (f", profiled {cpu['profiled']:.1%} (timed on the {self.profile_clock} clock)"
                                if cpu["profiled"] is not None else ""))
        mem_err = self.median_abs_memory_error()
        if mem_err is not None:
            lines.append(f"\nstep peak memory ({self.memory}): median |error| {mem_err:.1%}")
        if self.fit is not None:
            f = self.fit.factors
            lines.append(f"\nroofline factors fitted to {self.fit.samples} measured kernels of {self.device_spec}: "
                         f"matmul_eff={f.matmul_eff:.2f}, memory_eff={f.memory_eff:.2f}, "
                         f"launch_overhead_s={f.launch_overhead_s:.2e} (median |log error| "
                         f"{self.fit.error_before:.2f} with the current factors, {self.fit.error_after:.2f} fitted)")
        return "\n".join(lines)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a between two equally long sequences (ties count as neither).

    Raises:
        CostModelError: the sequences differ in length or hold fewer than two items.
    """
    n = len(a)
    if n != len(b) or n < 2:
        raise CostModelError(f"kendall_tau needs two sequences of the same length >= 2, got lengths {len(a)} and "
                             f"{len(b)}; pass one predicted and one measured time per stage, for at least 2 stages")
    score = 0
    for i in range(n):
        for j in range(i + 1, n):
            x, y = a[i] - a[j], b[i] - b[j]
            score += (x * y > 0) - (x * y < 0)
    return score / (n * (n - 1) / 2)
