"""Score translation checkpoints on test sets the way the paper does, several side by side in one table.

    python eval.py --model /ckpt/Qwen2.5-7B --model out/ssr-zero-7b/step_400      # the paper's table
    python eval.py --model DIR --src test.en --ref test.zh --src-lang en --tgt-lang zh --metrics bleu,chrf

Three phases, each resuming from what --out holds. Translate: each model in turn, greedy by default, with the
training prompt and <answer> extraction, appending every batch to OUT/<model>/<set>/segments.jsonl; `self-judge`
runs here too, while the model is loaded. Score: each COMET model in turn, freed before the next loads (two XXL
models never share the GPU); BLEU and chrF through sacrebleu. Report: OUT/results.json and OUT/table.md (the
paper's table, then every metric of every set), also printed. The test sets themselves come from testsets.py.

Every flag is checked first, in seconds and before any model loads (check_args); a problem is one line
`eval: error: ...`, exit status 2. OUT/<label>/model.json records which checkpoint made that label's translations;
another checkpoint under the same label (say a second `step_6`) is refused, never credited with them.

`--judge-quality K` measures instead how well a model judges translations: K plain-prompt candidates per source,
judged with the training judge prompt, ranked against their reference chrF (judge_quality).

A response with an invalid format (no single <think>..</think> <answer>..</answer>) keeps its raw text and is
scored as an empty translation by every metric: dropping it would flatter the model. COMET and self-judge scores
are x100, like BLEU and chrF.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
from tqdm import tqdm

import judge
from checkpoint import CheckpointError, load_comet, load_pretrained, load_tokenizer, read_config
from data import LANGUAGES, DataError, bleu_tokenizer, read_jsonl
from judge import RewardError
from rundir import RunDirError, check_eval_out, fingerprint, jsonl, load_rows, lock, replace_file, segments_path
from plan import device_memory_bytes, kv_bytes_per_token
from sampler import DECODE_MODES, Sampler
from testsets import PAPER_SETS, TestSet, check_set_flags, load_sets


class EvalError(ValueError):
    """Bad input to the evaluation (a flag, a file under --out); the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# metrics

# the paper's two metrics, by the names its table uses; both are gated on the Hugging Face hub (accept the
# licence and log in once) and ~10.7B parameters each
COMET_ALIASES = {"xcomet-xxl": "Unbabel/XCOMET-XXL", "cometkiwi-xxl": "Unbabel/wmt23-cometkiwi-da-xxl"}
SACREBLEU_METRICS = ("bleu", "chrf")
SELF_JUDGE = "self-judge"
# what --metrics accepts, for its help and for every error about it
METRIC_NAMES = (f"valid: {', '.join(SACREBLEU_METRICS)}, {SELF_JUDGE} (the model's own judge score), "
                f"{', '.join(f'{k} ({v})' for k, v in COMET_ALIASES.items())}, a local COMET checkpoint (a directory "
                f"holding checkpoints/model.ckpt and hparams.yaml), a hub name ORG/NAME that is not a local path "
                f"(COMET downloads it when scoring), or LABEL=any of the COMET ones (e.g. xcomet-xxl=/ckpt/XCOMET-XXL)")
# a Hugging Face hub model id, ORG/NAME: what COMET downloads when the name is not a local path
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)


@dataclass
class Metric:
    label: str  # the key in results.json, segments.jsonl and the tables
    comet: str | None = None  # COMET model name or local path; None for bleu, chrf, self-judge


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
# phase 1: translate (and self-judge) with each model

def row_seed(seed: int, prompt: list[int]) -> int:
    """The sampling seed of one prompt: a hash of --seed and the prompt's tokens. Every sampled output of eval is
    then a function of the seed and its own input alone, never of the batch it shares, --batch-size, the set's
    length or where a resumed run starts (the sampler gives each prompt its own generator)."""
    return int.from_bytes(hashlib.sha256(json.dumps([seed, prompt]).encode()).digest()[:8], "little") >> 1


def make_sampler(model, prompts: list[list[int]], batch_size: int, max_new_tokens: int, group_size: int = 1,
                 decode: str = "auto"):
    """A sampler for `prompts`: batch_size prompts x group_size samples at a time; the KV cache is sized for the
    longest prompt plus its response (and the <answer> an expected score appends), so no prompt is cut or refused."""
    weight = next(model.parameters())
    return Sampler(model, max_batch_size=min(batch_size, len(prompts)) * group_size, device=weight.device,
                   dtype=weight.dtype, max_seq_len=max(map(len, prompts)) + max_new_tokens + 16, decode=decode)


def respond(sampler, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
            batch_size: int, desc: str, group_size: int = 1, stop_strings=judge.STOP_STRINGS):
    """Generate group_size responses to each prompt, batch_size prompts at a time, with a progress bar; yields
    (first prompt index, response texts (prompt-major, group_size each), finish reasons) per batch."""
    with tqdm(total=len(prompts), desc=desc, unit="seg") as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            outs = sampler.generate(batch, group_size=group_size, max_new_tokens=max_new_tokens,
                                    temperature=temperature, stop_token_ids=tok.eos_ids, stop_strings=stop_strings,
                                    tokenizer=tok, seed=[row_seed(seed, p) for p in batch])
            # special tokens skipped, as in training: a trailing EOS ends the response, it is not part of its text
            yield start, [tok.decode(o.tokens, skip_special_tokens=True) for o in outs], [o.finish_reason for o in outs]
            bar.update(len(batch))


def translate(model, tok, srcs: list[str], src_lang: str, tgt_lang: str, *, template: str = "r1",
              think_prefill: bool = False, plain: bool = False, max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int = 0, batch_size: int = 64, group_size: int = 1, decode: str = "auto",
              desc: str = "translate", on_batch=None) -> list[dict]:
    """Translate `srcs` in memory: group_size translations of each (source-major), each a dict {src, hyp, raw,
    extracted, finish_reason}. The translation is the <answer> of the training prompt's response (hyp "" and
    extracted False when the format is invalid), or with `plain` the plain prompt's whole stripped response.
    Sampled translations depend on (seed, source) alone. on_batch(rows) is called with each batch's new rows."""
    if not srcs:
        return []
    prefill = judge.think_prefill(template) if think_prefill and not plain else ""
    # every translation prompt is built here: the training prompt, so eval measures the task training optimized
    prompts = [tok.encode(judge.plain_prompt(src, src_lang, tgt_lang, template) if plain
                          else judge.actor_prompt(src, src_lang, tgt_lang, template, think_prefill)) for src in srcs]
    sampler = make_sampler(model, prompts, batch_size, max_new_tokens, group_size, decode)
    rows = []
    for start, raws, reasons in respond(sampler, tok, prompts, max_new_tokens, temperature, seed, batch_size, desc,
                                        group_size):
        new = []
        for k, (raw, reason) in enumerate(zip(raws, reasons)):
            raw = prefill + raw  # the prefilled <think> is part of the response, as in training
            answer = (raw.strip() or None) if plain else judge.extract_answer(raw)
            new.append({"src": srcs[start + k // group_size], "hyp": answer or "", "raw": raw,
                        "extracted": answer is not None, "finish_reason": reason})
        if on_batch is not None:
            on_batch(new)
        rows += new
    return rows


def self_judge(model, tok, srcs: list[str], hyps: list[str], src_lang: str, tgt_lang: str, *,
               groups: list[int] | None = None, mode: str = "pointwise", score: str = "text", template: str = "r1",
               think_prefill: bool = False, max_new_tokens: int = 512, batch_size: int = 64, decode: str = "auto",
               desc: str = "self-judge", on_batch=None) -> list[dict]:
    """The model's judgement of each translation hyps[i] of srcs[i], in memory, as training judges: the training
    judge prompt (pointwise, or --judge-mode group over the translations sharing a `groups` id), greedy, each
    distinct prompt asked once. score "text": the number parsed from the judge's <answer> (judge.parse_judgement);
    "expected": the mean of its distribution over 0-100 after <answer> (judge.expected_verdicts), which never
    fails. Returns per translation {score (None when it failed), failure (a judge.FAILURE_KINDS kind or None),
    raw (the judge's text)}; on_batch({index: that dict}) after each batch of prompts, for the translations it judged."""
    sources = [{"src": s, "src_lang": src_lang, "tgt_lang": tgt_lang} for s in srcs]
    tasks = judge.judge_tasks(sources, hyps, groups if groups is not None else list(range(len(hyps))), mode,
                              dedup=True, template=template, prefill=think_prefill)
    prompts = [tok.encode(t.prompt) for t in tasks]
    out: list[dict | None] = [None] * len(hyps)
    if not prompts:
        return out
    sampler = make_sampler(model, prompts, batch_size, max_new_tokens, decode=decode)
    expected = score == "expected"
    for start, raws, _ in respond(sampler, tok, prompts, max_new_tokens, 0.0, 0, batch_size, desc,
                                  stop_strings=judge.ANSWER_STOP if expected else judge.STOP_STRINGS):
        batch = range(start, start + len(raws))
        if expected:
            verdicts = judge.expected_verdicts(sampler.score, tok, [prompts[t] for t in batch], raws,
                                               [tasks[t] for t in batch], sampler.max_seq_len)
        else:
            verdicts = [judge.read_verdict(tasks[t], raw) for t, raw in zip(batch, raws)]
        done = {}
        for t, raw, verdict in zip(batch, raws, verdicts):
            for members, j in zip(tasks[t].members, verdict):
                for i in members:
                    out[i] = done[i] = {"score": j.score, "failure": j.failure, "raw": raw}
        if on_batch is not None:
            on_batch(done)
    return out


def translate_segments(model, tok, ts: TestSet, path: Path, rows: list[dict], label: str, args):
    """translate() the segments `rows` (read from `path`) lacks, appending each batch to both: a rerun resumes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        def save(batch: list[dict]):
            new = []
            for i, r in enumerate(batch, len(rows)):
                answer = r["hyp"] if r["extracted"] else None
                # scored as written; --strip-quotes takes off the quotation marks of the paper's artifact
                quoted = answer is not None and judge.answer_quoted(answer, ts.srcs[i])
                hyp = judge.strip_quotes(answer, ts.srcs[i]) if quoted and args.strip_quotes else answer
                # the languages travel with each row: scripts/paired_bootstrap.py picks BLEU's tokenizer from them
                new.append({"i": i, "src": ts.srcs[i], "ref": ts.refs[i], "src_lang": ts.src_lang,
                            "tgt_lang": ts.tgt_lang, "hyp": hyp or "", "raw": r["raw"],
                            "extracted": r["extracted"], "quoted": quoted, "finish_reason": r["finish_reason"],
                            "scores": {}})
            f.write(jsonl(new))  # appending is safe: load_rows drops a last line cut short by a kill
            f.flush()  # a batch on disk is a batch a rerun does not translate again
            rows.extend(new)

        translate(model, tok, ts.srcs[len(rows):], ts.src_lang, ts.tgt_lang, template=args.template,
                  think_prefill=args.think_prefill, plain=label in args.plain_labels,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                  batch_size=args.batch_size, decode=args.decode, desc=f"{label} {ts.name}", on_batch=save)


def judge_segments(model, tok, ts: TestSet, path: Path, rows: list[dict], label: str, args):
    """The self-judge metric: self_judge() each translation the rows lack a score for. A failed extraction is
    judged as the empty translation it is scored as everywhere; a judgement that does not parse scores 0 and
    is counted, its failure kind (judge.FAILURE_KINDS) kept in the segment's row. Saved after every batch."""
    todo = [i for i, r in enumerate(rows) if SELF_JUDGE not in r["scores"]]

    def save(done: dict[int, dict]):
        for k, result in done.items():
            row = rows[todo[k]]
            row.update(judge_raw=result["raw"], judge_parsed=result["score"] is not None,
                       judge_failure=result["failure"])
            row["scores"][SELF_JUDGE] = result["score"] if result["score"] is not None else 0.0
        replace_file(path, jsonl(rows))

    self_judge(model, tok, [rows[i]["src"] for i in todo], [rows[i]["hyp"] for i in todo], ts.src_lang, ts.tgt_lang,
               score=args.judge_score, template=args.template, think_prefill=args.think_prefill,
               max_new_tokens=args.judge_max_new_tokens, batch_size=args.batch_size, decode=args.decode,
               desc=f"{label} {ts.name} self-judge", on_batch=save)


def free_memory():
    """Drop what the last model left behind, so the next one (an XXL COMET after a 7B) finds the GPU empty."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_models(models: dict[str, str], sets: list[TestSet], metrics: list[Metric], out: Path, args) -> dict:
    """Phase 1 for every model; returns {(label, set name): (segments.jsonl, its rows, the set)}."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on GPU, as the trainer samples
    judged = any(m.label == SELF_JUDGE for m in metrics)
    outputs = {(label, ts.name): (segments_path(out, label, ts), load_rows(segments_path(out, label, ts), ts), ts)
               for label in models for ts in sets}
    for label, model_dir in models.items():
        pending = [(path, rows, ts) for path, rows, ts in (outputs[label, ts.name] for ts in sets)
                   if len(rows) < len(ts.srcs) or (judged and any(SELF_JUDGE not in r["scores"] for r in rows))]
        if not pending:  # everything on disk already: don't load a 7B model to do nothing
            continue
        tok = load_tokenizer(model_dir)
        model = load_pretrained(model_dir, device=device, dtype=dtype).eval()
        for path, rows, ts in pending:  # each phase does only what the rows lack
            translate_segments(model, tok, ts, path, rows, label, args)
            if judged:
                judge_segments(model, tok, ts, path, rows, label, args)
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
        scorer = judge.CometScorer(load_comet(metric.comet), metric.comet, device=args.device,
                                   batch_size=args.comet_batch_size)
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

def summarize(rows: list[dict], ts: TestSet, metrics: list[Metric], template: str) -> dict:
    """System scores of one model on one set: corpus BLEU/chrF, the mean of per-segment COMET/self-judge scores; and
    how many answers fail each of the trainer's answer checks (judge.check_answer; scored as written all the same)."""
    corpus = corpus_scores(rows, ts)
    scores = {m.label: corpus[m.label] if m.label in SACREBLEU_METRICS
              else statistics.fmean(r["scores"][m.label] for r in rows) for m in metrics}
    result = {"segments": len(rows), "failed_extractions": sum(not r["extracted"] for r in rows),
              "quoted": sum(r["quoted"] for r in rows), "scores": scores,
              "answer_checks": {check: sum(bool(r["hyp"]) and judge.check_answer(r["hyp"], r["src"], ts.src_lang,
                                                                                 ts.tgt_lang, (check,), template)
                                           is not None for r in rows)
                                for check in answer_checks(ts)}}
    if any(m.label == SELF_JUDGE for m in metrics):
        result["judge_parse_failures"] = sum(not r["judge_parsed"] for r in rows)
    return result


def answer_checks(ts: TestSet) -> tuple[str, ...]:
    """The answer checks eval.py counts on a set: all of them, but the length check only for a pair whose length
    ratio was measured (judge.LENGTH_RATIOS)."""
    return tuple(c for c in judge.ANSWER_CHECKS if c != "length" or (ts.src_lang, ts.tgt_lang) in judge.LENGTH_RATIOS)


def markdown(header: list[str], rows: list[list]) -> str:
    """Both tables: a float is a score (2 decimals), None a number that is missing (–), anything else as is."""
    cell = lambda v: "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    return "".join("| " + " | ".join(map(cell, cells)) + " |\n" for cells in [header, ["---"] * len(header), *rows])


PAPER_DIRECTIONS = {"zh-en": "ZH→EN", "en-zh": "EN→ZH"}
PAPER_CORPORA = {"wmt23": "WMT23", "wmt24": "WMT24", "flores": "Flores"}
PAPER_METRICS = {"cometkiwi-xxl": "CometKiwi", "xcomet-xxl": "XCOMET"}


def prompt_names(args) -> dict[str, str]:
    """label -> the prompt its translations were made with, as the tables show it."""
    think = "think+prefill" if args.think_prefill else "think"
    stripped = "+strip-quotes" if args.strip_quotes else ""  # a stripped row never passes for one as written
    return {label: ("plain" if label in args.plain_labels else think) + stripped for label in args.labels}


def paper_table(results: dict, prompts: dict[str, str]) -> str:
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
        rows.append([model, prompts[model], *(statistics.fmean(v) if None not in v else None for v in values)])
    return markdown(["Model", "Prompt", *(title for title, _ in columns)], rows)


def metrics_table(results: dict, sets: list[TestSet], metrics: list[Metric], prompts: dict[str, str]) -> str:
    """Every metric of every set, a row per model x set, with the failures a reader must see next to them."""
    counts = ["failed_extractions", "quoted"] + (["judge_parse_failures"] if any(m.label == SELF_JUDGE for m in metrics)
                                                 else [])
    checks = [c for c in judge.ANSWER_CHECKS if any(c in answer_checks(ts) for ts in sets)]
    fails = lambda result, c: f"{result['answer_checks'][c]}/{result['segments']}" if c in result["answer_checks"] \
        else "–"
    rows = [[model, prompts[model], ts.name, *(per_set[ts.name]["scores"][m.label] for m in metrics),
             *(f"{per_set[ts.name][c]}/{per_set[ts.name]['segments']}" for c in counts),
             *(fails(per_set[ts.name], c) for c in checks)]
            for model, per_set in results.items() for ts in sets]
    return markdown(["Model", "Prompt", "Set", *(m.label for m in metrics), *(c.replace("_", " ") for c in counts),
                     *(f"fails {c}" for c in checks)], rows)


def report(models: dict[str, str], sets: list[TestSet], metrics: list[Metric], outputs: dict, out: Path, args):
    results = {label: {ts.name: summarize(outputs[label, ts.name][1], ts, metrics, args.template) for ts in sets}
               for label in models}
    prompts = prompt_names(args)
    replace_file(out / "results.json", json.dumps({
        "models": models,
        "prompts": prompts,
        "sets": {ts.name: {"src_lang": ts.src_lang, "tgt_lang": ts.tgt_lang, "segments": len(ts.srcs),
                           "origin": ts.origin, "note": ts.note} for ts in sets},
        "metrics": {m.label: m.comet or m.label for m in metrics},
        "settings": translation_settings(args),
        "results": results,
    }, indent=2, ensure_ascii=False) + "\n")
    notes = [f"- {ts.name}: {ts.note}" for ts in sets if ts.note]
    notes.append("- prompt think: the training prompt, the translation extracted from <answer>; failed extractions (no "
                 "valid <think>..</think> <answer>..</answer>) are scored as empty translations by every metric"
                 + ("; +prefill: the response starts with <think> (--think-prefill)" if args.think_prefill else ""))
    notes.append("- quoted: answers wrapped in quotation marks their source is not (the paper's late SSR-Zero "
                 "artifact); " + ("--strip-quotes: scored without those marks" if args.strip_quotes
                                  else "scored as written"))
    notes.append("- fails <check>: answers the trainer's --answer-checks would refuse before judging "
                 "(judge.check_answer: a copy of the source, the template's placeholder, another language, a length "
                 "outside the pair's band, the wrong script), each check counted on its own; scored as written all "
                 "the same")
    if args.plain_labels:
        notes.append("- prompt plain: a bare translation request, the whole response is the translation (empty: a "
                     "failed extraction)")
    if any(m.label == SELF_JUDGE for m in metrics):
        notes.append("- self-judge: the model's own greedy judge score (0-100); a judgement that does not parse "
                     "scores 0")
    text = f"## The paper's table (COMET x100)\n\n{table}\n" if (table := paper_table(results, prompts)) else ""
    text += ("## All metrics (COMET x100)\n\n" + metrics_table(results, sets, metrics, prompts) + "\n"
             + "\n".join(notes) + "\n")
    replace_file(out / "table.md", text)
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'} and segments.jsonl per model x set under {out}")


# ----------------------------------------------------------------------------------------------------
# judge quality (--judge-quality K): does the model's judge order translations as reference chrF does?

def read_candidates(path: str, k: int) -> dict[str, list[str]]:
    """--candidates FILE: jsonl {"src": ..., "candidates": [k strings]} -> {src: candidates}."""
    found = {}
    for where, row in read_jsonl(path):  # the project's jsonl reader: a DataError names the file and line
        if (not isinstance(row.get("src"), str) or not isinstance(row.get("candidates"), list)
                or len(row["candidates"]) != k or not all(isinstance(c, str) for c in row["candidates"])):
            raise EvalError(f"{where}: expected {{\"src\": string, \"candidates\": [{k} strings]}} "
                            f"(--judge-quality {k})")
        found[row["src"]] = row["candidates"]
    return found


def pair_counts(chrfs: list[float], scores: list[float | None]) -> dict[str, int]:
    """One source's candidate pairs: agree/disagree (chrF and the judge both differ and order the pair alike or
    not), chrf_ties (equal chrF: nothing to get right), judge_ties (equal judge scores, chrF differs), failed
    (a judgement of the pair failed; left out of everything else, not counted as a score of 0)."""
    counts = dict.fromkeys(("agree", "disagree", "chrf_ties", "judge_ties", "failed"), 0)
    for i in range(len(chrfs)):
        for j in range(i + 1, len(chrfs)):
            if scores[i] is None or scores[j] is None:
                counts["failed"] += 1
            elif chrfs[i] == chrfs[j]:
                counts["chrf_ties"] += 1
            elif scores[i] == scores[j]:
                counts["judge_ties"] += 1
            else:
                counts["agree" if (chrfs[i] > chrfs[j]) == (scores[i] > scores[j]) else "disagree"] += 1
    return counts


def kendall_tau_b(xs: list[float], ys: list[float]) -> float | None:
    """Kendall's tau-b of two score lists (ties on either side corrected for); None when either is constant."""
    concordant = discordant = x_ties = y_ties = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            x_ties += dx == 0
            y_ties += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = len(xs) * (len(xs) - 1) // 2
    norm = math.sqrt((pairs - x_ties) * (pairs - y_ties))
    return (concordant - discordant) / norm if norm > 0 else None


BOOTSTRAP_SAMPLES = 2000


def quality_stats(sources: list[dict]) -> dict:
    """Pairwise accuracy, its 95% interval and Kendall's tau-b over sources [{chrf: [...], scores: [...]}].

    accuracy = agree / (agree + disagree), over the pairs whose chrF and judge scores both differ. The interval
    is a percentile bootstrap over sources (BOOTSTRAP_SAMPLES resamples, seeded): the pairs of one source share
    its candidates and are not independent, so sources are what gets resampled. tau: tau-b per source over its
    judged candidates, averaged over the sources where it is defined (neither side constant)."""
    counts = [pair_counts(s["chrf"], s["scores"]) for s in sources]
    total = {k: sum(c[k] for c in counts) for k in counts[0]} if counts else {}
    pairs = total.get("agree", 0) + total.get("disagree", 0)
    taus = []
    for s in sources:
        judged = [(c, x) for c, x in zip(s["chrf"], s["scores"]) if x is not None]
        if len(judged) > 1 and (tau := kendall_tau_b(*map(list, zip(*judged)))) is not None:
            taus.append(tau)
    interval = None
    if pairs:
        rng = random.Random(0)
        ratios = []
        for _ in range(BOOTSTRAP_SAMPLES):
            pick = [counts[rng.randrange(len(counts))] for _ in counts]
            n = sum(c["agree"] + c["disagree"] for c in pick)
            if n:
                ratios.append(sum(c["agree"] for c in pick) / n)
        ratios.sort()
        interval = (ratios[int(0.025 * len(ratios))], ratios[min(len(ratios) - 1, int(0.975 * len(ratios)))])
    failures: dict[str, int] = {}
    for s in sources:
        for kind in s.get("failures", []):
            if kind is not None:
                failures[kind] = failures.get(kind, 0) + 1
    return {"accuracy": total["agree"] / pairs if pairs else None, "pairs": pairs, "interval": interval,
            "tau_b": statistics.fmean(taus) if taus else None, "tau_sources": len(taus), **total,
            "judgements": sum(len(s["scores"]) for s in sources), "failures": failures}


def judge_quality(models: dict[str, str], sets: list[TestSet], out: Path, args):
    """--judge-quality K: per model and set, K plain-prompt candidates per source (sampled at --temperature,
    default 1, from --seed; one prefill and the group fan-out; or --candidates), the model's judgement of each
    (--judge-mode, --judge-score), compared with each candidate's sentence chrF against the reference. Writes
    OUT/<label>/<set>/candidates.jsonl (reusable as --candidates) and judge-quality-<mode>-<score>.jsonl, prints
    the table."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    k, mode, score = args.judge_quality, args.judge_mode, args.judge_score
    given = args.given_candidates  # read and checked against every set before any model loaded
    rows, lines = [], []
    for label, model_dir in models.items():
        tok = load_tokenizer(model_dir)
        model = load_pretrained(model_dir, device=device, dtype=dtype).eval()
        for ts in sets:
            folder = out / label / ts.name
            folder.mkdir(parents=True, exist_ok=True)
            if given is not None:
                candidates = [given[s] for s in ts.srcs]
            else:
                made = translate(model, tok, ts.srcs, ts.src_lang, ts.tgt_lang, template=args.template, plain=True,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                 batch_size=args.batch_size, group_size=k, decode=args.decode,
                                 desc=f"{label} {ts.name} candidates")
                candidates = [[r["hyp"] for r in made[i * k:(i + 1) * k]] for i in range(len(ts.srcs))]
            written = folder / "candidates.jsonl"
            # --candidates may be this very file (a rerun into the same --out with another judge): it is the input,
            # possibly holding other sets' sources too, so it is left as it is rather than cut down to this set
            if given is None or not (written.exists() and written.samefile(args.candidates)):
                replace_file(written, jsonl([{"src": s, "candidates": c} for s, c in zip(ts.srcs, candidates)]))
            judged = self_judge(model, tok, [s for s in ts.srcs for _ in range(k)], [c for cs in candidates for c in cs],
                                ts.src_lang, ts.tgt_lang, groups=[i for i in range(len(ts.srcs)) for _ in range(k)],
                                mode=mode, score=score, template=args.template, think_prefill=args.think_prefill,
                                max_new_tokens=args.judge_max_new_tokens, batch_size=args.batch_size,
                                decode=args.decode, desc=f"{label} {ts.name} judge")
            sources = []
            for i, (src, ref, cs) in enumerate(zip(ts.srcs, ts.refs, candidates)):
                verdicts = judged[i * k:(i + 1) * k]
                sources.append({"src": src, "ref": ref, "candidates": cs,
                                "chrf": [sacrebleu.sentence_chrf(c, [ref]).score for c in cs],
                                "scores": [v["score"] for v in verdicts], "failures": [v["failure"] for v in verdicts],
                                "judge_raw": [v["raw"] for v in verdicts]})
            replace_file(folder / f"judge-quality-{mode}-{score}.jsonl", jsonl(sources))
            # the trivial judge: the candidate whose length (characters) is closest to the source's is best
            baseline = [{"chrf": s["chrf"], "scores": [-abs(len(c) - len(s["src"])) for c in s["candidates"]]}
                        for s in sources]
            stats = quality_stats(sources)
            rows += [[label, ts.name, mode, score, stats],
                     ["length closest to source", ts.name, "–", "–", quality_stats(baseline)]]
            accuracy = "n/a" if stats["accuracy"] is None else f"{stats['accuracy']:.3f}"
            lines.append(f"judge pairwise accuracy: {accuracy} over {stats['pairs']} pairs (mode {mode}, score {score})")
        del model
        free_memory()
    cell = lambda v: "–" if v is None else f"{v:.3f}"
    table = markdown(["Judge", "Set", "Mode", "Score", "Accuracy", "95% CI (bootstrap over sources)", "Pairs",
                      "Kendall tau-b (mean over sources)", "chrF ties", "judge ties", "pairs with a failed judgement",
                      "failures by kind"],
                     [[who, name, m, sc, cell(st["accuracy"]),
                       "–" if st["interval"] is None else f"{st['interval'][0]:.3f}–{st['interval'][1]:.3f}",
                       st["pairs"], cell(st["tau_b"]), st["chrf_ties"], st["judge_ties"], st["failed"],
                       ", ".join(f"{kind} {n}" for kind, n in sorted(st["failures"].items())) or "none"]
                      for who, name, m, sc, st in rows])
    replace_file(out / f"judge-quality-{mode}-{score}.json", json.dumps(
        [{"judge": who, "set": name, "mode": m, "score": sc, **st} for who, name, m, sc, st in rows], indent=2) + "\n")
    print(table + "\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# checks before any work: flags, models, --out

# flag -> (least, bound, what is valid): a value is valid when least <= value < bound, which NaN never is
COUNT = (1, float("inf"), "an integer >= 1")
NUMBER_FLAGS = {"--batch-size": COUNT, "--max-new-tokens": COUNT, "--judge-max-new-tokens": COUNT,
                "--comet-batch-size": COUNT, "--temperature": (0, float("inf"), "a finite number >= 0 (0 = greedy)"),
                "--seed": (0, 2**63, "an integer in [0, 2**63)")}
# the flags whose use depends on the run are None after parsing, so that one given where the run would not use it
# is told apart from its default and refused (check_run_flags); then they get these
DEFAULTS = {"metrics": "xcomet-xxl,cometkiwi-xxl,bleu,chrf", "comet_batch_size": 16, "strip_quotes": False,
            "temperature": 0.0, "seed": 0, "max_new_tokens": 2048}
# --judge-quality's candidates are sampled: greedy ones would be one translation K times. 1 is RESULTS.md section
# 4's protocol (the plain prompt, T = 1, seed 0)
CANDIDATE_TEMPERATURE = 1.0
# what --judge-quality never uses: it compares the judge with reference chrF and writes no translations
NOT_FOR_JUDGE_QUALITY = ("--metrics", "--comet-batch-size", "--strip-quotes")
# what only sampling the candidates uses, so nothing when --candidates gives them
NOT_WITH_CANDIDATES = ("--temperature", "--seed", "--max-new-tokens")


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def check_run_flags(args):
    """Refuse, in one line, a flag this run would not use (never ignore it silently), then give the flags left
    unset their defaults: --temperature is the translations' (0, greedy) or --judge-quality's candidates' (1)."""
    if args.judge_quality:
        unused = [(flag, "--judge-quality compares the judge with the candidates' reference chrF and writes no "
                         "translations") for flag in NOT_FOR_JUDGE_QUALITY]
        if args.candidates:
            unused += [(flag, "--candidates gives the candidates, so none is sampled") for flag in NOT_WITH_CANDIDATES]
        for flag, why in unused:
            if getattr(args, dest(flag)) is not None:
                raise EvalError(f"{flag} is not used here: {why}; drop it")
    defaults = DEFAULTS | ({"temperature": CANDIDATE_TEMPERATURE} if args.judge_quality else {})
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def translation_settings(args) -> dict:
    """What shapes the translations on disk; a rerun with other values would mix two runs in one file."""
    return {"template": args.template, "think_prefill": args.think_prefill, "temperature": args.temperature,
            "seed": args.seed, "strip_quotes": args.strip_quotes, "judge_score": args.judge_score,
            "max_new_tokens": args.max_new_tokens, "judge_max_new_tokens": args.judge_max_new_tokens}


def check_device(device: str):
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):  # what the sampler and COMET run on
        raise EvalError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device != "cpu" and int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {device}: {torch.cuda.device_count()} CUDA devices visible here; use cpu, or "
                        f"cuda:N with N below that")


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


