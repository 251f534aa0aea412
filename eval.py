"""Score translation checkpoints on test sets the way the paper does, several side by side in one table.

    python eval.py --model /ckpt/Qwen2.5-7B --model out/ssr-zero-7b/step_400      # the paper's table
    python eval.py --model DIR --src test.en --ref test.zh --src-lang en --tgt-lang zh --metrics bleu,chrf

Three phases, each resuming from what --out holds. Translate: each model in turn, greedy by default, with the
training prompt and <answer> extraction, appending every batch to OUT/<model>/<set>/segments.jsonl; `self-judge`
runs here too, while the model is loaded. Score: each COMET model in turn, freed before the next loads (two XXL
models never share the GPU); BLEU and chrF through sacrebleu. Report: OUT/results.json and OUT/table.md (the
paper's table, then every metric of every set), also printed.

Every flag is checked first, in seconds and before any model loads (check_args); a problem is one line
`eval: error: ...`, exit status 2. OUT/<label>/model.json records which checkpoint made that label's translations;
another checkpoint under the same label (say a second `step_6`) is refused, never credited with them.

A response with an invalid format (no single <think>..</think> <answer>..</answer>) keeps its raw text and is
scored as an empty translation by every metric: dropping it would flatter the model. COMET and self-judge scores
are x100, like BLEU and chrF.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
from tqdm import tqdm

import judge
from checkpoint import CheckpointError, load_tokenizer, read_config
from judge import DataError, RewardError
from model import Transformer
from sampler import Sampler


class EvalError(ValueError):
    """Bad input to the evaluation (a test set, a file, a flag); the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# test sets

# the paper's table: WMT23, WMT24 and Flores200 devtest, both directions between English and Chinese
PAPER_SETS = ("wmt23:zh-en", "wmt24:zh-en", "flores:zh-en", "wmt23:en-zh", "wmt24:en-zh", "flores:en-zh")
# Flores file names per language; flores_plus (the maintained release) renamed zho_Hans to cmn_Hans
FLORES_CODES = {"en": ("eng_Latn",), "zh": ("zho_Hans", "cmn_Hans")}


@dataclass
class TestSet:
    name: str  # "wmt23:en-zh", "flores:zh-en", or a local file's stem
    src_lang: str
    tgt_lang: str
    srcs: list[str]
    refs: list[str]
    origin: str  # where the text came from, recorded in results.json
    note: str = ""  # what a reader of the numbers must know (wmt24:zh-en is en-zh reversed)


def checked_set(ts: TestSet) -> TestSet:
    """Every set goes through here: a direction the prompts can name, aligned and non-empty sources."""
    judge.check_direction(f"{ts.name} ({ts.origin})", ts.src_lang, ts.tgt_lang)
    if len(ts.srcs) != len(ts.refs):
        raise EvalError(f"{ts.name}: {len(ts.srcs)} sources but {len(ts.refs)} references ({ts.origin})")
    if not ts.srcs:
        raise EvalError(f"{ts.name}: no segments ({ts.origin})")
    for i, src in enumerate(ts.srcs):
        if not src.strip():  # an empty prompt asks the model to translate nothing: a data error, not a test
            raise EvalError(f"{ts.name}: segment {i + 1} has an empty source ({ts.origin})")
    return ts


