"""MiXSE on tiny random transformers models (Llama, Mistral, Qwen2, Gemma, Phi-3 layouts), against PEFT.

Adapters are made with PEFT itself (``get_peft_model`` with random nonzero lora_B, ``save_pretrained``),
so loading goes through the real on-disk format, and the PEFT model is the reference for one expert.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from selfmoe import MiXSE, MoLoRALinear  # noqa: E402
from selfmoe.adapters import AdapterFormatError, load_lora_adapter  # noqa: E402

from helpers import rel_err  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**SIZES, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**SIZES, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**SIZES, **kw}),  # q/k/v with bias
    "gemma": lambda **kw: GemmaConfig(**{**SIZES, "head_dim": 16, **kw}),
    "phi3": lambda **kw: Phi3Config(**{**SIZES, **kw}),  # fused qkv_proj / gate_up_proj
}
TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, seed=1),
    "b": dict(r=8, lora_alpha=8, seed=2),
    # a different module set, per-module ranks and alphas
    "c": dict(r=2, lora_alpha=6, seed=3, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 4}),
    # a module outside the decoder layers
    "head": dict(r=4, lora_alpha=8, seed=4, targets=["q_proj", "lm_head"]),
}


def make_base(arch="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](**overrides)).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def make_adapter(arch, path, *, r, lora_alpha, seed, targets=None, rank_pattern=None, alpha_pattern=None, **base_kw):
    pm = get_peft_model(make_base(arch, **base_kw), LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=targets or TARGETS.get(arch, ALL7),
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_A" in n else 0.2))
    pm.save_pretrained(str(path), save_embedding_layers=False)
    return path


@pytest.fixture(scope="session")
def adapter(tmp_path_factory):
    cache = {}

    def get(arch="llama", name="a"):
        if (arch, name) not in cache:
            cache[(arch, name)] = make_adapter(arch, tmp_path_factory.mktemp(f"{arch}-{name}"), **ADAPTERS[name])
        return cache[(arch, name)]

    return get


def ids_for(batch=2, seq=9, seed=5):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_logits(arch, path, ids):
    pm = PeftModel.from_pretrained(make_base(arch), str(path)).eval()
    with torch.no_grad():
        return pm(ids).logits


def set_fixed_gates(model: MiXSE, gates):
    """Router weights 0 and bias log(gates): every token gets exactly these softmax probabilities."""
    routers = [model.router] if model.router is not None else [m.router for m in model.lora_modules.values()]
    with torch.no_grad():
        for r in routers:
            r.linear.weight.zero_()
            r.linear.bias.copy_(torch.log(torch.tensor(gates)))


def spread_router(model: MiXSE, std=3.0, seed=0):
    """Large random router weights so that tokens really go to different experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.router_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, {n: p.requires_grad for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------------
# equality with PEFT


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_one_expert_equals_peft(arch, adapter):
    path = adapter(arch, "a")
    ids = ids_for()
    ref = peft_logits(arch, path, ids)
    model = MiXSE.from_adapters(make_base(arch), {"a": path}, top_k=1)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        plain = make_base(arch)(ids).logits
    assert rel_err(plain, ref) > 0.05  # the adapter does change the model
    assert rel_err(out, ref) < 1e-5
    expected = TARGETS.get(arch, ALL7)
    assert len(model.lora_modules) == 2 * len(expected)
    assert all(isinstance(model.base_model.get_submodule(p), MoLoRALinear) for p in model.lora_modules)


@pytest.mark.parametrize("router", ["per_layer", "xlora"])
def test_one_expert_equals_peft_other_routers(router, adapter):
    path = adapter("llama", "a")
    ids = ids_for()
    model = MiXSE.from_adapters(make_base(), {"a": path}, router=router)
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_logits("llama", path, ids)) < 1e-5


def test_module_outside_layers_per_layer_router_equals_peft(adapter):
    path = adapter("llama", "head")
    ids = ids_for()
    model = MiXSE.from_adapters(make_base(), {"h": path}, router="per_layer")
    assert "lm_head" in model.lora_modules
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_logits("llama", path, ids)) < 1e-5


