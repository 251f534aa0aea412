#!/usr/bin/env bash
# Every GPU check in one script, sized for a lent GPU's 15 minutes, which must leave room for a rerun.
#
#   core (must pass; ~4 minutes on an H100/H200):
#     tests     the test files with CUDA cases (decode kernel, sampler, log-prob kernels, model), no -x
#     fsdp      torchrun --nproc 1 --dist fsdp: FSDP2 over NCCL through load -> update -> sync -> save, then
#               --resume for one more step (DCP load, NCCL collectives of the save and the log)
#     defaults  python ssr.py --steps 2 --save-every 1: the smoke run with every default on (CUDA: the compiled
#               decode step in CUDA graphs with the Triton decode kernel, the Triton log-prob head)
#     decode, graphs, memory   scripts/gpu_check.py: the 7B-shape decode (compiled + graphs + kernel) against
#               eager SDPA, the unique-graph count, the sampler's max_memory_allocated against the plan
#   extended (benchmarks, ~5 minutes): only when every core step passed, and not with --core
#
#     bash scripts/gpu_checks.sh            # on the GPU machine, from the repository root
#     bash scripts/gpu_checks.sh --core     # the core only (a rerun after a fix)
#     bash scripts/gpu_checks.sh --cpu      # the core here, through the same code: CPU shapes, gloo instead of
#                                           # NCCL, Triton's interpreter, torch.compile's aot_eager backend
#
# Each step prints `PASS <step>: <figure>` or `FAIL <step>: <figure>` and has its own time limit (a timeout is a
# FAIL); the last line is `gpu checks: N passed, M failed`, and the exit status is 0 only when none failed.
# Everything is also written to $OUT/gpu_checks.log (or ./gpu_checks.log); each step's whole output goes to
# gpu_checks/<step>.log beside it, and the last lines of a failed step are shown inline.
# Peers for the benchmarks come from ./wheels if it exists (fetched elsewhere with pip download --no-deps:
# see BENCHMARKS.md); a missing peer is skipped with a line.
set -u
cd "$(dirname "$0")/.."
cpu=0 core_only=0
for a in "$@"; do
    case "$a" in
        --cpu) cpu=1 ;;
        --core) core_only=1 ;;
        *) echo "gpu_checks.sh: unknown option $a (use --cpu and/or --core)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1
if [ "$cpu" = 1 ]; then
    # the CPU twin: the kernels run in Triton's interpreter (set before any import of them), no GPU is seen
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
base="${OUT:-.}"
logs="$base/gpu_checks" work="$(mktemp -d)"
mkdir -p "$logs"
trap 'rm -rf "$work"' EXIT
passed=0 failed=0

# step NAME GPU_LIMIT CPU_LIMIT FUNCTION: run FUNCTION under its own time limit, its output in gpu_checks/NAME.log.
# The GPU limits add up to the budget (core ~4 minutes); the CPU ones only stop a hang on a shared, loaded machine.
# The figure is the output's last line starting with "figure: ", else its last line.
step() {
    local name=$1 limit=$2 t0=$SECONDS status figure
    [ "$cpu" = 1 ] && limit=$3
    timeout --kill-after=10 "$limit" bash -c "$4" > "$logs/$name.log" 2>&1
    status=$?
    figure=$(grep '^figure: ' "$logs/$name.log" | tail -n 1 | cut -c9-)
    [ -n "$figure" ] || figure=$(grep -v '^[[:space:]]*$' "$logs/$name.log" | tail -n 1)
    if [ "$status" = 0 ]; then
        passed=$((passed + 1))
        echo "PASS $name: $figure ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1))
        [ "$status" = 124 ] || [ "$status" = 137 ] && figure="timed out after $limit s; last: $figure"
        tail -n 15 "$logs/$name.log" | sed 's/^/    | /'
        echo "FAIL $name: $figure (exit $status, $((SECONDS - t0)) s)"
    fi
}

