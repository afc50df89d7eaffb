"""MiXSE.prune_experts (ModuleFormer's pruning): the kept experts' outputs stay exact, files shrink, errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from helpers import rel_err  # noqa: E402
from selfmoe import MiXSE, MoLoRALinear  # noqa: E402
from selfmoe.pruning import choose_kept_experts, expert_shares  # noqa: E402
from test_mixse import adapter, ids_for, make_base, peft_logits, spread_router  # noqa: E402,F401

NAMES = ("a", "b", "c")


def three_experts(adapter, router, top_k=1, **kw):
    return MiXSE.from_adapters(make_base(), {n: adapter("llama", n) for n in NAMES}, router=router, top_k=top_k, **kw)


def routed_ids(model, ids):
    """Logits and, per router call, the ids it picked ``[B, S, k]`` (hooks on every router)."""
    seen = []
    hooks = [rt.register_forward_hook(lambda m, i, out: seen.append(out.ids.reshape(ids.shape[0], ids.shape[1], -1)))
             for rt in model._placement.routers(model)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def clean_positions(seen, pruned_ids):
    """``[B, S]`` True where no token up to this one (causal attention) used a pruned expert in any call."""
    used = torch.zeros(seen[0].shape[:2], dtype=torch.bool)
    for ids in seen:
        for e in pruned_ids:
            used |= (ids == e).any(-1)
    return ~(used.cumsum(1) > 0)


@pytest.mark.parametrize("router", ["shared", "xlora", "per_layer"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_outputs_unchanged_where_no_pruned_expert_was_used(adapter, router, top_k, tmp_path):
    model = three_experts(adapter, router, top_k=top_k)
    spread_router(model, std=3.0, seed=1)
    ids = ids_for(batch=6, seq=10, seed=3)
    for _ in range(6):  # make b rarer until some prefixes never touch it (per-layer inputs are wider)
        with torch.no_grad():
            for rt in model._placement.routers(model):
                rt.linear.bias[1] -= 3.0 if router != "per_layer" else 20.0
        before, seen = routed_ids(model, ids)
        clean = clean_positions(seen, [1])
        if clean.float().mean() > 0.2:
            break
    assert clean.any() and (~clean).any(), "the test needs both kinds of positions"
    assert model.prune_experts(["a", "c"]) == ["b"]
    assert model.expert_names == ["a", "c"] and model.mixse_config.pruned_experts == ["b"]
    after, _ = routed_ids(model, ids)
    assert rel_err(after[clean], before[clean]) < 1e-5  # fp32 rounding: the gates come out of a new softmax
    assert rel_err(after[~clean], before[~clean]) > 1e-4  # the test can fail: the pruned expert mattered
    for m in model.lora_modules.values():
        assert m.lora_A.shape[0] == 2 and len(m.ranks) == 2
    model.save_pretrained(tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "mixse_config.json").read_text())
    assert cfg["expert_names"] == ["a", "c"] and cfg["pruned_experts"] == ["b"]
    again = MiXSE.from_pretrained(tmp_path / "pruned", make_base())
    assert again.num_experts == 2
    reloaded, _ = routed_ids(again, ids)
    assert rel_err(reloaded, after) < 1e-6
    # generation (KV cache) runs on the smaller model
    assert again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_prune_to_one_expert_without_normalizer_is_that_adapter(adapter):
    """Keeping only c (q/v projections only) and dropping the normaliser: every token's gate is 1, so this
    is PEFT's c adapter; the modules c does not touch are plain nn.Linear again, their hooks gone."""
    model = three_experts(adapter, "shared")
    spread_router(model)
    ids = ids_for()
    assert model.prune_experts(["c"], keep_normalizer=False) == ["a", "b"]
    assert all(p.endswith(("q_proj", "v_proj")) for p in model.lora_modules)
    assert isinstance(model.base_model.get_submodule("model.layers.0.mlp.up_proj"), nn.Linear)
    assert not isinstance(model.base_model.get_submodule("model.layers.0.mlp.up_proj"), MoLoRALinear)
    assert model.mixse_config.pruned_experts == [] and model.router.pruned is None
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_logits("llama", adapter("llama", "c"), ids)) < 1e-5
    assert isinstance(model.unload(), nn.Module)


