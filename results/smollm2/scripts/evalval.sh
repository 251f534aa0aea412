#!/usr/bin/env bash
# evalval.sh CODE_DIR CORE RUN: greedy validation chrF/BLEU of every step_N of /work/runs/RUN (RESULTS.md section 5's eval)
code=$1 core=$2 run=$3
cd "$code" && . /work/main/.venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
models=()
for d in $(ls -d /work/runs/$run/step_* | grep -E 'step_[0-9]+$' | sort -t_ -k2 -n); do models+=(--model "$d"); done
echo "[$(date -u +%FT%TZ)] eval.py ${models[*]} --src data/en_fr_val.jsonl ... --out /work/runs/eval-val-$run" >> /work/runs/$run.cmd
taskset -c "$core" python eval.py "${models[@]}" --src data/en_fr_val.jsonl --template chat --think-prefill \
  --metrics bleu,chrf --max-new-tokens 64 --device cpu --out /work/runs/eval-val-$run > /work/runs/eval-val-$run.log 2>&1
echo "[$(date -u +%FT%TZ)] eval exit $?" >> /work/runs/$run.cmd
