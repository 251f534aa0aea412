"""GRPO: group-relative advantages and a clipped policy-gradient update, micro-batched and data-parallel.

The update is DeepSeekMath's GRPO objective with the knobs later work found to matter: a separate upper
clip (DAPO's clip-higher), Dr.GRPO's advantages without std normalisation and its constant length
normaliser, and a choice of how per-token losses are aggregated.

Conventions. A batch of N rollouts is a `Rollouts`; every (N, T) tensor in it is column-aligned:
- input_ids (N, T): prompt + response, right-padded. Attention is causal, so right padding never changes
  the log-probs of the real tokens before it.
- Column t of any log-prob tensor holds log p(input_ids[:, t+1] | input_ids[:, :t+1]): the model's output
  at position t predicts the next token (the "shift"). The target of the last column wraps around to
  column 0 (see `next_tokens`) and is always masked out.
- response_mask (N, T) bool: True at t when input_ids[:, t+1] is a response token. For a prompt of P tokens
  and a response of R tokens that is columns P-1 .. P+R-2.
- old_logprobs, ref_logprobs, sampler_logprobs (N, T) fp32 with the same alignment; values where the mask is
  False are meaningless and never used.

Distributed: each rank holds its own equal share of the global batch (the same N on every rank, since
DDP/FSDP2 collectives need every rank to run the same number of forwards and backwards). The model is
wrapped in DDP or FSDP2 (`fully_shard`), both of which *average* gradients over ranks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import IGNORE

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards (N,), N = prompts * group_size with each prompt's group contiguous -> advantages (N,) fp32:
    (r - mean_g) / (std_g + eps), or r - mean_g (Dr.GRPO) with std_normalize=False.

    std_g is the unbiased sample std (Bessel-corrected, torch.std's default), as verl and TRL compute it,
    so runs compare with theirs; at group size 8 it is sqrt(8/7) ~ 1.07x the population std, a constant
    rescale of the advantages.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (got {group_size}): a group of one has no relative signal")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (prompts, G)
    adv = r - r.mean(1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(1, keepdim=True) + eps)
    # A group whose rewards are all equal carries no signal, but its float mean can miss the common value
    # by an ulp (eight 0.87s average to 0.87 +- 6e-8), and dividing that by a ~1e-8 std gives a sizeable
    # bogus advantage. Such groups get exactly 0.
    flat = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)
    return torch.where(flat, 0.0, adv).view(-1)


@dataclass
class Rollouts:
    """One rollout batch (this rank's share). Shapes and the shift convention: see the module docstring."""
    input_ids: torch.Tensor  # (N, T) long, prompt + response, right-padded
    response_mask: torch.Tensor  # (N, T) bool, True where the *target* (token t+1) is a response token
    advantages: torch.Tensor  # (N,) fp32, one per rollout, shared by all its tokens
    old_logprobs: torch.Tensor | None = None  # (N, T) fp32, the sampling policy's log-probs (see grpo_update)
    ref_logprobs: torch.Tensor | None = None  # (N, T) fp32, a frozen reference's, needed when kl_beta > 0
    # (N, T) fp32, what the sampler itself reported (its bf16 copy, its kernels): for kl_sampler and tis_cap
    sampler_logprobs: torch.Tensor | None = None

    def __len__(self):
        return self.input_ids.shape[0]

    def to(self, device) -> "Rollouts":
        return Rollouts(**{f.name: None if (t := getattr(self, f.name)) is None else t.to(device)
                           for f in fields(self)})

    def rows(self, start: int, stop: int) -> "Rollouts":
        """Rows [start, stop), cut to the columns up to the last response target of those rows: the
        right padding after it would cost compute and change nothing."""
        mask = self.response_mask[start:stop]
        cols = mask.any(0).nonzero()
        # +2: the last target column c needs input column c+1 (its target token) to be kept too
        width = min(int(cols.max()) + 2, mask.shape[1]) if len(cols) else 1

        def cut(t):
            return None if t is None else t[start:stop, :width] if t.ndim == 2 else t[start:stop]

        return Rollouts(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})


