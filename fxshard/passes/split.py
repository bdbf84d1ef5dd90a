"""Split a captured graph into one GraphModule per pipeline stage.

Stage s takes exactly the values that cross boundary s (the model's flat inputs for stage 0)
and returns exactly the values that cross boundary s+1 (the model's flat outputs for the last
stage). A value produced on stage a and last read on stage b is therefore passed through every
stage between, which is what every ``torch.distributed.pipelining`` schedule needs (a stage
talks only to its neighbours), interleaved ones included.

Between stages only tensors travel. A boundary value that is not one tensor (an int from
``x.size(1)``, a ``torch.Size``, a tuple from ``torch.split``, a float, None) is flattened: its
tensors travel as they are, numbers travel as 0-d tensors, and the receiving stage rebuilds
the original value with one ``_rebuild`` call. Constants (None, strings) are baked in.

Parameters and buffers are never sent: each stage references the attributes its nodes use,
from the captured graph's own module, so in one process a tied weight is the same Parameter
on both stages (its gradient accumulates once), and under torchrun each rank holds only its
own stage's tensors. See docs/runtime.md.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxshard.capture import CapturedGraph
from fxshard.errors import PartitionError

__all__ = ["StageGraph", "SplitGraph", "carries_numbers", "split_graph", "stage_io_examples"]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """How one flattened leaf of a boundary value travels: "tensor", "number" or "const"."""

    kind: str
    python_type: type | None = None
    value: Any = None


class _Repack(torch.nn.Module):
    """Receiving side: the tensors of a boundary value back into the value itself."""

    def __init__(self, spec: Any, leaves: tuple[_Leaf, ...]) -> None:
        super().__init__()
        self.spec, self.leaves = spec, leaves

    def forward(self, *received: Any) -> Any:
        it = iter(received)
        out = []
        for leaf in self.leaves:
            if leaf.kind == "tensor":
                out.append(next(it))
            elif leaf.kind == "number":
                out.append(leaf.python_type(next(it).item()))
            else:
                out.append(leaf.value)
        return pytree.tree_unflatten(out, self.spec)


class _Unpack(torch.nn.Module):
    """Sending side: a boundary value as a tuple of tensors (numbers as 0-d tensors)."""

    def __init__(self, leaves: tuple[_Leaf, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def forward(self, value: Any) -> tuple:
        out = []
        for leaf, v in zip(self.leaves, pytree.tree_leaves(value)):
            if leaf.kind == "tensor":
                out.append(v)
            elif leaf.kind == "number":
                out.append(torch.tensor(v))
        return tuple(out)


_TENSOR_SPEC = pytree.tree_flatten(torch.empty(0))[1]


def _is_plain_tensor(spec: Any, leaves: tuple[_Leaf, ...]) -> bool:
    return len(leaves) == 1 and leaves[0].kind == "tensor" and spec == _TENSOR_SPEC


def _flatten_value(value: Any) -> tuple[Any, tuple[_Leaf, ...]]:
    flat, spec = pytree.tree_flatten(value)
    leaves = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            leaves.append(_Leaf("tensor"))
        elif isinstance(v, (bool, int, float)) or isinstance(v, torch.SymInt):
            leaves.append(_Leaf("number", python_type=type(v) if not isinstance(v, torch.SymInt) else int))
        else:
            leaves.append(_Leaf("const", value=v))
    return spec, tuple(leaves)


@dataclasses.dataclass(frozen=True, eq=False)
class StageGraph:
    """One stage: its module, the boundary values it takes and returns (by producer name)."""

    index: int
    module: torch.fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_input_tensors: int
    num_output_tensors: int


@dataclasses.dataclass(frozen=True, eq=False)
class SplitGraph:
    """All stages of a split; run them in order, feeding each the previous one's outputs."""

    stages: tuple[StageGraph, ...]

    def __call__(self, *flat_inputs: Any) -> tuple:
        values: tuple = tuple(flat_inputs)
        for stage in self.stages:
            values = stage.module(*values)
        return values


