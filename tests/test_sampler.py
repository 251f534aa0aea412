"""sampler.py against transformers' generate and against full forwards of our own model (no cache).

Every test runs on CPU, and on CUDA too when there is one (there the decode steps are CUDA graphs of the
compiled step with the Triton decode-attention kernel, the CUDA defaults). A CPU case of the kernel runs in Triton's
interpreter (conftest.require_interpreted_triton), and skips on a CUDA host, where the kernel is compiled for the GPU."""
import math

import numpy as np
import pytest
import torch

import sampler as sampler_module
from checkpoint import load_pretrained, load_tokenizer, make_tiny_model
from conftest import require_interpreted_triton
from sampler import Sampler, blocked_sums, draw_blocked, sample

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def load(path, device):
    return load_pretrained(path, device=device, dtype=torch.float32)


def random_prompts(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def full_logits(model, prompt, tokens):
    """Next-token logits (fp32) at each completion position, from one forward with no cache: (len(tokens), V)."""
    ids = torch.tensor([prompt + tokens[:-1]], device=next(model.parameters()).device)
    return model(ids)[0, len(prompt) - 1:].float()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_hf_generate(tiny_model_dir, hf_model, device):
    model = load(tiny_model_dir, device)
    tok = load_tokenizer(tiny_model_dir)
    prompts = random_prompts([3, 11, 6, 1], model.config.vocab_size)
    sampler = Sampler(model, max_batch_size=12, max_seq_len=40, device=device, dtype=torch.float32)
    # all four prompts, of different lengths, decode in one batch, each fanned out to a group of 3
    outs = sampler.generate(prompts, group_size=3, max_new_tokens=20, temperature=0,
                            stop_token_ids=tok.eos_ids)
    assert sampler.stats.prefill_calls == 1
    for i, p in enumerate(prompts):
        ref = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                do_sample=False, max_new_tokens=20, eos_token_id=list(tok.eos_ids),
                                pad_token_id=tok.pad_id)[0, len(p):].tolist()
        for j in range(3):
            assert outs[i * 3 + j].tokens == ref


