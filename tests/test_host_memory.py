"""The CPU memory probes: the resident-set peak and autograd's saved bytes."""

from __future__ import annotations

import pytest
import torch

from fxshard.cost_models.host_memory import ResidentPeak, SavedTensors, pin_mmap_threshold, resident_bytes, trim_heap
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
