"""Training at scale: torchrun processes, DDP/FSDP2 wrapping, weight sync to the sampler, checkpoints, resume.

    rank, world, device = init_distributed()          # torchrun's environment, or one process
    model = wrap_model(model, "fsdp", device)         # DDP replicas or FSDP2 shards
    sync_sampler(model, sampler.model)                # the new weights into the sampler's copy, in place
    save_checkpoint(...) / load_train_state(...)      # OUT/step_N: HF weights + the trainer's state

Everything here is collective under torchrun: every rank calls every function, in the same order.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from model import Transformer


def init_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python ssr.py` is one process.
    Returns (rank, world size, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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

def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, config: dict, tokenizer_dir, rank: int):
    """OUT/step_N/: HF weights (+ tokenizer) that transformers and eval.py load, plus train_state.pt.
    Written to a temp name then renamed, so a crash never leaves a half checkpoint that --resume trusts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from checkpoint import save_pretrained

    weights = full_state_dict(model)  # collective under FSDP: every rank calls it
    optim = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final, tmp = Path(out_dir) / f"step_{step}", Path(out_dir) / f".step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(tmp, unwrap(model).config, {k: (v.shape, v.dtype) for k, v in weights.items()},
                        lambda name: weights[name].cpu(), tokenizer_dir=tokenizer_dir)
        state = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "rng_python": random.getstate(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "config": config}
        torch.save(state, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if dist.is_initialized():
        dist.barrier()


def newest_checkpoint(out_dir) -> Path | None:
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
