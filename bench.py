"""Benchmarks, each a ratio against a baseline measured in the same run (medians of several repeats).

    python bench.py load      # checkpoint loading: peak memory vs the size of the weights
    python bench.py sampler   # our KV-cached sampler vs HF generate: tokens/s
    python bench.py kernels   # fused log-prob vs naive log_softmax: peak memory and time
    python bench.py step      # one SSR training step: time by phase, rollout tokens/s

Timings never live in tests; this file is where speed and memory claims come from.
"""
import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: the latter survives
    fork+exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# ----------------------------------------------------------------------------------------------------
# load: a checkpoint must sit in memory once, not twice

def _load_child(path: str):
    """Runs in a fresh process: load, then report peak RSS and what the process held before loading."""
    from checkpoint import load_pretrained, make_tiny_model

    # warm up the same code path on a tiny model first: the first tensor ops map in torch's kernel
    # libraries (~100+ MB of code pages), which is not memory the loader holds
    with tempfile.TemporaryDirectory() as tmp:
        load_pretrained(make_tiny_model(tmp), dtype=torch.float32)
    before = peak_rss_bytes()
    model = load_pretrained(path, dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"rss_before": before, "rss_peak": peak_rss_bytes(), "weights": weights}))


def bench_load(args):
    from checkpoint import load_pretrained, make_tiny_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        # ~400 MB of fp32 weights in 4 shards: large next to the interpreter, small enough for CI boxes
        path = make_tiny_model(tmp, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
        save_model(load_pretrained(path), path, max_shard_bytes=120 * 1024**2)
        out = subprocess.run([sys.executable, __file__, "_load_child", str(path)], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["rss_peak"] - r["rss_before"]
    print(f"weights: {r['weights'] / 2**20:.0f} MiB, peak RSS growth while loading: {grown / 2**20:.0f} MiB")
    print(f"load peak memory / weights: {grown / r['weights']:.2f}")


# ----------------------------------------------------------------------------------------------------
# kernels: log-probs of sampled tokens, fused vs naive log_softmax, at the Qwen2.5-0.5B head

KERNEL_SHAPE = (4096, 151_936, 896)  # tokens N, vocabulary V (Qwen2.5), hidden H (Qwen2.5-0.5B)
KERNEL_VARIANTS = ("linear_naive", "linear_fused", "token_naive", "token_fused")


def _kernels_case(variant: str, N: int, V: int, H: int, device: str):
    """One variant's leaf inputs (whose grads the call must return) and its forward, returning (N,) log-probs."""
    import kernels

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU matmuls are fast in fp32 only
    # filled in place: a temporary here would raise the high-water mark the CPU measurement starts from
    new = lambda *shape, std: torch.empty(shape, dtype=dtype, device=device).normal_(0, std).requires_grad_()
    targets = torch.randint(V, (N,), device=device)
    naive = lambda logits: logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    if variant.startswith("linear"):
        hidden, weight = new(N, H, std=1.0), new(V, H, std=H**-0.5)
        if variant == "linear_fused":
            return [hidden, weight], lambda: kernels.linear_token_logprobs(hidden, weight, targets)
        return [hidden, weight], lambda: naive(hidden @ weight.T)
    logits = new(N, V, std=2.0)
    if variant == "token_fused":
        return [logits], lambda: kernels.token_logprobs(logits, targets)
    return [logits], lambda: naive(logits)


def _kernels_child(variant: str, device: str, repeats: int):
    """Runs in a fresh process: peak memory of one forward+backward beyond its inputs and the grads it must
    return, then the median time of `repeats` more."""
    leaves, forward = _kernels_case(variant, 64, 1000, 64, device)
    forward().sum().backward()  # warm-up: maps in torch's kernel libraries, compiles Triton
    leaves, forward = _kernels_case(variant, *KERNEL_SHAPE, device)

    def step():
        for x in leaves:
            x.grad = None
        forward().sum().backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() + sum(x.nbytes for x in leaves)  # inputs + grads to come
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        grads = [torch.zeros_like(x) for x in leaves]  # stand-ins, so the baseline counts the grads too
        base = peak_rss_bytes()
        del grads
        step()
        peak = peak_rss_bytes() - base
    r = {"peak": peak, "time": median_time(step, repeats, warmup=0)}
    if device == "cuda" and variant == "token_fused":
        with torch.no_grad():
            r["fwd_time"] = median_time(forward, repeats)
    print(json.dumps(r))


PEER_SHAPES = [(N, 151_936, H) for H in (896, 3584) for N in (4096, 16384)]  # Qwen2.5 vocab; 0.5B / 7B hidden
PEERS = {"liger": ("liger_kernel", "Liger-Kernel"), "cce": ("cut_cross_entropy", "Cut Cross-Entropy")}


def _peer_forward(variant: str, hidden, weight, targets):
    """(N,) fp32 log-probs of targets from hidden (N, H) and the head weight (V, H), by `variant`."""
    import kernels

    if variant == "ours":
        return kernels.linear_token_logprobs(hidden, weight, targets)
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return -LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets).float()
    if variant.startswith("cce"):
        from cut_cross_entropy import linear_cross_entropy

        # CCE by default skips gradient entries below bf16 resolution ("high"); cce_exact computes them all
        eps = None if variant == "cce_exact" else "high"
        return -linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=eps).float()
    return (hidden @ weight.T).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # naive


