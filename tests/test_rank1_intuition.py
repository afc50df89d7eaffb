"""Rank-1 experts (MoR1E, plain and mix-and-match) and intuition routing against float64 references.

Layer maths and every gradient are checked on fresh random inputs; the model-level tests (tiny random
Llama) check the prior's embedding, its fitting, that generation keeps the prompt's prior for new tokens,
and save/load.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfmoe import MiXSE, MoLoRALinear
from selfmoe.intuition import IntuitionConfig, IntuitionPrior, kmeans, masked_mean
from selfmoe.rank1 import mix_and_match_lora, mix_and_match_reference
from selfmoe.routers import RouterState, TopKRouter
from selfmoe.tiny_model import build_model, build_tokenizer

from helpers import rel_err


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("k", [1, 3, 12])  # 12 = r1*r2: dense gating
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mix_and_match_matches_materialised_reference(k, dtype):
    g = torch.Generator().manual_seed(k)
    T, d_in, d_out, r1, r2 = 11, 20, 17, 3, 4
    x, A, B = _rand(g, 2, T, d_in), _rand(g, r1, d_in, scale=0.3), _rand(g, d_out, r2)
    W, b = _rand(g, d_out, d_in, scale=0.2), _rand(g, d_out)
    ids = torch.stack([torch.randperm(r1 * r2, generator=g)[:k] for _ in range(2 * T)]).view(2, T, k)
    w = torch.rand(2, T, k, generator=g, dtype=torch.float64) + 0.1
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, A, B, w, W, b)]
    refs = [t.detach().to(dtype).double().requires_grad_(True) for t in leaves]
    out = mix_and_match_lora(leaves[0], leaves[1], leaves[2], ids, leaves[3], 0.7, base_weight=leaves[4], base_bias=leaves[5])
    ref = mix_and_match_reference(refs[0], refs[1], refs[2], ids, refs[3], 0.7, base_weight=refs[4], base_bias=refs[5])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= tol
    dy = _rand(g, *ref.shape)
    out.backward(dy.to(dtype))
    ref.backward(dy)
    for name, got, want in zip(("x", "A", "B", "gates", "W", "b"), leaves, refs):
        assert rel_err(got.grad, want.grad) <= tol, name


def test_rank1_layer_is_a_gated_rank_r_lora():
    # E = r rank-1 experts, each scaled alpha/r: with gates g it is W x + b + alpha/r * B diag(g) A x
    torch.manual_seed(0)
    r, alpha, d_in, d_out, T = 6, 12.0, 16, 10, 9
    base = nn.Linear(d_in, d_out).double()
    layer = MoLoRALinear(base, r, r=1, lora_alpha=alpha / r, top_k=r, router="linear")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.requires_grad_(True)
    base.requires_grad_(False)
    x = torch.randn(T, d_in, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A[:, 0, :], layer.lora_B[:, :, 0].t()  # [r, d_in], [d_out, r]
    gates = torch.softmax(F.linear(x, layer.router.linear.weight.double(), layer.router.linear.bias.double()), -1)
    ref = F.linear(x, base.weight, base.bias) + (alpha / r) * ((x @ A.t()) * gates) @ B.t()
    assert rel_err(y, ref) <= 1e-6  # the router's gates are float32
    dy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.router.linear.weight], dy)
    want = torch.autograd.grad(ref, [x, layer.lora_A, layer.lora_B, layer.router.linear.weight], dy)
    for a, b_ in zip(got, want):
        assert rel_err(a, b_) <= 1e-6  # the router computes in float32


def test_mix_and_match_layer_expert_factors_and_errors():
    base = nn.Linear(8, 5)
    layer = MoLoRALinear(base, 6, r=1, lora_alpha=2.0, top_k=2, mix_and_match=(2, 3))
    assert tuple(layer.lora_A.shape) == (2, 1, 8) and tuple(layer.lora_B.shape) == (3, 5, 1)
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.expert_factors(5)  # pair (1, 2)
    assert torch.equal(A, layer.lora_A[1]) and torch.equal(B, layer.lora_B[2])
    assert torch.allclose(layer.get_delta_weight(5), 2.0 * layer.lora_B[2].float() @ layer.lora_A[1].float())
    with pytest.raises(ValueError, match="6 experts, but num_experts=5"):
        MoLoRALinear(nn.Linear(8, 5), 5, r=1, mix_and_match=(2, 3))
    with pytest.raises(ValueError, match="cannot be added"):
        layer.add_expert(torch.zeros(1, 8), torch.zeros(5, 1))
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 6\)"):
        layer(torch.randn(3, 8), expert_ids=torch.full((3, 1), 6), expert_weights=torch.ones(3, 1))


@pytest.mark.parametrize("top_k,renorm", [(2, False), (2, True), (5, False)])
def test_router_with_prior_matches_reference(top_k, renorm):
    g = torch.Generator().manual_seed(top_k)
    B_, S, d, E = 3, 4, 12, 5
    rt = TopKRouter(d, E, top_k, renormalize=renorm)
    rt.enable_prior(0.3)
    rt.state = RouterState()
    h = torch.randn(B_, S, d, generator=g, requires_grad=True)
    prior = torch.softmax(torch.randn(B_, E, generator=g), -1).requires_grad_(True)
    rt.state.prior = prior
    weights, ids, logits = rt(h)
    # float64 reference of R = softmax(W h + b) * w + prior * (1 - w)
    w = torch.sigmoid(rt.prior_logit.double())
    R = torch.softmax(F.linear(h.double(), rt.linear.weight.double(), rt.linear.bias.double()), -1) * w \
        + prior.double()[:, None, :] * (1 - w)
    ref_w, ref_ids = R.topk(top_k, -1)
    if renorm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(ids, ref_ids)
    assert rel_err(weights, ref_w) <= 1e-6
    assert rel_err(torch.softmax(logits, -1), R) <= 1e-6
    dw = torch.randn(weights.shape, generator=g)
    params = [h, prior, rt.prior_logit, rt.linear.weight]
    got = torch.autograd.grad(weights, params, dw)
    want = torch.autograd.grad(ref_w, params, dw.double())
    for name, a, b in zip(("h", "prior", "prior_logit", "W"), got, want):
        assert rel_err(a, b) <= 1e-5, name
    rt.state.prior = None
    with pytest.raises(RuntimeError, match="no.*prior|none was computed"):
        rt(h)


def test_kmeans_deterministic_and_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=-1) * 10
    labels = torch.arange(40) % 4
    pts = centres[labels] + torch.randn(40, 16, generator=g) * 0.3
    c1, c2 = kmeans(pts, 4, seed=3), kmeans(pts, 4, seed=3)
    assert torch.equal(c1, c2)
    assign = (F.normalize(pts, dim=-1) @ c1.t()).argmax(1)
    # every true cluster lands in exactly one fitted cluster, and they are all different
    mapping = {int(labels[i]): int(assign[i]) for i in range(40)}
    assert all(mapping[int(labels[i])] == int(assign[i]) for i in range(40)) and len(set(mapping.values())) == 4
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=3\]"):
        kmeans(pts[:3], 4)


def test_prior_module_reference():
    g = torch.Generator().manual_seed(1)
    cfg = IntuitionConfig(clusters=3, dim=8, temperature=0.5)
    prior = IntuitionPrior(cfg, num_experts=4)
    c = torch.randn(3, 8, generator=g)
    prior.set_centroids(c)
    with torch.no_grad():
        prior.cluster_map.normal_()
    emb = torch.randn(5, 8, generator=g, dtype=torch.float64)
    cos = F.normalize(emb, dim=-1) @ F.normalize(c.double(), dim=-1).t()
    ref = torch.softmax(cos / 0.5, -1) @ torch.softmax(prior.cluster_map.double(), -1)
    assert rel_err(prior(emb.float()), ref) <= 1e-6
    same = IntuitionPrior(IntuitionConfig(clusters=4, dim=8, learned_map=False), num_experts=4)
    assert same.cluster_map is None
    with pytest.raises(ValueError, match="clusters must equal the number of experts"):
        IntuitionPrior(IntuitionConfig(clusters=3, dim=8, learned_map=False), num_experts=4)


# ---- model level -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _batch(tok, seed, B=3, S=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("layer", [0, 1])  # (the tiny model's last layer output is reported after the final norm)
def test_sequence_embedding_is_masked_mean_of_hidden_state(tok, layer):
    base = build_model(len(tok), seed=0)
    ids, mask = _batch(tok, 0)
    with torch.no_grad():
        hs = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
    m = mask[..., None].double()
    ref = (hs.double() * m).sum(1) / m.sum(1)
    model = MiXSE.from_rank1(base, r=4, intuition=IntuitionConfig(clusters=2, dim=base.config.hidden_size, layer=layer))
    assert rel_err(model.sequence_embeddings(ids, mask), ref) <= 1e-5
    assert rel_err(masked_mean(hs, mask), ref) <= 1e-6


def test_domain_centroids_and_generation_keeps_prompt_prior(tok, tmp_path):
    base = build_model(len(tok), seed=0)
    d = base.config.hidden_size
    model = MiXSE.from_rank1(base, r=3, top_k=2, router="shared",
                             intuition=IntuitionConfig(clusters=3, dim=d, learned_map=False, temperature=0.05))
    batches = [dict(zip(("input_ids", "attention_mask"), _batch(tok, s))) for s in (1, 2)]
    labels = [0, 1, 2, 2, 1, 0]
    cents = model.fit_intuition(batches, labels=labels)
    emb = torch.cat([model.sequence_embeddings(b["input_ids"], b["attention_mask"]) for b in batches])
    unit = F.normalize(emb.double(), dim=-1)
    for e in range(3):
        want = F.normalize(unit[[i for i, l in enumerate(labels) if l == e]].mean(0), dim=0)
        assert rel_err(cents[e], want) <= 1e-5
    for mod in model.lora_modules.values():
        with torch.no_grad():
            mod.lora_B.normal_()
    ids, mask = _batch(tok, 5)
    prompt_prior = model.intuition(model.sequence_embeddings(ids, mask))
    seen = []
    hook = model.router.register_forward_pre_hook(lambda m, a: seen.append(m.state.prior.clone()))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert len(seen) >= 4 * model.base_model.config.num_hidden_layers  # prompt + new tokens, every layer
    for p in seen:
        assert torch.equal(p, prompt_prior)  # new tokens reuse the prompt's prior
    model.save_pretrained(tmp_path / "m")
    loaded = MiXSE.from_pretrained(tmp_path / "m", build_model(len(tok), seed=0))
    assert torch.equal(loaded.intuition.centroids, model.intuition.centroids)
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False), out)


@pytest.mark.parametrize("mm", [None, (2, 3)])
def test_rank1_model_trains_saves_loads(tok, tmp_path, mm):
    base = build_model(len(tok), seed=0)
    d = base.config.hidden_size
    model = MiXSE.from_rank1(base, r=4, lora_alpha=8, mix_and_match=mm,
                             intuition=IntuitionConfig(clusters=2, dim=d, layer=1))
    E = 6 if mm else 4
    assert model.num_experts == E and model.mixse_config.top_k == E  # dense gating by default
    model.fit_intuition([dict(zip(("input_ids", "attention_mask"), _batch(tok, 3)))], seed=1)
    ids, mask = _batch(tok, 4)
    before = model(input_ids=ids, attention_mask=mask).logits
    with model.disable_experts():
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, plain)  # B = 0: starts as the base model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("prior_logit" in n for n in names) and "intuition.cluster_map" in names
    model.save_pretrained(tmp_path / "m")
    loaded = MiXSE.from_pretrained(tmp_path / "m", build_model(len(tok), seed=0))
    with torch.no_grad():
        a, b = model(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(a, plain) and torch.equal(a, b)
