"""The translation task and its rewards: prompts, answer extraction, judge-score parsing, the reward.

One model plays two roles (README.md, "The training loop"):
  actor: actor_prompt(...) -> sampled response -> extract_answer(response) -> the translation, or None
         when the response breaks the <think>...</think> <answer>...</answer> format (checked_answer adds
         --answer-checks: check_answer's copy, placeholder, language, length and script rules);
  judge: judge_tasks(...) turns a step's valid translations into judge prompts (pointwise, deduplicated under
         greedy judging, or one per GRPO group with --judge-mode group) -> the same model's outputs ->
         read_verdict(...) -> one Judgement (a score, or why it failed to parse) per translation.
score_rollouts(...) turns those (plus optional COMET scores and reference metrics) into one RewardParts per rollout,
keeping every component apart for logging. CometScorer is SSR-X's CometKiwi reward and eval.py's COMET metric. A custom reward
(`--reward module:function`) replaces the whole reward.

Everything here is plain Python on strings except CometScorer, which runs a COMET model checkpoint.load_comet
loaded, and the lang check, which asks py3langid (its model ships inside the package). Nothing here reads a file.
"""
from __future__ import annotations

import importlib
import math
import numbers
import re
import statistics
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

import sacrebleu
import torch

from data import LANGUAGES, bleu_tokenizer, language_name


class RewardError(ValueError):
    """Bad input to the task or reward: unknown language or template, bad custom reward, bad COMET inputs."""


# ----------------------------------------------------------------------------------------------------
# prompts

# DeepSeek-R1-Zero's system text, verbatim; the released SSR checkpoints' card ends its sentence exactly so
R1_SYSTEM = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)
TEMPLATES = ("r1", "chat", "ssr")
# Template `ssr`: the prompt the released SSR-Zero/SSR-X-Zero checkpoints' model card gives, byte for byte, the
# only public evidence of the paper's training prompt. `<|startoftext|>` is plain text there: it is no special
# token of Qwen2.5's tokenizer, which splits it into ordinary tokens (and so do our tokenizers).
SSR_START = "<|startoftext|>"

# Generation ends at EOS or right after this text; the sampler keeps it in the response, so
# extract_answer and parse_judgement see the closing tag.
STOP_STRINGS = ("</answer>",)


def chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen's ChatML: <|im_start|>role\ncontent<|im_end|>\n ... then an open assistant turn."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def wrap_prompt(user_text: str, template: str, prefill: bool = False) -> str:
    """Put one user request into the R1 conversation, as plain text (`r1`, `ssr`) or as a ChatML turn (`chat`).

    `r1` is what a *base* model continues: the system text, then `User:`, the request and `Assistant:`
    each on their own lines; the response starts right after `Assistant:` (usually with a space or newline).
    `ssr` is the same conversation as the released SSR checkpoints' card writes it: `<|startoftext|>` as text,
    a space before the newline after the system text, a blank line before `Assistant:`, and a newline after it,
    where the response starts.
    `chat` is for instruction-tuned checkpoints: the R1 text goes in the system message, because it is
    standing instruction about the output format, and the request is the user turn; the response starts
    after `<|im_start|>assistant\\n` and the turn ends at `<|im_end|>` (an EOS for the chat template).
    prefill (--think-prefill): the response starts inside an open <think> (think_prefill).
    """
    start = think_prefill(template) if prefill else ""
    if template == "r1":
        return f"{R1_SYSTEM}\nUser:\n{user_text}\nAssistant:{start}"
    if template == "ssr":
        return f"{SSR_START}{R1_SYSTEM} \nUser:\n{user_text}\n\nAssistant:\n{start}"
    if template == "chat":
        return chat_prompt([{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": user_text}]) + start
    raise RewardError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def think_prefill(template: str) -> str:
    """The start of the response that --think-prefill writes into the actor and judge prompts (many R1-Zero
    reproductions do this for the actor): the model continues inside an open <think>, so it only has to close
    the tags. The trainer puts this text back in front of the actor's sampled response before extracting the
    answer; a judge's score is read from its <answer> alone, so its prefill needs no putting back."""
    # r1: "Assistant: <think>"; ssr: the line after "Assistant:"; chat: right after the header
    return " <think>" if template == "r1" else "<think>"


def actor_prompt(src: str, src_lang: str, tgt_lang: str, template: str = "r1", prefill: bool = False) -> str:
    language_name(src_lang)  # the request names only the target, but a bad source code is still a data error
    # the card's request has a space before its newline; ours has none
    colon = ": " if template == "ssr" else ":"
    return wrap_prompt(f"Translate the following text to {language_name(tgt_lang)}{colon}\n{src}", template, prefill)


def plain_prompt(src: str, src_lang: str, tgt_lang: str, template: str = "chat") -> str:
    """A plain translation request whose whole response is the translation: no R1 system text, no tags, nothing
    to extract. For baselines never trained on the <think>/<answer> format (eval.py --plain-model): `chat` is a
    ChatML user turn for instruction-tuned models, `r1` (and `ssr`, also a base-model layout) the same request as
    a bare User:/Assistant: exchange."""
    request = (f"Translate the following text from {language_name(src_lang)} to {language_name(tgt_lang)}. "
               f"Reply with the translation only.\n{src}")
    if template == "chat":
        return chat_prompt([{"role": "user", "content": request}])
    if template in ("r1", "ssr"):
        return f"User:\n{request}\nAssistant:"
    raise RewardError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def judge_prompt(src: str, translation: str, src_lang: str, tgt_lang: str, template: str = "r1",
                 prefill: bool = False) -> str:
    """GEMBA-DA-style direct assessment with no reference, in the same R1 wrapper as the actor, so the judge
    reasons in <think> and gives the bare score in <answer>. The zero-score rules close the obvious hacks:
    copying the source (wrong language), padding with extra text, or offering several candidates. prefill: the
    judge's response starts inside <think>, as the actor's does with --think-prefill."""
    source, target = language_name(src_lang), language_name(tgt_lang)
    request = (
        f"Score the following translation from {source} to {target} on a continuous scale from 0 to 100, "
        f"where 0 means that no meaning is preserved and 100 means perfect meaning and grammar. "
        f"Give a score of 0 if the translation contains irrelevant content, is not written in {target}, "
        f"or offers more than one translation.\n"
        f'{source} source: "{src}"\n'
        f'{target} translation: "{translation}"\n'
        f"Give the score alone, as one number, inside <answer> </answer>."
    )
    return wrap_prompt(request, template, prefill)


def group_judge_prompt(src: str, translations: list[str], src_lang: str, tgt_lang: str, template: str = "r1",
                       prefill: bool = False) -> str:
    """`--judge-mode group` (beyond the paper): the same assessment over a GRPO group's distinct translations at
    once, numbered, so the judge compares them before scoring (parse_group_judgement reads the verdict)."""
    source, target = language_name(src_lang), language_name(tgt_lang)
    request = (
        f"Score each of the following {len(translations)} translations from {source} to {target} on a continuous "
        f"scale from 0 to 100, where 0 means that no meaning is preserved and 100 means perfect meaning and grammar. "
        f"Give a score of 0 to a translation that contains irrelevant content, is not written in {target}, "
        f"or offers more than one translation. Compare the translations with each other before scoring them.\n"
        f'{source} source: "{src}"\n'
        + "".join(f'{target} translation {i}: "{t}"\n' for i, t in enumerate(translations, 1))
        + "Give the scores inside <answer> </answer>, one line per translation: its number, a colon and its "
          "score, as in 1: <score>."
    )
    return wrap_prompt(request, template, prefill)


@dataclass
class JudgeTask:
    """One judge prompt and the rollouts its verdict scores."""
    prompt: str
    members: list[list[int]]  # members[k]: the rollouts (indices into the caller's list) holding translation k
    group: bool  # a group verdict ("N: score" per translation) rather than one score


def judge_tasks(sources: list[dict], answers: list[str], groups: list[int], mode: str, dedup: bool,
                template: str = "r1", prefill: bool = False) -> list[JudgeTask]:
    """The prompts that judge one step's well-formed rollouts: rollout i translated sources[i] as answers[i], in
    GRPO group groups[i].

    pointwise: one prompt per rollout; with `dedup` (greedy judging, where a prompt always gets the same
      verdict) one per distinct (source, translation) pair, its verdict shared by every copy.
    group: one prompt per GRPO group showing its distinct translations, numbered in order of first appearance.
    """
    if mode not in ("pointwise", "group"):
        raise RewardError(f"unknown judge mode {mode!r}; choose pointwise or group")
    by_key: dict = {}  # task key -> its rollouts, in order of first appearance
    for i, s in enumerate(sources):
        key = groups[i] if mode == "group" else (s["src"], s["src_lang"], s["tgt_lang"], answers[i]) if dedup else i
        by_key.setdefault(key, []).append(i)
    tasks = []
    for rollouts in by_key.values():
        s = sources[rollouts[0]]
        if mode == "pointwise":
            prompt = judge_prompt(s["src"], answers[rollouts[0]], s["src_lang"], s["tgt_lang"], template, prefill)
            tasks.append(JudgeTask(prompt, [rollouts], group=False))
            continue
        distinct: dict[str, list[int]] = {}
        for i in rollouts:
            distinct.setdefault(answers[i], []).append(i)
        prompt = group_judge_prompt(s["src"], list(distinct), s["src_lang"], s["tgt_lang"], template, prefill)
        tasks.append(JudgeTask(prompt, list(distinct.values()), group=True))
    return tasks


def read_verdict(task: JudgeTask, output: str | None) -> list[Judgement]:
    """One judge output of `task` -> one Judgement per translation it scored (task.members' order). None: the
    prompt was too long for the judge's cache, so nothing was generated."""
    if output is None:
        return [Judgement(None, "too_long")] * len(task.members)
    return parse_group_judgement(output, len(task.members)) if task.group else [parse_judgement(output)]


# ----------------------------------------------------------------------------------------------------
# reading the model's outputs

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Leading whitespace is allowed because the response continues "Assistant:" (or the ChatML header) and a
# model may open with a space or newline; trailing whitespace because EOS may follow the closing tag.
RESPONSE_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def extract_answer(response: str) -> str | None:
    """The translation (stripped answer text), or None when the format is invalid.

    Valid = whitespace, one <think>...</think>, whitespace, one non-empty <answer>...</answer>, whitespace,
    and nothing else. The think part may be empty (the spec asks for the tags, not for a length). Any of the
    four tags inside the think or answer text (nested or repeated blocks) makes it invalid: the regex alone
    would let a second block hide inside the first one's text.
    """
    m = RESPONSE_FORMAT.fullmatch(response)
    if m is None or any(tag in m.group(1) or tag in m.group(2) for tag in TAGS):
        return None
    return m.group(2).strip() or None


def format_progress(response: str) -> float:
    """The share of the four tags that occur exactly once in the response, 0 to 1: how far a malformed response
    got towards the format, for --format-credit. Exactly once, so that copying the system text's example
    ("<think> </think> ... <answer> </answer>") after a prefilled <think> earns only part of it."""
    return sum(response.count(tag) == 1 for tag in TAGS) / len(TAGS)


# Letters of a target language's script, by the first word of their Unicode name; any other target is Latin
SCRIPTS = {"zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"}, "ru": {"CYRILLIC"},
           "uk": {"CYRILLIC"}, "ar": {"ARABIC"}, "he": {"HEBREW"}, "hi": {"DEVANAGARI"}}


def in_target_script(text: str, tgt_lang: str) -> bool:
    """`--check-script`: is the translation written in the target language's script? A cheap guard against the
    commonest hack of a self-judge, the untranslated copy. A non-Latin target needs at least one letter of its
    script (names and terms stay in Latin letters); a Latin target needs at least half of its letters Latin
    (a Chinese name is fine, a Chinese sentence is not). Text with no letters at all (numbers) passes."""
    letters = [unicodedata.name(c, "?").split()[0] for c in unicodedata.normalize("NFKC", text) if c.isalpha()]
    if not letters:
        return True
    script = SCRIPTS.get(tgt_lang, {"LATIN"})
    share = sum(s in script for s in letters) / len(letters)
    return share > 0 if tgt_lang in SCRIPTS else share >= 0.5


# ----------------------------------------------------------------------------------------------------
# answer checks (--answer-checks): what a self-judge is known to reward and no translation should be

# Each check, in the order a list names them; judge.check_answer is the one place their rules live.
ANSWER_CHECKS = ("copy", "placeholder", "lang", "length", "script")
# `lang`: py3langid (its model ships inside the package: nothing is downloaded) chooses among the project's languages;
# below this many letters it guesses too often (measured on the 533 French references of data/en_fr_*.jsonl: 2.3%
# of them called Italian, Spanish or English at any length, 0.3% from 20 letters on), so a shorter answer passes.
LANG_MIN_LETTERS = 20
# `length`: characters of a translation per character of its source, the median over parallel data (data/README.md,
# "Length ratios"): en->fr and fr->en over our 533 en/fr pairs, en<->zh over MT-R1-Zero's 13,130 training pairs.
# fr->en is the inverse of en->fr's median (we have no fr->en data of our own). Other pairs are refused at load.
LENGTH_RATIOS = {("en", "fr"): 1.057, ("fr", "en"): 1 / 1.057, ("en", "zh"): 0.280, ("zh", "en"): 3.575}
# An answer passes when its length is within LENGTH_BAND times of source length x ratio, either way. 3x covers 99.8%
# of those references at both ends (en->zh's shortest 0.1% sit at 0.40x the median, zh->en's longest 0.1% at 2.5x)
# while a one-word answer to a sentence, or a translation repeated three times, falls outside.
LENGTH_BAND = 3.0


def checks_list(spec: str) -> tuple[str, ...]:
    """`--answer-checks copy,lang` -> ("copy", "lang"); an unknown name is a RewardError naming the valid ones."""
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if unknown := [n for n in names if n not in ANSWER_CHECKS]:
        raise RewardError(f"unknown answer check {unknown[0]!r}; choose from {', '.join(ANSWER_CHECKS)}")
    return names


def length_ratio(src_lang: str, tgt_lang: str) -> float:
    if (src_lang, tgt_lang) not in LENGTH_RATIOS:
        measured = ", ".join(f"{a}->{b}" for a, b in LENGTH_RATIOS)
        raise RewardError(f"the length check has no measured length ratio for {src_lang}->{tgt_lang} (only "
                          f"{measured}): drop 'length' from --answer-checks, or add the pair to judge.LENGTH_RATIOS")
    return LENGTH_RATIOS[src_lang, tgt_lang]


def comparable(text: str) -> str:
    """Text as a reader compares it: NFKC, case-folded, every run of whitespace one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def bare_words(text: str) -> str:
    """comparable(text) with punctuation dropped: "Answer here." and "answer here" are one placeholder."""
    return " ".join(re.sub(r"[\W_]+", " ", comparable(text)).split())


def placeholders(template: str) -> set[str]:
    """The template's own placeholder texts, as bare_words: what its prompt shows inside each example pair of tags
    ("<think> reasoning process here </think> <answer> answer here </answer>" in R1's system text, whatever the
    wrapper), and each tag's bare name ("answer"), which is what a model copying the tags writes inside them."""
    shown = re.findall(r"<(think|answer)>(.*?)</\1>", wrap_prompt("", template))
    return ({bare_words(text) for _, text in shown} | {tag for tag, _ in shown}) - {""}  # "<answer> </answer>" shows none


_identifier = None


def identify_language(text: str) -> str:
    """The language py3langid finds most likely, among the project's languages (data.LANGUAGES)."""
    global _identifier
    if _identifier is None:  # loaded on first use (~0.1 s): runs without the lang check never pay for it
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _identifier = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)
        _identifier.set_languages(list(LANGUAGES))
    return _identifier.classify(text)[0]


def check_answer(answer: str, src: str, src_lang: str, tgt_lang: str, checks, template: str = "r1") -> str | None:
    """The name of the first of `checks` the translation fails, or None. Each is a known way for a self-rewarded actor
    to please a judge without translating (README, "Guarding the self-reward"):
      copy         the answer is the source (after Unicode, case and whitespace normalisation);
      placeholder  the answer is one of the template's placeholder texts (placeholders(template)), e.g. "answer";
      lang         py3langid says it is not in the target language (answers of under LANG_MIN_LETTERS letters pass:
                   too short to tell);
      length       its length in characters is outside LENGTH_BAND times the source's x the pair's LENGTH_RATIOS;
      script       it is not written in the target language's script (in_target_script).
    Pure: a fork adds its own rule here."""
    for check in checks:
        if check == "copy":
            failed = comparable(answer) == comparable(src)
        elif check == "placeholder":
            failed = bare_words(answer) in placeholders(template)
        elif check == "lang":
            failed = (sum(c.isalpha() for c in answer) >= LANG_MIN_LETTERS
                      and identify_language(answer) != tgt_lang)
        elif check == "length":
            expected = len(src.strip()) * length_ratio(src_lang, tgt_lang)
            failed = not expected / LENGTH_BAND <= len(answer) <= expected * LENGTH_BAND
        elif check == "script":
            failed = not in_target_script(answer, tgt_lang)
        else:
            raise RewardError(f"unknown answer check {check!r}; choose from {', '.join(ANSWER_CHECKS)}")
        if failed:
            return check
    return None


def checked_answer(response: str, source: dict, checks=(), template: str = "r1") -> tuple[str | None, str | None]:
    """(translation or None, the answer check it failed or None): extract_answer, then check_answer against the row's
    source. An answer failing a check counts as a broken format: no translation, never judged."""
    answer = extract_answer(response)
    failed = None if answer is None else check_answer(answer, source["src"], source["src_lang"], source["tgt_lang"],
                                                      checks, template)
    return (None if failed else answer), failed


# The quotation marks a translation can come wrapped in: ASCII, typographic, CJK corner brackets, guillemets
QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u300c": "\u300d", "\u300e": "\u300f",
               "\u00ab": "\u00bb"}


