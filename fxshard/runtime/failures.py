"""When a rank fails: every rank learns of it within seconds, by the job's store.

:class:`FailureGuard` runs each call of a distributed execution, publishes a failure, and
watches (in a monitor thread) for another rank's; the helpers tell a peer's failure from this
rank's own: the communication errors gloo and NCCL raise, the first line of a chained error,
the process group's timeout. See the "When a rank fails" section of docs/runtime.md.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fxshard.errors import ExecutionError

__all__ = ["FAILURE_KEY", "POLL_S", "FailureGuard", "first_line", "gloo_line", "is_comm_error", "pg_timeout_s"]

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


class FailureGuard:
    """Turns a failure anywhere in the job into an ExecutionError on every rank.

    A rank whose own code raises publishes the error in the job's store; the monitors of the
    ranks blocked on it stop them within seconds instead of at the process group's timeout. A
    rank whose communication fails (a peer closed its connection, died, or sent nothing within
    the timeout) names the rank that failed first, when that rank published its error, and
    publishes its own failure in turn. Either way the execution is then unusable: later calls
    raise at once (restart the job and resume from a checkpoint). fxshard's own checks of a
    call (inputs, the loss call's target) run alike on every rank before any message and leave
    it usable: a call marks the point where messages start to flow with :meth:`sending`.

    Args:
        rank, world: this rank and the job's size.
        grace_s: how long a rank blocked in a call may go on after another rank's failure.
    """

    def __init__(self, rank: int, world: int, *, grace_s: float = 2.0) -> None:
        self.rank = rank
        self.world = world
        self.grace_s = grace_s
        self.failure: str | None = None
        self.calls = 0
        self._store = dist.distributed_c10d._get_default_store()  # kept: it outlives a destroyed group
        self._timeout_s = pg_timeout_s()
        self._in_call = False
        self._sending = False
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="fxshard-failure-monitor", daemon=True)

    def sending(self) -> None:
        """Messages flow from here on: an ExecutionError now is a failure of the job."""
        self._sending = True

    def run(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its failure published to every rank and raised as an ExecutionError."""
        if self.failure is not None:
            raise ExecutionError(f"rank {self.rank}: this pipeline already failed ({self.failure}); restart the "
                                 f"job (torchrun) and resume from the last checkpoint")
        self.calls += 1
        self._start_monitor()
        self._in_call, self._sending = True, False
        try:
            return fn(*args)
        except ExecutionError as e:
            if not self._sending:
                raise  # fxshard's own checks of the call, made alike on every rank before any message
            self.fail(f"rank {self.rank} failed in {what} #{self.calls}: {e}")  # the loss, mid-schedule
            raise ExecutionError(f"{self.failure}; the other ranks were told to stop") from e
        except Exception as e:  # every failure must reach the other ranks
            if is_comm_error(e):
                # Published too: ranks blocked on this one stop now rather than at their timeout.
                self.fail(f"communication failed on rank {self.rank} in {what} #{self.calls}: {self._why(e)}")
                raise ExecutionError(f"{self.failure}. Check that rank's log; the process group's timeout "
                                     f"is {self._timeout_s:.0f} s") from e
            root = first_line(e)
            self.fail(f"rank {self.rank} failed in {what} #{self.calls}: "
                      + (root if e.__cause__ is not None else f"{type(e).__name__}: {root}"))
            raise ExecutionError(f"{self.failure}; the other ranks were told to stop") from e
        finally:
            self._in_call = False

    def _why(self, e: BaseException) -> str:
        """What made this rank's communication fail: a peer's published error, else a guess."""
        first = self.published_failure()
        if first:
            return first
        if "Timed out" in str(e) or "Socket Timeout" in str(e):
            return (f"no message from a peer rank within the process group's timeout of {self._timeout_s:.0f} s: "
                    f"a rank is hung or far slower than the others ({gloo_line(e)})")
        return f"a peer rank closed its connection without reporting an error: it died ({gloo_line(e)})"

    def fail(self, message: str) -> None:
        """Publish this rank's failure; the other ranks' monitors stop them."""
        self.failure = message
        try:
            self._store.set(f"fxshard/failed/{self.rank}", message)
            self._store.compare_set(FAILURE_KEY, "", message)  # the first failure wins
        except Exception:  # the store's host may be gone already
            pass

    def published_failure(self, wait_s: float = 2.0) -> str:
        """The first error another rank published, waiting briefly for it to arrive."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._store.check([FAILURE_KEY]):
                    return self._store.get(FAILURE_KEY).decode()
            except Exception:  # the store's host died with its rank
                return ""
            if time.monotonic() > deadline:
                return ""
            time.sleep(0.05)

    def _start_monitor(self) -> None:
        """Start the monitor once; it is stopped and joined at interpreter exit, so it is never
        inside a store call when the process (or the store's host) goes away."""
        if self._monitor.ident is None:
            self._monitor.start()
            atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the monitor thread."""
        if self._monitor.ident is not None:
            self._stop.set()
            self._monitor.join(timeout=10.0)

    def _watch(self) -> None:
        """End this process when another rank has published a failure and this rank is still
        inside the same call ``grace_s`` later: blocked in a receive from the failed rank, which
        only the process group's timeout would end. Exits with status 1 after saying why on
        stderr. It reads the store only while this rank is inside a call."""
        poll_s = POLL_S * max(1.0, self.world / 32)  # the store's host answers every rank
        while not self._stop.wait(poll_s):
            if not self._in_call:
                continue
            try:
                failed = self._store.check([FAILURE_KEY])
                why = self._store.get(FAILURE_KEY).decode() if failed else ""
            except Exception:  # the store is gone: the job is over
                return
            if not failed:
                continue
            call = self.calls
            if self._stop.wait(self.grace_s):
                return
            if self._in_call and self.calls == call and self.failure is None:
                print(f"fxshard: rank {self.rank} stops: {why}; this rank was blocked in call #{call} waiting "
                      f"for it (exiting instead of waiting {self._timeout_s:.0f} s for the process group's "
                      f"timeout)", file=sys.stderr, flush=True)
                os._exit(1)
