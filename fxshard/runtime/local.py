"""One-process runtime: the plan's stages on local devices, micro-batched, autograd across.

Forward runs the whole batch through the stages in order. ``step`` splits the batch into the
plan's micro-batches, runs forward and backward per micro-batch (autograd follows tensors
across devices), and scales each micro-batch's loss by its share of the batch, so the
gradients equal those of the loss over the whole batch, as if the model had run eagerly.

A parameter read by stages on different devices (a tied embedding and LM head) lives on each
of them: the first stage's device holds the model's own Parameter, later devices hold copies
refreshed from it before every step, and their gradients are added into it after backward.
On one device the stages share the Parameter itself. See docs/runtime.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxshard.errors import ExecutionError
from fxshard.passes.split import SplitGraph
from fxshard.runtime.loss import LossCall, call_loss, check_loss_call

__all__ = ["LocalPipeline", "accumulate", "set_parameter", "split_microbatches", "split_tree", "to_device"]


def split_microbatches(values: Sequence[Any], m: int, *, what: str = "micro-batches") -> list[list[Any]]:
    """Split each tensor with a batch dimension into m chunks along dim 0; others repeat.

    The batch is the first dimension of the first tensor that has one; only tensors with that
    first dimension are cut (a mask of fixed shape, a number or a 0-d tensor passes whole).

    Raises:
        ExecutionError: the batch does not divide into m equal parts (``what`` names them).
    """
    batch = next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if m == 1 or batch is None:
        return [list(values)] * m if batch is None else [list(values)]
    if batch % m:
        raise ExecutionError(f"a batch of {batch} does not split into {m} equal {what}; use a batch that "
                            f"{m} divides, or plan with microbatches= a divisor of {batch}")
    chunks = []
    for i in range(m):
        chunk = []
        for v in values:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
                chunk.append(v.narrow(0, i * (batch // m), batch // m))
            else:
                chunk.append(v)
        chunks.append(chunk)
    return chunks


def split_tree(value: Any, m: int, *, what: str = "micro-batches") -> list[Any]:
    """m micro-batches of a nested value (a tensor, a tuple or dict of tensors)."""
    leaves, spec = pytree.tree_flatten(value)
    return [pytree.tree_unflatten(chunk, spec) for chunk in split_microbatches(leaves, m, what=what)]


def accumulate(run: Callable[[Any, Any, int], torch.Tensor], inputs: Any, target: Any, microbatches: int,
               sync: Callable[[bool], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Forward and backward of ``microbatches`` micro-batches one after another (gradient
    accumulation); the mean loss.

    ``run(inputs, target, i)`` returns micro-batch i's loss; its backward runs on the loss
    divided by ``microbatches`` inside ``sync(last)`` (when given), where ``last`` says whether
    this is the step's last micro-batch (the one whose backward synchronises replicas).
    """
    losses = []
    for i, (part_inputs, part_target) in enumerate(split_tree((inputs, target), microbatches)):
        with sync(i == microbatches - 1) if sync is not None else contextlib.nullcontext():
            loss = run(part_inputs, part_target, i)
            (loss / microbatches if microbatches > 1 else loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean() if microbatches > 1 else losses[0]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device``."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)


class LocalPipeline:
    """Run a split graph's stages on local devices.

    Args:
        split: the stages.
        devices: one torch device per stage.
        microbatches: micro-batches per ``step``.
    """

    def __init__(self, split: SplitGraph, devices: Sequence[str | torch.device], microbatches: int) -> None:
        if len(devices) != len(split.stages):
            raise ExecutionError(f"{len(split.stages)} stages need {len(split.stages)} devices, got {len(devices)}")
        self.split = split
        self.devices = [torch.device(d) for d in devices]
        self.microbatches = microbatches
        self._replicas: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._place()

    def _place(self) -> None:
        owner_device: dict[int, torch.device] = {}
        for stage, device in zip(self.split.stages, self.devices):
            module = stage.module
            for name, param in list(module.named_parameters(remove_duplicate=False)):
                pid = id(param)
                if pid not in owner_device:
                    owner_device[pid] = device
                    if param.device != device:
                        param.data = param.data.to(device)
                elif owner_device[pid] != device:
                    replica = torch.nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
                    set_parameter(module, name, replica)
                    self._replicas.append((param, replica))
            for name, buf in list(module.named_buffers()):
                if buf.device != device:
                    _set_buffer(module, name, buf.to(device))

    def _sync_replicas(self) -> None:
        with torch.no_grad():
            for owner, replica in self._replicas:
                replica.copy_(owner)

    def _reduce_replicas(self) -> None:
        for owner, replica in self._replicas:
            if replica.grad is not None:
                grad = replica.grad.to(owner.device)
                owner.grad = grad if owner.grad is None else owner.grad + grad
                replica.grad = None

    def forward(self, flat_inputs: Sequence[Any]) -> tuple:
        """The flat outputs for the whole batch."""
        self._sync_replicas()
        return self.forward_chunk(flat_inputs)

    def step(self, flat_inputs: Sequence[Any], target: Any, loss_fn: Callable[..., torch.Tensor],
             rebuild: Callable[[tuple], Any]) -> torch.Tensor:
        """Forward and backward over the batch in micro-batches; returns the mean loss.

        ``rebuild`` turns flat outputs into what ``loss_fn(output, target)`` expects.

        Raises:
            ExecutionError: the batch does not split into the micro-batches, the loss needs a
                target that was not given or the target's rows do not match the batch (both
                before anything runs), or the loss fails on its arguments (chained to the cause).
        """
        m = self.microbatches
        chunks = split_microbatches(list(flat_inputs), m)
        batch = sum(_batch_of(c) for c in chunks)
        how = LossCall(batch=batch, microbatches=m, has_target=target is not None)
        check_loss_call(loss_fn, target, how)
        self._sync_replicas()
        targets = [[t] for t in split_tree(target, m)] if target is not None else [[None]] * m
        total = None
        for i, (chunk, (tgt,)) in enumerate(zip(chunks, targets)):
            out = self.forward_chunk(chunk)
            loss = call_loss(loss_fn, rebuild(out), to_device(tgt, self.devices[-1]), how, microbatch=i)
            share = _batch_of(chunk) / batch if batch else 1.0 / m
            (loss * share).backward()
            total = loss.detach() * share if total is None else total + loss.detach() * share
        self._reduce_replicas()
        return total

    def forward_chunk(self, chunk: Sequence[Any]) -> tuple:
        values: tuple = tuple(chunk)
        for stage, device in zip(self.split.stages, self.devices):
            values = stage.module(*to_device(values, device))
        return values


def _batch_of(chunk: Sequence[Any]) -> int:
    return next((v.shape[0] for v in chunk if isinstance(v, torch.Tensor) and v.dim() > 0), 1)


def set_parameter(module: torch.nn.Module, qualname: str, param: torch.nn.Parameter) -> None:
    """Give one stage its own copy of a parameter without touching the user's modules: the
    module holding it is replaced, in this stage only, by a shallow clone."""
    prefix, _, attr = qualname.rpartition(".")
    holder = module.get_submodule(prefix) if prefix else module
    if holder is module:
        module._parameters[attr] = param
        return
    clone = copy.copy(holder)
    clone._parameters = dict(holder._parameters)
    clone._parameters[attr] = param
    parent_name, _, child = prefix.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, clone)


def _set_buffer(module: torch.nn.Module, qualname: str, buf: torch.Tensor) -> None:
    prefix, _, attr = qualname.rpartition(".")
    (module.get_submodule(prefix) if prefix else module)._buffers[attr] = buf
