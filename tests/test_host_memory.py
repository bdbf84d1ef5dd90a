"""The CPU memory probes: the resident-set peak and autograd's saved bytes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fxshard.cost_models.host_memory import (
    ResidentPeak,
    SavedTensors,
    pin_mmap_threshold,
    resident_bytes,
    trim_heap,
)
from fxshard.errors import CostModelError

_MiB = 2**20


@pytest.mark.skipif(not ResidentPeak.available(), reason="needs /proc/self/clear_refs (Linux)")
def test_the_peak_sees_a_tensor_freed_before_it_is_read():
    pin_mmap_threshold()
    trim_heap()
    probe = ResidentPeak()
    probe.start()
    x = torch.ones(16 * _MiB)  # 64 MiB, touched
    del x
    grown = probe.peak_bytes()
    assert 60 * _MiB <= grown <= 96 * _MiB, grown / _MiB
    assert resident_bytes() is not None


_HEAP_MODES = """
import torch
from fxshard.cost_models.host_memory import heap_retained, released_heap, resident_bytes, retained_heap

MiB = 2**20


def drop(mib):
    x = torch.ones(mib * MiB // 4)  # touched
    before = resident_bytes()
    del x
    return before - resident_bytes()


with retained_heap() as kept:
    assert kept and heap_retained()
    assert drop(64) < 8 * MiB
    with released_heap() as pinned:
        assert pinned and not heap_retained()
        # larger than any block the heap holds free: a mapping of its own, handed back on free
        assert drop(96) >= 88 * MiB
    assert heap_retained()
    assert drop(128) < 8 * MiB
assert not heap_retained()
with retained_heap(torch.device("meta")) as kept:  # a device whose tensors are not in the heap
    assert not kept and not heap_retained()
"""

_WARM = """
import torch
from fxshard.cost_models import timing
from fxshard.cost_models.host_memory import released_heap

calls = []
with released_heap():  # every 8 MiB tensor a fresh mapping (nothing freed in the heap yet): 2048 faults a step
    timing._warm_heap(lambda: calls.append(torch.ones(2 * 2**20).sum()))
assert len(calls) == timing._WARM_MAX_STEPS, len(calls)
calls.clear()
timing._warm_heap(lambda: calls.append(1))
assert len(calls) == 2, len(calls)
"""


def _fresh_process(code: str) -> None:
    """Run ``code`` in a new interpreter: what a heap mode does depends on the blocks the heap already
    holds free, which earlier tests in this process leave behind."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not ResidentPeak.available() or not pin_mmap_threshold(),
                    reason="needs /proc/self/status and glibc's mallopt")
def test_a_retained_heap_keeps_freed_memory_and_a_released_one_gives_it_back():
    """The two allocator modes: fxshard's CPU ranks time with freed memory kept (no page faults on
    reuse), memory is measured with it handed back; each block puts back the mode it found."""
    _fresh_process(_HEAP_MODES)


@pytest.mark.skipif(not ResidentPeak.available() or not pin_mmap_threshold(),
                    reason="needs Linux's page-fault counts and glibc's mallopt")
def test_timing_warms_up_until_steps_stop_faulting_in_fresh_pages():
    """The steady state a training process times at: steps that touch fresh pages every time are
    warmed up to the limit; steps that touch none stop after two."""
    _fresh_process(_WARM)


def test_peak_before_start_is_an_error():
    with pytest.raises(CostModelError, match="before start"):
        ResidentPeak().peak_bytes()


def test_saved_bytes_are_the_activations_a_hand_count_gives():
    """Linear saves its input, GELU its input, the second Linear its input: three 4096 x 256
    fp32 tensors; the weights are parameters and are not counted."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    x = torch.randn(4096, 256)
    saved = SavedTensors(exclude=m.parameters())
    with saved.counting():
        m(x).sum().backward()
    assert saved.bytes == 3 * 4096 * 256 * 4
    unexcluded = SavedTensors()
    with unexcluded.counting():
        m(x).sum()
    # The second Linear's weight, saved for its input's gradient (the first one's input needs none).
    assert unexcluded.bytes == saved.bytes + 256 * 256 * 4
