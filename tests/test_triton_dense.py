"""Dense-rank and decode Triton paths of lora_mix: forward and every gradient against the float64 reference.

On CPU these run under TRITON_INTERPRET=1 (set by conftest) in fp32 and fp16; bf16 and large shapes are
GPU-only (the interpreter cannot do tl.dot on bf16). Every kernel-written buffer is NaN-poisoned first
(``utils.POISON``), so an element a kernel forgets to write fails the finiteness checks.
"""
import pytest
import torch

from helpers import TOL, check_against_reference, make_case, rel_err
import selfmoe.kernels.utils as utils
from selfmoe.kernels import lora_mix, lora_mix_naive
from selfmoe.kernels.dispatch import DECODE_MAX_RANK_COLS, decode_rank_tile

ld = pytest.importorskip("selfmoe.kernels.dense")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(utils, "POISON", True)
    monkeypatch.delenv("SELFMOE_LORA_PATH", raising=False)


def _path_fn(path):
    """A callable with lora_mix's signature that runs one forced path."""
    if path == "dense":
        def fn(x, A, B, ids, w, s, base_weight=None, base_bias=None):
            return ld.lora_mix_dense(x, A, B, ids, w, s, base_weight, base_bias)
    elif path == "decode":
        def fn(x, A, B, ids, w, s, base_weight=None, base_bias=None):
            return ld.lora_mix_decode(x, A, B, ids, w, s, base_weight, base_bias)
    else:
        raise ValueError(path)
    return fn


def _on_device(case):
    for name in ("x", "lora_A", "lora_B", "expert_ids", "expert_weights", "base_weight", "base_bias"):
        t = getattr(case, name)
        if t is not None:
            setattr(case, name, t.to(DEVICE))
    if isinstance(case.scaling, torch.Tensor):
        case.scaling = case.scaling.to(DEVICE)
    return case


# (T, d_in, d_out, E, r, k, extra) — each shape is here to break something specific.
SHAPES = {
    "paper": (37, 64, 48, 4, 8, 1, {}),  # the paper's E=4, r=8, top-1
    "top2": (50, 40, 72, 8, 4, 2, {}),  # top-2, d_in not a multiple of BLOCK_K
    "T=1": (1, 32, 24, 4, 8, 1, {}),  # single token: 1 valid row in a 16+ row tile
    "T<tile": (5, 48, 40, 4, 8, 2, {}),  # fewer tokens than any BLOCK_M: row masks
    "non-pow2": (19, 100, 60, 3, 5, 2, {}),  # d=100/60, E=3, r=5 padded to 8 rank lanes
    "r=1": (23, 32, 16, 4, 1, 2, {}),  # rank 1: 16 experts' worth of lanes per 16-wide tile, 12 padding
    "E=1": (17, 24, 20, 1, 4, 1, {}),  # one expert: tile mostly padding experts
    "k=E": (21, 32, 24, 4, 3, 4, {}),  # dense gating, every expert on every token
    "chunks": (33, 40, 24, 40, 8, 3, {}),  # E*r_pad=320 > 128: several expert chunks per shrink/dHg tile
    "multi-tile": (150, 136, 140, 4, 4, 2, {}),  # > 1 tile in M, N and K (BLOCK 128/128/64)
    "int32-ids": (15, 32, 16, 4, 4, 2, {"id_dtype": torch.int32}),
}


def _case(name, **overrides):
    T, d_in, d_out, E, r, k, extra = SHAPES[name]
    return _on_device(make_case(T, d_in, d_out, E, r, k, **{**extra, **overrides}))


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["dense", "decode"])
def test_path_matches_reference(path, name, dtype):
    case = _case(name, seed=sum(map(ord, name)))
    E, r = case.lora_A.shape[:2]
    if path == "decode" and decode_rank_tile(E, r) > DECODE_MAX_RANK_COLS:
        # too wide for the decode kernel's one rank tile: refused by name, never a launch that cannot fit
        with pytest.raises(ValueError, match=rf"lora_mix_decode.*\(E={E}, r={r}\) needs {decode_rank_tile(E, r)} "):
            case.to(dtype).call(_path_fn(path))
        return
    check_against_reference(case, _path_fn(path), dtype)


