"""The training loop end to end on tiny models: learning, the judge and COMET paths, checkpoints, resume,
torchrun DDP/FSDP on gloo, and one-line errors for bad input."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

import judge
import smoke
import ssr
from checkpoint import load_pretrained
from conftest import GROUP_SCORES, VERDICTS, write_jsonl  # noqa: F401 (the fixtures live there too)

ROOT = Path(__file__).resolve().parent.parent


def expected_self_scores(rows):
    """samples.jsonl rows -> each rollout's pointwise self score under VERDICTS (None: invalid, not judged)."""
    assert {r["answer"] for r in rows} <= {*VERDICTS, None}, "the verdict model answered something else"
    return [VERDICTS[r["answer"]][1] if r["answer"] else None for r in rows]


def run_ssr(*args, expect_ok=True):
    """`python ssr.py ARGS` in a subprocess: exactly what a user runs."""
    proc = subprocess.run([sys.executable, str(ROOT / "ssr.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


SMALL = ["--prompts-per-step", 4, "--group-size", 4, "--max-new-tokens", 16, "--judge-max-new-tokens", 16,
         "--micro-batch-size", 8, "--sampler-batch-size", 32, "--lr", 1e-4]


# one step of the verdict model: 2 sources x 4 samples, every rollout in samples.jsonl
VERDICT_RUN = ["--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 16, "--judge-max-new-tokens", 24,
               "--micro-batch-size", 8, "--sampler-batch-size", 16, "--steps", 1, "--log-samples", 8]


def test_help_shows_every_flag_with_defaults():
    proc = run_ssr("--help")
    for flag in ("--model", "--data", "--out-dir", "--steps", "--save-every", "--resume", "--reward",
                 "--judge-model", "--dist", "--preset", "--group-size", "--prompts-per-step", "--micro-batch-size",
                 "--max-new-tokens", "--temperature", "--top-p", "--kl-beta", "--clip-low", "--clip-high",
                 "--loss-agg", "--adv-std", "--lr", "--w-comet", "--judge-samples", "--judge-mode", "--check-script",
                 "--tis-cap", "--mask-truncated", "--decode", "--logprob-backend"):
        assert flag in proc.stdout, flag
    assert "(default: 8)" in proc.stdout  # group size


def test_presets_and_cli_override():
    cfg = ssr.parse_args(["--preset", "ssr-x-zero-7b", "--model", "m", "--lr", "2e-6"])
    assert (cfg.w_self, cfg.w_comet, cfg.dist, cfg.lr) == (0.5, 0.5, "fsdp", 2e-6)
    # the released checkpoints' prompt (model card) is the 7B presets' template; the CLI can still pick r1
    for preset in ("ssr-zero-7b", "ssr-x-zero-7b"):
        assert ssr.parse_args(["--preset", preset, "--model", "m"]).template == "ssr"
        assert ssr.parse_args(["--preset", preset, "--model", "m", "--template", "r1"]).template == "r1"
    assert ssr.parse_args([]).preset == "smoke"  # no model: the smoke run
    assert ssr.parse_args(["--model", "m"]).lr == 1e-6  # a real model gets the documented defaults


def test_self_judge_and_comet_rewards_in_the_loop(tmp_path, verdict_model_dir, two_rows, tiny_comet_dir):
    """SSR-X: the same weights judge each well-formed translation, COMET scores it, the reward mixes both."""
    out = tmp_path / "run"
    run_ssr("--model", verdict_model_dir, "--data", two_rows, "--out-dir", out, *VERDICT_RUN,
            "--w-self", 0.5, "--w-comet", 0.5, "--comet-model", tiny_comet_dir)
    (m,) = metrics(out)
    rows = samples(out)
    selfs = expected_self_scores(rows)
    assert m["format_valid_rate"] == pytest.approx(sum(s is not None for s in selfs) / 8)
    assert m["format_valid_rate"] > 0.5
    assert m["judge_parse_failure_rate"] == 0.0 and {*selfs} >= {90.0, 60.0}
    assert m["self_score_mean"] == pytest.approx(statistics.fmean(s for s in selfs if s is not None))
    for r, s in zip(rows, selfs):
        assert r["self_score"] == s
        if s is None:
            assert r["reward"] == -1.0 and r["judge_outputs"] == [] and r["comet"] is None
        else:
            assert r["judge_outputs"] == [f" <think></think> <answer>{VERDICTS[r['answer']][0]}</answer>"]
            assert 0.0 < r["comet"] < 1.0 and r["reward"] == pytest.approx(0.5 * s / 100 + 0.5 * r["comet"])
    for key in ("zero_spread_groups", "entropy", "clip_frac", "grad_norm", "lr", "sec_sample", "sec_judge",
                "sec_update", "rollout_tokens_per_s", "response_len_mean", "kl_old", "kl_sampler", "truncated_rate",
                "judge_saved_share", "comet_mean", *(f"judge_fail_{kind}" for kind in judge.FAILURE_KINDS)):
        assert m[key] is not None, key
    # logged over the extracted answers: none of "90" and "80" is in quotation marks (test_judge: both ways)
    assert m["answer_quoted_rate"] == 0.0
    # CPU: the sampler runs the trainer's own fp32 weights, so their log-probs agree up to kernel rounding
    assert 0 <= m["kl_sampler"] < 1e-6


def test_frozen_external_judge(tmp_path, verdict_model_dir, two_rows):
    """--judge-model loads a second, frozen model into its own sampler and judges with it: end to end, its
    verdicts come back as the rewards. (The actor is the verdict model too: a random actor is never well formed.)"""
    out = tmp_path / "run"
    run_ssr("--model", verdict_model_dir, "--judge-model", verdict_model_dir, "--data", two_rows, "--out-dir", out,
            *VERDICT_RUN)
    rows = samples(out)
    assert [r["reward"] for r in rows] == pytest.approx([s / 100 if s else -1.0 for s in expected_self_scores(rows)])


def test_reference_reward_in_the_loop_skips_the_judge(tmp_path, verdict_model_dir):
    """--w-self 0 --w-ref 1 (the positive control): every well-formed answer is rewarded by its sentence chrF
    against the row's reference, and the judge never runs."""
    data = write_jsonl(tmp_path / "refs.jsonl", [{"src": "The cat sleeps.", "ref": "90", "src_lang": "en", "tgt_lang": "zh"},
                                                 {"src": "今天很冷。", "ref": "80", "src_lang": "zh", "tgt_lang": "en"}])
    out = tmp_path / "run"
    proc = run_ssr("--model", verdict_model_dir, "--data", data, "--out-dir", out, *VERDICT_RUN, "--w-self", 0,
                   "--w-ref", 1, "--ref-metric", "chrf")
    assert "| chrf " in proc.stdout
    (m,) = metrics(out)
    rows = samples(out)
    refs = {"The cat sleeps.": "90", "今天很冷。": "80"}
    expected = [None if r["answer"] is None else sacrebleu.sentence_chrf(r["answer"], [refs[r["src"]]]).score
                for r in rows]
    scored = [e for e in expected if e is not None]
    assert m["format_valid_rate"] > 0.5 and max(scored) == 100.0 > min(scored)  # right and wrong answers both occur
    assert [r["ref_metric"] for r in rows] == pytest.approx(expected)
    assert [r["reward"] for r in rows] == pytest.approx([-1.0 if e is None else e / 100 for e in expected])
    assert m["ref_metric_mean"] == pytest.approx(statistics.fmean(e for e in expected if e is not None))
    assert all(r["judge_outputs"] == [] and r["self_score"] is None for r in rows)
    assert m["judge_parse_failure_rate"] is None and m["judge_saved_share"] is None


def test_reference_reward_refuses_rows_without_a_reference(tmp_path, model_dir):
    """--w-ref needs a non-empty 'ref' on every training row: refused with one line naming file and line,
    before any model loads (exit 2, no traceback)."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"src": "hi", "ref": "你好", "src_lang": "en", "tgt_lang": "zh"},
                                                  {"src": "bye", "ref": " ", "src_lang": "en", "tgt_lang": "zh"}])
    proc = run_ssr("--model", model_dir, "--data", data, "--out-dir", tmp_path / "o", "--w-ref", 1, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"ssr: error: {data}:2: missing or empty 'ref' "
                                                f"(--w-ref needs a reference on every row)"]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    write_jsonl(data, [{"src": "hi", "src_lang": "en", "tgt_lang": "zh"}])
    proc = run_ssr("--model", model_dir, "--data", data, "--out-dir", tmp_path / "o", "--w-ref", 1, expect_ok=False)
    assert proc.returncode == 2 and f"{data}:1: missing or empty 'ref'" in proc.stderr
    # without --w-ref a row needs no reference
    assert ssr.load_data(str(data))[0] == [{"src": "hi", "src_lang": "en", "tgt_lang": "zh"}]


def samples(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "samples.jsonl").read_text().splitlines()]


def test_group_judging_end_to_end(tmp_path, verdict_model_dir, two_rows):
    """--judge-mode group: one judgement per GRPO group over its distinct translations, numbered in order of
    first appearance; each rollout's reward is its own translation's line of the verdict."""
    out = tmp_path / "run"
    run_ssr("--model", verdict_model_dir, "--data", two_rows, "--out-dir", out, *VERDICT_RUN, "--judge-mode", "group")
    (m,) = metrics(out)
    rows = samples(out)  # prompt-major: rows[4 * i + j] is sample j of group i
    mixed = 0
    for i in range(0, 8, 4):
        group = rows[i:i + 4]
        numbered = list(dict.fromkeys(r["answer"] for r in group if r["answer"] is not None))  # first appearance
        mixed += len(numbered) == 2
        verdicts = {r["judge_outputs"][0] for r in group if r["answer"] is not None}
        assert len(verdicts) <= 1  # one judgement for the whole group
        for r in group:
            want = -1.0 if r["answer"] is None else GROUP_SCORES[numbered.index(r["answer"])] / 100
            assert r["reward"] == pytest.approx(want), (r, numbered)
    assert mixed  # a group really had two different translations to number
    assert m["judge_parse_failure_rate"] == 0.0 and m["kl_sampler"] is not None
    valid = sum(r["answer"] is not None for r in rows)
    assert m["judge_saved_share"] == pytest.approx(1 - 2 / valid)  # 2 group verdicts for the valid rollouts


def test_greedy_judging_judges_each_distinct_pair_once(tmp_path, verdict_model_dir, two_rows):
    """Pointwise greedy judging with dedup gives exactly the rewards of judging every copy, with fewer judge
    prompts (counted by the sampler's prefills)."""
    cfg = ssr.parse_args([str(x) for x in ["--model", verdict_model_dir, "--data", two_rows, "--out-dir",
                                           tmp_path / "run", *VERDICT_RUN]])
    run = ssr.setup(cfg)
    rollouts = ssr.sample_translations(run, ssr.step_sources(run.rows, 0, cfg, 0, 1), seed=0)
    before = run.judge_sampler.stats.prefill_prompts
    work = ssr.judge_translations(run, rollouts, seed=1)
    ssr.assign_rewards(run, rollouts)
    deduped = run.judge_sampler.stats.prefill_prompts - before
    valid = [r for r in rollouts if r.answer is not None]
    distinct = {(r.source["src"], r.answer) for r in valid}
    assert deduped == len(distinct) == work["judge_sequences"] < len(valid) == work["judgements"]
    # every copy judged on its own, greedily, with the same judge prompt
    tok = run.tok
    outs = run.judge_sampler.generate([tok.encode(judge.judge_prompt(r.source["src"], r.answer, r.source["src_lang"],
                                                                     r.source["tgt_lang"])) for r in valid],
                                      max_new_tokens=cfg.judge_max_new_tokens, temperature=0.0,
                                      stop_token_ids=tok.eos_ids, stop_strings=judge.STOP_STRINGS, tokenizer=tok)
    texts = [tok.decode(o.tokens, skip_special_tokens=True) for o in outs]
    every = judge.score_rollouts([r.response for r in valid], [[judge.parse_judgement(t)] for t in texts])
    assert [r.reward.reward for r in valid] == [p.reward for p in every]
    assert {r.reward.reward for r in valid} == {0.9, 0.6}  # both verdicts occur: the comparison means something


def test_mask_truncated_leaves_cut_responses_out(tmp_path, verdict_model_dir, two_rows):
    """Responses cut at 4 tokens (the model's are ~10): --mask-truncated leaves them out of the update."""
    cfg = ssr.parse_args([str(x) for x in ["--model", verdict_model_dir, "--data", two_rows, "--out-dir",
                                           tmp_path / "run", *VERDICT_RUN, "--max-new-tokens", 4]])
    run = ssr.setup(cfg)
    rollouts = ssr.sample_translations(run, ssr.step_sources(run.rows, 0, cfg, 0, 1), seed=0)
    ssr.judge_translations(run, rollouts, seed=1)
    ssr.assign_rewards(run, rollouts)
    assert {r.completion.finish_reason for r in rollouts} == {"length"}
    assert ssr.update_policy(run, rollouts)["tokens"] == 8 * 4
    cfg.mask_truncated = True
    assert ssr.update_policy(run, rollouts)["tokens"] == 0


def test_smoke_warm_up_examples():
    """What the smoke model is warmed up on: well-formed responses whose answers open a sentence of the data,
    and toy verdicts that parse."""
    rows, _ = ssr.load_data(str(ROOT / "data" / "sample.jsonl"))
    examples = smoke.warm_up_examples(rows, "r1")
    actor = [t for p, t in examples if "Translate the following text" in p]
    verdicts = [t for p, t in examples if "Score the following translation" in p]
    assert len(actor) == len(verdicts) == len(rows)
    sentences = [r["src"] for r in rows]
    for target in actor:
        answer = judge.extract_answer(target)
        assert answer and any(s.startswith(answer) for s in sentences), target
    assert {judge.parse_judgement(t).score for t in verdicts} == {float(smoke.TOY_SCORE)}


def test_custom_reward_rises(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    run_ssr("--model", model_dir, "--data", data_file, "--out-dir", out, "--steps", 12,
            "--prompts-per-step", 4, "--group-size", 8, "--max-new-tokens", 16, "--judge-max-new-tokens", 4,
            "--micro-batch-size", 32, "--lr", 1e-2, "--reward", "judge:letter_share_reward", "--save-every", 100)
    rewards = [m["reward_mean"] for m in metrics(out)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first and last > first + 0.05, rewards


def test_gpu_path_flags_reach_every_sampler_and_the_log_prob_head(tmp_path, model_dir, data_file, monkeypatch):
    """--decode and --logprob-backend, the fallbacks for a GPU where the fast path breaks, reach the actor's and the
    judge's samplers and every log-prob forward of the update: the new, old (--mini-batches 2) and reference
    (--kl-beta) log-probs. (On CPU both values are what auto picks, so the test reads what each call was given.)"""
    import kernels

    decodes, backends = [], []
    real_sampler, real_head = ssr.Sampler, kernels.linear_token_logprobs

    def sampler(*args, **kwargs):
        decodes.append(kwargs.get("decode"))
        return real_sampler(*args, **kwargs)

    def head(*args, **kwargs):
        backends.append(kwargs["backend"] if "backend" in kwargs else args[5])  # it calls itself positionally
        return real_head(*args, **kwargs)

    monkeypatch.setattr(ssr, "Sampler", sampler)
    monkeypatch.setattr(kernels, "linear_token_logprobs", head)  # model.py imports it at each call
    ssr.train(ssr.parse_args(list(map(str, [
        "--model", model_dir, "--judge-model", model_dir, "--data", data_file, "--out-dir", tmp_path / "run", *SMALL,
        "--steps", 1, "--mini-batches", 2, "--kl-beta", 0.1, "--decode", "sdpa", "--logprob-backend", "torch"]))))
    assert decodes == ["sdpa", "sdpa"]  # the actor's sampler and the frozen judge's
    # 2 micro-batches of 8 rows each for the old and the reference log-probs and the update
    assert len(backends) >= 6 and set(backends) == {"torch"}, backends


def test_resume_is_bit_exact(tmp_path, model_dir, data_file):
    # warm-up then cosine: a resume that forgot the LR schedule would show in the weights and the logged lr
    common = ["--model", model_dir, "--data", data_file, *SMALL, "--reward", "judge:letter_share_reward",
              "--save-every", 2, "--warmup-steps", 1, "--lr-schedule", "cosine"]
    run_ssr(*common, "--out-dir", tmp_path / "straight", "--steps", 3)
    run_ssr(*common, "--out-dir", tmp_path / "resumed", "--steps", 3)
    # a crash after step 3 was logged but before it was saved: resume from step_2 redoes step 3
    shutil.rmtree(tmp_path / "resumed" / "step_3")
    proc = run_ssr(*common, "--out-dir", tmp_path / "resumed", "--steps", 3, expect_ok=False)
    assert proc.returncode == 2 and "already holds step_2: pass --resume" in proc.stderr
    run_ssr(*common, "--out-dir", tmp_path / "resumed", "--steps", 3, "--resume")
    a = load_file(tmp_path / "straight" / "step_3" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "step_3" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("sec_") and "per_s" not in k} for m in ms]
    assert strip(metrics(tmp_path / "straight")) == strip(metrics(tmp_path / "resumed"))
    state = torch.load(tmp_path / "resumed" / "step_3" / "trainer.pt", weights_only=True)
    assert state["step"] == 3
    assert not list((tmp_path / "resumed").glob(".step_*"))  # no temp checkpoint left behind


def torchrun(out, model_dir, data_file, mode, *args, port=29400):
    """`torchrun --nproc_per_node 2 ssr.py ...` on gloo; a hang fails the test after its timeout."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), str(ROOT / "ssr.py"), "--model", str(model_dir),
                               "--data", str(data_file), "--out-dir", str(out), "--dist", mode, *map(str, SMALL),
                               "--reward", "judge:letter_share_reward", *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun {mode} did not finish in 300 s (hung collective?): {(e.stderr or b'')[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# A GPU run's precision is not the CPU's (README, "Precision"): --precision bf16 runs it here. The bf16 sampler then
# samples from a slightly different policy than the trainer's, and kl_sampler measures the gap: above what fp32
# rounding gives (so the bf16 copy is really in use) and below what would hurt training.
BF16_KL_SAMPLER = (1e-9, 1e-2)


def assert_bf16_policy(out):
    gaps = [m["kl_sampler"] for m in metrics(out)]
    assert all(BF16_KL_SAMPLER[0] < g < BF16_KL_SAMPLER[1] for g in gaps), gaps
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics(out))


def test_gpu_precision_policy_on_one_process(tmp_path, model_dir, data_file):
    """--dist none as on one GPU: fp32 masters under bf16 autocast, micro-batches of one prompt's group (its
    attention through causal_lower_right, which crashed every single-GPU run at its first update); then fp32, where
    the sampler's copy is the trainer's to the last bit."""
    one_group = ["--micro-batch-size", 4, "--reward", "judge:letter_share_reward", "--steps", 2, "--save-every", 2]
    run_ssr("--model", model_dir, "--data", data_file, "--out-dir", tmp_path / "bf16", *SMALL, *one_group,
            "--precision", "bf16")
    assert_bf16_policy(tmp_path / "bf16")
    run_ssr("--model", model_dir, "--data", data_file, "--out-dir", tmp_path / "fp32", *SMALL, *one_group)
    assert all(m["kl_sampler"] < BF16_KL_SAMPLER[0] for m in metrics(tmp_path / "fp32"))


def test_torchrun_ddp_trains_and_saves(tmp_path, model_dir, data_file):
    """DDP on 2 ranks under a GPU run's precision policy (bf16 autocast; micro-batches of 2 prompts of other
    lengths: the attention's mask path)."""
    out = tmp_path / "ddp"
    torchrun(out, model_dir, data_file, "ddp", "--steps", 2, "--precision", "bf16")
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert_bf16_policy(out)
    trained = load_pretrained(out / "step_2")
    base = load_pretrained(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    assert (out / "step_2" / "tokenizer.json").exists()


def test_torchrun_fsdp_resume_equals_straight_run(tmp_path, model_dir, data_file):
    """FSDP2 on 2 ranks under a GPU run's precision policy (weights gathered in bf16, gradients reduced in fp32):
    2 steps, then --resume for 2 more, gives the very weights of 4 straight steps; each rank's train-state file
    holds only its own shard; --keep-last keeps the newest N."""
    import torch.distributed.checkpoint as dcp

    torchrun(tmp_path / "straight", model_dir, data_file, "fsdp", "--steps", 4, "--save-every", 1, "--keep-last", 2,
             "--precision", "bf16")
    assert_bf16_policy(tmp_path / "straight")
    assert sorted(p.name for p in (tmp_path / "straight").glob("step_*")) == ["step_3", "step_4"]
    torchrun(tmp_path / "resumed", model_dir, data_file, "fsdp", "--steps", 2, "--save-every", 2, "--precision", "bf16",
             port=29401)
    torchrun(tmp_path / "resumed", model_dir, data_file, "fsdp", "--steps", 4, "--save-every", 2, "--resume",
             "--precision", "bf16", port=29402)
    a = load_file(tmp_path / "straight" / "step_4" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "step_4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("sec_") and "per_s" not in k} for m in ms]
    assert strip(metrics(tmp_path / "straight")) == strip(metrics(tmp_path / "resumed"))
    # rank r's file holds chunk r of every sharded weight (FSDP2 shards dim 0), never the whole tensor
    meta = dcp.FileSystemReader(tmp_path / "resumed" / "step_4" / "train_state").read_metadata()
    for name, tensor in a.items():
        fqn = "model." + name.removeprefix("model.")
        chunks = {info.relative_path: index.offset[0] for index, info in meta.storage_data.items()
                  if index.fqn == fqn}
        rows = tensor.shape[0]
        assert chunks == {"__0_0.distcp": 0, "__1_0.distcp": (rows + 1) // 2}, (fqn, chunks)


# ----------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit code 2, no traceback

def test_resume_refuses_an_old_layout_checkpoint(tmp_path, model_dir, data_file):
    """A step_N of the previous layout (one train_state.pt, no trainer.pt): one line saying why and what to do."""
    old = tmp_path / "run" / "step_2"
    shutil.copytree(model_dir, old)
    torch.save({"step": 2}, old / "train_state.pt")
    proc = run_ssr("--model", model_dir, "--data", data_file, "--out-dir", tmp_path / "run", "--resume",
                   expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"ssr: error: {old}: written by an older ssr (one train_state.pt), "
                                                f"which this version cannot resume; start a new run from its "
                                                f"weights with --model {old}"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "train.jsonl:2: not valid JSON"),
    ('{"src": "hi", "src_lang": "en"}', "train.jsonl:2: missing or empty 'tgt_lang'"),
    ('{"src": "hi", "src_lang": "en", "tgt_lang": "xx"}', "train.jsonl:2: unknown language code 'xx'"),
    ('{"src": "hi", "src_lang": "en", "tgt_lang": "en"}', "train.jsonl:2: src_lang and tgt_lang are both 'en'"),
])
def test_bad_data_line(tmp_path, model_dir, line, message):
    data = tmp_path / "train.jsonl"
    data.write_text('{"src": "ok", "src_lang": "en", "tgt_lang": "zh"}\n' + line + "\n")
    proc = run_ssr("--model", model_dir, "--data", data, "--out-dir", tmp_path / "o", expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a model directory"),
    (["--reward", "no_such_module:fn"], "no module named 'no_such_module'"),
    (["--reward", "judge:nope"], "has no function 'nope'"),
    (["--data", "/nonexistent.jsonl"], "--data /nonexistent.jsonl: no such readable file"),
])
def test_bad_model_reward_data_paths(tmp_path, model_dir, args, message):
    base = {"--model": str(model_dir), "--out-dir": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = run_ssr(*[x for kv in base.items() for x in kv], expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_format_credit_grades_malformed_responses():
    """--format-credit: a malformed response earns format_penalty + credit x its share of the four tags held
    once, so a group with no valid response still has a reward spread; well-formed ones are untouched."""
    from types import SimpleNamespace

    from sampler import Completion

    responses = ["<think>a</think> <answer>b</answer>", "<think>a</think> <answer>b", "<think>a", "no tags"]
    for credit, expected in ((0.0, [1.0, -1.0, -1.0, -1.0]), (0.4, [1.0, -0.7, -0.9, -1.0])):
        run = SimpleNamespace(cfg=ssr.Config(model="m", format_credit=credit), comet=None, custom_reward=None)
        rollouts = [ssr.Rollout({"src": "x", "src_lang": "en", "tgt_lang": "fr"}, [1], Completion([2], [0.0], "stop"),
                                text, judge.extract_answer(text), None,
                                judgements=[judge.parse_judgement("<answer>100</answer>")] if judge.extract_answer(text) else [])
                    for text in responses]
        ssr.assign_rewards(run, rollouts)
        assert [r.reward.reward for r in rollouts] == pytest.approx(expected)


def one_real_step(tmp_path, model_dir, data_file, monkeypatch, *flags):
    """One step of the loop (sample, reward, update) on the smoke model, the advantages it trained on captured."""
    cfg = ssr.parse_args(list(map(str, ["--model", model_dir, "--data", data_file, "--out-dir", tmp_path / "run", *SMALL,
                                        "--reward", "judge:letter_share_reward", "--group-size", 8, *flags])))
    run = ssr.setup(cfg)
    rollouts = ssr.sample_translations(run, ssr.step_sources(run.rows, 0, cfg, 0, 1), seed=0)
    ssr.assign_rewards(run, rollouts)
    seen = []
    build = ssr.grpo.build_rollouts
    monkeypatch.setattr(ssr.grpo, "build_rollouts", lambda *a, **k: seen.append(a[2].clone()) or build(*a, **k))
    stats = ssr.update_policy(run, rollouts)
    rewards = torch.tensor([r.reward.reward for r in rollouts]).view(-1, 8)
    return rewards, seen[0].view(-1, 8), stats


def test_adv_std_off_reaches_the_loop(tmp_path, model_dir, data_file, monkeypatch):
    """--adv-std off (Dr.GRPO): a real step trains on r - mean of the group, not divided by its std."""
    rewards, advantages, _ = one_real_step(tmp_path, model_dir, data_file, monkeypatch, "--adv-std", "off")
    assert (rewards.std(-1) > 0.01).any()  # groups with a spread: dividing by their std would show
    torch.testing.assert_close(advantages, (rewards - rewards.mean(-1, keepdim=True)).to(advantages.dtype))


def test_sampling_temperature_reaches_the_trainer(tmp_path, model_dir, data_file, monkeypatch):
    """At T = 0.5 the trainer's log-probs are of softmax(logits / 0.5), the sampler's distribution: with the same fp32
    weights their gap kl_sampler is ~0 (0.0 on CPU); a trainer left at T = 1 is ~0.03 from it. The step is a function
    of its flags alone, whatever ran before it: the precision, decode and log-prob paths are pinned (their auto values
    depend on the host: bf16 copies on a CUDA host would open a gap of their own), setup() refuses a launcher variable
    left in the environment and seeds the global generators, and the data order and the sampler draw from generators
    of their own. Checked after each in-process test of this file and test_run_safety.py, and in random orders."""
    pinned = ["--precision", "fp32", "--decode", "sdpa", "--logprob-backend", "torch"]
    _, _, stats = one_real_step(tmp_path, model_dir, data_file, monkeypatch, "--temperature", 0.5, *pinned)
    assert 0 <= stats["kl_sampler"] < 1e-6, stats["kl_sampler"]


def test_expected_judge_score_in_the_loop(tmp_path, verdict_model_dir, two_rows):
    """--judge-score expected: the judge stops at its <answer>, and every well-formed rollout gets the mean of the
    judge's distribution over 0-100 there (no parse failure); the same as judging each copy on its own."""
    cfg = ssr.parse_args([str(x) for x in ["--model", verdict_model_dir, "--data", two_rows, "--out-dir",
                                           tmp_path / "run", *VERDICT_RUN, "--judge-score", "expected"]])
    run = ssr.setup(cfg)
    rollouts = ssr.sample_translations(run, ssr.step_sources(run.rows, 0, cfg, 0, 1), seed=0)
    ssr.judge_translations(run, rollouts, seed=1)
    ssr.assign_rewards(run, rollouts)
    valid = [r for r in rollouts if r.answer is not None]
    assert valid and all(len(r.judgements) == 1 and r.judgements[0].failure is None for r in valid)
    assert all(r.judge_outputs[0].endswith("<answer>") for r in valid)  # the verdict model writes the tag
    tok, sampler = run.tok, run.judge_sampler
    for r in valid:
        prompt = tok.encode(judge.judge_prompt(r.source["src"], r.answer, r.source["src_lang"], r.source["tgt_lang"]))
        task = judge.JudgeTask("", [[0]], group=False)
        alone = judge.expected_verdicts(sampler.score, tok, [prompt], [r.judge_outputs[0]], [task],
                                        sampler.max_seq_len)[0][0]
        assert r.judgements[0].score == pytest.approx(alone.score, abs=1e-4)
        assert r.reward.reward == pytest.approx(r.judgements[0].score / 100)


# ----------------------------------------------------------------------------------------------------
# guarding the self-reward: answer checks, the lagging judge, the collapse stop

def saved_state(step_dir, key: str) -> dict:
    """One part ("model", "judge", ...) of a checkpoint's train_state, read back from DCP as plain fp32 tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = step_dir.parent / f"{step_dir.name}.pt"
    if not flat.exists():
        dcp_to_torch_save(step_dir / "train_state", flat)
    return torch.load(flat, weights_only=True)[key]


def test_lagging_judge_reads_the_policy_of_its_last_refresh(tmp_path, model_dir, data_file):
    """--judge-refresh 2: the judge's weights after step t are the policy's at the start of the last step whose index
    is a multiple of 2 (steps 1-2: the initial weights; 3-4: after step 2; 5: after step 4); --judge-refresh 0 keeps
    the initial weights, --judge-ema B moves them by B * judge + (1 - B) * policy after every update."""
    initial = {name: p.detach() for name, p in load_pretrained(model_dir).named_parameters()}
    common = ["--model", model_dir, "--data", data_file, *SMALL, "--reward", "judge:letter_share_reward",
              "--save-every", 1, "--keep-last", 0]  # a reward this untrained model's samples differ in: it learns
    run_ssr(*common, "--out-dir", tmp_path / "k2", "--steps", 5, "--judge-refresh", 2)
    policy = {0: initial} | {t: saved_state(tmp_path / "k2" / f"step_{t}", "model") for t in range(1, 6)}
    for t in range(1, 6):
        judge_weights = saved_state(tmp_path / "k2" / f"step_{t}", "judge")
        refreshed = 2 * ((t - 1) // 2)
        assert judge_weights.keys() == initial.keys()
        assert all(torch.equal(judge_weights[k], policy[refreshed][k]) for k in initial), (t, refreshed)
    assert not all(torch.equal(policy[4][k], initial[k]) for k in initial)  # the policy did move

    run_ssr(*common, "--out-dir", tmp_path / "k0", "--steps", 2, "--judge-refresh", 0)
    assert all(torch.equal(saved_state(tmp_path / "k0" / "step_2", "judge")[k], initial[k]) for k in initial)

    run_ssr(*common, "--out-dir", tmp_path / "ema", "--steps", 2, "--judge-ema", 0.75)
    expected = dict(initial)
    for t in (1, 2):
        moved = saved_state(tmp_path / "ema" / f"step_{t}", "model")
        expected = {k: 0.75 * expected[k] + 0.25 * moved[k] for k in initial}
        got = saved_state(tmp_path / "ema" / f"step_{t}", "judge")
        for k in initial:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)


def test_resume_with_a_lagging_judge_is_bit_exact(tmp_path, model_dir, data_file):
    """--judge-refresh 3 over 4 steps, straight and as 2 + --resume 2 (the refresh at step index 3 falls in the
    resumed half): the same weights, judge weights and metrics."""
    common = ["--model", model_dir, "--data", data_file, *SMALL, "--judge-refresh", 3, "--save-every", 2]
    run_ssr(*common, "--out-dir", tmp_path / "straight", "--steps", 4)
    run_ssr(*common, "--out-dir", tmp_path / "resumed", "--steps", 2)
    run_ssr(*common, "--out-dir", tmp_path / "resumed", "--steps", 4, "--resume")
    for key in ("model", "judge"):
        a, b = (saved_state(tmp_path / run / "step_4", key) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("sec_") and "per_s" not in k} for m in ms]
    assert strip(metrics(tmp_path / "straight")) == strip(metrics(tmp_path / "resumed"))


def test_a_run_without_learning_signal_saves_and_stops(tmp_path, model_dir, data_file):
    """A constant reward: every group ties, zero_spread_groups is 1.0 every step. --stop-on-collapse 3 saves step_3 and
    stops with one line naming the metric, its recent values and the step, exit status 1; 0 runs on."""
    (tmp_path / "constant_reward.py").write_text("def reward(samples):\n    return [0.5] * len(samples)\n")
    env_args = ["--model", model_dir, "--data", data_file, *SMALL, "--reward", "constant_reward:reward",
                "--save-every", 100]
    proc = subprocess.run([sys.executable, str(ROOT / "ssr.py"), *map(str, env_args), "--out-dir", tmp_path / "dead",
                           "--steps", "10", "--stop-on-collapse", "3"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=os.environ | {"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ssr: error: step 3: no learning signal for 3 steps (zero_spread_groups >= 0.95"), last
    assert "1.00, 1.00, 1.00" in last and "step_3" in last and "Traceback" not in proc.stderr
    assert [m["step"] for m in metrics(tmp_path / "dead")] == [1, 2, 3]
    assert (tmp_path / "dead" / "step_3" / "trainer.pt").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "ssr.py"), *map(str, env_args), "--out-dir", tmp_path / "on",
                           "--steps", "4", "--stop-on-collapse", "0"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=os.environ | {"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0 and [m["step"] for m in metrics(tmp_path / "on")] == [1, 2, 3, 4]


def test_answer_checks_in_the_loop(tmp_path, verdict_model_dir, two_rows):
    """The verdict model answers "90" or "80" (conftest.VERDICTS). Under --answer-checks copy,length such an answer to
    "今天很冷。" (zh->en: 5 characters x 3.575, at least 6 expected) is too short: never judged, the format penalty,
    counted in answer_check_fail_length; to "The cat sleeps." (en->zh: 15 x 0.28, 1.4 to 12.6 characters) it passes
    and is judged as usual."""
    out = tmp_path / "run"
    run_ssr("--model", verdict_model_dir, "--data", two_rows, "--out-dir", out, *VERDICT_RUN,
            "--answer-checks", "copy,length")
    m = metrics(out)[0]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    well_formed = [r for r in rows if judge.extract_answer(r["response"]) is not None]
    too_short = [r for r in well_formed if r["src_lang"] == "zh"]
    assert too_short and len(too_short) < len(well_formed)
    for r in well_formed:
        fails = r["src_lang"] == "zh"
        assert r["failed_check"] == ("length" if fails else None) and (r["answer"] is None) == fails
        assert (r["judge_outputs"] == []) == fails and (r["reward"] == -1.0) == fails
    assert m["answer_check_fail_length"] == len(too_short) / len(rows) and m["answer_check_fail_copy"] == 0.0

