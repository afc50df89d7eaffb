"""Weight-merging baselines (selfmoe.merging): hand-worked small cases, properties, and checks against PEFT.

Hand-worked cases spell out every intermediate value in comments, so a reader can re-derive them.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from selfmoe.adapters import LoRAAdapter, load_lora_adapter, save_lora_adapter
from selfmoe.merging import (
    DEFAULT_DENSITY,
    dare_drop,
    iter_merged_deltas,
    merge_adapters,
    merge_deltas,
    merge_into_base,
    merged_to_lora,
    ties_disjoint_merge,
    trim_by_magnitude,
)

T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731  (hand-worked values, exact in float64)

# Three 2x3 "task vectors" for the TIES cases; magnitudes inside each are distinct, so the trim is unambiguous.
TAU1 = T([[5.0, -1.0, 3.0], [-4.0, 0.5, 2.0]])
TAU2 = T([[3.0, -6.0, 1.0], [2.0, -0.3, -5.0]])
TAU3 = T([[-2.0, 4.0, -7.0], [0.1, 1.0, 5.0]])


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------------
# Hand-worked cases
# ------------------------------------------------------------------------------------------------------
def test_linear_hand_worked():
    t1, t2 = T([[1, -2, 3], [0, 4, -1]]), T([[2, 1, -1], [3, -2, 5]])
    # 0.5*t1 = [[0.5,-1,1.5],[0,2,-0.5]];  2*t2 = [[4,2,-2],[6,-4,10]]
    assert torch.equal(merge_deltas([t1, t2], "linear", [0.5, 2.0]), T([[4.5, 1, -0.5], [6, -2, 9.5]]))
    # default weights are 1 each (task arithmetic): plain sum
    assert torch.equal(merge_deltas([t1, t2], "linear"), T([[3, -1, 2], [3, 2, 4]]))


def test_ties_hand_worked():
    # density 0.5 keeps floor(0.5*6) = 3 entries of each:
    #   |tau1| = 5,1,3,4,.5,2  -> keep 5,4,3  -> [[5,0,3],[-4,0,0]]
    #   |tau2| = 3,6,1,2,.3,5  -> keep 6,5,3  -> [[3,-6,0],[0,0,-5]]
    #   |tau3| = 2,4,7,.1,1,5  -> keep 7,5,4  -> [[0,4,-7],[0,0,5]]
    assert torch.equal(trim_by_magnitude(TAU1, 0.5), T([[5, 0, 3], [-4, 0, 0]]))
    assert torch.equal(trim_by_magnitude(TAU2, 0.5), T([[3, -6, 0], [0, 0, -5]]))
    assert torch.equal(trim_by_magnitude(TAU3, 0.5), T([[0, 4, -7], [0, 0, 5]]))
    # sum of trimmed = [[8,-2,-4],[-4,0,0]] -> elected signs [[+,-,-],[-,0,0]]
    # (0,0): 5 and 3 agree -> mean 4          (0,1): -6 agrees, 4 does not -> -6
    # (0,2): -7 agrees, 3 does not -> -7     (1,0): -4
    # (1,1): all trimmed -> 0                 (1,2): -5 + 5 = 0, no majority -> 0
    expected = T([[4, -6, -7], [-4, 0, 0]])
    assert torch.equal(merge_deltas([TAU1, TAU2, TAU3], "ties", density=0.5), expected)


def test_ties_weights_enter_the_sign_election():
    # weights [1,1,2]: v3 = 2*trimmed tau3 = [[0,8,-14],[0,0,10]]
    # sum v = [[8,2,-11],[-4,0,5]] -> signs [[+,+,-],[-,0,+]]
    # (0,0): 5,3 -> 4   (0,1): 8 -> 8   (0,2): -14   (1,0): -4   (1,1): 0   (1,2): 10
    expected = T([[4, 8, -14], [-4, 0, 10]])
    assert torch.equal(merge_deltas([TAU1, TAU2, TAU3], "ties", [1, 1, 2], density=0.5), expected)
    # A common weight lam scales the TIES result by lam (the paper's lambda).
    assert torch.equal(merge_deltas([TAU1, TAU2, TAU3], "ties", [0.5] * 3, density=0.5), T([[2, -3, -3.5], [-2, 0, 0]]))


def test_dare_ties_hand_worked_without_drops():
    # drop_rate 0 keeps everything (scale 1), then TIES election on the untrimmed tau:
    # sum = [[6,-3,-3],[-1.9,1.2,2]] -> signs [[+,-,-],[-,+,+]]
    # (0,0): 5,3 -> 4       (0,1): -1,-6 -> -3.5   (0,2): -7 -> -7
    # (1,0): -4 -> -4       (1,1): .5,1 -> .75      (1,2): 2,5 -> 3.5
    expected = T([[4, -3.5, -7], [-4, 0.75, 3.5]])
    torch.testing.assert_close(merge_deltas([TAU1, TAU2, TAU3], "dare_ties", drop_rate=0.0, seed=0), expected,
                               rtol=0, atol=1e-15)


def test_merge_adapters_hand_worked():
    # expert 1: r=1, alpha=2 -> scaling 2; B1 @ A1 = [[1],[0],[2]] @ [[1,2]] = [[1,2],[0,0],[2,4]]
    a1 = LoRAAdapter(1, 2.0, ["q_proj"], {"m.q_proj": (T([[1, 2]]), T([[1], [0], [2]]))})
    # expert 2: r=1, alpha=0.5 -> scaling 0.5; B2 @ A2 = [[0],[1],[1]] @ [[1,-1]] = [[0,0],[1,-1],[1,-1]]
    # it also adapts m.v_proj: [[3]] @ [[1]] * 0.5 = [[1.5]], which expert 1 does not touch
    a2 = LoRAAdapter(1, 0.5, ["q_proj", "v_proj"], {"m.q_proj": (T([[1, -1]]), T([[0], [1], [1]])),
                                                    "m.v_proj": (T([[1]]), T([[3]]))})
    merged = merge_adapters([a1, a2], "linear")
    assert merged["m.q_proj"].dtype == torch.float64  # float64 adapters merge in float64
    assert torch.equal(merged["m.q_proj"], T([[2, 4], [0.5, -0.5], [4.5, 7.5]]))
    assert torch.equal(merged["m.v_proj"], T([[1.5]]))
    # TIES: a missing module is a zero update that neither votes nor counts, so v_proj is expert 2's alone
    ties = merge_adapters([a1, a2], "ties", density=1.0)
    assert torch.equal(ties["m.v_proj"], T([[1.5]]))
    # q_proj, density 1: (0,0) 2 vs 0 -> 2; (0,1) 4; (1,*) only expert 2; (2,0) 4,0.5 -> 2.25; (2,1) 8 vs -0.5 -> 8
    assert torch.equal(ties["m.q_proj"], T([[2, 4], [0.5, -0.5], [2.25, 8]]))


def test_trim_floor_and_deterministic_ties():
    x = T([1.0, -1.0, 1.0, 0.5])
    # floor(0.5*4) = 2 kept; equal magnitudes: lower index first
    assert torch.equal(trim_by_magnitude(x, 0.5), T([1.0, -1.0, 0, 0]))
    # 0.29*100 is 28.999999999999996 in floats: still 29 kept
    assert int((trim_by_magnitude(torch.arange(1.0, 101.0), 0.29) != 0).sum()) == 29
    assert int((trim_by_magnitude(torch.arange(1.0, 101.0), 0.005) != 0).sum()) == 0


# ------------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("linear", {}), ("ties", {"density": 1.0}),
                                       ("dare", {"drop_rate": 0.0, "seed": 0}), ("dare_ties", {"drop_rate": 0.0, "seed": 0})])
def test_single_delta_is_returned_unchanged(method, kw):
    d = rand(5, 7, seed=1)
    assert torch.equal(merge_deltas([d], method, **kw), d)


def test_ties_with_full_density_and_agreeing_signs_is_the_mean():
    base = rand(6, 5, seed=2)
    sign = torch.sign(base)
    deltas = [sign * rand(6, 5, seed=s).abs() for s in (3, 4, 5)]  # same sign pattern everywhere
    torch.testing.assert_close(merge_deltas(deltas, "ties", density=1.0), torch.stack(deltas).mean(0),
                               rtol=1e-6, atol=0)


def test_dare_without_drops_is_linear():
    deltas, w = [rand(4, 9, seed=s) for s in (6, 7, 8)], [0.3, -1.2, 2.0]
    assert torch.equal(merge_deltas(deltas, "dare", w, drop_rate=0.0, seed=1), merge_deltas(deltas, "linear", w))


def test_dare_entries_are_dropped_or_rescaled():
    d = rand(100, 100, seed=9, dtype=torch.float64)
    p = 0.3
    out = dare_drop(d, p, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.equal(out[kept], d[kept] / (1 - p))
    # fraction dropped ~ Binomial(10^4, p)/10^4: std sqrt(p(1-p)/10^4) = 0.0046; allow 5 std
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / d.numel())


def test_dare_is_unbiased_linear_in_expectation():
    d1, d2 = T([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]), T([[0.2, 1.0, -4.0], [-1.0, 2.5, 1.5]])
    w, p, n = [0.5, 2.0], 0.6, 4000
    samples = torch.stack([merge_deltas([d1, d2], "dare", w, drop_rate=p, seed=s) for s in range(n)])
    linear = merge_deltas([d1, d2], "linear", w)
    # Each kept entry is x/(1-p) with prob 1-p: Var = x^2 p/(1-p); experts' masks are independent.
    std_of_mean = torch.sqrt((w[0] ** 2 * d1 ** 2 + w[1] ** 2 * d2 ** 2) * p / (1 - p) / n)
    err = (samples.mean(0) - linear).abs()
    # 5 standard errors per entry (6 entries, normal tail ~6e-7 each); zero-variance entries must match exactly.
    assert bool((err <= 5 * std_of_mean).all()), (err, std_of_mean)
    # Without the 1/(1-p) rescale the mean would be off by p*|linear| (>= 0.6*0.4 here): far outside the bound.
    assert bool(((p * linear.abs())[linear != 0] > 5 * std_of_mean[linear != 0]).all())


def test_dare_masks_are_independent_per_expert_and_reproducible():
    d = rand(8, 8, seed=10)
    # With one shared mask, d - d would stay exactly 0.
    assert merge_deltas([d, d], "dare", [1.0, -1.0], drop_rate=0.5, seed=0).abs().sum() > 0
    a = merge_deltas([d, d], "dare", drop_rate=0.5, seed=123)
    assert torch.equal(a, merge_deltas([d, d], "dare", drop_rate=0.5, seed=123))
    assert torch.equal(a, merge_deltas([d, d], "dare", drop_rate=0.5, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(a, merge_deltas([d, d], "dare", drop_rate=0.5, seed=124))


def test_ties_disjoint_merge_tie_gives_zero():
    assert torch.equal(ties_disjoint_merge(T([[2.0], [-2.0]])), T([0.0]))


def test_half_precision_inputs_are_merged_in_float32():
    deltas = [rand(1000, seed=s, dtype=torch.float16) for s in (30, 31, 32)]
    w = [0.3, 0.7, 1.1]
    out = merge_deltas(deltas, "linear", w)
    assert out.dtype == torch.float16
    # One rounding at the end: the float32 computation cast to fp16 ...
    assert torch.equal(out, merge_deltas([d.float() for d in deltas], "linear", w).half())
    # ... which differs from doing the weighting in fp16 (each product rounded first), so this test can fail.
    naive = torch.stack([d * wi for d, wi in zip(deltas, w)]).sum(0)
    assert not torch.equal(out, naive)


# ------------------------------------------------------------------------------------------------------
# Reference check against PEFT's own TIES implementation (equal weights: PEFT elects signs unweighted)
# ------------------------------------------------------------------------------------------------------
def test_ties_matches_peft_merge_utils_for_equal_weights():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    deltas = [rand(16, 24, seed=s, dtype=torch.float64) for s in (20, 21, 22, 23)]
    ours = merge_deltas(deltas, "ties", [0.7] * 4, density=0.3)
    ref = merge_utils.ties(deltas, torch.tensor([0.7] * 4, dtype=torch.float64), density=0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    assert DEFAULT_DENSITY == 0.2


# ------------------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="average"), ValueError, "method must be one of"),
    (dict(method="linear", density=0.5), ValueError, "density is only used by method 'ties'"),
    (dict(method="dare", density=0.5), ValueError, "DARE's parameter is drop_rate"),
    (dict(method="ties", drop_rate=0.5), ValueError, "drop_rate is only used by"),
    (dict(method="ties", density=0.0), ValueError, r"density must be in \(0, 1\]"),
    (dict(method="ties", density=1.5), ValueError, r"density must be in \(0, 1\]"),
    (dict(method="dare", drop_rate=1.0), ValueError, r"drop_rate must be in \[0, 1\)"),
    (dict(method="linear", weights=[1.0]), ValueError, "weights has 1 entries but there are 2 experts"),
    (dict(method="linear", weights=[1.0, float("nan")]), ValueError, "weights must be finite"),
    (dict(method="dare", seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        merge_deltas([torch.ones(2, 2), torch.ones(2, 2)], **kwargs)


def test_bad_deltas():
    with pytest.raises(ValueError, match=r"deltas\[1\] has shape \[2, 3\] but deltas\[0\] has shape \[3, 2\]"):
        merge_deltas([torch.ones(3, 2), torch.ones(2, 3)], "linear")
    with pytest.raises(ValueError, match="non-empty"):
        merge_deltas([], "linear")
    with pytest.raises(TypeError, match=r"deltas\[0\] must be a floating-point tensor"):
        merge_deltas([torch.ones(2, dtype=torch.int64)], "linear")


def test_merge_adapters_shape_mismatch_names_the_module():
    a1 = LoRAAdapter(1, 1.0, ["q_proj"], {"m.q_proj": (torch.ones(1, 4), torch.ones(3, 1))})
    a2 = LoRAAdapter(1, 1.0, ["q_proj"], {"m.q_proj": (torch.ones(1, 5), torch.ones(3, 1))})
    with pytest.raises(ValueError, match=r"'m\.q_proj': adapters\[1\] has update shape \[3, 5\].*\[3, 4\]"):
        merge_adapters([a1, a2], "linear")
    with pytest.raises(ValueError, match="density"):
        iter_merged_deltas([a1], "linear", density=0.5)  # validated eagerly, not on first next()


# ------------------------------------------------------------------------------------------------------
# Into a model, and back to a LoRA
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_llama(tmp_path_factory):
    """A tiny Llama, a PEFT LoRA on all 7 projections (random A and B, per-module rank/alpha), saved."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128)).eval()
    pristine = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", rank_pattern={"down_proj": 2},
                          alpha_pattern={"layers.0.self_attn.v_proj": 3},
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # PEFT's zero lora_B would make the comparison vacuous
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("peft_adapter")
    pm.save_pretrained(path)
    ids = torch.randint(0, 128, (2, 7), generator=g)
    with torch.no_grad():
        ref = pm(ids).logits
        plain = pristine(ids).logits
    return dict(pristine=pristine, path=path, ids=ids, ref=ref, plain=plain)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_merge_into_base_reproduces_peft_forward(peft_llama):
    adapter = load_lora_adapter(peft_llama["path"])
    model = copy.deepcopy(peft_llama["pristine"])
    merge_into_base(model, merge_adapters([adapter], "linear"))
    with torch.no_grad():
        out = model(peft_llama["ids"]).logits
    assert _rel(peft_llama["plain"], peft_llama["ref"]) > 1e-2  # the adapter really changes the output
    assert _rel(out, peft_llama["ref"]) <= 1e-5


def test_linear_merge_of_one_adapter_is_its_delta(peft_llama):
    adapter = load_lora_adapter(peft_llama["path"])
    merged = merge_adapters([adapter], "linear")
    assert set(merged) == set(adapter.weights)
    for m in adapter.weights:
        assert torch.equal(merged[m], adapter.delta(m, dtype=torch.float32))


def test_merge_into_base_checks_everything_before_changing_anything(peft_llama):
    model = copy.deepcopy(peft_llama["pristine"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"model.layers.0.self_attn.q_proj": torch.ones(64, 64)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj': delta has shape \[64, 128\] but the weight is \[128, 64\]"):
        merge_into_base(model, {**good, "model.layers.0.mlp.up_proj": torch.ones(64, 128)})
    with pytest.raises(KeyError, match=r"'model\.layers\.9\.self_attn\.q_proj' not found"):
        merge_into_base(model, {**good, "model.layers.9.self_attn.q_proj": torch.ones(64, 64)})
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.mlp' is a LlamaMLP, not an nn\.Linear"):
        merge_into_base(model, {**good, "model.layers.0.mlp": torch.ones(64, 64)})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_into_base_accumulates_in_float32_for_bf16_weights():
    lin = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.fill_(256.0)
    model = torch.nn.Sequential(lin)
    # bf16 spacing is 2 at 256 and 2**-7 at 1. 256 + 1.00390625 = 257.0039 rounds once to 258; casting the delta
    # to bf16 first rounds it to 1.0 (a tie, to even) and then 257 rounds (tie, to even) to 256.
    merge_into_base(model, {"0": torch.tensor([[1.00390625]])})
    assert lin.weight.item() == 258.0


def test_merged_to_lora_exact_when_rank_suffices_and_saves_as_adapter(tmp_path):
    g = torch.Generator().manual_seed(5)
    deltas = {  # true rank 2 and 3 (generic random factors); r=4 >= both; one delta has min dim 3 < r
        "model.layers.0.self_attn.q_proj": torch.randn(64, 2, generator=g, dtype=torch.float64)
        @ torch.randn(2, 64, generator=g, dtype=torch.float64),
        "model.layers.1.mlp.down_proj": torch.randn(64, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, 128, generator=g, dtype=torch.float64),
        "tiny": torch.randn(3, 5, generator=g, dtype=torch.float64),
    }
    factors = merged_to_lora(deltas, r=4, lora_alpha=8)
    for m, d in deltas.items():
        A, B = factors[m]
        assert A.shape == (4, d.shape[1]) and B.shape == (d.shape[0], 4) and A.dtype == torch.float64
        assert _rel((8 / 4) * B @ A, d) <= 1e-12, m
    # Through the PEFT format and back into a model: the saved single adapter applies exactly the merged deltas.
    del factors["tiny"]
    save_lora_adapter(tmp_path / "merged", factors, r=4, lora_alpha=8)
    reloaded = load_lora_adapter(tmp_path / "merged")
    for m in factors:
        assert _rel(reloaded.delta(m), deltas[m]) <= 1e-12, m


def test_merged_to_lora_truncation_is_the_best_rank_r_approximation():
    d = rand(12, 9, seed=11, dtype=torch.float64)
    s = torch.linalg.svdvals(d)
    A, B = merged_to_lora({"m": d}, r=3)["m"]  # lora_alpha defaults to r: scaling 1
    # Eckart-Young: the Frobenius error of the best rank-3 approximation is the norm of the tail singular values.
    torch.testing.assert_close((B @ A - d).norm(), s[3:].norm(), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        merged_to_lora({"m": d}, r=0)
    with pytest.raises(ValueError, match=r"'m': expected a 2-D floating delta"):
        merged_to_lora({"m": torch.ones(3)}, r=1)


def test_ties_merge_of_two_peft_experts_end_to_end(tmp_path, peft_llama):
    """Two experts -> TIES -> single LoRA via SVD at full rank -> PEFT forward equals base + merged deltas."""
    peft = pytest.importorskip("peft")
    e1 = load_lora_adapter(peft_llama["path"])
    g = torch.Generator().manual_seed(7)
    e2 = LoRAAdapter(e1.r, e1.lora_alpha, e1.target_modules, config=dict(e1.config), weights={
        m: (torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)) for m, (A, B) in e1.weights.items()})
    merged = merge_adapters([e1, e2], "ties", density=0.5)
    full_rank = max(min(d.shape) for d in merged.values())  # TIES output is generally full rank
    save_lora_adapter(tmp_path / "ties", merged_to_lora(merged, r=full_rank), r=full_rank, lora_alpha=full_rank)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(peft_llama["pristine"]), tmp_path / "ties").eval()
    model = copy.deepcopy(peft_llama["pristine"])
    merge_into_base(model, merged)
    with torch.no_grad():
        ours, theirs = model(peft_llama["ids"]).logits, pm(peft_llama["ids"]).logits
    assert _rel(ours, theirs) <= 1e-5


def test_lora_approximation_error_is_zero_when_exact_and_matches_a_hand_computation():
    from selfmoe.merging import lora_approximation_error, merged_to_lora

    g = torch.Generator().manual_seed(3)
    low = {"m": torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)}
    assert lora_approximation_error(low, merged_to_lora(low, 2), 2) < 1e-12
    full = {"m": torch.randn(6, 5, generator=g, dtype=torch.float64), "n": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    factors = merged_to_lora(full, 1)
    num = sum(float((full[k] - factors[k][1] @ factors[k][0]).pow(2).sum()) for k in full)
    den = sum(float(full[k].pow(2).sum()) for k in full)
    assert abs(lora_approximation_error(full, factors, 1) - (num / den) ** 0.5) < 1e-12
    # the best rank-1 error of each module is its singular values beyond the first
    sv = {k: torch.linalg.svdvals(v) for k, v in full.items()}
    expect = (sum(float(s[1:].pow(2).sum()) for s in sv.values()) / den) ** 0.5
    assert abs(lora_approximation_error(full, factors, 1) - expect) < 1e-9
