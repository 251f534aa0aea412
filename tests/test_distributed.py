"""distributed.py on 2 ranks (gloo, CPU, real FSDP2): sharded loading equals a plain load, and the weight sync and
the checkpoint save hold at most one gathered tensor besides the one being gathered (counted, not assumed)."""
import json
import weakref

import torch

import distributed
from checkpoint import load_pretrained, make_tiny_model
from conftest import free_port, run_ranks


def count_live_gathers() -> list:
    """Wrap distributed.gathered_params: at every gather, record the bytes of earlier gathered tensors still alive."""
    real, alive_bytes = distributed.gathered_params, []

    def counting(model, dtype):
        refs = []
        for name, tensor in real(model, dtype):
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
