"""Training at scale: torchrun processes, DDP/FSDP2 models, weight sync to the sampler, checkpoints, resume.

    launch = launch_environment()                               # torchrun's variables, checked; or one process
    device = init_distributed(launch, timeout_minutes=60)       # this rank's device, in the process group
    model = load_trainer_model(path, "fsdp", device)            # sharded from the start: no full copy on a GPU
    sync_sampler(model, sampler.model)                          # new weights into the sampler, a tensor at a time
    save_checkpoint(...) / load_train_state(...)                # OUT/step_N: HF weights + the sharded trainer state

Scale rules (Qwen2.5-7B on 8 x 80 GB): no rank ever holds a full fp32 copy of the model on its GPU, and the
weight sync and the checkpoint save gather one parameter at a time. Everything here is collective under
torchrun: every rank calls every function, in the same order.

A checkpoint OUT/step_N/ holds
  config.json, *.safetensors, tokenizer files   a Hugging Face checkpoint in the base model's dtype, written by
                                                rank 0 one shard file at a time (eval.py and transformers load it);
  train_state/                                  torch.distributed.checkpoint: fp32 weights and AdamW state, each
                                                rank writing and reading only its own shard (exact resume);
  trainer.pt, rng_rank{R}.pt                    step, LR schedule, run config; each rank's RNG states.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import CheckpointError, iter_checkpoint, load_pretrained, read_config, save_pretrained
from model import Transformer, empty_model


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands in the job, as the launcher said (launch_environment): one process by default."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    env: bool = False  # launched with env:// variables: the process group meets at MASTER_ADDR:MASTER_PORT


class LaunchError(ValueError):
    """The launcher's environment variables describe no run this process can join; the message names the variable."""


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_environment(environ=os.environ) -> Launch:
    """Read and check the launcher's variables, once, before any work. torchrun (and an srun-style launcher) sets all
    of LAUNCH_VARIABLES; a plain `python ssr.py` sets none of RANK, WORLD_SIZE and LOCAL_RANK. Anything between is a
    leftover (an `export RANK=1` in the shell, a job script that forgot one), and trusting it would make a
    half-distributed run: a rank 1 that writes nothing (rank 0 writes the logs), a WORLD_SIZE=2 process that trains
    alone on half the prompts. So either the variables form a complete env:// launch with 0 <= RANK < WORLD_SIZE,
    or the launch is refused with one LaunchError naming the variable. (MASTER_ADDR/MASTER_PORT alone, with no rank,
    mean one process: nothing to join.)"""
    ranks = [name for name in LAUNCH_VARIABLES[:3] if name in environ]
    if not ranks:
        return Launch()
    fix = (f"a distributed launch sets all of {', '.join(LAUNCH_VARIABLES)} (torchrun does); unset "
           f"{' and '.join(ranks)} to run one process")
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if name in environ:
            try:
                numbers[name] = int(environ[name])
            except ValueError:
                raise LaunchError(f"environment variable {name}={environ[name]!r}: not a whole number; {fix}") from None
    if numbers.get("WORLD_SIZE", 1) < 1:
        raise LaunchError(f"environment variable WORLD_SIZE={numbers['WORLD_SIZE']}: must be at least 1; {fix}")
    for name in LAUNCH_VARIABLES:
        if not environ.get(name, "").strip():
            given = ", ".join(f"{n}={environ[n]}" for n in ranks)
            raise LaunchError(f"environment variable {name} is not set, but {given} is: {fix}")
    rank, world, local_rank = numbers["RANK"], numbers["WORLD_SIZE"], numbers["LOCAL_RANK"]
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
        if not 0 <= value < world:
            raise LaunchError(f"environment variable {name}={value}: must be in [0, WORLD_SIZE={world}); {fix}")
    if not 0 < numbers["MASTER_PORT"] < 2**16:
        raise LaunchError(f"environment variable MASTER_PORT={numbers['MASTER_PORT']}: not a port (1 to 65535); {fix}")
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():  # the GPU this rank would take
        raise LaunchError(f"environment variable LOCAL_RANK={local_rank}: this node has {torch.cuda.device_count()} "
                          f"GPU(s); start at most that many processes per node")
    return Launch(rank, world, local_rank, env=True)