@pytest.mark.parametrize("device", DEVICES)
def test_cached_logits_equal_full_forward(tiny_model_dir, device):
    model = load(tiny_model_dir, device)
    V = model.config.vocab_size
    prompts = random_prompts([5, 2, 9], V)
    sampler = Sampler(model, max_batch_size=8, max_seq_len=32, device=device, dtype=torch.float32)
    g = 2  # slots 0..5: prompt 0 in slots 0-1, prompt 1 in 2-3, prompt 2 in 4-5
    logits = sampler._prefill(prompts, first_slot=0, g=g)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], full_logits(model, p, [0])[0], atol=1e-4, rtol=1e-4)
    # decode 6 steps, every slot of a group fed different tokens, each row at its own position
    fed = [[] for _ in range(len(prompts) * g)]
    sampler.pos_in[:6] = torch.tensor([len(p) for p in prompts for _ in range(g)])
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        new = torch.randint(3, V, (6,), generator=gen)
        sampler.tok_in[:6] = new
        length = max(len(p) for p in prompts) + step + 1
        logits = sampler._forward(6, length)  # CUDA graphs replay this same function
        for r in range(6):
            fed[r].append(int(new[r]))
            ref = full_logits(model, prompts[r // g], fed[r] + [0])[-1]
            torch.testing.assert_close(logits[r], ref, atol=1e-4, rtol=1e-4)
        sampler.pos_in[:6] += 1


# the decode step's other paths: on CPU the kernel runs in Triton's interpreter (~10 ms a program), so these
# decode few rows for few steps; on CUDA they are the defaults and every test above runs them
@pytest.mark.parametrize("device,decode", [("cpu", "kernel"), ("cpu", "compiled")]
                         + ([("cuda", "sdpa"), ("cuda", "kernel")] if torch.cuda.is_available() else []))
def test_decode_paths_match_hf_generate(tiny_model_dir, hf_model, monkeypatch, device, decode):
    if device == "cpu":
        require_interpreted_triton()
    if device == "cpu" and decode == "compiled":
        # inductor costs ~20 s per graph on CPU. aot_eager gets exactly what inductor would be given (dynamo's
        # capture of the whole step as one graph, dynamic shapes, the kernel's custom op through its fake) and
        # runs it with eager kernels: all but inductor's code generation, which CUDA runs by default
        monkeypatch.setattr(sampler_module, "COMPILE_BACKEND", "aot_eager")
    model = load(tiny_model_dir, device)
    prompts = random_prompts([3, 11], model.config.vocab_size)
    args = dict(group_size=2, max_new_tokens=8, temperature=0)
    sampler = Sampler(model, max_batch_size=4, max_seq_len=24, device=device, dtype=torch.float32, decode=decode)
    assert sampler.decode_kernel  # TRITON_INTERPRET=1 on CPU: the kernel runs in the interpreter
    outs = sampler.generate(prompts, **args)
    plain = Sampler(model, max_batch_size=4, max_seq_len=24, device="cpu", dtype=torch.float32,
                    decode="sdpa").generate(prompts, **args)
    for i, p in enumerate(prompts):
        ref = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)[0, len(p):]
        for o, q in zip(outs[2 * i:2 * i + 2], plain[2 * i:2 * i + 2]):
            assert o.tokens == ref.tolist()
            torch.testing.assert_close(o.logprobs, q.logprobs, atol=1e-4, rtol=1e-4)


def test_prefill_attention_is_causal_without_a_mask(tiny_model_dir, monkeypatch):
    """Prefill gives SDPA no mask but is_causal: a boolean mask (with GQA) sends SDPA to its math kernel, which
    holds (n, heads, P, P) fp32 scores (~2.5 GB a tensor at judge lengths on the 7B); causal attention runs in
    the flash/memory-efficient kernels (plan.py's prefill row counts no scores). The logits stay exact:
    test_cached_logits_equal_full_forward."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = load(tiny_model_dir, "cpu")
    sampler = Sampler(model, max_batch_size=6, max_seq_len=32, device="cpu", dtype=torch.float32)
    sampler._prefill(random_prompts([5, 2, 9], model.config.vocab_size), first_slot=0, g=2)
    assert calls == [(9, True, True)] * model.config.num_hidden_layers


# ----------------------------------------------------------------------------------------------------
# the decode modes, whatever the caller's grad mode

def test_compiled_step_under_grad_mode(tiny_model_dir, monkeypatch, triton_cpu):
    """The compiled step (aot_eager: dynamo and AOTAutograd as on CUDA; the kernel in the interpreter), called
    with grad on and on weights that require grad, as bench.py's decode-floor rows and the step-by-step tests
    call it: it must not trace a backward (ssr::decode_attention has none), its logits equal the eager SDPA
    step's, it writes the cache in place (the CUDA graphs hold its pointer), and no cache becomes an autograd
    non-leaf (the eager paths used to make it one, holding every step's graph)."""
    monkeypatch.setattr(sampler_module, "COMPILE_BACKEND", "aot_eager")
    model = load(tiny_model_dir, "cpu")
    assert all(p.requires_grad for p in model.parameters())
    prompts = random_prompts([5, 2, 9], model.config.vocab_size)
    compiled = Sampler(model, max_batch_size=8, max_seq_len=32, device="cpu", dtype=torch.float32, decode="compiled")
    eager = Sampler(model, max_batch_size=8, max_seq_len=32, device="cpu", dtype=torch.float32, decode="sdpa")
    assert compiled.decode_kernel and not eager.decode_kernel and compiled.model is model
    storage = compiled.cache.k.data_ptr(), compiled.cache.v.data_ptr()
    gen = torch.Generator().manual_seed(1)
    with torch.enable_grad():
        for s in (compiled, eager):
            s._prefill(prompts, first_slot=0, g=2)
            s.pos_in[:6] = torch.tensor([len(p) for p in prompts for _ in range(2)])
        for step in range(3):
            new = torch.randint(3, model.config.vocab_size, (6,), generator=gen)
            length = max(len(p) for p in prompts) + step + 1
            logits = []
            for s in (compiled, eager):
                s.tok_in[:6] = new
                logits.append(s._forward(6, length))
                s.pos_in[:6] += 1
            assert not logits[0].requires_grad
            torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
        eager.generate(prompts, max_new_tokens=3)
    assert (compiled.cache.k.data_ptr(), compiled.cache.v.data_ptr()) == storage
    for s in (compiled, eager):
        assert s.cache.k.grad_fn is None and s.cache.v.grad_fn is None and not s.cache.k.requires_grad


def test_compile_disabled_runs_the_step_uncompiled(tiny_model_dir, capsys):
    """TORCH_COMPILE_DISABLE=1 (dynamo's config.disable) made the fullgraph step raise "found no compiled
    frames"; "compiled" now runs the same step uncompiled, and says so in one line."""
    model = load(tiny_model_dir, "cpu")
    prompts = random_prompts([4, 7], model.config.vocab_size)
    with torch._dynamo.config.patch(disable=True):
        sampler = Sampler(model, max_batch_size=4, max_seq_len=24, device="cpu", dtype=torch.float32,
                          decode="compiled")
        assert capsys.readouterr().out.count("torch.compile is disabled") == 1
        outs = sampler.generate(prompts, group_size=2, max_new_tokens=4, temperature=0)
    plain = Sampler(model, max_batch_size=4, max_seq_len=24, device="cpu", dtype=torch.float32, decode="sdpa")
    assert [o.tokens for o in outs] == [o.tokens for o in plain.generate(prompts, group_size=2, max_new_tokens=4,
                                                                          temperature=0)]


def test_samplers_compile_apart(tiny_model_dir, tmp_path, monkeypatch):
    """Each Sampler compiles its own copy of the decode step. Dynamo keeps entries, and their limit, per code
    object, and with fullgraph a step past the limit fails hard (FailOnRecompileLimitHit): with one shared step,
    a process's samplers (actor, judge, tests, benchmarks) used up its 8 entries together. With the limit at 1,
    two samplers of different models each still compile and run their own."""
    monkeypatch.setattr(sampler_module, "COMPILE_BACKEND", "aot_eager")
    models = [load(tiny_model_dir, "cpu"), load(make_tiny_model(tmp_path / "deeper", num_hidden_layers=3), "cpu")]
    assert models[0].config.num_hidden_layers != 3
    with torch._dynamo.config.patch(recompile_limit=1):
        for model in models:
            sampler = Sampler(model, max_batch_size=4, max_seq_len=16, device="cpu", dtype=torch.float32,
                              decode="compiled")
            sampler.pos_in[:2] = torch.tensor([3, 5])
            assert sampler._forward(2, 8).shape == (2, model.config.vocab_size)


def test_decode_modes(tiny_model_dir, monkeypatch):
    model = load(tiny_model_dir, "cpu")
    auto = Sampler(model, max_batch_size=2, max_seq_len=8, device="cpu", dtype=torch.float32)
    assert auto.decode == "sdpa" and not auto.decode_kernel and not auto.use_graphs  # the CPU default
    assert set(sampler_module.DECODE_MODES) == {"auto", "compiled", "kernel", "sdpa"}
    with pytest.raises(ValueError, match="decode must be one of"):
        Sampler(model, max_batch_size=2, max_seq_len=8, device="cpu", dtype=torch.float32, decode="fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU tensor, no interpreter: Triton cannot run it
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        Sampler(model, max_batch_size=2, max_seq_len=8, device="cpu", dtype=torch.float32, decode="kernel")
    compiled = Sampler(model, max_batch_size=2, max_seq_len=8, device="cpu", dtype=torch.float32, decode="compiled")
    assert not compiled.decode_kernel  # compiled SDPA where the kernel cannot run


def expected_probs(logits, temperature, top_k, top_p):
    """The distribution sampling must follow, written the plain way, in float64."""
    p = (logits.double() / temperature).softmax(-1)
    if top_k:
        p[p < p.topk(top_k).values[-1]] = 0.0
    p /= p.sum()
    keep, mass = torch.zeros_like(p), 0.0
    for t in p.argsort(descending=True).tolist():  # most probable first, until the kept mass reaches top_p
        if mass >= top_p:
            break
        keep[t], mass = 1.0, mass + float(p[t])
    return p * keep / (p * keep).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 12, 0.8)])
