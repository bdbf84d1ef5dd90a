"""Real-world model patterns compiled into pipelines of 3 or more stages, checked exactly.

Two sources of models:

- ``transformers`` classes built from small configs (no weights are downloaded), the way users
  will feed them in: config objects, attention masks, rotary embeddings, keyword inputs,
  ``ModelOutput`` returns, caches switched off, integer token inputs, losses computed inside
  the model from ``labels=``. None of them traces with ``symbolic_trace``; they are captured
  with ``torch.export``.
- small hand-written models for the patterns those libraries hide: BatchNorm with skips, a
  parameter reachable under two names, one module called twice, a buffer updated in forward,
  in-place ops, Python control flow on shapes, and dropout.

Every check is :func:`tests.test_runtime.check_transparency`: the outputs, the loss and every
parameter's gradient (under every name) equal an eager deep copy within 1e-5 relative, and
so do the parameters after SGD steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxshard
from tests.test_runtime import (
    assert_grads_close,
    assert_params_close,
    assert_rel_close,
    assert_tree_close,
    check_transparency,
)

transformers = pytest.importorskip("transformers")

DEVICES = "3xcpu:1GB"
BATCH, SEQ, VOCAB = 4, 16, 96


pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()


def _tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask with left padding on two rows, next-token targets)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :5] = 0
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, mask, target


def _no_dropout(**config):
    """Dropout off (the exact checks need the same numbers as eager; dropout has its own test)."""
    for key in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "activation_dropout", "dropout_rate",
                "classifier_dropout"):
        config.setdefault(key, 0.0)
    return config


def _decoder(cls_name: str, config_name: str, **extra):
    def build():
        config_cls = getattr(transformers, config_name)
        config = config_cls(**_no_dropout(vocab_size=VOCAB, max_position_embeddings=64, use_cache=False, **extra))
        return getattr(transformers, cls_name)(config)

    return build


LLAMA_LIKE = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2)

CAUSAL_LMS = {
    "gpt2": _decoder("GPT2LMHeadModel", "GPT2Config", n_layer=3, n_embd=32, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0),
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig", **LLAMA_LIKE),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig", sliding_window=8, **LLAMA_LIKE),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config", **LLAMA_LIKE),
    "gpt-neox": _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", num_hidden_layers=3, hidden_size=32,
                         intermediate_size=64, num_attention_heads=4, bos_token_id=0, eos_token_id=0),
    "opt": _decoder("OPTForCausalLM", "OPTConfig", num_hidden_layers=3, hidden_size=32, ffn_dim=64,
                    num_attention_heads=4, word_embed_proj_dim=32, layerdrop=0.0, bos_token_id=0,
                    eos_token_id=0, pad_token_id=1),
}


def logits_loss(out, target):
    return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())


def _check_pipeline(compiled: fxshard.CompiledModel, stages: int = 3) -> None:
    plan = compiled.plan
    assert plan.strategy == "pipeline" and plan.num_stages == stages, (plan.strategy, plan.num_stages)
    # Every stage runs some of the model: no stage is only a pass-through.
    assert all(set(s.nodes) - {"output"} for s in plan.stages), [s.nodes for s in plan.stages]


@pytest.mark.parametrize("family", sorted(CAUSAL_LMS))
def test_transformers_causal_lm_in_three_stages(family):
    """Token ids and a padding mask as keyword inputs, a ModelOutput back, use_cache=False."""
    torch.manual_seed(0)
    model = CAUSAL_LMS[family]()
    ids, mask, target = _tokens()
    compiled = check_transparency(model, (), target, logits_loss, kwargs={"input_ids": ids, "attention_mask": mask},
                                  devices=DEVICES, strategy="pipeline", stages=3, schedule="1f1b", microbatches=4,
                                  sgd_steps=1)
    _check_pipeline(compiled)
    out = compiled(input_ids=ids, attention_mask=mask)
    assert type(out).__name__.startswith("CausalLMOutput"), type(out)


def test_transformers_loss_computed_inside_the_model_from_labels():
    """``labels=`` as a keyword input: the model shifts them and computes the loss itself;
    ``step`` is driven by ``loss_fn=lambda out: out.loss``."""
    torch.manual_seed(0)
    model = CAUSAL_LMS["llama"]()
    ids, mask, _ = _tokens()
    labels = ids.clone()
    kwargs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    compiled = check_transparency(model, (), None, lambda out: out.loss, kwargs=kwargs, devices=DEVICES,
                                  strategy="pipeline", stages=3, schedule="gpipe", microbatches=2, sgd_steps=1)
    _check_pipeline(compiled)


def test_transformers_tied_embeddings_are_one_parameter_under_two_names():
    torch.manual_seed(0)
    model = CAUSAL_LMS["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask, target = _tokens()
    compiled = check_transparency(model, (), target, logits_loss, kwargs={"input_ids": ids, "attention_mask": mask},
                                  devices="4xcpu:1GB", strategy="pipeline", stages=4, schedule="gpipe",
                                  microbatches=4, sgd_steps=1)
    _check_pipeline(compiled, 4)
    # The one weight is read by the embedding on the first stage and the head on the last.
    stage_of = compiled.plan.stage_of()
    captured = fxshard.capture(model, (), example_kwargs={"input_ids": ids, "attention_mask": mask})
    readers = {stage_of[u.name] for n in captured.nodes if n.op == "get_attr"
               and captured.gm.get_parameter(n.target) is model.lm_head.weight for u in n.users}
    assert readers == {0, compiled.plan.num_stages - 1}, readers
    assert model.lm_head.weight is model.transformer.wte.weight


def test_transformers_bert_classifier_with_padding_mask():
    torch.manual_seed(0)
    config = transformers.BertConfig(**_no_dropout(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=64, num_labels=3))
    model = transformers.BertForSequenceClassification(config)
    ids, mask, _ = _tokens()
    types = torch.zeros_like(ids)
    target = torch.tensor([0, 2, 1, 2])
    compiled = check_transparency(
        model, (), target, lambda out, t: F.cross_entropy(out.logits, t),
        kwargs={"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
        devices=DEVICES, strategy="pipeline", stages=3, schedule="1f1b", microbatches=4, sgd_steps=1)
    _check_pipeline(compiled)


def test_transformers_t5_encoder_decoder():
    torch.manual_seed(0)
    config = transformers.T5Config(**_no_dropout(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_decoder_layers=2, num_heads=4, use_cache=False,
                                                 decoder_start_token_id=0, pad_token_id=0))
    model = transformers.T5ForConditionalGeneration(config)
    ids, mask, target = _tokens()
    decoder_ids = torch.roll(target, 1, dims=1)
    compiled = check_transparency(
        model, (), target, logits_loss,
        kwargs={"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids},
        devices=DEVICES, strategy="pipeline", stages=3, schedule="gpipe", microbatches=2, sgd_steps=1)
    _check_pipeline(compiled)


def _check_image_classifier(model, schedule: str, microbatches: int, dtype=torch.float32):
    """Pixels in, ``out.logits`` against class targets, 3 stages."""
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=dtype)
    target = torch.tensor([0, 4, 1, 3])
    compiled = check_transparency(model, (), target, lambda out, t: F.cross_entropy(out.logits, t),
                                  kwargs={"pixel_values": pixels}, devices=DEVICES, strategy="pipeline", stages=3,
                                  schedule=schedule, microbatches=microbatches, sgd_steps=1)
    _check_pipeline(compiled)


def test_transformers_vit_classifier():
    torch.manual_seed(0)
    config = transformers.ViTConfig(**_no_dropout(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=5))
    _check_image_classifier(transformers.ViTForImageClassification(config), "1f1b", 4)


def _hf_resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 2, 1], num_labels=5)
    return transformers.ResNetForImageClassification(config)


def test_transformers_resnet_batchnorm_and_in_place_skips_train_mode():
    """BatchNorm in training mode and ``hidden += residual`` skips; one micro-batch, so the
    batch statistics are those of the whole batch (see docs/runtime.md) and the running
    statistics move exactly as eager's."""
    torch.manual_seed(0)
    model = _hf_resnet().train()
    _check_image_classifier(model, "gpipe", 1)
    tracked = [int(b) for k, b in model.named_buffers() if k.endswith("num_batches_tracked")]
    assert tracked and all(t == 3 for t in tracked), tracked  # forward + 2 steps, one micro-batch each


