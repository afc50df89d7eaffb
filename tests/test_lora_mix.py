"""lora_mix on its torch path: forward and every gradient against the float64 reference."""
import zlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selfmoe.kernels import lora_mix, lora_mix_naive
from helpers import TOL, check_against_reference, make_case, rel_err

# (T, d_in, d_out, E, r, k, extra) — each shape is here to break something specific.
SHAPES = {
    "paper": (37, 64, 48, 4, 8, 1, {}),  # the paper's E=4, r=8, top-1
    "top2": (50, 40, 72, 8, 4, 2, {}),
    "T=1": (1, 32, 24, 4, 8, 1, {}),  # single token (decode)
    "non-pow2": (19, 100, 60, 3, 5, 2, {}),  # dims that do not divide any tile
    "r=1": (23, 32, 16, 4, 1, 2, {}),
    "E=1": (17, 24, 20, 1, 4, 1, {}),
    "k=E": (21, 32, 24, 4, 3, 4, {}),  # dense gating, every expert on every token
    "lead-dims": (12, 32, 16, 4, 4, 2, {"lead": (3, 4)}),  # [B, S, d] inputs
    "int32-ids": (15, 32, 16, 4, 4, 2, {"id_dtype": torch.int32}),
}


def _case(name, **overrides):
    T, d_in, d_out, E, r, k, extra = SHAPES[name]
    return make_case(T, d_in, d_out, E, r, k, **{**extra, **overrides})


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_fused_base(name, dtype):
    check_against_reference(_case(name, seed=zlib.crc32(name.encode())), lora_mix, dtype, backend="torch")


@pytest.mark.parametrize("base,bias", [(False, False), (True, False)])
@pytest.mark.parametrize("per_expert", [False, True])
def test_matches_reference_variants(base, bias, per_expert):
    case = make_case(29, 48, 40, 4, 6, 2, base=base, bias=bias, per_expert_scaling=per_expert, seed=7)
    check_against_reference(case, lora_mix, torch.float32, backend="torch")


def test_expert_without_tokens_and_all_on_one():
    # Expert 2 of 4 gets no tokens; then every token goes to expert 1.
    T = 31
    ids = torch.tensor([0, 1, 3])[torch.arange(T * 2) % 3].reshape(T, 2)
    check_against_reference(make_case(T, 32, 24, 4, 4, 2, ids=ids, seed=3), lora_mix, torch.float32, backend="torch")
    ids = torch.ones(T, 1, dtype=torch.long)
    case = make_case(T, 32, 24, 4, 4, 1, ids=ids, seed=4)
    check_against_reference(case, lora_mix, torch.float32, backend="torch")