def wrapped_in_quotes(text: str) -> bool:
    """Is the whole (stripped) text one quotation: an opening mark first, its closing mark last, and that closing
    mark nowhere in between? ('"a" and "b"' is two quotations, not a wrapped text.)"""
    text = text.strip()
    close = QUOTE_PAIRS.get(text[:1])
    return len(text) >= 2 and text[-1] == close and close not in text[1:-1]


def answer_quoted(answer: str, src: str) -> bool:
    """The artifact the paper saw late in SSR-Zero's training: a translation wrapped in quotation marks that its
    source does not have (logged as answer_quoted_rate, counted by eval.py). The judge prompt shows the
    translation in quotes, which is one way a self-judge can come to reward them."""
    return wrapped_in_quotes(answer) and not wrapped_in_quotes(src)


def strip_quotes(answer: str, src: str) -> str:
    """eval.py --strip-quotes: the answer without the quotation marks answer_quoted finds (unchanged otherwise)."""
    return answer.strip()[1:-1].strip() if answer_quoted(answer, src) else answer


# Why a judgement did not parse (metrics.jsonl logs the share of each as judge_fail_<kind>):
#   no_tags      not exactly one <answer>...</answer>, or text after it (e.g. the judge ran out of tokens)
#   no_number    no number inside the answer ("ninety", empty)
#   several      two or more different numbers ("85 or 90", "8/10": a denominator other than 100 is a second number)
#   out_of_range one number, outside [0, 100] ("101", "-5", "150/100")
#   extra_text   one number in range, with words the grammar has no place for ("90 points")
#   too_long     no output: the judge prompt did not fit the sampler's cache (a group of long translations)
FAILURE_KINDS = ("no_tags", "no_number", "several", "out_of_range", "extra_text", "too_long")


