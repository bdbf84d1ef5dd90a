"""Calibrate a whole plan under torchrun: run it on its ranks and hold it against its predictions.

:func:`run_plan` launches ``torchrun`` (gloo on the CPU, one process per planned device) with
:mod:`fxshard.calibrate_dist_worker` on every rank, which trains the plan for a few steps and
measures, per stage, the compute of one micro-batch where torch's schedule runs it, per rank
the resident-set peak above what the rank held before building its stages, and the slowest
rank's step. :func:`reprice` prices the plan's own split with another cost model, and
:func:`calibrate_plan` puts both side by side in a :class:`DistCalibrationReport`; with
``profile_in_ranks`` the profiled model is measured on the ranks themselves, right after their
timed steps (:mod:`fxshard.calibrate_dist_profile`). See docs/calibration.md ("A whole plan under
torchrun", "Profiled on the ranks").
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

import torch
import torch.fx
import torch.utils._pytree

from fxshard.calibrate_dist_profile import priced_with_summaries, reprice
from fxshard.calibrate_dist_report import DistCalibrationReport, DistRankRow, DistStageRow
from fxshard.capture import CapturedGraph
from fxshard.cost_models.loss import LossGraph, capture_loss
from fxshard.errors import ExecutionError, UsageError
from fxshard.plan import Plan

__all__ = ["DistCalibrationReport", "DistRankRow", "DistStageRow", "PlanRun", "RankRun", "StageRun", "calibrate_plan",
           "capture_model", "check_ranks", "compare_run", "reprice", "resolve_model", "run_loss", "run_objective",
           "run_plan", "world_of"]

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
    them (model on meta), over one training step with the optimizer, measured before the timed
    ones in a heap pinned low from before the build (weights, gradients, optimizer state,
    in-flight activations, transients, communication buffers), less ``code_bytes``: the library
    code that became resident after the baseline (file-backed pages; libtorch's kernels)."""

    rank: int
    stages: tuple[int, ...]
    peak_bytes: int
    baseline_bytes: int
    param_bytes: int = 0  # the rank's parameter bytes (its stages' weights, as materialised)
    code_bytes: int = 0
    optimizer_cpu_s: float = 0.0  # its optimizer.step(), median over the timed steps, thread CPU time
    steps_s: tuple[float, ...] = ()  # this rank's own step times
    # The same steps in the rank's thread CPU time: less its stages' compute, what the step costs
    # besides it (optimizer step, the schedule's bookkeeping, gloo calls), which no stage time holds.
    steps_cpu_s: tuple[float, ...] = ()
    # The resident set's high-water mark over the timed steps above the same baseline, less the
    # library code: what the process held with freed memory kept in the heap, as the ranks run
    # (``heap_retained``; host_memory.retain_freed_memory): the live peak plus the heap's free blocks.
    resident_bytes: int = 0
    heap_retained: bool = False
    # The plan (JSON) as the profiled cost model priced it on this rank right after its timed
    # steps (run_plan(..., profile_in_ranks=True); calibrate_dist_profile), else "".
    profile: str = ""


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
    load_average: float | None = None  # the machine's 1-minute load average before the launch

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
                   ranks=tuple(RankRun(**{**r, "stages": tuple(r["stages"]), "steps_s": tuple(r["steps_s"]),
                                            "steps_cpu_s": tuple(r.get("steps_cpu_s", ()))})
                               for r in data["ranks"]), load_average=data.get("load_average"))


def _batch_size(model: str, plan: Plan, batch_size: int | None) -> int | None:
    """The batch a zoo model is built at: ``batch_size``, else the plan's (a factory reference
    builds its own)."""
    return plan.batch_size if batch_size is None and ":" not in model else batch_size


