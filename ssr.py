"""SSR-Zero: self-rewarding GRPO for machine translation. The config, its CLI, the data, the training loop.

Each step, for a batch of monolingual source sentences:
  1. sample   the current policy (actor) translates every source `group_size` times;
  2. judge    the *same current weights* score each well-formed translation 0-100, no reference;
  3. reward   format penalty, or w_self * score/100 (+ w_comet * CometKiwi for SSR-X, + w_ref * chrF/BLEU against a
              reference: the positive control), or a custom fn;
  4. update   group-relative advantages and a clipped policy-gradient step (grpo.py);
  5. sync     copy the new weights into the sampler's copy; then log, and checkpoint.

    python ssr.py                                           # CPU smoke run on a tiny model (smoke.py)
    torchrun --nproc 8 ssr.py --preset ssr-zero-7b --model /ckpt/Qwen2.5-7B --data train.jsonl

Where the rest lives: the network in model.py, checkpoints on disk in checkpoint.py, torchrun/FSDP2/weight
sync/resume in distributed.py, generation in sampler.py, prompts and rewards in judge.py, the update in grpo.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
import judge
import rundir
from checkpoint import (CheckpointError, hf_name, load_comet, load_pretrained, load_tokenizer, read_config, read_json,
                        tokenizer_difference)
from distributed import (LaunchError, init_distributed, launch_environment, load_frozen_model, load_train_state,
                         load_trainer_model, local_device, newest_checkpoint, policy_snapshot, read_trainer_state,
                         refresh_snapshot, sampler_copy, save_checkpoint, sync_sampler, unwrap)
from data import DataError, bleu_tokenizer, check_direction, parse_jsonl, read_bytes
from kernels import LOGPROB_BACKENDS
from model import Transformer
from plan import GIB, cache_positions, comet_checkpoint_bytes, device_memory_bytes, memory_plan, sampler_slots
from sampler import DECODE_MODES, Completion, Sampler, compile_report
from smoke import make_smoke_model, warm_up


def arg(default, help: str, choices=None):
    """A config field that is also a CLI flag: its default, --help text and allowed values in one place."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- model and data
    model: str = arg("", "HF checkpoint directory of the base model (empty: the smoke run's tiny model)")
    data: str = arg("data/sample.jsonl", "jsonl of monolingual sources: {src, src_lang, tgt_lang} per line")
    out_dir: str = arg("out/ssr", "where checkpoints, metrics.jsonl and samples.jsonl go")
    preset: str = arg("", "start from a named recipe; flags given on the command line override it",
                      choices=["", "ssr-zero-7b", "ssr-x-zero-7b", "smoke"])
    template: str = arg("r1", "actor/judge prompt template (ssr: the released SSR checkpoints' card, byte for byte)",
                        choices=list(judge.TEMPLATES))
    think_prefill: bool = arg(False, "end the actor and judge prompts with '<think>' so every response starts "
                                     "inside the thinking block (R1-Zero reproductions do this; see RESULTS.md)")
    # --- reward
    reward: str = arg("", "custom reward 'module:function' replacing the whole reward (judge still logged)")
    judge_model: str = arg("", "judge with this frozen model instead of the current policy (ablation)")
    w_self: float = arg(1.0, "weight of the self-judge score (score/100); 0 skips judging")
    w_comet: float = arg(0.0, "weight of the COMET QE score (SSR-X: 0.5 with w_self 0.5)")
    comet_model: str = arg("Unbabel/wmt22-cometkiwi-da", "COMET QE checkpoint name or local path (SSR-X)")
    w_ref: float = arg(0.0, "weight of a reference metric (metric/100; needs a 'ref' on every data row): the "
                            "MT-R1-Zero-style reward, the positive control of RESULTS.md")
    ref_metric: str = arg("chrf", "sentence-level sacrebleu metric of --w-ref", choices=["chrf", "bleu"])
    format_penalty: float = arg(-1.0, "reward of a response that is not <think>..</think> <answer>..</answer>")
    format_credit: float = arg(0.0, "graded format reward: a malformed response gets format_penalty + format_credit"
                                    " x the share of the four tags it holds exactly once (0: off; RESULTS.md)")
    judge_samples: int = arg(1, "judgements averaged per translation (1 = one greedy judgement)")
    judge_temperature: float = arg(1.0, "sampling temperature of the judge when judge_samples > 1")
    judge_max_new_tokens: int = arg(512, "token budget of one judgement")
    judge_mode: str = arg("pointwise", "one translation per judgement (the paper), or a GRPO group's distinct "
                          "translations scored together", choices=["pointwise", "group"])
    judge_score: str = arg("text", "text: the number parsed from the judge's <answer>; expected: the mean of its "
                           "probabilities over the integers 0-100 right after <answer> (judging stops at <answer>, "
                           "appended if the judge wrote none): no parse failures, almost no ties",
                           choices=list(judge.JUDGE_SCORES))
    answer_checks: str = arg("", "comma-separated checks of each answer before judging, from copy, placeholder, lang, "
                             "length, script (judge.check_answer): an answer failing one is never judged and counts as "
                             "a format failure (the paper has none; RESULTS.md section 6)")
    check_script: bool = arg(False, "the 'script' answer check: an answer not in the target language's script is a "
                                    "format failure (same as adding script to --answer-checks)")
    judge_refresh: int = arg(1, "the self-judge reads a snapshot of the policy taken every K steps: 1 = the current "
                                "weights (the paper), 0 = the initial weights, frozen")
    judge_ema: float = arg(0.0, "instead of --judge-refresh: a momentum copy of the policy judges, updated after every "
                                "step as B * judge + (1 - B) * policy (0: off)")
    # --- rollouts
    prompts_per_step: int = arg(64, "source sentences per step, across all ranks")
    group_size: int = arg(8, "translations sampled per source (the GRPO group)")
    max_prompt_tokens: int = arg(256, "longest actor prompt; longer data lines are an error")
    max_new_tokens: int = arg(512, "token budget of one translation (thinking included)")
    temperature: float = arg(1.0, "actor sampling temperature")
    top_p: float = arg(1.0, "actor nucleus sampling")
    sampler_batch_size: int = arg(256, "KV-cache slots of the sampler (concurrent sequences per rank)")
    # --- GRPO
    lr: float = arg(1e-6, "peak AdamW learning rate")
    lr_schedule: str = arg("constant", "after warm-up", choices=["constant", "cosine"])
    warmup_steps: int = arg(0, "linear learning-rate warm-up steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    clip_low: float = arg(0.2, "PPO ratio clip below: 1 - clip_low")
    clip_high: float = arg(0.2, "PPO ratio clip above: 1 + clip_high (raise for DAPO's clip-higher)")
    kl_beta: float = arg(0.0, "weight of the k3 KL to the frozen initial model (0: no reference model)")
    loss_agg: str = arg("token-mean", "loss aggregation",
                        choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    adv_std: str = arg("on", "divide advantages by the group std (off: Dr.GRPO's r - mean)", choices=["on", "off"])
    tis_cap: float = arg(0.0, "truncated importance weights min(pi_old / pi_sampler, C) on the token loss (0: off)")
    mask_truncated: bool = arg(False, "leave responses cut by --max-new-tokens out of the loss")
    mini_batches: int = arg(1, "optimizer steps per rollout batch")
    micro_batch_size: int = arg(8, "sequences per forward/backward (gradient accumulation below that)")
    # --- run
    steps: int = arg(200, "training steps")
    save_every: int = arg(50, "checkpoint every N steps (and at the end)")
    resume: bool = arg(False, "continue from the newest OUT/step_N (its saved flags must match, see --resume-override)")
    resume_override: str = arg("", "with --resume: comma-separated flags you change on purpose (e.g. lr,data); "
                               "other changes to what the run means are refused")
    seed: int = arg(0, "seed of data order, sampling and the tiny model")
    dist: str = arg("auto", "data parallelism under torchrun (auto: ddp if several ranks; fsdp also on one process)",
                    choices=["auto", "none", "ddp", "fsdp"])
    grad_checkpointing: bool = arg(True, "recompute each layer in backward (activation checkpointing)")
    log_samples: int = arg(4, "full rollouts per step written to samples.jsonl")
    wandb: str = arg("", "log to this Weights & Biases project (needs wandb installed)")
    keep_last: int = arg(3, "keep only the newest N step_* checkpoints (0: keep all)")
    dist_timeout: float = arg(60.0, "minutes a rank waits for the others in a collective (a save, a long judge "
                              "batch) before the job fails")
    stop_on_collapse: int = arg(20, "save and stop (exit 1) after N consecutive steps with no learning signal: "
                                    "zero_spread_groups or judge_parse_failure_rate >= 0.95 (0: never)")
    # --- GPU paths: the defaults are the fast path; the others are fallbacks for a GPU where it breaks (README)
    decode: str = arg("auto", "how the sampler runs a decode step: compiled (torch.compile + CUDA graphs + the "
                      "Triton decode kernel), kernel (eager + the kernel), sdpa (eager PyTorch); auto: compiled on "
                      "CUDA, sdpa on CPU", choices=list(DECODE_MODES))
    logprob_backend: str = arg("auto", "who computes the trainer's log-probs in the fused head: triton, or torch "
                               "(chunked, no Triton); auto: triton on CUDA, torch on CPU",
                               choices=list(LOGPROB_BACKENDS))
    precision: str = arg("auto", "bf16: the sampler, judge and reference hold bf16 copies and the update computes in "
                         "bf16 on fp32 master weights (autocast for --dist none/ddp, FSDP2's param dtype for fsdp); "
                         "fp32: everything fp32; auto: bf16 on CUDA, fp32 on CPU (bf16 on CPU runs a GPU run's "
                         "precision policy: the CPU twin of tests and gpu_checks.sh --cpu)",
                         choices=["auto", "bf16", "fp32"])
    # --- memory plan
    plan: bool = arg(False, "print the memory plan (needs only the model's config.json) and exit: 0 fits, 2 not")
    plan_world: int = arg(0, "plan for this many ranks (0: this job's world size)")
    gpu_gib: float = arg(0.0, "plan for GPUs of this many GiB (0: this device's memory; on a CPU machine the plan "
                         "is then for a CPU run in host memory)")


PRESETS = {
    # Our recipe for Qwen2.5-7B base on 8 GPUs. The paper's exact hyper-parameters are not public: these
    # are the method's documented defaults (README) with batch sizes that fit 8 x 80 GB under FSDP2.
    # template ssr: the released SSR checkpoints' card is the only evidence of the prompt they were trained on.
    "ssr-zero-7b": dict(template="ssr", dist="fsdp", prompts_per_step=64, group_size=8, max_new_tokens=1024,
                        judge_max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=400, save_every=50,
                        micro_batch_size=4, sampler_batch_size=256, out_dir="out/ssr-zero-7b"),
    # SSR-X: the self-judge score and a CometKiwi QE score, half and half
    "ssr-x-zero-7b": dict(template="ssr", dist="fsdp", prompts_per_step=64, group_size=8, max_new_tokens=1024,
                          judge_max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=400, save_every=50,
                          micro_batch_size=4, sampler_batch_size=256, w_self=0.5, w_comet=0.5,
                          out_dir="out/ssr-x-zero-7b"),
    # `python ssr.py` with no arguments: the warmed-up tiny model (smoke.py), CPU, the self-judge reward
    "smoke": dict(prompts_per_step=8, group_size=8, max_new_tokens=24, judge_max_new_tokens=16, lr=3e-4,
                  steps=20, save_every=10, micro_batch_size=32, sampler_batch_size=64, grad_checkpointing=False,
                  out_dir="out/smoke"),
}


class ConfigError(ValueError):
    """Flags that cannot work together (said before any model is loaded)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line `ssr: error: ...` and exit status 2 from main, not a usage block
        raise ConfigError(message)


FLAG_GROUPS = {"model": "model and data", "reward": "reward", "prompts_per_step": "rollouts", "lr": "GRPO",
               "steps": "run", "decode": "GPU paths", "plan": "memory plan"}


def parse_args(argv=None) -> Config:
    parser = Parser(prog="ssr.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser
    for f in dataclasses.fields(Config):
        if f.name in FLAG_GROUPS:  # --help lists the flags under the same headings as the Config fields
            group = parser.add_argument_group(FLAG_GROUPS[f.name])
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['help']} (default: {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            group.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"],
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    # no model: the smoke run, whose preset is applied under whatever the user did give
    preset = given.get("preset") or ("smoke" if not given.get("model") else "")
    return Config(**(PRESETS.get(preset, {}) | given | {"preset": preset}))


# Every flag's range, checked right after parsing: a mistake costs seconds, not a model load or a sampling step.
# (flag, test on the config, what would be valid)
CHECKS = [
    ("prompts_per_step", lambda c: c.prompts_per_step >= 1, "at least 1"),
    ("group_size", lambda c: c.group_size >= 2, "at least 2: GRPO compares the rollouts of a group"),
    ("max_prompt_tokens", lambda c: c.max_prompt_tokens >= 1, "at least 1"),
    ("max_new_tokens", lambda c: c.max_new_tokens >= 1, "at least 1"),
    ("judge_max_new_tokens", lambda c: c.judge_max_new_tokens >= 1, "at least 1"),
    ("temperature", lambda c: 0 < c.temperature < math.inf, "> 0: a group sampled greedily is one rollout 8 times"),
    ("top_p", lambda c: 0 < c.top_p <= 1, "in (0, 1]"),
    ("sampler_batch_size", lambda c: c.sampler_batch_size >= c.group_size, "at least --group-size (a group "
                                                                            "shares one prefill)"),
    ("judge_samples", lambda c: c.judge_samples >= 1, "at least 1"),
    ("judge_refresh", lambda c: c.judge_refresh >= 0, ">= 0 (1: the current weights, 0: frozen initial weights)"),
    ("judge_ema", lambda c: 0 <= c.judge_ema < 1, "in [0, 1) (0: off)"),
    ("judge_temperature", lambda c: c.judge_samples == 1 or 0 < c.judge_temperature < math.inf,
     "> 0 when --judge-samples > 1"),
    ("w_self", lambda c: 0 <= c.w_self < math.inf, "finite and >= 0"),
    ("w_comet", lambda c: 0 <= c.w_comet < math.inf, "finite and >= 0"),
    ("w_ref", lambda c: 0 <= c.w_ref < math.inf, "finite and >= 0"),
    ("w_self", lambda c: c.w_self + c.w_comet + c.w_ref > 0 or c.reward,
     ">= 0, like --w-comet and --w-ref, and not all 0 (nothing would reward a translation) unless --reward is given"),
    ("format_penalty", lambda c: math.isfinite(c.format_penalty), "a finite number"),
    ("format_credit", lambda c: 0 <= c.format_credit < math.inf, ">= 0 (0: off)"),
    ("lr", lambda c: 0 < c.lr < torch.finfo(torch.float32).max, "> 0 and finite in fp32"),
    ("warmup_steps", lambda c: c.warmup_steps >= 0, ">= 0"),
    ("weight_decay", lambda c: 0 <= c.weight_decay < math.inf, ">= 0"),
    ("max_grad_norm", lambda c: 0 < c.max_grad_norm, "> 0"),
    ("seed", lambda c: 0 <= c.seed < 2**32, "in [0, 2**32): the sampler's seeds are built from it in 64 bits"),
    ("clip_low", lambda c: 0 <= c.clip_low < 1, "in [0, 1)"),
    ("clip_high", lambda c: 0 <= c.clip_high < math.inf, ">= 0"),
    ("kl_beta", lambda c: 0 <= c.kl_beta < math.inf, ">= 0"),
    ("tis_cap", lambda c: 0 <= c.tis_cap < math.inf, ">= 0 (0: off)"),
    ("mini_batches", lambda c: c.mini_batches >= 1, "at least 1"),
    ("micro_batch_size", lambda c: c.micro_batch_size >= 1, "at least 1"),
    ("steps", lambda c: c.steps >= 1, "at least 1"),
    ("save_every", lambda c: c.save_every >= 1, "at least 1"),
    ("log_samples", lambda c: c.log_samples >= 0, ">= 0"),
    ("keep_last", lambda c: c.keep_last >= 0, ">= 0 (0 keeps every checkpoint)"),
    ("stop_on_collapse", lambda c: c.stop_on_collapse >= 0, ">= 0 (0: never stop)"),
    ("dist_timeout", lambda c: 0 < c.dist_timeout < math.inf, "> 0 minutes"),
    ("plan_world", lambda c: c.plan_world >= 0, ">= 0"),
    ("gpu_gib", lambda c: 0 <= c.gpu_gib < math.inf, ">= 0"),
]


def validate(cfg: Config, world: int):
    """Every flag and flag combination, and every path, before any work: one ConfigError naming the flag."""
    for name, ok, valid in CHECKS:
        if not ok(cfg):
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)!r}: must be {valid}")
    if not cfg.out_dir.strip():  # an unset "$OUT" would write into the current directory
        raise ConfigError("--out-dir '': give a directory")
    out = Path(cfg.out_dir).expanduser().resolve()
    if out == out.parent:  # an unset "$OUT/" is "/": step_N, metrics.jsonl and the rest would land at the very top
        raise ConfigError(f"--out-dir {cfg.out_dir}: the filesystem root; give a directory (is a variable in it "
                          f"unset?)")
    if cfg.preset not in ("", "smoke") and not cfg.model:
        raise ConfigError(f"--preset {cfg.preset} is a recipe for a real model: pass --model (without it the run "
                          f"would be a smoke run on a tiny random model)")
    if world > 1 and cfg.dist == "none":
        raise ConfigError("--dist none: several ranks need --dist ddp or --dist fsdp")
    per_rank = cfg.prompts_per_step // world * cfg.group_size
    if cfg.prompts_per_step % world or per_rank % cfg.mini_batches:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step}: must be a multiple of the {world} ranks, and "
                          f"each rank's rollouts ({per_rank}) must split into --mini-batches {cfg.mini_batches}")
    if cfg.resume_override and not cfg.resume:
        raise ConfigError("--resume-override only means something with --resume")
    try:
        answer_checks(cfg)
    except judge.RewardError as e:
        raise ConfigError(f"--answer-checks {cfg.answer_checks}: {e}") from None
    if lagging_judge(cfg):
        what = f"--judge-ema {cfg.judge_ema}" if cfg.judge_ema else f"--judge-refresh {cfg.judge_refresh}"
        if cfg.judge_ema and cfg.judge_refresh != 1:
            raise ConfigError(f"--judge-ema {cfg.judge_ema} with --judge-refresh {cfg.judge_refresh}: choose one way "
                              f"for the judge to lag (a momentum copy, or a snapshot every K steps)")
        if cfg.judge_model:
            raise ConfigError(f"{what} with --judge-model: the external judge is frozen already; drop one of them")
        if cfg.w_self == 0:
            raise ConfigError(f"{what} with --w-self 0: no self-judge runs, so nothing would lag")
    triton_runs = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    for name, value in (("decode", "kernel"), ("logprob_backend", "triton")):
        if getattr(cfg, name) == value and not triton_runs:
            raise ConfigError(f"{flag(name)} {value}: Triton runs on CUDA, or on CPU in its interpreter "
                              "(TRITON_INTERPRET=1); here use auto")
    needs = ("config.json",) if cfg.plan else ("config.json", "tokenizer.json")  # --plan reads config.json only
    for name in ("model", "judge_model"):
        path = Path(getattr(cfg, name))
        if getattr(cfg, name) and not all((path / f).is_file() for f in needs):
            raise ConfigError(f"{flag(name)} {path}: not a model directory (needs {' and '.join(needs)})")
    if not os.access(cfg.data, os.R_OK) or not Path(cfg.data).is_file():
        raise ConfigError(f"--data {cfg.data}: no such readable file")
    if cfg.w_comet > 0 and looks_like_path(cfg.comet_model) and not Path(cfg.comet_model).expanduser().exists():
        raise ConfigError(f"--comet-model {cfg.comet_model}: no such COMET checkpoint directory")
    rundir.check_writable(Path(cfg.out_dir))
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--wandb needs the wandb package (pip install wandb)") from None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def answer_checks(cfg: Config) -> tuple[str, ...]:
    """The answer checks a run applies, in order: --answer-checks, and --check-script's 'script'."""
    return tuple(dict.fromkeys(judge.checks_list(cfg.answer_checks) + (("script",) if cfg.check_script else ())))


def lagging_judge(cfg: Config) -> bool:
    """Does the self-judge read weights of its own (a snapshot or a momentum copy), not the sampler's current ones?"""
    return cfg.judge_refresh != 1 or cfg.judge_ema > 0


def looks_like_path(name: str) -> bool:
    """A COMET model given as a path (./x, /x, ~/x, x/y/z) rather than a hub name (Org/name)."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


# ----------------------------------------------------------------------------------------------------
# data

def read_data(path: str, need_ref: bool = False) -> tuple[list[tuple[str, dict]], str]:
    """Read and validate the jsonl without a tokenizer (the prompt lengths are check_tokenizer's): every problem is
    reported with its file and line. With need_ref (--w-ref), every row needs a non-empty 'ref'; a row's 'ref' is
    kept whenever it has one. Returns each row with its file:line, and the SHA-256 of the very bytes they were read
    from: what every checkpoint records and a resume compares (hashing the file again at a save would record a file
    rewritten mid-run, not the data trained on)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file")
    raw = read_bytes(path)
    rows = []
    for where, row in parse_jsonl(path, raw):
        for key in ("src", "src_lang", "tgt_lang") + (("ref",) if need_ref else ()):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{where}: missing or empty '{key}'" + (" (--w-ref needs a reference on every row)"
                                                                         if key == "ref" else ""))
        check_direction(where, row["src_lang"], row["tgt_lang"])
        rows.append((where, {k: row[k] for k in ("src", "src_lang", "tgt_lang", "ref") if k in row}))
    if not rows:
        raise DataError(f"{path}: no data")
    return rows, hashlib.sha256(raw).hexdigest()


def load_data(path: str, need_ref: bool = False) -> tuple[list[dict], str]:
    """read_data's rows without their file:line, and the SHA-256 of the bytes read."""
    located, sha256 = read_data(path, need_ref)
    return [row for _, row in located], sha256


def step_sources(rows: list[dict], step: int, cfg: Config, rank: int, world: int) -> list[dict]:
    """This rank's sources for `step`. A pure function of (seed, step): resuming needs no data cursor,
    and every rank agrees on the global batch without talking. Each epoch is a fresh permutation."""
    per_rank = cfg.prompts_per_step // world
    first = step * cfg.prompts_per_step + rank * per_rank
    orders = {}  # epoch -> permutation of the data
    out = []
    for i in range(first, first + per_rank):
        epoch, pos = divmod(i, len(rows))
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        out.append(rows[orders[epoch][pos]])
    return out


# ----------------------------------------------------------------------------------------------------
# setup: everything the loop needs, built once

@dataclass
class Run:
    cfg: Config
    rank: int
    world: int
    device: torch.device
    out: Path
    tok: object  # checkpoint.Tokenizer
    rows: list[dict]  # the training data
    data_sha256: str  # of the bytes the rows were read from
    model: torch.nn.Module  # the trained policy: fp32 masters, wrapped in DDP/FSDP2 under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: Sampler  # the actor, on a copy of the policy's weights (bf16 on GPU) that sync keeps current
    judge_sampler: Sampler  # the same sampler (self-judging), or a frozen --judge-model's
    judge_weights: dict | None  # the lagging judge's policy_snapshot (--judge-refresh != 1, --judge-ema), else None
    ref_model: Transformer | None  # frozen initial policy, for the KL penalty (--kl-beta > 0)
    comet: judge.CometScorer | None  # SSR-X's CometKiwi (--w-comet > 0)
    custom_reward: object  # --reward module:function, or None
    autocast: object  # bf16 autocast for DDP on GPU (FSDP2 casts itself)
    start: int  # the first step to run (> 0 when resuming)
    signal: list[dict]  # the recent steps' learning-signal metrics, for --stop-on-collapse (restored on resume)
    wandb_run: object = None

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup(cfg: Config, held: contextlib.ExitStack | None = None) -> Run:
    """Everything the loop needs, built once, as a checklist in cost order: first every check that reads nothing but
    the command line, the environment and the input files (nothing written, nothing built), then the out-dir (locked,
    what it holds checked against this run, claimed), the smoke model, the memory plan, and only then the models.
    A mistake is refused before the step that costs. `held` (ssr.main's) keeps the out-dir's lock until the run
    ends, however it ends; without it (a test, bench.py) nothing is locked."""
    # 1. the flags and the launcher's environment, read once
    launch = launch_environment()
    validate(cfg, launch.world)
    if cfg.plan_world:  # a plan for another world size is refused exactly as a run of that size would be
        validate(cfg, cfg.plan_world)
    rank, world = launch.rank, launch.world
    mode = dist_mode(cfg, world)
    if cfg.plan:
        plan_only(cfg, world, mode, local_device(launch), rank)  # exits; writes nothing
    # 2. the inputs: every data row, the reward spec, and (when there is one already) the policy's tokenizer
    located, data_sha256 = check_data(cfg)
    custom_reward = judge.load_custom_reward(cfg.reward) if cfg.reward else None
    smoke = not cfg.model
    if not smoke:  # the smoke model's tokenizer is built with it, in 4
        check_tokenizer(cfg, located, load_tokenizer(cfg.model))
    # 3. the out-dir made this run's alone (rank 0 holds its lock to the end); the ranks meet; OUT checked, claimed
    out = Path(cfg.out_dir)
    if held is not None and rank == 0:
        held.callback(rundir.lock(out))
    device = init_distributed(launch, cfg.dist_timeout, one_rank_group=cfg.dist == "fsdp")
    if smoke:  # the smoke run's tiny model lives in OUT
        cfg.model = str(out / "tiny_model")
    resume_dir = claim_out_dir(cfg, out, smoke, data_sha256, rank)
    # 4. the smoke model, then the memory plan: the last check before any model is loaded
    if smoke:
        prepare_smoke_model(cfg, out, located, data_sha256, rank, device)
    check_memory(cfg, world, mode, device, rank)
    # 5. the models and the rest of what the loop holds
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    wandb_run = start_wandb(cfg) if cfg.wandb and rank == 0 else None
    tok = load_tokenizer(cfg.model)
    comet = (judge.CometScorer(load_comet(cfg.comet_model), cfg.comet_model, device=device) if cfg.w_comet > 0
             else None)
    # fp32 master weights, sharded from the start under FSDP2 (a resume fills them from the saved state); on GPU
    # the forward runs in bf16 (autocast for DDP, FSDP2's param_dtype)
    gen_dtype = compute_dtype(cfg, device)
    model = load_trainer_model(resume_dir or cfg.model, mode, device, fill=resume_dir is None,
                               compute_dtype=gen_dtype)
    unwrap(model).grad_checkpointing = cfg.grad_checkpointing
    optimizer, scheduler = make_optimizer(cfg, model)
    # the lagging judge's weights: the initial policy's; a resume then fills them with the saved judge's
    judge_weights = policy_snapshot(model) if lagging_judge(cfg) else None
    start = load_train_state(resume_dir, model, optimizer, scheduler, judge_weights) if resume_dir else 0
    check_weights_finite(model, cfg.model, resume_dir)
    signal = read_trainer_state(resume_dir).get("loop", {}).get("signal", []) if resume_dir else []
    apply_schedule(cfg, optimizer, scheduler)  # a resume restored the saved LR; --resume-override lr changes it
    if rank == 0 and resume_dir:
        print(f"resumed from {resume_dir} at step {start}")
        rundir.trim_logs(out, start)

    # one cache slot per sequence this rank can have live at once: its rollouts, or its judge prompts
    sampler_args = dict(max_batch_size=sampler_slots(cfg, world), max_seq_len=cache_positions(cfg), device=device,
                        dtype=gen_dtype, decode=cfg.decode)
    sampler = Sampler(sampler_copy(model, device, gen_dtype), **sampler_args)
    judge_sampler = (Sampler(load_pretrained(cfg.judge_model, device, gen_dtype).eval(), **sampler_args)
                     if cfg.judge_model else sampler)
    ref_model = load_frozen_model(cfg.model, mode, device, gen_dtype) if cfg.kl_beta > 0 else None
    # bf16 compute on the fp32 masters: autocast for none/ddp; FSDP2 casts the gathered weights itself (shard)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=gen_dtype == torch.bfloat16 and mode != "fsdp")
    return Run(cfg, rank, world, device, out, tok, [row for _, row in located], data_sha256, model, optimizer,
               scheduler, sampler, judge_sampler, judge_weights, ref_model, comet, custom_reward, autocast, start,
               signal, wandb_run)


def dist_mode(cfg: Config, world: int) -> str:
    """none (one process: nothing to shard or average), ddp (replicas) or fsdp (shards; --dist fsdp on one process
    too, over a one-rank group: FSDP2, its collectives and DCP as on many ranks, which is how scripts/gpu_checks.sh
    checks NCCL on one GPU). validate() has refused --dist none for several ranks; a plan for several ranks
    (--plan-world) reads it as the default, ddp."""
    return "fsdp" if cfg.dist == "fsdp" else "none" if world == 1 else "ddp"


def plan_only(cfg: Config, world: int, mode: str, device: torch.device, rank: int):
    """--plan: print the memory plan and exit (0 fits, 2 not). It writes nothing anywhere it does not own: the
    smoke run's model, which exists only in its out-dir, is built in a temporary directory for its shape."""
    if cfg.model:
        check_memory(cfg, world, mode, device, rank)  # exits
    with tempfile.TemporaryDirectory(prefix="ssr-plan-") as tmp:  # removed on the way out of the exit below
        cfg.model = str(make_smoke_model(Path(tmp), cfg.data, cfg.seed))
        check_memory(cfg, world, mode, device, rank)  # exits


def check_memory(cfg: Config, world: int, mode: str, device: torch.device, rank: int):
    """Print the memory plan (rank 0) and refuse a run that will not fit; with --plan, exit after printing."""
    if cfg.plan_world:
        world = cfg.plan_world
        mode = dist_mode(cfg, world)
    on_gpu = device.type == "cuda" or cfg.gpu_gib > 0
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)  # compute_dtype, for the planned device
    plan = memory_plan(cfg, read_config(cfg.model), world, mode, on_gpu,
                       cfg.gpu_gib * GIB or device_memory_bytes(on_gpu),
                       read_config(cfg.judge_model) if cfg.judge_model else None,
                       comet_checkpoint_bytes(cfg.comet_model) if cfg.w_comet > 0 else 0, bf16=bf16)
    if rank == 0:
        print(plan.table(), flush=True)
    if cfg.plan:
        sys.exit(0 if plan.fits() else 2)
    if not plan.fits():
        raise ConfigError(f"the memory plan needs {plan.peak / GIB:.1f} GiB per GPU, over the "
                          f"{plan.device_bytes / GIB:.0f} GiB there are: {plan.advice()}")


