"""plan.py: the memory plan's rows against numbers worked out by hand for Qwen2.5-7B, and `ssr.py --plan`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import plan
import ssr
from checkpoint import read_config
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

# Qwen2.5-7B's config.json, the keys that matter (the published model card says 7.61B parameters)
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
             "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16", "use_sliding_window": False, "max_position_embeddings": 131072}


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory):
    """A model directory holding config.json and nothing else: all --plan may read."""
    path = tmp_path_factory.mktemp("qwen25_7b")
    (path / "config.json").write_text(json.dumps(QWEN25_7B))
    return path


def rows(p: plan.Plan) -> dict:
    return {what.split(" (")[0].split(":")[0]: n for what, n, _ in p.rows}


def test_7b_rows_by_hand(config_only_dir):
    cfg = ssr.parse_args(["--preset", "ssr-zero-7b", "--model", str(config_only_dir)])
    model = ModelConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    P = 7_615_616_512  # Qwen2.5-7B's parameter count
    # per layer: q 3584x3584 + k, v 3584x512 each + o 3584x3584 + qkv biases 3584+2x512 + MLP 3x3584x18944
    # + two norms; root: embedding and untied head 152064x3584 each + the final norm
    layer = 3584 * 3584 * 2 + 2 * 3584 * 512 + 3584 + 2 * 512 + 3 * 3584 * 18944 + 2 * 3584
    root = 2 * 152064 * 3584 + 3584
    assert plan.param_counts(model) == (layer, root) and 28 * layer + root == P
    assert plan.kv_bytes_per_token(model, 2) == 56 * 1024  # 2 (K, V) x 28 layers x 4 heads x 128 x 2 bytes

    p = plan.memory_plan(cfg, model, world=8, mode="fsdp", on_gpu=True, device_bytes=80 * GIB)
    r = rows(p)
    assert r["sampler weights"] == P * 2  # bf16: 14.19 GiB
    # 64 prompts x 8 rollouts / 8 ranks = 64 live sequences; 256 + 1024 + 1024 + 128 positions each
    assert r["KV cache"] == 64 * 2432 * 56 * 1024  # 8.31 GiB, not the 33 GiB of 256 slots
    assert r["trainer"] == 16 * P / 8  # 14.19 GiB: fp32 weights, grads and two AdamW moments, sharded
    assert r["FSDP2 gathered params"] == (root + 2 * layer) * 2
    assert r["AdamW step temporary"] == 4 * P / 8
    # checkpointed activations: micro-batch 4 x 1280 tokens, each layer's bf16 input, plus one layer recomputed
    per_token = 2 * 3584 * (2 * 2 + 8) + (3584 + 2 * 512) * 2 * 4 + 3584 * 2 * 2 + 4 * 18944 * 2
    assert r["activations"] == 28 * 5120 * 3584 * 2 + 5120 * per_token
    # the decode graphs' pool, one step of 64 rows: per row q, k, v, rotated copies (4 x (3584 + 2 x 512)), the MLP
    # (4 x 18944) and hidden-wide tensors (8 x 3584) in bf16, bf16 logits (152064 x 2), fp32 split partials
    assert r["decode graphs' memory pool"] == 64 * ((4 * 18944 + 8 * 3584 + 4 * 4608) * 2 + 152064 * 2 + 4 * 3584 * 4)
    assert r["CUDA context + NCCL buffers"] == GIB + GIB // 2  # one context, one communicator (documented estimates)
    # prefill: 16384 tokens through one layer, 3 MLP-wide and 4 hidden-wide bf16 tensors a token, no P x P scores
    assert r["prefill activations"] == 16384 * (3 * 18944 + 4 * 3584) * 2
    resident = (P * 2 + 64 * 2432 * 56 * 1024 + 16 * P / 8 + r["decode graphs' logits buffers"]
                + r["decode graphs' memory pool"] + r["CUDA context + NCCL buffers"])
    update = sum(n for _, n, phase in p.rows if phase == "update")
    assert p.peak == resident + max(update, 4 * P / 8, sum(n for _, n, ph in p.rows if ph == "sample"))
    assert 40 * GIB < p.peak < 60 * GIB and p.fits()


def test_options_add_their_rows(config_only_dir):
    model = ModelConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    base = ssr.parse_args(["--preset", "ssr-zero-7b", "--model", str(config_only_dir)])
    plain = plan.memory_plan(base, model, 8, "fsdp", True, 80 * GIB)
    kl = plan.memory_plan(ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "m", "--kl-beta", "0.01"]),
                          model, 8, "fsdp", True, 80 * GIB)
    assert rows(kl)["reference model"] == 7_615_616_512 * 2 / 8  # sharded like the policy
    x = plan.memory_plan(ssr.parse_args(["--preset", "ssr-x-zero-7b", "--model", "m"]), model, 8, "fsdp", True,
                         80 * GIB, comet_bytes=3 * GIB)
    assert rows(x)["COMET model"] == 3 * GIB and x.peak == plain.peak + 3 * GIB
    judged = plan.memory_plan(ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "m", "--judge-model", "j"]),
                              model, 8, "fsdp", True, 80 * GIB, judge_model=model)
    assert judged.peak == pytest.approx(plain.peak + rows(plain)["sampler weights"] + rows(plain)["KV cache"])
    one_gpu = plan.memory_plan(base, model, 1, "none", True, 80 * GIB)
    assert rows(one_gpu)["CUDA context + NCCL buffers"] == GIB  # no communicator on one rank
    assert "CUDA context + NCCL buffers" not in rows(plan.memory_plan(base, model, 1, "none", False, 80 * GIB))
    no_ckpt = plan.memory_plan(ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "m", "--no-grad-checkpointing"]),
                               model, 8, "fsdp", True, 80 * GIB)
    assert rows(no_ckpt)["activations"] > 10 * rows(plain)["activations"]


def run_plan(*args):
    return subprocess.run([sys.executable, str(ROOT / "ssr.py"), "--plan", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("preset", ["ssr-zero-7b", "ssr-x-zero-7b"])
def test_cli_plan_7b_on_8_gpus_fits(config_only_dir, preset):
    proc = run_plan("--preset", preset, "--model", config_only_dir, "--plan-world", 8, "--gpu-gib", 80)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("plan: peak ") and last.endswith(" GiB per GPU of 80 GiB: fits"), last
    assert "KV cache (64 slots x 2432 positions)" in proc.stdout


def test_cli_plan_7b_on_one_gpu_does_not_fit(config_only_dir):
    proc = run_plan("--preset", "ssr-zero-7b", "--model", config_only_dir, "--plan-world", 1, "--gpu-gib", 80)
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith("GiB per GPU of 80 GiB: does not fit")
    assert "--dist fsdp" in lines[-2]  # names what to change: the trainer state is the biggest row


def test_advice_is_true_for_the_flags_in_force():
    """Activations the largest row: with --grad-checkpointing already on, the advice is the micro-batch only."""
    model = ModelConfig(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    for flag, advice in (("--grad-checkpointing", "lower --micro-batch-size"),
                         ("--no-grad-checkpointing", "lower --micro-batch-size or turn on --grad-checkpointing")):
        cfg = ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "m", "--micro-batch-size", "256", flag])
        p = plan.memory_plan(cfg, model, 8, "fsdp", True, 80 * GIB)
        assert max(p.rows, key=lambda r: r[1])[0].startswith("activations") and not p.fits()
        assert p.advice() == advice


QWEN25_7B_MODEL = dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128)


@pytest.mark.parametrize("flags, slots", [
    ([], 64),  # 64 prompts x 8 rollouts / 8 ranks: 64 live sequences
    (["--judge-samples", "2"], 128),  # every rollout judged twice at once
    (["--judge-samples", "8"], 256),  # 512 judge sequences, capped by --sampler-batch-size 256
    (["--judge-samples", "4", "--judge-mode", "group"], 64),  # 8 group prompts x 4 = 32: the rollouts are more
    (["--judge-samples", "16", "--judge-mode", "group"], 128),  # 8 group prompts x 16 judgements
])
def test_sampler_slots_by_hand(flags, slots):
    """The cache is sized for what a rank can have live: its rollouts, or its judge prompts times the judge
    samples (one prompt per group in group mode); the KV row follows: slots x 2432 positions x 56 KiB."""
    cfg = ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "m", *flags])
    assert plan.sampler_slots(cfg, world=8) == slots
    p = plan.memory_plan(cfg, ModelConfig(**QWEN25_7B_MODEL), 8, "fsdp", True, 80 * GIB)
    assert rows(p)["KV cache"] == slots * 2432 * 56 * 1024


def test_fsdp2_gradient_row_by_hand():
    """FSDP2's unsharded gradients during backward: the root's and one layer's, in bf16, plus on GPU the fp32
    copy that the reduce-scatter (reduce_dtype fp32) takes as input: 2 + 4 bytes a parameter. On CPU the
    training dtype is fp32 and there is no separate reduce copy: 4 bytes."""
    model = ModelConfig(**QWEN25_7B_MODEL)
    layer = 3584 * 3584 * 2 + 2 * 3584 * 512 + 3584 + 2 * 512 + 3 * 3584 * 18944 + 2 * 3584
    root = 2 * 152064 * 3584 + 3584
    cfg = ssr.parse_args(["--preset", "ssr-zero-7b", "--model", "m"])
    gpu = rows(plan.memory_plan(cfg, model, 8, "fsdp", True, 80 * GIB))
    assert gpu["FSDP2 unsharded grads"] == (root + layer) * (2 + 4)  # 2.99 GiB
    assert gpu["FSDP2 gathered params"] == (root + 2 * layer) * 2
    cpu = rows(plan.memory_plan(cfg, model, 8, "fsdp", False, 80 * GIB))
    assert cpu["FSDP2 unsharded grads"] == (root + layer) * 4
    assert "FSDP2 unsharded grads" not in rows(plan.memory_plan(cfg, model, 8, "ddp", True, 80 * GIB))


def test_a_lagging_judge_is_a_row_of_the_plan(config_only_dir):
    """--judge-refresh / --judge-ema: an fp32 snapshot of the policy, sharded like the trainer's masters: 4 bytes a
    parameter / 8 ranks, resident; the 7B preset still fits 80 GB."""
    P = 7_615_616_512
    base = ssr.parse_args(["--preset", "ssr-zero-7b", "--model", str(config_only_dir)])
    plain = plan.memory_plan(base, read_config(config_only_dir), 8, "fsdp", True, 80 * plan.GIB)
    for flags in (["--judge-refresh", "10"], ["--judge-refresh", "0"], ["--judge-ema", "0.9"]):
        lagging = plan.memory_plan(ssr.parse_args(["--preset", "ssr-zero-7b", "--model", str(config_only_dir),
                                                   *flags]), read_config(config_only_dir), 8, "fsdp", True,
                                   80 * plan.GIB)
        rows = {what: n for what, n, phase in lagging.rows if phase == "resident"}
        assert rows["lagging judge: fp32 policy snapshot (/ 8)"] == 4 * P / 8
        assert lagging.peak == plain.peak + 4 * P / 8 and lagging.fits()
    assert not any(what.startswith("lagging") for what, _, _ in plain.rows)
