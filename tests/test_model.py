"""model.py against Hugging Face transformers: the same logits, for every architecture we support."""
import pytest
import torch
import transformers

from checkpoint import load_pretrained, make_tiny_model

# (arch, overrides): tied and untied heads, GQA and MHA, Qwen3 with a head_dim that is not hidden/heads,
# Llama with and without attention biases (q/k/v and o_proj) and with its own RoPE theta
CONFIGS = {
    "qwen2-untied-gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-tied-mha": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3-untied-gqa": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-tied-headdim": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                         tie_word_embeddings=True)),
    "llama-tied-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     rope_theta=100000.0)),
    "llama-untied-bias-headdim": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                                attention_bias=True)),
}
HF_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def hf_load(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def random_ids(vocab, batch=3, length=19, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_loads_in_hf_with_same_logits(tmp_path, name):
    arch, dims = CONFIGS[name]
    path = make_tiny_model(tmp_path, arch=arch, seed=1, **dims)
    ours = load_pretrained(path)
    theirs = hf_load(path)
    assert type(theirs).__name__ == HF_CLASSES[arch]
    ids = random_ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_positions_are_absolute(tiny_model_dir):
    """Explicit positions (as the sampler passes them) must mean what HF's position_ids mean."""
    ours, theirs = load_pretrained(tiny_model_dir), hf_load(tiny_model_dir)
    ids = random_ids(ours.config.vocab_size, batch=2, length=7)
    # RoPE only sees relative offsets, so a constant shift would change nothing: use uneven gaps
    positions = torch.tensor([[0, 1, 2, 5, 6, 9, 30], [3, 4, 8, 9, 10, 40, 41]])
    with torch.no_grad():
        ours_logits = ours(ids, positions=positions)
        torch.testing.assert_close(ours_logits, theirs(ids, position_ids=positions).logits, atol=1e-4, rtol=0)
        assert not torch.allclose(ours_logits, ours(ids), atol=1e-3)  # and positions do matter


def test_bf16_load_close_to_fp32(tiny_model_dir):
    fp32 = load_pretrained(tiny_model_dir, dtype=torch.float32)
    bf16 = load_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = random_ids(fp32.config.vocab_size)
    with torch.no_grad():
        ref, low = fp32(ids), bf16(ids).float()
    # bf16 keeps 8 mantissa bits: a relative error of a few 1e-3 per op, a couple of 1e-2 after a network
    assert ((low - ref).norm() / ref.norm()).item() < 2e-2
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_grad_checkpointing_same_gradients(tiny_model_dir):
    ids = random_ids(300, batch=2, length=9)
    grads = []
    for ckpt in (False, True):
        model = load_pretrained(tiny_model_dir)
        model.grad_checkpointing = ckpt
        model(ids).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_logprob_backend_reaches_the_fused_head(tiny_model_dir):
    """model(ids, targets=..., logprob_backend=...) picks the head's backend (the --logprob-backend fallback): torch
    is the CPU path, Triton without a GPU needs its interpreter, so here only its name is checked."""
    from kernels import LOGPROB_BACKENDS

    assert LOGPROB_BACKENDS == ("auto", "triton", "torch")
    model = load_pretrained(tiny_model_dir, device="cpu", dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = ids.roll(-1, 1)
    ref = model(ids).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(model(ids, targets=targets, logprob_backend="torch"), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        model(ids, targets=targets, logprob_backend="cuda")
