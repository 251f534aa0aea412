#!/usr/bin/env bash
# Every GPU check in one script, sized for a lent GPU's 15 minutes (machine start included), which must leave room
# for a rerun.
#
#   core (must pass; its step limits add up to 195 s: BENCHMARKS.md, "GPU core budget", says how each was sized
#   from CPU measurements of its cold start: imports, model builds, dynamo + AOTAutograd traces, graph counts):
#     tests     the CUDA cases that cover distinct GPU code (CORE_TESTS: decode kernel, log-prob kernels, the sampler's
#               compiled step in CUDA graphs against HF generate, bf16, in-place weight updates), no -x
#     fsdp      torchrun --nproc 1 --dist fsdp: FSDP2 over NCCL through load -> update -> sync -> save, then
#               --resume for one more step (DCP load, NCCL collectives of the save and the log)
#     defaults  python ssr.py --steps 2 --save-every 1: the smoke run with every default on (CUDA: the compiled
#               decode step in CUDA graphs with the Triton decode kernel, the Triton log-prob head, bf16)
#     sampler   scripts/gpu_check.py decode graphs memory: one process, one 2-layer model of 7B widths (inductor
#               compiles its graphs once): the decode (compiled + graphs + kernel) against eager SDPA, the
#               unique-graph count over the preset's bucket grid, the sampler's peak allocation against the plan
#   extended (~7 minutes): only when every core step passed, and not with --core: the benchmarks, then every other
#   CUDA test case
#
#     bash scripts/gpu_checks.sh            # on the GPU machine, from the repository root
#     bash scripts/gpu_checks.sh --core     # the core only (a rerun after a fix)
#     bash scripts/gpu_checks.sh --cpu      # the core here, through the same code and precision policy (bf16):
#                                           # CPU shapes, gloo instead of NCCL, Triton's interpreter, aot_eager
#                                           # (the decode check through inductor, as on CUDA)
#
# Each step prints `PASS <step>: <figure> (T s; limit L s; compile C s)` or `FAIL ...` and has its own time limit (a
# timeout is a FAIL); C is torch.compile's time in the step's processes (their `compile:` lines). The last line is
# `gpu checks: N passed, M failed`, and the exit status is 0 only when none failed.
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
# One compile cache for every step's processes: inductor's FX-graph and AOTAutograd caches and Triton's kernel cache
# (a graph or kernel compiled by one step is loaded, not rebuilt, by the next: the smoke model's decode step, the
# log-prob and decode kernels). Dynamo's trace is per process and cannot be cached; fewer processes save it.
export TORCHINDUCTOR_CACHE_DIR="$work/compile-cache" TRITON_CACHE_DIR="$work/compile-cache/triton"

