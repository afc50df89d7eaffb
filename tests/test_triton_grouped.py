"""Grouped Triton path of the routed multi-LoRA linear (``lora_mix_grouped``) against the float64
naive reference: forward and every gradient, on shapes chosen to break it; split-K / split-M paths;
NaN-poisoned buffers; determinism; only the requested gradients; no host sync.

On CPU the kernels run under TRITON_INTERPRET=1 (fp32 and fp16 only: the interpreter cannot do bf16
dots); bf16 and large shapes run on a GPU (``@pytest.mark.gpu``).
"""
import contextlib
from typing import Dict

import pytest
import torch

import selfmoe.kernels.grouped as grouped
import selfmoe.kernels.grouped_kernels as grouped_kernels
import selfmoe.kernels.grouping as grouping
import selfmoe.kernels.utils as utils
from selfmoe.kernels.grouped import lora_mix_grouped
from selfmoe.kernels.naive import lora_mix_naive

from helpers import no_host_sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ALL_GRADS = ("x", "lora_A", "lora_B", "expert_weights", "base_weight", "base_bias")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every buffer the launchers allocate starts as NaN (ints as -2): an element no kernel wrote, or a
    # padding row that leaks, turns the output or a gradient into NaN and fails the comparison
    monkeypatch.setattr(utils, "POISON", True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    denom = ref.norm()
    assert denom > 0, "reference is all zeros: the comparison could not fail"
    return float((out.detach().double() - ref).norm() / denom)


def make_inputs(T, d_in, d_out, E, r, k, *, ids=None, base=True, bias=True, per_expert=False, seed=0):
    """Fresh random float64 inputs, never zeros."""
    g = torch.Generator().manual_seed(seed)
    inp = {
        "x": torch.randn(T, d_in, generator=g, dtype=torch.float64),
        "lora_A": torch.randn(E, r, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5,
        "lora_B": torch.randn(E, d_out, r, generator=g, dtype=torch.float64) / r ** 0.5,
        "expert_weights": torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1,
    }
    if base:
        inp["base_weight"] = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
        if bias:
            inp["base_bias"] = torch.randn(d_out, generator=g, dtype=torch.float64)
    if ids is None:
        ids = torch.randint(0, E, (T, k), generator=g)
    inp["expert_ids"] = ids.reshape(T, k)
    inp["scaling"] = (torch.rand(E, generator=g, dtype=torch.float64) + 0.5) if per_expert else 1.7
    return inp


def _leaves(inp, dtype, grads, device):
    out = {}
    for name, t in inp.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and name != "scaling":
            out[name] = t.to(device=device, dtype=dtype).detach().requires_grad_(name in grads)
        elif isinstance(t, torch.Tensor):
            out[name] = t.to(device)
        else:
            out[name] = t
    return out


def _call(fn, a):
    return fn(a["x"], a["lora_A"], a["lora_B"], a["expert_ids"], a["expert_weights"], a["scaling"],
              base_weight=a.get("base_weight"), base_bias=a.get("base_bias"))


def run_grouped(inp, dtype, grads, seed=123, device=DEVICE):
    """Forward + backward of the grouped op in dtype; returns (y, {name: grad}) on the CPU."""
    a = _leaves(inp, dtype, grads, device)
    y = _call(lora_mix_grouped, a)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if grads:
        y.backward(g.to(device=device, dtype=dtype))
    return y, {n: a[n].grad for n in grads}


def check(inp, dtype, grads=None, device=DEVICE):
    """Grouped op in dtype vs the naive reference in float64 on the same rounded inputs."""
    grads = [n for n in ALL_GRADS if n in inp] if grads is None else list(grads)
    y, got = run_grouped(inp, dtype, grads, device=device)
    assert y.dtype == dtype and y.shape == (inp["x"].shape[0], inp["lora_B"].shape[1])
    assert torch.isfinite(y).all(), "non-finite output: an unwritten or padded element leaked"

    rounded = {n: (t.to(dtype).double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                   and n != "scaling" else t) for n, t in inp.items()}
    ref_in = _leaves(rounded, torch.float64, grads, "cpu")
    ref = _call(lora_mix_naive, ref_in)
    err = rel_err(y.cpu(), ref)
    assert err <= TOL[dtype], f"forward rel err {err:.3g} > {TOL[dtype]:g}"
    if grads:
        ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64))
    for n in grads:
        assert got[n] is not None, f"no gradient for {n}"
        assert got[n].dtype == dtype, f"grad {n} has dtype {got[n].dtype}"
        assert torch.isfinite(got[n]).all(), f"non-finite gradient for {n}"
        err = rel_err(got[n].cpu(), ref_in[n].grad)
        assert err <= TOL[dtype], f"grad {n} rel err {err:.3g} > {TOL[dtype]:g}"


