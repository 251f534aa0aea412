"""Token log-probs for policy-gradient training, without fp32 (tokens, vocab) tensors.

GRPO needs log p(sampled token) at every response token. Done naively,
`logits.float().log_softmax(-1).gather(...)` at Qwen's 152k vocabulary is the largest memory cost of
training: 8k tokens hold 2.5 GB of bf16 logits, 5 GB more in fp32, and as much again for gradients.

    token_logprobs(logits, targets)                 # logits (N, V) given: one streaming read, no fp32 copy
    linear_token_logprobs(hidden, weight, targets)  # logits = hidden @ weight.T, never held whole

Both return fp32 log-probs (N,) of targets under softmax(logits / temperature), and with
return_entropy=True also the entropy (N,) of that distribution. The entropy is for logging and is
returned detached: no gradient flows through it. Targets outside [0, V) give -inf log-probs, except in
linear_token_logprobs, where a negative target (IGNORE) asks for nothing: its row's head is never computed,
and its log-prob and entropy are 0 with no gradient. The trainer needs the head at response tokens only.

backend: "triton" (logprobs_triton.py), "torch" (logprobs_torch.py, the reference and the CPU path), or
"auto" = Triton on CUDA, torch elsewhere. Both stream the vocabulary in blocks, so neither holds fp32
(N, V) temporaries; the backends differ only in who runs the per-block math.
"""
import torch

from . import logprobs_torch
from .logprobs_torch import merge_stats

# Logits elements of one vocab chunk in linear_token_logprobs (64 MiB in bf16). On an H200 at N=4096, H=896
# bf16, fwd+bwd took 12.4 / 9.0 / 8.5 / 8.2 ms at 2**23 / 2**24 / 2**25 / 2**26 with 39 / 71 / 135 / 263 MiB
# of extra memory: smaller chunks are bound by launch overhead (the naive path: 12.7 ms, 6.7 GiB).
CHUNK_ELEMS = 2**25
IGNORE = -100  # a target of linear_token_logprobs that asks for nothing (PyTorch's ignore_index)
LOGPROB_BACKENDS = ("auto", "triton", "torch")  # see the module docstring


def _impl(backend: str, device: torch.device):
    if backend not in LOGPROB_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(LOGPROB_BACKENDS)}, not {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return logprobs_torch
    if backend == "triton":
        from . import logprobs_triton  # lazily: CPU-only runs never import Triton

        return logprobs_triton


def _outputs(ctx, lse, zt, ez):
    logp = zt - lse  # (N,) fp32
    if ez is None:
        return logp
    entropy = lse - ez  # H = logsumexp(z) - E[z]
    ctx.mark_non_differentiable(entropy)
    return logp, entropy


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_t, entropy, impl):
        lse, zt, ez = impl.chunk_stats(logits, targets, 0, inv_t, entropy)  # one pass over all V columns
        ctx.save_for_backward(logits, targets, lse)
        ctx.inv_t, ctx.impl = inv_t, impl
        return _outputs(ctx, lse, zt, ez)

    @staticmethod
    def backward(ctx, g, *_):  # *_: the entropy's gradient, which we do not propagate
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V) in logits' dtype
        ctx.impl.chunk_grad(logits, targets, lse, g.float().contiguous(), 0, ctx.inv_t, grad)
        return grad, None, None, None, None


def token_logprobs(logits, targets, temperature: float = 1.0, return_entropy: bool = False, backend="auto"):
    """logits (N, V) fp32/bf16, targets (N,) int64 -> log-probs (N,) fp32 [, entropy (N,) fp32, detached].
    Differentiable w.r.t. logits; the gradient is written in the logits' dtype."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels walk columns with unit stride
    return _TokenLogprobs.apply(logits, targets.contiguous(), 1.0 / temperature, return_entropy,
                                _impl(backend, logits.device))


class _LinearTokenLogprobs(torch.autograd.Function):
    """Vocab-chunked: each chunk's logits (N, cols) = hidden @ weight[chunk].T are made, reduced to per-row
    stats, and dropped; backward makes them again. Chunking over the vocabulary (not over tokens) lets each
    chunk's weight gradient be one full matmul over all N tokens, written straight into its rows of
    grad_weight in the weight's dtype with fp32 accumulation inside the matmul: no fp32 (V, H) buffer."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, entropy, impl):
        cols = max(1, CHUNK_ELEMS // hidden.shape[0])
        stats = None
        for v0 in range(0, weight.shape[0], cols):
            x = hidden @ weight[v0:v0 + cols].T  # (N, cols) in the input dtype, fp32 accumulation
            s = impl.chunk_stats(x, targets, v0, inv_t, entropy)
            stats = s if stats is None else merge_stats(stats, s)
        ctx.save_for_backward(hidden, weight, targets, stats[0])
        ctx.inv_t, ctx.impl, ctx.cols = inv_t, impl, cols
        return _outputs(ctx, *stats)

    @staticmethod
    def backward(ctx, g, *_):
        hidden, weight, targets, lse = ctx.saved_tensors
        g = g.float().contiguous()  # (N,)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None  # (V, H)
        for v0 in range(0, weight.shape[0], ctx.cols):
            w = weight[v0:v0 + ctx.cols]  # (cols, H)
            x = hidden @ w.T  # (N, cols): recomputed rather than stored
            ctx.impl.chunk_grad(x, targets, lse, g, v0, ctx.inv_t, x)  # in place: x = d(g . logp)/d logits
            if need_h:
                grad_h += x @ w  # (N, H); summed over chunks in fp32
            if need_w:
                torch.mm(x.T, hidden, out=grad_w[v0:v0 + ctx.cols])  # (cols, H)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        return grad_h, grad_w, None, None, None, None


def linear_token_logprobs(hidden, weight, targets, temperature: float = 1.0, return_entropy: bool = False,
                          backend="auto"):
    """hidden (N, H), weight (V, H) (the LM head), targets (N,) int64 -> what
    token_logprobs(hidden @ weight.T, targets, ...) returns, without ever holding (N, V) logits.
    Gradients flow to hidden and weight. Call it inside the module whose forward owns the head weight: under
    FSDP2 the full weight exists only there. Rows whose target is negative (IGNORE) are skipped: 0 out,
    no gradient, no head compute (a host sync, to count them)."""
    skip = targets < 0
    if skip.all():  # nothing asked: zeros, still in the graph of hidden *and* weight, so that a loss built on them
        # can backward() and every parameter gets a (zero) gradient, as DDP's reducer expects of each rank
        zeros = (hidden[:, 0] * weight[0, 0] * 0).float()
        return (zeros, zeros.detach()) if return_entropy else zeros
    if skip.any():
        keep = (~skip).nonzero().squeeze(1)  # (n,)
        out = linear_token_logprobs(hidden[keep], weight, targets[keep], temperature, return_entropy, backend)
        full = lambda o: torch.zeros(len(targets), dtype=o.dtype, device=o.device).index_copy(0, keep, o)
        return tuple(map(full, out)) if return_entropy else full(out)
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # autocast would cast per matmul; cast once here instead so forward and the recomputation in
        # backward (which may run outside the autocast region) use the same dtype. Grads flow through .to().
        dtype = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return _LinearTokenLogprobs.apply(hidden, weight, targets.contiguous(), 1.0 / temperature, return_entropy,
                                      _impl(backend, hidden.device))
