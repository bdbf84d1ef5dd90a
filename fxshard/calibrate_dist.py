"""Calibrate a whole plan under torchrun: run it on its ranks and hold it against its predictions.

:func:`run_plan` launches ``torchrun`` (gloo on the CPU, one process per planned device) with
:mod:`fxshard.calibrate_dist_worker` on every rank, which trains the plan for a few steps and
measures, per stage, the compute of one micro-batch where torch's schedule runs it, per rank
the resident-set peak above what the rank held before building its stages, and the slowest
rank's step. :func:`reprice` prices the plan's own split with another cost model, and
:func:`calibrate_plan` puts both side by side in a :class:`DistCalibrationReport`. See
docs/calibration.md ("A whole plan under torchrun").
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fxshard.errors import ExecutionError
from fxshard.plan import Plan

__all__ = ["ExecutionError", "PlanRun", "RankRun", "StageRun", "run_plan"]

_TAIL = 3000  # characters of a failing rank's error quoted


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One stage as measured on its rank, per micro-batch (medians over the timed steps).

    ``fwd_s`` and ``bwd_s`` are the wall seconds of torch's ``forward_one_chunk`` and
    ``backward_one_chunk`` (+ ``backward_weight_one_chunk``) per micro-batch, ``fwd_cpu_s`` and
    ``bwd_cpu_s`` the same in the calling thread's CPU time (wall over CPU well above 1: the
    machine was loaded). ``saved_bytes``: autograd's saved bytes of one micro-batch's forward,
    parameters excluded; ``saved_bytes_per_microbatch`` has every micro-batch's.
    """

    index: int
    rank: int
    fwd_s: float
    bwd_s: float
    fwd_cpu_s: float
    bwd_cpu_s: float
    saved_bytes: int
    saved_bytes_per_microbatch: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RankRun:
    """One rank: its stages, and the resident-set peak above the baseline taken before it built
    them (model on meta), over the warm-up and timed steps with the optimizer."""

    rank: int
    stages: tuple[int, ...]
    peak_bytes: int
    baseline_bytes: int
    param_bytes: int = 0  # the rank's parameter bytes (its stages' weights, as materialised)
    steps_s: tuple[float, ...] = ()  # this rank's own step times


