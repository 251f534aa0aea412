"""The smoke run's tiny model: what `python ssr.py` trains when no --model is given.

A random 2-layer Qwen2 cannot write `<think>...</think> <answer>...</answer>`, so on its own the judge, the score
parsing and the self-reward would never run. The smoke model therefore gets a few seconds of supervised warm-up
on responses and judgements written here in code, after which some sampled responses are well formed and the
judge's verdicts parse from the first RL step, and the RL steps have something to improve: the share of
well-formed responses, which the format penalty rewards. It is all a toy: a "translation" is the opening words
of some sentence, and the toy judge gives every one of them 90 (a 2-layer model cannot judge translations; the
smoke run needs verdicts that parse, not good ones). It shows the loop, not translation.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

import judge
from checkpoint import load_pretrained, load_tokenizer, make_tiny_model, save_model
from data import read_jsonl

WARM_UP_STEPS, WARM_UP_BATCH, WARM_UP_LR = 60, 16, 3e-3  # leaves ~2/3 of the sampled responses well formed
TOY_SCORE = "90"  # the toy judge's verdict on every answer


def make_smoke_model(path, data: str, seed: int = 0, **dims) -> Path:
    """The smoke run's tiny random Qwen2, its BPE tokenizer trained on the data and the prompt templates
    (repeated, so they merge into few tokens: short prompts keep a CPU run fast). `dims` override the shape."""
    sources = [str(row.get("src", "")) for _, row in read_jsonl(data)]  # ssr.load_data checks the rows
    directions = (("en", "zh"), ("zh", "en"))
    templates = [judge.actor_prompt("", a, b, t) for a, b in directions for t in judge.TEMPLATES]
    templates += [judge.judge_prompt("", "", a, b, t) for a, b in directions for t in judge.TEMPLATES]
    # the warm-up's responses too, so that the toy judge's score is a single token
    corpus = sources + (templates + [warm_up_response(TOY_SCORE)]) * 50
    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) | dims
    return make_tiny_model(path, corpus=corpus, vocab_size=1024, seed=seed, **dims)


def warm_up_response(answer: str) -> str:
    # a leading space: the response continues "Assistant:"; an empty think is still the format
    return f" <think></think> <answer>{answer}</answer>"


def warm_up_examples(rows: list[dict], template: str, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, target) pairs for the warm-up, two per source: an actor response whose answer is the opening
    of a sentence in the target language (another row's source) or of the source itself, and the toy judge's
    verdict on another such answer (see the module docstring)."""
    rng = random.Random(seed)
    by_lang: dict[str, list[str]] = {}
    for row in rows:
        by_lang.setdefault(row["src_lang"], []).append(row["src"])

    def answer(row: dict) -> str:  # the first 1-4 words (Chinese: characters) of a sentence
        text = rng.choice([row["src"], rng.choice(by_lang.get(row["tgt_lang"], [row["src"]]))])
        words = text.split() if " " in text else list(text)
        return (" " if " " in text else "").join(words[:rng.randint(1, 4)])

    examples = []
    for row in rows:
        src, a, b = row["src"], row["src_lang"], row["tgt_lang"]
        examples.append((judge.actor_prompt(src, a, b, template), warm_up_response(answer(row))))
        examples.append((judge.judge_prompt(src, answer(row), a, b, template), warm_up_response(TOY_SCORE)))
    return examples


def fine_tune(path, examples: list[tuple[str, str]], steps: int, lr: float, batch_size: int, seed: int = 0) -> float:
    """Supervised fine-tuning of the checkpoint at `path`, in place: cross-entropy on each example's target
    tokens, its prompt only conditioning them; `steps` Adam steps on random batches. Returns the last loss."""
    model = load_pretrained(path, dtype=torch.float32)
    tok = load_tokenizer(path)
    seqs = [(tok.encode(prompt), tok.encode(target)) for prompt, target in examples]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = [seqs[i] for i in torch.randperm(len(seqs), generator=gen)[:batch_size].tolist()]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tok.pad_id)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)  # column c: is token c + 1 a target token
        for i, (p, t) in enumerate(batch):
            ids[i, :len(p) + len(t)] = torch.tensor(p + t)
            mask[i, len(p) - 1:len(p) + len(t) - 1] = True
        logp = model(ids, targets=ids.roll(-1, 1))  # (B, T) log-prob of each next token
        loss = -logp[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model, path, tokenizer_dir=path)
    return loss.item()


def warm_up(path, rows: list[dict], template: str, seed: int = 0, steps: int = WARM_UP_STEPS) -> float:
    """The smoke model's supervised warm-up on the training rows (see the module docstring); returns the last
    loss."""
    return fine_tune(path, warm_up_examples(rows, template, seed), steps, WARM_UP_LR, WARM_UP_BATCH, seed)
