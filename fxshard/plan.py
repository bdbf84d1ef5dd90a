"""The Plan: how a model runs on a cluster, as frozen, JSON-serialisable data.

A plan names the strategy (single, ddp, fsdp, pipeline, hybrid), how data-parallel groups
hold the model (``data_parallel``: replicated or sharded), the stages with their nodes, devices
and activation checkpointing, the schedule and micro-batches, the estimate, the alternatives that were ranked
below it, and a fingerprint of the captured graph it was made for. ``to_json`` /
``Plan.from_json`` round-trip exactly; ``str(plan)`` is a readable summary. See SPEC and
docs/planning.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from fxshard.errors import PlanFormatError  # defined there, re-exported here
from fxshard.units import format_bytes, format_time

__all__ = ["SCHEMA_VERSION", "Alternative", "Estimate", "EstimatedNode", "ModelInfo", "Plan", "PlanFormatError",
           "StagePlan", "TiedParameter"]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no data_parallel, no activation_checkpointing (read as none)
STRATEGIES = ("single", "ddp", "fsdp", "pipeline", "hybrid")
DATA_PARALLEL = ("ddp", "fsdp")
CHECKPOINTING = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One pipeline stage (the whole model for single and ddp).

    Times and bytes are per micro-batch; ``flops`` is forward FLOPs per micro-batch.
    ``devices`` holds one device per data-parallel replica of the stage. Per step, on each of
    its devices: ``optimizer_time_s``, the optimizer step over the stage's parameters (its
    shard under FSDP), and ``accumulate_time_s``, what each backward but the step's first adds
    to accumulate the gradients; None in plans written before they were priced (re-simulation
    then prices them by the device's roofline).
    """

    index: int
    devices: tuple[str, ...]
    device_indices: tuple[int, ...]
    nodes: tuple[str, ...]
    flops: float
    param_bytes: int
    peak_memory_bytes: float
    memory_capacity_bytes: float
    fwd_time_s: float
    bwd_time_s: float
    send_bytes: float
    first_module: str = ""
    last_module: str = ""
    activation_checkpointing: str = "none"  # none | selective | full, over the stage's repeated blocks
    optimizer_time_s: float | None = None
    accumulate_time_s: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Estimate:
    """Predicted cost of one training (or inference) step over the whole batch."""

    step_time_s: float
    bubble_fraction: float
    samples_per_s: float
    lower_bound_step_time_s: float
    allreduce_time_s: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Alternative:
    """A candidate the planner considered, with why it ranked where it did."""

    strategy: str
    stages: int
    replicas: int
    microbatches: int
    schedule: str | None
    step_time_s: float
    samples_per_s: float
    peak_memory_bytes: float
    fits: bool
    note: str = ""
    data_parallel: str | None = None
    activation_checkpointing: str = "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EstimatedNode:
    """A node whose times are not what the plan's cost model says, but a stand-in: the profiled
    model gives a node that cannot run on random inputs its analytical time."""

    node: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class TiedParameter:
    """A trainable parameter that stages on more than one device read (a tied embedding and LM
    head): each holds a copy, and after every step the ranks holding it sum its gradients, one
    all-reduce of ``bytes`` before their optimizer steps (fxshard/runtime/distributed.py)."""

    name: str
    bytes: int
    stages: tuple[int, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the plan was made for."""

    name: str
    nodes: int
    param_bytes: int
    fingerprint: str
    method: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How a model runs on a cluster (SPEC: "Plan")."""

    strategy: str
    partitioner: str
    schedule: str | None
    microbatches: int
    replicas: int
    batch_size: int
    training: bool
    optimizer: str
    cluster: Mapping[str, Any]
    model: ModelInfo
    stages: tuple[StagePlan, ...]
    estimate: Estimate
    reason: str = ""
    alternatives: tuple[Alternative, ...] = ()
    estimated_nodes: tuple[EstimatedNode, ...] = ()  # priced by a stand-in, and why (absent in older JSON)
    data_parallel: str | None = None  # "ddp" (replicas) or "fsdp" (shards) for ddp, fsdp and hybrid plans
    reshard_after_forward: bool = True  # fsdp: free each unit's gathered parameters after its forward
    tied: tuple[TiedParameter, ...] = ()  # parameters stages on several devices read (absent in older JSON)
    fxshard_plan: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PlanFormatError(f"strategy={self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.microbatches < 1 or self.replicas < 1:
            raise PlanFormatError(f"microbatches={self.microbatches}, replicas={self.replicas}: both must be >= 1")
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise PlanFormatError(f"stage indices {[s.index for s in self.stages]} must be 0..{len(self.stages) - 1}")
        for t in self.tied:
            if not t.stages or not all(0 <= s < len(self.stages) for s in t.stages):
                raise PlanFormatError(f"tied parameter {t.name!r}: stages {list(t.stages)} must be stage indices "
                                      f"0..{len(self.stages) - 1}; re-plan to write them")
        self._check_levers()

    def _check_levers(self) -> None:
        wants = {"single": (None,), "pipeline": (None,), "ddp": ("ddp",), "fsdp": ("fsdp",), "hybrid": DATA_PARALLEL}
        if self.data_parallel is None and wants[self.strategy][0] is not None:  # replicas unless it says shards
            object.__setattr__(self, "data_parallel", wants[self.strategy][0])
        if self.data_parallel not in wants[self.strategy]:
            raise PlanFormatError(f"data_parallel={self.data_parallel!r} with strategy {self.strategy!r}; it takes "
                                  f"{' or '.join(map(repr, wants[self.strategy]))}")
        for s in self.stages:
            if s.activation_checkpointing not in CHECKPOINTING:
                raise PlanFormatError(f"stage {s.index}: activation_checkpointing={s.activation_checkpointing!r}; "
                                      f"use one of {', '.join(CHECKPOINTING)}")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_devices(self) -> int:
        """Devices the plan uses (stages x replicas / stages per device)."""
        return len({d for s in self.stages for d in s.device_indices})

    @property
    def stages_per_device(self) -> int:
        """Stages that share one device: 2 under interleaved and V-shaped schedules (torch's
        virtual stages, each given its share of the device's memory), else 1."""
        held: dict[int, int] = {}
        for s in self.stages:
            for d in s.device_indices:
                held[d] = held.get(d, 0) + 1
        return max(held.values(), default=1)

    def shape_text(self) -> str:
        """The plan's shape in words, so that stages x replicas / stages per device = devices reads
        off it: "1 device", "8 data-parallel replicas", "4 stages x 4 replicas, 2 stages per
        device (zbv), 8 devices"."""
        if self.strategy == "single":
            return "1 device"
        if self.strategy == "ddp":
            return f"{self.replicas} data-parallel replicas"
        if self.strategy == "fsdp":
            return f"{self.replicas} FSDP shards"
        group = "FSDP shards" if self.data_parallel == "fsdp" else "replicas"
        shape = f"{self.num_stages} stages" + (f" x {self.replicas} {group}" if self.strategy == "hybrid" else "")
        per = self.stages_per_device
        if per > 1:
            shape += f", {per} stages per device ({self.schedule})"
        return f"{shape}, {self.num_devices} device{'s' if self.num_devices != 1 else ''}"

    def stage_of(self) -> dict[str, int]:
        """Node name -> stage index."""
        return {n: s.index for s in self.stages for n in s.nodes}

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cluster"] = json.loads(json.dumps(dict(self.cluster)))
        ordered = {"fxshard_plan": data.pop("fxshard_plan")}
        ordered.update(data)
        return ordered

    def to_json(self, *, indent: int | None = 2) -> str:
        """JSON text; ``Plan.from_json`` gives back an equal plan."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanFormatError(f"a plan is a JSON object, got {type(data).__name__}")
        version = data.get("fxshard_plan")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise PlanFormatError(f"plan schema version {version!r}; this fxshard reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}. "
                                  f"Re-plan with this version ('fxshard plan ... --json FILE')")
        if not isinstance(data.get("cluster"), Mapping):
            raise PlanFormatError("plan 'cluster' must be an object (Cluster.to_dict()), "
                                  f"got {data.get('cluster')!r:.60}")
        try:
            fields = dict(data)
            if version == 1:  # replicas, never shards, no checkpointing: the defaults
                fields["fxshard_plan"] = SCHEMA_VERSION
            fields["model"] = ModelInfo(**fields["model"])
            fields["estimate"] = Estimate(**fields["estimate"])
            fields["stages"] = tuple(_stage(s) for s in fields["stages"])
            fields["alternatives"] = tuple(Alternative(**a) for a in fields.get("alternatives", ()))
            fields["estimated_nodes"] = tuple(EstimatedNode(**n) for n in fields.get("estimated_nodes", ()))
            fields["tied"] = tuple(TiedParameter(**{**t, "stages": tuple(t["stages"])}) for t in fields.get("tied", ()))
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as e:
            raise PlanFormatError(f"plan JSON is missing or has malformed fields: {type(e).__name__}: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse plan JSON.

        Raises:
            PlanFormatError: not JSON, another schema version, or missing fields.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(data)

    # -- text ----------------------------------------------------------------------------

    def levers_text(self) -> str:
        """The memory levers in words, "" where none is pulled: activation checkpointing ("full
        activation checkpointing", or per stage where stages differ: "activation checkpointing
        full on stage 0, none on stages 1-3"), gradient accumulation of ddp and fsdp plans ("4
        micro-batches accumulated") and, for FSDP groups, whether units reshard after forward."""
        parts = []
        policies = [s.activation_checkpointing for s in self.stages]
        if len(set(policies)) == 1 and policies[0] != "none":
            parts.append(f"{policies[0]} activation checkpointing")
        elif len(set(policies)) > 1:
            on = {p: [s.index for s in self.stages if s.activation_checkpointing == p] for p in dict.fromkeys(policies)}
            parts.append("activation checkpointing " + ", ".join(
                f"{p} on stage{'s' if len(i) > 1 else ''} {_spans(i)}" for p, i in on.items()))
        if self.strategy in ("ddp", "fsdp") and self.microbatches > 1:
            parts.append(f"{self.microbatches} micro-batches accumulated")
        if self.data_parallel == "fsdp":
            parts.append("reshard after forward" if self.reshard_after_forward
                         else "parameters kept gathered from forward to backward")
        return ", ".join(parts)

    def __str__(self) -> str:
        e = self.estimate
        levers = self.levers_text()
        accumulated = self.strategy in ("ddp", "fsdp") and self.microbatches > 1  # said by the levers
        lines = [f"fxshard plan: {self.strategy} ({self.shape_text()}), "
                 + (f"schedule {self.schedule}, " if self.schedule else "")
                 + ("" if accumulated else f"{self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''}, ")
                 + (f"{levers}, " if levers else "") + f"partitioner {self.partitioner}",
                 f"  model {self.model.name}: {self.model.nodes} nodes, "
                 f"{format_bytes(self.model.param_bytes)} of parameters, fingerprint {self.model.fingerprint}",
                 f"  batch {self.batch_size}, {'training with ' + self.optimizer if self.training else 'inference'}"]
        if self.stages_per_device > 1:
            per = self.stages_per_device
            lines.append(f"  each device holds {per} stages ({self.schedule} places {per} per rank), each stage "
                         f"given 1/{per} of its memory")
        for s in self.stages:
            span = f"{s.first_module or s.nodes[0]} .. {s.last_module or s.nodes[-1]}" if s.nodes else "-"
            lines.append(f"  stage {s.index} on {','.join(s.devices)}: {len(s.nodes)} nodes ({span}), "
                         f"params {format_bytes(s.param_bytes)}, peak {format_bytes(s.peak_memory_bytes)} of "
                         f"{format_bytes(s.memory_capacity_bytes)}, fwd {format_time(s.fwd_time_s)}, "
                         f"bwd {format_time(s.bwd_time_s)}, sends {format_bytes(s.send_bytes)}"
                         + (f", {s.activation_checkpointing} activation checkpointing"
                            if s.activation_checkpointing != "none" else ""))
        lines.append(f"  estimate: step {format_time(e.step_time_s)}, bubble {e.bubble_fraction:.1%}, "
                     f"{e.samples_per_s:.1f} samples/s (lower bound {format_time(e.lower_bound_step_time_s)})")
        if self.estimated_nodes:
            shown = "; ".join(f"{n.node} ({n.reason})" for n in self.estimated_nodes[:3])
            more = len(self.estimated_nodes) - 3
            lines.append(f"  estimated analytically, not measured: {len(self.estimated_nodes)} node(s): {shown}"
                         + (f"; and {more} more (plan.estimated_nodes lists them)" if more > 0 else ""))
        if self.reason:
            lines.append(f"  why: {self.reason}")
        return "\n".join(lines)


def _spans(indices: list[int]) -> str:
    """Ascending indices as runs: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _stage(data: Mapping[str, Any]) -> StagePlan:
    fields = dict(data)
    for key in ("devices", "device_indices", "nodes"):
        fields[key] = tuple(fields[key])
    return StagePlan(**fields)