def test_transformers_resnet_eval_mode_many_microbatches():
    """Eval mode, 4 micro-batches, in float64 (deep random nets amplify float32 rounding)."""
    torch.manual_seed(0)
    _check_image_classifier(_hf_resnet().double().eval(), "1f1b", 4, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# Hand-written patterns
# ---------------------------------------------------------------------------------------


class Counted(nn.Module):
    """A buffer updated in forward (a step counter and an exponential moving average of the
    input's mean, as normalisers and EMA trackers keep), a module called twice, in-place ops
    on activations, and control flow on a shape."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.shared = nn.Linear(d, d)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.out = nn.Linear(d, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            self.ema.mul_(0.9).add_(0.1 * x.detach().mean(0))
        h = self.shared(torch.relu(self.inp(x)))
        for layer in self.layers:
            skip = h
            h = layer(h)
            h += skip
            h.relu_()
        if x.shape[-1] % 2 == 0:  # Python control flow on a shape
            h = h * 0.5
        h = self.shared(h)  # the same module again
        return self.out(h)


def test_buffers_updated_in_forward_in_place_ops_and_a_module_called_twice():
    torch.manual_seed(0)
    model = Counted()
    x = torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(3))
    target = torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(4))
    compiled = check_transparency(model, (x,), target, F.mse_loss, devices=DEVICES, strategy="pipeline", stages=3,
                                  schedule="gpipe", microbatches=1, sgd_steps=1)
    _check_pipeline(compiled)
    assert int(model.calls) == 3  # compiled forward + 2 steps, like the eager copy (checked as a buffer)


class Gated(nn.Module):
    """Config object, keyword-only options with defaults, a dict of optional outputs."""

    class Config:
        def __init__(self, d: int = 16, layers: int = 4, return_hidden: bool = False) -> None:
            self.d, self.layers, self.return_hidden = d, layers, return_hidden

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(VOCAB, config.d)
        self.blocks = nn.ModuleList(nn.Linear(config.d, 2 * config.d) for _ in range(config.layers))
        self.head = nn.Linear(config.d, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                output_hidden_states: bool | None = None, return_dict: bool = True):
        hidden = self.emb(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask[..., None].to(hidden.dtype)
        states = []
        for block in self.blocks:
            a, b = block(hidden).chunk(2, dim=-1)
            hidden = hidden + a * torch.sigmoid(b)
            states.append(hidden)
        logits = self.head(hidden)
        want = self.config.return_hidden if output_hidden_states is None else output_hidden_states
        if not return_dict:
            return (logits, tuple(states)) if want else (logits,)
        return {"logits": logits, "hidden_states": tuple(states) if want else None}


@pytest.mark.parametrize("return_dict", [True, False])
def test_config_objects_optional_keyword_flags_and_none_outputs(return_dict):
    torch.manual_seed(0)
    model = Gated(Gated.Config())
    ids, mask, target = _tokens()

    def loss(out, t):
        logits = out["logits"] if return_dict else out[0]
        return F.cross_entropy(logits.flatten(0, 1), t.flatten())

    kwargs = {"attention_mask": mask, "output_hidden_states": return_dict, "return_dict": return_dict}
    compiled = check_transparency(model, (ids,), target, loss, kwargs=kwargs, devices=DEVICES, strategy="pipeline",
                                  stages=3, schedule="1f1b", microbatches=4, sgd_steps=1)
    _check_pipeline(compiled)


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.3))])
        self.out = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.dropout(self.layers(x), 0.2, self.training))


def test_dropout_with_one_microbatch_draws_what_eager_draws():
    """One process, one micro-batch: the stages run their nodes in the eager order, so from the
    same seed every dropout mask, output and gradient equals eager's (docs/runtime.md)."""
    torch.manual_seed(0)
    model = Dropped()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    target = torch.randn(8, 2, generator=torch.Generator().manual_seed(6))
    compiled = fxshard.compile(model, DEVICES, (x,), strategy="pipeline", stages=3, schedule="gpipe", microbatches=1)
    _check_pipeline(compiled)
    for seed in (11, 12):
        torch.manual_seed(seed)
        loss = compiled.step(x, target=target, loss_fn=F.mse_loss)
        torch.manual_seed(seed)
        ref_loss = F.mse_loss(ref(x), target)
        ref_loss.backward()
        assert_rel_close(loss, ref_loss.detach(), f"loss with dropout, seed {seed}")
        assert_grads_close(model, ref)
    torch.manual_seed(13)
    out = compiled(x)
    torch.manual_seed(13)
    assert_tree_close(out, ref(x))


def test_dropout_with_several_microbatches_is_reproducible_and_independent_per_microbatch():
    """Several micro-batches: each draws its own masks in schedule order. The same seed gives
    the same loss and gradients run to run; identical micro-batches get different masks; the
    gradients are those of the masks the forward drew (eval mode, without dropout, is exact)."""
    torch.manual_seed(0)
    model = Dropped()
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)).repeat(4, 1)  # 4 equal micro-batches
    target = torch.zeros(8, 2)
    compiled = fxshard.compile(model, DEVICES, (x,), strategy="pipeline", stages=3, schedule="1f1b", microbatches=4)
    _check_pipeline(compiled)
    runs = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(7)
        loss = compiled.step(x, target=target, loss_fn=F.mse_loss)
        runs.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        assert torch.equal(grad, runs[1][1][name]), f"{name}: not reproducible from the same seed"
    torch.manual_seed(8)
    out = compiled(x)
    chunks = out.chunk(4)
    assert not any(torch.equal(chunks[0], c) for c in chunks[1:]), "micro-batches got the same dropout masks"
    # Dropout is live: the training-mode output differs from eval's, which is exact.
    ref = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(out, ref(x))
        assert_tree_close(compiled(x), ref(x))


