"""Bad input to lora_mix: a clear TypeError/ValueError naming the argument and shapes, never a silent read."""
import pytest
import torch

from selfmoe.kernels import lora_mix

T, K, N, E, r, k = 6, 8, 5, 3, 2, 2


def good():
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(T, K, generator=g),
        lora_A=torch.randn(E, r, K, generator=g),
        lora_B=torch.randn(E, N, r, generator=g),
        expert_ids=torch.randint(0, E, (T, k), generator=g),
        expert_weights=torch.rand(T, k, generator=g),
        scaling=2.0,
        base_weight=torch.randn(N, K, generator=g),
        base_bias=torch.randn(N, generator=g),
    )


def call(**overrides):
    args = {**good(), **overrides}
    return lora_mix(
        args["x"], args["lora_A"], args["lora_B"], args["expert_ids"], args["expert_weights"], args["scaling"],
        base_weight=args["base_weight"], base_bias=args["base_bias"], **{k: v for k, v in overrides.items() if k == "backend"},
    )


CASES = [
    # (overrides, exception, message fragment that must name the argument and the shapes)
    ({"expert_ids": torch.rand(T, k)}, TypeError, r"expert_ids must be int32 or int64, got torch.float32 with shape \[6, 2\]"),
    ({"expert_ids": torch.full((T, k), E)}, ValueError, r"expert_ids \[6, 2\] must lie in \[0, E=3\), got values in \[3, 3\]"),
    ({"expert_ids": torch.full((T, k), -1)}, ValueError, r"expert_ids .* must lie in \[0, E=3\)"),
    ({"x": torch.randn(T, K + 1)}, ValueError, r"x has d_in=9 \(shape \[6, 9\]\) but lora_A has d_in=8"),
    ({"x": torch.randint(0, 3, (T, K))}, TypeError, r"x must have dtype in .* got torch.int64"),
    ({"lora_A": torch.randn(r, K)}, ValueError, r"lora_A must have shape \[E, r, d_in\], got \[2, 8\]"),
    ({"lora_B": torch.randn(E, N, r + 1)}, ValueError, r"lora_B must have shape \[E=3, d_out, r=2\] .* got \[3, 5, 3\]"),
    ({"lora_B": torch.randn(E + 1, N, r)}, ValueError, r"lora_B must have shape \[E=3, d_out, r=2\]"),
    ({"expert_ids": torch.zeros(T + 1, k, dtype=torch.long)}, ValueError, r"expert_ids \[7, 2\] must share the leading dims of x \[6, 8\]"),
    ({"expert_ids": torch.zeros(T, dtype=torch.long)}, ValueError, r"expert_ids must have shape \[\.\.\., k\]"),
    ({"expert_weights": torch.rand(T, k + 1)}, ValueError, r"expert_weights \[6, 3\] must have the same shape as expert_ids \[6, 2\]"),
    ({"expert_weights": torch.ones(T, k, dtype=torch.long)}, TypeError, r"expert_weights must have dtype"),
    ({"base_weight": torch.randn(K, N)}, ValueError, r"base_weight must have shape \[d_out=5, d_in=8\] .* got \[8, 5\]"),
    ({"base_bias": torch.randn(N + 1)}, ValueError, r"base_bias must have shape \[d_out=5\], got \[6\]"),
    ({"base_weight": None}, ValueError, r"base_bias was given without base_weight"),
    ({"scaling": torch.ones(E + 1)}, ValueError, r"scaling must be a float or a float tensor of shape \[E=3\]"),
    ({"scaling": "2"}, TypeError, r"scaling must be a float"),
    ({"x": [[1.0] * K] * T}, TypeError, r"x must be a torch.Tensor, got list"),
    ({"backend": "cuda"}, ValueError, r"backend must be one of"),
    # one tensor elsewhere (the meta device stands in for a second device): every culprit is named
    ({"base_weight": torch.randn(N, K, device="meta")}, ValueError, r"one device, got .*base_weight on meta"),
    ({"expert_weights": torch.rand(T, k, device="meta")}, ValueError, r"one device, got .*expert_weights on meta"),
    ({"scaling": torch.rand(E, device="meta")}, ValueError, r"one device, got .*scaling on meta"),
]


@pytest.mark.parametrize("overrides,exc,match", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_is_named(overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(**overrides)


def test_good_input_passes():
    assert call().shape == (T, N)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(x is on cpu\)"):
        call(backend="triton")


def test_id_check_switch_never_reads_out_of_bounds(monkeypatch):
    # With the (syncing) range check off, the torch path still refuses bad ids instead of reading garbage.
    monkeypatch.setenv("SELFMOE_CHECK_IDS", "0")
    with pytest.raises((RuntimeError, IndexError)):
        call(expert_ids=torch.full((T, k), E + 5), backend="torch")


def _count_range_checks(monkeypatch):
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_check_ids_argument(monkeypatch):
    calls = _count_range_checks(monkeypatch)
    args = good()
    run = lambda **kw: lora_mix(args["x"], args["lora_A"], args["lora_B"], args["expert_ids"],  # noqa: E731
                                args["expert_weights"], 2.0, backend="torch", **kw)
    run()
    assert len(calls) == 1  # default: checked
    run(check_ids=False)
    assert len(calls) == 1  # the caller vouches: no read-back
    monkeypatch.setenv("SELFMOE_CHECK_IDS", "0")
    run()
    assert len(calls) == 1
    run(check_ids=True)  # an explicit True wins over the environment switch
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"expert_ids \[6, 2\] must lie in \[0, E=3\)"):
        lora_mix(args["x"], args["lora_A"], args["lora_B"], torch.full((T, k), E), args["expert_weights"], 2.0,
                 check_ids=True)


def test_molora_checks_ids_from_callers_but_not_from_its_router(monkeypatch):
    from selfmoe import MoLoRALinear

    layer = MoLoRALinear(torch.nn.Linear(K, N), E, r=r, top_k=k)
    calls = _count_range_checks(monkeypatch)
    x = torch.randn(T, K)
    layer(x)  # own router: ids from top-k, always in range
    assert calls == []
    with pytest.raises(ValueError, match=r"must lie in \[0, E=3\)"):
        layer(x, expert_ids=torch.full((T, k), E), expert_weights=torch.rand(T, k))
    assert calls == [1]
