"""The torch path's inference forward for a handful of tokens (decode): only the selected experts.

At decode (``T*k`` token-slots fewer than the E experts) the dense-rank path reads every expert and
copies all of ``lora_B`` into its stacked layout, which next to a memory-bound GEMV costs as much as
the LoRA itself. Here each token-slot gathers its expert's factors and runs two batched GEMVs::

    ids      [S]         S = T*k token-slots, slot s = (t, j) at t*k + j
    A_sel    [S, r, K]   lora_A.index_select(0, ids)
    B_sel    [S, N, r]   lora_B.index_select(0, ids)
    h        [S, r]      A_sel @ x_t                (fp32 for half inputs, as on the dense path)
    hg       [S, r]      h * gate_s * scaling[e_s]  (cast back to x's dtype)
    y        [T, N]      x @ W.T + b + sum_j (B_sel @ hg)[t*k + j]

No autograd (the caller runs it under no-grad only); no Python loop over tokens or experts. Gathered
bytes grow with ``S``, so the torch dispatcher (torch_dispatch.py) sends it only small ``S``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .contract import HALF_DTYPES, LoRAMixInputs


def gathered_forward(inp: LoRAMixInputs) -> torch.Tensor:
    """``y [T, N]`` of the op on prepared inputs, by gathering each token-slot's expert factors.

    Written flat with as few ops as possible: at T=1 each op's fixed cost (microseconds) is comparable
    to the GEMV it serves, and a decode step runs this 7 times per layer.
    """
    x = inp.x  # [T, K]
    T, K = x.shape
    k = inp.ids.shape[1]
    ids = inp.ids.view(T * k)  # [S], slot s = (t, j) at t*k + j
    E, r, _ = inp.lora_A.shape
    if k == 1 and inp.uniform is not None and x.dtype not in HALF_DTYPES and inp.base_weight is not None:
        return _top1_forward(inp, ids)
    # [S, r, K] viewed as [T, k*r, K] (free): one GEMV per token covers all its k experts.
    a_sel = inp.lora_A.index_select(0, ids).view(T, k * r, K)
    if x.dtype in HALF_DTYPES:  # H in fp32, as the dense path keeps it (k*r numbers per token)
        h = torch.bmm(a_sel.float(), x.float().view(T, K, 1))
    else:
        h = torch.bmm(a_sel, x.view(T, K, 1))  # [T, k*r, 1]
    gates = inp.gates
    if inp.uniform is None:  # per-expert scaling folded into the gates
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        gates = gates.to(acc) * inp.scaling.index_select(0, ids).view(T, k)
        alpha = 1.0
    else:
        alpha = inp.uniform  # applied by the expand GEMM below
    hg = (h.view(T, k, r) * gates.view(T, k, 1)).to(x.dtype)  # [T, k, r]
    b_sel = inp.lora_B.index_select(0, ids)  # [S, N, r]
    N = b_sel.shape[1]
    if inp.base_weight is None:
        y = torch.zeros(T, N, dtype=x.dtype, device=x.device)
    elif inp.base_bias is not None:
        y = torch.addmm(inp.base_bias, x, inp.base_weight.t())  # [T, N]
    else:
        y = x @ inp.base_weight.t()
    if k == 1:
        y.view(T, N, 1).baddbmm_(b_sel, hg.view(T, r, 1), alpha=alpha)
    else:
        y.add_(torch.bmm(b_sel, hg.view(T * k, r, 1)).view(T, k, N).sum(1), alpha=alpha)
    return y


def _top1_forward(inp: LoRAMixInputs, ids: torch.Tensor) -> torch.Tensor:
    """``gathered_forward`` for top-1, a uniform scaling, fp32/fp64 and a base weight (the decode of a
    Self-MoE model): the same products, with each view and no-op cast that the general case needs
    left out (at T=1 they are a fifth of the op's dispatches)."""
    x = inp.x  # [T, K]
    T, K = x.shape
    if T == 1 and not x.is_cuda:  # reading the id costs no device sync here
        return top1_one_token(x, inp.lora_A, inp.lora_B, int(ids), inp.gates, inp.uniform, inp.base_weight,
                              inp.base_bias)
    if inp.base_bias is not None:
        y = torch.addmm(inp.base_bias, x, inp.base_weight.t())  # [T, N]
    else:
        y = torch.mm(x, inp.base_weight.t())
    if T == 1:  # CUDA: plain GEMVs on gathered blocks (bmm on a CPU splits its batch with a select per matrix)
        r, N = inp.lora_A.shape[1], y.shape[1]
        a_sel, b_sel = inp.lora_A.index_select(0, ids).view(r, K), inp.lora_B.index_select(0, ids).view(N, r)
        h = torch.mm(a_sel, x.t())  # [r, 1]
        h.mul_(inp.gates)  # gates [1, 1]
        y.view(N, 1).addmm_(b_sel, h, alpha=inp.uniform)
        return y
    h = torch.bmm(inp.lora_A.index_select(0, ids), x.unsqueeze(2))  # [T, r, 1]
    h.mul_(inp.gates.unsqueeze(2))  # gates [T, 1] -> [T, 1, 1]
    y.unsqueeze(2).baddbmm_(inp.lora_B.index_select(0, ids), h, alpha=inp.uniform)
    return y


def top1_one_token(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, e: int, gate: torch.Tensor,
                   scaling: float, base_weight: torch.Tensor, base_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y [1, N]`` for one token routed to expert ``e`` alone (the decode of a Self-MoE model at batch 1).

    x ``[1, K]``, gate ``[1, 1]`` (the token's gate), a float scaling, fp32/fp64 operands. Plain GEMVs on
    the expert's own contiguous blocks, read as views: at a GEMV's size each dispatch costs about as
    much as the arithmetic. Shared by ``gathered`` and the layer's decode shortcut (torch_inference.py),
    which must give the same bits.
    """
    y = torch.mm(x, base_weight.t()) if base_bias is None else torch.addmm(base_bias, x, base_weight.t())  # [1, N]
    h = torch.mm(lora_A[e], x.t())  # [r, 1]
    h.mul_(gate)
    y.view(-1, 1).addmm_(lora_B[e], h, alpha=scaling)
    return y
