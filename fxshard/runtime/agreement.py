"""Under torchrun every rank must run the same plan, on the devices it was made for.

Ranks that plan on their own can choose different splits: the profiled cost model measures
each rank's own timings, and a ``plan=`` read from per-rank files may differ. Stages built
from different splits then exchange tensors neither side expects, and the first step dies
inside torch ("forward() takes 5 positional arguments but 7 were given") or hangs.
:func:`shared_plan` makes one plan for all: rank 0 plans and broadcasts the Plan JSON over the
default process group; plans given by the user are compared across ranks by a digest of what
decides execution, and a difference is refused on every rank, naming the ranks that disagree.
:func:`agree` turns one rank's objection (a plan for CUDA on a rank without it, another model)
into the same ``ExecutionError`` on every rank before any stage is built, so no rank is left
waiting in a collective for one that gave up. See docs/runtime.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from fxshard import errors
from fxshard.errors import ExecutionError, FxshardError
from fxshard.plan import Plan

__all__ = ["agree", "device_mismatch", "execution_summary", "fingerprint_mismatch", "shared_plan"]

_TOP = ("strategy", "schedule", "microbatches", "replicas", "batch_size", "training", "data_parallel",
        "reshard_after_forward")
_STAGE = ("index", "devices", "device_indices", "nodes", "activation_checkpointing")


def execution_summary(plan: Plan) -> dict[str, Any]:
    """What decides how the ranks run ``plan``, field by field (estimates left out: two ranks
    whose profiled timings differ but that split alike run together fine), with a ``digest``
    of it all."""
    data = plan.to_dict()
    stages = [{k: s[k] for k in _STAGE if k in s} for s in data["stages"]]
    core = {k: data[k] for k in _TOP if k in data}
    core["model"] = data["model"]["fingerprint"]
    core["stages"] = stages
    digest = hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]
    summary = {k: v for k, v in core.items() if k != "stages"}
    summary["stage nodes"] = "+".join(str(len(s["nodes"])) for s in stages)
    summary["stage split"] = hashlib.sha256(json.dumps([s["nodes"] for s in stages]).encode()).hexdigest()[:8]
    summary["stage devices"] = ",".join("/".join(s["devices"]) for s in stages)
    summary["digest"] = digest
    return summary


def _gather(obj: Any) -> list[Any]:
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _use_rank_device() -> None:
    """Object collectives run on the current CUDA device under NCCL: make it this rank's."""
    import os

    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def shared_plan(plan: Plan | None, make_plan: Callable[[], Plan]) -> Plan:
    """The one plan every rank runs (a collective: call it on every rank).

    Without ``plan`` on any rank, rank 0 calls ``make_plan`` and broadcasts the result; the
    other ranks wait for it within the process group's timeout. With ``plan`` on every rank,
    the plans must agree on everything that decides execution.

    Raises:
        ExecutionError: some ranks were given a plan and others not, or the given plans
            differ (the message names the ranks and the fields); raised on every rank.
        FxshardError: rank 0 could not plan (the same class on every rank, with its message).
    """
    _use_rank_device()
    rank = dist.get_rank()
    summaries = _gather(execution_summary(plan) if plan is not None else None)
    if all(s is None for s in summaries):
        return _broadcast_plan(rank, make_plan)
    digests = [s["digest"] if s is not None else None for s in summaries]
    if len(set(digests)) == 1:
        return plan
    raise ExecutionError(_disagreement(summaries))


def _broadcast_plan(rank: int, make_plan: Callable[[], Plan]) -> Plan:
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            payload = [("plan", make_plan().to_json(indent=None))]
        except Exception as e:  # noqa: BLE001 - the other ranks wait for a word either way
            failure = e
            payload = [("error", type(e).__name__, str(e), isinstance(e, FxshardError))]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    kind, *rest = payload[0]
    if kind == "plan":
        return Plan.from_json(rest[0])
    name, message, ours = rest
    cls = getattr(errors, name, None) if ours else None
    text = f"rank 0, which plans for every rank, could not plan: {message}"
    if isinstance(cls, type) and issubclass(cls, FxshardError):
        raise cls(text)
    raise ExecutionError(f"rank 0, which plans for every rank, failed while planning ({name}: {message}); see "
                         f"rank 0's log")


