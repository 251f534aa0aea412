"""kernels/: token log-probs (+ entropy) from logits and from the fused linear head, both backends, against
fp32 torch.log_softmax + gather on the same inputs: values and gradients.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; with one they also compile
for real on CUDA tensors (every test is parametrized over the devices present). A Triton case on CPU tensors runs
only in the interpreter (conftest.require_interpreted_triton): on a CUDA host it skips, saying why.
"""
import pytest
import torch

import kernels
from conftest import require_interpreted_triton
from kernels import linear_token_logprobs, logprobs_torch, logprobs_triton, token_logprobs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [(b, d) for d in DEVICES for b in ("torch", "triton")]
# (atol, rtol) of values and gradients. bf16: the inputs are bf16 but the reference is fp32 math on them,
# so only our bf16 gradient outputs (and, in the linear path, bf16 logits from the matmul) are rounded.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture(autouse=True)
def triton_on_cpu_needs_the_interpreter(request):
    params = getattr(request.node, "callspec", None)
    if params and params.params.get("backend") == "triton" and params.params.get("device") == "cpu":
        require_interpreted_triton()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Shrink every block and chunk so that the small test shapes cross many block and chunk boundaries."""
    monkeypatch.setattr(logprobs_triton, "BLOCK", 128)
    monkeypatch.setattr(logprobs_torch, "BLOCK_ELEMS", 1000)  # 142 columns per block at N = 7
    monkeypatch.setattr(kernels, "CHUNK_ELEMS", 4000)  # 444 vocab columns per chunk at N = 9


def reference(logits, targets, temperature):
    """fp32 log-probs of targets and entropies, (N,) each."""
    logp = torch.log_softmax(logits.float() / temperature, -1)  # (N, V)
    return logp.gather(1, targets[:, None]).squeeze(1), torch.special.entr(logp.exp()).sum(-1)


def hard_logits(N, V, device, dtype):
    """Random logits with the awkward cases planted: the max in the last block after a run of -1e4,
    -inf columns filling whole blocks (the first one included), targets 0 and V-1."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=gen) * 4
    targets = torch.randint(V, (N,), generator=gen)
    targets[0] = V - 1
    logits[0, : V // 2] = -1e4
    logits[0, -3] = 30.0
    if N > 1:
        targets[1] = 0
        logits[2, :300] = float("-inf")
        logits[2, 700:900] = float("-inf")
        targets[2] = 500
    return logits.to(device, dtype), targets.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs(backend, device, dtype, temperature):
    logits, targets = hard_logits(7, 1531, device, dtype)  # V: not a multiple of any block
    g = torch.randn(7, generator=torch.Generator().manual_seed(1)).to(device)  # upstream gradient
    atol, rtol = TOL[dtype]

    ours = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(ours, targets, temperature, return_entropy=True, backend=backend)
    (logp * g).sum().backward()
    ref = logits.float().requires_grad_()  # fp32 leaf: an fp32 reference gradient
    ref_logp, ref_entropy = reference(ref, targets, temperature)
    (ref_logp * g).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32 and ours.grad.dtype == dtype
    assert not entropy.requires_grad  # documented: entropy is returned detached
    torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-4)  # fp32 math on the same inputs
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.grad.float(), ref.grad, atol=atol * g.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_logprobs_single_row(backend, device):
    logits, targets = hard_logits(1, 1531, device, torch.float32)
    ours = logits.clone().requires_grad_()
    logp = token_logprobs(ours, targets, backend=backend)  # no entropy asked: a tensor, not a tuple
    logp.sum().backward()
    ref = logits.float().requires_grad_()  # fp32 leaf: an fp32 reference gradient
    ref_logp = reference(ref, targets, 1.0)[0]
    ref_logp.sum().backward()
    assert logp.shape == (1,)
    torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-4)


def linear_case(N, V, H, device, dtype):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    weight[-5] *= 6  # a large logit in the last vocab chunk: the running max must be rescaled
    # targets on vocab chunk (444 columns) and block edges, plus 0 and V-1
    targets = torch.tensor([V - 1, 0, 443, 444, 445, 887, 888, V - 5, 1000])[:N]
    g = torch.randn(N, generator=gen)
    return [t.to(device) for t in (hidden.to(dtype), weight.to(dtype), targets, g)]


