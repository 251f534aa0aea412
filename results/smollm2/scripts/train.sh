#!/usr/bin/env bash
# train.sh CODE_DIR CORE OUT_NAME [extra ssr.py flags]: one SmolLM2 en->fr run of RESULTS.md section 5's protocol
code=$1 core=$2 name=$3; shift 3
cd "$code" && . /work/main/.venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
echo "[$(date -u +%FT%TZ)] $code @ $(git -C "$code" rev-parse --short HEAD): ssr.py $* --out-dir /work/runs/$name" >> /work/runs/$name.cmd
taskset -c "$core" python ssr.py --model /work/ckpt/smollm2 --data data/en_fr_train_refs.jsonl --template chat --think-prefill \
  --format-credit 0.5 --prompts-per-step 4 --group-size 4 --max-new-tokens 64 --judge-max-new-tokens 24 \
  --lr 3e-5 --steps 80 --save-every 10 --keep-last 0 --log-samples 16 --sampler-batch-size 16 \
  --out-dir /work/runs/$name "$@" >> /work/runs/$name.log 2>&1
status=$?; echo "[$(date -u +%FT%TZ)] exit $status" >> /work/runs/$name.cmd
