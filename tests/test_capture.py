"""Capture: traced graphs compute what the model computes, with the right shapes."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshard
from fxshard.capture import capture
from fxshard.errors import CaptureError, FxshardError
from fxshard.models import Inception, InceptionConfig, ResNet, ResNetConfig, UNet, UNetConfig
from fxshard.zoo import build

torch.manual_seed(0)


def _small_zoo() -> list[tuple[str, nn.Module, tuple]]:
    cases = []
    for name in ("mlp", "gpt2-tiny", "llama-tiny"):
        z = build(name, batch_size=2)
        cases.append((name, z.model, z.example_inputs))
    cases.append(("resnet", ResNet(ResNetConfig()), (torch.randn(2, 3, 64, 64),)))
    cases.append(("unet", UNet(UNetConfig()), (torch.randn(1, 3, 64, 64),)))
    cases.append(("inception", Inception(InceptionConfig()), (torch.randn(2, 3, 96, 96),)))
    return cases


SMALL_ZOO = _small_zoo()


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name))
    else:
        assert a == b


@pytest.mark.parametrize("name,model,inputs", SMALL_ZOO, ids=[c[0] for c in SMALL_ZOO])
def test_captured_graph_computes_what_the_model_computes(name, model, inputs):
    model.eval()  # BatchNorm in eval: two runs must see the same statistics
    captured = capture(model, inputs)
    assert captured.method == "symbolic_trace"
    _assert_same(model(*inputs), captured(*inputs))


@pytest.mark.parametrize("name,model,inputs", SMALL_ZOO, ids=[c[0] for c in SMALL_ZOO])
def test_fake_shapes_equal_a_real_forward(name, model, inputs):
    model.eval()
    captured = capture(model, inputs)
    real: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            real[n.name] = out
            return out

    Recorder(captured.gm).run(*captured.flatten_inputs(inputs, {}))
    checked = 0
    for node in captured.gm.graph.nodes:
        value = real[node.name]
        if isinstance(value, torch.Tensor):
            meta = node.meta["tensor_meta"]
            assert tuple(meta.shape) == tuple(value.shape), node.name
            assert meta.dtype == value.dtype, node.name
            checked += 1
    assert checked >= 5


def test_parameters_are_the_models_own_and_the_model_is_untouched():
    z = build("gpt2-tiny", batch_size=2)
    before = copy.deepcopy(z.model.state_dict())
    attrs = set(vars(z.model))
    captured = capture(z.model, z.example_inputs)
    own = {id(p) for p in z.model.parameters()}
    assert {id(p) for p in captured.gm.parameters()} <= own
    assert len(list(captured.gm.parameters())) == len(own)  # tied weight appears once
    assert set(vars(z.model)) == attrs
    for key, value in z.model.state_dict().items():
        assert torch.equal(value, before[key])
    # Gradients through the captured graph land in the user's parameters.
    captured(*z.example_inputs).sum().backward()
    assert z.model.wte.weight.grad is not None


def test_batchnorm_statistics_update_the_models_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    captured = capture(model, (torch.randn(8, 4),))
    captured(torch.randn(8, 4) + 5)
    assert model[1].num_batches_tracked.item() == 1
    assert model[1].running_mean.abs().sum() > 0


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor
    aux: tuple | None = None


class _ModelOutput(collections.OrderedDict):
    """Shaped like Hugging Face's ModelOutput: an ordered dict subclass."""


class _DataclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x, *, scale: float = 2.0):
        y = self.lin(x) * scale
        return _Out(logits=y, aux=(y.sum(), None))


class _MappingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x, mask=None):
        out = _ModelOutput()
        out["logits"] = self.lin(x)
        out["masked"] = x * mask
        return out