def split_graph(captured: CapturedGraph, stage_of: Mapping[str, int], k: int, *,
                copy_outputs: bool = False) -> SplitGraph:
    """Split ``captured`` along ``stage_of`` (every non-get_attr node's stage) into k stages.

    ``copy_outputs`` makes every tensor a stage sends a fresh copy (zero-bubble schedules
    detach stage outputs in place while the stage still needs them for weight gradients).

    Raises:
        PartitionError: a node without a stage, or an edge that goes back to an earlier stage.
    """
    graph = captured.gm.graph
    nodes = list(graph.nodes)
    stage: dict[torch.fx.Node, int] = {}
    for node in nodes:
        if node.op == "get_attr":
            continue
        if node.op == "output":
            stage[node] = k - 1
        elif node.op == "placeholder":
            stage[node] = 0
        elif node.name in stage_of:
            stage[node] = int(stage_of[node.name])
        else:
            raise PartitionError(f"node {node.name!r} has no stage in the plan; the plan was made for another graph")
        if not 0 <= stage[node] < k:
            raise PartitionError(f"node {node.name!r} is on stage {stage[node]}, outside 0..{k - 1}")
    for node in nodes:
        for user in node.users:
            if node in stage and user in stage and stage[user] < stage[node]:
                raise PartitionError(f"edge {node.name} -> {user.name} goes from stage {stage[node]} back to "
                                     f"stage {stage[user]}; a pipeline's stages only read earlier ones")
    # Values crossing boundary b (between stages b-1 and b), in graph order.
    crossing: list[list[torch.fx.Node]] = [[] for _ in range(k + 1)]
    for node in nodes:
        if node not in stage or node.op == "output" or not node.users:
            continue
        last = max(stage[u] for u in node.users)
        for b in range(stage[node] + 1, last + 1):
            crossing[b].append(node)
    output_node = next(n for n in reversed(nodes) if n.op == "output")
    stages = []
    for s in range(k):
        stages.append(_build_stage(captured, nodes, stage, s, k, crossing, output_node, copy_outputs))
    return SplitGraph(stages=tuple(stages))


class _StageBuilder:
    """One stage's fx graph, built step by step: its inputs received, its nodes copied, its
    outputs sent on (or returned, on the last stage); ``root`` holds the modules it calls."""

    def __init__(self, captured: CapturedGraph, s: int) -> None:
        self.captured, self.s = captured, s
        self.g = torch.fx.Graph()
        self.env: dict[torch.fx.Node, Any] = {}
        self.root: dict[str, Any] = {}

    def arg(self, n: torch.fx.Node) -> Any:
        """The stage's value for ``n``, read from an earlier stage or a replicated attribute."""
        if n in self.env:
            return self.env[n]
        if n.op == "get_attr":  # replicated on every stage that reads it
            self.root[n.target] = operator.attrgetter(n.target)(self.captured.gm)
            self.env[n] = self.g.get_attr(n.target)
            return self.env[n]
        raise PartitionError(f"stage {self.s} reads {n.name!r}, which no earlier stage passes on")

    def take_graph_inputs(self, nodes: list) -> int:
        """The first stage's placeholders, the model's inputs; returns how many tensors come in."""
        n_in = 0
        for node in nodes:
            if node.op == "placeholder":
                self.env[node] = self.g.node_copy(node, lambda n: self.env[n])
                n_in += 1
        return n_in

    def receive(self, crossing: list[torch.fx.Node]) -> int:
        """Placeholders for the values an earlier stage sends, containers repacked from their
        tensors; returns how many tensors come in."""
        n_in = 0
        for node in crossing:
            spec, leaves = _flatten_value(node.meta.get("val"))
            if _is_plain_tensor(spec, leaves):
                self.env[node] = self.g.placeholder(node.name)
                n_in += 1
                continue
            received = [self.g.placeholder(f"{node.name}_{i}") for i, leaf in enumerate(leaves) if leaf.kind != "const"]
            n_in += len(received)
            name = f"_fxshard_repack_{node.name}"
            self.root[name] = _Repack(spec, leaves)
            self.env[node] = self.g.call_module(name, tuple(received))
        return n_in

    def copy_nodes(self, nodes: list, stage: dict) -> None:
        for node in nodes:
            if stage.get(node) != self.s or node.op in ("placeholder", "output"):
                continue
            if node.op == "call_module":
                self.root[node.target] = operator.attrgetter(node.target)(self.captured.gm)
            self.env[node] = self.g.node_copy(node, self.arg)

    def send(self, crossing: list[torch.fx.Node], copy_outputs: bool) -> int:
        """Output the values later stages read, containers unpacked into their tensors; returns
        how many tensors go out."""
        g, sent = self.g, []
        for node in crossing:
            spec, leaves = _flatten_value(node.meta.get("val"))
            if _is_plain_tensor(spec, leaves):
                value, val = self.arg(node), node.meta.get("val")
                if copy_outputs or getattr(val, "_base", None) is not None or not _contiguous(val):
                    # A view cannot be sent as is: pipelining detaches stage outputs in place
                    # after backward, which a view forbids. Send a copy, a contiguous one:
                    # gloo sends and receives only contiguous tensors, and torch makes the
                    # receiving buffer with the sent tensor's strides (a transposed view's
                    # clone failed "input tensor has to be contiguous").
                    value = g.call_method("clone", (value,), {"memory_format": torch.contiguous_format})
                sent.append(value)
                continue
            name = f"_fxshard_unpack_{node.name}"
            self.root[name] = _Unpack(leaves)
            packed = g.call_module(name, (self.arg(node),))
            count = sum(leaf.kind != "const" for leaf in leaves)
            items = [g.call_function(operator.getitem, (packed, j)) for j in range(count)]
            sent.extend(g.call_method("clone", (t,), {"memory_format": torch.contiguous_format}) if copy_outputs
                        else t for t in items)
        g.output(tuple(sent))
        return len(sent)

    def module(self) -> torch.fx.GraphModule:
        self.g.lint()
        return torch.fx.GraphModule(self.root, self.g, class_name=f"{self.captured.model_name}Stage{self.s}")


