"""fxshard.modules: a node's enclosing modules from its module stack, and meta state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxshard.capture import capture
from fxshard.modules import has_meta_state, module_of, module_paths, qualified_name, stack_paths


@pytest.mark.parametrize("path,name", [
    ("L['self'].layers[0]", "layers.0"), ("L__self__.h.1.attn", "h.1.attn"), ("blocks['enc'].0", "blocks.enc.0"),
    ("L['self']", ""), ("fc", "fc"),
])
def test_qualified_name(path, name):
    assert qualified_name(path) == name


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


def test_nodes_name_their_modules_outermost_first():
    graph = capture(_Net(), (torch.randn(2, 4),)).gm.graph
    nodes = {n.name: n for n in graph.nodes}
    called = [n for n in graph.nodes if n.op == "call_module" or n.op == "call_function" and "linear" in str(n.target)]
    assert called, "the graph computes the two linear layers"
    first = called[0]
    assert module_paths(first)[-1] == module_of(first) and module_of(first).startswith("layers.0")
    assert stack_paths(first)[:1] in ((), ("layers.0",))
    reads = [n for n in nodes.values() if n.op == "get_attr"]
    assert all(module_of(n) == str(n.target).rpartition(".")[0] for n in reads)
    assert module_of(nodes["output"]) == ""


def test_meta_state():
    assert not has_meta_state(nn.Linear(2, 2))
    with torch.device("meta"):
        assert has_meta_state(nn.Linear(2, 2))
    assert has_meta_state(nn.BatchNorm1d(2).to_empty(device="meta"))
    assert not has_meta_state(nn.ReLU())
