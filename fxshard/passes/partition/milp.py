"""An exact reference partitioner: a mixed-integer program over every acyclic stage assignment.

Where ``dp`` is exact over the contiguous splits of one topological order, this MILP ranges
over all assignments of units to stages that keep every edge forward, honour pins and
memory limits and leave no stage empty (as ``build_problem`` and ``dp`` require), under
both objectives exactly as :func:`~fxshard.passes.partition.evaluate.evaluate` scores them.
It is solved by HiGHS through :func:`scipy.optimize.milp`, within a time limit; when the
limit stops it, the result carries the best assignment found, the proven lower bound and the
gap between them. It is meant for research and for measuring other partitioners' gaps on
graphs of up to a few hundred units (see docs/partitioning.md).

The formulation is cumulative: ``X[u, s] = 1`` iff ``stage(u) <= s`` (s = 0..k-2), monotone
in s, and ``X[v, s] <= X[u, s]`` for each unit edge u -> v. Unit u sits on stage s iff
``X[u, s] - X[u, s-1] = 1``, and a value produced by p crosses boundary s|s+1 towards
consumer c iff ``X[p, s] - X[c, s] = 1``. Communication terms are continuous auxiliaries
bounded below by those differences (the maximum over consumers); they are minimised, so at
an optimum the bottleneck stage pays exactly what ``evaluate`` charges. The objective is
``T >= every stage's cost``, with ``T`` between :func:`lower_bound` and the ``dp`` answer.
Costs are expressed in units of that lower bound and memory in fractions of each limit, so the
solver's absolute tolerances mean the same whether the graph counts seconds or milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import numpy as np

from fxshard.errors import PartitionError
from fxshard.passes.partition.dp import dp_split
from fxshard.passes.partition.evaluate import evaluate, is_acyclic, lower_bound
from fxshard.passes.partition.problem import PIN_FIRST, PIN_LAST, Problem

__all__ = ["MAX_UNITS", "MilpResult", "milp_partition", "milp_solve"]

MAX_UNITS = 400
"""The largest problem (in units) the ``milp`` partitioner accepts; see :func:`milp_solve`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MilpResult:
    """What the solver proved about one problem.

    Attributes:
        stage: the best assignment found, one stage per unit (``None`` if none was found).
        objective: ``evaluate``'s bottleneck of ``stage`` (inf if none).
        bound: a proven lower bound on every valid assignment's bottleneck.
        gap: ``(objective - bound) / objective``; at most ``mip_rel_gap`` when "optimal".
        status: "optimal", "time_limit" (stopped early; ``gap`` says how far it may be off),
            or "infeasible" (no valid assignment exists).
        seconds: wall time of the solve, model building included.
        variables, constraints: the model's size (0 when ``dp`` already met the lower bound).
        model_value: the MILP's own objective T for ``stage`` (nan when ``stage`` is the
            ``dp`` answer); equal to ``objective`` up to the solver's tolerances.
    """

    stage: np.ndarray | None
    objective: float
    bound: float
    gap: float
    status: Literal["optimal", "time_limit", "infeasible"]
    seconds: float
    variables: int
    constraints: int
    model_value: float = math.nan

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


