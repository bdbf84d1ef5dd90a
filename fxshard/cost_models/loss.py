"""The training loss, priced on the stage that computes it.

A training step computes ``loss_fn(output, target)`` (or ``loss_fn(output)``) on each micro-batch
where the last stage lives: torch's pipeline schedules call it after the last stage's forward
(``_maybe_compute_loss``) and backward runs through it. It is not in the captured graph, yet it
can cost as much as a layer: next-token cross entropy over a 50257-wide vocabulary reads and
writes the logits several times forward and backward. When the plan knows the loss
(``loss_fn=``, with ``example_target=`` when it takes a target), :func:`capture_loss` captures it
as a graph of its own, on ``meta`` tensors shaped as the model's output and the target, and the
planner prices that graph with the plan's cost model like any other (the profiled model runs it
for real) and adds it to the last stage (:func:`with_loss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxshard.capture import CapturedGraph, capture
from fxshard.errors import CaptureError

__all__ = ["LossGraph", "capture_loss", "with_loss"]


class _Loss(torch.nn.Module):
    """``loss_fn`` as a module of the model's output (rebuilt to its structure) and the target."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], rebuild: Callable[[tuple], Any], outputs: int) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.rebuild = rebuild
        self.outputs = outputs

    def forward(self, *flat: Any) -> torch.Tensor:
        output = self.rebuild(flat[:self.outputs])
        return self.loss_fn(output, *flat[self.outputs:])


@dataclasses.dataclass(frozen=True)
class LossGraph:
    """The loss captured for pricing (``captured``), or why it is not priced (``note``)."""

    captured: CapturedGraph | None
    note: str


def _meta(value: Any) -> Any:
    """A meta tensor shaped as ``value`` (a tensor, fake or real); other values as they are."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta").requires_grad_(
            value.is_floating_point() and value.requires_grad)
    return value


def capture_loss(captured: CapturedGraph, loss_fn: Callable[..., torch.Tensor] | None,
                 example_target: Any = None) -> LossGraph:
    """The graph of ``loss_fn`` over the model's output, at the captured batch.

    The output comes from the captured graph's output node (its shapes, dtypes and structure),
    the target from ``example_target`` (its shapes and dtypes; None: ``loss_fn(output)``), both
    as ``meta`` tensors, so nothing is computed.

    Returns:
        The captured loss, or ``captured=None`` with a note saying why it cannot be priced
        (no ``loss_fn``, or one that fails on these arguments: the planner says so in the plan).
    """
    if loss_fn is None:
        return LossGraph(None, "")
    out_node = next(n for n in captured.gm.graph.nodes if n.op == "output")
    flat_out = [_meta(v.meta.get("val")) if isinstance(v, torch.fx.Node) else v
                for v in pytree.tree_leaves(out_node.args[0])]
    for v in flat_out:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.requires_grad_(True)
    target = [] if example_target is None else [_meta(t) for t in pytree.tree_leaves(example_target)]
    target_spec = pytree.tree_structure(example_target) if example_target is not None else None

    def call(output: Any, *leaves: Any) -> torch.Tensor:
        if target_spec is None:
            return loss_fn(output)
        return loss_fn(output, pytree.tree_unflatten(list(leaves), target_spec))

    module = _Loss(call, captured.output_spec.rebuild, len(flat_out))
    try:
        graph = capture(module, tuple(flat_out) + tuple(target))
    except CaptureError as e:
        if example_target is None:
            return LossGraph(None, "the loss is not priced: loss_fn(output) could not be traced without a target; "
                                   "pass example_target= (a target of one batch) to price it on the last stage")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return LossGraph(None, f"the loss is not priced: loss_fn(output, example_target) could not be traced "
                               f"({first[:160]})")
    return LossGraph(graph, "")


def with_loss(stage: Any, loss: Any) -> Any:
    """The last stage (a :class:`~fxshard.passes.stages.StageSummary`) with the loss's figures added.

    Times and FLOPs add. The loss's saved tensors join the stage's activations (they live until
    its backward, as the stage's do). During the loss's backward its largest gradient is alive
    next to the stage's largest output and that output's gradient (the stage's transient), so the
    stage's transient grows by half the loss's (its transient is an output plus its gradient).
    """
    return dataclasses.replace(
        stage, fwd_flops=stage.fwd_flops + loss.fwd_flops, fwd_time_s=stage.fwd_time_s + loss.fwd_time_s,
        bwd_time_s=stage.bwd_time_s + loss.bwd_time_s, activation_bytes=stage.activation_bytes + loss.activation_bytes,
        transient_bytes=stage.transient_bytes + loss.transient_bytes / 2)
