"""What a stage's peak holds besides state and saved activations: torch's receive buffers
(candidates.receive_buffer_bytes) and a backward's workspace in the transient (passes/stages.py)."""

from __future__ import annotations

import torch

from fxshard.candidates import receive_buffer_bytes
from fxshard.capture import capture
from fxshard.cost_models import analyze, estimate
from fxshard.devices import PRESETS
from fxshard.passes.stages import StageSummary, summarize_stages


def _stage(index: int, send: float) -> StageSummary:
    return StageSummary(index=index, nodes=(), fwd_flops=0.0, fwd_time_s=0.0, bwd_time_s=0.0, param_bytes=0,
                        state_bytes=0.0, activation_bytes=0.0, transient_bytes=0.0, send_bytes=send,
                        first_module="", last_module="")


def test_a_stage_keeps_a_receive_buffer_per_microbatch_each_way():
    stages = [_stage(0, 10.0), _stage(1, 20.0), _stage(2, 0.0)]
    three = [(0,), (1,), (2,)]
    assert receive_buffer_bytes(stages, three, 4, training=True) == [40.0, 120.0, 80.0]
    assert receive_buffer_bytes(stages, three, 4, training=False) == [0.0, 40.0, 80.0]  # no gradients come back
    # neighbours on one device (a V-shaped schedule's turn) exchange nothing through torch's buffers
    assert receive_buffer_bytes(stages, [(0,), (1,), (1,)], 2, training=True) == [20.0, 20.0, 0.0]


def test_a_convolutions_backward_workspace_is_in_the_stage_transient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU())
    captured = capture(model, (torch.randn(4, 32, 48, 48),))
    works = analyze(captured)
    conv = next(w for w in works if w.backward_workspace_bytes > 0)
    costs = estimate(captured, PRESETS["cpu"], works=works)
    train = summarize_stages(captured, costs, {}, 1, training=True)[0]
    infer = summarize_stages(captured, costs, {}, 1, training=False)[0]
    assert train.transient_bytes == 2 * conv.output_bytes + conv.backward_workspace_bytes
    assert infer.transient_bytes == 2 * conv.output_bytes
