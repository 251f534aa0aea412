"""The sampler's GPU core checks, one subcommand each. Each prints `PASS <name>: <figure>` or `FAIL <name>: <figure>`
and exits 1 on a FAIL; scripts/gpu_checks.sh runs them on a GPU, and `--cpu` runs the same steps here:

    python scripts/gpu_check.py decode [--cpu]  # the 7B decode shape: the compiled step (CUDA graphs on CUDA)
                                                # with the Triton kernel against eager SDPA, several buckets
    python scripts/gpu_check.py graphs [--cpu]  # compiled graphs over the 7B preset's bucket grid <= GRAPH_BUDGET,
                                                # then the grid again with no recompile allowed
    python scripts/gpu_check.py memory [--cpu]  # a sampler with the 7B preset's cache: peak allocated vs plan.py

--cpu: CPU tensors through the same code: the kernel in Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported), torch.compile with aot_eager (dynamo and AOTAutograd as on CUDA, no code generation),
2 layers and narrow MLP/vocab but the 7B attention shape (28 query heads on 4 key heads, head_dim 128, bf16), and
for `decode` the split plan of a 132-SM GPU, so that long rows split and the merge kernel runs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# what the 7B decode shape is: Qwen2.5-7B's attention (GQA 7) and, on GPU, its widths
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
GPU_WIDTHS = dict(hidden_size=3584, intermediate_size=18944, vocab_size=152064)
CPU_WIDTHS = dict(hidden_size=256, intermediate_size=512, vocab_size=512)
GPU_SMS_ON_CPU = 132  # an H100's SMs: the split plan --cpu uses
# Unique compiled graphs of one sampler over any bucket grid: dynamic=True specializes sizes 0 and 1, so batch 1
# gets its own graph and every other batch and every length share one (measured on CPU with aot_eager: 2)
GRAPH_BUDGET = 2
DECODE_TOL = 0.02  # max |logits difference| / max |logits|: two bf16 paths round apart by ~0.006 (--cpu)


def report(name: str, ok: bool, figure: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)
    return ok


def setup(cpu: bool):
    """The run's environment, set before any check imports torch or the kernels: returns (device, dtype)."""
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels.decode_attention is imported
    import torch

    import sampler

    if cpu:
        sampler.COMPILE_BACKEND = "aot_eager"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --cpu")
    return torch.device("cpu" if cpu else "cuda"), torch.bfloat16


def random_model(cfg, device, dtype, seed: int = 0):
    """Random weights scaled so that activations stay near unit size through the layers (logits ~1, attention
    scores spread over many keys): a real test of the attention, unlike near-zero default inits."""
    import torch

    from model import empty_model

    model = empty_model(cfg, device, dtype)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 2:
                p.normal_(0, 1.0 if name == "embed_tokens.weight" else p.shape[1] ** -0.5, generator=gen)
            else:
                p.normal_(0, 0.1, generator=gen)
    return model


def preset_7b():
    """The 7B preset's config (ssr.Config): the slot count and cache length its samplers use on 8 ranks."""
    import ssr

    return ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "Qwen2.5-7B"])


def check_decode(cpu: bool, device, dtype) -> bool:
    """Compiled step + kernel (graphs on CUDA) against the eager SDPA step, the same weights and the same cache
    contents, at several (rows, length) buckets: every row at its own random length, long ones in many splits."""
    import torch

    from kernels import decode_attention
    from model import ModelConfig
    from sampler import Sampler

    if cpu:  # plan splits as a 132-SM GPU does, so that long rows split and the merge kernel runs
        decode_attention.sm_count = lambda device: GPU_SMS_ON_CPU
    cfg = ModelConfig(arch="qwen2", num_hidden_layers=2 if cpu else 4, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, **(CPU_WIDTHS if cpu else GPU_WIDTHS))
    model = random_model(cfg, device, dtype)
    slots, positions = 8 if cpu else 64, 2432  # the 7B preset's 2432 positions; --cpu: fewer slots (memory)
    buckets = [(1, 2432), (3, 700), (2, 40)] if cpu else [(1, 2432), (7, 1000), (16, 512), (64, 2432),
                                                                    (64, 256), (33, 1800)]
    fast = Sampler(model, slots, positions, device, dtype, decode="compiled")
    eager = Sampler(model, slots, positions, device, dtype, decode="sdpa")
    gen = torch.Generator(device).manual_seed(1)
    fast.cache.k.normal_(generator=gen)
    fast.cache.v.normal_(generator=gen)
    ok = fast.decode_kernel and fast.use_graphs == (not cpu)
    worst = 0.0
    for b, length in buckets:
        eager.cache.k.copy_(fast.cache.k)  # the same keys for both, the steps before included
        eager.cache.v.copy_(fast.cache.v)
        pos = torch.randint(0, length, (b,), device=device, generator=gen)
        pos[0] = length - 1  # the longest row fills the bucket
        tok = torch.randint(cfg.vocab_size, (b,), device=device, generator=gen)
        for s in (fast, eager):
            s.pos_in[:b], s.tok_in[:b] = pos, tok
        t0 = time.perf_counter()
        got = (fast._graph(b, length) if fast.use_graphs else fast._forward(b, length))[:b]
        want = eager._forward(b, length)
        err = float((got - want).abs().max() / want.abs().max())
        worst = max(worst, err)
        splits = decode_attention.plan_splits(b, KV_HEADS, length, device)
        ok &= report(f"decode {b} rows x {length}", err <= DECODE_TOL,
                     f"max |diff| / max |logits| = {err:.4f} (tol {DECODE_TOL}), {splits} splits, "
                     f"{time.perf_counter() - t0:.1f} s")
    return report("decode", ok, f"compiled{' + graphs' if fast.use_graphs else ''} + kernel vs eager SDPA over "
                                f"{len(buckets)} buckets, worst {worst:.4f}")