def test_decode_rank_tile_cap():
    # the tile pads E and r to powers of two: E=3, r=40 has E*r = 120 but a 256-wide tile
    assert [decode_rank_tile(E, r) for E, r in ((1, 1), (4, 8), (8, 16), (3, 40), (64, 16))] == [16, 32, 128, 256, 1024]


@pytest.mark.parametrize("base,bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("path", ["dense", "decode"])
def test_variants_base_bias_scaling(path, base, bias, per_expert):
    case = _on_device(make_case(29, 48, 40, 4, 6, 2, base=base, bias=bias, per_expert_scaling=per_expert, seed=7))
    check_against_reference(case, _path_fn(path), torch.float32)


@pytest.mark.parametrize("path", ["dense", "decode"])
def test_expert_without_tokens_and_all_on_one(path):
    T = 31
    # Expert 2 of 4 gets no tokens: its rank columns must come out exactly zero-gated, not garbage.
    ids = torch.tensor([0, 1, 3])[torch.arange(T * 2) % 3].reshape(T, 2)
    check_against_reference(_on_device(make_case(T, 32, 24, 4, 4, 2, ids=ids, seed=3)), _path_fn(path), torch.float32)
    # Every token on expert 1.
    ids = torch.ones(T, 1, dtype=torch.long)
    check_against_reference(_on_device(make_case(T, 32, 24, 4, 4, 1, ids=ids, seed=4)), _path_fn(path), torch.float32)


@pytest.mark.parametrize("path", ["dense", "decode"])
def test_duplicate_ids_add_up(path):
    T, E = 9, 4
    ids = torch.full((T, 3), 2, dtype=torch.long)
    ids[:, 2] = 1  # two slots on expert 2, one on expert 1
    case = _on_device(make_case(T, 16, 12, E, 3, 3, ids=ids, seed=5))
    check_against_reference(case, _path_fn(path), torch.float32)
    # Two slots on one expert equal one slot with the summed weight (the gate grads of both slots match).
    one = _on_device(make_case(T, 16, 12, E, 3, 2, ids=ids[:, 1:], seed=5))
    one.x, one.lora_A, one.lora_B, one.base_weight, one.base_bias = case.x, case.lora_A, case.lora_B, case.base_weight, case.base_bias
    one.expert_weights = torch.stack([case.expert_weights[:, :2].sum(-1), case.expert_weights[:, 2]], -1)
    c32, o32 = case.to(torch.float32), one.to(torch.float32)
    assert rel_err(c32.call(_path_fn(path)), o32.call(lora_mix_naive)) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_mix_triton_backend_with_leading_dims(dtype, monkeypatch):
    # Through the public op: [B, S, d] inputs flattened by lora_mix, dispatched, reshaped back.
    for path in ("dense", "decode"):
        monkeypatch.setenv("SELFMOE_LORA_PATH", path)
        before = ld.launch_counts["decode" if path == "decode" else "shrink"]
        case = _on_device(make_case(12, 32, 16, 4, 4, 2, lead=(3, 4), seed=41))
        check_against_reference(case, lora_mix, dtype, backend="triton")
        assert ld.launch_counts["decode" if path == "decode" else "shrink"] == before + 1


@pytest.mark.parametrize("T,expected", [(5, "decode"), (300, "dense")])
def test_lora_mix_triton_model_choice_runs_that_path(T, expected):
    # No env override: the cost model's choice at tiny sizes (decode for a few tokens, dense beyond 64).
    case = _on_device(make_case(T, 32, 24, 4, 4, 2, seed=43))
    before = dict(ld.launch_counts)
    check_against_reference(case, lora_mix, torch.float32, backend="triton")
    role = "decode" if expected == "decode" else "shrink"
    assert ld.launch_counts[role] == before.get(role, 0) + 1


def test_auto_on_cpu_stays_on_torch():
    if HAS_CUDA:
        pytest.skip("auto picks Triton on CUDA")
    case = make_case(10, 16, 12, 4, 3, 2, seed=37).to(torch.float32)
    before = sum(ld.launch_counts.values())
    y = case.call(lora_mix, backend="auto")
    assert sum(ld.launch_counts.values()) == before
    assert torch.equal(y, case.call(lora_mix, backend="torch"))


def _grad_run(path, grads, seed=23):
    case = _on_device(make_case(40, 48, 40, 4, 8, 2, seed=seed))
    low = case.to(torch.float32, {n: True for n in grads})
    before = dict(ld.launch_counts)
    y = low.call(_path_fn(path))
    fwd = {k: v - before.get(k, 0) for k, v in ld.launch_counts.items() if v != before.get(k, 0)}
    before = dict(ld.launch_counts)
    y.backward(torch.randn_like(y))
    bwd = {k: v - before.get(k, 0) for k, v in ld.launch_counts.items() if v != before.get(k, 0)}
    return low, fwd, bwd


@pytest.mark.parametrize("path", ["dense", "decode"])
def test_router_training_launches_no_expert_gradients(path):
    """Router training (grads for x and gates only) must not launch dA / dB / dW."""
    low, fwd, bwd = _grad_run(path, ["x", "expert_weights"])
    assert fwd == ({"decode": 1} if path == "decode" else {"shrink": 1, "fused_fwd": 1})
    assert bwd == {"dhg": 1, "dx": 1}
    assert low.lora_A.grad is None and low.lora_B.grad is None and low.base_weight.grad is None
    assert low.x.grad is not None and low.expert_weights.grad is not None


def test_each_gradient_launches_only_its_kernels():
    _, _, bwd = _grad_run("dense", ["lora_A", "lora_B", "x", "expert_weights"])
    assert bwd == {"dhg": 1, "dx": 1, "dA": 1, "dB": 1}
    _, _, bwd = _grad_run("dense", ["lora_B"])  # B alone needs neither dHg nor dx
    assert bwd == {"dB": 1}
    _, _, bwd = _grad_run("dense", ["expert_weights"])  # gates alone: one kernel
    assert bwd == {"dhg": 1}
    _, _, bwd = _grad_run("dense", ["base_weight", "base_bias"])
    assert bwd == {"dW": 1, "db": 1}


@pytest.mark.parametrize("path", ["dense", "decode"])
def test_no_grad_saves_nothing_for_backward(path, monkeypatch):
    # needs_input_grad stays True under no_grad: the forward must look at the grad mode itself, or
    # inference with trainable experts would write H / Hg for a backward that never comes.
    seen = []
    name = "decode_fused_fwd" if path == "decode" else "shrink_gate_fwd"
    real = getattr(ld, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[1] is not None if path == "decode" else out[0] is not None)  # H written?
        return out

    monkeypatch.setattr(ld, name, spy)
    case = _on_device(make_case(12, 16, 12, 4, 4, 2, seed=31)).to(torch.float32, {"expert_weights": True, "lora_B": True})
    y = case.call(_path_fn(path))
    with torch.no_grad():
        y_ng = case.call(_path_fn(path))
    with torch.inference_mode():
        y_inf = case.call(_path_fn(path))
    assert seen == [True, False, False]
    assert torch.equal(y.detach(), y_ng) and torch.equal(y_ng, y_inf)


def test_gate_grads_only_are_correct():
    # The dHg kernel with STORE_DH off (no dx / dA): gate grads alone must still match.
    case = _on_device(make_case(26, 40, 36, 5, 4, 2, seed=47))
    check_against_reference(case, _path_fn("dense"), torch.float32, grads=["expert_weights"])
    check_against_reference(case, _path_fn("dense"), torch.float16, grads=["lora_B"])


def test_mixed_dtypes_cast_to_x_and_grads_keep_param_dtype():
    # fp16 activations and base with fp32 experts and gates (a common PEFT set-up).
    case = _on_device(make_case(20, 32, 24, 4, 4, 1, seed=17))
    x = case.x.to(torch.float16).requires_grad_()
    A = case.lora_A.float().requires_grad_()
    B = case.lora_B.float().requires_grad_()
    w = case.expert_weights.float().requires_grad_()
    W = case.base_weight.to(torch.float16)
    y = ld.lora_mix_dense(x, A, B, case.expert_ids, w, 2.0, W)
    assert y.dtype == torch.float16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float16 and A.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = lora_mix_naive(x.double(), A.half().double(), B.half().double(), case.expert_ids, w.double(), 2.0, W.double())
    assert rel_err(y, ref) <= TOL[torch.float16]


class _FlagSpy:
    """Stands in for ``_fused_base_lora_kernel`` in dense.py: records each launch's fast-path flags."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append({k: kwargs[k] for k in ("EVEN_K1", "EVEN_K2", "B2_RANK_MAJOR")})
            return self.kernel[grid](*args, **kwargs)
        return launch


# (d_in, d_out, E, r) -> the flags of the forward launch and of dx. K lengths that are
# multiples of 64 take the unmasked K loads; lora_B contiguous takes the rank-major b2 addressing.
_FAST_PATHS = {
    "even": (128, 64, 8, 8, dict(EVEN_K1=True, EVEN_K2=True, B2_RANK_MAJOR=True),
             dict(EVEN_K1=True, EVEN_K2=True, B2_RANK_MAJOR=False)),
    "tails": (136, 72, 3, 8, dict(EVEN_K1=False, EVEN_K2=False, B2_RANK_MAJOR=True),
              dict(EVEN_K1=False, EVEN_K2=False, B2_RANK_MAJOR=False)),
    "even-K1, odd rank": (192, 40, 4, 5, dict(EVEN_K1=True, EVEN_K2=False, B2_RANK_MAJOR=True),
                          dict(EVEN_K1=False, EVEN_K2=False, B2_RANK_MAJOR=False)),
    # r = 1: lora_B [E, N, 1] is contiguous along n, the general addressing (the contract makes lora_B
    # contiguous, so this is the only forward without the rank-major path)
    "r=1": (64, 128, 64, 1, dict(EVEN_K1=True, EVEN_K2=True, B2_RANK_MAJOR=False),
            dict(EVEN_K1=True, EVEN_K2=True, B2_RANK_MAJOR=False)),
}


@pytest.mark.parametrize("name", list(_FAST_PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_fast_paths_match_reference(name, dtype, monkeypatch):
    # The fused kernel's EVEN_K1 / EVEN_K2 (no K mask) and B2_RANK_MAJOR (lora_B addressed with the
    # constant r) paths, on and off, forward and dx: float64 reference on fresh inputs, NaN-poisoned
    # outputs (the autouse fixture), and the flags each launch really took.
    d_in, d_out, E, r, fwd_flags, dx_flags = _FAST_PATHS[name]
    spy = _FlagSpy(ld._fused_base_lora_kernel)
    monkeypatch.setattr(ld, "_fused_base_lora_kernel", spy)
    case = _on_device(make_case(70, d_in, d_out, E, r, 2, seed=71 + len(name)))
    low = case.to(dtype, {"x": True, "expert_weights": True})
    B = low.lora_B
    y = ld.lora_mix_dense(low.x, low.lora_A, B, low.expert_ids, low.expert_weights, low.scaling,
                          low.base_weight, low.base_bias)
    x64 = low.x.detach().double().requires_grad_()
    ref = lora_mix_naive(x64, low.lora_A.double(), B.double(), low.expert_ids, low.expert_weights.detach().double(),
                         low.scaling, low.base_weight.double(), low.base_bias.double())
    assert torch.isfinite(y).all() and rel_err(y, ref) <= TOL[dtype]
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y.backward(g.to(dtype).to(DEVICE))
    ref.backward(g.to(dtype).double())
    assert torch.isfinite(low.x.grad).all() and rel_err(low.x.grad, x64.grad) <= TOL[dtype]
    assert spy.seen == [fwd_flags, dx_flags]


def test_outputs_are_poisoned_before_launch():
    # Guards the guard: with POISON on, a buffer no kernel touches really is NaN.
    buf = utils.poisoned_empty((3, 4), torch.float32, DEVICE)
    assert torch.isnan(buf).all()


def test_split_t_weight_gradient_matches_and_is_deterministic():
    # The split-T partials (used on GPUs for [E*r, K] / [N, E*r] outputs) are never picked on CPU
    # automatically: force them, into lora_B's [E, N, r] layout (columns decomposed by expert/rank).
    g = torch.Generator().manual_seed(3)
    T, N, E, r = 301, 24, 3, 5
    dy = torch.randn(T, N, generator=g).to(DEVICE)
    hg = torch.randn(T, E * r, generator=g).to(DEVICE)
    ref = (dy.double().t() @ hg.double()).view(N, E, r).transpose(0, 1)
    for split in (1, 4, 7):
        out = ld.matmul_tn(dy, hg, (E, N, r), q_div=r, out_strides=(r, N * r, 1), role="test", split=split)
        assert out.shape == (E, N, r) and out.dtype == torch.float32
        assert rel_err(out, ref) <= TOL[torch.float32], split
        again = ld.matmul_tn(dy, hg, (E, N, r), q_div=r, out_strides=(r, N * r, 1), role="test", split=split)
        assert torch.equal(out, again)


# ---- split-K of the dense shrink and the decode kernel (forced: on CPU shapes split_k picks 1) ----

# T=37: not a multiple of any BLOCK_M; d_in=200: 4 BLOCK_K=64 steps, the last one 8 wide, so SPLIT=3 gives
# splits of 1, 1 and 2 steps and SPLIT=7 leaves splits with no step at all (they must write zeros).
SPLIT_SHAPE = (37, 200, 48, 4, 8, 2)


@pytest.mark.parametrize("split", [3, 7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["dense", "decode"])
def test_split_k_matches_reference(path, dtype, split, monkeypatch):
    # Forward and every gradient (gate grads read the H the split reduce saved; dB reads its Hg).
    monkeypatch.setenv("SELFMOE_DENSE_SPLIT_K", str(split))
    role = "decode_reduce" if path == "decode" else "shrink_reduce"
    before = ld.launch_counts[role]
    case = _on_device(make_case(*SPLIT_SHAPE, per_expert_scaling=dtype == torch.float32, seed=83 + split))
    check_against_reference(case, _path_fn(path), dtype)
    assert ld.launch_counts[role] == before + 1  # the split path really ran


@pytest.mark.parametrize("path", ["dense", "decode"])
def test_split_k_saves_only_what_backward_reads(path, monkeypatch):
    # Router training: H saved through the split reduce, Hg not saved (no dB), no bias, no base weight;
    # then dB alone: Hg saved, H not.
    monkeypatch.setenv("SELFMOE_DENSE_SPLIT_K", "4")
    case = _on_device(make_case(21, 136, 40, 5, 4, 2, base=False, seed=89))
    check_against_reference(case, _path_fn(path), torch.float32, grads=["x", "expert_weights"])
    check_against_reference(case, _path_fn(path), torch.float16, grads=["lora_B"])


def _launcher_inputs(T, K, N, E, r, k, seed):
    from selfmoe.kernels.contract import LoRAMixInputs

    c = _on_device(make_case(T, K, N, E, r, k, seed=seed)).to(torch.float32)
    inp = LoRAMixInputs(c.x, c.lora_A, c.lora_B, c.expert_ids, c.expert_weights,
                        torch.ones(E, device=DEVICE), 1.7, c.base_weight, c.base_bias)
    return c, inp


def test_split_k_equals_unsplit_and_is_bitwise_reproducible():
    # fp32: the split outputs equal the unsplit ones up to fp32 rounding of the partial sums, H and Hg
    # included; a rerun with the same split is bitwise identical (fixed-order sums, no atomics).
    c, inp = _launcher_inputs(45, 328, 40, 4, 8, 2, seed=97)
    G = torch.zeros(45, 4, dtype=torch.float64, device=DEVICE).scatter_add_(
        1, c.expert_ids, c.expert_weights.double())
    h_ref = c.x.double() @ c.lora_A.double().reshape(32, 328).T
    hg_ref = h_ref * G.repeat_interleave(8, dim=1) * 1.7
    y1, h1, hg1 = ld.decode_fused_fwd(inp, True, True, split=1)
    for split in (2, 5, 9):
        y, h, hg = ld.decode_fused_fwd(inp, True, True, split=split)
        assert rel_err(y, y1) <= 1e-6 and rel_err(h, h1) <= 1e-6 and rel_err(hg, hg1) <= 1e-6, split
        assert rel_err(h, h_ref) <= 1e-6 and rel_err(hg, hg_ref) <= 1e-6
        again = ld.decode_fused_fwd(inp, True, True, split=split)
        assert all(torch.equal(a, b) for a, b in zip((y, h, hg), again))
        sh, shg = ld.shrink_gate_fwd(inp, save_h=True, split=split)
        assert rel_err(sh, h_ref) <= 1e-6 and rel_err(shg, hg_ref) <= 1e-6
        sh2, shg2 = ld.shrink_gate_fwd(inp, save_h=True, split=split)
        assert torch.equal(sh, sh2) and torch.equal(shg, shg2)
    # inference: nothing saved, the reduce only writes y (and adds the bias)
    y, h, hg = ld.decode_fused_fwd(inp, False, False, split=3)
    assert h is None and hg is None and rel_err(y, y1) <= 1e-6


def test_split_k_heuristic_and_override(monkeypatch):
    from selfmoe.kernels.dispatch import decode_tiles, forced_split, shrink_tiles, split_k

    # one program per SM at T <= 64, d_in = 4096 on an H100 (132 SMs), N = 1024 and 4096
    for T in (1, 16, 64):
        for N in (1024, 4096):
            assert decode_tiles(T, N) * split_k(decode_tiles(T, N), 4096, 132) >= 132, (T, N)
        # the shrink has one tile there: K // SPLIT_MIN_K (16 splits of 256) bounds it
        assert split_k(shrink_tiles(T, 8, 16), 4096, 132) == 16
    assert split_k(shrink_tiles(1, 64, 16), 4096, 132) == 16 and shrink_tiles(1, 64, 16) == 8
    # a grid that fills more than half the SMs stays unsplit; short K bounds the split
    assert split_k(67, 4096, 132) == 1 and split_k(66, 4096, 132) == 2
    assert split_k(1, 1000, 132) == 3 and split_k(1, 255, 132) == 1
    monkeypatch.delenv("SELFMOE_DENSE_SPLIT_K", raising=False)
    assert forced_split() is None
    monkeypatch.setenv("SELFMOE_DENSE_SPLIT_K", "0")
    with pytest.raises(ValueError, match="SELFMOE_DENSE_SPLIT_K must be a positive int, got '0'"):
        forced_split()


def test_config_pruning_by_dtype_and_alignment():
    # What the compile report measured (kernels/dense_kernels.py): fp32 (ieee dots on FMA units) keeps
    # only configs that compile without spills, 16-bit inputs never get the fp32 ones, and at an odd
    # d_in (scalar loads) wide tiles go; the unpipelined smem estimate matches the compiled kernel.
    from selfmoe.kernels import dense_kernels as dk
    from selfmoe.kernels.tuning import config_params

    def kept(configs, ok, **launch):
        # as the tuner prunes: configs for another input width (``only_for``) first, then the rule
        e = 4 if launch["DOT_PRECISION"] == "ieee" else 2
        return [(dict(c.kwargs), c.num_warps) for c in configs
                if e in getattr(c, "selfmoe_elem_bytes", (e,)) and ok(config_params(c, launch, elem_bytes=e))]

    shrink, decode = dk._shrink_configs(), dk._decode_configs()
    assert kept(shrink, dk.shrink_regs_ok, BLOCK_C=128, ALIGN=16, DOT_PRECISION="ieee") == [
        ({"BLOCK_M": 64, "BLOCK_K": 32}, 8)]
    assert len(kept(shrink, dk.shrink_regs_ok, BLOCK_C=128, ALIGN=16, DOT_PRECISION="tf32")) == len(shrink) - 1
    assert kept(decode, dk.decode_regs_ok, BLOCK_M=64, BLOCK_C=128, ALIGN=16, DOT_PRECISION="ieee") == [
        ({"BLOCK_N": 16, "BLOCK_K": 32}, 8)]
    half = kept(decode, dk.decode_regs_ok, BLOCK_M=64, BLOCK_C=128, ALIGN=16, DOT_PRECISION="tf32")
    assert ({"BLOCK_N": 32, "BLOCK_K": 64}, 2) not in half and len(half) == len(decode) - 2
    # d_in = 1000 with the alignment hint (ALIGN 8) keeps every 16-bit config; ALIGN 1 drops wide ones
    assert len(kept(shrink, dk.shrink_regs_ok, BLOCK_C=128, ALIGN=8, DOT_PRECISION="tf32")) == len(shrink) - 1
    assert kept(shrink, dk.shrink_regs_ok, BLOCK_C=128, ALIGN=1, DOT_PRECISION="tf32") == [
        ({"BLOCK_M": 32, "BLOCK_K": 128}, 8)]
    assert ({"BLOCK_N": 64, "BLOCK_K": 128}, 4) not in kept(decode, dk.decode_regs_ok, BLOCK_M=16, BLOCK_C=32,
                                                             ALIGN=1, DOT_PRECISION="tf32")
    assert (ld.k_align(1000, 1000, 64000, 1000), ld.k_align(4096, 4096, 32768), ld.k_align(1001, 1001)) == (8, 16, 1)
    p = config_params(decode[0], dict(BLOCK_M=16, BLOCK_C=32, ALIGN=1, HAS_BASE=True))
    assert dk.decode_smem(p, 2) == 10240  # compiled for sm_90 at d_in = 1001: x and W tiles, one copy
    p = config_params(shrink[0], dict(BLOCK_C=32, ALIGN=1))
    assert dk.shrink_smem(p, 2) == 12288 and dk.shrink_smem(dict(p, ALIGN=2), 2) == 3 * 12288


def test_backward_is_deterministic():
    case = _on_device(make_case(45, 40, 36, 4, 4, 2, seed=53))
    grads = []
    for _ in range(2):
        low = case.to(torch.float32, {"x": True, "lora_A": True, "lora_B": True, "expert_weights": True})
        low.call(_path_fn("dense")).sum().backward()
        grads.append([low.x.grad, low.lora_A.grad, low.lora_B.grad, low.expert_weights.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_out_of_range_ids_with_check_off_select_nothing(monkeypatch):
    # With SELFMOE_CHECK_IDS=0 the kernels still never read out of bounds: a bad id selects no expert
    # (zero contribution, zero gate gradient) while the good slot is computed as usual.
    monkeypatch.setenv("SELFMOE_CHECK_IDS", "0")
    case = _on_device(make_case(8, 16, 12, 3, 2, 2, seed=59)).to(torch.float32, {"expert_weights": True})
    bad = case.expert_ids.clone()
    bad[:, 1] = torch.tensor([3, 100, -1, 7, 3, 3, 50, -5])
    y = lora_mix(case.x, case.lora_A, case.lora_B, bad, case.expert_weights, case.scaling,
                 base_weight=case.base_weight, base_bias=case.base_bias, backend="triton")
    ref = lora_mix_naive(case.x.double(), case.lora_A.double(), case.lora_B.double(), bad[:, :1],
                         case.expert_weights[:, :1].double(), case.scaling, case.base_weight.double(), case.base_bias.double())
    assert rel_err(y, ref) <= TOL[torch.float32]
    y.sum().backward()
    assert torch.all(case.expert_weights.grad[:, 1] == 0) and torch.all(case.expert_weights.grad[:, 0] != 0)


def test_empty_tokens():
    case = _on_device(make_case(0, 16, 12, 4, 3, 2, seed=19)).to(torch.float32, {"x": True, "lora_A": True})
    y = case.call(_path_fn("dense"))
    assert y.shape == (0, 12)
    y.sum().backward()
    assert case.x.grad.shape == (0, 16)


def test_float64_is_refused():
    case = make_case(4, 8, 6, 2, 2, 1, seed=61)
    with pytest.raises(TypeError, match="float64"):
        case.call(_path_fn("dense"))


# ---- GPU only: bf16 (the interpreter cannot tl.dot bf16) and real sizes ----

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("path", ["dense", "decode"])
def test_bf16_matches_reference(path, name):
    check_against_reference(_case(name, seed=sum(map(ord, name))), _path_fn(path), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    (2048, 1024, 1536, 8, 16, 2),  # training-sized tile counts, autotuned configs, split-T weight grads
    (1024, 1024, 1024, 4, 8, 1),  # the paper's routing
    (1000, 700, 900, 16, 8, 2),  # E*r = 128, ragged dims
])
def test_large_shapes_on_gpu(shape, dtype):
    T, K, N, E, r, k = shape
    check_against_reference(_on_device(make_case(T, K, N, E, r, k, seed=71)), _path_fn("dense"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_shapes_on_gpu(T, dtype):
    case = _on_device(make_case(T, 4096, 4096, 8, 16, 2, seed=73))
    check_against_reference(case, _path_fn("decode"), dtype, grads=["x", "expert_weights"])
