"""The fxshard exception hierarchy.

Every error fxshard raises for bad input or an impossible request is a subclass of
:class:`FxshardError`, defined here and exported from the top-level package
(``fxshard.SimulationError``). Messages name the problem, the numbers involved and a way out.
Those that reject a malformed value also subclass ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "FxshardError",
    "CaptureError",
    "DeviceSpecError",
    "ClusterError",
    "CostModelError",
    "ZooError",
    "PartitionError",
    "PartitionerError",
    "PlanError",
    "PlanFormatError",
    "SimulationError",
    "ExportError",
    "ExecutionError",
    "UsageError",
]


class FxshardError(Exception):
    """Base class of every error fxshard raises for bad input or an impossible request."""


class CaptureError(FxshardError):
    """The model could not be turned into an fx graph with shapes."""


class DeviceSpecError(FxshardError, ValueError):
    """A device, preset or ``devices`` argument is malformed or unknown."""


class ClusterError(FxshardError, ValueError):
    """A cluster description is inconsistent (no devices, bad links, bad JSON)."""


class CostModelError(FxshardError, ValueError):
    """A cost model cannot price a node or the device asked for, an unknown cost model was asked
    for, or its factors or calibration inputs are out of range."""


class ZooError(FxshardError, ValueError):
    """An unknown built-in model name or a bad model factory reference."""


class PartitionError(FxshardError):
    """A graph cannot be split as asked (too little memory, more stages than nodes, a cycle)."""


class PartitionerError(PartitionError):
    """A registered partitioner broke its contract (stages out of range, not one per unit)."""


class PlanError(FxshardError):
    """No plan exists for the request (nothing fits), or the options contradict each other."""


class PlanFormatError(FxshardError, ValueError):
    """Plan JSON that is malformed, of another schema version, or inconsistent."""


class SimulationError(FxshardError):
    """A schedule cannot be simulated (unknown name, bad sizes, an inconsistent order)."""


class ExportError(FxshardError):
    """A plan cannot be exported: it was made for another graph, or the directory is unusable."""


class ExecutionError(FxshardError):
    """A plan cannot run as asked: inputs that do not micro-batch, a world size that does not
    match the plan, a plan made for another model, a peer rank that failed."""


class UsageError(FxshardError, ValueError):
    """A command line that names something nothing is registered under (a partitioner, schedule
    or cost model) or whose options contradict each other; ``fxshard`` exits with status 2."""
