"""grpo.py against formulas written out independently here, and the invariances the trainer relies on:
the update's gradients do not depend on how the batch is split into micro-batches, mini-batches or ranks."""
import gc
import math

import pytest
import torch

from conftest import free_port, run_ranks
from grpo import (LOSS_AGGS, Rollouts, build_rollouts, group_advantages, grpo_update, loss_weights, next_tokens,
                  policy_logprobs, sequence_logprobs, token_losses)
from checkpoint import load_pretrained

# ----------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_formula():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0,  # mean 0.25, sample std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
                            1.0, 2.0, 3.0, 6.0,  # mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3)
                            0.5, 0.5, 0.5, 0.5])  # no spread
    std2 = math.sqrt(14 / 3)
    expected = [(r - 0.25) / (0.5 + 1e-6) for r in (0, 0, 0, 1)] + \
               [(r - 3) / (std2 + 1e-6) for r in (1, 2, 3, 6)] + [0.0] * 4
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    expected_drgrpo = [-0.25, -0.25, -0.25, 0.75, -2, -1, 0, 3, 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(rewards, 4, std_normalize=False), torch.tensor(expected_drgrpo))


@pytest.mark.parametrize("value", [0.87, 0.1, 0.7, -1.0, 0.0])
def test_zero_spread_group_gets_exactly_zero(value):
    # eight 0.87s do not average to exactly 0.87 in fp32; the advantage must still be exactly 0, not NaN
    rewards = torch.cat([torch.full((8,), value), torch.arange(8.0)])
    adv = group_advantages(rewards, 8)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert torch.isfinite(adv).all() and adv[8:].abs().sum() > 0


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


# ----------------------------------------------------------------------------------------------------
# rollout batch layout


def test_build_rollouts_shift_convention():
    prompts, responses = [[5, 6, 7], [8]], [[1, 2], [3, 4, 9]]
    r = build_rollouts(prompts, responses, [0.5, -1.0], pad_id=0)
    assert r.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    # the target at column t is token t+1: row 0's response tokens (cols 3, 4) are targets at cols 2, 3
    assert r.response_mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    targets = next_tokens(r.input_ids)
    assert [targets[i][r.response_mask[i]].tolist() for i in range(2)] == responses
    assert r.advantages.dtype == torch.float32 and r.old_logprobs is None
    moved = r.to("cpu")
    assert torch.equal(moved.input_ids, r.input_ids) and moved.old_logprobs is None
    with pytest.raises(ValueError, match="empty prompt"):
        build_rollouts([[]], [[1]], [0.0], pad_id=0)
    # the sampler's log-probs land in the response's columns; a rollout out of the loss has no mask at all
    r = build_rollouts(prompts, responses, [0.5, -1.0], pad_id=0, sampler_logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0]],
                       in_loss=[True, False])
    assert r.sampler_logprobs.tolist() == [[0, 0, -1, -2, 0], [-3, -4, -5, 0, 0]]
    assert r.response_mask.tolist() == [[False, False, True, True, False], [False] * 5]
    with pytest.raises(ValueError, match="2 response tokens but 1 log-probs"):
        build_rollouts(prompts, responses, [0.5, -1.0], pad_id=0, sampler_logprobs=[[-1.0], [-3.0, -4.0, -5.0]])


# ----------------------------------------------------------------------------------------------------
# the objective against a direct per-token formula


def direct_loss_and_grad(lp, old, ref, adv, mask, loss_agg, cl, ch, beta, max_len, samp=None, cap=0.0):
    """Scalar loops, PPO-paper form: for A >= 0 the objective is min(r, 1+ch) * A, for A < 0 it is
    max(r, 1-cl) * A, times the truncated importance weight min(pi_old / pi_sampler, cap) when cap > 0;
    returns (loss, d loss / d lp as nested lists, number of clipped tokens)."""
    B, T = len(lp), len(lp[0])
    lengths = [sum(mask[i]) for i in range(B)]
    n_tokens = sum(lengths)
    loss, grad, n_clipped = 0.0, [[0.0] * T for _ in range(B)], 0
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i]
            if a >= 0:
                obj, active = min(r, 1 + ch) * a, r < 1 + ch
            else:
                obj, active = max(r, 1 - cl) * a, r > 1 - cl
            n_clipped += not active and a != 0
            d_tok = -a * r if active else 0.0  # d(-obj)/d lp, since d r / d lp = r
            tok = -obj
            if cap > 0:
                is_weight = min(math.exp(old[i][t] - samp[i][t]), cap)  # a constant: no gradient through it
                tok, d_tok = tok * is_weight, d_tok * is_weight
            if beta > 0:
                x = ref[i][t] - lp[i][t]
                tok += beta * (math.exp(x) - x - 1)
                d_tok += beta * (1 - math.exp(x))
            w = {"token-mean": 1 / n_tokens, "seq-mean-token-mean": 1 / (lengths[i] * B),
                 "seq-mean-token-sum-norm": 1 / (max_len * B)}[loss_agg]
            loss += w * tok
            grad[i][t] = w * d_tok
    return loss, grad, n_clipped


@pytest.mark.parametrize("beta, cap", [(0.0, 0.0), (0.1, 0.0), (0.1, 1.5)])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_loss_and_grad_match_direct_formula(loss_agg, beta, cap):
    g = torch.Generator().manual_seed(0)
    B, T, cl, ch, max_len = 6, 9, 0.2, 0.28, 12
    lengths = [1, 3, 5, 8, 2, 6]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    # log-ratios spread over +-0.6: ratios well inside and well outside both clip bounds
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + (torch.rand(B, T, generator=g) - 0.5) * 1.2
    ref = old + (torch.rand(B, T, generator=g) - 0.5) * 2
    # the sampler's log-probs off the old ones by up to +-1: importance weights from 0.6 to 2.7, some capped
    samp = old + (torch.rand(B, T, generator=g) - 0.5) * 2
    # arbitrary values outside the mask must not leak in: here exp(lp - old), exp(ref - lp), exp(old - samp) overflow
    lp[~mask], old[~mask], ref[~mask], samp[~mask] = 100.0, -100.0, 300.0, -300.0
    adv = torch.tensor([1.5, -0.7, 0.9, -2.0, 0.0, 0.3])

    lp_g = lp.clone().requires_grad_()
    tok, stats = token_losses(lp_g, old, adv, mask, cl, ch, beta, ref if beta > 0 else None, samp, cap)
    loss = (tok * loss_weights(mask, loss_agg, mask.sum().item(), B, max_len)).sum()
    loss.backward()

    want_loss, want_grad, want_clipped = direct_loss_and_grad(lp.tolist(), old.tolist(), ref.tolist(),
                                                              adv.tolist(), mask.tolist(), loss_agg, cl, ch,
                                                              beta, max_len, samp.tolist(), cap)
    assert want_clipped >= 4  # the data really exercises clipping
    if cap:
        assert ((old - samp).exp()[mask] > cap).sum() >= 4  # and the cap
    torch.testing.assert_close(loss.item(), want_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lp_g.grad, torch.tensor(want_grad), rtol=1e-5, atol=1e-7)  # 0 off the mask
    assert int(stats["clipped"].sum()) == want_clipped
    x = (lp - old)[mask]
    torch.testing.assert_close(stats["kl_old"][mask], x.exp() - 1 - x)
    s = (old - samp)[mask]
    torch.testing.assert_close(stats["kl_sampler"][mask], s.exp() - 1 - s)
    if beta > 0:
        d = (ref - lp)[mask]
        torch.testing.assert_close(stats["kl_ref"][mask], d.exp() - d - 1)


def test_clipping_both_sides():
    # one token each: (log-ratio, advantage) -> is the clipped branch active, is the gradient zero
    lr = torch.tensor([[0.5], [-0.5], [0.5], [-0.5], [0.05]])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    lp = lr.clone().requires_grad_()
    mask = torch.ones(5, 1, dtype=torch.bool)
    tok, stats = token_losses(lp, torch.zeros(5, 1), adv, mask, 0.2, 0.2)
    tok.sum().backward()
    # ratio e^.5 > 1.2 with A > 0: clipped to 1.2, no gradient; e^-.5 < 0.8 with A > 0: unclipped (min)
    # e^.5 with A < 0: unclipped (pessimistic); e^-.5 < 0.8 with A < 0: clipped to 0.8; e^.05: inside
    assert stats["clipped"].view(-1).tolist() == [True, False, False, True, False]
    assert lp.grad.view(-1)[0] == 0 and lp.grad.view(-1)[3] == 0
    torch.testing.assert_close(tok.view(-1), torch.tensor([-1.2, -math.exp(-0.5), math.exp(0.5), 0.8,
                                                           -math.exp(0.05)]))