@pytest.mark.parametrize("router", ["shared", "per_layer", "xlora"])
def test_fixed_gates_mix_equals_merged_weights(router, adapter):
    """Two experts of different rank/alpha/module sets, gates fixed at (0.3, 0.7), top_k = E: the model
    equals its base with ``W + 0.3 * delta_a + 0.7 * delta_c`` in every module (union; c absent = 0)."""
    pa, pc = adapter("llama", "a"), adapter("llama", "c")
    model = MiXSE.from_adapters(make_base(), {"a": pa, "c": pc}, top_k=2, router=router)
    set_fixed_gates(model, [0.3, 0.7])
    ref_model = make_base()
    with torch.no_grad():
        for gate, p in ((0.3, pa), (0.7, pc)):
            ad = load_lora_adapter(p)
            for path in ad.weights:
                lin = ref_model.get_submodule(path)
                lin.weight += gate * ad.scaling_for(path) * (ad.weights[path][1] @ ad.weights[path][0])
        ids = ids_for()
        assert rel_err(model(ids).logits, ref_model(ids).logits) < 1e-5
    q = model.lora_modules["model.layers.0.self_attn.q_proj"]
    v = model.lora_modules["model.layers.0.self_attn.v_proj"]
    k = model.lora_modules["model.layers.0.self_attn.k_proj"]
    assert q.ranks == [4, 2] and v.ranks == [4, 3] and k.ranks == [4, 0]
    assert q.expert_scaling.tolist() == [2.0, 2.0] and v.expert_scaling.tolist() == [2.0, 2.0]


# ------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("router", ["shared", "per_layer", "xlora"])
def test_router_only_training_lowers_loss_and_freezes_the_rest(router, adapter):
    base = make_base()
    model = MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, top_k=1, router=router)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if router == "per_layer":
        assert trainable == {f"base_model.{p}.router.linear.{w}" for p in model.lora_modules for w in ("weight", "bias")}
    else:
        assert trainable == {"router.linear.weight", "router.linear.bias"}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = ids_for(batch=4, seq=16)
    losses = []
    model.train()
    for _ in range(8):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


@pytest.mark.parametrize("router", ["shared", "per_layer"])
def test_autocast_training_step(router, adapter):
    """bf16 autocast (the mixed-precision training setup): the MoLoRA linears run like nn.Linear does
    there, the loss stays close to the fp32 one and the router gets finite, nonzero gradients."""
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, top_k=1,
                                router=router)
    spread_router(model)
    ids = ids_for(batch=2, seq=12)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert abs(out.loss.item() - ref) <= 2e-2 * abs(ref), (out.loss.item(), ref)
    out.loss.backward()
    grads = [p.grad for p in model.router_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_from_scratch_trains_experts_and_router():
    base = make_base()
    ids = ids_for()
    with torch.no_grad():
        ref = base(ids).logits.clone()
    model = MiXSE.from_scratch(base, num_experts=3, r=4, lora_alpha=8, top_k=2)
    assert model.expert_names == ["expert_0", "expert_1", "expert_2"]
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-6  # B = 0: starts as the base model
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "weight", "bias"}  # experts + router.linear
    assert all("router" in n or "lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert any(torch.count_nonzero(m.lora_B) > 0 for m in model.lora_modules.values())


def test_aux_loss_is_exposed_and_differentiable(adapter):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")},
                                aux_loss={"load_balancing": 0.01, "z_loss": 0.001, "mutual_information": 0.01})
    ids = ids_for()
    out = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() != 0
    # the concentration loss: the mean over the decoder layers' router calls of H(mean p), padding excluded
    conc = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")},
                               aux_loss={"concentration": 0.5})
    spread_router(conc)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    hidden = conc(ids, attention_mask=mask, output_hidden_states=True)
    want = []
    for layer in range(2):  # the shared router reads each decoder layer's input hidden state
        p = torch.softmax(conc.router.logits(hidden.hidden_states[layer]).double(), -1)[mask.bool()]
        mean_p = p.mean(0)
        want.append(-(mean_p * mean_p.log()).sum())
    assert hidden.aux_loss.item() == pytest.approx(0.5 * torch.stack(want).mean().item(), rel=1e-5)
    (out.loss + out.aux_loss).backward()
    assert model.router.linear.weight.grad.abs().sum() > 0
    plain = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a")})
    assert "aux_loss" not in plain(ids).keys()


