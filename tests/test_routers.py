"""Routers: top-k gate semantics, random routing, growth, router losses and routing statistics."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import rel_err
from selfmoe import RoutingStats, TopKRouter
from selfmoe.routers import (
    GateSlot,
    RouterState,
    check_aux_loss,
    compute_aux_loss,
    load_balancing_loss,
    load_concentration_loss,
    mutual_information_loss,
    router_z_loss,
)


def _router(E=4, k=1, d=16, **kw):
    torch.manual_seed(0)
    r = TopKRouter(d, E, k, **kw)
    with torch.no_grad():
        r.linear.weight.normal_()
        r.linear.bias.normal_()
    return r


def test_self_moe_semantics_no_renormalisation():
    r = _router(E=4, k=2)
    h = torch.randn(3, 5, 16)
    w, ids, logits = r(h)
    probs = torch.softmax(logits, -1)
    assert w.shape == ids.shape == (3, 5, 2) and logits.shape == (3, 5, 4)
    assert torch.allclose(w, probs.gather(-1, ids))
    assert (w.sum(-1) < 1).all()  # kept probabilities, not renormalised
    assert (w[..., 0] >= w[..., 1]).all()
    expect = torch.softmax(h @ r.linear.weight.T + r.linear.bias, -1).topk(2, -1).indices
    assert torch.equal(ids, expect)


def test_renormalize_and_all_experts():
    r = _router(E=3, k=2, renormalize=True)
    w, ids, _ = r(torch.randn(7, 16))
    assert torch.allclose(w.sum(-1), torch.ones(7))
    dense = _router(E=3, k=3)
    w, ids, logits = dense(torch.randn(7, 16))
    assert torch.equal(ids.sort(-1).values, torch.arange(3).expand(7, 3))
    assert torch.allclose(w.sum(-1), torch.ones(7))


def test_random_routing():
    r = _router(E=4, k=2, mode="random")
    h = torch.randn(64, 16)
    torch.manual_seed(1)
    w1, ids1, logits = r(h)
    torch.manual_seed(2)
    w2, ids2, _ = r(h)
    assert logits is None
    assert not torch.equal(ids1, ids2)  # not a function of h
    assert (ids1[:, 0] != ids1[:, 1]).all()  # k distinct experts
    assert len(set(ids1[:, 0].tolist())) == 4  # every expert gets picked over 64 tokens
    assert ((w1 > 0) & (w1 < 1)).all() and (w1.sum(-1) <= 1).all()
    assert not any(p.grad is not None for p in r.parameters())


def test_add_expert_keeps_rows_and_closed_start():
    r = _router(E=3, k=1)
    old_w, old_b = r.linear.weight.detach().clone(), r.linear.bias.detach().clone()
    h = torch.randn(10, 16)
    before = r(h)
    r.add_expert(init_logit=-1e4)
    assert r.num_experts == 4
    assert torch.equal(r.linear.weight[:3], old_w) and torch.equal(r.linear.bias[:3], old_b)
    after = r(h)
    assert torch.equal(after.ids, before.ids) and torch.allclose(after.weights, before.weights, rtol=1e-6, atol=0)
    r.add_expert()
    assert r.num_experts == 5 and r.linear.bias[4] == 0 and r.linear.weight[4].abs().sum() > 0


def test_router_bad_input():
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=2\], got 3"):
        TopKRouter(8, 2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        TopKRouter(8, 2, 1, mode="uniform")
    with pytest.raises(ValueError, match=r"router expects hidden states \[..., 8\], got \[2, 9\] \(at model.layers.3\)"):
        TopKRouter(8, 2)(torch.randn(2, 9), key="model.layers.3")
    with pytest.raises(RuntimeError, match="no gates in slot 'model.layers.0'"):
        GateSlot("model.layers.0").get("q_proj")


def test_load_balancing_loss_values():
    E = 4
    uniform = torch.zeros(8, E)
    balanced_ids = torch.arange(8).remainder(E)[:, None]
    assert load_balancing_loss(uniform, balanced_ids).item() == pytest.approx(1.0)
    # all tokens on expert 0 with confident probabilities: loss -> E
    logits = torch.tensor([[20.0, 0, 0, 0]]).expand(8, E)
    assert load_balancing_loss(logits, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(E, rel=1e-4)
    # the mask removes tokens: only the first four (balanced) count
    ids = torch.cat([torch.arange(4), torch.zeros(4, dtype=torch.long)])[:, None]
    mask = torch.tensor([True] * 4 + [False] * 4)
    assert load_balancing_loss(uniform, ids, mask).item() == pytest.approx(1.0)
    assert load_balancing_loss(uniform, ids).item() == pytest.approx(1.0)  # P uniform makes f irrelevant
    logits = torch.randn(8, E, requires_grad=True)
    load_balancing_loss(logits, balanced_ids).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_and_mutual_information_values():
    logits = torch.randn(6, 5)
    assert router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item(), rel=1e-6)
    E = 4
    # uniform per-token probabilities: usage entropy log E, token entropy log E -> 0
    assert mutual_information_loss(torch.zeros(8, E)).item() == pytest.approx(0.0, abs=1e-6)
    # confident tokens spread evenly over experts: -log E + 0
    confident = torch.eye(E).repeat(2, 1) * 50
    assert mutual_information_loss(confident).item() == pytest.approx(-math.log(E), abs=1e-4)
    # confident but all on one expert: 0 usage entropy, 0 token entropy
    collapsed = torch.tensor([[50.0, 0, 0, 0]]).expand(8, E)
    assert mutual_information_loss(collapsed).item() == pytest.approx(0.0, abs=1e-4)


def _concentration_reference(logits, mask):
    """``H(mean p)`` by hand in float64 over the counted tokens only (a [B, S] mask, True = count)."""
    lg = logits.double()
    counted = lg[mask.bool()] if mask is not None else lg.reshape(-1, lg.shape[-1])
    p = torch.exp(counted - torch.logsumexp(counted, -1, keepdim=True))
    mean_p = p.sum(0) / counted.shape[0]
    return -(mean_p * torch.log(mean_p)).sum()


def test_concentration_loss_matches_float64_and_masks_padding():
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 5, 6, generator=g) * 2).requires_grad_()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    for m in (mask, None):
        got = load_concentration_loss(logits, None, m)
        ref64 = logits.detach().double().requires_grad_()
        want = _concentration_reference(ref64, m)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        (g_got,) = torch.autograd.grad(got, logits)
        (g_want,) = torch.autograd.grad(want, ref64)
        assert rel_err(g_got, g_want) < 1e-5
        if m is not None:  # padded tokens get no gradient: they do not count
            assert g_got[~mask.bool()].abs().max() == 0
    # the padding changes the value (the reference without the mask differs)
    assert load_concentration_loss(logits, None, mask).item() != pytest.approx(
        load_concentration_loss(logits, None, None).item(), rel=1e-3)
    E = 4
    assert load_concentration_loss(torch.zeros(8, E)).item() == pytest.approx(math.log(E), rel=1e-6)
    collapsed = torch.tensor([[50.0, 0, 0, 0]]).expand(8, E)  # one expert for every token: minimum
    assert load_concentration_loss(collapsed).item() == pytest.approx(0.0, abs=1e-4)
    # confident tokens spread over experts: the usage is uniform, so the loss is at its maximum
    assert load_concentration_loss(torch.eye(E).repeat(2, 1) * 50).item() == pytest.approx(math.log(E), rel=1e-4)
    # gradient descent concentrates: usage entropy goes down
    lg = torch.randn(16, E, generator=g).requires_grad_()
    before = load_concentration_loss(lg).item()
    for _ in range(20):
        (grad,) = torch.autograd.grad(load_concentration_loss(lg), lg)
        lg = (lg - 50.0 * grad).detach().requires_grad_()
    assert load_concentration_loss(lg).item() < before - 0.1
    assert "concentration" in check_aux_loss({"concentration": 0.1})


def test_aux_loss_config_and_combination():
    assert check_aux_loss(None) == {}
    assert check_aux_loss({"z_loss": 0.0, "load_balancing": 0.01}) == {"load_balancing": 0.01}
    with pytest.raises(ValueError, match="unknown loss 'balance'"):
        check_aux_loss({"balance": 1.0})
    with pytest.raises(ValueError, match=r"aux_loss\['z_loss'\] must be a finite float >= 0"):
        check_aux_loss({"z_loss": -1.0})
    logits = torch.randn(2, 5, 3)
    ids = logits.topk(1, -1).indices
    recs = [(logits, ids, None), (logits * 2, ids, None)]
    got = compute_aux_loss(recs, {"z_loss": 0.5, "load_balancing": 0.1})
    want = 0.5 * (router_z_loss(logits) + router_z_loss(logits * 2)) / 2 + 0.1 * (
        load_balancing_loss(logits, ids) + load_balancing_loss(logits * 2, ids)) / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert compute_aux_loss([], {"z_loss": 1.0}).item() == 0.0


def test_state_records_stats_with_padding_mask():
    r = _router(E=3, k=2)
    state = RouterState()
    r.state = state
    stats = RoutingStats(["a", "b", "c"])
    state.stats = stats
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding, one token
    state.begin_forward(mask)
    h = torch.randn(2, 4, 16)
    w, ids, _ = r(h, key="layer0")
    summary = stats.summary()["layer0"]
    assert summary["tokens"] == 7
    assert sum(summary["usage"].values()) == pytest.approx(1.0)
    counted = ids[mask.bool()]
    for e, name in enumerate("abc"):
        assert summary["usage"][name] == pytest.approx((counted == e).sum().item() / counted.numel())
        assert summary["mean_gate"][name] == pytest.approx((w[mask.bool()] * (ids[mask.bool()] == e)).sum().item() / 7, rel=1e-5)
    assert sum(summary["mean_prob"].values()) == pytest.approx(1.0)
    # a decode step: hidden [2, 1], mask [2, 5] covers past + current token
    state.begin_forward(torch.ones(2, 5, dtype=torch.long))
    r(torch.randn(2, 1, 16), key="layer0")
    assert stats.summary()["layer0"]["tokens"] == 9
    assert stats.usage_matrix().shape == (1, 3)
    state.stats = None
    r(h, key="layer0")  # off: nothing recorded
    assert stats.summary()["layer0"]["tokens"] == 9
