"""valtable.py RUN...: validation BLEU / chrF per checkpoint, one column a run (RESULTS.md section 6)."""
import json, sys
runs = sys.argv[1:]
res = {r: json.load(open(f"/work/runs/eval-val-{r}/results.json"))["results"] for r in runs}
steps = sorted({int(m.split("_")[1]) for r in runs for m in res[r]})
print("| step | " + " | ".join(runs) + " |"); print("|" + " --- |" * (len(runs) + 1))
for s in steps:
    cells = []
    for r in runs:
        v = res[r].get(f"step_{s}", {}).get("en_fr_val")
        cells.append("" if v is None else f"{v['scores']['bleu']:.2f} / {v['scores']['chrf']:.2f}" + (f" ({v['failed_extractions']} failed)" if v['failed_extractions'] > 1 else ""))
    print(f"| {s} | " + " | ".join(cells) + " |")
