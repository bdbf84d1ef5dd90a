"""Peak memory of a step on the CPU: the resident-set high-water mark, and autograd's saved bytes.

torch keeps no CPU allocator statistics (``torch.cuda.max_memory_allocated`` has no CPU twin),
so the CPU is measured through the kernel: ``VmHWM`` in ``/proc/self/status`` is the process's
resident-set high-water mark, and writing ``5`` to ``/proc/self/clear_refs`` resets it to the
current resident set (Linux 4.0 and later). The resident set follows the live tensors only if a
freed tensor goes back to the kernel. glibc serves a large block with its own ``mmap`` and
unmaps it on free, but its threshold is dynamic: it rises to the size of the largest block freed
(up to 32 MiB), after which freed tensors stay in the heap and the resident set stops falling.
:func:`pin_mmap_threshold` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, what the
``MALLOC_MMAP_THRESHOLD_`` environment variable does), so every tensor above it is a mapping of
its own and the high-water mark is the peak of the live bytes plus the small heap.

:class:`SavedTensors` counts, during a forward, the bytes autograd saves for backward (distinct
storages, parameters excluded): the activations a micro-batch keeps alive until its backward.
See docs/calibration.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from fxshard.errors import CostModelError

__all__ = ["GLIBC_MMAP_THRESHOLD_MAX", "ResidentPeak", "SavedTensors", "file_backed_bytes", "pin_mmap_threshold",
           "resident_bytes", "trim_heap"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""Where glibc's dynamic mmap threshold ends on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)."""


def pin_mmap_threshold(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve every allocation above ``threshold_bytes`` with its own mapping, returned on free.

    Returns whether it took effect (False where the C library is not glibc).
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))) if mallopt is not None else False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``; nothing elsewhere).

    After steps that ran unpinned, malloc serves new tensors from pages already resident, which
    a high-water mark cannot see: trimming first makes every page a step touches count.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def _status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and ``RssFile`` of this process, in bytes."""
    out = {}
    with open(_STATUS) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def file_backed_bytes() -> int | None:
    """This process's resident file-backed pages now (``RssFile``: the code of the libraries it
    has run, which stays resident; None where ``/proc`` does not say)."""
    try:
        return _status().get("RssFile")
    except OSError:
        return None


def resident_bytes() -> int | None:
    """This process's resident set now (None where ``/proc`` does not say)."""
    try:
        return _status().get("VmRSS")
    except OSError:
        return None


class ResidentPeak:
    """The resident-set peak above a baseline, between :meth:`start` and :meth:`peak_bytes`.

    Example::

        probe = ResidentPeak()
        probe.start()                 # baseline: the resident set now
        train_steps()
        grown = probe.peak_bytes()    # high-water mark since start, minus the baseline
    """

    def __init__(self) -> None:
        self.baseline_bytes: int | None = None

    @staticmethod
    def available() -> bool:
        """Whether this system reports and resets the high-water mark."""
        return os.path.exists(_STATUS) and os.access(_CLEAR_REFS, os.W_OK)

    def start(self) -> None:
        """Reset the high-water mark and take the resident set now as the baseline."""
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        self.baseline_bytes = _status()["VmRSS"]

    @classmethod
    def of(cls, fn: Callable[[], object]) -> int:
        """The resident peak of one call of ``fn`` above the resident set before it, the heap's
        free pages handed back first (warm ``fn`` up before, so that one-off allocations are not
        counted)."""
        probe = cls()
        trim_heap()
        probe.start()
        fn()
        return probe.peak_bytes()

    def peak_bytes(self) -> int:
        """The high-water mark since :meth:`start`, above the baseline."""
        if self.baseline_bytes is None:
            raise CostModelError("ResidentPeak.peak_bytes() was called before start(): call start() at the "
                                 "point the peak is measured from")
        return max(0, _status()["VmHWM"] - self.baseline_bytes)


class SavedTensors:
    """Bytes autograd saves for backward while the context is open (distinct storages).

    Args:
        exclude: tensors not to count (the parameters: a saved weight is not an activation).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._exclude and ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += storage.nbytes()
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedTensors]:
        """Count what forwards run inside the block save."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
