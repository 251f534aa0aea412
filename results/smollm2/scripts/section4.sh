#!/usr/bin/env bash
# RESULTS.md section 4 rerun: every flag printed (the published command lacked --max-new-tokens)
core=$1
cd /work/exp-55648b2 && . /work/main/.venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--model /work/ckpt/smollm2 --src data/en_fr_dev.jsonl --judge-quality 4 --template chat --think-prefill
        --judge-max-new-tokens 24 --device cpu)
echo "[$(date -u +%FT%TZ)] eval.py ${common[*]} --judge-mode pointwise --judge-score text --max-new-tokens 64 --temperature 1 --seed 0 --out /work/runs/jq-pointwise-text" >> /work/runs/section4.cmd
taskset -c $core python eval.py "${common[@]}" --judge-mode pointwise --judge-score text --max-new-tokens 64 \
  --temperature 1 --seed 0 --out /work/runs/jq-pointwise-text > /work/runs/jq-pointwise-text.log 2>&1
cands=/work/runs/jq-pointwise-text/smollm2/en_fr_dev/candidates.jsonl
for mode in pointwise group; do for score in text expected; do
  [ "$mode-$score" = pointwise-text ] && continue
  echo "[$(date -u +%FT%TZ)] eval.py ${common[*]} --candidates $cands --judge-mode $mode --judge-score $score --out /work/runs/jq-$mode-$score" >> /work/runs/section4.cmd
  taskset -c $core python eval.py "${common[@]}" --candidates $cands --judge-mode $mode --judge-score $score \
    --out /work/runs/jq-$mode-$score > /work/runs/jq-$mode-$score.log 2>&1
done; done
echo "[$(date -u +%FT%TZ)] done" >> /work/runs/section4.cmd
