"""Dense-rank Triton paths of the routed multi-LoRA linear (small ``E*r``): launchers and the backends.

All experts form one ``[E*r, d_in]`` matrix ``A_all`` and one ``[d_out, E*r]`` matrix ``B_all``, both read
in place from ``lora_A`` / ``lora_B`` (kernels in dense_kernels.py). Notation: T tokens, K = d_in,
N = d_out, E experts of rank r, ``ER = E*r`` rank columns, k slots per token.

Forward (two launches, ``DENSE`` / ``lora_mix_dense``)::

    _shrink_gate_fwd_kernel   H  = x @ A_all.T                      [T, ER]  fp32, kept only for the gate grads
                              Hg = H * G * scaling  (epilogue)      [T, ER]
    _fused_base_lora_kernel   y  = [x | Hg] @ [W | B_all].T + b     [T, N]

``G[t, e] = sum_j w[t, j] * (ids[t, j] == e)`` is rebuilt in registers from the top-k ids/gates inside
every epilogue that needs it (k compares per tile), so no ``[T, E]`` gate tensor and no scatter launch
exist. The second kernel runs one K loop over ``d_in`` (base GEMM) and then ``ER`` more steps over the
rank columns: the routed layer costs one base GEMM plus ``ER/d_in`` of a K loop, plus the shrink,
which is one more read of x.

Decode (one launch, two with split-K; ``DECODE`` / ``lora_mix_decode``, for T <= 64 and a rank tile
``pow2(E) * pow2(r) <= 128``; wider raises ``ValueError``):
``_decode_fused_fwd_kernel`` tiles N only (BLOCK_M covers the tokens) and computes the shrink in the
*same* K loop as the base GEMM, from the x tile it already loaded. Every N tile recomputes
``x @ A_all.T``: at decode sizes the kernel is bound by streaming W from HBM, the ``ER x d_in`` expert
matrix is re-read from L2 (it is a few hundred KB) and tensor cores are idle, so trading
``ER / BLOCK_N`` redundant FLOPs for one launch and no H round-trip through memory is the right trade.
It stops being right when ``ER`` approaches BLOCK_N or T grows: then the two-kernel path above wins
(see ``dispatch.py``).

Split-K (both the shrink and decode, when their grid is too small for the GPU): at T <= 64 the shrink
has one program per rank tile and decode ``cdiv(N, 64)`` (16 at a GQA projection's N = 1024), against
132 SMs on an H100. ``dispatch.split_k`` then cuts K = d_in into SPLIT runs of whole BLOCK_K steps
(run-time factor: one binary serves every SPLIT; at most 16 splits of >= 256 elements; none while the
grid fills half the SMs)::

    shrink  split s:  H_s = x[:, K_s] @ A_all[:, K_s].T                  -> fp32 [T, SPLIT, ER]
            _shrink_split_reduce_kernel: H = sum_s H_s (split order), then the gate epilogue (H, Hg)
    decode  split s:  y_s = x_s W_s^T + ((x_s A_s^T) G s) B_all^T       -> fp32 [T, SPLIT, N] (+ H_s)
            _decode_split_reduce_kernel: y = sum_s y_s + b, cast; H = sum_s H_s and Hg for backward

The expand is linear in H, so each decode split expands its own partial (its Hg_s is rounded to the
input dtype like the unsplit Hg; the saved Hg is rounded once from the summed H). The gate epilogue
runs once, after the sum, in both: H must be complete before it is saved for the gate gradients.
Programs launched at d_in = 4096 on sm_90 (compile report): shrink T <= 64, E*r <= 128: 1 -> 16;
decode T <= 64: N = 1024 16 -> 144, N = 4096 64 -> 192. ``SELFMOE_DENSE_SPLIT_K`` forces SPLIT (tests).

Backward (each launch only when some input asks for it; ``needs``)::

    _dhg_bwd_kernel    dHg = dy @ B_all  (registers only)                    x, lora_A or gates
                       dH  = dHg * G * scaling  -> stored                    x or lora_A
                       dG[t, e] = s_e * sum_{c in e} dHg[t, c] * H[t, c]    gates: rank-space gate grads,
                       dw[t, j] = dG[t, ids[t, j]]  (in-kernel gather)       never a [T, k, N] tensor
    _fused_base_lora_kernel  dx = [dy | dH] @ [W ; A_all]                    x
    _matmul_tn_kernel  dA = dH.T @ x,  dB = dy.T @ Hg,  dW = dy.T @ x        each only when requested
    torch              db = sum_t dy (fp32)                                  base_bias

Router training (grads for x and gates only) therefore launches two kernels and never touches dA/dB.
Accumulation is fp32 everywhere; gates and gate gradients are fp32. No atomics are used: reductions over T
in the weight gradients and over K in the split-K forward are split deterministically (fp32 partials,
summed in a fixed order), so results are bitwise reproducible run to run and no autotune
``reset_to_zero`` is needed.

Loads along K are 16-byte vectors and cp.async-pipelined when d_in and the row strides are multiples of
8 (16-bit inputs): ``k_align`` passes that divisibility as ``ALIGN`` (Triton itself only proves 16).

Every buffer a kernel must write comes from ``utils.poisoned_empty`` (NaN-filled under
``SELFMOE_DEBUG_POISON=1`` or ``utils.POISON = True``, as the tests do).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Tuple

import torch
import triton

from .contract import Backend, LoRAMixInputs, ScaleArgs, entry_point
from .dispatch import (
    DECODE_MAX_RANK_COLS, ENV_PATH, decode_rank_tile, decode_tiles, forced_split, shrink_tiles, split_k,
)
from .dense_kernels import (
    _decode_fused_fwd_kernel,
    _decode_split_reduce_kernel,
    _dhg_bwd_kernel,
    _fused_base_lora_kernel,
    _matmul_tn_kernel,
    _shrink_gate_fwd_kernel,
    _shrink_split_reduce_kernel,
)
from .tuning import token_bucket
from .utils import dot_precision, num_sms, poisoned_empty

# Launch counts per kernel role ("shrink", "shrink_reduce", "fused_fwd", "decode", "decode_reduce", "dhg",
# "dx", "dA", "dB", "dW", "db").
# Tests use it to prove that router training never launches the expert-weight gradients.
launch_counts: Counter = Counter()

# Tiles of the split-K reduce launches (plain elementwise sums over SPLIT; not autotuned).
_REDUCE_BLOCK_M = 32
_REDUCE_BLOCK_N = 64


def k_align(K: int, *strides: int) -> int:
    """The largest power of two up to 16 dividing K and the given strides (the row strides of the
    K-contiguous operands): the kernels' ``ALIGN``, which lets the compiler vectorise (and pipeline) the
    loads along K when K is not a multiple of 16 (16 is what Triton's own specialisation proves)."""
    g = 16
    for v in (K, *strides):
        g = math.gcd(g, int(v))
    return max(1, g)


def _load_align(K: int, operands, row_strides) -> int:
    """``ALIGN`` for a kernel streaming K-contiguous operands: ``k_align`` of K and their row strides,
    16 (no hint needed or possible) unless every operand is contiguous along K."""
    if any(t.stride(-1) != 1 for t in operands):
        return 16
    return k_align(K, *row_strides)


def _rank_tiling(E: int, r: int, cap: int) -> Tuple[int, int, int]:
    """(R_PAD, EPC, BLOCK_C): each tile holds EPC whole experts of R_PAD (pow2 >= r) columns.

    ``cap`` bounds the tile width (registers); it never splits an expert, and tl.dot needs >= 16.
    """
    r_pad = triton.next_power_of_2(r)
    block_c = max(16, r_pad, min(triton.next_power_of_2(E) * r_pad, cap))
    return r_pad, block_c // r_pad, block_c


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def shrink_gate_fwd(
    inp: LoRAMixInputs, save_h: bool = True, split: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """``H = x @ A_all.T`` (fp32, None unless saved) and ``Hg = H * gate * scaling`` (x's dtype), ``[T, ER]``.

    ``split``: split-K factor (None: ``SELFMOE_DENSE_SPLIT_K`` if set, else ``dispatch.split_k`` for this
    grid and device). Above 1 the K
    splits write fp32 partials ``[T, SPLIT, ER]`` and a second launch sums them in split order and
    applies the gate epilogue (bitwise reproducible run to run).
    """
    x, lora_A, ids, gates = inp.x, inp.lora_A, inp.ids, inp.gates
    T, K = x.shape
    E, r, _ = lora_A.shape
    r_pad, epc, block_c = _rank_tiling(E, r, cap=128)
    if split is None:
        split = forced_split() or split_k(shrink_tiles(T, E, r), K, num_sms(x.device))
    split = max(1, int(split))
    # H feeds only the gate gradient, a short dot product prone to cancellation: keep it fp32.
    h = poisoned_empty((T, E * r), torch.float32, x.device) if save_h else None
    hg = poisoned_empty((T, E * r), x.dtype, x.device)
    scale_t, scale_v, per_expert = inp.scale_args()
    ids_strides = (ids.stride(0), ids.stride(1), gates.stride(0), gates.stride(1))
    if split > 1:
        part = poisoned_empty((T, split, E * r), torch.float32, x.device)
        out, s_om, s_oc, s_os = part, split * E * r, 1, E * r
    else:
        out, s_om, s_oc, s_os = (h if save_h else hg), hg.stride(0), hg.stride(1), 0
    grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]), triton.cdiv(E, epc), split)  # noqa: E731
    _shrink_gate_fwd_kernel[grid](
        x, lora_A, ids, gates, scale_t, out, hg,
        T, K, E, r, ids.shape[1], scale_v, token_bucket(T), split,
        x.stride(0), x.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        *ids_strides, s_om, s_oc, s_os,
        PER_EXPERT_SCALE=per_expert, SAVE_H=save_h, PARTIAL=split > 1, R_PAD=r_pad, EPC=epc, BLOCK_C=block_c,
        ALIGN=_load_align(K, (x, lora_A), (x.stride(0), lora_A.stride(0), lora_A.stride(1))),
        DOT_PRECISION=dot_precision(x.dtype),
    )
    launch_counts["shrink"] += 1
    if split > 1:
        _shrink_split_reduce_kernel[(triton.cdiv(T, _REDUCE_BLOCK_M), triton.cdiv(E, epc))](
            part, ids, gates, scale_t, h if save_h else hg, hg,
            T, E, r, ids.shape[1], scale_v, split,
            s_om, s_os, *ids_strides, hg.stride(0), hg.stride(1),
            PER_EXPERT_SCALE=per_expert, SAVE_H=save_h, R_PAD=r_pad, EPC=epc, BLOCK_C=block_c,
            BLOCK_M=_REDUCE_BLOCK_M, num_warps=4,
        )
        launch_counts["shrink_reduce"] += 1
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
    out = poisoned_empty((M, N), out_dtype, a2.device)
    has_seg1 = a1 is not None
    if has_seg1:
        b1, s_b1k, s_b1n = b1_kn
        K1, s_a1m, s_a1k = a1.shape[1], a1.stride(0), a1.stride(1)
    else:
        a1, b1, K1, s_a1m, s_a1k, s_b1k, s_b1n = a2, a2, 0, 0, 0, 0, 0
    b2_t, s_b2e, s_b2r, s_b2n = b2
    # Launch facts the JIT cannot infer (see the kernel's docstring): K lengths without a tail for
    # any BLOCK_K of the table (all divide 64), and b2 being a contiguous lora_B [E, N, r].
    even = lambda k: k % 64 == 0  # noqa: E731
    rank_major = r > 1 and s_b2r == 1 and s_b2n == r and s_b2e == N * r
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    _fused_base_lora_kernel[grid](
        a1, b1, a2, b2_t, bias if bias is not None else out, out,
        M, N, K1, K2, r, token_bucket(M),
        s_a1m, s_a1k, s_b1k, s_b1n,
        a2.stride(0), a2.stride(1), s_b2e, s_b2r, s_b2n,
        out.stride(0), out.stride(1),
        HAS_SEG1=has_seg1, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(a2.dtype),
        EVEN_K1=even(K1), EVEN_K2=even(K2), B2_RANK_MAJOR=rank_major,
    )
    launch_counts[role] += 1
    return out