def resolve_model(model: str, *, batch_size: int | None, seq_len: int | None, model_kwargs: dict | None) -> Any:
    """:func:`fxshard.zoo.resolve` of ``model``, a ``dtype`` in ``model_kwargs`` given by name (as
    the job file carries it) turned into the torch dtype: the model the ranks and the
    predictions both build."""
    import torch

    from fxshard import zoo

    kwargs = dict(model_kwargs or {})
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return zoo.resolve(model, batch_size=batch_size, seq_len=seq_len, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_of(plan: Plan) -> int:
    """The number of processes ``plan`` runs on: one per device it uses."""
    return len({d for s in plan.stages for d in s.device_indices})


def check_ranks(plan: Plan, ranks: int, *, save_factors: str | None = None, png: str | None = None,
                device: str | None = None) -> None:
    """Refuse ``fxshard calibrate --ranks`` where it cannot run ``plan``: another number of
    ranks than the plan's devices, a plan that is not a pipeline, or an in-process-only option.

    Raises:
        UsageError: naming both numbers, or the option, and the fix.
    """
    world = world_of(plan)
    if ranks != world:
        raise UsageError(f"--ranks {ranks}, but the plan runs on {world} device(s) ({plan.strategy}, "
                         f"{plan.num_stages} stage(s)): pass --ranks {world}, or --devices with {ranks} devices")
    if plan.strategy != "pipeline":
        raise UsageError(f"--ranks runs pipeline plans; the planner chose {plan.strategy}: add --strategy pipeline")
    for flag, value in (("--save-factors", save_factors), ("--png", png), ("--device", device)):
        if value:
            raise UsageError(f"{flag} belongs to the in-process calibration; drop it or drop --ranks")


def run_plan(model: str, plan: Plan, *, batch_size: int | None = None, seq_len: int | None = None,
             steps: int = 5, warmup: int = 2, threads: int = 1, timeout_s: float = 600.0,
             model_kwargs: dict | None = None, profile_in_ranks: bool = False) -> PlanRun:
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
        profile_in_ranks: every rank also prices the plan with the profiled cost model right
            after its timed steps, all ranks at once (``RankRun.profile``;
            :mod:`fxshard.calibrate_dist_profile`).

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
    batch_size = _batch_size(model, plan, batch_size)
    job = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup,
           "threads": threads, "timeout_s": timeout_s, "model_kwargs": dict(model_kwargs or {}),
           "profile_in_ranks": profile_in_ranks}
    with tempfile.TemporaryDirectory(prefix="fxshard-calibrate-") as tmp:
        out = Path(tmp)
        (out / "job.json").write_text(json.dumps(job))
        (out / "plan.json").write_text(plan.to_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "fxshard.calibrate_dist_worker", str(out)]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        _launch(cmd, out, world, timeout_s)
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return dataclasses.replace(_plan_run(plan, world, threads, results), load_average=load)


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
                          code_bytes=r.get("code_bytes", 0), optimizer_cpu_s=r.get("optimizer_cpu_s", 0.0),
                          resident_bytes=r.get("resident_bytes", 0), heap_retained=r.get("heap_retained", False),
                          steps_s=tuple(r["steps_s"]), steps_cpu_s=tuple(r["steps_cpu_s"]),
                          profile=r.get("profile", ""))
                  for r in sorted(results, key=lambda r: r["rank"]))
    return PlanRun(plan=plan, world=world, threads=threads, step_s=statistics.median(steps), steps_s=steps,
                   stages=stage_runs, ranks=ranks)


# -- predictions -----------------------------------------------------------------------------


def run_objective(captured: CapturedGraph) -> tuple[Any, torch.Tensor]:
    """The loss :func:`run_plan`'s ranks train with and a ``meta`` target of its shapes (next-token
    cross entropy for a language model, else MSE against zeros:
    ``calibrate_dist_worker.natural_objective``), from ``captured``'s input and output shapes:
    ``fxshard.plan(..., loss_fn=fn, example_target=target)`` prices it on the last stage."""
    from fxshard.calibrate_dist_worker import natural_objective

    def meta(node: Any) -> Any:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        return torch.empty(val.shape, dtype=val.dtype, device="meta") if isinstance(val, torch.Tensor) else None

    nodes = list(captured.gm.graph.nodes)
    first = next((n for n in nodes if n.op == "placeholder"), None)
    out = next(n for n in nodes if n.op == "output").args[0]
    outputs = [meta(v) for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.fx.Node)]
    return natural_objective(meta(first), outputs[0])


def run_loss(captured: CapturedGraph) -> LossGraph:
    """:func:`run_objective`'s loss captured over ``captured``'s output, for :func:`reprice`."""
    return capture_loss(captured, *run_objective(captured))


def calibrate_plan(model: str, plan: Plan, *, batch_size: int | None = None, seq_len: int | None = None,
                   steps: int = 5, warmup: int = 2, threads: int = 1, profiled: bool = True,
                   timeout_s: float = 600.0, model_kwargs: dict | None = None,
                   profile_in_ranks: bool = False) -> DistCalibrationReport:
    """Run ``plan`` under torchrun (:func:`run_plan`) and hold it against its predictions
    (:func:`compare_run`, on the model built for real in this process; with ``profile_in_ranks``
    the profiled model is measured on the ranks, right after their timed steps).

    Example::

        report = calibrate_plan("gpt2", plan, batch_size=4, seq_len=256)
        print(report.to_markdown())
    """
    run = run_plan(model, plan, batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup, threads=threads,
                   timeout_s=timeout_s, model_kwargs=model_kwargs, profile_in_ranks=profile_in_ranks and profiled)
    captured = capture_model(model, plan, batch_size=batch_size, seq_len=seq_len, model_kwargs=model_kwargs)
    return compare_run(run, captured, model=model, profiled=profiled)


def capture_model(model: str, plan: Plan, *, batch_size: int | None = None, seq_len: int | None = None,
                  model_kwargs: dict | None = None) -> CapturedGraph:
    """``model`` built for real on the CPU (:func:`fxshard.zoo.resolve`) and captured.

    Raises:
        ExecutionError: it is not the model ``plan`` was made for (another batch or length).
    """
    from fxshard.capture import capture

    batch_size = _batch_size(model, plan, batch_size)
    zm = resolve_model(model, batch_size=batch_size, seq_len=seq_len, model_kwargs=model_kwargs)
    captured = capture(zm.model, zm.example_inputs, example_kwargs=zm.example_kwargs or None)
    if captured.fingerprint() != plan.model.fingerprint:
        raise ExecutionError(f"{model} (batch {batch_size}, seq_len {seq_len}) is not the model the plan was made for "
                             f"(fingerprint {captured.fingerprint()} against the plan's {plan.model.fingerprint}); "
                             f"pass the batch_size and seq_len the plan was made at")
    return captured


def compare_run(run: PlanRun, captured: CapturedGraph, *, model: str | None = None,
                profiled: bool = True, where: str | None = None) -> DistCalibrationReport:
    """``run`` held against the predictions for its plan.

    ``analytical`` re-prices the plan's split with the analytical cost model, ``profiled`` with
    ``ProfiledCostModel(threads=run.threads)`` measured in this process at the plan's micro-batch
    (:func:`reprice`): each stage's fwd and bwd, and the step as
    :func:`fxshard.simulate_plan.simulate_plan` gives it. Memory: each rank's measured peak above
    its baseline against the sum of the plan's ``peak_memory_bytes`` over its stages (what the
    planner believes), and each stage's autograd saved bytes per micro-batch against the
    predicted activation bytes per micro-batch.

    Args:
        run: from :func:`run_plan`.
        captured: the plan's model captured with real weights (:func:`capture_model`).
        model: the name the report gives (default: the plan's).
        profiled: also price with the profiled cost model (measures: slower).
        where: ``"ranks"``: the profiles the run's ranks took right after their timed steps, each
            stage priced by its own rank's (:func:`fxshard.calibrate_dist_profile.rank_priced`);
            ``"here"``: profiled in this process now; default: ``"ranks"`` when the run has them.
    """
    from fxshard.calibrate_dist_profile import profiled_model
    from fxshard.simulate_plan import simulate_plan

    plan = run.plan
    loss = run_loss(captured)  # what the ranks trained with, priced on the last stage
    analytical, summaries = priced_with_summaries(captured, plan, "analytical", loss)
    where, prof, spread = _profiled(run, captured, loss, where) if profiled else (None, None, None)
    share = (plan.microbatches - 1) / plan.microbatches  # of the backwards that accumulate

    def mean_bwd(st: Any) -> float:
        return st.bwd_time_s + share * (st.accumulate_time_s or 0.0)

    stages = tuple(DistStageRow(index=m.index, rank=m.rank, measured_fwd_s=m.fwd_s, measured_bwd_s=m.bwd_s,
                                fwd_cpu_s=m.fwd_cpu_s, bwd_cpu_s=m.bwd_cpu_s,
                                analytical_fwd_s=analytical.stages[m.index].fwd_time_s,
                                analytical_bwd_s=mean_bwd(analytical.stages[m.index]),
                                profiled_fwd_s=prof.stages[m.index].fwd_time_s if prof else None,
                                profiled_bwd_s=mean_bwd(prof.stages[m.index]) if prof else None,
                                saved_bytes=m.saved_bytes,
                                predicted_activation_bytes=summaries[m.index].activation_bytes)
                   for m in run.stages)
    ranks = tuple(DistRankRow(rank=r.rank, stages=r.stages, measured_peak_bytes=r.peak_bytes,
                              predicted_peak_bytes=sum(plan.stages[i].peak_memory_bytes for i in r.stages),
                              param_bytes=r.param_bytes, baseline_bytes=r.baseline_bytes,
                              resident_bytes=r.resident_bytes) for r in run.ranks)
    return DistCalibrationReport(model=model or plan.model.name, world=run.world, threads=run.threads,
                                 schedule=plan.schedule, microbatches=plan.microbatches, batch_size=plan.batch_size,
                                 steps=len(run.steps_s), stages=stages, ranks=ranks, measured_step_s=run.step_s,
                                 steps_s=run.steps_s, analytical_step_s=analytical.estimate.step_time_s,
                                 profiled_step_s=prof.estimate.step_time_s if prof else None,
                                 load_average=run.load_average, profile_clock=profiled_model(plan, run.threads).clock,
                                 profile_where=where, profile_spread=spread,
                                 simulated_measured_step_s=simulate_plan(_as_run(run)).step_time_s)


def _profiled(run: PlanRun, captured: CapturedGraph, loss: LossGraph,
              where: str | None) -> tuple[str, Plan, float | None]:
    """(where, the plan priced by the profiled model there, the ranks' spread) for :func:`compare_run`."""
    from fxshard.calibrate_dist_profile import profile_spread, profiled_model, rank_priced

    if where not in (None, "ranks", "here"):
        raise ExecutionError(f"where={where!r}: use 'ranks' (the profiles the run's ranks took) or 'here' "
                             f"(profile in this process now)")
    where = where or ("ranks" if all(r.profile for r in run.ranks) else "here")
    if where == "ranks":
        return where, rank_priced(run.plan, run.ranks), profile_spread(run.ranks)
    return where, reprice(captured, run.plan, profiled_model(run.plan, run.threads), loss=loss), None


def _as_run(run: PlanRun) -> Plan:
    """The run's plan with its measured stage times (a backward: the mean over the step's
    micro-batches, accumulation included) and each rank's measured optimizer step, shared among
    its stages by their parameter bytes."""
    plan = run.plan
    measured = {m.index: m for m in run.stages}
    stepped = {i: r for r in run.ranks for i in r.stages}

    def measured_step(s: Any) -> float:
        r = stepped[s.index]
        held = sum(plan.stages[i].param_bytes for i in r.stages)
        return r.optimizer_cpu_s * s.param_bytes / held if held else 0.0

    return dataclasses.replace(plan, stages=tuple(dataclasses.replace(
        s, fwd_time_s=measured[s.index].fwd_s, bwd_time_s=measured[s.index].bwd_s, accumulate_time_s=0.0,
        optimizer_time_s=measured_step(s)) for s in plan.stages))
