"""``route_topk`` as one Triton kernel: softmax over the E experts, top-k, optional renormalisation.

A program owns BLOCK_T tokens and all E logits of each (E is small: 4..256), so the softmax and the
k selection rounds happen in registers and the logits are read once. Selection: k rounds of (row max,
lowest index reaching it, knock it out), so ids come out largest first and ties go to the lower expert
index. Backward is a second small kernel that recomputes the softmax from the logits (cheaper than
saving ``[T, E]`` probabilities) and applies, per token::

    w_j = p[i_j]                      dl_e = p_e * (G_e - sum_j g_j p[i_j]),   G_e = sum_j g_j [i_j == e]
    w_j = p[i_j] / S (renormalise)    same with g_j replaced by (g_j - sum_l g_l w_l) / S,  S = sum_j p[i_j]

Same results as ``route_topk``'s torch path (kernels/topk.py) (fp32 softmax, weights in the logits' dtype, int64 ids).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .tuning import autotune, token_bucket
from .utils import device_guard


def _configs():
    return [
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 64}, num_warps=4),
        triton.Config({"BLOCK_T": 16}, num_warps=2),
        triton.Config({"BLOCK_T": 128}, num_warps=8),
        # wide routers (E = 256): few tokens per program, or the [BT, E] tiles spill
        triton.Config({"BLOCK_T": 8}, num_warps=4),
        triton.Config({"BLOCK_T": 16}, num_warps=8),
    ]


def _regs_ok(p):
    # several [BLOCK_T, BLOCK_E] fp32 tiles are live at once (probabilities, the running selection, the
    # gradient scatter): keep each to 16 values per thread (E = 256 spilled 0.7-5 KB past that)
    return p["BLOCK_T"] * p["BLOCK_E"] <= 16 * 32 * p["num_warps"]


@triton.jit
def _softmax_rows(logits_ptr, o_t, m_t, o_e, m_e, stride_lt, stride_le):
    """fp32 softmax of a ``[BLOCK_T, BLOCK_E]`` logits tile over experts; padding lanes are exactly 0."""
    b_l = tl.load(logits_ptr + o_t.to(tl.int64)[:, None] * stride_lt + o_e[None, :] * stride_le,
                  mask=m_t[:, None] & m_e[None, :], other=float("-inf")).to(tl.float32)  # [BT, BE]
    # Fully masked rows (t >= T) would give -inf - -inf = nan: give them a finite max instead.
    b_m = tl.max(b_l, axis=1)  # [BT]
    b_m = tl.where(m_t, b_m, 0.0)
    b_p = tl.exp(b_l - b_m[:, None])
    b_p = tl.where(m_e[None, :], b_p, 0.0)
    b_s = tl.sum(b_p, axis=1)  # [BT]
    b_s = tl.where(b_s > 0, b_s, 1.0)
    return b_p / b_s[:, None]


@triton.jit
def _token_block(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's BLOCK_T tokens and the expert lanes: ``(o_t, m_t, o_e, m_e)``."""
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    m_t = o_t < T
    o_e = tl.arange(0, BLOCK_E)  # [BE]
    m_e = o_e < E
    return o_t, m_t, o_e, m_e


@autotune(_configs(), key=["T_BUCKET", "E", "K_TOP", "RENORM"], regs=_regs_ok)
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _route_topk_fwd_kernel(
    logits_ptr, w_ptr, ids_ptr,
    T, E, T_BUCKET,
    stride_lt, stride_le, stride_wt, stride_wk, stride_it, stride_ik,
    K_TOP: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    o_t, m_t, o_e, m_e = _token_block(T, E, BLOCK_T, BLOCK_E)
    o_k = tl.arange(0, BLOCK_K)

    b_p = _softmax_rows(logits_ptr, o_t, m_t, o_e, m_e, stride_lt, stride_le)  # [BT, BE]
    b_cur = tl.where(m_e[None, :], b_p, -1.0)  # probabilities are >= 0: -1 marks "taken / padding"
    b_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    b_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K_TOP):
        b_max = tl.max(b_cur, axis=1)  # [BT]
        b_arg = tl.min(tl.where(b_cur == b_max[:, None], o_e[None, :], BLOCK_E), axis=1)  # [BT] lowest index
        b_w = tl.where(o_k[None, :] == j, b_max[:, None], b_w)
        b_i = tl.where(o_k[None, :] == j, b_arg[:, None], b_i)
        b_cur = tl.where(o_e[None, :] == b_arg[:, None], -1.0, b_cur)
    if RENORM:
        b_sw = tl.sum(b_w, axis=1)  # [BT]; lanes >= K_TOP hold 0
        b_w = b_w / tl.where(b_sw > 0, b_sw, 1.0)[:, None]  # rows past T are all 0: no 0/0

    m_out = m_t[:, None] & (o_k[None, :] < K_TOP)
    o_row = o_t.to(tl.int64)[:, None]
    tl.store(w_ptr + o_row * stride_wt + o_k[None, :] * stride_wk, b_w.to(w_ptr.dtype.element_ty), mask=m_out)
    tl.store(ids_ptr + o_row * stride_it + o_k[None, :] * stride_ik, b_i.to(tl.int64), mask=m_out)


