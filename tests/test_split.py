"""``split_graph``: a captured graph cut into pipeline stages that run like the original.

For random valid assignments (contiguous cuts of the graph order, the shape every pipeline
partition has) the stages, run in sequence, give bit-identical outputs to the captured graph;
stage s+1 takes exactly what stage s returns; only tensors cross a boundary (numbers travel as
0-d tensors, tuples and sizes as their parts); a value read by a later, non-adjacent stage is
passed through every stage between; a backward edge is refused; and parameters are the
model's own objects, a tied weight being one Parameter on both of its stages.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

from fxshard.capture import capture
from fxshard.errors import FxshardError, PartitionError
from fxshard.models import ResNet, ResNetConfig
from fxshard.passes.split import split_graph
from fxshard.zoo import build

SEEDS = (0, 1, 2)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# Models and helpers
# ---------------------------------------------------------------------------------------


class Crossing(nn.Module):
    """Values of every kind made first and read last: an int (``x.size(1)``), a float, a
    ``torch.Size``, a tuple of tensors from ``chunk``, and the input itself (a long skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))

    def forward(self, x: torch.Tensor):
        n = x.size(1)
        shape = x.shape
        halves = x.chunk(2, dim=-1)
        scale = x.size(0) * 0.5
        h = x.reshape(shape)  # fx records x.shape where it is first used: here, early
        for layer in self.layers:
            h = torch.tanh(layer(h))
        h = h.reshape(shape) * n
        return h + torch.cat(halves, -1) * scale + x, n


def _captured(name: str):
    torch.manual_seed(0)
    if name == "resnet":
        model = ResNet(ResNetConfig())
        args = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
    elif name == "crossing":
        model = Crossing()
        args = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
    else:
        z = build(name, batch_size=2, seq_len=16, seed=0)
        model, args = z.model, z.example_inputs
    return model, args, capture(model, args)


@pytest.fixture(scope="module")
def captured_models():
    return {name: _captured(name) for name in ("gpt2-tiny", "llama-tiny", "resnet", "crossing")}


def compute_nodes(captured) -> list[str]:
    """Nodes a partition assigns: everything but get_attr (replicated), placeholders (stage 0)
    and the output (last stage)."""
    return [n.name for n in captured.nodes if n.op not in ("get_attr", "placeholder", "output")]


def contiguous_assignment(captured, k: int, rng: random.Random) -> dict[str, int]:
    """A random valid assignment: the graph order cut into k non-empty contiguous runs."""
    names = compute_nodes(captured)
    cuts = sorted(rng.sample(range(1, len(names)), k - 1))
    stage_of, s = {}, 0
    for i, name in enumerate(names):
        while s < k - 1 and i >= cuts[s]:
            s += 1
        stage_of[name] = s
    return stage_of


def full_stage_of(captured, stage_of: dict[str, int], k: int) -> dict[str, int]:
    """The assignment as split_graph sees it: placeholders on stage 0, the output on the last."""
    out = {}
    for n in captured.nodes:
        if n.op == "placeholder":
            out[n.name] = 0
        elif n.op == "output":
            out[n.name] = k - 1
        elif n.op != "get_attr":
            out[n.name] = stage_of[n.name]
    return out