def local_device(launch: Launch) -> torch.device:
    """This rank's device: the GPU of its LOCAL_RANK on its node, made the current one, or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(device)
    return device


def init_distributed(launch: Launch, timeout_minutes: float = 60, one_rank_group: bool = False) -> torch.device:
    """Join the job as `launch` says (launch_environment) and return this rank's device (local_device). Several ranks
    meet in a process group at MASTER_ADDR:MASTER_PORT; one process has no group unless one_rank_group (FSDP2 needs
    one, even for one rank). The timeout is how long a rank waits in a collective for the others (one writing a
    checkpoint file, a long judge batch) before the job fails."""
    device = local_device(launch)
    if launch.world > 1 or one_rank_group:
        # NCCL alone serves CUDA tensors only, and we keep it so (not "cuda:nccl,cpu:gloo"): every collective of
        # ours takes a tensor on `device` (tests/test_distributed.py checks each one on the 2-rank gloo run), so a
        # CPU backend would serve nothing but a mistake, and would serve it quietly: over TCP, on every step, with
        # a second set of connections between all ranks. Without it such a mistake raises where it is made.
        # One process outside a launcher has no rendezvous address: it meets itself in an in-memory store.
        where = (dict(init_method="env://", rank=launch.rank, world_size=launch.world) if launch.env else
                 dict(store=dist.HashStore(), rank=0, world_size=1))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes), **where)
    return device


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# models

def shard(model: Transformer, compute_dtype: torch.dtype = torch.float32) -> Transformer:
    """FSDP2: every layer its own unit (gathered for its forward/backward, then freed), the root holding the
    embedding, final norm and (tied) head. With a bf16 compute_dtype (--precision; the GPU default) the weights are
    gathered and computed in bf16, the gradients reduced in fp32 into the fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if compute_dtype == torch.bfloat16 else MixedPrecisionPolicy())
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


@torch.no_grad()
def load_sharded(path, device: torch.device, dtype: torch.dtype, fill: bool = True,
                 compute_dtype: torch.dtype = torch.float32) -> Transformer:
    """An FSDP2 model whose full weights never exist on any GPU: built on the meta device, sharded, given
    storage for this rank's shards only, then (fill=True) filled from the checkpoint a tensor at a time:
    every rank reads each tensor (host memory: one tensor) and keeps its own rows. FSDP2 shards dim 0
    with torch.chunk, so this rank's shard is chunk number `rank`. fill=False leaves the shards for a
    resume to fill from the saved train state."""
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = shard(model.to(dtype), compute_dtype)
    model.to_empty(device=device)
    if not fill:
        return model
    rank, world = dist.get_rank(), dist.get_world_size()
    params = dict(model.named_parameters())
    for name, tensor in iter_checkpoint(Path(path), cfg, {k: p.shape for k, p in params.items()}):
        local = params[name].to_local()
        chunks = tensor.chunk(world, 0)
        mine = chunks[rank] if rank < len(chunks) else tensor[:0]
        if mine.shape != local.shape:
            raise RuntimeError(f"{name}: FSDP2 shard {tuple(local.shape)} is not torch.chunk's {tuple(mine.shape)}")
        local.copy_(mine)
    return model


def load_trainer_model(path, mode: str, device: torch.device, fill: bool = True,
                       compute_dtype: torch.dtype = torch.float32):
    """The policy being trained, in fp32 (the master weights), wrapped for `mode`: none, ddp or fsdp. compute_dtype:
    what FSDP2 gathers the weights in for the forward and backward (none/ddp: the caller's autocast decides)."""
    if mode == "fsdp":
        return load_sharded(path, device, torch.float32, fill, compute_dtype)
    model = load_pretrained(path, device=device, dtype=torch.float32)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def load_frozen_model(path, mode: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A model that is only run forward (the KL reference): sharded like the policy under FSDP2."""
    model = load_sharded(path, device, dtype) if mode == "fsdp" else load_pretrained(path, device, dtype)
    return model.eval().requires_grad_(False)


def unwrap(model) -> Transformer:
    return model.module if hasattr(model, "module") else model


def gathered_params(model, dtype: torch.dtype, weights: dict | None = None):
    """Yield (name, full tensor in `dtype`) for every parameter, one at a time: under FSDP2 each is gathered
    (cast to `dtype` before the gather, so bf16 moves half the bytes) and can be dropped before the next.
    Extra memory: one parameter, never the model. weights: other tensors sharded like the model's parameters
    and named like them (a policy_snapshot) to gather instead."""
    for name, p in (weights.items() if weights is not None else unwrap(model).named_parameters()):
        p = p.detach().to(dtype)
        yield name, p.full_tensor() if hasattr(p, "full_tensor") else p


@torch.no_grad()
def sync_sampler(model, sampler_model: Transformer, weights: dict | None = None):
    """Copy the trained weights (or `weights`, a policy_snapshot: the lagging judge's) into the sampler's copy in
    place (bf16 on GPU), a parameter at a time. In place matters: the sampler's CUDA graphs captured these tensors'
    addresses."""
    dtype = next(sampler_model.parameters()).dtype
    params = dict(sampler_model.named_parameters())
    for name, tensor in gathered_params(model, dtype, weights):
        params[name].copy_(tensor)


# The lagging judge (--judge-refresh K != 1, --judge-ema B): the self-judge reads weights of its own, a snapshot of the
# policy, held sharded exactly like the trainer's fp32 masters (4 bytes a parameter / world size under FSDP2: 1.8 GiB a
# rank at 7B on 8 GPUs). It needs no sampler of its own: before judging, the snapshot is gathered into the sampler's
# copy (sync_sampler(..., weights=snapshot)), and the step's usual sync after the update puts the policy back. fp32,
# not bf16: a momentum copy moves by (1 - B) x the update, below bf16's resolution for B near 1.

@torch.no_grad()
def policy_snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the policy's fp32 master weights as this rank holds them (FSDP2: its shards, as DTensors)."""
    return {name: p.detach().clone() for name, p in unwrap(model).named_parameters()}


@torch.no_grad()
def refresh_snapshot(snapshot: dict[str, torch.Tensor], model, ema: float = 0.0):
    """snapshot <- policy (ema 0: a refresh), or snapshot <- ema * snapshot + (1 - ema) * policy (a momentum step,
    as lerp: s + (1 - ema) * (p - s)). Shard by shard: no collective."""
    for name, p in unwrap(model).named_parameters():
        if ema:
            snapshot[name].lerp_(p.detach(), 1 - ema)
        else:
            snapshot[name].copy_(p.detach())


def sampler_copy(model, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The sampler's own copy of the policy (bf16 on GPU), filled from the trainer's weights."""
    copy = empty_model(unwrap(model).config, device, dtype).eval()
    sync_sampler(model, copy)
    return copy


# ----------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, config: dict, tokenizer_dir,
                    keep_last: int = 0, max_shard_bytes: int = 5 * 1024**3, judge_weights: dict | None = None,
                    loop_state: dict | None = None):
    """Write OUT/step_N (see the module docstring) under a temporary name, then rename it, so a crash never
    leaves a half checkpoint that --resume trusts; then keep only the newest `keep_last` (0: all). Rank 0's host
    memory holds one weights file of at most max_shard_bytes at a time. A write that fails (a full disk) on any
    rank removes the temporary folder and raises one CheckpointError on every rank; older checkpoints stay.
    judge_weights: the lagging judge's policy_snapshot, saved sharded beside the trainer state; loop_state: what
    else the loop must resume exactly (trainer.pt["loop"])."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = Path(out_dir) / f"step_{step}", Path(out_dir) / f".step_{step}.tmp"
    device = next(unwrap(model).parameters()).device
    # A step_N that is no checkpoint (a folder of the user's) where this save goes is never deleted to make room: the
    # save is refused before anything is written. (ssr.py refuses such a folder when the run starts already.)
    if any_rank(rank == 0 and (final.exists() or final.is_symlink()) and not is_checkpoint(final), device):
        newest = newest_checkpoint(out_dir)
        raise CheckpointError(f"could not write {final.name}: {final} is in the way and is not a checkpoint (no "
                              f"trainer.pt), so it is not deleted: move it out of {out_dir}, then "
                              + (f"continue from the newest complete checkpoint, {newest}, with --resume" if newest
                                 else "start over (no earlier checkpoint exists)"))
    made = None  # rank 0 makes the folder; if it cannot, every rank must hear so now, not after --dist-timeout
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            made = e
    if any_rank(made is not None, device):
        reason = write_error_reason(made, out_dir) if made else "rank 0 could not make it"
        raise CheckpointError(f"could not write {final.name}: cannot make {tmp} ({reason})")
    error = write_checkpoint(tmp, step, model, optimizer, scheduler, config, tokenizer_dir, max_shard_bytes, rank,
                             judge_weights, loop_state)
    if any_rank(error is not None, device):  # every rank learns whether any failed: all rename, or none does
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        newest = newest_checkpoint(out_dir)
        reason = write_error_reason(error, out_dir) if error else "another rank's write failed"
        raise CheckpointError(f"could not write {final.name} ({reason}); "
                              + (f"the newest complete checkpoint, {newest}, is intact" if newest else
                                 "no earlier checkpoint exists"))
    if rank == 0:
        if is_checkpoint(final):  # an older save of this very step: replaced, as os.replace cannot over a folder
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(old)
    barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Is `flag` true on any rank? A collective every rank must make; the tensor lives on the model's device
    because NCCL serves CUDA tensors only (a CPU flag here once failed every GPU run's first checkpoint)."""
    flags = torch.tensor([flag], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def write_checkpoint(tmp: Path, step: int, model, optimizer, scheduler, config: dict, tokenizer_dir,
                     max_shard_bytes: int, rank: int, judge_weights: dict | None = None,
                     loop_state: dict | None = None) -> BaseException | None:
    """Every file of the checkpoint into `tmp`; returns this rank's error, if any (after every collective ran)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    error = None
    model_state, optim_state = get_state_dict(model, optimizer)
    try:  # collective: DCP gathers every rank's write result and raises on all ranks if one failed
        with single_process_quiet():
            dcp.save({"model": model_state, "optim": optim_state} | ({"judge": judge_weights} if judge_weights else {}),
                     checkpoint_id=tmp / "train_state", no_dist=not dist.is_initialized())
    except dcp.api.CheckpointException as e:
        error = e
    cfg = unwrap(model).config
    export_dtype = getattr(torch, cfg.torch_dtype, torch.float32)  # the base checkpoint's own dtype
    shapes = {name: (p.shape, export_dtype) for name, p in unwrap(model).named_parameters()}
    weights = gathered_params(model, export_dtype)

    def next_weight(name: str) -> torch.Tensor:  # save_pretrained asks for the tensors in `shapes` order
        gathered, tensor = next(weights)
        assert gathered == name, (gathered, name)
        return tensor

    try:  # collective too: a rank whose write failed keeps gathering until the end, then raises
        save_pretrained(tmp, cfg, shapes, next_weight, tokenizer_dir=tokenizer_dir, write=rank == 0 and not error,
                        max_shard_bytes=max_shard_bytes)
        device = next(unwrap(model).parameters()).device
        # this rank's own GPU's generator only: a resume may run on a node that sees fewer or more GPUs
        small = {f"rng_rank{rank}.pt": {"cpu": torch.get_rng_state(), "python": random.getstate(),
                                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        if rank == 0:
            small["trainer.pt"] = {"step": step, "scheduler": scheduler.state_dict(), "config": config,
                                   "loop": loop_state or {}}
        for name, obj in small.items():
            buffer = io.BytesIO()  # serialised in memory, then one plain write: a full disk is a clear OSError
            torch.save(obj, buffer)
            (tmp / name).write_bytes(buffer.getvalue())
    except Exception as e:
        error = error or e
    return error


def write_error_reason(error: BaseException, out_dir) -> str:
    """A full disk reads differently from each writer (DCP wraps it, safetensors words it); say it plainly."""
    import torch.distributed.checkpoint as dcp

    if isinstance(error, dcp.api.CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip().splitlines()[0]
    if "unexpected pos" in reason:  # torch.save's stream writer, cut short under it, says only this
        reason = "the file system refused a write: disk full or a file size limit"
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:  # out_dir itself could not be made: nothing to measure
        return reason
    return f"{reason}; {free / 2**20:.0f} MiB free there" if free < 2**30 else reason


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every save/load that it runs in one process; for `python ssr.py` that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_checkpoint(path: Path) -> bool:
    """Does the folder hold a trainer state (trainer.pt; an older ssr's train_state.pt)? A step_N without one is not
    ours: saves are renamed into place whole."""
    return (path / "trainer.pt").exists() or (path / "train_state.pt").exists()


def checkpoints(out_dir) -> list[Path]:
    """Complete step_N checkpoints, oldest first."""
    steps = [(int(m.group(1)), p) for p in Path(out_dir).glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and is_checkpoint(p)]
    return [p for _, p in sorted(steps)]


def newest_checkpoint(out_dir) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict:
    """step_N/trainer.pt (step, LR schedule, run config), or one CheckpointError saying why it cannot be used."""
    if not (path / "trainer.pt").exists():
        raise CheckpointError(f"{path}: written by an older ssr (one train_state.pt), which this version cannot "
                              f"resume; start a new run from its weights with --model {path}")
    try:  # weights_only: a checkpoint folder is data, never code to unpickle
        return torch.load(path / "trainer.pt", weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False for anything it cannot unpickle: wrong advice for a
        # damaged file (and unpickling one could run code), so it is named only when it says something else
        reason = str(e).strip().splitlines()[0]
        reason = "damaged: not a trainer state ssr wrote" if "weights_only" in str(e) else reason
        raise CheckpointError(f"{path / 'trainer.pt'}: cannot read ({reason}); resume from an earlier step_N by "
                              f"deleting {path}") from None


def cut_short_shard(state_dir: Path) -> tuple[Path, int, int] | None:
    """The first DCP shard file shorter than its own metadata says (a copy or a save cut short): (file, its size,
    the size the metadata needs), or None."""
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(state_dir).read_metadata()
    except Exception:
        return None
    ends = {}
    for info in meta.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (state_dir / name).stat().st_size if (state_dir / name).exists() else 0
        if size < end:
            return state_dir / name, size, end
    return None


def load_train_state(path: Path, model, optimizer, scheduler, judge_weights: dict | None = None) -> int:
    """Fill the model's (sharded) fp32 weights, the optimizer and the LR schedule from step_N, and restore this
    rank's RNG states; returns the step to continue from. judge_weights (a policy_snapshot): filled with the saved
    lagging judge's weights, or, from a checkpoint of a run without one, with the policy's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        saved_judge = judge_weights is not None and any(
            key.startswith("judge.") for key in dcp.FileSystemReader(path / "train_state").read_metadata()
            .state_dict_metadata)
        with single_process_quiet():
            dcp.load(state | ({"judge": judge_weights} if saved_judge else {}), checkpoint_id=path / "train_state",
                     no_dist=not dist.is_initialized())
    except (dcp.api.CheckpointException, Exception) as e:  # DCP's exception is a BaseException
        fix = f"resume from an earlier step_N by deleting {path}"
        if short := cut_short_shard(path / "train_state"):
            raise CheckpointError(f"{short[0]}: cut short ({short[1]} of its {short[2]} bytes); {fix}") from None
        reason = write_error_reason(e, path).split(". ")[0]
        raise CheckpointError(f"{path / 'train_state'}: cannot read the saved train state ({reason}); {fix}") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    if judge_weights is not None and not saved_judge:  # --resume-override judge_refresh onto a run that had none
        refresh_snapshot(judge_weights, model)
    trainer = read_trainer_state(path)
    scheduler.load_state_dict(trainer["scheduler"])
    # the train state reshards to any world size (DCP); RNG states are per rank, restored where one was saved
    rng_file = path / f"rng_rank{dist.get_rank() if dist.is_initialized() else 0}.pt"
    if rng_file.exists():
        try:
            rng = torch.load(rng_file, weights_only=True)
        except Exception:
            raise CheckpointError(f"{rng_file}: cannot read (damaged); resume from an earlier step_N by deleting "
                                  f"{path}") from None
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        device = next(unwrap(model).parameters()).device
        if (cuda_state := cuda_rng_state(rng["cuda"], device)) is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    return trainer["step"]


def cuda_rng_state(saved, device: torch.device) -> torch.Tensor | None:
    """The CUDA generator state to restore on `device` from an rng file's "cuda" entry: this rank's GPU's state (one
    tensor), or, from a checkpoint of an older ssr, the entry for the device's index in the list of every GPU the
    saving process saw, if it saw that many. None: nothing to restore (a CPU run, either side)."""
    if device.type != "cuda":
        return None
    if isinstance(saved, list):
        return saved[device.index] if device.index is not None and device.index < len(saved) else None
    return saved