class _Model:
    """A sparse MILP under construction: columns with bounds, rows ``lo <= a.x <= hi``."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add_vars(self, count: int, lb: float, ub: float, integer: bool) -> int:
        start = len(self.lb)
        self.lb += [lb] * count
        self.ub += [ub] * count
        self.integer += [int(integer)] * count
        return start

    def add_row(self, terms: dict[int, float], lo: float, hi: float) -> None:
        row = len(self.lo)
        for col, val in terms.items():
            if val != 0.0:
                self.rows.append(row)
                self.cols.append(col)
                self.vals.append(val)
        self.lo.append(lo)
        self.hi.append(hi)


class _Cumulative:
    """The X[u, s] columns and linear expressions over them (terms dict + constant)."""

    def __init__(self, model: _Model, problem: Problem) -> None:
        self.k = problem.k
        self.start = model.add_vars(problem.num_units * (self.k - 1), 0.0, 1.0, True)
        for u in np.flatnonzero(problem.pin == PIN_FIRST):
            for s in range(self.k - 1):
                model.lb[self.col(u, s)] = 1.0
        for u in np.flatnonzero(problem.pin == PIN_LAST):
            for s in range(self.k - 1):
                model.ub[self.col(u, s)] = 0.0

    def col(self, u: int, s: int) -> int:
        return self.start + int(u) * (self.k - 1) + s

    def add(self, terms: dict[int, float], u: int, s: int, coef: float) -> float:
        """Add coef * X[u, s] to terms; return the constant part (X[u, -1] = 0, X[u, k-1] = 1)."""
        if s < 0:
            return 0.0
        if s >= self.k - 1:
            return coef
        c = self.col(u, s)
        terms[c] = terms.get(c, 0.0) + coef
        return 0.0

    def on(self, terms: dict[int, float], u: int, s: int, coef: float) -> float:
        """Add coef * [stage(u) == s] = coef * (X[u, s] - X[u, s-1]); return the constant."""
        return self.add(terms, u, s, coef) + self.add(terms, u, s - 1, -coef)


def _consumers(problem: Problem, v: int) -> np.ndarray:
    return problem.val_dst[problem.val_ptr[v]:problem.val_ptr[v + 1]]


def _structure(model: _Model, x: _Cumulative, problem: Problem) -> None:
    """Monotone X, forward edges, non-empty stages, memory limits."""
    n, k = problem.num_units, problem.k
    for u in range(n):
        for s in range(k - 2):
            model.add_row({x.col(u, s): 1.0, x.col(u, s + 1): -1.0}, -math.inf, 0.0)
        for v in problem.successors(u):
            for s in range(k - 1):
                model.add_row({x.col(v, s): 1.0, x.col(u, s): -1.0}, -math.inf, 0.0)
    for s in range(k):
        count: dict[int, float] = {}
        const = sum(x.on(count, u, s, 1.0) for u in range(n))
        model.add_row(count, 1.0 - const, math.inf)
        if math.isfinite(problem.mem_limit[s]):
            # In fractions of the limit, so that HiGHS's absolute tolerances mean the same for bytes.
            limit = float(problem.mem_limit[s])
            mem: dict[int, float] = {}
            const = sum(x.on(mem, u, s, float(problem.memory[u]) / limit) for u in range(n) if problem.memory[u])
            model.add_row(mem, -math.inf, (1 + 1e-12) - const)


def _pipeline_comm(model: _Model, x: _Cumulative, problem: Problem, loads: list[dict[int, float]],
                   unit: float) -> None:
    """y[v, s] >= X[p, s] - X[c, s] for each consumer c: the value crosses boundary s|s+1."""
    k = problem.k
    for v in np.flatnonzero(problem.val_comm > 0):
        p, comm = problem.val_src[v], float(problem.val_comm[v])
        y = model.add_vars(k - 1, 0.0, 1.0, False)
        for s in range(k - 1):
            for c in _consumers(problem, v):
                model.add_row({y + s: 1.0, x.col(p, s): -1.0, x.col(c, s): 1.0}, 0.0, math.inf)
            cost = comm * float(problem.link[s, s + 1]) / unit
            loads[s][y + s] = cost  # send
            loads[s + 1][y + s] = cost  # receive


def _direct_comm(model: _Model, x: _Cumulative, problem: Problem, loads: list[dict[int, float]],
                 unit: float) -> None:
    """Receives and sends of the ``direct`` objective; per-pair link factors need product terms."""
    k = problem.k
    forward = problem.link[np.triu_indices(k, 1)]
    uniform = forward.size == 0 or bool(np.all(forward == forward[0]))
    for v in np.flatnonzero(problem.val_comm > 0):
        p, comm, consumers = problem.val_src[v], float(problem.val_comm[v]), _consumers(problem, v)
        if uniform:
            cost = comm * float(forward[0]) / unit if forward.size else 0.0
            recv = model.add_vars(k, 0.0, 1.0, False)
            send = model.add_vars(k, 0.0, 1.0, False)
            for s in range(k):
                for c in consumers:
                    # received on s: a consumer on s, the producer elsewhere (earlier)
                    terms: dict[int, float] = {recv + s: 1.0}
                    const = x.on(terms, c, s, -1.0) + x.on(terms, p, s, 1.0)
                    model.add_row(terms, -const, math.inf)
                    # sent from s: the producer on s, a consumer elsewhere (later)
                    terms = {send + s: 1.0}
                    const = x.on(terms, p, s, -1.0) + x.on(terms, c, s, 1.0)
                    model.add_row(terms, -const, math.inf)
                loads[s][recv + s] = cost
                loads[s][send + s] = cost
            continue
        # w[s, d] >= [p on s] + [c on d] - 1 for s < d; stage d receives link[s, d] * comm,
        # stage s sends the largest link[s, d] * comm over its consuming stages.
        pairs = [(s, d) for s in range(k) for d in range(s + 1, k)]
        w = model.add_vars(len(pairs), 0.0, 1.0, False)
        send = model.add_vars(k, 0.0, math.inf, False)
        for i, (s, d) in enumerate(pairs):
            cost = comm * float(problem.link[s, d]) / unit
            for c in consumers:
                terms = {w + i: 1.0}
                const = x.on(terms, p, s, -1.0) + x.on(terms, c, d, -1.0)
                model.add_row(terms, -1.0 - const, math.inf)
            loads[d][w + i] = loads[d].get(w + i, 0.0) + cost
            model.add_row({send + s: 1.0, w + i: -cost}, 0.0, math.inf)
        for s in range(k):
            loads[s][send + s] = 1.0


def _time_unit(problem: Problem) -> float:
    """The time every cost is divided by, so T is about 1 whatever the graph's units (seconds, ms)."""
    bound = lower_bound(problem)
    if bound > 0:
        return bound
    largest = float(max(problem.compute.max(initial=0.0), problem.val_comm.max(initial=0.0)))
    return largest if largest > 0 else 1.0