class Judgement(NamedTuple):
    """One translation's score read out of one judge output."""
    score: float | None  # 0-100, None when the output did not parse
    failure: str | None = None  # why not, one of FAILURE_KINDS (None when it parsed)


# The score grammar, applied after NFKC normalisation (full-width digits, colon, slash and percent sign become
# ASCII) and the removal of markdown emphasis (* and _): an optional label "Score:", one number (integer or
# decimal), an optional "/100" or "%", an optional sentence-final period, whitespace anywhere between.
SCORE = re.compile(r"(?:score\s*:\s*)?(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?:/\s*100|%)?\s*\.?", re.IGNORECASE)
# every number a person would see, sign included, for saying why an answer is outside the grammar
NUMBER = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?")


def normalise(text: str) -> str:
    return re.sub(r"[*_]", "", unicodedata.normalize("NFKC", text)).strip()


def answer_text(judge_response: str) -> str | None:
    """The text inside the output's one <answer>...</answer>, or None.

    The output must hold exactly one <answer> and one </answer>, in that order, with nothing but whitespace after
    the closing tag (generation stops there). What comes before <answer> is the judge's reasoning and is not
    checked: a judge that skips <think> still gave a usable score, and judge tokens are never trained on, so
    leniency there cannot be exploited."""
    if judge_response.count("<answer>") != 1 or judge_response.count("</answer>") != 1:
        return None
    _, _, rest = judge_response.partition("<answer>")
    content, closed, tail = rest.partition("</answer>")
    return content if closed and not tail.strip() else None  # not closed: the closing tag came first


