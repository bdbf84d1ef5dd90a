"""What a plan is asked for: :class:`PlanOptions`, the batch size of the example inputs, and the
checks that refuse a request no plan can meet before any pricing. See docs/planning.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxshard.capture import CapturedGraph
from fxshard.cluster import Cluster
from fxshard.cost_models import CostModel, FittedFactors, cost_models, load_factors
from fxshard.errors import CostModelError, PlanError
from fxshard.passes.partition import partitioners
from fxshard.simulate import SCHEDULES, SimulationError, schedule_name

__all__ = ["CHECKPOINTING", "DATA_PARALLEL", "DATA_PARALLEL_GROUPS", "STRATEGY_ORDER", "PlanOptions", "batch_size_of",
           "check_request", "divisors"]

# The strategies, simplest first: ties in step time go to the simpler one.
STRATEGY_ORDER = {"single": 0, "ddp": 1, "fsdp": 2, "pipeline": 3, "hybrid": 4}
CHECKPOINTING = ("none", "selective", "full")  # activation checkpointing policies (SPEC: "Memory levers")
DATA_PARALLEL = ("ddp", "fsdp")  # how a data-parallel group holds the model: replicated or sharded
# The data-parallel groups each strategy can have: none, or the ones listed.
DATA_PARALLEL_GROUPS = {"single": (), "pipeline": (), "ddp": ("ddp",), "fsdp": ("fsdp",), "hybrid": DATA_PARALLEL}


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What to plan for (SPEC: the keyword options of ``fxshard.plan``).

    ``activation_checkpointing`` ("none", "selective", "full") and ``data_parallel`` ("ddp":
    replicas, "fsdp": shards) are the memory levers; None lets the planner choose.
    ``exhaustive=True`` partitions and simulates every pipeline candidate, even those whose
    lower bound shows they cannot beat the best found (a reference for the pruned search; same
    plan, slower). ``factors`` (a factors file's path, or :class:`FittedFactors`) prices the
    presets it names with roofline factors fitted by ``fxshard calibrate --save-factors``; the
    others keep their datasheet factors (docs/calibration.md). A training plan with ``loss_fn``
    prices the loss on its last stage (fxshard/cost_models/loss.py), called as
    ``loss_fn(output, example_target)``, or ``loss_fn(output)`` without ``example_target``. See
    docs/planning.md.
    """

    training: bool = True
    optimizer: str = "adam"
    microbatches: int | None = None
    schedule: str | None = None
    partitioner: str = "metis"
    cost_model: str = "analytical"
    strategy: str | None = None
    activation_checkpointing: str | None = None
    data_parallel: str | None = None
    stages: int | None = None
    loss_fn: Any = None
    example_target: Any = None  # a target of one batch for loss_fn(output, target): the loss is then priced
    seed: int = 0
    memory_reserve: float = 0.05
    name: str | None = None
    exhaustive: bool = False
    factors: Any = None  # str | os.PathLike | FittedFactors | None; read into FittedFactors

    def __post_init__(self) -> None:
        if not isinstance(self.training, bool):
            raise PlanError(f"training={self.training!r}; use True or False")
        if self.schedule is not None:
            object.__setattr__(self, "schedule", _known_schedule(self.schedule))
        _check_microbatches(self.microbatches)
        if not self.training and self.schedule not in (None, "gpipe"):
            raise PlanError(f"schedule={self.schedule!r} with training=False: inference runs forward only, where "
                            f"every schedule is GPipe's fill and drain; drop schedule= or use 'gpipe'")
        if self.optimizer not in ("adam", "sgd", "none"):
            raise PlanError(f"optimizer={self.optimizer!r}; use 'adam', 'sgd' or 'none'")
        if self.strategy not in (None, *STRATEGY_ORDER):
            raise PlanError(f"strategy={self.strategy!r}; use None (auto) or one of {', '.join(STRATEGY_ORDER)}")
        _check_microbatches(self.microbatches, positive=True)
        self._check_levers()
        self._check_stages()
        if self.partitioner not in partitioners():
            raise PlanError(f"partitioner={self.partitioner!r} is not registered; known: {', '.join(partitioners())}")
        if isinstance(self.cost_model, str) and self.cost_model not in cost_models():
            raise CostModelError(f"cost_model={self.cost_model!r} is not registered; known: "
                                 f"{', '.join(cost_models())} (register your own with fxshard.register_cost_model)")
        self._check_factors()
        if not isinstance(self.exhaustive, bool):
            raise PlanError(f"exhaustive={self.exhaustive!r}; use True (simulate every candidate) or False")
        if not 0 <= self.memory_reserve < 1:
            raise PlanError(f"memory_reserve={self.memory_reserve}; it is a fraction of each device, in [0, 1)")

    def _check_factors(self) -> None:
        if self.factors is None:
            return
        object.__setattr__(self, "factors", load_factors(self.factors))
        if self.cost_model != "analytical":
            raise PlanError(f"factors={self.factors.source or 'FittedFactors'!r} refine the analytical cost model's "
                            f"roofline, but cost_model={self.cost_model!r} prices its own way; use "
                            f"cost_model='analytical' with them, or drop factors=")

    @property
    def pricing_model(self) -> str | CostModel:
        """The cost model candidates are priced with: ``cost_model``, or the analytical model
        with ``factors`` for the presets they name."""
        return self.factors.cost_model() if isinstance(self.factors, FittedFactors) else self.cost_model

    def factors_note(self, presets: Any) -> str:
        """What a plan's reason says of ``factors`` for a cluster of these presets ("" without)."""
        return self.factors.describe(presets) if isinstance(self.factors, FittedFactors) else ""

    def _check_levers(self) -> None:
        if self.activation_checkpointing not in (None, *CHECKPOINTING):
            raise PlanError(f"activation_checkpointing={self.activation_checkpointing!r}; use None (auto) or one of "
                            f"{', '.join(map(repr, CHECKPOINTING))}")
        if self.data_parallel not in (None, *DATA_PARALLEL):
            raise PlanError(f"data_parallel={self.data_parallel!r}; use None (auto), 'ddp' (replicas) or 'fsdp' "
                            f"(parameters, gradients and optimizer state sharded)")
        if not self.training and self.activation_checkpointing not in (None, "none"):
            raise PlanError(f"activation_checkpointing={self.activation_checkpointing!r} with training=False: "
                            f"inference saves no activations for a backward pass, so there is nothing to "
                            f"recompute; drop activation_checkpointing= or use 'none'")
        if self.strategy is None or self.data_parallel is None:
            return
        groups = DATA_PARALLEL_GROUPS[self.strategy]
        if self.data_parallel not in groups:
            fits = [s for s, g in DATA_PARALLEL_GROUPS.items() if self.data_parallel in g]
            has = (f"{self.strategy} plans have no data-parallel group" if not groups else
                   f"{self.strategy} plans are {'replicated (ddp)' if groups == ('ddp',) else 'sharded (fsdp)'}")
            raise PlanError(f"data_parallel={self.data_parallel!r} with strategy={self.strategy!r}: {has}; use "
                            f"strategy={' or '.join(map(repr, fits))}, or drop data_parallel=")

    def _check_stages(self) -> None:
        if self.stages is not None and (isinstance(self.stages, bool) or not isinstance(self.stages, int)
                                        or self.stages < 2):
            raise PlanError(f"stages={self.stages!r}; use None (auto) or a pipeline depth of at least 2 "
                            f"(one stage is strategy='single', 'ddp' or 'fsdp')")
        if self.stages is not None and self.strategy in ("single", "ddp", "fsdp"):
            raise PlanError(f"stages={self.stages} with strategy={self.strategy!r}: {self.strategy} plans have one "
                            f"stage; use strategy='pipeline' or 'hybrid', or drop stages=")


