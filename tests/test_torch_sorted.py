"""The torch backend's sorted formulation (torch_sorted.py): only the selected experts' rank columns.

Forced with ``SELFMOE_TORCH_PATH=sorted`` and checked against the float64 reference on fresh random
inputs (never zeros): the output and every gradient, subsets of gradients (and that the others cost
no work), duplicate ids, experts without tokens, ``k == E``, per-expert scaling, every dtype, and
NaN-poisoned buffers. Then the dispatcher: sorted at top-2-like sizes, not at paper-like or decode
sizes, and ``lora_mix`` really runs it there.
"""
import zlib

import pytest
import torch

import selfmoe.kernels.torch_path as torch_path
import selfmoe.kernels.torch_sorted as torch_sorted
from selfmoe.kernels import cpu_gemm, lora_mix, lora_mix_naive, utils
from selfmoe.kernels.contract import NO_GRADS, GradNeeds
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH, choose_torch_path, sorted_pays
from helpers import TOL, check_against_reference, make_case, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

# (T, d_in, d_out, E, r, k, options): each breaks something specific.
CASES = {
    "top2": (50, 40, 72, 8, 4, 2, {}),
    "top1": (37, 64, 48, 4, 8, 1, {}),
    "k=E": (21, 32, 24, 4, 3, 4, {}),  # every expert on every token (with duplicates from randint)
    "per-expert scaling": (40, 24, 20, 8, 4, 2, {"per_expert_scaling": True}),
    "no base": (30, 16, 12, 5, 3, 1, {"base": False}),
    "base no bias": (30, 16, 12, 5, 3, 2, {"bias": False}),
    "lead dims": (12, 32, 16, 4, 4, 2, {"lead": (3, 4)}),
    "int32 ids": (15, 32, 16, 4, 4, 2, {"id_dtype": torch.int32}),
    "E=1": (17, 24, 20, 1, 4, 1, {}),
    "r=1": (23, 32, 16, 4, 1, 2, {}),
}


def _case(name, **overrides):
    T, K, N, E, r, k, opts = CASES[name]
    return make_case(T, K, N, E, r, k, seed=zlib.crc32(name.encode()), **{**opts, **overrides})


@pytest.fixture
def sorted_path(monkeypatch):
    """Force the sorted formulation and count its forward and backward calls."""
    monkeypatch.setenv(ENV_TORCH_PATH, "sorted")
    return _count_calls(monkeypatch)


def _count_calls(monkeypatch):
    calls = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch_path, "sorted_forward", counted("forward", torch_sorted.sorted_forward))
    monkeypatch.setattr(torch_path, "sorted_backward", counted("backward", torch_sorted.sorted_backward))
    return calls


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_gradient_matches_reference(sorted_path, name, dtype):
    # Half inputs: the contract's budgets (helpers.TOL), as for the dense path; H and dHg are fp32.
    check_against_reference(_case(name), lora_mix, dtype, backend="torch")
    assert sorted_path == {"forward": 1, "backward": 1}


def test_duplicate_ids_and_experts_without_tokens(sorted_path):
    """A token that picks one expert twice gets it twice; experts nobody picks get zero dA and dB
    (they are in the gradient, not skipped), and the busy expert's segment covers most rows."""
    T, E = 60, 7
    ids = torch.zeros(T, 3, dtype=torch.long)
    ids[:, 1] = torch.arange(T) % 3  # experts 0-2 only: 3-6 get no token
    ids[:, 2] = ids[:, 1]  # a duplicate in every token
    case = make_case(T, 24, 20, E, 4, 3, ids=ids, seed=3, per_expert_scaling=True)
    check_against_reference(case, lora_mix, torch.float64, backend="torch")
    low = case.to(torch.float32, {"lora_A": True, "lora_B": True})
    low.call(lora_mix, backend="torch").sum().backward()
    assert torch.equal(low.lora_A.grad[3:], torch.zeros_like(low.lora_A.grad[3:]))
    assert torch.equal(low.lora_B.grad[3:], torch.zeros_like(low.lora_B.grad[3:]))
    assert low.lora_A.grad[:3].abs().min(-1).values.min() > 0  # ... and the used ones are not


@pytest.mark.parametrize("grads", [
    ("x", "expert_weights"),  # router training
    ("expert_weights",),  # the gates only
    ("x",),
    ("lora_A", "lora_B"),
    ("lora_B",),
    ("base_weight", "base_bias"),  # the base only: nothing through the experts
])
def test_gradient_subsets_match_reference(sorted_path, grads):
    check_against_reference(_case("top2", per_expert_scaling=True), lora_mix, torch.float64, grads=grads,
                            backend="torch")
    assert sorted_path == {"forward": 1, "backward": 1}


