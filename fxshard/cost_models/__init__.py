"""Cost models: per-node work, time on a device, and training memory.

``estimate(captured, device, cost_model="analytical")`` prices a captured graph; the
registry holds ``analytical`` (roofline) and ``profiled`` (measured). See
docs/cost_models.md.
"""

from fxshard.cost_models import analytical as _analytical  # noqa: F401  (registers "analytical")
from fxshard.cost_models import profiled as _profiled  # noqa: F401  (registers "profiled")
from fxshard.cost_models.analysis import NodeWork, analyze, scale_batch, tensor_bytes
from fxshard.cost_models.analytical import AnalyticalCostModel, RooflineFactors, factors_for
from fxshard.cost_models.base import (
    CostModel,
    GraphCosts,
    NodeCost,
    NodeTime,
    cost_models,
    estimate,
    get_cost_model,
    register_cost_model,
    unregister_cost_model,
)
from fxshard.cost_models.factors_file import FittedFactors, load_factors
from fxshard.cost_models.memory import TrainingMemory, bytes_per_parameter, training_memory
from fxshard.cost_models.profiled import ProfiledCostModel

__all__ = [
    "AnalyticalCostModel",
    "CostModel",
    "FittedFactors",
    "GraphCosts",
    "NodeCost",
    "NodeTime",
    "NodeWork",
    "ProfiledCostModel",
    "RooflineFactors",
    "TrainingMemory",
    "analyze",
    "bytes_per_parameter",
    "cost_models",
    "estimate",
    "factors_for",
    "get_cost_model",
    "load_factors",
    "register_cost_model",
    "scale_batch",
    "tensor_bytes",
    "training_memory",
    "unregister_cost_model",
]
