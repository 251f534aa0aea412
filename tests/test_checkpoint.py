"""checkpoint.py: HF checkpoints that load both ways (sharded too), the tokenizer, and one clear error for
every broken directory."""
import json
import re
import shutil

import pytest
import torch
import transformers

import judge
from checkpoint import CheckpointError, load_pretrained, load_tokenizer, make_tiny_model, save_model
from test_model import CONFIGS, hf_load, random_ids


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_sharded_checkpoint_loads_in_ours(tmp_path, name):
    arch, dims = CONFIGS[name]
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[arch]
    head_dim = dims.get("head_dim", 64 // dims["num_attention_heads"])
    cfg = cls(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=dims["num_attention_heads"], num_key_value_heads=dims["num_key_value_heads"],
              head_dim=head_dim, rope_theta=5000.0, tie_word_embeddings=dims.get("tie_word_embeddings", False),
              **({"attention_bias": dims["attention_bias"]} if "attention_bias" in dims else {}))
    torch.manual_seed(2)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; random values test their placement
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path)
    ids = random_ids(320)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_save_roundtrip_sharded_and_tokenizer_copied(tmp_path, tiny_model_dir):
    ours = load_pretrained(tiny_model_dir)
    out = tmp_path / "saved"
    save_model(ours, out, tokenizer_dir=tiny_model_dir, max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    again = load_pretrained(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = random_ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_load(out)(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_tied_head_stays_tied_after_load(tmp_path):
    path = make_tiny_model(tmp_path, tie_word_embeddings=True)
    model = load_pretrained(path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_tokenizer_matches_hf_and_roundtrips(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["Hello, world!", "机器翻译很有趣。 <think>x</think> <answer>好</answer>", "  spaces\nand\ttabs"]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_ids[0] == tok.token_id("<|endoftext|>") == hf_tok.eos_token_id
    assert tok.token_id("<|im_end|>") in tok.eos_ids
    assert tok.pad_id == tok.token_id("<|endoftext|>")
    chat = judge.chat_prompt([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat)[0] == tok.token_id("<|im_start|>")  # special tokens are single ids


# ----------------------------------------------------------------------------------------------------
# bad input: one clear message naming the file and the problem

def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_pretrained(tmp_path / "nope")


def test_unsupported_architecture_and_missing_key(tmp_path, tiny_model_dir):
    path = copy_dir(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match=r"config.json: unsupported architectures \['GPT2LMHeadModel'\]"):
        load_pretrained(path)
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing required key 'hidden_size'"):
        load_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(path)


@pytest.mark.parametrize("edit, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling type 'llama3' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_parameters type 'yarn' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_llama_features_refused(tmp_path, edit, message):
    """What the network does not compute is refused with one line naming config.json and the key."""
    path = make_tiny_model(tmp_path, arch="llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(CheckpointError, match=f"config.json: {message}") as err:
        load_pretrained(path)
    assert "\n" not in str(err.value)


def rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_misshapen_tensor(tmp_path, tiny_model_dir):
    path = copy_dir(tiny_model_dir, tmp_path / "m")
    rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(path)
    path = copy_dir(tiny_model_dir, tmp_path / "m2")
    rewrite_tensors(path, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(3,\), expected \(64,\)"):
        load_pretrained(path)
    path = copy_dir(tiny_model_dir, tmp_path / "m3")
    rewrite_tensors(path, lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        load_pretrained(path)


def test_corrupt_safetensors(tmp_path, tiny_model_dir):
    path = copy_dir(tiny_model_dir, tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors file"):
        load_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)  # garbage
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(path)


def test_missing_tokenizer(tmp_path, tiny_model_dir):
    path = copy_dir(tiny_model_dir, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: no such file"):
        load_tokenizer(path)


@pytest.mark.parametrize("edit, message", [
    ([1, 2], "not a JSON object"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be a whole number >= 1"),
    ({"hidden_size": "64"}, "hidden_size is '64'; it must be a whole number >= 1"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers is 2.5; it must be a whole number >= 1"),
    ({"vocab_size": True}, "vocab_size is True; it must be a whole number >= 1"),
    ({"rope_theta": "1e6"}, "rope_theta is '1e6'; it must be a finite number > 0"),
    ({"rms_norm_eps": -1}, "rms_norm_eps is -1; it must be a finite number > 0"),
    # null is not "use the default": a null rope_theta means "no RoPE" to some families
    ({"rope_theta": None}, "rope_theta is null; it must be a finite number > 0"),
    ({"rms_norm_eps": None}, "rms_norm_eps is null; it must be a finite number > 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}},
     "rope_parameters.rope_theta is null; it must be a finite number > 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 66, "head_dim": None}, "hidden_size 66 is not a multiple of num_attention_heads 4"),
    ({"rope_scaling": "yes"}, "rope_scaling is 'yes'; it must be a JSON object"),
    ({"architectures": "Qwen2ForCausalLM"}, "architectures is 'Qwen2ForCausalLM'; it must be a list"),
])
def test_malformed_config_values_are_one_line(tmp_path, tiny_model_dir, edit, message):
    """A hand-edited config.json: its type or range named in one line by read_config (which every program reads
    first, before any weight), never a traceback from inside the model."""
    from checkpoint import read_config

    path = copy_dir(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit if isinstance(edit, list) else cfg | edit))
    with pytest.raises(CheckpointError, match=f"config.json: {re.escape(message)}") as err:
        read_config(path)
    assert "\n" not in str(err.value)


def test_convert_gguf_cli_errors_are_one_line(tmp_path, capsys):
    """A file that is not GGUF is named before transformers or gguf read it; argparse errors are one line too."""
    from checkpoint import main

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    for argv, line in ((["convert-gguf", "--gguf", str(fake), "--out", str(tmp_path / "o")],
                        f"checkpoint.py: error: {fake}: not a GGUF file (it does not start with the bytes 'GGUF')"),
                       (["convert-gguf", "--gguf", str(fake)],
                        "checkpoint.py: error: the following arguments are required: --out")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [line]
    assert not (tmp_path / "o").exists()


def test_null_config_value_through_ssr_plan_judge_model(tmp_path, tiny_model_dir, data_file, capsys):
    """`ssr.py --plan --judge-model DIR`, a judge whose config.json says "rope_theta": null: one line naming the file,
    exit status 2 (the plan reads the judge's config too), not a TypeError from float(None)."""
    import ssr

    judge_dir = copy_dir(tiny_model_dir, tmp_path / "judge")
    cfg = json.loads((judge_dir / "config.json").read_text())
    (judge_dir / "config.json").write_text(json.dumps(cfg | {"rope_theta": None}))
    with pytest.raises(SystemExit) as exit_info:
        ssr.main(["--plan", "--model", str(tiny_model_dir), "--judge-model", str(judge_dir), "--data", str(data_file),
                  "--out-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ssr: error: {judge_dir / 'config.json'}: rope_theta is null; it must be a finite number > 0"]