def read_score(text: str) -> Judgement:
    """One score in the SCORE grammar ("87.5", "Score: 85", "85/100", "85%", "**85**"), or the failure kind."""
    text = normalise(text)
    if m := SCORE.fullmatch(text):
        score = float(m["number"])
        return Judgement(score) if score <= 100.0 else Judgement(None, "out_of_range")
    # outside the grammar: say why. A "/100" is a denominator, not a second number.
    numbers = {float(x) for x in NUMBER.findall(re.sub(r"/\s*100(?![0-9.])", " ", text))}
    if not numbers:
        return Judgement(None, "no_number")
    if len(numbers) > 1:
        return Judgement(None, "several")
    return Judgement(None, "extra_text" if 0.0 <= numbers.pop() <= 100.0 else "out_of_range")


def parse_judgement(judge_response: str) -> Judgement:
    """A pointwise judge output -> its score in [0, 100] or why it has none (see FAILURE_KINDS, SCORE)."""
    content = answer_text(judge_response)
    return Judgement(None, "no_tags") if content is None else read_score(content)


# One entry of a group verdict: the translation's number, a colon, its score in the SCORE grammar
GROUP_ENTRY = re.compile(r"(?:translation\s*)?(?P<index>[0-9]+)\s*:\s*(?P<score>.*)", re.IGNORECASE)


def parse_group_judgement(judge_response: str, n: int) -> list[Judgement]:
    """A group verdict over n numbered translations -> n Judgements, in the prompt's order.

    Inside <answer>: one entry per translation, "N: score", separated by newlines, commas or semicolons, in any
    order (markdown emphasis allowed, as for one score). The verdict is all or nothing: a missing translation
    (no_number), one scored twice or a number outside 1..n (several), an entry that is not "N: score"
    (extra_text) or a score that does not parse fails every translation of the group with that kind; the
    judge's ranking is only meaningful as a whole."""
    content = answer_text(judge_response)
    if content is None:
        return [Judgement(None, "no_tags")] * n
    scores: dict[int, float] = {}
    for entry in filter(None, map(normalise, re.split(r"[\n,;]", normalise(content)))):
        m = GROUP_ENTRY.fullmatch(entry)
        if m is None:
            return [Judgement(None, "extra_text")] * n
        index, judgement = int(m["index"]), read_score(m["score"])
        if judgement.score is None:
            return [judgement] * n
        if not 1 <= index <= n or index in scores:
            return [Judgement(None, "several")] * n
        scores[index] = judgement.score
    if len(scores) < n:
        return [Judgement(None, "no_number")] * n
    return [Judgement(scores[i]) for i in range(1, n + 1)]


# ----------------------------------------------------------------------------------------------------
# the expected score (--judge-score expected): the score read from the judge's probabilities, not its text

JUDGE_SCORES = ("text", "expected")
# expected: the judge's generation stops at its first <answer>; the score is then read from the model
ANSWER_STOP = ("<answer>",)


