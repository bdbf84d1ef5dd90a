"""Tests for fxshard.zoo: every model builds, traces, runs, and has the expected size."""

from __future__ import annotations


import pytest
import torch
import torch.fx as fx

from fxshard import zoo
from fxshard.errors import FxshardError, ZooError
from fxshard.zoo import (
    GPT2,
    MLP,
    GPT2Config,
    Inception,
    InceptionConfig,
    Llama,
    LlamaConfig,
    MLPConfig,
    ResNet,
    ResNetConfig,
    UNet,
    UNetConfig,
)

LMS = ["gpt2", "gpt2-tiny", "gpt2-xl", "llama-tiny", "llama-7b", "llama-70b"]
META_BY_DEFAULT = {"gpt2-xl", "llama-7b", "llama-70b"}


def _llama_params(dim: int, n_layers: int, n_heads: int, n_kv: int, ffn: int, vocab: int) -> int:
    """LLaMA parameter count from its config: embeddings, untied head, layers, final norm."""
    kv_dim = dim // n_heads * n_kv
    attn = 2 * dim * dim + 2 * dim * kv_dim
    mlp = 3 * dim * ffn
    return 2 * vocab * dim + n_layers * (attn + mlp + 2 * dim) + dim


def _small_inputs(zm: zoo.ZooModel) -> tuple:
    """Shrink the example batch (and sequence) so a meta forward stays tiny."""
    (x,) = zm.example_inputs
    return (x[:1, :16],) if zm.name in LMS else (x[:1],)


def test_names_sorted_and_complete() -> None:
    expected = {"mlp", "resnet", "unet", "inception", "gpt2", "gpt2-xl", "gpt2-tiny",
                "llama-7b", "llama-70b", "llama-tiny"}
    assert zoo.names() == sorted(expected)


def test_describe_has_param_counts() -> None:
    rows = dict(zoo.describe())
    assert list(rows) == zoo.names()
    assert "124.4M params" in rows["gpt2"]
    assert "68.98B params" in rows["llama-70b"]
    assert all("\n" not in d for d in rows.values())


@pytest.mark.parametrize("name", zoo.names())
def test_builds_traces_and_runs_on_meta(name: str) -> None:
    zm = zoo.build(name, device="meta")
    assert zm.name == name and isinstance(zm.example_inputs, tuple)
    assert all(p.is_meta for p in zm.model.parameters())
    assert all(x.is_meta for x in zm.example_inputs)
    gm = fx.symbolic_trace(zm.model)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    x = _small_inputs(zm)
    out = gm(*x)
    cfg = zm.model.config
    if name in LMS:
        assert out.shape == (1, x[0].shape[1], cfg.vocab_size)
    elif name == "unet":
        assert out.shape == (1, cfg.num_classes, *zm.example_inputs[0].shape[2:])
    elif name == "mlp":
        assert out.shape == (1, cfg.out_features)
    else:
        assert out.shape == (1, cfg.num_classes)


@pytest.mark.parametrize("name", sorted(META_BY_DEFAULT | {"mlp", "gpt2-tiny", "llama-tiny"}))
def test_default_device_and_input_shapes(name: str) -> None:
    zm = zoo.build(name, batch_size=2)
    expected = "meta" if name in META_BY_DEFAULT else "cpu"
    assert next(zm.model.parameters()).device.type == expected
    (x,) = zm.example_inputs
    assert x.shape[0] == 2
    if name in LMS:
        assert x.dtype == torch.long
        if expected == "cpu":
            assert 0 <= int(x.min()) and int(x.max()) < zm.model.config.vocab_size


def test_gpt2_is_124m_with_tied_head() -> None:
    model = zoo.build("gpt2", device="meta").model
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.lm_head.weight is model.wte.weight


def test_gpt2_xl_size() -> None:
    assert zoo.build("gpt2-xl").num_params == 1_557_611_200


@pytest.mark.parametrize(
    ("name", "shape", "approx"),
    [
        ("llama-7b", (4096, 32, 32, 32, 11008, 32000), 6.74e9),
        ("llama-70b", (8192, 80, 64, 8, 28672, 32000), 68.98e9),
    ],
)
def test_llama_param_counts(name: str, shape: tuple[int, ...], approx: float) -> None:
    zm = zoo.build(name)
    expected = _llama_params(*shape)
    assert zm.num_params == expected
    assert expected == pytest.approx(approx, rel=1e-3)
    assert zm.model.output.weight is not zm.model.tok_embeddings.weight


def test_llama_exact_known_counts() -> None:
    # Published sizes: LLaMA-7B 6,738,415,616 and Llama-2-70B 68,976,648,192 parameters.
    assert _llama_params(4096, 32, 32, 32, 11008, 32000) == 6_738_415_616
    assert _llama_params(8192, 80, 64, 8, 28672, 32000) == 68_976_648_192


