"""The state guard: symbolic_trace runs forward's in-place state updates as plain Python.

``self.buf += 1`` or ``self.ema.mul_(...)`` runs once on the real tensors while tracing and is
left out of the graph. :func:`state_guard` undoes such an update and refuses the graph with
:class:`StateMutated`, so that capture falls back to torch.export (which records state updates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fxshard.errors import CaptureError

__all__ = ["StateMutated", "state_guard"]


class StateMutated(RuntimeError):
    """symbolic_trace ran an in-place update of the model's state as plain Python."""


@contextlib.contextmanager
def state_guard(model: torch.nn.Module) -> Iterator[None]:
    """Undo in-place updates of ``model``'s state made inside the block, then refuse them.

    Raises:
        StateMutated: a buffer (or a meta tensor) changed; the change is undone.
        CaptureError: a parameter changed that cannot be restored.
    """
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    versions = {name: t._version for name, t in state.items()}
    saved = {name: b.detach().clone() for name, b in model.named_buffers(remove_duplicate=False)
             if b.device.type != "meta"}
    try:
        yield
    finally:
        changed = sorted(name for name, t in state.items() if t._version != versions[name])
        with torch.no_grad():
            for name in changed:
                if name in saved:
                    state[name].copy_(saved[name])
    if changed:
        restored = [n for n in changed if n in saved or state[n].device.type == "meta"]
        lost = [n for n in changed if n not in restored]
        if lost:
            raise CaptureError(f"tracing {type(model).__name__} changed its parameters {lost[:3]} in place, outside "
                               f"torch.no_grad() bookkeeping fxshard can undo; move that update out of forward")
        raise StateMutated(f"forward updates {', '.join(changed[:3])} in place, which symbolic_trace runs once "
                           f"instead of recording")
