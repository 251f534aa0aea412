"""The data room: reading jsonl data files, the language table, translation-direction checks, DataError.

Training sources (ssr.py), eval.py's local test sets (testsets.py) and the prompts' language names (judge.py)
all come through here, so a bad file or line is reported the same way everywhere: one DataError naming the
file and line.
"""
from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """A bad data file or line (training sources, test sets); the message names the file and line."""


# WMT23/24 and Flores directions people try first; the prompts name languages in English
LANGUAGES = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "ja": "Japanese", "ru": "Russian",
    "cs": "Czech", "uk": "Ukrainian", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ko": "Korean",
    "ar": "Arabic", "he": "Hebrew", "hi": "Hindi", "is": "Icelandic",
}


def language_name(code: str) -> str:
    if code not in LANGUAGES:
        raise DataError(f"unknown language code {code!r}; known codes: {', '.join(LANGUAGES)}")
    return LANGUAGES[code]


def read_jsonl(path) -> list[tuple[str, dict]]:
    """(where, row) for every non-blank line of a jsonl file, where = "path:line": the training data and
    eval.py's local test sets both come through here. Each problem is a DataError naming file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
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
