#!/usr/bin/env bash
# paired bootstrap (1000 resamples) of every test-set system against the plain baseline and the reference arm (seed 0)
cd /work/main && . /work/main/.venv/bin/activate
# "run label segments" for every model of the test evals (eval.py's results.json maps its labels to checkpoints)
python3 - > /tmp/test-systems.txt <<'PY'
import json, pathlib
for out in ("eval-test-a", "eval-test-b", "eval-test-c"):
    p = pathlib.Path("/work/runs") / out / "results.json"
    if not p.exists(): continue
    for label, path in json.load(open(p))["models"].items():
        run = "plain" if label.endswith("+plain") else pathlib.Path(path).parent.name
        print(run, label, f"/work/runs/{out}/{label}/en_fr_test/segments.jsonl")
PY
cat /tmp/test-systems.txt
seg() { awk -v r="$1" '$1 == r {print $3}' /tmp/test-systems.txt; }
plain=$(seg plain); ref=$(seg ref-s0)
out=/work/runs/bootstrap.txt; : > $out
for sys in ref-s0 ref-s1 ref-s1-checks self-a self-b self-c-k10 self-c-ema90 self-c-ema90-s1 self-d; do
  s=$(seg $sys); [ -n "$s" ] || continue
  base=("$plain"); [ "$sys" = ref-s0 ] || base+=("$ref")
  echo "### $sys ($(awk -v r=$sys '$1 == r {print $2}' /tmp/test-systems.txt))" >> $out
  echo "\$ python scripts/paired_bootstrap.py ${s#/work/runs/} ${base[*]#/work/runs/}" >> $out
  python scripts/paired_bootstrap.py "$s" "${base[@]}" >> $out 2>&1
done
cat $out
