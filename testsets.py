"""The test sets eval.py translates: find, read and check them, and hand each over as a TestSet of aligned sources
and references. WMT comes through sacrebleu (its cache, else a download), Flores200 devtest from a local directory
in either common layout, your own data from plain-text or jsonl files (the files themselves are read by data.py,
which data.py --exclude shares). Every set is checked before it is used: a direction the prompts can name, as many
references as sources, no empty source.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import sacrebleu

from data import (FLORES_CODES, TestSetError, check_direction, flores_root, read_flores, read_jsonl, read_lines,
                  read_sacrebleu)

# the paper's table: WMT23, WMT24 and Flores200 devtest, both directions between English and Chinese
PAPER_SETS = ("wmt23:zh-en", "wmt24:zh-en", "flores:zh-en", "wmt23:en-zh", "wmt24:en-zh", "flores:en-zh")
# WMT24 has no zh->en task. The paper reports a WMT24 ZH->EN column all the same; the only reading that gives one
# is en-zh run backwards: the Chinese references become sources, the English sources references.
REVERSED_SETS = {"wmt24:zh-en": "en-zh"}
# what to do instead when a sacrebleu set is neither cached nor downloadable
SACREBLEU_INSTEAD = "pass the files with --src/--ref"


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
    check_direction(f"{ts.name} ({ts.origin})", ts.src_lang, ts.tgt_lang)
    if len(ts.srcs) != len(ts.refs):
        raise TestSetError(f"{ts.name}: {len(ts.srcs)} sources but {len(ts.refs)} references ({ts.origin})")
    if not ts.srcs:
        raise TestSetError(f"{ts.name}: no segments ({ts.origin})")
    for i, src in enumerate(ts.srcs):
        if not src.strip():  # an empty prompt asks the model to translate nothing: a data error, not a test
            raise TestSetError(f"{ts.name}: segment {i + 1} has an empty source ({ts.origin})")
    return ts


# ----------------------------------------------------------------------------------------------------
# named sets: wmtNN:SRC-TGT through sacrebleu, flores:SRC-TGT from --flores-dir

def parse_set_name(name: str) -> tuple[str, str, str]:
    """(corpus, src_lang, tgt_lang) of a --sets name, checked without reading any data: NAME:SRC-TGT, a direction
    the prompts can name, and a set that exists (Flores en-zh and zh-en, else one sacrebleu knows)."""
    from sacrebleu.dataset import DATASETS

    corpus, _, pair = name.partition(":")
    src_lang, _, tgt_lang = pair.partition("-")
    if not corpus or not src_lang or not tgt_lang:
        raise TestSetError(f"--sets {name}: expected NAME:SRC-TGT, e.g. wmt23:en-zh")
    check_direction(f"--sets {name}", src_lang, tgt_lang)
    if corpus == "flores":
        if {src_lang, tgt_lang} != set(FLORES_CODES):
            raise TestSetError(f"--sets {name}: Flores sets here are en-zh and zh-en")
    elif corpus not in DATASETS or REVERSED_SETS.get(name, pair) not in DATASETS[corpus].langpairs:
        raise TestSetError(f"--sets {name}: sacrebleu {sacrebleu.__version__} has no test set {corpus} {pair} (WMT24 "
                           f"needs sacrebleu >= 2.5); valid: {', '.join(PAPER_SETS)} or any sacrebleu set as "
                           f"NAME:SRC-TGT; for other data use --src")
    return corpus, src_lang, tgt_lang


def load_named_set(name: str, flores_dir: str | None) -> TestSet:
    corpus, src_lang, tgt_lang = parse_set_name(name)
    if corpus == "flores":
        root = flores_root(flores_dir, f"--sets {name}")
        (srcs, src_file), (refs, ref_file) = read_flores(root, src_lang, name), read_flores(root, tgt_lang, name)
        return checked_set(TestSet(name, src_lang, tgt_lang, srcs, refs, f"{src_file} / {ref_file}"))
    if name in REVERSED_SETS:
        srcs, refs, origin = read_sacrebleu(corpus, REVERSED_SETS[name], name, SACREBLEU_INSTEAD)
        return checked_set(TestSet(name, src_lang, tgt_lang, refs, srcs, origin + ", reversed",
                                   note="WMT24 has no zh-en: this is wmt24 en-zh reversed (Chinese references "
                                        "as sources, English sources as references)"))
    return checked_set(TestSet(name, src_lang, tgt_lang,
                               *read_sacrebleu(corpus, f"{src_lang}-{tgt_lang}", name, SACREBLEU_INSTEAD)))


# ----------------------------------------------------------------------------------------------------
# a local set: --src (plain text with --ref/--src-lang/--tgt-lang, or jsonl)

def check_local_flags(src: str, ref: str | None, src_lang: str | None, tgt_lang: str | None):
    """--src with the flags that go with it, checked without reading the files."""
    path = Path(src).expanduser()
    if not path.is_file():
        raise TestSetError(f"--src {src}: no such file")
    if path.suffix == ".jsonl":
        if ref or src_lang or tgt_lang:
            raise TestSetError(f"--src {src}: a .jsonl carries its own ref, src_lang and tgt_lang; drop --ref/"
                               f"--src-lang/--tgt-lang")
        return
    if not (ref and src_lang and tgt_lang):
        raise TestSetError(f"--src {src}: a plain-text --src needs --ref, --src-lang and --tgt-lang (or give a .jsonl "
                           f"of {{src, ref, src_lang, tgt_lang}} lines)")
    if not Path(ref).expanduser().is_file():
        raise TestSetError(f"--ref {ref}: no such file")
    check_direction("--src-lang/--tgt-lang", src_lang, tgt_lang)


def load_local_set(src: str, ref: str | None, src_lang: str | None, tgt_lang: str | None) -> TestSet:
    """--src FILE: plain text with --ref/--src-lang/--tgt-lang, or jsonl lines {src, ref, src_lang, tgt_lang}.
    The set is named after the file (test.en -> "test")."""
    check_local_flags(src, ref, src_lang, tgt_lang)
    path = Path(src).expanduser()
    if path.suffix != ".jsonl":
        return checked_set(TestSet(path.stem, src_lang, tgt_lang, read_lines(path),
                                   read_lines(Path(ref).expanduser()), f"{path} / {ref}"))
    rows = read_jsonl(path)
    for where, row in rows:
        missing = [k for k in ("src", "ref", "src_lang", "tgt_lang") if not isinstance(row.get(k), str)]
        if missing:
            raise TestSetError(f"{where}: lacks {', '.join(missing)} (each line needs src, ref, src_lang, tgt_lang "
                               f"as strings)")
    directions = {(row["src_lang"], row["tgt_lang"]) for _, row in rows}
    if len(directions) != 1:  # one set = one direction: BLEU's tokenizer and the table's columns depend on it
        raise TestSetError(f"{path}: " + (f"mixes directions {sorted(directions)}; use one file per direction"
                                          if directions else "no segments"))
    (src_lang, tgt_lang), = directions
    return checked_set(TestSet(path.stem, src_lang, tgt_lang, [row["src"].strip() for _, row in rows],
                               [row["ref"].strip() for _, row in rows], str(path)))


# ----------------------------------------------------------------------------------------------------
# eval.py's set flags (--sets, --flores-dir, --src, --ref, --src-lang, --tgt-lang): checked, then loaded

def set_names(args) -> list[str]:
    names = args.sets.split(",") if args.sets is not None else ([] if args.src else list(PAPER_SETS))
    return [name.strip() for name in names if name.strip()]


def check_set_flags(args):
    """Every set flag, checked in seconds without reading any data (a download can wait until all flags pass)."""
    if not args.src and (args.ref or args.src_lang or args.tgt_lang):
        raise TestSetError("--ref/--src-lang/--tgt-lang describe a local set and need --src")
    names = set_names(args)
    for name in names:
        if parse_set_name(name)[0] == "flores":
            flores_root(args.flores_dir, f"--sets {name}")
    if args.src:
        check_local_flags(args.src, args.ref, args.src_lang, args.tgt_lang)
        names.append(Path(args.src).expanduser().stem)
    if not names:
        raise TestSetError("--sets is empty and there is no --src: name test sets (e.g. --sets wmt23:en-zh) or give "
                           "--src")
    if len(set(names)) < len(names):
        raise TestSetError(f"--sets/--src: two test sets are named alike ({', '.join(names)})")


def load_sets(args) -> list[TestSet]:
    """The sets the flags name, in order, each announced on stderr with where it came from."""
    sets = [load_named_set(name, args.flores_dir) for name in set_names(args)]
    if args.src:
        sets.append(load_local_set(args.src, args.ref, args.src_lang, args.tgt_lang))
    for ts in sets:
        note = f" (NOTE: {ts.note})" if ts.note else ""
        print(f"{ts.name}: {len(ts.srcs)} segments, {ts.src_lang}->{ts.tgt_lang}, from {ts.origin}{note}",
              file=sys.stderr)
    return sets
