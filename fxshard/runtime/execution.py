"""One interface for running a bound plan, and one class per way of running it.

:class:`fxshard.CompiledModel` holds one :class:`Execution`, chosen once by
:func:`make_execution` when the plan is bound to the captured model, and delegates its calls
to it: the model as it is on one device (:class:`EagerExecution`), the plan's stages on local
devices (:class:`LocalPipelineExecution`), or this rank's part under torchrun
(:class:`fxshard.runtime.replicas.DataParallelExecution` for the whole model per rank,
:class:`fxshard.runtime.distributed.DistributedPipeline` for stages). A new way of running a plan is one
new class here and one line in :func:`make_execution`. See docs/runtime.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
import torch.fx

from fxshard.capture import CapturedGraph
from fxshard.errors import ExecutionError
from fxshard.passes.regions import repeated_blocks
from fxshard.passes.split import split_graph
from fxshard.plan import Plan
from fxshard.runtime.checkpoint import state_aliases
from fxshard.runtime.checkpointing import apply_checkpointing, checkpoint_stages
from fxshard.runtime.local import LocalPipeline, accumulate, to_device
from fxshard.runtime.loss import LossCall, call_loss, check_loss_call, leading_rows

__all__ = ["EagerExecution", "Execution", "LocalPipelineExecution", "PlainModel", "local_device", "make_execution"]


class Execution(Protocol):
    """What a compiled model needs from the thing that runs its plan."""

    aliases: dict[str, tuple[str, ...]]
    """``name -> every name`` of each tensor the original ``state_dict`` names several times."""

    def forward(self, args: tuple, kwargs: dict) -> Any:
        """Whole-batch forward: what the model returns (None on ranks without the output)."""

    def step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor | None:
        """Forward and backward over the batch; the mean loss where the output lives."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters this process owns."""

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The parameters this process owns, with their names."""

    def state_dict(self, *, gather: bool = False) -> dict[str, torch.Tensor]:
        """State under the original model's names (every process's with ``gather=True``)."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        """Load state saved under the original names."""

    def parameter_names(self) -> dict[int, str]:
        """``id(param) -> canonical name`` of this process's parameters."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` in one process)."""


def make_execution(model: torch.nn.Module, captured: CapturedGraph, plan: Plan, *,
                   loss_fn: Callable | None = None) -> Execution:
    """The execution that runs ``plan`` for ``model`` in this process.

    Under torchrun (``torch.distributed`` initialised) this rank's part of the plan; else a
    pipeline on local devices for ``pipeline`` and ``hybrid`` plans, the model itself on the
    plan's first device for the others.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from fxshard.runtime.distributed import DistributedPipeline
        from fxshard.runtime.fsdp import FsdpExecution
        from fxshard.runtime.replicas import DataParallelExecution

        kinds = {"pipeline": DistributedPipeline, "hybrid": DistributedPipeline, "fsdp": FsdpExecution}
        kind = kinds.get(plan.strategy, DataParallelExecution)
        return kind(captured, plan, loss_fn=loss_fn, aliases=state_aliases(model))
    if plan.strategy in ("pipeline", "hybrid"):
        return LocalPipelineExecution(model, captured, plan)
    return EagerExecution(model, captured, local_device(plan.stages[0].devices[0]),
                          activation_checkpointing=plan.stages[0].activation_checkpointing,
                          microbatches=plan.microbatches)


class PlainModel:
    """State and parameters of a model held whole in this process: the model's own (also what
    a compiled model shows before its plan is bound)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.aliases = state_aliases(model)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.model.named_parameters()

    def state_dict(self, *, gather: bool = False) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        try:
            return self.model.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            raise ExecutionError(f"the state dict does not fit {type(self.model).__name__}: {e}") from e

    def parameter_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for name, p in self.model.named_parameters():
            names.setdefault(id(p), name)
        return names

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]