class _ShapeControlFlow(nn.Module):
    """Python control flow on a shape: symbolic_trace fails, torch.export handles it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x, *, mask):
        h = self.a(x)
        if h.shape[0] > 2:
            h = torch.relu(h) + mask
        return {"out": self.b(h), "hidden": h}


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


def test_dataclass_outputs_keep_their_type():
    x = torch.randn(4, 6)
    model = _DataclassNet()
    captured = capture(model, (x,))
    out = captured(x)
    assert isinstance(out, _Out)
    _assert_same(model(x), out)


def test_dict_subclass_outputs_and_keyword_inputs():
    x, mask = torch.randn(4, 6), torch.ones(4, 6)
    model = _MappingNet()
    captured = capture(model, (x,), example_kwargs={"mask": mask})
    out = captured(x, mask=mask)
    assert type(out) is _ModelOutput
    _assert_same(model(x, mask=mask), out)


def test_shape_control_flow_falls_back_to_export_with_kwargs_and_dict_outputs():
    x, mask = torch.randn(4, 6), torch.randn(4, 6)
    model = _ShapeControlFlow()
    captured = capture(model, (x,), example_kwargs={"mask": mask})
    assert captured.method == "export"
    assert "control flow" in captured.fallback_reason
    expected = model(x, mask=mask)
    got = captured(x, mask=mask)
    _assert_same(expected, got)
    # The exported graph uses the model's own parameters.
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in captured.gm.parameters()} == own
    got["out"].sum().backward()
    assert model.a.weight.grad is not None


def test_uncapturable_model_names_both_reasons():
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent(), (torch.randn(3, 6),))
    message = str(info.value)
    assert "symbolic_trace" in message and "torch.export" in message
    # A data-dependent branch: the ways out are torch.where / torch.cond, not leaf_modules (which
    # the generic message offered; a leaf runs on fake tensors too, so it cannot branch either).
    assert "torch.where" in message and "torch.cond" in message
    assert isinstance(info.value, FxshardError)


def test_forced_symbolic_trace_failure_is_a_capture_error():
    with pytest.raises(CaptureError, match="method='export'"):
        capture(_ShapeControlFlow(), (torch.randn(4, 6),), example_kwargs={"mask": torch.randn(4, 6)},
                method="symbolic_trace")


def test_bad_arguments():
    with pytest.raises(CaptureError, match="method"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(1, 2),))


def test_wrong_input_shape_names_the_node():
    with pytest.raises(CaptureError) as info:
        capture(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), (torch.randn(2, 5),))
    assert "'_0'" in str(info.value) or "_0" in str(info.value)


def test_leaf_modules_stay_single_nodes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = nn.Sequential(Block(), Block())
    x = torch.randn(2, 4)
    flat = capture(model, (x,))
    leafy = capture(model, (x,), leaf_modules=(Block,))
    by_name = capture(model, (x,), leaf_modules=("1",))
    assert [n.target for n in leafy.nodes if n.op == "call_module"] == ["0", "1"]
    assert len(by_name.nodes) < len(flat.nodes) and "1" in [n.target for n in by_name.nodes]
    _assert_same(model(x), leafy(x))


def test_meta_models_capture_without_memory():
    z = build("llama-7b", batch_size=1, seq_len=128)
    captured = capture(z.model, z.example_inputs)
    assert all(p.device.type == "meta" for p in captured.gm.parameters())
    logits = [n for n in captured.nodes if n.op == "output"][0].meta["tensor_meta"][0]
    assert tuple(logits.shape) == (1, 128, 32000)
    assert logits.dtype == torch.bfloat16


def test_fingerprint_is_stable_and_shape_sensitive():
    model = build("mlp").model
    a = capture(model, (torch.randn(4, 1024),)).fingerprint()
    b = capture(model, (torch.randn(4, 1024),)).fingerprint()
    c = capture(model, (torch.randn(8, 1024),)).fingerprint()
    assert a == b != c


def test_calling_with_another_structure_is_an_error():
    x, mask = torch.randn(4, 6), torch.randn(4, 6)
    captured = capture(_ShapeControlFlow(), (x,), example_kwargs={"mask": mask})
    with pytest.raises(CaptureError, match="structure"):
        captured(x, mask, mask)


def test_single_tensor_and_dict_example_inputs():
    model = nn.Linear(3, 2)
    x = torch.randn(2, 3)
    _assert_same(model(x), capture(model, x)(x))
    _assert_same(model(x), capture(model, {"input": x})(input=x))


def test_sdpa_attention_captures_on_cpu():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 8, 4)
    captured = capture(Attn(), (q, q, q))
    _assert_same(Attn()(q, q, q), captured(q, q, q))


def test_top_level_exports():
    assert fxshard.capture is capture
    assert issubclass(fxshard.CaptureError, fxshard.FxshardError)


# ---------------------------------------------------------------------------------------
# Capture failures name the model's line and the cause, without torch's noise (issue 12, 9)
# ---------------------------------------------------------------------------------------


class _ReadsItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        scale = x.abs().max().item()
        return self.a(x) / scale


class _MaskedSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        return h[h > 0]


class _WrongWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h)


def _line_of(cls, text: str) -> str:
    """``file:line`` of the line of ``cls.forward`` that contains ``text``."""
    import inspect

    lines, start = inspect.getsourcelines(cls.forward)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"{inspect.getsourcefile(cls)}:{start + offset}"


def _capture_error(model, inputs, capfd) -> str:
    with pytest.raises(CaptureError) as info:
        capture(model, inputs)
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"torch's output reached the terminal:\n{out}{err}"
    return str(info.value)


def test_item_in_forward_names_the_line_and_the_cause(capfd):
    message = _capture_error(_ReadsItem(), (torch.randn(3, 6),), capfd)
    assert _line_of(_ReadsItem, ".item()") in message
    assert "`scale = x.abs().max().item()`" in message
    assert "data-dependent value" in message and ".item()" in message
    assert "non-tensor argument" in message and "out of forward" in message
    # Not the old misdirection: the inputs are fine, and there is a traceback.
    assert "shapes and dtypes" not in message and "Original traceback" not in message


def test_data_dependent_branch_names_the_line_without_torch_noise(capfd, caplog):
    with caplog.at_level("DEBUG"):
        message = _capture_error(_DataDependent(), (torch.randn(3, 6),), capfd)
    assert not [r for r in caplog.records if r.name.startswith("torch")]
    assert _line_of(_DataDependent, "if x.sum() > 0:") in message and "`if x.sum() > 0:`" in message
    assert "data-dependent control flow" in message
    assert "torch.where" in message and "torch.cond" in message and "non-tensor argument" in message
    assert "def forward(self" not in message  # no graph dump


def test_data_dependent_shape_names_the_line(capfd):
    message = _capture_error(_MaskedSelect(), (torch.randn(3, 6),), capfd)
    assert _line_of(_MaskedSelect, "h[h > 0]") in message
    assert "data-dependent shape" in message and "torch.where(mask, x, 0)" in message


def test_shape_error_names_the_models_line_and_the_inputs(capfd):
    message = _capture_error(_WrongWidth(), (torch.randn(3, 6),), capfd)
    assert _line_of(_WrongWidth, "return self.b(h)") in message
    assert "shapes and dtypes" in message and "data-dependent" not in message


def test_capture_leaves_torch_logging_and_warnings_as_it_found_them(capfd):
    import logging
    import warnings

    loggers = {name: (lg.level, lg.disabled) for name, lg in logging.root.manager.loggerDict.items()
               if isinstance(lg, logging.Logger) and name.split(".")[0] == "torch"}
    filters = list(warnings.filters)
    _capture_error(_DataDependent(), (torch.randn(3, 6),), capfd)
    capture(_ShapeControlFlow(), (torch.randn(4, 6),), example_kwargs={"mask": torch.randn(4, 6)})
    after = {name: (lg.level, lg.disabled) for name, lg in logging.root.manager.loggerDict.items()
             if isinstance(lg, logging.Logger) and name in loggers}
    assert after == loggers
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match="still heard"):  # warnings outside capture still reach the user
        warnings.warn("still heard", UserWarning)
