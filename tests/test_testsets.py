"""testsets.py: local text and jsonl sets, Flores in both layouts, WMT from the sacrebleu cache (wmt24:zh-en
reversed), and the one-line errors when a set cannot be had. Offline: the sacrebleu cache is written by hand."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
import testsets
from conftest import write_sacrebleu_cache
from data import DataError

ROOT = Path(__file__).resolve().parents[1]
SRCS = ["the cat is on the mat.", "the weather is good today.", "hello world", "a dog and a cat."]
REFS = ["猫在垫子上。", "今天天气很好。", "你好，世界", "一只狗和一只猫。"]


def write_local(tmp_path, srcs, refs):
    (tmp_path / "test.en").write_text("\n".join(srcs) + "\n", encoding="utf-8")
    (tmp_path / "test.zh").write_text("\n".join(refs) + "\n", encoding="utf-8")


def test_local_text_and_jsonl(tmp_path):
    srcs = SRCS[:2] + ["a line\u2028with a line separator"]  # must not split: str.splitlines would
    refs = REFS[:2] + ["一行"]
    write_local(tmp_path, srcs, refs)
    text = testsets.load_local_set(str(tmp_path / "test.en"), str(tmp_path / "test.zh"), "en", "zh")
    assert (text.name, text.src_lang, text.tgt_lang, text.srcs, text.refs) == ("test", "en", "zh", srcs, refs)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"src": s, "ref": r, "src_lang": "en", "tgt_lang": "zh"}, ensure_ascii=False)
                             + "\n" for s, r in zip(srcs, refs)), encoding="utf-8")
    js = testsets.load_local_set(str(jsonl), None, None, None)
    assert (js.name, js.src_lang, js.tgt_lang, js.srcs, js.refs) == ("mine", "en", "zh", srcs, refs)

    (tmp_path / "short.zh").write_text("一\n", encoding="utf-8")
    with pytest.raises(testsets.TestSetError, match="3 sources but 1 references"):
        testsets.load_local_set(str(tmp_path / "test.en"), str(tmp_path / "short.zh"), "en", "zh")
    with pytest.raises(testsets.TestSetError, match="needs --ref, --src-lang and --tgt-lang"):
        testsets.load_local_set(str(tmp_path / "test.en"), str(tmp_path / "test.zh"), "en", None)
    with pytest.raises(DataError, match="unknown language"):
        testsets.load_local_set(str(tmp_path / "test.en"), str(tmp_path / "test.zh"), "en", "xx")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"src": "a", "ref": "b", "src_lang": "en", "tgt_lang": "zh"}\n'
                     '{"src": "c", "ref": "d", "src_lang": "zh", "tgt_lang": "en"}\n')
    with pytest.raises(testsets.TestSetError, match="mixes directions"):
        testsets.load_local_set(str(mixed), None, None, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a", "src_lang": "en", "tgt_lang": "zh"}\n')
    with pytest.raises(testsets.TestSetError, match="bad.jsonl:1: lacks ref"):
        testsets.load_local_set(str(bad), None, None, None)
    (tmp_path / "gap.en").write_text("a\n\nc\n")
    with pytest.raises(testsets.TestSetError, match="segment 2 has an empty source"):
        testsets.load_local_set(str(tmp_path / "gap.en"), str(tmp_path / "gap.en"), "en", "zh")


def test_flores_layouts(tmp_path, monkeypatch):
    en, zh = ["Sentence one.", "Sentence two."], ["第一句。", "第二句。"]
    # the FLORES-200 release: flores200_dataset/devtest/<code>.devtest, found from the folder above it or inside it
    release = tmp_path / "release" / "flores200_dataset" / "devtest"
    release.mkdir(parents=True)
    (release / "eng_Latn.devtest").write_text("\n".join(en) + "\n", encoding="utf-8")
    (release / "zho_Hans.devtest").write_text("\n".join(zh) + "\n", encoding="utf-8")
    (release / "zho_Hant.devtest").write_text("第一句。\n第二句。\n", encoding="utf-8")  # never the traditional one
    for root in (tmp_path / "release", tmp_path / "release" / "flores200_dataset"):
        ts = testsets.load_named_set("flores:en-zh", str(root))
        assert (ts.src_lang, ts.tgt_lang, ts.srcs, ts.refs) == ("en", "zh", en, zh)
        ts = testsets.load_named_set("flores:zh-en", str(root))
        assert (ts.src_lang, ts.tgt_lang, ts.srcs, ts.refs) == ("zh", "en", zh, en)
    # flores_plus: devtest/<code>.jsonl with the text under "text", Chinese as cmn_Hans
    plus = tmp_path / "plus" / "devtest"
    plus.mkdir(parents=True)
    for code, texts in (("eng_Latn", en), ("cmn_Hans", zh)):
        (plus / f"{code}.jsonl").write_text("".join(json.dumps({"id": i, "iso_639_3": code[:3], "text": t},
                                                               ensure_ascii=False) + "\n"
                                                    for i, t in enumerate(texts)), encoding="utf-8")
    ts = testsets.load_named_set("flores:zh-en", str(tmp_path / "plus"))
    assert (ts.srcs, ts.refs) == (zh, en)
    # the directory from $FLORES_DIR
    monkeypatch.setenv("FLORES_DIR", str(tmp_path / "plus"))
    assert ev.parse_args(["--model", "m"]).flores_dir == str(tmp_path / "plus")
    half = tmp_path / "half" / "devtest"
    half.mkdir(parents=True)
    (half / "eng_Latn.devtest").write_text("\n".join(en) + "\n", encoding="utf-8")
    with pytest.raises(testsets.TestSetError, match="flores:en-zh: no Flores devtest file for zh under"):
        testsets.load_named_set("flores:en-zh", str(tmp_path / "half"))
    with pytest.raises(testsets.TestSetError, match="pass --flores-dir DIR or set FLORES_DIR"):
        testsets.load_named_set("flores:en-zh", None)


def fake_sacrebleu_cache(monkeypatch, tmp_path, corpus, tarball, xml_path, srcs, refs):
    """sacrebleu's cache after an online download (conftest.write_sacrebleu_cache), in a tmp dir instead of
    ~/.sacrebleu."""
    from sacrebleu.dataset import DATASETS

    raw = tmp_path / "sacrebleu" / corpus / "raw"
    write_sacrebleu_cache(tmp_path / "sacrebleu", corpus, tarball, xml_path, "en", "zh", srcs, refs)
    monkeypatch.setattr(DATASETS[corpus], "_outdir", str(raw.parent))
    monkeypatch.setattr(DATASETS[corpus], "_rawdir", str(raw))


def test_wmt_sets_from_the_sacrebleu_cache(tmp_path, monkeypatch):
    fake_sacrebleu_cache(monkeypatch, tmp_path, "wmt23", "wmt23.v.0.1.tar.gz",
                         "wmt23-news-systems-v.0.1/xml/wmttest2023.en-zh.all.xml", SRCS[:2], REFS[:2])
    ts = testsets.load_named_set("wmt23:en-zh", None)
    assert (ts.src_lang, ts.tgt_lang, ts.srcs, ts.refs, ts.note) == ("en", "zh", SRCS[:2], REFS[:2], "")
    # WMT24 has no zh-en: wmt24:zh-en is en-zh run backwards, and says so
    fake_sacrebleu_cache(monkeypatch, tmp_path, "wmt24", "wmt24.data_onlyxml.tar.gz",
                         "xml/wmttest2024.en-zh.all.xml", SRCS[2:4], REFS[2:4])
    ts = testsets.load_named_set("wmt24:zh-en", None)
    assert (ts.src_lang, ts.tgt_lang, ts.srcs, ts.refs) == ("zh", "en", REFS[2:4], SRCS[2:4])
    assert "reversed" in ts.note and "reversed" in ts.origin


def test_unknown_sacrebleu_set_is_a_clear_error():
    with pytest.raises(testsets.TestSetError, match="sacrebleu .* has no test set wmt23 en-ko"):
        testsets.load_named_set("wmt23:en-ko", None)
    with pytest.raises(DataError, match="unknown language code 'xx'"):
        testsets.load_named_set("wmt23:en-xx", None)
    with pytest.raises(testsets.TestSetError, match="expected NAME:SRC-TGT"):
        testsets.load_named_set("wmt23", None)


def test_offline_named_set_is_one_line(tiny_model_dir, tmp_path):
    """A real offline condition: an empty sacrebleu cache, and every download sent to a closed local port
    (connection refused at once, no waiting on network timeouts)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(SACREBLEU=str(tmp_path / "sacrebleu"), http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "eval.py", "--model", str(tiny_model_dir), "--sets", "wmt23:en-zh",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("eval: error: wmt23:en-zh: not in the sacrebleu cache")
    assert "SACREBLEU" in lines[0] and "--src/--ref" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are all there