def test_router_training_skips_expert_gradient_work(sorted_path, monkeypatch):
    """With only x and the gates asked for, no per-expert weight-gradient product (dA, dB) runs: count
    the ``torch.mm`` calls of backward (dHg and dx rows per expert with tokens; dA and dB add one each)."""
    case = _case("top2")
    busy = int((torch.bincount(case.expert_ids.view(-1), minlength=8) > 0).sum())
    real_mm, seen = torch.mm, []

    def mm(*args, **kwargs):
        seen.append(1)
        return real_mm(*args, **kwargs)
    monkeypatch.setattr(torch_sorted.torch, "mm", mm)
    for grads, per_expert in ((("x", "expert_weights"), 2), (("x", "expert_weights", "lora_A", "lora_B"), 4)):
        low = case.to(torch.float32, {n: True for n in grads})
        y = low.call(lora_mix, backend="torch")
        seen.clear()
        y.backward(torch.randn_like(y))
        assert len(seen) == per_expert * busy, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poisoned_buffers_leave_no_trace(sorted_path, monkeypatch, dtype):
    """Every buffer the sorted path preallocates (poisoned_empty) is NaN-filled first: a row that no
    expert segment writes would make the output or a gradient non-finite."""
    monkeypatch.setattr(utils, "POISON", True)
    assert torch.isnan(utils.poisoned_empty((2, 3), torch.float32, "cpu")).all()  # the guard works
    check_against_reference(_case("top2"), lora_mix, dtype, backend="torch")
    ids = torch.zeros(30, 2, dtype=torch.long)
    ids[:, 1] = 4  # most experts empty, all dA / dB buffers partly unwritten but zero-filled
    check_against_reference(make_case(30, 16, 12, 6, 3, 2, ids=ids, seed=9), lora_mix, dtype, backend="torch")


def test_same_numbers_as_dense(monkeypatch):
    """Sorted and dense-rank compute the same function: float64 agreement to rounding."""
    case = _case("per-expert scaling")
    outs = {}
    for path in ("sorted", "dense"):
        monkeypatch.setenv(ENV_TORCH_PATH, path)
        c = case.to(torch.float64, {n: True for n in case.tensors()})
        y = c.call(lora_mix, backend="torch")
        y.backward(torch.ones_like(y))
        outs[path] = [y] + [t.grad for t in c.tensors().values()]
    for got, want in zip(outs["sorted"], outs["dense"]):
        assert rel_err(got, want) <= 1e-12


def test_zero_tokens(sorted_path):
    case = make_case(0, 16, 12, 4, 3, 2, seed=1)
    low = case.to(torch.float32, {n: True for n in case.tensors()})
    y = low.call(lora_mix, backend="torch")
    assert y.shape == (0, 12)
    y.sum().backward()
    assert low.x.grad.shape == (0, 16) and low.expert_weights.grad.shape == (0, 2)
    for name in ("lora_A", "lora_B", "base_weight", "base_bias"):
        grad = getattr(low, name).grad
        assert torch.equal(grad, torch.zeros_like(grad)), name


TRAIN = GradNeeds(True, False, False, True, False, False)  # router training


