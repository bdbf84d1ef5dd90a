"""fxshard: an automatic model-parallel compiler for PyTorch.

Example::

    import fxshard
    from fxshard.zoo import build

    z = build("llama-70b")                       # on the meta device
    graph = fxshard.capture(z.model, z.example_inputs)
    costs = fxshard.estimate(graph, fxshard.Cluster.parse("8xH100-80GB").devices[0].spec)
"""

from fxshard.api import CompiledModel, compile
from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster, DeviceSpec, Link
from fxshard.cost_models import estimate, register_cost_model, unregister_cost_model
from fxshard.errors import (
    CaptureError,
    ClusterError,
    CostModelError,
    DeviceSpecError,
    ExecutionError,
    ExportError,
    FxshardError,
    PartitionerError,
    PartitionError,
    PlanError,
    PlanFormatError,
    SimulationError,
    UsageError,
    ZooError,
)
from fxshard.passes.partition import (
    Partition,
    partition_graph,
    partitioners,
    register_partitioner,
    unregister_partitioner,
)
from fxshard.plan import Plan
from fxshard.planner import plan

__all__ = [
    "CaptureError",
    "CompiledModel",
    "CapturedGraph",
    "Cluster",
    "ClusterError",
    "CostModelError",
    "DeviceSpec",
    "DeviceSpecError",
    "ExecutionError",
    "ExportError",
    "FxshardError",
    "Link",
    "Partition",
    "PartitionError",
    "PartitionerError",
    "Plan",
    "PlanError",
    "PlanFormatError",
    "SimulationError",
    "UsageError",
    "ZooError",
    "capture",
    "compile",
    "estimate",
    "partition_graph",
    "partitioners",
    "plan",
    "register_cost_model",
    "register_partitioner",
    "unregister_cost_model",
    "unregister_partitioner",
]
__version__ = "0.1.0"
