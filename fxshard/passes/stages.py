"""From a stage assignment to per-stage figures: nodes, memory, time, bytes sent.

The partitioner assigns the nodes of the cost graph; this pass completes the assignment to
every fx node (a ``get_attr`` goes with its first consumer, and is replicated on every other
stage that reads it) and totals each stage exactly:

- parameters: every tensor a stage holds or reads, each once (a tied weight used on two
  stages is held on both, as Megatron does with embeddings);
- activations: the tensors the stage's nodes save for backward, each once per stage, a
  tensor received from an earlier stage included (the stage keeps its own copy);
- transient: the largest single node's output plus its gradient (the logits of an LM head),
  plus, in training, what its backward kernels hold besides (``NodeWork.backward_workspace_bytes``:
  a convolution's blocked copies on the CPU);
- the tensors the optimizer step updates (fp32 master copies for 16-bit parameters), whose
  temporaries fxshard.cost_models.optimizer_step prices by device, and the largest parameter,
  whose new gradient is alive next to the accumulated one while a micro-batch accumulates;
- sends: bytes crossing each boundary, a value that skips stages counted on every boundary
  it is forwarded across.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch.fx

from fxshard.capture import CapturedGraph
from fxshard.cost_models import GraphCosts, NodeWork
from fxshard.cost_models.memory import bytes_per_parameter

__all__ = ["StageSummary", "complete_assignment", "summarize_stages"]

_SIXTEEN_BIT = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSummary:
    """Totals of one stage, at the batch size ``costs`` were computed for."""

    index: int
    nodes: tuple[str, ...]
    fwd_flops: float
    fwd_time_s: float
    bwd_time_s: float
    param_bytes: int
    state_bytes: float
    activation_bytes: float
    transient_bytes: float
    send_bytes: float
    first_module: str
    last_module: str
    optimizer_param_sizes: tuple[float, ...] = ()  # bytes of each tensor the optimizer step updates
    largest_param_bytes: float = 0.0  # its largest parameter: the gradient alive twice while one accumulates
    # Priced with the stage's device and levers (fxshard/candidates.py), per rank: one optimizer
    # step, and what each backward but the step's first adds to accumulate the gradients.
    optimizer_time_s: float = 0.0
    accumulate_time_s: float = 0.0


def complete_assignment(captured: CapturedGraph, stage_of: Mapping[str, int]) -> dict[str, int]:
    """Every fx node's stage: get_attr nodes (absent from cost graphs) join their first consumer."""
    full = dict(stage_of)
    for node in captured.gm.graph.nodes:
        if node.name not in full:
            users = [full[u.name] for u in node.users if u.name in full]
            full[node.name] = min(users) if users else 0
    return full


def summarize_stages(captured: CapturedGraph, costs: GraphCosts, stage_of: Mapping[str, int], k: int, *,
                     training: bool = True, optimizer: str = "adam",
                     stage_costs: Sequence[GraphCosts] | None = None) -> list[StageSummary]:
    """Per-stage totals of an assignment.

    Args:
        captured, costs: the graph and its costs (at micro-batch size for a pipeline).
        stage_of: stage of every cost-graph node (get_attr nodes may be absent).
        k: number of stages.
        training, optimizer: what the state per parameter holds.
        stage_costs: per stage, the costs on that stage's device (heterogeneous clusters);
            default ``costs`` for all.
    """
    full = complete_assignment(captured, stage_of)
    nodes = list(captured.gm.graph.nodes)
    members: list[list[str]] = [[] for _ in range(k)]
    for node in nodes:
        members[full[node.name]].append(node.name)
    held = _held_tensors(nodes, full, costs, k)
    by_name = {n.name: n for n in nodes}
    boundary = _boundary_bytes(nodes, full, costs, k)
    summaries = []
    for s in range(k):
        names = members[s]
        own = stage_costs[s] if stage_costs is not None else costs
        works = [costs[n].work for n in names]
        params = sum(size for size, is_param, _ in held[s].values() if is_param)
        transient = max((2 * w.output_bytes + (w.backward_workspace_bytes if training else 0)
                         for w in works if w.op not in ("get_attr", "placeholder")), default=0)
        if training:
            transient += _shared_gradient_bytes(by_name, names, full, costs)
        modules = [w.module for w in works if w.module]
        summaries.append(StageSummary(
            index=s, nodes=tuple(names), fwd_flops=float(sum(w.fwd_flops for w in works)),
            fwd_time_s=sum(own[n].fwd_time_s for n in names),
            bwd_time_s=sum(own[n].bwd_time_s for n in names) if training else 0.0,
            param_bytes=int(params), state_bytes=_state_bytes(held[s], training, optimizer),
            activation_bytes=_activation_bytes(works, costs) if training else 0.0,
            transient_bytes=float(transient), send_bytes=boundary[s] if s < k - 1 else 0.0,
            first_module=modules[0] if modules else "", last_module=modules[-1] if modules else "",
            optimizer_param_sizes=_optimizer_param_sizes(held[s], training, optimizer),
            largest_param_bytes=float(max((size for size, is_param, _ in held[s].values() if is_param), default=0))))
    return summaries