def reasoning(judge_text: str) -> str:
    """What an expected-score judge wrote before its first <answer> (all of it when it wrote none: generation
    cut by the token budget or ended by EOS; <answer> is then forced after it)."""
    return judge_text.partition("<answer>")[0]


def expected_verdicts(score, tok, prompts: list[list[int]], texts: list[str | None], tasks: list[JudgeTask],
                      max_len: int) -> list[list[Judgement]]:
    """--judge-score expected: for judge prompt prompts[t] (of tasks[t]) and its generated text texts[t], one
    Judgement per translation of the task, each the mean of the judge's own distribution over the integers
    0-100 at the position after <answer>: P(v) = the exact probability of the tokens of "{v}</answer>" (as the
    tokenizer writes them) following the prefix, normalised over the 101. So no judgement fails to parse and
    two scores almost never tie. texts[t] None: the prompt was too long to judge (too_long, as with text).

    The prefix is prompt + reasoning(text) + "<answer>", tokenized in those two pieces after the prompt; a
    reasoning that would push it past max_len (the scorer's cache) loses its last tokens. A group verdict
    (task.group) is read entry by entry, as "1: s1\n2: s2\n...": entry k's integers follow "<answer>", the
    earlier entries with their most probable integers, and "k: ", and end in "\n" (the last in </answer>).
    score(prefixes, continuations) -> log-probs (len(prefixes), len(continuations)): Sampler.score."""
    out: list[list[Judgement]] = [[Judgement(None, "too_long")] * len(task.members) for task in tasks]
    live = [t for t, text in enumerate(texts) if text is not None]
    heads = {t: tok.encode(reasoning(texts[t])) for t in live}
    written = {t: "" for t in live}  # a group verdict's entries so far, "1: 85\n"
    for k in range(1, max((len(tasks[t].members) for t in live), default=0) + 1):
        for last in (False, True):
            todo = [t for t in live if len(tasks[t].members) >= k and (len(tasks[t].members) == k) == last]
            if not todo:
                continue
            prefixes = {}
            for t in todo:
                tail = tok.encode("<answer>" + written[t] + (f"{k}: " if tasks[t].group else ""))
                room = max_len - 1 - len(prompts[t]) - len(tail)
                if room >= 0:  # else not even the prompt and the answer's start fit: too_long stays
                    prefixes[t] = prompts[t] + heads[t][:room] + tail
            if not prefixes:
                continue
            end = "</answer>" if last else "\n"
            logprobs = score(list(prefixes.values()), [tok.encode(f"{v}{end}") for v in range(101)])  # (n, 101)
            for t, lp in zip(prefixes, logprobs):
                p = lp.double().softmax(-1)
                out[t][k - 1] = Judgement(float((p * torch.arange(101, dtype=torch.float64)).sum()))
                written[t] += f"{k}: {int(p.argmax())}\n"
    return out


# ----------------------------------------------------------------------------------------------------
# the reward

@dataclass
class RewardParts:
    """One rollout's reward and the components it came from, each logged on its own."""
    reward: float  # what GRPO uses
    format_valid: bool  # well formed, and passing every answer check (--answer-checks)
    answer: str | None  # the extracted translation; None if the format is invalid
    self_score: float | None  # mean parsed judge score 0-100; None if not judged or no judgement parsed
    failures: list[str]  # the failure kind of each of this rollout's judgements that did not parse
    judged: int  # judgements of this rollout (0 when invalid, or when w_self = 0 and judging was skipped)
    comet: float | None  # COMET score as output (~0-1); None if not scored
    failed_check: str | None = None  # well formed, but failed this answer check (check_answer): never judged
    ref_metric: float | None = None  # sentence chrF/BLEU (0-100) against the row's reference; None if not scored


def reward_stats(parts: list[RewardParts], group_size: int | None = None, checks=()) -> dict:
    """Batch means for metrics.jsonl. Means of self/COMET scores are over rollouts that have one; the
    parse-failure rates (all, and judge_fail_<kind> per FAILURE_KINDS) are over judgements; answer_check_fail_<name>
    (each of `checks`) is the share of all rollouts whose answer failed that check first. Two live checks of the
    self-judge's ranking: Spearman between self and COMET scores, and (rows with a reference, parts in GRPO groups
    of group_size) its pairwise agreement with sentence chrF within each group (pairwise_agreement)."""
    rewards = [p.reward for p in parts]
    selfs = [p.self_score for p in parts if p.self_score is not None]
    comets = [p.comet for p in parts if p.comet is not None]
    pairs = [(p.self_score, p.comet) for p in parts if p.self_score is not None and p.comet is not None]
    judged = sum(p.judged for p in parts)
    failures = [kind for p in parts for kind in p.failures]
    ref_metrics = [p.ref_metric for p in parts if p.ref_metric is not None]
    agreement, ranked_pairs = pairwise_agreement(parts, group_size) if group_size else (None, 0)
    return {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "format_valid_rate": statistics.fmean(p.format_valid for p in parts),
        **{f"answer_check_fail_{name}": statistics.fmean(p.failed_check == name for p in parts) for name in checks},
        "self_score_mean": statistics.fmean(selfs) if selfs else None,
        "judge_parse_failure_rate": len(failures) / judged if judged else None,
        **{f"judge_fail_{kind}": failures.count(kind) / judged if judged else None for kind in FAILURE_KINDS},
        "comet_mean": statistics.fmean(comets) if comets else None,
        "self_comet_spearman": spearman(*zip(*pairs)) if len(pairs) > 1 else None,
        "ref_metric_mean": statistics.fmean(ref_metrics) if ref_metrics else None,
        "self_ref_pairwise": agreement,
        "self_ref_pairs": ranked_pairs if group_size else None,
    }