def build_rollouts(prompts: list[list[int]], responses: list[list[int]], advantages, pad_id: int,
                   sampler_logprobs: list[list[float]] | None = None, in_loss: list[bool] | None = None) -> Rollouts:
    """Token-id lists (N of each) and advantages (N,) -> Rollouts with right-padded input_ids (N, T),
    T = the longest prompt + response, and its response_mask. sampler_logprobs: the sampler's log-prob of each
    response token (Completion.logprobs), placed in the same columns. in_loss[i] False leaves rollout i's tokens
    out of the mask, hence out of the loss and its normalisers (--mask-truncated). Old and reference log-probs
    are filled in later (`sequence_logprobs`)."""
    if len(prompts) != len(responses) or any(x is not None and len(x) != len(prompts)
                                             for x in (sampler_logprobs, in_loss)):
        raise ValueError(f"{len(prompts)} prompts but responses, sampler_logprobs or in_loss of another length")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: the first response token needs at least one token to condition on")
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    sampler = torch.zeros((len(prompts), T)) if sampler_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        # response tokens sit at columns P .. P+R-1; each is the target of the column before it
        response_mask[i, len(p) - 1:len(p) + len(r) - 1] = in_loss is None or in_loss[i]
        if sampler is not None:
            if len(sampler_logprobs[i]) != len(r):
                raise ValueError(f"rollout {i}: {len(r)} response tokens but {len(sampler_logprobs[i])} log-probs")
            sampler[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(sampler_logprobs[i])
    return Rollouts(input_ids, response_mask, torch.as_tensor(advantages, dtype=torch.float32),
                    sampler_logprobs=sampler)


def next_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) targets: column t holds token t+1. The last column wraps to column 0, a valid id
    (so the head's gather stays in range) whose log-prob is always masked out."""
    return input_ids.roll(-1, dims=1)


# ----------------------------------------------------------------------------------------------------
# the policy forward: a group's rollouts share one prompt, so each micro-batch runs each prompt once

class SharedPromptAttention:
    """Attention for a micro-batch packed by `pack_shared_prompts`, given to the model as its kv_cache (the
    model hands attention to any kv_cache with an `attend` method). The packed sequence is n prefixes of Pp
    tokens, then b segments of S tokens: each prefix attends causally over itself; each segment over its
    group's prefix (its real tokens only) and causally over itself. Nothing else is computed: no (T, T) mask."""

    def __init__(self, n: int, Pp: int, b: int, S: int, group: torch.Tensor, prefix_len: torch.Tensor):
        self.n, self.Pp, self.b, self.S, self.group = n, Pp, b, S, group  # group (b,): each segment's prefix
        if bool((prefix_len == Pp).all()):
            # no padded prefix: "causal, aligned to the last key" says it all, and lets SDPA pick flash on GPU
            # (imported here: it imports torch._dynamo, a second at start-up, and with it Triton)
            from torch.nn.attention.bias import causal_lower_right

            self.mask = causal_lower_right(S, Pp + S)
        else:  # (b, 1, S, Pp + S): the real part of the group's prefix, then causal over the segment
            real = torch.arange(Pp, device=group.device) < prefix_len[group, None]  # (b, Pp)
            causal = torch.ones(S, S, dtype=torch.bool, device=group.device).tril()
            self.mask = torch.cat([real[:, None, :].expand(-1, S, -1), causal.expand(b, -1, -1)], 2)[:, None]

    def attend(self, layer: int, q, k, v):  # q (1, H, T, D), k/v (1, Hkv, T, D), T = n * Pp + b * S
        def split(t):  # -> prefixes (n, heads, Pp, D), segments (b, heads, S, D)
            t = t[0]
            return (t[:, :self.n * self.Pp].unflatten(1, (self.n, self.Pp)).transpose(0, 1),
                    t[:, self.n * self.Pp:].unflatten(1, (self.b, self.S)).transpose(0, 1))

        (qp, qs), (kp, ks), (vp, vs) = split(q), split(k), split(v)
        gqa = q.shape[1] != k.shape[1]
        out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
        # each segment's keys: its group's prefix (the gather's backward sums the group's gradients), then its own
        keys, values = torch.cat([kp[self.group], ks], 2), torch.cat([vp[self.group], vs], 2)
        out_s = F.scaled_dot_product_attention(qs, keys, values, attn_mask=self.mask, enable_gqa=gqa)
        return torch.cat([out_p.transpose(0, 1).flatten(1, 2), out_s.transpose(0, 1).flatten(1, 2)], 1)[None]


def pack_shared_prompts(ids: torch.Tensor, response_mask: torch.Tensor):
    """One micro-batch (b, w) -> the model inputs that compute the same response log-probs with each distinct
    prompt run once: (packed ids, positions, targets) each (1, T), the SharedPromptAttention, and where each
    response target sits in the packed sequence, (b, w) (garbage off the mask).

    Consecutive rows with the same prompt form a group (a GRPO group is contiguous). Its prefix is the prompt
    but its last token, at positions 0..P-2; each row's segment is the prompt's last token then its response,
    at positions P-1.., so a segment's first output predicts the first response token. Targets are the next
    token inside each segment and IGNORE elsewhere: the head runs at response tokens only."""
    b, w = ids.shape
    cols = torch.arange(w, device=ids.device)
    R = response_mask.sum(1)  # (b,) response lengths
    # the first response target sits at column P - 1 (a row without response: its last column)
    P = torch.where(R > 0, response_mask.int().argmax(1), w - 1) + 1  # (b,) prompt lengths
    same = (P[1:] == P[:-1]) & ((ids[1:] == ids[:-1]) | (cols >= P[1:, None])).all(1)  # row r has row r-1's prompt
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=ids.device), ~same])
    group = starts.cumsum(0) - 1  # (b,) each row's group
    first_rows = starts.nonzero().squeeze(1)  # (n,) a row of each group
    prefix_len = P[first_rows] - 1  # (n,)
    n, Pp, S = len(first_rows), max(1, int(prefix_len.max())), int(R.max()) + 1
    # prefixes: each group's prompt columns 0..Pp-1 (past P-2 whatever the row holds: no real token sees it)
    pre_ids = ids[first_rows, :Pp]  # (n, Pp)
    pre_pos = cols[:Pp].expand(n, -1)
    # segments: columns P-1 .. P-1+S-1 of each row (clamped at the row's end: padding either way)
    seg_cols = ((P - 1)[:, None] + torch.arange(S, device=ids.device)).clamp(max=w - 1)  # (b, S)
    seg_ids = ids.gather(1, seg_cols)
    seg_pos = (P - 1)[:, None] + torch.arange(S, device=ids.device)
    seg_targets = torch.where(torch.arange(S, device=ids.device) < R[:, None], next_tokens(ids).gather(1, seg_cols),
                              IGNORE)
    packed = [torch.cat([a.flatten(), c.flatten()])[None] for a, c in
              ((pre_ids, seg_ids), (pre_pos, seg_pos), (torch.full_like(pre_ids, IGNORE), seg_targets))]
    where = n * Pp + torch.arange(b, device=ids.device)[:, None] * S + (cols - (P - 1)[:, None]).clamp(0, S - 1)
    return (*packed, SharedPromptAttention(n, Pp, b, S, group, prefix_len), where)