def check_cache_fits(args, models: dict[str, str], judged: bool):
    """The sampler's KV cache holds --batch-size rows of prompt + --max-new-tokens positions (the judge's budget
    for the self-judge); --judge-quality's candidates take K rows per source (one prefill fanned out to K samples).
    Even without the prompts, a cache larger than this device's memory is refused now, in one line, not as an
    allocation failure after the model loaded."""
    on_gpu = args.device != "cpu"
    available = device_memory_bytes(on_gpu)
    # (flag, its token budget, cache rows per source in a batch); --candidates samples nothing
    budgets = (([] if args.candidates else [("--max-new-tokens", args.max_new_tokens, args.judge_quality or 1)])
               + ([("--judge-max-new-tokens", args.judge_max_new_tokens, 1)] if judged else []))
    for label, path in models.items():
        per_token = kv_bytes_per_token(read_config(path), 2 if on_gpu else 4)  # bf16 on GPU, fp32 on CPU
        for flag, tokens, per_source in budgets:
            rows = args.batch_size * per_source
            if (need := rows * tokens * per_token) > available:
                fanned = per_source > 1
                raise EvalError(f"{flag} {tokens}: {label}'s KV cache for --batch-size {args.batch_size} "
                                f"{f'x --judge-quality {per_source} = {rows} ' if fanned else ''}rows of {tokens} "
                                f"positions needs {need / 2**30:.0f} GiB, more than the {available / 2**30:.0f} GiB "
                                f"of this device; lower {flag}, --batch-size{' or --judge-quality' if fanned else ''}")


