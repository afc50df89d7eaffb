"""Grouped Triton kernels of the routed multi-LoRA linear: for large ``E*r`` with sparse top-k.

Token-slots are sorted by expert into ``BLOCK_M`` tiles that never mix experts (grouping.py), so each
tile is a dense matmul against one expert. Launchers, heuristics, the math and the launch plan are in
grouped.py. Notation: T tokens, K = d_in, N = d_out, E experts of rank r, S = T*k slots, ``CAP`` padded
rows; ``i_`` program and gathered indices, ``o_`` offsets, ``m_`` masks, ``b_`` blocks of values, ``p_``
pointers, with ``# [BM, BK]`` shape comments (the dense kernels follow the same style).

Config tables go through ``tuning.autotune`` (pin, interpreter, no tuning during graph capture); the
shrink and outer-product kernels also drop configs whose software pipeline would not fit in the
device's shared memory. The split factors are run-time arguments: a sweep of token counts compiles
one binary per config for them, not one per split value.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tuning import async_tile, autotune, fma_regs_ok, only_for, tile_buffers

# ----------------------------------------------------------------------------------------------------
# Config tables (first entry = default; ``select_configs`` applies the pin and interpreter policy)
# ----------------------------------------------------------------------------------------------------


def _shrink_configs():
    return [
        triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 64}, num_warps=2, num_stages=5),
        # fp32 (FMA dots, K = BLOCK_K): the half tables spill at 4-byte inputs (``shrink_regs_ok``)
        only_for(triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3), 4),
        only_for(triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=4), 4),
    ]


def _expand_configs():
    return [
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        # fp32 (FMA dots, K = the rank tile, up to 128): narrow output tiles on 8 warps
        only_for(triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2), 4),
        only_for(triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2), 4),
        only_for(triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=2), 4),
    ]


def _outer_configs():
    return [
        triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 256}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=4),
        # fp32 (FMA dots, K = BLOCK_M up to 64, M = the rank tile up to 128)
        only_for(triton.Config({"BLOCK_D": 64}, num_warps=8, num_stages=3), 4),
        only_for(triton.Config({"BLOCK_D": 32}, num_warps=8, num_stages=3), 4),
    ]


# ----------------------------------------------------------------------------------------------------
# Shared-memory estimates (bytes) for the autotune pruning (``tuning.autotune``): Triton's software
# pipeliner keeps ``tuning.pipeline_buffers`` copies of every tile a loop loads for a dot (num_stages
# with wgmma, not num_stages - 1 as this estimate assumed before: the compiled kernels show it).
# ``p``: the launch's constexprs and the config; ``e``: bytes per element of the first pointer
# argument. Checked against the compiled kernels by compile_check.py.
# ----------------------------------------------------------------------------------------------------


def shrink_smem(p, e):
    """x tile [BM, BK] and weight tile [BK, BR] per stage; a tile whose loads cannot be vectorised
    (``tuning.async_tile``: dh's weight B viewed as [E, r, N] is contiguous along r, masked by a run-time
    r, so r = 8 loads 2 bytes at a time) is staged once instead."""
    x = async_tile(e, (p["stride_xt"], p["stride_xk"]), (1, p["K"]))
    w = async_tile(e, (p["stride_wk"], p["stride_wr"]), (p["K"], p["r"])) and (e >= 4 or p["stride_we"] % 16 == 0)
    return (tile_buffers(p, e, p["BLOCK_M"], x) * p["BLOCK_M"] * p["BLOCK_K"]
            + tile_buffers(p, e, p["BLOCK_M"], w) * p["BLOCK_K"] * p["BLOCK_R"]) * e


def outer_smem(p, e):
    """The wide tile [BM, BD] (rows gathered by token: double-buffered only when the dot is a wgmma,
    M = BR >= 64), the rank tile [BR, BM] in fp32 and as the dot operand, and 8 bytes of row indices
    per row (fitted to the compiled kernels; e: the wide operand's bytes)."""
    wide = 2 if (p["capability"] >= 90 and e == 2 and p["BLOCK_R"] >= 64 and p["num_warps"] % 4 == 0) else 1
    return wide * p["BLOCK_M"] * p["BLOCK_D"] * e + p["BLOCK_M"] * p["BLOCK_R"] * (4 + e) + 8 * p["BLOCK_M"]


def shrink_regs_ok(p):
    # the [BM, BR] fp32 accumulator: at most 64 values per thread (2 warps spilled at r = 128)
    return (p["BLOCK_M"] * p["BLOCK_R"] <= 64 * 32 * p["num_warps"]
            and fma_regs_ok(p, p["BLOCK_M"], p["BLOCK_R"], p["BLOCK_K"]))


def expand_regs_ok(p):
    # the summed [BM, BR] fp32 rank rows stay live next to the [BM, BN] accumulator: at most 32 values per
    # thread (every 4-warp config spilled at r = 128), and both together at most 80 (BLOCK_N = 256 with 4 warps
    # spilled at r = 64, with 8 warps at r = 128 on sm_80)
    return (p["BLOCK_M"] * p["BLOCK_R"] <= 32 * 32 * p["num_warps"]
            and p["BLOCK_M"] * (p["BLOCK_R"] + p["BLOCK_N"]) <= 80 * 32 * p["num_warps"]
            # fp32: K is the rank tile (up to 128); 64 x 32 x 128 on 8 warps (1024 per thread) spilled on sm_80
            and fma_regs_ok(p, p["BLOCK_M"], p["BLOCK_N"], p["BLOCK_R"], budget=512, max_k=None))


def outer_regs_ok(p):
    # the [BR, BD] fp32 accumulator: at most 64 values per thread (r = 128 spilled past it on sm_80),
    # and on mma.sync (sm_80) no 256-wide gathered tile (BLOCK_D = 256 on 8 warps spilled 8 B at r = 64)
    return (p["BLOCK_R"] * p["BLOCK_D"] <= 64 * 32 * p["num_warps"]
            and (p["capability"] >= 90 or p["BLOCK_D"] <= 128)
            and fma_regs_ok(p, p["BLOCK_R"], p["BLOCK_D"], p["BLOCK_M"]))


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(sorted_slots_ptr, row0, BLOCK_M: tl.constexpr):
    """Rows ``row0 + [0, BLOCK_M)`` of the padded sorted order as ``(o_m, i_slot, m_m)``; padding rows are
    masked out and point at slot 0 (never a negative offset)."""
    o_m = row0 + tl.arange(0, BLOCK_M)  # [BM]
    i_slot = tl.load(sorted_slots_ptr + o_m)  # [BM]
    m_m = i_slot >= 0
    i_slot = tl.where(m_m, i_slot, 0)
    return o_m, i_slot, m_m


@triton.jit
def _tile_prologue(sorted_slots_ptr, i_m, r, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The prologue of a kernel that owns tile ``i_m`` (after its unused-tile exit): the tile's rows
    ``(o_m, i_slot, m_m)`` and its rank lanes ``(o_r, m_r)``."""
    o_m, i_slot, m_m = _tile_rows(sorted_slots_ptr, i_m * BLOCK_M, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R)  # [BR]
    m_r = o_r < r
    return o_m, i_slot, m_m, o_r, m_r


@triton.jit
def _gate_grad_epilogue(
    b_dh,  # [BM, BR] fp32 finished dh rows of one tile
    h_ptr, dw_ptr, scale_ptr, scale_val, i_e, o_m, o_r, i_slot, m_m, m_r, r,
    PER_EXPERT_SCALE: tl.constexpr,
):
    # dw[s] = scaling[e] * <dh[s], h[s]>: the gate gradient in rank space (never a [T, k, N] tensor)
    b_h = tl.load(h_ptr + o_m[:, None] * r + o_r[None, :], mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
    if PER_EXPERT_SCALE:
        b_scale = tl.load(scale_ptr + i_e).to(tl.float32)
    else:
        b_scale = scale_val
    b_dw = tl.sum(b_dh * b_h, axis=1) * b_scale  # [BM]
    tl.store(dw_ptr + i_slot, b_dw.to(dw_ptr.dtype.element_ty), mask=m_m)


@autotune(_shrink_configs(), key=["K", "r", "T_BUCKET", "SPLIT", "BLOCK_M"], smem=shrink_smem,
          regs=shrink_regs_ok)
@triton.jit(do_not_specialize=["T_BUCKET"])
def _grouped_shrink_kernel(
    x_ptr,  # [T, K] rows gathered by token (x in forward, dy in backward)
    w_ptr,  # [E, r, K] through strides (A in forward, B viewed as [E, r, N] in backward)
    out_ptr,  # [SPLIT, CAP, r] fp32: partial sums per K split (SPLIT == 1: the finished result)
    sorted_slots_ptr,  # [CAP] int32 slot per padded row, -1 = padding
    block_expert_ptr,  # [NUM_BLOCKS] int32 expert per tile, -1 = unused tile
    h_ptr,  # [CAP, r] fp32 forward h (DW_EPILOGUE only)
    dw_ptr,  # [S] gate grads out (DW_EPILOGUE only)
    scale_ptr,  # [E] per-expert scaling (PER_EXPERT_SCALE only)
    scale_val,  # scalar scaling otherwise
    K, r, TOPK, CAP,
    T_BUCKET,  # autotune key only
    stride_xt, stride_xk,
    stride_we, stride_wr, stride_wk,
    SPLIT,  # run-time: split-K factor (1 is specialised by Triton; others share one binary)
    DW_EPILOGUE: tl.constexpr, PER_EXPERT_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[i_s, p, :] = x[tok(p)] @ W[e(p)][:, K range of split i_s].T for the BLOCK_M rows p of one tile.
    # Split-K gives decode (a handful of tiles) enough programs to stream K = 4096 weights in parallel;
    # each split writes its own slice, so the sum over splits is done later in a fixed order.
    i_m, i_s = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e < 0:
        return
    o_m, i_slot, m_m, o_r, m_r = _tile_prologue(sorted_slots_ptr, i_m, r, BLOCK_M, BLOCK_R)
    i_tok = (i_slot // TOPK).to(tl.int64)

    n_kt = tl.cdiv(K, BLOCK_K)
    kt_per_split = tl.cdiv(n_kt, SPLIT)
    kt_lo = i_s * kt_per_split
    kt_hi = tl.minimum(kt_lo + kt_per_split, n_kt)

    p_x = x_ptr + i_tok[:, None] * stride_xt  # [BM, 1]
    p_w = w_ptr + i_e.to(tl.int64) * stride_we + o_r[None, :] * stride_wr  # [1, BR]
    b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for i_kt in range(kt_lo, kt_hi):
        o_k = i_kt * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(p_x + o_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_w = tl.load(p_w + o_k[:, None] * stride_wk, mask=m_k[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
        b_acc = tl.dot(b_x, b_w, b_acc, input_precision=DOT_PRECISION)
    # all BLOCK_M rows are stored (padding rows hold 0): the tile is fully defined for its readers
    p_out = out_ptr + i_s.to(tl.int64) * CAP * r + o_m[:, None] * r + o_r[None, :]
    tl.store(p_out, b_acc, mask=m_r[None, :])
    if DW_EPILOGUE:
        _gate_grad_epilogue(b_acc, h_ptr, dw_ptr, scale_ptr, scale_val, i_e, o_m, o_r, i_slot, m_m, m_r, r,
                            PER_EXPERT_SCALE)


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # [SPLIT, CAP, r] fp32 partial sums from _grouped_shrink_kernel
    out_ptr,  # [CAP, r] fp32
    sorted_slots_ptr, block_expert_ptr,
    h_ptr, dw_ptr, scale_ptr, scale_val,  # gate grad epilogue (DW_EPILOGUE only)
    r, CAP, SPLIT,
    DW_EPILOGUE: tl.constexpr, PER_EXPERT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # fixed-order sum of the split-K partials of one tile (deterministic, unlike atomics)
    i_m = tl.program_id(0)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e < 0:
        return
    o_m, i_slot, m_m, o_r, m_r = _tile_prologue(sorted_slots_ptr, i_m, r, BLOCK_M, BLOCK_R)
    o_tile = o_m[:, None] * r + o_r[None, :]  # [BM, BR]
    b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for i_s in range(SPLIT):
        b_acc += tl.load(part_ptr + i_s * CAP * r + o_tile, mask=m_r[None, :], other=0.0)
    tl.store(out_ptr + o_tile, b_acc, mask=m_r[None, :])
    if DW_EPILOGUE:
        _gate_grad_epilogue(b_acc, h_ptr, dw_ptr, scale_ptr, scale_val, i_e, o_m, o_r, i_slot, m_m, m_r, r,
                            PER_EXPERT_SCALE)


@autotune(
    _expand_configs(),
    key=["N", "r", "T_BUCKET", "SPLIT", "ACCUMULATE", "BLOCK_M"],
    # ACCUMULATE adds into out: benchmarking several configs must start from the same out each time
    restore_value=["out_ptr"],
    regs=expand_regs_ok,
    elem_arg="w_ptr",  # the first pointer, h, is fp32 whatever the inputs: the weights' dtype sizes the dot
)
@triton.jit(do_not_specialize=["T_BUCKET"])
def _grouped_expand_kernel(
    h_ptr,  # [SPLIT, CAP, r] fp32 rank-space rows (split partials, summed here in split order)
    w_ptr,  # [E, N, r] through strides (B in forward, A viewed as [E, K, r] in backward)
    out_ptr,  # [S, N] rows indexed by slot (k == 1: y itself, slot == token)
    h_out_ptr,  # [CAP, r] fp32: the summed h, stored when STORE_H (saved for backward)
    gate_ptr,  # [S] gate of each slot (expert_weights flattened)
    scale_ptr,  # [E] per-expert scaling (PER_EXPERT_SCALE only)
    sorted_slots_ptr, block_expert_ptr,
    scale_val, N, r, CAP,
    T_BUCKET,  # autotune key only
    stride_we, stride_wn, stride_wr,
    stride_ot, stride_on,
    SPLIT,
    STORE_H: tl.constexpr, ACCUMULATE: tl.constexpr, PER_EXPERT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # out[slot(p), n] (+)= g(p) * (h[p] @ W[e].T)[n] for one tile of BLOCK_M rows and BLOCK_N columns.
    # The rank dimension is tiny (r <= BLOCK_R), so one tl.dot per tile; the work is writing
    # BLOCK_M x BLOCK_N outputs, hence large BLOCK_N. g is applied to the fp32 accumulator (epilogue),
    # not to h before rounding it to the input dtype.
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e < 0:
        return
    o_m, i_slot, m_m, o_r, m_r = _tile_prologue(sorted_slots_ptr, i_m, r, BLOCK_M, BLOCK_R)

    o_tile = o_m[:, None] * r + o_r[None, :]  # [BM, BR]
    m_tile = m_m[:, None] & m_r[None, :]
    b_h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for i_s in range(SPLIT):
        b_h += tl.load(h_ptr + i_s * CAP * r + o_tile, mask=m_tile, other=0.0)
    if STORE_H:
        if i_n == 0:
            tl.store(h_out_ptr + o_tile, b_h, mask=m_r[None, :])

    b_g = tl.load(gate_ptr + i_slot, mask=m_m, other=0.0).to(tl.float32)  # [BM]
    if PER_EXPERT_SCALE:
        b_g = b_g * tl.load(scale_ptr + i_e).to(tl.float32)
    else:
        b_g = b_g * scale_val

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_w = w_ptr + i_e.to(tl.int64) * stride_we + o_r[:, None] * stride_wr + o_n[None, :] * stride_wn
    b_w = tl.load(p_w, mask=m_r[:, None] & m_n[None, :], other=0.0)  # [BR, BN]
    b_acc = tl.dot(b_h.to(b_w.dtype), b_w, input_precision=DOT_PRECISION)  # [BM, BN]
    b_acc = b_acc * b_g[:, None]

    p_o = out_ptr + i_slot.to(tl.int64)[:, None] * stride_ot + o_n[None, :] * stride_on
    m_o = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        # k == 1 with a base: this slot is the token's only one, so this program is the row's only writer
        b_acc += tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)
    tl.store(p_o, b_acc.to(out_ptr.dtype.element_ty), mask=m_o)


@triton.jit
def _combine_slots_kernel(
    ys_ptr,  # [T*k, N] per-slot outputs
    y_ptr,  # [T, N] out (holds the base result when HAS_BASE)
    N, TOPK,
    HAS_BASE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # y[t] (+)= ys[t*k + 0] + ys[t*k + 1] + ... in j order, in fp32, rounded once
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_y = y_ptr + i_t.to(tl.int64) * N + o_n
    if HAS_BASE:
        b_acc = tl.load(p_y, mask=m_n, other=0.0).to(tl.float32)
    else:
        b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    p_ys = ys_ptr + i_t.to(tl.int64) * TOPK * N + o_n
    for i_j in range(0, TOPK):
        b_acc += tl.load(p_ys + i_j * N, mask=m_n, other=0.0).to(tl.float32)
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_n)


@autotune(_outer_configs(), key=["D", "r", "T_BUCKET", "SPLIT", "BLOCK_M"], smem=outer_smem, elem_arg="wide_ptr",
          regs=outer_regs_ok)
@triton.jit(do_not_specialize=["T_BUCKET"])
def _grouped_outer_kernel(
    lr_ptr,  # [CAP, r] fp32 rank-space rows in padded sorted order (dh for dA, h for dB)
    wide_ptr,  # [T, D] rows gathered by token (x for dA, dy for dB)
    out_ptr,  # [SPLIT, E, r, D] through strides (dB is stored transposed, as [E, N, r])
    gate_ptr,  # [S] gates
    scale_ptr, sorted_slots_ptr,
    padded_offsets_ptr,  # [E+1]
    scale_val, D, r, TOPK,
    T_BUCKET,  # autotune key only
    stride_wt, stride_wd,
    stride_os, stride_oe, stride_or, stride_od,
    SPLIT,
    PER_EXPERT_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[i_s, e, :, d range] = sum over the tiles of expert e in chunk i_s of (g * lr)^T @ wide[tok].
    # One program walks its expert's tiles in order and owns its output tile: no atomics, and an
    # expert without tokens still writes its zeros. SPLIT > 1 cuts the expert's tiles into SPLIT
    # contiguous chunks (partials summed in chunk order later) when E * D-tiles alone is too few programs.
    i_e, i_d, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row_lo = tl.load(padded_offsets_ptr + i_e)
    row_hi = tl.load(padded_offsets_ptr + i_e + 1)
    n_tiles = (row_hi - row_lo) // BLOCK_M
    tiles_per_split = tl.cdiv(n_tiles, SPLIT)
    t_lo = i_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    if PER_EXPERT_SCALE:
        b_scale = tl.load(scale_ptr + i_e).to(tl.float32)
    else:
        b_scale = scale_val

    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < r
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i_t in range(t_lo, t_hi):
        o_m, i_slot, m_m = _tile_rows(sorted_slots_ptr, row_lo + i_t * BLOCK_M, BLOCK_M)
        i_tok = (i_slot // TOPK).to(tl.int64)
        b_g = tl.load(gate_ptr + i_slot, mask=m_m, other=0.0).to(tl.float32) * b_scale  # [BM]
        # rank rows loaded already transposed: [BR, BM]
        b_lr = tl.load(lr_ptr + o_m[None, :] * r + o_r[:, None], mask=m_r[:, None] & m_m[None, :], other=0.0)
        b_wide = tl.load(wide_ptr + i_tok[:, None] * stride_wt + o_d[None, :] * stride_wd,
                         mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_lr = (b_lr * b_g[None, :]).to(b_wide.dtype)
        b_acc = tl.dot(b_lr, b_wide, b_acc, input_precision=DOT_PRECISION)  # [BR, BD]
    p_out = (out_ptr + i_s.to(tl.int64) * stride_os + i_e.to(tl.int64) * stride_oe
             + o_r[:, None] * stride_or + o_d[None, :] * stride_od)
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLIT, BLOCK: tl.constexpr):
    # out[i] = part[0, i] + part[1, i] + ... in split order
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < numel
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i_s in range(SPLIT):
        b_acc += tl.load(part_ptr + i_s * numel + o, mask=m, other=0.0)
    tl.store(out_ptr + o, b_acc.to(out_ptr.dtype.element_ty), mask=m)
