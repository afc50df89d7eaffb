"""Dense-rank Triton kernels for the routed multi-LoRA linear (small ``E*r``), forward and backward.

All experts form one ``[E*r, d_in]`` matrix ``A_all`` (``lora_A`` reshaped, no copy) and one
``[d_out, E*r]`` matrix ``B_all`` (read straight out of ``lora_B [E, d_out, r]`` by computing each rank
column's expert and rank index, so it is never materialised). Notation inside the kernels: T tokens,
K = d_in, N = d_out, E experts of rank R (= r), ``E*R`` rank columns, K_TOP = k slots per token.

Forward (two launches, ``lora_mix_dense``)::

    _shrink_gate_fwd_kernel   H  = x @ A_all.T                      [T, E*R]  fp32, kept only for the gate grads
                              Hg = H * G * scaling  (epilogue)      [T, E*R]
    _fused_base_lora_kernel   y  = [x | Hg] @ [W | B_all].T + b     [T, N]

``G[t, e] = sum_j w[t, j] * (ids[t, j] == e)`` is rebuilt in registers from the top-k ids/weights inside
every epilogue that needs it (k compares per tile), so no ``[T, E]`` gate tensor and no scatter launch
exist. The second kernel runs one K loop over ``d_in`` (base GEMM) and then ``E*R`` more steps over the
rank columns: the routed layer costs one base GEMM plus ``E*R/d_in`` of a K loop, plus the shrink,
which is one more read of x.

Decode (one launch, ``lora_mix_decode``, meant for T <= 64 and ``E*R <= 128``): ``_decode_fused_fwd_kernel``
tiles N only (BLOCK_M covers the tokens) and computes the shrink in the *same* K loop as the base
GEMM, from the x tile it already loaded. Every N tile recomputes ``x @ A_all.T``: at decode sizes the
kernel is bound by streaming W from HBM, the ``E*R x d_in`` expert matrix is re-read from L2 (it is a few
hundred KB) and tensor cores are idle, so trading ``E*R / BLOCK_N`` redundant FLOPs for one launch and no
H round-trip through memory is the right trade. It stops being right when ``E*R`` approaches BLOCK_N or
T grows: then the two-kernel path above wins (see ``dispatch.py``).

Backward (each launch only when some input asks for it; ``ctx.needs_input_grad``)::

    _dhg_bwd_kernel    dHg = dy @ B_all  (registers only)                    x, lora_A or gates
                       dH  = dHg * G * scaling  -> stored                    x or lora_A
                       dG[t, e] = s_e * sum_{c in e} dHg[t, c] * H[t, c]    gates: rank-space gate grads,
                       dw[t, j] = dG[t, ids[t, j]]  (in-kernel gather)       never a [T, k, N] tensor
    _fused_base_lora_kernel  dx = [dy | dH] @ [W ; A_all]                    x
    _matmul_tn_kernel  dA = dH.T @ x,  dB = dy.T @ Hg,  dW = dy.T @ x        each only when requested
    torch              db = sum_t dy (fp32)                                  base_bias

Router training (grads for x and gates only) therefore launches two kernels and never touches dA/dB.
Accumulation is fp32 everywhere; gates and gate gradients are fp32. No atomics are used: reductions over T
in the weight gradients are split deterministically (fp32 partials, summed in a fixed order), so
results are bitwise reproducible run to run and no autotune ``reset_to_zero`` is needed.

``SELFMOE_DEBUG_POISON=1`` (or ``lora_mix_dense.POISON = True``) fills every buffer a kernel is expected
to write with NaN before the launch (tests do), so an element a kernel forgets to write shows up as NaN.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .tuning import select_configs, token_bucket

Scaling = Union[float, torch.Tensor]

# Launch counts per kernel role ("shrink", "fused_fwd", "decode", "dhg", "dx", "dA", "dB", "dW", "db").
# Tests use it to prove that router training never launches the expert-weight gradients.
launch_counts: Counter = Counter()

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------------------------------
# Config factories (first entry = default; ``select_configs`` applies the pin and interpreter policy)
# --------------------------------------------------------------------------------------------------

def _shrink_configs():
    # The shrink is [T, K] x [K, <=128]: wide K tiles, modest M; it is bandwidth-bound on x.
    return select_configs([
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    ])


def _fused_configs():
    # The base GEMM with a longer K loop: standard large-tile GEMM configs.
    return select_configs([
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ])


def _decode_configs():
    # W streaming: small BLOCK_N gives enough programs to saturate HBM at N ~ 4096; deep pipelines.
    # Shared memory per stage is BLOCK_K * (BLOCK_M + BLOCK_N + BLOCK_C) elements with BLOCK_M, BLOCK_C
    # up to 64 and 128: the first (default / pinned) config fits fp32 at the largest tile (192 KB);
    # the deeper ones are for half inputs at small T (configs that do not fit are skipped by autotune).
    return select_configs([
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=2, num_stages=5),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ])


def _dhg_configs():
    return select_configs([
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    ])


def _tn_configs():
    # Weight gradients reduce over T: tall BLOCK_T, output tiles sized for [E*r, K] / [N, E*r] / [N, K].
    return select_configs([
        triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_T": 64, "GROUP_P": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_T": 32, "GROUP_P": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_P": 64, "BLOCK_Q": 128, "BLOCK_T": 64, "GROUP_P": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_P": 32, "BLOCK_Q": 128, "BLOCK_T": 64, "GROUP_P": 8}, num_warps=4, num_stages=4),
    ])


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _gate_scale_cols(
    ids_ptr, w_ptr, scale_ptr, scale, offs_m, mask_m, e_col, valid_col, K_TOP,
    stride_idm, stride_idk, stride_wm, stride_wk,
    PER_EXPERT_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gate x scaling of each (token, rank column) tile entry, fp32 ``[BLOCK_M, BLOCK_C]``.

    Rebuilt from the top-k ids/weights (k compares per tile) instead of reading a [T, E] gate tensor:
    cheaper than a scatter launch plus a round-trip, and duplicate ids add up by construction.
    """
    b_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for j in range(K_TOP):
        b_id = tl.load(ids_ptr + offs_m * stride_idm + j * stride_idk, mask=mask_m, other=-1)  # [BM]
        b_w = tl.load(w_ptr + offs_m * stride_wm + j * stride_wk, mask=mask_m, other=0.0).to(tl.float32)  # [BM]
        b_g += tl.where(b_id[:, None] == e_col[None, :], b_w[:, None], 0.0)  # [BM, BC]
    if PER_EXPERT_SCALE:
        b_s = tl.load(scale_ptr + e_col, mask=valid_col, other=0.0)  # [BC] fp32
        b_g = b_g * b_s[None, :]
    else:
        b_g = b_g * scale
    return b_g


