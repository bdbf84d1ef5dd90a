"""The report of a whole-plan calibration under torchrun: measured against predicted, per stage,
for the step and per rank (built by :func:`fxshard.calibrate_dist.compare_run`). See
docs/calibration.md ("A whole plan under torchrun").
"""

from __future__ import annotations

import dataclasses
import json
import statistics

from fxshard.calibrate import kendall_tau

__all__ = ["DistCalibrationReport", "DistRankRow", "DistStageRow"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistStageRow:
    """One stage: measured seconds per micro-batch against each pricing's, and autograd's
    measured saved bytes per micro-batch against the predicted activation bytes."""

    index: int
    rank: int
    measured_fwd_s: float
    measured_bwd_s: float
    fwd_cpu_s: float
    bwd_cpu_s: float
    analytical_fwd_s: float
    analytical_bwd_s: float
    profiled_fwd_s: float | None
    profiled_bwd_s: float | None
    saved_bytes: int
    predicted_activation_bytes: float

    @property
    def measured_s(self) -> float:
        return self.measured_fwd_s + self.measured_bwd_s

    @property
    def measured_cpu_s(self) -> float:
        return self.fwd_cpu_s + self.bwd_cpu_s

    def measured(self, clock: str = "wall") -> float:
        """fwd + bwd seconds by the wall clock, or (``clock="cpu"``) in the rank's thread CPU time."""
        return self.measured_cpu_s if clock == "cpu" else self.measured_s

    def predicted_s(self, which: str) -> float | None:
        if which == "analytical":
            return self.analytical_fwd_s + self.analytical_bwd_s
        return None if self.profiled_fwd_s is None else self.profiled_fwd_s + (self.profiled_bwd_s or 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistRankRow:
    """One rank: its measured resident-set peak above its baseline against the planner's peak
    for its stages (the sum of their ``peak_memory_bytes``)."""

    rank: int
    stages: tuple[int, ...]
    measured_peak_bytes: int
    predicted_peak_bytes: float
    param_bytes: int
    baseline_bytes: int
    resident_bytes: int = 0  # the timed steps' resident peak, freed memory kept (RankRun.resident_bytes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistCalibrationReport:
    """A plan run under torchrun against its predictions (see :func:`calibrate_plan`)."""

    model: str
    world: int
    threads: int
    schedule: str | None
    microbatches: int
    batch_size: int
    steps: int
    stages: tuple[DistStageRow, ...]
    ranks: tuple[DistRankRow, ...]
    measured_step_s: float
    steps_s: tuple[float, ...]
    analytical_step_s: float
    profiled_step_s: float | None
    load_average: float | None = None  # the machine's 1-minute load average before the run
    profile_clock: str = "wall"  # the profiled model's clock: "cpu" (thread CPU time) when the ranks ran 1 thread
    # The plan simulated with the measured stage times (wall) and each rank's measured optimizer
    # step instead of predicted ones: the simulator's share of the step error (communication and
    # schedule overheads).
    simulated_measured_step_s: float | None = None
    # Where the profiled model measured: "here" (the calling process, after the run) or "ranks"
    # (each stage on the rank that ran it, right after its timed steps: calibrate_dist_profile).
    profile_where: str | None = None
    # "ranks" only: the slowest rank's price of the whole plan over the fastest's, less one: how far
    # the machine's cores disagreed at the same moment.
    profile_spread: float | None = None

    def errors(self, which: str = "profiled", clock: str = "wall") -> list[float]:
        """Relative error of each stage's fwd + bwd, (predicted - measured) / measured, against
        the measured wall time or (``clock="cpu"``) the rank's thread CPU time."""
        pairs = [(s.predicted_s(which), s.measured(clock)) for s in self.stages]
        return [(p - m) / m for p, m in pairs if p is not None and m > 0]

    def median_abs_error(self, which: str = "profiled", clock: str = "wall") -> float | None:
        errors = [abs(e) for e in self.errors(which, clock)]
        return statistics.median(errors) if errors else None

    def tau(self, which: str = "profiled", clock: str = "wall") -> float | None:
        """Kendall's tau between predicted and measured stage times (None under 2 stages)."""
        predicted = [s.predicted_s(which) for s in self.stages]
        if len(predicted) < 2 or any(p is None for p in predicted):
            return None
        return kendall_tau(predicted, [s.measured(clock) for s in self.stages])

    def step_error(self, which: str = "profiled") -> float | None:
        predicted = self.analytical_step_s if which == "analytical" else self.profiled_step_s
        if predicted is None or self.measured_step_s <= 0:
            return None
        return (predicted - self.measured_step_s) / self.measured_step_s

    def memory_errors(self) -> list[float]:
        """Relative error of each rank's predicted peak against its measured one."""
        return [(r.predicted_peak_bytes - r.measured_peak_bytes) / r.measured_peak_bytes
                for r in self.ranks if r.measured_peak_bytes > 0]

    def median_abs_memory_error(self) -> float | None:
        errors = [abs(e) for e in self.memory_errors()]
        return statistics.median(errors) if errors else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for which in ("analytical", "profiled"):
            data[f"median_abs_error_{which}"] = self.median_abs_error(which)
            data[f"median_abs_error_{which}_cpu"] = self.median_abs_error(which, "cpu")
            data[f"kendall_tau_{which}"] = self.tau(which)
            data[f"step_error_{which}"] = self.step_error(which)
        data["median_abs_memory_error"] = self.median_abs_memory_error()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> DistCalibrationReport:
        """The report :meth:`to_dict` wrote (the derived errors are recomputed, not read)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in fields}
        kept["stages"] = tuple(DistStageRow(**s) for s in data["stages"])
        kept["ranks"] = tuple(DistRankRow(**{**r, "stages": tuple(r["stages"])}) for r in data["ranks"])
        kept["steps_s"] = tuple(data["steps_s"])
        return cls(**kept)

    def _where(self) -> str:
        if self.profile_where != "ranks":
            return " in the calling process after the run" if self.profile_where == "here" else ""
        spread = f" (the ranks' prices of the whole plan {self.profile_spread:.0%} apart)" \
            if self.profile_spread is not None else ""
        return f" on each stage's own rank right after its timed steps{spread}"

    def to_markdown(self) -> str:
        ms, mib = 1e3, 2.0**20
        load = f", load average {self.load_average:.1f}" if self.load_average is not None else ""
        lines = [f"Calibration of {self.model} under torchrun: {self.schedule}, {self.microbatches} micro-batches of "
                 f"a batch of {self.batch_size}, {self.world} gloo ranks x {self.threads} thread(s), median of "
                 f"{self.steps} timed steps{load}. Stage times per micro-batch, fwd / bwd; the profiled model "
                 f"timed {self.profile_clock} time{self._where()}; errors against the measured wall time and (cpu) "
                 f"the rank thread's CPU time.", "",
                 "| stage | rank | measured (wall) | measured (cpu) | analytical | error | profiled | error | "
                 "error (cpu) | saved per micro-batch (measured / predicted) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]

        def err(p: float | None, m: float) -> str:
            return f"{(p - m) / m:+.0%}" if p is not None and m > 0 else "-"

        for s in self.stages:
            p = s.predicted_s("profiled")
            prof = f"{s.profiled_fwd_s * ms:.2f} / {s.profiled_bwd_s * ms:.2f} ms" if p is not None else "-"
            lines.append(f"| {s.index} | {s.rank} | {s.measured_fwd_s * ms:.2f} / {s.measured_bwd_s * ms:.2f} ms | "
                         f"{s.fwd_cpu_s * ms:.2f} / {s.bwd_cpu_s * ms:.2f} ms | "
                         f"{s.analytical_fwd_s * ms:.2f} / {s.analytical_bwd_s * ms:.2f} ms | "
                         f"{err(s.predicted_s('analytical'), s.measured_s)} | {prof} | {err(p, s.measured_s)} | "
                         f"{err(p, s.measured_cpu_s)} | "
                         f"{s.saved_bytes / mib:.2f} / {s.predicted_activation_bytes / mib:.2f} MiB |")
        lines += ["", "| step | measured | analytical | error | profiled | error "
                      "| simulated from measured stages and optimizer |",
                  "|---|---|---|---|---|---|---|"]
        sim = self.simulated_measured_step_s
        lines.append(f"| whole step | {self.measured_step_s * ms:.1f} ms | {self.analytical_step_s * ms:.1f} ms | "
                     f"{err(self.analytical_step_s, self.measured_step_s)} | "
                     + (f"{self.profiled_step_s * ms:.1f} ms" if self.profiled_step_s is not None else "-")
                     + f" | {err(self.profiled_step_s, self.measured_step_s)} | "
                     + (f"{sim * ms:.1f} ms ({err(sim, self.measured_step_s)}) |" if sim is not None else "- |"))
        lines += ["", "| rank | stages | peak above baseline (measured) | planner's peak | error | parameters "
                      "| resident while timed (freed memory kept) |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.ranks:
            error = err(r.predicted_peak_bytes, r.measured_peak_bytes)
            lines.append(f"| {r.rank} | {', '.join(map(str, r.stages))} | {r.measured_peak_bytes / mib:.1f} MiB | "
                         f"{r.predicted_peak_bytes / mib:.1f} MiB | {error} | {r.param_bytes / mib:.1f} MiB | "
                         f"{r.resident_bytes / mib:.1f} MiB |")
        lines.append("")
        for which in ("analytical", "profiled"):
            wall, cpu, tau, step = (self.median_abs_error(which), self.median_abs_error(which, "cpu"), self.tau(which),
                                    self.step_error(which))
            if wall is not None:
                lines.append(f"{which}: stage median |error| {wall:.1%} (wall), {cpu:.1%} (cpu)"
                             + (f", Kendall tau {tau:.2f}" if tau is not None else "")
                             + (f", step error {step:+.1%}" if step is not None else ""))
        mem = self.median_abs_memory_error()
        if mem is not None:
            lines.append(f"peak memory per rank: median |error| {mem:.1%}")
        return "\n".join(lines)