def _shared_gradient_bytes(by_name: Mapping[str, torch.fx.Node], names: Sequence[str], full: Mapping[str, int],
                           costs: GraphCosts) -> float:
    """What a parameter used more than once in a stage adds to its backward's peak: 2 x its bytes,
    summed over such parameters (a tied embedding and LM head, a module called twice).

    Autograd holds each use's gradient in the parameter's input buffer until the last use's
    backward has run, then adds them out of place before ``AccumulateGrad`` takes the sum: the
    two gradients and their sum are alive at once, beside the one gradient the state already
    counts. Measured on this CPU: an embedding and a linear layer sharing a 48.8 MiB weight peak
    at 3 x the weight (152.5 MiB) in backward, 2 x (103.7 MiB) with separate weights; the whole
    tied GPT-2 of ``cpu_calibration.py`` 98 MiB (2 x its 49 MiB embedding) above the prediction
    without this term (docs/cost_models.md, "Memory outside the state and activations")."""
    stage = full[names[0]] if names else 0
    uses: dict[str, int] = {}
    size_of: dict[str, int] = {}
    for name in names:
        work = costs[name].work
        node = by_name[name]
        # a get_attr's uses are its users in the stage that make a tensor (not a size query)
        count = (sum(1 for u in node.users if full.get(u.name) == stage and costs[u.name].work.output_bytes > 0)
                 if node.op == "get_attr" else 1)
        for param, size in zip(work.params, work.param_sizes):
            uses[param] = uses.get(param, 0) + count
            size_of[param] = size
    return float(sum(2 * size_of[p] for p, n in uses.items() if n > 1))


def _held_tensors(nodes: list[torch.fx.Node], full: Mapping[str, int], costs: GraphCosts,
                  k: int) -> list[dict[str, tuple[int, int, str]]]:
    """Per stage, the tensors it holds: its own nodes' and those of get_attr nodes it reads,
    as name -> (bytes, is parameter, dtype)."""
    held: list[dict[str, tuple[int, int, str]]] = [{} for _ in range(k)]
    for node in nodes:
        w = costs[node.name].work
        stages = {full[node.name]} | ({full[u.name] for u in node.users} if node.op == "get_attr" else set())
        for s in stages:
            for name, size in zip(w.params, w.param_sizes):
                held[s][name] = (size, 1, w.dtype)
            for name, size in zip(w.buffers, w.buffer_sizes):
                held[s][name] = (size, 0, w.dtype)
    return held


def _boundary_bytes(nodes: list[torch.fx.Node], full: Mapping[str, int], costs: GraphCosts, k: int) -> list[float]:
    """Bytes crossing each boundary between stages s and s + 1 (a value counted on every
    boundary between its producer and its last consumer)."""
    boundary = [0.0] * max(k - 1, 0)
    for node in nodes:
        if node.op == "get_attr" or not node.users:
            continue
        a = full[node.name]
        last = max(full[u.name] for u in node.users)
        for s in range(a, last):
            boundary[s] += costs[node.name].work.output_bytes
    return boundary


def _state_bytes(held: Mapping[str, tuple[int, int, str]], training: bool, optimizer: str) -> float:
    """A stage's parameters with their gradients and optimizer state, and its buffers."""
    state = 0.0
    for size, is_param, dtype in held.values():
        if is_param:
            mixed = dtype in _SIXTEEN_BIT
            per = bytes_per_parameter(optimizer, "mixed" if mixed else "fp32", training=training)
            state += size * per / (2 if mixed else 4)
        else:
            state += size
    return state


def _optimizer_param_sizes(held: Mapping[str, tuple[int, int, str]], training: bool,
                           optimizer: str) -> tuple[float, ...]:
    """Bytes of each tensor the optimizer step updates, sorted by parameter name: the parameter,
    or its fp32 master copy when it is 16-bit (mixed precision steps the master)."""
    if not training or optimizer == "none":
        return ()
    return tuple(float(size * (2 if dtype in _SIXTEEN_BIT else 1))
                 for _, (size, is_param, dtype) in sorted(held.items()) if is_param)


def _activation_bytes(works: list[NodeWork], costs: GraphCosts) -> float:
    """What a stage's nodes save for backward: their own tensors, and the values they keep
    (each counted once, by the storage that holds it)."""
    saved: set[str] = set()
    activation = 0.0
    for w in works:
        activation += w.saved_bytes
        saved.update(costs.storage_owner(v) for v in w.saved_values)
    activation += sum(costs[v].work.output_bytes for v in saved)
    return activation
