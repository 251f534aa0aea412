"""SSR-Zero: self-rewarding GRPO for machine translation. Config, CLI, distributed setup, the loop.

Each step, for a batch of monolingual source sentences:
  1. sample   the current policy (actor) translates every source `group_size` times;
  2. judge    the *same current weights* score each well-formed translation 0-100, no reference;
  3. reward   format penalty, or w_self * score/100 (+ w_comet * CometKiwi for SSR-X), or a custom fn;
  4. update   group-relative advantages and a clipped policy-gradient step (grpo.py);
  5. sync     copy the new weights into the sampler's copy; log; checkpoint.

    python ssr.py                                           # CPU smoke run on a tiny random model
    torchrun --nproc 8 ssr.py --preset ssr-zero-7b --model /ckpt/Qwen2.5-7B --data train.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
import judge
from model import CheckpointError, Transformer, load_tokenizer, make_tiny_model
from sampler import Sampler


def arg(default, help: str, choices=None):
    """A config field that is also a CLI flag: its default, --help text and allowed values in one place."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- model and data
    model: str = arg("", "HF checkpoint directory of the base model (empty: a tiny random model, smoke run)")
    data: str = arg("data/sample.jsonl", "jsonl of monolingual sources: {src, src_lang, tgt_lang} per line")
    out_dir: str = arg("out/ssr", "where checkpoints, metrics.jsonl and samples.jsonl go")
    preset: str = arg("", "start from a named recipe; flags given on the command line override it",
                      choices=["", "ssr-zero-7b", "ssr-x-zero-7b", "smoke"])
    template: str = arg("r1", "actor/judge prompt template", choices=["r1", "chat"])
    # --- reward
    reward: str = arg("", "custom reward 'module:function' replacing the whole reward (judge still logged)")
    judge_model: str = arg("", "judge with this frozen model instead of the current policy (ablation)")
    w_self: float = arg(1.0, "weight of the self-judge score (score/100); 0 skips judging")
    w_comet: float = arg(0.0, "weight of the COMET QE score (SSR-X: 0.5 with w_self 0.5)")
    comet_model: str = arg("Unbabel/wmt22-cometkiwi-da", "COMET QE checkpoint name or local path (SSR-X)")
    format_penalty: float = arg(-1.0, "reward of a response that is not <think>..</think> <answer>..</answer>")
    judge_samples: int = arg(1, "judgements averaged per translation (1 = one greedy judgement)")
    judge_temperature: float = arg(1.0, "sampling temperature of the judge when judge_samples > 1")
    judge_max_new_tokens: int = arg(512, "token budget of one judgement")
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
    mini_batches: int = arg(1, "optimizer steps per rollout batch")
    micro_batch_size: int = arg(8, "sequences per forward/backward (gradient accumulation below that)")
    # --- run
    steps: int = arg(200, "training steps")
    save_every: int = arg(50, "checkpoint every N steps (and at the end)")
    resume: bool = arg(False, "continue from the newest OUT/step_N")
    seed: int = arg(0, "seed of data order, sampling and the tiny model")
    dist: str = arg("auto", "data parallelism under torchrun (auto: ddp if several ranks)",
                    choices=["auto", "none", "ddp", "fsdp"])
    grad_checkpointing: bool = arg(True, "recompute each layer in backward (activation checkpointing)")
    log_samples: int = arg(4, "full rollouts per step written to samples.jsonl")
    wandb: str = arg("", "log to this Weights & Biases project (needs wandb installed)")


PRESETS = {
    # Our recipe for Qwen2.5-7B base on 8 GPUs. The paper's exact hyper-parameters are not public: these
    # are the documented defaults of DESIGN.md with batch sizes that fit 8 x 80 GB under FSDP2.
    "ssr-zero-7b": dict(dist="fsdp", prompts_per_step=64, group_size=8, max_new_tokens=1024,
                        judge_max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=400, save_every=50,
                        micro_batch_size=4, sampler_batch_size=256, out_dir="out/ssr-zero-7b"),
    # SSR-X: the self-judge score and a CometKiwi QE score, half and half
    "ssr-x-zero-7b": dict(dist="fsdp", prompts_per_step=64, group_size=8, max_new_tokens=1024,
                          judge_max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=400, save_every=50,
                          micro_batch_size=4, sampler_batch_size=256, w_self=0.5, w_comet=0.5,
                          out_dir="out/ssr-x-zero-7b"),
    # `python ssr.py` with no arguments: tiny model, CPU, a programmatic reward it can visibly learn
    "smoke": dict(reward="judge:letter_share_reward", prompts_per_step=8, group_size=8,
                  max_new_tokens=24, judge_max_new_tokens=8, lr=3e-3, steps=20, save_every=10,
                  micro_batch_size=32, sampler_batch_size=64, grad_checkpointing=False, out_dir="out/smoke"),
}