def read_lines(path: Path) -> list[str]:
    """One segment a line. Split on "\\n" only: str.splitlines would also split at U+2028 and friends, which
    occur inside real segments and would shift every later line against its reference."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read ({e})") from None
    return [line.strip() for line in text.removesuffix("\n").split("\n")] if text else []


def load_sacrebleu(corpus: str, pair: str, name: str) -> tuple[list[str], list[str], str]:
    """Source and first reference of a sacrebleu test set (`name` is the set asked for, checked by parse_set_name);
    sacrebleu downloads it once into $SACREBLEU (default ~/.sacrebleu) and reads the cached copy from then on."""
    from sacrebleu.dataset import DATASETS

    try:
        src_file = DATASETS[corpus].get_source_file(pair)
        ref_files = DATASETS[corpus].get_reference_files(pair)
    except (OSError, SystemExit):  # URLError is an OSError; sacrebleu calls sys.exit on a bad checksum or SSL
        cache = os.environ.get("SACREBLEU", "~/.sacrebleu")
        raise EvalError(f"{name}: not in the sacrebleu cache ({cache}) and the download failed (offline?); run "
                        f"once online, or copy a ~/.sacrebleu cache here and point SACREBLEU at it, or pass "
                        f"the files with --src/--ref") from None
    if not ref_files:
        raise EvalError(f"{name}: sacrebleu has no reference for {corpus} {pair}")
    return read_lines(Path(src_file)), read_lines(Path(ref_files[0])), f"sacrebleu {corpus} {pair}"


def read_flores(root: Path, lang: str, name: str) -> tuple[list[str], Path]:
    """The devtest sentences of `lang` in any common layout: the FLORES-200 release (flores200_dataset/devtest/
    eng_Latn.devtest, or the folder inside it) or flores_plus (devtest/eng_Latn.jsonl, the text under "text")."""
    tried = [base / "devtest" / f"{code}.{ext}" for base in (root, root / "flores200_dataset")
             for code in FLORES_CODES[lang] for ext in ("devtest", "jsonl")]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise EvalError(f"{name}: no Flores devtest file for {lang} under {root} (looked for {tried[0]}, "
                        f"{tried[1]} and {len(tried) - 2} more: FLORES-200 or flores_plus layouts)")
    if path.suffix == ".devtest":
        return read_lines(path), path
    rows = judge.read_jsonl(path)  # flores_plus: one object per sentence, in id order
    for where, row in rows:
        if not isinstance(row.get("text"), str):
            raise EvalError(f"{where}: no 'text' string (expected flores_plus jsonl)")
    return [row["text"].strip() for _, row in rows], path


# WMT24 has no zh->en task. The paper reports a WMT24 ZH->EN column all the same; the only reading that gives one
# is en-zh run backwards: the Chinese references become sources, the English sources references.
REVERSED_SETS = {"wmt24:zh-en": "en-zh"}


def parse_set_name(name: str) -> tuple[str, str, str]:
    """(corpus, src_lang, tgt_lang) of a --sets name, checked without reading any data: NAME:SRC-TGT, a direction
    the prompts can name, and a set that exists (Flores en-zh and zh-en, else one sacrebleu knows)."""
    from sacrebleu.dataset import DATASETS

    corpus, _, pair = name.partition(":")
    src_lang, _, tgt_lang = pair.partition("-")
    if not corpus or not src_lang or not tgt_lang:
        raise EvalError(f"--sets {name}: expected NAME:SRC-TGT, e.g. wmt23:en-zh")
    judge.check_direction(f"--sets {name}", src_lang, tgt_lang)
    if corpus == "flores":
        if {src_lang, tgt_lang} != set(FLORES_CODES):
            raise EvalError(f"--sets {name}: Flores sets here are en-zh and zh-en")
    elif corpus not in DATASETS or REVERSED_SETS.get(name, pair) not in DATASETS[corpus].langpairs:
        raise EvalError(f"--sets {name}: sacrebleu {sacrebleu.__version__} has no test set {corpus} {pair} (WMT24 "
                        f"needs sacrebleu >= 2.5); valid: {', '.join(PAPER_SETS)} or any sacrebleu set as "
                        f"NAME:SRC-TGT; for other data use --src")
    return corpus, src_lang, tgt_lang


def flores_root(flores_dir: str | None, name: str) -> Path:
    if not flores_dir:
        raise EvalError(f"--sets {name}: no Flores directory; pass --flores-dir DIR or set FLORES_DIR (the FLORES-200 "
                        f"release, flores200_dataset/devtest/*.devtest, or flores_plus, devtest/*.jsonl)")
    if not Path(flores_dir).expanduser().is_dir():
        raise EvalError(f"--flores-dir {flores_dir}: no such directory (--sets {name} reads Flores from it)")
    return Path(flores_dir).expanduser()


def load_named_set(name: str, flores_dir: str | None) -> TestSet:
    corpus, src_lang, tgt_lang = parse_set_name(name)
    if corpus == "flores":
        root = flores_root(flores_dir, name)
        (srcs, src_file), (refs, ref_file) = read_flores(root, src_lang, name), read_flores(root, tgt_lang, name)
        return checked_set(TestSet(name, src_lang, tgt_lang, srcs, refs, f"{src_file} / {ref_file}"))
    if name in REVERSED_SETS:
        srcs, refs, origin = load_sacrebleu(corpus, REVERSED_SETS[name], name)
        return checked_set(TestSet(name, src_lang, tgt_lang, refs, srcs, origin + ", reversed",
                                   note="WMT24 has no zh-en: this is wmt24 en-zh reversed (Chinese references "
                                        "as sources, English sources as references)"))
    return checked_set(TestSet(name, src_lang, tgt_lang, *load_sacrebleu(corpus, f"{src_lang}-{tgt_lang}", name)))


def check_local_flags(src: str, ref: str | None, src_lang: str | None, tgt_lang: str | None):
    """--src with the flags that go with it, checked without reading the files."""
    path = Path(src).expanduser()
    if not path.is_file():
        raise EvalError(f"--src {src}: no such file")
    if path.suffix == ".jsonl":
        if ref or src_lang or tgt_lang:
            raise EvalError(f"--src {src}: a .jsonl carries its own ref, src_lang and tgt_lang; drop --ref/--src-lang/"
                            f"--tgt-lang")
        return
    if not (ref and src_lang and tgt_lang):
        raise EvalError(f"--src {src}: a plain-text --src needs --ref, --src-lang and --tgt-lang (or give a .jsonl of "
                        f"{{src, ref, src_lang, tgt_lang}} lines)")
    if not Path(ref).expanduser().is_file():
        raise EvalError(f"--ref {ref}: no such file")
    judge.check_direction("--src-lang/--tgt-lang", src_lang, tgt_lang)


def load_local_set(src: str, ref: str | None, src_lang: str | None, tgt_lang: str | None) -> TestSet:
    """--src FILE: plain text with --ref/--src-lang/--tgt-lang, or jsonl lines {src, ref, src_lang, tgt_lang}.
    The set is named after the file (test.en -> "test")."""
    check_local_flags(src, ref, src_lang, tgt_lang)
    path = Path(src).expanduser()
    if path.suffix != ".jsonl":
        return checked_set(TestSet(path.stem, src_lang, tgt_lang, read_lines(path),
                                   read_lines(Path(ref).expanduser()), f"{path} / {ref}"))
    rows = judge.read_jsonl(path)
    for where, row in rows:
        missing = [k for k in ("src", "ref", "src_lang", "tgt_lang") if not isinstance(row.get(k), str)]
        if missing:
            raise EvalError(f"{where}: lacks {', '.join(missing)} (each line needs src, ref, src_lang, tgt_lang "
                            f"as strings)")
    directions = {(row["src_lang"], row["tgt_lang"]) for _, row in rows}
    if len(directions) != 1:  # one set = one direction: BLEU's tokenizer and the table's columns depend on it
        raise EvalError(f"{path}: " + (f"mixes directions {sorted(directions)}; use one file per direction"
                                       if directions else "no segments"))
    (src_lang, tgt_lang), = directions
    return checked_set(TestSet(path.stem, src_lang, tgt_lang, [row["src"].strip() for _, row in rows],
                               [row["ref"].strip() for _, row in rows], str(path)))


# ----------------------------------------------------------------------------------------------------
# metrics

# the paper's two metrics, by the names its table uses; both are gated on the Hugging Face hub (accept the
# licence and log in once) and ~10.7B parameters each
COMET_ALIASES = {"xcomet-xxl": "Unbabel/XCOMET-XXL", "cometkiwi-xxl": "Unbabel/wmt23-cometkiwi-da-xxl"}
SACREBLEU_METRICS = ("bleu", "chrf")
SELF_JUDGE = "self-judge"


@dataclass
class Metric:
    label: str  # the key in results.json, segments.jsonl and the tables
    comet: str | None = None  # COMET model name or local path; None for bleu, chrf, self-judge


# a Hugging Face hub model id, ORG/NAME: what COMET downloads when the name is not a local path
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)
METRIC_NAMES = (f"valid: {', '.join(SACREBLEU_METRICS)}, {SELF_JUDGE}, {', '.join(COMET_ALIASES)}, a local COMET "
                f"checkpoint (a directory holding checkpoints/model.ckpt and hparams.yaml), a hub name ORG/NAME, "
                f"or LABEL=any of the COMET ones")


def comet_source(item: str, source: str) -> str:
    """The COMET model `source` names, checked without loading it: an alias, an existing local checkpoint, or
    a hub name (anything shaped ORG/NAME that is not a local path; COMET downloads it when scoring)."""
    source = COMET_ALIASES.get(source, source)
    path = Path(source).expanduser()
    if path.exists():
        ckpt = path / "checkpoints" / "model.ckpt" if path.is_dir() else path
        if not ckpt.is_file() or not (ckpt.resolve().parents[1] / "hparams.yaml").is_file():
            raise EvalError(f"--metrics {item}: {path} is not a COMET checkpoint (expected DIR/checkpoints/model.ckpt "
                            f"next to DIR/hparams.yaml)")
    elif not HUB_NAME.fullmatch(source):
        problem = f"no such COMET checkpoint {path}" if "=" in item or os.sep in source else "unknown metric"
        raise EvalError(f"--metrics {item}: {problem}; {METRIC_NAMES}")
    return source


def parse_metrics(spec: str) -> list[Metric]:
    """`xcomet-xxl,cometkiwi-xxl,bleu,chrf,self-judge`, any COMET model name or checkpoint path, and LABEL=PATH
    to give a local copy a label: `xcomet-xxl=/ckpt/XCOMET-XXL` fills the paper's table offline."""
    metrics = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        label, sep, source = item.partition("=")
        if not label or (sep and not source):
            raise EvalError(f"--metrics {item}: expected NAME or LABEL=PATH; {METRIC_NAMES}")
        if label in SACREBLEU_METRICS or label == SELF_JUDGE:
            if sep:
                raise EvalError(f"--metrics {item}: {label} is built in and takes no model")
            metrics.append(Metric(label))
        else:
            metrics.append(Metric(label, comet_source(item, source if sep else label)))
    if not metrics:
        raise EvalError(f"--metrics is empty; {METRIC_NAMES}")
    if len({m.label for m in metrics}) < len(metrics):
        raise EvalError(f"--metrics {spec}: names a metric twice")
    return metrics