def policy_logprobs(model, ids: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0,
                    return_entropy: bool = False, logprob_backend: str = "auto"):
    """log p (b, w) fp32 of each response target under `model` (column-aligned with response_mask; 0 off it),
    and with return_entropy the entropies (b, w), detached: one forward over the packed micro-batch.
    logprob_backend: who runs the fused head (kernels.LOGPROB_BACKENDS; --logprob-backend)."""
    packed_ids, positions, targets, attention, where = pack_shared_prompts(ids, response_mask)
    out = model(packed_ids, positions=positions, kv_cache=attention, targets=targets, temperature=temperature,
                return_entropy=return_entropy, logprob_backend=logprob_backend)
    unpack = lambda o: torch.where(response_mask, o[0][where], 0.0)  # (1, T) -> (b, w)
    return tuple(map(unpack, out)) if return_entropy else unpack(out)


def model_device(model) -> torch.device:
    # under FSDP2 parameters are DTensors; their .device is the local shard's device
    return next(model.parameters()).device


@torch.no_grad()
def sequence_logprobs(model, rollouts: Rollouts, micro_batch_size: int, temperature: float = 1.0,
                      logprob_backend: str = "auto") -> torch.Tensor:
    """Log-probs (N, T) fp32 of each response token under `model` (old or reference log-probs), aligned with
    rollouts.response_mask, on rollouts' device; 0 off the mask (the head runs at response tokens only).

    Use the same micro_batch_size as grpo_update: identical micro-batches give bit-identical log-probs, so
    the first update's ratio is exactly 1 (different batch shapes may round differently).
    temperature must be the sampler's: the policy being trained is softmax(logits / temperature).
    """
    out = torch.zeros(rollouts.input_ids.shape, dtype=torch.float32, device=rollouts.input_ids.device)
    device = model_device(model)
    for start in range(0, len(rollouts), micro_batch_size):
        mb = rollouts.rows(start, start + micro_batch_size)
        ids = mb.input_ids.to(device)  # (b, w)
        logp = policy_logprobs(model, ids, mb.response_mask.to(device), temperature,
                               logprob_backend=logprob_backend)  # (b, w) fp32
        out[start:start + len(mb), :ids.shape[1]] = logp.to(out.device)
    if hasattr(model, "reshard"):  # FSDP2 keeps the root's parameters gathered after a forward, expecting a
        model.reshard()            # backward; with none coming, free them (embedding + head: 2 GiB at 7B)
    return out


