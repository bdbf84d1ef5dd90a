"""The cost-model interface, its registry, and the per-node and per-graph cost records.

A cost model turns the device-independent work of each node (:mod:`analysis`) into time on
one device. ``estimate(captured, device, cost_model=...)`` is the one entry point; new cost
models register under a name with :func:`register_cost_model`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fxshard.capture import CapturedGraph
from fxshard.cost_models.analysis import NodeWork, analyze
from fxshard.errors import CostModelError

if TYPE_CHECKING:
    from fxshard.cluster import DeviceSpec

__all__ = [
    "CostModel",
    "GraphCosts",
    "NodeCost",
    "NodeTime",
    "cost_models",
    "estimate",
    "get_cost_model",
    "register_cost_model",
    "unregister_cost_model",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeTime:
    """Forward and backward seconds of one node on one device.

    ``estimated`` is empty when the cost model priced the node its own way; otherwise it says
    why the times are a stand-in (the profiled model's analytical fallback for a node that
    cannot run on random inputs), so plans can report it.
    """

    fwd_s: float
    bwd_s: float
    estimated: str = ""


class CostModel(Protocol):
    """Prices every node of a captured graph on one device."""

    name: str

    def node_times(self, captured: CapturedGraph, works: Sequence[NodeWork],
                   device: DeviceSpec) -> list[NodeTime]:
        """One NodeTime per entry of ``works`` (graph order)."""
        ...

    # Optional: ``step_rates(device) -> fxshard.cost_models.optimizer_step.StepRates``, what the
    # step's passes outside the graph (gradient accumulation, the optimizer step) cost on
    # ``device``; without it they are priced by the device's roofline.
    # Optional: ``prepare(captured, device, fractions) -> None``, called by the planner before it
    # prices anything with every micro-batch (fraction of the captured batch) its search may
    # price on ``device``, so a measuring model can measure them together (docs/cost_models.md).


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeCost:
    """A node's work with its time on a device (see :class:`NodeWork` for the fields)."""

    work: NodeWork
    fwd_time_s: float
    bwd_time_s: float
    estimated: str = ""  # why the time is a stand-in (see NodeTime); empty: priced as the cost model says

    @property
    def name(self) -> str:
        return self.work.name

    def to_row(self) -> dict:
        """A flat JSON-able row (the ``fxshard inspect --json`` format)."""
        row = dataclasses.asdict(self.work)
        for key in ("params", "param_sizes", "buffers", "buffer_sizes", "saved_values"):
            row[key] = list(row[key])
        row["flops"] = self.work.fwd_flops
        row["fwd_time_s"] = self.fwd_time_s
        row["bwd_time_s"] = self.bwd_time_s
        row["time_s"] = self.fwd_time_s
        row["estimated"] = self.estimated
        return row


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraphCosts:
    """Costs of every node of one captured graph on one device.

    Totals count a parameter shared by several nodes once, and an activation saved by
    several consumers once.
    """

    model_name: str
    device: str
    cost_model: str
    nodes: tuple[NodeCost, ...]
    # The step's passes outside the graph on this device (gradient accumulation, the optimizer
    # step): fxshard.cost_models.optimizer_step.StepRates, from the cost model's ``step_rates``
    # when it has one; None: the device's roofline.
    rates: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {c.name: c for c in self.nodes})

    def __getitem__(self, name: str) -> NodeCost:
        return self._by_name[name]  # type: ignore[attr-defined]

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def fwd_flops(self) -> int:
        return sum(c.work.fwd_flops for c in self.nodes)

    @property
    def bwd_flops(self) -> int:
        return sum(c.work.bwd_flops for c in self.nodes)

    @property
    def fwd_time_s(self) -> float:
        return sum(c.fwd_time_s for c in self.nodes)

    @property
    def bwd_time_s(self) -> float:
        return sum(c.bwd_time_s for c in self.nodes)

    def state_bytes(self, names: Sequence[str] | None = None) -> tuple[int, int]:
        """(parameter bytes, buffer bytes) held by the given nodes (all by default).

        A tensor held by several nodes (a tied embedding and LM head) counts once.
        """
        wanted = set(names) if names is not None else None
        params: dict[str, int] = {}
        buffers: dict[str, int] = {}
        for c in self.nodes:
            if wanted is None or c.name in wanted:
                params.update(zip(c.work.params, c.work.param_sizes))
                buffers.update(zip(c.work.buffers, c.work.buffer_sizes))
        return sum(params.values()), sum(buffers.values())

    @property
    def param_bytes(self) -> int:
        """Bytes of trainable parameters, each counted once."""
        return self.state_bytes()[0]

    @property
    def buffer_bytes(self) -> int:
        return self.state_bytes()[1]

    def saved_activation_bytes(self, names: Sequence[str] | None = None) -> int:
        """Bytes saved for backward by the given nodes (all by default), each tensor once."""
        wanted = set(names) if names is not None else None
        total = 0
        saved_outputs: set[str] = set()
        for c in self.nodes:
            if wanted is not None and c.name not in wanted:
                continue
            total += c.work.saved_bytes
            saved_outputs.update(self.storage_owner(n) for n in c.work.saved_values)
        return total + sum(self[n].work.output_bytes for n in saved_outputs)

    def storage_owner(self, name: str) -> str:
        """The node that allocated the memory ``name``'s output lives in (views resolved)."""
        seen = set()
        while (w := self[name].work).is_view and w.view_of and name not in seen:
            seen.add(name)
            name = w.view_of
        return name

    @property
    def estimated(self) -> dict[str, str]:
        """Node name -> why its time is a stand-in, for the nodes the cost model could not price
        its own way (graph order; empty for the analytical model)."""
        return {c.name: c.estimated for c in self.nodes if c.estimated}

    def to_rows(self) -> list[dict]:
        return [c.to_row() for c in self.nodes]


