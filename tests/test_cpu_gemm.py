"""The torch path's rank-space GEMMs through oneDNN (kernels/cpu_gemm.py) and the formulations that use it.

The helper against a float64 product on fresh random inputs (strided operands, a bias, a NaN-poisoned
``out``); the policy (dtypes, thresholds, ``SELFMOE_CPU_GEMM``); then the dense and sorted formulations
with oneDNN forced, output and every gradient against the float64 reference, counting that oneDNN really
ran; the decode paths keep torch's GEMMs (dense-small stays bitwise the general path at its sizes).
Skipped where torch has no oneDNN linear or the CPU is not x86-64 (the helper then falls back to
``torch.mm``, which the other test modules cover).
"""
import zlib

import pytest
import torch

import selfmoe.kernels.torch_path as torch_path
from selfmoe.kernels import cpu_gemm, lora_mix
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH, SMALL_T
from helpers import TOL, check_against_reference, make_case, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="no oneDNN linear on this build/CPU")


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@needs_onednn
@pytest.mark.parametrize("M,K,N", [(70, 40, 24), (3, 128, 5), (257, 16, 300)])
@pytest.mark.parametrize("layout", ["contiguous", "a transposed", "b transposed", "both transposed"])
def test_onednn_mm_matches_float64(M, K, N, layout):
    seed = zlib.crc32(f"{M},{K},{N},{layout}".encode())
    a64, b64, bias64 = _rand(M, K, seed=seed), _rand(K, N, seed=seed + 1), _rand(N, seed=seed + 2)
    a, b = a64.float(), b64.float()
    if "a transposed" in layout or layout == "both transposed":
        a = a.t().contiguous().t()  # same values, column-major storage
    if "b transposed" in layout or layout == "both transposed":
        b = b.t().contiguous().t()
    a_before, b_before = a.clone(), b.clone()
    want = a.double() @ b.double()
    assert rel_err(cpu_gemm.onednn_mm(a, b), want) <= TOL[torch.float32]
    got = cpu_gemm.onednn_mm(a, b, bias64.float())
    assert got.shape == (M, N)
    assert rel_err(got, want + bias64.float().double()) <= TOL[torch.float32]
    assert torch.equal(a, a_before) and torch.equal(b, b_before)  # operands left as they were


@needs_onednn
def test_mm_writes_every_element_of_out(monkeypatch):
    """``mm(..., out=)`` through oneDNN copies its result in: a NaN-filled ``out`` comes back finite and
    equal to the product; ``mm_rows`` returns oneDNN's own result and leaves the buffer alone."""
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "onednn")
    a, b = _rand(33, 20, seed=1).float(), _rand(20, 9, seed=2).float()
    out = torch.full((33, 9), float("nan"))
    got = cpu_gemm.mm(a, b, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    assert rel_err(out, a.double() @ b.double()) <= TOL[torch.float32]
    buf = torch.full((33, 9), float("nan"))
    rows = cpu_gemm.mm_rows(a, b, buf)
    assert rows.data_ptr() != buf.data_ptr() and torch.isnan(buf).all()
    assert torch.equal(rows, out)


def test_policy(monkeypatch):
    monkeypatch.delenv(cpu_gemm.ENV_CPU_GEMM, raising=False)
    big_a, big_b = torch.empty(2048, 1024), torch.empty(1024, 128)
    small_a, small_b = torch.empty(16, 576), torch.empty(576, 32)
    available = cpu_gemm.onednn_available()
    assert cpu_gemm.use_onednn(big_a, big_b) == available  # auto: enough work
    assert not cpu_gemm.use_onednn(small_a, small_b)  # auto: a decode-sized product stays on torch
    for dtype in (torch.float64, torch.bfloat16, torch.float16):  # float32 only
        assert not cpu_gemm.use_onednn(big_a.to(dtype), big_b.to(dtype))
    assert not cpu_gemm.use_onednn(big_a, big_b.double())
    assert not cpu_gemm.use_onednn(torch.empty(0, 1024), big_b)
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "onednn")
    assert cpu_gemm.use_onednn(small_a, small_b) == available  # forced: any size
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "torch")
    assert not cpu_gemm.use_onednn(big_a, big_b)
    a, b = _rand(300, 200, seed=3).float(), _rand(200, 100, seed=4).float()
    assert torch.equal(cpu_gemm.mm(a, b), torch.mm(a, b))
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "mkl")
    with pytest.raises(ValueError, match="SELFMOE_CPU_GEMM must be one of"):
        cpu_gemm.use_onednn(big_a, big_b)


