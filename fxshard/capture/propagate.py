"""Fake-tensor propagation: every node of a captured graph gets its value's shape and dtype.

Runs a fake copy of the graph module on fake tensors (as ``torch.fx.passes.shape_prop.ShapeProp``
does with a fake mode), on one device for the whole model (:func:`propagation_device`), so that
nothing is computed or allocated and a model on the ``meta`` device propagates as a real one
does. Used by :mod:`fxshard.capture.graph`; see docs/robustness.md, "Models built on the meta device".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxshard.capture.diagnose import first_line
from fxshard.errors import CaptureError

__all__ = ["ValueProp", "fake_copy", "fake_off_meta", "fakeify", "propagation_device", "tensor_meta"]


class ValueProp(torch.fx.Interpreter):
    """Fake-tensor propagation: ``meta["val"]`` and ``meta["tensor_meta"]`` on every node.

    Runs a fake copy of the module (as ShapeProp does with a fake mode) so the real one is
    never touched, and raises instead of printing tracebacks.
    """

    def __init__(self, gm: torch.fx.GraphModule, fake_mode: FakeTensorMode, device: torch.device) -> None:
        from torch._dynamo.utils import deepcopy_to_fake_tensor

        self.fake_module = deepcopy_to_fake_tensor(gm, fake_mode)
        fake_off_meta(self.fake_module, fake_mode, device)
        super().__init__(self.fake_module)
        self.extra_traceback = False  # fx would append its node dump to the message
        self.fake_mode = fake_mode
        self.real_nodes = list(gm.graph.nodes)
        self._index = {n: i for i, n in enumerate(self.fake_module.graph.nodes)}
        self.failed: torch.fx.Node | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        # A node that fails inside a grad-mode region (export's wrap_with_set_grad_enabled)
        # would otherwise leave autograd switched off for the rest of the process.
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            return super().run(*args, **kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            with self.fake_mode:
                result = super().run_node(n)
        except Exception as e:
            self.failed = self.real_nodes[self._index[n]]
            raise CaptureError(f"fake-tensor propagation failed at node {n.name!r} "
                               f"({n.format_node()}): {type(e).__name__}: {first_line(e)}") from e
        for node in (n, self.real_nodes[self._index[n]]):
            node.meta["val"] = result
            node.meta["tensor_meta"] = pytree.tree_map(tensor_meta, result)
        return result


def tensor_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    return None


def propagation_device(module: torch.nn.Module, flat_inputs: list) -> torch.device:
    """The one device fake propagation runs on, wherever the model or its inputs sit on meta.

    A model built under ``torch.device("meta")`` (or partly there: accelerate's
    ``init_empty_weights`` leaves buffers on the CPU) is propagated as if on its one real
    device, or on the CPU when it has none. Not on meta itself: meta dispatches attention to
    the math path (which saves the S x S matrix), where CPU takes the fused kernel as a GPU
    does. Every meta parameter, buffer, input and device constant in the graph moves there
    (see :func:`fake_off_meta`), so that the model sees one device throughout.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [t for t in pytree.tree_leaves(flat_inputs) if isinstance(t, torch.Tensor)]
    real = {t.device for t in tensors if t.device.type != "meta"}
    return real.pop() if len(real) == 1 else torch.device("cpu")


def fake_copy(model: torch.nn.Module, inputs: Any, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """A fake-tensor copy of ``model`` and of ``inputs``, all on ``device``; the model is untouched.

    Capture exports this copy when the model has state on meta: the graph then records
    ``device`` rather than meta wherever the code reads ``x.device``, and tracing is cheaper
    than on meta (transformers LLaMA-2-70B: 11.7-12.1 s of CPU against 12.9-14.9 s, four runs
    each; docs/benchmarks.md).
    """
    from torch._dynamo.utils import deepcopy_to_fake_tensor

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    copy = deepcopy_to_fake_tensor(model, fake_mode)
    _state_off_meta(copy, fake_mode, device)
    return copy, fakeify(inputs, fake_mode, device)


def fake_off_meta(module: torch.fx.GraphModule, fake_mode: FakeTensorMode, device: torch.device) -> None:
    """Move a fake module off meta: its meta tensors become fake ``device`` tensors (ties kept),
    and its graph's ``device=meta`` constants (which torch.export records from ``x.device``,
    e.g. ``inv_freq.to(x.device)`` in a rotary embedding) name ``device``."""
    _state_off_meta(module, fake_mode, device)
    moved: list[bool] = []

    def off_meta(value: Any) -> Any:
        if isinstance(value, torch.device) and value.type == "meta":
            moved.append(True)
            return device
        return value

    # Sub-graphs too: export wraps regions in higher-order ops (torch 2.11 puts a rotary
    # embedding's no_grad block in wrap_with_set_grad_enabled), each with a GraphModule of its own.
    for graph_module in [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]:
        before_module = len(moved)
        for node in graph_module.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            before = len(moved)
            args = torch.fx.node.map_aggregate(node.args, off_meta)
            kwargs = dict(torch.fx.node.map_aggregate(node.kwargs, off_meta))
            if kwargs.get("device") == "meta":  # a string, as user code may write it
                kwargs["device"] = device
                moved.append(True)
            if len(moved) > before:
                node.args, node.kwargs = args, kwargs
        if len(moved) > before_module:
            graph_module.recompile()


def _state_off_meta(module: torch.nn.Module, fake_mode: FakeTensorMode, device: torch.device) -> None:
    """Replace every meta parameter, buffer and tensor attribute of a fake module by a fake
    ``device`` tensor, keeping ties."""
    memo: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            with fake_mode:
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            memo[id(t)] = (torch.nn.Parameter(new, requires_grad=t.requires_grad)
                           if isinstance(t, torch.nn.Parameter) else new)
        return memo[id(t)]

    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "meta":
                    table[name] = convert(t)
        for name, value in vars(sub).items():  # plain tensor attributes that get_attr reads
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                setattr(sub, name, convert(value))


def fakeify(value: Any, fake_mode: FakeTensorMode, device: torch.device) -> Any:
    """``value`` with every tensor a fake one of ``fake_mode``; meta tensors land on ``device``."""
    def convert(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if v.device.type == "meta":
                with fake_mode:  # see propagation_device
                    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device,
                                               requires_grad=v.requires_grad)
            return fake_mode.from_tensor(v)
        return v

    return pytree.tree_map(convert, value)