def _known_schedule(schedule: str) -> str:
    try:  # one spelling rule for every entry point: "Interleaved1F1B", "interleaved-1f1b", ...
        return schedule_name(schedule)
    except SimulationError as e:
        raise PlanError(f"schedule={schedule!r} is not a schedule fxshard knows; use None (auto) or "
                        f"one of {', '.join(SCHEDULES)} (torch's names, such as 'Interleaved1F1B', work too, "
                        f"in any case)") from e


def _check_microbatches(microbatches: Any, *, positive: bool = False) -> None:
    """An int (first check, before the others), then at least 1 (second check)."""
    if microbatches is None:
        return
    wrong = microbatches < 1 if positive else not isinstance(microbatches, int)
    if isinstance(microbatches, bool) or wrong:
        raise PlanError(f"microbatches={microbatches!r}; use None (auto) or a positive integer")


def batch_size_of(captured: CapturedGraph, example_inputs: Any, example_kwargs: Mapping | None) -> int:
    """The batch size: the first dimension of the first tensor among the example inputs."""
    for leaf in pytree.tree_leaves((example_inputs, dict(example_kwargs or {}))):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            if leaf.shape[0] == 0:
                raise PlanError(f"{captured.model_name}'s example batch is empty (first input has shape "
                                f"{tuple(leaf.shape)}); pass a batch of the size you will train or serve with")
            return int(leaf.shape[0])
    raise PlanError(f"{captured.model_name}'s example inputs hold no tensor with a batch dimension; "
                    f"pass at least one tensor input whose first dimension is the batch")


