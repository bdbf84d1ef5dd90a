"""A convolution's CPU backward workspace: the predicted bytes against one measured backward."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing

import pytest
import torch
from torch import nn

from fxshard.capture import capture
from fxshard.cost_models import analyze, scale_batch
from fxshard.cost_models.conv_workspace import conv_backward_workspace, onednn_float32_convolution
from fxshard.cost_models.host_memory import ResidentPeak, pin_mmap_threshold, trim_heap

MiB = 2**20


class _TwoConvs(nn.Module):
    """The first convolution reads the data (weight gradient only), the second an activation (both)."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.second = nn.Conv2d(mid, cout, k, stride=stride, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def _measured_workspaces(batch: int, cin: int, mid: int, size: int, cout: int, k: int,
                         stride: int) -> dict[str, int]:
    """Each convolution's measured workspace, in a fresh process (one thread, mmap threshold
    pinned): a pytest worker's earlier tests leave allocator and oneDNN state that its
    resident set would count."""
    torch.set_num_threads(1)
    pin_mmap_threshold()
    torch.manual_seed(0)
    model = _TwoConvs(cin, mid, cout, k, stride)
    x = torch.randn(batch, cin, size, size)
    with torch.no_grad():
        hidden = model.first(x)
    return {"first": _measured_workspace(model.first, x, input_grad=False),
            "second": _measured_workspace(model.second, hidden, input_grad=True)}


def _measured_workspace(conv: nn.Conv2d, x: torch.Tensor, *, input_grad: bool) -> int:
    """Resident-set peak of one backward of ``conv`` on ``x``, less the gradients it returns (best of 3)."""
    best = None
    for _ in range(3):
        inp = x.detach().requires_grad_(input_grad)
        y = conv(inp)
        grad_y = torch.randn_like(y)
        wrt = [inp, conv.weight] if input_grad else [conv.weight]
        gc.collect()
        trim_heap()
        probe = ResidentPeak()
        probe.start()
        grads = torch.autograd.grad([y], wrt, [grad_y])
        extra = probe.peak_bytes() - sum(g.numel() * g.element_size() for g in grads)
        best = extra if best is None else min(best, extra)
        del y, grad_y, grads
    return best


@pytest.mark.skipif(not ResidentPeak.available(), reason="needs Linux's resident-set high-water mark")
@pytest.mark.parametrize("batch, cin, mid, size, cout, k, stride", [
    (4, 3, 32, 96, 64, 3, 1),    # U-Net's first level: stride 1, the weight-gradient copies dominate
    (16, 3, 64, 32, 128, 3, 2),  # a ResNet downsampling: stride 2, the input gradient dominates
])
def test_predicted_workspace_matches_one_measured_backward(batch, cin, mid, size, cout, k, stride):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the backend choice follows the analysing process's threads, as the ranks'
    try:
        torch.manual_seed(0)
        model = _TwoConvs(cin, mid, cout, k, stride)
        works = {w.name: w for w in analyze(capture(model, (torch.randn(batch, cin, size, size),)))}
    finally:
        torch.set_num_threads(threads)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        measured = pool.submit(_measured_workspaces, batch, cin, mid, size, cout, k, stride).result(timeout=120)
    for name in ("first", "second"):
        predicted = works[name].backward_workspace_bytes
        assert predicted > MiB, (name, predicted)  # shapes large enough that noise is small beside it
        assert abs(predicted - measured[name]) <= 0.15 * measured[name], (name, predicted / MiB,
                                                                           measured[name] / MiB)


def test_rule_branches():
    f32 = 4
    x, gy = (16, 64, 32, 32), (16, 128, 16, 16)  # 4 MiB and 2 MiB

    def rule(x, gy, stride=(2, 2), input_grad=True, onednn=True, kernel=(3, 3), **kind):
        return conv_backward_workspace(x, gy, kernel=kernel, stride=stride, element_size=f32, input_grad=input_grad,
                                       weight_grad=True, onednn=onednn, **kind)

    assert rule(x, gy) == 2 * 4 * MiB  # stride 2: twice the input, above input + output gradient (6 MiB)
    assert rule(x, gy, input_grad=False) == 6 * MiB
    # 24 channels are copied padded to 32; a 3-channel image is not copied at all
    assert rule((1, 24, 8, 8), (1, 16, 8, 8), stride=(1, 1), input_grad=False) == (32 + 16) * 64 * f32
    assert rule((1, 3, 8, 8), (1, 16, 8, 8), stride=(1, 1), input_grad=False) == 16 * 64 * f32
    for kind in ({"channels_last": True}, {"groups": 2}, {"transposed": True}):
        assert rule(x, gy, **kind) == 0
    # Slow2d: one image's column buffer for the input gradient, nothing for the weight's
    assert rule((4, 32, 96, 96), (4, 8, 96, 96), stride=(1, 1), kernel=(1, 1), onednn=False) == 32 * 96 * 96 * f32
    assert rule((4, 32, 96, 96), (4, 8, 96, 96), stride=(1, 1), kernel=(1, 1), onednn=False, input_grad=False) == 0


def test_only_convolutions_carry_it_and_it_scales_with_the_batch():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 8 * 8, 4))
    works = analyze(capture(model, (torch.randn(4, 8, 8, 8),)))
    carrying = {w.name for w in works if w.backward_workspace_bytes}
    assert carrying == {"_0"}, carrying
    half = {w.name: w for w in scale_batch(works, 0.5)}
    assert half["_0"].backward_workspace_bytes == next(w for w in works if w.name == "_0").backward_workspace_bytes // 2


def test_channels_last_input_needs_no_copies():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    works = analyze(capture(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), conv), (x,)))
    assert all(w.backward_workspace_bytes == 0 for w in works)


@pytest.mark.parametrize("threads", [1, 2])
def test_backend_rule_is_torchs(threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, cin, size, cout, k, stride, dilation, groups in [
                (4, 64, 16, 256, 1, 1, 1, 1), (16, 64, 16, 256, 1, 1, 1, 1), (4, 64, 16, 256, 1, 2, 1, 1),
                (1, 64, 8, 64, 3, 1, 1, 1), (1, 64, 64, 64, 3, 1, 1, 1), (1, 8, 8, 8, 5, 1, 1, 1),
                (1, 8, 8, 8, 3, 1, 2, 1), (1, 8, 8, 8, 3, 1, 1, 2), (2, 3, 16, 8, 3, 1, 1, 1),
                (1, 3, 96, 8, 1, 1, 1, 1)]:
            x, w = torch.empty(n, cin, size, size), torch.empty(cout, cin // groups, k, k)
            backend = torch._C._select_conv_backend(x, w, None, (stride,) * 2, (0, 0), (dilation,) * 2, False, (0, 0),
                                                    groups, None)
            ours = onednn_float32_convolution(x.shape, (k, k), stride=(stride,) * 2, dilation=(dilation,) * 2,
                                              groups=groups, threads=threads)
            assert ours == (backend.name == "Mkldnn"), (n, cin, size, k, stride, dilation, groups, backend)
    finally:
        torch.set_num_threads(saved)


def test_slow2d_convolution_holds_one_image_of_columns():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # a 1 x 1 convolution of 4 images on one thread runs on Slow2d
        model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 32, 1))  # the second's input needs a gradient
        works = {w.name: w for w in analyze(capture(model, (torch.randn(4, 16, 8, 8),)))}
    finally:
        torch.set_num_threads(saved)
    assert works["_1"].backward_workspace_bytes == 16 * 8 * 8 * 4
    assert works["_0"].backward_workspace_bytes == 0  # the data's convolution: its weight gradient only