def test_gradient_checkpointing_gives_the_same_router_grads(adapter):
    grads = []
    for gc in (False, True):
        base = make_base()
        model = MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
        spread_router(model, std=0.5)
        if gc:  # non-reentrant, as MiXSE requires (the default of transformers 5; 4.x defaults to reentrant)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = ids_for()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append(model.router.linear.weight.grad.clone())
        # gates (and their graph) are dropped after the forward unless checkpointing replays the layers
        assert all((s.ids is not None) == gc for s in model._placement.slots)
    assert grads[0].abs().sum() > 0
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_reentrant_gradient_checkpointing_is_refused(adapter):
    base = make_base()
    model = MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = ids_for()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(ids, labels=ids, use_cache=False)
    model.eval()  # inference does not replay layers: no error
    with torch.no_grad():
        model(ids, use_cache=False)


def test_bf16_model_with_fp32_router(adapter):
    base = make_base().to(torch.bfloat16)
    model = MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
    assert model.router.linear.weight.dtype == torch.float32
    assert next(iter(model.lora_modules.values())).lora_A.dtype == torch.bfloat16
    ids = ids_for()
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.router.linear.weight.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# save / load / export


@pytest.mark.parametrize("router", ["shared", "per_layer", "xlora"])
def test_save_load_roundtrip_is_exact(router, adapter, tmp_path):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "c": adapter("llama", "c")}, top_k=1, router=router)
    spread_router(model, std=1.0)
    ids = ids_for()
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "mixse")
    assert sorted(p.name for p in (tmp_path / "mixse").iterdir()) == ["experts.safetensors", "mixse_config.json", "router.safetensors"]
    cfg = json.loads((tmp_path / "mixse" / "mixse_config.json").read_text())
    assert cfg["expert_names"] == ["a", "c"] and cfg["router"] == router and cfg["top_k"] == 1
    loaded = MiXSE.from_pretrained(tmp_path / "mixse", make_base())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_is_atomic(adapter, tmp_path, monkeypatch):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a")})
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model.router.linear.bias += 1.0

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("selfmoe.mixse_files.atomic_write_json", boom)  # fails after the safetensors are written
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_save_expert_roundtrips_through_peft(adapter, tmp_path):
    pa, pc = adapter("llama", "a"), adapter("llama", "c")
    model = MiXSE.from_adapters(make_base(), {"a": pa, "c": pc})
    model.save_expert("c", tmp_path / "c")
    ids = ids_for()
    assert rel_err(peft_logits("llama", tmp_path / "c", ids), peft_logits("llama", pc, ids)) < 1e-6
    with pytest.raises(KeyError, match="no expert named 'zz'"):
        model.save_expert("zz", tmp_path / "zz")


# ------------------------------------------------------------------------------------------------------
# generation and routing behaviour


@pytest.mark.parametrize("router", ["shared", "per_layer", "xlora"])
def test_generate_with_cache_equals_full_recompute(router, adapter):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, router=router)
    spread_router(model)
    prompt = ids_for(batch=2, seq=5)
    with model.routing_stats() as stats:
        fast = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert fast.shape == (2, 11)
    used = stats.usage_matrix()
    assert (used.sum(0) > 0).all(), "both experts must be routed to, or this test proves little"
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(fast, seq)


