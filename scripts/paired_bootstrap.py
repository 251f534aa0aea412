"""Paired bootstrap of corpus chrF and BLEU between eval.py outputs: is a system's gain over a baseline real?

    python scripts/paired_bootstrap.py out/eval/step_40/en_fr_test/segments.jsonl \
        out/eval/smollm2+plain/en_fr_test/segments.jsonl out/eval/smollm2/en_fr_test/segments.jsonl

The first segments.jsonl is the system, every further one a baseline (all from one test set, rows in the same
order). For each baseline: the system's corpus score minus the baseline's, a 95% interval of that difference
and sacrebleu's own paired-bootstrap p-value (sacrebleu.significance.PairedTest, test_type "bs", as
`sacrebleu --paired-bs`). The interval is read from the same kind of resamples sacrebleu draws (rows drawn with
replacement, n_samples of them, seeded like sacrebleu with SACREBLEU_SEED's default 12345), each scored from
sacrebleu's own sufficient statistics for both systems at once; the 2.5th and 97.5th percentiles of the
differences. chrF uses sacrebleu's defaults, BLEU the target language's tokenizer (data.bleu_tokenizer, as eval.py
and the --ref-metric bleu reward): the language is read from the rows' tgt_lang, which eval.py writes; for files of
an older eval.py without it, --tgt-lang names it. Bad input is one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules, run from anywhere
from data import DataError, bleu_tokenizer, read_jsonl  # noqa: E402

SEED = 12345  # sacrebleu's default SACREBLEU_SEED for its bootstrap tests


class InputError(ValueError):
    """A missing or malformed segments.jsonl; the message names the file and line."""


def read_segments(path: Path) -> tuple[list[str], list[str], set[str]]:
    """(hypotheses, references, the target languages its rows name) of one eval.py segments.jsonl, in row order."""
    try:
        found = read_jsonl(path, drop_cut_last=True)  # eval.py appends per batch: a line cut by a kill is not a row
    except DataError as e:
        raise InputError(str(e)) from None
    rows = []
    for where, row in found:
        if not all(isinstance(row.get(k), str) for k in ("hyp", "ref")):
            raise InputError(f"{where}: expected an object with string 'hyp' and 'ref'")
        if not isinstance(row.get("tgt_lang", ""), str):
            raise InputError(f"{where}: 'tgt_lang' is {row['tgt_lang']!r}, not a language code")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no segments")
    rows.sort(key=lambda r: r.get("i", 0))  # eval.py appends per batch; "i" is the row of the test set
    # rows of an older eval.py (before a resume) carry none: the others say what the set is
    return [r["hyp"] for r in rows], [r["ref"] for r in rows], {r["tgt_lang"] for r in rows if "tgt_lang" in r}


def difference_interval(metric, sys_hyps: list[str], base_hyps: list[str], refs: list[str],
                        n_samples: int) -> tuple[float, float]:
    """95% percentile interval of corpus(system) - corpus(baseline) over paired resamples of the rows."""
    idxs = np.random.default_rng(SEED).choice(len(refs), size=(n_samples, len(refs)), replace=True)
    sys_stats = np.array(metric._extract_corpus_statistics(sys_hyps, [refs]), dtype="float32")
    base_stats = np.array(metric._extract_corpus_statistics(base_hyps, [refs]), dtype="float32")
    diffs = np.array([metric._compute_score_from_stats(sys_stats[i].sum(0)).score
                      - metric._compute_score_from_stats(base_stats[i].sum(0)).score for i in idxs])
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def target_language(paths: list[Path], languages: list[set[str]], given: str | None) -> str:
    """The one target language of the files' rows, or --tgt-lang for files that name none; never a guess."""
    named = set().union(*languages)
    if len(named) > 1:
        where = ", ".join(f"{p}: {' '.join(sorted(langs))}" for p, langs in zip(paths, languages) if langs)
        raise InputError(f"the rows name several target languages ({where}); compare files of one test set")
    if given is not None and named and given not in named:
        raise InputError(f"--tgt-lang {given}: the rows say tgt_lang {named.pop()}")
    if given is None and not named:
        raise InputError(f"{paths[0]}: its rows carry no tgt_lang (written by an older eval.py); give --tgt-lang CODE, "
                         f"which picks BLEU's tokenizer")
    return given or named.pop()


def compare(paths: list[Path], tgt_lang: str | None, n_samples: int) -> list[dict]:
    systems = [(str(p.parent.parent.name), *read_segments(p)) for p in paths]
    name, sys_hyps, refs, _ = systems[0]
    for p, (_, hyps, other_refs, _) in zip(paths[1:], systems[1:]):
        if other_refs != refs:
            raise InputError(f"{p}: not the same test set as {paths[0]} (references differ)")
    tokenize = bleu_tokenizer(target_language(paths, [langs for *_, langs in systems], tgt_lang))
    metrics = {"chrF": CHRF(), "BLEU": BLEU(tokenize=tokenize)}
    out = []
    for base_name, base_hyps, _, _ in systems[1:]:
        test = PairedTest([(base_name, base_hyps), (name, sys_hyps)], metrics, [refs], test_type="bs",
                          n_samples=n_samples)
        _, results = test()  # {"System": [names], then per metric, in the order given: [Result per system]}
        per_metric = [v for k, v in results.items() if k != "System"]
        for (metric_name, metric), (base, system) in zip(metrics.items(), per_metric):
            lo, hi = difference_interval(metric, sys_hyps, base_hyps, refs, n_samples)
            out.append({"system": name, "baseline": base_name, "metric": metric_name, "system_score": system.score,
                        "baseline_score": base.score, "difference": system.score - base.score,
                        "ci_low": lo, "ci_high": hi, "p_value": system.p_value})
    return out


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, not argparse's usage block
        self.exit(2, f"paired_bootstrap: error: {message}\n")


def main(argv=None):
    p = Parser(prog="paired_bootstrap", description=__doc__.split("\n\n")[0])
    p.add_argument("segments", nargs="+", type=Path, help="eval.py segments.jsonl: the system, then baselines")
    p.add_argument("--tgt-lang", metavar="CODE",
                   help="the target language, for files whose rows carry no tgt_lang (an older eval.py's); it picks "
                        "BLEU's tokenizer as eval.py does")
    p.add_argument("--n-samples", type=int, default=1000, help="bootstrap resamples, >= 1 (sacrebleu's default 1000)")
    args = p.parse_args(argv)
    if len(args.segments) < 2:
        p.error("give the system's segments.jsonl and at least one baseline's")
    if args.n_samples < 1:
        p.error(f"--n-samples {args.n_samples}: must be an integer >= 1")
    try:
        rows = compare(args.segments, args.tgt_lang, args.n_samples)
    except (InputError, DataError) as e:  # DataError: an unknown language, a BLEU tokenizer this machine lacks
        p.error(str(e))
    print("| system | baseline | metric | system | baseline | difference | 95% interval | p (sacrebleu) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['system']} | {r['baseline']} | {r['metric']} | {r['system_score']:.2f} | {r['baseline_score']:.2f} "
              f"| {r['difference']:+.2f} | [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p_value']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