def check_data(cfg: Config) -> tuple[list[tuple[str, dict]], str]:
    """The training rows (each with its file:line) and the SHA-256 of the bytes read, once every row is known to
    work in this run as far as can be told without a tokenizer: its fields (a reference on each with --w-ref), its
    direction, the BLEU tokenizer of every target language a reference is scored in (--ref-metric bleu: MeCab for
    ja and ko), and every pair's length ratio (--answer-checks length)."""
    located, data_sha256 = read_data(cfg.data, need_ref=cfg.w_ref != 0)
    rows = [row for _, row in located]
    if cfg.ref_metric == "bleu":  # a row's reference is scored whatever --w-ref (the log's self_ref_pairwise)
        for tgt_lang in sorted({row["tgt_lang"] for row in rows if "ref" in row}):
            try:
                bleu_tokenizer(tgt_lang)
            except DataError as e:
                raise DataError(f"--ref-metric bleu on {cfg.data}: {e}") from None
    if "length" in answer_checks(cfg):  # the length check needs each pair's measured ratio
        for pair in sorted({(row["src_lang"], row["tgt_lang"]) for row in rows}):
            judge.length_ratio(*pair)
    return located, data_sha256


def check_tokenizer(cfg: Config, located: list[tuple[str, dict]], tok):
    """What the judge and the data need of the policy's tokenizer `tok`: a --judge-model that reads the same tokens
    (check_judge_tokenizer), and every actor prompt within --max-prompt-tokens."""
    if cfg.judge_model:
        check_judge_tokenizer(cfg, tok)
    for where, row in located:
        prompt = judge.actor_prompt(row["src"], row["src_lang"], row["tgt_lang"], cfg.template, cfg.think_prefill)
        if (n := len(tok.encode(prompt))) > cfg.max_prompt_tokens:
            raise DataError(f"{where}: the actor prompt is {n} tokens, over --max-prompt-tokens "
                            f"{cfg.max_prompt_tokens}")