def decode_fused_fwd(
    inp: LoRAMixInputs, save_h: bool, save_hg: bool, split: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One-launch forward: ``(y [T, N], H or None, Hg or None)``; H/Hg are written only when saved.

    ``split``: split-K factor (None: ``SELFMOE_DENSE_SPLIT_K`` if set, else ``dispatch.split_k`` for this
    grid and device). Above 1 each K
    split writes fp32 partials of y (``[T, SPLIT, N]``) and of H, and a second launch sums them in split
    order, adds the bias and stores y, H and Hg (bitwise reproducible run to run).
    """
    x, lora_A, lora_B, ids, gates = inp.x, inp.lora_A, inp.lora_B, inp.ids, inp.gates
    T, K = x.shape
    E, r, _ = lora_A.shape
    N = lora_B.shape[1]
    r_pad = triton.next_power_of_2(r)
    block_c = decode_rank_tile(E, r)  # every expert in one tile
    if block_c > DECODE_MAX_RANK_COLS:
        # The [BLOCK_M, BLOCK_C] shrink accumulator and a [BLOCK_K, BLOCK_C] slice of A_all per pipeline
        # stage must fit beside the W tiles: at E*r = 1024 no config fits in shared memory.
        raise ValueError(
            f"lora_mix_decode: the decode kernel keeps every expert's rank columns in one tile of at most "
            f"{DECODE_MAX_RANK_COLS}; lora_A {list(lora_A.shape)} (E={E}, r={r}) needs {block_c} "
            f"(pow2(E) * pow2(r)). Use lora_mix_dense or lora_mix_grouped (lora_mix picks one when "
            f"{ENV_PATH} is unset or 'auto')")
    if split is None:
        split = forced_split() or split_k(decode_tiles(T, N), K, num_sms(x.device))
    split = max(1, int(split))
    ER = E * r
    block_m = min(64, max(16, triton.next_power_of_2(T)))
    y = poisoned_empty((T, N), x.dtype, x.device)
    h = poisoned_empty((T, ER), torch.float32, x.device) if save_h else None  # fp32: feeds the gate grads
    hg = poisoned_empty((T, ER), x.dtype, x.device) if save_hg else None
    has_base = inp.base_weight is not None
    w = inp.base_weight if has_base else x
    scale_t, scale_v, per_expert = inp.scale_args()
    ids_strides = (ids.stride(0), ids.stride(1), gates.stride(0), gates.stride(1))
    keep = save_h or save_hg
    if split > 1:
        # fp32 partials [T, SPLIT, N] of y and [T, SPLIT, ER] of H (only when backward reads H or Hg)
        y_out = poisoned_empty((T, split, N), torch.float32, x.device)
        h_out = poisoned_empty((T, split, ER), torch.float32, x.device) if keep else y_out
        y_strides, h_strides = (split * N, 1, N), (split * ER, 1, ER)
        k_save_h, k_save_hg, k_bias = keep, False, False
        hg_out = h_out
    else:
        y_out = y
        h_out = h if h is not None else (hg if hg is not None else y)
        hg_out = hg if hg is not None else h_out
        y_strides, h_strides = (y.stride(0), y.stride(1), 0), (ER, 1, 0)
        k_save_h, k_save_hg, k_bias = save_h, save_hg, inp.base_bias is not None
    bias = inp.base_bias if inp.base_bias is not None else y
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(T, block_m), split)  # noqa: E731
    _decode_fused_fwd_kernel[grid](
        x, w, bias, lora_A, lora_B, ids, gates, scale_t, h_out, hg_out, y_out,
        T, K, N, E, r, ids.shape[1], scale_v, token_bucket(T), split,
        x.stride(0), x.stride(1), w.stride(0) if has_base else 0, w.stride(1) if has_base else 0,
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        *ids_strides, h_strides[0], h_strides[1], h_strides[2], y_strides[0], y_strides[1], y_strides[2],
        HAS_BASE=has_base, HAS_BIAS=k_bias, PER_EXPERT_SCALE=per_expert,
        SAVE_H=k_save_h, SAVE_HG=k_save_hg, PARTIAL=split > 1, R_PAD=r_pad, BLOCK_C=block_c, BLOCK_M=block_m,
        ALIGN=_load_align(K, (x, lora_A) + ((w,) if has_base else ()),
                          (x.stride(0), lora_A.stride(0), lora_A.stride(1)) + ((w.stride(0),) if has_base else ())),
        DOT_PRECISION=dot_precision(x.dtype),
    )
    launch_counts["decode"] += 1
    if split > 1:
        h_dst = h if h is not None else (hg if hg is not None else y)
        _decode_split_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N), triton.cdiv(T, block_m))](
            y_out, bias, y, h_out, ids, gates, scale_t, h_dst, hg if hg is not None else h_dst,
            T, N, E, r, ids.shape[1], scale_v, split,
            y_strides[0], y_strides[2], y.stride(0), y.stride(1), h_strides[0], h_strides[2],
            *ids_strides, ER, 1,
            HAS_BIAS=inp.base_bias is not None, PER_EXPERT_SCALE=per_expert, SAVE_H=save_h, SAVE_HG=save_hg,
            R_PAD=r_pad, BLOCK_C=block_c, BLOCK_M=block_m, BLOCK_N=_REDUCE_BLOCK_N, num_warps=4,
        )
        launch_counts["decode_reduce"] += 1
    return y, h, hg


def dhg_bwd(
    dy: torch.Tensor, lora_B: torch.Tensor, h: Optional[torch.Tensor], ids: torch.Tensor, gates: torch.Tensor,
    scale: ScaleArgs, need_dh: bool, need_dw: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dH [T, ER] or None, dw [T, k] or None)`` from ``dHg = dy @ B_all`` without storing dHg."""
    T, N = dy.shape
    E, _, r = lora_B.shape
    k = ids.shape[1]
    r_pad, epc, block_c = _rank_tiling(E, r, cap=128)
    dh = poisoned_empty((T, E * r), dy.dtype, dy.device) if need_dh else None
    if need_dw:
        dg = poisoned_empty((T, E), torch.float32, dy.device)  # rank-space gate grads, fp32 scratch
        dw = poisoned_empty((T, k), gates.dtype, dy.device)
    else:
        dg = dw = None
    scale_t, scale_v, per_expert = scale
    h_arg = h if need_dw else (dh if dh is not None else dy)
    grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]),)  # noqa: E731
    _dhg_bwd_kernel[grid](
        dy, lora_B, h_arg, ids, gates, scale_t,
        dh if dh is not None else dy, dg if dg is not None else dy, dw if dw is not None else dy,
        T, N, E, r, k, scale_v, token_bucket(T),
        dy.stride(0), dy.stride(1),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        E * r, 1,
        ids.stride(0), ids.stride(1), gates.stride(0), gates.stride(1),
        E, 1, k, 1,
        PER_EXPERT_SCALE=per_expert, NEED_DW=need_dw, STORE_DH=need_dh,
        R_PAD=r_pad, EPC=epc, BLOCK_C=block_c, DOT_PRECISION=dot_precision(dy.dtype),
    )
    launch_counts["dhg"] += 1
    return dh, dw