def _ids_for(name, T, k, E, g):
    if name == "empty-expert":  # experts 2 and 5 get nothing: their dA/dB must be written as zeros
        pool = torch.tensor([e for e in range(E) if e not in (2, 5)])
        return pool[torch.randint(0, len(pool), (T, k), generator=g)]
    if name == "all-on-one":  # one expert owns every slot: several tiles walked by one program
        return torch.full((T, k), 3, dtype=torch.long)
    if name == "k=E":  # dense gating, every token on every expert
        return torch.stack([torch.randperm(E, generator=g) for _ in range(T)])
    if name == "duplicates":  # the same expert twice in a token: both slots add up
        first = torch.randint(0, E, (T, 1), generator=g)
        ids = torch.cat([first, first, torch.randint(0, E, (T, 1), generator=g)], 1)
        return ids[:, :k]
    return None


# name: (T, d_in, d_out, E, r, k) — each here to break something specific
SHAPES = {
    "E64-sparse-k2": (24, 48, 40, 64, 16, 2),  # the target regime: 64 experts, most with no token
    "empty-expert": (29, 32, 24, 8, 8, 2),
    "all-on-one": (70, 32, 24, 6, 4, 1),  # 70 slots on one expert: BLOCK_M 64, two tiles, k=1 in-place
    "T=1": (1, 32, 24, 8, 16, 2),  # decode: one token, two tiles that are mostly padding
    "T<tile": (5, 24, 20, 2, 4, 1),  # fewer tokens than a tile's rows
    "non-pow2": (19, 100, 60, 3, 5, 2),  # dims that divide no tile, r=5
    "r=1": (23, 32, 16, 4, 1, 2),  # rank padded from 1 to the 16-wide dot
    "E=1": (17, 24, 20, 1, 4, 1),
    "k=E": (9, 24, 16, 4, 3, 4),
    "duplicates": (13, 16, 12, 4, 3, 2),
}


def _shape_inputs(name, **kw):
    T, d_in, d_out, E, r, k = SHAPES[name]
    seed = list(SHAPES).index(name)
    ids = _ids_for(name, T, k, E, torch.Generator().manual_seed(100 + seed))
    return make_inputs(T, d_in, d_out, E, r, k, ids=ids, seed=seed, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, dtype):
    check(_shape_inputs(name), dtype)