def _build(problem: Problem, upper: float, unit: float) -> tuple[_Model, _Cumulative, int]:
    """The whole model, costs in ``unit``; returns it, the X columns and the column of T."""
    model = _Model()
    x = _Cumulative(model, problem)
    _structure(model, x, problem)
    k = problem.k
    loads: list[dict[int, float]] = [{} for _ in range(k)]
    consts = [0.0] * k
    for s in range(k):
        speed = float(problem.speeds[s])
        for u in range(problem.num_units):
            if problem.compute[u]:
                consts[s] += x.on(loads[s], u, s, float(problem.compute[u]) / speed / unit)
    if problem.val_src.size:
        (_pipeline_comm if problem.objective == "pipeline" else _direct_comm)(model, x, problem, loads, unit)
    t = model.add_vars(1, lower_bound(problem) / unit, upper / unit, False)
    for s in range(k):
        loads[s][t] = -1.0
        model.add_row(loads[s], -math.inf, -consts[s])
    return model, x, t


def _bottleneck_if_valid(problem: Problem, stage: np.ndarray) -> float:
    """``evaluate``'s bottleneck of a valid assignment (acyclic, pins, memory, no empty stage); inf if invalid."""
    costs = evaluate(problem, stage)
    if (not is_acyclic(problem, stage) or np.any(costs.memory > problem.mem_limit * (1 + 1e-12))
            or np.unique(stage).size < problem.k):
        return math.inf
    return costs.bottleneck


def _incumbent(problem: Problem) -> tuple[np.ndarray | None, float]:
    """The ``dp`` split and its bottleneck, an upper bound for the MILP (None if it fails)."""
    try:
        stage = dp_split(problem)
    except PartitionError:
        return None, math.inf
    value = _bottleneck_if_valid(problem, stage)
    return (stage, value) if math.isfinite(value) else (None, math.inf)