def bleu_tokenizer(tgt_lang: str) -> str:
    # BLEU counts word n-grams, and Chinese has no spaces: 13a would make a whole sentence one "word"
    return "zh" if tgt_lang == "zh" else "13a"


def corpus_scores(rows: list[dict], ts: TestSet) -> dict[str, float]:
    hyps, refs = [r["hyp"] for r in rows], [[r["ref"] for r in rows]]
    return {"bleu": sacrebleu.corpus_bleu(hyps, refs, tokenize=bleu_tokenizer(ts.tgt_lang)).score,
            "chrf": sacrebleu.corpus_chrf(hyps, refs).score}


def sentence_scores(row: dict, ts: TestSet) -> dict[str, float]:
    """Per-segment BLEU/chrF for segments.jsonl, to find the segments a model gets wrong; the system scores in
    results.json are corpus-level (corpus_scores), never the mean of these."""
    return {"bleu": sacrebleu.sentence_bleu(row["hyp"], [row["ref"]], tokenize=bleu_tokenizer(ts.tgt_lang)).score,
            "chrf": sacrebleu.sentence_chrf(row["hyp"], [row["ref"]]).score}


# ----------------------------------------------------------------------------------------------------
# files under --out: segments.jsonl has one row per segment, appended per batch while translating and rewritten
# when scores are added; every rewrite goes through replace_file