def check_judge_tokenizer(cfg: Config, tok):
    """--judge-model must speak the policy's language: its prompts are encoded, and its outputs decoded, with the
    policy's tokenizer `tok`. A judge with another tokenizer would read garbage (every judgement failing, training on
    all-zero rewards) or index past its vocabulary, so it is refused rather than given its own tokenizer: the
    judge would then also need its own stop ids, prompt lengths and cache sizes, for an ablation's sake."""
    difference = tokenizer_difference(tok, load_tokenizer(cfg.judge_model))
    if difference:
        raise ConfigError(f"--judge-model {cfg.judge_model}: its tokenizer is not the policy's ({difference}); the "
                          f"judge reads prompts in the policy's tokens: give a judge with --model's tokenizer")


def claim_out_dir(cfg: Config, out: Path, smoke: bool, data_sha256: str, rank: int) -> Path | None:
    """Check that this run may use OUT as asked, and return the checkpoint it resumes (None: a fresh run). OUT must
    hold no other run's outputs (rundir.claim: a fresh run must not mix with an old one; the smoke run clears only a
    smoke run's outputs, as OUT records them), a resumed checkpoint must be this run's (check_resume), and no folder
    of the user's may stand where this run will save (rundir.check_saves_free). Only then is OUT changed: what a
    fresh smoke run clears is cleared, and a fresh run records itself in OUT/run.json."""
    newest = newest_checkpoint(out)
    recorded = recorded_run(out, newest) if smoke and not cfg.resume else None
    cleared = rundir.claim(out, newest, recorded, cfg.resume, smoke)
    resumed_step = check_resume(cfg, newest, data_sha256, rank) if cfg.resume else 0
    rundir.check_saves_free(out, resumed_step, cfg.steps)
    if rank == 0 and not cfg.resume:
        rundir.clear(cleared)
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_run_record(out, cfg.preset, cfg.model)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has cleared what the smoke run clears before anyone reads OUT again
    return newest if cfg.resume else None


