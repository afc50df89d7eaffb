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
