"""Language models of the zoo: GPT-2 (tied LM head) and a LLaMA-style decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxshard.errors import ZooError

__all__ = ["GPT2", "GPT2Config", "Llama", "LlamaConfig"]


def _init_lm_weights(module: nn.Module) -> None:
    """GPT-style init: N(0, 0.02) weights and zero biases (PyTorch's default is far wider)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Shape of :class:`GPT2`; the defaults give GPT-2 small (124M params)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ZooError(f"GPT2Config: n_embd={self.n_embd} is not divisible by "
                           f"n_head={self.n_head}; pick n_embd a multiple of n_head")


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, hd = self.n_embd, self.n_embd // self.n_head
        qkv = self.c_attn(x)
        # Static slices (not tuple unpacking of .split) keep the fx graph free of iteration.
        q = qkv[..., :c].unflatten(-1, (self.n_head, hd)).transpose(1, 2)
        k = qkv[..., c:2 * c].unflatten(-1, (self.n_head, hd)).transpose(1, 2)
        v = qkv[..., 2 * c:].unflatten(-1, (self.n_head, hd)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).flatten(2))


class GPT2Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
                                 nn.GELU(approximate="tanh"), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 decoder; input int64 token ids ``(B, T)``, output logits ``(B, T, vocab)``."""

    def __init__(self, config: GPT2Config | None = None) -> None:
        super().__init__()
        cfg = config or GPT2Config()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(_init_lm_weights)
        # GPT-2 scales residual projections so the residual stream's variance stays put.
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape of :class:`Llama`; the defaults give LLaMA-7B (6.74B params)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention
    ffn_hidden: int = 11008
    vocab_size: int = 32000
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        kv = self.kv_heads
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ZooError(f"LlamaConfig: dim={self.dim} must split into n_heads={self.n_heads} "
                           f"heads of even size (RoPE rotates pairs); change dim or n_heads")
        if kv < 1 or self.n_heads % kv:
            raise ZooError(f"LlamaConfig: n_heads={self.n_heads} is not a multiple of "
                           f"n_kv_heads={kv}; pick n_kv_heads among the divisors of n_heads")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_heads`` unless grouped-query attention is used)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module):
    """Grouped-query causal attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hd, half = self.head_dim, self.head_dim // 2
        q = self.wq(x).unflatten(-1, (self.n_heads, hd)).transpose(1, 2)
        k = self.wk(x).unflatten(-1, (self.n_kv, hd)).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv, hd)).transpose(1, 2)
        q = q * cos + _rotate_half(q, half) * sin
        k = k * cos + _rotate_half(k, half) * sin
        if self.n_kv != self.n_heads:
            # Explicit repeat (rather than SDPA's enable_gqa) so cost models see the copy.
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """LLaMA feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    """Pre-norm LLaMA block: attention then SwiGLU, each with a residual add."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = LlamaAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """LLaMA decoder; input int64 token ids ``(B, T)``, output logits ``(B, T, vocab)``."""

    def __init__(self, config: LlamaConfig | None = None) -> None:
        super().__init__()
        cfg = config or LlamaConfig()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(_init_lm_weights)
        # Derived from the config, so kept out of the state_dict (persistent=False).
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.dim // cfg.n_heads),
                             persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the rotary tables in place, e.g. after ``to_empty()`` of a meta model."""
        cfg, hd, dev = self.config, self.rope_cos.size(1), self.rope_cos.device
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=dev) / hd)
        angles = torch.outer(torch.arange(cfg.max_seq_len, device=dev).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        with torch.no_grad():
            self.rope_cos.copy_(angles.cos())
            self.rope_sin.copy_(angles.sin())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        h = self.tok_embeddings(idx)
        # narrow, not [:t]: fx cannot put a traced length inside a slice of a plain buffer.
        cos = self.rope_cos.narrow(0, 0, t).to(h.dtype)
        sin = self.rope_sin.narrow(0, 0, t).to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))
