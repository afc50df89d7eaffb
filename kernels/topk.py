"""``route_topk``: token-level top-k routing over a softmax of router logits."""
from __future__ import annotations

from typing import Tuple

import torch


def route_topk(
    logits: torch.Tensor, k: int, renormalize: bool = False, *, backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then keep the k largest probabilities.

    Self-MoE keeps the raw probabilities (they sum to less than 1 when k < E); MixLoRA and HyperMoE
    renormalise the kept ones to sum to 1 (``renormalize=True``).

    Args:
        logits: ``[..., E]`` router logits, float.
        k: number of experts per token, ``1 <= k <= E``.
        renormalize: rescale the kept probabilities to sum to 1.
        backend: ``"torch"``, ``"triton"`` (one fused kernel, kernels/topk_triton.py; CUDA, or CPU
            with ``TRITON_INTERPRET=1``) or ``"auto"`` (triton for CUDA fp32/fp16/bf16 logits, else torch).

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
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of ('auto', 'torch', 'triton'), got {backend!r}")
    if backend != "torch":
        from .dispatch import route_topk_backend

        if route_topk_backend(backend, logits) == "triton":
            from .topk_triton import route_topk_triton

            return route_topk_triton(logits, k, renormalize)
    return softmax_topk(logits, k, renormalize)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``route_topk``'s torch body without its argument checks or backend choice: float ``logits [..., E]``
    and an int ``1 <= k <= E`` already checked by the caller (a router checks its ``top_k`` when it is
    set). A decode step routes every decoder layer on a handful of tokens, and on a CPU each of those
    checks costs more there than in a warm loop (benchmarks/NOTES.md, issue 13 item 2, change 9)."""
    probs = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)  # [..., E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [..., k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if weights.dtype == logits.dtype else weights.to(logits.dtype)), ids