class DataError(ValueError):
    """A bad line in the training data; the message names the file and line."""


class ConfigError(ValueError):
    """Flags that cannot work together (said before any model is loaded)."""


FLAG_GROUPS = {"model": "model and data", "reward": "reward", "prompts_per_step": "rollouts", "lr": "GRPO",
               "steps": "run"}


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


# ----------------------------------------------------------------------------------------------------
# data

def load_data(path: str, prompt_len=None, max_prompt_tokens: int = 0) -> list[dict]:
    """Read and validate the jsonl; every problem is reported with its file and line. With `prompt_len`
    (row -> tokens of its actor prompt), a prompt over max_prompt_tokens is a problem too."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            for key in ("src", "src_lang", "tgt_lang"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{where}: missing or empty '{key}'")
            for key in ("src_lang", "tgt_lang"):
                try:
                    judge.language_name(row[key])
                except judge.RewardError as e:
                    raise DataError(f"{where}: {e}") from None
            if row["src_lang"] == row["tgt_lang"]:
                raise DataError(f"{where}: src_lang and tgt_lang are both '{row['src_lang']}'")
            row = {k: row[k] for k in ("src", "src_lang", "tgt_lang")}
            if prompt_len is not None and (n := prompt_len(row)) > max_prompt_tokens:
                raise DataError(f"{where}: the actor prompt is {n} tokens, over --max-prompt-tokens "
                                f"{max_prompt_tokens}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no data")
    return rows


def make_smoke_model(path, data: str, seed: int = 0, **dims):
    """The smoke run's tiny random Qwen2, its BPE tokenizer trained on the data and the prompt templates
    (repeated, so they merge into few tokens: short prompts keep a CPU run fast). `dims` override the shape."""
    templates = [judge.actor_prompt("", a, b, t) for a, b in (("en", "zh"), ("zh", "en")) for t in judge.TEMPLATES]
    corpus = [r["src"] for r in load_data(data)] + templates * 50
    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) | dims
    return make_tiny_model(path, corpus=corpus, vocab_size=1024, seed=seed, **dims)


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
# distributed setup

def setup_dist(cfg: Config):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python ssr.py` is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mode = cfg.dist if cfg.dist != "auto" else ("ddp" if world > 1 else "none")
    if mode != "none" and world == 1 and not dist.is_initialized():
        mode = "none"  # --dist ddp on one process: nothing to shard or average
    if world > 1 and mode == "none":
        raise ConfigError("several ranks need --dist ddp or --dist fsdp")
    if cfg.prompts_per_step % world:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by {world} ranks")
    return rank, world, device, mode


def wrap_model(model: Transformer, mode: str, device: torch.device):
    """DDP replicates the model and averages gradients; FSDP2 shards parameters, gradients and optimizer
    state per layer (a 7B full fine-tune over 8 GPUs). On GPU both compute in bf16 over fp32 masters."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root holds embedding, final norm and (tied) head
    return model


def unwrap(model) -> Transformer:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def full_state_dict(model) -> dict:
    """Full (unsharded) tensors on every rank: FSDP2 parameters are DTensors and gather collectively."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        out[name] = p.full_tensor() if hasattr(p, "full_tensor") else p
    return out


@torch.no_grad()
def sync_sampler(model, sampler_model: Transformer):
    """Copy the trained weights into the sampler's copy in place (bf16 on GPU). In place matters: the
    sampler's CUDA graphs captured these tensors' addresses."""
    params = dict(sampler_model.named_parameters())
    for name, tensor in full_state_dict(model).items():
        params[name].copy_(tensor)


# ----------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(cfg: Config, step: int, model, optimizer, scheduler, rank: int):
    """OUT/step_N/: HF weights (+ tokenizer) that transformers and eval.py load, plus train_state.pt.
    Written to a temp name then renamed, so a crash never leaves a half checkpoint that --resume trusts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_state_dict(model)  # collective under FSDP: every rank calls it
    optim = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final, tmp = Path(cfg.out_dir) / f"step_{step}", Path(cfg.out_dir) / f".step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, state_dict={k: v.cpu() for k, v in weights.items()})
        state = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "rng_python": random.getstate(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "config": dataclasses.asdict(cfg)}
        torch.save(state, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if dist.is_initialized():
        dist.barrier()


def newest_checkpoint(out_dir: str) -> Path | None:
    steps = [(int(m.group(1)), p) for p in Path(out_dir).glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "train_state.pt").exists()]
    return max(steps)[1] if steps else None


