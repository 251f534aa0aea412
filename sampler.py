"""KV-cached batched sampler: what generates every rollout and every judgement in training.

    sampler = Sampler(model, max_batch_size=64, max_seq_len=1024, device="cuda", dtype=torch.bfloat16)
    outs = sampler.generate(prompt_ids, group_size=8, max_new_tokens=512, temperature=1.0,
                            stop_token_ids=tok.eos_ids, stop_strings=("</answer>",), tokenizer=tok, seed=0)
    outs[i * 8 + j].tokens / .logprobs / .finish_reason      # sample j of prompt i

How one `generate` call runs:
1. Prompts wait in a queue. When slots are free (all of them at the start, later a quarter of them), the next
   prompts are prefilled together (right-padded to the longest), each exactly once, and each prompt's K/V is
   written straight into all `group_size` slots of its group. Each slot samples its own first token from the
   prompt's last-position logits.
2. All live rows decode together, one token per step. Row i lives in cache slot i, and its tokens sit at cache
   positions 0, 1, 2, ...: a token's RoPE position *is* its cache index and a row's mask is just
   `key position <= my position`, so prompts of different lengths decode together with no padding in the cache.
3. Every `sync_every` steps (1 on CPU, where syncing costs nothing; 16 on CUDA) the new tokens come to the host,
   which checks stop ids, stop strings and length limits. Finished rows are dropped by moving the last live
   rows into their slots (compaction), so the live rows are always slots 0..n-1 and a step costs n rows, not
   max_batch_size; freed slots then take waiting prompts (continuous batching). bench.py measures both.

On CUDA, by default (decode="compiled"), a decode step is a CUDA graph captured per (batch-size bucket,
attended-length bucket), replayed with no host sync until the next stop check. The graphs hold pointers to the model's parameters and the cache, so
the trainer must update weights in place (`param.copy_(new)`), never by replacing the tensors. Inside the graph,
by default on CUDA: attention is the Triton decode kernel (kernels/decode_attention.py), which reads each
row's own live K/V and nothing past it, and the step is torch.compile'd (as gpt-fast does) so that each layer's
norms, RoPE, residuals and SwiGLU become a few fused kernels instead of dozens of small ones (a 0.5B step was
~1,000 launches); the graph then replays those. On CPU: SDPA with a mask (Triton needs a GPU outside its
interpreter), not compiled (~20 s per graph there, to save microseconds a step). decode="kernel" and "sdpa" are
the eager fallbacks a GPU user reaches without editing code (see Sampler).

Completions include the token that ended them: the EOS token, or the token that completed a stop string (its
text may run past the stop string; nothing after that token is returned). The trainer needs the EOS in the
response so the policy learns to stop.
"""
from __future__ import annotations

import math
import os
import time
import types
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import Transformer, empty_model

PREFILL_TOKENS = 16384  # padded prompt tokens per prefill call: bounds a prefill's activation memory
GRAPH_LEN_STEP = 256  # CUDA graphs attend over the cache in multiples of this: K/V read per step tracks length
CUDA_SYNC_EVERY = 16  # decode steps between stop checks on CUDA; a finished row idles for at most 15 of them
CPU_HEAD_BLOCK = 2048  # vocab rows per block of the CPU head product (see head_logits)
COMPILE_BACKEND = "inductor"  # torch.compile backend of the decode step; CPU tests swap in a cheap one
DECODE_MODES = ("auto", "compiled", "kernel", "sdpa")  # how a decode step runs: see Sampler


@dataclass
class Completion:
    tokens: list[int]  # generated ids, the stopping token included
    logprobs: list[float]  # log-prob of each token under softmax(logits / temperature) before top-k/top-p
    #                        (temperature 0, greedy: under softmax(logits))
    finish_reason: str  # "stop" (stop id or stop string) or "length"


@dataclass
class SamplerStats:
    """Running totals over the sampler's life (tests read them; bench.py reports them)."""
    prefill_calls: int = 0
    prefill_prompts: int = 0  # one per prompt: a prompt's group shares its single prefill
    prefill_tokens: int = 0  # real prompt tokens, padding excluded
    decode_steps: int = 0
    decode_rows: int = 0  # rows computed over all decode steps (CUDA: the graph's batch bucket)
    generated_tokens: int = 0  # tokens returned to callers
    graphs_captured: int = 0
    capture_seconds: float = 0.0  # spent capturing CUDA graphs, torch.compile's compilation included


