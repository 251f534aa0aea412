"""distributed.py on 2 ranks (gloo, CPU, real FSDP2): sharded loading equals a plain load, and the weight sync and
the checkpoint save hold at most one gathered tensor besides the one being gathered (counted, not assumed); every
collective the training loop makes takes a tensor on the run's device, as NCCL requires; the trainer frees its
model before it destroys the process group (a hang at exit otherwise)."""
import json
import os
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import distributed
from checkpoint import load_pretrained, make_tiny_model
from conftest import free_port, run_ranks

ROOT = Path(__file__).resolve().parent.parent


def count_live_gathers() -> list:
    """Wrap distributed.gathered_params: at every gather, record the bytes of earlier gathered tensors still alive."""
    real, alive_bytes = distributed.gathered_params, []

    def counting(model, dtype, weights=None):
        refs = []
        for name, tensor in real(model, dtype, weights):
            alive_bytes.append(sum(t.nbytes for t in (r() for r in refs) if t is not None))
            refs.append(weakref.ref(tensor))
            yield name, tensor

    distributed.gathered_params = counting
    return alive_bytes


def _worker(rank, port, model_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    if rank == 0:  # built here, not in the parent: forking after the tokenizers library has run can crash
        make_tiny_model(model_dir, num_hidden_layers=3, tie_word_embeddings=True)
    dist.barrier()
    cpu = torch.device("cpu")
    model = distributed.load_trainer_model(model_dir, "fsdp", cpu)
    plain = load_pretrained(model_dir)
    result = {"tied": model.lm_head.weight is model.embed_tokens.weight,
              "shards": [p.to_local().shape[0] for p in model.parameters()],
              "equal": all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), plain.parameters()))}
    ids = torch.randint(0, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result["logits"] = torch.allclose(model(ids), plain(ids), atol=1e-5)
    model.reshard()  # a forward with no backward leaves FSDP2's root gathered

    alive = count_live_gathers()
    copy = distributed.sampler_copy(model, cpu, torch.float32)
    result["sync_alive"], result["gathers"] = max(alive), len(alive)
    result["sync_equal"] = all(torch.equal(a, b) for a, b in zip(copy.parameters(), plain.parameters()))
    alive.clear()
    layer_bytes = sum(p.nbytes for p in plain.layers[0].parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # a step that changes nothing: the trainer
    model(ids).sum().backward()                                  # always saves after one, with AdamW state
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    distributed.save_checkpoint(out_dir, 1, model, optimizer, scheduler, {}, model_dir, max_shard_bytes=layer_bytes)
    result["save_alive"], result["layer_bytes"] = max(alive), layer_bytes
    result["largest"] = max(p.nbytes for p in plain.parameters())
    with open(f"{out_dir}/result_{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_fsdp_load_sync_and_save_one_tensor_at_a_time(tmp_path):
    model_dir, out = tmp_path / "m", tmp_path / "out"
    run_ranks(_worker, (free_port(), str(model_dir), str(out)))
    plain = load_pretrained(model_dir)
    results = [json.loads((out / f"result_{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["tied"] and res["equal"] and res["logits"], res  # meta init + sharding keep weights and tie
        # each rank holds its torch.chunk of every parameter's rows, not the whole tensor
        assert res["shards"] == [p.shape[0] // 2 + (p.shape[0] % 2 if r == 0 else 0) for p in plain.parameters()]
        assert res["gathers"] == len(list(plain.parameters())) and res["sync_equal"]
        # at each gather at most the previous tensor is still referenced (the consumer's loop variable)
        assert res["sync_alive"] <= res["largest"], res
        # saving: a weights file's tensors wait together on the host for the write, here one layer's worth
        assert res["save_alive"] <= res["layer_bytes"], res
    saved = load_pretrained(out / "step_1")
    assert all(torch.equal(p, q) for p, q in zip(saved.parameters(), plain.parameters()))


# ----------------------------------------------------------------------------------------------------
# every collective on the run's device. Under NCCL (the GPU run) a collective on a CPU tensor raises; gloo takes
# CPU tensors, and here the run's device *is* the CPU, so a 2-rank gloo run cannot see the mistake by itself.
# The mode below follows where each tensor would live if the run's device were not the host: on it when made
# with an explicit device= (or .to(device)), or computed from such a tensor; on the host otherwise (a bare
# torch.tensor([...]), a .cpu(), anything loaded or built from Python data). Every collective made from this
# project's code (not torch's own: FSDP2 and DCP pick their devices) must take only device tensors.

class RunDeviceTracker(TorchFunctionMode):
    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        named = kwargs.get("device")
        if func is torch.Tensor.to and named is None:  # .to(device[, dtype]) names it positionally
            named = next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            on_device = False
        elif named is not None:
            on_device = torch.device(named).type == self.device.type
        else:
            on_device = any(getattr(t, "_on_run_device", False) for t in tree_leaves((args, kwargs))
                            if isinstance(t, torch.Tensor))
        if on_device:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    t._on_run_device = True
        return out


TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single", "send", "recv")


def record_collectives(calls: list):
    """Wrap torch.distributed's tensor collectives: each call from this repository's code appends
    (file:line, whether every tensor it passes is on the run's device)."""
    import torch.distributed as dist

    def wrap(name, real):
        def collective(*args, **kwargs):
            caller = sys._getframe(1)
            if Path(caller.f_code.co_filename).resolve().parent == ROOT:
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                calls.append((f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}",
                              all(getattr(t, "_on_run_device", False) for t in tensors)))
            return real(*args, **kwargs)
        return collective

    for name in TENSOR_COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def record_model_alive_at_destroy(ssr, alive: list):
    """Keep a weak reference to the model the trainer wraps (DDP or FSDP2) and, when it destroys the process group,
    append whether that model is still alive. A DDP Reducer that outlives the group frees the group's last reference
    with the GIL held and can deadlock in gloo's destructor (pytorch/pytorch#56297). It hung test_grpo's 2-rank DDP
    test in CI, and 4 of 24 repeats of it after test_gpu_check (none of 30 run alone): a race, too rare to catch by
    running it once, so this records its precondition."""
    import torch.distributed as dist

    models, real_load, real_destroy = [], ssr.load_trainer_model, dist.destroy_process_group

    def load_trainer_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    def destroy_process_group(*args, **kwargs):
        alive.append(any(ref() is not None for ref in models))
        return real_destroy(*args, **kwargs)

    ssr.load_trainer_model, dist.destroy_process_group = load_trainer_model, destroy_process_group


def _train_worker(rank, port, model_dir, out_dir, args):
    import smoke
    import ssr

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # the gloo twin of a GPU run, on any host: on a GPU machine the trainer would take cuda:RANK over NCCL (2 ranks
    # on 1 GPU fail) and every tensor would be on a device RunDeviceTracker(cpu) does not follow
    torch.cuda.is_available = lambda: False
    torch.set_num_threads(1)
    data = str(ROOT / "data" / "sample.jsonl")
    if rank == 0:  # built here, not in the parent: forking after the tokenizers library has run can crash
        smoke.make_smoke_model(model_dir + ".tmp", data)
        os.rename(model_dir + ".tmp", model_dir)
    while not os.path.exists(model_dir):  # run_ranks' timeout bounds the wait
        time.sleep(0.1)
    calls, alive_at_destroy = [], []
    record_collectives(calls)
    record_model_alive_at_destroy(ssr, alive_at_destroy)
    with RunDeviceTracker(torch.device("cpu")):
        ssr.main(["--model", model_dir, "--data", data, "--out-dir", out_dir, *args])
    Path(out_dir, f"collectives_{rank}.json").write_text(json.dumps(calls))
    Path(out_dir, f"alive_at_destroy_{rank}.json").write_text(json.dumps(alive_at_destroy))


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_training_loop_collectives_on_device_and_model_freed_before_the_group(tmp_path, mode):
    """2 ranks of the training loop (sample, update, log, save): each collective of ours takes device tensors, and
    the trainer's model is gone when the process group is destroyed. The save's failure flag once was a bare
    torch.tensor([...]): a CPU tensor that NCCL refuses at the first checkpoint. The DDP model once outlived the
    group: a hang at exit that a CI run met (see record_model_alive_at_destroy)."""
    args = ["--dist", mode, "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
            "--micro-batch-size", "4", "--sampler-batch-size", "4", "--reward", "judge:letter_share_reward",
            "--judge-ema", "0.5"]  # the lagging judge: a snapshot (DTensor shards under fsdp), a momentum step
    model_dir, out = tmp_path / "model", tmp_path / "out"
    run_ranks(_train_worker, (free_port(), str(model_dir), str(out), args), timeout=240)
    for rank in (0, 1):
        calls = json.loads((out / f"collectives_{rank}.json").read_text())
        sites = {site.split(":")[0] for site, _ in calls}
        assert {"ssr.py", "grpo.py", "distributed.py"} <= sites, calls  # the log, the update and the save ran
        assert all(on_device for _, on_device in calls), [site for site, on_device in calls if not on_device]
        assert json.loads((out / f"alive_at_destroy_{rank}.json").read_text()) == [False], rank


# ----------------------------------------------------------------------------------------------------
# a checkpoint's edges on several GPUs, on CPU

def _mkdir_fails_worker(rank, port, model_dir, out_dir):
    import datetime

    import torch.distributed as dist

    from checkpoint import CheckpointError

    # a short collective timeout: the bug this catches left rank 1 waiting in a barrier for --dist-timeout
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    model = load_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if rank == 0:  # rank 0 makes the temp folder: make that fail as a read-only or full file system would
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))
        Path.mkdir = refuse
    start, outcome = time.monotonic(), "saved"
    try:
        distributed.save_checkpoint(out_dir, 1, model, optimizer, scheduler, {}, model_dir)
    except CheckpointError as e:
        outcome = f"CheckpointError: {e}"
    except Exception as e:  # what the old code raised: a raw OSError on rank 0, a collective timeout elsewhere
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir).parent.joinpath(f"outcome_{rank}.json").write_text(
        json.dumps({"outcome": outcome, "seconds": time.monotonic() - start}))
    dist.destroy_process_group()


def test_a_checkpoint_folder_rank_0_cannot_make_stops_every_rank_at_once(tmp_path):
    """Rank 0 makes OUT/.step_N.tmp; when it cannot, every rank raises the same one-line CheckpointError at once,
    instead of rank 0 raising alone while the others wait in a barrier for --dist-timeout (60 minutes)."""
    model_dir = make_tiny_model(tmp_path / "m")
    run_ranks(_mkdir_fails_worker, (free_port(), str(model_dir), str(tmp_path / "out")), timeout=240)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"outcome_{rank}.json").read_text())
        assert result["outcome"].startswith("CheckpointError: could not write step_1: cannot make "), result
        assert "Permission denied" in result["outcome"] or rank == 1, result
        assert result["seconds"] < 20, result


def test_rng_restore_on_a_node_with_fewer_or_more_gpus(tmp_path, monkeypatch):
    """A checkpoint's RNG file holds this rank's own GPU generator; one written by an older ssr holds every GPU the
    saving process saw (8 on an 8-GPU node). Resuming on a 1-GPU node once called set_rng_state_all with all 8, past
    the device count; now each rank restores its own device's state, if the file has one for it."""
    model_dir = make_tiny_model(tmp_path / "m")
    model = load_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    distributed.save_checkpoint(tmp_path / "out", 1, model, optimizer, scheduler, {}, model_dir)
    rng_file = tmp_path / "out" / "step_1" / "rng_rank0.pt"
    state = torch.load(rng_file, weights_only=True)
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    torch.save(state | {"cuda": eight}, rng_file)  # the older layout, from an 8-GPU node

    set_on = []  # a 1-GPU node: setting any device but cuda:0 raises, as torch.cuda does there

    def set_rng_state(new_state, device="cuda"):
        index = torch.device(device).index or 0
        if index >= 1:
            raise RuntimeError(f"invalid device ordinal {index}: this node has 1 GPU")
        set_on.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_rng_state(s, i)
                                                                         for i, s in enumerate(states)])
    assert distributed.load_train_state(tmp_path / "out" / "step_1", model, optimizer, scheduler) == 1
    assert set_on == []  # a CPU run restores no CUDA generator
    # on a GPU: the state of the rank's own device, or none where the file has none for it
    cuda = lambda index: torch.device("cuda", index)
    assert distributed.cuda_rng_state(eight, cuda(0)) is eight[0] and distributed.cuda_rng_state(eight, cuda(7)) is eight[7]
    assert distributed.cuda_rng_state(eight[:1], cuda(3)) is None  # saved on 1 GPU, resumed as local rank 3 of 4
    assert distributed.cuda_rng_state(eight[2], cuda(5)) is eight[2]  # this version's file: the rank's own state
    assert distributed.cuda_rng_state(None, cuda(0)) is None and distributed.cuda_rng_state(eight, torch.device("cpu")) is None