def test_duplicate_ids_add_up():
    T, E = 9, 4
    ids = torch.full((T, 2), 2, dtype=torch.long)
    case = make_case(T, 16, 12, E, 3, 2, ids=ids, seed=5)
    check_against_reference(case, lora_mix, torch.float32, backend="torch")
    # Two slots on the same expert equal one slot with the summed weight.
    one = make_case(T, 16, 12, E, 3, 1, ids=ids[:, :1], seed=5)
    one.x, one.lora_A, one.lora_B, one.base_weight, one.base_bias = case.x, case.lora_A, case.lora_B, case.base_weight, case.base_bias
    one.expert_weights = case.expert_weights.sum(-1, keepdim=True)
    assert torch.allclose(case.call(lora_mix, backend="torch"), one.call(lora_mix, backend="torch"), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    # Finite differences against our hand-written backward (not just against the reference's autograd).
    case = make_case(6, 7, 5, 3, 2, 2, per_expert_scaling=True, seed=11).to(
        torch.float64, {n: True for n in ["x", "lora_A", "lora_B", "expert_weights", "base_weight", "base_bias"]}
    )

    def f(x, A, B, w, W, b):
        return lora_mix(x, A, B, case.expert_ids, w, case.scaling, base_weight=W, base_bias=b, backend="torch")

    inputs = (case.x, case.lora_A, case.lora_B, case.expert_weights, case.base_weight, case.base_bias)
    assert torch.autograd.gradcheck(f, inputs)


def test_scaling_and_gates_are_applied():
    # Guards against a dropped gate or scaling: doubling either doubles the LoRA part exactly.
    case = make_case(16, 24, 20, 4, 4, 2, base=False, seed=13)
    y = case.call(lora_mix, backend="torch")
    case.scaling = case.scaling * 2
    assert torch.allclose(case.call(lora_mix, backend="torch"), 2 * y, rtol=1e-12, atol=0)
    case.scaling = case.scaling / 2
    case.expert_weights = case.expert_weights * 3
    assert torch.allclose(case.call(lora_mix, backend="torch"), 3 * y, rtol=1e-12, atol=0)


def test_mixed_dtypes_cast_to_x_and_grads_keep_param_dtype():
    # A bf16 base with fp32 experts (a common PEFT set-up): output in x's dtype, grads in each param's.
    case = make_case(20, 32, 24, 4, 4, 1, seed=17)
    x = case.x.to(torch.bfloat16).requires_grad_()
    A = case.lora_A.float().requires_grad_()
    B = case.lora_B.float().requires_grad_()
    w = case.expert_weights.float().requires_grad_()
    W = case.base_weight.to(torch.bfloat16)
    y = lora_mix(x, A, B, case.expert_ids, w, 2.0, base_weight=W, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = lora_mix_naive(x.double(), A.to(torch.bfloat16).double(), B.to(torch.bfloat16).double(), case.expert_ids,
                         w.double(), 2.0, W.double())
    assert rel_err(y, ref) <= TOL[torch.bfloat16]


def test_empty_tokens():
    case = make_case(0, 16, 12, 4, 3, 2, seed=19).to(torch.float32, {"x": True, "lora_A": True, "expert_weights": True})
    y = case.call(lora_mix, backend="torch")
    assert y.shape == (0, 12)
    y.sum().backward()
    assert case.x.grad.shape == (0, 16)
    assert torch.equal(case.lora_A.grad, torch.zeros_like(case.lora_A))
    assert case.expert_weights.grad.shape == (0, 2)


def _flops(fn) -> int:
    # The torch path accumulates into its output with in-place addmm_ (no extra [T, d] buffer);
    # FlopCounterMode knows only the out-of-place op, so teach it the in-place one.
    # Formulas get shapes: addmm_(input, mat1 [m, k], mat2 [k, n]) costs 2*m*k*n.
    mapping = {torch.ops.aten.addmm_: lambda inp, mat1, mat2, *args, **kwargs: 2 * mat1[0] * mat1[1] * mat2[1]}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def test_router_training_skips_expert_gradients():
    """Router training (grads for x and gates only) must not pay for dA or dB."""
    T, K, N, E, r, k = 64, 96, 80, 4, 8, 1
    case = make_case(T, K, N, E, r, k, seed=23)
    router = case.to(torch.float32, {"x": True, "expert_weights": True})
    y = router.call(lora_mix, backend="torch")
    dy = torch.randn_like(y)
    bwd_router = _flops(lambda: y.backward(dy))
    assert router.lora_A.grad is None and router.lora_B.grad is None and router.base_weight.grad is None
    assert router.x.grad is not None and router.expert_weights.grad is not None
    R = E * r
    # dHg = dy @ B_all, dx = dy @ W + dH @ A_all, gate grads (dHg * H) @ expander.T [R, E] — nothing else.
    assert bwd_router == 2 * T * N * R + 2 * T * N * K + 2 * T * R * K + 2 * T * R * E

    experts = case.to(torch.float32, {"x": True, "expert_weights": True, "lora_A": True, "lora_B": True})
    y = experts.call(lora_mix, backend="torch")
    bwd_experts = _flops(lambda: y.backward(dy))
    assert bwd_experts == bwd_router + 2 * R * T * K + 2 * N * T * R  # + dA + dB


def test_forward_cost_is_base_plus_low_rank():
    T, K, N, E, r = 80, 96, 80, 4, 8  # T above the decode-sized paths (torch_dispatch.SMALL_T)
    case = make_case(T, K, N, E, r, 1, seed=29).to(torch.float32)
    total = _flops(lambda: case.call(lora_mix, backend="torch"))
    # base + shrink + expand + spreading the [T, E] gates over the rank columns ([T, E] @ [E, E*r])
    assert total == 2 * T * K * N + 2 * T * K * E * r + 2 * T * E * r * N + 2 * T * E * E * r
    # Decode batches (inference): the same products without the expander GEMM.
    T = 16
    case = make_case(T, K, N, E, r, 1, seed=30).to(torch.float32)
    total = _flops(lambda: case.call(lora_mix, backend="torch"))
    assert total == 2 * T * K * N + 2 * T * K * E * r + 2 * T * E * r * N


def test_no_grad_and_inference_mode():
    case = make_case(10, 16, 12, 4, 3, 2, seed=31).to(torch.float32, {"x": True})
    ref = case.call(lora_mix, backend="torch").detach()
    with torch.no_grad():
        assert torch.equal(case.call(lora_mix, backend="torch"), ref)
    with torch.inference_mode():
        assert torch.equal(case.call(lora_mix, backend="torch"), ref)


def test_auto_backend_on_cpu_matches_torch():
    case = make_case(10, 16, 12, 4, 3, 2, seed=37).to(torch.float32)
    assert torch.equal(case.call(lora_mix, backend="auto"), case.call(lora_mix, backend="torch"))


def test_autocast_runs_the_op_in_the_autocast_dtype():
    """Under autocast the op acts like nn.Linear: fp32 x is cast to bf16 and everything runs in bf16."""
    case = make_case(24, 40, 36, 4, 8, 2, seed=41).to(torch.float32, {"x": True, "expert_weights": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = case.call(lora_mix, backend="torch")
        reference_linear = torch.nn.functional.linear(case.x, case.base_weight)
    assert y.dtype == reference_linear.dtype == torch.bfloat16
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731 - what autocast hands the op
    ref = lora_mix_naive(bf(case.x), bf(case.lora_A), bf(case.lora_B), case.expert_ids,
                         case.expert_weights.double(), case.scaling, bf(case.base_weight), bf(case.base_bias))
    assert rel_err(y, ref) <= TOL[torch.bfloat16]
    y.float().square().sum().backward()
    assert case.x.grad.dtype == torch.float32 and torch.isfinite(case.x.grad).all()
    assert case.expert_weights.grad.dtype == case.expert_weights.dtype
    assert torch.isfinite(case.expert_weights.grad).all() and case.expert_weights.grad.abs().sum() > 0
