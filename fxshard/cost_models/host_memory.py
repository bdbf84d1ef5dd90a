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

Timing wants the opposite. A training step frees and re-makes the same large tensors every
micro-batch; when glibc hands them back to the kernel (a block above the mmap threshold, or the
heap's top above the trim threshold), the next micro-batch pays a page fault per page it touches
again. Measured on GPT-2's 2-rank pipeline under torchrun (docs/calibration.md, "The CPU heap"):
1017-1025 ms a step with glibc's defaults, 720 ms with freed memory kept, as a GPU's caching
allocator keeps it. :func:`retain_freed_memory` keeps it (both thresholds raised), and fxshard's
CPU ranks and the profiled model's CPU timing run so; :func:`released_heap` pins the thresholds
low for a memory measurement and puts back the mode it found.

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

__all__ = ["GLIBC_MMAP_THRESHOLD_MAX", "ResidentPeak", "SavedTensors", "file_backed_bytes", "heap_retained",
           "pin_mmap_threshold", "released_heap", "resident_bytes", "retain_freed_memory", "retained_heap", "trim_heap"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""Where glibc's dynamic mmap threshold ends on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)."""
_GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's default M_TRIM_THRESHOLD (DEFAULT_TRIM_THRESHOLD)
# Retained: blocks up to 1 GiB come from the heap, and up to 2 GiB - 1 of free heap top stays
# (mallopt takes a C int). A block above 1 GiB is still a mapping: its faults are few per use.
_RETAIN_MMAP_THRESHOLD = 1 << 30
_RETAIN_TRIM_THRESHOLD = (1 << 31) - 1
_retained = False  # whether retain_freed_memory() took effect in this process


def pin_mmap_threshold(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve every allocation above ``threshold_bytes`` with its own mapping, returned on free.

    Returns whether it took effect (False where the C library is not glibc). A retained heap
    (:func:`retain_freed_memory`) is no longer retained after it.
    """
    global _retained
    pinned = _mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    _retained = _retained and not pinned
    return pinned


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return bool(mallopt(param, int(value))) if mallopt is not None else False


def retain_freed_memory() -> bool:
    """Keep freed memory in this process's heap for the next allocation, as a GPU's caching
    allocator does, instead of handing it back to the kernel and faulting it in again.

    Raises glibc's mmap threshold to 1 GiB and its trim threshold to 2 GiB (``mallopt``; what
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do), for the rest of the process.
    The resident set then stays at the step's high-water mark (fragmentation included) instead
    of following the live tensors. Returns whether it took effect (False where the C library is
    not glibc). See docs/runtime.md, "A CPU rank keeps freed memory".
    """
    global _retained
    mmap = _mallopt(_M_MMAP_THRESHOLD, _RETAIN_MMAP_THRESHOLD) or _mallopt(_M_MMAP_THRESHOLD,
                                                                          GLIBC_MMAP_THRESHOLD_MAX)
    _retained = mmap and _mallopt(_M_TRIM_THRESHOLD, _RETAIN_TRIM_THRESHOLD)
    return _retained


def heap_retained() -> bool:
    """Whether :func:`retain_freed_memory` is in effect in this process."""
    return _retained


def _unretain() -> None:
    """The thresholds where a glibc training process's own end up: the dynamic mmap threshold's
    maximum (32 MiB) and twice that for the trim threshold (glibc raises it with the mmap one)."""
    global _retained
    _mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
    _mallopt(_M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX)
    _retained = False


@contextlib.contextmanager
def retained_heap(device: torch.device | None = None) -> Iterator[bool]:
    """:func:`retain_freed_memory` inside the block (yields whether it took effect); on leaving,
    a heap that was not retained before gets glibc's end-state thresholds (32 MiB mmap, 64 MiB
    trim), and glibc's own trimming hands its free top back. ``device``: a GPU leaves the heap
    alone (its tensors are not in it)."""
    if device is not None and device.type != "cpu":
        yield False
        return
    before = _retained
    try:
        yield retain_freed_memory()
    finally:
        if not before:
            _unretain()


@contextlib.contextmanager
def released_heap(threshold_bytes: int = 128 * 1024) -> Iterator[bool]:
    """Every block above ``threshold_bytes`` a mapping of its own and the heap trimmed at glibc's
    default, so freed tensors leave the resident set, inside the block (a memory measurement;
    yields whether it took effect); on leaving, the mode it found: retained again, or glibc's
    end-state thresholds. A block the heap already holds free is still reused, and stays resident
    when freed again: measure before anything has kept freed memory in this process."""
    before = _retained
    pinned = pin_mmap_threshold(threshold_bytes) and _mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    try:
        yield pinned
    finally:
        if before:
            retain_freed_memory()
        else:
            _unretain()


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
