"""Per-stage totals of an assignment: parameters (tied weights on every stage that holds
them), training state by optimizer and precision, activations, the largest transient, and
bytes sent across each boundary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.cost_models import estimate
from fxshard.cost_models.memory import bytes_per_parameter
from fxshard.passes.stages import complete_assignment, summarize_stages
from fxshard.zoo import build

SPEC = Cluster.parse("1xcpu:1GB").devices[0].spec


def _priced(name: str, **kw):
    z = build(name, batch_size=2, seed=0, **kw)
    captured = capture(z.model, z.example_inputs)
    return z, captured, estimate(captured, SPEC)


@pytest.fixture(scope="module")
def gpt2():
    return _priced("gpt2-tiny")


@pytest.fixture(scope="module")
def gpt2_bf16():
    return _priced("gpt2-tiny", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def llama():
    return _priced("llama-tiny")


def halves(captured, k: int = 2) -> dict[str, int]:
    """Topological order cut into k contiguous runs (get_attr nodes left out, as in cost graphs)."""
    names = [n.name for n in captured.nodes if n.op != "get_attr"]
    return {name: min(k - 1, i * k // len(names)) for i, name in enumerate(names)}


def holders(captured, costs, param: str) -> list[str]:
    return [n.name for n in captured.nodes if param in costs[n.name].work.params]


def model_param_bytes(z) -> int:
    return sum(p.numel() * p.element_size() for p in z.model.parameters())  # tied weights once


def model_buffer_bytes(z) -> int:
    return sum(b.numel() * b.element_size() for b in z.model.buffers())


def test_two_stage_split_basics(gpt2):
    _, captured, costs = gpt2
    stage_of = halves(captured)
    stages = summarize_stages(captured, costs, stage_of, 2)
    assert [s.index for s in stages] == [0, 1]
    listed = [n for s in stages for n in s.nodes]
    assert sorted(listed) == sorted(n.name for n in captured.nodes)
    assert len(listed) == len(set(listed))
    full = complete_assignment(captured, stage_of)
    for s in stages:
        assert all(full[n] == s.index for n in s.nodes)
    # times and FLOPs add up to the whole graph's
    assert sum(s.fwd_time_s for s in stages) == pytest.approx(costs.fwd_time_s)
    assert sum(s.bwd_time_s for s in stages) == pytest.approx(costs.bwd_time_s)
    assert sum(s.fwd_flops for s in stages) == pytest.approx(sum(c.work.fwd_flops for c in costs))
    assert stages[0].first_module == "wte" and stages[-1].last_module == "lm_head"


def test_tied_weight_is_held_on_both_stages(gpt2):
    z, captured, costs = gpt2
    tied = holders(captured, costs, "wte.weight")
    assert len(tied) == 2, tied  # the embedding and the LM head share one tensor
    tied_bytes = z.model.wte.weight.numel() * 4
    stage_of = halves(captured)
    assert stage_of[tied[0]] != stage_of[tied[1]]
    stages = summarize_stages(captured, costs, stage_of, 2)
    total = sum(s.param_bytes for s in stages)
    assert total >= model_param_bytes(z)
    assert total == model_param_bytes(z) + tied_bytes
    single = summarize_stages(captured, costs, {}, 1)[0]
    assert single.param_bytes == model_param_bytes(z)  # counted once on one stage


def test_tied_weight_on_one_stage_is_counted_once(gpt2):
    z, captured, costs = gpt2
    output = next(n.name for n in captured.nodes if n.op == "output")
    stage_of = {name: 0 for name in halves(captured)}
    stage_of[output] = 1  # both holders of the tied weight on stage 0
    stages = summarize_stages(captured, costs, stage_of, 2)
    assert stages[1].nodes == (output,)
    assert stages[1].param_bytes == 0
    assert stages[0].param_bytes == model_param_bytes(z)
    assert stages[0].send_bytes > 0  # the logits go to the output stage


@pytest.mark.parametrize("which", ["gpt2", "gpt2_bf16"])
def test_state_follows_the_optimizer(request, which):
    z, captured, costs = request.getfixturevalue(which)
    mixed = which == "gpt2_bf16"
    stage_of = halves(captured)
    elem = 2 if mixed else 4
    state = {opt: [s.state_bytes for s in summarize_stages(captured, costs, stage_of, 2, optimizer=opt)]
             for opt in ("adam", "sgd", "none")}
    inference = summarize_stages(captured, costs, stage_of, 2, training=False, optimizer="adam")
    for s in range(2):
        assert state["adam"][s] > state["sgd"][s] >= state["none"][s] > inference[s].state_bytes > 0
        if mixed:  # sgd keeps an fp32 master copy that "none" does not
            assert state["sgd"][s] > state["none"][s]
        params = inference[s].param_bytes
        for opt in ("adam", "sgd", "none"):
            per = bytes_per_parameter(opt, "mixed" if mixed else "fp32")
            assert state[opt][s] == pytest.approx(params * per / elem)
        # inference: the weights alone (gpt2 has no buffers)
        assert inference[s].state_bytes == pytest.approx(params)
    assert model_buffer_bytes(z) == 0
    if not mixed:
        assert state["adam"][0] == pytest.approx(4 * inference[0].param_bytes)  # 16 bytes / 4-byte weight


def test_buffers_count_as_state_once(llama):
    z, captured, costs = llama
    assert model_buffer_bytes(z) > 0
    single = summarize_stages(captured, costs, {}, 1, training=False)[0]
    assert single.state_bytes == pytest.approx(model_param_bytes(z) + model_buffer_bytes(z))
    adam = summarize_stages(captured, costs, {}, 1, optimizer="adam")[0]
    assert adam.state_bytes == pytest.approx(4 * model_param_bytes(z) + model_buffer_bytes(z))


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "none"])
def test_activations_only_in_training(gpt2, optimizer):
    _, captured, costs = gpt2
    stage_of = halves(captured)
    train = summarize_stages(captured, costs, stage_of, 2, optimizer=optimizer)
    infer = summarize_stages(captured, costs, stage_of, 2, training=False, optimizer=optimizer)
    for t, i in zip(train, infer):
        assert t.activation_bytes > 0
        assert i.activation_bytes == 0
        assert i.bwd_time_s == 0 and t.bwd_time_s > 0
        assert i.fwd_time_s == pytest.approx(t.fwd_time_s)
        assert t.transient_bytes > 0
        # the optimizer changes only the state
        assert i.param_bytes == t.param_bytes and i.send_bytes == t.send_bytes


def test_activations_scale_with_the_batch():
    small = _priced("gpt2-tiny")
    z = build("gpt2-tiny", batch_size=4, seed=0)
    captured = capture(z.model, z.example_inputs)
    big = summarize_stages(captured, estimate(captured, SPEC), {}, 1)[0]
    one = summarize_stages(small[1], small[2], {}, 1)[0]
    # Everything saved scales with the batch but a few batch-free tensors (the positions).
    assert big.activation_bytes == pytest.approx(2 * one.activation_bytes, rel=1e-3)
    assert big.activation_bytes < 2 * one.activation_bytes
    assert big.state_bytes == pytest.approx(one.state_bytes)


def test_transient_is_the_largest_output_and_its_gradient(gpt2):
    _, captured, costs = gpt2
    single = summarize_stages(captured, costs, {}, 1)[0]
    largest = max(costs[n.name].work.output_bytes for n in captured.nodes if n.op not in ("placeholder", "get_attr"))
    # GPT-2 ties its embedding and head: one stage holds both uses, so the weight's two gradients and
    # their sum are alive at once in backward (passes/stages.py, _shared_gradient_bytes)
    works = [costs[n.name].work for n in captured.nodes]
    tied = {p: size for w in works for p, size in zip(w.params, w.param_sizes)
            if sum(p in other.params for other in works) > 1}
    assert len(tied) == 1
    assert single.transient_bytes == 2 * largest + 2 * sum(tied.values())
    assert summarize_stages(captured, costs, {}, 1, training=False)[0].transient_bytes == 2 * largest


def test_send_bytes(gpt2):
    _, captured, costs = gpt2
    for k in (2, 3, 4):
        stage_of = halves(captured, k)
        stages = summarize_stages(captured, costs, stage_of, k)
        assert stages[-1].send_bytes == 0
        assert stages[0].send_bytes > 0
        full = complete_assignment(captured, stage_of)
        # a value crosses every boundary between its producer and its last consumer
        for b in range(k - 1):
            expected = sum(costs[n.name].work.output_bytes for n in captured.nodes
                           if n.op != "get_attr" and n.users
                           and full[n.name] <= b < max(full[u.name] for u in n.users))
            assert stages[b].send_bytes == pytest.approx(expected)


def test_single_stage_sends_nothing(gpt2):
    _, captured, costs = gpt2
    (only,) = summarize_stages(captured, costs, {}, 1)
    assert only.send_bytes == 0
    assert len(only.nodes) == len(captured.nodes)


def test_complete_assignment_covers_get_attr_nodes(llama):
    _, captured, _ = llama
    get_attrs = [n for n in captured.nodes if n.op == "get_attr"]
    assert get_attrs, "llama-tiny reads its rotary tables through get_attr"
    stage_of = halves(captured, 2)
    assert not any(n.name in stage_of for n in get_attrs)
    full = complete_assignment(captured, stage_of)
    assert set(full) == {n.name for n in captured.nodes}
    for n in captured.nodes:
        if n.op == "get_attr":
            assert full[n.name] == min(stage_of[u.name] for u in n.users)
        else:
            assert full[n.name] == stage_of[n.name]
    assert complete_assignment(captured, full) == full  # idempotent
    assert stage_of == halves(captured, 2)  # the input is not mutated


class SharedReads(nn.Module):
    """A parameter and a buffer read on both sides of a cut (get_attr nodes with two users)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(16))
        self.w = nn.Parameter(torch.randn(16, 16))
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        h = self.a(x @ self.w) * self.scale
        return self.b(h @ self.w) * self.scale