# The step bodies run in `bash -c`, so they are exported functions reading exported variables.
export cpu work
smoke_run() {  # python ssr.py ARGS
    if [ "$cpu" = 1 ]; then
        # the decode step's torch.compile backend: inductor on CUDA; aot_eager here (dynamo and AOTAutograd exactly
        # as on CUDA, no code generation: inductor costs ~20 s a graph on CPU)
        python -c 'import sys, sampler, ssr; sampler.COMPILE_BACKEND = "aot_eager"; ssr.main(sys.argv[1:])' "$@"
    else
        python ssr.py "$@"
    fi
}
tests() {
    python -c 'import pytest' 2>/dev/null || { echo "figure: pytest is not installed here (put its wheel in ./wheels)"; exit 1; }
    local only=()
    # --cpu: the CPU twins of the CUDA cases only (Triton in its interpreter, the compiled step, the decode modes
    # and log-prob backends); the CPU suite runs the rest of these files anyway
    [ "$cpu" = 1 ] && only=(-k "triton or kernel or compile or decode or backend")
    python -m pytest -p no:warnings tests/test_decode_attention.py tests/test_sampler.py tests/test_kernels.py \
        tests/test_model.py "${only[@]}"
}
metrics_steps() {  # the steps logged in OUT/metrics.jsonl, comma-separated
    python -c 'import json, sys; print(",".join(str(json.loads(l)["step"]) for l in open(sys.argv[1])))' "$1/metrics.jsonl"
}
fsdp() {
    # --decode sdpa: this step is about FSDP2, NCCL and DCP; the compiled decode is the next step's
    local out="$work/fsdp" run=(python -m torch.distributed.run --nproc_per_node 1 --master_port 29511 ssr.py
                                --out-dir "$work/fsdp" --dist fsdp --save-every 1 --decode sdpa)
    "${run[@]}" --steps 2 || exit 1
    "${run[@]}" --steps 3 --resume > "$work/resume.log" 2>&1
    status=$?
    cat "$work/resume.log"
    [ "$status" = 0 ] || exit 1
    grep -q "resumed from .*step_2 at step 2" "$work/resume.log" || { echo "figure: the second run did not resume from step_2"; exit 1; }
    steps=$(metrics_steps "$out")
    [ "$steps" = "1,2,3" ] && [ -f "$out/step_3/model.safetensors" ] && [ -d "$out/step_3/train_state" ] \
        || { echo "figure: logged steps $steps; step_3 incomplete"; exit 1; }
    echo "figure: 2 steps saved, resumed from step_2, step 3 saved (FSDP2 over $(python -c 'import torch; print("NCCL" if torch.cuda.is_available() else "gloo")'))"
}
defaults() {
    local out="$work/defaults" model=()
    # the fsdp step's smoke model, when there is one: the smoke preset on it skips a second warm-up
    [ -f "$work/fsdp/tiny_model/config.json" ] && model=(--preset smoke --model "$work/fsdp/tiny_model")
    if [ "$cpu" = 1 ]; then  # the CUDA defaults' twin: compiled decode step, Triton decode kernel and log-prob head,
        # on fewer and shorter rollouts (Triton's interpreter runs each kernel program in Python)
        smoke_run "${model[@]}" --out-dir "$out" --steps 2 --save-every 1 --decode compiled --logprob-backend triton \
            --prompts-per-step 2 --group-size 2 --max-new-tokens 8 --judge-max-new-tokens 8 || exit 1
    else
        smoke_run "${model[@]}" --out-dir "$out" --steps 2 --save-every 1 || exit 1
    fi
    steps=$(metrics_steps "$out")
    [ "$steps" = "1,2" ] && [ -f "$out/step_2/model.safetensors" ] || { echo "figure: logged steps $steps"; exit 1; }
    python -c 'import json, sys; m = [json.loads(l) for l in open(sys.argv[1])][-1]
t, s, u = m["rollout_tokens_per_s"], m["sec_sample"], m["sec_update"]
print(f"figure: 2 steps saved; step 2: {t:.0f} rollout tokens/s, sample {s:.1f} s, update {u:.1f} s")' "$out/metrics.jsonl"
}
gpu_check() {  # scripts/gpu_check.py SUBCOMMAND: its own PASS/FAIL line is the figure
    [ -f scripts/gpu_check.py ] || { echo "figure: scripts/gpu_check.py is missing"; exit 1; }
    local flag=()
    [ "$cpu" = 1 ] && flag=(--cpu)
    python scripts/gpu_check.py "$1" "${flag[@]}" | tee "$work/check_$1.log"
    status=${PIPESTATUS[0]}
    echo "figure: $(grep -E '^(PASS|FAIL) ' "$work/check_$1.log" | tail -n 1 | cut -d' ' -f2-)"
    exit "$status"
}
bench() { python bench.py "$@"; }
export -f smoke_run tests metrics_steps fsdp defaults gpu_check bench

{
    if [ "$cpu" = 1 ]; then
        echo "gpu checks, CPU twin (--cpu): $(getconf _NPROCESSORS_ONLN) cores"
    else
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        if [ -d wheels ]; then pip install --no-deps -q wheels/*.whl; fi
    fi
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    echo "--- core"
    step tests 100 900 tests
    step fsdp 60 900 fsdp
    step defaults 50 900 defaults
    step decode 30 900 "gpu_check decode"
    step graphs 30 900 "gpu_check graphs"
    step memory 20 900 "gpu_check memory"
    if [ "$cpu" = 1 ] || [ "$core_only" = 1 ]; then
        echo "--- extended: not run ($([ "$cpu" = 1 ] && echo "--cpu: the benchmarks measure a GPU" || echo "--core"))"
    elif [ "$failed" != 0 ]; then
        echo "--- extended: not run (a core step failed: fix it, then rerun with --core)"
    else
        echo "--- extended"
        step bench-sampler-0.5b 60 0 "bench sampler --preset 0.5b --repeats 2"
        step bench-sampler-7b 120 0 "bench sampler --preset 7b --repeats 2"
        step bench-kernels-peers 45 0 "bench kernels --peers"
        step bench-update-0.5b 45 0 "bench update --preset 0.5b"
    fi
    echo "gpu checks: $passed passed, $failed failed"
    [ "$failed" = 0 ]
} 2>&1 | tee "$base/gpu_checks.log"
exit "${PIPESTATUS[0]}"