def _disagreement(summaries: list[dict[str, Any] | None]) -> str:
    groups: dict[str | None, list[int]] = {}
    for r, s in enumerate(summaries):
        groups.setdefault(s["digest"] if s is not None else None, []).append(r)
    lines = []
    for digest, ranks in groups.items():
        if digest is None:
            lines.append(f"{_ranks(ranks)}: no plan= (would have had rank 0 plan)")
            continue
        s = summaries[ranks[0]]
        lines.append(f"{_ranks(ranks)}: plan digest {digest} ({s['strategy']}, stages of {s['stage nodes']} nodes "
                     f"on {s['stage devices']}, schedule {s['schedule']}, {s['microbatches']} micro-batches)")
    given = [s for s in summaries if s is not None]
    fields = sorted({k for s in given for k in s if k != "digest" and len({json.dumps(g.get(k)) for g in given}) > 1})
    differ = f"; they differ in {', '.join(fields)}" if fields else ""
    return (f"the ranks disagree on the plan, so their stages would not fit together: {'; '.join(lines)}{differ}. "
            f"Give every rank the same plan (write plan.to_json() once and load it on every rank with "
            f"fxshard.Plan.from_json), or pass no plan= on any rank and rank 0 plans for all")


def agree(problem: str | None) -> None:
    """Raise on every rank when any rank has a problem (a collective: call it on every rank).

    Raises:
        ExecutionError: the problems, each with the ranks that reported it.
    """
    problems = _gather(problem)
    if not any(problems):
        return
    by_text: dict[str, list[int]] = {}
    for r, p in enumerate(problems):
        if p:
            by_text.setdefault(p, []).append(r)
    if len(by_text) == 1 and len(next(iter(by_text.values()))) == len(problems):
        raise ExecutionError(next(iter(by_text)))
    raise ExecutionError("; ".join(f"{_ranks(ranks)}: {text}" for text, ranks in by_text.items())
                         + ("" if problem else f" (this rank, {dist.get_rank()}, is fine but stops with them)"))


def fingerprint_mismatch(plan: Plan, model_name: str, fingerprint: str, nodes: int) -> str | None:
    """Why ``plan`` was made for another graph than the one captured here, or None."""
    if plan.model.fingerprint == fingerprint:
        return None
    return (f"the plan was made for {plan.model.name} (fingerprint {plan.model.fingerprint}, {plan.model.nodes} "
            f"nodes); this model captures as {model_name} (fingerprint {fingerprint}, {nodes} nodes). Re-plan for "
            f"this model and input shapes")


def device_mismatch(plan: Plan, rank: int, device: torch.device, backend: str) -> str | None:
    """Why this rank cannot run its part of ``plan`` on ``device``, or None: a plan made for
    CUDA devices on a rank without CUDA (or with gloo), or a CPU plan on NCCL ranks."""
    names = [d for s in plan.stages for d, i in zip(s.devices, s.device_indices) if i == rank]
    if not names:
        return None
    planned = torch.device(names[0].split("/", 1)[-1])  # "m1/cuda:3" on multi-machine plans
    if planned.type == device.type:
        return None
    every = sorted({d for s in plan.stages for d in s.devices}, key=lambda d: (len(d), d))
    specs = plan.cluster.get("specs", ()) if isinstance(plan.cluster, Mapping) else ()
    kinds = sorted({str(spec.get("name", "?")) for spec in specs if isinstance(spec, Mapping)})
    made_for = f", made for {', '.join(kinds)}" if kinds else ""
    cuda = "has CUDA" if torch.cuda.is_available() else "has no CUDA"
    n = plan.num_devices
    here = (f"devices='{n}xcpu' (`fxshard export MODEL --devices {n}xcpu` for a launcher)" if device.type == "cpu"
            else f"devices={n}, this machine's CUDA devices")
    return (f"the plan puts rank {rank}'s work on {names[0]} (the plan's devices: {', '.join(every)}{made_for}), "
            f"but this rank runs on {device.type} ({backend}; this machine {cuda}). Re-plan for these devices: "
            f"{here}; or run the plan on the cluster it was made for, with "
            f"{'NCCL' if planned.type == 'cuda' else 'gloo'}")
