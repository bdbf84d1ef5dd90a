"""The CPU convolution backward's workspace: the bytes it holds beyond the gradients it returns.

torch picks oneDNN or its own ``Slow2d`` for a float32 CPU convolution
(:func:`onednn_float32_convolution`); each holds its own copies during backward
(:func:`conv_backward_workspace`, measured in ``benchmarks/conv_workspace.py``).
``analysis.analyze`` runs every node's backward under :class:`ConvWorkspace` and keeps the
largest as the node's transient bytes. See docs/cost_models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ConvWorkspace", "conv_backward_workspace", "onednn_float32_convolution"]


_ONEDNN_CHANNEL_BLOCK = 16
"""Channels per block of oneDNN's blocked layout (``nChw16c``): the floats in an AVX-512 register."""


def _blocked_channels(channels: int) -> int:
    if channels <= 3:
        return 0  # an image's 3 channels are read as they lie (measured: no copy)
    block = 8 if channels <= 8 else _ONEDNN_CHANNEL_BLOCK
    return -(-channels // block) * block


def onednn_float32_convolution(input_shape: Sequence[int], kernel: Sequence[int], *, stride: Sequence[int],
                               dilation: Sequence[int], groups: int, threads: int) -> bool:
    """Whether torch runs this float32 CPU convolution on oneDNN rather than its own ``Slow2d``.

    torch's rule (aten/src/ATen/native/Convolution.cpp, ``ConvParams::use_mkldnn``): a 1 x 1,
    stride-1, undilated kernel on fewer than 16 images on one thread stays native ("THNN is
    faster when single-threaded"), and so does a single small image (at most 20480 elements)
    under a kernel of at most 3 x 3 without groups. ``threads`` is ``torch.get_num_threads()``
    of the process that runs it. Checked against ``torch._C._select_conv_backend``
    (tests/test_conv_workspace.py).
    """
    n = input_shape[0]
    one_by_one = all(k == 1 for k in kernel)
    if not (any(s != 1 for s in stride) or any(d != 1 for d in dilation) or n >= 16 or not one_by_one
            or threads > 1):
        return False
    return (groups > 1 or all(k > 3 for k in kernel) or n > 1
            or n * input_shape[1] * input_shape[2] * input_shape[3] > 20480)


def conv_backward_workspace(input_shape: Sequence[int], grad_output_shape: Sequence[int], *,
                            kernel: Sequence[int], stride: Sequence[int], element_size: int, input_grad: bool,
                            weight_grad: bool, onednn: bool, channels_last: bool = False, groups: int = 1,
                            transposed: bool = False) -> int:
    """Bytes a 2-D convolution's backward holds on the CPU beyond the gradients it returns.

    Measured with ``ResidentPeak`` on one thread, torch 2.13 and oneDNN 3.12 on AVX-512
    (``python benchmarks/conv_workspace.py``, docs/cost_models.md). On oneDNN
    (:func:`onednn_float32_convolution`), which computes an NCHW input in its channel-blocked
    layout, backward holds blocked copies beside the plain tensors (within 8% at 4-32 MiB, 16%
    high at 2 MiB; 27% low on the gradient of a 3-channel input, which a model never asks for):

    - the weight gradient holds a copy of the input, its channels padded to the block (16; 8
      for 4-8 channels; a 3-channel image is not copied) and a copy of the output gradient;
    - the input gradient holds max(input, output gradient) at stride 1, twice the input at a
      larger stride;
    - when both are asked for they run one after the other: the larger of the two.

    A channels-last input needs no copies (measured under 1.1 MiB): 0. On ``Slow2d``, backward
    runs image by image: the input gradient holds one image's column buffer,
    C_in x kH x kW x H_out x W_out elements (measured 0.77 and 1.03 MiB against 1.0 and
    1.1), the weight gradient nothing. Grouped, transposed and other than 2-D convolutions
    were not measured: 0.

    Args:
        input_shape, grad_output_shape: (N, C, H, W) of the input and of the output gradient.
        kernel, stride: the convolution's kernel size and stride.
        element_size: bytes per element (measured in float32).
        input_grad, weight_grad: which gradients backward computes.
        onednn: whether torch runs it on oneDNN (else ``Slow2d``).
        channels_last, groups, transposed: the input's layout and the convolution's kind.
    """
    if groups != 1 or transposed or len(input_shape) != 4:
        return 0
    n, c, h, w = input_shape
    gy = n * grad_output_shape[1] * grad_output_shape[2] * grad_output_shape[3] * element_size
    if not onednn:
        return c * kernel[0] * kernel[1] * (gy // (n * grad_output_shape[1])) if input_grad else 0
    if channels_last:
        return 0
    x = n * c * h * w * element_size
    for_weight = n * _blocked_channels(c) * h * w * element_size + gy if weight_grad else 0
    for_input = (max(x, gy) if all(s == 1 for s in stride) else 2 * x) if input_grad else 0
    return max(for_weight, for_input)


class ConvWorkspace(TorchDispatchMode):
    """The largest :func:`conv_backward_workspace` of the convolution backwards run inside it: float32
    on oneDNN or ``Slow2d`` as torch picks them, float64 on ``Slow2d`` (other dtypes: 0, not measured)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (func is torch.ops.aten.convolution_backward.default and args[1].dim() == 4
                and args[1].dtype in (torch.float32, torch.float64)):
            grad_out, inp, weight, _, stride, _, dilation, transposed, _, groups, mask = args
            kernel = tuple(weight.shape[2:])
            # torch's mkldnn_conv_use_channels_last: either tensor in channels-last picks that layout
            layout_cl = any(not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
                            for t in (inp, weight))
            onednn = inp.dtype == torch.float32 and onednn_float32_convolution(
                tuple(inp.shape), kernel, stride=tuple(stride), dilation=tuple(dilation), groups=groups,
                threads=torch.get_num_threads())
            self.bytes = max(self.bytes, conv_backward_workspace(
                tuple(inp.shape), tuple(grad_out.shape), kernel=kernel, stride=tuple(stride),
                element_size=inp.element_size(), input_grad=bool(mask[0]), weight_grad=bool(mask[1]), onednn=onednn,
                channels_last=layout_cl, groups=groups, transposed=transposed))
        return func(*args, **kwargs)
