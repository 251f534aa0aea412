"""scripts/guard_table.py: the ten-step table of a self-rewarding run, by hand on a run written here."""
import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import guard_table  # noqa: E402


def write_run(run: Path, steps: int, placeholder_from: int, dead_from: int, packed: bool = False):
    """4 rollouts a step of en->fr, in French; from step `placeholder_from` two of them answer 'answer here', one
    copies the source (case and spaces aside) and one answers in Spanish; from step `dead_from` every judgement
    fails and every group ties."""
    run.mkdir()
    metrics, samples = [], []
    for step in range(1, steps + 1):
        dead = step >= dead_from
        metrics.append({"step": step, "format_valid_rate": 1.0, "judge_parse_failure_rate": 1.0 if dead else 0.2,
                        "zero_spread_groups": 1.0 if dead else 0.5, "self_ref_pairwise": None if dead else 0.5,
                        "self_ref_pairs": 0 if dead else 2, "answer_check_fail_copy": 0.25})
        for k in range(4):
            hacked = ["answer here", "answer here", "the cat  SLEEPS on the mat.",
                      "El gato duerme tranquilamente sobre la alfombra del salón."]
            answer = hacked[k] if step >= placeholder_from else "Le chat dort sur le tapis."
            samples.append({"step": step, "src": "The cat sleeps on the mat.", "src_lang": "en", "tgt_lang": "fr",
                            "response": f"<think>x</think> <answer>{answer}</answer>"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    text = "".join(json.dumps(s) + "\n" for s in samples)
    if packed:
        (run / "samples.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (run / "samples.jsonl").write_text(text)


def test_ten_step_windows_and_the_collapse_stop(tmp_path):
    write_run(tmp_path / "hacked", steps=25, placeholder_from=11, dead_from=4)
    write_run(tmp_path / "packed", steps=12, placeholder_from=30, dead_from=30, packed=True)
    hacked, packed = (guard_table.summarize(tmp_path / name, "chat", patience=20) for name in ("hacked", "packed"))
    assert [w["steps"] for w in hacked["windows"]] == ["1-10", "11-20", "21-25"]
    assert [w["placeholder"] for w in hacked["windows"]] == [0.0, 0.5, 0.5]
    # read from the responses as well: the copied source (case aside), the Spanish answer (a same-script language)
    assert [w["copy"] for w in hacked["windows"]] == [0.0, 0.25, 0.25]
    assert [w["lang"] for w in hacked["windows"]] == [0.0, 0.25, 0.25]
    assert hacked["windows"][0]["judge_parse_failure"] == (3 * 0.2 + 7 * 1.0) / 10
    assert hacked["windows"][0]["self_ref_pairs"] == 6 and hacked["windows"][1]["self_ref_pairwise"] is None
    assert hacked["windows"][0]["fail_copy"] == 0.25
    assert hacked["collapse_stop"] == 23  # steps 4..23: twenty in a row at judge failures 1.0
    assert packed["collapse_stop"] is None and packed["windows"][1]["placeholder"] == 0.0
    table = guard_table.markdown([hacked, packed])
    assert "| hacked | 11-20 | 0.50 | 0.25 | 0.25 |" in table
    assert "stops it after step 23" in table and "never stops it" in table


def test_out_naming_a_runs_log_is_refused(tmp_path):
    write_run(tmp_path / "run", steps=3, placeholder_from=30, dead_from=30)
    for log in ("metrics.jsonl", "samples.jsonl"):
        before = (tmp_path / "run" / log).read_bytes()
        with pytest.raises(SystemExit, match=f"--out .*{log}: is one of the runs' logs"):
            guard_table.main([str(tmp_path / "run"), "--out", str(tmp_path / "run" / log)])
        assert (tmp_path / "run" / log).read_bytes() == before