@triton.autotune(configs=_shrink_configs(), key=["T_BUCKET", "K", "E", "R", "BLOCK_C"])
@triton.jit
def _shrink_gate_fwd_kernel(
    x_ptr, a_ptr, ids_ptr, w_ptr, scale_ptr, h_ptr, hg_ptr,
    T, K, E, R, K_TOP, scale, T_BUCKET,
    stride_xm, stride_xk,
    stride_ae, stride_ar, stride_ak,
    stride_idm, stride_idk, stride_wm, stride_wk,
    stride_hm, stride_hc,
    PER_EXPERT_SCALE: tl.constexpr, SAVE_H: tl.constexpr,
    R_PAD: tl.constexpr, EPC: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_M), cdiv(E, EPC)). A tile holds EPC whole experts, R_PAD (pow2 >= R) columns
    # each, so the gate of a column is one expert's gate and non-pow2 ranks only cost masked lanes.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < T
    offs_i = tl.arange(0, BLOCK_C)
    e_col = pid_c * EPC + offs_i // R_PAD  # [BC] expert of each tile column
    j_col = offs_i % R_PAD  # [BC] rank index within the expert
    valid_col = (e_col < E) & (j_col < R)
    offs_k = tl.arange(0, BLOCK_K)

    rows_x = offs_m.to(tl.int64) * stride_xm
    b_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        b_x = tl.load(x_ptr + rows_x[:, None] + kk[None, :] * stride_xk,
                      mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)  # [BM, BK]
        b_a = tl.load(a_ptr + e_col[None, :] * stride_ae + j_col[None, :] * stride_ar + kk[:, None] * stride_ak,
                      mask=valid_col[None, :] & (kk[:, None] < K), other=0.0)  # [BK, BC]
        b_acc = tl.dot(b_x, b_a, b_acc, input_precision=INPUT_PRECISION)

    b_g = _gate_scale_cols(ids_ptr, w_ptr, scale_ptr, scale, offs_m, mask_m, e_col, valid_col, K_TOP,
                           stride_idm, stride_idk, stride_wm, stride_wk, PER_EXPERT_SCALE, BLOCK_M, BLOCK_C)
    c_col = e_col * R + j_col  # [BC] column in the [T, E*R] layout
    p_out = offs_m.to(tl.int64)[:, None] * stride_hm + c_col[None, :] * stride_hc
    mask = mask_m[:, None] & valid_col[None, :]
    if SAVE_H:
        tl.store(h_ptr + p_out, b_acc.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(hg_ptr + p_out, (b_acc * b_g).to(hg_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_fused_configs(), key=["M_BUCKET", "N", "K1", "K2", "HAS_SEG1"])
@triton.jit
def _fused_base_lora_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2, R, M_BUCKET,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2c, stride_b2e, stride_b2r, stride_b2n,
    stride_om, stride_on,
    HAS_SEG1: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = a1[M, K1] @ b1[K1, N] + a2[M, K2] @ b2[K2, N] (+ bias[N]): one K loop over K1 + K2.

    b2 is a rank-column operand: row c lives at ``(c // R) * stride_b2e + (c % R) * stride_b2r``, which
    reads B_all.T straight out of lora_B [E, N, R] (forward) or A_all out of lora_A [E, R, K] (dx).
    """
    # Grouped program order: GROUP_M row tiles share each column tile while it is hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_SEG1:
        # Segment 1: the base GEMM over K1 (= d_in forward, d_out for dx).
        for k0 in range(0, K1, BLOCK_K):
            kk = k0 + offs_k
            b_a = tl.load(a1_ptr + rows_m[:, None] * stride_a1m + kk[None, :] * stride_a1k,
                          mask=mask_m[:, None] & (kk[None, :] < K1), other=0.0)  # [BM, BK]
            b_b = tl.load(b1_ptr + kk[:, None] * stride_b1k + offs_n[None, :] * stride_b1n,
                          mask=(kk[:, None] < K1) & mask_n[None, :], other=0.0)  # [BK, BN]
            b_acc = tl.dot(b_a, b_b, b_acc, input_precision=INPUT_PRECISION)
    # Segment 2: the LoRA expand over the E*R rank columns, same accumulator (the "concatenated K").
    for c0 in range(0, K2, BLOCK_K):
        cc = c0 + offs_k  # [BK] rank columns
        mask_c = cc < K2
        b_a = tl.load(a2_ptr + rows_m[:, None] * stride_a2m + cc[None, :] * stride_a2c,
                      mask=mask_m[:, None] & mask_c[None, :], other=0.0)  # [BM, BK]
        p_b2 = (cc // R)[:, None] * stride_b2e + (cc % R)[:, None] * stride_b2r + offs_n[None, :] * stride_b2n
        b_b = tl.load(b2_ptr + p_b2, mask=mask_c[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
        b_acc += b_bias[None, :]
    tl.store(out_ptr + rows_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             b_acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_decode_configs(), key=["T_BUCKET", "K", "N", "E", "R", "HAS_BASE"])
@triton.jit
def _decode_fused_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, ids_ptr, wt_ptr, scale_ptr, h_ptr, hg_ptr, y_ptr,
    T, K, N, E, R, K_TOP, scale, T_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ae, stride_ar, stride_ak,
    stride_be, stride_bn, stride_br,
    stride_idm, stride_idk, stride_wtm, stride_wtk,
    stride_hm, stride_hc, stride_ym, stride_yn,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, PER_EXPERT_SCALE: tl.constexpr,
    SAVE_H: tl.constexpr, SAVE_HG: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), cdiv(T, BLOCK_M)); BLOCK_C covers every expert, so each program owns
    # the whole shrink for its tokens and nothing round-trips through memory.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)
    offs_i = tl.arange(0, BLOCK_C)
    mask_m = offs_m < T
    mask_n = offs_n < N
    e_col = offs_i // R_PAD  # [BC]
    j_col = offs_i % R_PAD
    valid_col = (e_col < E) & (j_col < R)
    rows_m = offs_m.to(tl.int64)

    b_y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_h = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        b_x = tl.load(x_ptr + rows_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK], shared by both dots
        if HAS_BASE:
            b_w = tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
                          mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
            b_y = tl.dot(b_x, b_w, b_y, input_precision=INPUT_PRECISION)
        b_a = tl.load(a_ptr + e_col[None, :] * stride_ae + j_col[None, :] * stride_ar + kk[:, None] * stride_ak,
                      mask=valid_col[None, :] & mask_k[:, None], other=0.0)  # [BK, BC]
        b_h = tl.dot(b_x, b_a, b_h, input_precision=INPUT_PRECISION)

    b_g = _gate_scale_cols(ids_ptr, wt_ptr, scale_ptr, scale, offs_m, mask_m, e_col, valid_col, K_TOP,
                           stride_idm, stride_idk, stride_wtm, stride_wtk, PER_EXPERT_SCALE, BLOCK_M, BLOCK_C)
    # Round Hg to the input dtype like the two-kernel path (which stores it) so both paths agree.
    b_hg = (b_h * b_g).to(x_ptr.dtype.element_ty)  # [BM, BC]
    if SAVE_H or SAVE_HG:
        # Only the first N tile writes H / Hg for backward (every tile computed the same values).
        if pid_n == 0:
            p_h = rows_m[:, None] * stride_hm + (e_col * R + j_col)[None, :] * stride_hc
            mask_h = mask_m[:, None] & valid_col[None, :]
            if SAVE_H:
                tl.store(h_ptr + p_h, b_h.to(h_ptr.dtype.element_ty), mask=mask_h)
            if SAVE_HG:
                tl.store(hg_ptr + p_h, b_hg, mask=mask_h)
    b_b = tl.load(b_ptr + e_col[:, None] * stride_be + j_col[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=valid_col[:, None] & mask_n[None, :], other=0.0)  # [BC, BN]
    b_y = tl.dot(b_hg, b_b, b_y, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             b_y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_dhg_configs(), key=["T_BUCKET", "N", "E", "R", "NEED_DW", "STORE_DH"])
@triton.jit
def _dhg_bwd_kernel(
    dy_ptr, b_ptr, h_ptr, ids_ptr, w_ptr, scale_ptr, dh_ptr, dg_ptr, dw_ptr,
    T, N, E, R, K_TOP, scale, T_BUCKET,
    stride_dym, stride_dyn,
    stride_be, stride_bn, stride_br,
    stride_hm, stride_hc,
    stride_idm, stride_idk, stride_wm, stride_wk,
    stride_dgm, stride_dge, stride_dwm, stride_dwk,
    PER_EXPERT_SCALE: tl.constexpr, NEED_DW: tl.constexpr, STORE_DH: tl.constexpr,
    R_PAD: tl.constexpr, EPC: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_M),). A program owns whole token rows and walks the experts in chunks of EPC,
    # so each token's gate grads are complete inside one program: no atomics, no second pass.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    mask_m = offs_m < T
    rows_m = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, EPC)

    for e0 in range(0, E, EPC):
        e_col = e0 + offs_i // R_PAD  # [BC]
        j_col = offs_i % R_PAD
        valid_col = (e_col < E) & (j_col < R)
        b_dhg = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + offs_n
            mask_nn = nn < N
            b_dy = tl.load(dy_ptr + rows_m[:, None] * stride_dym + nn[None, :] * stride_dyn,
                           mask=mask_m[:, None] & mask_nn[None, :], other=0.0)  # [BM, BN]
            b_b = tl.load(b_ptr + e_col[None, :] * stride_be + j_col[None, :] * stride_br + nn[:, None] * stride_bn,
                          mask=valid_col[None, :] & mask_nn[:, None], other=0.0)  # [BN, BC] = B_all chunk
            b_dhg = tl.dot(b_dy, b_b, b_dhg, input_precision=INPUT_PRECISION)

        c_col = e_col * R + j_col
        mask = mask_m[:, None] & valid_col[None, :]
        if STORE_DH:
            b_g = _gate_scale_cols(ids_ptr, w_ptr, scale_ptr, scale, offs_m, mask_m, e_col, valid_col, K_TOP,
                                   stride_idm, stride_idk, stride_wm, stride_wk, PER_EXPERT_SCALE, BLOCK_M, BLOCK_C)
            tl.store(dh_ptr + rows_m[:, None] * stride_hm + c_col[None, :] * stride_hc,
                     (b_dhg * b_g).to(dh_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            b_h = tl.load(h_ptr + rows_m[:, None] * stride_hm + c_col[None, :] * stride_hc,
                          mask=mask, other=0.0).to(tl.float32)  # [BM, BC]
            if PER_EXPERT_SCALE:
                b_s = tl.load(scale_ptr + e_col, mask=valid_col, other=0.0)  # [BC]
                b_p = b_dhg * b_h * b_s[None, :]
            else:
                b_p = b_dhg * b_h * scale
            # Sum each expert's R_PAD columns (padding lanes are 0): [BM, EPC] rank-space gate grads.
            b_dg = tl.sum(tl.reshape(b_p, (BLOCK_M, EPC, R_PAD)), axis=2)
            e_loc = e0 + offs_e
            tl.store(dg_ptr + rows_m[:, None] * stride_dgm + e_loc[None, :] * stride_dge, b_dg,
                     mask=mask_m[:, None] & (e_loc[None, :] < E))

    if NEED_DW:
        # Gather dG[t, ids[t, j]] into [T, k]. The rows were written by this program's own threads;
        # the barrier makes those global writes visible to the threads that read them back.
        tl.debug_barrier()
        for j in range(K_TOP):
            b_id = tl.load(ids_ptr + offs_m * stride_idm + j * stride_idk, mask=mask_m, other=0)  # [BM]
            # Out-of-range ids (only possible with SELFMOE_CHECK_IDS=0) select no expert anywhere in
            # these kernels: mask them here too, so they get a zero gradient and never read out of bounds.
            b_ok = mask_m & (b_id >= 0) & (b_id < E)
            b_v = tl.load(dg_ptr + rows_m * stride_dgm + b_id * stride_dge, mask=b_ok, other=0.0)
            tl.store(dw_ptr + offs_m * stride_dwm + j * stride_dwk, b_v.to(dw_ptr.dtype.element_ty), mask=mask_m)


@triton.autotune(configs=_tn_configs(), key=["T_BUCKET", "P", "Q", "SPLIT"])
@triton.jit
def _matmul_tn_kernel(
    a_ptr, b_ptr, out_ptr,
    T, P, Q, QR, T_PER_SPLIT, T_BUCKET, SPLIT,
    stride_at, stride_ap, stride_bt, stride_bq,
    stride_os, stride_op, stride_oqe, stride_oqr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_P: tl.constexpr,
):
    """out[s][P, Q] = a[T_s, P].T @ b[T_s, Q] over the s-th slice of T (weight gradients).

    Output column q is written at ``(q // QR) * stride_oqe + (q % QR) * stride_oqr``, which puts dB
    straight into lora_B's [E, N, R] layout (QR = R) and is plain row-major for dA / dW (QR = Q).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_q = tl.cdiv(Q, BLOCK_Q)
    num_pid_in_group = GROUP_P * num_pid_q
    group_id = pid // num_pid_in_group
    first_pid_p = group_id * GROUP_P
    group_size_p = min(num_pid_p - first_pid_p, GROUP_P)
    pid_p = first_pid_p + (pid % num_pid_in_group) % group_size_p
    pid_q = (pid % num_pid_in_group) // group_size_p

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP]
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    offs_t = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    t_start = pid_s * T_PER_SPLIT
    t_end = min(t_start + T_PER_SPLIT, T)

    b_acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + offs_t
        mask_t = tt < t_end
        rows_t = tt.to(tl.int64)
        b_a = tl.load(a_ptr + rows_t[None, :] * stride_at + offs_p[:, None] * stride_ap,
                      mask=mask_p[:, None] & mask_t[None, :], other=0.0)  # [BP, BT] = a.T tile
        b_b = tl.load(b_ptr + rows_t[:, None] * stride_bt + offs_q[None, :] * stride_bq,
                      mask=mask_t[:, None] & mask_q[None, :], other=0.0)  # [BT, BQ]
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=INPUT_PRECISION)

    p_out = (pid_s.to(tl.int64) * stride_os + offs_p.to(tl.int64)[:, None] * stride_op
             + (offs_q // QR)[None, :] * stride_oqe + (offs_q % QR)[None, :] * stride_oqr)
    tl.store(out_ptr + p_out, b_acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

# Debug switch shared with kernels/routing.py: fill every buffer a kernel must write with NaN before the
# launch, so an element it forgot shows up in the result. Tests flip it with monkeypatch;
# ``SELFMOE_DEBUG_POISON=1`` turns it on for a whole run. Off on the hot path (plain torch.empty).
POISON = os.environ.get("SELFMOE_DEBUG_POISON", "0") == "1"


def _out(shape, dtype, device) -> torch.Tensor:
    """Output buffer: uninitialised, or NaN-filled when ``POISON`` is on."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow torch's own TF32 switch (off by default, which is what the 1e-5 budget needs).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _rank_tiling(E: int, r: int, cap: int) -> Tuple[int, int, int]:
    """(R_PAD, EPC, BLOCK_C): each tile holds EPC whole experts of R_PAD (pow2 >= r) columns.

    ``cap`` bounds the tile width (registers); it never splits an expert, and tl.dot needs >= 16.
    """
    r_pad = triton.next_power_of_2(r)
    block_c = max(16, r_pad, min(triton.next_power_of_2(E) * r_pad, cap))
    return r_pad, block_c // r_pad, block_c


def _scale_args(scaling: Scaling, x: torch.Tensor) -> Tuple[torch.Tensor, float, bool]:
    """(pointer arg, scalar arg, per-expert flag). The pointer is a dummy when scaling is a float."""
    if isinstance(scaling, torch.Tensor):
        return scaling, 1.0, True
    return x, float(scaling), False


def shrink_gate_fwd(
    x: torch.Tensor, lora_A: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
    scaling: Scaling, save_h: bool = True,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """``H = x @ A_all.T`` (fp32, None unless saved) and ``Hg = H * gate * scaling`` (x's dtype), ``[T, E*r]``."""
    T, K = x.shape
    E, r, _ = lora_A.shape
    k = expert_ids.shape[1]
    r_pad, epc, block_c = _rank_tiling(E, r, cap=128)
    # H feeds only the gate gradient, a short dot product prone to cancellation: keep it fp32.
    h = _out((T, E * r), torch.float32, x.device) if save_h else None
    hg = _out((T, E * r), x.dtype, x.device)
    scale_t, scale_f, per_expert = _scale_args(scaling, x)
    grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]), triton.cdiv(E, epc))  # noqa: E731
    _shrink_gate_fwd_kernel[grid](
        x, lora_A, expert_ids, expert_weights, scale_t, h if save_h else hg, hg,
        T, K, E, r, k, scale_f, token_bucket(T),
        x.stride(0), x.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        expert_ids.stride(0), expert_ids.stride(1), expert_weights.stride(0), expert_weights.stride(1),
        hg.stride(0), hg.stride(1),
        PER_EXPERT_SCALE=per_expert, SAVE_H=save_h, R_PAD=r_pad, EPC=epc, BLOCK_C=block_c,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    launch_counts["shrink"] += 1
    return h, hg


def fused_base_lora(
    a1: Optional[torch.Tensor], b1_kn: Optional[Tuple[torch.Tensor, int, int]],
    a2: torch.Tensor, b2: Tuple[torch.Tensor, int, int, int], r: int, N: int,
    bias: Optional[torch.Tensor], out_dtype: torch.dtype, role: str,
) -> torch.Tensor:
    """``out[M, N] = a1 @ b1 + a2 @ b2 (+ bias)`` in one K loop (forward y and backward dx).

    ``b1_kn = (tensor, stride_k, stride_n)`` views the base weight as [K1, N]; ``b2 = (tensor, stride_e,
    stride_r, stride_n)`` addresses the rank-column operand by (expert, rank) so lora_A / lora_B are used
    in their stored layout. ``a1``/``b1_kn`` None: no base segment.
    """
    M, K2 = a2.shape
    out = _out((M, N), out_dtype, a2.device)
    has_seg1 = a1 is not None
    if has_seg1:
        b1, s_b1k, s_b1n = b1_kn
        K1, s_a1m, s_a1k = a1.shape[1], a1.stride(0), a1.stride(1)
    else:
        a1, b1, K1, s_a1m, s_a1k, s_b1k, s_b1n = a2, a2, 0, 0, 0, 0, 0
    b2_t, s_b2e, s_b2r, s_b2n = b2
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    _fused_base_lora_kernel[grid](
        a1, b1, a2, b2_t, bias if bias is not None else out, out,
        M, N, K1, K2, r, token_bucket(M),
        s_a1m, s_a1k, s_b1k, s_b1n,
        a2.stride(0), a2.stride(1), s_b2e, s_b2r, s_b2n,
        out.stride(0), out.stride(1),
        HAS_SEG1=has_seg1, HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(a2.dtype),
    )
    launch_counts[role] += 1
    return out


def decode_fused_fwd(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, expert_ids: torch.Tensor,
    expert_weights: torch.Tensor, scaling: Scaling, base_weight: Optional[torch.Tensor],
    base_bias: Optional[torch.Tensor], save_h: bool, save_hg: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One-launch forward: ``(y [T, N], H or None, Hg or None)``; H/Hg are written only when saved."""
    T, K = x.shape
    E, r, _ = lora_A.shape
    N = lora_B.shape[1]
    k = expert_ids.shape[1]
    r_pad = triton.next_power_of_2(r)
    block_c = max(16, triton.next_power_of_2(E) * r_pad)  # every expert in one tile
    block_m = min(64, max(16, triton.next_power_of_2(T)))
    y = _out((T, N), x.dtype, x.device)
    h = _out((T, E * r), torch.float32, x.device) if save_h else None  # fp32: feeds the gate grads
    hg = _out((T, E * r), x.dtype, x.device) if save_hg else None
    h_any = h if h is not None else (hg if hg is not None else y)
    has_base = base_weight is not None
    w = base_weight if has_base else x
    scale_t, scale_f, per_expert = _scale_args(scaling, x)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(T, block_m))  # noqa: E731
    _decode_fused_fwd_kernel[grid](
        x, w, base_bias if base_bias is not None else y, lora_A, lora_B, expert_ids, expert_weights, scale_t,
        h if h is not None else h_any, hg if hg is not None else h_any, y,
        T, K, N, E, r, k, scale_f, token_bucket(T),
        x.stride(0), x.stride(1), w.stride(0) if has_base else 0, w.stride(1) if has_base else 0,
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        expert_ids.stride(0), expert_ids.stride(1), expert_weights.stride(0), expert_weights.stride(1),
        E * r, 1, y.stride(0), y.stride(1),
        HAS_BASE=has_base, HAS_BIAS=base_bias is not None, PER_EXPERT_SCALE=per_expert,
        SAVE_H=save_h, SAVE_HG=save_hg, R_PAD=r_pad, BLOCK_C=block_c, BLOCK_M=block_m,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    launch_counts["decode"] += 1
    return y, h, hg


def dhg_bwd(
    dy: torch.Tensor, lora_B: torch.Tensor, h: Optional[torch.Tensor], expert_ids: torch.Tensor,
    expert_weights: torch.Tensor, scaling: Scaling, need_dh: bool, need_dw: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dH [T, E*r] or None, dw [T, k] or None)`` from ``dHg = dy @ B_all`` without storing dHg."""
    T, N = dy.shape
    E, _, r = lora_B.shape
    k = expert_ids.shape[1]
    r_pad, epc, block_c = _rank_tiling(E, r, cap=128)
    dh = _out((T, E * r), dy.dtype, dy.device) if need_dh else None
    if need_dw:
        dg = _out((T, E), torch.float32, dy.device)  # rank-space gate grads, fp32 scratch
        dw = _out((T, k), expert_weights.dtype, dy.device)
    else:
        dg = dw = None
    anyt = dy
    scale_t, scale_f, per_expert = _scale_args(scaling, dy)
    h_arg = h if need_dw else (dh if dh is not None else anyt)
    grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]),)  # noqa: E731
    _dhg_bwd_kernel[grid](
        dy, lora_B, h_arg, expert_ids, expert_weights, scale_t,
        dh if dh is not None else anyt, dg if dg is not None else anyt, dw if dw is not None else anyt,
        T, N, E, r, k, scale_f, token_bucket(T),
        dy.stride(0), dy.stride(1),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        E * r, 1,
        expert_ids.stride(0), expert_ids.stride(1), expert_weights.stride(0), expert_weights.stride(1),
        E, 1, k, 1,
        PER_EXPERT_SCALE=per_expert, NEED_DW=need_dw, STORE_DH=need_dh,
        R_PAD=r_pad, EPC=epc, BLOCK_C=block_c, INPUT_PRECISION=_input_precision(dy.dtype),
    )
    launch_counts["dhg"] += 1
    return dh, dw


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def matmul_tn(
    a: torch.Tensor, b: torch.Tensor, out_shape: Tuple[int, ...], q_div: int,
    out_strides: Tuple[int, int, int], role: str, split: Optional[int] = None,
) -> torch.Tensor:
    """``a[T, P].T @ b[T, Q]`` written into a contiguous tensor of ``out_shape`` (x's dtype).

    ``out_strides = (stride_p, stride_qe, stride_qr)`` with column q at ``(q // q_div, q % q_div)``.
    ``split`` slices T into independent fp32 partials summed afterwards (deterministic), for outputs
    too small to fill the GPU ([E*r, K] and [N, E*r] have few tiles but T can be 10^5); None picks it.
    """
    T, P = a.shape
    Q = b.shape[1]
    if split is None:
        # Nominal 64x64 output tiles; aim for ~2 waves of programs, keep >= 256 tokens per slice.
        tiles = triton.cdiv(P, 64) * triton.cdiv(Q, 64)
        split = max(1, min(triton.cdiv(T, 256), (2 * _num_sms(a.device)) // max(tiles, 1)))
    split = max(1, min(int(split), T))
    t_per_split = triton.cdiv(T, split)
    split = triton.cdiv(T, t_per_split)  # no empty slices
    numel = 1
    for s in out_shape:
        numel *= s
    if split == 1:
        out = _out(out_shape, a.dtype, a.device)
        target = out
    else:
        target = _out((split, *out_shape), torch.float32, a.device)
    s_p, s_qe, s_qr = out_strides
    grid = lambda META: (triton.cdiv(P, META["BLOCK_P"]) * triton.cdiv(Q, META["BLOCK_Q"]), split)  # noqa: E731
    _matmul_tn_kernel[grid](
        a, b, target,
        T, P, Q, q_div, t_per_split, token_bucket(T), split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        numel, s_p, s_qe, s_qr,
        INPUT_PRECISION=_input_precision(a.dtype),
    )
    launch_counts[role] += 1
    if split > 1:
        out = target.sum(0).to(a.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------

class LoRAMixDenseTritonFunction(torch.autograd.Function):
    """Dense-rank Triton autograd. Inputs are 2-D, contiguous and share x's dtype (see ``lora_mix_dense``);
    ``scaling`` is a float or a contiguous fp32 ``[E]`` tensor; ``decode`` picks the one-launch forward;
    ``grad_enabled`` is the caller's grad mode (forward itself always runs with grad off)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias, decode,
                grad_enabled):
        T, K = x.shape  # x: [T, K]
        E, r, _ = lora_A.shape
        N = lora_B.shape[1]
        need_x, need_A, need_B, _, need_w, _, need_W, need_b, _, _ = ctx.needs_input_grad
        # H is only read by the gate gradient; Hg only by dB. Keep what backward will read, and
        # nothing under no_grad / inference_mode (needs_input_grad still says True there).
        save_h = need_w and grad_enabled
        save_hg = need_B and grad_enabled

        if decode:
            y, h, hg = decode_fused_fwd(x, lora_A, lora_B, expert_ids, expert_weights, scaling,
                                        base_weight, base_bias, save_h, save_hg)
        else:
            h, hg = shrink_gate_fwd(x, lora_A, expert_ids, expert_weights, scaling, save_h=save_h)
            base = None
            if base_weight is not None:
                base = (base_weight, base_weight.stride(1), base_weight.stride(0))  # W viewed as [K, N]
            y = fused_base_lora(
                x if base_weight is not None else None, base, hg,
                (lora_B, lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)),  # B_all.T[c, n] = B[e, n, j]
                r, N, base_bias, x.dtype, "fused_fwd",
            )
            if not save_hg:
                hg = None

        ctx.save_for_backward(x, lora_A, lora_B, expert_ids, expert_weights, h, hg, base_weight)
        ctx.scaling = scaling
        ctx.has_bias = base_bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, expert_ids, expert_weights, h, hg, base_weight = ctx.saved_tensors
        need_x, need_A, need_B, _, need_w, _, need_W, need_b, _, _ = ctx.needs_input_grad
        T, K = x.shape
        E, r, _ = lora_A.shape
        N = lora_B.shape[1]
        dy = dy.contiguous()  # [T, N]
        dx = dA = dB = dw = dW = db = None

        dh = None
        if need_x or need_A or need_w:
            dh, dw = dhg_bwd(dy, lora_B, h, expert_ids, expert_weights, ctx.scaling,
                             need_dh=need_x or need_A, need_dw=need_w)
        if need_x:
            base = None
            if base_weight is not None:
                base = (base_weight, base_weight.stride(0), base_weight.stride(1))  # W as [N, K]
            dx = fused_base_lora(
                dy if base_weight is not None else None, base, dh,
                (lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)),  # A_all[c, k] = A[e, j, k]
                r, K, None, x.dtype, "dx",
            )
        if need_A:
            # dA[c, k] = sum_t dH[t, c] x[t, k]; lora_A [E, r, K] contiguous is [E*r, K] row-major.
            dA = matmul_tn(dh, x, (E, r, K), q_div=K, out_strides=(K, 0, 1), role="dA")
        if need_B:
            # dB[e, n, j] = sum_t dy[t, n] Hg[t, e*r + j]: columns decomposed by (expert, rank).
            dB = matmul_tn(dy, hg, (E, N, r), q_div=r, out_strides=(r, N * r, 1), role="dB")
        if need_W and base_weight is not None:
            dW = matmul_tn(dy, x, (N, K), q_div=K, out_strides=(K, 0, 1), role="dW")
        if need_b and ctx.has_bias:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
            launch_counts["db"] += 1
        return dx, dA, dB, None, dw, None, dW, db, None, None


def _prepare(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias):
    if x.dim() != 2 or lora_A.dim() != 3 or lora_B.dim() != 3 or expert_ids.dim() != 2:
        raise ValueError(
            f"lora_mix_dense takes 2-D x [T, d_in] and ids [T, k] with 3-D experts; got x {list(x.shape)}, "
            f"lora_A {list(lora_A.shape)}, lora_B {list(lora_B.shape)}, expert_ids {list(expert_ids.shape)} "
            "(use lora_mix for leading batch dims)"
        )
    if x.dtype not in _TORCH_TO_TL:
        raise TypeError(f"the Triton kernels take x in float32/float16/bfloat16, got x of dtype {x.dtype}")
    dtype = x.dtype
    lora_A = lora_A.to(dtype).contiguous()
    lora_B = lora_B.to(dtype).contiguous()
    if base_weight is not None:
        base_weight = base_weight.to(dtype).contiguous()
    if base_bias is not None:
        base_bias = base_bias.to(dtype).contiguous()
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.detach().to(device=x.device, dtype=torch.float32).contiguous()
    else:
        scaling = float(scaling)
    return (x.contiguous(), lora_A, lora_B, expert_ids.contiguous(), expert_weights.contiguous(),
            scaling, base_weight, base_bias)


def _apply(decode: bool, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias):
    if x.shape[0] == 0:
        # No tokens: nothing to launch; the torch path returns the right empty result and grads.
        from .lora_mix_torch import lora_mix_torch
        return lora_mix_torch(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
    args = _prepare(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
    return LoRAMixDenseTritonFunction.apply(*args, decode, torch.is_grad_enabled())


def lora_mix_dense(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: Scaling = 1.0,
    base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Routed multi-LoRA linear on the dense-rank Triton path (shrink kernel + fused base/expand kernel).

    Same 2-D contract as ``lora_mix_torch`` (no validation: ``lora_mix`` does that; ids must lie in
    ``[0, E)``): x ``[T, d_in]``, lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, expert_ids (int32/int64)
    and expert_weights ``[T, k]``, scaling a float or ``[E]`` tensor (no gradient), optional base_weight
    ``[d_out, d_in]`` and base_bias ``[d_out]``. Experts and base weights are cast to x's dtype (their grads
    come back in their own). Returns ``[T, d_out]`` in x's dtype; differentiable w.r.t. x, lora_A, lora_B,
    expert_weights, base_weight, base_bias, launching only the backward kernels whose gradients are asked for.
    Best for small ``E*r`` (<= a few hundred): it computes every expert's rank columns for every token.
    """
    return _apply(False, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)


def lora_mix_decode(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: Scaling = 1.0,
    base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as ``lora_mix_dense`` with a one-launch forward for decode (T <= 64, ``E*r`` <= 128).

    Each N tile recomputes the shrink in the base GEMM's K loop (see the module docstring for why that
    is cheap at decode sizes). Correct for any T and ``E*r``, only slow outside that range; the backward
    is the dense-rank backward.
    """
    return _apply(True, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
