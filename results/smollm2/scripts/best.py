"""best.py RUN: the checkpoint of /work/runs/RUN with the highest validation chrF (ties: the earliest step)."""
import json, sys
r = json.load(open(f"/work/runs/eval-val-{sys.argv[1]}/results.json"))
label = max(r["results"], key=lambda m: (r["results"][m]["en_fr_val"]["scores"]["chrf"], -int(m.split("_")[1])))
print(r["models"][label])