def batch_buckets(max_batch_size: int) -> list[int]:
    """Row counts a decode graph is captured for: a graph runs rows 0..b-1 for the smallest bucket b >= live rows
    (nano-vllm's buckets), so a shrinking batch costs its bucket, not max_batch_size."""
    return sorted({b for b in (1, 2, 4, 8) if b < max_batch_size} | set(range(16, max_batch_size, 16)) |
                  {max_batch_size})


# ----------------------------------------------------------------------------------------------------
# the cache

class KVCache:
    """K/V for every slot, allocated once: k, v (layers, slots, Hkv, max_seq_len, D).

    The model talks to it through `update(layer, k, v)` on one of the two views below, chosen per call."""

    def __init__(self, cfg, slots: int, max_seq_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class PrefillView:
    """kv_cache for a prefill of n prompts: copies each prompt's K/V into all g slots of its group (the fan-out),
    slots first.. first + n * g - 1, prompt-major, and hands the prompts' own K/V back: with no mask the model
    then runs causal attention over the prompt, which SDPA's flash/memory-efficient kernels do without ever
    holding (n, heads, P, P) scores. Right padding keeps that exact: a pad comes after its prompt's tokens, so
    causal attention never lets a real token see one (the pads' own K/V land past the prompt, where decoding
    overwrites them before any row attends there)."""

    def __init__(self, cache: KVCache, first: int, g: int):
        self.cache, self.first, self.g = cache, first, g

    def update(self, layer: int, k, v):  # k, v (n, Hkv, P, D)
        n, P = k.shape[0], k.shape[2]
        slots = slice(self.first, self.first + n * self.g)
        # a broadcast copy into the (n, g, ...) view of the slots: no (n * g, Hkv, P, D) temporary
        self.cache.k[layer, slots, :, :P].unflatten(0, (n, self.g)).copy_(k[:, None])
        self.cache.v[layer, slots, :, :P].unflatten(0, (n, self.g)).copy_(v[:, None])
        return k, v


class DecodeView:
    """kv_cache for one decode step of rows 0..b-1: row i writes its new K/V at its own position pos[i] and
    attends over cache positions 0..L-1 (the mask hides what lies beyond each row's position)."""

    def __init__(self, cache: KVCache, pos: torch.Tensor, length: int):
        self.cache, self.pos, self.length = cache, pos, length
        self.rows = torch.arange(len(pos), device=pos.device)

    def update(self, layer: int, k, v):  # k, v (b, Hkv, 1, D)
        if torch.compiler.is_compiling():
            # an indexed write into one layer's view of the cache makes inductor copy the whole cache every step
            # (functionalisation turns the view's mutation into a rebuilt base); an op mutating the base in
            # place is kept in place
            write_kv(self.cache.k, self.cache.v, layer, self.pos, k[:, :, 0], v[:, :, 0])
        else:
            self.cache.k[layer, self.rows, :, self.pos] = k[:, :, 0]  # index (b,) x (b,) -> (b, Hkv, D)
            self.cache.v[layer, self.rows, :, self.pos] = v[:, :, 0]
        b, L = len(self.rows), self.length
        return self.cache.k[layer, :b, :, :L], self.cache.v[layer, :b, :, :L]  # (b, Hkv, L, D)


@torch.library.custom_op("ssr::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, pos: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_cache[layer, i, :, pos[i]] = k[i] (and v) for rows i = 0..b-1; k, v (b, Hkv, D)."""
    rows = torch.arange(len(pos), device=pos.device)
    k_cache[layer, rows, :, pos] = k
    v_cache[layer, rows, :, pos] = v


@write_kv.register_fake
def _(k_cache, v_cache, layer, pos, k, v):
    return None


class KernelDecodeView(DecodeView):
    """A DecodeView whose attention is the decode kernel: row i reads its own positions 0..pos[i] only, with
    no mask; `length` (an upper bound on pos + 1) and num_splits only shape the kernel's launch grid."""

    def __init__(self, cache: KVCache, pos: torch.Tensor, length: int, num_splits: int):
        super().__init__(cache, pos, length)
        self.num_splits = num_splits

    def attend(self, layer: int, q, k, v):  # q (b, H, 1, D); k, v (b, Hkv, 1, D)
        from kernels.decode_attention import decode_attention

        self.update(layer, k, v)
        out = decode_attention(q[:, :, 0], self.cache.k[layer], self.cache.v[layer], self.pos, self.length,
                               self.num_splits)
        return out[:, :, None]  # (b, H, 1, D)


class TreeView:
    """kv_cache for scoring a tree of continuations after the prefixes prefilled in slots 0..b-1 (Sampler.score):
    the tree's K/V are attended next to the cached prefixes' positions 0..P-1, never written into the cache."""

    def __init__(self, cache: KVCache, b: int, P: int):
        self.cache, self.b, self.P = cache, b, P

    def update(self, layer: int, k, v):  # k, v (b, Hkv, N, D) for the tree's N nodes
        return (torch.cat([self.cache.k[layer, :self.b, :, :self.P], k], 2),  # (b, Hkv, P + N, D)
                torch.cat([self.cache.v[layer, :self.b, :, :self.P], v], 2))


def decode_step(model: Transformer, cache: KVCache, tok: torch.Tensor, pos: torch.Tensor, length: int,
                num_splits: int | None) -> torch.Tensor:
    """One decode step of rows 0..b-1: tok (b,) at positions pos (b,), all < length -> logits (b, V) fp32.
    num_splits: the decode kernel's sequence splits, or None for SDPA with a mask over positions < length.
    A free function of tensors and the model, so that torch.compile's code is shared by every Sampler."""
    if num_splits is None:
        view = DecodeView(cache, pos, length)
        mask = (torch.arange(length, device=pos.device) <= pos[:, None])[:, None, None, :]  # (b, 1, 1, length)
    else:
        view, mask = KernelDecodeView(cache, pos, length, num_splits), None
    h = model(tok[:, None], positions=pos[:, None], kv_cache=view, attn_mask=mask, return_hidden=True)
    return head_logits(model, h[:, 0])


def head_logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """Final hidden states (n, hidden) -> logits (n, V) fp32."""
    w = model.lm_head.weight
    if h.device.type == "cpu":
        # MKL runs this skinny (n x hidden) @ (hidden x vocab) product ~25% faster in blocks of vocab rows,
        # whose weights and outputs stay in cache (64 x 256 x 32k on our 2-core CI box: 29 -> 23 ms), with
        # bit-identical results; the head is about half of a small model's decode step on CPU.
        blocks = [F.linear(h, w[i:i + CPU_HEAD_BLOCK]) for i in range(0, len(w), CPU_HEAD_BLOCK)]
        return torch.cat(blocks, 1).float()
    return F.linear(h, w).float()


# ----------------------------------------------------------------------------------------------------
# sampling

def sample(logits, temperature: float, top_p: float, top_k: int, generator=None):
    """logits (n, V) fp32 -> tokens (n,) int64, logprobs (n,) fp32.

    The log-prob is under softmax(logits / temperature) *before* top-k/top-p truncation: the distribution the
    trainer recomputes from its own forward, which knows nothing of truncation. temperature 0 is greedy, and
    its log-probs are under the plain softmax(logits).

    The draw is exact: token i comes out with probability p_i / sum(p), whatever its id, its size next to the
    others, or the order in which the device adds things up (draw_blocked says how).
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
    scaled = logits / temperature if temperature != 1.0 else logits
    m = scaled.amax(-1, keepdim=True)
    probs = (scaled - m).exp_()  # unnormalised: sampling doesn't need the sum, the log-prob uses it below
    block_sums = blocked_sums(probs)  # (n, blocks)
    log_z = m.squeeze(-1) + block_sums.sum(-1).log()  # logsumexp, reusing the exps
    if top_k or top_p < 1.0:
        if top_k:
            kth = probs.topk(top_k, dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)  # ties with the k-th all stay, as in HF
        if top_p < 1.0:
            # keep the most probable tokens until their mass reaches top_p of what is left after top-k
            sorted_p, order = probs.sort(-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = cum - sorted_p >= top_p * cum[:, -1:]  # mass above this token already reaches top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        block_sums = blocked_sums(probs)
    tok = draw_blocked(probs, block_sums, generator)
    return tok, scaled.gather(-1, tok[:, None]).squeeze(-1) - log_z


def block_size(V: int) -> int:
    return math.isqrt(V - 1) + 1  # ceil(sqrt(V)): as many blocks as tokens per block (390 at V = 151,936)


def blocked_sums(probs: torch.Tensor) -> torch.Tensor:
    """probs (n, V) -> (n, ceil(V / b)) sums of consecutive blocks of b = block_size(V) tokens (the last one may
    be short). A sum of positive numbers is off by a relative ~b * 2^-24 at worst in any order of addition."""
    n, V = probs.shape
    b = block_size(V)
    full = V // b * b
    sums = probs[:, :full].view(n, full // b, b).sum(-1)
    return torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], 1) if full < V else sums


def race(weights: torch.Tensor, generator) -> torch.Tensor:
    """weights (n, k) >= 0, fp64 -> (n,) index i with probability weights[i] / sum(weights): the exponential race
    argmax(w_i / E_i), E_i ~ Exp(1) independent. A race needs no cumulative sum at all; its one precision need is
    E near 0, where a token of relative weight r beats a dominant one when E_i < ~r: fp32 draws come from 24-bit
    uniforms, on a 2^-24 grid there, so a token of relative weight 1e-8 would win several times too often or
    never. fp64 draws resolve ~1e-16. The clamp only guards 0 / 0 against a zero draw (chance 2^-53)."""
    if isinstance(generator, list):  # one generator per row (generate's per-prompt seeds): row i draws from its own
        e = torch.stack([torch.empty(weights.shape[1:], dtype=torch.float64, device=weights.device)
                         .exponential_(generator=g) for g in generator])
    else:
        e = torch.empty(weights.shape, dtype=torch.float64, device=weights.device).exponential_(generator=generator)
    return (weights / e.clamp_(min=torch.finfo(torch.float64).tiny)).argmax(-1)


def draw_blocked(probs: torch.Tensor, block_sums: torch.Tensor, generator) -> torch.Tensor:
    """probs (n, V) >= 0 unnormalised, block_sums from blocked_sums(probs) -> tokens (n,) drawn exactly in
    proportion to probs.

    Two exponential races: one over the ~sqrt(V) block sums picks a block with probability S_b / sum(S), one
    over that block's ~sqrt(V) tokens picks token i with probability p_i / S_b; the product is p_i / sum(p).
    Why not inverse-CDF over a cumulative sum (what this replaced): a prefix sum rounds every token's mass
    against the running total, so a token below half an fp32 step of the total (6e-8 after a dominant token)
    adds nothing and can never be drawn, and how much mass moves where depends on the device's scan order. Why
    not one race over all V tokens: V fp64 random draws per row are slow on CPU. Here the rounding errors are
    relative (block sums of positive terms, the fp32 exps themselves: ~1e-7 to 1e-5) and 2 * sqrt(V) fp64 draws
    per row cost little next to the pass that sums the blocks. All of sample() for 64 x 32k on one CPU core:
    8 ms, against 10 ms for the inverse CDF it replaced and 118 ms with a race over all V.
    """
    V = probs.shape[1]
    b = block_size(V)
    block = race(block_sums.double(), generator)  # (n,)
    cols = block[:, None] * b + torch.arange(b, device=probs.device)  # (n, b) the chosen block's token ids
    inside = cols < V  # the last block may be short
    cols = cols.clamp_(max=V - 1)
    weights = probs.gather(1, cols).double().masked_fill_(~inside, 0.0)
    return cols.gather(1, race(weights, generator)[:, None]).squeeze(-1)


class StopCheck:
    """Does a row's newest token end it? Stop ids, or a stop string anywhere in the tail of its text."""

    def __init__(self, ids, strings, tokenizer):
        self.ids, self.strings, self.tokenizer = frozenset(ids), tuple(strings), tokenizer
        # every token decodes to at least one byte, so the tokens of one occurrence are among the last this many
        self.window = max((len(s.encode()) for s in self.strings), default=0)
        self.last_chars = {s[-1] for s in self.strings}
        # a token holding part of a multi-byte character decodes to U+FFFD on its own: it may complete a stop
        # string ending in a non-ASCII character, never one ending in an ASCII one (that byte decodes as itself)
        self.partial_may_end = any(not c.isascii() for c in self.last_chars)
        self.may_end: dict[int, bool] = {}  # token id -> can it complete a stop string (the cheap pre-check)

    def __call__(self, tokens: list[int]) -> bool:
        t = tokens[-1]
        if t in self.ids:
            return True
        if not self.strings:
            return False
        # Only a token holding a stop string's last character can complete it (checked every step, so any
        # occurrence in the tail ends in this token). Saves a decode per token on most steps; byte-level
        # tokens of Chinese text, which decode to U+FFFD alone, skip it too when "</answer>" is the stop.
        if t not in self.may_end:
            text = self.tokenizer.decode([t])
            self.may_end[t] = any(c in text for c in self.last_chars) or (self.partial_may_end and "\ufffd" in text)
        if not self.may_end[t]:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:])
        return any(s in tail for s in self.strings)