def load_train_state(path: Path, model, optimizer, scheduler) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # weights_only: a checkpoint folder is data, never code to unpickle
    state = torch.load(path / "train_state.pt", weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    random.setstate(state["rng_python"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]


# ----------------------------------------------------------------------------------------------------
# one step

def bar(desc: str, total: int):
    """A progress bar on rank 0 that disappears when done (the step's summary line stays). Off when stderr
    is not a terminal: in a log file the per-step line says it all."""
    show = int(os.environ.get("RANK", "0")) == 0 and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="seq", leave=False, disable=not show, dynamic_ncols=True)


def rollout_and_reward(cfg: Config, sources, tok, sampler, judge_sampler, comet, custom_reward, seed):
    """Sample translations, judge them, score them. Returns prompts, completions, sample dicts, judge
    outputs, the reward breakdown (its .reward is what GRPO uses) and the seconds spent sampling/judging."""
    t0 = time.perf_counter()
    prompts = [tok.encode(judge.actor_prompt(s["src"], s["src_lang"], s["tgt_lang"], cfg.template)) for s in sources]
    with bar("sample", len(prompts) * cfg.group_size) as progress:
        completions = sampler.generate(prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=tok.eos_ids,
                                       stop_strings=judge.STOP_STRINGS, tokenizer=tok, seed=seed,
                                       progress=progress)
    samples = []
    for i, c in enumerate(completions):
        # special tokens skipped: a trailing EOS is how a response ends, not part of its text
        response = tok.decode(c.tokens, skip_special_tokens=True)
        samples.append(dict(sources[i // cfg.group_size], response=response, answer=judge.extract_answer(response)))
    t_sample = time.perf_counter() - t0

    # the judge: the same current weights (judge_sampler is the actor's own sampler) unless --judge-model
    t0 = time.perf_counter()
    judge_outputs = [[] for _ in samples]
    valid = [i for i, s in enumerate(samples) if s["answer"] is not None]
    if cfg.w_self != 0 and valid:
        judge_prompts = [tok.encode(judge.judge_prompt(samples[i]["src"], samples[i]["answer"], samples[i]["src_lang"],
                                                       samples[i]["tgt_lang"], cfg.template)) for i in valid]
        greedy = cfg.judge_samples == 1
        with bar("judge", len(judge_prompts) * cfg.judge_samples) as progress:
            outs = judge_sampler.generate(judge_prompts, group_size=cfg.judge_samples,
                                          max_new_tokens=cfg.judge_max_new_tokens,
                                          temperature=0.0 if greedy else cfg.judge_temperature,
                                          stop_token_ids=tok.eos_ids, stop_strings=judge.STOP_STRINGS,
                                          tokenizer=tok, seed=seed + 1, progress=progress)
        for j, i in enumerate(valid):
            group = outs[j * cfg.judge_samples:(j + 1) * cfg.judge_samples]
            judge_outputs[i] = [tok.decode(o.tokens, skip_special_tokens=True) for o in group]
    comet_scores = [None] * len(samples)
    if comet is not None and valid:
        scores = comet.score([samples[i]["src"] for i in valid], [samples[i]["answer"] for i in valid])
        for i, score in zip(valid, scores):
            comet_scores[i] = score
    t_judge = time.perf_counter() - t0

    breakdown = judge.score_rollouts([s["response"] for s in samples], judge_outputs if cfg.w_self != 0 else None,
                                     comet_scores if comet is not None else None, w_self=cfg.w_self,
                                     w_comet=cfg.w_comet, format_penalty=cfg.format_penalty)
    if custom_reward is not None:  # replaces the reward; the judge's components stay in the log
        breakdown.reward = custom_reward(samples)
    return prompts, completions, samples, judge_outputs, breakdown, t_sample, t_judge


def gather_breakdown(breakdown: judge.RewardBreakdown) -> judge.RewardBreakdown:
    """Every rank's per-rollout components, concatenated: metrics are over the global batch."""
    if not dist.is_initialized():
        return breakdown
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, breakdown)
    return judge.RewardBreakdown(**{f.name: [x for p in parts for x in getattr(p, f.name)]
                                    for f in dataclasses.fields(judge.RewardBreakdown)})


# ----------------------------------------------------------------------------------------------------
# main

def train(cfg: Config):
    rank, world, device, mode = setup_dist(cfg)
    master = rank == 0
    out = Path(cfg.out_dir)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    custom_reward = judge.load_custom_reward(cfg.reward) if cfg.reward else None  # fail fast on a bad spec
    wandb_run = None
    if cfg.wandb and master:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package (pip install wandb)") from None
        wandb_run = wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg))
    if not cfg.model:  # smoke run: a tiny random model
        cfg.model = str(out / "tiny_model")
        if master and not (out / "tiny_model" / "config.json").exists():
            make_smoke_model(cfg.model, cfg.data, cfg.seed)
        if dist.is_initialized():
            dist.barrier()
        if master:
            print(f"SMOKE RUN: a tiny random model ({cfg.model}) on {cfg.data}, {cfg.steps} steps on "
                  f"{device.type}, rewarded by {cfg.reward} (a toy reward it can learn; the judge still runs "
                  "on well-formed answers). For real training pass --model and --data (see README).")

    tok = load_tokenizer(cfg.model)
    prompt_len = lambda r: len(tok.encode(judge.actor_prompt(r["src"], r["src_lang"], r["tgt_lang"], cfg.template)))
    rows = load_data(cfg.data, prompt_len, cfg.max_prompt_tokens)

    resume_dir = newest_checkpoint(cfg.out_dir) if cfg.resume else None
    if not cfg.resume and (old := newest_checkpoint(cfg.out_dir)) is not None:
        if cfg.preset != "smoke":  # never mix two runs' checkpoints and logs in one directory
            raise ConfigError(f"{cfg.out_dir} already holds {old.name}: pass --resume to continue that run, "
                              "or another --out-dir")
        if master:  # the smoke run simply starts over
            for path in [*out.glob("step_*"), out / "metrics.jsonl", out / "samples.jsonl"]:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if cfg.resume and resume_dir is None:
        raise CheckpointError(f"{cfg.out_dir}: --resume given but no step_N checkpoint there")
    comet = judge.CometScorer(cfg.comet_model, device=device) if cfg.w_comet > 0 else None
    # fp32 master weights; on GPU the forward runs in bf16 (autocast for DDP, FSDP2's param_dtype)
    model = Transformer.from_pretrained(resume_dir or cfg.model, device=device, dtype=torch.float32)
    model.source_dir = Path(cfg.model)  # tokenizer files come from the base model directory
    model.grad_checkpointing = cfg.grad_checkpointing
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sampler_model = Transformer.from_pretrained(resume_dir or cfg.model, device=device, dtype=gen_dtype).eval()
    cache_len = cfg.max_prompt_tokens + cfg.max_new_tokens + cfg.judge_max_new_tokens + 128
    sampler = Sampler(sampler_model, max_batch_size=cfg.sampler_batch_size, max_seq_len=cache_len,
                      device=device, dtype=gen_dtype)
    judge_sampler = sampler
    if cfg.judge_model:
        judge_sampler = Sampler(Transformer.from_pretrained(cfg.judge_model, device=device, dtype=gen_dtype).eval(),
                                max_batch_size=cfg.sampler_batch_size, max_seq_len=cache_len, device=device,
                                dtype=gen_dtype)
    ref_model = (Transformer.from_pretrained(cfg.model, device=device, dtype=gen_dtype).eval()
                 if cfg.kl_beta > 0 else None)

    model = wrap_model(model, mode, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999))

    def lr_factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = load_train_state(resume_dir, model, optimizer, scheduler) if resume_dir else 0
    if master and resume_dir:
        print(f"resumed from {resume_dir} at step {start}")
        for name in ("metrics.jsonl", "samples.jsonl"):  # drop what was logged after the checkpoint
            if (out / name).exists():
                lines = (out / name).read_text(encoding="utf-8").splitlines(keepends=True)
                kept = [line for line in lines if json.loads(line)["step"] <= start]
                (out / name).write_text("".join(kept), encoding="utf-8")

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and mode != "fsdp"
                else torch.autocast("cpu", enabled=False))

    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        sources = step_sources(rows, step, cfg, rank, world)
        seed = (cfg.seed * 1_000_003 + step) * 4096 + rank * 2  # a pure function of (seed, step, rank)
        model.eval()
        prompts, completions, samples, judge_outputs, breakdown, t_sample, t_judge = \
            rollout_and_reward(cfg, sources, tok, sampler, judge_sampler, comet, custom_reward, seed)

        t0 = time.perf_counter()
        # groups never straddle ranks (each rank holds whole prompts), so advantages are rank-local
        advantages = grpo.group_advantages(torch.tensor(breakdown.reward), cfg.group_size,
                                           std_normalize=cfg.adv_std == "on")
        prompt_per_rollout = [prompts[i // cfg.group_size] for i in range(len(completions))]
        rollouts = grpo.build_rollouts(prompt_per_rollout, [c.tokens for c in completions], advantages,
                                       pad_id=tok.pad_id).to(device)
        model.train()
        with autocast, bar("update", len(rollouts) * cfg.mini_batches) as progress:
            # "Old" log-probs come from the training model itself, not the sampler (bf16, other kernels), so
            # the ratio is exactly 1 before the first update. With one update per batch that is all they are:
            # grpo_update then uses its own detached log-probs and we skip a forward pass over the batch.
            if cfg.mini_batches > 1:
                rollouts.old_logprobs = grpo.sequence_logprobs(model, rollouts, cfg.micro_batch_size,
                                                               cfg.temperature)
            if ref_model is not None:
                rollouts.ref_logprobs = grpo.sequence_logprobs(ref_model, rollouts, cfg.micro_batch_size,
                                                               cfg.temperature)
            stats = grpo.grpo_update(model, optimizer, rollouts, micro_batch_size=cfg.micro_batch_size,
                                     mini_batches=cfg.mini_batches, clip_low=cfg.clip_low,
                                     clip_high=cfg.clip_high, kl_beta=cfg.kl_beta, loss_agg=cfg.loss_agg,
                                     max_response_len=cfg.max_new_tokens, temperature=cfg.temperature,
                                     max_grad_norm=cfg.max_grad_norm, progress=progress)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        sync_sampler(model, sampler.model)
        t_update = time.perf_counter() - t0

        # ---- metrics over the global batch
        everyone = gather_breakdown(breakdown)
        lengths = torch.tensor([float(len(c.tokens)) for c in completions], device=device)
        totals = torch.stack([lengths.sum(), torch.tensor(float(len(lengths)), device=device)])
        if dist.is_initialized():
            dist.all_reduce(totals)
        groups = [everyone.reward[i:i + cfg.group_size] for i in range(0, len(everyone.reward), cfg.group_size)]
        record = {"step": step + 1} | everyone.stats() | {
            "zero_spread_groups": sum(max(g) == min(g) for g in groups) / len(groups),
            "response_len_mean": (totals[0] / totals[1]).item(),
            "lr": lr, "sec_sample": t_sample, "sec_judge": t_judge, "sec_update": t_update,
            "sec_step": time.perf_counter() - t_step,
            # every rank samples at once: the global rate is all tokens over one rank's sampling time
            "rollout_tokens_per_s": totals[0].item() / max(t_sample, 1e-9),
        } | stats
        if master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                for i in range(min(cfg.log_samples, len(samples))):
                    f.write(json.dumps(samples[i] | {"step": step + 1, "judge_outputs": judge_outputs[i],
                                                     "self_score": breakdown.self_score[i],
                                                     "comet": breakdown.comet[i],
                                                     "reward": breakdown.reward[i]}, ensure_ascii=False) + "\n")
            print(f"step {step + 1}/{cfg.steps} | reward {record['reward_mean']:.3f} "
                  f"| valid {record['format_valid_rate']:.2f} | len {record['response_len_mean']:.0f} "
                  f"| loss {stats['loss']:.4f} | gnorm {stats['grad_norm']:.3f} "
                  f"| sample {t_sample:.1f}s judge {t_judge:.1f}s update {t_update:.1f}s", flush=True)
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in record.items() if v is not None}, step=step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(cfg, step + 1, model, optimizer, scheduler, rank)
    if master:
        print(f"done: checkpoint {out / f'step_{cfg.steps}'}, metrics {out / 'metrics.jsonl'}"
              + (" (smoke run: the model is tiny and random; pass --model for real training)"
                 if cfg.preset == "smoke" else ""))
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (CheckpointError, DataError, ConfigError, judge.RewardError) as e:
        # bad input: one line that says what to fix, no traceback
        print(f"ssr: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ssr: interrupted; the newest complete checkpoint is intact (resume with --resume)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
