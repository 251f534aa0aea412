"""The bundled English->French sets (data/README.md): valid rows, the sizes the experiment needs, and no source
shared between sets, so the held-out test set and the validation set never leak into training or each other."""
import json
import re
from pathlib import Path

import pytest

import ssr

DATA = Path(__file__).resolve().parent.parent / "data"
# file -> (fewest rows, rows carry references)
SETS = {"en_fr_train.jsonl": (120, False), "en_fr_dev.jsonl": (48, True), "en_fr_train_refs.jsonl": (200, True),
        "en_fr_val.jsonl": (60, True), "en_fr_test.jsonl": (200, True)}


def sources(name):
    return [json.loads(line)["src"] for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", SETS)
def test_each_set_is_valid_training_data(name):
    """Every row passes the trainer's own checks (a reference on every row where the set has them), the
    sentences are short (4-14 words) and none repeats within its set."""
    least, with_refs = SETS[name]
    rows, _ = ssr.load_data(str(DATA / name), need_ref=with_refs)
    assert len(rows) >= least
    assert all((r["src_lang"], r["tgt_lang"]) == ("en", "fr") for r in rows)
    assert all(4 <= len(r["src"].split()) <= 14 for r in rows)
    keys = [r["src"].strip().lower() for r in rows]
    assert len(set(keys)) == len(keys), [k for k in keys if keys.count(k) > 1]
    if with_refs:
        # a reference is French, not the source copied: it differs from it and holds no stray tag or tab
        assert all(r["ref"] != r["src"] and not re.search(r"[<>\t]", r["ref"]) for r in rows)


def test_sets_share_no_source():
    seen = {}
    for name in SETS:
        for src in sources(name):
            key = " ".join(src.lower().split())
            assert key not in seen, f"{src!r} is in both {seen[key]} and {name}"
            seen[key] = name
