"""data.py's training-set builders, end to end through the CLI: MT-R1-Zero's parallel layout and ours, dedup after
NFKC and whitespace normalisation, --exclude by local file, Flores directory and sacrebleu cache (written here, in
the layout sacrebleu reads offline), bad input as one line with no output left behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
from conftest import write_sacrebleu_cache

ROOT = Path(__file__).resolve().parents[1]

# A fixture in MT-R1-Zero's layout, sentences written for this test. Duplicates differ only in what normalise
# erases: runs of spaces, a trailing space, full-width Latin letters, a full-width comma (NFKC: ",").
EN_ZH = [
    {"data_source": "train", "lg": "en-zh", "en": "The museum opens at nine.", "zh": "博物馆九点开门。"},
    {"data_source": "train", "lg": "en-zh", "en": "The  museum opens at nine. ", "zh": "博物馆九点开门。"},
    {"data_source": "train", "lg": "en-zh", "en": "Ｔｈｅ museum opens at nine.", "zh": "博物馆九点开门。"},
    {"data_source": "train", "lg": "en-zh", "en": "Rain is expected tomorrow.", "zh": "明天预计有雨。"},
    {"data_source": "train", "lg": "en-zh", "en": "The bridge was closed for repairs.", "zh": "这座桥因维修而关闭。"},
]
ZH_EN = [
    # the same sentence pair as EN_ZH's first, the other way: another direction, so not a duplicate
    {"data_source": "train", "lg": "zh-en", "zh": "博物馆九点开门。", "en": "The museum opens at nine."},
    {"data_source": "train", "lg": "zh-en", "zh": "他们在河边散步，聊了很久。", "en": "They walked by the river and talked."},
    {"data_source": "train", "lg": "zh-en", "zh": "他们在河边散步,聊了很久。", "en": "They walked by the river and talked."},
    {"data_source": "train", "lg": "zh-en", "zh": "会议推迟到下周。", "en": "The meeting was postponed to next week."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_data(*args, env=None):
    """`python data.py ARGS`: exactly what a user runs."""
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def read_out(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def mt_r1_zero_files(tmp_path):
    return write_jsonl(tmp_path / "train_enzh.jsonl", EN_ZH), write_jsonl(tmp_path / "train_zhen.jsonl", ZH_EN)


def test_normalise():
    assert data.normalise(" Ｔｈｅ  museum\topens\u3000at nine. ") == "The museum opens at nine."
    assert data.normalise("散步，聊了") == data.normalise("散步,聊了")
    assert data.normalise("The museum") != data.normalise("The Museum")  # case is not normalised


def test_parallel_mt_r1_zero_layout(mt_r1_zero_files, tmp_path):
    out = tmp_path / "train.jsonl"
    proc = run_data("parallel", *mt_r1_zero_files, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (f"data: wrote 6 rows to {out} (en-zh: 3, zh-en: 3); dropped 3 duplicates, "
                                            f"0 found in --exclude sets")
    # each source's first occurrence, as written (stripped, not normalised: the full-width comma stays)
    assert read_out(out) == [
        {"src": "The museum opens at nine.", "src_lang": "en", "tgt_lang": "zh"},
        {"src": "Rain is expected tomorrow.", "src_lang": "en", "tgt_lang": "zh"},
        {"src": "The bridge was closed for repairs.", "src_lang": "en", "tgt_lang": "zh"},
        {"src": "博物馆九点开门。", "src_lang": "zh", "tgt_lang": "en"},
        {"src": "他们在河边散步，聊了很久。", "src_lang": "zh", "tgt_lang": "en"},
        {"src": "会议推迟到下周。", "src_lang": "zh", "tgt_lang": "en"},
    ]
    assert not list(tmp_path.glob("*.tmp"))
    # --keep-refs: the other side as the reference
    proc = run_data("parallel", *mt_r1_zero_files, "--out", out, "--keep-refs")
    assert proc.returncode == 0, proc.stderr
    rows = read_out(out)
    assert rows[0]["ref"] == "博物馆九点开门。" and rows[4]["ref"] == "They walked by the river and talked."


def test_parallel_our_layout_and_local_excludes(mt_r1_zero_files, tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [
        {"src": "Rain is expected tomorrow.", "src_lang": "en", "tgt_lang": "zh"},  # a duplicate across files
        {"src": "Rain is expected tomorrow.", "src_lang": "en", "tgt_lang": "de"},  # another direction: kept
        {"src": "Guten Morgen.", "src_lang": "de", "tgt_lang": "en", "ref": "Good morning."},
    ])
    plain = tmp_path / "test.en"  # a plain-text test set, one segment a line; the match is after normalisation
    plain.write_text("The  bridge was closed for repairs.\nsomething else\n", encoding="utf-8")
    test_jsonl = write_jsonl(tmp_path / "test.jsonl", [  # a jsonl test set: its reference side counts too
        {"src": "The meeting was postponed to next week.", "ref": "会议推迟到下周。", "src_lang": "en",
         "tgt_lang": "zh"}])
    out = tmp_path / "train.jsonl"
    proc = run_data("parallel", *mt_r1_zero_files, ours, "--out", out, "--exclude", plain, test_jsonl)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (f"data: wrote 6 rows to {out} (en-zh: 2, zh-en: 2, en-de: 1, de-en: 1); "
                                            f"dropped 4 duplicates, 2 found in --exclude sets")
    srcs = [r["src"] for r in read_out(out)]
    assert "The bridge was closed for repairs." not in srcs and "会议推迟到下周。" not in srcs
    assert srcs[-2:] == ["Rain is expected tomorrow.", "Guten Morgen."]


def write_flores(root, en, zh):
    devtest = root / "flores200_dataset" / "devtest"
    devtest.mkdir(parents=True)
    (devtest / "eng_Latn.devtest").write_text("\n".join(en) + "\n", encoding="utf-8")
    (devtest / "zho_Hans.devtest").write_text("\n".join(zh) + "\n", encoding="utf-8")
    return root


def offline_env(cache):
    """A real offline condition: the sacrebleu cache in a tmp dir, every download sent to a closed local port."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    return env | {"SACREBLEU": str(cache), "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                  "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def test_exclude_named_test_sets_from_flores_and_the_sacrebleu_cache(mt_r1_zero_files, tmp_path):
    cache = tmp_path / "sacrebleu"
    # wmt24 has en-zh only: eval's wmt24:zh-en is it reversed, and excluding it drops both sides all the same
    write_sacrebleu_cache(cache, "wmt24", "wmt24.data_onlyxml.tar.gz", "xml/wmttest2024.en-zh.all.xml", "en", "zh",
                          ["Unrelated news.", "Rain is expected tomorrow."], ["无关的新闻。", "会议推迟到下周。"])
    flores = write_flores(tmp_path / "flores", ["The museum opens at nine."], ["一句无关的话。"])
    out = tmp_path / "train.jsonl"
    proc = run_data("parallel", *mt_r1_zero_files, "--out", out, "--exclude", "wmt24:zh-en", "flores:en-zh",
                    "--flores-dir", flores, env=offline_env(cache))
    assert proc.returncode == 0, proc.stderr
    # excluded: 3 copies of the museum sentence (Flores), rain (WMT24 source side), the meeting (WMT24 reference)
    assert proc.stdout.splitlines()[-1] == (f"data: wrote 3 rows to {out} (en-zh: 1, zh-en: 2); dropped 1 duplicates, "
                                            f"5 found in --exclude sets")
    assert [r["src"] for r in read_out(out)] == ["The bridge was closed for repairs.", "博物馆九点开门。",
                                                 "他们在河边散步，聊了很久。"]
    # a set that is neither cached nor downloadable: one line, nothing written
    proc = run_data("parallel", *mt_r1_zero_files, "--out", tmp_path / "other.jsonl", "--exclude", "wmt23:zh-en",
                    env=offline_env(cache))
    assert proc.returncode == 2 and not (tmp_path / "other.jsonl").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("data: error: wmt23:zh-en: not in the sacrebleu cache"), proc.stderr
    proc = run_data("parallel", *mt_r1_zero_files, "--out", tmp_path / "other.jsonl", "--exclude", "flores:en-zh",
                    env=offline_env(cache) | {"FLORES_DIR": ""})
    assert proc.returncode == 2 and "pass --flores-dir DIR or set FLORES_DIR" in proc.stderr


