"""The CPU memory probes: the resident-set peak and autograd's saved bytes."""

from __future__ import annotations

import pytest
import torch

from fxshard.cost_models.host_memory import (
    ResidentPeak,
    SavedTensors,
    heap_retained,
    pin_mmap_threshold,
    released_heap,
    resident_bytes,
    retained_heap,
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


def _resident_drop_of_a_freed_64_mib_tensor() -> int:
    x = torch.ones(16 * _MiB)  # 64 MiB, touched
    before = resident_bytes()
    del x
    return before - resident_bytes()


@pytest.mark.skipif(not ResidentPeak.available() or not pin_mmap_threshold(),
                    reason="needs /proc/self/status and glibc's mallopt")
def test_a_retained_heap_keeps_freed_memory_and_a_released_one_gives_it_back():
    """The two allocator modes: fxshard's CPU ranks time with freed memory kept (no page faults on
    reuse), memory is measured with it handed back; each block puts back the mode it found."""
    with retained_heap() as kept:
        assert kept and heap_retained()
        assert _resident_drop_of_a_freed_64_mib_tensor() < 8 * _MiB
        with released_heap() as pinned:
            assert pinned and not heap_retained()
            assert _resident_drop_of_a_freed_64_mib_tensor() >= 56 * _MiB
        assert heap_retained()
        assert _resident_drop_of_a_freed_64_mib_tensor() < 8 * _MiB
    assert not heap_retained()
    assert _resident_drop_of_a_freed_64_mib_tensor() >= 56 * _MiB  # above glibc's 32 MiB mmap threshold again
    with retained_heap(torch.device("meta")) as kept:  # a device whose tensors are not in the heap
        assert not kept and not heap_retained()


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


@pytest.mark.skipif(not ResidentPeak.available() or not pin_mmap_threshold(),
                    reason="needs Linux's page-fault counts and glibc's mallopt")
def test_timing_warms_up_until_steps_stop_faulting_in_fresh_pages():
    """The steady state a training process times at: steps that touch fresh pages every time are
    warmed up to the limit; steps that touch none stop after two."""
    from fxshard.cost_models import timing

    calls = []
    with released_heap():  # every 8 MiB tensor a fresh mapping: 2048 faults a step
        timing._warm_heap(lambda: calls.append(torch.ones(2 * _MiB).sum()))
    assert len(calls) == timing._WARM_MAX_STEPS
    calls.clear()
    timing._warm_heap(lambda: calls.append(1))
    assert len(calls) == 2
