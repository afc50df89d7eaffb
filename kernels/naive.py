"""Readable references for the routed multi-LoRA ops: the test oracle, never the fast path.

They follow the math of the contract line by line (a gather of each token's selected experts, one
top-k slot at a time) and are differentiable through plain autograd, so tests get every gradient
by running them in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def lora_mix_naive(x, lora_A, lora_B, expert_ids, expert_weights, scaling: Union[float, torch.Tensor] = 1.0,
                   base_weight: Optional[torch.Tensor] = None,
                   base_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ W.T + b + sum_j w[..., j] * s[e_j] * (x @ A[e_j].T) @ B[e_j].T`` with ``e_j = ids[..., j]``.

    Shapes: x ``[..., d_in]``, lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, expert_ids and
    expert_weights ``[..., k]``, scaling a float or ``[E]``; returns ``[..., d_out]``. Uses memory
    ``O(T * r * (d_in + d_out))`` per slot: for tests, not for real sizes.
    """
    lead = x.shape[:-1]
    d_in = x.shape[-1]
    d_out = lora_B.shape[1]
    xf = x.reshape(-1, d_in)  # [T, d_in]
    ids = expert_ids.reshape(xf.shape[0], -1).long()  # [T, k]
    gates = expert_weights.reshape(xf.shape[0], -1)  # [T, k]
    if isinstance(scaling, torch.Tensor):
        scale_per_expert = scaling.to(x.dtype)
    else:
        scale_per_expert = torch.full((lora_A.shape[0],), float(scaling), dtype=x.dtype, device=x.device)

    y = xf.new_zeros(xf.shape[0], d_out)
    for j in range(ids.shape[1]):
        A_sel = lora_A[ids[:, j]]  # [T, r, d_in]
        B_sel = lora_B[ids[:, j]]  # [T, d_out, r]
        h = torch.einsum("ti,tri->tr", xf, A_sel)  # [T, r]
        delta = torch.einsum("tr,tor->to", h, B_sel)  # [T, d_out]
        y = y + (gates[:, j] * scale_per_expert[ids[:, j]]).to(x.dtype)[:, None] * delta
    if base_weight is not None:
        y = y + xf @ base_weight.T
        if base_bias is not None:
            y = y + base_bias
    return y.reshape(*lead, d_out)


def route_topk_naive(logits: torch.Tensor, k: int, renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then keep the k largest probabilities (optionally renormalised to sum 1).

    Computes in float64 for float64 logits (a true reference), float32 otherwise."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids
