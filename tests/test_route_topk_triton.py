"""route_topk as a Triton kernel: same weights, ids and logit gradients as the torch path / float64 reference."""
import pytest
import torch

from selfmoe.kernels import route_topk, route_topk_naive

rt = pytest.importorskip("selfmoe.kernels.topk_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Half logits: the softmax runs in fp32 either way, so the weights differ only by the final rounding.
W_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _logits(*shape, seed=0, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


# (shape, k) — each here for a reason.
CASES = [
    ((37, 6), 1),  # Self-MoE top-1, E not a power of two, T not a multiple of BLOCK_T
    ((37, 6), 2),
    ((37, 6), 6),  # k = E: a full sort
    ((5, 3, 8), 3),  # leading batch dims
    ((1, 4), 2),  # a single token
    ((70, 1), 1),  # E = 1: weight 1, id 0; more tokens than one program
    ((40, 64), 8),  # many experts
]


@pytest.mark.parametrize("shape,k", CASES, ids=[f"{s}-k{k}" for s, k in CASES])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 runs interpreted
def test_matches_torch_path(shape, k, renormalize, dtype):
    logits = _logits(*shape, seed=k + len(shape), dtype=dtype)
    w, ids = route_topk(logits, k, renormalize, backend="triton")
    w_ref, ids_ref = route_topk_naive(logits.double(), k, renormalize)
    assert w.dtype == dtype and ids.dtype == torch.int64
    assert w.shape == ids.shape == (*shape[:-1], k)
    # Low-precision logits tie exactly (bf16 has 8 significant bits); torch.topk orders ties however
    # it likes, the kernel by lowest index. Ids must agree on every row without a tie among its top k+1
    # probabilities, and on tied rows pick experts that carry the reference's top-k values.
    probs = torch.softmax(logits.double(), -1)
    top = probs.sort(-1, descending=True).values[..., : k + 1]
    tied = (top[..., 1:] == top[..., :-1]).any(-1)
    assert torch.equal(ids[~tied], ids_ref[~tied])
    assert torch.equal(probs.gather(-1, ids).sort(-1).values, probs.gather(-1, ids_ref).sort(-1).values)
    assert (ids.sort(-1).values[..., 1:] != ids.sort(-1).values[..., :-1]).all()  # distinct experts
    err = ((w.double() - w_ref).norm() / w_ref.norm()).item()
    assert err <= W_TOL[dtype], err
    if renormalize or k == shape[-1]:
        assert torch.allclose(w.double().sum(-1), torch.ones(shape[:-1], dtype=torch.float64, device=DEVICE),
                              atol=W_TOL[dtype] * 4)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("renormalize", [False, True])
def test_gradient_matches_float64_reference(k, renormalize):
    logits = _logits(23, 5, seed=11 + k).requires_grad_()
    ref_logits = logits.detach().double().requires_grad_()
    w, _ = route_topk(logits, k, renormalize, backend="triton")
    w_ref, _ = route_topk_naive(ref_logits, k, renormalize)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    w.backward(g)
    w_ref.backward(g.double())
    if renormalize and k == 1:
        # The single renormalised weight is identically 1: its true gradient is 0 (up to rounding).
        assert logits.grad.abs().max() <= 1e-6
        return
    err = ((logits.grad.double() - ref_logits.grad).norm() / ref_logits.grad.norm()).item()
    assert err <= 1e-5, err


def test_gradient_fp16_and_leading_dims():
    logits = _logits(4, 6, 8, seed=3, dtype=torch.float16).requires_grad_()
    ref_logits = logits.detach().double().requires_grad_()
    w, _ = route_topk(logits, 3, backend="triton")
    w_ref, _ = route_topk_naive(ref_logits, 3)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    w.backward(g.half())
    w_ref.backward(g.half().double())
    assert logits.grad.dtype == torch.float16
    err = ((logits.grad.double() - ref_logits.grad).norm() / ref_logits.grad.norm()).item()
    assert err <= 2e-3, err


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=DEVICE)
    _, ids = route_topk(logits, 2, backend="triton")
    assert ids.tolist() == [[1, 2], [0, 1]]
    w, ids = route_topk(logits, 5, backend="triton")
    assert ids.tolist() == [[1, 2, 4, 0, 3], [0, 1, 2, 3, 4]]
    assert torch.allclose(w[1], torch.full((5,), 0.2, device=DEVICE))


def test_ids_are_descending_and_distinct():
    logits = _logits(50, 16, seed=9)
    w, ids = route_topk(logits, 16, backend="triton")
    assert (w[:, :-1] >= w[:, 1:]).all()
    assert torch.equal(ids.sort(-1).values, torch.arange(16, device=DEVICE).expand(50, 16))


def test_empty_batch():
    logits = _logits(0, 4, seed=1).requires_grad_()
    w, ids = route_topk(logits, 2, backend="triton")
    assert w.shape == ids.shape == (0, 2)
    w.sum().backward()
    assert logits.grad.shape == (0, 4)


def test_backend_selection(monkeypatch):
    from selfmoe.kernels.dispatch import route_topk_backend

    cpu = torch.zeros(2, 3)
    assert route_topk_backend("auto", cpu) == "torch"  # CPU: auto stays on torch even under the interpreter
    assert route_topk_backend("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA logits \(logits are on cpu\)"):
        route_topk(cpu, 1, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        route_topk(cpu, 1, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("renormalize", [False, True])
def test_bf16_and_large_batch_on_gpu(renormalize):
    logits = _logits(8192, 8, seed=13, dtype=torch.bfloat16)
    w, ids = route_topk(logits, 2, renormalize, backend="triton")
    w_ref, ids_ref = route_topk_naive(logits.double(), 2, renormalize)
    # bf16 logits make near-ties common: compare weights where the chosen ids agree, and most must.
    same = (ids == ids_ref).all(-1)
    assert same.float().mean() > 0.99
    err = ((w[same].double() - w_ref[same]).norm() / w_ref[same].norm()).item()
    assert err <= W_TOL[torch.bfloat16]
    assert route_topk(logits, 2, renormalize)[0].dtype == torch.bfloat16  # auto on CUDA -> the kernel
