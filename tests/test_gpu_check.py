"""scripts/gpu_check.py, the sampler's GPU core checks, run here with --cpu's shapes and backends (aot_eager, the
kernels in Triton's interpreter) so that the script is known to work before a GPU is ever lent: the 7B decode
shape through the compiled step against eager SDPA, the recompile budget, and the 7B cache against the memory
plan. (`graphs --cpu` over the whole 7B bucket grid runs 160 steps: scripts/gpu_checks.sh --cpu runs it; the
suite runs the same check over a smaller grid.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # the decode kernel runs in Triton's interpreter here; it is read when kernels.decode_attention is imported
    assert "kernels.decode_attention" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
    os.environ["TRITON_INTERPRET"] = "1"

import sampler as sampler_module  # noqa: E402
from kernels import decode_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def cpu_backends(monkeypatch):
    """What `--cpu` sets for the whole process, undone after each test."""
    monkeypatch.setattr(sampler_module, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(decode_attention, "sm_count", decode_attention.sm_count)


def test_decode_at_the_7b_shape(cpu_backends, capsys):
    """bf16, head_dim 128, 28 query heads on 4 key heads, rows of up to 2,432 positions split 38 ways: the
    compiled step with the kernel (split and merge kernels) against the eager SDPA step."""
    assert gpu_check.check_decode(True, CPU, torch.bfloat16)
    out = capsys.readouterr().out
    assert "38 splits" in out and "1 splits" in out and out.splitlines()[-1].startswith("PASS decode: ")


def test_recompile_budget_over_a_bucket_grid(cpu_backends, capsys):
    """The graphs check over 4 batch buckets (1, 2, 4, 5 slots) x 2 length buckets: unique compiled graphs within
    GRAPH_BUDGET (batch 1 apart, every other bucket one dynamic graph), then the grid again under
    error_on_recompile."""
    torch._dynamo.reset()  # counters and cache entries from earlier tests must not count here
    assert gpu_check.check_graphs(True, CPU, torch.float32, grid_size=(5, 2 * sampler_module.GRAPH_LEN_STEP))
    out = capsys.readouterr().out
    assert "over 8 buckets (4 batch x 2 length" in out, out
    assert "PASS graphs: no recompile on a second pass: none" in out, out


def test_memory_cli():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "memory", "--cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS memory: KV cache: 8.31 GiB allocated by KVCache = plan row 8.31 GiB" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["decod"], "argument check: invalid choice: 'decod' (choose from 'decode', 'graphs', 'memory')"),
    ([], "the following arguments are required: check"),
])
def test_bad_step_is_one_line(args, message):
    """A mistyped or missing step: one line and exit status 2, as every CLI of the project (not a usage block)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"gpu_check: error: {message}"]