def check_linear(hidden, weight, targets, g, temperature, backend, tol):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = linear_token_logprobs(h, w, targets, temperature, return_entropy=True, backend=backend)
    (logp * g).sum().backward()
    rh, rw = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref_logp, ref_entropy = reference(rh @ rw.T, targets, temperature)
    (ref_logp * g).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32
    assert h.grad.dtype == w.grad.dtype == hidden.dtype
    torch.testing.assert_close(logp, ref_logp, atol=tol, rtol=tol)
    torch.testing.assert_close(entropy, ref_entropy, atol=tol, rtol=tol)
    for ours, ref in ((h.grad, rh.grad), (w.grad, rw.grad)):  # relative to the gradient's overall size
        assert (ours.float() - ref).norm() <= tol * ref.norm()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_token_logprobs(backend, device, dtype, temperature):
    hidden, weight, targets, g = linear_case(9, 2053, 32, device, dtype)
    check_linear(hidden, weight, targets, g, temperature, backend, 1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_linear_token_logprobs_single_token(backend, device):
    hidden, weight, targets, g = linear_case(1, 2053, 32, device, torch.float32)
    check_linear(hidden, weight, targets, g, 1.3, backend, 1e-4)


def test_linear_under_autocast():
    """fp32 weights under bf16 autocast: bf16 matmuls, fp32 outputs, fp32 gradients for the fp32 leaves."""
    hidden, weight, targets, g = linear_case(9, 2053, 32, "cpu", torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = linear_token_logprobs(h, w, targets)
    (logp * g).sum().backward()
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logp = reference(rh @ rw.T, targets, 1.0)[0]
    (ref_logp * g).sum().backward()
    assert logp.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=3e-2, rtol=3e-2)
    assert (w.grad - rw.grad).norm() <= 3e-2 * rw.grad.norm()


def test_torch_backend_never_holds_full_logits():
    """No fp32 tensor made during forward+backward comes near (N, V): the linear path makes no (N, V)
    tensor at all, the logits path only the gradient it returns, in the logits' dtype (bf16 here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFp32(TorchDispatchMode):  # records the numel of the largest fp32 tensor any op returns
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.numel = max(self.numel, t.numel())
            return out

    N, V, H = 64, 3000, 4
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(V, (N,))
    logits = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    for fn, inputs in ((linear_token_logprobs, (hidden, weight)), (token_logprobs, (logits,))):
        with LargestFp32() as mode:
            logp, entropy = fn(*inputs, targets, return_entropy=True, backend="torch")
            logp.sum().backward()
        assert mode.numel <= max(kernels.CHUNK_ELEMS, V * H) < N * V // 8  # V * H: weight.grad


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_linear_ignored_targets(backend, device):
    """Negative targets ask for nothing: 0 log-prob and entropy, no gradient from those rows; the other rows
    are exactly what they are alone. All ignored: zeros that still backward."""
    hidden, weight, targets, g = linear_case(9, 2053, 32, device, torch.float32)
    ignored = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool, device=device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = linear_token_logprobs(h, w, torch.where(ignored, kernels.IGNORE, targets), return_entropy=True,
                                          backend=backend)
    (logp * g).sum().backward()
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logp, ref_entropy = reference(rh[~ignored] @ rw.T, targets[~ignored], 1.0)
    (ref_logp * g[~ignored]).sum().backward()
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (h.grad[ignored] == 0).all()
    torch.testing.assert_close(logp[~ignored], ref_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy[~ignored], ref_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.grad, rh.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad, rw.grad, atol=1e-4, rtol=1e-4)
    h.grad = None
    linear_token_logprobs(h, w, torch.full_like(targets, kernels.IGNORE), backend=backend).sum().backward()
    assert (h.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_at_production_blocks(monkeypatch, dtype):
    """The Triton kernels at the block and chunk sizes the GPU runs (BLOCK 4096 columns, CHUNK_ELEMS 2**25), which
    the other tests shrink: several full blocks and a short last one per row, values and gradients, through
    token_logprobs and the fused linear head. (The interpreter checks the arithmetic, not the GPU's shared-memory
    or register limits: those only a compile on CUDA checks, scripts/gpu_checks.sh.)"""
    monkeypatch.setattr(logprobs_triton, "BLOCK", 4096)
    monkeypatch.setattr(kernels, "CHUNK_ELEMS", 2**25)
    V = 3 * 4096 + 123
    assert logprobs_triton._launch_config(V)["BLOCK"] == 4096
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        require_interpreted_triton()
    logits, targets = hard_logits(5, V, device, dtype)
    targets[3] = 3 * 4096 + 7  # in the short last block
    g = torch.randn(5, generator=torch.Generator().manual_seed(1)).to(device)
    ours = logits.clone().requires_grad_()
    logp, entropy = token_logprobs(ours, targets, 0.7, return_entropy=True, backend="triton")
    (logp * g).sum().backward()
    ref = logits.float().requires_grad_()
    ref_logp, ref_entropy = reference(ref, targets, 0.7)
    (ref_logp * g).sum().backward()
    torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-4)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours.grad.float(), ref.grad, atol=atol * g.abs().max().item(), rtol=rtol)
    hidden, weight, targets, g = linear_case(9, V, 32, device, dtype)
    check_linear(hidden, weight, targets, g, 1.0, "triton", 1e-4 if dtype == torch.float32 else 3e-2)
