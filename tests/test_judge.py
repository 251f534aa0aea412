"""judge.py: prompts, answer extraction, judge-score parsing, rewards, custom rewards, the COMET scorer."""
import json
import math
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sacrebleu

import judge
from checkpoint import CheckpointError, load_comet
from data import LANGUAGES, DataError, bleu_tokenizer, language_name
from judge import (FAILURE_KINDS, R1_SYSTEM, STOP_STRINGS, CometScorer, Judgement, RewardError, actor_prompt,
                   check_answer, checked_answer, extract_answer, group_judge_prompt, in_target_script, judge_prompt,
                   judge_tasks, load_custom_reward, parse_group_judgement, parse_judgement, read_verdict,
                   reference_score, reward_stats, score_rollouts, spearman)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# languages and prompts

def test_language_names():
    for code in ("en", "zh", "de", "fr", "ja", "ru", "cs", "uk"):
        assert language_name(code) == LANGUAGES[code]
    assert language_name("zh") == "Chinese" and language_name("en") == "English"


@pytest.mark.parametrize("code", ["xx", "EN", "zh-CN", ""])
def test_unknown_language_is_a_clear_error(code):
    with pytest.raises(DataError, match=r"unknown language code .*known codes: en, zh, de") as e:
        language_name(code)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="unknown language code"):
        actor_prompt("Hello.", code, "zh")  # the source code is checked even though the request doesn't use it
    with pytest.raises(DataError, match="unknown language code"):
        judge_prompt("Hello.", "你好。", "en", code)


def test_r1_actor_prompt_exact():
    src = "The river froze overnight, and by morning the children were skating on it."
    assert actor_prompt(src, "en", "zh") == (
        "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
        "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
        "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
        "<answer> answer here </answer>.\n"
        "User:\n"
        "Translate the following text to Chinese:\n"
        f"{src}\n"
        "Assistant:"
    )


def test_r1_actor_prompt_chinese_source():
    src = "昨晚下了一场大雨，街上的积水到今天早上还没退。"
    lines = actor_prompt(src, "zh", "en").split("\n")
    assert lines == [R1_SYSTEM, "User:", "Translate the following text to English:", src, "Assistant:"]
    assert actor_prompt("Guten Morgen.", "de", "ja", template="r1").split("\n")[2] == \
        "Translate the following text to Japanese:"