# ----------------------------------------------------------------------------------------------------
# on a tiny model: micro-batches, mini-batches, ranks


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


def random_rollouts(vocab, n=8, seed=0, ref=True):
    """n rollouts of very different prompt and response lengths, so micro-batches differ in token count."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(0, vocab, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    adv = torch.randn(n, generator=g)
    r = build_rollouts(prompts, responses, adv, pad_id=0)
    # old / ref log-probs off the model's own, so ratios are far enough from 1 to clip
    r.old_logprobs = -torch.rand(r.input_ids.shape, generator=g) * 6
    r.ref_logprobs = -torch.rand(r.input_ids.shape, generator=g) * 6 if ref else None
    r.sampler_logprobs = r.old_logprobs + (torch.rand(r.input_ids.shape, generator=g) - 0.5)
    return r


class Capture:
    """Stands in for an optimizer: keeps the gradients grpo_update hands to step()."""
    def __init__(self, model):
        self.params = list(model.parameters())
        self.grads = []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_sequence_logprobs_matches_full_logits(tiny):
    model = load_pretrained(tiny)
    r = random_rollouts(model.config.vocab_size, n=5)
    got = sequence_logprobs(model, r, micro_batch_size=2, temperature=0.7)  # trimmed micro-batches
    with torch.no_grad():
        logp = (model(r.input_ids) / 0.7).log_softmax(-1).gather(-1, next_tokens(r.input_ids)[..., None])[..., 0]
    torch.testing.assert_close(got[r.response_mask], logp[r.response_mask], rtol=1e-5, atol=1e-5)


def grouped_rollouts(vocab, prompt_lens=(4, 7, 7), group=3, seed=3):
    """GRPO-shaped: each prompt repeated over its group, responses of different lengths (one of 1 token)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompt_lens for _ in range(1)]
    lengths = torch.randint(1, 12, (len(prompts) * group,), generator=g).tolist()
    lengths[1] = 1
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    r = build_rollouts([p for p in prompts for _ in range(group)], responses, torch.randn(len(lengths), generator=g),
                       pad_id=0)
    r.old_logprobs = -torch.rand(r.input_ids.shape, generator=g) * 6
    return r


@pytest.mark.parametrize("micro_batch_size", [9, 3])  # prompts of mixed lengths in one micro-batch; one prompt
def test_shared_prompt_forward_matches_unpacked(tiny, micro_batch_size):
    """Each prompt runs once per micro-batch: the log-probs, entropies and gradients are those of the plain
    forward over every row (full logits, log_softmax, gather) with the same loss."""
    model = load_pretrained(tiny)
    r = grouped_rollouts(model.config.vocab_size)
    mask = r.response_mask
    logp, entropy = policy_logprobs(model, r.input_ids, mask, 0.8, return_entropy=True)
    logits = model(r.input_ids) / 0.8
    ref = logits.log_softmax(-1)
    ref_logp = ref.gather(-1, next_tokens(r.input_ids)[..., None])[..., 0]
    torch.testing.assert_close(logp[mask], ref_logp[mask].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], torch.special.entr(ref.exp()).sum(-1)[mask].detach(), rtol=1e-5,
                               atol=1e-5)
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()

    tok, _ = token_losses(ref_logp, r.old_logprobs, r.advantages, mask)
    (tok * loss_weights(mask, "token-mean", mask.sum().item(), len(r))).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    opt = Capture(model)
    opt.zero_grad()
    grpo_update(model, opt, r, micro_batch_size=micro_batch_size, temperature=0.8, max_grad_norm=1e9)
    for a, b in zip(opt.grads[0], want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_one_micro_batch_equals_four(tiny, loss_agg):
    model = load_pretrained(tiny)
    r = random_rollouts(model.config.vocab_size)
    grads, stats = [], []
    for mbs in (8, 2):
        opt = Capture(model)
        stats.append(grpo_update(model, opt, r, micro_batch_size=mbs, kl_beta=0.05, loss_agg=loss_agg,
                                 max_response_len=16, tis_cap=1.2, max_grad_norm=1e9))
        grads.append(opt.grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    assert stats[0]["clip_frac"] > 0.05  # the gradients above include clipped tokens
    for key in ("loss", "clip_frac", "kl_old", "kl_ref", "kl_sampler", "entropy", "grad_norm", "tokens"):
        assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-5), key
    assert stats[0]["tokens"] == int(r.response_mask.sum())
    s = (r.old_logprobs - r.sampler_logprobs)[r.response_mask]
    assert stats[0]["kl_sampler"] == pytest.approx((s.exp() - 1 - s).mean().item(), rel=1e-5)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_rollouts_out_of_the_loss_are_as_if_absent(tiny, loss_agg):
    """--mask-truncated: rollouts left out of the loss change neither the gradient nor the normalisers."""
    model = load_pretrained(tiny)
    r = random_rollouts(model.config.vocab_size)
    keep = [True, False, True, True, False, True, True, False]
    masked = Rollouts(**{**vars(r), "response_mask": r.response_mask & torch.tensor(keep)[:, None]})
    idx = torch.tensor([i for i, k in enumerate(keep) if k])
    dropped = Rollouts(**{k: None if v is None else v[idx] for k, v in vars(r).items()})
    grads = []
    for batch in (masked, dropped):
        opt = Capture(model)
        stats = grpo_update(model, opt, batch, micro_batch_size=3, loss_agg=loss_agg, max_response_len=16,
                            kl_beta=0.05, max_grad_norm=1e9)
        grads.append(opt.grads[0])
        assert stats["tokens"] == int(r.response_mask[torch.tensor(keep)].sum())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    # nothing in the loss at all: a zero gradient, not NaN
    empty = Rollouts(**{**vars(r), "response_mask": torch.zeros_like(r.response_mask)})
    opt = Capture(model)
    assert grpo_update(model, opt, empty, micro_batch_size=4, loss_agg=loss_agg, max_response_len=16)["tokens"] == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in opt.grads[0])


