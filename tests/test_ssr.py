"""The training loop end to end on tiny models: learning, the judge and COMET paths, checkpoints, resume,
torchrun DDP/FSDP on gloo, and one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import judge
import ssr
from checkpoint import load_tokenizer
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent
FIXED_RESPONSE = "<think>ok</think> <answer>90</answer>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"src": s, "src_lang": "en", "tgt_lang": "zh"} for s in
            ["The cat sleeps.", "It is raining today.", "We love music.", "Open the door, please."]]
    rows += [{"src": s, "src_lang": "zh", "tgt_lang": "en"} for s in ["今天很冷。", "我喜欢读书。", "他在跑步。", "请坐。"]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The smoke run's tiny model: its BPE tokenizer makes prompts short, so the loop runs fast on CPU."""
    return ssr.make_smoke_model(tmp_path_factory.mktemp("smoke_model"), str(ROOT / "data" / "sample.jsonl"))


@pytest.fixture(scope="module")
def parrot_model_dir(tmp_path_factory, model_dir, data_file):
    """The tiny model fine-tuned to answer every prompt with FIXED_RESPONSE then EOS. As an actor its
    translations are well formed (answer "90"); as a judge its verdict parses as 90: the judge and COMET
    paths of the loop run for real, with outputs we can predict."""
    model = Transformer.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    rows = ssr.load_data(str(data_file))
    prompts = [judge.actor_prompt(r["src"], r["src_lang"], r["tgt_lang"]) for r in rows]
    prompts += [judge.judge_prompt(r["src"], "90", r["src_lang"], r["tgt_lang"]) for r in rows]
    target = tok.encode(FIXED_RESPONSE) + [tok.eos_ids[0]]
    seqs = [tok.encode(p) + target for p in prompts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, len(s) - len(target) - 1:len(s) - 1] = True  # positions whose next token is the response
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    targets = ids[:, 1:][mask[:, :-1]]
    for _ in range(300):
        hidden = model(ids, return_hidden=True)[:, :-1][mask[:, :-1]]  # only the response positions
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), targets)
        if loss.item() < 5e-3:  # per-token probability ~0.995: the whole response, every time, at T=0.5
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 5e-3, loss.item()
    out = tmp_path_factory.mktemp("parrot")
    model.save_pretrained(out, tokenizer_dir=model_dir)
    return out


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


def test_help_shows_every_flag_with_defaults():
    proc = run_ssr("--help")
    for flag in ("--model", "--data", "--out-dir", "--steps", "--save-every", "--resume", "--reward",
                 "--judge-model", "--dist", "--preset", "--group-size", "--prompts-per-step", "--micro-batch-size",
                 "--max-new-tokens", "--temperature", "--top-p", "--kl-beta", "--clip-low", "--clip-high",
                 "--loss-agg", "--adv-std", "--lr", "--w-comet", "--judge-samples"):
        assert flag in proc.stdout, flag
    assert "(default: 8)" in proc.stdout  # group size


def test_presets_and_cli_override():
    cfg = ssr.parse_args(["--preset", "ssr-x-zero-7b", "--model", "m", "--lr", "2e-6"])
    assert (cfg.w_self, cfg.w_comet, cfg.dist, cfg.lr) == (0.5, 0.5, "fsdp", 2e-6)
    assert ssr.parse_args([]).preset == "smoke"  # no model: the smoke run
    assert ssr.parse_args(["--model", "m"]).lr == 1e-6  # a real model gets the documented defaults


