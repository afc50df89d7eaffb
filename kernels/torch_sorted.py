"""The torch path's sorted formulation: only the selected experts' FLOPs, for many experts (``E*r`` >> ``k*r``).

The dense-rank formulation (torch_path.py) computes all ``E*r`` rank columns for every token. Here the
``S = T*k`` token-slots are sorted by expert once (stable), so that each expert's slots are one
contiguous segment of rows, and each expert's two skinny GEMMs run on its own rows only::

    order, e_sorted  [S]        slots sorted by expert (slot s = (t, j) at t*k + j, token t = s // k)
    xg      = x[tok]            [S, K]   one gather of x in sorted-slot order
    h_e     = xg_e @ A_e.T      [n_e, r] per expert segment, into one [S, r] buffer (fp32 for half inputs)
    hg      = h * gate * s_e    [S, r]
    ys_e    = hg_e @ B_e.T      [n_e, N] per expert segment, into one [S, N] buffer
    y       = x @ W.T + b, then y.index_add_(0, tok, ys)        (one scatter-add: duplicate ids add up)

Backward, each product only when some input asks for it::

    dyg   = dy[tok]                       [S, N]  one gather
    dHg_e = dyg_e @ B_e                   [n_e, r] (fp32 for half inputs)
    dgate = s_e * sum_r(dHg * h)          [S]     rank-space gate gradients, no [S, N] product
    dH    = dHg * gate * s_e              [S, r]
    dx    = dy @ W, then dx.index_add_(0, tok, dH_e @ A_e)
    dA_e  = dH_e.T @ xg_e,  dB_e = dyg_e.T @ hg_e

Every row of the ``[S, .]`` buffers belongs to exactly one expert's segment, so each is written once
(``poisoned_empty``: tests fill them with NaN first). The loop is over the E experts (two ``mm`` per
product), never over tokens. Why not one ``bmm`` on padded segments, which needs 2 ops instead of 2E:
measured on a CPU at 1 thread it was slower (the padding rows, the spare output row), and the op
count only matters when the threads wait for each other (benchmarks/NOTES.md, issue 13 item 3).

Reads the per-expert counts on the host (one sync: fine on a CPU, which is where torch_dispatch.py
sends this path; on CUDA only when forced).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .contract import GradNeeds, LoRAMixInputs, torch_base_grads
from .utils import poisoned_empty

_HALF = (torch.float16, torch.bfloat16)


class SortedState(NamedTuple):
    """What backward needs besides the saved tensors."""

    counts: List[int]  # [E] slots per expert (host ints): the segments of the sorted rows
    T: int
    gates_dtype: torch.dtype
    uniform: Optional[float]  # the float scaling, or None for a per-expert tensor (saved)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 for half inputs (H and dHg feed the gate gradient, as on the dense path), fp64 for fp64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_expert_mm(a: torch.Tensor, w: torch.Tensor, counts: List[int], out_dtype: torch.dtype) -> torch.Tensor:
    """``a [S, p]`` (rows in expert segments of ``counts``) times each segment's ``w [E, p, q]`` -> ``[S, q]``.

    One ``mm`` per expert with rows, written into its slice of one buffer: the segments tile all S
    rows, so every row is written (no zero fill).
    """
    out = poisoned_empty((a.shape[0], w.shape[2]), out_dtype, a.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[start:start + n], w[e], out=out[start:start + n])
            start += n
    return out


def _per_expert_tn(a: torch.Tensor, b: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """``a_e.T @ b_e`` per expert segment (the experts' weight gradients): ``a [S, p]``, ``b [S, q]`` ->
    ``[E, p, q]``; experts without slots get zeros."""
    E, p, q = len(counts), a.shape[1], b.shape[1]
    if all(counts):
        out = poisoned_empty((E, p, q), a.dtype, a.device)
    else:
        out = torch.zeros(E, p, q, dtype=a.dtype, device=a.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[start:start + n].t(), b[start:start + n], out=out[e])
            start += n
    return out


def sorted_forward(inp: LoRAMixInputs, needs: GradNeeds):
    """``(y [T, N], saved, state)`` of the op on prepared inputs, paying only the selected experts.

    ``saved``: tensors for backward (None where ``needs`` does not ask for them, empty without
    gradients); ``state``: a ``SortedState``.
    """
    x = inp.x  # [T, K]
    T, K = x.shape
    k = inp.ids.shape[1]
    E = inp.lora_A.shape[0]
    S = T * k
    acc = _acc_dtype(x)
    flat = inp.ids.view(S)
    if flat.dtype != torch.int64:
        flat = flat.long()
    e_sorted, order = torch.sort(flat, stable=True)  # [S], [S]: slots grouped by expert, slot order within
    counts = torch.bincount(flat, minlength=E).tolist()  # [E] host read: the segment bounds
    tok = order // k if k > 1 else order  # [S] token of each sorted slot
    state = SortedState(counts, T, inp.gates.dtype, inp.uniform)

    coef = inp.gates.view(S).index_select(0, order).to(acc)  # [S] gate x scaling per sorted slot
    if inp.uniform is None:
        coef.mul_(inp.scaling.index_select(0, e_sorted))
    else:
        coef.mul_(inp.uniform)

    xg = x.index_select(0, tok)  # [S, K]
    A_t = inp.lora_A.transpose(1, 2)  # [E, K, r] view
    if x.dtype in _HALF:  # H in fp32, as the dense path keeps it
        h = _per_expert_mm(xg.float(), A_t.float(), counts, acc)
    else:
        h = _per_expert_mm(xg, A_t, counts, acc)  # [S, r]
    hg = (h * coef.unsqueeze(1)).to(x.dtype)  # [S, r]
    ys = _per_expert_mm(hg, inp.lora_B.transpose(1, 2), counts, x.dtype)  # [S, N]

    if inp.base_weight is None:
        y = torch.zeros(T, ys.shape[1], dtype=x.dtype, device=x.device)
    elif inp.base_bias is not None:
        y = torch.addmm(inp.base_bias, x, inp.base_weight.t())  # [T, N]
    else:
        y = x @ inp.base_weight.t()
    y.index_add_(0, tok, ys)

    if not any(needs):
        return y, (), state
    lora = needs.x or needs.lora_A or needs.lora_B or needs.gates
    saved = (
        x if needs.base_weight else None,
        xg if needs.lora_A else None,
        h if lora else None, coef if lora else None,
        order, e_sorted, tok, inp.lora_A, inp.lora_B, inp.base_weight, inp.scaling,
    )
    return y, saved, state


def sorted_backward(saved, state: SortedState, dy: torch.Tensor, needs: GradNeeds):
    """``(dx, dA, dB, dgates, dW, db)`` for ``dy [T, N]``, each only when ``needs`` asks for it."""
    x, xg, h, coef, order, e_sorted, tok, lora_A, lora_B, base_weight, scaling = saved
    counts, T = state.counts, state.T
    dtype = dy.dtype
    dx = dA = dB = dw = None
    if needs.x or needs.lora_A or needs.lora_B or needs.gates:
        dyg = dy.index_select(0, tok)  # [S, N]
        if needs.x or needs.lora_A or needs.gates:
            if dtype in _HALF:  # dHg in fp32: it feeds the gate gradients
                dhg = _per_expert_mm(dyg.float(), lora_B.float(), counts, h.dtype)
            else:
                dhg = _per_expert_mm(dyg, lora_B, counts, h.dtype)  # [S, r]
            if needs.gates:
                g = (dhg * h).sum(1)  # [S]: rank-space gate gradient, before the scaling
                if state.uniform is None:
                    g.mul_(scaling.index_select(0, e_sorted))
                else:
                    g.mul_(state.uniform)
                S = order.shape[0]
                # back to slot order; order is a permutation, so every element is written
                dw = poisoned_empty((S,), g.dtype, g.device).index_copy_(0, order, g)
                dw = dw.to(state.gates_dtype).view(T, S // T)
            if needs.x or needs.lora_A:
                dh = (dhg * coef.unsqueeze(1)).to(dtype)  # [S, r]
                if needs.x:
                    if base_weight is not None:
                        dx = dy @ base_weight  # [T, K]
                    else:
                        dx = torch.zeros(T, lora_A.shape[2], dtype=dtype, device=dy.device)
                    dx.index_add_(0, tok, _per_expert_mm(dh, lora_A, counts, dtype))
                if needs.lora_A:
                    dA = _per_expert_tn(dh, xg, counts)  # [E, r, K]
        if needs.lora_B:
            hg = (h * coef.unsqueeze(1)).to(dtype)  # [S, r]
            dB = _per_expert_tn(dyg, hg, counts)  # [E, N, r]
    dW, db = torch_base_grads(dy, x, needs)
    return dx, dA, dB, dw, dW, db