def test_chat_actor_prompt():
    src = "我们明天在北京见。"
    assert actor_prompt(src, "zh", "en", template="chat") == (
        f"<|im_start|>system\n{R1_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\nTranslate the following text to English:\n{src}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# The released SSR checkpoints' model card prompt, written out here byte for byte (not built from R1_SYSTEM), so a
# change to either the system text or the layout shows up
CARD_SYSTEM = ("<|startoftext|>A conversation between User and Assistant. The User asks a question, and the Assistant "
               "solves it. The Assistant first thinks about the reasoning process in the mind and then provides the "
               "User with the answer. The reasoning process is enclosed within <think> </think> and answer is "
               "enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
               "<answer> answer here </answer>. \nUser:\n")


@pytest.mark.parametrize("src, src_lang, tgt_lang, target", [
    ("The river froze overnight.", "en", "zh", "Chinese"), ("河面一夜之间结了冰。", "zh", "en", "English")])
def test_ssr_template_exact(src, src_lang, tgt_lang, target):
    actor = actor_prompt(src, src_lang, tgt_lang, "ssr")
    assert actor == CARD_SYSTEM + f"Translate the following text to {target}: \n{src}\n\nAssistant:\n"
    assert actor.encode() == (CARD_SYSTEM + f"Translate the following text to {target}: \n{src}"
                              "\n\nAssistant:\n").encode("utf-8")
    # --think-prefill: the response starts on the line after "Assistant:", with <think> and no space
    assert actor_prompt(src, src_lang, tgt_lang, "ssr", prefill=True) == actor + "<think>"
    # the judge and the group judge: their requests in the same wrapper
    mt = "译文" if tgt_lang == "zh" else "The translation"
    source = "English" if src_lang == "en" else "Chinese"
    request = (f"Score the following translation from {source} to {target} on a continuous scale from 0 to 100, "
               f"where 0 means that no meaning is preserved and 100 means perfect meaning and grammar. Give a score "
               f"of 0 if the translation contains irrelevant content, is not written in {target}, or offers more "
               f"than one translation.\n{source} source: \"{src}\"\n{target} translation: \"{mt}\"\n"
               f"Give the score alone, as one number, inside <answer> </answer>.")
    assert judge_prompt(src, mt, src_lang, tgt_lang, "ssr") == CARD_SYSTEM + request + "\n\nAssistant:\n"
    assert judge_prompt(src, mt, src_lang, tgt_lang, "ssr", prefill=True) == \
        CARD_SYSTEM + request + "\n\nAssistant:\n<think>"
    group = group_judge_prompt(src, [mt, mt + "!"], src_lang, tgt_lang, "ssr")
    assert group.startswith(CARD_SYSTEM + f"Score each of the following 2 translations from {source} to {target}")
    assert group.endswith(f'{target} translation 2: "{mt}!"\nGive the scores inside <answer> </answer>, one line '
                          f"per translation: its number, a colon and its score, as in 1: <score>.\n\nAssistant:\n")


def test_ssr_start_is_text_for_our_tokenizers(tiny_model_dir):
    """<|startoftext|> is no special token of Qwen2.5 (nor of our tokenizers): the prompt encodes it as ordinary
    text, several tokens, and decoding with special tokens skipped gives it back."""
    from checkpoint import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    assert tok.token_id("<|startoftext|>") is None
    prompt = actor_prompt("Hello.", "en", "zh", "ssr")
    ids = tok.encode(prompt)
    assert len(tok.encode("<|startoftext|>")) > 1
    assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_unknown_template():
    with pytest.raises(RewardError, match="unknown prompt template 'alpaca'; choose one of r1, chat, ssr"):
        actor_prompt("Hi.", "en", "zh", template="alpaca")
    with pytest.raises(RewardError, match="unknown prompt template"):
        judge_prompt("Hi.", "你好。", "en", "zh", template="R1")


def test_judge_prompt():
    src, mt = "她把那封信读了三遍，然后放回了抽屉。", 'She read the letter three times and put it back in the "drawer".'
    prompt = judge_prompt(src, mt, "zh", "en")
    head, request, tail = prompt.partition("User:\n")
    assert head == R1_SYSTEM + "\n" and request == "User:\n" and tail.endswith("\nAssistant:")
    assert "from Chinese to English on a continuous scale from 0 to 100" in tail
    assert "0 means that no meaning is preserved and 100 means perfect meaning and grammar" in tail
    assert "irrelevant content, is not written in English, or offers more than one translation" in tail
    assert f'Chinese source: "{src}"\n' in tail and f'English translation: "{mt}"\n' in tail
    assert "score alone, as one number, inside <answer> </answer>" in tail
    chat = judge_prompt(src, mt, "zh", "en", template="chat")
    assert chat.startswith(f"<|im_start|>system\n{R1_SYSTEM}<|im_end|>\n<|im_start|>user\nScore the following")
    assert f'English translation: "{mt}"' in chat and chat.endswith("<|im_start|>assistant\n")
    # --think-prefill opens the judge's thinking block too, after each template's assistant start
    assert judge_prompt(src, mt, "zh", "en", prefill=True) == prompt + " <think>"
    assert judge_prompt(src, mt, "zh", "en", template="chat", prefill=True) == chat + "<think>"
    tasks = judge_tasks([{"src": src, "src_lang": "zh", "tgt_lang": "en"}] * 2, [mt, mt + "!"], [0, 0], "group",
                        dedup=True, template="chat", prefill=True)
    assert tasks[0].prompt == group_judge_prompt(src, [mt, mt + "!"], "zh", "en", "chat") + "<think>"


def test_stop_strings():
    assert STOP_STRINGS == ("</answer>",)


# ----------------------------------------------------------------------------------------------------
# extraction and format

@pytest.mark.parametrize("response, answer", [
    (" <think>short sentence, keep the tone</think> <answer>今天天气很好。</answer>", "今天天气很好。"),
    ("\n<think>\n主语是“我们”。\n</think>\n<answer>\nWe will meet in Beijing tomorrow.\n</answer>\n",
     "We will meet in Beijing tomorrow."),
    ("<think>x</think><answer>猫坐在垫子上。</answer>", "猫坐在垫子上。"),
    ("<think></think><answer>Hello.</answer>", "Hello."),  # an empty think is still the format
    ("<think>a</think>  <answer>  two words  </answer>  \n", "two words"),
    ("<think>a</think><answer>line one\nline two</answer>", "line one\nline two"),  # inner text kept, only stripped
    ("<think>a < b and c > d</think><answer>ok</answer>", "ok"),  # angle brackets that are not our tags are fine
])
def test_extract_valid(response, answer):
    assert extract_answer(response) == answer


@pytest.mark.parametrize("response", [
    "<answer>今天天气很好。</answer>",  # missing think
    "今天天气很好。",  # no tags at all
    "<think>a</think>",  # missing answer (e.g. ran out of tokens)
    "<think>a</think><answer>unfinished",  # missing closing tag
    "<think>a</think><answer></answer>",  # empty answer
    "<think>a</think><answer>   \n </answer>",  # whitespace-only answer
    "<think>a</think><answer>one</answer><answer>two</answer>",  # two answers
    "<think>a</think><think>b</think><answer>x</answer>",  # two thinks
    "<think>a</think><answer>x</answer> and some more",  # text after the answer
    "<think>a</think><answer>x</answer><|endoftext|>",  # special-token text is text too
    "Sure! <think>a</think><answer>x</answer>",  # text before think (only whitespace is allowed)
    "<think>a</think> Here it is: <answer>x</answer>",  # text between think and answer
    "<think><think>a</think></think><answer>x</answer>",  # nested think
    "<think>a</think><answer><answer>x</answer></answer>",  # nested answer
    "<think>draft <answer>y</answer></think><answer>x</answer>",  # answer tag hidden in think
    "<answer>x</answer><think>a</think>",  # wrong order
    "<THINK>a</THINK><ANSWER>x</ANSWER>",  # tags are case-sensitive
    "",
])
def test_extract_invalid(response):
    assert extract_answer(response) is None


# ----------------------------------------------------------------------------------------------------
# judge-score parsing: every rule of the grammar, both ways (score, or None and the failure kind)

SCORE_TABLE = [
    # the number: integer or decimal, whitespace around it, a sentence-final period
    ("<think>Accurate and fluent.</think> <answer>87.5</answer>", 87.5, None),
    ("<think>ok</think><answer> 90 </answer>", 90.0, None),
    ("<think>ok</think><answer>\n90\n</answer>\n", 90.0, None),
    ("<think>ok</think><answer>90.</answer>", 90.0, None),
    ("<think>ok</think><answer>095</answer>", 95.0, None),
    ("<think>ok</think><answer>90..</answer>", None, "extra_text"),
    ("<think>ok</think><answer>.5</answer>", None, "extra_text"),
    # the range, ends included
    ("<think>ok</think><answer>0</answer>", 0.0, None),
    ("<think>ok</think><answer>100.0</answer>", 100.0, None),
    ("<think>ok</think><answer>101</answer>", None, "out_of_range"),
    ("<think>ok</think><answer>100.5</answer>", None, "out_of_range"),
    ("<think>ok</think><answer>-5</answer>", None, "out_of_range"),
    # an optional label
    ("<think>ok</think><answer>Score: 85</answer>", 85.0, None),
    ("<think>ok</think><answer>score:85</answer>", 85.0, None),
    ("<think>ok</think><answer>Rating: 85</answer>", None, "extra_text"),  # only "Score:" is a label
    ("<think>ok</think><answer>85 points</answer>", None, "extra_text"),
    ("<think>ok</think><answer>+5</answer>", None, "extra_text"),
    # an optional /100 or %; any other denominator is a second number
    ("<think>ok</think><answer>85/100</answer>", 85.0, None),
    ("<think>ok</think><answer>Score: 85 / 100.</answer>", 85.0, None),
    ("<think>ok</think><answer>85%</answer>", 85.0, None),
    ("<think>ok</think><answer>8/10</answer>", None, "several"),
    ("<think>ok</think><answer>150/100</answer>", None, "out_of_range"),
    ("<think>ok</think><answer>85/1000</answer>", None, "several"),
    # markdown emphasis
    ("<think>ok</think><answer>**85**</answer>", 85.0, None),
    ("<think>ok</think><answer>**Score:** _85_/100</answer>", 85.0, None),
    # full-width digits and signs (NFKC)
    ("<think>ok</think><answer>９０</answer>", 90.0, None),
    ("<think>ok</think><answer>Score：８５％</answer>", 85.0, None),
    ("<think>ok</think><answer>８５／１００</answer>", 85.0, None),
    # one number only: two different numbers are a failure
    ("<think>ok</think><answer>85 90</answer>", None, "several"),
    ("<think>ok</think><answer>85, maybe 90</answer>", None, "several"),
    ("<think>ok</think><answer>1e2</answer>", None, "several"),
    ("<think>ok</think><answer>90 (90)</answer>", None, "extra_text"),  # the same number twice: words left over
    # a number at all
    ("<think>ok</think><answer>ninety</answer>", None, "no_number"),
    ("<think>ok</think><answer>nan</answer>", None, "no_number"),
    ("<think>ok</think><answer></answer>", None, "no_number"),
    ("<think>ok</think><answer>** **</answer>", None, "no_number"),
    # the tags: exactly one <answer>...</answer>, nothing after it; the reasoning before it is not checked
    ("<answer>75</answer>", 75.0, None),
    ("The translation keeps the meaning. <answer>60</answer>", 60.0, None),
    ("<think>ok</think> 90", None, "no_tags"),
    ("<think>ok</think><answer>90", None, "no_tags"),  # ran out of tokens
    ("<think>ok</think>90</answer>", None, "no_tags"),
    ("</answer>90<answer>", None, "no_tags"),
    ("<answer>100</answer><answer>0</answer>", None, "no_tags"),
    ("<think>I will write <answer>100</answer></think><answer>40</answer>", None, "no_tags"),
    ("<think>ok</think><answer><answer>90</answer></answer>", None, "no_tags"),
    ("<think>ok</think><answer>90</answer> (very good)", None, "no_tags"),
    ("", None, "no_tags"),
]


@pytest.mark.parametrize("output, score, kind", SCORE_TABLE)
def test_score_grammar(output, score, kind):
    assert parse_judgement(output) == Judgement(score, kind)
    assert parse_judgement(output).score == score


def test_score_table_covers_every_failure_kind():
    # too_long is not about the text: the judge produced none (test_group_tasks)
    assert {kind for _, _, kind in SCORE_TABLE} == set(FAILURE_KINDS) - {"too_long"} | {None}


GROUP_TABLE = [
    ("<think>2 is better</think><answer>1: 60\n2: 85</answer>", 2, [60.0, 85.0], None),
    ("<answer>\n2: 85\n1: **60**/100\n</answer>", 2, [60.0, 85.0], None),  # any order, one score's grammar
    ("<answer>1: 60, 2: 85; 3: 0</answer>", 3, [60.0, 85.0, 0.0], None),  # commas and semicolons separate too
    ("<answer>Translation 1: 70</answer>", 1, [70.0], None),
    ("<answer>1: 60</answer>", 2, None, "no_number"),  # translation 2 has no score
    ("<answer></answer>", 1, None, "no_number"),
    ("<answer>1: 60\n1: 70</answer>", 2, None, "several"),  # translation 1 scored twice
    ("<answer>1: 60\n3: 70</answer>", 2, None, "several"),  # there is no translation 3
    ("<answer>1: 60\n2: 170</answer>", 2, None, "out_of_range"),
    ("<answer>1: 60\n2: good</answer>", 2, None, "no_number"),
    ("<answer>60\n85</answer>", 2, None, "extra_text"),  # not numbered
    ("<answer>1: 60\nboth fine</answer>", 2, None, "extra_text"),
    ("1: 60\n2: 85", 2, None, "no_tags"),
]


@pytest.mark.parametrize("output, n, scores, kind", GROUP_TABLE)
def test_group_verdict_grammar(output, n, scores, kind):
    """A group verdict: "N: score" per translation; any fault fails the whole group with one kind."""
    want = [Judgement(s) for s in scores] if scores else [Judgement(None, kind)] * n
    assert parse_group_judgement(output, n) == want


# ----------------------------------------------------------------------------------------------------
# rewards

GOOD = "<think>fine</think><answer>The cat sat on the mat.</answer>"
BAD = "The cat sat on the mat."


def column(parts, name):
    """One component across a batch's RewardParts."""
    return [getattr(p, name) for p in parts]


def verdicts(*outputs):
    """What the judge phase hands the reward: the judgements read from one rollout's judge outputs."""
    return [parse_judgement(o) for o in outputs]


def test_ssr_reward_and_format_penalty():
    out = score_rollouts([GOOD, BAD, GOOD], [verdicts("<answer>80</answer>"), [], verdicts("<answer>8/10</answer>")])
    assert column(out, "reward") == [0.8, -1.0, 0.0]  # third: judge parse failure -> self score 0
    assert column(out, "format_valid") == [True, False, True]
    assert column(out, "answer") == ["The cat sat on the mat.", None, "The cat sat on the mat."]
    assert column(out, "self_score") == [80.0, None, None]
    assert column(out, "failures") == [[], [], ["several"]] and column(out, "judged") == [1, 0, 1]
    assert column(out, "comet") == [None, None, None] and column(out, "failed_check") == [None] * 3
    assert column(score_rollouts([BAD], [[]], format_penalty=-0.5), "reward") == [-0.5]


def test_ssr_x_weights():
    out = score_rollouts([GOOD, BAD, GOOD], [verdicts("<answer>60</answer>"), [], verdicts("<answer>90</answer>")],
                         comet_scores=[0.7, None, 0.5], w_self=0.5, w_comet=0.5)
    assert column(out, "reward") == pytest.approx([0.5 * 0.6 + 0.5 * 0.7, -1.0, 0.5 * 0.9 + 0.5 * 0.5])
    assert column(out, "comet") == [0.7, None, 0.5]
    # COMET alone: the trainer may skip judging entirely
    only = score_rollouts([GOOD, BAD], None, comet_scores=[0.25, None], w_self=0.0, w_comet=1.0)
    assert column(only, "reward") == [0.25, -1.0] and column(only, "self_score") == [None, None] and column(only, "judged") == [0, 0]


def test_reference_reward_is_sacrebleus_sentence_score():
    """--w-ref: a well-formed answer's reward is w_ref x sacrebleu's own sentence chrF (defaults) or BLEU (13a;
    "zh" tokenization for Chinese targets) against the row's reference, / 100; a malformed one keeps the penalty."""
    good = ["<think>x</think> <answer>Il fait beau aujourd'hui.</answer>",
            "<think>x</think> <answer>Le temps est beau.</answer>", "<think>x</think> <answer>今天天气很好。</answer>"]
    refs = ["Il fait beau aujourd'hui.", "Il fait beau aujourd'hui.", "今天天气不错。"]
    langs = ["fr", "fr", "zh"]
    chrf = score_rollouts(good + [BAD], None, w_self=0.0, refs=refs + ["Il pleut."], w_ref=1.0, ref_metric="chrf",
                          ref_langs=langs + ["fr"])
    expected = [sacrebleu.sentence_chrf(extract_answer(g), [r]).score for g, r in zip(good, refs)]
    assert column(chrf, "ref_metric")[:3] == pytest.approx(expected) and column(chrf, "ref_metric")[3] is None
    assert column(chrf, "reward") == pytest.approx([e / 100 for e in expected] + [-1.0])
    assert expected[0] == pytest.approx(100.0) and 0 < expected[1] < 100  # the scores differ: the test can fail
    bleu = score_rollouts(good, None, w_self=0.0, refs=refs, w_ref=0.5, ref_metric="bleu", ref_langs=langs)
    expected = [sacrebleu.sentence_bleu(extract_answer(g), [r], tokenize="zh" if lang == "zh" else "13a").score
                for g, r, lang in zip(good, refs, langs)]
    assert column(bleu, "ref_metric") == pytest.approx(expected)
    assert column(bleu, "reward") == pytest.approx([0.5 * e / 100 for e in expected])
    # 13a would make the whole Chinese sentence one word (BLEU 0 against a different sentence)
    assert expected[2] > 0 and sacrebleu.sentence_bleu("今天天气很好。", ["今天天气不错。"]).score == 0
    # next to the self-judge: each component apart, the reward their weighted sum
    mixed = score_rollouts(good[:1], [verdicts("<answer>40</answer>")], w_self=0.5, refs=refs[:1], w_ref=0.5,
                           ref_langs=langs[:1])
    assert column(mixed, "reward") == pytest.approx([0.5 * 0.4 + 0.5 * 1.0])
    assert column(mixed, "self_score") == [40.0] and column(mixed, "ref_metric") == pytest.approx([100.0])
    assert reward_stats(chrf)["ref_metric_mean"] == pytest.approx(statistics.fmean(column(chrf, "ref_metric")[:3]))
    assert reward_stats(mixed)["ref_metric_mean"] == pytest.approx(100.0)
    with pytest.raises(RewardError, match="w_ref != 0 needs every rollout's reference"):
        score_rollouts(good, None, w_self=0.0, w_ref=1.0)


def test_bleu_tokenizer_is_sacrebleus_own_choice_for_every_language():
    """data.bleu_tokenizer, the one mapping eval.py, --ref-metric bleu and paired_bootstrap.py share, against
    sacrebleu's own choice for a target language (BLEU(trg_lang=...), what `sacrebleu -l` uses): zh, ja-mecab,
    ko-mecab, 13a for the spaced languages; an unknown code is refused, not scored with a guess."""
    from sacrebleu.metrics import BLEU

    for code in LANGUAGES:
        chosen = BLEU(trg_lang=code).tokenizer_signature  # "13a", "zh", "ja-mecab-0.996-IPA", "ko-mecab-..."
        assert chosen.startswith(bleu_tokenizer(code)), (code, chosen)
    assert bleu_tokenizer("ja") == "ja-mecab" and bleu_tokenizer("ko") == "ko-mecab"
    with pytest.raises(DataError, match="unknown language code 'xx'"):
        bleu_tokenizer("xx")


@pytest.mark.parametrize("lang, answer, ref", [
    ("ja", "今日はとても良い天気です。", "今日はとても良い天気ですね。"),
    ("ko", "오늘은 날씨가 아주 좋아요.", "오늘은 날씨가 아주 좋네요."),
])
def test_reference_bleu_for_japanese_and_korean(lang, answer, ref):
    """--ref-metric bleu on a Japanese or Korean target is sacrebleu's BLEU with its MeCab tokenizer: a near-identical
    Japanese answer scored 0.0 under 13a (the sentence is one "word" without spaces)."""
    (out,) = score_rollouts([f"<think>x</think> <answer>{answer}</answer>"], None, w_self=0.0, refs=[ref], w_ref=1.0,
                            ref_metric="bleu", ref_langs=[lang])
    assert out.ref_metric == pytest.approx(sacrebleu.sentence_bleu(answer, [ref], tokenize=f"{lang}-mecab").score)
    assert out.ref_metric > 30
    if lang == "ja":
        assert sacrebleu.sentence_bleu(answer, [ref], tokenize="13a").score == 0  # what it scored before


def test_bleu_without_mecab_is_one_line_naming_chrf(monkeypatch):
    """A machine without MeCab (the GPU machine installs no requirements): BLEU on a Japanese target is one line
    saying what to install, or to score with chrF, not sacrebleu's multi-line RuntimeError. sacrebleu marks a failed
    `import MeCab` by setting its module's MeCab to None: the same state here."""
    from sacrebleu.tokenizers import tokenizer_ja_mecab

    bleu_tokenizer.cache_clear()  # a check that passed earlier in this process is remembered
    monkeypatch.setattr(tokenizer_ja_mecab, "MeCab", None)
    with pytest.raises(DataError) as err:
        reference_score("今日は", "今日は", "bleu", "ja")
    assert str(err.value) == ("BLEU for Japanese targets needs sacrebleu's ja-mecab tokenizer, which needs "
                              "mecab-python3 ipadic (pinned in requirements.txt; pip install -r requirements.txt), or "
                              "score with chrF instead")
    assert reference_score("今日は", "今日は", "chrf", "ja") == pytest.approx(100.0)


def test_judge_samples_average_parsed_judgements():
    judgements = [verdicts("<answer>70</answer>", "<answer>80</answer>", "<answer>90</answer>"),
                  verdicts("<answer>60</answer>", "garbage", "<answer>101</answer>"),
                  verdicts("no", "tags", "here")]
    out = score_rollouts([GOOD, GOOD, GOOD], judgements)
    assert column(out, "self_score") == [80.0, 60.0, None]
    assert column(out, "reward") == pytest.approx([0.8, 0.6, 0.0])
    assert column(out, "failures") == [[], ["no_tags", "out_of_range"], ["no_tags"] * 3]
    assert column(out, "judged") == [3, 3, 3]


def test_reward_input_errors():
    with pytest.raises(RewardError, match="rollout 0 has a valid answer but no judgement"):
        score_rollouts([GOOD], [[]])
    with pytest.raises(RewardError, match="rollout 1 has a valid answer but no COMET score"):
        score_rollouts([GOOD, GOOD], [verdicts("<answer>1</answer>")] * 2, [0.5, None], w_self=0.5, w_comet=0.5)
    with pytest.raises(RewardError, match="2 responses"):
        score_rollouts([GOOD, BAD], [verdicts("<answer>1</answer>")])


def test_stats():
    out = score_rollouts([GOOD, BAD, GOOD, GOOD],
                         [verdicts("<answer>20</answer>", "x"), [],
                          verdicts("<answer>60</answer>", "<answer>80</answer>"),
                          verdicts("<answer>90</answer>", "<answer>90 90</answer>")],
                         comet_scores=[0.1, None, 0.9, 0.5], w_self=0.5, w_comet=0.5)
    s = reward_stats(out)
    assert s["reward_mean"] == pytest.approx(sum(column(out, "reward")) / 4)
    assert s["reward_std"] == pytest.approx(math.sqrt(sum((r - s["reward_mean"]) ** 2 for r in column(out, "reward")) / 4))
    assert s["format_valid_rate"] == 0.75 and not any(k.startswith("answer_check_fail_") for k in s)
    assert s["self_score_mean"] == pytest.approx((20 + 70 + 90) / 3)
    assert s["judge_parse_failure_rate"] == pytest.approx(2 / 6)
    assert s["judge_fail_no_tags"] == pytest.approx(1 / 6) and s["judge_fail_extra_text"] == pytest.approx(1 / 6)
    assert s["judge_fail_several"] == s["judge_fail_no_number"] == s["judge_fail_out_of_range"] == 0.0
    assert s["comet_mean"] == pytest.approx(0.5)
    assert s["self_comet_spearman"] == pytest.approx(0.5)  # self ranks 0,1,2 vs comet ranks 0,2,1
    empty = reward_stats(score_rollouts([BAD, BAD], [[], []]))
    assert empty["format_valid_rate"] == 0.0 and empty["self_score_mean"] is None
    assert empty["judge_parse_failure_rate"] is None and empty["self_comet_spearman"] is None
    assert all(empty[f"judge_fail_{kind}"] is None for kind in FAILURE_KINDS)


# ----------------------------------------------------------------------------------------------------
# the target-script check (--check-script)

@pytest.mark.parametrize("text, lang, ok", [
    ("今天天气很好。", "zh", True),
    ("我用Python写代码。", "zh", True),  # a Latin term inside Chinese
    ("The weather is nice today.", "zh", False),  # no CJK at all: an untranslated or wrong-language answer
    ("The weather is nice today.", "en", True),
    ("Zhang San (张三) lives in Beijing.", "en", True),  # a Chinese name inside English
    ("今天天气很好。", "en", False),  # mostly CJK
    ("今天 is nice", "en", True),  # 2 CJK of 8 letters
    ("Ｔｈｅ ｃａｔ", "en", True),  # full-width Latin (NFKC)
    ("2024", "zh", True),  # no letters: nothing to judge
    ("Привет, мир", "ru", True),
    ("Hello world", "ru", False),
    ("こんにちは", "ja", True),
    ("東京", "ja", True),
    ("Guten Tag", "de", True),
    ("你好", "de", False),
])
def test_target_script(text, lang, ok):
    assert in_target_script(text, lang) is ok


def test_wrong_script_is_a_counted_format_failure():
    zh = "<think>x</think><answer>今天天气很好。</answer>"
    en = "<think>x</think><answer>The weather is nice.</answer>"
    source = {"src": "The weather is nice.", "src_lang": "en", "tgt_lang": "zh"}
    assert checked_answer(en, source, ("script",)) == (None, "script")
    assert checked_answer(en, source) == ("The weather is nice.", None)  # no checks asked
    failed = [checked_answer(r, source, ("script",))[1] for r in (zh, en, BAD)]
    out = score_rollouts([zh, en, BAD], [verdicts("<answer>80</answer>"), verdicts("<answer>90</answer>"), []],
                         failed_checks=failed)
    assert column(out, "reward") == [0.8, -1.0, -1.0] and column(out, "format_valid") == [True, False, False]
    assert column(out, "failed_check") == [None, "script", None] and column(out, "judged") == [1, 0, 0]
    assert reward_stats(out, checks=("script",))["answer_check_fail_script"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------
# the answer checks (--answer-checks): each rule both ways, on real sentences

CHECK_CASES = [  # (check, answer, source row, fails?)
    ("copy", "The cat sleeps on the mat.", ("The cat sleeps on the mat.", "en", "fr"), True),
    ("copy", "  THE CAT   sleeps on the mat.", ("The cat sleeps on the mat.", "en", "fr"), True),  # case, spaces
    ("copy", "Ｔｈｅ ｃａｔ sleeps on the mat.", ("The cat sleeps on the mat.", "en", "fr"), True),  # NFKC
    ("copy", "Le chat dort sur le tapis.", ("The cat sleeps on the mat.", "en", "fr"), False),
    ("copy", "今天很冷。", ("今天很冷。", "zh", "en"), True),
    ("copy", "It is cold today.", ("今天很冷。", "zh", "en"), False),
    ("placeholder", "answer", ("The cat sleeps.", "en", "fr"), True),  # what SmolLM2 learned (RESULTS.md 5)
    ("placeholder", "answer here", ("The cat sleeps.", "en", "fr"), True),
    ("placeholder", "Answer here.", ("The cat sleeps.", "en", "fr"), True),
    ("placeholder", "reasoning process here", ("The cat sleeps.", "en", "fr"), True),
    ("placeholder", "La réponse est ici.", ("The answer is here.", "en", "fr"), False),
    ("placeholder", "答案", ("The answer.", "en", "zh"), False),
    ("lang", "El gato duerme tranquilamente sobre la alfombra roja.", ("The cat sleeps quietly on the red mat.",
                                                                      "en", "fr"), True),  # Spanish, same script
    ("lang", "Le chat dort tranquillement sur le tapis rouge.", ("The cat sleeps quietly on the red mat.",
                                                                 "en", "fr"), False),
    ("lang", "The cat sleeps quietly on the red mat.", ("The cat sleeps quietly on the red mat.", "en", "fr"), True),
    ("lang", "El gato duerme.", ("The cat sleeps.", "en", "fr"), False),  # 13 letters: too short to tell
    ("lang", "猫はテーブルの上で静かに眠っています。とても気持ちよさそうです。", ("猫在桌子上安静地睡觉。", "zh", "en"), True),
    ("lang", "猫在桌子上安静地睡觉，看起来非常舒服，今天的天气也很好。", ("The cat sleeps on the table.", "en", "zh"), False),
    ("lang", "The cat is sleeping quietly on the table, it looks very comfortable.", ("猫在桌子上安静地睡觉。", "zh",
                                                                                      "en"), False),
    ("lang", "猫はテーブルの上で静かに眠っています。とても気持ちよさそうです。", ("The cat sleeps on the table.", "en",
                                                                              "ja"), False),
    ("length", "Le chat dort.", ("The cat sleeps.", "en", "fr"), False),
    ("length", "Chat.", ("The cat sleeps on the mat in the sun every single afternoon.", "en", "fr"), True),  # under
    ("length", "Le chat dort. " * 4, ("The cat sleeps.", "en", "fr"), True),  # over: 56 characters for 15
    ("length", "猫在垫子上睡觉。", ("The cat sleeps on the mat.", "en", "zh"), False),
    ("length", "The cat is sleeping on the mat.", ("猫在垫子上睡觉。", "zh", "en"), False),
    ("length", "Cat.", ("猫在垫子上睡觉，天气很好，我们都很高兴。", "zh", "en"), True),
    ("script", "The weather is nice.", ("今天天气很好。", "zh", "en"), False),
    ("script", "The weather is nice.", ("The weather is nice.", "en", "zh"), True),
]


@pytest.mark.parametrize("check, answer, row, fails", CHECK_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CHECK_CASES)])
def test_answer_check_each_way(check, answer, row, fails):
    src, src_lang, tgt_lang = row
    assert check_answer(answer, src, src_lang, tgt_lang, (check,)) == (check if fails else None)


