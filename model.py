"""Qwen2 / Qwen2.5 / Qwen3 (dense) decoder, written from scratch, with Hugging Face checkpoint I/O.

One model class serves everyone:
- the trainer calls `model(input_ids)` for logits, or `model(input_ids, return_hidden=True)` to feed the
  final hidden states into a fused head (kernels/), with activation checkpointing per layer;
- the sampler passes a KV cache object and per-row positions/masks, so prompts of different lengths
  decode in one batch (see sampler.py for the cache).

Checkpoints are Hugging Face's format (config.json + *.safetensors, sharded with an index), so what we
train loads in transformers / vLLM without conversion, and what they publish loads here. Parameter names
are HF's minus the leading "model." (see `hf_name`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint directory we cannot use. The message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------------
# config

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclass
class ModelConfig:
    arch: str  # "qwen2" (qkv bias) or "qwen3" (per-head q/k RMSNorm, no qkv bias)
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
    attention_bias: bool = True  # qkv projections carry a bias (always in Qwen2, optional in Qwen3)
    max_position_embeddings: int = 32768
    torch_dtype: str = "bfloat16"  # what the checkpoint stores
    raw: dict = field(default_factory=dict, repr=False)  # the config.json we were read from, kept on save

    @staticmethod
    def from_hf(raw: dict, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(f"{source}: unsupported architectures {archs or '(none given)'}; "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in raw:
                raise CheckpointError(f"{source}: missing required key '{key}'")
        if raw.get("use_sliding_window"):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
        # transformers 5 moved rope_theta into rope_parameters; 4.x keeps it at top level
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{source}: rope type '{rope_type}' is not supported (only default RoPE)")
        heads = raw["num_attention_heads"]
        return ModelConfig(
            arch=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(raw.get("attention_bias", False)),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            raw=raw,
        )

    def to_hf(self) -> dict:
        hf_arch = {v: k for k, v in ARCHITECTURES.items()}[self.arch]
        out = dict(self.raw)  # keep keys we don't model (bos_token_id, use_cache, ...)
        out.update(
            architectures=[hf_arch], model_type=self.arch, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu", torch_dtype=self.torch_dtype,
        )
        if self.arch == "qwen3":
            out["attention_bias"] = self.attention_bias
        out.pop("rope_parameters", None)  # we wrote rope_theta above; both 4.x and 5.x read it
        out.pop("dtype", None)
        return out


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
    angles = torch.cat([angles, angles], dim=-1)  # Qwen uses the "rotate half" layout, not interleaved
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
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            # the cache stores this step's k/v and hands back everything attendable: (B, Hkv, S, D)
            k, v = kv_cache.update(self.layer_idx, k, v)
        # no cache and no mask: plain causal attention over the sequence (training, full forward)
        is_causal = attn_mask is None and kv_cache is None
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
        self.source_dir: Path | None = None  # where from_pretrained read us (to copy tokenizer files on save)

    def forward(self, input_ids, positions=None, kv_cache=None, attn_mask=None, return_hidden=False,
                targets=None, temperature: float = 1.0, return_entropy: bool = False):
        """input_ids (B, T) -> logits (B, T, vocab), or final-norm hidden states (B, T, hidden), or, given
        targets (B, T), the fp32 log-prob of each target under softmax(logits / temperature): (B, T)
        (and the entropy of that distribution, (B, T), with return_entropy).

        positions (B, T): absolute position of each token (default 0..T-1 for every row).
        kv_cache: an object with `update(layer_idx, k, v) -> (k, v)` (see sampler.py).
        attn_mask (B, 1, T, S) bool, True = may attend; required with a cache, causal otherwise.
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
                                        temperature=temperature, return_entropy=return_entropy)
            # reshape(...).clone(): FSDP2 hooks the returned tensors and warns on views (a copy of B*T floats)
            out = tuple(o.reshape(B, T).clone() for o in (out if return_entropy else (out,)))
            return out if return_entropy else out[0]
        return x if return_hidden else self.lm_head(x)

    # ------------------------------------------------------------------------------------------------
    # checkpoint I/O

    @staticmethod
    def from_pretrained(path, device="cpu", dtype: torch.dtype | None = None) -> "Transformer":
        """Load an HF checkpoint directory. dtype None = the dtype the checkpoint stores.

        Built on the meta device (no memory), given empty storage directly in the target device and
        dtype, then filled tensor by tensor, shard by shard: the weights exist once, never twice.
        """
        path = Path(path)
        cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        dtype = dtype or getattr(torch, cfg.torch_dtype, torch.float32)
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to(dtype=dtype).to_empty(device=device)
        if cfg.tie_word_embeddings:  # to_empty gives each parameter its own storage: re-tie
            model.lm_head.weight = model.embed_tokens.weight
        params = dict(model.named_parameters())  # tied head appears once, as embed_tokens.weight
        missing = set(params)
        for shard in checkpoint_shards(path):
            for hf, tensor in iter_safetensors(shard):
                name = our_name(hf)
                if cfg.tie_word_embeddings and name == "lm_head.weight":
                    continue  # some tied checkpoints store the head anyway; the embedding is the truth
                if name not in params:
                    raise CheckpointError(f"{shard}: unexpected tensor '{hf}' for {cfg.arch}")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise CheckpointError(f"{shard}: tensor '{hf}' has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(tensor)
                missing.discard(name)
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks tensor '{hf_name(sorted(missing)[0])}'"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        model.source_dir = path
        return model

    def save_pretrained(self, path, state_dict: dict | None = None, max_shard_bytes: int = 5 * 1024**3):
        """Write config.json + safetensors (sharded with an index above max_shard_bytes) that
        transformers' AutoModelForCausalLM loads with identical logits. Copies the tokenizer files of
        the directory we were loaded from. `state_dict` lets a caller pass full tensors it gathered
        itself (FSDP); by default our own parameters are written."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {hf_name(k): v.detach().contiguous()
                   for k, v in (state_dict if state_dict is not None else self.state_dict()).items()}
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # HF re-ties from the embedding
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = t
            size += nbytes
        shards.append(current)
        dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        cfg = self.config.to_hf() | {"torch_dtype": dtype_name}
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            # every file goes to a temp name first: a crash mid-write never leaves a truncated shard
            save_file({k: v.cpu() for k, v in shard.items()}, str(path / (name + ".tmp")),
                      metadata={"format": "pt"})
            os.replace(path / (name + ".tmp"), path / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            write_json(path / "model.safetensors.index.json", index)
        write_json(path / "config.json", cfg)
        if self.source_dir is not None and self.source_dir.resolve() != path.resolve():
            for fname in TOKENIZER_FILES:
                if (self.source_dir / fname).exists():
                    shutil.copy2(self.source_dir / fname, path / fname)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def our_name(hf: str) -> str:
    return hf.removeprefix("model.")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if path.parent.is_dir()
                              else f"{path.parent}: no such checkpoint directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_json(path: Path, obj: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def checkpoint_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        shards = [path / f for f in dict.fromkeys(weight_map.values())]
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"{index}: names shard '{s.name}', which does not exist")
        return shards
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def iter_safetensors(path: Path):
    """Yield (name, cpu tensor) one at a time from a safetensors file.

    The format is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    raw bytes. We read each tensor with a plain read() into a fresh buffer instead of memory-mapping the
    file: mapped pages count as our resident memory until the map closes, which would hold a whole shard
    on top of the weights. Reading one tensor at a time bounds the extra memory by the largest tensor.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = int.from_bytes(f.read(8), "little")
            if file_size < 8 or header_len > file_size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {header_len} "
                                      f"does not fit in {file_size} bytes)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON)") from None
            data_start = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
                begin, end = info["data_offsets"]
                nbytes = math.prod(info["shape"]) * dtype.itemsize
                if end - begin != nbytes or data_start + end > file_size:
                    raise CheckpointError(f"{path}: corrupt safetensors file (tensor '{name}' data is "
                                          "truncated or does not match its shape)")
                buf = torch.empty(nbytes, dtype=torch.uint8)
                f.seek(data_start + begin)
                if f.readinto(buf.numpy()) != nbytes:
                    raise CheckpointError(f"{path}: corrupt safetensors file (short read of '{name}')")
                yield name, buf.view(dtype).reshape(info["shape"])
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