def test_self_judge_and_comet_rewards_in_the_loop(tmp_path, parrot_model_dir, data_file, tiny_comet_dir):
    """SSR-X on the parrot: every rollout is well formed, the same weights judge it 90, COMET scores it."""
    out = tmp_path / "run"
    run_ssr("--model", parrot_model_dir, "--data", data_file, "--out-dir", out, "--steps", 1, *SMALL,
            "--w-self", 0.5, "--w-comet", 0.5, "--comet-model", tiny_comet_dir, "--temperature", 0.5,
            "--max-new-tokens", 32, "--judge-max-new-tokens", 32)
    (m,) = metrics(out)
    assert m["format_valid_rate"] == 1.0 and m["judge_parse_failure_rate"] == 0.0
    assert m["self_score_mean"] == 90.0
    assert 0.0 < m["comet_mean"] < 1.0
    assert m["reward_mean"] == pytest.approx(0.5 * 0.9 + 0.5 * m["comet_mean"], abs=1e-6)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["answer"] == "90" and samples[0]["judge_outputs"] == [FIXED_RESPONSE]
    for key in ("zero_spread_groups", "entropy", "clip_frac", "grad_norm", "lr", "sec_sample", "sec_judge",
                "sec_update", "rollout_tokens_per_s", "response_len_mean", "kl_old"):
        assert m[key] is not None, key


def test_frozen_external_judge(tmp_path, model_dir, parrot_model_dir, data_file):
    """--judge-model loads a second, frozen model into its own sampler and judges with it: end to end, its
    verdict (90) comes back as the reward. (The actor is the parrot too: a random actor is never well formed.)"""
    out = tmp_path / "run"
    run_ssr("--model", parrot_model_dir, "--judge-model", parrot_model_dir, "--data", data_file, "--out-dir", out,
            "--steps", 1, *SMALL, "--temperature", 0.5, "--max-new-tokens", 32, "--judge-max-new-tokens", 32)
    (m,) = metrics(out)
    assert m["self_score_mean"] == 90.0 and m["reward_mean"] == pytest.approx(0.9)


def test_custom_reward_rises(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    run_ssr("--model", model_dir, "--data", data_file, "--out-dir", out, "--steps", 12,
            "--prompts-per-step", 4, "--group-size", 8, "--max-new-tokens", 16, "--judge-max-new-tokens", 4,
            "--micro-batch-size", 32, "--lr", 1e-2, "--reward", "judge:letter_share_reward", "--save-every", 100)
    rewards = [m["reward_mean"] for m in metrics(out)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first and last > first + 0.05, rewards


def test_resume_is_bit_exact(tmp_path, model_dir, data_file):
    # warm-up then cosine: a resume that forgot the LR schedule would show in the weights and the logged lr
    common = ["--model", model_dir, "--data", data_file, *SMALL, "--reward", "judge:letter_share_reward",
              "--save-every", 2, "--warmup-steps", 2, "--lr-schedule", "cosine"]
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


def test_torchrun_ddp_trains_and_saves(tmp_path, model_dir, data_file):
    out = tmp_path / "ddp"
    torchrun(out, model_dir, data_file, "ddp", "--steps", 2)
    assert [m["step"] for m in metrics(out)] == [1, 2]
    trained = Transformer.from_pretrained(out / "step_2")
    base = Transformer.from_pretrained(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    assert (out / "step_2" / "tokenizer.json").exists()


def test_torchrun_fsdp_resume_equals_straight_run(tmp_path, model_dir, data_file):
    """FSDP2 on 2 ranks: 2 steps, then --resume for 2 more, gives the very weights of 4 straight steps; each
    rank's train-state file holds only its own shard; --keep-last keeps the newest N."""
    import torch.distributed.checkpoint as dcp

    torchrun(tmp_path / "straight", model_dir, data_file, "fsdp", "--steps", 4, "--save-every", 1, "--keep-last", 2)
    assert sorted(p.name for p in (tmp_path / "straight").glob("step_*")) == ["step_3", "step_4"]
    torchrun(tmp_path / "resumed", model_dir, data_file, "fsdp", "--steps", 2, "--save-every", 2, port=29401)
    torchrun(tmp_path / "resumed", model_dir, data_file, "fsdp", "--steps", 4, "--save-every", 2, "--resume",
             port=29402)
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
                                text, judge.extract_answer(text),
                                judge_outputs=["<answer>100</answer>"] if judge.extract_answer(text) else [])
                    for text in responses]
        ssr.assign_rewards(run, rollouts)
        assert [r.reward.reward for r in rollouts] == pytest.approx(expected)