def matmul_tn(
    a: torch.Tensor, b: torch.Tensor, out_shape: Tuple[int, ...], q_div: int,
    out_strides: Tuple[int, int, int], role: str, split: Optional[int] = None,
) -> torch.Tensor:
    """``a[T, P].T @ b[T, Q]`` written into a contiguous tensor of ``out_shape`` (x's dtype).

    ``out_strides = (stride_p, stride_qe, stride_qr)`` with column q at ``(q // q_div, q % q_div)``.
    ``split`` slices T into independent fp32 partials summed afterwards (deterministic), for outputs
    too small to fill the GPU ([ER, K] and [N, ER] have few tiles but T can be 10^5); None picks it.
    """
    T, P = a.shape
    Q = b.shape[1]
    if split is None:
        # Nominal 64x64 output tiles; aim for ~2 waves of programs, keep >= 256 tokens per slice.
        tiles = triton.cdiv(P, 64) * triton.cdiv(Q, 64)
        split = max(1, min(triton.cdiv(T, 256), (2 * num_sms(a.device)) // max(tiles, 1)))
    split = max(1, min(int(split), T))
    t_per_split = triton.cdiv(T, split)
    split = triton.cdiv(T, t_per_split)  # no empty slices
    numel = 1
    for s in out_shape:
        numel *= s
    if split == 1:
        out = poisoned_empty(out_shape, a.dtype, a.device)
        target = out
    else:
        target = poisoned_empty((split, *out_shape), torch.float32, a.device)
    s_p, s_qe, s_qr = out_strides
    grid = lambda META: (triton.cdiv(P, META["BLOCK_P"]) * triton.cdiv(Q, META["BLOCK_Q"]), split)  # noqa: E731
    _matmul_tn_kernel[grid](
        a, b, target,
        T, P, Q, q_div, t_per_split, token_bucket(T), split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        numel, s_p, s_qe, s_qr,
        DOT_PRECISION=dot_precision(a.dtype),
    )
    launch_counts[role] += 1
    if split > 1:
        out = target.sum(0).to(a.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

class DenseBackend(Backend):
    """Dense-rank Triton backend; ``decode`` picks the one-launch forward (the backward is shared)."""

    def __init__(self, decode: bool):
        self.decode = decode
        self.name = "decode" if decode else "dense"

    def forward(self, inp, needs):
        x, lora_B, base_weight = inp.x, inp.lora_B, inp.base_weight
        N = lora_B.shape[1]
        # H is only read by the gate gradient; Hg only by dB. Keep what backward will read.
        save_h, save_hg = needs.gates, needs.lora_B
        if self.decode:
            y, h, hg = decode_fused_fwd(inp, save_h, save_hg)
        else:
            h, hg = shrink_gate_fwd(inp, save_h=save_h)
            base = None
            if base_weight is not None:
                base = (base_weight, base_weight.stride(1), base_weight.stride(0))  # W viewed as [K, N]
            y = fused_base_lora(
                x if base_weight is not None else None, base, hg,
                (lora_B, lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)),  # B_all.T[c, n] = B[e, n, j]
                inp.lora_A.shape[1], N, inp.base_bias, x.dtype, "fused_fwd",
            )
            if not save_hg:
                hg = None
        saved = (x, inp.lora_A, lora_B, inp.ids, inp.gates, h, hg, base_weight)
        return y, saved, inp.scale_args()

    def backward(self, saved, state, dy, needs):
        x, lora_A, lora_B, ids, gates, h, hg, base_weight = saved
        scale = state
        T, K = x.shape
        E, r, _ = lora_A.shape
        N = lora_B.shape[1]
        dx = dA = dB = dw = dW = db = None

        dh = None
        if needs.x or needs.lora_A or needs.gates:
            dh, dw = dhg_bwd(dy, lora_B, h, ids, gates, scale, need_dh=needs.x or needs.lora_A, need_dw=needs.gates)
        if needs.x:
            base = None
            if base_weight is not None:
                base = (base_weight, base_weight.stride(0), base_weight.stride(1))  # W as [N, K]
            dx = fused_base_lora(
                dy if base_weight is not None else None, base, dh,
                (lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)),  # A_all[c, k] = A[e, j, k]
                r, K, None, x.dtype, "dx",
            )
        if needs.lora_A:
            # dA[c, k] = sum_t dH[t, c] x[t, k]; lora_A [E, r, K] contiguous is [ER, K] row-major.
            dA = matmul_tn(dh, x, (E, r, K), q_div=K, out_strides=(K, 0, 1), role="dA")
        if needs.lora_B:
            # dB[e, n, j] = sum_t dy[t, n] Hg[t, e*r + j]: columns decomposed by (expert, rank).
            dB = matmul_tn(dy, hg, (E, N, r), q_div=r, out_strides=(r, N * r, 1), role="dB")
        if needs.base_weight:
            dW = matmul_tn(dy, x, (N, K), q_div=K, out_strides=(K, 0, 1), role="dW")
        if needs.base_bias:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
            launch_counts["db"] += 1
        return dx, dA, dB, dw, dW, db


DENSE = DenseBackend(decode=False)
DECODE = DenseBackend(decode=True)

lora_mix_dense = entry_point(DENSE, "lora_mix_dense", """\
    Routed multi-LoRA linear on the dense-rank Triton path (shrink kernel + fused base/expand kernel).

    ``lora_mix``'s contract without its validation (ids must lie in ``[0, E)``) and keywords: x
    ``[..., d_in]`` float32 / float16 / bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``), lora_A
    ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, expert_ids (int32/int64) and expert_weights ``[..., k]``,
    scaling a float or ``[E]`` tensor (no gradient), optional base_weight ``[d_out, d_in]`` and base_bias
    ``[d_out]``. Experts and base weights are cast to x's dtype (their grads come back in their own).
    Returns ``[..., d_out]`` in x's dtype; differentiable w.r.t. x, lora_A, lora_B, expert_weights,
    base_weight, base_bias, launching only the backward kernels whose gradients are asked for.
    Best for small ``E*r`` (<= a few hundred): it computes every expert's rank columns for every token.
    """)

lora_mix_decode = entry_point(DECODE, "lora_mix_decode", """\
    Same contract as ``lora_mix_dense`` with a one-launch forward for decode (T <= 64).

    Each N tile recomputes the shrink in the base GEMM's K loop (see the module docstring for why that
    is cheap at decode sizes); when those tiles cannot fill the GPU, K is split and a second launch sums
    the partials in a fixed order. Correct for any T (slow past 64); the rank tile ``pow2(E) * pow2(r)``
    must be at most 128 (``dispatch.DECODE_MAX_RANK_COLS``), else ``ValueError``: wider tiles do not
    fit the kernel's shared memory and registers. The backward is the dense-rank backward.
    """)