def same(a, b) -> bool:
    """Bit-identical values (tensors by torch.equal, everything else by ==), same structure."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def run_stages(split, flat_inputs):
    """Run the stages in order; check every boundary; return the last stage's outputs."""
    values = tuple(flat_inputs)
    k = len(split.stages)
    for s, stage in enumerate(split.stages):
        placeholders = [n for n in stage.module.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == len(values) == stage.num_input_tensors, (
            f"stage {s}: {len(placeholders)} placeholders, {len(values)} values, "
            f"num_input_tensors={stage.num_input_tensors}")
        values = stage.module(*values)
        assert isinstance(values, tuple), f"stage {s} returned {type(values).__name__}"
        assert len(values) == stage.num_output_tensors
        if s < k - 1:
            for i, v in enumerate(values):
                assert isinstance(v, torch.Tensor), f"stage {s} sends output {i} of type {type(v).__name__}"
    return values


# ---------------------------------------------------------------------------------------
# Random valid assignments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "resnet", "crossing"])
def test_random_contiguous_split_runs_like_the_graph(captured_models, name, k, seed):
    model, args, captured = captured_models[name]
    rng = random.Random(f"{name}-{k}-{seed}")
    stage_of = contiguous_assignment(captured, k, rng)
    n_nodes = len(captured.nodes)
    split = split_graph(captured, stage_of, k)
    assert len(captured.nodes) == n_nodes, "split_graph changed the captured graph"
    assert [st.index for st in split.stages] == list(range(k))

    flat = captured.flatten_inputs(args, {})
    with torch.no_grad():
        expected = captured.gm(*flat)
        got = run_stages(split, flat)
        assert same(got, expected), "stages in sequence differ from the captured graph"
        assert same(split(*flat), expected), "SplitGraph.__call__ differs from the captured graph"

    # Each stage takes exactly what the previous one returns.
    for s in range(k - 1):
        assert split.stages[s + 1].num_input_tensors == split.stages[s].num_output_tensors
        assert split.stages[s + 1].inputs == split.stages[s].outputs
    assert split.stages[0].inputs == tuple(captured.input_names)

    # A value made on stage a and last read on stage b is sent across every boundary between.
    full = full_stage_of(captured, stage_of, k)
    for node in captured.nodes:
        if node.name not in full or node.op == "output" or not node.users:
            continue
        a, b = full[node.name], max(full[u.name] for u in node.users)
        for s in range(a, b):
            assert node.name in split.stages[s].outputs, f"{node.name} (stage {a} -> {b}) not sent by stage {s}"
        for s in range(b, k - 1):
            assert node.name not in split.stages[s].outputs, f"{node.name} sent past its last reader"

    # Parameters are the model's own objects; each lives on the stages that read it only.
    own = {id(p) for p in model.parameters()}
    holders: dict[int, int] = {}
    for st in split.stages:
        for p in st.module.parameters():
            assert id(p) in own, f"stage {st.index} holds a parameter that is not the model's"
            holders[id(p)] = holders.get(id(p), 0) + 1
    assert set(holders) == own
    shared = {pid for pid, count in holders.items() if count > 1}
    if name == "gpt2-tiny":
        assert shared <= {id(model.wte.weight)}
    else:
        assert not shared


def test_a_value_skipping_stages_passes_through_every_middle_stage(captured_models):
    _model, args, captured = captured_models["crossing"]
    names = compute_nodes(captured)
    k = 4
    # Stage 0: up to the first Linear; stages 1..k-2: the other layers; last stage: what
    # follows the layers, where the early values are read.
    first, tail = names.index("layers_0"), names.index("tanh_5") + 1
    middle = tail - first - 1
    stage_of = {}
    for i, name in enumerate(names):
        if i <= first:
            stage_of[name] = 0
        elif i < tail:
            stage_of[name] = 1 + (i - first - 1) * (k - 2) // middle
        else:
            stage_of[name] = k - 1
    split = split_graph(captured, stage_of, k)
    # x (the long skip), the int, the float, the Size and the chunk tuple cross every boundary.
    kinds = {}
    for node in captured.nodes:
        val = node.meta.get("val")
        kind = ("input" if node.op == "placeholder" else type(val).__name__ if not isinstance(val, torch.Tensor)
                else None)
        if kind and kind not in kinds and stage_of.get(node.name, 0) == 0:
            kinds[kind] = node.name
    assert {"input", "int", "float", "Size", "tuple"} <= set(kinds), kinds
    for value in kinds.values():
        for s in range(k - 1):
            assert value in split.stages[s].outputs, f"{value} not passed on by stage {s}"
            assert value in split.stages[s + 1].inputs
    flat = captured.flatten_inputs(args, {})
    with torch.no_grad():
        values = tuple(flat)
        for s, stage in enumerate(split.stages):
            values = stage.module(*values)
            if s < k - 1:
                assert all(isinstance(v, torch.Tensor) for v in values)
                # The int and the float travel as 0-d tensors.
                assert any(v.dim() == 0 and not v.is_floating_point() for v in values)
                assert any(v.dim() == 0 and v.is_floating_point() for v in values)
        assert same(values, captured.gm(*flat))
    # The int output is an int again at the end.
    assert type(values[1]) is int and values[1] == 8


def test_tied_weights_are_one_parameter_on_both_stages(captured_models):
    model, args, captured = captured_models["gpt2-tiny"]
    assert model.lm_head.weight is model.wte.weight
    names = compute_nodes(captured)
    k = 2
    stage_of = {name: 0 if i < len(names) // 2 else 1 for i, name in enumerate(names)}
    assert stage_of["wte"] == 0 and stage_of["lm_head"] == 1
    split = split_graph(captured, stage_of, k)
    first, last = split.stages[0].module, split.stages[1].module
    assert first.get_submodule("wte") is model.wte
    assert last.get_submodule("lm_head") is model.lm_head
    assert first.get_parameter("wte.weight") is last.get_parameter("lm_head.weight") is model.wte.weight
    # Gradients through the split accumulate once, into that one Parameter, as in eager.
    flat = captured.flatten_inputs(args, {})
    model.zero_grad()
    split(*flat)[0].float().pow(2).mean().backward()
    got = model.wte.weight.grad.clone()
    model.zero_grad()
    model(*args).pow(2).mean().backward()
    torch.testing.assert_close(got, model.wte.weight.grad, rtol=1e-5, atol=1e-8)
    model.zero_grad()


# ---------------------------------------------------------------------------------------
# What is sent
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-tiny", "crossing"])
def test_copy_outputs_sends_fresh_tensors_and_changes_no_value(captured_models, name):
    _model, args, captured = captured_models[name]
    k = 3
    stage_of = contiguous_assignment(captured, k, random.Random(7))
    flat = captured.flatten_inputs(args, {})
    with torch.no_grad():
        expected = captured.gm(*flat)
        plain = split_graph(captured, stage_of, k)
        copied = split_graph(captured, stage_of, k, copy_outputs=True)
        assert same(run_stages(copied, flat), expected)
        values = tuple(flat)
        for stage in copied.stages[:-1]:
            outputs = stage.module(*values)
            ptrs = {v.data_ptr() for v in values if isinstance(v, torch.Tensor) and v.numel()}
            for v in outputs:
                assert not v._is_view(), f"stage {stage.index} sends a view with copy_outputs=True"
                assert v.numel() == 0 or v.data_ptr() not in ptrs, (
                    f"stage {stage.index} passes an input on without copying it")
            values = outputs
        # Without copies, a plain tensor passed through is sent as the same tensor (views
        # excepted: they are always sent as copies).
        views = {n.name for n in captured.nodes if getattr(n.meta.get("val"), "_base", None) is not None}
        values = tuple(flat)
        for stage in plain.stages[:-1]:
            outputs = stage.module(*values)
            by_name = dict(zip(stage.inputs, values))
            for out_name, v in zip(stage.outputs, outputs):
                received = by_name.get(out_name)
                if isinstance(received, torch.Tensor) and received.dim() and out_name not in views:
                    assert v is received, f"stage {stage.index} copies {out_name} without copy_outputs"
            values = outputs


def test_no_view_is_sent_as_a_plain_tensor(captured_models):
    """Views of a plain-tensor boundary value are cloned: torch.distributed.pipelining
    detaches stage outputs in place, which a view forbids."""
    for name in ("gpt2-tiny", "llama-tiny", "resnet"):
        _model, args, captured = captured_models[name]
        for k in (2, 3, 4):
            stage_of = contiguous_assignment(captured, k, random.Random(k))
            split = split_graph(captured, stage_of, k)
            values = tuple(captured.flatten_inputs(args, {}))
            with torch.no_grad():
                for stage in split.stages[:-1]:
                    values = stage.module(*values)
                    for out_name, v in zip(stage.outputs, values):
                        assert not v._is_view(), f"{name}: stage {stage.index} sends {out_name} as a view"


def test_every_sent_tensor_is_contiguous(captured_models):
    """gloo sends and receives only contiguous tensors, and torch's receiving buffer takes the
    sent tensor's strides: a cut right after a transpose (LLaMA's k after RoPE on 4 ranks) sent
    a non-contiguous clone, and the next rank's receive failed."""
    for name in ("gpt2-tiny", "llama-tiny"):
        _model, args, captured = captured_models[name]
        names = compute_nodes(captured)
        after = [i + 1 for i, n in enumerate(names[:-1]) if "transpose" in n or "permute" in n]
        assert after, f"{name} has no transpose to cut after"
        for cut in after:
            stage_of = {n: int(i >= cut) for i, n in enumerate(names)}
            for copy in (False, True):
                split = split_graph(captured, stage_of, 2, copy_outputs=copy)
                with torch.no_grad():
                    outputs = split.stages[0].module(*captured.flatten_inputs(args, {}))
                for out_name, v in zip(split.stages[0].outputs, outputs):
                    assert v.is_contiguous(), f"{name}: cut at {names[cut]!r} sends {out_name} non-contiguous"


# ---------------------------------------------------------------------------------------
# Invalid assignments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "resnet"])
def test_an_edge_going_backwards_is_refused(captured_models, name):
    _model, _args, captured = captured_models[name]
    k = 2
    stage_of = contiguous_assignment(captured, k, random.Random(3))
    # A stage-0 node with a stage-0 reader, moved to stage 1: its edge now goes 1 -> 0.
    node = next(n for n in captured.nodes if stage_of.get(n.name) == 0 and n.users
                and all(stage_of.get(u.name) == 0 for u in n.users))
    bad = dict(stage_of)
    bad[node.name] = 1
    with pytest.raises(PartitionError, match=r"back to") as info:
        split_graph(captured, bad, k)
    assert node.name in str(info.value)
    assert isinstance(info.value, FxshardError)


def test_a_node_without_a_stage_or_outside_the_stages_is_refused(captured_models):
    _model, _args, captured = captured_models["gpt2-tiny"]
    stage_of = contiguous_assignment(captured, 2, random.Random(0))
    missing = dict(stage_of)
    dropped = compute_nodes(captured)[3]
    del missing[dropped]
    with pytest.raises(PartitionError, match=dropped):
        split_graph(captured, missing, 2)
    outside = dict(stage_of)
    outside[compute_nodes(captured)[-1]] = 2
    with pytest.raises(PartitionError, match=r"outside 0\.\.1"):
        split_graph(captured, outside, 2)


def test_a_single_stage_is_the_whole_graph(captured_models):
    _model, args, captured = captured_models["llama-tiny"]
    split = split_graph(captured, {n: 0 for n in compute_nodes(captured)}, 1)
    flat = captured.flatten_inputs(args, {})
    with torch.no_grad():
        assert same(run_stages(split, flat), captured.gm(*flat))
    assert split.stages[0].num_input_tensors == len(captured.input_names)
