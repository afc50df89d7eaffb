"""The torch path's sorted formulation: only the selected experts' FLOPs, for many experts (``E*r`` >> ``k*r``).

The dense-rank formulation (torch_path.py) computes all ``E*r`` rank columns for every token. Here the
``S = T*k`` token-slots are sorted by expert once (stable), so that each expert's slots are one
contiguous segment, and each expert runs its two skinny GEMMs on its own rows only::

    order, e_sorted  [S]        slots sorted by expert (slot s = (t, j) at t*k + j, token t = s // k)
    coef    = gate * s_e        [S]      per sorted slot
    y       = b (broadcast)              [T, N]
    per expert e, its segment of n_e slots and their tokens tok_e:
      x_e   = x[tok_e]                   [n_e, K]
      h_e   = x_e @ A_e.T                [n_e, r]  (kept in one [S, r] buffer; fp32 for half inputs)
      y.index_add_(0, tok_e, (h_e * coef_e) @ B_e.T)      (duplicate ids add up)
    y      += x @ W.T                    (the base GEMM last: y's rows are still in cache for the adds)

Backward, each product only when some input asks for it::

    per expert:  dy_e = dy[tok_e];  dHg_e = dy_e @ B_e  [n_e, r] (fp32 for half);  dB_e = dy_e.T @ hg_e
    dgate = s_e * sum_r(dHg * h)          [S]     rank-space gate gradients, no [S, N] product
    dH    = dHg * coef                    [S, r]
    dx    = dy @ W;  per expert: dx.index_add_(0, tok_e, dH_e @ A_e);  dA_e = dH_e.T @ x[tok_e]

(``dB`` is built transposed, ``hg_e.T @ dy_e`` into ``[E, r, N]``, and transposed once at the end: the
``[N, r]`` product measured 2x slower at r = 16.)

Why per expert, end to end, and not one gather of all slots ``[S, K]`` and one ``index_add_`` of all
``[S, N]`` rows: the gathered rows and the expanded rows of one expert (about 2 MB at the top2-cpu
shape) are used while they are still in cache; with whole ``[S, .]`` buffers every product is one
more pass through memory, and on the 2-core CPU the whole-buffer version measured up to 1.3x slower
than this (benchmarks/NOTES.md, issue 13 item 3). The rows go through two buffers of one expert's
size, reused across experts (``index_select`` / ``mm`` with ``out=``); a product big enough for oneDNN
(cpu_gemm.py: float32, about a million multiply-adds) returns its own rows instead (measured about 1%
faster than torch's GEMM here, where the products wait on memory more than on arithmetic). The price
is about 4 torch ops per expert and product, each a parallel region when torch runs several threads:
cheap on idle cores, a scheduler tick each when another process holds one (NOTES again).

Reads the per-expert counts on the host (one sync: fine on a CPU, which is where torch_dispatch.py
sends this path; on CUDA only when forced). No Python loop over tokens; the loops run over E.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from . import cpu_gemm
from .contract import HALF_DTYPES, GradNeeds, LoRAMixInputs, torch_base_grads
from .utils import poisoned_empty


class SortedState(NamedTuple):
    """What backward needs besides the saved tensors."""

    counts: List[int]  # [E] slots per expert (host ints): the segments of the sorted slots
    k: int
    gates_dtype: torch.dtype
    uniform: Optional[float]  # the float scaling, or None for a per-expert tensor (saved)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 for half inputs (H and dHg feed the gate gradient, as on the dense path), fp64 for fp64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _segments(counts: List[int]):
    """``(e, start, end)`` of each expert with slots, in sorted-slot order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
            start += n


def sorted_forward(inp: LoRAMixInputs, needs: GradNeeds):
    """``(y [T, N], saved, state)`` of the op on prepared inputs, paying only the selected experts.

    ``saved``: tensors for backward (None where ``needs`` does not ask for them, empty without
    gradients); ``state``: a ``SortedState``.
    """
    x = inp.x  # [T, K]
    T, K = x.shape
    k = inp.ids.shape[1]
    E, r, _ = inp.lora_A.shape
    S = T * k
    acc = _acc_dtype(x)
    up = acc if x.dtype in HALF_DTYPES else None  # H in fp32 for half inputs, as the dense path keeps it
    flat = inp.ids.view(S)
    if flat.dtype != torch.int64:
        flat = flat.long()
    e_sorted, order = torch.sort(flat, stable=True)  # [S], [S]: slots grouped by expert, slot order within
    counts = torch.bincount(flat, minlength=E).tolist()  # [E] host read: the segment bounds
    tok = order // k if k > 1 else order  # [S] token of each sorted slot

    coef = inp.gates.view(S).index_select(0, order).to(acc)  # [S] gate x scaling per sorted slot
    if inp.uniform is None:
        coef.mul_(inp.scaling.index_select(0, e_sorted))
    else:
        coef.mul_(inp.uniform)
    coef_col = coef.unsqueeze(1)  # [S, 1]

    # y starts as the bias (or zeros) and takes the experts' rows first, the base GEMM last (beta = 1, as
    # addmm with a bias runs anyway): the index_add_ passes then find y's rows fresh from its first write
    # instead of evicted by the GEMM, 1-2% of base at top2-cpu (benchmarks/NOTES.md, issue 13 item 3).
    N = inp.lora_B.shape[1]
    if inp.base_bias is not None:
        y = torch.empty(T, N, dtype=x.dtype, device=x.device).copy_(inp.base_bias)  # [T, N], y's own memory
    else:
        y = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    A_t = inp.lora_A.transpose(1, 2)  # [E, K, r] view
    B_t = inp.lora_B.transpose(1, 2)  # [E, r, N] view
    if up is not None:
        A_t = A_t.to(up)
    h = poisoned_empty((S, r), acc, x.device)  # [S, r]: the segments tile it, each row written once
    rows = max(counts) if S else 0  # one expert's rows at most: x rows and expanded rows, reused per expert
    x_buf = poisoned_empty((rows, K), x.dtype, x.device)
    y_buf = poisoned_empty((rows, y.shape[1]), x.dtype, x.device)
    for e, a, b in _segments(counts):
        tok_e, x_e, y_e = tok[a:b], x_buf[:b - a], y_buf[:b - a]
        torch.index_select(x, 0, tok_e, out=x_e)  # [n_e, K]
        cpu_gemm.mm(x_e if up is None else x_e.to(up), A_t[e], out=h[a:b])  # [n_e, r]
        y_e = cpu_gemm.mm_rows((h[a:b] * coef_col[a:b]).to(x.dtype), B_t[e], y_e)  # [n_e, N]
        y.index_add_(0, tok_e, y_e)  # into their tokens (a token's duplicate ids add up)
    if inp.base_weight is not None:
        torch.addmm(y, x, inp.base_weight.t(), out=y)  # [T, N] += x W^T (addmm_ itself: a FLOP counter misses it)

    if not any(needs):
        return y, (), SortedState(counts, k, inp.gates.dtype, inp.uniform)
    lora = needs.x or needs.lora_A or needs.lora_B or needs.gates
    saved = (
        x if (needs.base_weight or needs.lora_A) else None,
        h if lora else None, coef if lora else None,
        order, e_sorted, tok, inp.lora_A, inp.lora_B, inp.base_weight, inp.scaling,
    )
    return y, saved, SortedState(counts, k, inp.gates.dtype, inp.uniform)