def token_losses(logp, old_logp, advantages, response_mask, clip_low=0.2, clip_high=0.2, kl_beta=0.0,
                 ref_logp=None, sampler_logp=None, tis_cap=0.0):
    """Per-token clipped policy loss (B, T), 0 outside the mask, plus per-token diagnostics (B, T).

    logp (B, T) current log-probs (with grad), old_logp / ref_logp / sampler_logp (B, T), advantages (B,),
    response_mask (B, T) bool.
      ratio = exp(logp - old_logp)
      loss  = -w * min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)  [+ kl_beta * k3_ref]
      w     = min(exp(old_logp - sampler_logp), tis_cap) with tis_cap > 0 (else 1): truncated importance
              sampling. The tokens were drawn by the sampler, whose bf16 weights and kernels give a slightly
              different policy than the trainer's "old" one that the ratio assumes; w reweights each token to
              the old policy, capped so a token the sampler found far likelier cannot dominate the batch.
      k3_ref = exp(ref - logp) - (ref - logp) - 1, an unbiased, non-negative estimate of KL(policy || ref)
    With sampler_logp, stats also hold kl_sampler: k3 of KL(sampler || old) on the sampled tokens.
    """
    # log-ratios are zeroed outside the mask before exp: padding positions hold arbitrary log-probs, and
    # an overflow there (exp(...) = inf, times a zero weight) would turn the loss and gradients into NaN
    log_ratio = torch.where(response_mask, logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (B, 1): every token of a rollout shares its advantage
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if sampler_logp is not None:
        log_is = torch.where(response_mask, old_logp - sampler_logp, 0.0)  # log pi_old / pi_sampler
        if tis_cap > 0:
            loss = loss * torch.exp(log_is).clamp(max=tis_cap).detach()
    stats = {
        # the clipped branch is the one min() picks: the token's gradient is zero
        "clipped": (clipped < unclipped) & response_mask,
        # k3 estimate of KL(old || current), from samples of the old policy: (ratio - 1) - log ratio
        "kl_old": (ratio - 1 - log_ratio).detach(),
    }
    if sampler_logp is not None:
        stats["kl_sampler"] = (torch.exp(log_is) - 1 - log_is).detach()
    if kl_beta > 0:
        log_ref_ratio = torch.where(response_mask, ref_logp - logp, 0.0)
        kl_ref = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        loss = loss + kl_beta * kl_ref
        stats["kl_ref"] = kl_ref.detach()
    return torch.where(response_mask, loss, 0.0), stats


def loss_weights(response_mask, loss_agg: str, n_tokens: float, n_seqs: float,
                 max_response_len: int | None = None) -> torch.Tensor:
    """(B, T) fp32 weight of each token's loss so that sum(weights * token_losses) over every micro-batch
    of every rank is the global objective. n_tokens / n_seqs count the response tokens / rollouts of the
    whole global (mini-)batch, all ranks included - never this micro-batch's, or the result would depend
    on how the batch was split.

    token-mean:              sum_i,t loss / n_tokens (every token counts the same; long responses weigh more)
    seq-mean-token-mean:     mean_i (sum_t loss / len_i) (every rollout counts the same; GRPO's original)
    seq-mean-token-sum-norm: mean_i (sum_t loss / max_response_len) (Dr.GRPO: a constant, so no length bias)
    """
    mask = response_mask.float()
    if loss_agg == "token-mean":
        return mask / n_tokens
    if loss_agg == "seq-mean-token-mean":
        # clamp: a rollout with no response tokens contributes nothing instead of 0/0
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / n_seqs
    if loss_agg == "seq-mean-token-sum-norm":
        return mask / (max_response_len * n_seqs)
    raise ValueError(f"unknown loss_agg '{loss_agg}'; choose from {', '.join(LOSS_AGGS)}")


def micro_batch_backward(model, mb: Rollouts, n_tokens: float, n_seqs: float, world: int, *, clip_low: float,
                         clip_high: float, kl_beta: float, loss_agg: str, max_response_len: int | None,
                         temperature: float, tis_cap: float, logprob_backend: str = "auto") -> torch.Tensor:
    """Forward and backward of one micro-batch's share of the global objective (n_tokens / n_seqs: the
    global mini-batch's normalisers). Returns this micro-batch's sums (6,) fp64: loss, clipped tokens,
    kl_old, kl_ref, entropy, kl_sampler."""
    device = model_device(model)
    ids = mb.input_ids.to(device)  # (b, w)
    mask = mb.response_mask.to(device)  # (b, w)
    logp, entropy = policy_logprobs(model, ids, mask, temperature, return_entropy=True,
                                    logprob_backend=logprob_backend)  # (b, w)
    old = mb.old_logprobs.to(device) if mb.old_logprobs is not None else logp.detach()
    ref = mb.ref_logprobs.to(device) if kl_beta > 0 else None
    sampler = mb.sampler_logprobs.to(device) if mb.sampler_logprobs is not None else None
    tok_loss, tok_stats = token_losses(logp, old, mb.advantages.to(device), mask, clip_low, clip_high, kl_beta, ref,
                                       sampler, tis_cap)
    loss = (tok_loss * loss_weights(mask, loss_agg, n_tokens, n_seqs, max_response_len)).sum()
    # `loss` is this rank's share of a global *sum*; DDP and FSDP2 divide the summed gradients by the world
    # size, so scale it back up to make N ranks equal one process on the batch
    (loss * world).backward()
    with torch.no_grad():
        return torch.stack([loss.detach(), tok_stats["clipped"].sum().float(), (tok_stats["kl_old"] * mask).sum(),
                            (tok_stats["kl_ref"] * mask).sum() if kl_beta > 0 else loss.new_zeros(()),
                            (entropy * mask).sum(),
                            (tok_stats["kl_sampler"] * mask).sum() if sampler is not None else loss.new_zeros(())
                            ]).double()


def check_update(rollouts: Rollouts, mini_batches: int, loss_agg: str, max_response_len: int | None, kl_beta: float,
                 tis_cap: float):
    """grpo_update's preconditions: each a ValueError naming what is missing."""
    if len(rollouts) % mini_batches:
        raise ValueError(f"{len(rollouts)} rollouts do not split into {mini_batches} mini-batches")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg '{loss_agg}'; choose from {', '.join(LOSS_AGGS)}")
    if loss_agg == "seq-mean-token-sum-norm" and not max_response_len:
        raise ValueError("loss_agg 'seq-mean-token-sum-norm' needs max_response_len")
    if rollouts.old_logprobs is None and mini_batches > 1:
        raise ValueError("several mini-batches need old_logprobs (compute them with sequence_logprobs)")
    if kl_beta > 0 and rollouts.ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs from the frozen reference (sequence_logprobs)")
    if tis_cap > 0 and rollouts.sampler_logprobs is None:
        raise ValueError("tis_cap > 0 needs the sampler's log-probs (build_rollouts(sampler_logprobs=...))")


def grpo_update(model, optimizer, rollouts: Rollouts, *, micro_batch_size: int, mini_batches: int = 1,
                clip_low: float = 0.2, clip_high: float = 0.2, kl_beta: float = 0.0, loss_agg: str = "token-mean",
                max_response_len: int | None = None, temperature: float = 1.0, tis_cap: float = 0.0,
                max_grad_norm: float = 1.0, logprob_backend: str = "auto", progress=None) -> dict:
    """Policy update(s) on one rollout batch: `mini_batches` optimizer steps, each on a contiguous 1/M of
    the rows, each accumulated over micro-batches of `micro_batch_size` rows (forward -> loss -> backward),
    then grad-norm clipping, optimizer.step() and zero_grad(). LR schedulers are the caller's.

    Old log-probs are the sampling policy's: the trainer computes them with `sequence_logprobs` before this
    call, with the same micro_batch_size. With mini_batches == 1 the first (only) step then has ratio == 1
    exactly, so clipping never fires and the gradient is the plain policy gradient; rollouts.old_logprobs may then be
    None, and the current log-probs (detached) stand in for them, saving that forward pass. With several
    mini-batches old log-probs are required: from the second step on the model has moved, and the ratio
    and its clipping are what keep those steps close to the sampling policy.

    max_response_len: the constant of seq-mean-token-sum-norm (the generation budget), required by it.
    tis_cap > 0: truncated importance weights on the token loss (token_losses), needs sampler_logprobs.
    logprob_backend: who runs the fused log-prob head (kernels.LOGPROB_BACKENDS).
    progress: anything with .update(n) (a tqdm bar), told the rows of each finished micro-batch.
    Returns stats (floats, over the global batch): loss (mean over the steps), clip_frac, kl_old,
    kl_ref (when kl_beta > 0), kl_sampler (when rollouts carry sampler_logprobs), entropy (token means over
    response tokens), grad_norm (pre-clip, mean over the steps), tokens (response tokens), steps.
    """
    check_update(rollouts, mini_batches, loss_agg, max_response_len, kl_beta, tis_cap)
    N = len(rollouts)
    device = model_device(model)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    mini = N // mini_batches
    objective = dict(clip_low=clip_low, clip_high=clip_high, kl_beta=kl_beta, loss_agg=loss_agg,
                     max_response_len=max_response_len, temperature=temperature, tis_cap=tis_cap,
                     logprob_backend=logprob_backend)

    # Global normalisers, one (tokens, rollouts) pair per mini-batch, summed over ranks in one collective.
    # Rollouts count when they have a token in the loss (--mask-truncated leaves some out entirely).
    mask = rollouts.response_mask.reshape(mini_batches, mini, -1)
    counts = torch.stack([mask.sum((1, 2)), mask.any(2).sum(1)], 1).double().to(device)  # (M, 2)
    if distributed:
        dist.all_reduce(counts)
    tokens = counts[:, 0].sum().item()
    counts.clamp_(min=1)  # a mini-batch with nothing in the loss: zero weights, not 0/0
    # running sums over this rank's tokens: loss, clipped tokens, kl_old, kl_ref, entropy, kl_sampler
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    grad_norms = []
    for m in range(mini_batches):
        batch = rollouts.rows(m * mini, (m + 1) * mini)
        starts = range(0, mini, micro_batch_size)
        for start in starts:
            mb = batch.rows(start, start + micro_batch_size)
            # DDP all-reduces gradients in every backward unless told not to: only the last micro-batch
            # of a step needs it. (FSDP2 reduce-scatters every backward; nothing to do.)
            last = start == starts[-1]
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                totals += micro_batch_backward(model, mb, *counts[m].tolist(), world, **objective)
            if progress is not None:
                progress.update(len(mb))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        # with FSDP2's DTensor parameters the norm is a DTensor; full_tensor() gives the plain global value
        grad_norms.append(float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if distributed:
        dist.all_reduce(totals)
    loss_sum, clipped, kl_old, kl_ref, entropy, kl_sampler = totals.tolist()
    stats = {"loss": loss_sum / mini_batches, "clip_frac": clipped / max(tokens, 1),
             "kl_old": kl_old / max(tokens, 1), "entropy": entropy / max(tokens, 1),
             "grad_norm": sum(grad_norms) / len(grad_norms), "tokens": int(tokens), "steps": mini_batches}
    if kl_beta > 0:
        stats["kl_ref"] = kl_ref / max(tokens, 1)
    if rollouts.sampler_logprobs is not None:
        stats["kl_sampler"] = kl_sampler / max(tokens, 1)
    return stats
