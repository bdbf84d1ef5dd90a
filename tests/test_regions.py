"""Repeated blocks: one region per block, outlined without changing results, names or Parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxshard import zoo
from fxshard.capture import capture
from fxshard.passes.regions import Region, outline, regions_within, repeated_blocks
from fxshard.passes.split import split_graph
from tests.tiny_models import hf_llama


def _captured(name: str):
    built = zoo.build(name, batch_size=2)
    captured = capture(built.model, built.example_inputs, example_kwargs=built.example_kwargs)
    flat = captured.flatten_inputs(built.example_inputs, built.example_kwargs or {})
    return captured, flat




def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert sorted(sa) == sorted(sb)
    assert all(sa[k] is sb[k] for k in sa)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sorted(pa) == sorted(pb)
    assert all(pa[k] is pb[k] for k in pa)


def _assert_outline_exact(gm: torch.fx.GraphModule, regions, flat) -> torch.fx.GraphModule:
    outlined = outline(gm, regions)
    with torch.no_grad():
        torch.testing.assert_close(outlined(*flat), gm(*flat), rtol=0, atol=0)
    _assert_same_state(outlined, gm)
    called = {str(n.target) for n in outlined.graph.nodes if n.op == "call_module"}
    assert {r.module for r in regions} <= called
    return outlined


@pytest.mark.parametrize("name, blocks", [("gpt2-tiny", ("h.0", "h.1")), ("llama-tiny", ("layers.0", "layers.1"))])
def test_one_region_per_transformer_block(name, blocks):
    captured, flat = _captured(name)
    regions = repeated_blocks(captured)
    assert tuple(r.module for r in regions) == blocks
    names = [n.name for n in captured.gm.graph.nodes]
    for r in regions:
        assert len(r.nodes) >= 2 and r.outputs and r.inputs
        positions = [names.index(n) for n in r.nodes]
        assert positions == sorted(positions)
        assert all(p.startswith(r.module + ".") for p in r.params)
    # consecutive blocks chain: each block reads the previous one's output
    assert regions[0].outputs[0] in regions[1].inputs
    _assert_outline_exact(captured.gm, regions, flat)


def test_regions_own_their_parameters():
    captured, _ = _captured("gpt2-tiny")
    regions = repeated_blocks(captured)
    block_params = {p for r in regions for p in r.params}
    expected = {n for n, _ in captured.gm.named_parameters() if n.startswith("h.")}
    assert block_params == expected


@pytest.mark.parametrize("name", ["resnet", "unet", "inception"])
def test_outline_other_zoo_models(name):
    captured, flat = _captured(name)
    regions = repeated_blocks(captured)
    assert regions
    _assert_outline_exact(captured.gm, regions, flat)


def test_sequential_mlp_has_no_multi_node_block():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    captured = capture(model, (torch.randn(3, 8),))
    # Linear 0, 2, 4 and ReLU 1, 3 are families, but each member is one node: no region.
    assert repeated_blocks(captured) == ()
    captured, _ = _captured("mlp")
    assert repeated_blocks(captured) == ()


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


class _Peeking(nn.Module):
    """Reads block 0's weight from outside the block: block 0 cannot be cut out."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x * self.blocks[0].fc.weight.sum()


def test_block_read_from_outside_is_left_out():
    captured = capture(_Peeking(), (torch.randn(2, 8),))
    regions = repeated_blocks(captured)
    assert [r.module for r in regions] == ["blocks.1", "blocks.2"]
    _assert_outline_exact(captured.gm, regions, [torch.randn(2, 8)])


def test_hf_llama_one_region_per_decoder_layer():
    model, ids = hf_llama(layers=2, batch=2)
    captured = capture(model, (ids,))
    regions = repeated_blocks(captured)
    assert [r.module for r in regions] == ["model.layers.0", "model.layers.1"]
    for r in regions:
        assert f"{r.module}.self_attn.q_proj.weight" in r.params
    _assert_outline_exact(captured.gm, regions, [ids])


def test_outline_a_stage_and_regions_within():
    captured, flat = _captured("gpt2-tiny")
    regions = repeated_blocks(captured)
    names = [n.name for n in captured.gm.graph.nodes if n.op not in ("get_attr",)]
    cut = names.index(regions[0].nodes[-1]) + 1
    stage_of = {n: int(i >= cut) for i, n in enumerate(names) if n not in ("idx", "output")}
    split = split_graph(captured, stage_of, 2)
    stage_nodes = [{n for n, s in stage_of.items() if s == k} for k in range(2)]
    assert [r.module for r in regions_within(regions, stage_nodes[0])] == ["h.0"]
    assert [r.module for r in regions_within(regions, stage_nodes[1])] == ["h.1"]
    # a block cut by a boundary is no unit of its own
    middle = regions[1].nodes[len(regions[1].nodes) // 2]
    assert regions_within(regions, set(names[:names.index(middle)])) == (regions[0],)
    s0, s1 = split.stages
    with torch.no_grad():
        hidden = s0.module(*flat)
    outlined0 = _assert_outline_exact(s0.module, regions_within(regions, stage_nodes[0]), flat)
    outlined1 = _assert_outline_exact(s1.module, regions_within(regions, stage_nodes[1]), hidden)
    assert isinstance(outlined0.get_submodule("h.0"), torch.fx.GraphModule)
    assert isinstance(outlined1.get_submodule("h.1"), torch.fx.GraphModule)


def test_outline_leaves_its_input_alone():
    captured, _ = _captured("gpt2-tiny")
    before = captured.gm.code
    outline(captured.gm, repeated_blocks(captured))
    assert captured.gm.code == before
    assert isinstance(Region("a", ("x", "y"), (), (), ()), Region)
