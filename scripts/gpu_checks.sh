#!/usr/bin/env bash
# Every GPU check of the decode kernel, the compiled decode step and the peer benchmarks, in one go on one
# H100/H200 (~8 minutes). From the repository root:
#     bash scripts/gpu_checks.sh
# Peers come from ./wheels if it exists (fetched elsewhere with pip download --no-deps: see BENCHMARKS.md);
# a missing peer is skipped with a line. Each step has its own time limit; a failed step is reported and the
# next one runs. Everything is also written to $OUT/gpu_checks.log (or ./gpu_checks.log).
set -u
export PYTHONUNBUFFERED=1
log="${OUT:-.}/gpu_checks.log"
step() {
    local limit=$1; shift
    echo "=== $* (limit ${limit} s)"
    timeout "$limit" "$@" || echo "=== FAILED or timed out (exit $?): $*"
}
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    if [ -d wheels ]; then pip install --no-deps -q wheels/*.whl; fi
    # CUDA: the decode kernel compiled for real; every sampler test through the compiled step + kernel (the
    # CUDA defaults) and through plain SDPA; the log-prob kernels
    step 120 python -m pytest -q -x -p no:warnings tests/test_decode_attention.py tests/test_sampler.py tests/test_kernels.py
    step 90 python bench.py sampler --preset 0.5b --repeats 2
    step 150 python bench.py sampler --preset 7b --repeats 2
    step 60 python bench.py kernels --peers
    step 60 python bench.py update --preset 0.5b
} 2>&1 | tee "$log"