def recorded_run(out: Path, newest: Path | None) -> dict | None:
    """Which run OUT's outputs belong to, as OUT records it: its newest checkpoint's config, else run.json;
    None if nothing readable says (then nothing is cleared)."""
    if newest is None:
        return rundir.read_run_record(out)
    try:
        return read_trainer_state(newest)["config"]
    except CheckpointError:
        return None


def check_resume(cfg: Config, newest: Path, data_sha256: str, rank: int) -> int:
    """--resume from `newest`: its step, once its saved flags and data fingerprint match ours (or the differences are
    named in --resume-override), it is not past --steps, and --model (if overridden) has the checkpoint's tokenizer."""
    trainer = read_trainer_state(newest)
    if trainer["step"] > cfg.steps:
        raise ConfigError(f"--steps {cfg.steps}: {newest} is already past it (step {trainer['step']}); pass a larger "
                          f"--steps to continue that run")
    overrides = {k.strip().replace("-", "_") for k in cfg.resume_override.split(",") if k.strip()}
    # a checkpoint written before a flag existed ran with what is now that flag's default
    saved = {f.name: f.default for f in dataclasses.fields(Config)} | trainer["config"]
    changed = rundir.config_changes(saved, run_config(cfg, data_sha256), overrides)
    # The resumed weights were trained on the ids of the checkpoint's tokenizer (saved in it), and the run goes on
    # encoding with --model's: another vocabulary would train them on other words' ids and save that tokenizer
    # with them (a larger one indexes past the embedding).
    if "model" in changed and (difference := tokenizer_difference(load_tokenizer(newest), load_tokenizer(cfg.model))):
        raise ConfigError(f"--resume-override model: --model {cfg.model} has another tokenizer than {newest} "
                          f"({difference}); its weights read their own tokenizer's ids: give a --model with the "
                          f"checkpoint's tokenizer")
    if rank == 0 and changed:
        print(f"resuming with changed flags: {', '.join(rundir.flag(k) for k in changed)}")
    return trainer["step"]


