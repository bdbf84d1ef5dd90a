"""The user's loss, called per micro-batch: its arguments checked first, its failures explained.

``step`` calls ``loss_fn(output, target)`` (``loss_fn(output)`` without a target) once per
micro-batch, on split outputs and a split target. Two mistakes then surface deep inside torch
as bare ``TypeError``/``ValueError``: a loss that needs a target called without one, and a
target whose rows do not match the inputs' (its micro-batches pair with the wrong outputs).
:func:`check_loss_call` refuses both before anything runs, alike on every rank;
:func:`call_loss` turns what still fails inside the loss into an ``ExecutionError`` naming the
call, the batch sizes and the micro-batch, chained to the original exception.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxshard.errors import ExecutionError

__all__ = ["LossCall", "call_loss", "check_loss_call", "leading_rows"]

# What torch and Python raise for arguments a loss cannot take; anything else the user's loss
# raises (its own exception classes) passes through unchanged.
_ARGUMENT_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, AttributeError)


@dataclasses.dataclass(frozen=True)
class LossCall:
    """How ``step`` calls the loss: the batch, how it is split, and whether a target is given.

    Attributes:
        batch: the inputs' batch size (rows of a batched input).
        microbatches: micro-batches the batch runs in (per replica).
        replicas: data-parallel replicas the batch is shared over (1 in one process).
        has_target: whether ``step`` got a target.
    """

    batch: int
    microbatches: int
    replicas: int = 1
    has_target: bool = True

    @property
    def splits(self) -> int:
        return self.microbatches * self.replicas

    @property
    def call(self) -> str:
        return "loss_fn(output, target)" if self.has_target else "loss_fn(output)"

    def split_text(self) -> str:
        """``"a batch of 8 in 4 micro-batches of 2"`` (replicas too, when there are several)."""
        if self.splits == 1:
            return f"a batch of {self.batch} in one piece"
        parts = f"{self.microbatches} micro-batch{'es' if self.microbatches > 1 else ''}"
        if self.replicas > 1:
            parts += f" on each of {self.replicas} replicas"
        return f"a batch of {self.batch} in {parts} of {self.batch / self.splits:g}"


def leading_rows(value: Any) -> int | None:
    """Rows of the first tensor leaf with a dimension (what the micro-batch split cuts)."""
    return next((t.shape[0] for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.dim() > 0),
                None)


def _loss_name(loss_fn: Callable) -> str:
    name = getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None)
    return name or type(loss_fn).__name__


def _needs_two(loss_fn: Callable) -> bool:
    """Whether ``loss_fn(output)`` cannot bind: the loss needs a second positional argument.
    False when the signature cannot be read (a builtin): the call itself then decides."""
    fn = loss_fn.forward if isinstance(loss_fn, torch.nn.Module) else loss_fn
    try:
        inspect.signature(fn).bind(object())
    except TypeError:
        return True
    except ValueError:  # no signature
        return False
    return False


def check_loss_call(loss_fn: Callable, target: Any, how: LossCall) -> None:
    """Refuse a call the loss cannot take before anything runs.

    Raises:
        ExecutionError: ``target`` is None but ``loss_fn`` needs one; or the target is split
            with the batch (several micro-batches or replicas) and its rows are not a multiple
            of the batch, so its pieces would not pair with the outputs' micro-batches.
    """
    name = _loss_name(loss_fn)
    if target is None:
        if _needs_two(loss_fn):
            raise ExecutionError(
                f"step was given no target, so it calls {how.call}, but {name} needs two arguments "
                f"(output, target). Pass target= to step (one row per input row: {how.split_text()}; "
                f"under torchrun, the same target on every rank), or give a loss_fn that takes the output alone")
        return
    rows = leading_rows(target)
    if rows is None or how.splits == 1 or how.batch <= 0:
        return
    if rows % how.batch:
        raise ExecutionError(
            f"loss_fn(output, target) ({name}) would pair each micro-batch's output with the wrong target rows: "
            f"the target has {rows} rows (shape {_shape_of(target)}), the inputs a batch of {how.batch}; step runs "
            f"{how.split_text()} rows, so each output has {how.batch / how.splits:g} rows and each piece of the "
            f"target {rows / how.splits:g} rows. Pass a target with one row per input row ({how.batch} rows)")


def call_loss(loss_fn: Callable, output: Any, target: Any, how: LossCall, *, microbatch: int = 0) -> torch.Tensor:
    """``loss_fn(output, target)`` (``loss_fn(output)`` when ``target`` is None), with what goes
    wrong inside it for bad arguments turned into an ``ExecutionError`` chained to the cause."""
    try:
        return loss_fn(output, target) if target is not None else loss_fn(output)
    except _ARGUMENT_ERRORS as e:
        out_rows, tgt_rows = leading_rows(output), leading_rows(target)
        where = f" on micro-batch {microbatch + 1} of {how.splits}" if how.splits > 1 else ""
        rows = f"the output has {out_rows} rows" + (f" and the target {tgt_rows} rows" if target is not None else "")
        if target is not None and out_rows is not None and tgt_rows is not None and out_rows != tgt_rows:
            fix = f"Pass a target with one row per input row ({how.batch} rows)"
        elif target is None:
            fix = "step got no target: pass target= to step, or give a loss_fn that takes the output alone"
        else:
            fix = "The error comes from inside the loss: check that it accepts the model's output and this target"
        cause = (str(e).strip().splitlines() or [""])[0][:300].rstrip(".")
        raise ExecutionError(
            f"{how.call} ({_loss_name(loss_fn)}) failed{where}: {type(e).__name__}: {cause}. Here {rows} "
            f"({how.split_text()}). {fix}") from e


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return str([tuple(t.shape) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)])
