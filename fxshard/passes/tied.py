"""Parameters that stages on different devices read: the tied weights whose gradients ranks sum.

A tied embedding and LM head (GPT-2's ``wte.weight`` is ``lm_head.weight``) is one parameter
read at both ends of the model. Split across devices, each stage holding it keeps a copy, and
after every step the ranks holding it sum their gradients (fxshard/runtime/distributed.py), one
all-reduce of the parameter's bytes before the optimizer steps, on the step's critical path:
51 MB for GPT-2's embedding measured 25-31 ms on this machine's gloo loopback (docs/planning.md).
The planner prices it (:func:`fxshard.comm.tied_allreduce_time`), so a placement that keeps
both ends on one device, as the V-shaped schedules do, is not charged for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fxshard.capture import CapturedGraph
from fxshard.cost_models import NodeWork
from fxshard.plan import TiedParameter

__all__ = ["parameter_readers", "tied_parameters"]


def parameter_readers(captured: CapturedGraph, works: Sequence[NodeWork]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Each trainable parameter more than one node reads: its bytes and the nodes whose stages hold
    it (a module call holding it, or the consumers of a ``get_attr`` of it). Computed once per
    graph; a parameter read by one node is never tied."""
    trainable = {name for name, p in captured.gm.named_parameters() if p.requires_grad}
    readers: dict[str, tuple[int, dict[str, None]]] = {}
    for node, work in zip(captured.gm.graph.nodes, works):
        holders = [u.name for u in node.users] if node.op == "get_attr" else [node.name]
        for name, size in zip(work.params, work.param_sizes):
            if name in trainable:
                readers.setdefault(name, (size, {}))[1].update(dict.fromkeys(holders))
    return {name: (size, tuple(nodes)) for name, (size, nodes) in readers.items() if len(nodes) > 1}


def tied_parameters(readers: Mapping[str, tuple[int, tuple[str, ...]]], stage_of: Mapping[str, int],
                    stage_devices: Sequence[Sequence[int]]) -> tuple[TiedParameter, ...]:
    """The parameters of ``readers`` held by stages on more than one device (each stage on its
    first device), with those stages in order."""
    out = []
    for name, (size, nodes) in sorted(readers.items()):
        stages = sorted({stage_of[n] for n in nodes if n in stage_of})
        if len({stage_devices[s][0] for s in stages}) > 1:
            out.append(TiedParameter(name=name, bytes=size, stages=tuple(stages)))
    return tuple(out)