def run_config(cfg: Config, data_sha256: str) -> dict:
    """What a checkpoint records of the run: the flags (paths resolved), and the fingerprint of the data read."""
    return rundir.resolved_paths(dataclasses.asdict(cfg)) | {"data_sha256": data_sha256}


SMOKE_RECORD = "built_for.json"  # in OUT/tiny_model: what the smoke model was built and warmed up for


def prepare_smoke_model(cfg: Config, out: Path, located: list[tuple[str, dict]], data_sha256: str, rank: int,
                        device: torch.device):
    """No --model: the smoke run trains smoke.py's tiny model (cfg.model, OUT/tiny_model), built and warmed up under
    the out-dir. A fresh run reuses OUT's only if it was built for the same template, seed and data (smoke_record,
    kept beside it): one warmed up for another template never writes this one's format, and its tokenizer was
    trained on the data. A resume keeps the model its run started with: the checkpoint's tokenizer is its. The
    build goes through a temporary directory, so an interrupted one is never mistaken for a finished one, and the
    prompts are checked with the new tokenizer before the warm-up's seconds are spent."""
    if rank == 0:
        print(f"SMOKE RUN: a tiny 2-layer model, warmed up for a few seconds on toy responses and judgements "
              f"written in code (smoke.py), then {cfg.steps} RL steps on {cfg.data} on {device.type}, rewarded by "
              f"{cfg.reward or 'its own judge (SSR-Zero)'}. It shows every phase of the loop; it does not learn "
              "to translate. For real training pass --model and --data (see README).", flush=True)
    tiny, built_for = out / "tiny_model", smoke_record(cfg, data_sha256)
    built = (tiny / "config.json").exists()
    if rank == 0 and built and (cfg.resume or read_smoke_record(tiny) == built_for):
        check_tokenizer(cfg, located, load_tokenizer(tiny))
    elif rank == 0:
        t0, tmp = time.perf_counter(), out / ".tiny_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_smoke_model(tmp, cfg.data, cfg.seed)
        check_tokenizer(cfg, located, load_tokenizer(tmp))
        loss = warm_up(tmp, [row for _, row in located], cfg.template, cfg.seed)
        (tmp / SMOKE_RECORD).write_text(json.dumps(built_for) + "\n")
        shutil.rmtree(tiny, ignore_errors=True)  # one built for other settings
        tmp.rename(tiny)
        print(f"smoke model {'re' if built else ''}built and warmed up in {time.perf_counter() - t0:.1f}s (loss "
              f"{loss:.2f})" + (" for this run's template, seed and data" if built else ""), flush=True)
    if dist.is_initialized():
        dist.barrier()


