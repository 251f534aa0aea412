"""Benchmarks, each a ratio against a baseline measured in the same run (medians of several repeats).

    python bench.py load      # checkpoint loading: peak memory vs the size of the weights
    python bench.py sampler   # our KV-cached sampler vs HF generate: tokens/s
    python bench.py kernels   # fused log-prob vs naive log_softmax: peak memory and time
    python bench.py step      # one SSR training step: time by phase, rollout tokens/s

Timings never live in tests; this file is where speed and memory claims come from.
"""
import argparse
import json
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
    from model import Transformer, make_tiny_model

    # warm up the same code path on a tiny model first: the first tensor ops map in torch's kernel
    # libraries (~100+ MB of code pages), which is not memory the loader holds
    with tempfile.TemporaryDirectory() as tmp:
        Transformer.from_pretrained(make_tiny_model(tmp), dtype=torch.float32)
    before = peak_rss_bytes()
    model = Transformer.from_pretrained(path, dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"rss_before": before, "rss_peak": peak_rss_bytes(), "weights": weights}))


def bench_load(args):
    from model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        # ~400 MB of fp32 weights in 4 shards: large next to the interpreter, small enough for CI boxes
        path = make_tiny_model(tmp, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
        from model import Transformer
        Transformer.from_pretrained(path).save_pretrained(path, max_shard_bytes=120 * 1024**2)
        out = subprocess.run([sys.executable, __file__, "_load_child", str(path)], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["rss_peak"] - r["rss_before"]
    print(f"weights: {r['weights'] / 2**20:.0f} MiB, peak RSS growth while loading: {grown / 2**20:.0f} MiB")
    print(f"load peak memory / weights: {grown / r['weights']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("load", help="checkpoint loading peak memory")
    child = sub.add_parser("_load_child")  # internal: the measured process of `load`
    child.add_argument("path")
    args = parser.parse_args()
    if args.what == "_load_child":
        return _load_child(args.path)
    {"load": bench_load}[args.what](args)


if __name__ == "__main__":
    main()