def test_manual_decode_with_past_key_values_xlora(adapter):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, router="xlora")
    spread_router(model)
    ids = ids_for(batch=1, seq=6)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :4], use_cache=True)
        step = model(ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
    assert rel_err(step.logits, full[:, 4:]) < 1e-5


def test_random_routing_topk_all_and_renormalize(adapter):
    paths = {"a": adapter("llama", "a"), "b": adapter("llama", "b")}
    ids = ids_for()
    model = MiXSE.from_adapters(make_base(), paths, routing="random")
    with torch.no_grad():
        torch.manual_seed(0)
        y0 = model(ids).logits
        torch.manual_seed(1)
        y1 = model(ids).logits
    assert not torch.equal(y0, y1)
    with model.routing_stats() as stats, torch.no_grad():
        model(ids)
    assert all(min(s["usage"].values()) > 0 for s in stats.summary().values())

    def gate_sums(m):
        with m.routing_stats() as st, torch.no_grad():
            m(ids)
        return [sum(s["mean_gate"].values()) for s in st.summary().values()]

    spread_router(model)
    model.configure_routing(routing="learned")
    assert all(s < 1 for s in gate_sums(model))  # top-1, not renormalised
    model.configure_routing(renormalize=True)
    assert all(s == pytest.approx(1.0) for s in gate_sums(model))
    dense = MiXSE.from_adapters(make_base(), paths, top_k=2)
    assert all(s == pytest.approx(1.0) for s in gate_sums(dense))  # top_k = E: full softmax
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=2\], got 3"):
        dense.configure_routing(top_k=3)


@pytest.mark.parametrize("router,keys", [
    ("shared", ["model.layers.0", "model.layers.1"]),
    ("xlora", ["xlora"]),
    ("per_layer", None),
])
def test_routing_stats(router, keys, adapter):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, router=router)
    spread_router(model)
    ids = ids_for(batch=2, seq=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        model(ids, attention_mask=mask)  # off: nothing collected, nothing fails
        with model.routing_stats() as stats:
            model(ids, attention_mask=mask)
    summary = stats.summary()
    assert list(summary) == (keys if keys is not None else list(model.lora_modules))
    for entry in summary.values():
        assert entry["tokens"] == 13
        assert sum(entry["usage"].values()) == pytest.approx(1.0)
        assert set(entry["usage"]) == {"a", "b"}
    assert model._state.stats is None


def test_add_expert_extends_router_and_keeps_old_outputs(adapter):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
    spread_router(model)
    ids = ids_for()
    old = {p: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for p, m in model.lora_modules.items()}
    old_router = {n: p.detach().clone() for n, p in model.router.named_parameters()}
    with torch.no_grad():
        before = model(ids).logits
    idx = model.add_expert("c", adapter("llama", "c"), router_init_logit=-1e4)
    assert idx == 2 and model.expert_names == ["a", "b", "c"]
    with torch.no_grad():
        after = model(ids).logits
    assert rel_err(after, before) < 1e-6
    for p, m in model.lora_modules.items():
        A, B = old[p]
        assert torch.equal(m.lora_A[:2, : A.shape[1]], A) and torch.equal(m.lora_B[:2, :, : B.shape[2]], B)
        assert not m.lora_A.requires_grad and not m.lora_B.requires_grad
    assert model.lora_modules["model.layers.0.self_attn.q_proj"].ranks == [4, 8, 2]
    assert model.lora_modules["model.layers.0.mlp.up_proj"].ranks == [4, 8, 0]
    for n, p in model.router.named_parameters():
        assert torch.equal(p[:2], old_router[n])
    assert model.router.linear.bias[2] == -1e4
    # opening the new expert changes the outputs; with all gates on it, this is the c adapter alone
    set_fixed_gates(model, [1e-30, 1e-30, 1.0])
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_logits("llama", adapter("llama", "c"), ids)) < 1e-5
    with pytest.raises(ValueError, match="already exists"):
        model.add_expert("a", adapter("llama", "a"))


def test_add_expert_wraps_new_modules_per_layer(adapter):
    model = MiXSE.from_adapters(make_base(), {"c": adapter("llama", "c")}, router="per_layer")
    assert len(model.lora_modules) == 4  # q_proj and v_proj of two layers
    model.add_expert("a", adapter("llama", "a"), router_init_logit=-1e4)
    assert len(model.lora_modules) == 14
    assert model.lora_modules["model.layers.1.mlp.down_proj"].ranks == [0, 4]
    ids = ids_for()
    model.configure_routing(top_k=2)
    set_fixed_gates(model, [1e-30, 1.0])
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_logits("llama", adapter("llama", "a"), ids)) < 1e-5


