"""Grouped Triton path of the routed multi-LoRA linear (large ``E*r``, sparse top-k): launchers and backend.

Token-slots (``s = t*k + j``) are sorted by expert into ``BLOCK_M`` tiles that never mix experts
(grouping.py), so each tile is a dense matmul against one expert; only the ``k`` chosen experts of a
token are ever read (kernels in grouped_kernels.py). Notation: T tokens, K = d_in, N = d_out, E experts
of rank r, top-k, S = T*k slots,
``e(s)`` the expert of slot s, ``tok(s) = s // k``, ``g(s) = w[s] * scaling[e(s)]`` (gate times scaling),
rows of ``h``/``dh`` live in the padded sorted order (``capacity`` rows, padding rows masked).

Forward::

    h[s]       = x[tok(s)] @ A[e(s)].T                 grouped shrink, split-K over K   [S, r]  (fp32)
    ys[s]      = g(s) * h[s] @ B[e(s)].T               grouped expand, g in the epilogue [S, N]
    y[t]       = x[t] @ W.T + b + sum_j ys[t*k + j]    base by cuBLAS, slots summed in a fixed order

Backward (each piece only when an input asks for it)::

    dh[s]      = dy[tok(s)] @ B[e(s)]                  grouped shrink, split-K over N    [S, r]
    dw[s]      = scaling[e(s)] * <dh[s], h[s]>         epilogue of the dh reduction (rank space)
    dx[t]      = dy[t] @ W + sum_j g(s) dh[s] @ A[e(s)]  grouped expand + fixed-order slot sum
    dA[e]      = sum_{s in e} (g(s) dh[s])^T x[tok(s)]   grouped outer product, loop over e's tiles
    dB[e]      = sum_{s in e} dy[tok(s)]^T (g(s) h[s])   same kernel, transposed store
    dW, db     = dy^T x, sum_t dy                        cuBLAS / torch

Determinism: no float atomics anywhere. Split-K partial sums go to ``[SPLIT, capacity, r]`` buffers and
are added in split order; a token's k slots are added in j order; expert weight grads loop over the
expert's tiles in order (optionally in SPLIT_M chunks added in chunk order). The only integer counting
(grouping) is exact. Same inputs and same autotuned configs give bit-identical outputs and gradients.

Why the base GEMM is not fused here: it is ``T*K*N`` FLOPs against ``T*k*r*(K+N)`` for the LoRA part
(r=16, k=2: ~1.5%); cuBLAS runs it at the machine's peak, and a fused Triton GEMM would have to match
that (TMA/wgmma pipelines) to pay. ``torch.addmm`` writes ``y``, and the slot contributions are added
into it by the combine pass that has to run anyway (or, for k=1, by the expand epilogue in place).

Why slot outputs go through a ``[S, N]`` buffer for k > 1: two slots of one token live in different
expert tiles (different programs); adding them straight into ``y`` would need float atomics, whose
order varies run to run. Determinism costs one write and one read of ``S*N`` elements in x's dtype
(the combine pass also folds in the base result, so y itself is written once more, not twice). For
k = 1 a token has one slot, so the expand adds into y directly and there is no buffer or combine.

Launches, forward: grouping 2 (3 when S needs more than 32 slot blocks), shrink 1 (split-K partials are
summed inside the expand), expand 1, combine 1 (k > 1), addmm 1 (with a base). Backward adds, per
requested group: dh shrink 1 (+1 split reduction with the gate-grad epilogue), dx expand 1 + combine 1
(k > 1) + mm 1 (base), dA 1 and dB 1 (+1 each when split over tiles).

Sync-free: launch sizes come from shapes (``capacity`` upper bounds); unused tiles exit on device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .contract import Backend, ScaleArgs, entry_point, torch_base_grads
from .grouped_kernels import (
    _combine_slots_kernel,
    _grouped_expand_kernel,
    _grouped_outer_kernel,
    _grouped_shrink_kernel,
    _split_reduce_kernel,
    _sum_splits_kernel,
)
from .grouping import GroupingMeta, grouping_metadata
from .tuning import pinned_config, token_bucket
from .utils import dot_precision, num_sms, poisoned_empty


# ----------------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------------


def _block_m(num_slots: int, num_experts: int) -> int:
    """Tile height for the grouped kernels (one per call: the grouping metadata is built for it).

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


def _est_tiles(meta: GroupingMeta) -> int:
    """Upper bound on tiles with work, known without a sync (used tiles <= S/BM + used experts)."""
    S, E, BM = meta.num_slots, meta.num_experts, meta.block_m
    return min(meta.num_blocks, triton.cdiv(S, BM) + min(E, S))


