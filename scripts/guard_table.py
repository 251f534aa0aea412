"""Self-rewarding runs, ten steps at a time: how often the actor answered with the template's placeholder, a copy of
its source or another language than the target, how often each answer check refused an answer, how often the judge
failed, how often groups tied, whether the judge still ranked like chrF, and the step at which --stop-on-collapse
would stop (or stopped) the run. RESULTS.md section 6.

    python scripts/guard_table.py out/self-a out/self-b ... --template chat --out results/guards.json

Reads each run's metrics.jsonl and samples.jsonl, or samples.jsonl.gz as results/ keeps it (every rollout logged:
--log-samples >= prompts x group size).
The placeholder, copy and language shares are read from the responses themselves (judge.check_answer's rules on
the extracted answer, each counted under the first it fails; a response with no answer counts as none of them), so
they compare a run that refused such answers with one that rewarded them, or one that never checked (a
reference-reward run). The `fails <check>` columns are what a run's own --answer-checks refused, from its
metrics.jsonl.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules, run from anywhere
import judge  # noqa: E402
from data import DataError, parse_jsonl, read_jsonl  # noqa: E402
from ssr import COLLAPSE_AT, collapse_metric  # noqa: E402

WINDOW = 10
READ_RULES = ("placeholder", "copy", "lang")  # judge.check_answer's rules applied to every logged answer


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def collapse_step(metrics: list[dict], patience: int) -> int | None:
    """The first step at which the trainer's own rule (ssr.collapse_metric) stops, or would stop, the run."""
    signal = [{k: m.get(k) for k in COLLAPSE_AT} for m in metrics]
    return next((m["step"] for end, m in enumerate(metrics, 1) if collapse_metric(signal[:end], patience)), None)


def summarize(run: Path, template: str, patience: int) -> dict:
    metrics = [row for _, row in read_jsonl(run / "metrics.jsonl", drop_cut_last=True)]
    packed = run / "samples.jsonl.gz"
    samples = [row for _, row in (parse_jsonl(packed, gzip.decompress(packed.read_bytes()), drop_cut_last=True)
                                  if packed.exists() else read_jsonl(run / "samples.jsonl", drop_cut_last=True))]
    windows = []
    for start in range(1, metrics[-1]["step"] + 1, WINDOW):
        steps = range(start, start + WINDOW)
        ms = [m for m in metrics if m["step"] in steps]
        rollouts = [s for s in samples if s["step"] in steps]
        answers = [judge.extract_answer(s["response"]) for s in rollouts]
        # the first rule each answer fails, in check_answer's order: a copied English source is a copy, not also
        # a wrong language, so the shares add up
        first = [a and judge.check_answer(a, s["src"], s["src_lang"], s["tgt_lang"], READ_RULES, template)
                 for a, s in zip(answers, rollouts)]
        read = {rule: mean(f == rule for f in first) for rule in READ_RULES}
        windows.append({
            "steps": f"{start}-{ms[-1]['step']}",
            "rollouts": len(rollouts),
            **read,
            **{f"fail_{c}": mean(m.get(f"answer_check_fail_{c}") for m in ms) for c in judge.ANSWER_CHECKS
               if any(f"answer_check_fail_{c}" in m for m in ms)},
            "format_valid": mean(m["format_valid_rate"] for m in ms),
            "judge_parse_failure": mean(m["judge_parse_failure_rate"] for m in ms),
            "zero_spread": mean(m["zero_spread_groups"] for m in ms),
            "self_ref_pairwise": mean(m.get("self_ref_pairwise") for m in ms),
            "self_ref_pairs": sum(m.get("self_ref_pairs") or 0 for m in ms),
        })
    return {"run": run.name, "steps": metrics[-1]["step"], "collapse_stop": collapse_step(metrics, patience),
            "windows": windows}


def markdown(summaries: list[dict], patience: int = 20) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    checks = [c for c in judge.ANSWER_CHECKS if any(f"fail_{c}" in w for s in summaries for w in s["windows"])]
    head = ["run", "steps", "placeholder", "copy", "wrong lang", *(f"fails {c}" for c in checks), "valid",
            "judge fails", "zero-spread", "judge~chrF (pairs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in summaries:
        for w in s["windows"]:
            lines.append("| " + " | ".join([s["run"], w["steps"], *(fmt(w[rule]) for rule in READ_RULES),
                                            *(fmt(w.get(f"fail_{c}")) for c in checks), fmt(w["format_valid"]),
                                            fmt(w["judge_parse_failure"]), fmt(w["zero_spread"]),
                                            f"{fmt(w['self_ref_pairwise'])} ({w['self_ref_pairs']})"]) + " |")
    lines.append("")
    lines += [f"- {s['run']}: {s['steps']} steps; --stop-on-collapse {patience} "
              + (f"stops it after step {s['collapse_stop']}" if s["collapse_stop"] else "never stops it")
              for s in summaries]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl and samples.jsonl)")
    ap.add_argument("--template", default="chat", choices=judge.TEMPLATES, help="the runs' --template")
    ap.add_argument("--patience", type=int, default=20, help="--stop-on-collapse to evaluate (default 20)")
    ap.add_argument("--out", type=Path, help="also write the summaries as JSON here")
    args = ap.parse_args(argv)
    inputs = {(run / name).resolve() for run in args.runs
              for name in ("metrics.jsonl", "samples.jsonl", "samples.jsonl.gz")}
    if args.out and args.out.resolve() in inputs:  # the JSON must not replace a log it summarizes
        sys.exit(f"guard_table: error: --out {args.out}: is one of the runs' logs; give a new file, e.g. guards.json")
    try:
        summaries = [summarize(run, args.template, args.patience) for run in args.runs]
    except DataError as e:
        sys.exit(f"guard_table: error: {e}")
    print(markdown(summaries, args.patience), end="")
    if args.out:
        args.out.write_text(json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    main()
