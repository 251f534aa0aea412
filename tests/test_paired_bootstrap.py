"""scripts/paired_bootstrap.py: corpus scores are sacrebleu's, the interval brackets the difference, the p-value is
sacrebleu's own paired bootstrap; bad input is one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import CHRF
from sacrebleu.significance import PairedTest

ROOT = Path(__file__).resolve().parent.parent
REFS = ["Il fait beau aujourd'hui.", "Le chat dort sur le canapé.", "Je bois du thé.", "La porte est ouverte."] * 6
GOOD = ["Il fait beau.", "Le chat dort.", "Je bois du thé.", "La porte est fermée."] * 6
POOR = ["beau", "chat canapé", "thé", "Porte ouverte."] * 6


def write_segments(path, hyps, refs=REFS, tgt_lang="fr"):
    path.parent.mkdir(parents=True)
    # eval.py appends per batch; the script puts rows back in test-set order by "i". It writes each row's languages
    # (tgt_lang None: a file of an older eval.py, which did not)
    langs = {"src_lang": "en", "tgt_lang": tgt_lang} if tgt_lang else {}
    rows = [{"i": i, "src": "x", "ref": r, "hyp": h, **langs} for i, (h, r) in enumerate(zip(hyps, refs))]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reversed(rows)))
    return path


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "paired_bootstrap.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_differences_against_sacrebleu(tmp_path):
    good = write_segments(tmp_path / "good" / "test" / "segments.jsonl", GOOD)
    poor = write_segments(tmp_path / "poor" / "test" / "segments.jsonl", POOR)
    proc = run(good, poor, good, "--n-samples", 200)
    assert proc.returncode == 0, proc.stderr
    rows = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["good", "poor", "chrF"], ["good", "poor", "BLEU"],
                                     ["good", "good", "chrF"], ["good", "good", "BLEU"]]
    chrf = sacrebleu.corpus_chrf(GOOD, [REFS]).score - sacrebleu.corpus_chrf(POOR, [REFS]).score
    bleu = sacrebleu.corpus_bleu(GOOD, [REFS]).score - sacrebleu.corpus_bleu(POOR, [REFS]).score
    for row, expected in zip(rows[:2], (chrf, bleu)):
        difference = float(row[5])
        low, high = map(float, row[6].strip("[]").split(", "))
        assert abs(difference - expected) < 0.006 and low <= difference <= high and low > 0
    _, results = PairedTest([("poor", POOR), ("good", GOOD)], {"chrF": CHRF()}, [REFS], test_type="bs",
                            n_samples=200)()
    assert rows[0][7] == f"{results['chrF2'][1].p_value:.4f}"  # sacrebleu's own p-value, same seed
    # a system against itself: no difference in any resample
    assert [r[5:7] for r in rows[2:]] == [["+0.00", "[+0.00, +0.00]"]] * 2


def test_bad_input_is_one_line(tmp_path):
    good = write_segments(tmp_path / "good" / "test" / "segments.jsonl", GOOD)
    other = write_segments(tmp_path / "other" / "test" / "segments.jsonl", GOOD[:-1] + ["x"])
    other.write_text(other.read_text().replace(json.dumps(REFS[-1], ensure_ascii=False), '"autre"', 1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hyp": "a", "ref": "b"}\n{"hyp": 1}\n')
    for args, message in [((good,), "give the system's segments.jsonl and at least one baseline's"),
                          ((good, tmp_path / "none.jsonl"), "none.jsonl: cannot read"),
                          ((good, bad), "bad.jsonl:2: expected an object with string 'hyp' and 'ref'"),
                          ((good, other), "not the same test set")]:
        proc = run(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("paired_bootstrap: error: ") and message in line, line


def test_segments_hold_any_text_and_a_cut_last_line_is_no_row(tmp_path):
    """Hypotheses holding U+2028, U+2029 or U+0085 (json.dumps(ensure_ascii=False), eval.py's writer, leaves them
    raw) are one row each; a last line an interrupted eval.py cut short is not a row."""
    odd = [h.replace(" ", c, 1) for h, c in zip(GOOD, ["\u2028", "\u2029", "\u0085"] * 8)]
    system = write_segments(tmp_path / "odd" / "test" / "segments.jsonl", odd)
    with open(system, "ab") as f:
        f.write('{"i": 24, "src": "x", "ref": "caf'.encode() + "é".encode()[:1])
    proc = run(system, system, "--n-samples", 10)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(" | ")[5:7] for line in proc.stdout.splitlines()[2:]] == [["+0.00", "[+0.00, +0.00]"]] * 2


def table(proc) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()[2:]]


def test_interval_is_the_95_percent_one_of_the_same_resamples(tmp_path):
    """The printed interval, recomputed independently: the same resamples (rows drawn with replacement, numpy's
    generator seeded with sacrebleu's 12345), each scored by sacrebleu.corpus_chrf itself, and numpy's 2.5th and
    97.5th percentiles of the differences. The 5th/95th (a 90% interval) would print other numbers."""
    good = write_segments(tmp_path / "good" / "test" / "segments.jsonl", GOOD)
    poor = write_segments(tmp_path / "poor" / "test" / "segments.jsonl", POOR)
    n = 200
    chrf_row = table(run(good, poor, "--n-samples", n))[0]
    low, high = map(float, chrf_row[6].strip("[]").split(", "))
    idxs = np.random.default_rng(12345).choice(len(REFS), size=(n, len(REFS)), replace=True)
    diffs = [sacrebleu.corpus_chrf([GOOD[i] for i in idx], [[REFS[i] for i in idx]]).score
             - sacrebleu.corpus_chrf([POOR[i] for i in idx], [[REFS[i] for i in idx]]).score for idx in idxs]
    assert (low, high) == pytest.approx((np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)), abs=0.006)
    ninety = (np.percentile(diffs, 5), np.percentile(diffs, 95))
    assert abs(low - ninety[0]) > 0.1 and abs(high - ninety[1]) > 0.1  # so the test can tell the two apart


@pytest.mark.parametrize("lang, refs, good, poor", [
    ("zh", ["今天天气很好。", "猫在垫子上睡觉。"], ["今天天气很好。", "猫在垫子上。"], ["天气。", "猫睡觉。"]),
    ("ja", ["今日はとても良い天気ですね。", "猫がマットの上で寝ています。"], ["今日はとても良い天気です。", "猫がマットの上にいます。"],
     ["天気。", "猫。"]),
])
def test_bleu_tokenizer_follows_the_target_language(tmp_path, lang, refs, good, poor):
    """Chinese and Japanese output: BLEU with the target language's tokenizer (zh, ja-mecab), read from the rows'
    tgt_lang as eval.py writes it; under 13a both systems scored 0.00 and their difference +0.00."""
    refs, good, poor = refs * 6, good * 6, poor * 6
    files = [write_segments(tmp_path / name / "test" / "segments.jsonl", hyps, refs, lang)
             for name, hyps in (("good", good), ("poor", poor))]
    bleu = table(run(*files, "--n-samples", 50))[1]
    tokenize = {"zh": "zh", "ja": "ja-mecab"}[lang]
    scores = [sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score for hyps in (good, poor)]
    assert bleu[2] == "BLEU" and [float(bleu[3]), float(bleu[4])] == pytest.approx(scores, abs=0.006)
    assert scores[0] - scores[1] > 10 and sacrebleu.corpus_bleu(good, [refs]).score == 0  # 13a: one "word" each


def test_target_language_from_the_rows_or_the_flag(tmp_path):
    """Files of an older eval.py carry no tgt_lang: --tgt-lang names it, else one line says so; the flag may not
    contradict the rows, and files naming two languages are refused."""
    old = [write_segments(tmp_path / name / "test" / "segments.jsonl", GOOD, tgt_lang=None) for name in ("a", "b")]
    proc = run(*old)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"paired_bootstrap: error: {old[0]}: its rows carry no tgt_lang (written by an older eval.py); give --tgt-lang "
        f"CODE, which picks BLEU's tokenizer"]
    assert table(run(*old, "--tgt-lang", "fr", "--n-samples", 20))[1][2] == "BLEU"
    french = write_segments(tmp_path / "fr" / "test" / "segments.jsonl", POOR)
    japanese = write_segments(tmp_path / "ja" / "test" / "segments.jsonl", POOR, tgt_lang="ja")
    for args, message in [((old[0], french, "--tgt-lang", "de"), "--tgt-lang de: the rows say tgt_lang fr"),
                          ((french, japanese), f"the rows name several target languages ({french}: fr, {japanese}: ja)"),
                          ((old[0], old[1], "--tgt-lang", "xx"), "unknown language code 'xx'")]:
        proc = run(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith("paired_bootstrap: error: ") and message in line, line


@pytest.mark.parametrize("args, message", [
    (("--n-samples", "0"), "--n-samples 0: must be an integer >= 1"),
    (("--n-samples", "-5"), "--n-samples -5: must be an integer >= 1"),
    (("--tokenize", "foo"), "unrecognized arguments: --tokenize foo"),
    (("--n-samples", "x"), "argument --n-samples: invalid int value: 'x'"),
])
def test_bad_flags_are_one_line(tmp_path, args, message):
    good = write_segments(tmp_path / "good" / "test" / "segments.jsonl", GOOD)
    proc = run(good, good, *args)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"paired_bootstrap: error: {message}"]


def test_no_arguments_is_one_line():
    proc = run()
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "paired_bootstrap: error: the following arguments are required: segments"]