def smoke_record(cfg: Config, data_sha256: str) -> dict:
    """What shapes the smoke model: the prompts it is warmed up on (template), its random weights and the order of
    its warm-up batches (seed), and the text its tokenizer is trained on and its warm-up examples (data)."""
    return {"template": cfg.template, "seed": cfg.seed, "data_sha256": data_sha256}


def read_smoke_record(tiny: Path) -> dict | None:
    """OUT/tiny_model's record of what built it; None if absent or unreadable (an older ssr built it: rebuilt)."""
    try:
        return json.loads((tiny / SMOKE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def start_wandb(cfg: Config):
    import wandb

    return wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg))


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """--precision: bf16 (auto on CUDA) or fp32 (auto on CPU). The dtype of the sampler's, judge's and reference's
    copies of the weights and of the update's compute; the trainer's master weights and AdamW stay fp32."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def check_weights_finite(model, model_dir: str, resume_dir: Path | None):
    """The weights as loaded, before any update, must be finite. An inf or NaN in the base checkpoint itself makes
    the first loss NaN, and the divergence stop would blame the learning rate; it is named here instead, file and
    tensor (non_finite_tensors: every rank stops alike)."""
    bad = non_finite_tensors(model)
    if not bad.any():
        return
    name = hf_name([name for name, _ in unwrap(model).named_parameters()][int(bad.nonzero()[0])])
    if resume_dir is not None:  # never saved by ssr (it refuses to save non-finite weights): a damaged copy
        raise CheckpointError(f"{resume_dir / 'train_state'}: tensor '{name}' is not finite (inf or NaN); resume "
                              f"from an earlier step_N by deleting {resume_dir}")
    raise CheckpointError(f"{weights_file(model_dir, name)}: tensor '{name}' is not finite (inf or NaN) in the base "
                          f"checkpoint itself, before any update: the checkpoint is damaged (a lower --lr would not "
                          f"help); use an intact copy of it")


def weights_file(model_dir: str, name: str) -> Path:
    """The file of a checkpoint directory that holds tensor `name` (HF's name): its shard, or model.safetensors."""
    index = Path(model_dir) / "model.safetensors.index.json"
    shard = read_json(index).get("weight_map", {}).get(name) if index.is_file() else None
    return Path(model_dir) / (shard or "model.safetensors")


def make_optimizer(cfg: Config, model):
    """AdamW, and a schedule of linear warm-up then constant or cosine decay to 0 at cfg.steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    def lr_factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def apply_schedule(cfg: Config, optimizer, scheduler):
    """Put cfg's peak LR and weight decay into the (possibly restored) optimizer and schedule. A fresh run
    changes nothing; a resume whose LR was overridden continues with the new one from its current step."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        group["weight_decay"] = cfg.weight_decay


# ----------------------------------------------------------------------------------------------------
# one step's rollouts, and the phases that fill them in

@dataclass
class Rollout:
    """One sampled translation and what the step learns about it, filled in phase by phase. A step's
    rollouts are prompt-major: rollouts[i * group_size + j] is sample j of source i."""
    source: dict  # {src, src_lang, tgt_lang} (+ ref when the data has one)
    prompt: list[int]  # the actor prompt's token ids, shared by the group
    completion: Completion  # sample: the response's token ids (stopping token included), log-probs, why it ended
    response: str  # sample: the decoded response, special tokens skipped
    answer: str | None  # sample: the translation, or None when the format is invalid or an answer check failed
    failed_check: str | None = None  # sample: the answer check (--answer-checks) the translation failed, if any
    judge_outputs: list[str] = field(default_factory=list)  # judge: the judge's outputs (none if not judged)
    judgements: list[judge.Judgement] = field(default_factory=list)  # judge: the score read from each output
    comet: float | None = None  # judge: the COMET QE score (SSR-X)
    reward: judge.RewardParts | None = None  # reward: the reward and its parts

    def sample_dict(self) -> dict:
        """What a custom reward and samples.jsonl see."""
        return self.source | {"response": self.response, "answer": self.answer}


def bar(run: Run, desc: str, total: int):
    """A progress bar on rank 0 that disappears when done (the step's summary line stays). Off when stderr
    is not a terminal: in a log file the per-step line says it all."""
    show = run.master and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="seq", leave=False, disable=not show, dynamic_ncols=True)