def test_threshold_scales_with_threads(monkeypatch):
    monkeypatch.delenv(cpu_gemm.ENV_CPU_GEMM, raising=False)
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: True)
    M = cpu_gemm.ONEDNN_MIN_MACS // (64 * 32) + 1  # just over the one-thread threshold
    a, b = torch.empty(M, 64), torch.empty(64, 32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_gemm.use_onednn(a, b)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not cpu_gemm.use_onednn(a, b)


def test_unavailable_build_falls_back(monkeypatch):
    """Without oneDNN (or on another CPU) nothing goes to it, even when forced, and mm is torch.mm."""
    cpu_gemm.onednn_available.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert not cpu_gemm.onednn_available()
        monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "onednn")
        a, b = _rand(40, 30, seed=5).float(), _rand(30, 20, seed=6).float()
        assert not cpu_gemm.use_onednn(a, b)
        assert torch.equal(cpu_gemm.mm(a, b), torch.mm(a, b))
    finally:
        monkeypatch.undo()
        cpu_gemm.onednn_available.cache_clear()


def _count_onednn(monkeypatch):
    calls = []
    real = cpu_gemm.onednn_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(cpu_gemm, "onednn_mm", counted)
    return calls


# (T, d_in, d_out, E, r, k, options), T above SMALL_T: where the general formulations run
CASES = {
    "top2": (80, 40, 72, 8, 4, 2, {}),
    "top1 per-expert scaling": (70, 24, 20, 4, 8, 1, {"per_expert_scaling": True}),
    "k=E": (66, 32, 24, 4, 3, 4, {}),
    "no base": (90, 16, 12, 5, 3, 1, {"base": False}),
    "base no bias": (65, 16, 12, 5, 3, 2, {"bias": False}),
}


@needs_onednn
@pytest.mark.parametrize("path", ["dense", "sorted"])
@pytest.mark.parametrize("name", list(CASES))
def test_formulations_through_onednn_match_reference(monkeypatch, path, name):
    T, K, N, E, r, k, opts = CASES[name]
    assert T > SMALL_T
    monkeypatch.setenv(ENV_TORCH_PATH, path)
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "onednn")
    calls = _count_onednn(monkeypatch)
    case = make_case(T, K, N, E, r, k, seed=zlib.crc32(f"{path}{name}".encode()), **opts)
    check_against_reference(case, lora_mix, torch.float32, backend="torch")
    assert calls, "oneDNN never ran"


@needs_onednn
def test_dense_products_count(monkeypatch):
    """The dense formulation sends its six rank-space products to oneDNN (forward: shrink, expand; backward:
    dHg, dx's rank rows, dA, dB) and keeps the base products on torch; router training only four."""
    monkeypatch.setenv(ENV_TORCH_PATH, "dense")
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "onednn")
    calls = _count_onednn(monkeypatch)
    case = make_case(80, 24, 20, 4, 4, 2, seed=7)
    for grads, expected in ((("x", "lora_A", "lora_B", "expert_weights"), 6), (("x", "expert_weights"), 4)):
        low = case.to(torch.float32, {n: True for n in grads})
        calls.clear()
        y = low.call(lora_mix, backend="torch")
        y.backward(torch.randn_like(y))
        assert len(calls) == expected, grads


def test_decode_sizes_keep_torch_gemms(monkeypatch):
    """At most SMALL_T tokens the general dense path does not use oneDNN even when forced, so dense-small
    (the decode path, torch's GEMMs) stays bitwise the general path."""
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "onednn")
    calls = _count_onednn(monkeypatch)
    case = make_case(SMALL_T, 48, 40, 4, 8, 1, seed=11).to(torch.float32)
    outs = {}
    for path in ("dense", "dense-small"):
        monkeypatch.setenv(ENV_TORCH_PATH, path)
        with torch.no_grad():
            outs[path] = case.call(lora_mix, backend="torch")
    assert torch.equal(outs["dense"], outs["dense-small"])
    assert not calls


@needs_onednn
def test_torch_setting_keeps_onednn_out(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_CPU_GEMM, "torch")
    calls = _count_onednn(monkeypatch)
    case = make_case(80, 24, 20, 8, 4, 2, seed=13)
    for path in ("dense", "sorted"):
        monkeypatch.setenv(ENV_TORCH_PATH, path)
        low = case.to(torch.float32, {n: True for n in case.tensors()})
        y = low.call(lora_mix, backend="torch")
        y.backward(torch.randn_like(y))
    assert not calls
    assert torch_path.cpu_gemm is cpu_gemm  # the formulations read the patched module