@autotune(_configs(), key=["T_BUCKET", "E", "K_TOP", "RENORM"], regs=_regs_ok)
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _route_topk_bwd_kernel(
    logits_ptr, ids_ptr, dw_ptr, dl_ptr,
    T, E, T_BUCKET,
    stride_lt, stride_le, stride_it, stride_ik, stride_dwt, stride_dwk, stride_dlt, stride_dle,
    K_TOP: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    o_t, m_t, o_e, m_e = _token_block(T, E, BLOCK_T, BLOCK_E)
    o_row = o_t.to(tl.int64)

    b_p = _softmax_rows(logits_ptr, o_t, m_t, o_e, m_e, stride_lt, stride_le)  # [BT, BE]
    # Pass 1: S = sum_j p[i_j] and sum_j g_j p[i_j] (for renormalisation).
    b_sum_p = tl.zeros([BLOCK_T], dtype=tl.float32)
    b_dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K_TOP):
        b_id = tl.load(ids_ptr + o_row * stride_it + j * stride_ik, mask=m_t, other=0)  # [BT]
        b_g = tl.load(dw_ptr + o_row * stride_dwt + j * stride_dwk, mask=m_t, other=0.0).to(tl.float32)
        b_psel = tl.sum(tl.where(o_e[None, :] == b_id[:, None], b_p, 0.0), axis=1)  # [BT] p[i_j]
        b_sum_p += b_psel
        b_dot += b_g * b_psel
    if RENORM:
        b_inv_s = 1.0 / tl.where(b_sum_p > 0, b_sum_p, 1.0)
        b_gw = b_dot * b_inv_s  # sum_l g_l w_l
    # Pass 2: G_e = sum_j g'_j [i_j == e] and c = sum_j g'_j p[i_j] with g' the grad w.r.t. p[i_j].
    b_G = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    b_c = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K_TOP):
        b_id = tl.load(ids_ptr + o_row * stride_it + j * stride_ik, mask=m_t, other=0)
        b_g = tl.load(dw_ptr + o_row * stride_dwt + j * stride_dwk, mask=m_t, other=0.0).to(tl.float32)
        if RENORM:
            b_g = (b_g - b_gw) * b_inv_s
        b_hit = o_e[None, :] == b_id[:, None]  # [BT, BE]
        b_G += tl.where(b_hit, b_g[:, None], 0.0)
        b_c += b_g * tl.sum(tl.where(b_hit, b_p, 0.0), axis=1)
    b_dl = b_p * (b_G - b_c[:, None])  # softmax backward
    tl.store(dl_ptr + o_row[:, None] * stride_dlt + o_e[None, :] * stride_dle, b_dl.to(dl_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_e[None, :])


def _grid(T: int):
    return lambda META: (triton.cdiv(T, META["BLOCK_T"]),)


class RouteTopkTritonFunction(torch.autograd.Function):
    """Autograd for 2-D logits ``[T, E]`` (contiguous); ids are not differentiable."""

    @staticmethod
    def forward(ctx, logits, k, renormalize):
        T, E = logits.shape
        w = torch.empty(T, k, dtype=logits.dtype, device=logits.device)
        ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
        with device_guard(logits):
            _route_topk_fwd_kernel[_grid(T)](
                logits, w, ids, T, E, token_bucket(T),
                logits.stride(0), logits.stride(1), w.stride(0), w.stride(1), ids.stride(0), ids.stride(1),
                K_TOP=k, RENORM=bool(renormalize), BLOCK_E=triton.next_power_of_2(E),
                BLOCK_K=max(2, triton.next_power_of_2(k)),
            )
        ctx.mark_non_differentiable(ids)
        ctx.save_for_backward(logits, ids)
        ctx.k, ctx.renormalize = k, bool(renormalize)
        return w, ids

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw, _dids):
        logits, ids = ctx.saved_tensors
        T, E = logits.shape
        dw = dw.contiguous()
        dl = torch.empty_like(logits)
        with device_guard(logits):
            _route_topk_bwd_kernel[_grid(T)](
                logits, ids, dw, dl, T, E, token_bucket(T),
                logits.stride(0), logits.stride(1), ids.stride(0), ids.stride(1), dw.stride(0), dw.stride(1),
                dl.stride(0), dl.stride(1),
                K_TOP=ctx.k, RENORM=ctx.renormalize, BLOCK_E=triton.next_power_of_2(E),
            )
        return dl, None, None


def route_topk_triton(logits: torch.Tensor, k: int, renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax + top-k (+ renormalisation) on Triton; same contract as ``route_topk``.

    Args:
        logits: ``[..., E]`` float32 / float16 / bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        k: experts per token, ``1 <= k <= E`` (validated by ``route_topk``).
        renormalize: rescale the kept probabilities to sum to 1.

    Returns:
        ``(weights [..., k] in logits' dtype, ids [..., k] int64)``, largest first, ties to the lower
        index; weights are differentiable w.r.t. logits.
    """
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"route_topk on Triton takes float32/float16/bfloat16 logits, got {logits.dtype}")
    lead = logits.shape[:-1]
    E = logits.shape[-1]
    logits2 = logits.reshape(-1, E).contiguous()
    if logits2.shape[0] == 0:
        w = logits2.new_zeros(0, k) + logits2.sum() * 0  # keeps the graph for an empty batch
        return w.reshape(*lead, k), torch.zeros(*lead, k, dtype=torch.int64, device=logits.device)
    w, ids = RouteTopkTritonFunction.apply(logits2, int(k), bool(renormalize))
    return w.reshape(*lead, k), ids.reshape(*lead, k)