def check_graphs(cpu: bool, device, dtype, grid_size: tuple[int, int] | None = None) -> bool:
    """Every (batch bucket, length bucket) the 7B preset's sampler can run, on a 1-layer model with the same
    bucket logic: unique compiled graphs <= GRAPH_BUDGET; then the grid again, where a recompile is an error.
    grid_size=(slots, positions) runs a smaller grid through the same code (the test suite's twin)."""
    import torch
    from torch._dynamo.utils import counters

    from model import ModelConfig
    from plan import cache_positions, sampler_slots
    from sampler import GRAPH_LEN_STEP, Sampler, batch_buckets

    c = preset_7b()
    slots, positions = grid_size or (sampler_slots(c, 8), cache_positions(c))
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    sampler = Sampler(random_model(cfg, device, dtype), slots, positions, device, dtype, decode="compiled")
    lengths = [min(k * GRAPH_LEN_STEP, positions) for k in range(1, math.ceil(positions / GRAPH_LEN_STEP) + 1)]
    grid = [(b, L) for b in batch_buckets(slots) for L in lengths]
    sampler.pos_in.zero_()  # one live key a row: the guards are under test here, not the kernel's work
    counters.clear()
    t0 = time.perf_counter()
    for b, L in grid:
        sampler._graph(b, L) if sampler.use_graphs else sampler._forward(b, L)
    graphs = counters["stats"]["unique_graphs"]
    ok = report("graphs", graphs <= GRAPH_BUDGET,
                f"{graphs} unique compiled graphs over {len(grid)} buckets ({len(batch_buckets(slots))} batch x "
                f"{len(lengths)} length, {slots} slots x {positions} positions), budget {GRAPH_BUDGET}, "
                f"{time.perf_counter() - t0:.0f} s")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for b, L in grid:
                sampler._forward(b, L)
        recompiled = ""
    except Exception as e:  # dynamo's RecompileError, wrapped or not
        recompiled = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return report("graphs: no recompile on a second pass", not recompiled, recompiled or "none") and ok


def check_memory(cpu: bool, device, dtype) -> bool:
    """The 7B preset's sampler (64 slots x 2432 positions of Qwen2.5-7B's K/V, bf16): its cache against plan.py's
    row, and on CUDA the peak allocated through a full-budget prefill and decode steps against the plan's
    sampler rows (weights, cache, graph logits, graph pool, the larger of prefill and sampling temporaries)."""
    import torch

    from model import ModelConfig
    from plan import GIB, cache_positions, memory_plan, sampler_slots
    from sampler import PREFILL_TOKENS, KVCache, Sampler

    c = preset_7b()
    cfg = ModelConfig(arch="qwen2", num_hidden_layers=28, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, **GPU_WIDTHS)
    plan = memory_plan(c, cfg, world=8, mode="fsdp", on_gpu=True, device_bytes=80 * GIB)
    rows = {what.split(" (")[0]: n for what, n, _ in plan.rows}
    slots, positions = sampler_slots(c, 8), cache_positions(c)
    meta = KVCache(cfg, slots, positions, "meta", dtype)  # shapes only: nothing allocated
    cache = 2 * meta.k.numel() * meta.k.element_size()
    ok = report("memory: KV cache", cache == rows["KV cache"],
                f"{cache / GIB:.2f} GiB allocated by KVCache = plan row {rows['KV cache'] / GIB:.2f} GiB")
    if cpu:
        return report("memory", ok, "CPU: the cache against the plan; peak allocation needs CUDA")
    torch.cuda.reset_peak_memory_stats()
    sampler = Sampler(random_model(cfg, device, dtype), slots, positions, device, dtype)
    n, g = 16, 4  # 16 prompts x 1024 tokens: one prefill of PREFILL_TOKENS tokens, fanned out to all 64 slots
    prompts = torch.randint(cfg.vocab_size, (n, PREFILL_TOKENS // n)).tolist()
    sampler.generate(prompts, group_size=g, max_new_tokens=2 * 16 + 1, temperature=1.0, seed=0)
    peak = torch.cuda.max_memory_allocated()
    sample_phase = max(rows["prefill activations"], rows["sampling temporaries"])
    # the CUDA context and NCCL's buffers are outside PyTorch's allocator: max_memory_allocated never sees them
    planned = (rows["sampler weights"] + rows["KV cache"] + rows["decode graphs' logits buffers"]
               + rows["decode graphs' memory pool"] + sample_phase)
    return report("memory", ok and peak <= planned,
                  f"peak allocated {peak / GIB:.2f} GiB, the plan's sampler rows {planned / GIB:.2f} GiB")


CHECKS = {"decode": check_decode, "graphs": check_graphs, "memory": check_memory}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 (an unknown step, none given), not a usage block
        self.exit(2, f"gpu_check: error: {message}\n")


def main(argv=None) -> int:
    ap = Parser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("check", choices=CHECKS)
    ap.add_argument("--cpu", action="store_true", help="run on CPU: Triton's interpreter, aot_eager, fewer layers")
    args = ap.parse_args(argv)
    device, dtype = setup(args.cpu)
    return 0 if CHECKS[args.check](args.cpu, device, dtype) else 1


if __name__ == "__main__":
    sys.exit(main())