def _choose_split(reduce_dim: int, tiles: int, device: torch.device) -> int:
    """Split-K factor for a grouped shrink: enough programs to fill the GPU twice over, each split
    still streaming at least 256 elements of the reduced dimension, at most 16 (the partial buffer)."""
    want = triton.cdiv(2 * num_sms(device), max(1, tiles))
    return int(max(1, min(want, reduce_dim // 256, 16)))


def _choose_outer_split(num_experts: int, width: int, meta: GroupingMeta, device: torch.device) -> int:
    """Chunks per expert for dA/dB: only when E * (D / 128) programs cannot fill the GPU, and only as
    many as the mean expert has tiles of work for (partial buffers are [SPLIT, E, r, D] fp32)."""
    programs = num_experts * triton.cdiv(width, 128)
    want = triton.cdiv(2 * num_sms(device), programs)
    mean_tiles = triton.cdiv(meta.num_slots, num_experts * meta.block_m)
    return int(max(1, min(want, mean_tiles, 8)))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def grouped_shrink(
    src: torch.Tensor,
    weight: torch.Tensor,
    meta: GroupingMeta,
    *,
    split: int,
    num_tokens: int,
    dw_args: Optional[Tuple[torch.Tensor, torch.Tensor, ScaleArgs]] = None,
    reduce: bool = True,
) -> torch.Tensor:
    """``out[p] = src[tok(p)] @ weight[e(p)].T`` for every padded sorted row p of a used tile.

    Args:
        src: ``[T, D]`` (x, or dy in backward).
        weight: ``[E, r, D]`` view with any strides (A, or ``B.transpose(1, 2)``).
        meta: grouping metadata; ``split``: split-K factor over D.
        dw_args: ``(h [CAP, r] fp32, dw [S] out, scale)`` (``scale``: ``LoRAMixInputs.scale_args()``) to
            also write the gate grads ``dw[s] = scaling[e] * <out[p], h[p]>`` (backward).
        reduce: sum the split partials here (``[CAP, r]``); False returns them as ``[SPLIT, CAP, r]``
            for a consumer that sums them itself (``grouped_expand``); not with ``dw_args``.

    Returns:
        ``[CAP, r]`` (or ``[SPLIT, CAP, r]``) fp32 rows (padding rows 0, rows of unused tiles unwritten).
    """
    if dw_args is not None and not reduce:
        raise ValueError("grouped_shrink: the gate-grad epilogue needs reduce=True")
    T, D = src.shape
    E, r, _ = weight.shape
    CAP = meta.capacity
    part = poisoned_empty((split, CAP, r), torch.float32, src.device)
    want_dw = dw_args is not None
    h, dw, (scale_t, scale_v, per_expert) = dw_args if want_dw else (part, part, (part, 1.0, False))
    BR = _block_r(r)
    _grouped_shrink_kernel[(meta.num_blocks, split)](
        src, weight, part, meta.sorted_slots, meta.block_expert, h, dw, scale_t, scale_v,
        D, r, meta.top_k, CAP, token_bucket(num_tokens),
        src.stride(0), src.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        SPLIT=split, DW_EPILOGUE=want_dw and split == 1, PER_EXPERT_SCALE=per_expert,
        DOT_PRECISION=dot_precision(src.dtype), BLOCK_M=meta.block_m, BLOCK_R=BR,
    )
    if not reduce:
        return part
    if split == 1:
        return part[0]
    final = poisoned_empty((CAP, r), torch.float32, src.device)
    _split_reduce_kernel[(meta.num_blocks,)](
        part, final, meta.sorted_slots, meta.block_expert, h, dw, scale_t, scale_v, r, CAP,
        SPLIT=split, DW_EPILOGUE=want_dw, PER_EXPERT_SCALE=per_expert, BLOCK_M=meta.block_m, BLOCK_R=BR,
        num_warps=8 if meta.block_m * BR > 4096 else 4,  # [BM, BR] fp32 tiles: 4 warps spilled at r = 128
    )
    return final


def grouped_expand(
    h: torch.Tensor,
    weight: torch.Tensor,
    meta: GroupingMeta,
    gates: torch.Tensor,
    scale: ScaleArgs,
    out: torch.Tensor,
    *,
    accumulate: bool,
    num_tokens: int,
    h_out: Optional[torch.Tensor] = None,
) -> None:
    """``out[s] (+)= g(s) * h[p(s)] @ weight[e(s)].T`` for every slot s, written in place.

    Args:
        h: ``[SPLIT, CAP, r]`` fp32 split partials (summed here in split order) or ``[CAP, r]``.
        weight: ``[E, N, r]`` view with any strides (B, or ``A.transpose(1, 2)`` for dx).
        gates: ``[S]`` gate per slot; ``scale``: ``LoRAMixInputs.scale_args()``.
        out: ``[S, N]``, row = slot (for k == 1 pass y / dx itself: slot == token).
        accumulate: add into out instead of overwriting (each row has exactly one writer).
        h_out: ``[CAP, r]`` fp32 to store the summed h (for backward), or None.
    """
    if h.dim() == 2:
        h = h.unsqueeze(0)
    split = h.shape[0]
    E, N, r = weight.shape
    scale_t, scale_v, per_expert = scale
    grid = lambda META: (meta.num_blocks, triton.cdiv(N, META["BLOCK_N"]))  # noqa: E731
    _grouped_expand_kernel[grid](
        h, weight, out, h_out if h_out is not None else h, gates, scale_t,
        meta.sorted_slots, meta.block_expert, scale_v,
        N, r, meta.capacity, token_bucket(num_tokens),
        weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0), out.stride(1),
        SPLIT=split, STORE_H=h_out is not None, ACCUMULATE=accumulate, PER_EXPERT_SCALE=per_expert,
        DOT_PRECISION=dot_precision(weight.dtype), BLOCK_M=meta.block_m, BLOCK_R=_block_r(r),
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
    meta: GroupingMeta,
    gates: torch.Tensor,
    scale: ScaleArgs,
    *,
    transposed: bool,
    num_tokens: int,
) -> torch.Tensor:
    """Expert weight grads ``G[e] = sum_{s in e} (g(s) lr[p(s)])^T wide[tok(s)]``, ``[E, r, D]``.

    Args:
        lr: ``[CAP, r]`` fp32 rank rows (dh for dA, h for dB); wide: ``[T, D]`` (x for dA, dy for dB).
        transposed: return ``[E, D, r]`` (dB's layout) instead of ``[E, r, D]``.

    Returns:
        the gradient in wide's dtype, contiguous in the requested layout.
    """
    T, D = wide.shape
    r = lr.shape[1]
    E = meta.num_experts
    split = _choose_outer_split(E, D, meta, wide.device)
    final_shape = (E, D, r) if transposed else (E, r, D)
    final = poisoned_empty(final_shape, wide.dtype, wide.device)
    part = final.unsqueeze(0) if split == 1 else poisoned_empty((split,) + final_shape, torch.float32, wide.device)
    # kernel addresses [SPLIT, E, r, D]; the transposed layout is the same memory with r and D swapped
    part_v = part.transpose(2, 3) if transposed else part
    scale_t, scale_v, per_expert = scale
    grid = lambda META: (E, triton.cdiv(D, META["BLOCK_D"]), split)  # noqa: E731
    _grouped_outer_kernel[grid](
        lr, wide, part_v, gates, scale_t, meta.sorted_slots, meta.padded_offsets, scale_v,
        D, r, meta.top_k, token_bucket(num_tokens),
        wide.stride(0), wide.stride(1),
        part_v.stride(0), part_v.stride(1), part_v.stride(2), part_v.stride(3),
        SPLIT=split, PER_EXPERT_SCALE=per_expert, DOT_PRECISION=dot_precision(wide.dtype),
        BLOCK_M=meta.block_m, BLOCK_R=_block_r(r),
    )
    if split > 1:
        numel = final.numel()
        BLOCK = 1024
        _sum_splits_kernel[(triton.cdiv(numel, BLOCK),)](part, final, numel, SPLIT=split, BLOCK=BLOCK, num_warps=4)
    return final


# ----------------------------------------------------------------------------------------------------
# Backend
# ----------------------------------------------------------------------------------------------------


class GroupedBackend(Backend):
    """Grouped Triton backend (deterministic, no host sync)."""

    name = "grouped"

    def forward(self, inp, needs):
        x, lora_A, lora_B, base_weight, base_bias = inp.x, inp.lora_A, inp.lora_B, inp.base_weight, inp.base_bias
        T, K = x.shape  # x: [T, K]
        E, r, _ = lora_A.shape
        N = lora_B.shape[1]
        k = inp.ids.shape[1]
        S = T * k
        scale = inp.scale_args()

        meta = grouping_metadata(inp.ids, E, _block_m(S, E))
        gates = inp.gates.view(-1)  # [S]

        split = _choose_split(K, _est_tiles(meta), x.device)
        # with split-K the partials are summed inside the expand kernel (one launch less for decode),
        # which also stores the summed h when backward will need it (dB, gate grads)
        h_part = grouped_shrink(x, lora_A, meta, split=split, num_tokens=T, reduce=False)  # [SPLIT, CAP, r]
        save_h = needs.lora_B or needs.gates
        if split == 1:
            h, h_out = h_part[0], None
        else:
            h = h_out = poisoned_empty((meta.capacity, r), torch.float32, x.device) if save_h else None

        if base_weight is not None:
            y = torch.addmm(base_bias, x, base_weight.t()) if base_bias is not None else x @ base_weight.t()
        else:
            y = None
        if k == 1:
            out = y if y is not None else poisoned_empty((T, N), x.dtype, x.device)
            grouped_expand(h_part, lora_B, meta, gates, scale, out, accumulate=y is not None, num_tokens=T,
                           h_out=h_out)
            y = out
        else:
            ys = poisoned_empty((S, N), x.dtype, x.device)
            grouped_expand(h_part, lora_B, meta, gates, scale, ys, accumulate=False, num_tokens=T, h_out=h_out)
            y = combine_slots(ys, y, T, k)

        saved = (
            x if (needs.lora_A or needs.base_weight) else None,
            lora_A if needs.x else None,
            lora_B if (needs.x or needs.lora_A or needs.gates) else None,
            gates if (needs.x or needs.lora_A or needs.lora_B) else None,
            h if save_h else None,
            base_weight if needs.x else None,
            meta.sorted_slots, meta.slot_to_sorted, meta.block_expert, meta.expert_offsets, meta.padded_offsets,
        )
        state = ((meta.num_slots, meta.top_k, meta.num_experts, meta.block_m), scale, (T, K, N, E, r, k),
                 inp.gates.dtype)
        return y, saved, state

    def backward(self, saved, state, dy, needs):
        x, lora_A, lora_B, gates, h, base_weight, *meta_t = saved
        meta_ints, scale, (T, K, N, E, r, k), gates_dtype = state
        meta = GroupingMeta(*meta_t, *meta_ints)
        S = T * k
        dx = dA = dB = dw = None

        dh = None
        if needs.x or needs.lora_A or needs.gates:
            split = _choose_split(N, _est_tiles(meta), dy.device)
            if needs.gates:
                dw = poisoned_empty((S,), gates_dtype, dy.device)
                dw_args = (h, dw, scale)
            else:
                dw_args = None
            # dh[p] = dy[tok(p)] @ B[e(p)]: B [E, N, r] seen as [E, r, N]
            dh = grouped_shrink(dy, lora_B.transpose(1, 2), meta, split=split, num_tokens=T, dw_args=dw_args)
            if needs.gates:
                dw = dw.view(T, k)
        if needs.x:
            base_dx = dy @ base_weight if base_weight is not None else None  # [T, K]
            a_t = lora_A.transpose(1, 2)  # [E, K, r]
            if k == 1:
                dx = base_dx if base_dx is not None else poisoned_empty((T, K), dy.dtype, dy.device)
                grouped_expand(dh, a_t, meta, gates, scale, dx, accumulate=base_dx is not None, num_tokens=T)
            else:
                dxs = poisoned_empty((S, K), dy.dtype, dy.device)
                grouped_expand(dh, a_t, meta, gates, scale, dxs, accumulate=False, num_tokens=T)
                dx = combine_slots(dxs, base_dx, T, k)
        if needs.lora_A:
            dA = grouped_outer(dh, x, meta, gates, scale, transposed=False, num_tokens=T)  # [E, r, K]
        if needs.lora_B:
            dB = grouped_outer(h, dy, meta, gates, scale, transposed=True, num_tokens=T)  # [E, N, r]
        dW, db = torch_base_grads(dy, x, needs)
        return dx, dA, dB, dw, dW, db


GROUPED = GroupedBackend()

lora_mix_grouped = entry_point(GROUPED, "lora_mix_grouped", """\
    Routed multi-LoRA linear on the grouped Triton path (no validation: ``lora_mix`` does that).

    ``y = x @ W.T + b + sum_j w[..., j] * s[e_j] * (x @ A[e_j].T) @ B[e_j].T`` with ``e_j = expert_ids[..., j]``.

    Args:
        x: ``[..., d_in]`` float32 / float16 / bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        lora_A: ``[E, r, d_in]``; lora_B: ``[E, d_out, r]`` (cast to x's dtype).
        expert_ids: ``[..., k]`` int32/int64 in ``[0, E)``; duplicates within a token add up.
        expert_weights: ``[..., k]`` gates (their grad comes back in their dtype).
        scaling: float or ``[E]`` per-expert tensor (no gradient).
        base_weight: optional ``[d_out, d_in]``; base_bias: optional ``[d_out]`` (cast to x's dtype).

    Returns:
        ``[..., d_out]`` in x's dtype; differentiable w.r.t. x, lora_A, lora_B, expert_weights,
        base_weight, base_bias, computing only the gradients asked for. Deterministic, no host sync.
    """)


__all__ = ["GROUPED", "GroupedBackend", "lora_mix_grouped", "grouped_shrink", "grouped_expand", "grouped_outer",
           "combine_slots"]