def test_a_model_without_example_inputs_compiles_at_the_first_call_with_integer_tokens():
    torch.manual_seed(0)
    model = CAUSAL_LMS["qwen2"]()
    ref = copy.deepcopy(model)
    ids, mask, target = _tokens()
    compiled = fxshard.compile(model, DEVICES, strategy="pipeline", stages=3, microbatches=2, schedule="gpipe")
    loss = compiled.step(input_ids=ids, attention_mask=mask, target=target, loss_fn=logits_loss)
    ref_loss = logits_loss(ref(input_ids=ids, attention_mask=mask), target)
    ref_loss.backward()
    _check_pipeline(compiled)
    assert_rel_close(loss, ref_loss.detach(), "loss")
    assert_grads_close(model, ref)
    assert_params_close(model, ref)


class BatchBranch(nn.Module):
    """Branches on ``batch == 4``: torch.export must fix the graph's batch size at 4."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if x.shape[0] == 4:
            h = h * 2
        return h


def test_a_model_that_fixes_its_batch_size_pipelines_without_microbatches():
    """The planner sees the fixed batch: one micro-batch, no replicas; other batch sizes are
    refused at the call (the graph only runs at 4)."""
    torch.manual_seed(0)
    model = BatchBranch()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    target = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    auto = fxshard.plan(copy.deepcopy(model), "4xcpu:1MB", (x,))
    assert auto.microbatches == 1 and auto.replicas == 1, (auto.strategy, auto.microbatches, auto.replicas)
    compiled = check_transparency(model, (x,), target, F.mse_loss, devices=DEVICES, strategy="pipeline", stages=3,
                                  sgd_steps=1)
    _check_pipeline(compiled)
    assert compiled.plan.microbatches == 1
    with pytest.raises(fxshard.ExecutionError, match=r"compiled for shape \(4, 16\)"):
        compiled(torch.randn(2, 16))