def test_dispatcher_picks_sorted_only_where_it_pays(monkeypatch):
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    for needs in (NO_GRADS, TRAIN, GradNeeds(*[True] * 6)):
        assert choose_torch_path(2048, 8, 2, needs, r=16) == "sorted"  # top2-cpu
        assert choose_torch_path(2048, 64, 2, needs, r=16) == "sorted"  # many experts
        assert choose_torch_path(4096, 4, 1, needs, r=8) == "dense"  # paper-cpu: E*r already small
        assert choose_torch_path(2048, 8, 2, needs, r=8) == "dense"  # measured: dense wins there
        assert choose_torch_path(128, 8, 2, needs, r=16) == "dense"  # few tokens per expert
        assert choose_torch_path(2048, 8, 8, needs, r=16) == "dense"  # k == E: nothing to skip
        assert choose_torch_path(2048, 8, 2, needs, r=16, cpu=False) == "dense"  # GPUs: no host sync
        assert choose_torch_path(0, 8, 2, needs, r=16) != "sorted"
    assert choose_torch_path(1, 8, 2, NO_GRADS, r=16) == "gathered"  # decode keeps its paths
    assert choose_torch_path(16, 8, 2, NO_GRADS, r=16) == "dense-small"
    assert choose_torch_path(1, 8, 2, TRAIN, r=16) == "dense"
    assert sorted_pays(2048, 16, 2, 8) and not sorted_pays(256, 8, 2, 16)
    # With the dense products on oneDNN (about half the cost per rank column), refitted on the same shapes:
    for T, E, r, k in ((2048, 8, 16, 1), (2048, 16, 16, 2), (2048, 32, 16, 2), (512, 32, 16, 2), (256, 64, 16, 2)):
        assert choose_torch_path(T, E, k, TRAIN, r=r, onednn=True) == "sorted", (T, E, r, k)
    for T, E, r, k in ((2048, 8, 16, 2), (2048, 16, 8, 2), (2048, 8, 8, 2), (4096, 4, 16, 1), (512, 8, 16, 2)):
        assert choose_torch_path(T, E, k, TRAIN, r=r, onednn=True) == "dense", (T, E, r, k)
    monkeypatch.setenv(ENV_TORCH_PATH, "sorted")
    assert choose_torch_path(1, 4, 1, TRAIN, r=8) == "sorted"  # forced: anywhere, training too
    monkeypatch.setenv(ENV_TORCH_PATH, "dense")
    assert choose_torch_path(2048, 8, 2, TRAIN, r=16) == "dense"


@pytest.mark.parametrize("shape,gemm,expect", [
    ((2048, 8, 16, 2), "torch", 1), ((2048, 4, 8, 1), "torch", 0),
    ((2048, 8, 16, 2), "onednn", 0), ((2048, 16, 16, 2), "onednn", 1), ((2048, 4, 8, 1), "onednn", 0),
])
def test_lora_mix_runs_sorted_at_top2_sizes(monkeypatch, shape, gemm, expect):
    """Unforced, ``lora_mix(backend="torch")`` runs the sorted path where ``sorted_pays`` says so (narrow d:
    the rule does not depend on it), for training and inference: at a top2-cpu-like shape when the dense
    products would run on torch's GEMM, only at twice the experts when they would run on oneDNN."""
    if gemm == "onednn" and not cpu_gemm.onednn_available():
        pytest.skip("no oneDNN linear in this torch build / on this CPU")
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, gemm)
    calls = _count_calls(monkeypatch)
    T, E, r, k = shape
    case = make_case(T, 16, 12, E, r, k, seed=T + E).to(torch.float32, {"x": True, "expert_weights": True})
    y = case.call(lora_mix, backend="torch")
    y.backward(torch.randn_like(y))
    with torch.no_grad():
        case.call(lora_mix, backend="torch")
    assert calls == {"forward": 2 * expect, "backward": expect}
    ref = case.to(torch.float64).call(lora_mix_naive)
    assert rel_err(y, ref) <= TOL[torch.float32]


def test_pays_only_the_selected_experts_flops(monkeypatch):
    """At a shape the dispatcher sends to sorted, the GEMM FLOPs are the base plus k*r rank columns
    per token (dense-rank would pay E*r = 4x as many here), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "torch")  # the dispatcher's sorted shape for torch's GEMM
    calls = _count_calls(monkeypatch)
    T, K, N, E, r, k = 2048, 16, 12, 8, 16, 2
    S = T * k
    case = make_case(T, K, N, E, r, k, seed=31)
    router = case.to(torch.float32, {"x": True, "expert_weights": True})
    y = router.call(lora_mix, backend="torch")
    assert calls["forward"] == 1
    with torch.no_grad():
        assert flops(lambda: router.call(lora_mix, backend="torch")) == 2 * T * K * N + 2 * S * K * r + 2 * S * r * N
    dy = torch.randn_like(y)
    # dx = dy @ W, dHg per slot (dy_e @ B_e), dx rows (dH_e @ A_e); the gate gradient is elementwise.
    bwd_router = 2 * T * N * K + 2 * S * N * r + 2 * S * r * K
    assert flops(lambda: y.backward(dy)) == bwd_router
    experts = case.to(torch.float32, {"x": True, "expert_weights": True, "lora_A": True, "lora_B": True})
    y = experts.call(lora_mix, backend="torch")
    assert flops(lambda: y.backward(dy)) == bwd_router + 2 * S * r * K + 2 * S * r * N  # + dA + dB
    assert calls == {"forward": 3, "backward": 2}
