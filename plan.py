"""The memory plan: what one rank of a run will hold on its GPU and on the host, from config.json and the
flags alone, before a byte of weights is loaded. Every run prints it and refuses to start when it does not fit;
`python ssr.py --plan` prints it and exits.

Where the bytes go (P parameters; b = 2 bytes on GPU, where the sampler and the compute run in bf16, 4 on CPU):
- resident all run: the sampler's copy of the weights (P b), its KV cache (slots x positions x K/V bytes per
  token), the decode graphs' logits buffers, this rank's share of the trainer state (fp32 weights, fp32 grads,
  AdamW's two fp32 moments: 16 P, divided by the world size under FSDP2), the reference model (--kl-beta),
  a lagging judge's fp32 snapshot (--judge-refresh/--judge-ema: 4 P, divided like the trainer state), an external
  judge (--judge-model) and a COMET model (SSR-X);
- the update adds, for one micro-batch: the activations (with activation checkpointing: each layer's input plus
  one layer recomputed), the parameters FSDP2 gathers (the root's embedding/head/norm for the whole step, two
  layers at a time for the rest: the current one and the prefetched next) and their unsharded gradients (in
  the compute dtype, then fp32 for the reduce-scatter), the fused head's vocabulary chunk;
- the optimizer step adds one fp32 temporary the size of the local shard (foreach AdamW's sqrt of v);
- sampling adds a prefill's activations (PREFILL_TOKENS tokens through one layer's MLP; attention is causal SDPA
  with no mask, whose flash/memory-efficient kernels never hold (n, heads, P, P) scores) and the sampling
  temporaries (a few fp32 (slots, V) tensors).
On GPU two resident rows are estimates rather than counts: the decode graphs' memory pool (one step's
activations at the largest batch bucket: the graphs never run at once, so they share its blocks), and the CUDA
context with NCCL's buffers, which live outside PyTorch's allocator (CUDA_CONTEXT, NCCL_BUFFERS below).
The peak is the resident memory plus the largest of those phases. Sums are exact for the tensors we allocate;
allocator fragmentation is not modelled, so keep a few GiB of margin.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from model import ModelConfig

GIB = 1024**3
# Per process: the CUDA context, cuBLAS/cuDNN workspaces and the loaded kernels (torch's, Triton's, inductor's).
# A bare torch process on an H100 holds ~0.5 GiB of it (nvidia-smi); a compiled run loads more kernels.
CUDA_CONTEXT = GIB
# Per NCCL communicator (one: the default process group that FSDP2/DDP and the weight sync use): per channel and
# peer, NCCL_BUFFSIZE's 4 MiB for the simple protocol plus ~4.5 MiB for LL/LL128, two peers on a ring, up to 32
# channels on NVLink: ~0.5 GiB.
NCCL_BUFFERS = GIB // 2


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters of the root: embedding, final norm, untied head)."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn = H * q + 2 * H * kv + q * H + (q + 2 * kv if cfg.attention_bias else 0)
    norms = 2 * H + (2 * hd if cfg.arch == "qwen3" else 0)
    layer = attn + 3 * H * I + norms
    root = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2) + H
    return layer, root


def total_params(cfg: ModelConfig) -> int:
    layer, root = param_counts(cfg)
    return cfg.num_hidden_layers * layer + root


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def activation_bytes_per_token(cfg: ModelConfig, b: int) -> int:
    """What autograd keeps per token for one decoder layer's backward (our Block in dtype of b bytes): each
    RMSNorm's input, fp32 copy and normalised output; q, k, v with their rotated copies; attention output;
    the MLP's gate, up, silu(gate) and product. Counted from model.py, op by op."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    norms = 2 * H * (2 * b + 8)
    attention = (q + 2 * kv) * b * 4 + q * b * 2
    return norms + attention + 4 * I * b


def sampler_slots(c, world: int) -> int:
    """KV-cache slots: the most sequences this rank can have live (its rollouts, or its judge prompts times
    the judge samples), capped by --sampler-batch-size."""
    prompts = c.prompts_per_step // world
    rollouts = prompts * c.group_size
    judged = (prompts if c.judge_mode == "group" else rollouts) * c.judge_samples
    return max(c.group_size, min(c.sampler_batch_size, max(rollouts, judged if c.w_self != 0 else 0)))


def cache_positions(c) -> int:
    """Positions per slot: the longest actor prompt + answer, or judge prompt (~128 tokens of template + the
    source + the answer) + judgement, whichever is longer (one cache serves both, one after the other)."""
    return c.max_prompt_tokens + c.max_new_tokens + c.judge_max_new_tokens + 128


