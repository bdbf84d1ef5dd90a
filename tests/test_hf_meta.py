"""Hugging Face models built on the meta device plan, at small and at published shapes.

``transformers`` classes built under ``torch.device("meta")`` (no weights, no memory) from their
configs, planned with ``fxshard.plan``; the plan's parameter bytes are checked against each
architecture's parameter count computed from the config by its formula, independently of the
module. The published shapes (7B-class and LLaMA-2-70B) take tens of seconds each to capture
(torch.export traces every layer), so they are ``slow``.
"""

from __future__ import annotations

import pytest
import torch

import fxshard
from fxshard.capture import capture
from fxshard.cluster import Cluster
from fxshard.planner import PlanOptions, plan_captured

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# family -> (config class, model class, small config, published config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2},
              {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32}),  # LLaMA-2-7B
    "mistral": ("MistralConfig", "MistralForCausalLM",
                {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2},
                {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8}),  # Mistral-7B
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
              {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
               "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}),  # Qwen2-7B
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"vocab_size": 256, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4},
             {"n_embd": 1600, "n_layer": 48, "n_head": 25}),  # GPT-2 XL, the largest GPT-2
}
LLAMA2_70B = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}


def expected_params(cfg, family: str) -> int:
    """The architecture's parameter count, from its config (not from the module)."""
    V, H, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    if family == "gpt2":
        inner = cfg.n_inner or 4 * H
        block = 2 * H + (3 * H * H + 3 * H) + (H * H + H) + 2 * H + (H * inner + inner) + (inner * H + H)
        return V * H + cfg.n_positions * H + L * block + 2 * H  # LM head tied to the embedding
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // heads
    attn = H * heads * hd + 2 * H * kv * hd + heads * hd * H
    if family == "qwen2":
        attn += heads * hd + 2 * kv * hd  # q, k, v biases
    block = attn + 3 * H * cfg.intermediate_size + 2 * H
    return V * H * (1 if cfg.tie_word_embeddings else 2) + L * block + H


def build_on_meta(family: str, shape: dict, dtype: torch.dtype):
    config_cls, model_cls, _, _ = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(use_cache=False, **shape)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(cfg).to(dtype)
    return cfg, model


def _check_plan(family, shape, dtype, batch, seq, *, training=False, devices="8xH100-80GB"):
    cfg, model = build_on_meta(family, shape, dtype)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    plan = fxshard.plan(model, devices, (ids,), training=training)
    assert plan.model.param_bytes == expected_params(cfg, family) * dtype.itemsize
    assert sum(s.param_bytes for s in plan.stages) >= plan.model.param_bytes
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing materialised
    return plan


@pytest.mark.parametrize("family", list(FAMILIES))
def test_small_models_built_on_meta_plan(family):
    _check_plan(family, FAMILIES[family][2], torch.float32, batch=2, seq=16)


def _compute(captured):
    return [(str(n.target), tuple(n.meta["tensor_meta"].shape), n.meta["tensor_meta"].dtype)
            for n in captured.nodes if any(k in str(n.target) for k in ("linear", "scaled_dot_product"))]


def _outputs(captured):
    out = next(n for n in captured.nodes if n.op == "output")
    return [(tuple(m.shape), m.dtype) for m in out.meta["tensor_meta"]]


def test_meta_model_captures_with_the_shapes_of_a_real_one():
    """A meta model is exported as a fake copy on the CPU, so it captures as the CPU model does."""
    cfg, meta_model = build_on_meta("llama", FAMILIES["llama"][2], torch.float32)
    real_model = transformers.LlamaForCausalLM(cfg)
    ids = torch.zeros(2, 16, dtype=torch.long)
    meta = capture(meta_model, (ids.to("meta"),))
    real = capture(real_model, (ids,))
    assert meta.fixed_batch is None  # the batch stayed symbolic
    assert [n.name for n in meta.nodes] == [n.name for n in real.nodes]
    assert len(_compute(real)) == 2 * 8 + 1  # q k v o gate up down + attention per layer, and the head
    assert _compute(meta) == _compute(real)
    assert _outputs(meta) == _outputs(real) == [((2, 16, cfg.vocab_size), torch.float32)]
    assert {id(p) for p in meta.gm.parameters()} == {id(p) for p in meta_model.parameters()}  # the user's own


def test_meta_export_moves_device_constants_for_propagation(monkeypatch):
    """Where the fake copy cannot be made, the meta model itself is exported: torch.export records
    the rotary buffer's ``.to(x.device)`` as device=meta, and fake propagation moves those
    constants to its device with the parameters (this failed with "Tensor device mismatch!
    Expected: meta, Got: cpu")."""
    import sys

    export_module = sys.modules["fxshard.capture.export"]  # `fxshard.capture` is the function

    def no_copy(*args, **kwargs):
        raise RuntimeError("cannot deep-copy this model")

    monkeypatch.setattr(export_module, "fake_copy", no_copy)
    cfg, model = build_on_meta("llama", FAMILIES["llama"][2], torch.float32)
    meta = capture(model, (torch.zeros(2, 16, dtype=torch.long, device="meta"),))
    assert any(v == torch.device("meta") for n in meta.nodes for v in n.kwargs.values())  # as traced
    assert all(v != torch.device("meta") for n in meta.fake_module.graph.nodes for v in n.kwargs.values())
    assert _outputs(meta) == [((2, 16, cfg.vocab_size), torch.float32)]
    assert len(_compute(meta)) == 2 * 8 + 1