def bench_kernel_peers(args):
    """linear_token_logprobs against Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy, each
    asked for per-token outputs (reduction="none"), and the naive path; bf16, forward + backward to hidden and
    weight, on CUDA. One process: CUDA's peak counter resets between cases, unlike a CPU process's RSS."""
    variants = ["ours"]
    for name, (module, what) in PEERS.items():
        if not peer_missing(module, f"{what} in bench.py kernels --peers"):
            variants += ["cce", "cce_exact"] if name == "cce" else [name]
    if args.device != "cuda":
        print("skipped bench.py kernels --peers: it measures CUDA kernels and needs a GPU")
        return
    print(f"{torch.cuda.get_device_name()}, bf16; peak = memory beyond inputs and the grads returned; time = "
          f"forward + backward (median of {args.repeats or 3}); max |logp - ours| on the same inputs")
    print(f"{'N':>6} {'H':>5} {'variant':10} {'time ms':>8} {'peak MiB':>9} {'max |diff|':>10}")
    for N, V, H in PEER_SHAPES:
        gen = torch.Generator("cuda").manual_seed(0)
        hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H**-0.5).requires_grad_()
        targets = torch.randint(V, (N,), device="cuda", generator=gen)
        ours = None
        for variant in variants + ["naive"]:
            def step():
                hidden.grad = weight.grad = None
                out = _peer_forward(variant, hidden, weight, targets)
                out.sum().backward()
                return out.detach()

            out = step()  # warm-up: Triton compiles, autotuning
            ours = out if variant == "ours" else ours
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() + hidden.nbytes + weight.nbytes
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() - base
            t = median_time(step, args.repeats or 3, warmup=0)
            print(f"{N:>6} {H:>5} {variant:10} {t * 1e3:8.1f} {peak / 2**20:9.0f} "
                  f"{(out - ours).abs().max().item():10.2e}", flush=True)
        del hidden, weight
        torch.cuda.empty_cache()