@dataclasses.dataclass(frozen=True)
class PlanRun:
    """A plan as it ran under torchrun.

    ``step_s`` is the median over the timed steps of the slowest rank's step (barrier, then
    the step with ``optimizer.step()`` and gradients set to None, timed per rank).
    """

    plan: Plan
    world: int
    threads: int
    step_s: float
    steps_s: tuple[float, ...]
    stages: tuple[StageRun, ...]
    ranks: tuple[RankRun, ...]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, plan=None))
        data["plan"] = json.loads(self.plan.to_json())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PlanRun:
        return cls(plan=Plan.from_json(json.dumps(data["plan"])), world=data["world"], threads=data["threads"],
                   step_s=data["step_s"], steps_s=tuple(data["steps_s"]),
                   stages=tuple(StageRun(**{**s, "saved_bytes_per_microbatch": tuple(s["saved_bytes_per_microbatch"])})
                                for s in data["stages"]),
                   ranks=tuple(RankRun(**{**r, "stages": tuple(r["stages"]), "steps_s": tuple(r["steps_s"])})
                               for r in data["ranks"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_of(plan: Plan) -> int:
    """The number of processes ``plan`` runs on: one per device it uses."""
    return len({d for s in plan.stages for d in s.device_indices})


def run_plan(model: str, plan: Plan, *, batch_size: int | None = None, seq_len: int | None = None,
             steps: int = 5, warmup: int = 2, threads: int = 1, timeout_s: float = 600.0,
             model_kwargs: dict | None = None) -> PlanRun:
    """Train ``plan`` under torchrun on this machine (gloo, one process per planned device) and
    measure it.

    Args:
        model: a zoo name or a ``"file.py:factory"`` reference (:func:`fxshard.zoo.resolve`);
            each rank builds it on the meta device and materialises only its own stages.
        plan: a ``pipeline`` plan of that model at that batch (its fingerprint is checked).
        batch_size, seq_len: the zoo model's shapes (the plan's batch by default).
        steps, warmup: timed and untimed training steps (the last warm-up step counts the
            saved bytes, so ``warmup`` >= 1).
        threads: torch CPU threads per rank.
        timeout_s: the whole run's hard limit (the job is killed after it).
        model_kwargs: more :func:`fxshard.zoo.resolve` keywords (``seed``; ``dtype`` by name).

    Returns:
        A :class:`PlanRun`.

    Raises:
        ExecutionError: bad arguments, a rank that failed (its error quoted), or the timeout.

    Example::

        run = run_plan("gpt2-tiny", fxshard.plan(model, "2xcpu:1GB", (x,), strategy="pipeline"))
        run.step_s, [s.fwd_s for s in run.stages]
    """
    if plan.strategy != "pipeline" or not plan.training:
        raise ExecutionError(f"run_plan runs training pipelines; this plan is a {plan.strategy} "
                             f"{'training' if plan.training else 'inference'} plan: plan with strategy='pipeline' "
                             f"and training=True")
    if steps < 1 or warmup < 1 or threads < 1:
        raise ExecutionError(f"steps={steps}, warmup={warmup}, threads={threads}: each must be >= 1 (the last "
                             f"warm-up step counts autograd's saved bytes)")
    world = world_of(plan)
    if batch_size is None and ":" not in model:
        batch_size = plan.batch_size
    job = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup,
           "threads": threads, "timeout_s": timeout_s, "model_kwargs": dict(model_kwargs or {})}
    with tempfile.TemporaryDirectory(prefix="fxshard-calibrate-") as tmp:
        out = Path(tmp)
        (out / "job.json").write_text(json.dumps(job))
        (out / "plan.json").write_text(plan.to_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "fxshard.calibrate_dist_worker", str(out)]
        _launch(cmd, out, world, timeout_s)
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return _plan_run(plan, world, threads, results)


def _launch(cmd: list[str], out: Path, world: int, timeout_s: float) -> None:
    """Run the torchrun job in its own process group; kill the group at the timeout.

    Raises:
        ExecutionError: the job failed or timed out, quoting the first failing rank's error.
    """
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise ExecutionError(f"the calibration job ran past timeout_s={timeout_s:.0f} s and was killed; give it "
                             f"more time or fewer steps. Command: {' '.join(cmd)}\n{_tail(stderr)}") from None
    errors = sorted(out.glob("rank*.error"))
    missing = [r for r in range(world) if not (out / f"rank{r}.json").exists()]
    if errors or proc.returncode != 0 or missing:
        first = errors[0] if errors else None
        what = (f"rank {first.stem[4:]} failed:\n{_tail(first.read_text())}" if first is not None
                else f"torchrun exited with {proc.returncode}; ranks {missing} wrote no result:\n{_tail(stderr)}")
        raise ExecutionError(f"calibration under torchrun failed: {what}\nCommand: {' '.join(cmd)}")


def _tail(text: str | None) -> str:
    text = (text or "").strip()
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


def _plan_run(plan: Plan, world: int, threads: int, results: list[dict]) -> PlanRun:
    """The ranks' JSON results as a :class:`PlanRun` (steps: the slowest rank's)."""
    steps = tuple(max(col) for col in zip(*(r["steps_s"] for r in results)))
    stages = sorted((s for r in results for s in r["stages"]), key=lambda s: s["index"])
    stage_runs = tuple(StageRun(index=s["index"], rank=s["rank"], fwd_s=s["fwd"], bwd_s=s["bwd"],
                                fwd_cpu_s=s["fwd_cpu"], bwd_cpu_s=s["bwd_cpu"],
                                saved_bytes=s["saved_bytes"][0] if s["saved_bytes"] else 0,
                                saved_bytes_per_microbatch=tuple(s["saved_bytes"])) for s in stages)
    ranks = tuple(RankRun(rank=r["rank"], stages=tuple(s["index"] for s in r["stages"]), peak_bytes=r["peak_bytes"],
                          baseline_bytes=r["baseline_bytes"], param_bytes=r["param_bytes"],
                          steps_s=tuple(r["steps_s"])) for r in sorted(results, key=lambda r: r["rank"]))
    return PlanRun(plan=plan, world=world, threads=threads, step_s=statistics.median(steps), steps_s=steps,
                   stages=stage_runs, ranks=ranks)