def test_model_partly_on_meta_captures():
    """Parameters on meta and buffers real (accelerate's ``init_empty_weights`` default): the
    rotary embedding's CPU buffer meets meta activations."""
    shape = FAMILIES["llama"][2]
    cfg, model = build_on_meta("llama", shape, torch.float32)
    rotary = model.model.rotary_emb
    for name, buf in list(rotary.named_buffers(recurse=False)):
        rotary.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    plan = fxshard.plan(model, "8xH100-80GB", (ids,), training=False)
    assert plan.model.param_bytes == expected_params(cfg, "llama") * 4
    assert rotary.inv_freq.device.type == "cpu"  # the user's module is untouched


def test_model_on_meta_with_real_inputs_captures():
    cfg, model = build_on_meta("qwen2", FAMILIES["qwen2"][2], torch.float32)
    plan = fxshard.plan(model, "8xH100-80GB", (torch.zeros(2, 16, dtype=torch.long),), training=True)
    assert plan.model.param_bytes == expected_params(cfg, "qwen2") * 4


@pytest.mark.slow
def test_published_shapes_built_on_meta_plan():
    """7B-class shapes of each family (GPT-2: XL, 1.5B) at one sequence of 128 tokens."""
    for family, (_, _, _, shape) in FAMILIES.items():
        _check_plan(family, shape, torch.bfloat16, batch=1, seq=128)


@pytest.mark.slow
def test_llama2_70b_built_on_meta_plans_for_inference_and_answers_for_training():
    cfg, model = build_on_meta("llama", LLAMA2_70B, torch.bfloat16)
    ids = torch.zeros(8, 2048, dtype=torch.long, device="meta")
    captured = capture(model, (ids,))  # once, for both requests
    cluster = Cluster.parse("8xH100-80GB")
    plan = plan_captured(captured, cluster, 8, PlanOptions(training=False))
    assert plan.model.param_bytes == expected_params(cfg, "llama") * 2
    # 138 GB of weights: split over stages, or sharded over FSDP ranks that gather one block at a time
    assert (plan.strategy in ("pipeline", "hybrid") and plan.num_stages >= 2) or (
        plan.strategy == "fsdp" and plan.replicas * 76e9 > plan.model.param_bytes)
    # Weights, gradients and Adam state alone need 16 bytes x 69B = 1.1 TB > 8 x 80 GB.
    with pytest.raises(fxshard.PlanError, match=r"(?i)adam") as info:
        plan_captured(captured, cluster, 8, PlanOptions(training=True))
    assert "8xH100-80GB" in str(info.value) and "TiB" in str(info.value)


class _NoGradDeviceRead(torch.nn.Module):
    """A rotary-embedding pattern: a buffer moved to the input's device inside ``no_grad``,
    which torch.export wraps in a ``wrap_with_set_grad_enabled`` sub-graph of its own; the
    branch on a shape keeps symbolic_trace out, so capture exports."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.ones(8), persistent=False)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:
            raise ValueError("eight features")
        with torch.no_grad():
            scale = self.freq.to(device=x.device, dtype=torch.float) * 2
        return self.proj(x) * scale


def _meta_export(monkeypatch) -> None:
    import sys

    def no_copy(*args, **kwargs):
        raise RuntimeError("cannot deep-copy this model")

    monkeypatch.setattr(sys.modules["fxshard.capture.export"], "fake_copy", no_copy)


def test_device_constants_inside_export_sub_graphs_move_too(monkeypatch):
    """torch.export records ``device=meta`` inside the no_grad sub-graph as well; propagation
    moves those too (on torch 2.11 the transformers rotary embedding failed this way)."""
    _meta_export(monkeypatch)
    with torch.device("meta"):
        model = _NoGradDeviceRead()
    captured = capture(model, (torch.zeros(4, 8, device="meta"),))
    assert _outputs(captured) == [((4, 8), torch.float32)]


def test_a_failed_propagation_leaves_grad_mode_as_it_was(monkeypatch):
    """A node that fails inside a set-grad-enabled region must not leave autograd off for the
    rest of the process (on torch 2.11 every later backward measured zero)."""
    import sys

    propagate = sys.modules["fxshard.capture.propagate"]  # `fxshard.capture` is the function

    _meta_export(monkeypatch)
    monkeypatch.setattr(propagate, "fake_off_meta", lambda module, fake_mode, device: None)
    with torch.device("meta"):
        model = _NoGradDeviceRead()
    assert torch.is_grad_enabled()
    with pytest.raises(fxshard.CaptureError):
        capture(model, (torch.zeros(4, 8, device="meta"),))
    assert torch.is_grad_enabled()