def bench_kernels(args):
    if args.peers:
        return bench_kernel_peers(args)
    N, V, H = KERNEL_SHAPE
    print(f"N={N} tokens, V={V}, H={H}, {'bf16' if args.device == 'cuda' else 'fp32'} on {args.device}; "
          f"peak = memory beyond the inputs and the grads returned; time = forward+backward")
    repeats = args.repeats or (3 if args.device == "cuda" else 1)
    r = {}
    for variant in KERNEL_VARIANTS:  # each in a fresh process: peak memory is a per-process high-water mark
        out = subprocess.run([sys.executable, __file__, "_kernels_child", variant, args.device, str(repeats)],
                             capture_output=True, text=True, check=True)
        v = r[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:13s} peak {v['peak'] / 2**20:8.0f} MiB   time {v['time'] * 1e3:8.1f} ms", flush=True)
    if args.device == "cuda":
        # the logits kernels are memory-bound: forward reads the (N, V) bf16 logits once; forward+backward
        # reads them twice and writes their gradient once
        name = torch.cuda.get_device_name()
        hbm = args.hbm_gbps or (3350 if "H100" in name else 4800)
        fwd = N * V * 2 / r["token_fused"]["fwd_time"] / 1e9
        both = 3 * N * V * 2 / r["token_fused"]["time"] / 1e9
        print(f"Triton token_logprobs on {name}: forward {fwd:.0f} GB/s ({fwd / hbm:.0%} of {hbm:.0f} GB/s HBM "
              f"peak), forward+backward {both:.0f} GB/s ({both / hbm:.0%})")
    ratio = lambda path, key: r[f"{path}_naive"][key] / r[f"{path}_fused"][key]
    print(f"token_logprobs naive/fused time: {ratio('token', 'time'):.2f}, "
          f"peak memory: {ratio('token', 'peak'):.2f}")
    print(f"linear_token_logprobs naive/fused time: {ratio('linear', 'time'):.2f}")
    # the headline is the linear path: it is what training uses
    print(f"log-prob naive/fused peak memory: {ratio('linear', 'peak'):.2f}")


# ----------------------------------------------------------------------------------------------------
# sampler: our KV-cached sampler vs HF generate, same random weights, same prompts, same token count

# random-weight models shaped like the ones we train; "cpu" is small enough for a 2-core box
SAMPLER_PRESETS = {
    "cpu": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=32768, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False),
}