def test_resnet50_size() -> None:
    # Same count as the reference ResNet-50: 25,557,032.
    assert zoo.build("resnet", device="meta").num_params == 25_557_032


def test_rope_buffers_not_in_state_dict() -> None:
    model = zoo.build("llama-tiny").model
    assert "rope_cos" not in model.state_dict()
    assert model.rope_cos.shape == (64, 16)
    # Position 0 is the identity rotation; cos^2 + sin^2 = 1 everywhere.
    assert torch.equal(model.rope_cos[0], torch.ones(16))
    torch.testing.assert_close(model.rope_cos**2 + model.rope_sin**2, torch.ones(64, 16))


def test_meta_llama_can_be_materialised() -> None:
    real = zoo.build("llama-tiny")
    meta = zoo.build("llama-tiny", device="meta").model
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.model.state_dict())
    meta.init_rope()
    with torch.no_grad():
        torch.testing.assert_close(meta(*real.example_inputs), real.model(*real.example_inputs))


def test_meta_build_of_70b_allocates_nothing() -> None:
    """Built on meta: every tensor is shape only, and the parameter count is LLaMA-2-70B's
    (80 layers of d=8192, GQA with 8 kv heads of 128, SwiGLU 28672, vocabulary 32000, untied
    embedding and head). Its speed is a benchmark's business, not a test's."""
    model = zoo.build("llama-70b").model
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    d, kv, ffn, vocab, layers = 8192, 8 * 128, 28672, 32000, 80
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
    assert sum(p.numel() for p in model.parameters()) == layers * per_layer + 2 * vocab * d + d


@pytest.mark.parametrize("name", ["mlp", "gpt2-tiny", "llama-tiny"])
def test_real_forward_small(name: str) -> None:
    zm = zoo.build(name, batch_size=2)
    gm = fx.symbolic_trace(zm.model)
    out = zm.model(*zm.example_inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(gm(*zm.example_inputs), out)
    if name != "mlp":
        assert out.shape == (2, 64, 256)


def test_lm_is_causal() -> None:
    # Changing the last token must not change the logits of earlier positions.
    for name in ("gpt2-tiny", "llama-tiny"):
        zm = zoo.build(name, batch_size=1, seq_len=8)
        (x,) = zm.example_inputs
        y = x.clone()
        y[0, -1] = (y[0, -1] + 1) % zm.model.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(zm.model(x)[:, :-1], zm.model(y)[:, :-1])


def test_gqa_tiny_llama_has_fewer_kv_params() -> None:
    attn = zoo.build("llama-tiny").model.layers[0].attention
    assert attn.wk.weight.shape == (32, 64) and attn.wq.weight.shape == (64, 64)


@pytest.mark.parametrize(
    ("model", "x", "shape"),
    [
        (ResNet(ResNetConfig(layers=(1, 1, 1, 1), width=8, num_classes=10)),
         torch.randn(2, 3, 64, 64), (2, 10)),
        (UNet(UNetConfig(base_width=8, num_classes=3)), torch.randn(2, 3, 32, 32), (2, 3, 32, 32)),
        (Inception(InceptionConfig(stage_blocks=(1, 1, 1), stage_widths=(8, 16, 24),
                                   num_classes=10)), torch.randn(2, 3, 75, 75), (2, 10)),
        (MLP(MLPConfig(in_features=5, hidden=7, out_features=3, n_layers=3)),
         torch.randn(4, 5), (4, 3)),
    ],
    ids=["resnet", "unet", "inception", "mlp"],
)
def test_small_vision_and_mlp_forward(model: torch.nn.Module, x: torch.Tensor,
                                      shape: tuple[int, ...]) -> None:
    model.eval()
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(gm(x), out)
    assert out.shape == shape


def test_resnet_has_projection_shortcuts() -> None:
    model = ResNet(ResNetConfig(layers=(1, 2), width=8))
    downs = [type(b.downsample).__name__ for b in model.blocks]
    # First block of each stage changes shape (projection); the repeated block does not.
    assert downs == ["Sequential", "Sequential", "Identity"]


def test_unet_concatenates_skips() -> None:
    gm = fx.symbolic_trace(UNet(UNetConfig(base_width=4, depth=3)))
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 3


def test_inception_is_branchy() -> None:
    gm = fx.symbolic_trace(zoo.build("inception", device="meta").model)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 3 + 4 + 2 + 2  # one per inception block and per reduction


def test_tiny_configs_from_brief() -> None:
    model = GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, block_size=32))
    assert model(torch.randint(0, 128, (1, 32))).shape == (1, 32, 128)
    llama = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=1, ffn_hidden=64,
                              vocab_size=50, max_seq_len=16))
    assert llama(torch.randint(0, 50, (3, 10))).shape == (3, 10, 50)