def test_unload_gives_back_the_original_modules(adapter):
    base = make_base()
    base.lm_head.weight.requires_grad_(True)
    base.model.norm.weight.requires_grad_(False)
    originals = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    params, flags = base_state(base)
    ids = ids_for()
    with torch.no_grad():
        ref = base(ids).logits.clone()
    model = MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
    model.lora_modules["model.layers.0.mlp.up_proj"].merge_expert(1)
    out = model.unload()
    assert out is base
    assert {n: m for n, m in out.named_modules() if isinstance(m, nn.Linear)} == originals
    assert not any(isinstance(m, MoLoRALinear) for m in out.modules())
    after_params, after_flags = base_state(out)
    assert after_flags == flags
    assert all(torch.equal(after_params[n], params[n]) for n in params)
    assert all(not layer._forward_pre_hooks for layer in out.model.layers) and not out.model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(out(ids).logits, ref)
    with pytest.raises(RuntimeError, match="unloaded"):
        model(ids)


def test_disable_experts_gives_base_outputs(adapter):
    base = make_base()
    ids = ids_for()
    with torch.no_grad():
        ref = base(ids).logits.clone()
        model = MiXSE.from_adapters(base, {"a": adapter("llama", "a")})
        with model.disable_experts():
            assert torch.equal(model(ids).logits, ref)
        assert not torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("router", ["shared", "per_layer", "xlora"])
def test_deepcopy_is_an_independent_working_model(adapter, router):
    """copy.deepcopy of a MiXSE: the same logits, routed by the copy's own router (its hooks are the
    copy's, not the original's), and changing the copy leaves the original alone."""
    import copy

    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, router=router)
    spread_router(model)
    ids = ids_for()
    with torch.no_grad():
        ref = model(ids).logits.clone()
        twin = copy.deepcopy(model)
        assert torch.equal(twin(ids).logits, ref)
        spread_router(twin, seed=7)  # another routing for the copy alone
        changed = twin(ids).logits
        assert torch.equal(model(ids).logits, ref)
        assert not torch.equal(changed, ref)


# ------------------------------------------------------------------------------------------------------
# bad input: clear errors, base model untouched


def assert_untouched(base, params, flags):
    assert not any(isinstance(m, MoLoRALinear) for m in base.modules())
    p2, f2 = base_state(base)
    assert f2 == flags and all(torch.equal(p2[n], params[n]) for n in params)
    assert all(not layer._forward_pre_hooks for layer in base.model.layers)


def test_bad_target_modules(adapter):
    base = make_base()
    state = base_state(base)
    with pytest.raises(ValueError, match=r"target_modules: 'qq_proj' matches no nn.Linear .*'q_proj'"):
        MiXSE.from_adapters(base, {"a": adapter("llama", "a")}, target_modules=["q_proj", "qq_proj"])
    with pytest.raises(ValueError, match=r"adapter 'a' .*has weights for 'model.layers.0.mlp.down_proj', which target_modules"):
        MiXSE.from_adapters(base, {"a": adapter("llama", "a")}, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"module 'lm_head' is outside the decoder layers"):
        MiXSE.from_adapters(base, {"h": adapter("llama", "head")}, router="shared")
    assert_untouched(base, *state)
    with pytest.raises(ValueError, match=r"target_modules: 'qq_proj' matches no nn.Linear"):
        MiXSE.from_scratch(base, 2, target_modules=["qq_proj"])
    assert_untouched(base, *state)
    ok = MiXSE.from_adapters(base, {"c": adapter("llama", "c")}, target_modules=["q_proj", "v_proj"])
    assert len(ok.lora_modules) == 4


