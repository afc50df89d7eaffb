"""route_topk: softmax over all experts, then top-k; Self-MoE keeps raw probabilities by default."""
import pytest
import torch

from selfmoe.kernels import route_topk, route_topk_naive


def _logits(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_softmax_then_topk(k):
    logits = _logits(7, 3, 5, seed=k)
    weights, ids = route_topk(logits, k)
    probs = torch.softmax(logits.double(), -1)
    assert ids.dtype == torch.int64 and ids.shape == (7, 3, k) and weights.shape == (7, 3, k)
    assert torch.allclose(weights.double(), probs.gather(-1, ids), rtol=1e-6, atol=0)
    # ids are the k largest, in descending order
    assert torch.equal(ids, probs.argsort(-1, descending=True)[..., :k])
    if k < 5:
        assert (weights.sum(-1) < 1).all()  # no renormalisation by default
    else:
        assert torch.allclose(weights.sum(-1), torch.ones(7, 3))


@pytest.mark.parametrize("k", [1, 3])
def test_renormalize_sums_to_one(k):
    logits = _logits(11, 6, seed=3)
    weights, ids = route_topk(logits, k, renormalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(11), atol=1e-6)
    raw, raw_ids = route_topk(logits, k)
    assert torch.equal(ids, raw_ids)
    assert torch.allclose(weights, raw / raw.sum(-1, keepdim=True), atol=1e-7)


def test_dtype_preserved():
    weights, _ = route_topk(_logits(4, 8, dtype=torch.bfloat16), 2)
    assert weights.dtype == torch.bfloat16


@pytest.mark.parametrize("renormalize", [False, True])
def test_gradient_matches_reference(renormalize):
    logits = _logits(9, 6, seed=5).requires_grad_()
    ref_logits = logits.detach().double().requires_grad_()
    w, _ = route_topk(logits, 2, renormalize=renormalize)
    w_ref, _ = route_topk_naive(ref_logits, 2, renormalize=renormalize)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    w.backward(g)
    w_ref.backward(g.double())
    assert torch.allclose(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-7)
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [0, 7, 2.0, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, E=6\]"):
        route_topk(_logits(3, 6), k)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits must be a float tensor"):
        route_topk(torch.ones(3, 4, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        route_topk([[0.0, 1.0]], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k, renormalize", [(1, False), (2, True), (4, False)])
def test_router_fast_path_is_route_topk(dtype, k, renormalize):
    """A router on a CPU calls ``softmax_topk`` (route_topk's torch body, its checks skipped): the very
    gates ``route_topk`` gives, in the logits' dtype, and the float64 reference's ids."""
    from selfmoe.kernels.topk import softmax_topk
    from selfmoe.routers import TopKRouter

    logits = _logits(9, 4, seed=k + 7, dtype=dtype)
    got_w, got_ids = softmax_topk(logits, k, renormalize)
    want_w, want_ids = route_topk(logits, k, renormalize)
    assert got_w.dtype == dtype and torch.equal(got_w, want_w) and torch.equal(got_ids, want_ids)
    ref_w, ref_ids = route_topk_naive(logits.double(), k, renormalize)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w.double(), ref_w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)

    router = TopKRouter(6, 4, top_k=k, renormalize=renormalize)
    with torch.no_grad():
        router.linear.weight.normal_(generator=torch.Generator().manual_seed(k))
        router.linear.bias.uniform_(-1, 1)
    hidden = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(k + 1))
    out = router(hidden)
    logits = torch.nn.functional.linear(hidden, router.linear.weight, router.linear.bias)
    assert torch.equal(out.logits, logits)
    want_w, want_ids = route_topk(logits, k, renormalize)
    assert torch.equal(out.weights, want_w) and torch.equal(out.ids, want_ids)
