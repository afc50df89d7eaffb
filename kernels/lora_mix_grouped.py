"""Grouped Triton path of the routed multi-LoRA linear: for large ``E*r`` with sparse top-k.

Token-slots (``s = t*k + j``) are sorted by expert into ``BLOCK_M`` tiles that never mix experts
(``routing.py``), so each tile is a dense matmul against one expert; only the ``k`` chosen experts of
a token are ever read. Notation: T tokens, K = d_in, N = d_out, E experts, rank R, top-k, S = T*k slots,
``e(s)`` the expert of slot s, ``tok(s) = s // k``, ``g(s) = w[s] * scaling[e(s)]`` (gate times scaling),
rows of ``h``/``dh`` live in the padded sorted order (``capacity`` rows, padding rows masked).

Forward::

    h[s]       = x[tok(s)] @ A[e(s)].T                 grouped shrink, split-K over K   [S, R]  (fp32)
    ys[s]      = g(s) * h[s] @ B[e(s)].T               grouped expand, g in the epilogue [S, N]
    y[t]       = x[t] @ W.T + b + sum_j ys[t*k + j]    base by cuBLAS, slots summed in a fixed order

Backward (each piece only when an input asks for it)::

    dh[s]      = dy[tok(s)] @ B[e(s)]                  grouped shrink, split-K over N    [S, R]
    dw[s]      = scaling[e(s)] * <dh[s], h[s]>         epilogue of the dh reduction (rank space)
    dx[t]      = dy[t] @ W + sum_j g(s) dh[s] @ A[e(s)]  grouped expand + fixed-order slot sum
    dA[e]      = sum_{s in e} (g(s) dh[s])^T x[tok(s)]   grouped outer product, loop over e's tiles
    dB[e]      = sum_{s in e} dy[tok(s)]^T (g(s) h[s])   same kernel, transposed store
    dW, db     = dy^T x, sum_t dy                        cuBLAS / torch

Determinism: no float atomics anywhere. Split-K partial sums go to ``[SPLIT, capacity, R]`` buffers and
are added in split order; a token's k slots are added in j order; expert weight grads loop over the
expert's tiles in order (optionally in SPLIT_M chunks added in chunk order). The only integer counting
(routing) is exact. Same inputs and same autotuned configs give bit-identical outputs and gradients.

Why the base GEMM is not fused here: it is ``T*K*N`` FLOPs against ``T*k*R*(K+N)`` for the LoRA part
(R=16, k=2: ~1.5%); cuBLAS runs it at the machine's peak, and a fused Triton GEMM would have to match
that (TMA/wgmma pipelines) to pay. ``torch.addmm`` writes ``y``, and the slot contributions are added
into it by the combine pass that has to run anyway (or, for k=1, by the expand epilogue in place).

Why slot outputs go through a ``[S, N]`` buffer for k > 1: two slots of one token live in different
expert tiles (different programs); adding them straight into ``y`` would need float atomics, whose
order varies run to run. Determinism costs one write and one read of ``S*N`` elements in x's dtype
(the combine pass also folds in the base result, so y itself is written once more, not twice). For
k = 1 a token has one slot, so the expand adds into y directly and there is no buffer or combine.

Launches, forward: routing 2 (3 when S needs more than 32 slot blocks), shrink 1 (split-K partials are
summed inside the expand), expand 1, combine 1 (k > 1), addmm 1 (with a base). Backward adds, per
requested group: dh shrink 1 (+1 split reduction with the gate-grad epilogue), dx expand 1 + combine 1
(k > 1) + mm 1 (base), dA 1 and dB 1 (+1 each when split over tiles).

Sync-free: launch sizes come from shapes (``capacity`` upper bounds); unused tiles exit on device.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .routing import RoutingMeta, poisoned_empty, routing_metadata
from .tuning import pinned_config, select_configs, token_bucket

Scaling = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Autotune pruning: drop configs whose pipelined tiles do not fit in shared memory
# ----------------------------------------------------------------------------------------------------

_MAX_SMEM = {}


def _max_smem(device: torch.device) -> int:
    """Opt-in shared memory per block of the device (Triton's driver query; 99 KiB if it fails)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MAX_SMEM:
        try:
            _MAX_SMEM[idx] = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception:  # pragma: no cover - driver without the query
            _MAX_SMEM[idx] = 99 * 1024
    return _MAX_SMEM[idx]


def shrink_smem_estimate(block_m: int, block_k: int, block_r: int, num_stages: int, elem_bytes: int) -> int:
    """Bytes of shared memory the shrink's software pipeline holds: (stages - 1) buffered copies of the
    x tile [BM, BK] and the weight tile [BK, BR] (matches what Triton 3.x allocates on sm_90)."""
    return max(1, num_stages - 1) * (block_m * block_k + block_k * block_r) * elem_bytes


def outer_smem_estimate(block_m: int, block_d: int, block_r: int, num_stages: int, elem_bytes: int) -> int:
    """Upper bound for the dA/dB kernel: buffered fp32 rank tile [BR, BM] and wide tile [BM, BD]."""
    return max(1, num_stages - 1) * (block_r * block_m * 4 + block_m * block_d * elem_bytes)


def _prune_shrink(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    limit = _max_smem(x.device)
    est = [(shrink_smem_estimate(kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], kwargs["BLOCK_R"], c.num_stages,
                                 x.element_size()), i) for i, c in enumerate(configs)]
    keep = [configs[i] for e, i in est if e <= limit]
    return keep or [configs[min(est)[1]]]  # nothing fits: the smallest, so the launch error names it


def _prune_outer(configs, named_args, **kwargs):
    wide = named_args["wide_ptr"]
    limit = _max_smem(wide.device)
    est = [(outer_smem_estimate(kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], kwargs["BLOCK_R"], c.num_stages,
                                wide.element_size()), i) for i, c in enumerate(configs)]
    keep = [configs[i] for e, i in est if e <= limit]
    return keep or [configs[min(est)[1]]]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gate_grad_epilogue(
    b_dh,  # [BM, BR] fp32 finished dh rows of one tile
    h_ptr, dw_ptr, scale_ptr, scale_val, i_e, o_m, o_r, i_slot, m_m, m_r, R,
    PER_EXPERT_SCALE: tl.constexpr,
):
    # dw[s] = scaling[e] * <dh[s], h[s]>: the gate gradient in rank space (never a [T, k, N] tensor)
    b_h = tl.load(h_ptr + o_m[:, None] * R + o_r[None, :], mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
    if PER_EXPERT_SCALE:
        b_scale = tl.load(scale_ptr + i_e).to(tl.float32)
    else:
        b_scale = scale_val
    b_dw = tl.sum(b_dh * b_h, axis=1) * b_scale  # [BM]
    tl.store(dw_ptr + i_slot, b_dw.to(dw_ptr.dtype.element_ty), mask=m_m)


def _shrink_configs():
    return [
        triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 64}, num_warps=2, num_stages=5),
    ]