def check_args(args) -> tuple[dict[str, str], list[Metric], dict[str, dict]]:
    """Every flag and combination, right after parsing: seconds, no model loaded, nothing written. Each problem
    is one EvalError (or testsets' TestSetError) naming the flag and what would be valid. Returns models by label,
    metrics, fingerprints."""
    check_run_flags(args)
    for flag, (least, bound, valid) in NUMBER_FLAGS.items():
        if not least <= (value := getattr(args, dest(flag))) < bound:
            raise EvalError(f"{flag} {value}: must be {valid}")
    check_device(args.device)
    # the sampler would refuse it only after the model loaded
    if args.decode == "kernel" and args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise EvalError("--decode kernel: Triton runs on CUDA, or on CPU in its interpreter (TRITON_INTERPRET=1); "
                        "here use auto or sdpa")
    metrics = [] if args.judge_quality else parse_metrics(args.metrics)
    check_set_flags(args)
    if not args.model and not args.plain_model:
        raise EvalError("no model: give --model DIR (the training prompt) or --plain-model DIR (the plain prompt)")
    # a --plain-model's label gets "+plain": the same checkpoint may be a row with each prompt
    plain = ({f"{label}+plain": path for label, path in model_labels(args.plain_model).items()}
             if args.plain_model else {})
    models = (model_labels(args.model) if args.model else {}) | plain
    args.labels, args.plain_labels = list(models), set(plain)
    if args.judge_quality and (args.judge_quality < 2 or plain):
        raise EvalError(f"--judge-quality {args.judge_quality}: needs K >= 2 candidates per source and --model "
                        f"(a judge asked with the training judge prompt), not --plain-model")
    if (args.candidates or args.judge_mode != "pointwise") and not args.judge_quality:
        raise EvalError("--candidates and --judge-mode are for --judge-quality K")
    if args.judge_quality and not args.candidates and args.temperature == 0:
        raise EvalError(f"--temperature 0: --judge-quality samples its {args.judge_quality} candidates per source, "
                        f"and greedy ones would all be the same translation; give T > 0 (default "
                        f"{CANDIDATE_TEMPERATURE:g})")
    # read (and each line checked) now; whether it covers every source once the sets are read (check_loaded_sets)
    args.given_candidates = read_candidates(args.candidates, args.judge_quality) if args.candidates else None
    fingerprints = {label: fingerprint(path) for label, path in models.items()}
    check_cache_fits(args, models, judged=any(m.label == SELF_JUDGE for m in metrics) or bool(args.judge_quality))
    # --judge-quality recomputes everything and resumes nothing: its files never mix with a translation run's
    check_eval_out(Path(args.out), {} if args.judge_quality else translation_settings(args), models, fingerprints)
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
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="HF checkpoint directory (config.json, tokenizer.json, *.safetensors); repeat to compare "
                        "models side by side. OUT/<label>/model.json records which checkpoint made a label's "
                        "translations: another checkpoint under the same label is refused, never credited with them")
    p.add_argument("--plain-model", action="append", default=[], metavar="DIR",
                   help="HF checkpoint directory translated with the plain prompt (a bare request; the whole "
                        "response is the translation, no <think>/<answer>): a fair baseline row for a model never "
                        "trained on the format, e.g. an instruct model; its label gets '+plain'; repeatable")
    p.add_argument("--sets", metavar="LIST",
                   help=f"comma-separated test sets (default: {', '.join(PAPER_SETS)}; none when --src is given): "
                        f"wmtNN:SRC-TGT through sacrebleu (any of its sets), flores:en-zh/zh-en from --flores-dir; "
                        f"wmt24:zh-en is wmt24 en-zh reversed")
    p.add_argument("--flores-dir", default=os.environ.get("FLORES_DIR"), metavar="DIR",
                   help="local Flores200 directory: the FLORES-200 release or flores_plus (default: $FLORES_DIR)")
    p.add_argument("--src", metavar="FILE", help="local test set: plain-text sources (one a line, needs --ref/"
                                                 "--src-lang/--tgt-lang) or a .jsonl of {src, ref, src_lang, tgt_lang}")
    p.add_argument("--ref", metavar="FILE", help="references for a plain-text --src, one a line")
    p.add_argument("--src-lang", metavar="CODE",
                   help=f"source language of a plain-text --src: {', '.join(LANGUAGES)}")
    p.add_argument("--tgt-lang", metavar="CODE", help="target language of a plain-text --src, another of those")
    p.add_argument("--metrics", metavar="LIST",
                   help=f"comma-separated metrics; {METRIC_NAMES}. Anything else stops before any work "
                        f"(default: {DEFAULTS['metrics']}; not with --judge-quality)")
    p.add_argument("--out", default="out/eval", metavar="DIR",
                   help="output directory, created if missing; a rerun resumes from what is there, and refuses "
                        "other settings or another checkpoint under a known label (default: %(default)s)")
    p.add_argument("--template", default="r1", choices=judge.TEMPLATES,
                   help="prompt template, as in training; ssr: the released SSR checkpoints' card, to evaluate "
                        "them as they were trained (default: %(default)s)")
    p.add_argument("--think-prefill", action="store_true",
                   help="start each --model response and self-judge judgement with <think> (as training with "
                        "--think-prefill does)")
    p.add_argument("--strip-quotes", action="store_true", default=None,
                   help="score each answer without the quotation marks it is wrapped in when its source is not (the "
                        "artifact the 'quoted' column counts); the rows say +strip-quotes. Default: as written. "
                        "Not with --judge-quality")
    p.add_argument("--temperature", type=float, metavar="T",
                   help=f"sampling temperature of the translations, >= 0; 0 = greedy (default: 0). With "
                        f"--judge-quality, of its candidates, > 0 (default: {CANDIDATE_TEMPERATURE:g})")
    p.add_argument("--seed", type=int, metavar="N",
                   help=f"sampling seed when --temperature > 0 and of --judge-quality's candidates, in [0, 2**63); a "
                        f"sampled output depends on it and its own prompt alone (default: {DEFAULTS['seed']})")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="segments translated (and saved) per batch, >= 1 (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"token budget of one translation (or --judge-quality candidate), thinking included, >= 1; "
                        f"WMT24 segments are paragraphs (default: {DEFAULTS['max_new_tokens']})")
    p.add_argument("--judge-max-new-tokens", type=int, default=1024, metavar="N",
                   help=f"token budget of one {SELF_JUDGE} judgement, >= 1 (default: %(default)s)")
    p.add_argument("--judge-score", default="text", choices=judge.JUDGE_SCORES,
                   help="how a judgement becomes a score (self-judge and --judge-quality), as training's --judge-score: "
                        "text = the number parsed from the judge's <answer>; expected = the mean of the judge's "
                        "probabilities over the integers 0-100 right after its <answer> (generation stops at <answer>, "
                        "which is appended when the judge wrote none): never a parse failure (default: %(default)s)")
    p.add_argument("--judge-quality", type=int, default=0, metavar="K",
                   help="instead of translating: K >= 2 candidate translations per source from the model asked plainly "
                        "(sampled at --temperature, default 1, from --seed), judged by the model with the training "
                        "judge prompt, and the judge's order compared with the candidates' reference chrF: pairwise "
                        "accuracy over the candidate pairs whose chrF and judge scores both differ (pairs with equal "
                        "chrF, equal judge scores, or a failed judgement are counted apart, never as agreement or a "
                        "score of 0), a 95%% percentile bootstrap interval over sources, Kendall tau-b per source "
                        "averaged, parse failures by kind; plus a trivial judge (length closest to the source's) on "
                        "the same candidates. --metrics, --comet-batch-size and --strip-quotes are refused; with "
                        "--candidates, so are --temperature, --seed and --max-new-tokens")
    p.add_argument("--judge-mode", default="pointwise", choices=["pointwise", "group"],
                   help="--judge-quality: one candidate per judgement, or a source's K candidates in one group "
                        "judgement, as training's --judge-mode (default: %(default)s)")
    p.add_argument("--candidates", metavar="FILE",
                   help="--judge-quality: read the candidates instead of sampling them, jsonl {\"src\": ..., "
                        "\"candidates\": [K strings]} per source (a run writes OUT/<label>/<set>/candidates.jsonl)")
    p.add_argument("--comet-batch-size", type=int, metavar="N",
                   help=f"segments per COMET forward, >= 1 (default: {DEFAULTS['comet_batch_size']})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N: the translation models and COMET (default: %(default)s)")
    p.add_argument("--decode", default="auto", choices=DECODE_MODES,
                   help="how the sampler runs a decode step: compiled (torch.compile + CUDA graphs + the Triton "
                        "decode kernel), kernel (eager + the kernel), sdpa (eager PyTorch); auto: compiled on CUDA, "
                        "sdpa on CPU. The others are fallbacks for a GPU where the default breaks (default: "
                        "%(default)s)")
    return p.parse_args(argv)