def _require_scipy() -> None:
    """Fail early, before any work, if scipy (and with it HiGHS) is missing."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp  # noqa: F401
        from scipy.sparse import csr_array  # noqa: F401
    except ImportError as e:
        raise PartitionError("the milp partitioner needs scipy (HiGHS): pip install 'scipy>=1.9'") from e


def _run_highs(model: _Model, t: int, *, time_limit: float, mip_rel_gap: float, node_limit: int | None):
    """Minimise the column ``t`` of ``model`` with HiGHS; returns scipy's ``OptimizeResult``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    cost = np.zeros(len(model.lb))
    cost[t] = 1.0
    a = csr_array((model.vals, (model.rows, model.cols)), shape=(len(model.lo), len(model.lb)))
    options: dict = {"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap), "presolve": True}
    if node_limit is not None:
        options["node_limit"] = int(node_limit)
    return milp(cost, integrality=np.array(model.integer), bounds=Bounds(model.lb, model.ub),
                constraints=LinearConstraint(a, model.lo, model.hi), options=options)


def _decode(problem: Problem, x: _Cumulative, solution: np.ndarray) -> np.ndarray:
    """Each unit's stage in a solution: ``k - 1`` less the number of boundaries s with X[u, s] = 1."""
    n, k = problem.num_units, problem.k
    xs = np.round(solution[x.start:x.start + n * (k - 1)]).reshape(n, k - 1)
    return (k - 1 - xs.sum(axis=1)).astype(np.int64)


def _verdict(problem: Problem, res, *, found: bool, value: float, unit: float,
             mip_rel_gap: float) -> tuple[str, float]:
    """The status and proven lower bound, from HiGHS's result and the best assignment's ``value``.

    Args:
        res: scipy's ``OptimizeResult`` (status 0 optimal, 1 limit reached, 2 infeasible).
        found: whether any valid assignment is known (the solver's or ``dp``'s).
        value: that assignment's bottleneck.
        unit: the time unit the model's costs were divided by.
    """
    bound = lower_bound(problem)
    dual = getattr(res, "mip_dual_bound", None)
    if res.status in (0, 1) and dual is not None and math.isfinite(dual):
        bound = max(bound, float(dual) * unit)
    if not found:
        return ("infeasible", math.inf) if res.status == 2 else ("time_limit", bound)
    if res.status == 2:
        # T <= the dp bottleneck admitted nothing (rounding at the boundary): dp is optimal
        return "optimal", value
    status = "optimal" if res.status == 0 else "time_limit"
    if status == "optimal" and dual is None:
        bound = max(bound, value * (1 - mip_rel_gap))
    return status, min(bound, value)


def milp_solve(problem: Problem, *, time_limit: float = 30.0, mip_rel_gap: float = 1e-6,
               node_limit: int | None = None, max_units: int = MAX_UNITS) -> MilpResult:
    """Solve the partitioning problem exactly (or until the time limit) with HiGHS.

    The ``dp`` answer seeds the search as an upper bound on the bottleneck (scipy's HiGHS
    interface takes no starting solution), and is returned if the solver finds nothing better.

    Args:
        problem: a compiled :class:`Problem`, either objective.
        time_limit: seconds HiGHS may search; past it the result has status "time_limit".
        mip_rel_gap: the relative gap at which HiGHS stops and calls the answer optimal.
        node_limit: a cap on branch-and-bound nodes; with it (and a generous time limit) the
            result no longer depends on the machine's speed.
        max_units: refuse larger problems (the model has k * units binaries).

    Returns:
        A :class:`MilpResult`.

    Raises:
        PartitionError: more units than ``max_units``, or scipy is not installed.

    Example::

        problem = build_problem(graph, 4, objective="direct")
        result = milp_solve(problem, time_limit=10)
        result.objective, result.bound, result.gap
    """
    start = time.perf_counter()
    n = problem.num_units
    if n > max_units:
        raise PartitionError(
            f"the milp partitioner takes at most {max_units} units; this problem has {n}. Coarsen the graph "
            f"(colocate chains of nodes), raise max_units in milp_solve (the solve may not finish), or use "
            f"partitioner='dp' or 'metis'")
    _require_scipy()
    dp_stage, dp_value = _incumbent(problem)
    if dp_stage is not None and dp_value <= lower_bound(problem) * (1 + 1e-12):
        # dp reached the lower bound: nothing to prove
        return MilpResult(stage=dp_stage, objective=dp_value, bound=dp_value, gap=0.0, status="optimal",
                          seconds=time.perf_counter() - start, variables=0, constraints=0)
    unit = _time_unit(problem)
    model, x, t = _build(problem, dp_value * (1 + 1e-9) if math.isfinite(dp_value) else math.inf, unit)
    res = _run_highs(model, t, time_limit=time_limit, mip_rel_gap=mip_rel_gap, node_limit=node_limit)
    stage, value, model_value = dp_stage, dp_value, math.nan
    if res.x is not None:
        found = _decode(problem, x, res.x)
        found_value = _bottleneck_if_valid(problem, found)
        if found_value <= value:
            stage, value, model_value = found, found_value, float(res.x[t]) * unit
    status, bound = _verdict(problem, res, found=stage is not None, value=value, unit=unit,
                             mip_rel_gap=mip_rel_gap)
    gap = math.inf if stage is None else (value - bound) / value if value > 0 else 0.0
    return MilpResult(stage=stage, objective=value, bound=bound, gap=max(gap, 0.0), status=status,
                      seconds=time.perf_counter() - start, variables=len(model.lb), constraints=len(model.lo),
                      model_value=model_value)


def milp_partition(problem: Problem, seed: int = 0) -> np.ndarray:
    """The registered ``milp`` partitioner: :func:`milp_solve` with its defaults (``seed`` unused).

    Raises:
        PartitionError: too many units, or no valid assignment exists.
    """
    result = milp_solve(problem)
    if result.stage is None:
        raise PartitionError(
            f"the milp partitioner found no valid assignment of {problem.num_units} units to {problem.k} stages "
            f"({result.status} after {result.seconds:.1f} s): the memory limits or pins admit none; "
            f"raise memory_limit or k")
    return result.stage
