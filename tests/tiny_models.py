"""Small Hugging Face models built from configs (no weights downloaded), shared by test files."""

from __future__ import annotations

import pytest
import torch


def hf_llama(layers: int, batch: int, seq: int = 16) -> tuple[torch.nn.Module, torch.Tensor]:
    """A ``layers``-layer LlamaForCausalLM (width 32, GQA 4/2 heads, vocabulary 128) and a
    seeded batch of token ids; the test is skipped where transformers is missing."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return model, torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))
