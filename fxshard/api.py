"""``fxshard.compile``: plan a model for a cluster and run it as planned.

In one process the plan runs on local devices: ``single`` and ``ddp`` plans run the model as
it is on the first device (data-parallel replicas need one process each, under torchrun);
``pipeline`` and ``hybrid`` plans run their stages on the stages' devices with micro-batches.
Under torchrun (``torch.distributed`` initialised) each rank builds only its own stage and
runs it with ``torch.distributed.pipelining`` (see :mod:`fxshard.runtime.distributed`). Which
of these runs the plan is chosen once, when it is bound (:func:`fxshard.runtime.execution.make_execution`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fxshard.capture import CapturedGraph, capture
from fxshard.cluster import Cluster
from fxshard.errors import ExecutionError, PlanError
from fxshard.plan import Plan
from fxshard.planner import PlanOptions, batch_size_of, plan_captured
from fxshard.runtime.agreement import fingerprint_mismatch, shared_plan
from fxshard.runtime.checkpoint import load_named_optimizer_state, merge_named_optimizer_states, named_optimizer_state
from fxshard.runtime.execution import Execution, PlainModel, make_execution

__all__ = ["CompiledModel", "compile"]


def compile(model: torch.nn.Module, devices: Any, example_inputs: Any = None, *,
            example_kwargs: Mapping[str, Any] | None = None, **options: Any) -> CompiledModel:
    """Plan ``model`` for ``devices`` and return a model that runs the plan.

    Args:
        model: the module.
        devices: as for :func:`fxshard.plan`.
        example_inputs: one batch of positional inputs; without them, planning happens at the
            first call, from the real inputs.
        example_kwargs: keyword inputs of that batch.
        **options: :class:`~fxshard.planner.PlanOptions` fields (training, optimizer,
            microbatches, schedule, partitioner, cost_model, strategy, activation_checkpointing,
            data_parallel, stages, loss_fn, seed, memory_reserve, name, exhaustive, factors); the
            memory levers ``activation_checkpointing`` ("none", "selective", "full") and
            ``data_parallel`` ("ddp", "fsdp") are the planner's to choose when left None;
            ``factors`` (a file from ``fxshard calibrate --save-factors``) prices the presets it
            names with their fitted roofline factors (docs/calibration.md).

    Example::

        compiled = fxshard.compile(model, ["cpu", "cpu"], (x,), microbatches=4)
        sharded = fxshard.compile(model, "8xA100-80GB", (x,), data_parallel="fsdp", activation_checkpointing="full")
        calibrated = fxshard.compile(model, "4xcpu:3GB", (x,), factors="cpu.factors.json")
        loss = compiled.step(x, target=y, loss_fn=torch.nn.functional.mse_loss)
        optimizer.step()   # an optimizer over model.parameters() keeps working
    """
    return CompiledModel(model, devices, example_inputs, example_kwargs=example_kwargs, **options)


class CompiledModel:
    """A model bound to a plan (SPEC: ``fxshard.CompiledModel``)."""

    def __init__(self, model: torch.nn.Module, devices: Any, example_inputs: Any = None, *,
                 example_kwargs: Mapping[str, Any] | None = None, plan: Plan | None = None,
                 **options: Any) -> None:
        self._model = model
        self._devices = devices
        try:
            self._options = PlanOptions(**options)
        except TypeError as e:
            import difflib

            known = [f.name for f in dataclasses.fields(PlanOptions)]
            unknown = [k for k in options if k not in known]
            hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, known, 1)[0]!r}?)"
                     if difflib.get_close_matches(k, known, 1) else repr(k) for k in unknown]
            raise PlanError(f"unknown compile option(s) {', '.join(hints) or e}; the options are "
                            f"{', '.join(known)}") from e
        self._plan: Plan | None = plan
        self._captured: CapturedGraph | None = None
        self._captured_args: tuple[Any, dict] = ((), {})
        self._mode = model.training
        self._execution: Execution | None = None
        if example_inputs is not None or example_kwargs:
            self._build(example_inputs if example_inputs is not None else (), dict(example_kwargs or {}))

    # -- building ------------------------------------------------------------------------

    def _build(self, args: Any, kwargs: dict) -> None:
        captured = capture(self._model, args, example_kwargs=kwargs)

        def make_plan() -> Plan:
            cluster = Cluster.parse(self._devices)
            return plan_captured(captured, cluster, batch_size_of(captured, args, kwargs), self._options)

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One plan for every rank (rank 0's, or the user's if all agree); the pipeline
            # then checks, on every rank at once, that it fits this model and these devices.
            self._plan = shared_plan(self._plan, make_plan)
        elif self._plan is None:
            self._plan = make_plan()
        else:
            mismatch = fingerprint_mismatch(self._plan, captured.model_name, captured.fingerprint(),
                                            len(captured.nodes))
            if mismatch:
                raise ExecutionError(mismatch)
        self._captured, self._captured_args, self._mode = captured, (args, kwargs), self._model.training
        self._execution = make_execution(self._model, captured, self._plan, loss_fn=self._options.loss_fn)

    def _ensure(self, args: tuple, kwargs: dict) -> None:
        if self._captured is None:
            self._build(args, kwargs)
        elif self._model.training != self._mode:
            # Tracing bakes train/eval decisions made in Python (F.dropout(x, p, self.training))
            # into the graph: a mode switch re-captures, keeping the plan.
            self._build(*self._captured_args)
        self._check_inputs(args, kwargs)

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        """Inputs must have the compiled shapes and dtypes, up to the batch size: the plan's
        stages, memory and timings hold for those (and an exported graph only runs them).
        The error says which of the shape or the dtype differs, and how to fix it."""
        captured, plan = self._captured, self.plan
        flat = captured.flatten_inputs(args, kwargs)
        placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
        for got, node in zip(flat, placeholders):
            exp = node.meta.get("val")
            if not isinstance(exp, torch.Tensor):
                continue
            what = f"{captured.model_name} input {node.name!r}"
            if not isinstance(got, torch.Tensor):
                raise ExecutionError(f"{what} is a {type(got).__name__}; it was compiled as a tensor of shape "
                                     f"{tuple(exp.shape)} and dtype {exp.dtype}. Pass a tensor")
            batched = exp.dim() > 0 and exp.shape[0] == plan.batch_size and captured.fixed_batch is None
            same = got.dim() == exp.dim() and (tuple(got.shape[1:]) == tuple(exp.shape[1:]) if batched
                                                else tuple(got.shape) == tuple(exp.shape))
            shape = ("(batch, " + ", ".join(map(str, exp.shape[1:])) + ")") if batched else str(tuple(exp.shape))
            if not same:
                dtype = (f"its dtype {got.dtype} matches" if got.dtype == exp.dtype
                         else f"its dtype differs too: {got.dtype}, compiled for {exp.dtype}")
                raise ExecutionError(
                    f"{what} has shape {tuple(got.shape)}; the model was compiled for shape {shape} ({dtype}), and "
                    f"the plan's stages, memory and timings hold for that. Compile again with example inputs of "
                    f"the new shape")
            if got.dtype != exp.dtype:
                raise ExecutionError(
                    f"{what} has dtype {got.dtype}; the model was compiled for dtype {exp.dtype} (its shape "
                    f"{tuple(got.shape)} matches {shape}). Convert it with .to({exp.dtype}). Compile "
                    f"again with {got.dtype} example inputs to run in {got.dtype} instead")

    # -- SPEC surface --------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The plan (made at the first call when no example inputs were given)."""
        if self._plan is None:
            raise ExecutionError("no plan yet: call the model once, or compile with example_inputs")
        return self._plan

    @property
    def strategy(self) -> str:
        return self.plan.strategy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward over the whole batch; returns what ``model(*args, **kwargs)`` returns."""
        self._ensure(args, kwargs)
        return self._execution.forward(args, kwargs)

    def step(self, *args: Any, target: Any = None, loss_fn: Callable[..., torch.Tensor] | None = None,
             **kwargs: Any) -> torch.Tensor | None:
        """One forward and backward over the batch, in the plan's micro-batches.

        Returns the mean loss where the last stage lives (None on other ranks). Gradients
        accumulate in the parameters and equal those of the mean loss over the whole batch.

        Raises:
            ExecutionError: no loss; a loss that needs a target called without one, or a
                target whose rows do not pair with the inputs' micro-batches (refused before
                anything runs); a loss that fails on its arguments (chained to its error).
        """
        loss_fn = loss_fn or self._options.loss_fn
        if loss_fn is None:
            raise ExecutionError("step needs a loss: pass loss_fn=... here or to fxshard.compile "
                                 "(called as loss_fn(output, target), or loss_fn(output) without a target)")
        if self._plan is None and target is not None and self._options.example_target is None:
            # planned at this first call: the compiled loss is priced with this target's shapes
            self._options = dataclasses.replace(self._options, example_target=target)
        self._ensure(args, kwargs)
        return self._execution.step(args, kwargs, target, loss_fn)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters this process owns: in one process, the model's own Parameters."""
        return self._bound_or_plain().parameters()

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self._bound_or_plain().named_parameters()

    def state_dict(self, *, gather: bool = False) -> dict[str, torch.Tensor]:
        """State under the original model's names (this rank's part under torchrun, or
        everything with ``gather=True``), loadable by the original model."""
        return self._bound_or_plain().state_dict(gather=gather)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        """Load state saved under the original names (from any plan or the plain model)."""
        return self._bound_or_plain().load_state_dict(state, strict=strict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer, *, gather: bool = False) -> dict[str, Any]:
        """``optimizer``'s state keyed by the original parameter names, not positions, so it
        loads into a plan with another number of stages (see :mod:`fxshard.runtime.checkpoint`).

        Under torchrun each rank's optimizer holds its own stages' parameters: ``gather=True``
        (called on every rank) returns the whole model's state on every rank.
        """
        execution = self._bound_or_plain()
        local = named_optimizer_state(optimizer, execution.parameter_names(), aliases=execution.aliases, full=gather)
        if gather:
            return merge_named_optimizer_states(execution.gather_objects(local))
        return local

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Load a state from :meth:`optimizer_state_dict` of any plan (or of the plain model:
        ``fxshard.runtime.checkpoint.named_optimizer_state``) into this process's optimizer."""
        execution = self._bound_or_plain()
        load_named_optimizer_state(optimizer, execution.parameter_names(), state, aliases=execution.aliases)

    def _bound_or_plain(self) -> Execution:
        """The execution, or before the first call (no plan bound yet) the model as it is."""
        return self._execution if self._execution is not None else PlainModel(self._model)