def replace_file(path: Path, text: str):
    """Write through a temporary file and os.replace, so an interrupt leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def segments_path(out: Path, model_label: str, ts: TestSet) -> Path:
    return out / model_label / ts.name.replace(":", "_") / "segments.jsonl"


def load_rows(path: Path, ts: TestSet) -> list[dict]:
    """The rows a previous run wrote, checked against the set: row i must hold segment i's source and reference."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[:text.rfind("\n") + 1]
    if complete != text:  # the run was killed inside a write: drop the broken last line, keep the rest
        replace_file(path, complete)
    rows = []
    for n, line in enumerate(complete.splitlines(), 1):  # JSON escapes every line break: splitlines is safe here
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise EvalError(f"{path}:{n}: not JSON; delete the file to translate this set again") from None
    if len(rows) > len(ts.srcs) or any(r.get("i") != i or r.get("src") != ts.srcs[i] or r.get("ref") != ts.refs[i]
                                       for i, r in enumerate(rows)):
        raise EvalError(f"{path}: holds other segments than {ts.name} ({ts.origin}) has now; use another --out or "
                        f"delete the file")
    return rows


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ----------------------------------------------------------------------------------------------------
# phase 1: translate (and self-judge) with each model

def respond(model, tok, prompts: dict[int, list[int]], max_new_tokens: int, temperature: float, seed, done: int,
            desc: str, args, device, dtype):
    """Generate for `prompts` (segment index -> prompt ids), `--batch-size` at a time, with a progress bar that
    starts at `done`; yields (indices, response texts, finish reasons) per batch. seed(first index) seeds a batch."""
    # the KV cache is sized for the longest prompt, so no segment is cut or refused
    sampler = Sampler(model, max_batch_size=min(args.batch_size, len(prompts)), device=device, dtype=dtype,
                      max_seq_len=max(map(len, prompts.values())) + max_new_tokens)
    todo = list(prompts)
    with tqdm(total=done + len(todo), initial=done, desc=desc, unit="seg") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            outs = sampler.generate([prompts[i] for i in batch], max_new_tokens=max_new_tokens, temperature=temperature,
                                    stop_token_ids=tok.eos_ids, stop_strings=judge.STOP_STRINGS, tokenizer=tok,
                                    seed=seed(batch[0]))
            # special tokens skipped, as in training: a trailing EOS ends the response, it is not part of its text
            yield batch, [tok.decode(o.tokens, skip_special_tokens=True) for o in outs], [o.finish_reason for o in outs]
            bar.update(len(batch))


