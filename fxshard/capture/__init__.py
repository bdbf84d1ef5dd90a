"""Capture: a model and example inputs become an fx graph with shapes.

``capture`` traces with ``torch.fx.symbolic_trace`` (:mod:`.symbolic`) and falls back to
non-strict ``torch.export`` (:mod:`.export`). Either way the result is a plain
:class:`torch.fx.GraphModule` that takes one flat positional argument per placeholder, returns a
flat tuple (:mod:`.outputs` rebuilds the model's structure), and holds the user's own
``Parameter`` and buffer objects (so a split of it trains the user's model). Shapes come from
fake-tensor propagation (:mod:`.propagate`): nothing is computed and nothing is allocated, so a
model on the ``meta`` device captures too. :mod:`.guard` refuses symbolic traces that updated
state in place; :mod:`.diagnose` explains failures. See docs/architecture.md.

Example::

    graph = capture(model, (tokens,))
    for node in graph.gm.graph.nodes:
        print(node.name, node.meta["tensor_meta"])
"""

from fxshard.capture.entry import Method, capture
from fxshard.capture.graph import CapturedGraph, node_values
from fxshard.capture.outputs import OutputSpec

__all__ = ["CapturedGraph", "Method", "OutputSpec", "capture", "node_values"]