def test_sacrebleu_sources_as_training_rows(tmp_path):
    cache = tmp_path / "sacrebleu"
    write_sacrebleu_cache(cache, "wmt23", "wmt23.v.0.1.tar.gz", "wmt23-news-systems-v.0.1/xml/wmttest2023.en-zh.all.xml",
                          "en", "zh", ["One.", "Two.", "One. "], ["一。", "二。", "一。"])
    write_sacrebleu_cache(cache, "wmt23", "wmt23.v.0.1.tar.gz", "wmt23-news-systems-v.0.1/xml/wmttest2023.zh-en.all.xml",
                          "zh", "en", ["三。", "四。"], ["Three.", "Four."])
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Two.\nFour.\n", encoding="utf-8")  # "Two." is a source; "Four." only a reference here
    out = tmp_path / "more.jsonl"
    proc = run_data("sacrebleu", "wmt23", "--pairs", "en-zh,zh-en", "--out", out, "--exclude", held_out,
                    env=offline_env(cache))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (f"data: wrote 3 rows to {out} (en-zh: 1, zh-en: 2); dropped 1 duplicates, "
                                            f"1 found in --exclude sets")
    assert read_out(out) == [{"src": "One.", "src_lang": "en", "tgt_lang": "zh"},
                             {"src": "三。", "src_lang": "zh", "tgt_lang": "en"},
                             {"src": "四。", "src_lang": "zh", "tgt_lang": "en"}]
    proc = run_data("sacrebleu", "wmt23", "--pairs", "en-ko", "--out", out, env=offline_env(cache))
    assert proc.returncode == 2 and "has none of --pairs en-ko" in proc.stderr