def translate(model, tok, ts: TestSet, path: Path, rows: list[dict], label: str, args, device, dtype):
    """Translate the segments `rows` (read from `path`) lacks, appending each batch to both."""
    prompts = {i: tok.encode(judge.actor_prompt(ts.srcs[i], ts.src_lang, ts.tgt_lang, args.template))
               for i in range(len(rows), len(ts.srcs))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        # the seed follows the batch's position, so a resumed sampled run repeats an uninterrupted one
        for batch, raws, reasons in respond(model, tok, prompts, args.max_new_tokens, args.temperature,
                                            lambda first: args.seed + first, len(rows), f"{label} {ts.name}",
                                            args, device, dtype):
            new = []
            for i, raw, reason in zip(batch, raws, reasons):
                answer = judge.extract_answer(raw)
                new.append({"i": i, "src": ts.srcs[i], "ref": ts.refs[i], "hyp": answer or "", "raw": raw,
                            "extracted": answer is not None, "finish_reason": reason, "scores": {}})
            f.write(jsonl(new))  # appending is safe: load_rows drops a last line cut short by a kill
            f.flush()  # a batch on disk is a batch a rerun does not translate again
            rows += new


def self_judge(model, tok, ts: TestSet, rows: list[dict], path: Path, label: str, args, device, dtype):
    """The model's own judge score of each translation: the training judge prompt, greedy, parse_score.
    A failed extraction is judged as the empty translation it is scored as everywhere; a judgement that does
    not parse scores 0 and is counted. Saved after every batch, like the translations."""
    prompts = {i: tok.encode(judge.judge_prompt(r["src"], r["hyp"], ts.src_lang, ts.tgt_lang, args.template))
               for i, r in enumerate(rows) if SELF_JUDGE not in r["scores"]}
    for batch, raws, _ in respond(model, tok, prompts, args.judge_max_new_tokens, 0.0, lambda first: args.seed,
                                  len(rows) - len(prompts), f"{label} {ts.name} self-judge", args, device, dtype):
        for i, raw in zip(batch, raws):
            score = judge.parse_score(raw)
            rows[i].update(judge_raw=raw, judge_parsed=score is not None)
            rows[i]["scores"][SELF_JUDGE] = score if score is not None else 0.0
        replace_file(path, jsonl(rows))


def free_memory():
    """Drop what the last model left behind, so the next one (an XXL COMET after a 7B) finds the GPU empty."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_models(models: dict[str, str], sets: list[TestSet], metrics: list[Metric], out: Path, args) -> dict:
    """Phase 1 for every model; returns {(label, set name): (segments.jsonl, its rows, the set)}."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on GPU, as the trainer samples
    needs_judge = any(m.label == SELF_JUDGE for m in metrics)
    outputs = {(label, ts.name): (segments_path(out, label, ts), load_rows(segments_path(out, label, ts), ts), ts)
               for label in models for ts in sets}
    for label, model_dir in models.items():
        pending = [(path, rows, ts) for path, rows, ts in (outputs[label, ts.name] for ts in sets)
                   if len(rows) < len(ts.srcs) or (needs_judge and any(SELF_JUDGE not in r["scores"] for r in rows))]
        if not pending:  # everything on disk already: don't load a 7B model to do nothing
            continue
        tok = load_tokenizer(model_dir)
        model = Transformer.from_pretrained(model_dir, device=device, dtype=dtype).eval()
        for path, rows, ts in pending:
            if len(rows) < len(ts.srcs):
                translate(model, tok, ts, path, rows, label, args, device, dtype)
            if needs_judge and any(SELF_JUDGE not in r["scores"] for r in rows):
                self_judge(model, tok, ts, rows, path, label, args, device, dtype)
        del model
        free_memory()
    return outputs


# ----------------------------------------------------------------------------------------------------
# phase 2: score

def run_metrics(outputs: dict, metrics: list[Metric], args):
    for metric in (m for m in metrics if m.comet):
        todo = [output for output in outputs.values() if any(metric.label not in r["scores"] for r in output[1])]
        if not todo:  # scored by an earlier run: skip loading the model
            continue
        print(f"{metric.label}: loading COMET model {metric.comet}", file=sys.stderr)
        scorer = judge.CometScorer(metric.comet, device=args.device, batch_size=args.comet_batch_size)
        for path, rows, _ in tqdm(todo, desc=metric.label, unit="set"):
            # references always go in: reference-based models (XCOMET) use them, QE models (CometKiwi) ignore them
            scores = scorer.score([r["src"] for r in rows], [r["hyp"] for r in rows], [r["ref"] for r in rows])
            for r, s in zip(rows, scores):
                r["scores"][metric.label] = 100 * s
            replace_file(path, jsonl(rows))
        del scorer
        free_memory()
    wanted = [m.label for m in metrics if m.label in SACREBLEU_METRICS]
    if wanted:  # cheap: recomputed on every run
        for path, rows, ts in outputs.values():
            for r in rows:
                r["scores"].update({k: v for k, v in sentence_scores(r, ts).items() if k in wanted})
            replace_file(path, jsonl(rows))


# ----------------------------------------------------------------------------------------------------
# phase 3: report

def summarize(rows: list[dict], ts: TestSet, metrics: list[Metric]) -> dict:
    """System scores of one model on one set: corpus BLEU/chrF, the mean of per-segment COMET/self-judge scores."""
    corpus = corpus_scores(rows, ts)
    scores = {m.label: corpus[m.label] if m.label in SACREBLEU_METRICS
              else statistics.fmean(r["scores"][m.label] for r in rows) for m in metrics}
    result = {"segments": len(rows), "failed_extractions": sum(not r["extracted"] for r in rows), "scores": scores}
    if any(m.label == SELF_JUDGE for m in metrics):
        result["judge_parse_failures"] = sum(not r["judge_parsed"] for r in rows)
    return result


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "".join("| " + " | ".join(cells) + " |\n" for cells in [header, ["---"] * len(header), *rows])


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


PAPER_DIRECTIONS = {"zh-en": "ZH→EN", "en-zh": "EN→ZH"}
PAPER_CORPORA = {"wmt23": "WMT23", "wmt24": "WMT24", "flores": "Flores"}
PAPER_METRICS = {"cometkiwi-xxl": "CometKiwi", "xcomet-xxl": "XCOMET"}


def paper_table(results: dict) -> str:
    """The paper's table: a row per model; per direction, CometKiwi-XXL and XCOMET-XXL on WMT23, WMT24 and
    Flores, then their average. A direction with no number at all is left out; the average needs all six
    numbers (an average over fewer would not be comparable to the paper's), else it shows –."""
    def value(model, set_name, metric):
        return results[model].get(set_name, {}).get("scores", {}).get(metric)

    columns = []  # (header, the (set, metric) cells it averages: one, or all six for Avg.)
    for pair, direction in PAPER_DIRECTIONS.items():
        cells = {(f"{corpus}:{pair}", metric): f"{direction} {corpus_title} {metric_title}"
                 for corpus, corpus_title in PAPER_CORPORA.items() for metric, metric_title in PAPER_METRICS.items()}
        if any(value(model, *cell) is not None for model in results for cell in cells):
            columns += [(title, [cell]) for cell, title in cells.items()] + [(f"{direction} Avg.", list(cells))]
    if not columns:
        return ""
    rows = []
    for model in results:
        values = [[value(model, *cell) for cell in cells] for _, cells in columns]
        rows.append([model, *(fmt(statistics.fmean(v) if None not in v else None) for v in values)])
    return markdown(["Model", *(title for title, _ in columns)], rows)


def metrics_table(results: dict, sets: list[TestSet], metrics: list[Metric]) -> str:
    """Every metric of every set, a row per model x set, with the failures a reader must see next to them."""
    judged = any(m.label == SELF_JUDGE for m in metrics)
    header = ["Model", "Set", *(m.label for m in metrics), "failed extractions"]
    header += ["judge parse failures"] if judged else []
    rows = []
    for model, per_set in results.items():
        for ts in sets:
            r = per_set[ts.name]
            counts = [r["failed_extractions"]] + ([r["judge_parse_failures"]] if judged else [])
            rows.append([model, ts.name, *(fmt(r["scores"][m.label]) for m in metrics),
                         *(f"{count}/{r['segments']}" for count in counts)])
    return markdown(header, rows)


def report(models: dict[str, str], sets: list[TestSet], metrics: list[Metric], outputs: dict, out: Path, args):
    results = {label: {ts.name: summarize(outputs[label, ts.name][1], ts, metrics) for ts in sets} for label in models}
    replace_file(out / "results.json", json.dumps({
        "models": models,
        "sets": {ts.name: {"src_lang": ts.src_lang, "tgt_lang": ts.tgt_lang, "segments": len(ts.srcs),
                           "origin": ts.origin, "note": ts.note} for ts in sets},
        "metrics": {m.label: m.comet or m.label for m in metrics},
        "settings": translation_settings(args),
        "results": results,
    }, indent=2, ensure_ascii=False) + "\n")
    notes = [f"- {ts.name}: {ts.note}" for ts in sets if ts.note]
    notes.append("- failed extractions (no valid <think>..</think> <answer>..</answer>) are scored as empty "
                 "translations by every metric")
    if any(m.label == SELF_JUDGE for m in metrics):
        notes.append("- self-judge: the model's own greedy judge score (0-100); a judgement that does not parse "
                     "scores 0")
    text = f"## The paper's table (COMET x100)\n\n{table}\n" if (table := paper_table(results)) else ""
    text += "## All metrics (COMET x100)\n\n" + metrics_table(results, sets, metrics) + "\n" + "\n".join(notes) + "\n"
    replace_file(out / "table.md", text)
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'} and segments.jsonl per model x set under {out}")


# ----------------------------------------------------------------------------------------------------
# checks before any work: flags, models, --out

INT_FLAGS = {"--batch-size": 1, "--max-new-tokens": 1, "--judge-max-new-tokens": 1, "--comet-batch-size": 1}  # least


def translation_settings(args) -> dict:
    """What shapes the translations on disk; a rerun with other values would mix two runs in one file."""
    return {"template": args.template, "temperature": args.temperature, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, "judge_max_new_tokens": args.judge_max_new_tokens}


def check_device(device: str):
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):  # what the sampler and COMET run on
        raise EvalError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device != "cpu" and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {device}: {torch.cuda.device_count()} CUDA devices visible here; use cpu, or "
                        f"cuda:N with N below that")


