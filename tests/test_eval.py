"""eval.py: translation with resume, metrics, tables, model identity, the CLI and its checks. Offline; tiny models
built in code. The test sets themselves are tested in test_testsets.py."""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sacrebleu

import eval as ev
import judge
import rundir
import testsets
from checkpoint import make_tiny_model
from sampler import Completion, Sampler

ROOT = Path(__file__).resolve().parents[1]
SRCS = ["the cat is on the mat.", "the weather is good today.", "hello world", "a dog and a cat.", "I like it."]
REFS = ["猫在垫子上。", "今天天气很好。", "你好，世界", "一只狗和一只猫。", "我喜欢它。"]


def write_local(tmp_path, srcs=SRCS, refs=REFS):
    (tmp_path / "test.en").write_text("\n".join(srcs) + "\n", encoding="utf-8")
    (tmp_path / "test.zh").write_text("\n".join(refs) + "\n", encoding="utf-8")
    return ["--src", str(tmp_path / "test.en"), "--ref", str(tmp_path / "test.zh"), "--src-lang", "en",
            "--tgt-lang", "zh"]


def read_segments(out, model_label, set_dir="test"):
    path = Path(out) / model_label / set_dir / "segments.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------
# metrics

def test_bleu_chrf_equal_sacrebleu_with_zh_tokenization():
    hyps = ["猫坐在垫子上。", "今天天气很好", "", "一只狗和猫。", "我喜欢。"]
    rows = [{"hyp": h, "ref": r} for h, r in zip(hyps, REFS)]
    zh = ev.corpus_scores(rows, testsets.TestSet("t", "en", "zh", SRCS, REFS, "test"))
    assert zh["bleu"] == sacrebleu.corpus_bleu(hyps, [REFS], tokenize="zh").score
    assert zh["chrf"] == sacrebleu.corpus_chrf(hyps, [REFS]).score
    # the zh tokenizer matters: 13a sees each unspaced Chinese sentence as one word
    assert zh["bleu"] != pytest.approx(sacrebleu.corpus_bleu(hyps, [REFS]).score, abs=1)
    en_hyps, en_refs = ["the cat sat on the mat", "good weather"], ["the cat is on the mat", "the weather is good"]
    en = ev.corpus_scores([{"hyp": h, "ref": r} for h, r in zip(en_hyps, en_refs)],
                          testsets.TestSet("t", "zh", "en", ["x", "y"], en_refs, "test"))
    assert en["bleu"] == sacrebleu.corpus_bleu(en_hyps, [en_refs], tokenize="13a").score
    row = {"hyp": hyps[0], "ref": REFS[0]}
    sent = ev.sentence_scores(row, testsets.TestSet("t", "en", "zh", SRCS, REFS, "test"))
    assert sent["bleu"] == sacrebleu.sentence_bleu(hyps[0], [REFS[0]], tokenize="zh").score

def test_bleu_for_japanese_and_korean_targets_uses_mecab():
    """Japanese and Korean are written without spaces between words: BLEU is sacrebleu's with its MeCab tokenizer
    (data.bleu_tokenizer, as --ref-metric bleu and paired_bootstrap.py), where 13a scored a near-identical Japanese
    answer 0.0."""
    for lang, hyps, refs in (("ja", ["今日はとても良い天気です。", "猫が好きです。"], ["今日はとても良い天気ですね。", "私は猫が好きです。"]),
                             ("ko", ["오늘은 날씨가 아주 좋아요.", "고양이를 좋아해요."], ["오늘은 날씨가 아주 좋네요.", "저는 고양이를 좋아해요."])):
        ts = testsets.TestSet("t", "en", lang, ["x", "y"], refs, "test")
        corpus = ev.corpus_scores([{"hyp": h, "ref": r} for h, r in zip(hyps, refs)], ts)
        assert corpus["bleu"] == sacrebleu.corpus_bleu(hyps, [refs], tokenize=f"{lang}-mecab").score > 30
        sent = ev.sentence_scores({"hyp": hyps[0], "ref": refs[0]}, ts)
        assert sent["bleu"] == sacrebleu.sentence_bleu(hyps[0], [refs[0]], tokenize=f"{lang}-mecab").score > 30
    assert sacrebleu.sentence_bleu("今日はとても良い天気です。", ["今日はとても良い天気ですね。"]).score == 0  # 13a