def pairwise_agreement(parts: list[RewardParts], group_size: int) -> tuple[float | None, int]:
    """(share of agreeing pairs, pairs): within each GRPO group, every pair of rollouts that both have a self score
    and a reference metric, and differ in both, is a pair the judge ranks; it agrees when it orders them as the
    metric does. The run's own view of whether its judge still ranks translations (eval.py --judge-quality is the
    held-out measurement). None when no pair qualifies."""
    agree = total = 0
    for start in range(0, len(parts), group_size):
        scored = [(p.self_score, p.ref_metric) for p in parts[start:start + group_size]
                  if p.self_score is not None and p.ref_metric is not None]
        for i, (self_a, ref_a) in enumerate(scored):
            for self_b, ref_b in scored[i + 1:]:
                if self_a != self_b and ref_a != ref_b:
                    total += 1
                    agree += (self_a > self_b) == (ref_a > ref_b)
    return (agree / total if total else None), total


def reference_score(answer: str, ref: str, metric: str, tgt_lang: str) -> float:
    """sacrebleu's sentence-level chrF (its defaults) or BLEU of a translation against its reference, 0-100.
    BLEU's tokenizer is the target language's (data.bleu_tokenizer: zh, ja-mecab, ko-mecab, else 13a), as eval's."""
    if metric == "chrf":
        return sacrebleu.sentence_chrf(answer, [ref]).score
    if metric == "bleu":
        return sacrebleu.sentence_bleu(answer, [ref], tokenize=bleu_tokenizer(tgt_lang)).score
    raise RewardError(f"unknown reference metric {metric!r} (chrf or bleu)")


def score_rollouts(responses: list[str], judgements: list[list[Judgement]] | None = None,
                   comet_scores: list[float | None] | None = None, w_self: float = 1.0, w_comet: float = 0.0,
                   format_penalty: float = -1.0, failed_checks: list[str | None] | None = None,
                   refs: list[str | None] | None = None, w_ref: float = 0.0, ref_metric: str = "chrf",
                   ref_langs: list[str] | None = None) -> list[RewardParts]:
    """Rewards for one batch of rollouts: format_penalty when the format is invalid, else
    w_self * self/100 + w_comet * comet + w_ref * metric/100 (SSR: w_self=1, w_comet=0, w_ref=0; SSR-X: 0.5, 0.5,
    0; MT-R1-Zero-style reference reward, the positive control: 0, 0, 1).

    judgements[i] holds what the judge said of rollout i (one Judgement when greedy, `judge_samples` when
    sampled; [] for an invalid rollout, which is never judged). The self score averages the judgements that
    parsed: a parse failure says nothing about the translation, so with several samples it is left out rather
    than counted as 0; when none parses the self score is 0 for the reward (and None in the log). Every failure
    is counted by kind. comet_scores[i] is None for rollouts that were not scored (invalid format); both inputs
    may be None when their weight is 0 and the trainer skipped that work. failed_checks[i] (--answer-checks): the
    answer check rollout i's answer failed (checked_answer), or None; a failed check is a format failure, counted
    apart. refs[i] and ref_langs[i] (needed when w_ref != 0): rollout i's reference translation (None for a row
    without one when w_ref = 0) and target language; every valid answer with a reference gets ref_metric's
    sentence score against it (reference_score), rewarded with w_ref and logged whatever w_ref.
    """
    n = len(responses)
    if any(x is not None and len(x) != n for x in (judgements, comet_scores, failed_checks, refs, ref_langs)):
        raise RewardError(f"score_rollouts: {n} responses but judgements/comet_scores/failed_checks/refs of another "
                          f"length")
    if w_ref != 0 and (refs is None or ref_langs is None or None in refs):
        raise RewardError("score_rollouts: w_ref != 0 needs every rollout's reference and target language")
    out = []
    for i, response in enumerate(responses):
        failed = failed_checks[i] if failed_checks is not None else None
        answer = None if failed else extract_answer(response)
        verdicts = judgements[i] if judgements is not None and answer is not None else []
        comet = comet_scores[i] if comet_scores is not None and answer is not None else None
        scores = [j.score for j in verdicts if j.score is not None]
        self_score = statistics.fmean(scores) if scores else None
        metric = (reference_score(answer, refs[i], ref_metric, ref_langs[i])
                  if refs is not None and refs[i] is not None and answer is not None else None)
        if answer is None:
            reward = format_penalty
        else:
            if w_self != 0 and not verdicts:
                raise RewardError(f"score_rollouts: rollout {i} has a valid answer but no judgement")
            if w_comet != 0 and comet is None:
                raise RewardError(f"score_rollouts: rollout {i} has a valid answer but no COMET score")
            reward = (w_self * (self_score or 0.0) / 100 + (w_comet * comet if w_comet != 0 else 0.0)
                      + (w_ref * metric / 100 if w_ref != 0 else 0.0))
        out.append(RewardParts(reward, answer is not None, answer, self_score,
                               [j.failure for j in verdicts if j.score is None], len(verdicts), comet, failed, metric))
    return out