def test_first_update_ratio_is_exactly_one(tiny):
    model = load_pretrained(tiny)
    r = random_rollouts(model.config.vocab_size, ref=False)
    r.old_logprobs = sequence_logprobs(model, r, micro_batch_size=3)
    opt = Capture(model)
    stats = grpo_update(model, opt, r, micro_batch_size=3, max_grad_norm=1e9)
    assert stats["clip_frac"] == 0 and stats["kl_old"] == 0
    # without old log-probs the current ones (detached) stand in: the same gradient, one forward less
    r.old_logprobs = None
    opt2 = Capture(model)
    grpo_update(model, opt2, r, micro_batch_size=3, max_grad_norm=1e9)
    for a, b in zip(opt.grads[0], opt2.grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_update(model, opt2, r, micro_batch_size=3, mini_batches=2)


def test_two_mini_batches_are_two_sequential_steps(tiny):
    base = load_pretrained(tiny)
    r = random_rollouts(base.config.vocab_size, ref=False)
    a, b = load_pretrained(tiny), load_pretrained(tiny)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-3), torch.optim.AdamW(b.parameters(), lr=1e-3)
    stats = grpo_update(a, opt_a, r, micro_batch_size=2, mini_batches=2, max_grad_norm=0.5)
    assert stats["steps"] == 2 and all(opt_a.state[p]["step"] == 2 for p in a.parameters())
    # the same as two calls, one per half: the second step's loss is computed after the first step's update
    grpo_update(b, opt_b, r.rows(0, 4), micro_batch_size=2, max_grad_norm=0.5)
    grpo_update(b, opt_b, r.rows(4, 8), micro_batch_size=2, max_grad_norm=0.5)
    moved = 0.0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), base.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=name)
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-4