def test_prune_removes_the_routing_hook_of_a_decoder_layer_without_experts(adapter, tmp_path):
    from selfmoe import save_lora_adapter

    base = make_base()
    q0 = base.get_submodule("model.layers.0.self_attn.q_proj")
    g = torch.Generator().manual_seed(0)
    save_lora_adapter(tmp_path / "l0", {"model.layers.0.self_attn.q_proj": (
        torch.randn(4, q0.in_features, generator=g) * 0.3, torch.randn(q0.out_features, 4, generator=g) * 0.3)},
        r=4, lora_alpha=8)
    model = MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "l0": tmp_path / "l0"})
    hooks = len(model._hooks)
    assert model.prune_experts(["l0"]) == ["a"]
    assert list(model.lora_modules) == ["model.layers.0.self_attn.q_proj"]
    assert [s.name for s in model._placement.slots] == ["model.layers.0"] and len(model._hooks) == hooks - 1
    with torch.no_grad(), model.routing_stats() as stats:
        model(ids_for())
    assert list(stats.summary()) == ["model.layers.0"]  # layer 1 is not routed any more
    model.save_pretrained(tmp_path / "pruned")
    again = MiXSE.from_pretrained(tmp_path / "pruned", make_base())
    with torch.no_grad():
        assert rel_err(again(ids_for()).logits, model(ids_for()).logits) < 1e-6


def test_choose_by_share_from_routing_stats(adapter, tmp_path):
    model = three_experts(adapter, "per_layer")
    spread_router(model)
    ids = ids_for(batch=4, seq=12)
    with torch.no_grad(), model.routing_stats() as stats:
        model(ids)
    shares = expert_shares(stats, NAMES)
    assert sum(shares.values()) == pytest.approx(1.0)
    order = sorted(NAMES, key=lambda n: -shares[n])
    assert choose_kept_experts(NAMES, top_n=2, stats=stats) == sorted(NAMES.index(n) for n in order[:2])
    threshold = sorted(shares.values())[1]  # drops exactly the smallest
    assert choose_kept_experts(NAMES, min_share=threshold, stats=stats.summary()) == \
        sorted(NAMES.index(n) for n in order[:2])
    assert choose_kept_experts(NAMES, stats=shares, min_share=0.0, top_n=1) == [NAMES.index(order[0])]
    dropped = model.prune_experts(min_share=threshold, stats=stats)
    assert dropped == [order[2]] and model.expert_names == [n for n in NAMES if n != order[2]]


def test_prune_errors_leave_the_model_unchanged(adapter):
    model = three_experts(adapter, "shared", top_k=2)
    ids = ids_for()
    with torch.no_grad():
        before = model(ids).logits
    cases = [
        (dict(keep=["a", "zz"]), "no expert named 'zz'"),
        (dict(keep=[0, 0]), "distinct"),
        (dict(keep=["a"]), r"top_k=2 experts per token, but only 1 would be kept"),
        (dict(min_share=0.1), "need stats="),
        (dict(), "needs keep="),
        (dict(keep=["a"], min_share=0.1), "not both"),
        (dict(min_share=0.9, stats={"a": 0.4, "b": 0.3, "c": 0.3}), "no expert reaches it"),
        (dict(min_share=0.1, stats={"a": 0.5, "b": 0.5}), r"missing \['c'\]"),
        (dict(top_n=4, stats={"a": 0.4, "b": 0.3, "c": 0.3}), r"top_n must be an int in \[1, 3\]"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.prune_experts(**kwargs)
    assert model.expert_names == list(NAMES) and model.prune_experts(["a", "b", "c"]) == []
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