def test_get_attr_read_on_two_stages_is_held_on_both():
    torch.manual_seed(0)
    model = SharedReads()
    captured = capture(model, (torch.randn(4, 16),))
    costs = estimate(captured, SPEC)
    w = next(n for n in captured.nodes if n.op == "get_attr" and n.target == "w")
    assert len(w.users) == 2
    order = [n.name for n in captured.nodes]
    cut = max(order.index(u.name) for u in w.users)  # stage 1 starts at the second read of w
    stage_of = {n.name: int(i >= cut) for i, n in enumerate(captured.nodes) if n.op != "get_attr"}
    assert {stage_of[u.name] for u in w.users} == {0, 1}
    full = complete_assignment(captured, stage_of)
    assert full[w.name] == 0  # joins its first consumer
    stages = summarize_stages(captured, costs, stage_of, 2, training=False)
    w_bytes, buf = 16 * 16 * 4, 16 * 4
    linear = 16 * 16 * 4 + 16 * 4
    assert [s.param_bytes for s in stages] == [w_bytes + linear, w_bytes + linear]
    assert sum(s.param_bytes for s in stages) == sum(p.numel() * 4 for p in model.parameters()) + w_bytes
    # inference: state is the weights and the buffer, on each stage that reads them
    assert [s.state_bytes for s in stages] == [w_bytes + linear + buf] * 2
    adam = summarize_stages(captured, costs, stage_of, 2, optimizer="adam")
    assert [s.state_bytes for s in adam] == [4 * (w_bytes + linear) + buf] * 2
    # w itself is never sent: each stage reads its own copy
    sent = [n for n in captured.nodes[:cut] if n.op != "get_attr" and any(order.index(u.name) >= cut for u in n.users)]
    assert [n.name for n in sent] == ["mul"]
    assert stages[0].send_bytes == costs["mul"].work.output_bytes == 4 * 16 * 4


def test_stage_that_gets_no_nodes(gpt2):
    """An empty stage is legal in a summary: nothing held, nothing sent."""
    _, captured, costs = gpt2
    stage_of = {name: 0 for name in halves(captured)}
    stages = summarize_stages(captured, costs, stage_of, 2)
    assert stages[1].nodes == () and stages[1].param_bytes == 0 and stages[1].state_bytes == 0
    assert stages[1].fwd_time_s == 0 and stages[1].send_bytes == 0 and stages[0].send_bytes == 0