# step NAME GPU_LIMIT CPU_LIMIT FUNCTION: run FUNCTION under its own time limit, its output in gpu_checks/NAME.log.
# The GPU limits add up to the core's budget; the CPU ones only stop a hang on a shared, loaded machine (--cpu prints
# both: its time against the GPU limit is no verdict, only the measurement BENCHMARKS.md sizes the limits from).
# The figure is the output's last line starting with "figure: ", else its last line.
cpu_now() {  # CPU_NOW = user + system CPU seconds of this shell's finished children (`times`' second line); in this
    # shell, not a $(...) subshell, whose own counters start at zero
    times > "$work/times"
    CPU_NOW=$(tail -n 1 "$work/times" | awk '{split($1, u, /[ms]/); split($2, s, /[ms]/); print u[1] * 60 + u[2] + s[1] * 60 + s[2]}')
}
step() {
    local name=$1 limit=$2 t0=$SECONDS c0 status figure compile times
    [ "$cpu" = 1 ] && limit=$3
    cpu_now
    c0=$CPU_NOW
    timeout --kill-after=10 "$limit" bash -c "$4" > "$logs/$name.log" 2>&1
    status=$?
    figure=$(grep '^figure: ' "$logs/$name.log" | tail -n 1 | cut -c9-)
    [ -n "$figure" ] || figure=$(grep -v '^[[:space:]]*$' "$logs/$name.log" | tail -n 1)
    compile=$(grep -h '^compile: ' "$logs/$name.log" | awk '{s += $2; n += $5} END {printf "%.1f s in %d compiles", s, n}')
    cpu_now
    times="$((SECONDS - t0)) s, $(awk "BEGIN {printf \"%.0f\", $CPU_NOW - $c0}") s CPU; limit $limit s$([ "$cpu" = 1 ] \
        && echo " here, $2 s on a GPU"); compile $compile"
    if [ "$status" = 0 ]; then
        passed=$((passed + 1))
        echo "PASS $name: $figure ($times)"
    else
        failed=$((failed + 1))
        [ "$status" = 124 ] || [ "$status" = 137 ] && figure="timed out after $limit s; last: $figure"
        tail -n 15 "$logs/$name.log" | sed 's/^/    | /'
        echo "FAIL $name: $figure (exit $status; $times)"
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
# The core's CUDA tests: one case for each distinct GPU path (each compiled Sampler costs a dynamo trace, and the
# inductor code of its first graph): the decode kernel and its split/merge, both log-prob kernels, the compiled step
# in CUDA graphs against HF generate, the eager kernel and SDPA decode paths, bf16 sampling, and graphs that see
# in-place weight updates. Every other CUDA case runs in the extended phase (tests-all).
CORE_TESTS=(tests/test_decode_attention.py tests/test_kernels.py tests/test_sampler.py)
CORE_SELECT="test_decode_attention or (cuda and (token_logprobs or greedy_matches_hf or decode_paths or bf16_logprobs or in_place_weight))"
export CORE_SELECT
tests() {  # tests [all]
    python -c 'import pytest' 2>/dev/null || { echo "figure: pytest is not installed here (put its wheel in ./wheels)"; exit 1; }
    local select=(-k "$CORE_SELECT")
    # --cpu: the CPU twins of the CUDA cases (Triton in its interpreter, the compiled step, the decode modes)
    [ "$cpu" = 1 ] && select=(-k "triton or kernel or compile or decode or backend")
    [ "${1:-}" = all ] && select=(-k "cuda and not ($CORE_SELECT)")
    python -m pytest -p no:warnings tests/test_decode_attention.py tests/test_sampler.py tests/test_kernels.py \
        tests/test_model.py "${select[@]}"
}
metrics_steps() {  # the steps logged in OUT/metrics.jsonl, comma-separated
    python -c 'import json, sys; print(",".join(str(json.loads(l)["step"]) for l in open(sys.argv[1])))' "$1/metrics.jsonl"
}
fsdp() {
    # --decode sdpa: this step is about FSDP2, NCCL and DCP; the compiled decode is the next step's
    local out="$work/fsdp" run=(python -m torch.distributed.run --nproc_per_node 1 --master_port 29511 ssr.py
                                --out-dir "$work/fsdp" --dist fsdp --save-every 1 --decode sdpa --precision bf16)
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
        # a GPU run's precision policy (bf16 copies, autocast), on fewer and shorter rollouts (Triton's interpreter
        # runs each kernel program in Python)
        smoke_run "${model[@]}" --out-dir "$out" --steps 2 --save-every 1 --decode compiled --logprob-backend triton \
            --precision bf16 --prompts-per-step 2 --group-size 2 --max-new-tokens 8 --judge-max-new-tokens 8 || exit 1
    else
        smoke_run "${model[@]}" --out-dir "$out" --steps 2 --save-every 1 || exit 1
    fi
    steps=$(metrics_steps "$out")
    [ "$steps" = "1,2" ] && [ -f "$out/step_2/model.safetensors" ] || { echo "figure: logged steps $steps"; exit 1; }
    python -c 'import json, sys; m = [json.loads(l) for l in open(sys.argv[1])][-1]
t, s, u = m["rollout_tokens_per_s"], m["sec_sample"], m["sec_update"]
print(f"figure: 2 steps saved; step 2: {t:.0f} rollout tokens/s, sample {s:.1f} s, update {u:.1f} s")' "$out/metrics.jsonl"
}
sampler_checks() {  # scripts/gpu_check.py decode graphs memory in one process: each check's verdict is in the figure
    [ -f scripts/gpu_check.py ] || { echo "figure: scripts/gpu_check.py is missing"; exit 1; }
    # --cpu: the decode check through inductor, as on CUDA (C++ instead of Triton code; ~20 s a graph): DECODE_TOL
    # holds through its fusions, not only through aot_eager's eager kernels
    if [ "$cpu" = 1 ]; then  # inductor for the decode tolerance only: over the 80-bucket grid it costs ~6 minutes here
        python scripts/gpu_check.py decode --cpu --backend inductor | tee "$work/sampler_checks.log"
        status=${PIPESTATUS[0]}
        python scripts/gpu_check.py graphs memory --cpu | tee -a "$work/sampler_checks.log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    else
        python scripts/gpu_check.py decode graphs memory | tee "$work/sampler_checks.log"
        status=${PIPESTATUS[0]}
    fi
    echo "figure: $(grep -c '^PASS ' "$work/sampler_checks.log") checks passed, $(grep -c '^FAIL ' "$work/sampler_checks.log") failed; $(grep '^PASS decode: \|^FAIL decode: ' "$work/sampler_checks.log" | sed 's/.*, //')"
    exit "$status"
}
bench() { python bench.py "$@"; }
export -f smoke_run tests metrics_steps fsdp defaults sampler_checks bench

{
    if [ "$cpu" = 1 ]; then
        echo "gpu checks, CPU twin (--cpu): $(getconf _NPROCESSORS_ONLN) cores"
    else
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        if [ -d wheels ]; then pip install --no-deps -q wheels/*.whl; fi
    fi
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    echo "--- core"
    step tests 60 900 tests
    step fsdp 35 900 fsdp
    step defaults 35 900 defaults
    step sampler 65 1800 sampler_checks
    if [ "$cpu" = 1 ]; then  # what sizes the core's GPU limits: each step's host work, measured here
        step cold-start 0 1800 "python scripts/gpu_check.py cold-start --cpu"
    fi
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
        step tests-all 150 0 "tests all"
    fi
    echo "gpu checks: $passed passed, $failed failed"
    [ "$failed" = 0 ]
} 2>&1 | tee "$base/gpu_checks.log"
exit "${PIPESTATUS[0]}"