def graph_pool_bytes(cfg: ModelConfig, slots: int, b: int) -> int:
    """The decode graphs' shared memory pool: one step's transients at the largest batch bucket (slots rows), per
    row a layer's q, k, v and their rotated copies, attention output, the MLP's I-wide tensors and a few
    hidden-wide ones in b bytes, the logits before their fp32 copy, and the kernel's fp32 split partials (a few
    splits a row at that bucket)."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return slots * ((4 * I + 8 * H + 4 * (q + 2 * kv)) * b + V * b + 4 * q * 4)


def graph_logits_bytes(slots: int, positions: int, vocab: int) -> int:
    """The decode CUDA graphs' static logits (bucket, V) fp32, one per (batch bucket, length bucket)."""
    from sampler import GRAPH_LEN_STEP, batch_buckets

    return sum(batch_buckets(slots)) * math.ceil(positions / GRAPH_LEN_STEP) * vocab * 4


ADVICE = {  # a row of the plan -> the flags that shrink it
    "trainer": "shard the trainer over more GPUs (torchrun --nproc-per-node/--nnodes) with --dist fsdp",
    "DDP": "use --dist fsdp", "autocast": "use --dist fsdp",
    "KV cache": "lower --sampler-batch-size, --max-new-tokens or --judge-max-new-tokens",
    "activations: layer inputs": "lower --micro-batch-size",  # --grad-checkpointing is on: no advice to turn it on
    "activations": "lower --micro-batch-size or turn on --grad-checkpointing",
    "reference": "set --kl-beta 0 (no reference model)", "external judge": "drop --judge-model",
    "COMET": "set --w-comet 0 or use a smaller --comet-model",
    "FSDP2": "shard over more GPUs", "fused head": "lower --micro-batch-size", "prefill": "use a smaller --model",
    "sampler weights": "use a smaller --model",
}


@dataclass
class Plan:
    rows: list[tuple[str, float, str]]  # (what, bytes, phase: "resident" / "update" / "optimizer" / "sample")
    host: list[tuple[str, float]]  # (what, bytes) per rank
    peak: float  # bytes per GPU
    device_bytes: float
    header: str

    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def advice(self) -> str:
        """What shrinks the largest row that a flag can shrink."""
        rows = sorted(self.rows, key=lambda r: -r[1])
        return next(text for what, _, _ in rows for prefix, text in ADVICE.items() if what.startswith(prefix))

    def table(self) -> str:
        """The table, ending with exactly `plan: peak X GiB per GPU of G GiB: fits` (or `does not fit`, after a
        line saying what to change)."""
        width = max(len(what) for what, _, _ in self.rows) + 2
        lines = [self.header, f"  {'GPU memory per rank':<{width}}{'GiB':>8}  phase"]
        lines += [f"  {what:<{width}}{n / GIB:8.2f}  {phase}" for what, n, phase in self.rows]
        lines.append(f"  {'peak: resident + the largest phase':<{width}}{self.peak / GIB:8.2f}")
        lines += [f"  {'host per rank: ' + what:<{width}}{n / GIB:8.2f}" for what, n in self.host]
        verdict = "fits" if self.fits() else "does not fit"
        if not self.fits():
            lines.append(f"  to fit: {self.advice()}")
        lines.append(f"plan: peak {self.peak / GIB:.1f} GiB per GPU of {self.device_bytes / GIB:.0f} GiB: {verdict}")
        return "\n".join(lines)


