"""Autotune policy (kernels/tuning.py): token buckets, the capture rule, pruning by the estimates."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import selfmoe.kernels.tuning as tuning  # noqa: E402
import selfmoe.kernels.utils as utils  # noqa: E402


def test_token_buckets_are_few_and_cover_every_t():
    buckets = [tuning.token_bucket(t) for t in range(1, 70000)]
    assert sorted(set(buckets)) == [1, 16, 64, 256, 1024, 4096, 16384, 65536]
    # each T maps to the smallest bucket that holds it (past 65536: the last one)
    assert all(b >= t for t, b in zip(range(1, 65537), buckets))
    assert tuning.token_bucket(2) == 16 and tuning.token_bucket(17) == 64 and tuning.token_bucket(10**6) == 65536


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1.0, mask=o < n)


def _tuner():
    configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)]
    return tuning.Tuner(_add_one_kernel, configs, ["n"], smem=None)


def test_no_autotuning_while_a_cuda_graph_is_captured(monkeypatch):
    tuner = _tuner()

    def no_bench(*args, **kwargs):
        raise AssertionError("benchmarked a config during capture")

    monkeypatch.setattr(tuner, "_bench", no_bench)
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    x = torch.zeros(40)
    if not utils.interpreting() and not x.is_cuda:
        pytest.skip("needs the interpreter or a GPU to launch")
    grid = lambda META: (triton.cdiv(40, META["BLOCK"]),)  # noqa: E731
    tuner[grid](x, 40)
    assert torch.equal(x, torch.ones(40))  # it ran, with the default (first) config, and kept it
    assert list(tuner.cache.values()) == [tuner.configs[0]]
    # outside capture a new key is tuned as usual (here: the benchmark is called)
    monkeypatch.setattr(tuning, "capturing", lambda: False)
    with pytest.raises(AssertionError, match="benchmarked"):
        tuner[grid](x, 33)


def test_pruning_by_estimate_and_register_budget(monkeypatch):
    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=3) for b, w in ((64, 4), (256, 4), (256, 8))]
    tuner = tuning.Tuner(_add_one_kernel, configs, ["n"], smem=lambda p, e: p["BLOCK"] * 1000 * e,
                         regs=lambda p: p["BLOCK"] <= 32 * p["num_warps"])
    x = torch.empty(4, dtype=torch.float16)
    monkeypatch.setattr(utils, "_ASSUMED", (132, 600_000, 90))
    kept = tuner.candidates({"x_ptr": x, "n": 4}, {})
    assert [(c.kwargs["BLOCK"], c.num_warps) for c in kept] == [(64, 4), (256, 8)]  # (256, 4): too many regs
    monkeypatch.setattr(utils, "_ASSUMED", (132, 200_000, 90))
    assert [(c.kwargs["BLOCK"], c.num_warps) for c in tuner.candidates({"x_ptr": x, "n": 4}, {})] == [(64, 4)]
    monkeypatch.setattr(utils, "_ASSUMED", (132, 1000, 90))  # nothing fits: the smallest stays
    assert len(tuner.candidates({"x_ptr": x, "n": 4}, {})) == 1


def test_device_class_from_name():
    assert [utils.device_class(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
                                            "NVIDIA L4")] == ["h100", "h200", "a100", "other"]


# --------------------------------------------------------------------------------------------------
# Which configs the real tables leave per input dtype and target (pure Python: no compile, no launch)
# --------------------------------------------------------------------------------------------------

import selfmoe.kernels.dense_kernels as dk  # noqa: E402
import selfmoe.kernels.grouped_kernels as gk  # noqa: E402

_SM90, _SM80 = (132, 232448, 90), (108, 166912, 80)


def _named(kernel, dtype, ints, wide=None):
    """Arguments of one launch of ``kernel``: every pointer a small tensor of ``dtype`` (``wide``: the
    pointer the tuner sizes by, if not the first), ints from ``ints`` (1 for the rest)."""
    out = {}
    for name in kernel.fn.arg_names:
        if name.endswith("_ptr"):
            out[name] = torch.empty(4, dtype=dtype)
        else:
            out[name] = ints.get(name, 1)
    return out


def _survivors(monkeypatch, kernel, table, dtype, ints, kwargs, target, **tuner_kw):
    tuner = tuning.Tuner(kernel.fn, table, ["M"], smem=tuner_kw.get("smem"), regs=tuner_kw.get("regs"),
                         elem_arg=tuner_kw.get("elem_arg"))
    monkeypatch.setattr(utils, "_ASSUMED", target)
    # the launcher passes the dots' precision for x's dtype (utils.dot_precision)
    return tuner.candidates(_named(kernel, dtype, ints), dict(kwargs, DOT_PRECISION=utils.dot_precision(dtype)))


# a forward launch of the fused GEMM at T = 8192, d_in = d_out = 4096, E = 4, r = 8 (aligned)
_FUSED_FWD = dict(M=8192, N=4096, K1=4096, K2=32, r=8, stride_a1m=4096, stride_a1k=1, stride_b1k=1, stride_b1n=4096,
                  stride_a2m=32, stride_a2c=1, stride_b2e=32768, stride_b2r=1, stride_b2n=8, stride_om=4096)
_FUSED_KW = dict(HAS_SEG1=True, HAS_BIAS=True)


@pytest.mark.parametrize("target", [_SM90, _SM80])
def test_fp32_gets_its_own_small_tiles_and_half_keeps_its_table(monkeypatch, target):
    half = _survivors(monkeypatch, dk._fused_base_lora_kernel, dk._fused_configs(), torch.bfloat16, _FUSED_FWD,
                      _FUSED_KW, target, smem=dk.fused_smem, regs=dk.fused_regs_ok)
    full = dk._fused_configs()
    # 16-bit inputs: the half table, unchanged, default first; the fp32-only entries are never candidates
    assert [str(c) for c in half] == [str(c) for c in full if not hasattr(c, "selfmoe_elem_bytes")]
    fp32 = _survivors(monkeypatch, dk._fused_base_lora_kernel, dk._fused_configs(), torch.float32, _FUSED_FWD,
                      _FUSED_KW, target, smem=dk.fused_smem, regs=dk.fused_regs_ok)
    # 4-byte inputs: only tiles within the FMA register budget (acc values per thread x BLOCK_K <= 512)
    assert fp32 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 512 * 32 * c.num_warps
                        and c.kwargs["BLOCK_K"] <= 32 for c in fp32)
    assert (fp32[0].kwargs["BLOCK_M"], fp32[0].kwargs["BLOCK_N"]) != (128, 128)  # the half default spilled 14 KB
    assert any(hasattr(c, "selfmoe_elem_bytes") for c in fp32)


def test_fma_budget_and_only_for():
    p = {"num_warps": 4, "elem_bytes": 4}
    assert tuning.fma_regs_ok(p, 64, 64, 32) and not tuning.fma_regs_ok(p, 64, 64, 64)
    assert not tuning.fma_regs_ok(p, 64, 64, 32, budget=512)
    assert not tuning.fma_regs_ok(p, 32, 64, 64) and tuning.fma_regs_ok(p, 32, 64, 64, max_k=None)
    assert tuning.fma_regs_ok({"num_warps": 4, "elem_bytes": 2}, 128, 128, 64)  # tensor cores: no FMA budget
    c = tuning.only_for(triton.Config({"BLOCK": 16}), 4)
    assert c.selfmoe_elem_bytes == (4,)


def test_async_tile_follows_the_jit_divisibility_rule():
    # 16-bit: the row stride and the contiguous dimension's bound must be multiples of 16
    assert tuning.async_tile(2, (4096, 1), (1, 4096))
    assert not tuning.async_tile(2, (1000, 1), (1, 1000))  # d_in = 1000
    assert not tuning.async_tile(2, (4096, 1), (1, 1000))  # aligned rows, ragged contiguous bound
    assert not tuning.async_tile(2, (1, 8), (32, None))  # the rank-column tile at r = 8 (n stride 8)
    assert tuning.async_tile(2, (1, 4096), (4096, None))  # contiguous along dimension 0
    assert not tuning.async_tile(2, (3, 5), (16, 16))  # no unit stride
    assert tuning.async_tile(4, (1000, 1), (1, 1000))  # 4-byte elements: one element is a 4-byte copy


def _params(cap, stages, warps, **kw):
    return dict(kw, capability=cap, num_stages=stages, num_warps=warps)


def test_estimates_match_the_compiled_kernels():
    # compiled shared memory (metadata.shared, Triton 3.x ptxas) of launches in the compile report
    fused = dict(_FUSED_FWD, HAS_SEG1=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)  # gates-only nobase: no segment 1
    # lora_B addressed rank-major (what the launcher passes for r > 1): b2 in 16-byte vectors along
    # the rank columns, pipelined (3 buffers with mma.sync, 4 with wgmma)
    assert dk.fused_smem(_params(80, 4, 4, B2_RANK_MAJOR=True, **fused), 2) == 73728
    assert dk.fused_smem(_params(90, 4, 4, B2_RANK_MAJOR=True, **fused), 2) == 98304
    # through the general (expert, rank, n) strides an n stride of 8 is no divisibility the JIT records:
    # 2-byte loads, b2 staged once (the layout before the flag)
    assert dk.fused_smem(_params(80, 4, 4, B2_RANK_MAJOR=False, **fused), 2) == 40960
    # T = 1000, d_in = 1000, d_out = 600, E = 4, r = 64: dx = [dy | dH] @ [W ; A_all]
    dx = dict(M=1000, N=1000, K1=600, K2=256, r=64, stride_a1m=600, stride_a1k=1, stride_b1k=1000, stride_b1n=1,
              stride_a2m=256, stride_a2c=1, stride_b2e=64000, stride_b2r=1000, stride_b2n=1, HAS_SEG1=True,
              BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
    assert dk.fused_smem(_params(80, 4, 4, **dx), 2) == 40960
    assert dk.fused_smem(_params(90, 4, 4, **dx), 2) == 49152
    # dhg at E = 4, r = 8 (BLOCK_C = 32): dy pipelined, the B_all tile staged once
    dhg = dict(N=4096, r=8, stride_dym=4096, stride_dyn=1, stride_be=32768, stride_bn=8, stride_br=1, BLOCK_C=32)
    assert dk.dhg_smem(_params(80, 3, 4, BLOCK_M=64, BLOCK_N=64, **dhg), 2) == 20480
    assert dk.dhg_smem(_params(90, 3, 8, BLOCK_M=128, BLOCK_N=64, **dhg), 2) == 53248
    assert dk.dhg_smem(_params(90, 3, 4, BLOCK_M=32, BLOCK_N=128, **dhg), 2) == 24576  # BM < 64: mma.sync
    # matmul_tn at T = 8192: dA (fp32 split partials), dB (scattered), dW (bf16 out)
    tn = dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_T=32, stride_ap=1, stride_bq=1)
    d_a = dict(tn, P=32, Q=4096, QR=4096, SPLIT=4, stride_at=32, stride_bt=4096)
    d_w = dict(tn, P=4096, Q=4096, QR=4096, SPLIT=1, stride_at=4096, stride_bt=4096)
    assert dk.tn_smem(_params(90, 3, 8, **d_a), 2) == 65536
    assert dk.tn_smem(_params(90, 3, 8, **d_w), 2) == 49152
    assert dk.tn_smem(_params(80, 3, 8, **d_a), 2) == 32768
    # grouped shrink backward at r = 8: B viewed as [E, r, N] is contiguous along r, staged once
    gs = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=128, K=1024, r=8, stride_xt=1024, stride_xk=1, stride_we=8192,
              stride_wr=1, stride_wk=8)
    assert gk.shrink_smem(_params(80, 3, 4, **gs), 2) == 12288
