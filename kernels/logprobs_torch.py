"""Torch reference for the kernels in logprobs_triton.py: the same two functions, same signatures, same
math, same streaming over column blocks. It is the backend on CPU and the readable spec of the kernels.

Each works on `x` (N, C): the columns [v0, v0 + C) of a logits matrix (all of it, or one vocab chunk of
linear_token_logprobs). Blocks of columns are upcast to fp32 one at a time, so no temporary is larger than
BLOCK_ELEMS fp32 elements whatever N and V are.
"""
import torch

BLOCK_ELEMS = 2**22  # fp32 elements in one block's temporaries (16 MiB): (N, BLOCK_ELEMS // N) columns


def merge_stats(a, b):
    """Combine chunk_stats of two disjoint column ranges of the same rows into the stats of their union."""
    lse_a, zt_a, ez_a = a
    lse_b, zt_b, ez_b = b
    lse = torch.logaddexp(lse_a, lse_b)  # (N,)
    zt = torch.maximum(zt_a, zt_b)  # the target lies in at most one range; the other holds -inf
    if ez_a is None:
        return lse, zt, None
    # mean of z under the union's softmax = each range's mean weighted by that range's share of the mass;
    # the share is -inf - -inf = nan where both ranges are all -inf so far: no mass, share 0
    share_a, share_b = ((l - lse).exp().nan_to_num(0.0) for l in (lse_a, lse_b))
    return lse, zt, ez_a * share_a + ez_b * share_b


def chunk_stats(x, targets, v0: int, inv_t: float, entropy: bool):
    """Row statistics of z = x * inv_t over these columns, all fp32 (N,):
    lse = logsumexp(z); zt = z[target] if v0 <= target < v0 + C else -inf;
    ez = E_softmax(z)[z] if entropy else None (entropy of the full row = lse - ez)."""
    N, C = x.shape
    block = max(1, BLOCK_ELEMS // N)
    stats = None
    for b0 in range(0, C, block):
        z = x[:, b0:b0 + block].float() * inv_t  # (N, B) fp32, a fresh tensor (never aliases x)
        lse = torch.logsumexp(z, -1)
        idx = targets - (v0 + b0)  # target's column inside this block
        hit = (idx >= 0) & (idx < z.shape[1])
        zt = z.gather(1, idx.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        zt = torch.where(hit, zt, float("-inf"))
        ez = None
        if entropy:
            # nansum: a -inf logit has p = 0 and 0 * -inf = nan; a genuine NaN in z already makes lse NaN
            ez = (z - lse[:, None]).exp_().mul_(z).nansum(-1)
        stats = (lse, zt, ez) if stats is None else merge_stats(stats, (lse, zt, ez))
    return stats


def chunk_grad(x, targets, lse, g, v0: int, inv_t: float, out):
    """out (N, C) = g * d(z[target] - lse)/dx = g * inv_t * (onehot(target) - softmax(z)) on these columns,
    written in out's dtype. lse (N,) is the full row's (from chunk_stats), g (N,) fp32 the upstream grad.
    out may be x itself: each block is read (upcast copy) before it is overwritten."""
    N, C = x.shape
    block = max(1, BLOCK_ELEMS // N)
    gs = (g * inv_t)[:, None]  # (N, 1)
    for b0 in range(0, C, block):
        z = x[:, b0:b0 + block].float() * inv_t  # (N, B) fp32
        grad = z.sub_(lse[:, None]).exp_().mul_(-gs)  # -g/T * softmax, in place: one (N, B) temporary
        idx = targets - (v0 + b0)
        hit = (idx >= 0) & (idx < grad.shape[1])
        grad.scatter_add_(1, idx.clamp(0, grad.shape[1] - 1)[:, None], torch.where(hit[:, None], gs, 0.0))
        out[:, b0:b0 + block] = grad