@triton.autotune(
    configs=select_configs(_shrink_configs()),
    key=["K", "R", "T_BUCKET", "SPLIT", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune_shrink},
)
@triton.jit(do_not_specialize=["T_BUCKET"])
def _grouped_shrink_kernel(
    x_ptr,  # [T, K] rows gathered by token (x in forward, dy in backward)
    w_ptr,  # [E, R, K] through strides (A in forward, B viewed as [E, R, N] in backward)
    out_ptr,  # [SPLIT, CAP, R] fp32: partial sums per K split (SPLIT == 1: the finished result)
    sorted_slots_ptr,  # [CAP] int32 slot per padded row, -1 = padding
    block_expert_ptr,  # [NUM_BLOCKS] int32 expert per tile, -1 = unused tile
    h_ptr,  # [CAP, R] fp32 forward h (DW_EPILOGUE only)
    dw_ptr,  # [S] gate grads out (DW_EPILOGUE only)
    scale_ptr,  # [E] per-expert scaling (PER_EXPERT_SCALE only)
    scale_val,  # scalar scaling otherwise
    K,
    R,
    TOPK,
    CAP,
    T_BUCKET,  # autotune key only
    stride_xt, stride_xk,
    stride_we, stride_wr, stride_wk,
    SPLIT: tl.constexpr,
    DW_EPILOGUE: tl.constexpr,
    PER_EXPERT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[i_s, p, :] = x[tok(p)] @ W[e(p)][:, K range of split i_s].T for the BLOCK_M rows p of one tile.
    # Split-K gives decode (a handful of tiles) enough programs to stream K = 4096 weights in parallel;
    # each split writes its own slice, so the sum over splits is done later in a fixed order.
    i_m, i_s = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_slot = tl.load(sorted_slots_ptr + o_m)  # [BM]
    m_m = i_slot >= 0
    i_slot = tl.where(m_m, i_slot, 0)  # padding rows read token 0 under a mask (never negative offsets)
    i_tok = (i_slot // TOPK).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R

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
    p_out = out_ptr + i_s.to(tl.int64) * CAP * R + o_m[:, None] * R + o_r[None, :]
    tl.store(p_out, b_acc, mask=m_r[None, :])
    if DW_EPILOGUE:
        _gate_grad_epilogue(b_acc, h_ptr, dw_ptr, scale_ptr, scale_val, i_e, o_m, o_r, i_slot, m_m, m_r, R,
                            PER_EXPERT_SCALE)


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # [SPLIT, CAP, R] fp32 partial sums from _grouped_shrink_kernel
    out_ptr,  # [CAP, R] fp32
    sorted_slots_ptr,
    block_expert_ptr,
    h_ptr, dw_ptr, scale_ptr, scale_val,  # gate grad epilogue (DW_EPILOGUE only)
    R,
    CAP,
    SPLIT: tl.constexpr,
    DW_EPILOGUE: tl.constexpr,
    PER_EXPERT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # fixed-order sum of the split-K partials of one tile (deterministic, unlike atomics)
    i_m = tl.program_id(0)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_slot = tl.load(sorted_slots_ptr + o_m)
    m_m = i_slot >= 0
    i_slot = tl.where(m_m, i_slot, 0)
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    o_tile = o_m[:, None] * R + o_r[None, :]  # [BM, BR]
    b_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for i_s in tl.static_range(SPLIT):
        b_acc += tl.load(part_ptr + i_s * CAP * R + o_tile, mask=m_r[None, :], other=0.0)
    tl.store(out_ptr + o_tile, b_acc, mask=m_r[None, :])
    if DW_EPILOGUE:
        _gate_grad_epilogue(b_acc, h_ptr, dw_ptr, scale_ptr, scale_val, i_e, o_m, o_r, i_slot, m_m, m_r, R,
                            PER_EXPERT_SCALE)


def _expand_configs():
    return [
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


@triton.autotune(
    configs=select_configs(_expand_configs()),
    key=["N", "R", "T_BUCKET", "SPLIT", "ACCUMULATE", "BLOCK_M"],
    # ACCUMULATE adds into out: benchmarking several configs must start from the same out each time
    restore_value=["out_ptr"],
)
@triton.jit(do_not_specialize=["T_BUCKET"])
def _grouped_expand_kernel(
    h_ptr,  # [SPLIT, CAP, R] fp32 rank-space rows (split partials, summed here in split order)
    w_ptr,  # [E, N, R] through strides (B in forward, A viewed as [E, K, R] in backward)
    out_ptr,  # [S, N] rows indexed by slot (k == 1: y itself, slot == token)
    h_out_ptr,  # [CAP, R] fp32: the summed h, stored when STORE_H (saved for backward)
    gate_ptr,  # [S] gate of each slot (expert_weights flattened)
    scale_ptr,  # [E] per-expert scaling (PER_EXPERT_SCALE only)
    sorted_slots_ptr,
    block_expert_ptr,
    scale_val,
    N,
    R,
    CAP,
    T_BUCKET,  # autotune key only
    stride_we, stride_wn, stride_wr,
    stride_ot, stride_on,
    SPLIT: tl.constexpr,
    STORE_H: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PER_EXPERT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out[slot(p), n] (+)= g(p) * (h[p] @ W[e].T)[n] for one tile of BLOCK_M rows and BLOCK_N columns.
    # The rank dimension is tiny (R <= BLOCK_R), so one tl.dot per tile; the work is writing
    # BLOCK_M x BLOCK_N outputs, hence large BLOCK_N. g is applied to the fp32 accumulator (epilogue),
    # not to h before rounding it to the input dtype.
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(block_expert_ptr + i_m)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_slot = tl.load(sorted_slots_ptr + o_m)  # [BM]
    m_m = i_slot >= 0
    i_slot = tl.where(m_m, i_slot, 0)
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R

    o_tile = o_m[:, None] * R + o_r[None, :]  # [BM, BR]
    m_tile = m_m[:, None] & m_r[None, :]
    b_h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for i_s in tl.static_range(SPLIT):
        b_h += tl.load(h_ptr + i_s * CAP * R + o_tile, mask=m_tile, other=0.0)
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
    N,
    TOPK,
    HAS_BASE: tl.constexpr,
    BLOCK_N: tl.constexpr,
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


def _outer_configs():
    return [
        triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 256}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=4),
    ]


@triton.autotune(
    configs=select_configs(_outer_configs()),
    key=["D", "R", "T_BUCKET", "SPLIT", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _prune_outer},
)
@triton.jit(do_not_specialize=["T_BUCKET"])
def _grouped_outer_kernel(
    lr_ptr,  # [CAP, R] fp32 rank-space rows in padded sorted order (dh for dA, h for dB)
    wide_ptr,  # [T, D] rows gathered by token (x for dA, dy for dB)
    out_ptr,  # [SPLIT, E, R, D] through strides (dB is stored transposed, as [E, N, R])
    gate_ptr,  # [S] gates
    scale_ptr,
    sorted_slots_ptr,
    padded_offsets_ptr,  # [E+1]
    scale_val,
    D,
    R,
    TOPK,
    T_BUCKET,  # autotune key only
    stride_wt, stride_wd,
    stride_os, stride_oe, stride_or, stride_od,
    SPLIT: tl.constexpr,
    PER_EXPERT_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    m_r = o_r < R
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i_t in range(t_lo, t_hi):
        o_m = row_lo + i_t * BLOCK_M + tl.arange(0, BLOCK_M)
        i_slot = tl.load(sorted_slots_ptr + o_m)  # [BM]
        m_m = i_slot >= 0
        i_slot = tl.where(m_m, i_slot, 0)
        i_tok = (i_slot // TOPK).to(tl.int64)
        b_g = tl.load(gate_ptr + i_slot, mask=m_m, other=0.0).to(tl.float32) * b_scale  # [BM]
        # rank rows loaded already transposed: [BR, BM]
        b_lr = tl.load(lr_ptr + o_m[None, :] * R + o_r[:, None], mask=m_r[:, None] & m_m[None, :], other=0.0)
        b_wide = tl.load(wide_ptr + i_tok[:, None] * stride_wt + o_d[None, :] * stride_wd,
                         mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_lr = (b_lr * b_g[None, :]).to(b_wide.dtype)
        b_acc = tl.dot(b_lr, b_wide, b_acc, input_precision=DOT_PRECISION)  # [BR, BD]
    p_out = (out_ptr + i_s.to(tl.int64) * stride_os + i_e.to(tl.int64) * stride_oe
             + o_r[:, None] * stride_or + o_d[None, :] * stride_od)
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    # out[i] = part[0, i] + part[1, i] + ... in split order
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < numel
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i_s in tl.static_range(SPLIT):
        b_acc += tl.load(part_ptr + i_s * numel + o, mask=m, other=0.0)
    tl.store(out_ptr + o, b_acc.to(out_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------------

_SM_COUNT = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: only sets how eagerly the split heuristics split
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _block_m(num_slots: int, num_experts: int) -> int:
    """Tile height for the grouped kernels (one per call: the routing metadata is built for it).

    Mean slots per used expert decides: a tile taller than an expert's run is mostly padding, a short
    tile re-reads the expert's weights more often. ``SELFMOE_TRITON_CONFIG`` may pin BLOCK_M (16..128).
    """
    pin = pinned_config()
    if pin is not None and "BLOCK_M" in pin:
        bm = int(pin["BLOCK_M"])
        if bm < 16 or bm > 128 or bm & (bm - 1):
            raise ValueError(f"SELFMOE_TRITON_CONFIG BLOCK_M must be a power of two in [16, 128], got {bm}")
        return bm
    mean = num_slots / max(1, min(num_experts, num_slots))
    for bm in (16, 32):
        if mean <= bm:
            return bm
    return 64


def _est_tiles(meta: RoutingMeta) -> int:
    """Upper bound on tiles with work, known without a sync (used tiles <= S/BM + used experts)."""
    S, E, BM = meta.num_slots, meta.num_experts, meta.block_m
    return min(meta.num_blocks, triton.cdiv(S, BM) + min(E, S))


def _choose_split(reduce_dim: int, tiles: int, device: torch.device) -> int:
    """Split-K factor for a grouped shrink: enough programs to fill the GPU twice over, each split
    still streaming at least 256 elements of the reduced dimension, at most 16 (the partial buffer)."""
    want = triton.cdiv(2 * _num_sms(device), max(1, tiles))
    return int(max(1, min(want, reduce_dim // 256, 16)))


def _choose_outer_split(num_experts: int, width: int, meta: RoutingMeta, device: torch.device) -> int:
    """Chunks per expert for dA/dB: only when E * (D / 128) programs cannot fill the GPU, and only as
    many as the mean expert has tiles of work for (partial buffers are [SPLIT, E, R, D] fp32)."""
    programs = num_experts * triton.cdiv(width, 128)
    want = triton.cdiv(2 * _num_sms(device), programs)
    mean_tiles = triton.cdiv(meta.num_slots, num_experts * meta.block_m)
    return int(max(1, min(want, mean_tiles, 8)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's TF32 switch (off by default, and the 1e-5 fp32 budget needs it off);
    # for fp16/bf16 the value only restates Triton's default
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every dimension >= 16


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _scale_args(scaling: Scaling, dummy: torch.Tensor):
    """(scale_ptr tensor, scale_val float, PER_EXPERT_SCALE)."""
    if isinstance(scaling, torch.Tensor):
        return scaling, 0.0, True
    return dummy, float(scaling), False


def grouped_shrink(
    inp: torch.Tensor,
    weight: torch.Tensor,
    meta: RoutingMeta,
    *,
    split: int,
    num_tokens: int,
    dw_args: Optional[Tuple[torch.Tensor, torch.Tensor, Scaling]] = None,
    reduce: bool = True,
) -> torch.Tensor:
    """``out[p] = inp[tok(p)] @ weight[e(p)].T`` for every padded sorted row p of a used tile.

    Args:
        inp: ``[T, D]`` (x, or dy in backward).
        weight: ``[E, R, D]`` view with any strides (A, or ``B.transpose(1, 2)``).
        meta: routing metadata; ``split``: split-K factor over D.
        dw_args: ``(h [CAP, R] fp32, dw [S] out, scaling)`` to also write the gate grads
            ``dw[s] = scaling[e] * <out[p], h[p]>`` (backward).
        reduce: sum the split partials here (``[CAP, R]``); False returns them as ``[SPLIT, CAP, R]``
            for a consumer that sums them itself (``grouped_expand``); not with ``dw_args``.

    Returns:
        ``[CAP, R]`` (or ``[SPLIT, CAP, R]``) fp32 rows (padding rows 0, rows of unused tiles unwritten).
    """
    if dw_args is not None and not reduce:
        raise ValueError("grouped_shrink: the gate-grad epilogue needs reduce=True")
    T, D = inp.shape
    E, R, _ = weight.shape
    CAP = meta.capacity
    part = poisoned_empty((split, CAP, R), torch.float32, inp.device)
    want_dw = dw_args is not None
    h, dw, scaling = dw_args if want_dw else (part, part, 1.0)
    scale_t, scale_v, per_expert = _scale_args(scaling, part)
    BR = _block_r(R)
    _grouped_shrink_kernel[(meta.num_blocks, split)](
        inp, weight, part, meta.sorted_slots, meta.block_expert, h, dw, scale_t, scale_v,
        D, R, meta.top_k, CAP, token_bucket(num_tokens),
        inp.stride(0), inp.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        SPLIT=split, DW_EPILOGUE=want_dw and split == 1, PER_EXPERT_SCALE=per_expert,
        DOT_PRECISION=_dot_precision(inp.dtype), BLOCK_M=meta.block_m, BLOCK_R=BR,
    )
    if not reduce:
        return part
    if split == 1:
        return part[0]
    final = poisoned_empty((CAP, R), torch.float32, inp.device)
    _split_reduce_kernel[(meta.num_blocks,)](
        part, final, meta.sorted_slots, meta.block_expert, h, dw, scale_t, scale_v, R, CAP,
        SPLIT=split, DW_EPILOGUE=want_dw, PER_EXPERT_SCALE=per_expert, BLOCK_M=meta.block_m, BLOCK_R=BR,
    )
    return final


def grouped_expand(
    h: torch.Tensor,
    weight: torch.Tensor,
    meta: RoutingMeta,
    gates: torch.Tensor,
    scaling: Scaling,
    out: torch.Tensor,
    *,
    accumulate: bool,
    num_tokens: int,
    h_out: Optional[torch.Tensor] = None,
) -> None:
    """``out[s] (+)= g(s) * h[p(s)] @ weight[e(s)].T`` for every slot s, written in place.

    Args:
        h: ``[SPLIT, CAP, R]`` fp32 split partials (summed here in split order) or ``[CAP, R]``.
        weight: ``[E, N, R]`` view with any strides (B, or ``A.transpose(1, 2)`` for dx).
        gates: ``[S]`` gate per slot; ``scaling``: float or ``[E]`` fp32.
        out: ``[S, N]``, row = slot (for k == 1 pass y / dx itself: slot == token).
        accumulate: add into out instead of overwriting (each row has exactly one writer).
        h_out: ``[CAP, R]`` fp32 to store the summed h (for backward), or None.
    """
    if h.dim() == 2:
        h = h.unsqueeze(0)
    split = h.shape[0]
    E, N, R = weight.shape
    scale_t, scale_v, per_expert = _scale_args(scaling, gates)
    grid = lambda META: (meta.num_blocks, triton.cdiv(N, META["BLOCK_N"]))  # noqa: E731
    _grouped_expand_kernel[grid](
        h, weight, out, h_out if h_out is not None else h, gates, scale_t,
        meta.sorted_slots, meta.block_expert, scale_v,
        N, R, meta.capacity, token_bucket(num_tokens),
        weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0), out.stride(1),
        SPLIT=split, STORE_H=h_out is not None, ACCUMULATE=accumulate, PER_EXPERT_SCALE=per_expert,
        DOT_PRECISION=_dot_precision(weight.dtype), BLOCK_M=meta.block_m, BLOCK_R=_block_r(R),
    )


def combine_slots(ys: torch.Tensor, y: Optional[torch.Tensor], num_tokens: int, top_k: int) -> torch.Tensor:
    """``y[t] (+)= sum_j ys[t*k + j]`` in j order (y None: a fresh result). ys ``[T*k, N]``, y ``[T, N]``."""
    N = ys.shape[1]
    has_base = y is not None
    if not has_base:
        y = poisoned_empty((num_tokens, N), ys.dtype, ys.device)
    BLOCK_N = min(1024, triton.next_power_of_2(N))
    _combine_slots_kernel[(num_tokens, triton.cdiv(N, BLOCK_N))](
        ys, y, N, top_k, HAS_BASE=has_base, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return y


def grouped_outer(
    lr: torch.Tensor,
    wide: torch.Tensor,
    meta: RoutingMeta,
    gates: torch.Tensor,
    scaling: Scaling,
    *,
    transposed: bool,
    num_tokens: int,
) -> torch.Tensor:
    """Expert weight grads ``G[e] = sum_{s in e} (g(s) lr[p(s)])^T wide[tok(s)]``, ``[E, R, D]``.

    Args:
        lr: ``[CAP, R]`` fp32 rank rows (dh for dA, h for dB); wide: ``[T, D]`` (x for dA, dy for dB).
        transposed: return ``[E, D, R]`` (dB's layout) instead of ``[E, R, D]``.

    Returns:
        the gradient in wide's dtype, contiguous in the requested layout.
    """
    T, D = wide.shape
    R = lr.shape[1]
    E = meta.num_experts
    split = _choose_outer_split(E, D, meta, wide.device)
    final_shape = (E, D, R) if transposed else (E, R, D)
    final = poisoned_empty(final_shape, wide.dtype, wide.device)
    part = final.unsqueeze(0) if split == 1 else poisoned_empty((split,) + final_shape, torch.float32, wide.device)
    # kernel addresses [SPLIT, E, R, D]; the transposed layout is the same memory with R and D swapped
    part_v = part.transpose(2, 3) if transposed else part
    scale_t, scale_v, per_expert = _scale_args(scaling, gates)
    grid = lambda META: (E, triton.cdiv(D, META["BLOCK_D"]), split)  # noqa: E731
    _grouped_outer_kernel[grid](
        lr, wide, part_v, gates, scale_t, meta.sorted_slots, meta.padded_offsets, scale_v,
        D, R, meta.top_k, token_bucket(num_tokens),
        wide.stride(0), wide.stride(1),
        part_v.stride(0), part_v.stride(1), part_v.stride(2), part_v.stride(3),
        SPLIT=split, PER_EXPERT_SCALE=per_expert, DOT_PRECISION=_dot_precision(wide.dtype),
        BLOCK_M=meta.block_m, BLOCK_R=_block_r(R),
    )
    if split > 1:
        numel = final.numel()
        BLOCK = 1024
        _sum_splits_kernel[(triton.cdiv(numel, BLOCK),)](part, final, numel, SPLIT=split, BLOCK=BLOCK, num_warps=4)
    return final


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class LoRAMixGroupedFunction(torch.autograd.Function):
    """Autograd for the grouped path. 2-D inputs; experts and base already in x's dtype (see
    ``lora_mix_grouped``); scaling a float or a detached ``[E]`` fp32 tensor."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias):
        T, K = x.shape  # x: [T, K]
        E, R, _ = lora_A.shape
        N = lora_B.shape[1]
        k = expert_ids.shape[1]
        S = T * k
        need_x, need_A, need_B, _, need_w, _, need_W, need_b = ctx.needs_input_grad

        meta = routing_metadata(expert_ids, E, _block_m(S, E))
        gates = expert_weights.reshape(-1)  # [S]
        if not gates.is_contiguous():
            gates = gates.contiguous()

        split = _choose_split(K, _est_tiles(meta), x.device)
        # with split-K the partials are summed inside the expand kernel (one launch less for decode),
        # which also stores the summed h when backward will need it (dB, gate grads)
        h_part = grouped_shrink(x, lora_A, meta, split=split, num_tokens=T, reduce=False)  # [SPLIT, CAP, R]
        save_h = need_B or need_w
        if split == 1:
            h, h_out = h_part[0], None
        else:
            h = h_out = poisoned_empty((meta.capacity, R), torch.float32, x.device) if save_h else None

        if base_weight is not None:
            y = torch.addmm(base_bias, x, base_weight.t()) if base_bias is not None else x @ base_weight.t()
        else:
            y = None
        if k == 1:
            out = y if y is not None else poisoned_empty((T, N), x.dtype, x.device)
            grouped_expand(h_part, lora_B, meta, gates, scaling, out, accumulate=y is not None, num_tokens=T,
                           h_out=h_out)
            y = out
        else:
            ys = poisoned_empty((S, N), x.dtype, x.device)
            grouped_expand(h_part, lora_B, meta, gates, scaling, ys, accumulate=False, num_tokens=T, h_out=h_out)
            y = combine_slots(ys, y, T, k)

        ctx.save_for_backward(
            x if (need_A or need_W) else None,
            lora_A if need_x else None,
            lora_B if (need_x or need_A or need_w) else None,
            expert_weights if (need_x or need_A or need_B) else None,
            h if save_h else None,
            base_weight if need_x else None,
            meta.sorted_slots, meta.slot_to_sorted, meta.block_expert, meta.expert_offsets, meta.padded_offsets,
        )
        ctx.meta_ints = (meta.num_slots, meta.top_k, meta.num_experts, meta.block_m)
        ctx.scaling = scaling
        ctx.dims = (T, K, N, E, R, k)
        ctx.weights_dtype = expert_weights.dtype
        ctx.has_base = base_weight is not None
        ctx.has_bias = base_bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, expert_weights, h, base_weight, *meta_t = ctx.saved_tensors
        meta = RoutingMeta(*meta_t, *ctx.meta_ints)
        need_x, need_A, need_B, _, need_w, _, need_W, need_b = ctx.needs_input_grad
        T, K, N, E, R, k = ctx.dims
        S = T * k
        scaling = ctx.scaling
        dy = dy.contiguous()  # [T, N]
        gates = None
        if expert_weights is not None:
            gates = expert_weights.reshape(-1)
            if not gates.is_contiguous():
                gates = gates.contiguous()
        dx = dA = dB = dw = dW = db = None

        dh = None
        if need_x or need_A or need_w:
            split = _choose_split(N, _est_tiles(meta), dy.device)
            if need_w:
                dw = poisoned_empty((S,), ctx.weights_dtype, dy.device)
                dw_args = (h, dw, scaling)
            else:
                dw_args = None
            # dh[p] = dy[tok(p)] @ B[e(p)]: B [E, N, R] seen as [E, R, N]
            dh = grouped_shrink(dy, lora_B.transpose(1, 2), meta, split=split, num_tokens=T, dw_args=dw_args)
            if need_w:
                dw = dw.view(T, k)
        if need_x:
            base_dx = dy @ base_weight if base_weight is not None else None  # [T, K]
            a_t = lora_A.transpose(1, 2)  # [E, K, R]
            if k == 1:
                dx = base_dx if base_dx is not None else poisoned_empty((T, K), dy.dtype, dy.device)
                grouped_expand(dh, a_t, meta, gates, scaling, dx, accumulate=base_dx is not None, num_tokens=T)
            else:
                dxs = poisoned_empty((S, K), dy.dtype, dy.device)
                grouped_expand(dh, a_t, meta, gates, scaling, dxs, accumulate=False, num_tokens=T)
                dx = combine_slots(dxs, base_dx, T, k)
        if need_A:
            dA = grouped_outer(dh, x, meta, gates, scaling, transposed=False, num_tokens=T)  # [E, R, K]
        if need_B:
            dB = grouped_outer(h, dy, meta, gates, scaling, transposed=True, num_tokens=T)  # [E, N, R]
        if need_W:
            dW = dy.t() @ x
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dA, dB, None, dw, None, dW, db


def lora_mix_grouped(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: Scaling = 1.0,
    base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Routed multi-LoRA linear on the grouped Triton path (2-D inputs, validated by the caller).

    ``y = x @ W.T + b + sum_j w[:, j] * s[e_j] * (x @ A[e_j].T) @ B[e_j].T`` with ``e_j = expert_ids[:, j]``.

    Args:
        x: ``[T, d_in]`` float32 / float16 / bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        lora_A: ``[E, r, d_in]``; lora_B: ``[E, d_out, r]`` (cast to x's dtype).
        expert_ids: ``[T, k]`` int32/int64 in ``[0, E)``; duplicates within a token add up.
        expert_weights: ``[T, k]`` gates (their grad comes back in their dtype).
        scaling: float or ``[E]`` per-expert tensor (no gradient).
        base_weight: optional ``[d_out, d_in]``; base_bias: optional ``[d_out]`` (cast to x's dtype).

    Returns:
        ``[T, d_out]`` in x's dtype; differentiable w.r.t. x, lora_A, lora_B, expert_weights,
        base_weight, base_bias, computing only the gradients asked for. Deterministic, no host sync.
    """
    if x.shape[0] == 0 or expert_ids.shape[1] == 0:
        # nothing to route; the torch path handles empty shapes (and their zero-size grads)
        from .lora_mix_torch import lora_mix_torch

        return lora_mix_torch(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
    dtype = x.dtype
    lora_A = lora_A.to(dtype)
    lora_B = lora_B.to(dtype)
    if base_weight is not None:
        base_weight = base_weight.to(dtype)
    if base_bias is not None:
        base_bias = base_bias.to(dtype)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.detach().to(device=x.device, dtype=torch.float32).contiguous()
    else:
        scaling = float(scaling)
    return LoRAMixGroupedFunction.apply(
        x.contiguous(), lora_A.contiguous(), lora_B.contiguous(), expert_ids, expert_weights,
        scaling, base_weight, base_bias,
    )


__all__ = ["lora_mix_grouped", "LoRAMixGroupedFunction", "grouped_shrink", "grouped_expand", "grouped_outer",
           "combine_slots"]