def random_model(cfg, device, dtype):
    """Our Transformer with seeded random weights, built directly on the device (a 7B never touches disk)."""
    from model import empty_model

    model = empty_model(cfg, device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def hf_twin(model):
    """transformers' model for our config, holding the very same weight tensors (no copy, no disk)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from checkpoint import config_to_hf, hf_name, write_json

    with tempfile.TemporaryDirectory() as tmp:  # HF reads our config.json the way it reads a checkpoint's
        write_json(Path(tmp) / "config.json", config_to_hf(model.config))
        config = AutoConfig.from_pretrained(tmp)
    p = next(model.parameters())
    with torch.device(p.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=p.dtype)
    # assign=True: HF's parameters become our tensors (a tied head is the embedding under both names)
    hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, assign=True)
    return hf.eval()


def bench_sampler(args):
    from model import ModelConfig
    from sampler import Sampler

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("cpu" if device.type == "cpu" else "0.5b")
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    cfg = ModelConfig(arch="qwen2", rope_theta=1e6, torch_dtype=str(dtype).removeprefix("torch."),
                      **SAMPLER_PRESETS[preset])
    model = random_model(cfg, device, dtype)
    hf = hf_twin(model)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{torch.get_num_threads()} threads, {dtype}")
    print(f"model ({preset}, random weights): {cfg}")
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M")

    n_prompts, group, new = args.prompts, args.group, args.new_tokens
    lo, hi = 96, 160  # our MT prompts: the R1 template (~95 tokens) + one source sentence
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (), generator=gen)),),
                             generator=gen).tolist() for _ in range(n_prompts)]
    print(f"workload: {n_prompts} prompts ({lo}-{hi} tokens) x group {group}, {new} new tokens each, "
          f"temperature 1.0, no stops")
    tokens = n_prompts * group * new

    sampler = Sampler(model, max_batch_size=n_prompts * group, max_seq_len=hi + new, device=device, dtype=dtype)

    def ours(max_new=new):
        outs = sampler.generate(prompts, group_size=group, max_new_tokens=max_new, temperature=1.0, seed=0)
        assert sum(len(o.tokens) for o in outs) == n_prompts * group * max_new

    # HF: left padding + attention mask, the documented way to batch prompts of different lengths
    P = max(map(len, prompts))
    ids = torch.zeros(n_prompts, P, dtype=torch.long)
    attn = torch.zeros(n_prompts, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], attn[i, P - len(p):] = torch.tensor(p), 1

    def theirs():
        out = hf.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                          temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new, num_return_sequences=group,
                          eos_token_id=None, pad_token_id=0)
        assert out.shape == (n_prompts * group, P + new)  # no row stopped early: same token count as ours

    ours(), theirs()  # warm-up: CUDA graph capture, allocator, first-call costs
    times = [(median_time(ours, 1, warmup=0), median_time(theirs, 1, warmup=0)) for _ in range(args.repeats)]
    t_ours, t_hf = (statistics.median(t) for t in zip(*times))  # interleaved: a shared box's load hits both
    print(f"ours: {t_ours:.3f} s, {tokens / t_ours:.0f} tokens/s  ({sampler.stats.graphs_captured} CUDA graphs)")
    print(f"HF generate: {t_hf:.3f} s, {tokens / t_hf:.0f} tokens/s")

    if device.type == "cuda":
        print(f"CUDA graph capture of the decode step (torch.compile included, outside every timing above): "
              f"{sampler.stats.capture_seconds:.1f} s for {sampler.stats.graphs_captured} graphs")

    # continuous batching (freed slots refilled from the queue) vs static batches (one call per slots-full of
    # prompts: finished rows only leave the batch): 4x the work that fits, rows ending at random lengths
    stop_ids = torch.randperm(cfg.vocab_size, generator=gen)[: cfg.vocab_size // 100].tolist()  # ~1% per step
    many = prompts * 4
    static = [many[i:i + n_prompts] for i in range(0, len(many), n_prompts)]

    def run(batches):
        st = sampler.stats
        before = st.decode_steps, st.decode_rows, st.generated_tokens
        t0 = time.perf_counter()
        outs = [o for b in batches for o in sampler.generate(b, group_size=group, max_new_tokens=new,
                                                              stop_token_ids=stop_ids, seed=1)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
        steps, rows, toks = (a - b for a, b in zip((st.decode_steps, st.decode_rows, st.generated_tokens), before))
        return outs, toks / t, steps, rows / toks

    if device.type == "cuda":
        run([many]), run(static)  # warm-up: the CUDA graphs of every batch size these runs reach
    _, tps_cont, steps_cont, rows_cont = run([many])
    outs, tps_stat, steps_stat, rows_stat = run(static)
    # without compaction a static batch would compute every slot until its longest row ends
    slots = n_prompts * group
    rows_nocompact = sum(slots * (max(len(o.tokens) for o in outs[i:i + slots]) - 1)  # first token: prefill
                         for i in range(0, len(outs), slots))
    rows_nocompact /= sum(len(o.tokens) for o in outs)
    print(f"rows ending at random (~1%/token stop ids), {len(many)} prompts x group {group} through {slots} slots:")
    print(f"  continuous batching: {tps_cont:.0f} tokens/s, {steps_cont} decode steps, {rows_cont:.2f} rows "
          f"computed per token")
    print(f"  static batches:      {tps_stat:.0f} tokens/s, {steps_stat} decode steps, {rows_stat:.2f} rows "
          f"computed per token (without compaction: {rows_nocompact:.2f})")
    print(f"continuous/static tokens_per_s ratio: {tps_cont / tps_stat:.2f}")
    if device.type == "cuda":
        del sampler
        bench_decode_floor(model, args)
    print(f"sampler/hf_generate tokens_per_s ratio: {t_hf / t_ours:.2f}")


DECODE_PATHS = {"SDPA + mask (eager)": "sdpa", "kernel (eager)": "kernel",
                "compiled + graphs": "compiled"}  # Sampler's decode modes; the last is the CUDA default


def bench_decode_floor(model, args, rows: int = 64):
    """One decode step of `rows` rows, each at its own length around 512 and 2,048 live positions, against the
    bandwidth floor: (weight bytes + every row's live K/V bytes) / HBM bandwidth, nothing else counted. Per
    decode mode: the forward alone (the CUDA graph's replay, for "compiled") and the whole step (forward + sampling
    + the host sync every 16 steps), each over 16 steps from the same start; capture and compilation are done
    before. The sampler runs them under no_grad whatever the caller's grad mode."""
    from sampler import CUDA_SYNC_EVERY, Sampler

    cfg, p = model.config, next(model.parameters())
    item, steps = p.element_size(), CUDA_SYNC_EVERY
    # the embedding is read a row per token, the rest whole; a tied head reads the embedding as the head
    weights = sum(q.numel() for q in model.parameters()) * item - (
        0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * item)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * item
    hbm = args.hbm_gbps or (3350 if "H100" in torch.cuda.get_device_name() else 4800)  # datasheet GB/s
    gen = torch.Generator().manual_seed(0)
    for live in (512, 2048):
        lengths = live + torch.randint(-live // 8, live // 8 + 1, (rows,), generator=gen)  # each row its own
        kv = (lengths.sum().item() + rows * (steps - 1) / 2) * kv_per_token  # mean over the 16 steps
        floor = (weights + kv) / (hbm * 1e9)
        print(f"decode step, {rows} rows of {int(lengths.min())}-{int(lengths.max())} live positions: floor = "
              f"weights {weights / 1e9:.2f} GB + live KV {kv / 1e9:.2f} GB at {hbm:.0f} GB/s = {floor * 1e3:.3f} ms")
        for name, decode in DECODE_PATHS.items():
            sampler = Sampler(model, rows, int(lengths.max()) + steps + 1, p.device, p.dtype, decode=decode)
            settings = dict(temperature=1.0, top_p=1.0, top_k=0, generator=None)
            length = int(lengths.max())

            def run(forward_only: bool):
                sampler.pos_in[:rows] = (lengths - 1).to(p.device)  # row i attends over lengths[i] keys
                forward = sampler._graph if sampler.use_graphs else sampler._forward
                if forward_only:
                    for s in range(steps):
                        forward(rows, length + steps - 1)
                        sampler.pos_in[:rows] += 1
                else:
                    sampler._decode(rows, steps, length, settings)

            run(False)  # capture (and compile) the graph these steps use
            t_graph = median_time(lambda: run(True), args.repeats) / steps
            t_step = median_time(lambda: run(False), args.repeats) / steps
            # (torch.compile runs once per process and shape family: the sampler above already paid it)
            print(f"  {name:19s} forward {t_graph * 1e3:7.3f} ms ({t_graph / floor:5.2f}x floor), whole step "
                  f"{t_step * 1e3:7.3f} ms ({t_step / floor:5.2f}x floor); capture {sampler.stats.capture_seconds:.1f} s",
                  flush=True)
            del sampler
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# update: the trainer's forward + backward, ours against HF transformers' Qwen2 on the same weights

def bench_update(args):
    """Tokens/s of forward + backward of the per-token log-probs (the policy-gradient forward), with and without
    activation checkpointing: our Transformer with its fused head vs transformers' Qwen2ForCausalLM (full
    logits, then log_softmax + gather) holding the very same weight tensors. On CUDA also as MFU."""
    from model import ModelConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("cpu" if device.type == "cpu" else "0.5b")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T = args.batch or (2 if device.type == "cpu" else 8), args.seq or (64 if device.type == "cpu" else 1024)
    cfg = ModelConfig(arch="qwen2", rope_theta=1e6, torch_dtype=str(dtype).removeprefix("torch."),
                      **SAMPLER_PRESETS[preset])
    model = random_model(cfg, device, dtype).train()
    hf = hf_twin(model).train()
    ids = torch.randint(cfg.vocab_size, (B, T), device=device, generator=torch.Generator(device).manual_seed(0))
    targets = ids.roll(-1, 1)

    def ours():
        model.zero_grad(set_to_none=True)
        model(ids, targets=targets).sum().backward()

    def theirs():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=ids, use_cache=False).logits
        logits.float().log_softmax(-1).gather(-1, targets[..., None]).sum().backward()

    # model FLOPs per token (PaLM's count): 6 x matmul parameters (the head once, the embedding not: a lookup)
    # + 12 x layers x attention width x sequence length; recomputation under checkpointing is not counted
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    if cfg.tie_word_embeddings:
        matmul_params += cfg.vocab_size * cfg.hidden_size
    flops = 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (989.0 if any(g in name for g in ("H100", "H200")) else None)  # dense bf16
    print(f"{name}, {dtype}, model {preset} ({matmul_params / 1e6:.0f} M matmul params), batch {B} x {T} tokens; "
          f"median of {args.repeats} after a warm-up" + (f"; MFU against {peak:.0f} TFLOPS" if peak else ""))
    tps = {}
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        (hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}) if ckpt
         else hf.gradient_checkpointing_disable())
        for who, fn in (("ours", ours), ("HF", theirs)):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t = median_time(fn, args.repeats)
            tps[who, ckpt] = B * T / t
            mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
            mfu = f", MFU {tps[who, ckpt] * flops / (peak * 1e12):.1%}" if peak else ""
            print(f"{who:4s} checkpointing {'on ' if ckpt else 'off'}: {tps[who, ckpt]:9.0f} tokens/s{mfu}{mem}",
                  flush=True)
    for ckpt in (False, True):
        print(f"ours/hf update tokens_per_s ratio, checkpointing {'on' if ckpt else 'off'}: "
              f"{tps['ours', ckpt] / tps['HF', ckpt]:.2f}")


