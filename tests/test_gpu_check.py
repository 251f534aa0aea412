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

import sampler as sampler_module
from conftest import require_interpreted_triton
from kernels import decode_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def cpu_backends(monkeypatch):
    """What `--cpu` sets for the whole process, undone after each test (the kernel in Triton's interpreter: on a CUDA
    host, where it is compiled for the GPU, these CPU twins skip; gpu_checks.sh runs the real ones)."""
    require_interpreted_triton()
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
    (["decod"], "argument CHECK: invalid choice: 'decod' (choose from 'decode', 'graphs', 'memory', 'cold-start')"),
    (["memory", "x"], "argument CHECK: invalid choice: 'x' (choose from 'decode', 'graphs', 'memory', 'cold-start')"),
    ([], "the following arguments are required: CHECK"),
    (["memory", "--backend", "inductor"], "--backend is for --cpu (on CUDA the sampler compiles with inductor)"),
])
def test_bad_step_is_one_line(args, message):
    """A mistyped or missing step: one line and exit status 2, as every CLI of the project (not a usage block)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"gpu_check: error: {message}"]


def test_core_limits_fit_the_budget():
    """gpu_checks.sh's core step limits on a GPU are gpu_check.CORE_LIMITS (what cold-start sizes) and add up to at
    most 200 s: a lent GPU's 15 minutes must hold the machine's start, the core, the benchmarks and a rerun."""
    import re

    script = (ROOT / "scripts" / "gpu_checks.sh").read_text()
    core = script[script.index('echo "--- core"'):script.index("cold-start 0 1800")]
    limits = {name: int(limit) for name, limit in re.findall(r"^\s*step (\S+) (\d+) \d+ ", core, re.M)}
    assert limits == gpu_check.CORE_LIMITS and sum(limits.values()) <= 200, limits


def test_gpu_test_files_pass_as_a_cuda_host_sees_them():
    """The kernel, sampler and gpu_check test files run as a GPU machine runs them (tests/cuda_host.py: is_available()
    True, Triton's interpreter off): no test fails for a reason other than the missing GPU itself. Four did, on every
    GPU machine, while this suite passed: CPU cases that counted on a module-level interpreter switch."""
    files = ["tests/test_sampler.py", "tests/test_kernels.py", "tests/test_decode_attention.py",
             "tests/test_gpu_check.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "cuda_host", "-q", "-p", "no:cacheprovider", "-rs",
                           "-k", "not as_a_cuda_host", *files], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.count("needs a real GPU: Torch not compiled with CUDA enabled") > 10, proc.stdout[-3000:]
    assert "Triton's interpreter is off here" in proc.stdout  # the CPU cases of the kernels skip, saying why