def set_names(args) -> list[str]:
    names = args.sets.split(",") if args.sets is not None else ([] if args.src else list(PAPER_SETS))
    return [name.strip() for name in names if name.strip()]


def check_set_flags(args):
    """--sets, --flores-dir and the local set's flags, checked without reading any data."""
    if not args.src and (args.ref or args.src_lang or args.tgt_lang):
        raise EvalError("--ref/--src-lang/--tgt-lang describe a local set and need --src")
    names = set_names(args)
    for name in names:
        if parse_set_name(name)[0] == "flores":
            flores_root(args.flores_dir, name)
    if args.src:
        check_local_flags(args.src, args.ref, args.src_lang, args.tgt_lang)
        names.append(Path(args.src).expanduser().stem)
    if not names:
        raise EvalError("--sets is empty and there is no --src: name test sets (e.g. --sets wmt23:en-zh) or give --src")
    if len(set(names)) < len(names):
        raise EvalError(f"--sets/--src: two test sets are named alike ({', '.join(names)})")


def model_labels(paths: list[str]) -> dict[str, str]:
    """label -> path. A label is the shortest tail of the path that tells the models apart: 'step_400', or
    'run1/step_400' and 'run2/step_400' for two runs. It names the table row and the output folder."""
    # abspath, not resolve: two links to one checkpoint are still two rows the user asked for
    parts = [Path(os.path.abspath(os.path.expanduser(p))).parts for p in paths]
    for i, p in enumerate(parts):
        if p in parts[:i]:
            raise EvalError(f"--model {paths[i]}: given twice")
    for k in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]).lstrip("/") for p in parts]
        if len(set(labels)) == len(labels):
            return dict(zip(labels, paths))


