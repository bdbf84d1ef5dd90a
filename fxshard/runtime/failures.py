"""How a distributed run tells a peer's failure from its own: the communication errors gloo
and NCCL raise, the first line of a chained error, the process group's timeout.

Used by :class:`fxshard.runtime.distributed.DistributedPipeline`'s failure guard; see the
"When a rank fails" section of docs/runtime.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["FAILURE_KEY", "POLL_S", "first_line", "gloo_line", "is_comm_error", "pg_timeout_s"]

FAILURE_KEY = "fxshard/failure"
POLL_S = 0.25

_COMM_PATTERNS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Read error",
                  "Write error", "gloo/transport", "NCCL", "Socket Timeout", "Broken pipe",
                  "has not been initialized", "has been destroyed")


def is_comm_error(e: BaseException | None) -> bool:
    """A failure of communication (a peer gone or silent), not of this rank's own code."""
    if e is None:
        return False
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e) for p in _COMM_PATTERNS)


def first_line(e: BaseException) -> str:
    """The root cause's type and first line (torch's pipelining wraps a stage's error in a
    RuntimeError that lists the arguments)."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip().splitlines()
    line = text[0][:300] if text else ""
    return f"{type(root).__name__}: {line}" if root is not e else line


def gloo_line(e: BaseException) -> str:
    """The backend's message without its source path and sign-off."""
    line = first_line(e)
    if "] " in line and line.startswith("["):
        line = line.split("] ", 1)[1]
    return line.split(". This is typically")[0]


def pg_timeout_s() -> float:
    """The default group's timeout (what a receive waits for a silent peer)."""
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:  # NCCL-only groups and older torch
        return dist.constants.default_pg_timeout.total_seconds()