# ----------------------------------------------------------------------------------------------------
# step: one SSR training step, time by phase

def bench_step(args):
    """Real steps of ssr.py's loop (sample -> judge -> reward -> update -> weight sync) on a random model
    with the smoke tokenizer; the first step is warm-up (CUDA graphs, allocator), the rest are reported.
    A random model never writes a well-formed answer, so its judge phase is empty: on a real model the
    judge costs one more (greedy) sampling pass over the well-formed rollouts."""
    import ssr

    cuda = torch.cuda.is_available()
    # CPU: the smoke model; CUDA: a Qwen2.5-0.5B-shaped body (the tokenizer, hence the vocab, stays small)
    dims = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2) if cuda else {}
    sizes = (["--prompts-per-step", 64, "--group-size", 8, "--max-new-tokens", 256, "--micro-batch-size", 32,
              "--sampler-batch-size", 512] if cuda else
             ["--prompts-per-step", 8, "--group-size", 8, "--max-new-tokens", 24, "--micro-batch-size", 32])
    with tempfile.TemporaryDirectory() as tmp:
        path = ssr.make_smoke_model(os.path.join(tmp, "model"), "data/sample.jsonl", **dims)
        flags = ["--model", path, "--out-dir", os.path.join(tmp, "out"), "--steps", args.steps, "--lr", 1e-5,
                 "--reward", "judge:letter_share_reward", "--save-every", 10**9, *sizes]
        cfg = ssr.parse_args([str(x) for x in flags])
        ssr.train(cfg)
        records = [json.loads(line) for line in open(os.path.join(tmp, "out", "metrics.jsonl"))][1:]
    med = {k: statistics.median(r[k] for r in records)
           for k in ("sec_sample", "sec_judge", "sec_update", "sec_step", "rollout_tokens_per_s")}
    tokens = statistics.median(r["response_len_mean"] for r in records) * cfg.prompts_per_step * cfg.group_size
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; median of {len(records)} steps after warm-up")
    print(f"step {med['sec_step']:.2f} s = sample {med['sec_sample']:.2f} + judge {med['sec_judge']:.2f} "
          f"+ update {med['sec_update']:.2f} (+ logging/sync rest)")
    print(f"rollout tokens/step {tokens:.0f}; sampling {med['rollout_tokens_per_s']:.0f} tokens/s; "
          f"seconds per rollout token: {med['sec_step'] / tokens * 1e3:.3f} ms")


# ----------------------------------------------------------------------------------------------------
# peers: bench-only dependencies (requirements-bench.txt), each skipped with a line when missing

def peer_missing(module: str, what: str) -> bool:
    try:
        __import__(module)
        return False
    except ImportError:
        print(f"skipped {what}: `{module}` is not installed (pip install -r requirements-bench.txt; without a "
              f"registry, from wheels: see BENCHMARKS.md)")
        return True


# ----------------------------------------------------------------------------------------------------
# trl: one full GRPO step of ours against TRL's GRPOTrainer on the same CPU work

def bench_trl(args):
    """The smoke run's work (8 prompts x 8, 24 new tokens, the smoke model, the letter-share reward, AdamW
    lr 3e-3, clip 0.2, no KL, token-mean loss, group-std advantages) as a step of ssr.py's own loop and as a
    step of TRL's GRPOTrainer with its HF `generate` rollouts, from the same HF checkpoint directory. Rounds
    alternate between the two so that the load of a shared box falls on both; each round's first step is
    warm-up. A step is timed from its start to the optimizer step's end (TRL: on_step_begin to on_step_end)."""
    if peer_missing("trl", "bench.py trl"):
        return
    if args.threads:
        # On a shared box two threads per process oversubscribe the cores, and every parallel region then waits
        # for a descheduled thread: a step of many small ops (ours) slows down far more than one of few big
        # ones. One thread each measures the work, not the scheduler.
        torch.set_num_threads(args.threads)
    import warnings

    import transformers

    import ssr

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()  # TRL's config notes, once per round
    with tempfile.TemporaryDirectory() as tmp:
        path = str(ssr.make_smoke_model(os.path.join(tmp, "model"), "data/sample.jsonl"))
        flags = ["--preset", "smoke", "--model", path, "--w-self", 0, "--steps", args.steps + 1,
                 "--save-every", 10**9]
        ours, theirs = [], []
        for r in range(args.rounds):
            cfg = ssr.parse_args([str(x) for x in flags + ["--out-dir", os.path.join(tmp, f"ours{r}")]])
            ours += _ours_steps(cfg)
            theirs += _trl_steps(cfg, path, os.path.join(tmp, f"trl{r}"))
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    import trl

    print(f"work: {cfg.prompts_per_step} prompts x {cfg.group_size}, up to {cfg.max_new_tokens} new tokens, smoke "
          f"model, letter-share reward; {torch.get_num_threads()} threads; median of {len(ours)} steps each "
          f"({args.rounds} rounds of {args.steps} after a warm-up step, alternating)")
    print(f"ours: {med(ours, 'step'):.3f} s/step (sample {med(ours, 'sample'):.3f}, update + sync "
          f"{med(ours, 'update'):.3f}), {med(ours, 'tokens'):.0f} completion tokens")
    print(f"TRL {trl.__version__} GRPOTrainer: {med(theirs, 'step'):.3f} s/step (generate "
          f"{med(theirs, 'generate'):.3f}), {med(theirs, 'tokens'):.0f} completion tokens")
    print(f"ssr/trl step time ratio: {med(theirs, 'step') / med(ours, 'step'):.2f}")