def check_loaded_sets(sets: list[TestSet], metrics: list[Metric], args):
    """What needs the test sets read, checked before any model loads: BLEU's tokenizer for each target language
    runs here (Japanese and Korean need MeCab), and --candidates holds candidates for every source."""
    for ts in sets:
        if any(m.label == "bleu" for m in metrics):
            try:
                bleu_tokenizer(ts.tgt_lang)
            except DataError as e:
                raise EvalError(f"--metrics bleu on {ts.name}: {e}") from None
        if args.given_candidates is not None and (missing := [s for s in ts.srcs if s not in args.given_candidates]):
            raise EvalError(f"--candidates {args.candidates}: no candidates for {len(missing)} sources of {ts.name}, "
                            f"e.g. {missing[0]!r}")


def run(args):
    models, metrics, fingerprints = check_args(args)
    sets = load_sets(args)  # reads (or downloads) the test data: still nothing written
    check_loaded_sets(sets, metrics, args)
    out = Path(args.out)
    # two evals writing one --out would interleave its segment files: the --out is held like ssr's --out-dir
    release = lock(out, "--out", "eval")
    try:
        write_outputs(models, metrics, fingerprints, sets, out, args)
    finally:
        release()


def write_outputs(models, metrics, fingerprints, sets, out: Path, args):
    for label, fp in fingerprints.items():
        (out / label).mkdir(parents=True, exist_ok=True)
        replace_file(out / label / "model.json", json.dumps(fp, indent=2) + "\n")
    if args.judge_quality:
        judge_quality(models, sets, out, args)
        return
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
    except (EvalError, RunDirError, DataError, CheckpointError, RewardError) as e:  # DataError covers testsets' TestSetError
        # one line, always: a message quoting a library (a JSON or tokenizer error) may hold a line break
        print("eval: error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