def fingerprint(model_dir: str) -> dict:
    """What tells this checkpoint from any other, in well under a second: its resolved path, a hash of the files
    that shape its translations besides the weights, and the name, size and mtime of every weight file. Not the
    weights index: two fine-tunes of one base have byte-identical indexes (same names, shard plan and sizes).
    Not a hash of the weights: that reads every byte (15 GB for a 7B model). Rewriting a weight file changes its
    mtime, and a copy elsewhere has another path: both count as another model, never wrongly as the same one.
    Checks on the way that the directory is a checkpoint we can load."""
    path = Path(model_dir).expanduser().resolve()
    try:  # small files only: a missing file, an architecture or a tokenizer we cannot use fails now, not in hours
        read_config(path)
        load_tokenizer(path)
    except CheckpointError as e:
        raise EvalError(f"--model {model_dir}: {e}") from None
    if not (weights := sorted(path.glob("*.safetensors"))):
        raise EvalError(f"--model {model_dir}: no *.safetensors weights in {path}")
    shaping = [f for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
               if (path / f).is_file()]
    return {"path": str(path),
            "sha256": {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in shaping},
            "weights": {w.name: [w.stat().st_size, w.stat().st_mtime_ns] for w in weights}}


def read_record(path: Path, where: str) -> dict:
    """A JSON object eval.py wrote under --out (settings.json, model.json)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise EvalError(f"{where}: cannot read {path} ({e}); delete it or use another --out") from None
    if not isinstance(record, dict):
        raise EvalError(f"{where}: {path} is not a JSON object; delete it or use another --out")
    return record


# what check_out names when a label's folder holds another checkpoint's translations
FINGERPRINT_PARTS = {"path": "another path", "sha256": "other config/tokenizer files",
                     "weights": "other weight files (sizes or mtimes)"}


def check_out(out: Path, settings: dict, models: dict[str, str], fingerprints: dict[str, dict]):
    """--out: a directory we can write or create, whose earlier outputs were made with these settings and, per
    label, by the very checkpoint now under that label (OUT/<label>/model.json). Another checkpoint under a known
    label is refused, never resumed: the translations on disk would be credited to the wrong model."""
    where = f"--out {out}"
    first = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists() or p.is_symlink())
    if not first.is_dir():
        raise EvalError(f"{where}: {first} exists and is not a directory; give a directory (created if missing)")
    if not os.access(first, os.W_OK | os.X_OK):
        raise EvalError(f"{where}: {first} is not writable; give a directory you can write")
    if (out / "settings.json").exists():
        before = read_record(out / "settings.json", where)
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise EvalError(f"{where}: holds outputs made with other settings ({'; '.join(changed)}); use another "
                            f"--out")
    for label, fp in fingerprints.items():
        folder, flag = out / label, f"--model {models[label]}"
        if (folder / "model.json").exists():
            before = read_record(folder / "model.json", where)
            if before != fp:
                changed = ", ".join(FINGERPRINT_PARTS[k] for k in fp if before.get(k) != fp[k])
                raise EvalError(f"{flag}: {folder} holds the translations of another checkpoint ({before.get('path')};"
                                f" {changed}); refusing to mix them: use another --out, or delete {folder}")
        elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise EvalError(f"{flag}: {folder} holds outputs without a model.json to say which checkpoint made them "
                            f"(an older eval.py?); use another --out, or delete {folder}")


def check_args(args) -> tuple[dict[str, str], list[Metric], dict[str, dict]]:
    """Every flag and combination, right after parsing: seconds, no model loaded, nothing written. Each problem
    is one EvalError naming the flag and what would be valid. Returns models by label, metrics, fingerprints."""
    for flag, least in INT_FLAGS.items():
        if (value := getattr(args, flag[2:].replace("-", "_"))) < least:
            raise EvalError(f"{flag} {value}: must be an integer >= {least}")
    if not 0 <= args.temperature < float("inf"):  # NaN fails this too
        raise EvalError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 <= args.seed < 2**63:  # the sampler's generator takes up to 64 bits; seed + segment index stays below
        raise EvalError(f"--seed {args.seed}: must be an integer in [0, 2**63)")
    check_device(args.device)
    metrics = parse_metrics(args.metrics)
    check_set_flags(args)
    models = model_labels(args.model)
    fingerprints = {label: fingerprint(path) for label, path in models.items()}
    check_out(Path(args.out), translation_settings(args), models, fingerprints)
    return models, metrics, fingerprints


# ----------------------------------------------------------------------------------------------------
# main

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line `eval: error: ...` and exit status 2 from main, not a usage block
        raise EvalError(message)


def parse_args(argv=None):
    p = Parser(prog="eval.py", description=(
        "Translate test sets with one or more checkpoints and score them (COMET, BLEU, chrF, the model's own "
        "judge); prints the paper's table. Rerun the same command to resume. Every flag is checked before any "
        "model loads; a problem is one line `eval: error: ...` and exit status 2."))
    p.add_argument("--model", action="append", required=True,
                   help="HF checkpoint directory (config.json, tokenizer.json, *.safetensors); repeat to compare "
                        "several models side by side. OUT/<label>/model.json records which checkpoint made a label's "
                        "translations (resolved path, config/tokenizer hashes, weight files' sizes and mtimes); "
                        "another checkpoint under the same label is refused, never credited with them")
    p.add_argument("--sets", default=None,
                   help=f"comma-separated test sets (default: {','.join(PAPER_SETS)}; none when --src is given). "
                        f"wmtNN:SRC-TGT comes through sacrebleu (any of its sets), flores:en-zh/zh-en from "
                        f"--flores-dir; wmt24:zh-en is wmt24 en-zh reversed")
    p.add_argument("--flores-dir", default=os.environ.get("FLORES_DIR"),
                   help="local Flores200 directory: the FLORES-200 release or flores_plus (default: $FLORES_DIR)")
    p.add_argument("--src", help="local test set: plain-text sources (one a line, needs --ref/--src-lang/"
                                 "--tgt-lang) or a .jsonl of {src, ref, src_lang, tgt_lang}")
    p.add_argument("--ref", help="references for a plain-text --src, one a line")
    p.add_argument("--src-lang", help=f"source language code of a plain-text --src: {', '.join(judge.LANGUAGES)}")
    p.add_argument("--tgt-lang", help="target language code of a plain-text --src, another of those")
    p.add_argument("--metrics", default="xcomet-xxl,cometkiwi-xxl,bleu,chrf",
                   help=f"comma-separated: bleu, chrf, {SELF_JUDGE} (the model's own judge score), "
                        f"{', '.join(f'{k} ({v})' for k, v in COMET_ALIASES.items())}, a local COMET checkpoint that "
                        f"exists (a directory holding checkpoints/model.ckpt and hparams.yaml), a hub name ORG/NAME "
                        f"that is not a local path (COMET downloads it when scoring), or LABEL=one of the COMET ones "
                        f"(e.g. xcomet-xxl=/ckpt/XCOMET-XXL); anything else stops before any work "
                        f"(default: %(default)s)")
    p.add_argument("--out", default="out/eval",
                   help="output directory, created if missing; a rerun resumes from what is there, and refuses "
                        "other settings or another checkpoint under a known label (default: %(default)s)")
    p.add_argument("--template", default="r1", choices=judge.TEMPLATES,
                   help="prompt template, as in training (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed when --temperature > 0, in [0, 2**63) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="segments translated (and saved) per batch, >= 1 (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="token budget of one translation, thinking included, >= 1; WMT24 segments are "
                        "paragraphs (default: %(default)s)")
    p.add_argument("--judge-max-new-tokens", type=int, default=1024,
                   help=f"token budget of one {SELF_JUDGE} judgement, >= 1 (default: %(default)s)")
    p.add_argument("--comet-batch-size", type=int, default=16,
                   help="segments per COMET forward, >= 1 (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N: the translation models and COMET (default: %(default)s)")
    return p.parse_args(argv)


def load_sets(args) -> list[TestSet]:
    sets = [load_named_set(name, args.flores_dir) for name in set_names(args)]
    if args.src:
        sets.append(load_local_set(args.src, args.ref, args.src_lang, args.tgt_lang))
    for ts in sets:
        note = f" (NOTE: {ts.note})" if ts.note else ""
        print(f"{ts.name}: {len(ts.srcs)} segments, {ts.src_lang}->{ts.tgt_lang}, from {ts.origin}{note}",
              file=sys.stderr)
    return sets


def run(args):
    models, metrics, fingerprints = check_args(args)
    sets = load_sets(args)  # reads (or downloads) the test data: still nothing written
    out = Path(args.out)
    for label, fp in fingerprints.items():
        (out / label).mkdir(parents=True, exist_ok=True)
        replace_file(out / label / "model.json", json.dumps(fp, indent=2) + "\n")
    replace_file(out / "settings.json", json.dumps(translation_settings(args), indent=2) + "\n")
    outputs = run_models(models, sets, metrics, out, args)
    run_metrics(outputs, metrics, args)
    report(models, sets, metrics, outputs, out, args)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        try:
            run(args)
        except KeyboardInterrupt:
            print(f"\neval: interrupted; rerun the same command to resume from {args.out}", file=sys.stderr)
            return 130
    except (EvalError, DataError, CheckpointError, RewardError) as e:
        # one line, always: a message quoting a library (a JSON or tokenizer error) may hold a line break
        print("eval: error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
