"""kernels/decode_attention.py: the Triton decode-attention kernel and its torch reference, each against
torch's own scaled_dot_product_attention run row by row on exactly that row's live keys.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.require_interpreted_triton); with one
it compiles for real on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import require_interpreted_triton
from kernels.decode_attention import decode_attention, decode_attention_torch, plan_splits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# live positions per row: one key only, block edges (BLOCK_N = 64), and rows far longer than the rest
POS = [0, 63, 64, 5, 200, 1, 127]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def case(H, Hkv, D, dtype, pos=POS, slots=9, S=216, seed=0):
    """q (B, H, D) and a cache with more slots than rows; every position past a row's end holds NaN, so a
    kernel that reads a single dead key (or another row's slot) turns that row's output into NaN."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(len(pos), H, D, generator=gen)
    k = torch.randn(slots, Hkv, S, D, generator=gen)
    v = torch.randn(slots, Hkv, S, D, generator=gen)
    pos = torch.tensor(pos)
    dead = torch.arange(S) > torch.cat([pos, torch.full((slots - len(pos),), -1)])[:, None]  # (slots, S)
    k[dead[:, None, :, None].expand_as(k)] = float("nan")
    v[dead[:, None, :, None].expand_as(v)] = float("nan")
    return [t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), pos)]


def sdpa_rows(q, k, v, pos):
    """The oracle: SDPA in fp32 for each row alone over its live keys 0..pos[i], GQA by SDPA itself."""
    out = []
    for i, p in enumerate(pos.tolist()):
        qi = q[i, :, None].float()[None]  # (1, H, 1, D)
        ki, vi = (t[i, :, :p + 1].float()[None] for t in (k, v))  # (1, Hkv, p + 1, D)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, enable_gqa=True)[0, :, 0])
    return torch.stack(out)  # (B, H, D) fp32


# each of MHA / GQA 7 (padded to 16 query rows) / GQA 4, head_dim 64 / 128, fp32 / bf16, one split / several
@pytest.mark.parametrize("H,Hkv,D,dtype,num_splits", [(4, 4, 64, torch.float32, 3), (14, 2, 64, torch.bfloat16, 1),
                                                      (8, 2, 128, torch.bfloat16, 3), (8, 2, 128, torch.float32, 1)])
def test_kernel_matches_sdpa(H, Hkv, D, dtype, num_splits):
    if DEVICE == "cpu":
        require_interpreted_triton()
    q, k, v, pos = case(H, Hkv, D, dtype)
    out = decode_attention(q, k, v, pos, length=201, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), sdpa_rows(q, k, v, pos), atol=TOL[dtype], rtol=TOL[dtype])


def test_kernel_head_dim_not_a_power_of_two():
    if DEVICE == "cpu":
        require_interpreted_triton()
    q, k, v, pos = case(6, 2, 80, torch.float32, pos=[17, 0, 130])
    out = decode_attention(q, k, v, pos)  # default length (the whole slot) and split plan
    torch.testing.assert_close(out, sdpa_rows(q, k, v, pos), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 4, 7])
def test_reference_matches_sdpa(num_splits):
    q, k, v, pos = case(14, 2, 64, torch.float32)
    torch.testing.assert_close(decode_attention_torch(q, k, v, pos, num_splits), sdpa_rows(q, k, v, pos),
                               atol=2e-5, rtol=2e-5)


def test_split_plan():
    cpu = torch.device("cpu")  # one "SM": splitting never pays, whatever the length
    assert plan_splits(64, 4, 2048, cpu) == 1
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        dev = torch.device("cuda")
        assert plan_splits(1, 4, 2048, dev) == min(-(-4 * sms // 4), 2048 // 64)  # short batch: split long rows
        assert plan_splits(1, 4, 10, dev) == 1  # never a split shorter than one block