def _ours_steps(cfg) -> list[dict]:
    """ssr.train for cfg.steps steps; each step after the first as {step, sample, update, tokens} seconds."""
    import ssr

    with contextlib.redirect_stdout(io.StringIO()):
        ssr.train(cfg)
    records = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))][1:]
    return [{"step": r["sec_step"], "sample": r["sec_sample"], "update": r["sec_update"],
             "tokens": r["response_len_mean"] * cfg.prompts_per_step * cfg.group_size} for r in records]


def _trl_steps(cfg, model_path: str, out_dir: str) -> list[dict]:
    """TRL's GRPOTrainer on cfg's work for cfg.steps optimizer steps; each step after the first as
    {step, generate, tokens}."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import judge
    import ssr

    rows, _ = ssr.load_data(cfg.data)
    prompts = [judge.actor_prompt(r["src"], r["src_lang"], r["tgt_lang"], cfg.template) for r in rows]

    def letter_share(completions, **_):  # judge.letter_share_reward on the decoded completions
        return [c.count("e") / max(1, len(c)) for c in completions]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.steps, self.t0, self.generate = [], 0.0, 0.0

        def on_step_begin(self, *a, **k):
            self.t0, self.generate = time.perf_counter(), 0.0

        def on_step_end(self, *a, **k):
            self.steps.append({"step": time.perf_counter() - self.t0, "generate": self.generate})

        def on_log(self, *a, logs=None, **k):  # after on_step_end: the step's mean completion length
            if "completions/mean_length" in logs:  # (not in the end-of-training summary)
                self.steps[-1]["tokens"] = logs["completions/mean_length"] * cfg.prompts_per_step * cfg.group_size

    config = GRPOConfig(
        output_dir=out_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
        gradient_accumulation_steps=1, num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, learning_rate=cfg.lr, lr_scheduler_type="constant",
        weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch", epsilon=cfg.clip_low, epsilon_high=cfg.clip_high, beta=cfg.kl_beta, loss_type="dapo",
        scale_rewards="group", use_cpu=True, bf16=False, gradient_checkpointing=cfg.grad_checkpointing,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    timer = StepTimes()
    generate = model.generate

    def timed_generate(*a, **k):  # how much of TRL's step is its rollouts
        t0 = time.perf_counter()
        out = generate(*a, **k)
        timer.generate += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    trainer = GRPOTrainer(model=model, reward_funcs=letter_share, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[timer])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return timer.steps[1:]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like ssr.py and eval.py, not a usage block
        print(f"bench: error: {message}", file=sys.stderr)
        sys.exit(2)


def at_least(least: int):
    """An argparse type: an integer >= least (a size of 0 or below would fail deep inside a benchmark)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {least}")
        return value
    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number > 0 (a peak to divide by)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{value}: must be a finite number > 0")
    return value


