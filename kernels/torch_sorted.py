"""The torch path's sorted formulation: only the selected experts' FLOPs, for many experts (``E*r`` >> ``k*r``).

The dense-rank formulation (torch_path.py) computes all ``E*r`` rank columns for every token. Here the
``S = T*k`` token-slots are sorted by expert once (stable), so that each expert's slots are one block
of rows, and each expert's two skinny GEMMs run on its own rows only::

    order, e_sorted  [S]        slots sorted by expert (slot s = (t, j) at t*k + j, token t = s // k)
    rows             R rows     the expert blocks: padded to m = max count rows each (R = E*m), or
                                ragged (R = S, one segment per expert) when padding would cost too much
    xg      = x[tok]            [R, K]   padding rows zero
    h       = xg @ A_e.T        [R, r]   fp32 for half inputs (it feeds the gate gradients)
    hg      = h * gate * s_e    [R, r]   (zero on padding rows)
    y       = x @ W.T + b, then y.index_add_(0, tok, hg @ B_e.T)   ([R, N] rows; padding goes to a spare row)

Backward, each product only when some input asks for it::

    dyg   = dy[tok]                       [R, N]  padding rows zero
    dHg   = dyg @ B_e                     [R, r]  fp32 for half inputs
    dgate = s_e * sum_r(dHg * h)          [S]     rank-space gate gradients, no [S, N] product
    dH    = dHg * gate * s_e              [R, r]
    dx    = dy @ W, then dx.index_add_(0, tok, dH @ A_e)
    dA_e  = dH_e.T @ xg_e,  dB_e = dyg_e.T @ hg_e

Why two layouts: every torch op on a CPU is a parallel region, and at 2 threads each one waits for
both threads; the padded layout runs all experts' GEMMs as one ``bmm`` (one region instead of E), at
the price of ``E*m - S`` zero rows. With balanced routing that is a few percent of the rows; with
skewed routing (one busy expert) it could be most of them, so past ``PAD_LIMIT`` the experts run as
a loop of ``mm`` on their own segments, written into slices of one preallocated buffer.

Reads the per-expert counts on the host (one sync: fine on a CPU, which is where torch_dispatch.py
sends this path). No autograd inside; no Python loop over tokens (the ragged layout loops over E).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .contract import GradNeeds, LoRAMixInputs, torch_base_grads
from .utils import poisoned_empty

_HALF = (torch.float16, torch.bfloat16)
# Padded layout while its rows E*m are at most this many times the S slots; ragged beyond. Padding
# rows cost GEMM rows and gathered bytes (about (PAD_LIMIT - 1) of the LoRA work at worst), the
# ragged loop costs 2E parallel regions per product instead of 2 (see the module docstring).
PAD_LIMIT = 1.25


class SortedState(NamedTuple):
    """What backward needs besides the saved tensors: the layout and the gates' dtype."""

    counts: List[int]  # [E] slots per expert (host ints)
    m: Optional[int]  # rows per expert in the padded layout, None for the ragged one
    padded_rows: bool  # some padding rows exist (they must be zeroed in gathered tensors)
    T: int
    gates_dtype: torch.dtype
    uniform: Optional[float]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_expert_mm(a: torch.Tensor, w: torch.Tensor, state: SortedState, out_dtype: torch.dtype) -> torch.Tensor:
    """``a [R, p]`` (expert blocks of rows) times each block's expert matrix ``w [E, p, q]`` -> ``[R, q]``.

    Padded: one ``bmm`` on ``[E, m, p]``. Ragged: one ``mm`` per expert with tokens, into a slice of one
    buffer; the segments tile all R rows, so every row is written.
    """
    E, p, q = w.shape
    R = a.shape[0]
    if state.m is not None:
        return torch.bmm(a.view(E, state.m, p), w).view(R, q)
    out = poisoned_empty((R, q), out_dtype, a.device)
    start = 0
    for e, n in enumerate(state.counts):
        if n:
            torch.mm(a[start:start + n], w[e], out=out[start:start + n])
            start += n
    return out