def test_build_is_deterministic() -> None:
    a = zoo.build("mlp", batch_size=4).model.state_dict()
    b = zoo.build("mlp", batch_size=4).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = zoo.build("mlp", batch_size=4, seed=1).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("gpt2-tiny")
    torch.testing.assert_close(torch.rand(3), expected)


def test_deterministic_inputs() -> None:
    a = zoo.build("llama-tiny", seq_len=16).example_inputs[0]
    b = zoo.build("llama-tiny", seq_len=16).example_inputs[0]
    assert torch.equal(a, b) and a.shape == (8, 16)


def test_dtype_casts_params_and_float_inputs() -> None:
    zm = zoo.build("mlp", batch_size=2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in zm.model.parameters())
    assert zm.example_inputs[0].dtype == torch.bfloat16
    lm = zoo.build("llama-tiny", dtype=torch.float16, device="meta")
    assert lm.model.output.weight.dtype == torch.float16
    assert lm.example_inputs[0].dtype == torch.long  # token ids stay integer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mlp", "seq_len": 8}, "not a language model"),
        ({"name": "gpt2-tiny", "seq_len": 65}, "1..64"),
        ({"name": "mlp", "batch_size": 0}, "positive"),
        ({"name": "mlp", "dtype": torch.int32}, "floating"),
        ({"name": "mlp", "device": "nonsense"}, "bad device"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ZooError, match=match):
        zoo.build(**kwargs)


def test_unknown_name_suggests() -> None:
    with pytest.raises(ZooError) as info:
        zoo.build("gtp2")
    msg = str(info.value)
    assert "'gtp2'" in msg and "did you mean 'gpt2'" in msg and "llama-70b" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, FxshardError)


def test_config_validation() -> None:
    with pytest.raises(ZooError, match="n_kv_heads=3"):
        LlamaConfig(n_heads=32, n_kv_heads=3)
    with pytest.raises(ZooError, match="n_head=5"):
        GPT2Config(n_embd=64, n_head=5)
    with pytest.raises(TypeError):
        GPT2Config(2, 4)  # keyword-only


FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(3, 4),)


def make_single():
    return nn.Linear(4, 2), torch.randn(5, 4)


def make_kwargs():
    return nn.Linear(4, 2), (), {"input": torch.randn(5, 4)}


def wrong():
    return 42


def broken():
    raise RuntimeError("boom")


NOT_CALLABLE = 3
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY)
    return path


def test_load_factory_from_file(factory_file) -> None:
    ref = f"{factory_file}:make"
    zm = zoo.load_factory(ref)
    assert zm.name == ref
    assert zm.model(*zm.example_inputs).shape == (3, 2)
    assert "factory" in zm.description and zm.num_params == 4 * 8 + 8 + 8 * 2 + 2
    fx.symbolic_trace(zm.model)
    single = zoo.load_factory(f"{factory_file}:make_single")
    assert len(single.example_inputs) == 1 and single.example_inputs[0].shape == (5, 4)
    kw = zoo.load_factory(f"{factory_file}:make_kwargs")
    assert kw.example_inputs == () and set(kw.example_kwargs) == {"input"}


def test_load_factory_from_module(factory_file, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(factory_file.parent))
    zm = zoo.load_factory("my_models:make")
    assert zm.model(*zm.example_inputs).shape == (3, 2)


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("{dir}/missing.py:make", "does not exist"),
        ("{file}:mkae", "did you mean 'make'"),
        ("{file}:wrong", "returned int"),
        ("{file}:broken", "boom"),
        ("{file}:NOT_CALLABLE", "not a function"),
        ("{file}", "bad factory reference"),
        ("no_such_pkg_for_fxshard.models:make", "no module named"),
    ],
)
def test_load_factory_errors(factory_file, ref: str, match: str) -> None:
    ref = ref.format(dir=factory_file.parent, file=factory_file)
    with pytest.raises(ZooError, match=match):
        zoo.load_factory(ref)


def test_resolve(factory_file) -> None:
    assert zoo.resolve("gpt2-tiny", batch_size=1).example_inputs[0].shape == (1, 64)
    zm = zoo.resolve(f"{factory_file}:make", dtype=torch.float64, device="meta")
    assert zm.example_inputs[0].dtype == torch.float64 and zm.example_inputs[0].is_meta
    assert next(zm.model.parameters()).dtype == torch.float64
    with pytest.raises(ZooError, match="did you mean"):
        zoo.resolve("llama-7")
    with pytest.raises(ZooError, match="inside the factory"):
        zoo.resolve(f"{factory_file}:make", batch_size=2)


def test_zoomodel_is_frozen() -> None:
    zm = zoo.build("mlp", device="meta")
    with pytest.raises(AttributeError):
        zm.name = "other"  # type: ignore[misc]