@pytest.mark.parametrize("line, message", [
    ('{"lg": "en-zh", "en": "Hello.", "zh": "你好。"', "not valid JSON"),
    ({"lg": "enzh", "en": "Hello.", "zh": "你好。"}, "unknown lg 'enzh'"),
    ({"lg": "en-xx", "en": "Hello.", "xx": "?"}, "unknown language code 'xx'"),
    ({"lg": "en-zh", "zh": "你好。"}, "no 'en' text"),
    ({"lg": "zh-en", "zh": "  ", "en": "Hello."}, "empty source ('zh')"),
    ({"src": "Hello.", "src_lang": "en", "tgt_lang": "en"}, "src_lang and tgt_lang are both 'en'"),
    ({"text": "Hello."}, "neither MT-R1-Zero's layout"),
    ({"src": "x", "src_lang": ["en"], "tgt_lang": "fr"}, "unknown language code ['en']"),  # unhashable: no TypeError
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(EN_ZH[0], ensure_ascii=False)
    path.write_text(good + "\n" + (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n",
                    encoding="utf-8")
    out = tmp_path / "out.jsonl"
    proc = run_data("parallel", path, "--out", out)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"data: error: {path}:2: ") and message in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [path]  # no output, no temporary file


def test_a_cut_last_line_is_dropped_only_where_asked(tmp_path):
    """drop_cut_last is for the files this project appends to (logs, eval's segments): what follows the last "\\n"
    is a write cut short, here inside the two bytes of "é", and is dropped before it is decoded. In training data
    the same line is a bad line, named by file and line."""
    path = tmp_path / "log.jsonl"
    whole = {"step": 1, "text": "déjà\u2028vu"}
    path.write_bytes((json.dumps(whole, ensure_ascii=False) + "\n").encode() + '{"step": 2, "text": "caf'.encode()
                     + "é".encode()[:1])
    assert data.read_jsonl(path, drop_cut_last=True) == [(f"{path}:1", whole)]
    with pytest.raises(data.DataError) as err:
        data.read_jsonl(path)
    assert str(err.value) == f"{path}:2: not UTF-8 (byte 0xc3 at column 25)"
    # a file that ends with its newline has nothing cut: every line is kept either way
    path.write_text((json.dumps(whole, ensure_ascii=False) + "\n") * 2, encoding="utf-8")
    assert data.read_jsonl(path, drop_cut_last=True) == data.read_jsonl(path) == [(f"{path}:1", whole),
                                                                                (f"{path}:2", whole)]


def data_main(capsys, *args) -> tuple[int, list[str]]:
    """`data.py ARGS` in this process (main is the CLI's entry point): exit status and stderr lines."""
    capsys.readouterr()
    code = data.main(list(map(str, args)))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("out, clash", [
    ("a.jsonl", "is the input a.jsonl (the same file)"),
    ("./a.jsonl", "is the input a.jsonl (the same file)"),
    ("../work/a.jsonl", "is the input a.jsonl (the same file)"),
    ("link.jsonl", "is the input a.jsonl (the same file)"),  # a symlink to the input
    ("held_out.jsonl", "is the --exclude file held_out.jsonl (the same file)"),
    ("b.jsonl", "its temporary file b.jsonl.tmp is the input b.jsonl.tmp (the same file)"),
    ("cache/x.jsonl", "is inside the sacrebleu cache cache: data.py writes nowhere it reads test sets from"),
])
def test_out_that_is_an_input_is_refused_and_the_input_kept(tmp_path, monkeypatch, capsys, out, clash):
    """--out is checked against everything the command reads, as files on disk: written over, the references of
    a.jsonl would be gone (rows keep no ref without --keep-refs), or the held-out set would become training rows."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    inputs = {"a.jsonl": EN_ZH[:2], "b.jsonl.tmp": ZH_EN[:1], "held_out.jsonl": [{"src": "Unrelated.", "ref": "无关。"}]}
    for name, rows in inputs.items():
        write_jsonl(work / name, rows)
    (work / "link.jsonl").symlink_to("a.jsonl")
    (work / "cache").mkdir()
    monkeypatch.setenv("SACREBLEU", "cache")
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    exclude = ["--exclude", "held_out.jsonl"] + (["wmt23:en-zh"] if out.startswith("cache/") else [])
    code, err = data_main(capsys, "parallel", "a.jsonl", "b.jsonl.tmp", "--out", out, *exclude)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"data: error: --out {out}") and clash in err[0], err
    assert err[0].endswith("give another --out")
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before  # nothing written or replaced
    assert sorted(p.name for p in (work / "cache").iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("", "--out '': give the file to write the training set to"),
    ("{file}/x.jsonl", "--out {file}/x.jsonl: {file} is a file, not a directory"),
    ("{dir}", "--out {dir}: is a directory; give a file name, e.g. {dir}/train.jsonl"),
])
def test_an_out_that_cannot_be_a_file_is_one_line(tmp_path, capsys, mt_r1_zero_files, out, message):
    names = {"file": mt_r1_zero_files[0], "dir": tmp_path}
    code, err = data_main(capsys, "parallel", mt_r1_zero_files[0], "--out", out.format(**names))
    assert code == 2 and err == ["data: error: " + message.format(**names)]


def test_an_empty_training_set_is_refused_with_the_reason(tmp_path, capsys, mt_r1_zero_files):
    """ssr.py refuses an empty --data: data.py says so when it would write one, and why, instead of exit 0."""
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    out = tmp_path / "out.jsonl"
    code, err = data_main(capsys, "parallel", blank, "--out", out)
    assert code == 2 and err == [f"data: error: --out {out}: nothing to write: the inputs hold no rows (empty, or "
                                 f"blank lines only); wrote nothing"]
    # every source a test segment: the counts say where the rows went
    test_set = tmp_path / "test.en"
    test_set.write_text("".join(row["en"] + "\n" for row in EN_ZH), encoding="utf-8")
    code, err = data_main(capsys, "parallel", mt_r1_zero_files[0], "--out", out, "--exclude", test_set)
    assert code == 2 and err == [f"data: error: --out {out}: nothing to write: all 5 rows read were dropped "
                                 f"(0 duplicates, 5 found in --exclude sets); wrote nothing"]
    assert not out.exists()


# Qwen2.5-7B's config.json, the keys --plan reads (as in test_plan.py): the plan needs no weights
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
             "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}


def readme_recipe() -> list[str]:
    """The commands of README's "Reproducing the paper" block, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Reproducing the paper", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    return [" ".join(c.split("#", 1)[0].split()) for c in commands if c.split("#", 1)[0].strip()]


def test_readme_recipe_runs_up_to_the_first_gpu_step(tmp_path):
    """README's recipe as written, on this machine: the data build (on fixture files standing in for MT-R1-Zero's
    two, the six test sets from a sacrebleu cache and a Flores directory written here) and both memory plans.
    The torchrun and eval.py lines need GPUs and the real models; they are only checked to be there."""
    commands = readme_recipe()
    local = [c for c in commands if c.startswith(("python data.py", "python ssr.py --plan"))]
    assert [c.split()[1] for c in local] == ["data.py", "ssr.py", "ssr.py"]
    assert sum(c.startswith("torchrun --nproc 8 ssr.py --preset ssr") for c in commands) == 2
    assert any(c.startswith("python eval.py") and "--template ssr" in c for c in commands)

    mt = tmp_path / "MT-R1-Zero" / "data" / "train" / "json"
    mt.mkdir(parents=True)
    write_jsonl(mt / "train_enzh_6565.jsonl", EN_ZH)
    write_jsonl(mt / "train_zhen_6565.jsonl", ZH_EN)
    qwen = tmp_path / "Qwen2.5-7B"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(QWEN25_7B))
    kiwi = tmp_path / "wmt22-cometkiwi-da" / "checkpoints"
    kiwi.mkdir(parents=True)
    (kiwi / "model.ckpt").write_bytes(b"\0" * 1024)
    cache = tmp_path / "sacrebleu"
    xml = "wmt23-news-systems-v.0.1/xml/wmttest2023.{}.all.xml"
    write_sacrebleu_cache(cache, "wmt23", "wmt23.v.0.1.tar.gz", xml.format("en-zh"), "en", "zh",
                          ["Rain is expected tomorrow."], ["明天预计有雨。"])
    write_sacrebleu_cache(cache, "wmt23", "wmt23.v.0.1.tar.gz", xml.format("zh-en"), "zh", "en",
                          ["一条新闻。"], ["A news item."])
    write_sacrebleu_cache(cache, "wmt24", "wmt24.data_onlyxml.tar.gz", "xml/wmttest2024.en-zh.all.xml", "en", "zh",
                          ["Another story."], ["会议推迟到下周。"])
    flores = write_flores(tmp_path / "flores", ["Unrelated."], ["无关。"])
    work = tmp_path / "work"
    work.mkdir()
    env = offline_env(cache) | {"MT_R1_ZERO": str(tmp_path / "MT-R1-Zero"), "QWEN": str(qwen), "FLORES": str(flores),
                                "KIWI": str(kiwi.parent), "PY": sys.executable, "ROOT": str(ROOT)}
    # `python X.py ...` runs the repository's X.py from the work directory, where the recipe's out/ goes
    script = 'python() { "$PY" "$ROOT/$1" "${@:2}"; }\nset -e\n' + "\n".join(local)
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # rain (a WMT23 source) and the meeting (a WMT24 reference) are excluded
    assert ("data: wrote 4 rows to out/train.jsonl (en-zh: 2, zh-en: 2); dropped 3 duplicates, "
            "2 found in --exclude sets") in proc.stdout.splitlines()
    assert proc.stdout.count(": fits") == 2 and len(read_out(work / "out" / "train.jsonl")) == 4
