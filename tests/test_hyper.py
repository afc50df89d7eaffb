"""HyperMoE's HyperExpert: the factored adapter against a per-token float64 reference, gradients, memory,
and the whole MiXSE life cycle (no-op start, training, save/load, generation, pruning, add_expert)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from helpers import rel_err  # noqa: E402
from selfmoe import MiXSE  # noqa: E402
from selfmoe.hyper import HyperExpert  # noqa: E402
from test_mixse import adapter, ids_for, make_base, spread_router  # noqa: E402,F401
from test_prune import clean_positions, routed_ids  # noqa: E402

SIZES = {"embedding_dim": 6, "mlp_dim": 5, "layer_dim": 3, "bottleneck": 4, "adapter_dim": 3}
MODEL_SIZES = {"embedding_dim": 16, "mlp_dim": 16, "layer_dim": 4, "bottleneck": 8, "adapter_dim": 8}


def randomize(hyper: HyperExpert, seed: int = 0, std: float = 0.5) -> None:
    """Every parameter and buffer random and nonzero (a fresh HyperExpert's up side is zero: it adds nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(hyper.parameters()) + list(hyper.buffers()):
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * std)


def reference(hyper: HyperExpert, x: torch.Tensor, ids: torch.Tensor, index: int) -> torch.Tensor:
    """The adapter token by token in float64, straight from the definition: the unselected experts' summed
    embeddings, the MLP, the bottleneck with the layer embedding, per-token W_down(t) / W_up(t)."""
    P = {n: p.double() for n, p in hyper.named_parameters()}
    E = P["expert_embedding"].shape[0]
    g = hyper.module_groups[index]
    grp = hyper.groups[g]
    a, dz = grp.adapter_dim, grp.bottleneck
    out = []
    for t in range(x.shape[0]):
        selected = set(ids[t].tolist())
        u = hyper.unselected_bias.double() + sum(P["expert_embedding"][e] for e in range(E) if e not in selected)
        h = torch.relu(u @ P["mlp.0.weight"].T + P["mlp.0.bias"]) @ P["mlp.2.weight"].T + P["mlp.2.bias"]
        z = torch.cat([h, P["layer_embedding"][index]]) @ P["bottleneck.weight"].T + P["bottleneck.bias"]
        w_down = (P[f"groups.{g}.down"].reshape(grp.d_in, a, dz) * z).sum(-1)  # [d_in, a]
        w_up = (P[f"groups.{g}.up"].reshape(a, dz, grp.d_out) * z[:, None]).sum(1)  # [a, d_out]
        v = torch.relu(x[t].double() @ w_down + z @ P[f"groups.{g}.down_bias"] + P[f"groups.{g}.down_bias0"])
        out.append(v @ w_up + z @ P[f"groups.{g}.up_bias"] + P[f"groups.{g}.up_bias0"])
    return torch.stack(out)


@pytest.mark.parametrize("impl", ["factored", "naive"])
@pytest.mark.parametrize("T,k", [(1, 1), (7, 2), (5, 5)])
def test_adapter_matches_the_float64_reference_with_gradients(impl, T, k):
    torch.manual_seed(0)
    hyper = HyperExpert(5, [(12, 10), (9, 10), (12, 10)], SIZES)
    randomize(hyper)
    hyper.impl = impl
    g = torch.Generator().manual_seed(1)
    for index, d_in in ((0, 12), (1, 9), (2, 12)):
        x = torch.randn(T, d_in, generator=g, requires_grad=True)
        ids = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(T)])
        out = hyper(x, ids, index)
        x64 = x.detach().double().requires_grad_()
        params64 = {n: p.detach().double().requires_grad_() for n, p in hyper.named_parameters()}
        ref_hyper = HyperExpert(5, [(12, 10), (9, 10), (12, 10)], SIZES, dtype=torch.float64)
        ref_hyper.load_state_dict({**params64, "unselected_bias": hyper.unselected_bias.double()})
        ref = reference(ref_hyper, x64, ids, index)
        assert out.shape == (T, 10) and out.dtype == torch.float32
        assert rel_err(out, ref) < 1e-5
        cot = torch.randn(T, 10, generator=g)
        grads = torch.autograd.grad(out, [x] + list(hyper.parameters()), cot, allow_unused=True)
        grads64 = torch.autograd.grad(ref, [x64] + list(ref_hyper.parameters()), cot.double(), allow_unused=True)
        names = ["x"] + [n for n, _ in hyper.named_parameters()]
        for name, got, want in zip(names, grads, grads64):
            if want is None or not want.abs().sum():  # another group's tensors, or every unit off
                assert got is None or not got.abs().sum(), name
                continue
            assert rel_err(got, want) < 1e-5, name


