"""The sampler's GPU core checks. Each prints `PASS <name>: <figure>` or `FAIL <name>: <figure>`; the process exits 1
if any failed. scripts/gpu_checks.sh runs all three in one process on a GPU (one torch import, one CUDA context), and
`--cpu` runs the same checks here:

    python scripts/gpu_check.py decode graphs memory [--cpu] [--backend inductor]
      decode   the 7B decode shape: the compiled step (CUDA graphs on CUDA) with the Triton kernel against eager SDPA,
               several buckets
      graphs   compiled graphs over the 7B preset's bucket grid <= GRAPH_BUDGET, then the grid again with no
               recompile allowed
      memory   the 7B preset's KV cache against plan.py's row; on CUDA, a sampler with the preset's cache and 7B
               widths at 2 layers (the plan's rows are per layer or per model: 2 layers prove them without a 28-layer
               compile, ~80 s of dynamo + AOTAutograd on the host) whose peak allocation must stay within the plan
               for that same model

--cpu: CPU tensors through the same code: the kernel in Triton's interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported), torch.compile with aot_eager (dynamo and AOTAutograd as on CUDA, no code generation;
--backend inductor generates and compiles C++ code as CUDA's inductor generates Triton, ~20 s a graph), 2 layers and
narrow MLP/vocab but the 7B attention shape (28 query heads on 4 key heads, head_dim 128, bf16), and for `decode` the
split plan of a 132-SM GPU, so that long rows split and the merge kernel runs. The last line, `compile: ...`, is the
time torch.compile took in this process (host CPU time, which a GPU run pays too).
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
# The decode and memory checks' model depth on CUDA: the same 2-layer model of 7B widths for both, so the second
# finds its graphs in inductor's cache, and no 28-layer compile (~80 s of host work before any codegen) is needed
# (check_memory says why 2 layers prove the plan's rows)
GPU_LAYERS = 2


def report(name: str, ok: bool, figure: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)
    return ok


def setup(cpu: bool, backend: str | None = None):
    """The run's environment, set before any check imports torch or the kernels: returns (device, dtype)."""
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels.decode_attention is imported
    import torch

    import sampler

    if cpu:
        sampler.COMPILE_BACKEND = backend or "aot_eager"
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
    cfg = ModelConfig(arch="qwen2", num_hidden_layers=2 if cpu else GPU_LAYERS, num_attention_heads=HEADS,
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
    """Every (batch bucket, length bucket) the 7B preset's sampler can run: unique compiled graphs <= GRAPH_BUDGET;
    then the grid again, where a recompile is an error. On CUDA the decode check's model (GPU_LAYERS layers of 7B
    widths: inductor's cache already holds its graphs, and the 80 captures are real 7B-shape graphs); on CPU a
    1-layer tiny model with the same bucket logic (the guards are what is under test). grid_size=(slots, positions)
    runs a smaller grid through the same code (the test suite's twin)."""
    import torch
    from torch._dynamo.utils import counters

    from model import ModelConfig
    from plan import cache_positions, sampler_slots
    from sampler import GRAPH_LEN_STEP, Sampler, batch_buckets

    c = preset_7b()
    slots, positions = grid_size or (sampler_slots(c, 8), cache_positions(c))
    cfg = (ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16) if cpu else
           ModelConfig(arch="qwen2", num_hidden_layers=GPU_LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, **GPU_WIDTHS))
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
    """The 7B preset's KV cache (64 slots x 2432 positions of Qwen2.5-7B's K/V, bf16) against plan.py's row; on CUDA,
    a sampler with that cache geometry and Qwen2.5-7B's widths at GPU_LAYERS layers, its peak allocation through a
    full-budget prefill and decode steps against the plan's sampler rows for that same model (weights, cache, graph
    logits, graph pool, the larger of prefill and sampling temporaries). Each row is per layer (weights, cache, pool)
    or per model (logits, temporaries), so 2 layers check the same formulas as 28 without a 28-layer compile."""
    import torch

    from model import ModelConfig
    from plan import GIB, cache_positions, sampler_slots
    from sampler import PREFILL_TOKENS, KVCache, Sampler

    c = preset_7b()
    full = ModelConfig(arch="qwen2", num_hidden_layers=28, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=HEAD_DIM, **GPU_WIDTHS)
    slots, positions = sampler_slots(c, 8), cache_positions(c)
    rows = plan_rows(c, full)
    meta = KVCache(full, slots, positions, "meta", dtype)  # shapes only: nothing allocated
    cache = 2 * meta.k.numel() * meta.k.element_size()
    ok = report("memory: KV cache", cache == rows["KV cache"],
                f"{cache / GIB:.2f} GiB allocated by KVCache = plan row {rows['KV cache'] / GIB:.2f} GiB")
    if cpu:
        return report("memory", ok, "CPU: the cache against the plan; peak allocation needs CUDA")
    cfg = ModelConfig(**{**full.__dict__, "num_hidden_layers": GPU_LAYERS})
    rows = plan_rows(c, cfg)
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
                  f"{GPU_LAYERS} layers at 7B widths: peak allocated {peak / GIB:.2f} GiB, the plan's sampler rows "
                  f"for that model {planned / GIB:.2f} GiB")


def plan_rows(c, cfg) -> dict[str, float]:
    """plan.py's rows for config `c` training `cfg` on 8 ranks of 80 GB under FSDP2, by name (without the "(...)")."""
    from plan import GIB, memory_plan

    plan = memory_plan(c, cfg, world=8, mode="fsdp", on_gpu=True, device_bytes=80 * GIB)
    return {what.split(" (")[0]: n for what, n, _ in plan.rows}


