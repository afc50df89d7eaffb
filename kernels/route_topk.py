"""``route_topk``: token-level top-k routing over a softmax of router logits."""
from __future__ import annotations

from typing import Tuple

import torch


def route_topk(logits: torch.Tensor, k: int, renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then keep the k largest probabilities.

    Self-MoE keeps the raw probabilities (they sum to less than 1 when k < E); MixLoRA and HyperMoE
    renormalise the kept ones to sum to 1 (``renormalize=True``).

    Args:
        logits: ``[..., E]`` router logits, float.
        k: number of experts per token, ``1 <= k <= E``.
        renormalize: rescale the kept probabilities to sum to 1.

    Returns:
        ``(weights [..., k] in logits' dtype, ids [..., k] int64)``, largest first. The softmax runs in
        float32; weights are differentiable w.r.t. logits.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., E], got a 0-d tensor")
    E = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, E={E}] for logits of shape {list(logits.shape)}, got {k!r}")
    probs = torch.softmax(logits.float(), dim=-1)  # [..., E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [..., k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids
