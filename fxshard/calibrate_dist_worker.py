"""One rank of a whole-plan calibration under torchrun (:func:`fxshard.calibrate_dist.run_plan`).

Run as ``python -m torch.distributed.run --nproc-per-node WORLD ... -m fxshard.calibrate_dist_worker
JOB_DIR``: reads ``plan.json`` and ``job.json`` from ``JOB_DIR``, builds the model on the meta
device (so this rank materialises only its own stages), trains ``warmup`` then ``steps`` steps
of the plan with its optimizer (then, when the job asks, prices the plan with the profiled cost
model: :mod:`fxshard.calibrate_dist_profile`), and writes ``rank<R>.json`` (or ``rank<R>.error``)
back. What is measured is described in docs/calibration.md ("A whole plan under torchrun").
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxshard
from fxshard.calibrate_dist import resolve_model
from fxshard.calibrate_dist_profile import profile_on_rank
from fxshard.cluster import Cluster
from fxshard.cost_models.host_memory import (
    ResidentPeak,
    SavedTensors,
    file_backed_bytes,
    released_heap,
    retain_freed_memory,
    trim_heap,
)
from fxshard.plan import Plan
from fxshard.runtime.distributed import init_process_group_from_env
from fxshard.runtime.ranks import CPU_HEAP_ENV

__all__ = ["main", "real_inputs"]


def real_inputs(model: torch.nn.Module, inputs: tuple, *, seed: int = 0) -> tuple:
    """CPU tensors shaped like the (meta) ``inputs``: random floats, and token ids below the
    model's first embedding's size (zeros where it has none)."""
    vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), 1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen).to(x.dtype))
        else:
            out.append(torch.randint(0, vocab, x.shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def _lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _mse_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    out = output[0] if isinstance(output, (tuple, list)) else output
    return F.mse_loss(out.float(), target)


def objective(model: torch.nn.Module, inputs: tuple) -> tuple[Callable, torch.Tensor]:
    """The model's natural training loss and a target for it (:func:`natural_objective`), the
    output's shape from a forward on the meta device."""
    with torch.no_grad():
        out = model(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs])
    return natural_objective(inputs[0] if inputs else None, out)


def natural_objective(first_input: Any, output: Any) -> tuple[Callable, torch.Tensor]:
    """Next-token cross entropy for a model from (batch, seq) token ids to (batch, seq, vocab)
    logits, else MSE of the first output against zeros; the target on ``first_input``'s device
    (``meta`` tensors give a ``meta`` target, for pricing)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    tokens = first_input
    if (isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and not tokens.is_floating_point()
            and out.dim() == 3 and tuple(out.shape[:2]) == tuple(tokens.shape)):
        return _lm_loss, torch.roll(tokens, shifts=-1, dims=1)
    device = tokens.device if isinstance(tokens, torch.Tensor) else "cpu"
    return _mse_loss, torch.zeros(out.shape, dtype=torch.float32, device=device)


class _LossClock:
    """The loss, timed: torch's schedule computes it after the last stage's forward, outside
    ``forward_one_chunk``; its seconds join that stage's forward (its backward runs inside
    ``backward_one_chunk`` already)."""

    def __init__(self, loss_fn: Callable) -> None:
        self.loss_fn = loss_fn
        self.wall = self.cpu = 0.0
        self.last: _StageClock | None = None  # the last stage's clock, where the loss's saved bytes go

    def __call__(self, *args: Any) -> torch.Tensor:
        last = self.last
        counter = SavedTensors(exclude=last.params) if last is not None and last.count else None
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            if counter is None:
                return self.loss_fn(*args)
            with counter.counting():
                return self.loss_fn(*args)
        finally:
            self.wall += time.perf_counter() - t0
            self.cpu += time.thread_time() - c0
            if counter is not None:  # the micro-batch whose forward the last stage just ran
                last.saved[last.chunk] = last.saved.get(last.chunk, 0) + counter.bytes


class _StageClock:
    """Wraps one ``PipelineStage``'s compute calls (instance attributes, so torch's schedule
    calls the wrappers): wall and thread CPU seconds per step, and, while ``count`` is set,
    autograd's saved bytes of each micro-batch's forward."""

    def __init__(self, stage: Any, params: list[torch.Tensor]) -> None:
        self.index = stage.stage_index
        self.params = params
        self.count = False
        self.chunk = 0  # the micro-batch of the last forward
        self.saved: dict[int, int] = {}
        self.reset()
        for name, kind in (("forward_one_chunk", "fwd"), ("backward_one_chunk", "bwd"),
                           ("backward_weight_one_chunk", "bwd")):
            setattr(stage, name, self._wrap(getattr(stage, name), kind))

    def reset(self) -> None:
        self.wall = {"fwd": 0.0, "bwd": 0.0}
        self.cpu = {"fwd": 0.0, "bwd": 0.0}

    def _wrap(self, call: Callable, kind: str) -> Callable:
        def timed(chunk: int, *args: Any, **kwargs: Any) -> Any:
            if kind == "fwd":
                self.chunk = chunk
            counter = SavedTensors(exclude=self.params) if self.count and kind == "fwd" else None
            c0, t0 = time.thread_time(), time.perf_counter()
            if counter is not None:
                with counter.counting():
                    out = call(chunk, *args, **kwargs)
                self.saved[chunk] = counter.bytes
            else:
                out = call(chunk, *args, **kwargs)
            self.wall[kind] += time.perf_counter() - t0
            self.cpu[kind] += time.thread_time() - c0
            return out

        return timed


def _optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    if not params:
        return None  # a rank whose stages hold no parameters (torch's optimizers refuse an empty list)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    return None  # "none": gradients only


def _train_step(compiled: Any, inputs: tuple, target: torch.Tensor, optimizer: torch.optim.Optimizer | None,
                params: list[torch.nn.Parameter]) -> float:
    """One training step as a training loop runs it: the pipeline, the optimizer, gradients to
    None. Returns the optimizer step's seconds of the thread's CPU time."""
    compiled.step(*inputs, target=target)
    c0 = time.thread_time()
    if optimizer is not None:
        optimizer.step()
    stepped = time.thread_time() - c0
    for p in params:
        p.grad = None  # optimizer.zero_grad(set_to_none=True)
    return stepped


def _timed_steps(compiled: Any, inputs: tuple, target: torch.Tensor, optimizer: torch.optim.Optimizer | None,
                 params: list[torch.nn.Parameter], clocks: list[_StageClock], loss_clock: _LossClock, plan: Plan, *,
                 steps: int, warmup: int, on_timed: Callable[[], None]) -> dict[str, Any]:
    """``warmup`` then ``steps`` training steps, each after a barrier; ``on_timed`` is called before the
    first timed one. Per timed step: its wall and CPU seconds, the optimizer step's CPU seconds, and
    each stage's forward (the loss on the last stage's) and backward per micro-batch."""
    out: dict[str, Any] = {"step_s": [], "step_cpu_s": [], "optimizer_cpu_s": [],
                           "per_stage": {c.index: {"fwd": [], "bwd": [], "fwd_cpu": [], "bwd_cpu": []}
                                         for c in clocks}}
    m = plan.microbatches
    for i in range(warmup + steps):
        if i == warmup:
            on_timed()
        for c in clocks:
            c.reset()
            c.count = i == warmup - 1  # the last warm-up step counts the saved bytes
        loss_clock.wall = loss_clock.cpu = 0.0
        dist.barrier()
        c0, t0 = time.thread_time(), time.perf_counter()
        stepped = _train_step(compiled, inputs, target, optimizer, params)
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        if i < warmup:
            continue
        out["step_s"].append(elapsed)
        out["step_cpu_s"].append(cpu)
        out["optimizer_cpu_s"].append(stepped)
        for c in clocks:
            rows = out["per_stage"][c.index]
            last = c.index == plan.num_stages - 1
            rows["fwd"].append((c.wall["fwd"] + (loss_clock.wall if last else 0.0)) / m)
            rows["bwd"].append(c.wall["bwd"] / m)
            rows["fwd_cpu"].append((c.cpu["fwd"] + (loss_clock.cpu if last else 0.0)) / m)
            rows["bwd_cpu"].append(c.cpu["bwd"] / m)
    return out


def _profile_after_steps(job: dict, plan: Plan) -> str:
    """When the job asks, ``plan`` priced by the profiled model on this rank (its JSON), every rank
    at once after a barrier, each core as busy as while it trained; else ""."""
    if not job.get("profile_in_ranks"):
        return ""
    dist.barrier()
    return profile_on_rank(job, plan)


def run(job: dict, plan: Plan) -> dict:
    """This rank's measurements of ``job`` (see :func:`fxshard.calibrate_dist.run_plan`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = job.get("model_kwargs") or {}
    zm = resolve_model(job["model"], batch_size=job.get("batch_size"), seq_len=job.get("seq_len"), model_kwargs=kwargs)
    model = zm.model.to("meta")  # a zoo model comes on meta already; a factory's weights are freed here
    inputs = real_inputs(model, zm.example_inputs, seed=kwargs.get("seed", 0))
    loss_fn, target = objective(model, inputs)
    loss_clock = _LossClock(loss_fn)
    # Memory is measured first, with glibc's thresholds pinned low from before the build, so that
    # every freed tensor leaves the resident set: measured after steps that kept freed memory, the
    # heap's free blocks were reused by other tensors and the high-water mark grew by a logits-sized
    # block per micro-batch (GPT-2's head rank: docs/calibration.md, "The CPU heap"). The runtime
    # would keep freed memory from the build on; it does so here once memory is measured.
    os.environ[CPU_HEAP_ENV] = "release"
    with released_heap():
        probe = ResidentPeak()
        probe.start()
        code_before = file_backed_bytes() or 0
        compiled = fxshard.CompiledModel(model, Cluster.from_dict(plan.cluster), inputs, plan=plan,
                                         loss_fn=loss_clock)
        params = list(compiled.parameters())
        optimizer = _optimizer(plan.optimizer, params)
        # The rank's torch PipelineStage objects: CompiledModel keeps its execution private, and the
        # stage calls are timed where torch's schedule makes them.
        clocks = [_StageClock(s, params) for s in compiled._execution.local.stages]
        loss_clock.last = next((c for c in clocks if c.index == plan.num_stages - 1), None)
        # One untimed step makes the optimizer's state, then the measured one, the heap's free
        # pages handed back first.
        _train_step(compiled, inputs, target, optimizer, params)
        trim_heap()
        dist.barrier()
        memory = ResidentPeak()
        memory.start()
        _train_step(compiled, inputs, target, optimizer, params)
        dist.barrier()
        # The library code the steps ran became resident after the baseline (libtorch's kernels,
        # 8-20 MiB on this CPU): file-backed pages, no tensor's, kept apart from the peak.
        code = max(0, (file_backed_bytes() or 0) - code_before)
        peak = memory.peak_bytes() + memory.baseline_bytes - probe.baseline_bytes - code
    retained = retain_freed_memory()  # as the runtime runs a CPU rank (FXSHARD_CPU_HEAP=keep)
    memory_timed = ResidentPeak()
    timed = _timed_steps(compiled, inputs, target, optimizer, params, clocks, loss_clock, plan,
                         steps=job["steps"], warmup=job["warmup"], on_timed=memory_timed.start)
    # The resident set the timed steps reached with freed memory kept in the heap: the live peak
    # plus what the heap kept (above the same baseline, less the library code).
    resident = (memory_timed.peak_bytes() + memory_timed.baseline_bytes - probe.baseline_bytes
                - max(0, (file_backed_bytes() or 0) - code_before))
    profile = _profile_after_steps(job, plan)
    stages = [{"index": c.index, "rank": rank,
               **{k: statistics.median(v) for k, v in timed["per_stage"][c.index].items()},
               "saved_bytes": [c.saved[k] for k in sorted(c.saved)]} for c in clocks]
    optimizer_cpu_s = timed["optimizer_cpu_s"]
    return {"rank": rank, "world": world, "threads": torch.get_num_threads(), "steps_s": timed["step_s"],
            "steps_cpu_s": timed["step_cpu_s"], "stages": stages, "peak_bytes": peak, "profile": profile,
            "baseline_bytes": probe.baseline_bytes, "code_bytes": code, "resident_bytes": resident,
            "heap_retained": retained, "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "optimizer_cpu_s": statistics.median(optimizer_cpu_s) if optimizer_cpu_s else 0.0}


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank: ``JOB_DIR`` holds ``job.json`` and ``plan.json``."""
    job_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        job = json.loads((job_dir / "job.json").read_text())
        plan = Plan.from_json((job_dir / "plan.json").read_text())
        torch.set_num_threads(job["threads"])
        init_process_group_from_env(timeout_s=job["timeout_s"])
        result = run(job, plan)
        (job_dir / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        (job_dir / f"rank{rank}.error").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    # Leave without interpreter finalisation: gloo ranks have aborted there (docs/runtime.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