# ----------------------------------------------------------------------------------------------------
# tokenizer

@dataclass
class Tokenizer:
    """`tokenizers.Tokenizer` plus what generation needs: stop ids, pad id, and Qwen's ChatML format."""
    tok: object  # tokenizers.Tokenizer
    eos_ids: tuple[int, ...]  # any of these ends a completion
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Qwen's ChatML: <|im_start|>role\\ncontent<|im_end|>\\n ... then an open assistant turn."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def load_tokenizer(path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file}: no such file (the model directory needs its tokenizer)")
    try:
        tok = HFTokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"{tok_file}: cannot parse ({e})") from None

    def token_text(value):  # tokenizer_config stores special tokens as str or {"content": str}
        return value.get("content") if isinstance(value, dict) else value

    tcfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    eos = []
    if (eos_text := token_text(tcfg.get("eos_token"))) and tok.token_to_id(eos_text) is not None:
        eos.append(tok.token_to_id(eos_text))
    for fname in ("generation_config.json", "config.json"):
        if (path / fname).exists():
            ids = read_json(path / fname).get("eos_token_id")
            eos += ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
    # a ChatML turn always ends with <|im_end|>; base Qwen checkpoints don't list it as EOS, but a model
    # prompted with the chat template must still stop there
    if (im_end := tok.token_to_id("<|im_end|>")) is not None:
        eos.append(im_end)
    if not eos:
        raise CheckpointError(f"{path}: cannot tell the EOS token (no eos_token in tokenizer_config.json "
                              "and no eos_token_id in generation_config.json/config.json)")
    eos = tuple(dict.fromkeys(eos))
    pad_text = token_text(tcfg.get("pad_token"))
    pad = tok.token_to_id(pad_text) if pad_text else None
    return Tokenizer(tok, eos, pad if pad is not None else eos[0])