_REGISTRY: dict[str, Callable[[], CostModel]] = {}


def register_cost_model(name: str) -> Callable[[Callable[[], CostModel]], Callable[[], CostModel]]:
    """Register a cost-model factory under ``name`` (a decorator)."""

    def deco(factory: Callable[[], CostModel]) -> Callable[[], CostModel]:
        _REGISTRY[name] = factory
        return factory

    return deco


def unregister_cost_model(name: str) -> None:
    """Remove a cost model registered with :func:`register_cost_model`.

    Raises:
        CostModelError: no cost model is registered as ``name``.
    """
    if name not in _REGISTRY:
        raise CostModelError(f"no cost model {name!r} is registered; registered: {', '.join(cost_models())}")
    del _REGISTRY[name]


def cost_models() -> list[str]:
    """Names of the registered cost models."""
    return sorted(_REGISTRY)


def get_cost_model(name: str | CostModel) -> CostModel:
    """The cost model registered as ``name`` (a CostModel instance is returned as is)."""
    if not isinstance(name, str):
        return name
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise CostModelError(f"unknown cost model {name!r}; registered: {', '.join(cost_models())}. "
                             f"Register your own with fxshard.register_cost_model") from None


def estimate(captured: CapturedGraph, device: DeviceSpec, *, cost_model: str | CostModel = "analytical",
             works: Sequence[NodeWork] | None = None) -> GraphCosts:
    """Price every node of ``captured`` on ``device``.

    Args:
        captured: the graph from :func:`fxshard.capture`.
        device: the device to price on.
        cost_model: a registered name (``"analytical"``, ``"profiled"``) or a CostModel.
        works: the graph's :func:`analyze` result, when already computed.

    Returns:
        A :class:`GraphCosts` in graph order.

    Example::

        costs = estimate(capture(model, inputs), get_preset("H100-80GB"))
        print(costs.fwd_flops, costs.param_bytes)
    """
    model = get_cost_model(cost_model)
    works = list(works) if works is not None else analyze(captured)
    times = model.node_times(captured, works, device)
    if len(times) != len(works):
        raise CostModelError(f"cost model {model.name!r} returned {len(times)} times for "
                             f"{len(works)} nodes")
    for w, t in zip(works, times):
        if not (0 <= t.fwd_s < math.inf and 0 <= t.bwd_s < math.inf):
            raise CostModelError(f"cost model {model.name!r} gave node {w.name!r} a negative, infinite or NaN "
                                 f"time (forward {t.fwd_s} s, backward {t.bwd_s} s); times must be finite and >= 0")
    nodes = tuple(NodeCost(work=w, fwd_time_s=t.fwd_s, bwd_time_s=t.bwd_s, estimated=str(getattr(t, "estimated", "")))
                  for w, t in zip(works, times))
    step_rates = getattr(model, "step_rates", None)
    return GraphCosts(model_name=captured.model_name, device=device.name, cost_model=model.name,
                      nodes=nodes, rates=step_rates(device) if callable(step_rates) else None)