def memory_plan(c, model: ModelConfig, world: int, mode: str, on_gpu: bool, device_bytes: float,
                judge_model: ModelConfig | None = None, comet_bytes: int = 0, bf16: bool | None = None) -> Plan:
    """The plan for config `c` (ssr.Config) training `model` on `world` ranks in `mode` (none/ddp/fsdp); bf16: the
    run's --precision (None: bf16 on GPU, fp32 on CPU, what auto means)."""
    from kernels import CHUNK_ELEMS
    from sampler import PREFILL_TOKENS

    bf16 = on_gpu if bf16 is None else bf16
    b = 2 if bf16 else 4  # sampler and compute dtype
    P = total_params(model)
    layer, root = param_counts(model)
    shards = world if mode == "fsdp" else 1
    slots, positions = sampler_slots(c, world), cache_positions(c)
    rows = [(f"sampler weights ({P / 1e9:.2f}B params)", P * b, "resident"),
            (f"KV cache ({slots} slots x {positions} positions)", slots * positions * kv_bytes_per_token(model, b),
             "resident"),
            (f"trainer: fp32 weights, grads, AdamW (16 B/param{f' / {shards}' if shards > 1 else ''})",
             16 * P / shards, "resident")]
    if on_gpu:
        rows += [("decode graphs' logits buffers", graph_logits_bytes(slots, positions, model.vocab_size), "resident"),
                 ("decode graphs' memory pool (one step, largest batch)", graph_pool_bytes(model, slots, b), "resident"),
                 ("CUDA context + NCCL buffers (estimate)",
                  CUDA_CONTEXT + (NCCL_BUFFERS if world > 1 else 0), "resident")]
    if mode == "ddp":
        rows.append(("DDP gradient buckets (fp32)", 4 * P, "resident"))
    if c.kl_beta > 0:
        rows.append(("reference model" + (f" (/ {shards})" if shards > 1 else ""), P * b / shards, "resident"))
    if c.judge_refresh != 1 or c.judge_ema > 0:  # distributed.policy_snapshot: fp32, sharded like the masters
        rows.append(("lagging judge: fp32 policy snapshot" + (f" (/ {shards})" if shards > 1 else ""),
                     4 * P / shards, "resident"))
    if c.judge_model and judge_model is not None:
        judge_p = total_params(judge_model)
        rows += [(f"external judge weights ({judge_p / 1e9:.2f}B params)", judge_p * b, "resident"),
                 ("external judge KV cache", slots * positions * kv_bytes_per_token(judge_model, b), "resident")]
    if c.w_comet > 0:
        rows.append(("COMET model (fp32)", comet_bytes, "resident"))
    rows += update_rows(c, model, layer, root, b, mode, shards, P, bf16, CHUNK_ELEMS)
    rows.append(("AdamW step temporary (fp32, local shard)", 4 * P / shards, "optimizer"))
    rows.append((f"prefill activations ({PREFILL_TOKENS} tokens, one layer, causal: no P x P scores)",
                 PREFILL_TOKENS * (3 * model.intermediate_size + 4 * model.hidden_size) * b, "sample"))
    rows.append(("sampling temporaries (4 x slots x vocab fp32)", 4 * slots * model.vocab_size * 4, "sample"))
    resident = sum(n for _, n, phase in rows if phase == "resident")
    peak = resident + max(sum(n for _, n, ph in rows if ph == phase) for phase in ("update", "optimizer", "sample"))
    largest_tensor = model.vocab_size * model.hidden_size * 4
    host = [("saving (one weights file + one tensor)", min(5 * GIB, P * b) + largest_tensor),
            ("loading (one tensor at a time)", largest_tensor)]
    header = (f"memory plan: {model.arch} {P / 1e9:.2f}B params, {world} rank{'s' * (world > 1)} ({mode}), "
              f"{'GPU' if on_gpu else 'CPU'} {'bf16' if bf16 else 'fp32'}, micro-batch {c.micro_batch_size} x "
              f"{c.max_prompt_tokens + c.max_new_tokens} tokens")
    return Plan(rows, host, peak, device_bytes, header)


def update_rows(c, model: ModelConfig, layer: int, root: int, b: int, mode: str, shards: int, P: int, bf16: bool,
                chunk_elems: int) -> list[tuple[str, float, str]]:
    """The update's transient memory for one micro-batch (see the module docstring)."""
    tokens = c.micro_batch_size * (c.max_prompt_tokens + c.max_new_tokens)
    per_layer = activation_bytes_per_token(model, b) * tokens
    L, H = model.num_hidden_layers, model.hidden_size
    if c.grad_checkpointing:
        acts = ("activations: layer inputs + one layer recomputed", L * tokens * H * b + per_layer)
    else:
        acts = ("activations: every layer (no checkpointing)", L * per_layer)
    rows = [(*acts, "update"),
            ("fused head: hidden, fp32 grads, a vocab chunk",
             tokens * H * (b + 4) + 2 * chunk_elems * b, "update")]
    if mode == "fsdp":
        reduce = 4 if bf16 else 0  # fp32 reduce-scatter input next to the bf16 gradient; none when all is fp32
        rows += [("FSDP2 gathered params: root + 2 layers", (root + 2 * layer) * b, "update"),
                 ("FSDP2 unsharded grads: root + 1 layer", (root + layer) * (b + reduce), "update")]
    elif bf16:
        rows.append(("autocast bf16 copies of the weights", 2 * P, "update"))
    return rows


def device_memory_bytes(on_gpu: bool) -> float:
    """This device's memory: the GPU's, or the host's for a CPU run."""
    if on_gpu:
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def comet_checkpoint_bytes(name_or_path: str) -> int:
    """fp32 bytes of a COMET model: the checkpoint file's size when it is local, else the known size of the
    published CometKiwi models (their parameter count x 4), else the base CometKiwi's as a guess."""
    local = os.path.expanduser(name_or_path)
    for path in (os.path.join(local, "checkpoints", "model.ckpt"), local):
        if os.path.isfile(path):
            return os.path.getsize(path)
    known = {"Unbabel/wmt22-cometkiwi-da": 0.565e9, "Unbabel/wmt23-cometkiwi-da-xl": 3.5e9,
             "Unbabel/wmt23-cometkiwi-da-xxl": 10.7e9}
    return int(known.get(name_or_path, 0.565e9) * 4)
