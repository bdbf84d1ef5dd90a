"""What a refusal is about and what it offers, as data: the request, a probe's answer, a way out.

The planner fills :class:`Request` and answers probes with :class:`Probe`; the ways out
(fxshard/refusal/ways_out.py) travel on the error as :class:`WayOut` s. See docs/planning.md
("When nothing fits").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from fxshard.cluster import Cluster, format_bytes
from fxshard.plan_options import PlanOptions
from fxshard.refusal.floors import Needs

__all__ = ["Accepted", "NeedsFn", "Probe", "ProbeFn", "Request", "WayOut"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Accepted:
    """The plan a probe found."""

    strategy: str
    stages: int
    depth: int  # devices per pipeline (the ``stages=`` option): stages / stages per device
    replicas: int
    schedule: str | None
    microbatches: int
    peak_bytes: float
    capacity_bytes: float
    data_parallel: str | None = None
    activation_checkpointing: str = "none"

    def describe(self) -> str:
        if self.strategy in ("single", "ddp", "fsdp"):
            kind = "shards" if self.strategy == "fsdp" else "replicas"
            shape = "1 device" if self.replicas == 1 else f"{self.replicas} {kind}"
            if self.microbatches > 1:
                shape += f", {self.microbatches} accumulated micro-batches"
        else:
            shape = (f"{self.stages} stages" + (f" x {self.replicas} replicas" if self.replicas > 1 else "")
                     + (f", {self.stages // self.depth} stages per device" if self.stages != self.depth else "")
                     + f", {self.schedule}, {self.microbatches} micro-batch{'es' if self.microbatches > 1 else ''}")
            if self.replicas > 1 and self.data_parallel == "fsdp":
                shape += ", stages sharded (fsdp)"
        if self.activation_checkpointing != "none":
            shape += f", {self.activation_checkpointing} activation checkpointing"
        return (f"{self.strategy}, {shape}, peak {format_bytes(self.peak_bytes)} of "
                f"{format_bytes(self.capacity_bytes)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe:
    """A probe's answer: the plan found, or by how much the closest pipeline overflowed (its
    worst stage's peak over capacity; inf when no pipeline was simulated)."""

    accepted: Accepted | None
    overflow: float = math.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class WayOut:
    """One change to the request that the planner accepted when asked.

    Follow it by planning the same model on ``cluster`` (when given), with example inputs of
    ``batch`` samples (when given) and the options updated with ``kwargs``.
    """

    lever: str  # devices, batch, optimizer, inference, levers, strategy, stages, microbatches, schedule,
    # activation_checkpointing, data_parallel, memory
    text: str
    plan: Accepted
    cluster: Cluster | None = None
    devices: str | None = None  # ``cluster`` as a cluster string
    batch: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """The plan options this way out changes."""
        return dict(self.options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """What was asked: the model's name, the devices, the batch and the plan options."""

    name: str
    cluster: Cluster
    batch: int
    opts: PlanOptions
    fixed_batch: int | None = None


ProbeFn = Callable[[Cluster, int, Any, "int | None"], Probe]  # (devices, batch, options, depth hint)
NeedsFn = Callable[[str, bool], Needs]  # (optimizer, training) -> needs at the request's batch