def test_argument_errors(tiny):
    model = load_pretrained(tiny)
    r = random_rollouts(model.config.vocab_size, ref=False)
    opt = Capture(model)
    with pytest.raises(ValueError, match="max_response_len"):
        grpo_update(model, opt, r, micro_batch_size=4, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_update(model, opt, r, micro_batch_size=4, kl_beta=0.1)
    with pytest.raises(ValueError, match="mini-batches"):
        grpo_update(model, opt, r, micro_batch_size=4, mini_batches=3)
    with pytest.raises(ValueError, match="unknown loss_agg"):
        grpo_update(model, opt, r, micro_batch_size=4, loss_agg="mean")
    r.sampler_logprobs = None
    with pytest.raises(ValueError, match="tis_cap > 0 needs the sampler's log-probs"):
        grpo_update(model, opt, r, micro_batch_size=4, tis_cap=2.0)
    assert opt.grads == []


# --- two ranks (gloo, CPU, real DDP) against one process on the same global batch


def _ddp_worker(rank, port, tiny, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for loss_agg in LOSS_AGGS:
        model = load_pretrained(tiny)
        r = random_rollouts(model.config.vocab_size)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
        # each rank takes every other rollout: unequal token counts per rank, as in a real split
        idx = torch.arange(rank, 8, 2)
        mine = Rollouts(r.input_ids[idx], r.response_mask[idx], r.advantages[idx], r.old_logprobs[idx],
                        r.ref_logprobs[idx])
        stats = grpo_update(ddp, opt, mine, micro_batch_size=2, kl_beta=0.05, loss_agg=loss_agg,
                            max_response_len=16, max_grad_norm=1e9)
        results[loss_agg] = {"params": [p.detach().clone() for p in model.parameters()], "stats": stats}
    if rank == 0:
        torch.save(results, out)
    del ddp  # before the group, as ssr.train does: a Reducer that outlives it can hang the exit (see there)
    gc.collect()
    dist.destroy_process_group()


def test_two_rank_ddp_equals_one_process(tiny, tmp_path):
    """Real DDP over gloo, 2 processes with 2 micro-batches each (no_sync path), vs 1 process with the
    whole batch in one micro-batch; SGD with lr 1 and no clipping, so the update is the raw gradient and
    a wrong scale (per-rank normaliser, DDP's averaging left in) shows."""
    out = tmp_path / "rank0.pt"
    run_ranks(_ddp_worker, (free_port(), tiny, str(out)))
    results = torch.load(out)
    for loss_agg in LOSS_AGGS:
        got = results[loss_agg]
        model = load_pretrained(tiny)
        r = random_rollouts(model.config.vocab_size)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        want = grpo_update(model, opt, r, micro_batch_size=8, kl_beta=0.05, loss_agg=loss_agg,
                           max_response_len=16, max_grad_norm=1e9)
        for a, b in zip(got["params"], model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=loss_agg)
        for key in ("loss", "clip_frac", "kl_old", "kl_ref", "entropy", "grad_norm", "tokens"):
            assert got["stats"][key] == pytest.approx(want[key], rel=1e-5), (loss_agg, key)


# ----------------------------------------------------------------------------------------------------
# a GPU run's precision policy, on CPU: fp32 master weights under bf16 autocast (--dist none and ddp on CUDA)

BF16_GRAD_TOL = 0.05  # max |g_bf16 - g_fp32| / max |g_fp32| per parameter: bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("prompt_lens", [(6,), (4, 7)], ids=["one-prompt", "mixed-prompts"])
def test_update_under_bf16_autocast_matches_fp32(tiny, prompt_lens):
    """One update of a micro-batch holding one prompt's group (every prefix the same length: the packed attention
    runs through causal_lower_right, an attention-bias object that dispatches before autocast casts anything and
    refused fp32 q/k next to bf16 v, so every single-GPU run crashed at its first update) and one holding two
    prompts of other lengths (a boolean mask). Under autocast("cpu", bf16) the attention gets one dtype, bf16, on
    both paths, and the loss and gradients are fp32's within bf16 rounding."""
    r = grouped_rollouts(load_pretrained(tiny).config.vocab_size, prompt_lens=prompt_lens, group=3)
    seen = []

    class SpyAttention(torch.overrides.TorchFunctionMode):  # a mode: it sees the call before the bias dispatches
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                seen.append({t.dtype for t in args[:3]})
            return func(*args, **(kwargs or {}))

    results = {}
    for precision, autocast in (("fp32", torch.autocast("cpu", enabled=False)),
                                ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        model = load_pretrained(tiny)  # fp32 master weights in both runs
        opt = Capture(model)
        seen.clear()
        with autocast, SpyAttention():
            stats = grpo_update(model, opt, r, micro_batch_size=len(r), temperature=0.9, max_grad_norm=1e9)
        assert seen and all(s == {torch.float32 if precision == "fp32" else torch.bfloat16} for s in seen), seen
        assert all(g.dtype == torch.float32 for g in opt.grads[0])  # gradients land on the fp32 masters
        results[precision] = stats, opt.grads[0]
    (fp32, g32), (bf16, g16) = results["fp32"], results["bf16"]
    assert math.isfinite(bf16["loss"]) and abs(bf16["loss"] - fp32["loss"]) <= 0.05 * abs(fp32["loss"]) + 1e-3
    for name, a, b in zip((n for n, _ in load_pretrained(tiny).named_parameters()), g16, g32):
        assert (a - b).abs().max() <= BF16_GRAD_TOL * b.abs().max() + 1e-6, name