@pytest.mark.parametrize("base,bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_base_and_scaling_variants(base, bias, per_expert, k):
    # k=1 adds into y in the expand epilogue, k=2 goes through the slot buffer and the combine pass
    inp = make_inputs(21, 40, 36, 6, 4, k, base=base, bias=bias, per_expert=per_expert, seed=7 + k)
    check(inp, torch.float32)


@pytest.fixture
def force_splits(monkeypatch):
    """Force split-K in both shrinks (3 splits: more than the K tiles of some shapes, so empty splits
    must write zeros) and 2 chunks per expert in dA/dB, whatever the shapes would pick."""
    monkeypatch.setattr(grouped, "_choose_split", lambda *a: 3)
    monkeypatch.setattr(grouped, "_choose_outer_split", lambda *a: 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["E64-sparse-k2", "all-on-one", "T=1", "non-pow2", "r=1"])
def test_split_paths_match_reference(name, dtype, force_splits):
    check(_shape_inputs(name, per_expert=True), dtype)


def test_split_k_over_many_k_tiles(monkeypatch):
    # d_in = 600 is five 128-wide K tiles: splits of 2, 2 and 1 tiles, summed in order
    monkeypatch.setattr(grouped, "_choose_split", lambda *a: 3)
    check(make_inputs(11, 600, 40, 4, 8, 2, seed=11), torch.float32)


def test_torch_grouping_feeds_the_kernels(monkeypatch):
    # the sync-free torch grouping metadata is interchangeable with the Triton one
    monkeypatch.setattr(grouped, "grouping_metadata", lambda ids, E, BM: grouping.grouping_metadata_torch(ids, E, BM))
    check(_shape_inputs("E64-sparse-k2"), torch.float32)


def test_int32_ids_and_experts_in_another_dtype():
    # experts/base in fp32 with x in fp16: computed in fp16, grads come back in fp32 through the cast
    inp = _shape_inputs("empty-expert")
    inp["expert_ids"] = inp["expert_ids"].to(torch.int32)
    a = _leaves(inp, torch.float32, ALL_GRADS, DEVICE)
    a["x"] = a["x"].detach().half().requires_grad_()
    y = _call(lora_mix_grouped, a)
    assert y.dtype == torch.float16
    y.float().square().sum().backward()
    assert a["lora_A"].grad.dtype == torch.float32 and a["base_weight"].grad.dtype == torch.float32
    assert a["x"].grad.dtype == torch.float16 and torch.isfinite(a["lora_B"].grad).all()
    check(inp, torch.float16)


@pytest.mark.parametrize("split", [False, True])
def test_deterministic(split, monkeypatch):
    if split:
        monkeypatch.setattr(grouped, "_choose_split", lambda *a: 3)
        monkeypatch.setattr(grouped, "_choose_outer_split", lambda *a: 2)
    inp = _shape_inputs("duplicates", per_expert=True)
    y1, g1 = run_grouped(inp, torch.float32, ALL_GRADS)
    y2, g2 = run_grouped(inp, torch.float32, ALL_GRADS)
    assert torch.equal(y1, y2)
    for n in ALL_GRADS:
        assert torch.equal(g1[n], g2[n]), f"grad {n} differs between two identical runs"


@contextlib.contextmanager
def _count_calls(monkeypatch, names):
    counts: Dict[str, int] = {n: 0 for n in names}
    for n in names:
        real = getattr(grouped, n)

        def counted(*args, _real=real, _n=n, **kwargs):
            counts[_n] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(grouped, n, counted)
    yield counts


LAUNCHERS = ["grouped_shrink", "grouped_expand", "grouped_outer", "combine_slots"]


@pytest.mark.parametrize("grads,expect", [
    # router training: grads for x and gates only -> dh (1 shrink), dx (1 expand + combine), no dA/dB
    (("x", "expert_weights"), {"grouped_shrink": 2, "grouped_expand": 2, "grouped_outer": 0, "combine_slots": 2}),
    # gates only: dh with the gate-grad epilogue, nothing else
    (("expert_weights",), {"grouped_shrink": 2, "grouped_expand": 1, "grouped_outer": 0, "combine_slots": 1}),
    # expert training (dB only): no dh at all, one grouped outer product
    (("lora_B",), {"grouped_shrink": 1, "grouped_expand": 1, "grouped_outer": 1, "combine_slots": 1}),
    # dA needs dh but not dx
    (("lora_A",), {"grouped_shrink": 2, "grouped_expand": 1, "grouped_outer": 1, "combine_slots": 1}),
    # inference-style: no grads at all, forward only
    ((), {"grouped_shrink": 1, "grouped_expand": 1, "grouped_outer": 0, "combine_slots": 1}),
])
def test_only_requested_grads_are_computed(grads, expect, monkeypatch):
    inp = _shape_inputs("E64-sparse-k2")
    with _count_calls(monkeypatch, LAUNCHERS) as counts:
        check(inp, torch.float32, grads=grads)
    assert counts == expect


def test_router_training_result_and_no_expert_grads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("expert weight grads computed in router training")

    monkeypatch.setattr(grouped, "grouped_outer", refuse)
    inp = _shape_inputs("T=1", per_expert=True)
    a = _leaves(inp, torch.float32, ("x", "expert_weights"), DEVICE)
    y = _call(lora_mix_grouped, a)
    y.square().sum().backward()
    assert a["lora_A"].grad is None and a["lora_B"].grad is None
    check(inp, torch.float32, grads=("x", "expert_weights"))


def test_poison_is_active_and_would_be_caught(monkeypatch):
    # the poison must reach the launchers' buffers, and an unwritten output row must fail the check:
    # make the combine pass skip the last token by lying about T
    real = grouped.combine_slots

    def skip_last(ys, y, num_tokens, top_k):
        out = real(ys[: (num_tokens - 1) * top_k], y[: num_tokens - 1] if y is not None else None,
                   num_tokens - 1, top_k)
        full = utils.poisoned_empty((num_tokens, ys.shape[1]), ys.dtype, ys.device)
        full[: num_tokens - 1] = out
        return full

    monkeypatch.setattr(grouped, "combine_slots", skip_last)
    with pytest.raises(AssertionError, match="non-finite output"):
        check(make_inputs(6, 16, 12, 3, 4, 2, base=False, seed=5), torch.float32, grads=())


def test_no_host_sync_forward_backward():
    # on CPU: no Python-level read of a tensor value anywhere in forward and backward (grouping
    # included); the GPU test below checks the same with torch's sync debug mode
    inp = _shape_inputs("E64-sparse-k2", per_expert=True)
    a = _leaves(inp, torch.float32, ALL_GRADS, DEVICE)
    g = torch.randn(24, 40, dtype=torch.float32, device=DEVICE)
    with no_host_sync("the grouped op"):
        y = _call(lora_mix_grouped, a)
        y.backward(g)
    assert all(a[n].grad is not None for n in ALL_GRADS)


# ----------------------------------------------------------------------------------------------------
# Config pruning (the compiled kernels themselves are checked by tests/test_compile_check.py)
# ----------------------------------------------------------------------------------------------------


def _full_shrink_tuner():
    # the kernel's own tuner holds one config under the interpreter: rebuild it over the whole table
    from selfmoe.kernels.tuning import Tuner

    return Tuner(grouped_kernels._grouped_shrink_kernel.fn, grouped_kernels._shrink_configs(), ["K"],
                 grouped_kernels.shrink_smem)


def _shrink_args(x, block_r):
    # a forward launch with aligned strides (K = 4096): every tile can be staged through cp.async
    return {"x_ptr": x, "K": 4096, "r": block_r, "stride_xt": 4096, "stride_xk": 1, "stride_we": block_r * 4096,
            "stride_wr": 4096, "stride_wk": 1}


def _pruned(kernel, x, launch_kwargs, limit, cap, monkeypatch):
    monkeypatch.setattr(utils, "_ASSUMED", (132, limit, cap))
    return kernel.candidates(_shrink_args(x, launch_kwargs["BLOCK_R"]), launch_kwargs)


@pytest.mark.parametrize("elem,block_r", [(4, 64), (4, 16), (2, 64), (2, 128)])
def test_shrink_pruning_follows_the_estimate(elem, block_r, monkeypatch):
    # Every config the autotuner keeps fits by the estimate and every dropped one does not; the
    # estimate counts num_stages copies under wgmma (sm_90, 16-bit, BM >= 64), num_stages - 1 otherwise.
    dt = {4: torch.float32, 2: torch.float16}[elem]
    x = torch.empty(1, 1, dtype=dt)
    kern = _full_shrink_tuner()
    kw = dict(BLOCK_M=64, BLOCK_R=block_r)
    for cap, limit in ((90, 232448), (80, 166912)):
        kept = {str(c) for c in _pruned(kern, x, kw, limit, cap, monkeypatch)}
        for c in kern.configs:
            if elem not in getattr(c, "selfmoe_elem_bytes", (elem,)):
                assert str(c) not in kept  # a config for the other input width is never a candidate
                continue
            est = kern.estimate(c, _shrink_args(x, block_r), kw)
            wgmma = cap == 90 and elem == 2 and c.num_warps % 4 == 0  # 2 warps are not a warp group
            stages = c.num_stages if wgmma else c.num_stages - 1
            assert est == stages * (64 * c.kwargs["BLOCK_K"] + c.kwargs["BLOCK_K"] * block_r) * elem
            assert (str(c) in kept) == (est <= limit), (cap, c, est)
    monkeypatch.setattr(utils, "_ASSUMED", (132, 1024, 90))
    assert len(kern.candidates(_shrink_args(x, block_r), kw)) == 1  # nothing fits: the smallest stays, the launch names it


def test_pruning_drops_configs_that_overflow(monkeypatch):
    # fp32, r=64 on an H100: the BLOCK_K=256 shrink pipeline (2 stages x 128 KiB on mma.sync) cannot fit
    x = torch.empty(1, 1, dtype=torch.float32)
    kern = _full_shrink_tuner()
    kept = _pruned(kern, x, dict(BLOCK_M=64, BLOCK_R=64), 232448, 90, monkeypatch)
    assert all(c.kwargs["BLOCK_K"] != 256 for c in kept) and len(kept) < len(kern.configs)


# ----------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,d_in,d_out,E,r,k", [
    (1, 2048, 1536, 64, 16, 2),  # decode: split-K carries the work
    (7, 1000, 600, 64, 16, 2),  # odd dims on real tiles
    (1024, 1024, 768, 64, 16, 2),  # prefill, the target regime
    (513, 512, 512, 8, 64, 1),  # k=1 in-place epilogue, wide rank
])
def test_gpu_matches_reference(T, d_in, d_out, E, r, k, dtype):
    check(make_inputs(T, d_in, d_out, E, r, k, per_expert=True, seed=T), dtype)