def check_request(captured: CapturedGraph, cluster: Cluster, batch: int, opts: PlanOptions) -> None:
    """Refuse requests no plan can meet, saying why, before any pricing or search."""
    name = captured.model_name
    n = cluster.num_devices
    fixed = captured.fixed_batch
    split = opts.strategy in ("ddp", "fsdp", "hybrid") or opts.data_parallel is not None
    if fixed is not None and ((opts.microbatches or 1) > 1 or split):
        lever = f" data_parallel={opts.data_parallel!r}" if opts.data_parallel is not None else ""
        raise PlanError(
            f"{name} captured with its batch fixed at {fixed} (torch.export had to specialise on the batch size: "
            f"the model branches on it), so its graph cannot run on micro-batches or replica shards, which "
            f"microbatches={opts.microbatches} strategy={opts.strategy!r}{lever} need. Use microbatches=1 with "
            f"strategy 'single' or 'pipeline', or remove the branch on the batch size from the model")
    if opts.stages is not None and opts.stages > n:
        raise PlanError(f"stages={opts.stages} needs at least {opts.stages} devices; the cluster has {n}. Use "
                        f"stages<={n} or more devices")
    if opts.training and not any(p.requires_grad for p in captured.gm.parameters()):
        raise PlanError(f"{name} has no trainable parameters, so there is nothing to train (or to split by "
                        f"weight); plan it with training=False (--inference), or check that the model was built "
                        f"(an empty nn.Sequential?) and that its parameters have requires_grad=True")
    ops = sum(1 for node in captured.nodes if node.op in ("call_function", "call_method", "call_module"))
    if opts.stages is not None and opts.stages > ops:
        raise PlanError(f"stages={opts.stages} but {name} has only {ops} operation(s) to place "
                        f"({len(captured.nodes)} graph nodes with inputs and outputs); use stages<={max(ops, 2)} "
                        f"or a larger model")
    if opts.microbatches is not None and opts.strategy in ("ddp", "fsdp", "pipeline", "hybrid"):
        # ddp and fsdp accumulate: each replica's share of the batch runs as micro-batches one after another
        replicas = [1] if opts.strategy == "pipeline" else [r for r in divisors(batch) if 2 <= r <= n]
        if replicas and not any((batch // r) % opts.microbatches == 0 for r in replicas):
            raise PlanError(f"microbatches={opts.microbatches} does not divide the batch of {batch}"
                            + (" into replicas' equal shares" if opts.strategy != "pipeline" else "")
                            + f"; use one of {', '.join(map(str, divisors(batch)))}")
