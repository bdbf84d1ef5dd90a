"""The entry point :func:`capture`: symbolic_trace, else torch.export, with the failure explained."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from fxshard.capture.diagnose import export_failure, first_line, quiet_torch, symbolic_failure
from fxshard.capture.export import capture_export
from fxshard.capture.graph import CapturedGraph
from fxshard.capture.guard import state_guard
from fxshard.capture.symbolic import capture_symbolic
from fxshard.errors import CaptureError

__all__ = ["Method", "capture"]

Method = Literal["auto", "symbolic_trace", "export"]


def capture(model: torch.nn.Module, example_inputs: tuple | Mapping[str, Any] | Any = (),
            *, example_kwargs: Mapping[str, Any] | None = None, method: Method = "auto",
            leaf_modules: Iterable[type | str] = ()) -> CapturedGraph:
    """Trace ``model`` into a flat fx graph with shapes, without running it for real.

    Args:
        model: the module; on a real device or on ``meta``. It is never mutated.
        example_inputs: positional inputs (a tuple; a single tensor is accepted), or a dict
            of keyword inputs.
        example_kwargs: keyword inputs, besides positional ones.
        method: ``"auto"`` (symbolic_trace, then torch.export), or force one of them.
        leaf_modules: module types or qualified names to keep as single nodes.

    Returns:
        A :class:`CapturedGraph`.

    Raises:
        CaptureError: the model cannot be traced (both reasons are given for ``auto``), or
            the example inputs do not fit the model; the message names the model's failing
            line and, for code that depends on tensor values, the way around it. torch's
            logging and warnings are held back while capture runs (docs/robustness.md).

    Example::

        graph = capture(model, (tokens,))
        for node in graph.gm.graph.nodes:
            print(node.name, node.meta["tensor_meta"])
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    if method not in ("auto", "symbolic_trace", "export"):
        raise CaptureError(f"method={method!r} is unknown; use 'auto', 'symbolic_trace' or 'export'")
    args, kwargs = _split_inputs(example_inputs, example_kwargs)
    with quiet_torch():
        return _capture(model, args, kwargs, method, tuple(leaf_modules))


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, method: Method,
             leaf_modules: tuple) -> CapturedGraph:
    name = type(model).__name__
    reasons: dict[str, str] = {}
    errors: list[BaseException] = []
    if method in ("auto", "symbolic_trace"):
        try:
            with state_guard(model):
                return capture_symbolic(model, args, kwargs, leaf_modules)
        except CaptureError:
            raise
        except Exception as e:  # fx raises many types: TraceError, TypeError, AttributeError...
            reasons["symbolic_trace"] = f"{type(e).__name__}: {first_line(e)}"
            errors.append(e)
            if method == "symbolic_trace":
                raise CaptureError(symbolic_failure(name, e, reasons["symbolic_trace"])) from e
    try:
        return capture_export(model, args, kwargs, reasons.get("symbolic_trace", ""))
    except CaptureError:
        raise
    except Exception as e:
        reasons["torch.export"] = f"{type(e).__name__}: {first_line(e)}"
        raise CaptureError(export_failure(name, e, reasons, errors)) from e


def _split_inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple, dict]:
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, list):
        return tuple(example_inputs), kwargs
    if not isinstance(example_inputs, tuple):
        return (example_inputs,), kwargs
    return example_inputs, kwargs
