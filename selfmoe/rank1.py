"""Rank-1 experts (MoR1E, Liu et al. 2024): a rank-r LoRA whose r rank-1 components are the experts.

Plain variant: expert i is ``b_i a_i^T`` (``A``'s row i, ``B``'s column i), gated per token by a router
over the r components (dense softmax: ``top_k = r``; or top-k). It is exactly ``lora_mix`` with E = r
experts of rank 1 (``MoLoRALinear(E=r, r=1)``), so it runs on the fused op and its Triton kernels; each
component gets the LoRA scaling ``alpha / r`` of the rank-r LoRA it comes from.

Mix-and-match variant (``r1 x r2``): ``r1`` A rows and ``r2`` B columns, and every pair ``(i, j)`` is an
expert ``b_j a_i^T`` (E = r1 * r2 experts from r1 + r2 vectors; expert ``e = i * r2 + j``). Per token::

    h = x A^T                 [T, r1]         (r1 rank columns, shared by all pairs)
    z = h @ G                 [T, r2]         G = the token's gates as an [r1, r2] matrix
    y = x W^T + b + s * z B^T [T, d_out]

This costs ``T * (r1 * d_in + r1 * r2 + r2 * d_out)`` multiply-adds. ``lora_mix`` with E = r1 * r2
materialised rank-1 experts would cost ``T * r1 * r2 * (d_in + d_out)`` (the dense-rank path touches all
E rank columns) and store every ``a_i`` r2 times and every ``b_j`` r1 times: for 4 x 8 that is 32 rank
columns against 4 + 8, so the factored product above (plain PyTorch ops, autograd for the backward) is the
one used; :func:`mix_and_match_reference` is the materialised form, the test oracle.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["check_mix_and_match", "mix_and_match_lora", "mix_and_match_reference", "pair_of"]


def check_mix_and_match(value: object, num_experts: Optional[int] = None) -> Tuple[int, int]:
    """``(r1, r2)`` from a pair of ints >= 1 (``ValueError`` naming it otherwise); ``num_experts`` must be r1*r2."""
    try:
        r1, r2 = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"mix_and_match must be a pair (r1, r2) of ints >= 1, got {value!r}") from None
    for v in (r1, r2):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"mix_and_match must be a pair (r1, r2) of ints >= 1, got {value!r}")
    if num_experts is not None and r1 * r2 != num_experts:
        raise ValueError(f"mix_and_match {r1} x {r2} makes {r1 * r2} experts, but num_experts={num_experts}")
    return r1, r2


def pair_of(expert: int, r2: int) -> Tuple[int, int]:
    """Expert ``e`` of a mix-and-match layer is the pair (A row ``e // r2``, B column ``e % r2``)."""
    return divmod(expert, r2)


def _dense_gates(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``[T, k]`` top-k gates -> ``[T, E]`` (duplicates add up); differentiable in ``weights``."""
    gates = torch.zeros(ids.shape[0], num_experts, dtype=dtype, device=ids.device)
    return gates.scatter_add(1, ids.long(), weights.to(dtype))


def mix_and_match_lora(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, expert_ids: torch.Tensor,
    expert_weights: torch.Tensor, scaling: float, *, base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The mix-and-match LoRA: ``y = x W^T + b + s * sum_{i,j} g_ij (a_i . x) b_j`` (module docstring).

    Args:
        x: ``[..., d_in]``.
        lora_A: ``[r1, d_in]`` (the A rows ``a_i``); lora_B: ``[d_out, r2]`` (the B columns ``b_j``).
        expert_ids / expert_weights: ``[..., k]``, ids in ``[0, r1 * r2)`` (expert ``i * r2 + j``).
        scaling: the LoRA scaling ``s``. base_weight ``[d_out, d_in]`` / base_bias ``[d_out]``: optional.

    Returns ``[..., d_out]`` in x's dtype; differentiable in x, the factors, the gates and the base.
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != x.shape[-1]:
        raise ValueError(f"mix_and_match_lora: lora_A must be [r1, d_in={x.shape[-1]}] and lora_B [d_out, r2], "
                         f"got {list(lora_A.shape)} and {list(lora_B.shape)}")
    if expert_ids.shape != expert_weights.shape or expert_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"mix_and_match_lora: expert_ids {list(expert_ids.shape)} and expert_weights "
                         f"{list(expert_weights.shape)} must both be [..., k] over the tokens of x {list(x.shape)}")
    r1, r2 = lora_A.shape[0], lora_B.shape[1]
    lead, d_in = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, d_in)
    T, k = xf.shape[0], expert_ids.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gates = _dense_gates(expert_ids.reshape(T, k), expert_weights.reshape(T, k), r1 * r2, acc)  # [T, r1*r2]
    h = F.linear(xf, lora_A.to(xf.dtype)).to(acc)  # [T, r1]
    z = torch.bmm(h.unsqueeze(1), gates.view(T, r1, r2)).squeeze(1) * scaling  # [T, r2]
    y = F.linear(z.to(xf.dtype), lora_B.to(xf.dtype))  # [T, d_out]
    if base_weight is not None:
        y = y + F.linear(xf, base_weight.to(xf.dtype), None if base_bias is None else base_bias.to(xf.dtype))
    return y.reshape(*lead, y.shape[-1])


def mix_and_match_reference(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, expert_ids: torch.Tensor,
    expert_weights: torch.Tensor, scaling: Union[float, Sequence[float]], *, base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The same layer with every pair materialised as a rank-1 expert (``A_e = a_i``, ``B_e = b_j``) and
    run by the readable ``lora_mix`` reference: the test oracle (float64), not for real sizes."""
    from selfmoe.kernels.naive import lora_mix_naive

    r1, r2 = lora_A.shape[0], lora_B.shape[1]
    i = torch.arange(r1 * r2, device=lora_A.device) // r2
    j = torch.arange(r1 * r2, device=lora_A.device) % r2
    A_all = lora_A[i].unsqueeze(1)  # [E, 1, d_in]
    B_all = lora_B[:, j].t().unsqueeze(-1)  # [E, d_out, 1]
    return lora_mix_naive(x, A_all, B_all, expert_ids, expert_weights, scaling, base_weight, base_bias)