def spearman(xs, ys) -> float | None:
    """Spearman rank correlation (ties get their mean rank); None when either side is constant."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(list(xs)), ranks(list(ys))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var > 0 else None


# ----------------------------------------------------------------------------------------------------
# custom reward plug-in

def load_custom_reward(spec: str):
    """`module:function` -> a callable taking the list of sample dicts (src, src_lang, tgt_lang, response,
    answer; answer is None for an invalid format) and returning one float per sample. It replaces the whole
    reward, format penalty included. The returned wrapper checks every call's output, so a broken reward
    fails with a clear message instead of turning into NaN advantages later."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name or ":" in func_name:
        raise RewardError(f"custom reward {spec!r}: expected 'module:function', e.g. 'my_rewards:length_bonus'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # only a missing target module is our error to explain; a missing import *inside* it is the user's bug
        # and keeps its own traceback
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise RewardError(f"custom reward {spec!r}: no module named {e.name!r} (is it on PYTHONPATH?)") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RewardError(f"custom reward {spec!r}: module {module_name!r} has no function {func_name!r}")

    def reward(samples: list[dict]) -> list[float]:
        values = fn(samples)
        if not isinstance(values, (list, tuple)) or len(values) != len(samples):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"custom reward {spec!r} must return a list of {len(samples)} floats, got {got}")
        for v in values:
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise RewardError(f"custom reward {spec!r} returned {v!r}; every value must be a finite number")
        return [float(v) for v in values]

    return reward


def letter_share_reward(samples: list[dict]) -> list[float]:
    """An example custom reward (`--reward judge:letter_share_reward`): the share of the letter 'e' among
    each response's characters. It means nothing for translation; the smoke run uses it because a tiny
    random model can visibly learn it in a few steps, which shows the whole loop works end to end."""
    return [s["response"].count("e") / max(1, len(s["response"])) for s in samples]


# ----------------------------------------------------------------------------------------------------
# COMET: SSR-X's reference-free reward (CometKiwi) and eval.py's metrics (XCOMET, CometKiwi, any COMET)

class CometScorer:
    """Any COMET model (loaded by checkpoint.load_comet: this file reads no files), scored in our own batches on
    our own device.

    Why not `model.predict()`: it builds a Lightning Trainer, which takes torchrun's environment for a cluster
    of its own and breaks inside a torchrun job. We run what predict runs per batch (`prepare_for_inference`,
    then the module's own `predict_step`) without the Trainer. predict_step and not forward, because the final score is
    model-specific: UnifiedMetric averages its src/ref/src+ref passes, XCOMET mixes regression with an MQM
    score from its error spans; forward alone would return only one of those parts.
    """

    def __init__(self, model, name: str, device: str | torch.device = "cpu", batch_size: int = 16):
        self.name = name  # what messages call it: the name or path it was loaded from
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        # RegressionMetric (wmt22-comet-da) needs references; CometKiwi ignores them; XCOMET uses them if given
        self.needs_refs = model.requires_references()

    def score(self, srcs: list[str], mts: list[str], refs: list[str] | None = None) -> list[float]:
        """One score per (src, mt[, ref]) in the input order, as the model outputs it (about 0-1)."""
        from pytorch_lightning.utilities import move_data_to_device  # the batch mover predict() uses

        if len(srcs) != len(mts) or (refs is not None and len(refs) != len(mts)):
            raise RewardError(f"COMET {self.name}: srcs, mts and refs must have the same length")
        if refs is None and self.needs_refs:
            raise RewardError(f"COMET {self.name}: this model is reference-based; pass refs")
        samples = [{"src": s, "mt": m} for s, m in zip(srcs, mts)]
        if refs is not None:
            for sample, ref in zip(samples, refs):
                sample["ref"] = ref
        # batch similar lengths together so little compute goes to padding (predict does the same)
        order = sorted(range(len(samples)), key=lambda i: len(srcs[i]) + len(mts[i]))
        scores = [0.0] * len(samples)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.model.prepare_for_inference([samples[i] for i in idx])
                prediction = self.model.predict_step(move_data_to_device(batch, self.device))
                for i, value in zip(idx, prediction["scores"].tolist()):
                    scores[i] = value
        return scores
