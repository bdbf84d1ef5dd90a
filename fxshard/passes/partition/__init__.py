"""Partitioning a cost graph into pipeline stages: one interface, a registry of algorithms.

``partition_graph(graph, k, partitioner="metis")`` compiles a networkx cost graph into a
:class:`Problem`, runs a registered partitioner on it and returns a :class:`Partition`.
A partitioner is a pure function ``(problem, seed) -> stage per unit`` (a numpy array over
``problem.members``, or a mapping from graph node to stage); register your own with
:func:`register_partitioner`. See docs/partitioning.md.

Example::

    import networkx as nx
    import fxshard

    g = nx.DiGraph()
    g.add_nodes_from([(i, {"compute": 1.0, "memory": 10}) for i in range(8)])
    g.add_edges_from(((i, i + 1, {"comm": 0.1}) for i in range(7)))
    part = fxshard.partition_graph(g, 2)
    part.stage_of[0], part.bottleneck     # (0, 4.1)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np

from fxshard.errors import PartitionerError, PartitionError
from fxshard.passes.partition.baselines import layers_partition, params_partition, uniform_partition
from fxshard.passes.partition.dp import dp_split
from fxshard.passes.partition.evaluate import Partition, evaluate, make_partition
from fxshard.passes.partition.hierarchical import hierarchical_partition
from fxshard.passes.partition.metis import metis_partition
from fxshard.passes.partition.milp import milp_partition
from fxshard.passes.partition.problem import Objective, Problem, build_problem

__all__ = [
    "Partition",
    "Problem",
    "build_problem",
    "evaluate",
    "get_partitioner",
    "partition_graph",
    "partition_problem",
    "partitioners",
    "register_partitioner",
    "unregister_partitioner",
]

PartitionerFn = Callable[[Problem, int], "np.ndarray | Mapping[Any, int]"]

_REGISTRY: dict[str, PartitionerFn] = {
    "metis": metis_partition,
    "dp": lambda problem, seed=0: dp_split(problem),
    "hierarchical": hierarchical_partition,
    "uniform": uniform_partition,
    "params": params_partition,
    "layers": layers_partition,
    "milp": milp_partition,
}


def register_partitioner(name: str, fn: PartitionerFn | None = None) -> Any:
    """Register a partitioner under ``name``; usable as ``@register_partitioner("mine")``.

    The function receives ``(problem, seed)`` and returns a stage per unit (numpy array) or a
    mapping from graph node to stage.
    """
    if not isinstance(name, str) or not name:
        raise PartitionError(f"a partitioner name must be a non-empty string, got {name!r}")

    def deco(f: PartitionerFn) -> PartitionerFn:
        if not callable(f):
            raise PartitionError(f"partitioner {name!r} must be callable, got {type(f).__name__}")
        _REGISTRY[name] = f
        return f

    return deco(fn) if fn is not None else deco


def unregister_partitioner(name: str) -> None:
    """Remove a partitioner registered with :func:`register_partitioner`."""
    if name not in _REGISTRY:
        raise PartitionError(f"no partitioner {name!r} is registered; registered: {', '.join(partitioners())}")
    del _REGISTRY[name]


def partitioners() -> list[str]:
    """The registered partitioner names."""
    return sorted(_REGISTRY)


def get_partitioner(name: str) -> PartitionerFn:
    """The partitioner registered as ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PartitionError(f"unknown partitioner {name!r}; registered: {', '.join(partitioners())}. "
                             f"Add one with fxshard.register_partitioner") from None


def partition_problem(problem: Problem, partitioner: str = "metis", *, seed: int = 0) -> Partition:
    """Run a registered partitioner on a compiled problem."""
    fn = get_partitioner(partitioner)
    if seed is None:
        seed = 0  # reproducible plans: None means the default seed, not a random one
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise PartitionError(f"seed={seed!r}; use an integer (the same seed gives the same partition)")
    start = time.perf_counter()
    result = fn(problem, int(seed))
    seconds = time.perf_counter() - start
    stage = _stages_from(problem, partitioner, result)
    if stage.shape != (problem.num_units,):
        raise PartitionerError(f"partitioner {partitioner!r} returned {stage.shape} stages for "
                             f"{problem.num_units} units")
    if stage.size and (stage.min() < 0 or stage.max() >= problem.k):
        raise PartitionerError(f"partitioner {partitioner!r} used stage {int(stage.min())}..{int(stage.max())}; "
                             f"stages are 0..{problem.k - 1}, every unit must get one")
    return make_partition(problem, stage, partitioner=partitioner, seconds=seconds)


def _stages_from(problem: Problem, partitioner: str, result: Any) -> np.ndarray:
    """A partitioner's answer as integer stages per unit, or a PartitionError saying what is wrong."""
    if isinstance(result, Mapping):
        if any(not _is_int(v) for v in result.values()):
            bad = next(v for v in result.values() if not _is_int(v))
            raise PartitionerError(f"partitioner {partitioner!r} gave a node the stage {bad!r}; stages are integers")
        try:
            return problem.stage_array({node: int(v) for node, v in result.items()})
        except PartitionError as e:
            raise PartitionerError(f"partitioner {partitioner!r}: {e}") from e
    try:
        raw = np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError):
        raise PartitionerError(f"partitioner {partitioner!r} returned {type(result).__name__}; return one integer "
                             f"stage per unit (a numpy array) or a mapping node -> stage") from None
    if raw.ndim != 1 or np.any(raw != np.round(raw)):
        raise PartitionerError(f"partitioner {partitioner!r} returned non-integer stages ({raw.ravel()[:6]}...); "
                             f"return one integer stage per unit")
    return raw.astype(np.int64)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def partition_graph(graph: nx.DiGraph, k: int, *, partitioner: str = "metis",
                    memory_limit: float | Sequence[float] | None = None, seed: int = 0,
                    speeds: Sequence[float] | None = None, link: Any = None,
                    objective: Objective = "pipeline") -> Partition:
    """Split a cost graph into k pipeline stages.

    Args:
        graph: a networkx DAG; nodes carry ``compute`` and ``memory`` (and optionally
            ``colocate``, ``params``, ``layer``, ``pin``), edges ``comm``. Missing = 0.
        k: the number of stages.
        partitioner: a registered name (``partitioners()``).
        memory_limit: bytes per stage: one number or one per stage.
        seed: randomness for partitioners that use it (METIS); same seed, same result.
        speeds: relative speed of each stage's device (compute is divided by it).
        link: k x k factors on ``comm`` between stages (slow links > 1).
        objective: "pipeline" (values forwarded stage to stage) or "direct".

    Returns:
        A :class:`Partition`: ``stage_of``, per-stage costs, ``bottleneck``,
        ``lower_bound``, ``cut``, ``is_acyclic``.

    Raises:
        PartitionError: bad graph or arguments, or no split fits the memory limits.
    """
    problem = build_problem(graph, k, memory_limit=memory_limit, speeds=speeds, link=link, objective=objective)
    return partition_problem(problem, partitioner, seed=seed)