def check_cold_start(cpu: bool, device, dtype) -> bool:
    """What each core step of scripts/gpu_checks.sh pays on the host before any GPU work: torch.compile's front end
    (dynamo's trace and AOTAutograd, measured here as CPU seconds with aot_eager: the same work CUDA's inductor is
    handed) for every model a core step compiles, at the shapes it compiles them on a GPU, and the imports of one
    process. Inductor's code generation and Triton's compiles come on top on a GPU, where the steps share one compile
    cache (BENCHMARKS.md, "GPU core budget", adds them). PASS when each step's measured host work leaves at least
    half of its GPU limit for those."""
    import resource
    import subprocess
    import tempfile

    import torch

    import sampler as sampler_module
    import smoke
    from checkpoint import load_pretrained, make_tiny_model
    from model import ModelConfig
    from plan import cache_positions, sampler_slots

    sampler_module.COMPILE_BACKEND = "aot_eager"
    children = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    t0 = children()
    subprocess.run([sys.executable, "-c", "import torch, transformers, ssr, eval"], cwd=ROOT, check=True)
    imports = children() - t0  # CPU seconds of a fresh interpreter's imports, what every step's process pays

    def front_end(model, buckets, slots=8, positions=64) -> tuple[float, int]:
        """CPU seconds and dynamo compiles of a fresh compiled Sampler's first decode steps at `buckets`."""
        from torch._dynamo.utils import compilation_time_metrics

        before = len(compilation_time_metrics.get("_compile.compile_inner", []))
        sampler = sampler_module.Sampler(model, slots, positions, model.embed_tokens.weight.device,
                                         model.embed_tokens.weight.dtype, decode="compiled")
        sampler.pos_in.zero_()
        start = time.process_time()
        for b, length in buckets:
            sampler._forward(b, length)
        return time.process_time() - start, len(compilation_time_metrics["_compile.compile_inner"]) - before

    c = preset_7b()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_pretrained(make_tiny_model(Path(tmp) / "tiny"), dtype=torch.bfloat16)
        smoke_model = load_pretrained(smoke.make_smoke_model(Path(tmp) / "smoke", str(ROOT / "data" / "sample.jsonl")),
                                      dtype=torch.bfloat16)
    wide = lambda layers: random_model(ModelConfig(arch="qwen2", num_hidden_layers=layers, num_attention_heads=HEADS,
                                                   num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, **GPU_WIDTHS),
                                       "cpu", torch.bfloat16)
    two_buckets = [(1, 16), (3, 32)]  # batch 1 is its own graph: every sampler compiles twice
    # the core steps' compiled samplers on a GPU: tests 4 (greedy vs HF, bf16, in-place updates x 2), defaults 1 (the
    # smoke model), sampler 3 (decode, graphs and memory, each a Sampler of the same GPU_LAYERS-layer 7B-width model)
    seven_b = wide(GPU_LAYERS)
    measured = {"tests": [front_end(tiny, two_buckets) for _ in range(4)],
                "defaults": [front_end(smoke_model, two_buckets)],
                "sampler": [front_end(seven_b, two_buckets, sampler_slots(c, 8), cache_positions(c))
                            for _ in range(3)]}
    processes = {"tests": 1, "fsdp": 2, "defaults": 1, "sampler": 1}
    ok = True
    for step, limit in CORE_LIMITS.items():
        compiles = measured.get(step, [])
        host = processes[step] * imports + sum(seconds for seconds, _ in compiles)
        ok &= report(f"cold-start {step}", host <= limit / 2,
                     f"{processes[step]} process{'es' * (processes[step] > 1)} x {imports:.1f} s of imports + "
                     f"{sum(n for _, n in compiles)} dynamo compiles in {sum(s for s, _ in compiles):.1f} CPU s = "
                     f"{host:.1f} s of host work, limit {limit} s on a GPU")
    return report("cold-start", ok, f"host work of the core's steps within half their GPU limits "
                                    f"({sum(CORE_LIMITS.values())} s in all)")


# scripts/gpu_checks.sh's core step limits on a GPU, seconds (kept equal there; check_cold_start sizes them)
CORE_LIMITS = {"tests": 60, "fsdp": 35, "defaults": 35, "sampler": 65}
CHECKS = {"decode": check_decode, "graphs": check_graphs, "memory": check_memory, "cold-start": check_cold_start}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 (an unknown step, none given), not a usage block
        self.exit(2, f"gpu_check: error: {message}\n")


def main(argv=None) -> int:
    ap = Parser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("checks", nargs="+", choices=CHECKS, metavar="CHECK", help=f"any of {', '.join(CHECKS)}")
    ap.add_argument("--cpu", action="store_true", help="run on CPU: Triton's interpreter, aot_eager, fewer layers")
    ap.add_argument("--backend", choices=["aot_eager", "inductor"], default=None,
                    help="--cpu: torch.compile's backend (default aot_eager; inductor generates code, ~20 s a graph)")
    args = ap.parse_args(argv)
    if args.backend and not args.cpu:
        ap.error("--backend is for --cpu (on CUDA the sampler compiles with inductor)")
    device, dtype = setup(args.cpu, args.backend)
    results = [CHECKS[name](args.cpu, device, dtype) for name in args.checks]
    from sampler import compile_report

    print(compile_report() or "compile: 0.0 s in 0 dynamo compiles", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