def sorted_backward(saved, state: SortedState, dy: torch.Tensor, needs: GradNeeds):
    """``(dx, dA, dB, dgates, dW, db)`` for ``dy [T, N]``, each only when ``needs`` asks for it.

    One loop over the experts: each expert's dy rows are gathered once and feed its dHg and dB; its
    dH rows feed dx and dA. The gate gradients are one vectorised step afterwards.
    """
    x, h, coef, order, e_sorted, tok, lora_A, lora_B, base_weight, scaling = saved
    counts = state.counts
    E, r, K = lora_A.shape
    T, N = dy.shape
    S = tok.shape[0]
    dtype = dy.dtype
    up = h.dtype if dtype in HALF_DTYPES else None  # dHg in fp32 for half inputs: it feeds the gate gradients
    dx = dA = dB = dw = dhg = None
    need_dh = needs.x or needs.lora_A
    need_dhg = need_dh or needs.gates
    if not (need_dhg or needs.lora_B):
        dW, db = torch_base_grads(dy, x, needs)
        return dx, dA, dB, dw, dW, db

    coef_col = coef.unsqueeze(1)  # [S, 1]
    rows = max(counts) if S else 0  # one expert's rows at most, reused per expert
    dy_buf = poisoned_empty((rows, N), dtype, dy.device)
    k_buf = poisoned_empty((rows, K), dtype, dy.device) if need_dh else None  # dx rows, then x rows
    if need_dhg:
        dhg = poisoned_empty((S, r), h.dtype, dy.device)  # [S, r]: the segments tile it
    B_up = lora_B if up is None else lora_B.to(up)
    if needs.x:
        if base_weight is not None:
            dx = dy @ base_weight  # [T, K]
        else:
            dx = torch.zeros(T, K, dtype=dtype, device=dy.device)
    empty = poisoned_empty if all(counts) else torch.zeros  # experts without slots get zero dA / dB
    if needs.lora_A:
        dA = empty((E, r, K), dtype=dtype, device=dy.device)
    if needs.lora_B:  # dB transposed, [E, r, N]: as [N, r] with r = 16 the product measured 2x slower on a CPU
        dB_t = empty((E, r, N), dtype=dtype, device=dy.device)

    for e, a, b in _segments(counts):
        tok_e, dy_e = tok[a:b], dy_buf[:b - a]
        torch.index_select(dy, 0, tok_e, out=dy_e)  # [n_e, N]
        if need_dhg:
            cpu_gemm.mm(dy_e if up is None else dy_e.to(up), B_up[e], out=dhg[a:b])  # [n_e, r]
        if needs.lora_B:
            cpu_gemm.mm((h[a:b] * coef_col[a:b]).to(dtype).t(), dy_e, out=dB_t[e])  # [r, N]
        if need_dh:
            dh_e = (dhg[a:b] * coef_col[a:b]).to(dtype)  # [n_e, r]
            k_e = k_buf[:b - a]
            if needs.x:
                dx.index_add_(0, tok_e, cpu_gemm.mm_rows(dh_e, lora_A[e], k_e))  # [n_e, K] rows into their tokens
            if needs.lora_A:
                torch.index_select(x, 0, tok_e, out=k_e)  # [n_e, K]
                cpu_gemm.mm(dh_e.t(), k_e, out=dA[e])  # [r, K]

    if needs.lora_B:
        dB = dB_t.transpose(1, 2).contiguous()  # [E, N, r]
    if needs.gates:
        g = (dhg * h).sum(1)  # [S]: rank-space gate gradient, before the scaling
        if state.uniform is None:
            g.mul_(scaling.index_select(0, e_sorted))
        else:
            g.mul_(state.uniform)
        # back to slot order; order is a permutation, so every element is written
        dw = poisoned_empty((S,), g.dtype, g.device).index_copy_(0, order, g)
        dw = dw.to(state.gates_dtype).view(T, state.k)
    dW, db = torch_base_grads(dy, x, needs)
    return dx, dA, dB, dw, dW, db