def _per_expert_tn(a: torch.Tensor, b: torch.Tensor, state: SortedState) -> torch.Tensor:
    """``a_e.T @ b_e`` per expert block (the weight gradients): ``a [R, p]``, ``b [R, q]`` -> ``[E, p, q]``.

    Padded: one ``bmm`` (padding rows of ``a`` or ``b`` are zero, so they add nothing). Ragged: one ``mm``
    per expert with tokens; experts without tokens get zeros.
    """
    E, R, p, q = len(state.counts), a.shape[0], a.shape[1], b.shape[1]
    if state.m is not None:
        return torch.bmm(a.view(E, state.m, p).transpose(1, 2), b.view(E, state.m, q))
    if all(state.counts):
        out = poisoned_empty((E, p, q), a.dtype, a.device)
    else:
        out = torch.zeros(E, p, q, dtype=a.dtype, device=a.device)
    start = 0
    for e, n in enumerate(state.counts):
        if n:
            torch.mm(a[start:start + n].t(), b[start:start + n], out=out[e])
            start += n
    assert start == R
    return out


def _gather_rows(src: torch.Tensor, tok_g: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """``src[tok_g]`` ``[R, d]`` with the padding rows (``pad``) set to zero, so that they add nothing."""
    out = src.index_select(0, tok_g)
    if pad is not None:
        out.index_fill_(0, pad, 0)
    return out


def sorted_forward(inp: LoRAMixInputs, needs: GradNeeds):
    """``(y [T, N], saved, state)`` of the op on prepared inputs, paying only the selected experts.

    ``saved``: tensors for backward (None where ``needs`` does not ask for them); ``state``: a
    ``SortedState``. Without gradients asked for, ``saved`` is empty.
    """
    x = inp.x  # [T, K]
    T, K = x.shape
    k = inp.ids.shape[1]
    E, r, _ = inp.lora_A.shape
    S = T * k
    acc = _acc_dtype(x)
    flat = inp.ids.view(S)
    if flat.dtype != torch.int64:
        flat = flat.long()
    e_sorted, order = torch.sort(flat, stable=True)  # [S], [S]: slots grouped by expert, in slot order within
    counts = torch.bincount(flat, minlength=E).tolist()  # host read: one sync
    tok = order // k if k > 1 else order  # [S] token of each sorted slot
    m = max(counts)
    if E * m <= PAD_LIMIT * S:  # padded layout: expert e's slots at rows e*m .. e*m + count_e
        R = E * m
        starts = [0] * E
        for e in range(1, E):
            starts[e] = starts[e - 1] + counts[e - 1]
        shift = torch.tensor([e * m - starts[e] for e in range(E)], dtype=torch.int64, device=x.device)
        row = torch.arange(S, device=x.device).add_(shift.index_select(0, e_sorted))  # [S] row of each sorted slot
        padded_rows = R > S
        state = SortedState(counts, m, padded_rows, T, inp.gates.dtype, inp.uniform)
    else:  # ragged: the sorted slots are the rows
        R, row, padded_rows = S, None, False
        state = SortedState(counts, None, False, T, inp.gates.dtype, inp.uniform)
    if padded_rows:
        tok_g = torch.zeros(R, dtype=torch.int64, device=x.device).index_copy_(0, row, tok)  # [R] gather index
        tok_s = torch.full((R,), T, dtype=torch.int64, device=x.device).index_copy_(0, row, tok)  # T: the spare row
        pad = (tok_s == T).nonzero().view(-1)  # [R - S] padding rows
    else:
        tok_g = tok_s = tok if row is None else torch.empty_like(tok).index_copy_(0, row, tok)
        pad = None

    # Gate x scaling per sorted slot, then per row (zero on padding rows).
    coef = inp.gates.view(S).index_select(0, order).to(acc)  # [S]
    if inp.uniform is None:
        coef.mul_(inp.scaling.index_select(0, e_sorted))
    else:
        coef.mul_(inp.uniform)
    if row is not None:
        coef = torch.zeros(R, dtype=acc, device=x.device).index_copy_(0, row, coef)  # [R]

    xg = _gather_rows(x, tok_g, pad)  # [R, K]
    A_t = inp.lora_A.transpose(1, 2)  # [E, K, r] view
    if x.dtype in _HALF:  # H in fp32, as the dense path keeps it
        h = _per_expert_mm(xg.float(), A_t.float(), state, acc)
    else:
        h = _per_expert_mm(xg, A_t, state, acc)  # [R, r]
    hg = (h * coef.unsqueeze(1)).to(x.dtype)  # [R, r]
    ys = _per_expert_mm(hg, inp.lora_B.transpose(1, 2), state, x.dtype)  # [R, N]

    N = ys.shape[1]
    spare = 1 if padded_rows else 0  # padding rows are added into a spare last row, then dropped
    y_full = poisoned_empty((T + spare, N), x.dtype, x.device)
    y = y_full[:T]
    if inp.base_weight is None:
        y.zero_()
    elif inp.base_bias is not None:
        torch.addmm(inp.base_bias, x, inp.base_weight.t(), out=y)  # [T, N]
    else:
        torch.mm(x, inp.base_weight.t(), out=y)
    if spare:
        y_full[T:].zero_()
    y_full.index_add_(0, tok_s, ys)

    if not any(needs):
        return y, (), state
    grads_through_lora = needs.x or needs.lora_A or needs.lora_B or needs.gates
    saved = (
        x if needs.base_weight else None,
        xg if needs.lora_A else None,
        h if grads_through_lora else None,
        coef if grads_through_lora else None,
        order, e_sorted, row, tok_g, tok_s, pad,
        inp.lora_A, inp.lora_B, inp.base_weight, inp.scaling,
    )
    return y, saved, state


def sorted_backward(saved, state: SortedState, dy: torch.Tensor, needs: GradNeeds):
    """``(dx, dA, dB, dgates, dW, db)`` for ``dy [T, N]``, each only when ``needs`` asks for it."""
    x, xg, h, coef, order, e_sorted, row, tok_g, tok_s, pad, lora_A, lora_B, base_weight, scaling = saved
    T, spare = state.T, 1 if state.padded_rows else 0
    dtype = dy.dtype
    dx = dA = dB = dw = None
    if needs.x or needs.lora_A or needs.lora_B or needs.gates:
        dyg = _gather_rows(dy, tok_g, pad)  # [R, N]
        if needs.x or needs.lora_A or needs.gates:
            if dtype in _HALF:  # dHg in fp32: it feeds the gate gradients
                dhg = _per_expert_mm(dyg.float(), lora_B.float(), state, h.dtype)
            else:
                dhg = _per_expert_mm(dyg, lora_B, state, h.dtype)  # [R, r]
            if needs.gates:
                g = (dhg * h).sum(1)  # [R]: rank-space gate gradient, before the scaling
                if row is not None:
                    g = g.index_select(0, row)  # [S] in sorted-slot order
                if state.uniform is None:
                    g.mul_(scaling.index_select(0, e_sorted))
                else:
                    g.mul_(state.uniform)
                S = order.shape[0]
                dw = poisoned_empty((S,), g.dtype, g.device).index_copy_(0, order, g)  # order: a permutation
                dw = dw.to(state.gates_dtype).view(T, S // T)
            if needs.x or needs.lora_A:
                dh = (dhg * coef.unsqueeze(1)).to(dtype)  # [R, r], zero on padding rows
                if needs.x:
                    K = lora_A.shape[2]
                    dx_full = poisoned_empty((T + spare, K), dtype, dy.device)
                    if base_weight is not None:
                        torch.mm(dy, base_weight, out=dx_full[:T])  # [T, K]
                    else:
                        dx_full[:T].zero_()
                    if spare:
                        dx_full[T:].zero_()
                    dx_full.index_add_(0, tok_s, _per_expert_mm(dh, lora_A, state, dtype))
                    dx = dx_full[:T]
                if needs.lora_A:
                    dA = _per_expert_tn(dh, xg, state)  # [E, r, K]
        if needs.lora_B:
            hg = (h * coef.unsqueeze(1)).to(dtype)  # [R, r]
            dB = _per_expert_tn(dyg, hg, state)  # [E, N, r]
    dW, db = torch_base_grads(dy, x, needs)
    return dx, dA, dB, dw, dW, db
