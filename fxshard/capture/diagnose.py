"""Why a capture failed, in the user's terms: the source line, the cause and the way out.

torch reports a capture failure from deep inside its tracers, with graph dumps and its own
frames. :func:`source_line` finds the line of the model's code that the failure traces back
to, and :func:`data_dependence` recognises the one cause a user most often meets: forward reads
a tensor's value (``.item()``, ``if x.sum() > 0:``, ``x[mask]``), which capture cannot follow
because it runs on shapes alone. :func:`quiet_torch` keeps torch's logging and warnings out of
the terminal while capture runs. See docs/robustness.md, "Capture failures".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sysconfig
import traceback
import warnings
from collections.abc import Iterator

import torch

__all__ = ["SourceLine", "data_dependence", "export_failure", "first_line", "quiet_torch", "source_line",
           "symbolic_failure"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FXSHARD_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # fxshard/, above fxshard/capture/
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (300 characters at most), or its type's name."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


@dataclasses.dataclass(frozen=True)
class SourceLine:
    """One line of the model's code."""

    filename: str
    lineno: int
    code: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}" + (f" (`{self.code}`)" if self.code else "")


def _is_users(filename: str) -> bool:
    return not filename.startswith((_TORCH_DIR, _FXSHARD_DIR, _STDLIB_DIR, "<eval_with_key"))


def source_line(error: BaseException | None = None, stack_trace: str | None = None) -> SourceLine | None:
    """The innermost line of the model's own code (not torch's, fxshard's or the standard
    library's) in ``error``'s traceback (its causes included), else in an fx node's
    ``stack_trace`` text; None when neither has one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame in reversed(traceback.extract_tb(error.__traceback__)):
            if _is_users(frame.filename):
                return SourceLine(frame.filename, frame.lineno or 0, (frame.line or "").strip())
        error = error.__cause__ or error.__context__
    if stack_trace:
        lines = stack_trace.splitlines()
        found = None
        for i, text in enumerate(lines):
            m = re.match(r'\s*File "(.+)", line (\d+), in ', text)
            if m and _is_users(m.group(1)):
                code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("File ") else ""
                found = SourceLine(m.group(1), int(m.group(2)), code)
        return found
    return None


_READS = re.compile(r"\.(item|tolist)\(|\b(int|float)\(")


def data_dependence(error: BaseException, *, target: str = "", line: SourceLine | None = None) -> str | None:
    """Say what part of forward depends on tensor values, and how to avoid it, when that is
    why ``error`` (or one of its causes) was raised; None for any other failure.

    Args:
        error: the exception from tracing or fake-tensor propagation.
        target: the failing fx node's target, when known (``"item"``, ``"aten.nonzero"``...).
        line: the model's source line; a guard on a value is a branch unless the line reads one.
    """
    kind = _kind(error)
    if kind is None:
        return None
    code = line.code if line else ""
    if kind == "shape":
        return ("data-dependent shape: the shape of a result depends on tensor values (boolean-mask indexing such "
                "as x[mask], nonzero, unique, masked_select), which capture cannot know: it runs on shapes alone. "
                "Ways out: keep shapes fixed, e.g. torch.where(mask, x, 0) instead of x[mask], or do the selection "
                "outside forward")
    reads = bool(_READS.search(code)) or "item" in target or "scalar_dense" in target
    if kind == "guard" and not reads:
        return ("data-dependent control flow: forward branches on a tensor's value, which capture cannot know: it "
                "runs on shapes alone, so it cannot tell which way the branch goes. Ways out: compute both sides "
                "and pick with torch.where(cond, a, b); use torch.cond(pred, true_fn, false_fn, operands); or decide "
                "outside forward and pass the decision as a non-tensor argument (a Python bool)")
    return ("data-dependent value: forward reads a tensor's value (.item(), .tolist(), int()/float() of a tensor), "
            "which capture cannot know: it runs on shapes alone. Ways out: keep it a tensor (a 0-d tensor "
            "broadcasts: y * x.sum() instead of y * x.sum().item()); move the computation out of forward; or pass "
            "the number as a non-tensor argument of forward")


def _kind(error: BaseException) -> str | None:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DynamicOutputShapeException):
            return "shape"
        if isinstance(error, DataDependentOutputException):
            return "read"
        if isinstance(error, GuardOnDataDependentSymNode) or "data-dependent expression" in str(error):
            return "guard"
        error = error.__cause__ or error.__context__
    return None


def symbolic_failure(name: str, error: BaseException, reason: str) -> str:
    """The message for ``method="symbolic_trace"`` failing on model ``name``."""
    line = source_line(error)
    return (f"torch.fx.symbolic_trace failed on {name}{f' at {line}' if line else ''}: {reason}. "
            f"Try method='export', or mark the failing submodule as a leaf with leaf_modules=(ItsClass,)")


def export_failure(name: str, error: BaseException, reasons: dict[str, str], earlier: list[BaseException]) -> str:
    """The message for torch.export failing on model ``name`` (after symbolic_trace, for ``auto``).

    Args:
        name: the model's class name.
        error: torch.export's exception.
        reasons: each method's failure, in the order they were tried.
        earlier: the exceptions of the methods tried before torch.export.
    """
    detail = "; ".join(f"{k} failed with {v}" for k, v in reasons.items())
    cache = re.search(r"<class '([\w.]*Cache)'>", str(error))
    if cache:
        return (f"cannot capture {name}: it returns a key/value cache ({cache.group(1).rsplit('.', 1)[-1]}), which "
                f"a pipeline does not carry between steps. Pass use_cache=False with the inputs, or set "
                f"model.config.use_cache = False ({detail})")
    # torch.export ran forward as Python, so its traceback holds the model's failing line.
    line = source_line(error) or next((x for x in map(source_line, earlier) if x), None)
    cause = data_dependence(error, line=line)
    if cause:
        return f"cannot capture {name}{f' at {line}' if line else ''}: {cause} ({detail})"
    return (f"cannot capture {name}{f' (failing at {line})' if line else ''}: {detail}. Ways out: make "
            f"data-dependent control flow depend on shapes only or use torch.cond; mark untraceable submodules "
            f"with leaf_modules=(...); for Hugging Face-style models pass use_cache=False and "
            f"return_dict=True in the config; pass example inputs of the real types")


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Hold back torch's logging and all warnings while capture traces the model; restore both.

    torch.export logs graph dumps when it meets data-dependent code, and the tracers warn about
    deprecations; capture reports a failure itself, naming the model's line, and a tracing pass
    runs no user computation whose warnings would be lost (they come again at the real run).
    """
    loggers = [logging.getLogger("torch")]
    loggers += [lg for name, lg in list(logging.root.manager.loggerDict.items())
                if name.startswith("torch.") and isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        # Every torch logger that has a level of its own, and "torch" for those created meanwhile.
        lg.setLevel(logging.CRITICAL + 1)
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled
