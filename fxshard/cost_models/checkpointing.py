"""Memory and time of activation checkpointing over a stage's repeated blocks.

For a set of nodes (a stage, or the whole graph) and the repeated blocks lying wholly inside
it, :func:`checkpoint_cost` predicts what stays alive for backward under a policy, and the
forward time the backward adds by recomputing. It reuses the saved-tensor accounting of
:meth:`fxshard.cost_models.GraphCosts.saved_activation_bytes` (the one ``passes/stages.py``
sums per stage): a tensor counts once, under the node that allocated its storage.

- ``"none"``: what the nodes save, as today.
- ``"full"``: the nodes outside blocks save as today; of each block only its inputs stay
  (non-reentrant checkpointing holds them for the recomputation); nothing is recomputed
  outside blocks; the recompute is the blocks' forward time.
- ``"selective"``: as ``"full"``, plus the outputs of the block nodes whose FLOPs all come
  from kept operators (matmuls, convolutions, attention: :data:`SELECTIVE_KEPT_OPS`) and what
  those nodes save besides their inputs and outputs (attention's log-sum-exp); the recompute
  is the forward time of the other block nodes.

Backward recomputes one block at a time, so the peak rises by that block's recomputed
activations while its backward runs: ``transient_bytes`` is the largest such block. See
docs/cost_models.md, "Activation checkpointing".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol

from fxshard.cost_models.base import GraphCosts
from fxshard.errors import CostModelError

__all__ = ["CHECKPOINT_POLICIES", "SELECTIVE_KEPT_OPS", "CheckpointCost", "checkpoint_cost", "kept_nodes"]

CHECKPOINT_POLICIES = ("none", "selective", "full")

# aten operators whose outputs selective checkpointing keeps (the runtime's policy reads the
# same list): the FLOP-heavy ones, whose recomputation would cost a second forward's worth.
SELECTIVE_KEPT_OPS = ("mm", "addmm", "bmm", "baddbmm", "linear", "convolution", "_scaled_mm",
                      "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                      "_flash_attention_forward", "_efficient_attention_forward")
_KEPT = frozenset(f"aten.{name}" for name in SELECTIVE_KEPT_OPS)


class Block(Protocol):
    """What the cost needs of a repeated block (``fxshard.passes.regions.Region`` has it)."""

    nodes: tuple[str, ...]
    inputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CheckpointCost:
    """Activation memory and recompute time of a node set under one checkpointing policy.

    Attributes:
        policy: "none", "selective" or "full".
        saved_bytes: bytes kept alive from forward to backward (each storage once).
        recompute_fwd_s: forward time the backward adds by recomputing.
        transient_bytes: extra bytes while the largest block is recomputed in backward (0
            for "none").
        blocks: how many blocks were checkpointed.
    """

    policy: str
    saved_bytes: float
    recompute_fwd_s: float
    transient_bytes: float
    blocks: int


def kept_nodes(costs: GraphCosts, nodes: Iterable[str]) -> tuple[str, ...]:
    """The nodes whose outputs selective checkpointing keeps: those whose forward FLOPs all
    come from kept operators."""
    return tuple(n for n in nodes if costs[n].work.flop_ops and _KEPT.issuperset(costs[n].work.flop_ops))


def _held_bytes(costs: GraphCosts, nodes: Iterable[str], extra_owners: Iterable[str] = (),
                extra_bytes: float = 0.0) -> float:
    """What ``nodes`` save (GraphCosts' accounting) plus the storages of ``extra_owners``'
    outputs, every storage once."""
    owners: set[str] = set()
    total = extra_bytes
    for n in nodes:
        work = costs[n].work
        total += work.saved_bytes
        owners.update(costs.storage_owner(v) for v in work.saved_values)
    for n in extra_owners:
        if costs[n].work.op != "get_attr":  # a parameter or constant read by a block: state, not activation
            owners.add(costs.storage_owner(n))
    return total + sum(costs[o].work.output_bytes for o in sorted(owners))  # one order: float sums


def checkpoint_cost(costs: GraphCosts, nodes: Iterable[str], blocks: Sequence[Block], policy: str) -> CheckpointCost:
    """Saved-activation bytes and recompute time of ``nodes`` when the ``blocks`` inside them
    run under activation checkpointing ``policy``.

    Args:
        costs: the graph's costs (at the micro-batch size the stage runs).
        nodes: the node names of the stage (get_attr nodes may be absent).
        blocks: repeated blocks (``fxshard.passes.regions.Region``); those not wholly inside
            ``nodes`` are not checkpointed (``regions_within``).
        policy: "none", "selective" or "full".

    Returns:
        A :class:`CheckpointCost`; for "none", ``saved_bytes`` equals
        ``costs.saved_activation_bytes(nodes)``.

    Raises:
        CostModelError: an unknown policy.

    Example::

        cost = checkpoint_cost(costs, stage.nodes, regions_within(regions, stage.nodes), "full")
        activation_bytes, extra_backward_s = cost.saved_bytes, cost.recompute_fwd_s
    """
    if policy not in CHECKPOINT_POLICIES:
        raise CostModelError(f"activation checkpointing policy {policy!r} is not one of {', '.join(CHECKPOINT_POLICIES)}")
    names = [n for n in nodes if costs[n].work.op != "get_attr"]
    if policy == "none":
        return CheckpointCost(policy, float(_held_bytes(costs, names)), 0.0, 0.0, 0)
    inside = set(names)
    blocks = [b for b in blocks if inside.issuperset(b.nodes)]
    in_blocks = {n for b in blocks for n in b.nodes}
    outside = [n for n in names if n not in in_blocks]
    kept: tuple[str, ...] = ()
    if policy == "selective":
        kept = kept_nodes(costs, [n for b in blocks for n in b.nodes])
    block_inputs = [i for b in blocks for i in b.inputs]
    saved = _held_bytes(costs, outside, extra_owners=[*block_inputs, *kept],
                        extra_bytes=sum(costs[n].work.saved_bytes for n in kept))
    kept_set = set(kept)
    recompute = sum(costs[n].fwd_time_s for b in blocks for n in b.nodes if n not in kept_set)  # graph order
    transient = 0.0
    for b in blocks:
        b_kept = [n for n in b.nodes if n in kept_set]
        full = _held_bytes(costs, b.nodes)
        stays = _held_bytes(costs, (), extra_owners=[*b.inputs, *b_kept],
                            extra_bytes=sum(costs[n].work.saved_bytes for n in b_kept))
        transient = max(transient, full - stays)
    return CheckpointCost(policy, float(saved), float(recompute), float(max(transient, 0.0)), len(blocks))