def fake_comet(path):
    """What parse_metrics checks of a local COMET checkpoint: checkpoints/model.ckpt next to hparams.yaml."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "model.ckpt").write_bytes(b"")
    (path / "hparams.yaml").write_text("")
    return path


def test_parse_metrics(tmp_path):
    kiwi, xcomet = fake_comet(tmp_path / "kiwi"), fake_comet(tmp_path / "XCOMET-XXL")
    ms = ev.parse_metrics(f"xcomet-xxl,cometkiwi-xxl,bleu,chrf,self-judge,kiwi={kiwi},Unbabel/wmt22-comet-da,{xcomet}")
    assert [(m.label, m.comet) for m in ms] == [
        ("xcomet-xxl", "Unbabel/XCOMET-XXL"), ("cometkiwi-xxl", "Unbabel/wmt23-cometkiwi-da-xxl"), ("bleu", None),
        ("chrf", None), ("self-judge", None), ("kiwi", str(kiwi)), ("Unbabel/wmt22-comet-da", "Unbabel/wmt22-comet-da"),
        (str(xcomet), str(xcomet))]
    assert ev.parse_metrics(f"xcomet-xxl={xcomet}")[0].comet == str(xcomet)
    for bad, message in [("bleu,bleu", "twice"), ("bleu=/x", "built in"), ("", "empty"), ("=x", "LABEL=PATH"),
                         ("bleuu", "unknown metric"), (f"kiwi={tmp_path / 'none'}", "no such COMET checkpoint"),
                         (str(tmp_path / "none"), "no such COMET checkpoint"),
                         (f"k={tmp_path}", "not a COMET checkpoint")]:
        with pytest.raises(ev.EvalError, match=message):
            ev.parse_metrics(bad)


def test_model_labels():
    assert list(ev.model_labels(["/a/run1/step_1", "/a/run2/step_1", "/b/base"])) == [
        "run1/step_1", "run2/step_1", "b/base"]
    assert list(ev.model_labels(["/ckpt/Qwen2.5-7B", "/out/step_400"])) == ["Qwen2.5-7B", "step_400"]
    with pytest.raises(ev.EvalError, match="twice"):
        ev.model_labels(["/a/m", "/a/../a/m"])


# ----------------------------------------------------------------------------------------------------
# tables

def test_paper_table_two_models():
    def scores(base):  # distinct numbers per set and metric, so a swapped cell shows
        return {f"{c}:{d}": {"scores": {"cometkiwi-xxl": base + i, "xcomet-xxl": base + i + 0.5}}
                for i, (c, d) in enumerate((c, d) for d in ("zh-en", "en-zh") for c in ("wmt23", "wmt24", "flores"))}
    results = {"base": scores(70.0), "ssr": scores(80.0)}
    del results["ssr"]["flores:en-zh"]  # one cell missing: EN->ZH Avg. must not average the other five
    prompts = {"base": "plain", "ssr": "think"}  # each row says which prompt made its translations
    lines = ev.paper_table(results, prompts).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Model", "Prompt", "ZH→EN WMT23 CometKiwi", "ZH→EN WMT23 XCOMET", "ZH→EN WMT24 CometKiwi",
                      "ZH→EN WMT24 XCOMET", "ZH→EN Flores CometKiwi", "ZH→EN Flores XCOMET", "ZH→EN Avg.",
                      "EN→ZH WMT23 CometKiwi", "EN→ZH WMT23 XCOMET", "EN→ZH WMT24 CometKiwi", "EN→ZH WMT24 XCOMET",
                      "EN→ZH Flores CometKiwi", "EN→ZH Flores XCOMET", "EN→ZH Avg."]
    base = [c.strip() for c in lines[2].strip("|").split("|")]
    ssr = [c.strip() for c in lines[3].strip("|").split("|")]
    # ZH->EN: 70,70.5,71,71.5,72,72.5 -> avg 71.25; EN->ZH: 73..75.5 -> avg 74.25
    assert base == ["base", "plain", "70.00", "70.50", "71.00", "71.50", "72.00", "72.50", "71.25",
                    "73.00", "73.50", "74.00", "74.50", "75.00", "75.50", "74.25"]
    assert ssr == ["ssr", "think", "80.00", "80.50", "81.00", "81.50", "82.00", "82.50", "81.25",
                   "83.00", "83.50", "84.00", "84.50", "–", "–", "–"]
    # a direction nobody evaluated is left out; no paper metric at all: no paper table
    only_en_zh = {"m": {"wmt23:en-zh": {"scores": {"xcomet-xxl": 90.0}}}}
    table = ev.paper_table(only_en_zh, {"m": "think"})
    assert "ZH→EN" not in table and "| m | think | – | 90.00 |" in table
    assert ev.paper_table({"m": {"test": {"scores": {"bleu": 30.0}}}}, {"m": "think"}) == ""


# ----------------------------------------------------------------------------------------------------
# translation: extraction failures, self-judge, COMET, two models; with a scripted sampler

RESPONSES = {  # what the scripted "model" answers per source: valid, or broken in a way training also rejects
    SRCS[0]: " <think>easy</think> <answer>猫坐在垫子上。</answer>",
    SRCS[1]: " <think>hmm</think> 今天天气很好。",  # no <answer>: a failed extraction
    SRCS[2]: "<think></think><answer>你好，世界</answer>",
    SRCS[3]: " <think>a</think> <answer>一只狗和一只猫。</answer> <answer>again</answer>",  # two answers: invalid
    SRCS[4]: " <think>ok</think>\n<answer> 我喜欢它 </answer>",
}
JUDGE = {"猫坐在垫子上。": "<think>good</think> <answer>80</answer>", "": "<think>empty</think> <answer>0</answer>",
         "你好，世界": "<think>fine</think> <answer>ninety</answer>",  # does not parse: scores 0, counted
         "我喜欢它": "<answer>70.5</answer>"}


class ScriptedSampler:
    """Stands in for the sampler (same constructor and generate signature); reads each prompt back to text and
    answers from the scripts above, so every extraction and judgement outcome is known in advance."""
    calls = []

    def __init__(self, model, max_batch_size, max_seq_len, device, dtype, decode="auto"):
        self.max_batch_size = max_batch_size

    def generate(self, prompts, group_size=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
                 stop_token_ids=(), stop_strings=(), tokenizer=None, seed=None):
        assert len(prompts) <= self.max_batch_size and temperature == 0.0 and stop_strings == judge.STOP_STRINGS
        outs = []
        for p in prompts:
            text = tokenizer.decode(p)
            if text.startswith(judge.R1_SYSTEM + "\nUser:\nScore the following translation"):
                translation = text.split('Chinese translation: "')[1].split('"\n')[0]
                response = JUDGE[translation]
            else:
                src = text.split("Chinese:\n")[1].removesuffix("\nAssistant:")
                assert text == judge.actor_prompt(src, "en", "zh")  # the training prompt, exactly
                response = RESPONSES[src]
            ScriptedSampler.calls.append(text)
            # EOS after the response: decoding must skip it, as training does
            tokens = tokenizer.encode(response) + [tokenizer.eos_ids[0]]
            outs.append(Completion(tokens, [0.0] * len(tokens), "stop"))
        return outs


def test_failed_extractions_self_judge_comet_and_two_models(tiny_model_dir, tiny_comet_dir, tiny_comet_ref_dir,
                                                            tmp_path, monkeypatch, capsys):
    import comet

    monkeypatch.setattr(ev, "Sampler", ScriptedSampler)
    other = tmp_path / "other" / Path(tiny_model_dir).name  # same folder name: the labels must tell them apart
    other.parent.mkdir()
    other.symlink_to(tiny_model_dir)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--model", str(other), *write_local(tmp_path), "--out", str(out),
            "--batch-size", "2", "--device", "cpu",
            "--metrics", f"bleu,chrf,kiwi={tiny_comet_dir},xcomet={tiny_comet_ref_dir},self-judge"]
    assert ev.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    labels = list(results["results"])
    name = Path(tiny_model_dir).name
    assert labels == [f"{Path(tiny_model_dir).parent.name}/{name}", f"other/{name}"]
    for label in labels:
        r = results["results"][label]["test"]
        hyps = ["猫坐在垫子上。", "", "你好，世界", "", "我喜欢它"]
        assert (r["segments"], r["failed_extractions"], r["judge_parse_failures"]) == (5, 2, 1)
        assert r["scores"]["bleu"] == sacrebleu.corpus_bleu(hyps, [REFS], tokenize="zh").score
        assert r["scores"]["chrf"] == sacrebleu.corpus_chrf(hyps, [REFS]).score
        # judged: 80, 0 (empty), "ninety" -> 0, 0 (empty), 70.5
        assert r["scores"]["self-judge"] == pytest.approx((80 + 0 + 0 + 0 + 70.5) / 5)
        rows = read_segments(out, label)
        assert [row["hyp"] for row in rows] == hyps
        assert [row["raw"] for row in rows] == [RESPONSES[s] for s in SRCS]  # raw kept, EOS skipped
        assert [row["extracted"] for row in rows] == [True, False, True, False, True]
        # what scripts/paired_bootstrap.py picks BLEU's tokenizer from
        assert {(row["src_lang"], row["tgt_lang"]) for row in rows} == {("en", "zh")}
        assert [row["judge_parsed"] for row in rows] == [True, True, False, True, True]
        assert [row["judge_failure"] for row in rows] == [None, None, "no_number", None, None]
        # COMET: the tiny checkpoints through the real loading path; the oracle is COMET's own predict, x100
        for metric, ckpt, with_ref in (("kiwi", tiny_comet_dir, False), ("xcomet", tiny_comet_ref_dir, True)):
            model = comet.load_from_checkpoint(str(Path(ckpt) / "checkpoints" / "model.ckpt"), local_files_only=True)
            samples = [{"src": s, "mt": h, **({"ref": ref} if with_ref else {})} for s, h, ref in zip(SRCS, hyps, REFS)]
            oracle = model.predict(samples, batch_size=4, gpus=0, progress_bar=False, num_workers=0).scores
            assert [row["scores"][metric] for row in rows] == pytest.approx([100 * s for s in oracle], abs=1e-4)
            assert r["scores"][metric] == pytest.approx(100 * statistics.fmean(oracle), abs=1e-4)
    assert results["sets"]["test"] == {"src_lang": "en", "tgt_lang": "zh", "segments": 5,
                                       "origin": f"{tmp_path / 'test.en'} / {tmp_path / 'test.zh'}", "note": ""}
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out
    assert f"| {labels[1]} | think | test | {results['results'][labels[1]]['test']['scores']['bleu']:.2f} |" in table
    assert "| 2/5 | 0/5 | 1/5 |" in table and "empty translations" in table  # failed, quoted, judge failures
    assert "| fails copy | fails placeholder | fails lang | fails length | fails script |" in table
    # a rerun finds everything on disk: no generation at all, same results
    ScriptedSampler.calls.clear()
    assert ev.main(argv) == 0
    assert ScriptedSampler.calls == []
    assert json.loads((out / "results.json").read_text())["results"] == results["results"]


def test_answers_failing_each_check_are_counted_and_scored_as_written():
    """A column per answer check (judge.check_answer), each check counted on its own over the answers a model gave;
    an empty (failed) extraction fails none; the scores stay those of the text as written."""
    srcs = ["The cat sleeps on the red mat today.", "The weather is nice today.", "I would like a cup of coffee.",
            "We love music very much.", "Open the door, please."]
    hyps = ["The cat sleeps on the red mat today.",  # a copy: also English (lang) and, for French, Latin script
            "answer",  # the placeholder, and far too short
            "Me gustaría tomar una taza de café, por favor.",  # Spanish for a French target
            "",  # a failed extraction: nothing to check
            "Ouvrez la porte, s'il vous plaît."]  # a translation: passes every check
    refs = ["Le chat dort sur le tapis rouge aujourd'hui.", "Il fait beau aujourd'hui.",
            "Je voudrais une tasse de café.", "Nous aimons beaucoup la musique.", "Ouvrez la porte, s'il vous plaît."]
    ts = testsets.TestSet("t", "en", "fr", srcs, refs, "written here")
    rows = [{"src": s, "ref": r, "hyp": h, "extracted": bool(h), "quoted": False, "scores": {}}
            for s, r, h in zip(srcs, refs, hyps)]
    result = ev.summarize(rows, ts, ev.parse_metrics("chrf"), "chat")
    assert result["answer_checks"] == {"copy": 1, "placeholder": 1, "lang": 2, "length": 1, "script": 0}
    assert result["scores"]["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    # a pair without a measured length ratio: no length column for it
    assert "length" not in ev.summarize(rows, testsets.TestSet("t", "en", "de", srcs, refs, "x"),
                                        ev.parse_metrics("chrf"), "chat")["answer_checks"]


def test_quoted_answers_are_counted_and_scored_as_written_unless_stripped(tiny_model_dir, tmp_path, monkeypatch):
    """The quotation-mark artifact: counted in the 'quoted' column, scored as written by default; --strip-quotes
    scores it without the marks, says so in every row, and cannot share an --out with an unstripped run."""
    monkeypatch.setattr(ev, "Sampler", ScriptedSampler)
    monkeypatch.setitem(RESPONSES, SRCS[0], " <think>x</think> <answer>“猫在垫子上。”</answer>")
    monkeypatch.setitem(RESPONSES, SRCS[4], " <think>x</think> <answer>「我喜欢它。」</answer>")
    argv = ["--model", str(tiny_model_dir), *write_local(tmp_path), "--device", "cpu", "--metrics", "bleu,chrf"]
    label = Path(tiny_model_dir).name
    hyps = {False: ["“猫在垫子上。”", "", "你好，世界", "", "「我喜欢它。」"],
            True: ["猫在垫子上。", "", "你好，世界", "", "我喜欢它。"]}
    for strip in (False, True):
        out = tmp_path / f"strip_{strip}"
        assert ev.main(argv + ["--out", str(out)] + ["--strip-quotes"] * strip) == 0
        rows = read_segments(out, label)
        assert [row["hyp"] for row in rows] == hyps[strip]
        assert [row["quoted"] for row in rows] == [True, False, False, False, True]
        results = json.loads((out / "results.json").read_text())
        r = results["results"][label]["test"]
        assert r["quoted"] == 2 and r["scores"]["chrf"] == sacrebleu.corpus_chrf(hyps[strip], [REFS]).score
        prompt = "think+strip-quotes" if strip else "think"
        assert results["prompts"] == {label: prompt} and results["settings"]["strip_quotes"] is strip
        assert f"| {label} | {prompt} | test |" in (out / "table.md").read_text()
        assert "| 2/5 | 2/5 |" in (out / "table.md").read_text()  # failed extractions, quoted
    # stripped and unstripped translations never mix under one --out
    assert ev.main(argv + ["--out", str(tmp_path / "strip_False"), "--strip-quotes"]) == 2


# ----------------------------------------------------------------------------------------------------
# resume after an interrupt, with the real sampler on a tiny model

def test_resume_after_interrupt_equals_a_straight_run(tiny_model_dir, tmp_path, monkeypatch):
    argv = ["--model", str(tiny_model_dir), *write_local(tmp_path), "--batch-size", "2", "--max-new-tokens", "6",
            "--metrics", "bleu,chrf", "--device", "cpu"]
    label = Path(tiny_model_dir).name  # one model: its folder's name labels it
    translated = []
    real_generate = Sampler.generate

    def counting_generate(self, prompts, **kw):
        translated.extend(prompts)
        return real_generate(self, prompts, **kw)

    monkeypatch.setattr(Sampler, "generate", counting_generate)
    assert ev.main(argv + ["--out", str(tmp_path / "straight")]) == 0
    straight = read_segments(tmp_path / "straight", label)
    assert len(translated) == 5

    def interrupted_generate(self, prompts, **kw):
        if translated:  # the second batch: the user presses Ctrl-C
            raise KeyboardInterrupt
        return counting_generate(self, prompts, **kw)

    translated.clear()
    monkeypatch.setattr(Sampler, "generate", interrupted_generate)
    out = tmp_path / "resumed"
    assert ev.main(argv + ["--out", str(out)]) == 130
    path = out / label / "test" / "segments.jsonl"
    assert len(path.read_text().splitlines()) == 2
    with open(path, "a") as f:
        f.write('{"i": 2, "src": "hello')  # a write cut short by a kill: dropped, that segment redone

    translated.clear()
    monkeypatch.setattr(Sampler, "generate", counting_generate)
    assert ev.main(argv + ["--out", str(out)]) == 0
    assert len(translated) == 3  # only the remainder
    assert read_segments(out, label) == straight
    assert (json.loads((out / "results.json").read_text())["results"]
            == json.loads((tmp_path / "straight" / "results.json").read_text())["results"])

    # the sources changed under the same --out: refuse rather than mix two test sets
    write_local(tmp_path, SRCS[:4] + ["something else"], REFS)
    assert ev.main(argv + ["--out", str(out)]) == 2
    # other translation settings under the same --out: refuse too
    write_local(tmp_path)
    assert ev.main(argv + ["--out", str(out), "--template", "chat"]) == 2


# ----------------------------------------------------------------------------------------------------
# the CLI end to end

def test_cli_end_to_end(tiny_model_dir, tiny_comet_dir, tmp_path):
    out, label = tmp_path / "out", Path(tiny_model_dir).name
    proc = subprocess.run(
        [sys.executable, "eval.py", "--model", str(tiny_model_dir), *write_local(tmp_path, SRCS[:2], REFS[:2]),
         "--metrics", f"bleu,chrf,{tiny_comet_dir},self-judge", "--out", str(out), "--batch-size", "2",
         "--max-new-tokens", "6", "--judge-max-new-tokens", "4", "--device", "cpu", "--decode", "sdpa",
         "--template", "ssr"],  # the released checkpoints' prompt (its bytes: tests/test_judge.py)
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "settings.json").read_text())["template"] == "ssr"
    results = json.loads((out / "results.json").read_text())
    r = results["results"][label]["test"]
    assert set(r["scores"]) == {"bleu", "chrf", str(tiny_comet_dir), "self-judge"}
    assert r["segments"] == 2 and 0 <= r["failed_extractions"] <= 2 and 0 <= r["judge_parse_failures"] <= 2
    rows = read_segments(out, label)
    assert [row["src"] for row in rows] == SRCS[:2] and [row["ref"] for row in rows] == REFS[:2]
    for row in rows:
        assert {"hyp", "raw", "extracted", "judge_raw"} <= set(row)
        assert set(row["scores"]) == {"bleu", "chrf", str(tiny_comet_dir), "self-judge"}
    assert (out / "table.md").read_text() in proc.stdout
    assert f"{label} test" in proc.stderr  # the progress bar names model and set


def test_out_held_by_a_live_run_is_refused(tiny_model_dir, tmp_path, capsys):
    """Two evals on one --out would interleave its segment files: the second is refused in one line, naming --out,
    before any model loads; once the first releases it, the --out is free again (and its lock is gone)."""
    import rundir

    out = tmp_path / "out"
    release = rundir.lock(out)  # this test process is the live eval holding --out
    argv = ["--model", str(tiny_model_dir), *write_local(tmp_path, SRCS[:1], REFS[:1]), "--metrics", "chrf",
            "--out", str(out), "--max-new-tokens", "4", "--device", "cpu", "--decode", "sdpa"]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"eval: error: --out {out} is in use by pid {os.getpid()}"), err  # after the set's line
    assert not (out / "settings.json").exists()  # nothing written under another run's lock
    release()
    assert ev.main(argv) == 0
    assert (out / "settings.json").exists() and not (out / ".lock").exists()


def test_bad_input_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLORES_DIR", raising=False)
    for argv, message in [
        (["--model", str(tmp_path / "nope"), *write_local(tmp_path)], "nope"),
        (["--model", str(tiny_model_dir), "--src", str(tmp_path / "missing.en"), "--ref", "x", "--src-lang", "en",
          "--tgt-lang", "zh"], "missing.en: no such file"),
        (["--model", str(tiny_model_dir), "--sets", "flores:en-zh"], "FLORES_DIR"),
        (["--model", str(tiny_model_dir), "--ref", "x"], "need --src"),
    ]:
        assert ev.main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("eval: error:") and message in err[-1], err


# ----------------------------------------------------------------------------------------------------
# every flag checked before any work: one line, exit status 2, no model loaded, nothing written

def bad_flag_cases(tmp_path, model):
    """(what is wrong, argv, what the one error line must say); each argv is a good command but for one thing."""
    local = write_local(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    for name, content in (("garbage", "{not json"), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "settings.json").write_text(content)
    legacy = tmp_path / "legacy" / Path(model).name / "test"  # outputs of an eval.py that wrote no model.json
    legacy.mkdir(parents=True)
    (legacy / "segments.jsonl").write_text("")
    lacking = {}
    for missing in ("config.json", "tokenizer.json", "model.safetensors"):
        lacking[missing] = shutil.copytree(model, tmp_path / f"no_{missing}", ignore=shutil.ignore_patterns(missing))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"src": "a", "ref": "b", "src_lang": "en", "tgt_lang": "zh"}\n')
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps({"src": SRCS[0], "candidates": ["a", "b"]}) + "\n")
    (tmp_path / "broken.jsonl").write_text('{"src": "a", "candidates": ["a", "b"]}\n{"src": \n')

    def run(*flags, out=tmp_path / "out", metrics="bleu", src=local, models=(model,)):
        given_metrics = ["--metrics", metrics] if metrics is not None else []
        return [*(f for m in models for f in ("--model", str(m))), *src, *given_metrics, "--out", str(out),
                "--device", "cpu", *flags]

    def quality(*flags):  # --judge-quality, which takes no --metrics
        return run("--judge-quality", "2", *flags, metrics=None)

    cases = [
        ("unknown metric", run(metrics="bleu,bleuu"), "--metrics bleuu: unknown metric; valid: bleu, chrf"),
        ("missing local COMET path", run(metrics=f"kiwi={tmp_path / 'none'}"), "no such COMET checkpoint"),
        ("a directory that is no COMET checkpoint", run(metrics=f"kiwi={tmp_path}"), "not a COMET checkpoint"),
        ("empty --metrics", run(metrics=""), "--metrics is empty"),
        ("--out is a file", run(out=tmp_path / "file"), "exists and is not a directory"),
        ("--out under a file", run(out=tmp_path / "file" / "sub"), "exists and is not a directory"),
        ("non-JSON settings.json", run(out=tmp_path / "garbage"), "garbage/settings.json"),
        ("non-object settings.json", run(out=tmp_path / "list"), "settings.json is not a JSON object"),
        ("outputs without model.json", run(out=tmp_path / "legacy"), "without a model.json"),
        ("src_lang == tgt_lang", run(src=local[:-1] + ["en"]), "--src-lang/--tgt-lang: src_lang and tgt_lang are both"),
        ("unknown language", run(src=local[:-1] + ["xx"]), "unknown language code 'xx'; known codes: en, zh"),
        ("--ref without --src", run("--ref", "x", src=[]), "need --src"),
        ("jsonl with --ref", run(src=["--src", str(jsonl), "--ref", local[3]]), "drop --ref"),
        ("missing --src file", run(src=["--src", str(tmp_path / "none.jsonl")]), "none.jsonl: no such file"),
        ("bad set name", run("--sets", "wmt23"), "--sets wmt23: expected NAME:SRC-TGT"),
        ("unknown sacrebleu set", run("--sets", "wmt23:en-ko"), "--sets wmt23:en-ko: sacrebleu"),
        ("missing --flores-dir", run("--sets", "flores:en-zh", "--flores-dir", str(tmp_path / "none")),
         "--flores-dir"),
        ("no config.json", run(models=[lacking["config.json"]]), "config.json: no such file"),
        ("no tokenizer.json", run(models=[lacking["tokenizer.json"]]), "tokenizer.json: no such file"),
        ("no weights", run(models=[lacking["model.safetensors"]]), "no *.safetensors weights"),
        ("no model directory", run(models=[tmp_path / "nope"]), "nope: no such checkpoint directory"),
        ("a model twice", run(models=[model, model]), "given twice"),
        ("no --model", run(models=[]), "no model: give --model DIR (the training prompt) or --plain-model DIR"),
        ("--batch-size 0", run("--batch-size", "0"), "--batch-size 0: must be an integer >= 1"),
        ("--max-new-tokens -1", run("--max-new-tokens", "-1"), "--max-new-tokens -1: must be an integer >= 1"),
        ("--comet-batch-size 0", run("--comet-batch-size", "0"), "--comet-batch-size 0: must be"),
        ("--batch-size not an int", run("--batch-size", "x"), "argument --batch-size: invalid int value"),
        ("--temperature < 0", run("--temperature", "-1"), "--temperature -1.0: must be a finite number >= 0"),
        ("--temperature nan", run("--temperature", "nan"), "--temperature nan"),
        ("--seed < 0", run("--seed", "-1"), "--seed -1: must be an integer in [0, 2**63)"),
        ("--template", run("--template", "x"), "argument --template: invalid choice"),
        ("--device", run("--device", "tpu"), "--device tpu: expected cpu, cuda or cuda:N"),
        ("--max-new-tokens too large for memory", run("--max-new-tokens", str(10**12)),
         "--max-new-tokens 1000000000000: "),
        ("--decode kernel without Triton", run("--decode", "kernel"),
         "--decode kernel: Triton runs on CUDA, or on CPU in its interpreter (TRITON_INTERPRET=1); here use auto"),
        # --judge-quality: K candidates a source share the cache; every flag it would not use is refused
        ("--judge-quality K's candidates outgrow memory", run("--judge-quality", "100000", metrics=None),
         "--max-new-tokens 2048: tiny_qwen20's KV cache for --batch-size 64 x --judge-quality 100000 = 6400000 rows"),
        ("--metrics under --judge-quality", run("--judge-quality", "2"),
         "--metrics is not used here: --judge-quality compares the judge with the candidates' reference chrF"),
        ("--strip-quotes under --judge-quality", quality("--strip-quotes"), "--strip-quotes is not used here"),
        ("--comet-batch-size under --judge-quality", quality("--comet-batch-size", "4"),
         "--comet-batch-size is not used here"),
        ("greedy candidates", quality("--temperature", "0"),
         "--temperature 0: --judge-quality samples its 2 candidates per source, and greedy ones would all be the same"),
        *((f"{flag} with --candidates", quality("--candidates", str(candidates), flag, "1"),
           f"{flag} is not used here: --candidates gives the candidates, so none is sampled")
          for flag in ("--temperature", "--seed", "--max-new-tokens")),
        ("a broken --candidates file", quality("--candidates", str(tmp_path / "broken.jsonl")),
         "broken.jsonl:2: not valid JSON"),
    ]
    (tmp_path / "locked").mkdir(mode=0o500)  # root writes there all the same: the test below denies it to root too
    cases.append(("--out not writable", run(out=tmp_path / "locked" / "out"), "locked is not writable"))
    return cases


def test_bad_flags_are_one_line_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capfd):
    def no_model(*args, **kw):
        raise AssertionError("a model was loaded before every flag was checked")

    monkeypatch.setattr(ev, "load_pretrained", no_model)
    monkeypatch.setattr(ev, "load_sets", no_model)  # test data is read only after every flag passed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a test module that runs kernels on CPU may have set it
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and access(path, mode))
    for what, argv, message in bad_flag_cases(tmp_path, tiny_model_dir):
        before = sorted(tmp_path.rglob("*"))
        start = time.monotonic()
        assert ev.main(argv) == 2, what
        seconds = time.monotonic() - start
        out, err = capfd.readouterr()
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("eval: error: ") and message in lines[0], (what, err)
        assert out == "" and seconds < 5, what
        assert sorted(tmp_path.rglob("*")) == before, what  # nothing written, no output folder created


def test_bleu_without_mecab_is_refused_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """BLEU on a Japanese target on a machine without MeCab (the GPU machine installs no requirements; sacrebleu
    marks a failed `import MeCab` by setting its module's MeCab to None, as here): one line, exit status 2, once the
    set is read and before any model loads or anything is written under --out."""
    from sacrebleu.tokenizers import tokenizer_ja_mecab

    def no_model(*args, **kw):
        raise AssertionError("a model was loaded before the sets were checked")

    monkeypatch.setattr(ev, "load_pretrained", no_model)
    out = tmp_path / "out"
    write_local(tmp_path, SRCS[:2], REFS[:2])
    (tmp_path / "test.ja").write_text("猫はマットの上にいます。\n今日は天気がいいです。\n", encoding="utf-8")
    japanese = ["--src", str(tmp_path / "test.en"), "--ref", str(tmp_path / "test.ja"), "--src-lang", "en",
                "--tgt-lang", "ja", "--metrics", "chrf,bleu"]
    ev.bleu_tokenizer.cache_clear()  # a check that passed earlier in this process is remembered
    monkeypatch.setattr(tokenizer_ja_mecab, "MeCab", None)
    assert ev.main(["--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out), *japanese]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "eval: error: --metrics bleu on test: BLEU for Japanese targets needs sacrebleu's ja-mecab tokenizer, which "
        "needs mecab-python3 ipadic (pinned in requirements.txt; pip install -r requirements.txt), or score with chrF "
        "instead")
    assert not out.exists()


def test_candidates_for_another_set_are_refused_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """--candidates written for another set: one line, exit status 2, once the set is read and before any model
    loads or anything is written under --out (it was refused only after the model had loaded)."""
    def no_model(*args, **kw):
        raise AssertionError("a model was loaded before the sets were checked")

    monkeypatch.setattr(ev, "load_pretrained", no_model)
    other_set = tmp_path / "candidates.jsonl"
    other_set.write_text(json.dumps({"src": "another sentence", "candidates": ["a", "b"]}) + "\n")
    out = tmp_path / "out"
    assert ev.main(["--model", str(tiny_model_dir), *write_local(tmp_path), "--device", "cpu", "--out", str(out),
                    "--judge-quality", "2", "--candidates", str(other_set)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"eval: error: --candidates {other_set}: no candidates for 5 "
                                                        f"sources of test, e.g. {SRCS[0]!r}")
    assert not out.exists()


def test_bad_flags_through_the_cli(tiny_model_dir, tmp_path):
    """The same checks as a user meets them: the exit status and stderr of `python eval.py` itself (a few cases,
    run side by side: each process spends ~2 s importing torch)."""
    cases = [c for c in bad_flag_cases(tmp_path, tiny_model_dir)
             if c[0] in ("unknown metric", "--batch-size not an int", "no config.json")]
    procs = [subprocess.Popen([sys.executable, "eval.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _, argv, _ in cases]
    for (what, _, message), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, (what, err)
        assert err.splitlines() == [err.strip()] and err.startswith("eval: error: ") and message in err, (what, err)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# a label's translations belong to one checkpoint, whatever its folder is called

def test_another_checkpoint_under_the_same_label_is_refused(tmp_path, monkeypatch, capsys):
    first = make_tiny_model(tmp_path / "a" / "step_6", seed=0)
    second = make_tiny_model(tmp_path / "b" / "step_6", seed=1)  # other weights, the same folder name
    generated = []
    real_generate = Sampler.generate
    monkeypatch.setattr(Sampler, "generate", lambda self, prompts, **kw: generated.extend(prompts) or
                        real_generate(self, prompts, **kw))
    out = tmp_path / "out"
    flags = [*write_local(tmp_path), "--max-new-tokens", "4", "--metrics", "bleu", "--device", "cpu", "--out", str(out)]
    assert ev.main(["--model", str(first), *flags]) == 0
    rows = read_segments(out, "step_6")
    assert json.loads((out / "step_6" / "model.json").read_text())["path"] == str(first.resolve())
    generated.clear()
    capsys.readouterr()
    # another checkpoint whose folder is also step_6: keyed by name, it would get the first one's translations
    assert ev.main(["--model", str(second), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds the translations of another checkpoint" in err[0] and "another path" in err[0], err
    # the first checkpoint rewritten in place (new weights, same path): refused too
    os.utime(first / "model.safetensors", ns=(1, 1))
    assert ev.main(["--model", str(first), *flags]) == 2
    assert "other weight files" in capsys.readouterr().err
    assert generated == [] and read_segments(out, "step_6") == rows
    assert json.loads((out / "results.json").read_text())["models"] == {"step_6": str(first)}
    # the second checkpoint in an --out of its own: its own translations
    assert ev.main(["--model", str(second), *flags[:-1], str(tmp_path / "out2")]) == 0
    assert len(generated) == len(SRCS) and [r["src"] for r in read_segments(tmp_path / "out2", "step_6")] == SRCS


def test_damaged_segments_and_the_settings_of_a_run_that_wrote_none(tiny_model_dir, tmp_path, capsys):
    """settings.json binds only the outputs made with it: a run that failed before writing a segment does not
    refuse the corrected rerun. A segments.jsonl row edited by hand is named by file and line, with the fix."""
    out, label = tmp_path / "out", Path(tiny_model_dir).name
    argv = ["--model", str(tiny_model_dir), *write_local(tmp_path, SRCS[:2], REFS[:2]), "--metrics", "bleu",
            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"]
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"max_new_tokens": 10**12}))  # left by a failed run
    assert ev.main(argv) == 0
    segments = out / label / "test" / "segments.jsonl"
    rows = read_segments(out, label)
    for damage, problem in ((lambda r: r.pop("scores"), "'scores' missing or not a dict"),
                            (lambda r: r.update(hyp=None), "'hyp' missing or not a str"),
                            (lambda r: r["scores"].update(bleu="12"), "score 'bleu' is '12', not a number")):
        damaged = [dict(r, scores=dict(r["scores"])) for r in rows]
        damage(damaged[1])
        segments.write_text("".join(json.dumps(r) + "\n" for r in damaged))
        capsys.readouterr()
        assert ev.main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"eval: error: {segments}:2: not a segment row eval.py wrote ({problem}); delete the file to translate "
            f"this set again")


def test_segments_and_candidates_read_back_whatever_the_model_wrote(tmp_path):
    """eval.py's own files, written by its writer (rundir.jsonl: json.dumps(ensure_ascii=False), which leaves
    U+2028, U+2029 and U+0085 raw), read back intact: a resumed run's segments and --candidates. A segments line
    cut inside a character by a kill is dropped, from the file too, as a line cut anywhere else."""
    odd = ["un\u2028deux", "trois\u2029quatre", "cinq\u0085six"]
    ts = testsets.TestSet("test", "en", "fr", SRCS[:3], odd, "written here")
    rows = [{"i": i, "src": src, "ref": ref, "hyp": ref, "raw": f"<answer>{ref}</answer>", "extracted": True,
             "finish_reason": "stop", "scores": {"chrf": 100.0}} for i, (src, ref) in enumerate(zip(ts.srcs, ts.refs))]
    segments = tmp_path / "segments.jsonl"
    segments.write_bytes(rundir.jsonl(rows).encode() + '{"i": 3, "hyp": "caf'.encode() + "é".encode()[:1])
    assert rundir.load_rows(segments, ts) == rows
    assert segments.read_text(encoding="utf-8") == rundir.jsonl(rows)
    candidates = tmp_path / "candidates.jsonl"  # as --judge-quality writes it
    candidates.write_text(rundir.jsonl([{"src": src, "candidates": odd} for src in ts.srcs]), encoding="utf-8")
    assert ev.read_candidates(str(candidates), 3) == {src: odd for src in ts.srcs}


# ----------------------------------------------------------------------------------------------------
# sampled outputs depend only on (seed, row); translate and self_judge in memory

def test_sampled_outputs_depend_only_on_seed_and_row(tiny_model_dir, tmp_path):
    """--temperature 1: the same translations under --batch-size 2 and 5 and for a shorter set, and from
    translate() in memory; another --seed gives others."""
    base = ["--model", str(tiny_model_dir), "--max-new-tokens", "8", "--metrics", "bleu,chrf", "--device", "cpu",
            "--temperature", "1.0"]
    label = Path(tiny_model_dir).name
    runs = {}
    for name, batch, srcs, seed in (("b2", 2, SRCS, 0), ("b5", 5, SRCS, 0), ("short", 2, SRCS[2:4], 0),
                                    ("seed1", 5, SRCS, 1)):
        (tmp_path / name).mkdir()
        argv = base + write_local(tmp_path / name, srcs, REFS[:len(srcs)] if name != "short" else REFS[2:4])
        assert ev.main(argv + ["--batch-size", str(batch), "--seed", str(seed), "--out", str(tmp_path / name / "out")]) == 0
        runs[name] = [r["raw"] for r in read_segments(tmp_path / name / "out", label)]
    assert runs["b2"] == runs["b5"] and runs["short"] == runs["b5"][2:4]
    assert runs["seed1"] != runs["b5"]
    tok, model = ev.load_tokenizer(tiny_model_dir), ev.load_pretrained(tiny_model_dir, device="cpu").eval()
    rows = ev.translate(model, tok, SRCS[::-1], "en", "zh", max_new_tokens=8, temperature=1.0, seed=0, batch_size=3)
    assert [r["raw"] for r in rows] == runs["b5"][::-1]
    assert [r["src"] for r in rows] == SRCS[::-1]
    # in-memory self_judge: one verdict per translation, each the text parse of its raw output
    judged = ev.self_judge(model, tok, SRCS, [r["hyp"] for r in rows][::-1], "en", "zh", max_new_tokens=6,
                           batch_size=2)
    assert len(judged) == len(SRCS)
    for j in judged:
        assert (j["score"], j["failure"]) == tuple(judge.parse_judgement(j["raw"]))


# ----------------------------------------------------------------------------------------------------
# --judge-quality

def test_pair_counts_accuracy_and_tau_by_hand():
    from scipy.stats import kendalltau

    # source 1: chrF 10 < 20 < 30, judge 5 < 9 > 7: pairs (1,2) agree, (1,3) agree, (2,3) disagree
    # source 2: chrF 10 = 10 < 40, judge 3, None, 3: (1,2) failed, (1,3) judge tie, (2,3) failed
    # source 3: chrF 50 > 20, judge 1 < 2: disagree
    sources = [{"chrf": [10, 20, 30], "scores": [5, 9, 7], "failures": [None] * 3},
               {"chrf": [10, 10, 40], "scores": [3, None, 3], "failures": [None, "no_tags", None]},
               {"chrf": [50, 20], "scores": [1, 2], "failures": [None, None]}]
    assert ev.pair_counts(sources[1]["chrf"], sources[1]["scores"]) == {"agree": 0, "disagree": 0, "chrf_ties": 0,
                                                                         "judge_ties": 1, "failed": 2}
    stats = ev.quality_stats(sources)
    assert (stats["agree"], stats["disagree"], stats["pairs"], stats["failed"], stats["judge_ties"]) == (2, 2, 4, 2, 1)
    assert stats["accuracy"] == 0.5 and stats["failures"] == {"no_tags": 1} and stats["judgements"] == 8
    lo, hi = stats["interval"]
    assert 0 <= lo <= 0.5 <= hi <= 1
    # tau-b per source over judged candidates, against scipy (its default variant is b), averaged
    taus = [kendalltau([10, 20, 30], [5, 9, 7]).statistic, kendalltau([50, 20], [1, 2]).statistic]
    assert stats["tau_sources"] == 2  # source 2: its two judged candidates tie on the judge's side
    assert stats["tau_b"] == pytest.approx(statistics.fmean(taus))
    assert ev.kendall_tau_b([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(kendalltau([1, 2, 2, 3], [1, 3, 2, 2]).statistic)


def test_bootstrap_interval_resamples_sources_with_replacement():
    """Two sources of one pair each, one the judge gets right and one it gets wrong. Two sources drawn with
    replacement give accuracy 1 (p 1/4), 0 (p 1/4) or 0.5: the 2.5th and 97.5th percentiles of the 2000 resamples
    are 0 and 1, exactly. Drawn without replacement, every resample would be the two sources again and the
    interval would collapse to the point estimate, 0.5."""
    stats = ev.quality_stats([{"chrf": [10, 20], "scores": [1, 2]}, {"chrf": [10, 20], "scores": [2, 1]}])
    assert stats["accuracy"] == 0.5 and stats["interval"] == (0.0, 1.0)


def test_judge_quality_end_to_end(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Sampled candidates from one prefill per source (group fan-out), judged as a group by their text; then
    written candidates (--candidates) judged pointwise by the expected score, chrF by sacrebleu, and the accuracy
    line recomputed here by hand from the per-source file."""
    calls = []
    real_generate = Sampler.generate

    def recording_generate(self, prompts, **kw):
        calls.append((len(prompts), kw["group_size"], kw["temperature"]))
        return real_generate(self, prompts, **kw)

    monkeypatch.setattr(Sampler, "generate", recording_generate)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), *write_local(tmp_path), "--device", "cpu", "--judge-max-new-tokens", "4",
            "--batch-size", "2", "--judge-quality", "3"]
    sampling = ["--max-new-tokens", "6", "--temperature", "0.7", "--seed", "3"]  # the candidates' (default T: 1)
    assert ev.main(argv + sampling + ["--judge-mode", "group", "--out", str(out)]) == 0
    assert calls[:3] == [(2, 3, 0.7), (2, 3, 0.7), (1, 3, 0.7)]  # 5 sources, 2 a batch, 3 candidates each
    assert all(group == 1 and temperature == 0.0 for _, group, temperature in calls[3:])  # the judge, greedy
    label = Path(tiny_model_dir).name
    sampled = [json.loads(line) for line in (out / label / "test" / "candidates.jsonl").read_text().splitlines()]
    assert [r["src"] for r in sampled] == SRCS and all(len(r["candidates"]) == 3 for r in sampled)
    # the tiny random model writes no tags: every judgement fails and every pair is left out, never a score of 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == ("judge pairwise accuracy: n/a over 0 pairs "
                                                                 "(mode group, score text)")
    result = json.loads((out / "judge-quality-group-text.json").read_text())[0]
    assert result["failed"] == 5 * 3 and sum(result["failures"].values()) == 15 and result["accuracy"] is None

    # written candidates: pieces of the reference, so their chrF differ
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"src": s, "candidates": [r, r[:len(r) // 2], "猫"]}) + "\n"
                                  for s, r in zip(SRCS, REFS)))
    calls.clear()
    assert ev.main(argv + ["--judge-score", "expected", "--candidates", str(candidates), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(group == 1 for _, group, _ in calls)  # no candidates sampled
    rows = [json.loads(line) for line in
            (out / label / "test" / "judge-quality-pointwise-expected.jsonl").read_text().splitlines()]
    agree = pairs = 0
    for r, ref in zip(rows, REFS):
        assert r["candidates"] == [ref, ref[:len(ref) // 2], "猫"]
        assert r["chrf"] == [sacrebleu.sentence_chrf(c, [ref]).score for c in r["candidates"]]
        assert all(s is not None for s in r["scores"]) and r["failures"] == [None] * 3  # expected never fails
        for i in range(3):
            for j in range(i + 1, 3):
                dc, ds = r["chrf"][i] - r["chrf"][j], r["scores"][i] - r["scores"][j]
                if dc and ds:
                    pairs += 1
                    agree += (dc > 0) == (ds > 0)
    assert pairs > 5
    assert printed.rstrip().splitlines()[-1] == (f"judge pairwise accuracy: {agree / pairs:.3f} over {pairs} pairs "
                                                 f"(mode pointwise, score expected)")
    assert "| length closest to source | test |" in printed
    # the trivial judge by hand: every candidate (the reference, its first half, "猫") is shorter than its English
    # source, so the longer one is the closer; chrF orders them the same way (100 > half > "猫", no ties): it agrees
    # on all 5 x 3 pairs
    baseline = json.loads((out / "judge-quality-pointwise-expected.json").read_text())[1]
    assert baseline["judge"] == "length closest to source"
    assert (baseline["accuracy"], baseline["pairs"], baseline["agree"]) == (1.0, 15, 15)
    # a rerun with another judge that reads its own output as --candidates: the file is its input, and a source of
    # another set in it (which this run ignores) survives the run
    own = out / label / "test" / "candidates.jsonl"
    own.write_text(own.read_text() + json.dumps({"src": "A source of another set.", "candidates": ["x"] * 3}) + "\n")
    before = own.read_bytes()
    assert ev.main(argv + ["--judge-mode", "group", "--candidates", str(own), "--out", str(out)]) == 0
    assert own.read_bytes() == before
    capsys.readouterr()
    # bad candidates: one line naming the file and line
    candidates.write_text('{"src": "x", "candidates": ["a"]}\n')
    assert ev.main(argv + ["--candidates", str(candidates), "--out", str(tmp_path / "bad")]) == 2
    assert f"{candidates}:1: expected" in capsys.readouterr().err