def sample_translations(run: Run, sources: list[dict], seed: int) -> list[Rollout]:
    """1. sample: every source's actor prompt, prefilled once, sampled group_size times."""
    cfg, tok = run.cfg, run.tok
    prompts = [tok.encode(judge.actor_prompt(s["src"], s["src_lang"], s["tgt_lang"], cfg.template, cfg.think_prefill))
               for s in sources]
    prefill = judge.think_prefill(cfg.template) if cfg.think_prefill else ""  # part of the prompt, not trained on
    with bar(run, "sample", len(prompts) * cfg.group_size) as progress:
        completions = run.sampler.generate(prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=tok.eos_ids,
                                           stop_strings=judge.STOP_STRINGS, tokenizer=tok, seed=seed,
                                           progress=progress)
    rollouts = []
    for i, c in enumerate(completions):
        # special tokens skipped: a trailing EOS is how a response ends, not part of its text
        response = prefill + tok.decode(c.tokens, skip_special_tokens=True)
        source, prompt = sources[i // cfg.group_size], prompts[i // cfg.group_size]
        answer, failed = judge.checked_answer(response, source, answer_checks(cfg), cfg.template)
        rollouts.append(Rollout(source, prompt, c, response, answer, failed))
    return rollouts


def judge_translations(run: Run, rollouts: list[Rollout], seed: int) -> dict:
    """2. judge: each well-formed translation next to its source, scored by the judge (the policy's own
    current weights unless --judge-model); with SSR-X also by COMET. Greedy pointwise judging asks once per
    distinct (source, translation) pair and shares the verdict; --judge-mode group asks once per GRPO group.
    Returns the judge's workload for the log: sequences generated, and judgements the rollouts received."""
    cfg, tok = run.cfg, run.tok
    valid = [r for r in rollouts if r.answer is not None]
    work = {"judge_sequences": 0, "judgements": 0}
    if cfg.w_self != 0 and valid:
        if run.judge_weights is not None:  # the lagging judge's weights into the sampler; the step's sync undoes it
            sync_sampler(run.model, run.sampler.model, run.judge_weights)
        groups = [i // cfg.group_size for i, r in enumerate(rollouts) if r.answer is not None]
        tasks = judge.judge_tasks([r.source for r in valid], [r.answer for r in valid], groups, cfg.judge_mode,
                                  dedup=cfg.judge_samples == 1, template=cfg.template, prefill=cfg.think_prefill)
        n, expected = cfg.judge_samples, cfg.judge_score == "expected"
        prompts = [tok.encode(t.prompt) for t in tasks]
        # a group prompt holds up to G translations and can outgrow the cache: its judgements fail (too_long)
        fit = [t for t, p in enumerate(prompts) if len(p) < run.judge_sampler.max_seq_len]
        with bar(run, "judge", len(fit) * n) as progress:
            outs = run.judge_sampler.generate([prompts[t] for t in fit], group_size=n,
                                              max_new_tokens=cfg.judge_max_new_tokens,
                                              temperature=0.0 if n == 1 else cfg.judge_temperature,
                                              stop_token_ids=tok.eos_ids, tokenizer=tok, seed=seed,
                                              stop_strings=judge.ANSWER_STOP if expected else judge.STOP_STRINGS,
                                              progress=progress)
        texts = {t: [tok.decode(o.tokens, skip_special_tokens=True) for o in outs[k * n:(k + 1) * n]]
                 for k, t in enumerate(fit)}
        outputs = [(t, text) for t in range(len(tasks)) for text in texts.get(t, [None] * n)]
        if expected:  # each output's score from the judge's probabilities after <answer>: one scoring pass
            verdicts = judge.expected_verdicts(run.judge_sampler.score, tok, [prompts[t] for t, _ in outputs],
                                               [text for _, text in outputs], [tasks[t] for t, _ in outputs],
                                               run.judge_sampler.max_seq_len)
        else:
            verdicts = [judge.read_verdict(tasks[t], text) for t, text in outputs]
        for (t, text), verdict in zip(outputs, verdicts):
            for members, judgement in zip(tasks[t].members, verdict):
                for i in members:
                    valid[i].judge_outputs.append(text or "")
                    valid[i].judgements.append(judgement)
        work = {"judge_sequences": len(fit) * n, "judgements": len(valid) * n}
    if run.comet is not None and valid:
        scores = run.comet.score([r.source["src"] for r in valid], [r.answer for r in valid])
        for r, score in zip(valid, scores):
            r.comet = score
    return work


def assign_rewards(run: Run, rollouts: list[Rollout]):
    """3. reward: format penalty, else w_self * self/100 + w_comet * COMET + w_ref * metric/100; a custom reward
    replaces it."""
    cfg = run.cfg
    parts = judge.score_rollouts([r.response for r in rollouts],
                                 [r.judgements for r in rollouts] if cfg.w_self != 0 else None,
                                 [r.comet for r in rollouts] if run.comet is not None else None,
                                 w_self=cfg.w_self, w_comet=cfg.w_comet, format_penalty=cfg.format_penalty,
                                 failed_checks=[r.failed_check for r in rollouts],
                                 # a row's reference, when it has one, is scored whatever --w-ref: the log then
                                 # shows how the self-judge's ranking compares with it (self_ref_pairwise)
                                 refs=[r.source.get("ref") for r in rollouts], w_ref=cfg.w_ref,
                                 ref_metric=cfg.ref_metric, ref_langs=[r.source["tgt_lang"] for r in rollouts])
    if cfg.format_credit:  # partial credit: a signal among malformed responses, which otherwise all tie
        parts = [p if p.format_valid else dataclasses.replace(p, reward=p.reward + cfg.format_credit
                                                                 * judge.format_progress(r.response))
                 for r, p in zip(rollouts, parts)]
    if run.custom_reward is not None:  # replaces the reward; the judge's components stay in the log
        custom = run.custom_reward([r.sample_dict() for r in rollouts])
        parts = [dataclasses.replace(p, reward=x) for p, x in zip(parts, custom)]
    for r, p in zip(rollouts, parts):
        r.reward = p


def update_policy(run: Run, rollouts: list[Rollout]) -> dict:
    """4. update: group-relative advantages, then GRPO's clipped policy-gradient step(s); returns its stats."""
    cfg = run.cfg
    # groups never straddle ranks (each rank holds whole prompts), so advantages are rank-local
    advantages = grpo.group_advantages(torch.tensor([r.reward.reward for r in rollouts]), cfg.group_size,
                                       std_normalize=cfg.adv_std == "on")
    # the sampler's own log-probs ride along: kl_sampler measures its gap to the trainer, --tis-cap corrects it
    batch = grpo.build_rollouts([r.prompt for r in rollouts], [r.completion.tokens for r in rollouts], advantages,
                                pad_id=run.tok.pad_id, sampler_logprobs=[r.completion.logprobs for r in rollouts],
                                in_loss=[not (cfg.mask_truncated and r.completion.finish_reason == "length")
                                         for r in rollouts]).to(run.device)
    run.model.train()
    with run.autocast, bar(run, "update", len(batch) * cfg.mini_batches) as progress:
        # "Old" log-probs come from the training model itself, not the sampler (bf16, other kernels), so the
        # ratio is exactly 1 before the first update. With one update per batch that is all they are:
        # grpo_update then uses its own detached log-probs and we skip a forward pass over the batch.
        if cfg.mini_batches > 1:
            batch.old_logprobs = grpo.sequence_logprobs(run.model, batch, cfg.micro_batch_size, cfg.temperature,
                                                        cfg.logprob_backend)
        if run.ref_model is not None:
            batch.ref_logprobs = grpo.sequence_logprobs(run.ref_model, batch, cfg.micro_batch_size, cfg.temperature,
                                                        cfg.logprob_backend)
        stats = grpo.grpo_update(run.model, run.optimizer, batch, micro_batch_size=cfg.micro_batch_size,
                                 mini_batches=cfg.mini_batches, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                 kl_beta=cfg.kl_beta, loss_agg=cfg.loss_agg, max_response_len=cfg.max_new_tokens,
                                 temperature=cfg.temperature, tis_cap=cfg.tis_cap, max_grad_norm=cfg.max_grad_norm,
                                 logprob_backend=cfg.logprob_backend, progress=progress)
    run.model.eval()
    stats["lr"] = run.optimizer.param_groups[0]["lr"]  # the LR this update used
    run.scheduler.step()
    return stats


@contextlib.contextmanager
def timed(times: dict, name: str):
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# the loop

def train(cfg: Config, held: contextlib.ExitStack | None = None):
    run = setup(cfg, held)
    for step in range(run.start, cfg.steps):
        t_step, times = time.perf_counter(), {}
        sources = step_sources(run.rows, step, cfg, run.rank, run.world)
        seed = (cfg.seed * 1_000_003 + step) * 4096 + run.rank * 2  # a pure function of (seed, step, rank)
        if run.judge_weights is not None and cfg.judge_refresh > 1 and step % cfg.judge_refresh == 0:
            refresh_snapshot(run.judge_weights, run.model)  # --judge-refresh K: the judge catches up every K steps
        with timed(times, "sample"):
            rollouts = sample_translations(run, sources, seed)  # 1. the actor translates each source G times
        with timed(times, "judge"):
            judged = judge_translations(run, rollouts, seed + 1)  # 2. the same weights score each valid translation
        assign_rewards(run, rollouts)  # 3. format penalty, or the self score (+ COMET)
        with timed(times, "update"):
            stats = update_policy(run, rollouts)  # 4. GRPO on the group-relative advantages
            if bad := [f"{k} {stats[k]}" for k in ("loss", "grad_norm") if not math.isfinite(stats[k])]:
                raise diverged(run, step, " and ".join(bad))
            sync_sampler(run.model, run.sampler.model)  # 5. the new weights into the sampler's copy
            if run.judge_weights is not None and cfg.judge_ema:
                refresh_snapshot(run.judge_weights, run.model, cfg.judge_ema)  # the momentum judge follows
        record = log_step(run, step, rollouts, stats, judged, times, t_step)
        run.signal = (run.signal + [{"step": step + 1} | {k: record[k] for k in COLLAPSE_AT}])[-max(cfg.stop_on_collapse, 1):]
        collapsed = collapse_metric(run.signal, cfg.stop_on_collapse)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or collapsed:
            if not weights_finite(run.model):  # never a checkpoint of inf/NaN weights
                raise diverged(run, step, "weights not finite")
            save_checkpoint(cfg.out_dir, step + 1, run.model, run.optimizer, run.scheduler,
                            run_config(cfg, run.data_sha256), cfg.model, cfg.keep_last,
                            judge_weights=run.judge_weights, loop_state={"signal": run.signal})
        if collapsed:
            raise Collapsed(collapse_message(run, step, collapsed))
    if run.master:
        print(f"done: checkpoint {run.out / f'step_{cfg.steps}'}, metrics {run.out / 'metrics.jsonl'}"
              + (" (smoke run: a tiny model on toy data; pass --model for real training)"
                 if cfg.preset == "smoke" else ""))
        if compiled := compile_report():  # a cold start's cost: every process compiles the decode step anew
            print(compiled)
    # The model goes before the process group. DDP's Reducer holds a reference to the group: freed after
    # destroy_process_group, it drops the group's last reference while holding the GIL, and gloo's destructor then
    # joins a worker thread that may be waiting for the GIL to free a finished all-reduce's tensors: a hang at exit
    # (pytorch/pytorch#56297; it hung a 2-rank test of this repo). DDP sits in reference cycles, hence the collect.
    del run
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


# --stop-on-collapse: a step has no learning signal when (almost) every group's rewards tie, so every advantage is 0,
# or when (almost) every judgement fails to parse, so every self-reward is 0. Self-rewarding runs fall into this and
# stay (RESULTS.md sections 2 and 5: the judge, trained with the actor, stops writing scores): an absorbing state.
COLLAPSE_AT = {"zero_spread_groups": 0.95, "judge_parse_failure_rate": 0.95}


def collapse_metric(signal: list[dict], patience: int) -> str | None:
    """The metric of COLLAPSE_AT that met its threshold in each of the last `patience` steps, or None (0: never)."""
    if patience == 0 or len(signal) < patience:
        return None
    return next((metric for metric, threshold in COLLAPSE_AT.items()
                 if all(s[metric] is not None and s[metric] >= threshold for s in signal[-patience:])), None)


class Collapsed(RuntimeError):
    """No learning signal for --stop-on-collapse steps: the run saved a checkpoint and stops (exit status 1)."""


def collapse_message(run: Run, step: int, metric: str) -> str:
    recent = ", ".join(f"{s[metric]:.2f}" for s in run.signal[-5:])
    return (f"step {step + 1}: no learning signal for {run.cfg.stop_on_collapse} steps ({metric} >= "
            f"{COLLAPSE_AT[metric]} in each; the last five: {recent}); saved {run.out / f'step_{step + 1}'} and "
            f"stopped. See README, 'When the learning signal dies' (or --stop-on-collapse 0 to go on)")


class Diverged(RuntimeError):
    """The loss, the gradient norm or the weights went non-finite: the run stops, and saves nothing of it."""


def diverged(run: Run, step: int, what: str) -> Diverged:
    """Stop the run at the first non-finite value: a diverged run only gets worse, and a checkpoint of it, rotated
    in by --keep-last, would push the good ones out. The values are global (all-reduced): every rank stops."""
    newest = newest_checkpoint(run.cfg.out_dir)
    return Diverged(f"step {step + 1}: training diverged ({what}); stopped without saving this step: "
                    + (f"{newest} is the newest checkpoint: resume from it with a lower learning rate (--resume "
                       f"--resume-override lr --lr ...)" if newest else
                       "no checkpoint was written: start over with a lower --lr"))


def weights_finite(model) -> bool:
    """Whether every weight of the model is finite: each rank checks its own shard, and all agree."""
    return not non_finite_tensors(model).any()


@torch.no_grad()
def non_finite_tensors(model) -> torch.Tensor:
    """One flag per parameter (named_parameters' order), 1 where it holds an inf or NaN on any rank: each rank checks
    its own shards, and the flags are all-reduced so that every rank sees the same."""
    params = list(unwrap(model).parameters())
    # on the model's device, named: NCCL serves CUDA tensors only (distributed.any_rank says more)
    bad = torch.stack([(~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).any() for p in params]).to(
        device=params[0].device, dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad


# ----------------------------------------------------------------------------------------------------
# logging

def gather(items: list) -> list:
    """Every rank's items, concatenated in rank order: metrics are over the global batch."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def log_step(run: Run, step: int, rollouts: list[Rollout], stats: dict, judged: dict, times: dict,
             t_step: float) -> dict:
    """One line of metrics.jsonl (global batch), a few full rollouts in samples.jsonl, a line on stdout; returns the
    metrics (every rank has them: they are global)."""
    cfg = run.cfg
    parts = gather([r.reward for r in rollouts])
    answered = [r for r in rollouts if r.answer is not None]
    # summed over ranks: response tokens, rollouts, length-truncated rollouts, judge sequences, judgements,
    # extracted answers, and those wrapped in quotation marks their source is not
    totals = torch.tensor([sum(len(r.completion.tokens) for r in rollouts), len(rollouts),
                           sum(r.completion.finish_reason == "length" for r in rollouts),
                           judged["judge_sequences"], judged["judgements"], len(answered),
                           sum(judge.answer_quoted(r.answer, r.source["src"]) for r in answered)],
                          dtype=torch.float64, device=run.device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    tokens, n, truncated, judge_sequences, judgements, answers, quoted = totals.tolist()
    groups = [[p.reward for p in parts[i:i + cfg.group_size]] for i in range(0, len(parts), cfg.group_size)]
    grpo_stats = {k: v for k, v in stats.items() if k != "lr"}
    record = {"step": step + 1} | judge.reward_stats(parts, cfg.group_size, answer_checks(cfg)) | {
        "zero_spread_groups": sum(max(g) == min(g) for g in groups) / len(groups),
        # judgements the rollouts received that no judge sequence was generated for (dedup, group mode)
        "judge_saved_share": 1 - judge_sequences / judgements if judgements else None,
        "truncated_rate": truncated / n,
        # the paper's late SSR-Zero artifact: translations wrapped in quotation marks (judge.answer_quoted)
        "answer_quoted_rate": quoted / answers if answers else None,
        "response_len_mean": tokens / n,
        "lr": stats["lr"], "sec_sample": times["sample"], "sec_judge": times["judge"], "sec_update": times["update"],
        "sec_step": time.perf_counter() - t_step,
        # every rank samples at once: the global rate is all tokens over one rank's sampling time
        "rollout_tokens_per_s": tokens / max(times["sample"], 1e-9),
    } | grpo_stats
    if not run.master:
        return record
    samples = [r.sample_dict() | {"step": step + 1, "judge_outputs": r.judge_outputs, "failed_check": r.failed_check,
                                  "self_score": r.reward.self_score, "comet": r.reward.comet,
                                  "ref_metric": r.reward.ref_metric, "reward": r.reward.reward}
               for r in rollouts[:cfg.log_samples]]
    lines = {"metrics.jsonl": json.dumps(record) + "\n",
             "samples.jsonl": "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)}
    for name, text in lines.items():
        try:
            rundir.append_lines(run.out / name, text)
        except OSError as e:  # a full disk: the run stops here, its checkpoints and logs as they were
            raise rundir.RunDirError(rundir.append_failed_message(run.out / name, e, step + 1,
                                                                  newest_checkpoint(run.out))) from None
    self_score, ref = record["self_score_mean"], record["ref_metric_mean"]
    print(f"step {step + 1}/{cfg.steps} | reward {record['reward_mean']:.3f} "
          f"| valid {record['format_valid_rate']:.2f} | self {'-' if self_score is None else f'{self_score:.1f}'} "
          + (f"| {cfg.ref_metric} {'-' if ref is None else f'{ref:.1f}'} " if cfg.w_ref != 0 else "")
          + (f"| judge~{cfg.ref_metric} {record['self_ref_pairwise']:.2f} of {record['self_ref_pairs']} pairs "
             if record["self_ref_pairwise"] is not None else "") +
          f"| len {record['response_len_mean']:.0f} "
          f"| loss {stats['loss']:.4f} | gnorm {stats['grad_norm']:.3f} "
          f"| sample {times['sample']:.1f}s judge {times['judge']:.1f}s update {times['update']:.1f}s", flush=True)
    if run.wandb_run is not None:
        run.wandb_run.log({k: v for k, v in record.items() if v is not None}, step=step + 1)
    return record


def main(argv=None):
    cfg = None
    try:
        cfg = parse_args(argv)
        with contextlib.ExitStack() as held:  # what the run holds (the out-dir's lock) is let go however it ends
            train(cfg, held)
    except (CheckpointError, DataError, ConfigError, LaunchError, judge.RewardError, rundir.RunDirError) as e:
        # bad input: one line that says what to fix, no traceback
        print(f"ssr: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Diverged, Collapsed) as e:
        print(f"ssr: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if cfg is not None:
            print(rundir.interrupted_message(Path(cfg.out_dir), newest_checkpoint(cfg.out_dir)), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
