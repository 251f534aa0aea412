"""Qwen2 / Qwen2.5 / Qwen3 (dense) and Llama decoders, written from scratch: the network and nothing else.

The three differ only in the attention projections: Qwen2 always has q/k/v biases (no o_proj bias), Qwen3 adds a
per-head RMSNorm on q and k, and Llama and Qwen3 put a bias on all four projections only when their config says
`attention_bias`. Everything else (RMSNorm, rotate-half RoPE, SwiGLU, tied or untied head) is shared.

One model class serves everyone:
- the trainer calls `model(input_ids)` for logits, or `model(input_ids, targets=...)` for the fp32 log-prob
  of each next token through the fused head (kernels/), with activation checkpointing per layer;
- the sampler passes a KV cache object and per-row positions/masks, so prompts of different lengths
  decode in one batch (see sampler.py for the cache).

It knows nothing of files: checkpoint.py's `load_pretrained(path, device, dtype)` / `save_model(model, path)`
read and write Hugging Face checkpoints. Parameter names are HF's minus the leading "model.".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# config

@dataclass
class ModelConfig:
    arch: str  # "qwen2" (qkv bias), "qwen3" (per-head q/k RMSNorm) or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v carry a bias: always in Qwen2; in Qwen3/Llama o_proj too, if the config says
    max_position_embeddings: int = 32768
    torch_dtype: str = "bfloat16"  # what the checkpoint stores
    raw: dict = field(default_factory=dict, repr=False)  # the config.json we were read from, kept on save
    #                                                      (checkpoint.py maps between the two)


# ----------------------------------------------------------------------------------------------------
# modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 whatever the compute dtype: bf16 squares overflow/underflow too easily
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for the given positions (B, T) -> two (B, T, head_dim) tensors.

    Computed per call rather than cached: it is a handful of tiny ops next to a transformer layer, works
    for any position (no table length to outgrow), and stays fp32 even when the model is cast to bf16
    (a cached buffer would be cast with it and lose the angle precision at large positions).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.int64).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # HF Qwen and Llama use the "rotate half" layout, not interleaved
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x (B, T, H, D); cos/sin (B, T, D)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slice of the sampler's KV cache is ours
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        # Qwen2 hard-codes q/k/v biases and none on o_proj; Qwen3 and Llama use attention_bias for all four
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size,
                                bias=cfg.attention_bias and cfg.arch != "qwen2")
        if cfg.arch == "qwen3":  # Qwen3 normalises each head's q and k before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # One dtype into attention on every path. Under autocast (fp32 weights, bf16 compute: --dist none/ddp on GPU)
        # q, k, v come out of their projections in bf16, but RoPE's fp32 tables promote q and k back to fp32. Plain
        # SDPA would let autocast cast all three to bf16; an attention-bias object (causal_lower_right, the
        # trainer's packed groups) dispatches before autocast and rejects mixed dtypes. So cast here, to v's dtype:
        # exactly what autocast does to SDPA's inputs, and a no-op outside autocast.
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if hasattr(kv_cache, "attend"):
            # the cache runs attention itself: the sampler's decode kernel, the trainer's shared-prompt packing
            out = kv_cache.attend(self.layer_idx, q, k, v)  # (B, H, T, D)
        else:
            if kv_cache is not None:
                # the cache stores this step's k/v and hands back everything attendable: (B, Hkv, S, D)
                k, v = kv_cache.update(self.layer_idx, k, v)
            # no mask: causal attention over the T keys given (training, a full forward, the sampler's prefill,
            # whose cache hands back the prompts' own K/V), which SDPA runs in a kernel that never holds the
            # (B, H, T, T) scores (on CUDA flash attention, which takes GQA as it is; a mask would mean math)
            is_causal = attn_mask is None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # the trainer turns this on: recompute each layer in backward

    def forward(self, input_ids, positions=None, kv_cache=None, attn_mask=None, return_hidden=False,
                targets=None, temperature: float = 1.0, return_entropy: bool = False,
                logprob_backend: str = "auto"):
        """input_ids (B, T) -> logits (B, T, vocab), or final-norm hidden states (B, T, hidden), or, given
        targets (B, T), the fp32 log-prob of each target under softmax(logits / temperature): (B, T)
        (and the entropy of that distribution, (B, T), with return_entropy).
        logprob_backend: who computes those log-probs (kernels.LOGPROB_BACKENDS: "auto" = Triton on CUDA,
        torch elsewhere; "torch" is the fallback for a GPU whose Triton breaks).

        positions (B, T): absolute position of each token (default 0..T-1 for every row).
        kv_cache: an object with `update(layer_idx, k, v) -> (k, v)`, or one with `attend(layer_idx, q, k, v)
        -> out` that does the attention itself (sampler.KernelDecodeView, grpo.SharedPromptAttention).
        attn_mask (B, 1, T, S) bool, True = may attend; None: causal over the T keys (an `update` cache must then
        hand back exactly this call's K/V, as the sampler's prefill does).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, kv_cache, attn_mask,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, attn_mask)
        x = self.norm(x)
        if targets is not None:
            # The fused head never materialises (B*T, vocab) logits. It is called here, inside forward, on
            # purpose: under FSDP2 the head's weight is only gathered during the root module's forward.
            from kernels import linear_token_logprobs

            out = linear_token_logprobs(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                        temperature=temperature, return_entropy=return_entropy,
                                        backend=logprob_backend)
            # reshape(...).clone(): FSDP2 hooks the returned tensors and warns on views (a copy of B*T floats)
            out = tuple(o.reshape(B, T).clone() for o in (out if return_entropy else (out,)))
            return out if return_entropy else out[0]
        return x if return_hidden else self.lm_head(x)


def empty_model(cfg: ModelConfig, device, dtype: torch.dtype) -> Transformer:
    """A Transformer with uninitialised storage on `device` in `dtype`, built on the meta device first so
    that no other copy of the weights is ever allocated (loading and the sampler's copy fill it)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each parameter its own storage: re-tie
        model.lm_head.weight = model.embed_tokens.weight
    return model