def test_sampling_follows_the_truncated_distribution(tiny_model_dir, device, temperature, top_k, top_p):
    model = load(tiny_model_dir, device)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # the tiny model is nearly uniform; make it peaked so cuts matter
    prompt = random_prompts([7], model.config.vocab_size)[0]
    expected = expected_probs(full_logits(model, prompt, [0])[0].cpu(), temperature, top_k, top_p)
    sampler = Sampler(model, max_batch_size=256, max_seq_len=16, device=device, dtype=torch.float32)
    outs = sampler.generate([prompt] * 16, group_size=256, max_new_tokens=1, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=0)
    n = len(outs)
    counts = torch.bincount(torch.tensor([o.tokens[0] for o in outs]), minlength=len(expected)).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the top-k / top-p set, ever
    # Pearson chi-square, bins with fewer than 5 expected samples pooled into one
    e = expected * n
    small = (e > 0) & (e < 5)
    obs = torch.cat([counts[e >= 5], counts[small].sum()[None]])
    exp = torch.cat([e[e >= 5], e[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    assert dof >= 5 and p_value > 1e-3, (chi2, dof, p_value)


# ----------------------------------------------------------------------------------------------------
# exact draws at the Qwen2.5 vocabulary, however prefix sums would round

QWEN_VOCAB = 151_936
DOMINANT = 1000  # one token near the front; every other token gets TAIL of its probability
# just under half an fp32 step of any running sum past the dominant token (2^-24 ~ 5.96e-8): a prefix sum that
# adds one token at a time in fp32 adds nothing for any of them. Together the tail after it holds ~0.8%.
TAIL = 5.5e-8


def sequential_fp32_cumsum(x, dim=-1, **kwargs):
    """A prefix sum the way a device that scans one element at a time in fp32 computes it (numpy's accumulate
    is sequential in the dtype it is given)."""
    out = np.cumsum(x.detach().cpu().numpy().astype(np.float32), axis=dim, dtype=np.float32)
    return torch.from_numpy(out).to(x.device)


@pytest.fixture
def fp32_scans(monkeypatch):
    """Every torch prefix sum accumulates sequentially in fp32 while the test runs."""
    monkeypatch.setattr(torch, "cumsum", sequential_fp32_cumsum)
    monkeypatch.setattr(torch.Tensor, "cumsum", sequential_fp32_cumsum)
    monkeypatch.setattr(torch.Tensor, "cumsum_", lambda self, dim: self.copy_(sequential_fp32_cumsum(self, dim)))


def tail_logits():
    logits = torch.full((QWEN_VOCAB,), math.log(TAIL))
    logits[DOMINANT] = 0.0
    return logits


def test_patched_scan_loses_the_tail(fp32_scans):
    """The condition the next tests run under does break an inverse-CDF sampler: past the dominant token its
    cumulative sum never moves again, so no tail token there could ever be drawn (what sample() did before)."""
    cdf = tail_logits().exp()[None].cumsum_(-1)
    assert cdf[0, -1] == cdf[0, DOMINANT] and cdf[0, DOMINANT] > cdf[0, DOMINANT - 1]


def test_tail_after_a_dominant_token_drawn_at_its_rate(fp32_scans):
    """draw_blocked, the sampler's draw, at V = 151,936 with 40k draws: the tail after the dominant token is
    drawn at its probability (~330 draws), evenly over its ids (the short last block included)."""
    probs = tail_logits().exp()  # (V,) what sample() hands over: exp(logits - max)
    sums = blocked_sums(probs[None])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([draw_blocked(probs.expand(20_000, -1), sums.expand(20_000, -1), gen) for _ in range(2)])
    total = float(probs.double().sum())
    after = (draws > DOMINANT).double()
    p_after = TAIL * (QWEN_VOCAB - DOMINANT - 1) / total
    n = len(draws)
    assert abs(after.sum() - n * p_after) < 5 * math.sqrt(n * p_after * (1 - p_after)), (after.sum(), n * p_after)
    # the tail ids in 8 equal ranges: each drawn as often (chi-square)
    bins = torch.bincount((draws[draws > DOMINANT] - DOMINANT - 1) * 8 // (QWEN_VOCAB - DOMINANT - 1), minlength=8)
    expected = bins.sum() / 8
    chi2 = float(((bins - expected) ** 2 / expected).sum())
    assert float(torch.special.gammaincc(torch.tensor(3.5), torch.tensor(chi2 / 2))) > 1e-3, bins


def test_sample_draws_the_tail_at_qwen_vocab(fp32_scans):
    """The same through sample() itself (exps, temperature, log-probs) on 2,048 rows: ~17 tail draws expected
    where inverse CDF over a sequential fp32 scan draws none."""
    logits = tail_logits() * 0.5  # at temperature 0.5: the same distribution as above
    gen = torch.Generator().manual_seed(1)
    toks, lps = zip(*(sample(logits.expand(256, -1), temperature=0.5, top_p=1.0, top_k=0, generator=gen)
                      for _ in range(8)))
    toks, lps = torch.cat(toks), torch.cat(lps)
    tail = int((toks > DOMINANT).sum())
    assert 3 < tail < 40, tail
    # in fp64: torch's fp32 log_softmax drops part of this tail from its sum (-0.0073 for the dominant token
    # instead of -0.0084); the sampler's block sums do not
    ref = (logits.double() / 0.5).log_softmax(-1).float()
    torch.testing.assert_close(lps, ref[toks])


def test_sample_greedy_and_logprob_definition():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    tok, lp = sample(logits, temperature=0, top_p=1.0, top_k=0)
    assert tok.tolist() == [1, 0]
    torch.testing.assert_close(lp, logits.log_softmax(-1)[[0, 1], [1, 0]])
    tok, lp = sample(logits, temperature=0.5, top_p=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert tok.tolist() == [1, 0]  # top-1 is greedy, but the log-prob stays the untruncated one
    torch.testing.assert_close(lp, (logits / 0.5).log_softmax(-1)[[0, 1], [1, 0]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 10, 0.9), (0, 0, 1.0)])
def test_logprobs_equal_full_forward(tiny_model_dir, device, temperature, top_k, top_p):
    model = load(tiny_model_dir, device)
    prompts = random_prompts([4, 9], model.config.vocab_size)
    sampler = Sampler(model, max_batch_size=6, max_seq_len=40, device=device, dtype=torch.float32)
    outs = sampler.generate(prompts, group_size=3, max_new_tokens=12, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=0)
    for i, o in enumerate(outs):
        logits = full_logits(model, prompts[i // 3], o.tokens)
        ref = (logits / (temperature or 1.0)).log_softmax(-1)  # T=0 reports the plain softmax's log-probs
        ref = ref.gather(-1, torch.tensor(o.tokens, device=device)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(o.logprobs), ref.cpu(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# stops, on a model scripted to write a known text greedily

@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    """A tiny model whose tokenizer has merges ("</", "answer"), so "</answer>" spans several tokens."""
    corpus = ["the answer is </b>\n and </i>\n so", "answer answer ans wer", "</x>\n</y>\n"] * 20
    return make_tiny_model(tmp_path_factory.mktemp("scripted"), corpus=corpus, vocab_size=300)


def scripted(path, device, chain):
    """Load the model and rewrite its weights so that greedy decoding maps chain[i] -> chain[i + 1] (and the
    last token to itself): every layer's output projections are zeroed, so the final hidden state is the
    current token's embedding, a one-hot direction per chain token that the head maps to its successor."""
    model = load(path, device)
    assert len(set(chain)) == len(chain) <= model.config.hidden_size
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for i, t in enumerate(chain):
            model.embed_tokens.weight[t] = torch.nn.functional.one_hot(torch.tensor(i), model.config.hidden_size)
            model.lm_head.weight[chain[min(i + 1, len(chain) - 1)], i] = 10.0
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_stop_string_across_token_boundaries(scripted_dir, device):
    tok = load_tokenizer(scripted_dir)
    text = "ok</answer>\nbye"
    ids = tok.encode(text)
    assert [tok.decode([t]) for t in ids][2:5] == ["</", "answer", ">"]  # the stop string spans 3 tokens
    prompt = tok.encode("Q")
    model = scripted(scripted_dir, device, prompt + ids)
    sampler = Sampler(model, max_batch_size=4, max_seq_len=32, device=device, dtype=torch.float32)

    def run(stops):
        return sampler.generate([prompt], group_size=2, max_new_tokens=len(ids) + 3, temperature=0,
                                stop_strings=stops, tokenizer=tok)

    free = run(())
    assert tok.decode(free[0].tokens).startswith(text) and free[0].finish_reason == "length"
    for o in run(("</answer>",)):
        assert tok.decode(o.tokens) == "ok</answer>" and o.finish_reason == "stop"
        assert len(o.logprobs) == len(o.tokens)
    # a stop string that ends inside a token: the completion ends with that whole token, nothing after it
    o = run(("</ans", "never"))[0]
    assert tok.decode(o.tokens) == "ok</answer" and o.finish_reason == "stop"


def test_stop_string_ending_inside_a_multibyte_character(scripted_dir):
    """A stop string whose last character is split over byte tokens (each decodes to U+FFFD alone) stops the
    row at the token that completes it; an ASCII stop string is never looked for in such tokens."""
    tok = load_tokenizer(scripted_dir)
    ids = tok.encode("ok猫bye")
    pieces = [tok.decode([t]) for t in ids]
    assert pieces.count("\ufffd") >= 2  # the corpus never merged 猫's bytes: it spans several tokens
    prompt = tok.encode("Q")
    model = scripted(scripted_dir, "cpu", prompt + ids)
    sampler = Sampler(model, max_batch_size=2, max_seq_len=32, device="cpu", dtype=torch.float32)
    o = sampler.generate([prompt], max_new_tokens=len(ids) + 2, temperature=0, stop_strings=("猫",), tokenizer=tok)[0]
    assert tok.decode(o.tokens) == "ok猫" and o.finish_reason == "stop"
    o = sampler.generate([prompt], max_new_tokens=len(ids), temperature=0, stop_strings=("</answer>",),
                         tokenizer=tok)[0]
    assert tok.decode(o.tokens) == "ok猫bye" and o.finish_reason == "length"


@pytest.mark.parametrize("device", DEVICES)
def test_eos_stop_is_included(scripted_dir, device):
    tok = load_tokenizer(scripted_dir)
    eos = tok.eos_ids[0]
    prompt = tok.encode("Q")
    model = scripted(scripted_dir, device, prompt + tok.encode("hi") + [eos] + tok.encode("xyz"))
    sampler = Sampler(model, max_batch_size=2, max_seq_len=32, device=device, dtype=torch.float32)
    o = sampler.generate([prompt], max_new_tokens=10, temperature=0, stop_token_ids=tok.eos_ids)[0]
    assert o.tokens == tok.encode("hi") + [eos] and o.finish_reason == "stop"


# ----------------------------------------------------------------------------------------------------
# scheduling: queueing, refill, compaction, prefill counts

@pytest.mark.parametrize("device", DEVICES)
def test_more_prompts_than_slots_with_rows_ending_at_different_times(tiny_model_dir, device):
    model = load(tiny_model_dir, device)
    prompts = random_prompts([3, 8, 5, 1, 12, 6, 4], model.config.vocab_size)
    # reference: everything in one batch, no stops
    big = Sampler(model, max_batch_size=14, max_seq_len=48, device=device, dtype=torch.float32)
    ref = big.generate(prompts, group_size=2, max_new_tokens=24, temperature=0)
    # stop ids taken from the references at different depths, so rows end at different times
    stops = {ref[0].tokens[3], ref[4].tokens[9], ref[9].tokens[14], ref[12].tokens[1]}
    # 5 slots for 7 prompts x 2: a queue, refills into freed slots, and compaction of finished rows
    small = Sampler(model, max_batch_size=5, max_seq_len=48, device=device, dtype=torch.float32)
    outs = small.generate(prompts, group_size=2, max_new_tokens=24, temperature=0, stop_token_ids=stops)
    for o, r in zip(outs, ref):
        cut = next((k + 1 for k, t in enumerate(r.tokens) if t in stops), len(r.tokens))
        assert o.tokens == r.tokens[:cut]
        assert o.finish_reason == ("stop" if cut < len(r.tokens) or r.tokens[-1] in stops else "length")
        torch.testing.assert_close(o.logprobs, r.logprobs[:cut], atol=1e-4, rtol=1e-4)
    assert small.stats.prefill_prompts == len(prompts)  # each prompt prefilled once for its whole group
    assert small.stats.prefill_tokens == sum(map(len, prompts))
    assert small.stats.prefill_calls > 1  # the queue really was drained in several admissions
    assert small.stats.generated_tokens == sum(len(o.tokens) for o in outs)


@pytest.mark.parametrize("device", DEVICES)
def test_length_limits(tiny_model_dir, device):
    model = load(tiny_model_dir, device)
    prompts = random_prompts([10, 3], model.config.vocab_size)
    sampler = Sampler(model, max_batch_size=2, max_seq_len=16, device=device, dtype=torch.float32)
    outs = sampler.generate(prompts, max_new_tokens=8, temperature=1.0, seed=0)
    # prompt + completion never exceeds max_seq_len
    assert [len(o.tokens) for o in outs] == [6, 8] and {o.finish_reason for o in outs} == {"length"}
    with pytest.raises(ValueError):
        sampler.generate([[1] * 16])
    with pytest.raises(ValueError):
        sampler.generate(prompts, group_size=3)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible(tiny_model_dir, device):
    model = load(tiny_model_dir, device)
    prompts = random_prompts([4, 7, 2], model.config.vocab_size)
    sampler = Sampler(model, max_batch_size=6, max_seq_len=40, device=device, dtype=torch.float32)

    def run(seed):
        return sampler.generate(prompts, group_size=2, max_new_tokens=20, temperature=1.0, top_p=0.95, seed=seed)

    a, b, c = run(7), run(7), run(8)
    assert [o.tokens for o in a] == [o.tokens for o in b] and [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]
    assert a[0].tokens != a[1].tokens  # group members draw independently


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_weight_update_is_picked_up(tiny_model_dir, tmp_path, device):
    model = load(tiny_model_dir, device)
    other = load(make_tiny_model(tmp_path / "other", seed=1), device)
    prompts = random_prompts([5, 3], model.config.vocab_size)
    sampler = Sampler(model, max_batch_size=4, max_seq_len=32, device=device, dtype=torch.float32)
    before = sampler.generate(prompts, group_size=2, max_new_tokens=10, temperature=0)  # captures graphs on CUDA
    with torch.no_grad():  # what the trainer does after each update
        for p, q in zip(sampler.model.parameters(), other.parameters()):
            p.copy_(q)
    after = sampler.generate(prompts, group_size=2, max_new_tokens=10, temperature=0)
    fresh = Sampler(other, max_batch_size=4, max_seq_len=32, device=device, dtype=torch.float32)
    expected = fresh.generate(prompts, group_size=2, max_new_tokens=10, temperature=0)
    assert [o.tokens for o in after] == [o.tokens for o in expected] != [o.tokens for o in before]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logprobs_close_to_full_forward(tiny_model_dir, device):
    """The sampler's bf16 copy (what a GPU run samples and judges with; on CPU, --precision bf16): its sampled
    tokens' log-probs and Sampler.score's continuation log-probs (the expected-score judge's pass) stay within bf16
    rounding of the fp32 model's full forward. On CUDA through the compiled step in CUDA graphs."""
    fp32 = load(tiny_model_dir, "cpu")
    sampler = Sampler(fp32, max_batch_size=8, max_seq_len=48, device=device, dtype=torch.bfloat16)
    assert sampler.model is not fp32 and next(sampler.model.parameters()).dtype == torch.bfloat16
    prompts = random_prompts([6, 13], fp32.config.vocab_size)
    outs = sampler.generate(prompts, group_size=4, max_new_tokens=30, temperature=1.0, seed=0)
    assert (sampler.stats.graphs_captured >= 1) == (device == "cuda")
    for i, o in enumerate(outs):
        ref = full_logits(fp32, prompts[i // 4], o.tokens).log_softmax(-1)
        ref = ref.gather(-1, torch.tensor(o.tokens)[:, None])[:, 0]
        assert (torch.tensor(o.logprobs) - ref).abs().max() < 0.05
    continuations = [[7], [7, 8], [10, 11, 12]]
    got = sampler.score(prompts, continuations)
    for i, p in enumerate(prompts):
        for j, c in enumerate(continuations):
            want = full_logits(fp32, p, c).log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).sum()
            assert abs(float(got[i, j]) - float(want)) < 0.05 * len(c), (i, j)


# ----------------------------------------------------------------------------------------------------
# the exact draw's corners

def test_short_last_block_draws_at_the_token_rates():
    """V = 10 in blocks of 4: the last block holds tokens 8 and 9 and two padding slots. All the mass sits there,
    1 : 2. Padding that kept a weight (the clamped column is token 9) would make token 9 win 6 of 7 draws."""
    from sampler import block_size

    V = 10
    assert block_size(V) == 4 and V % 4  # a short last block
    probs = torch.zeros(1, V)
    probs[0, 8], probs[0, 9] = 1.0, 2.0
    n = 30_000
    gen = torch.Generator().manual_seed(0)
    draws = draw_blocked(probs.expand(n, -1), blocked_sums(probs).expand(n, -1), gen)
    counts = torch.bincount(draws, minlength=V) / n
    assert counts[:8].sum() == 0
    assert abs(counts[9].item() - 2 / 3) < 0.015, counts  # sd 0.0027; the bug gives 0.857


def test_race_draws_in_fp64(monkeypatch):
    """White-box: every exponential the draw takes is fp64. On CUDA fp32 exponentials come from 24-bit uniforms,
    on a 2^-24 grid near 0, exactly where a token of relative weight 1e-8 is decided (on CPU torch rounds fp64
    draws, so no frequency measured here could tell). Through sample(), the sampler's own entry point."""
    dtypes = []
    exponential = torch.Tensor.exponential_

    def spy(self, *args, **kwargs):
        dtypes.append(self.dtype)
        return exponential(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "exponential_", spy)
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    sample(logits, temperature=0.7, top_k=0, top_p=1.0, generator=torch.Generator().manual_seed(1))
    assert dtypes and set(dtypes) == {torch.float64}, dtypes


def test_stop_string_completed_by_a_token_that_carries_text_past_it(tmp_path):
    """One stop string, "</answer>", completed by the token ">." (it holds text past the stop string): the
    pre-check must look for the last character anywhere in the token, not only at its end."""
    path = make_tiny_model(tmp_path, corpus=["ok </answer>. and </answer>. so", "answer answer ans wer"] * 20,
                           vocab_size=300)
    tok = load_tokenizer(path)
    ids = tok.encode("ok</answer>. bye")
    pieces = [tok.decode([t]) for t in ids]
    assert ">." in pieces and ">" not in pieces, pieces
    prompt = tok.encode("Q")
    model = scripted(path, "cpu", prompt + ids)
    sampler = Sampler(model, max_batch_size=2, max_seq_len=32, device="cpu", dtype=torch.float32)
    o = sampler.generate([prompt], max_new_tokens=len(ids) + 2, temperature=0, stop_strings=("</answer>",),
                         tokenizer=tok)[0]
    assert tok.decode(o.tokens) == "ok</answer>." and o.finish_reason == "stop"


@pytest.mark.parametrize("device", DEVICES)
def test_per_prompt_seeds_make_samples_independent_of_the_batch(tiny_model_dir, device):
    """seed=[one per prompt]: a prompt's samples depend on its seed alone, not on the other prompts of the call,
    their order or the number of slots (what eval.py needs for outputs that depend only on (seed, row))."""
    model = load(tiny_model_dir, device)
    prompts = random_prompts([4, 7, 2, 5], model.config.vocab_size)
    seeds = [11, 12, 13, 2**63 + 5]

    def run(ps, ss, slots):
        sampler = Sampler(model, max_batch_size=slots, max_seq_len=40, device=device, dtype=torch.float32)
        outs = sampler.generate(ps, group_size=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=ss)
        # log-probs rounded: another batch shape may move the logits by an ulp, never the draws
        return [(o.tokens, [round(lp, 4) for lp in o.logprobs]) for o in outs]

    whole = run(prompts, seeds, 8)
    pairs = [whole[2 * i:2 * i + 2] for i in range(4)]
    for i in range(4):
        assert run([prompts[i]], [seeds[i]], 2) == pairs[i]  # alone
    assert run(prompts[::-1], seeds[::-1], 4) == [o for pair in pairs[::-1] for o in pair]  # reversed, fewer slots
    assert pairs[0][0][0] != pairs[0][1][0]  # group members still draw apart
    other = run(prompts, [21, *seeds[1:]], 8)
    assert other[:2] != whole[:2] and other[2:] == whole[2:]
    with pytest.raises(ValueError):
        run(prompts, seeds[:3], 8)


@pytest.mark.parametrize("device", DEVICES)
def test_score_equals_full_forward_log_probs(tiny_model_dir, device):
    """Sampler.score (prefix prefilled into the cache, continuations as one trie through the model) against the
    log-probs of each whole prefix + continuation from one forward with no cache, torch's log_softmax."""
    model = load(tiny_model_dir, device)
    V = model.config.vocab_size
    prefixes = random_prompts([5, 1, 9, 3, 7], V, seed=3)
    # shared beginnings, a single token, one continuation the prefix of another, a repeated token
    continuations = [[7], [7, 8], [7, 8, 9], [7, 9, 9], [10, 11, 12, 13], [10, 11], [5, 5, 5]]
    sampler = Sampler(model, max_batch_size=2, max_seq_len=16, device=device, dtype=torch.float32)  # 3 chunks
    got = sampler.score(prefixes, continuations)
    assert got.shape == (len(prefixes), len(continuations))
    for i, p in enumerate(prefixes):
        for j, c in enumerate(continuations):
            lp = full_logits(model, p, c).log_softmax(-1)  # (len(c), V)
            want = lp.gather(-1, torch.tensor(c, device=lp.device)[:, None]).sum()
            assert abs(float(got[i, j]) - float(want)) < 1e-5, (i, j)
    with pytest.raises(ValueError):
        sampler.score([[1] * 16], continuations)