def test_factored_never_builds_per_token_weights():
    """What backward keeps: the naive way holds T x d_in x a per-token weights, the factored way nothing
    larger than its input x [T, d_in] (z [T, d_z] and the [T, a] pre-activation beside it)."""
    torch.manual_seed(0)
    T, d = 33, 40
    sizes = dict(SIZES, adapter_dim=8, bottleneck=10)
    hyper = HyperExpert(4, [(d, d)], sizes)
    randomize(hyper)
    x = torch.randn(T, d, requires_grad=True)
    ids = torch.randint(0, 4, (T, 1))
    weights = {p.untyped_storage().data_ptr() for p in hyper.parameters()}
    largest, outs = {}, {}
    for impl in ("factored", "naive"):
        hyper.impl = impl
        saved = []  # activations only (the parameters themselves are saved too, by reference)

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs[impl] = hyper(x, ids, 0)
        largest[impl] = max(saved)
    assert rel_err(outs["factored"], outs["naive"]) < 1e-5
    assert largest["naive"] >= T * d * 8
    assert largest["factored"] == T * d  # x itself


@pytest.mark.parametrize("router", ["shared", "per_layer", "xlora"])
def test_mixse_hyper_expert_starts_as_a_no_op_trains_saves_loads_and_generates(adapter, router, tmp_path):
    paths = {"a": adapter("llama", "a"), "b": adapter("llama", "b"), "c": adapter("llama", "c")}
    plain = MiXSE.from_adapters(make_base(), paths, router=router)
    model = MiXSE.from_adapters(make_base(), paths, router=router, hyper_expert=MODEL_SIZES)
    assert model.mixse_config.hyper_expert == MODEL_SIZES
    plain.load_router_state_dict({k: v for k, v in model.router_state_dict().items() if not k.startswith("hyper.")})
    ids = ids_for()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # the generated adapter starts at zero
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {id(p) for p in model.router_parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert {id(p) for p in model.hyper.parameters()} <= trainable
    start = {n: p.detach().clone() for n, p in model.hyper.named_parameters()}
    opt = torch.optim.AdamW(model.router_parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in model.hyper.named_parameters()), "every part learns"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        trained = model(ids).logits
        model.hyper.impl = "naive"
        assert rel_err(model(ids).logits, trained) < 1e-5
        model.hyper.impl = "factored"
        assert rel_err(trained, plain(ids).logits) > 1e-3
    model.save_pretrained(tmp_path / "m")
    again = MiXSE.from_pretrained(tmp_path / "m", make_base())
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained)
    # generation with the KV cache equals recomputing the whole sequence
    prompt = ids[:, :5]
    fast = again.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, again(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast, seq)
    with again.disable_experts(), torch.no_grad():  # experts off: the HyperExpert is off too
        assert torch.equal(again(ids).logits, make_base()(ids).logits)


def test_pruning_and_adding_experts_keep_the_hyper_expert_exact(adapter, tmp_path):
    paths = {"a": adapter("llama", "a"), "b": adapter("llama", "b"), "c": adapter("llama", "c")}
    model = MiXSE.from_adapters(make_base(), paths, hyper_expert=MODEL_SIZES)
    spread_router(model, seed=1)
    randomize(model.hyper, std=0.1)  # larger: near-tied routing flips on rounding noise downstream
    ids = ids_for(batch=6, seq=10, seed=3)
    with torch.no_grad():
        model.router.linear.bias[1] -= 3.0
    before, seen = routed_ids(model, ids)
    clean = clean_positions(seen, [1])
    assert clean.any() and (~clean).any()
    model.prune_experts(["a", "c"])
    assert model.hyper.num_experts == 2 and model.hyper.unselected_bias.abs().sum() > 0
    after, _ = routed_ids(model, ids)
    assert rel_err(after[clean], before[clean]) < 1e-5
    assert rel_err(after[~clean], before[~clean]) > 1e-4
    model.save_pretrained(tmp_path / "p")
    again = MiXSE.from_pretrained(tmp_path / "p", make_base())
    with torch.no_grad():
        assert torch.equal(again(ids).logits, after)
        again.add_expert("b2", paths["b"], router_init_logit=-1e4)  # closed, zero embedding: nothing changes
        assert rel_err(again(ids).logits, after) < 1e-6
    assert again.hyper.num_experts == 3
    # pruning to c alone: the modules c does not touch leave the model, and their layer embeddings go
    again.prune_experts(["c"])
    assert again.hyper.layer_embedding.shape[0] == len(again.lora_modules) == 4
    assert set(again.hyper.groups) == {"g64x64", "g64x32"}
    again.save_pretrained(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(MiXSE.from_pretrained(tmp_path / "c", make_base())(ids).logits, again(ids).logits)


def test_hyper_expert_config_errors(adapter, tmp_path):
    paths = {"a": adapter("llama", "a"), "b": adapter("llama", "b")}
    with pytest.raises(ValueError, match=r"unknown sizes \['width'\]"):
        MiXSE.from_adapters(make_base(), paths, hyper_expert={"width": 3})
    with pytest.raises(ValueError, match=r"hyper_expert\['adapter_dim'\] must be an int >= 1"):
        MiXSE.from_adapters(make_base(), paths, hyper_expert={"adapter_dim": 0})
    MiXSE.from_adapters(make_base(), paths).save_pretrained(tmp_path / "plain")
    import json

    cfg = json.loads((tmp_path / "plain" / "mixse_config.json").read_text())
    cfg["hyper_expert"] = MODEL_SIZES
    (tmp_path / "plain" / "mixse_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has a hyper_expert but no hyper"):
        MiXSE.from_pretrained(tmp_path / "plain", make_base())