def _contiguous(val: object) -> bool:
    """Whether a boundary value's example is contiguous (unknown strides count as contiguous)."""
    try:
        return not isinstance(val, torch.Tensor) or val.is_contiguous()
    except (RuntimeError, NotImplementedError):  # symbolic strides
        return True


def _build_stage(captured: CapturedGraph, nodes: list, stage: dict, s: int, k: int,
                 crossing: list[list[torch.fx.Node]], output_node: torch.fx.Node,
                 copy_outputs: bool) -> StageGraph:
    build = _StageBuilder(captured, s)
    if s == 0:
        n_in = build.take_graph_inputs(nodes)
        inputs = tuple(n.name for n in nodes if n.op == "placeholder")
    else:
        n_in = build.receive(crossing[s])
        inputs = tuple(n.name for n in crossing[s])
    build.copy_nodes(nodes, stage)
    if s == k - 1:
        outs = output_node.args[0]
        build.g.output(tuple(build.arg(n) if isinstance(n, torch.fx.Node) else n for n in outs))
        outputs = tuple(n.name if isinstance(n, torch.fx.Node) else repr(n) for n in outs)
        n_out = len(outs)
    else:
        n_out = build.send(crossing[s + 1], copy_outputs)
        outputs = tuple(n.name for n in crossing[s + 1])
    return StageGraph(index=s, module=build.module(), inputs=inputs, outputs=outputs,
                      num_input_tensors=n_in, num_output_tensors=n_out)


def stage_io_examples(split: SplitGraph, values: Mapping[str, Any],
                      flat_inputs: list[Any]) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None]:
    """The tensors each stage takes and returns, as they travel between ranks, for
    ``torch.distributed.pipelining``'s static metadata: meta tensors shaped like ``values``
    (node name -> the value at one micro-batch) and ``flat_inputs`` (the model's flat inputs at
    one micro-batch). Numbers travel as 0-d tensors, as :class:`_Unpack` sends them. A stage
    whose tensors cannot all be described (a non-tensor model output) gets None."""

    def meta(t: torch.Tensor) -> torch.Tensor:
        # requires_grad as in the real run: torch sends and receives gradients only for those.
        return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta",
                           requires_grad=bool(t.requires_grad and t.is_floating_point()))

    def travelling(names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for name in names:
            _, leaves = _flatten_value(values[name])
            for v, leaf in zip(pytree.tree_leaves(values[name]), leaves):
                if leaf.kind == "tensor":
                    out.append(meta(v))
                elif leaf.kind == "number":
                    out.append(meta(torch.tensor(leaf.python_type(v))))
        return tuple(out)

    examples: list = []
    k = len(split.stages)
    for st in split.stages:
        if st.index == 0:
            ins = tuple(meta(v) for v in flat_inputs if isinstance(v, torch.Tensor))
        else:
            ins = travelling(st.inputs)
        if st.index == k - 1:
            finals = [values.get(name) for name in st.outputs]
            if not all(isinstance(v, torch.Tensor) for v in finals):
                examples.append(None)
                continue
            outs = tuple(meta(v) for v in finals)
        else:
            outs = travelling(st.outputs)
        examples.append((ins, outs))
    return examples


def carries_numbers(split: SplitGraph, values: Mapping[str, Any]) -> bool:
    """Whether a number (an int from ``x.size(0)``, a float) crosses a stage boundary: the
    receiving stage then computes with a received value, not only with received shapes."""
    return any(leaf.kind == "number" for st in split.stages[1:] for name in st.inputs
               for leaf in _flatten_value(values[name])[1])
