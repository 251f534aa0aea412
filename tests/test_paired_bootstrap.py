"""scripts/paired_bootstrap.py: corpus scores are sacrebleu's, the interval brackets the difference, the p-value is
sacrebleu's own paired bootstrap; bad input is one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import CHRF
from sacrebleu.significance import PairedTest

ROOT = Path(__file__).resolve().parent.parent
REFS = ["Il fait beau aujourd'hui.", "Le chat dort sur le canapé.", "Je bois du thé.", "La porte est ouverte."] * 6
GOOD = ["Il fait beau.", "Le chat dort.", "Je bois du thé.", "La porte est fermée."] * 6
POOR = ["beau", "chat canapé", "thé", "Porte ouverte."] * 6


def write_segments(path, hyps):
    path.parent.mkdir(parents=True)
    # eval.py appends per batch; the script puts rows back in test-set order by "i"
    rows = [{"i": i, "src": "x", "ref": r, "hyp": h} for i, (h, r) in enumerate(zip(hyps, REFS))]
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