# ----------------------------------------------------------------------------------------------------
# tiny models for tests and the smoke run

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_model(path, arch: str = "qwen2", corpus: list[str] | None = None, vocab_size: int = 512,
                    seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a complete checkpoint directory (config, safetensors, tokenizer) for a small random model.

    The tokenizer is byte-level BPE trained with `tokenizers` on `corpus` (no corpus: the 256 bytes and
    the special tokens only), so every string, Chinese included, round-trips. The model's vocab is the
    tokenizer's rounded up to a multiple of 64, as Qwen pads its own.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or [], trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    eos_id = tok.token_to_id("<|endoftext|>")
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": 32768})
    write_json(path / "generation_config.json", {"eos_token_id": eos_id, "pad_token_id": eos_id})

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False) | overrides
    dims.setdefault("head_dim", dims["hidden_size"] // dims["num_attention_heads"])
    cfg = ModelConfig(arch=arch, vocab_size=math.ceil(tok.get_vocab_size() / 64) * 64,
                      attention_bias=(arch == "qwen2"), torch_dtype=str(dtype).removeprefix("torch."),
                      **dims)
    cfg.raw = {"eos_token_id": eos_id, "bos_token_id": eos_id}
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones, so a wrong norm placement shows up in tests
            else:
                p.normal_(0.0, 0.02 if p.ndim == 2 else 0.01)
    model.to(dtype).save_pretrained(path)
    return path