def main():
    count = at_least(1)
    parser = Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("load", help="checkpoint loading peak memory")
    child = sub.add_parser("_load_child")  # internal: the measured process of `load`
    child.add_argument("path")
    k = sub.add_parser("kernels", help="fused log-prob vs naive log_softmax: peak memory and time")
    k.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    k.add_argument("--repeats", type=count, help="timed runs per variant (default: 3 on CUDA, 1 on CPU: slow there)")
    k.add_argument("--hbm-gbps", type=positive, help="HBM peak for the bandwidth share (default: by GPU name)")
    k.add_argument("--peers", action="store_true", help="GPU: against Liger-Kernel and Cut Cross-Entropy instead")
    child = sub.add_parser("_kernels_child")  # internal: the measured process of one `kernels` variant
    child.add_argument("variant", choices=KERNEL_VARIANTS)
    child.add_argument("device")
    child.add_argument("repeats", type=int)
    sp = sub.add_parser("sampler", help="our sampler vs HF generate: tokens/s (GPU: decode step vs HBM floor)")
    sp.add_argument("--device", help="default: cuda if available, else cpu")
    sp.add_argument("--preset", choices=SAMPLER_PRESETS, help="model shape (default: cpu on CPU, 0.5b on CUDA)")
    sp.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    sp.add_argument("--prompts", type=count, default=16)
    sp.add_argument("--group", type=count, default=4)
    sp.add_argument("--new-tokens", type=count, default=128)
    sp.add_argument("--repeats", type=count, default=3, help="timed runs (the median is reported)")
    sp.add_argument("--hbm-gbps", type=positive, help="HBM peak for the decode floor (default: by GPU name)")
    st = sub.add_parser("step", help="ssr.py training steps: time by phase, tokens/s")
    st.add_argument("--steps", type=at_least(2), default=4, help="steps to run; the first is warm-up")
    up = sub.add_parser("update", help="forward+backward tokens/s, ours vs HF's Qwen2 (GPU: MFU)")
    up.add_argument("--device", help="default: cuda if available, else cpu")
    up.add_argument("--preset", choices=SAMPLER_PRESETS, help="model shape (default: cpu on CPU, 0.5b on CUDA)")
    up.add_argument("--batch", type=count, help="sequences (default: 2 on CPU, 8 on CUDA)")
    up.add_argument("--seq", type=count, help="tokens per sequence (default: 64 on CPU, 1024 on CUDA)")
    up.add_argument("--repeats", type=count, default=3)
    up.add_argument("--peak-tflops", type=positive, help="dense bf16 peak for MFU (default: 989 on H100/H200)")
    tr = sub.add_parser("trl", help="one GRPO step of ours vs TRL's GRPOTrainer on the same CPU work")
    tr.add_argument("--steps", type=count, default=4, help="timed steps per round (after one warm-up step)")
    tr.add_argument("--rounds", type=count, default=3, help="rounds, alternating ours and TRL")
    tr.add_argument("--threads", type=count, help="torch threads for both (default: torch's, one per core)")
    args = parser.parse_args()
    if args.what == "_load_child":
        return _load_child(args.path)
    if args.what == "_kernels_child":
        return _kernels_child(args.variant, args.device, args.repeats)
    {"load": bench_load, "kernels": bench_kernels, "sampler": bench_sampler, "step": bench_step,
     "trl": bench_trl, "update": bench_update}[args.what](args)


if __name__ == "__main__":
    main()