def test_adapter_shape_and_module_mismatch(adapter, tmp_path):
    wide = make_adapter("llama", tmp_path / "wide", r=4, lora_alpha=8, seed=1, intermediate_size=96)
    deep = make_adapter("llama", tmp_path / "deep", r=4, lora_alpha=8, seed=1, num_hidden_layers=3)
    base = make_base()
    state = base_state(base)
    with pytest.raises(ValueError, match=r"adapter 'w' \(.*wide\): module 'model.layers.0.mlp.down_proj': lora_A \[4, 96\] .*in_features=128"):
        MiXSE.from_adapters(base, {"a": adapter("llama", "a"), "w": wide})
    with pytest.raises(ValueError, match=r"adapter 'd' .*module 'model.layers.2.mlp.down_proj' does not exist in LlamaForCausalLM"):
        MiXSE.from_adapters(base, {"d": deep})
    assert_untouched(base, *state)


def test_missing_corrupt_and_inconsistent_adapter_files(adapter, tmp_path):
    src = adapter("llama", "a")
    base = make_base()
    state = base_state(base)
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing/adapter_model.safetensors"):
        MiXSE.from_adapters(base, {"a": src, "m": missing})
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"corrupt/adapter_model.safetensors"):
        MiXSE.from_adapters(base, {"c": corrupt})
    ranked = tmp_path / "ranked"
    shutil.copytree(src, ranked)
    cfg = json.loads((ranked / "adapter_config.json").read_text())
    cfg["r"] = 8
    (ranked / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match=r"module 'model.layers.0.mlp.down_proj': config rank is 8 .*lora_A has shape \[4, 128\]"):
        MiXSE.from_adapters(base, {"r": ranked})
    assert_untouched(base, *state)


def test_bad_arguments(adapter):
    base = make_base()
    state = base_state(base)
    two = {"a": adapter("llama", "a"), "b": adapter("llama", "b")}
    for k in (0, 3, 1.0):
        with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=2\]"):
            MiXSE.from_adapters(base, two, top_k=k)
    with pytest.raises(ValueError, match="router must be one of"):
        MiXSE.from_adapters(base, two, router="mlp")
    with pytest.raises(ValueError, match="adapters must be a non-empty dict"):
        MiXSE.from_adapters(base, {})
    with pytest.raises(ValueError, match="unknown loss"):
        MiXSE.from_adapters(base, two, aux_loss={"balance": 1.0})
    assert_untouched(base, *state)
    MiXSE.from_adapters(base, two)
    with pytest.raises(ValueError, match="already holds MoLoRALinear"):
        MiXSE.from_adapters(base, two)


