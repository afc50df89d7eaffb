"""Dense-rank Triton kernels of the routed multi-LoRA linear (small ``E*r``), forward and backward.

All experts form one ``[E*r, d_in]`` matrix ``A_all`` (``lora_A`` reshaped, no copy) and one
``[d_out, E*r]`` matrix ``B_all`` (read straight out of ``lora_B [E, d_out, r]`` by computing each rank
column's expert and rank index, so it is never materialised). Notation: T tokens, K = d_in, N = d_out,
E experts of rank r, ``ER = E*r`` rank columns, K_TOP = k slots per token. Names follow the grouped
kernels: ``i_`` program and gathered indices, ``o_`` offsets, ``m_`` masks, ``b_`` blocks of values,
``p_`` pointers, with ``# [BM, BK]`` shape comments. Launchers, the math of each path and the backward
plan are in dense.py.

Forward: ``_shrink_gate_fwd_kernel`` (H = x @ A_all.T, Hg = H * G * scaling) then
``_fused_base_lora_kernel`` (y = [x | Hg] @ [W | B_all].T + b, one K loop over d_in + ER); decode:
``_decode_fused_fwd_kernel`` (both in one launch). With split-K (small T) the shrink and decode kernels
write fp32 partials per K split and ``_shrink_split_reduce_kernel`` / ``_decode_split_reduce_kernel``
sum them in split order. Backward: ``_dhg_bwd_kernel`` (dH and the gate grads),
``_fused_base_lora_kernel`` again (dx) and ``_matmul_tn_kernel`` (dA, dB, dW).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tuning import async_tile, autotune, fma_dots, fma_regs_ok, only_for, tile_buffers

# --------------------------------------------------------------------------------------------------
# Config tables (first entry = default; ``tuning.autotune`` applies the pin, the interpreter policy
# and the shared-memory pruning with the estimates below)
# --------------------------------------------------------------------------------------------------


def _shrink_configs():
    # The shrink is [T, K] x [K, <=128]: wide K tiles, modest M; it is bandwidth-bound on x.
    # The last one is for fp32 inputs only (FMA dots, see shrink_regs_ok).
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        # 8 warps: with 4, ptxas capped the split-K variant at 64-128 registers and spilled (sm_90)
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        only_for(triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3), 4),
    ]


def _fused_configs():
    # The base GEMM with a longer K loop: standard large-tile GEMM configs (128 x 256 left out: its
    # 128 fp32 accumulator values per thread spill on sm_90).
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # fp32 (FMA dots): the tables above spill at 4-byte inputs (``fused_regs_ok``); these fit.
        # 64 x 64 runs on 8 warps: on 4 (32 accumulator values per thread) ptxas spilled 4-20 B of
        # loop-invariant values around the K loops at only 96-168 registers, case by case (no local
        # arrays in the PTX; the spills come and go with ptxas's allocator options and small code
        # changes, not with the tile); on 8 it compiled clean in every fp32 case of the report.
        only_for(triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=3), 4),
        only_for(triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=4), 4),
    ]


def _decode_configs():
    # W streaming: small BLOCK_N gives enough programs to saturate HBM at N ~ 4096 (split-K adds
    # programs along K when N is small); deep pipelines. Shared memory per stage is
    # BLOCK_K * (BLOCK_M + BLOCK_N + BLOCK_C) elements with BLOCK_M, BLOCK_C up to 64 and 128: the first
    # (default / pinned) config fits fp32 at the largest tile (192 KB); the deeper ones are for half
    # inputs at small T (configs that do not fit are skipped by autotune).
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=2, num_stages=5),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        # fp32 inputs only (FMA dots, see decode_regs_ok): a narrow W tile keeps the epilogue's
        # [BM, BC] x [BC, BN] FMA dot within the registers at a 128-wide rank tile
        only_for(triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=8, num_stages=3), 4),
    ]


def _dhg_configs():
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        # fp32 (FMA dots, K = BLOCK_N): short N steps keep the operand slices in registers
        only_for(triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=3), 4),
        only_for(triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=3), 4),
    ]


def _tn_configs():
    # Weight gradients reduce over T: tall BLOCK_T, output tiles sized for [ER, K] / [N, ER] / [N, K].
    return [
        triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_T": 64, "GROUP_P": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_T": 32, "GROUP_P": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_Q": 128, "BLOCK_T": 64, "GROUP_P": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 32, "BLOCK_Q": 128, "BLOCK_T": 64, "GROUP_P": 8}, num_warps=4, num_stages=4),
        # fp32 (FMA dots): a shorter T step than the half tables (``tn_regs_ok``)
        only_for(triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_T": 16, "GROUP_P": 8}, num_warps=4, num_stages=3), 4),
        only_for(triton.Config({"BLOCK_P": 32, "BLOCK_Q": 64, "BLOCK_T": 32, "GROUP_P": 8}, num_warps=4, num_stages=4), 4),
    ]


# --------------------------------------------------------------------------------------------------
# Shared-memory estimates (bytes) for the pruning: Triton's software pipeliner keeps
# ``tuning.pipeline_buffers`` copies (num_stages with wgmma, num_stages - 1 with mma.sync) of every tile
# a K loop loads for a dot; after the loop the buffers are free again, so an epilogue dot or layout
# conversion needs only the max. ``p``: the launch's constexprs and the config
# (``tuning.config_params``); ``e``: bytes per input element. Checked against the compiled kernels by
# compile_check.py.
# --------------------------------------------------------------------------------------------------


def _k_loop_async(p, e):
    """Whether the shrink and decode kernels' K-contiguous loads can use cp.async: vectors of >= 4
    bytes (``ALIGN * e >= 4``, ALIGN from ``dense.k_align``); else Triton stages each tile once
    (``tuning.tile_buffers``; compile report: odd d_in in 16-bit)."""
    return p.get("ALIGN", 16) * e >= 4


def _unaligned_regs_ok(p, loaded, acc):
    # K-contiguous loads narrower than 16 bytes (16-bit inputs with ALIGN < 8: d_in not a multiple of 8)
    # need an address and a predicate per vector of ALIGN elements: the vectors a thread loads per K
    # step plus its fp32 accumulator values must stay under ~112 (compile report, d_in = 1000 before
    # ALIGN and 1001: 124 and 160 spilled, 112 did not)
    align = p.get("ALIGN", 16)
    return align >= 8 or (loaded // align + acc) <= 112 * 32 * p["num_warps"]


def shrink_smem(p, e):
    return tile_buffers(p, e, p["BLOCK_M"], _k_loop_async(p, e)) * (p["BLOCK_M"] * p["BLOCK_K"] + p["BLOCK_K"] * p["BLOCK_C"]) * e


def shrink_regs_ok(p):
    # FMA dots (fp32): BLOCK_K = 64 spilled on sm_80 even at a 32-wide rank tile (255 registers),
    # and BLOCK_K = 128 at 128 columns on sm_90 (compile report): fp32 takes BLOCK_K <= 32 (its own
    # config, ``only_for`` 4-byte inputs: on tensor cores its short K steps would only cost bandwidth).
    bm, bk, bc = p["BLOCK_M"], p["BLOCK_K"], p["BLOCK_C"]
    if not fma_dots(p):
        return _unaligned_regs_ok(p, bm * bk + bk * bc, bm * bc)
    return bk <= 32


def fused_smem(p, e):
    # Two K loops, each with its own buffers (free again after the loop, so the max counts). An
    # operand whose loads cannot be vectorised to >= 4 bytes (``tuning.async_tile``: d_in = 1000, or
    # the rank-column operand through its run-time strides at r < 16, whose n stride is r: see
    # ``B2_RANK_MAJOR``) is loaded to registers and staged once.
    bm, bn, bk = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_K"]

    def seg(a_async, b_async):
        return (tile_buffers(p, e, bm, a_async) * bm * bk + tile_buffers(p, e, bm, b_async) * bk * bn) * e

    seg2 = seg(async_tile(e, (p["stride_a2m"], p["stride_a2c"]), (1, p["K2"])), _b2_async(p, e))
    if not p["HAS_SEG1"]:
        return seg2
    seg1 = seg(async_tile(e, (p["stride_a1m"], p["stride_a1k"]), (1, p["K1"])),
               async_tile(e, (p["stride_b1k"], p["stride_b1n"]), (p["K1"], p["N"])))
    return max(seg1, seg2)


def _b2_async(p, e):
    # rank-column rows c sit at (c // r) * stride_b2e + (c % r) * stride_b2r: contiguous along c in runs
    # of r when stride_b2r == 1 (lora_B, forward), along n when stride_b2n == 1 (lora_A, dx)
    if e >= 4:
        return True
    if p.get("B2_RANK_MAJOR"):
        # addressed with the constant r (the kernel's docstring): vectors of the largest power of two
        # dividing r, cp.async from 4 bytes
        return (p["r"] & -p["r"]) * e >= 4
    if p["stride_b2r"] == 1 and p["r"] > 1:
        return async_tile(e, (1, p["stride_b2n"]), (p["K2"], None)) and p["stride_b2e"] % 16 == 0
    return async_tile(e, (p["stride_b2r"], p["stride_b2n"]), (p["K2"], p["N"])) and p["stride_b2e"] % 16 == 0


def fused_regs_ok(p):
    # fp32: 64 x 64 x 32 on 4 warps (1024 per thread) spilled 4 B on sm_80 at d_in = 1000
    return fma_regs_ok(p, p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_K"], budget=512)


def decode_smem(p, e):
    bm, bn, bk, bc = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_K"], p["BLOCK_C"]
    if _k_loop_async(p, e):
        loop = tile_buffers(p, e, bm, True) * bk * (bm + bn + bc) * e
    else:
        # unpipelined (see _k_loop_async): one copy, and the x tile with W (x @ W) and then with the
        # A_all slice (x @ A) are live in turn, not all three
        loop = bk * (bm + max(bn if p.get("HAS_BASE", True) else 0, bc)) * e
    return max(loop, (bm * bc + bc * bn) * e)


def decode_regs_ok(p):
    # FMA dots (fp32): the epilogue dot [BM, BC] x [BC, BN] reduces over the whole rank tile, so
    # BC * BN is bounded (BN = 32 at BC = 128 spilled), and so are the two accumulators per thread
    # (BM = 64, BC = 128 needs 8 warps) and BLOCK_K (64 spilled on sm_80 at BC = 32 with 2 warps).
    # The fp32 config (BLOCK_N = 16) is ``only_for`` 4-byte inputs: for 16-bit ones it would only
    # halve the W tile.
    bm, bn, bk, bc = p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_K"], p["BLOCK_C"]
    if not fma_dots(p):
        # the two fp32 accumulators [BM, BC] and [BM, BN] at most 96 values per thread: 2 warps at
        # BM = 64, BC = 128 (160) spilled
        return (bm * (bc + bn) <= 96 * 32 * p["num_warps"]
                and _unaligned_regs_ok(p, bk * (bm + bn + bc), bm * (bc + bn)))
    return bk <= 32 and bc * bn <= 2048 and bm * (bc + bn) <= 40 * 32 * p["num_warps"]


def dhg_smem(p, e):
    # The inner loop's dy [BM, BN] and B_all [BN, BC] tiles. The B_all tile is contiguous along the rank
    # columns, masked by the run-time r: at r not a multiple of 16 (r = 8) its loads stay 2-byte and
    # it is staged once (this was the "+ BM * BC" of the previous, fitted formula).
    dy = async_tile(e, (p["stride_dym"], p["stride_dyn"]), (1, p["N"]))
    if p["stride_br"] == 1:
        b = async_tile(e, (p["stride_bn"], 1), (p["N"], p["r"])) and p["stride_be"] % 16 == 0
    else:
        b = async_tile(e, (p["stride_bn"], p["stride_br"]), (p["N"], 1))
    return (tile_buffers(p, e, p["BLOCK_M"], dy) * p["BLOCK_M"] * p["BLOCK_N"]
            + tile_buffers(p, e, p["BLOCK_M"], b) * p["BLOCK_N"] * p["BLOCK_C"]) * e


def dhg_regs_ok(p):
    # the [BM, BC] fp32 dHg accumulator lives through the gate epilogue next to the dy tiles: at more
    # than 32 fp32 values per thread ptxas spills (compile report, E*r >= 128 with 4 warps)
    # (and a 128-wide rank tile needs 8 warps: 32 x 128 with 4 spilled 16 B)
    return (p["BLOCK_M"] * p["BLOCK_C"] <= 32 * 32 * p["num_warps"] and (p["BLOCK_C"] < 128 or p["num_warps"] >= 8)
            # fp32: the gate epilogue's tiles stay live too (64 x 16 on 8 warps at BC = 128, 512 per
            # thread, spilled 16 B on sm_80)
            and fma_regs_ok(p, p["BLOCK_M"], p["BLOCK_C"], p["BLOCK_N"], budget=256))


def tn_smem(p, e):
    # the loop's a.T [BP, BT] and b [BT, BQ] tiles (staged once when not vectorisable: T = 1000 rows of
    # d_in = 1000), then the epilogue's layout conversion of the [BP, BQ] result: on wgmma the whole
    # tile in the output dtype (fp32 partials when SPLIT > 1); on mma.sync only for the row-major
    # store (dA, dW), 2 bytes per value, and none for dB's (expert, rank) scattered store
    bp, bq, bt = p["BLOCK_P"], p["BLOCK_Q"], p["BLOCK_T"]
    a = async_tile(e, (p["stride_ap"], p["stride_at"]), (p["P"], 1))
    b = async_tile(e, (p["stride_bt"], p["stride_bq"]), (1, p["Q"]))
    loop = (tile_buffers(p, e, bp, a) * bp * bt + tile_buffers(p, e, bp, b) * bt * bq) * e
    wgmma = p["capability"] >= 90 and e == 2 and bp >= 64 and p["num_warps"] % 4 == 0
    if wgmma:
        epi = bp * bq * (4 if p["SPLIT"] > 1 else e)
    else:
        epi = bp * bq * e if p["QR"] == p["Q"] else 0
    return max(loop, epi)


def tn_regs_ok(p):
    # fp32: 64 x 64 x 32 on 4 warps (1024 per thread) spilled 8 B on sm_80 at d_in = 1000
    return fma_regs_ok(p, p["BLOCK_P"], p["BLOCK_Q"], p["BLOCK_T"], budget=512)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _swizzle_pid(i_pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Grouped program order: GROUP row tiles share each column tile while it is hot in L2."""
    n_in_group = GROUP * n_cols
    i_group = i_pid // n_in_group
    i_first = i_group * GROUP
    group_rows = min(n_rows - i_first, GROUP)
    i_row = i_first + (i_pid % n_in_group) % group_rows
    i_col = (i_pid % n_in_group) // group_rows
    return i_row, i_col