@dataclass
class Row:
    """A completion in progress; it lives in cache slot = its index in the live-rows list."""
    index: int  # where its Completion goes in generate's output
    prompt_len: int
    limit: int  # max tokens: max_new_tokens, capped so that prompt + completion fit in max_seq_len
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # its own, when generate was given one seed per prompt

    def accept(self, tokens: list[int], logprobs: list[float], stop: StopCheck):
        """Take newly sampled tokens until one ends the row; the rest (sampled past the end) are dropped."""
        for t, lp in zip(tokens, logprobs):
            self.tokens.append(t)
            self.logprobs.append(lp)
            if stop(self.tokens):
                self.finish_reason = "stop"
            elif len(self.tokens) == self.limit:
                self.finish_reason = "length"
            if self.finish_reason:
                return


# ----------------------------------------------------------------------------------------------------
# the sampler

class Sampler:
    """Owns the KV cache (max_batch_size slots x max_seq_len positions, allocated once) and, on CUDA, the decode
    graphs; `generate` can be called any number of times, and sees weight updates made in place."""

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, device, dtype: torch.dtype,
                 decode: str = "auto"):
        """decode, how a decode step runs (DECODE_MODES):
        "compiled": the step torch.compile'd (COMPILE_BACKEND) and, on CUDA, replayed as CUDA graphs; attention by
            the Triton decode kernel wherever Triton runs (CUDA, or CPU tensors under TRITON_INTERPRET=1),
            SDPA with a mask elsewhere. Under TORCH_COMPILE_DISABLE=1 the same step runs uncompiled.
        "kernel": the Triton kernel in an eager step, no compile, no graphs: for when compilation breaks.
        "sdpa": an eager step of plain PyTorch (SDPA with a mask), no Triton, no compile, no graphs: for when the
            kernel breaks (a driver/Triton/torch mismatch).
        "auto": "compiled" on CUDA (the fast path), "sdpa" on CPU (compiling costs ~20 s a graph there, to save
            microseconds a step, and the kernel needs a GPU outside its interpreter)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, not {decode!r}")
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", to compare with parameters
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        # Use the model itself when it is already where we run, so that in-place weight updates to it are
        # seen; otherwise keep a converted copy in self.model, which the trainer then updates in place.
        if all(p.device == self.device and p.dtype == dtype for p in model.parameters()):
            self.model = model
        else:
            self.model = converted_copy(model, self.device, dtype)
        cfg = self.model.config
        self.cache = KVCache(cfg, max_batch_size, max_seq_len, self.device, dtype)
        # per-slot decode inputs: the row's last sampled token and the position it goes in (the graphs' inputs)
        self.tok_in = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.pos_in = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        on_cuda = self.device.type == "cuda"
        self.decode = decode if decode != "auto" else "compiled" if on_cuda else "sdpa"
        triton_runs = on_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        if self.decode == "kernel" and not triton_runs:
            raise ValueError("decode 'kernel' needs CUDA, or TRITON_INTERPRET=1 on CPU (Triton's interpreter)")
        self.decode_kernel = self.decode in ("compiled", "kernel") and triton_runs
        self.use_graphs = self.decode == "compiled" and on_cuda
        self.step_fn = decode_step
        if self.decode == "compiled" and torch._dynamo.config.disable:
            print("sampler: torch.compile is disabled (TORCH_COMPILE_DISABLE=1): the decode step runs uncompiled")
        elif self.decode == "compiled":
            # Dynamo keeps its compiled entries, and their limit (recompile_limit, 8: past it fullgraph fails
            # hard), per code object: each Sampler compiles its own copy of decode_step, so samplers of other
            # models or shapes in the process neither share its entries nor use up its limit.
            # dynamic: one entry serves every batch and length bucket (batch 1 and one split get their own);
            # fullgraph: a graph break would hide a host sync, which CUDA graph capture forbids
            own_step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, "decode_step")
            self.step_fn = torch.compile(own_step, dynamic=True, fullgraph=True, backend=COMPILE_BACKEND)
        self.sync_every = CUDA_SYNC_EVERY if on_cuda else 1
        # tokens and log-probs sampled since the last host sync: (sync_every, slots)
        self.hist_tok = torch.zeros(self.sync_every, max_batch_size, dtype=torch.long, device=self.device)
        self.hist_lp = torch.zeros(self.sync_every, max_batch_size, dtype=torch.float32, device=self.device)
        # a graph runs rows 0..b-1 for the smallest bucket b >= live rows (nano-vllm's buckets)
        self.batch_buckets = batch_buckets(max_batch_size)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None  # one memory pool shared by all graphs: they never run at the same time
        self.stats = SamplerStats()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], group_size: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids=(),
                 stop_strings=(), tokenizer=None, seed: int | list[int] | None = None,
                 progress=None) -> list[Completion]:
        """Sample `group_size` completions of each prompt (token-id lists); returns them prompt-major:
        out[i * group_size + j] is sample j of prompt i.

        temperature 0 is greedy; top_k 0 and top_p 1 turn those cuts off. Generation of a row stops after a
        token in stop_token_ids or a token that completes one of stop_strings (decoded with `tokenizer`), that
        token included, or after max_new_tokens (fewer if prompt + completion would pass max_seq_len). seed
        makes the call reproducible (same seed, sampler and arguments, same outputs); None draws from torch's
        global generator. A list of seeds, one per prompt, gives every completion a generator of its own:
        prompt i's samples then depend on seed[i] and the prompt alone, not on the other prompts of the call,
        their order or the batch size (eval.py; it costs two small draws per row and step instead of two per
        step). progress: anything with .update(n) (a tqdm bar), told of each finished completion."""
        g = group_size
        if not 1 <= g <= self.max_batch_size:
            raise ValueError(f"group_size {g} must be between 1 and max_batch_size ({self.max_batch_size})")
        if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError("need max_new_tokens >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode completions")
        for p in prompts:
            if not 1 <= len(p) < self.max_seq_len:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit: need 1 to {self.max_seq_len - 1}")
        per_row = isinstance(seed, list)
        if per_row and len(seed) != len(prompts):
            raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts: give one seed per prompt")
        generator = None if seed is None or per_row else torch.Generator(self.device).manual_seed(seed)
        settings = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        stop = StopCheck(stop_token_ids, stop_strings, tokenizer)
        out: list[Completion | None] = [None] * (len(prompts) * g)
        waiting = deque(range(len(prompts)))
        rows: list[Row] = []  # live rows; rows[i] is in cache slot i
        while waiting or rows:
            new = self._admit(prompts, waiting, len(rows), g, max_new_tokens)
            if per_row:
                for r in new:  # sample j of prompt i: its own stream, a function of (seed[i], j)
                    r.generator = torch.Generator(self.device).manual_seed(
                        (seed[r.index // g] + r.index % g * 0x9E3779B97F4A7C15) % 2**64)
            if new:
                # prefill the admitted prompts into the slots after the live rows; each group member samples
                # its own first token from its prompt's last-position logits
                first = len(rows)
                logits = self._prefill([prompts[r.index // g] for r in new[::g]], first, g)  # (len(new) / g, V)
                tok, lp = sample(logits.repeat_interleave(g, 0),
                                 **settings | ({"generator": [r.generator for r in new]} if per_row else {}))
                live = slice(first, first + len(new))
                self.tok_in[live] = tok
                self.pos_in[live] = torch.tensor([r.prompt_len for r in new], device=self.device)
                for r, t, l in zip(new, tok.tolist(), lp.tolist()):
                    r.accept([t], [l], stop)
                rows += new
            else:
                # decode until the next stop check; no row may run past its limit (its cache ends there)
                steps = min(self.sync_every, min(r.limit - len(r.tokens) for r in rows))
                toks, lps = self._decode(len(rows), steps, max(r.prompt_len + len(r.tokens) for r in rows),
                                         settings | ({"generator": [r.generator for r in rows]} if per_row else {}))
                for r, ts, ls in zip(rows, toks, lps):
                    r.accept(ts, ls, stop)
            for r in rows:
                if r.finish_reason:
                    out[r.index] = Completion(r.tokens, r.logprobs, r.finish_reason)
                    self.stats.generated_tokens += len(r.tokens)
                    if progress is not None:
                        progress.update(1)
            rows = self._compact(rows)
        return out

    @torch.no_grad()
    def score(self, prefixes: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """log P(continuation | prefix), exactly, for every prefix and every continuation (token-id lists):
        (len(prefixes), len(continuations)) fp32. What the expected-score judge reads (judge.expected_score).

        Each prefix is prefilled once, up to max_batch_size at a time, into the cache; the continuations then go
        through the model together as one token tree, a trie sharing their common beginnings (the 101 integers
        0-100 share their leading digits), each tree node attending to its prefix's cached K/V and to its own
        ancestors: one forward of the trie's inner nodes per prefix, however many continuations. Uses the cache
        slots, so never while a generate call runs."""
        for p in prefixes:
            if not 1 <= len(p) < self.max_seq_len:
                raise ValueError(f"a prefix of {len(p)} tokens does not fit: need 1 to {self.max_seq_len - 1}")
        if not all(continuations):
            raise ValueError("every continuation needs at least one token")
        # the trie's inner nodes: every proper beginning c[:t], t >= 1, of a continuation, numbered
        nodes: dict[tuple[int, ...], int] = {}
        for c in continuations:
            for t in range(1, len(c)):
                nodes.setdefault(tuple(c[:t]), len(nodes))
        keys = list(nodes)
        N, dev = len(keys), self.device
        node_tok = torch.tensor([k[-1] for k in keys], dtype=torch.long, device=dev)  # (N,) the token a node feeds
        depth = torch.tensor([len(k) for k in keys], device=dev)  # (N,) its position after the prefix, 1-based
        # ancestors[i, j]: node j is node i or lies on its path from the root
        ancestors = torch.tensor([[keys[i][:len(keys[j])] == keys[j] for j in range(N)] for i in range(N)],
                                 dtype=torch.bool, device=dev).reshape(N, N)  # (N, N)
        # continuation c's log-prob = root log-prob of c[0] + the log-prob at node c[:t] of c[t], t >= 1
        first = torch.tensor([c[0] for c in continuations], device=dev)  # (C,)
        pairs = [(ci, nodes[tuple(c[:t])], c[t]) for ci, c in enumerate(continuations) for t in range(1, len(c))]
        if N:  # (pairs,) each: which continuation, at which node, which token
            owner, at, tok = (torch.tensor(x, device=dev) for x in zip(*pairs))
        out = torch.empty(len(prefixes), len(continuations), dtype=torch.float32)
        # prefixes per forward: a prefill's token budget bounds the tree forward's activations too
        per_call = max(1, min(self.max_batch_size, PREFILL_TOKENS // (max(map(len, prefixes), default=1) + N)))
        for start in range(0, len(prefixes), per_call):
            chunk = prefixes[start:start + per_call]
            b, P = len(chunk), max(map(len, chunk))
            root = self._prefill(chunk, 0, 1).log_softmax(-1)  # (b, V): K/V of prefix i now in slot i
            lp = root[:, first]  # (b, C)
            if N:
                lengths = torch.tensor([len(p) for p in chunk], device=dev)
                positions = lengths[:, None] + depth - 1  # (b, N): node at depth d continues the prefix
                mask = torch.cat([(torch.arange(P, device=dev) < lengths[:, None])[:, None, :].expand(b, N, P),
                                  ancestors.expand(b, N, N)], -1)[:, None]  # (b, 1, N, P + N)
                h = self.model(node_tok.expand(b, N), positions=positions, kv_cache=TreeView(self.cache, b, P),
                               attn_mask=mask, return_hidden=True)  # (b, N, hidden)
                for i in range(b):  # one prefix's N x V logits at a time: memory stays at one tree's
                    node_lp = head_logits(self.model, h[i]).log_softmax(-1)  # (N, V)
                    lp[i].index_add_(0, owner, node_lp[at, tok])
            out[start:start + b] = lp.cpu()
        return out

    def _admit(self, prompts: list[list[int]], waiting: deque, n_live: int, g: int, max_new_tokens: int) -> list[Row]:
        """Take waiting prompts into the free slots (as many as fit, within the prefill token budget), but only
        once a quarter of the slots is free or nothing runs: each admission is an eager prefill plus a host sync
        (~6 decode steps of a 0.5B on CUDA). bench.py sampler on an H200, vs static batches: refilling every
        group as soon as it fits 0.52x (0.5B) / 0.73x (7B) tokens/s; this 1.02x / 0.92x.
        Returns the new rows, g per admitted prompt, prompt-major."""
        free = self.max_batch_size - n_live
        take = []
        if not n_live or free >= max(g, self.max_batch_size // 4):
            while waiting and (len(take) + 1) * g <= free:
                longest = max(len(prompts[i]) for i in [*take, waiting[0]])
                if take and (len(take) + 1) * longest > PREFILL_TOKENS:
                    break
                take.append(waiting.popleft())
        return [Row(i * g + j, len(prompts[i]), min(max_new_tokens, self.max_seq_len - len(prompts[i])))
                for i in take for j in range(g)]

    # Every entry point runs without autograd, wherever it is called from (generate, tests, bench.py): the
    # sampler's weights may require grad (they are the trainer's own on a CPU run), and under grad mode the
    # compiled step would trace a backward through the decode kernel, which has none, and the cache would
    # become an autograd non-leaf holding every step's graph.
    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]], first_slot: int, g: int) -> torch.Tensor:
        """Run the prompts once, writing their K/V into slots first_slot.. (g per prompt, prompt-major);
        returns each prompt's next-token logits (n, V) fp32."""
        n, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, P, dtype=torch.long)  # right padding: pads come after a prompt, so causal
        for i, p in enumerate(prompts):           # attention keeps real tokens from ever seeing them
            ids[i, :len(p)] = torch.tensor(p)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        h = self.model(ids.to(self.device), kv_cache=PrefillView(self.cache, first_slot, g),
                       return_hidden=True)  # (n, P, hidden); causal attention, no mask (see PrefillView)
        # the vocab head only at each prompt's last token, not at all n * P positions
        logits = head_logits(self.model, h[torch.arange(n, device=self.device), last])
        self.stats.prefill_calls += 1
        self.stats.prefill_prompts += n
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        return logits

    @torch.no_grad()
    def _decode(self, n: int, steps: int, length: int, settings: dict):
        """`steps` decode steps of live rows 0..n-1, whose pending tokens sit at positions < `length`;
        returns per row the sampled tokens and log-probs (lists of `steps`): the one host sync."""
        for s in range(steps):
            if self.use_graphs:
                # one graph for the whole chunk: sized for the longest row at the chunk's last step
                logits = self._graph(n, length + steps - 1)[:n]
            else:
                logits = self._forward(n, length + s)
            tok, lp = sample(logits, **settings)
            self.tok_in[:n] = tok
            self.pos_in[:n] += 1
            self.hist_tok[s, :n] = tok
            self.hist_lp[s, :n] = lp
            self.stats.decode_steps += 1
            self.stats.decode_rows += self._bucket(n) if self.use_graphs else n
        return self.hist_tok[:steps, :n].T.tolist(), self.hist_lp[:steps, :n].T.tolist()

    @torch.no_grad()
    def _forward(self, b: int, length: int) -> torch.Tensor:
        """One decode step of rows 0..b-1 attending over cache positions < length -> logits (b, V) fp32."""
        splits = None
        if self.decode_kernel:
            from kernels.decode_attention import plan_splits

            splits = plan_splits(b, self.model.config.num_key_value_heads, length, self.device)
        return self.step_fn(self.model, self.cache, self.tok_in[:b], self.pos_in[:b], length, splits)

    def _bucket(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

    @torch.no_grad()
    def _graph(self, n: int, length: int) -> torch.Tensor:
        """Replay (capturing on first use) the decode graph for n live rows and `length` positions; returns
        its static logits buffer (bucket, V), valid until the next replay."""
        b = self._bucket(n)
        L = min(-(-length // GRAPH_LEN_STEP) * GRAPH_LEN_STEP, self.max_seq_len)
        if (b, L) not in self.graphs:
            t0 = time.perf_counter()
            # Capture needs a warm-up run on a side stream first. It sees this step's real inputs, so the K/V it
            # writes are exactly what the replay writes again; rows n..b-1 are free slots, scribbling is harmless.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(b, L)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self._forward(b, L)
            self.graph_pool = graph.pool()
            self.graphs[(b, L)] = (graph, logits)
            self.stats.graphs_captured += 1
            torch.cuda.synchronize(self.device)
            self.stats.capture_seconds += time.perf_counter() - t0
        graph, logits = self.graphs[(b, L)]
        graph.replay()
        return logits

    @torch.no_grad()
    def _compact(self, rows: list[Row]) -> list[Row]:
        """Drop finished rows: move the last live rows into their slots, so live rows stay slots 0..n-1."""
        n = sum(r.finish_reason is None for r in rows)
        holes = [i for i in range(n) if rows[i].finish_reason]
        movers = [i for i in range(n, len(rows)) if rows[i].finish_reason is None]  # as many as holes
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            L = max(rows[i].prompt_len + len(rows[i].tokens) for i in movers)  # positions written so far
            self.cache.k[:, dst, :, :L] = self.cache.k[:, src, :, :L]
            self.cache.v[:, dst, :, :L] = self.cache.v[:, src, :, :L]
            self.tok_in[dst] = self.tok_in[src]
            self.pos_in[dst] = self.pos_in[src]
            for h, m in zip(holes, movers):
                rows[h] = rows[m]
        return rows[:n]


def compile_report() -> str | None:
    """How long torch.compile has taken in this process (dynamo, AOTAutograd and the backend's code generation: host
    CPU time, paid again by every process with a cold cache), or None if nothing was compiled."""
    from torch._dynamo.utils import compilation_time_metrics

    entries = compilation_time_metrics.get("_compile.compile_inner", [])
    return f"compile: {sum(entries):.1f} s in {len(entries)} dynamo compiles" if entries else None


def converted_copy(model: Transformer, device, dtype) -> Transformer:
    """A copy of `model` on device/dtype, built without materialising a second full-precision copy."""
    copy = empty_model(model.config, device, dtype)
    copy.load_state_dict(model.state_dict())
    return copy