def test_from_pretrained_errors(adapter, tmp_path):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a")})
    model.save_pretrained(tmp_path / "ok")
    base = make_base()
    state = base_state(base)
    with pytest.raises(FileNotFoundError, match="mixse_config.json not found"):
        MiXSE.from_pretrained(tmp_path, base)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    data = (bad / "experts.safetensors").read_bytes()
    (bad / "experts.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"bad/experts.safetensors: cannot read safetensors"):
        MiXSE.from_pretrained(bad, base)
    with pytest.raises(ValueError, match=r"experts.safetensors: module 'model.layers.0.mlp.down_proj': lora_A \[1, 4, 128\]"):
        MiXSE.from_pretrained(tmp_path / "ok", make_base(intermediate_size=96))
    cfg = json.loads((tmp_path / "ok" / "mixse_config.json").read_text())
    cfg["top_k"] = 2
    shutil.copytree(tmp_path / "ok", tmp_path / "k2")
    (tmp_path / "k2" / "mixse_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"k2/mixse_config.json: top_k must be an int in \[1, num_experts=1\]"):
        MiXSE.from_pretrained(tmp_path / "k2", base)
    assert_untouched(base, *state)


def test_shared_hook_reads_hidden_states_positional_or_keyword(adapter):
    """Decoder layers may get hidden_states positionally (Llama today) or as a keyword; both route."""
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
    spread_router(model)
    inner = model.base_model.model
    h = torch.randn(2, 5, 64)
    pos = torch.arange(5)[None].expand(2, 5)
    rope = inner.rotary_emb(h, position_ids=pos)
    layer = inner.layers[0]
    with torch.no_grad(), model.routing_stats() as stats:
        a = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
        b = layer(hidden_states=h, attention_mask=None, position_ids=pos, position_embeddings=rope)
    assert torch.equal(a, b)
    assert stats.summary()["model.layers.0"]["tokens"] == 20


# ------------------------------------------------------------------------------------------------------
# untrusted files: non-finite values, wrong types, failures part-way, names, other bases


def assert_untouched_with_inner_hooks(base, params, flags):
    assert_untouched(base, params, flags)
    assert not base.model._forward_pre_hooks and not base.model._forward_hooks


def saved_copy(src, dst, edit_config=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "mixse_config.json").read_text())
        edit_config(cfg)
        (dst / "mixse_config.json").write_text(json.dumps(cfg))  # json writes NaN as NaN, as a hostile file may
    if edit_tensors is not None:
        name, key, value = edit_tensors
        tensors = load_file(str(dst / name))
        key = key if key in tensors else next(k for k in tensors if k.endswith(key))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        save_file(tensors, str(dst / name))
    return dst


@pytest.mark.parametrize("router", ["shared", "per_layer"])
def test_from_pretrained_refuses_non_finite_values_and_leaves_the_base_untouched(adapter, tmp_path, router):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")}, router=router)
    model.save_pretrained(tmp_path / "ok")
    base = make_base()
    state = base_state(base)
    cases = {
        "nan-expert": (None, ("experts.safetensors", "lora_B", float("nan")), r"experts.safetensors: tensor .*lora_B.* NaN"),
        "inf-expert": (None, ("experts.safetensors", "lora_A", float("inf")), r"experts.safetensors: tensor .* NaN or infinite"),
        "nan-router": (None, ("router.safetensors", "linear.weight", float("nan")), r"router.safetensors: tensor .* NaN"),
        "nan-scaling": (lambda c: next(iter(c["modules"].values())).__setitem__("scalings", [float("nan")] * 2), None,
                        r"mixse_config.json: module .*: scalings must be finite numbers"),
        "modules-list": (lambda c: c.__setitem__("modules", list(c["modules"])), None,
                         r"mixse_config.json: modules must be an object"),
        "rank-string": (lambda c: next(iter(c["modules"].values())).__setitem__("ranks", ["4", "8"]), None,
                        r"mixse_config.json: module .*: ranks must be integers"),
        "top-k-float": (lambda c: c.__setitem__("top_k", 1.5), None, r"mixse_config.json: top_k must be an integer"),
        "renormalize-string": (lambda c: c.__setitem__("renormalize", "no"), None,
                               r"mixse_config.json: renormalize must be true or false"),
        "expert-name-path": (lambda c: c.__setitem__("expert_names", ["../../a", "b"]), None,
                             r"mixse_config.json: expert name '../../a' is not a safe name"),
    }
    for name, (edit_config, edit_tensors, message) in cases.items():
        bad = saved_copy(tmp_path / "ok", tmp_path / name, edit_config, edit_tensors)
        with pytest.raises(ValueError, match=message):
            MiXSE.from_pretrained(bad, base)
        assert_untouched_with_inner_hooks(base, *state)


def test_a_load_failing_after_the_base_was_modified_restores_it(adapter, tmp_path, monkeypatch):
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a"), "b": adapter("llama", "b")})
    model.save_pretrained(tmp_path / "ok")
    base = make_base()
    base.model.layers[1].mlp.requires_grad_(True)
    base.model.embed_tokens.requires_grad_(False)  # flags as a user may have set them: restored as they were
    state = base_state(base)
    ids = ids_for()
    with torch.no_grad():
        before = base(ids).logits

    # 1. the router state fails to load after every linear was swapped and hooks were registered
    from selfmoe.routers import TopKRouter

    def broken_load(self, *args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for TopKRouter: size mismatch")
    monkeypatch.setattr(TopKRouter, "load_state_dict", broken_load)
    with pytest.raises(ValueError, match=r"router.safetensors: Error\(s\) in loading state_dict"):
        MiXSE.from_pretrained(tmp_path / "ok", base)
    assert_untouched_with_inner_hooks(base, *state)
    monkeypatch.undo()

    # 2. attaching fails half-way (after some linears were swapped and some hooks registered)
    from selfmoe.placements import SharedPlacement

    calls = {"n": 0}
    original = SharedPlacement._slot

    def failing_slot(self, model, index):
        calls["n"] += 1
        if calls["n"] == 9:  # the first layer's 7 linears are in, with their hook
            raise MemoryError("simulated failure while attaching")
        return original(self, model, index)
    monkeypatch.setattr(SharedPlacement, "_slot", failing_slot)
    with pytest.raises(MemoryError):
        MiXSE.from_pretrained(tmp_path / "ok", base)
    assert calls["n"] == 9
    assert_untouched_with_inner_hooks(base, *state)
    monkeypatch.undo()

    with torch.no_grad():
        assert torch.equal(base(ids).logits, before)
    MiXSE.from_pretrained(tmp_path / "ok", base)  # and the base still takes a MiXSE afterwards


@pytest.mark.parametrize("bad", ["../../x", "/abs/path", ".hidden", "a/b", "", "x" * 129])
def test_unsafe_expert_names_are_refused(adapter, bad):
    base = make_base()
    with pytest.raises(ValueError, match="not a safe name"):
        MiXSE.from_adapters(base, {bad: adapter("llama", "a")})
    with pytest.raises(ValueError, match="not a safe name"):
        MiXSE.from_scratch(make_base(), 2, expert_names=["ok", bad])
    model = MiXSE.from_adapters(make_base(), {"a": adapter("llama", "a")})
    with pytest.raises(ValueError, match="not a safe name"):
        model.add_expert(bad, adapter("llama", "b"))


def test_experts_of_different_bases_warn_or_are_refused_with_strict(adapter, tmp_path):
    from selfmoe.merging import merge_adapters

    other = tmp_path / "other-base"
    shutil.copytree(adapter("llama", "b"), other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    first = json.loads((adapter("llama", "a") / "adapter_config.json").read_text())
    if not first.get("base_model_name_or_path"):  # PEFT records the base's name_or_path; make sure both declare one
        first_dir = tmp_path / "a"
        shutil.copytree(adapter("llama", "a"), first_dir)
        first["base_model_name_or_path"] = "someone/the-model"
        (first_dir / "adapter_config.json").write_text(json.dumps(first))
    else:
        first_dir = adapter("llama", "a")
    with pytest.warns(UserWarning, match="experts declare different base models.*another-model"):
        MiXSE.from_adapters(make_base(), {"a": first_dir, "b": other})
    base = make_base()
    state = base_state(base)
    with pytest.raises(AdapterFormatError, match="different base models.*refused"):
        MiXSE.from_adapters(base, {"a": first_dir, "b": other}, strict=True)
    assert_untouched_with_inner_hooks(base, *state)
    both = [load_lora_adapter(first_dir), load_lora_adapter(other)]
    with pytest.warns(UserWarning, match="different base models"):
        merge_adapters(both, "linear")
    with pytest.raises(AdapterFormatError, match="different base models"):
        merge_adapters(both, "linear", strict=True)


def test_pathological_rank_pattern_is_refused_quickly(adapter, tmp_path):
    import time

    for pattern in ["(a+)+$", "(.*_proj){20}", "(q|qq)*_proj", r"(q)\1_proj"]:
        bad = tmp_path / f"bad-{abs(hash(pattern))}"
        shutil.copytree(adapter("llama", "c"), bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg["rank_pattern"] = {pattern: 3, **cfg["rank_pattern"]}
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        with pytest.raises(AdapterFormatError, match="rank_pattern key .* is refused"):
            load_lora_adapter(bad)
        assert time.perf_counter() - t0 < 1.0
    # the patterns PEFT documents (module-name suffixes, escaped paths, simple wildcards) still work
    good = tmp_path / "good"
    shutil.copytree(adapter("llama", "c"), good)
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {r"model\.layers\.0\.self_attn\.v_proj": 3, "layers.1.*v_proj": 3}
    (good / "adapter_config.json").write_text(json.dumps(cfg))
    ad = load_lora_adapter(good)
    assert ad.rank_for("model.layers.0.self_attn.v_proj") == 3 and ad.rank_for("model.layers.1.self_attn.v_proj") == 3
    assert ad.rank_for("model.layers.0.self_attn.q_proj") == 2