@triton.jit
def _gate_scale_tile(
    ids_ptr, gate_ptr, scale_ptr, scale_val, o_m, m_m, i_e0, E, K_TOP,
    stride_idm, stride_idk, stride_gm, stride_gk,
    PER_EXPERT_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, EPC: tl.constexpr, R_PAD: tl.constexpr,
):
    """Gate x scaling of each (token, rank column) of a tile holding experts ``i_e0 .. i_e0 + EPC - 1``
    (``R_PAD`` columns each), fp32 ``[BLOCK_M, EPC * R_PAD]``.

    Rebuilt from the top-k ids/gates (k compares per tile) instead of reading a [T, E] gate tensor:
    cheaper than a scatter launch plus a round-trip, and duplicate ids add up by construction. The
    compares run per (token, expert), ``[BM, EPC]``, and only then widen to the rank columns: built
    directly as ``[BM, BC]`` the tile took a layout where every thread held all BM rows (255
    registers and spills on sm_90 at ``E*r >= 128``).
    """
    o_e = i_e0 + tl.arange(0, EPC)  # [EPC] experts of the tile
    b_g = tl.zeros([BLOCK_M, EPC], dtype=tl.float32)
    for j in range(K_TOP):
        b_id = tl.load(ids_ptr + o_m * stride_idm + j * stride_idk, mask=m_m, other=-1)  # [BM]
        b_w = tl.load(gate_ptr + o_m * stride_gm + j * stride_gk, mask=m_m, other=0.0).to(tl.float32)  # [BM]
        b_g += tl.where(b_id[:, None] == o_e[None, :], b_w[:, None], 0.0)  # [BM, EPC]
    if PER_EXPERT_SCALE:
        b_s = tl.load(scale_ptr + o_e, mask=o_e < E, other=0.0)  # [EPC] fp32
        b_g = b_g * b_s[None, :]
    else:
        b_g = b_g * scale_val
    # every rank column of expert e takes e's gate: [BM, EPC] -> [BM, EPC, R_PAD] -> [BM, BC]
    return tl.reshape(tl.broadcast_to(b_g[:, :, None], (BLOCK_M, EPC, R_PAD)), (BLOCK_M, EPC * R_PAD))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _rank_epilogue(
    b_h, ids_ptr, gate_ptr, scale_ptr, scale_val, h_ptr, hg_ptr, o_m, m_m, i_e0, i_ce, i_cj, m_c, E, r, K_TOP,
    stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc,
    PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr, SAVE_HG: tl.constexpr, BLOCK_M: tl.constexpr,
    EPC: tl.constexpr, R_PAD: tl.constexpr,
):
    """Store a finished ``[BM, BC]`` fp32 tile of H (SAVE_H) and ``Hg = H * G * scaling`` (SAVE_HG, in
    hg's dtype) at columns ``i_ce * r + i_cj`` of the ``[T, ER]`` layout; the tile holds experts
    ``i_e0 .. i_e0 + EPC - 1``."""
    o_col = i_ce * r + i_cj  # [BC] column in the [T, ER] layout
    p_out = o_m.to(tl.int64)[:, None] * stride_hm + o_col[None, :] * stride_hc
    m_out = m_m[:, None] & m_c[None, :]
    if SAVE_H:
        tl.store(h_ptr + p_out, b_h.to(h_ptr.dtype.element_ty), mask=m_out)
    if SAVE_HG:
        b_g = _gate_scale_tile(ids_ptr, gate_ptr, scale_ptr, scale_val, o_m, m_m, i_e0, E, K_TOP,
                               stride_idm, stride_idk, stride_gm, stride_gk, PER_EXPERT_SCALE, BLOCK_M, EPC, R_PAD)
        tl.store(hg_ptr + p_out, (b_h * b_g).to(hg_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _aligned(v, ALIGN: tl.constexpr):
    """``v``, known to the compiler as a multiple of ALIGN (the launcher guarantees it: ``k_align``).

    Triton only specialises ints divisible by 16: at d_in = 1000 the K-contiguous loads of x, W and
    A_all would be scalar and unpipelined (no cp.async, 255 registers and spills for their per-element
    addresses) although every row starts 16-byte aligned for 16-bit inputs. ``(v // ALIGN) * ALIGN``
    is exact here and carries the divisibility into the compiler's alignment analysis.
    """
    if ALIGN < 16:
        v = (v // ALIGN) * ALIGN
    return v


@triton.jit
def _split_k_range(K, SPLIT, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)`` of split ``program_id(2)``: SPLIT near-equal runs of whole BLOCK_K steps (their
    lengths differ by at most one step). Starts are multiples of BLOCK_K, so the compiler keeps the
    loads' alignment; a split with no step (SPLIT > steps, forced by tests) gets an empty range."""
    i_s = tl.program_id(2)
    n_kt = tl.cdiv(K, BLOCK_K)
    k_lo = (i_s * n_kt // SPLIT) * BLOCK_K
    k_hi = tl.minimum(((i_s + 1) * n_kt // SPLIT) * BLOCK_K, K)
    return i_s, k_lo, k_hi


@autotune(_shrink_configs(), key=["T_BUCKET", "K", "E", "r", "BLOCK_C", "SPLIT"], smem=shrink_smem,
          regs=shrink_regs_ok)
@triton.jit(do_not_specialize=["T", "T_BUCKET", "SPLIT"])
def _shrink_gate_fwd_kernel(
    x_ptr, a_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr,
    T, K, E, r, K_TOP, scale_val, T_BUCKET,
    SPLIT,  # run-time split-K factor (PARTIAL: > 1); one binary serves every value
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak,
    stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc, stride_hs,
    PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr, PARTIAL: tl.constexpr, ALIGN: tl.constexpr,
    R_PAD: tl.constexpr, EPC: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_M), cdiv(E, EPC), SPLIT). A tile holds EPC whole experts, R_PAD (pow2 >= r)
    # columns each, so the gate of a column is one expert's gate and non-pow2 ranks only cost masked lanes.
    # PARTIAL (split-K, for grids too small to fill the GPU): split i_s sums its K range and stores the
    # fp32 partial at h_ptr + i_s * stride_hs ([T, SPLIT, ER]); _shrink_split_reduce_kernel adds the
    # partials in split order and applies the gate epilogue once (H must be complete before it is saved).
    i_m = tl.program_id(0)
    i_c = tl.program_id(1)
    K, stride_xm, stride_ae, stride_ar = _aligned(K, ALIGN), _aligned(stride_xm, ALIGN), \
        _aligned(stride_ae, ALIGN), _aligned(stride_ar, ALIGN)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < T
    o_tc = tl.arange(0, BLOCK_C)
    i_ce = i_c * EPC + o_tc // R_PAD  # [BC] expert of each tile column
    i_cj = o_tc % R_PAD  # [BC] rank index within the expert
    m_c = (i_ce < E) & (i_cj < r)
    o_k0 = tl.arange(0, BLOCK_K)
    if PARTIAL:
        i_s, k_lo, k_hi = _split_k_range(K, SPLIT, BLOCK_K)
    else:
        k_lo = 0
        k_hi = K

    o_xrow = o_m.to(tl.int64) * stride_xm
    b_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for i_k in range(k_lo, k_hi, BLOCK_K):
        o_k = i_k + o_k0
        b_x = tl.load(x_ptr + o_xrow[:, None] + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & (o_k[None, :] < K), other=0.0)  # [BM, BK]
        b_a = tl.load(a_ptr + i_ce[None, :] * stride_ae + i_cj[None, :] * stride_ar + o_k[:, None] * stride_ak,
                      mask=m_c[None, :] & (o_k[:, None] < K), other=0.0)  # [BK, BC]
        b_acc = tl.dot(b_x, b_a, b_acc, input_precision=DOT_PRECISION)

    if PARTIAL:
        p_out = o_m.to(tl.int64)[:, None] * stride_hm + (i_ce * r + i_cj)[None, :] * stride_hc + i_s * stride_hs
        tl.store(h_ptr + p_out, b_acc, mask=m_m[:, None] & m_c[None, :])
    else:
        _rank_epilogue(b_acc, ids_ptr, gate_ptr, scale_ptr, scale_val, h_ptr, hg_ptr, o_m, m_m, i_c * EPC,
                       i_ce, i_cj, m_c, E, r, K_TOP, stride_idm, stride_idk, stride_gm, stride_gk,
                       stride_hm, stride_hc, PER_EXPERT_SCALE, SAVE_H, True, BLOCK_M, EPC, R_PAD)


@triton.jit
def _rank_split_reduce_tile(
    part_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr, i_m, i_c,
    T, E, r, K_TOP, scale_val, SPLIT,
    stride_pm, stride_ps, stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc,
    PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr, SAVE_HG: tl.constexpr, R_PAD: tl.constexpr,
    EPC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """H tile = sum of the split partials ``part[t, s, c]`` in split order (deterministic: no atomics),
    then the rank epilogue (H and/or Hg stored)."""
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < T
    o_tc = tl.arange(0, BLOCK_C)
    i_ce = i_c * EPC + o_tc // R_PAD  # [BC]
    i_cj = o_tc % R_PAD
    m_c = (i_ce < E) & (i_cj < r)
    m_p = m_m[:, None] & m_c[None, :]
    p_part = part_ptr + o_m.to(tl.int64)[:, None] * stride_pm + (i_ce * r + i_cj)[None, :]  # [BM, BC]
    b_h = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for i_s in range(SPLIT):
        b_h += tl.load(p_part + i_s * stride_ps, mask=m_p, other=0.0)
    _rank_epilogue(b_h, ids_ptr, gate_ptr, scale_ptr, scale_val, h_ptr, hg_ptr, o_m, m_m, i_c * EPC,
                   i_ce, i_cj, m_c, E, r, K_TOP, stride_idm, stride_idk, stride_gm, stride_gk,
                   stride_hm, stride_hc, PER_EXPERT_SCALE, SAVE_H, SAVE_HG, BLOCK_M, EPC, R_PAD)


@triton.jit(do_not_specialize=["T", "SPLIT"])
def _shrink_split_reduce_kernel(
    part_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr,
    T, E, r, K_TOP, scale_val, SPLIT,
    stride_pm, stride_ps, stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc,
    PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr, R_PAD: tl.constexpr, EPC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_M), cdiv(E, EPC)): the shrink's rank tiles, partials [T, SPLIT, ER] fp32.
    _rank_split_reduce_tile(part_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr,
                            tl.program_id(0), tl.program_id(1), T, E, r, K_TOP, scale_val, SPLIT,
                            stride_pm, stride_ps, stride_idm, stride_idk, stride_gm, stride_gk,
                            stride_hm, stride_hc, PER_EXPERT_SCALE, SAVE_H, True, R_PAD, EPC, BLOCK_C, BLOCK_M)


# B2_RANK_MAJOR in the key: at d_in == d_out the forward and dx launches have equal sizes but not the
# same b2 layout (nor the same shared memory per config), so one must not reuse the other's tuned config
@autotune(_fused_configs(), key=["M_BUCKET", "N", "K1", "K2", "HAS_SEG1", "B2_RANK_MAJOR"], smem=fused_smem, regs=fused_regs_ok)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fused_base_lora_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2,
    r: tl.constexpr,  # rank width: a constant, so c // r and c % r are shifts (pow2) or mul-shifts
    M_BUCKET,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2c, stride_b2e, stride_b2r, stride_b2n,
    stride_om, stride_on,
    HAS_SEG1: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_K1: tl.constexpr, EVEN_K2: tl.constexpr, B2_RANK_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = a1[M, K1] @ b1[K1, N] + a2[M, K2] @ b2[K2, N] (+ bias[N]): one K loop over K1 + K2.

    b2 is a rank-column operand: row c lives at ``(c // r) * stride_b2e + (c % r) * stride_b2r``, which
    reads B_all.T straight out of lora_B [E, N, r] (forward) or A_all out of lora_A [E, r, K] (dx). r is
    a compile-time constant (one binary per rank a model uses): with a run-time r the expert/rank split
    was an integer division per element and the rank-column loads stayed scalar.

    Launch facts (constexpr, from the launcher; none depends on M, so a token sweep adds no binary):
    ``EVEN_K1`` / ``EVEN_K2``: K1 / K2 is a multiple of every BLOCK_K in the table (64), so that
    segment's loads drop the K mask. ``B2_RANK_MAJOR``: b2 is a contiguous lora_B [E, N, r]
    (``stride_b2r == 1, stride_b2n == r, stride_b2e == N * r``); the kernel then addresses it with the
    constant r, so each rank run of r elements is known to start at a multiple of r and the tile loads
    as r-wide vectors along its contiguous dimension (the rank columns), pipelined through cp.async.
    With a run-time n stride of 8 (not a multiple of 16, so the JIT records no divisibility for it)
    every element was a separate 2-byte load to registers, 64 addresses per thread at 64 x 128, which
    is what pushed 64 x 128 x 64 on 4 warps to 255 registers and spills on sm_80.
    """
    i_m, i_n = _swizzle_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    o_k0 = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_n = o_n < N
    o_row = o_m.to(tl.int64)

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_SEG1:
        # Segment 1: the base GEMM over K1 (= d_in forward, d_out for dx).
        for i_k in range(0, K1, BLOCK_K):
            o_k = i_k + o_k0
            p_a = a1_ptr + o_row[:, None] * stride_a1m + o_k[None, :] * stride_a1k
            p_b = b1_ptr + o_k[:, None] * stride_b1k + o_n[None, :] * stride_b1n
            if EVEN_K1 and 64 % BLOCK_K == 0:  # (a pinned BLOCK_K of 128 keeps the masks)
                # no K tail: the row / column masks alone (fewer predicates live per load)
                b_a = tl.load(p_a, mask=m_m[:, None], other=0.0)  # [BM, BK]
                b_b = tl.load(p_b, mask=m_n[None, :], other=0.0)  # [BK, BN]
            else:
                b_a = tl.load(p_a, mask=m_m[:, None] & (o_k[None, :] < K1), other=0.0)  # [BM, BK]
                b_b = tl.load(p_b, mask=(o_k[:, None] < K1) & m_n[None, :], other=0.0)  # [BK, BN]
            b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)
    # Segment 2: the LoRA expand over the ER rank columns, same accumulator (the "concatenated K").
    for i_c in range(0, K2, BLOCK_K):
        o_c = i_c + o_k0  # [BK] rank columns
        # K2 = E * r: masking by expert (c // r < E) keeps the mask constant over each rank run, so a
        # tail at ER = 8 or 32 does not cut the r-wide vectors back to single elements
        m_c = (o_c // r) < K2 // r
        if B2_RANK_MAJOR:
            # lora_B [E, N, r]: (expert c // r, row n) starts at a multiple of the constant r and its r
            # rank values follow contiguously, so the tile is r-wide vectors along c
            p_b2 = ((o_c // r)[:, None] * N + o_n[None, :]) * r + (o_c % r)[:, None]
        else:
            p_b2 = (o_c // r)[:, None] * stride_b2e + (o_c % r)[:, None] * stride_b2r + o_n[None, :] * stride_b2n
        p_a = a2_ptr + o_row[:, None] * stride_a2m + o_c[None, :] * stride_a2c
        if EVEN_K2 and 64 % BLOCK_K == 0:
            b_a = tl.load(p_a, mask=m_m[:, None], other=0.0)  # [BM, BK]
            b_b = tl.load(b2_ptr + p_b2, mask=m_n[None, :], other=0.0)  # [BK, BN]
        else:
            b_a = tl.load(p_a, mask=m_m[:, None] & m_c[None, :], other=0.0)  # [BM, BK]
            b_b = tl.load(b2_ptr + p_b2, mask=m_c[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BN]
        b_acc += b_bias[None, :]
    tl.store(out_ptr + o_row[:, None] * stride_om + o_n[None, :] * stride_on,
             b_acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@autotune(_decode_configs(), key=["T_BUCKET", "K", "N", "E", "r", "HAS_BASE", "SPLIT"], smem=decode_smem,
          regs=decode_regs_ok)
@triton.jit(do_not_specialize=["T", "T_BUCKET", "SPLIT"])
def _decode_fused_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr, y_ptr,
    T, K, N, E, r, K_TOP, scale_val, T_BUCKET,
    SPLIT,  # run-time split-K factor (PARTIAL: > 1); one binary serves every value
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ae, stride_ar, stride_ak, stride_be, stride_bn, stride_br,
    stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc, stride_hs, stride_ym, stride_yn, stride_ys,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr,
    SAVE_HG: tl.constexpr, PARTIAL: tl.constexpr, ALIGN: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), cdiv(T, BLOCK_M), SPLIT); BLOCK_C covers every expert, so each program owns
    # the whole shrink of its K range for its tokens and nothing round-trips through memory.
    # PARTIAL (split-K: at decode sizes cdiv(N, BLOCK_N) programs leave most SMs idle): the expand is
    # linear in H, so split i_s expands its own partial H_s and stores the fp32 partial
    # y_s = x_s W_s^T + (H_s G s) B^T at y_ptr + i_s * stride_ys ([T, SPLIT, N]), and its partial H_s at
    # h_ptr + i_s * stride_hs (SAVE_H); _decode_split_reduce_kernel adds them in split order and
    # adds the bias. The caller passes HAS_BIAS and SAVE_HG off with PARTIAL.
    i_n = tl.program_id(0)
    i_m = tl.program_id(1)
    K, stride_xm, stride_wn = _aligned(K, ALIGN), _aligned(stride_xm, ALIGN), _aligned(stride_wn, ALIGN)
    stride_ae, stride_ar = _aligned(stride_ae, ALIGN), _aligned(stride_ar, ALIGN)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    o_k0 = tl.arange(0, BLOCK_K)
    o_tc = tl.arange(0, BLOCK_C)
    m_m = o_m < T
    m_n = o_n < N
    i_ce = o_tc // R_PAD  # [BC]
    i_cj = o_tc % R_PAD
    m_c = (i_ce < E) & (i_cj < r)
    o_row = o_m.to(tl.int64)
    if PARTIAL:
        i_s, k_lo, k_hi = _split_k_range(K, SPLIT, BLOCK_K)
    else:
        k_lo = 0
        k_hi = K

    b_y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_h = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for i_k in range(k_lo, k_hi, BLOCK_K):
        o_k = i_k + o_k0
        m_k = o_k < K
        b_x = tl.load(x_ptr + o_row[:, None] * stride_xm + o_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK], shared by both dots
        if HAS_BASE:
            b_w = tl.load(w_ptr + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk,
                          mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
            b_y = tl.dot(b_x, b_w, b_y, input_precision=DOT_PRECISION)
        b_a = tl.load(a_ptr + i_ce[None, :] * stride_ae + i_cj[None, :] * stride_ar + o_k[:, None] * stride_ak,
                      mask=m_c[None, :] & m_k[:, None], other=0.0)  # [BK, BC]
        b_h = tl.dot(b_x, b_a, b_h, input_precision=DOT_PRECISION)

    b_g = _gate_scale_tile(ids_ptr, gate_ptr, scale_ptr, scale_val, o_m, m_m, 0, E, K_TOP,
                           stride_idm, stride_idk, stride_gm, stride_gk, PER_EXPERT_SCALE, BLOCK_M,
                           BLOCK_C // R_PAD, R_PAD)
    # Round Hg to the input dtype like the two-kernel path (which stores it) so both paths agree
    # (split: each partial is rounded; the saved Hg is rounded once from the summed H by the reduce).
    b_hg = (b_h * b_g).to(x_ptr.dtype.element_ty)  # [BM, BC]
    if SAVE_H or SAVE_HG:
        # Only the first N tile writes H / Hg for backward (every tile computed the same values).
        if i_n == 0:
            p_h = o_row[:, None] * stride_hm + (i_ce * r + i_cj)[None, :] * stride_hc
            if PARTIAL:
                p_h += i_s * stride_hs
            m_h = m_m[:, None] & m_c[None, :]
            if SAVE_H:
                tl.store(h_ptr + p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_h)
            if SAVE_HG:
                tl.store(hg_ptr + p_h, b_hg, mask=m_h)
    b_b = tl.load(b_ptr + i_ce[:, None] * stride_be + i_cj[:, None] * stride_br + o_n[None, :] * stride_bn,
                  mask=m_c[:, None] & m_n[None, :], other=0.0)  # [BC, BN]
    b_y = tl.dot(b_hg, b_b, b_y, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = o_row[:, None] * stride_ym + o_n[None, :] * stride_yn
    if PARTIAL:
        p_y += i_s * stride_ys
    tl.store(y_ptr + p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["T", "SPLIT"])
def _decode_split_reduce_kernel(
    part_ptr, bias_ptr, y_ptr, hpart_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr,
    T, N, E, r, K_TOP, scale_val, SPLIT,
    stride_pm, stride_ps, stride_ym, stride_yn, stride_hpm, stride_hps,
    stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc,
    HAS_BIAS: tl.constexpr, PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr, SAVE_HG: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), cdiv(T, BLOCK_M)). y = sum_s part[:, s, :] in split order (+ bias), cast
    # to y's dtype; the first N tile also sums the partial H of its tokens and stores H / Hg.
    i_n = tl.program_id(0)
    i_m = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_m = o_m < T
    m_n = o_n < N
    m_y = m_m[:, None] & m_n[None, :]
    o_row = o_m.to(tl.int64)
    p_part = part_ptr + o_row[:, None] * stride_pm + o_n[None, :]  # [BM, BN]
    b_y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i_s in range(SPLIT):
        b_y += tl.load(p_part + i_s * stride_ps, mask=m_y, other=0.0)
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + o_row[:, None] * stride_ym + o_n[None, :] * stride_yn, b_y.to(y_ptr.dtype.element_ty),
             mask=m_y)
    if SAVE_H or SAVE_HG:
        if i_n == 0:
            _rank_split_reduce_tile(hpart_ptr, ids_ptr, gate_ptr, scale_ptr, h_ptr, hg_ptr, i_m, 0,
                                    T, E, r, K_TOP, scale_val, SPLIT, stride_hpm, stride_hps,
                                    stride_idm, stride_idk, stride_gm, stride_gk, stride_hm, stride_hc,
                                    PER_EXPERT_SCALE, SAVE_H, SAVE_HG, R_PAD, BLOCK_C // R_PAD, BLOCK_C,
                                    BLOCK_M)


@autotune(_dhg_configs(), key=["T_BUCKET", "N", "E", "r", "NEED_DW", "STORE_DH"], smem=dhg_smem,
          regs=dhg_regs_ok)
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _dhg_bwd_kernel(
    dy_ptr, b_ptr, h_ptr, ids_ptr, gate_ptr, scale_ptr, dh_ptr, dg_ptr, dw_ptr,
    T, N, E, r, K_TOP, scale_val, T_BUCKET,
    stride_dym, stride_dyn, stride_be, stride_bn, stride_br, stride_hm, stride_hc,
    stride_idm, stride_idk, stride_gm, stride_gk, stride_dgm, stride_dge, stride_dwm, stride_dwk,
    PER_EXPERT_SCALE: tl.constexpr, NEED_DW: tl.constexpr, STORE_DH: tl.constexpr, R_PAD: tl.constexpr,
    EPC: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_M),). A program owns whole token rows and walks the experts in chunks of EPC,
    # so each token's gate grads are complete inside one program: no atomics, no second pass.
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < T
    o_row = o_m.to(tl.int64)
    o_n0 = tl.arange(0, BLOCK_N)
    o_tc = tl.arange(0, BLOCK_C)
    o_e0 = tl.arange(0, EPC)

    for i_e0 in range(0, E, EPC):
        i_ce = i_e0 + o_tc // R_PAD  # [BC]
        i_cj = o_tc % R_PAD
        m_c = (i_ce < E) & (i_cj < r)
        b_dhg = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for i_n in range(0, N, BLOCK_N):
            o_n = i_n + o_n0
            m_n = o_n < N
            b_dy = tl.load(dy_ptr + o_row[:, None] * stride_dym + o_n[None, :] * stride_dyn,
                           mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
            b_b = tl.load(b_ptr + i_ce[None, :] * stride_be + i_cj[None, :] * stride_br + o_n[:, None] * stride_bn,
                          mask=m_c[None, :] & m_n[:, None], other=0.0)  # [BN, BC] = B_all chunk
            b_dhg = tl.dot(b_dy, b_b, b_dhg, input_precision=DOT_PRECISION)

        o_col = i_ce * r + i_cj
        m_out = m_m[:, None] & m_c[None, :]
        if STORE_DH:
            b_g = _gate_scale_tile(ids_ptr, gate_ptr, scale_ptr, scale_val, o_m, m_m, i_e0, E, K_TOP,
                                   stride_idm, stride_idk, stride_gm, stride_gk, PER_EXPERT_SCALE, BLOCK_M, EPC, R_PAD)
            tl.store(dh_ptr + o_row[:, None] * stride_hm + o_col[None, :] * stride_hc,
                     (b_dhg * b_g).to(dh_ptr.dtype.element_ty), mask=m_out)
        if NEED_DW:
            b_h = tl.load(h_ptr + o_row[:, None] * stride_hm + o_col[None, :] * stride_hc,
                          mask=m_out, other=0.0).to(tl.float32)  # [BM, BC]
            if PER_EXPERT_SCALE:
                b_s = tl.load(scale_ptr + i_ce, mask=m_c, other=0.0)  # [BC]
                b_p = b_dhg * b_h * b_s[None, :]
            else:
                b_p = b_dhg * b_h * scale_val
            # Sum each expert's R_PAD columns (padding lanes are 0): [BM, EPC] rank-space gate grads.
            b_dg = tl.sum(tl.reshape(b_p, (BLOCK_M, EPC, R_PAD)), axis=2)
            o_e = i_e0 + o_e0
            tl.store(dg_ptr + o_row[:, None] * stride_dgm + o_e[None, :] * stride_dge, b_dg,
                     mask=m_m[:, None] & (o_e[None, :] < E))

    if NEED_DW:
        # Gather dG[t, ids[t, j]] into [T, k]. The rows were written by this program's own threads;
        # the barrier makes those global writes visible to the threads that read them back.
        tl.debug_barrier()
        for j in range(K_TOP):
            b_id = tl.load(ids_ptr + o_m * stride_idm + j * stride_idk, mask=m_m, other=0)  # [BM]
            # Out-of-range ids (only possible with SELFMOE_CHECK_IDS=0) select no expert anywhere in
            # these kernels: mask them here too, so they get a zero gradient and never read out of bounds.
            m_id = m_m & (b_id >= 0) & (b_id < E)
            b_v = tl.load(dg_ptr + o_row * stride_dgm + b_id * stride_dge, mask=m_id, other=0.0)
            tl.store(dw_ptr + o_m * stride_dwm + j * stride_dwk, b_v.to(dw_ptr.dtype.element_ty), mask=m_m)


@autotune(_tn_configs(), key=["T_BUCKET", "P", "Q"], smem=tn_smem, regs=tn_regs_ok)  # SPLIT follows from T_BUCKET, P, Q
@triton.jit(do_not_specialize=["T", "T_PER_SPLIT", "T_BUCKET", "SPLIT"])
def _matmul_tn_kernel(
    a_ptr, b_ptr, out_ptr,
    T, P, Q, QR, T_PER_SPLIT, T_BUCKET, SPLIT,
    stride_at, stride_ap, stride_bt, stride_bq,
    stride_os, stride_op, stride_oqe, stride_oqr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_P: tl.constexpr,
):
    """out[s][P, Q] = a[T_s, P].T @ b[T_s, Q] over the s-th slice of T (weight gradients).

    Output column q is written at ``(q // QR) * stride_oqe + (q % QR) * stride_oqr``, which puts dB
    straight into lora_B's [E, N, r] layout (QR = r) and is plain row-major for dA / dW (QR = Q).
    """
    i_p, i_q = _swizzle_pid(tl.program_id(0), tl.cdiv(P, BLOCK_P), tl.cdiv(Q, BLOCK_Q), GROUP_P)
    i_s = tl.program_id(1)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    o_t0 = tl.arange(0, BLOCK_T)
    m_p = o_p < P
    m_q = o_q < Q
    t_lo = i_s * T_PER_SPLIT
    t_hi = min(t_lo + T_PER_SPLIT, T)

    b_acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for i_t in range(t_lo, t_hi, BLOCK_T):
        o_t = i_t + o_t0
        m_t = o_t < t_hi
        o_row = o_t.to(tl.int64)
        b_a = tl.load(a_ptr + o_row[None, :] * stride_at + o_p[:, None] * stride_ap,
                      mask=m_p[:, None] & m_t[None, :], other=0.0)  # [BP, BT] = a.T tile
        b_b = tl.load(b_ptr + o_row[:, None] * stride_bt + o_q[None, :] * stride_bq,
                      mask=m_t[:, None] & m_q[None, :], other=0.0)  # [BT, BQ]
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)

    p_out = (i_s.to(tl.int64) * stride_os + o_p.to(tl.int64)[:, None] * stride_op
             + (o_q // QR)[None, :] * stride_oqe + (o_q % QR)[None, :] * stride_oqr)
    tl.store(out_ptr + p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_p[:, None] & m_q[None, :])