class EagerExecution(PlainModel):
    """The model on one device (``single``, ``ddp`` and ``fsdp`` plans in one process).

    With activation checkpointing (the plan's stage 0 policy), the captured graph runs instead
    of the model's own forward, each repeated block under ``policy``; the graph holds the
    model's own Parameters, so an optimizer over ``model.parameters()`` trains it.
    """

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, device: torch.device, *,
                 activation_checkpointing: str = "none", microbatches: int = 1) -> None:
        super().__init__(model)
        self.captured = captured
        self.device = device
        self.microbatches = microbatches
        names = {path: captured.param_names.get(id(t)) for path, t in captured.gm.named_buffers(remove_duplicate=False)}
        if _model_device(model) != device:
            model.to(device)
        self.graph: torch.fx.GraphModule | None = None
        if activation_checkpointing != "none":
            graph = apply_checkpointing(captured.gm, repeated_blocks(captured), activation_checkpointing)
            self.graph = _bind_buffers(graph.to(device), model, names)

    def forward(self, args: tuple, kwargs: dict) -> Any:
        if self.graph is None:
            return self.model(*to_device(args, self.device), **to_device(kwargs, self.device))
        flat = to_device(self.captured.flatten_inputs(args, kwargs), self.device)
        return self.captured.output_spec.rebuild(self.graph(*flat))

    def step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor:
        """Forward and backward over the batch, in the plan's micro-batches one after another
        (gradient accumulation: the gradients of the whole batch's mean loss)."""
        how = LossCall(batch=leading_rows(self.captured.flatten_inputs(args, kwargs)) or 0,
                       microbatches=self.microbatches, has_target=target is not None)
        check_loss_call(loss_fn, target, how)

        def run(part: tuple[tuple, dict], tgt: Any, i: int) -> torch.Tensor:
            return call_loss(loss_fn, self.forward(*part), to_device(tgt, self.device), how, microbatch=i)

        return accumulate(run, (args, kwargs), target, self.microbatches)


def _bind_buffers(graph: torch.fx.GraphModule, model: torch.nn.Module,
                  names: Mapping[str, str | None]) -> torch.fx.GraphModule:
    """Make ``graph`` read the model's buffers (``Module.to`` replaces buffer tensors, so after a
    move the graph would update stale copies of running statistics)."""
    for path, name in names.items():
        if name is None:
            continue
        prefix, _, attr = path.rpartition(".")
        owner = graph.get_submodule(prefix) if prefix else graph
        if attr in owner._buffers:
            owner._buffers[attr] = model.get_buffer(name)
    return graph


class LocalPipelineExecution(PlainModel):
    """The plan's stages on local devices, micro-batched (``pipeline`` and ``hybrid`` plans); each
    stage's repeated blocks run under its activation-checkpointing policy."""

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, plan: Plan) -> None:
        super().__init__(model)
        self.captured = captured
        split = split_graph(captured, plan.stage_of(), plan.num_stages)
        split = checkpoint_stages(split, captured, plan)
        self.pipeline = LocalPipeline(split, [local_device(s.devices[0]) for s in plan.stages], plan.microbatches)

    def forward(self, args: tuple, kwargs: dict) -> Any:
        flat = self.captured.flatten_inputs(args, kwargs)
        return self.captured.output_spec.rebuild(self.pipeline.forward(flat))

    def step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable) -> torch.Tensor:
        flat = self.captured.flatten_inputs(args, kwargs)
        return self.pipeline.step(flat, target, loss_fn, self.captured.output_spec.rebuild)


def local_device(name: str) -> torch.device:
    """The torch device a plan's device name means on this machine.

    Raises:
        ExecutionError: the plan needs CUDA and this machine has none.
    """
    name = name.split("/", 1)[-1]  # "m1/cuda:3" on multi-machine plans
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExecutionError(f"the plan puts work on {name}, but this machine has no CUDA; plan for this machine "
                             f"(devices=N or ['cpu', ...]) or run under torchrun on the planned cluster")
    return device


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None
