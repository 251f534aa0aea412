"""Decode attention: one new query token per row over the sampler's static KV cache (flash-decoding).

    out = decode_attention(q, k_cache, v_cache, pos)  # q (B, H, D); k/v_cache (slots, Hkv, S, D); pos (B,)

Row i is cache slot i; its live keys are cache positions 0..pos[i] (its own new token included), and it reads
exactly those: not the rest of its slot, not a batch-wide bucket length. Query heads h*G .. h*G+G-1 share key
head h (GQA, G = H / Hkv); one program loads a key head's K/V once for all G of them, never repeated per query
head. Long rows are split over the sequence: each (row, key head, split) program computes a softmax over its
own keys (flash-decoding), and a second kernel merges the splits by their log-sum-exps. fp32 accumulation.

Why a kernel: `scaled_dot_product_attention` with a boolean mask over a bucketed length cannot use the flash
kernels, materialises the scores, and makes every row read K/V up to the bucket. At the 7B shape the K/V a
decode step reads is as large as the weights once rows pass ~1,000 tokens: reading only live positions is the
difference between a step at the bandwidth floor and one far above it.

`decode_attention_torch` beside it is the reference and the spec: the same two phases in plain torch.
The Triton path is a torch custom op (`ssr::decode_attention`), so torch.compile treats it as one opaque call
and CUDA graphs capture its two launches. Under TRITON_INTERPRET=1 (set before this module is imported) the
kernels run on CPU tensors.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_N = 64  # key positions per inner-loop iteration of a split program
MIN_BLOCK_G = 16  # tl.dot needs at least 16 rows: a GQA group of 7 query heads is padded to 16
PROGRAMS_PER_SM = 4  # splits are added until (rows x key heads x splits) fills the GPU this many times over


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr, final_ptr,
                  q_sb, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, f_sb, f_sh, split_len, num_splits, scale,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SINGLE: tl.constexpr):
    """Program (row b, key head h, split s): softmax-weighted V over keys [s * split_len, ...) ∩ [0, pos[b]],
    for the G query heads of key head h. Writes their partial outputs (fp32, already divided by the split's
    own softmax sum) and the split's log-sum-exp of scores; a split past the row's end writes nothing.
    SINGLE (one split): the partial output is the answer, written straight to final_ptr; no merge runs."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n_live = (tl.load(pos_ptr + b) + 1).to(tl.int32)  # int32 like start: the loop bounds share a type
    start = s * split_len
    end = tl.minimum(start + split_len, n_live)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = h * G + g  # (BLOCK_G,) query heads; rows g >= G are padding, as are columns d >= D
    q_mask = (g[:, None] < G) & (d[None, :] < D)
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    k_ptr += b * k_sb + h * k_sh
    v_ptr += b * v_sb + h * v_sh
    # running max starts finite: exp(-inf - -inf) would be nan on the first block
    m = tl.full([BLOCK_G], -1e30, tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)  # sum of exp(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # sum of exp(score - m) * v
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        live = n < end
        kv_mask = live[:, None] & (d[None, :] < D)
        k = tl.load(k_ptr + n[:, None] * k_ss + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_N)
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + n[:, None] * v_ss + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    if SINGLE:
        final = final_ptr + b * f_sb + heads[:, None] * f_sh + d[None, :]
        tl.store(final, (acc / l[:, None]).to(final_ptr.dtype.element_ty), mask=q_mask)
    elif start < end:
        part = (b * G * tl.num_programs(1) + heads) * num_splits + s  # index into (B, H, num_splits)
        tl.store(out_ptr + part[:, None] * D + d[None, :], acc / l[:, None], mask=q_mask)
        tl.store(lse_ptr + part, m + tl.log(l), mask=g < G)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, pos_ptr, out_ptr, o_sb, o_sh, split_len, num_splits,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (row b, query head h): out = sum over the row's splits of part * exp(lse - logsumexp(lse))."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    used = tl.minimum(tl.cdiv(tl.load(pos_ptr + b) + 1, split_len), num_splits)  # splits with a live key
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    first = (b * tl.num_programs(1) + h) * num_splits
    lse = tl.load(lse_ptr + first + s, mask=s < used, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # split 0 always holds position 0: the max is finite
    parts = tl.load(part_ptr + (first + s)[:, None] * D + d[None, :], mask=(s < used)[:, None] & (d[None, :] < D),
                    other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sm_count(device) -> int:
    """Streaming multiprocessors the split plan fills: the GPU's; 1 on CPU, where splitting never pays (CPU checks
    of the merge kernel put a GPU's count here: scripts/gpu_check.py --cpu)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def plan_splits(rows: int, kv_heads: int, length: int, device) -> int:
    """How many splits a step attending over at most `length` positions gets: enough programs to fill the GPU
    (a batch of 64 rows x 4 key heads is already 256 programs: few or no splits), never a split shorter than
    one BLOCK_N. A function of the shapes alone, so a CUDA graph captured for them keeps its launch grid."""
    return max(1, min(cdiv(PROGRAMS_PER_SM * sm_count(device), rows * kv_heads), cdiv(length, BLOCK_N)))


@torch.library.custom_op("ssr::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         length: int, num_splits: int, scale: float) -> torch.Tensor:
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    split_len = cdiv(cdiv(length, num_splits), BLOCK_N) * BLOCK_N  # whole blocks per split
    out = torch.empty_like(q)
    single = num_splits == 1
    parts = torch.empty(0 if single else (B, H, num_splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty(0 if single else (B, H, num_splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16; padding columns load as zeros
    # Operands are upcast to fp32 in the kernel: a bf16 value is exact in TF32, so bf16 caches lose nothing on
    # TF32 tensor cores (p is rounded to TF32's 10 bits, finer than the bf16 p flash-attention uses); fp32
    # caches get full-precision dots. Decode is memory-bound: the slower TF32 rate costs nothing measurable.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, pos, parts, lse, out, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], out.stride(0), out.stride(1), split_len, num_splits, scale, G=G,
        BLOCK_G=max(MIN_BLOCK_G, triton.next_power_of_2(G)), D=D, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        PRECISION=precision, SINGLE=single)
    if not single:
        _merge_kernel[(B, H)](parts, lse, pos, out, out.stride(0), out.stride(1), split_len, num_splits, D=D,
                              BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits))
    return out


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos, length, num_splits, scale):
    return torch.empty_like(q)


def decode_attention(q, k_cache, v_cache, pos, length: int | None = None, num_splits: int | None = None):
    """q (B, H, D) (unit stride in D), k_cache / v_cache (slots >= B, Hkv, S, D) (unit stride in D), pos (B,)
    int64 -> (B, H, D) in q's dtype: row i attends over k/v_cache[i, :, :pos[i] + 1] with scale 1/sqrt(D).

    length: an upper bound on pos + 1 (default S, the whole slot); it only sizes the splits, so a CUDA graph
    captured for a length bucket stays valid for any row shorter than it. No host sync: graph-safe."""
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if H % Hkv or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"decode_attention needs H a multiple of Hkv and unit stride in head_dim "
                         f"(q {tuple(q.shape)}, cache {tuple(k_cache.shape)})")
    length = S if length is None else length
    num_splits = num_splits or plan_splits(B, Hkv, length, q.device)
    return _decode_attention_op(q, k_cache, v_cache, pos, length, num_splits, 1.0 / math.sqrt(D))


def decode_attention_torch(q, k_cache, v_cache, pos, num_splits: int = 1):
    """The reference: what decode_attention computes, in the same two phases, in fp32 torch (syncs the host)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    L = int(pos.max()) + 1
    split = cdiv(L, num_splits)
    Lp = split * num_splits  # padded to whole splits; the padding is masked like any dead position
    k = F.pad(k_cache[:B, :, :L].float(), (0, 0, 0, Lp - L))  # (B, Hkv, Lp, D)
    v = F.pad(v_cache[:B, :, :L].float(), (0, 0, 0, Lp - L))
    qg = q.float().view(B, Hkv, H // Hkv, D)  # query heads grouped under their key head
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, k) / math.sqrt(D)  # (B, Hkv, G, Lp)
    live = torch.arange(Lp, device=q.device) <= pos[:, None]  # (B, Lp)
    # dead positions may hold anything (stale rows, NaN): masked out of the scores, zeroed in v
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    v = v.masked_fill(~live[:, None, :, None], 0.0)
    # phase 1: each split's softmax over its own keys; a split with no live key has lse -inf and output 0
    scores = scores.unflatten(-1, (num_splits, split))  # (B, Hkv, G, splits, split)
    lse = scores.logsumexp(-1)  # (B, Hkv, G, splits)
    parts = torch.einsum("bhgsn,bhsnd->bhgsd", (scores - lse[..., None]).exp().nan_to_num(0.0),
                         v.unflatten(2, (num_splits, split)))
    # phase 2: merge the splits, each weighted by its share of the row's total softmax mass
    w = (lse - lse.logsumexp(-1, keepdim=True)).exp()  # (B, Hkv, G, splits)
    return (parts * w[..., None]).sum(-2).reshape(B, H, D).to(q.dtype)

