"""What a stage's peak holds besides state and saved activations: torch's receive buffers
(candidates.receive_buffer_bytes) and a backward's workspace in the transient (passes/stages.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fxshard.candidates import receive_buffer_bytes
from fxshard.capture import capture
from fxshard.cost_models import analyze, estimate
from fxshard.cost_models.host_memory import ResidentPeak, pin_mmap_threshold
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


class _Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight, as GPT-2 ties them."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x)))


def test_a_weight_used_twice_in_a_stage_holds_two_more_gradients_in_its_backward():
    vocab, dim = 5000, 64
    captured = capture(_Tied(vocab, dim), (torch.randint(0, vocab, (2, 16)),))
    costs = estimate(captured, PRESETS["cpu"], works=analyze(captured))
    weight = vocab * dim * 4
    logits = 2 * 16 * vocab * 4
    whole = summarize_stages(captured, costs, {}, 1, training=True)[0]
    assert whole.transient_bytes == 2 * logits + 2 * weight
    assert summarize_stages(captured, costs, {}, 1, training=False)[0].transient_bytes == 2 * logits
    # each stage holds one use: nothing is summed across stages
    nodes = [n.name for n in captured.gm.graph.nodes if n.op not in ("placeholder", "output")]
    head = next(i for i, n in enumerate(nodes) if n == "head")
    split = {n: int(i >= head) for i, n in enumerate(nodes)}
    first, last = summarize_stages(captured, costs, split, 2, training=True)
    assert last.transient_bytes == 2 * logits
    assert first.transient_bytes < 2 * weight


_TIED_PEAK = """
import torch
from fxshard.cost_models.host_memory import ResidentPeak, released_heap, trim_heap

torch.set_num_threads(1)
V, D = 50000, 256
weight = torch.nn.Parameter(torch.randn(V, D) * 0.01)
x = torch.randint(0, V, (2, 16))


def step():
    weight.grad = None
    torch.nn.functional.linear(torch.nn.functional.embedding(x, weight), weight).sum().backward()


with released_heap():
    step()
    weight.grad = None
    trim_heap()
    probe = ResidentPeak()
    probe.start()
    step()
    print(probe.peak_bytes() / (V * D * 4))
"""


def test_the_two_gradients_of_a_tied_weight_and_their_sum_are_alive_at_once():
    """What the shared-gradient term prices, measured: the backward of an embedding and a linear
    layer sharing one weight peaks at about 3 x the weight (its gradient plus 2 x)."""
    if not ResidentPeak.available() or not pin_mmap_threshold():
        pytest.skip("needs /proc/self/status and glibc's mallopt")
    done = subprocess.run([sys.executable, "-c", _TIED_PEAK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 2.9 <= float(done.stdout.split()[-1]) <= 3.3