def test_answer_checks_report_the_first_failing_check_and_know_every_template():
    """The first failing check is the one named; every template's placeholders come from its own prompt."""
    copy_and_wrong_lang = "The cat sleeps quietly on the red mat."
    assert check_answer(copy_and_wrong_lang, copy_and_wrong_lang, "en", "fr", ("lang", "copy")) == "lang"
    assert check_answer(copy_and_wrong_lang, copy_and_wrong_lang, "en", "fr", ("copy", "lang")) == "copy"
    assert check_answer("Le chat dort.", "The cat sleeps.", "en", "fr", judge.ANSWER_CHECKS) is None
    for template in judge.TEMPLATES:
        assert {"answer here", "reasoning process here", "answer"} <= judge.placeholders(template)
    with pytest.raises(judge.RewardError, match="no measured length ratio for en->de"):
        check_answer("Die Katze schläft.", "The cat sleeps.", "en", "de", ("length",))
    with pytest.raises(judge.RewardError, match="unknown answer check 'size'"):
        judge.checks_list("copy,size")


def test_french_references_pass_the_checks():
    """The checks' false alarms on real translations: of the 533 French references of data/en_fr_*.jsonl (written
    for the project), at most 1% fails any check (measured: the lang check calls one 20-letter-plus reference
    Italian)."""
    rows = [json.loads(line) for name in ("en_fr_train_refs", "en_fr_val", "en_fr_test", "en_fr_dev")
            for line in (ROOT / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    failed = [r["ref"] for r in rows if check_answer(r["ref"], r["src"], "en", "fr", judge.ANSWER_CHECKS)]
    assert len(rows) == 533 and len(failed) <= 5, failed


def test_pairwise_agreement_with_the_reference_metric():
    """self_ref_pairwise by hand: within each group, pairs whose self scores and metrics both differ."""
    part = lambda self, ref: judge.RewardParts(0.0, True, "x", self, [], 1, None, None, ref)
    group_a = [part(90, 50.0), part(80, 40.0), part(80, 60.0), part(None, 10.0)]  # pairs: (90,80)x2 agree/disagree
    group_b = [part(10, 20.0), part(30, 20.0), part(50, 70.0), part(70, 10.0)]  # metric ties and reversed order
    accuracy, pairs = judge.pairwise_agreement(group_a + group_b, group_size=4)
    # a: (90,50)-(80,40) agrees, (90,50)-(80,60) disagrees, (80,40)-(80,60) judge tie; b: (10,20)-(30,20) metric
    # tie, (10,20)-(50,70) agrees, (10,20)-(70,10) disagrees, (30,20)-(50,70) agrees, (30,20)-(70,10) disagrees,
    # (50,70)-(70,10) disagrees
    assert (accuracy, pairs) == (3 / 7, 7)
    stats = reward_stats(group_a + group_b, group_size=4)
    assert stats["self_ref_pairwise"] == 3 / 7 and stats["self_ref_pairs"] == 7
    assert judge.pairwise_agreement(group_a[:1], group_size=4) == (None, 0)


# ----------------------------------------------------------------------------------------------------
# what the judge is asked: dedup and group mode

CAT, RAIN = {"src": "猫在睡觉。", "src_lang": "zh", "tgt_lang": "en"}, {"src": "下雨了。", "src_lang": "zh", "tgt_lang": "en"}
SOURCES = [CAT] * 4 + [RAIN] * 3


def test_pointwise_tasks_dedup():
    answers = ["The cat sleeps.", "A cat is asleep.", "The cat sleeps.", "The cat sleeps.",
               "It rains.", "It rains.", "The cat sleeps."]  # the last: same text, another source
    groups = [0, 0, 0, 0, 1, 1, 1]
    tasks = judge_tasks(SOURCES, answers, groups, "pointwise", dedup=True)
    assert [t.members for t in tasks] == [[[0, 2, 3]], [[1]], [[4, 5]], [[6]]]
    assert tasks[0].prompt == judge_prompt("猫在睡觉。", "The cat sleeps.", "zh", "en")
    assert tasks[3].prompt == judge_prompt("下雨了。", "The cat sleeps.", "zh", "en")
    every = judge_tasks(SOURCES, answers, groups, "pointwise", dedup=False)  # sampled judging: one per rollout
    assert [t.members for t in every] == [[[i]] for i in range(7)]
    assert read_verdict(tasks[0], "<answer>Score: 70</answer>") == [Judgement(70.0)]


def test_group_tasks():
    answers = ["The cat sleeps.", "A cat is asleep.", "The cat sleeps.", "Cat sleeping.", "It rains.", "It rains."]
    tasks = judge_tasks([CAT] * 4 + [RAIN] * 2, answers, [0, 0, 0, 0, 1, 1], "group", dedup=True)
    assert [t.members for t in tasks] == [[[0, 2], [1], [3]], [[4, 5]]]
    prompt = tasks[0].prompt
    numbered = ["The cat sleeps.", "A cat is asleep.", "Cat sleeping."]
    assert prompt == group_judge_prompt("猫在睡觉。", numbered, "zh", "en")
    assert 'English translation 1: "The cat sleeps."\nEnglish translation 2: "A cat is asleep."\n' in prompt
    assert 'English translation 3: "Cat sleeping."\n' in prompt and "translation 4" not in prompt
    assert "Score each of the following 3 translations from Chinese to English" in prompt
    assert "one line per translation: its number, a colon and its score" in prompt
    assert read_verdict(tasks[0], "<answer>1: 80\n2: 60\n3: 10</answer>") == [Judgement(80.0), Judgement(60.0),
                                                                             Judgement(10.0)]
    # a prompt that did not fit the judge's cache: no output, every translation of the task fails
    assert read_verdict(tasks[0], None) == [Judgement(None, "too_long")] * 3
    with pytest.raises(RewardError, match="unknown judge mode 'pairwise'"):
        judge_tasks(SOURCES, answers, [0] * 6, "pairwise", dedup=True)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks [0, 1.5, 1.5, 3], y ranks [0, 1, 2, 3] -> Pearson of the ranks
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([3, 3, 3], [1, 2, 3]) is None


# ----------------------------------------------------------------------------------------------------
# custom reward plug-in

@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def letter_share(samples):
            return [(s["answer"] or "").count("a") / max(1, len(s["answer"] or "")) for s in samples]
        def too_few(samples):
            return [1.0] * (len(samples) - 1)
        def not_a_list(samples):
            return 1.0
        def strings(samples):
            return ["0.5" for _ in samples]
        def nan(samples):
            return [float("nan") for _ in samples]
        CONSTANT = 3
    """))
    (tmp_path / "broken_rewards.py").write_text("import some_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_custom_reward(reward_module):
    fn = load_custom_reward(f"{reward_module}:letter_share")
    samples = [{"src": "你好", "src_lang": "zh", "tgt_lang": "en", "response": GOOD, "answer": "aab"},
               {"src": "你好", "src_lang": "zh", "tgt_lang": "en", "response": BAD, "answer": None}]
    assert fn(samples) == [pytest.approx(2 / 3), 0.0]
    assert load_custom_reward("math:sqrt") is not None  # any importable module


@pytest.mark.parametrize("spec, message", [
    ("my_rewards", "expected 'module:function'"),
    ("my_rewards:", "expected 'module:function'"),
    (":letter_share", "expected 'module:function'"),
    ("a:b:c", "expected 'module:function'"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("no_such_pkg_xyz.sub:f", "no module named 'no_such_pkg_xyz'"),
    ("my_rewards:missing", "module 'my_rewards' has no function 'missing'"),
    ("my_rewards:CONSTANT", "module 'my_rewards' has no function 'CONSTANT'"),
])
def test_custom_reward_spec_errors(reward_module, spec, message):
    with pytest.raises(RewardError, match=message) as e:
        load_custom_reward(spec)
    assert "\n" not in str(e.value)


def test_custom_reward_import_error_inside_module_is_not_hidden(reward_module):
    with pytest.raises(ModuleNotFoundError, match="some_package_that_is_not_installed"):
        load_custom_reward("broken_rewards:f")


@pytest.mark.parametrize("func, message", [
    ("too_few", "must return a list of 2 floats, got 1 values"),
    ("not_a_list", "must return a list of 2 floats, got float"),
    ("strings", "returned '0.5'; every value must be a finite number"),
    ("nan", "returned nan; every value must be a finite number"),
])
def test_custom_reward_output_errors(reward_module, func, message):
    fn = load_custom_reward(f"{reward_module}:{func}")
    samples = [{"src": "a", "src_lang": "en", "tgt_lang": "zh", "response": GOOD, "answer": "x"}] * 2
    with pytest.raises(RewardError, match=message):
        fn(samples)


# ----------------------------------------------------------------------------------------------------
# COMET

SRCS = ["The cat sat on the mat.", "今天天气很好。", "Is it going to rain in Beijing tomorrow?",
        "我们明天在北京见。", "the dog", "She read the letter three times and then put it back in the drawer."]
MTS = ["猫坐在垫子上。", "The weather is nice today.", "北京明天会下雨吗？",
       "We will meet in Beijing tomorrow.", "狗", "她把信读了三遍。"]
REFS = ["猫坐在垫子上。", "It is a fine day today.", "明天北京下雨吗？",
        "See you in Beijing tomorrow.", "那只狗", "她把那封信读了三遍，然后放回了抽屉。"]


def predict_scores(model, samples):
    """The oracle: COMET's own predict (a Lightning Trainer; fine in a plain single-process test)."""
    return model.predict(samples, batch_size=4, gpus=0, progress_bar=False, num_workers=0).scores


def test_comet_kiwi_matches_predict(tiny_comet_dir):
    scorer = CometScorer(load_comet(str(tiny_comet_dir)), "kiwi", device="cpu", batch_size=4)
    assert not scorer.needs_refs
    ours = scorer.score(SRCS, MTS)
    oracle = predict_scores(scorer.model, [{"src": s, "mt": m} for s, m in zip(SRCS, MTS)])
    assert ours == pytest.approx(oracle, abs=1e-5)
    assert max(ours) - min(ours) > 1e-3  # the samples really score differently, so order errors would show
    # order is kept whatever the batch size and length sorting; references are ignored by a Kiwi model
    ckpt = str(tiny_comet_dir / "checkpoints" / "model.ckpt")
    assert CometScorer(load_comet(ckpt), "kiwi", batch_size=1).score(SRCS, MTS, REFS) \
        == pytest.approx(ours, abs=1e-5)
    assert scorer.score([], []) == []


def test_comet_reference_based_matches_predict(tiny_comet_ref_dir):
    scorer = CometScorer(load_comet(str(tiny_comet_ref_dir)), "xcomet", batch_size=4)
    with_refs = scorer.score(SRCS, MTS, REFS)
    assert with_refs == pytest.approx(
        predict_scores(scorer.model, [{"src": s, "mt": m, "ref": r} for s, m, r in zip(SRCS, MTS, REFS)]), abs=1e-5)
    without = scorer.score(SRCS, MTS)  # XCOMET falls back to quality estimation, as predict does
    assert without == pytest.approx(predict_scores(scorer.model, [{"src": s, "mt": m} for s, m in zip(SRCS, MTS)]),
                                    abs=1e-5)
    assert with_refs != pytest.approx(without, abs=1e-5)
    scorer.needs_refs = True  # as for a RegressionMetric such as wmt22-comet-da
    with pytest.raises(RewardError, match="reference-based; pass refs"):
        scorer.score(SRCS, MTS)
    with pytest.raises(RewardError, match="same length"):
        scorer.score(SRCS, MTS, REFS[:2])


def test_comet_offline_name_is_one_clear_line(monkeypatch):
    import comet

    def offline(model, *args, **kwargs):  # what comet.download_model raises for any failure, offline included
        raise KeyError(f"Model '{model}' not supported by COMET.")

    monkeypatch.setattr(comet, "download_model", offline)
    with pytest.raises(CheckpointError) as e:
        load_comet("Unbabel/wmt22-cometkiwi-da")
    message = str(e.value)
    assert "\n" not in message and "'Unbabel/wmt22-cometkiwi-da'" in message
    assert "pass a local directory holding checkpoints/model.ckpt and hparams.yaml" in message


def test_comet_bad_local_paths(tiny_comet_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not a COMET checkpoint"):
        load_comet(str(tmp_path))  # a directory without checkpoints/model.ckpt
    bare = tmp_path / "bare" / "checkpoints"
    bare.mkdir(parents=True)
    shutil.copy(tiny_comet_dir / "checkpoints" / "model.ckpt", bare)
    with pytest.raises(CheckpointError, match="no hparams.yaml"):
        load_comet(str(bare / "model.ckpt"))


def test_comet_local_path_is_loaded_offline(tiny_comet_dir, tmp_path, monkeypatch):
    import comet

    calls = []
    load = comet.load_from_checkpoint
    monkeypatch.setattr(comet, "load_from_checkpoint", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    load_comet(str(tiny_comet_dir))
    assert calls == [{"local_files_only": True}]  # a local path never asks the hub for the encoder files
    # the checkpoint names its encoder by an absolute path; without it, loading fails with one clear line
    moved = tmp_path / "moved"
    shutil.copytree(tiny_comet_dir, moved)
    shutil.move(str(tiny_comet_dir / "encoder"), str(tmp_path / "encoder_away"))
    try:
        missing = r"tokenizer and config of its encoder '.*encoder' are not avail"
        with pytest.raises(CheckpointError, match=missing) as e:
            load_comet(str(moved))
        assert "\n" not in str(e.value)
    finally:
        shutil.move(str(tmp_path / "encoder_away"), str(tiny_comet_dir / "encoder"))


def test_sample_data():
    lines = (Path(judge.__file__).parent / "data" / "sample.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) >= 200 and len({r["src"] for r in rows}) == len(rows)
    assert all(set(r) == {"src", "src_lang", "tgt_lang"} and r["src"].strip() == r["src"] != "" for r in rows)
    directions = [(r["src_lang"], r["tgt_lang"]) for r in rows]
    assert set(directions) == {("en", "zh"), ("zh", "en")} and directions.count(("en", "zh")) >= 100
    assert directions.count(("zh", "en")) >= 100
    for r in rows:  # the script really matches the declared language
        assert any("\u4e00" <= ch <= "\u9fff" for ch in r["src"]) == (r["src_lang"] == "zh")
        actor_prompt(r["src"], r["src_lang"], r["tgt_lang"])


def test_judge_module_does_not_import_comet():
    # COMET drags in Lightning and torchmetrics (seconds at start-up); plain SSR must not pay for it
    code = "import sys, judge; print('comet' in sys.modules, 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(judge.__file__).parent)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------------
# options found on a real small model (RESULTS.md): a prefilled <think>, graded format credit, a plain prompt

@pytest.mark.parametrize("template, prefill", [("chat", "<think>"), ("r1", " <think>")])
def test_think_prefill(template, prefill):
    plain = actor_prompt("Hello.", "en", "fr", template)
    assert judge.think_prefill(template) == prefill
    assert actor_prompt("Hello.", "en", "fr", template, prefill=True) == plain + prefill
    # the trainer puts the prefill back in front of what the model wrote: a closed format is then valid
    assert extract_answer(prefill + "\nsimple</think> <answer>Bonjour.</answer>") == "Bonjour."
    assert extract_answer(prefill + "\nBonjour.") is None


@pytest.mark.parametrize("response, progress", [
    ("<think>a</think> <answer>b</answer>", 1.0),
    ("", 0.0),
    ("Bonjour.", 0.0),
    ("<think>Bonjour.", 0.25),
    ("<think>x</think> Bonjour.", 0.5),
    ("<think>x</think> <answer>Bonjour.", 0.75),
    # a prefilled <think>, then the system text's example copied out: the doubled <think> earns nothing
    ("<think>\nThe reasoning is enclosed within <think> </think> and answer within <answer> </answer>", 0.75),
    ("<think><think></think></think><answer></answer><answer></answer>", 0.0),
])
def test_format_progress(response, progress):
    assert judge.format_progress(response) == progress


def test_plain_prompt():
    chat = judge.plain_prompt("Hello.", "en", "fr", "chat")
    assert chat == ("<|im_start|>user\nTranslate the following text from English to French. Reply with the "
                    "translation only.\nHello.<|im_end|>\n<|im_start|>assistant\n")
    assert R1_SYSTEM not in chat and "<answer>" not in chat
    assert judge.plain_prompt("你好。", "zh", "en", "r1") == (
        "User:\nTranslate the following text from Chinese to English. Reply with the translation only.\n你好。\n"
        "Assistant:")
    assert judge.plain_prompt("你好。", "zh", "en", "ssr") == judge.plain_prompt("你好。", "zh", "en", "r1")
    with pytest.raises(RewardError, match="unknown prompt template 'nope'"):
        judge.plain_prompt("x", "en", "fr", "nope")


# ----------------------------------------------------------------------------------------------------
# the quotation-mark artifact

@pytest.mark.parametrize("answer", ['"The cat sleeps."', "'The cat sleeps.'", "“猫在睡觉。”", "‘猫在睡觉。’",
                                    "「猫在睡觉。」", "『猫在睡觉。』", "«Le chat dort.»", '  "padded"  ',
                                    '"He said “hi”."'])
def test_answer_quoted(answer):
    assert judge.answer_quoted(answer, "The cat sleeps.")
    assert judge.strip_quotes(answer, "The cat sleeps.") == answer.strip()[1:-1]
    # a source in quotation marks (any kind) translates into a quoted answer: not the artifact
    for src in ('"The cat sleeps."', "“猫在睡觉。”", "「猫在睡觉。」"):
        assert not judge.answer_quoted(answer, src)
        assert judge.strip_quotes(answer, src) == answer


@pytest.mark.parametrize("answer", ["The cat sleeps.", '"a" and "b"', "“猫”在“睡觉”", '"unclosed', 'closed"', '"',
                                    "“mismatched\"", "「mismatched」」x", "'tis", "", "The “cat” sleeps."])
def test_answer_not_quoted(answer):
    assert not judge.answer_quoted(answer, "The cat sleeps.")
    assert judge.strip_quotes(answer, "The cat sleeps.") == answer


# ----------------------------------------------------------------------------------------------------
# the expected score: the judge's probabilities over 0-100 after <answer>

def test_expected_verdicts_equal_direct_log_probs(tiny_model_dir):
    """judge.expected_verdicts (prefixes prefilled once, the 101 integers as one trie through the sampler's cache)
    against a direct computation: a forward with no cache over each whole prefix + "{v}</answer>" (the tokenizer's
    tokens), torch's log_softmax, summed, normalised over the 101, its mean; pointwise and group verdicts."""
    import torch

    from checkpoint import load_pretrained, load_tokenizer
    from sampler import Sampler

    tok, model = load_tokenizer(tiny_model_dir), load_pretrained(tiny_model_dir, device="cpu").eval()
    point = judge.judge_tasks([{"src": "hi", "src_lang": "en", "tgt_lang": "zh"}], ["你好"], [0], "pointwise", True)[0]
    group = judge.judge_tasks([{"src": "hi", "src_lang": "en", "tgt_lang": "zh"}] * 2, ["你好", "嗨"], [0, 0], "group",
                              True)[0]
    tasks = [point, point, group]
    prompts = [tok.encode(t.prompt) for t in tasks]
    # reasoning cut by the budget (no <answer>: appended), one that wrote <answer> and more after it, a group
    texts = ["<think> fine", "<think>ok</think> <answer> 7", "<think>x</think>"]
    sampler = Sampler(model, max_batch_size=2, max_seq_len=max(map(len, prompts)) + 64, device="cpu",
                      dtype=torch.float32)
    got = judge.expected_verdicts(sampler.score, tok, prompts, texts + [None], tasks + [point], sampler.max_seq_len)

    @torch.no_grad()
    def direct(prefix: list[int], end: str) -> torch.Tensor:  # (101,) P(v) normalised
        lps = []
        for v in range(101):
            c = tok.encode(f"{v}{end}")
            lp = model(torch.tensor([prefix + c]))[0].float().log_softmax(-1)[len(prefix) - 1:-1]
            lps.append(lp.gather(-1, torch.tensor(c)[:, None]).sum())
        return torch.stack(lps).double().softmax(-1)

    mean = lambda p: float((p * torch.arange(101, dtype=torch.float64)).sum())
    for t in (0, 1):
        head = prompts[t] + tok.encode(texts[t].partition("<answer>")[0]) + tok.encode("<answer>")
        assert got[t] == [judge.Judgement(pytest.approx(mean(direct(head, "</answer>")), abs=1e-5))]
    reasoning = prompts[2] + tok.encode(texts[2])
    first = direct(reasoning + tok.encode("<answer>1: "), "\n")
    second = direct(reasoning + tok.encode(f"<answer>1: {int(first.argmax())}\n2: "), "</answer>")
    assert got[2] == [judge.Judgement(pytest.approx(mean(first), abs=1e-5)),
                      judge.Judgement(pytest.approx(mean(second), abs=1e-5))]
    assert got[3] == [judge.Judgement(None, "too_long")]
    assert all(0 <= j.score <= 100 for verdict in got[:3] for j in verdict)


def test_expected_verdicts_cut_a_reasoning_that_fills_the_cache(tiny_model_dir):
    """A judge's reasoning longer than the scorer's cache holds: the prefix keeps as much of it as fits, which is
    exactly the longest prefix Sampler.score accepts (max_len - 1 tokens: the first digit is read at the next
    position), prompt + the reasoning's first tokens + <answer>. One token longer is refused by the scorer (the
    step would crash); one shorter would drop a reasoning token that fits and score another prefix."""
    import torch

    from checkpoint import load_pretrained, load_tokenizer
    from sampler import Sampler

    tok, model = load_tokenizer(tiny_model_dir), load_pretrained(tiny_model_dir, device="cpu").eval()
    task = judge.judge_tasks([{"src": "hi", "src_lang": "en", "tgt_lang": "zh"}], ["你好"], [0], "pointwise", True)[0]
    prompt, tail = tok.encode(task.prompt), tok.encode("<answer>")
    text = "<think> the translation keeps the meaning and reads well" * 4  # wrote no <answer>: the budget ran out
    head = tok.encode(text)
    room = 10  # reasoning tokens that fit
    max_len = len(prompt) + room + len(tail) + 1
    assert len(head) > room + 1
    sampler = Sampler(model, max_batch_size=1, max_seq_len=max_len, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="does not fit"):  # the boundary is the scorer's own
        sampler.score([prompt + head[:room + 1] + tail], [tok.encode("0</answer>")])
    scored = []

    def score(prefixes, continuations):  # the real scorer, its prefixes kept to look at
        scored.extend(prefixes)
        return sampler.score(prefixes, continuations)

    (verdict,) = judge.expected_verdicts(score, tok, [prompt], [text], [task], max_len)
    assert scored == [prompt + head[:room] + tail] and len(scored[0]) == max_len - 1
    assert verdict[0].failure is None and 0 <= verdict[0].score <= 100