@pytest.mark.gpu
def test_gpu_deterministic_bf16():
    inp = make_inputs(2048, 1024, 1024, 64, 16, 2, seed=3)
    y1, g1 = run_grouped(inp, torch.bfloat16, ALL_GRADS)
    y2, g2 = run_grouped(inp, torch.bfloat16, ALL_GRADS)
    assert torch.equal(y1, y2) and all(torch.equal(g1[n], g2[n]) for n in ALL_GRADS)


@pytest.mark.gpu
def test_gpu_no_sync_and_cuda_graph():
    inp = make_inputs(64, 512, 384, 64, 16, 2, seed=9)
    a = _leaves(inp, torch.bfloat16, ALL_GRADS, "cuda")
    run_grouped(inp, torch.bfloat16, ALL_GRADS)  # autotune outside the guards (benchmarking syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = _call(lora_mix_grouped, a)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # forward captured in a CUDA graph, replayed with new routing: same as eager
    static = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in a.items()}
    with torch.no_grad():
        _call(lora_mix_grouped, static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = _call(lora_mix_grouped, static)
        static["expert_ids"].copy_(torch.randint(0, 64, static["expert_ids"].shape, device="cuda"))
        graph.replay()
        assert torch.equal(y_static, _call(lora_mix_grouped, static))
