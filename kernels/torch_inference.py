"""The torch path's decode-sized inference call without the public op's per-call bookkeeping.

A decode step of a Self-MoE model calls the routed linear 7 times per layer, each on a handful of
tokens, where ``lora_mix``'s validation, autocast probe, backend resolution, input preparation and
path choice cost as much as the arithmetic (benchmarks/NOTES.md, issue 13 item 2). A caller whose
parameters were checked when they were made (``MoLoRALinear``), with ids from its own router, can
skip all of that here. It runs the very products of the formulation ``lora_mix`` would pick for the
call (``gathered`` or ``dense-small``, torch_dispatch.py), so the result is bitwise the same (tested).
The two calls a decode makes most, one token with top-1 and a small batch on dense-small, go straight
to the functions that hold their products (``top1_one_token``, ``dense_small_products``) without the
prepared inputs (measured: at batch 1 each extra view or check is a visible part of the call;
benchmarks/NOTES.md); the rest go through ``gathered_forward``.

``memo`` lets the projections that read one router call share what depends only on the gates: a dict
the caller empties whenever the gates change (``GateSlot`` does, on ``set`` and ``clear``).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from .contract import HALF_DTYPES, LoRAMixInputs, _uniform_scaling
from .op import _autocast_dtype
from .torch_dispatch import ENV_TORCH_PATH, SMALL_T, inference_path
from .torch_gathered import gathered_forward, top1_one_token
from .torch_path import dense_gates, dense_small_products


def lora_mix_small_inference(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    base_weight: torch.Tensor,
    base_bias: Optional[torch.Tensor] = None,
    memo: Optional[Dict] = None,
    get_stacked_B: Optional[Callable[[], Optional[torch.Tensor]]] = None,
) -> Optional[torch.Tensor]:
    """``lora_mix(x, ..., base_weight=, base_bias=)`` for a decode-sized call, or None when not served.

    Shapes as ``lora_mix``: x ``[..., d_in]``, lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, ids and
    weights ``[..., k]`` with x's leading dims (ids in range: not checked), a uniform float scaling,
    base_weight ``[d_out, d_in]``; returns ``[..., d_out]``.

    Served: no gradient recorded (``torch.is_grad_enabled()`` False), a CPU tensor (``auto`` keeps CPU on
    the torch backend), no autocast on x's device, every operand in x's dtype, x contiguous, at most
    ``SMALL_T`` tokens, and no path forced by ``SELFMOE_TORCH_PATH``. Anything else returns None, and the caller
    goes through ``lora_mix``, which validates and explains.

    ``get_stacked_B``: called on the dense-small path only; returns ``torch_path.stack_B(lora_B)`` kept by
    a caller that knows lora_B has not changed since it was built (``selfmoe.decode_cache``), or None
    (stacked anew).
    """
    if torch.is_grad_enabled() or x.is_cuda or _autocast_dtype(x) is not None:
        return None
    K = x.shape[-1]
    T = x.numel() // K if K else 0
    E, _, K_A = lora_A.shape
    if K != K_A or not 0 < T <= SMALL_T or not x.is_contiguous():
        return None
    if os.environ.get(ENV_TORCH_PATH, "auto") != "auto":
        return None
    dtype = x.dtype
    if lora_A.dtype != dtype or lora_B.dtype != dtype or base_weight.dtype != dtype or (
            base_bias is not None and base_bias.dtype != dtype) or not lora_A.is_contiguous():
        return None
    k = expert_ids.shape[-1]
    x2 = x.view(T, K)
    # One sequence, top-1 (a Self-MoE model's decode): where gathered_forward -> _top1_forward would go.
    if T == 1 and k == 1 and dtype not in HALF_DTYPES:
        y = top1_one_token(x2, lora_A, lora_B, int(expert_ids), expert_weights.view(1, 1), scaling, base_weight,
                           base_bias)  # int(): a CPU tensor, no device sync
        return y.view(*x.shape[:-1], y.shape[1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if inference_path(T, E, k) == "gathered":  # else "dense-small": T <= SMALL_T was checked above
        ids, weights = expert_ids.reshape(T, k), expert_weights.reshape(T, k)
        inp = LoRAMixInputs(x2, lora_A, lora_B, ids.contiguous(), weights.contiguous(),
                            _uniform_scaling(E, scaling, acc, x.device), scaling, base_weight, base_bias)
        y = gathered_forward(inp)
        return y.view(*x.shape[:-1], y.shape[1])
    # dense-small (dense_small_products: the op's products, bitwise), with the
    # per-expert gates x scaling shared through ``memo`` by the projections reading one router call.
    key = ("dense_gates", E, scaling, acc)
    gates = None if memo is None else memo.get(key)
    if gates is None:  # the first projection reading this router call
        gates = dense_gates(expert_ids.reshape(T, k), expert_weights.reshape(T, k), E, acc) * scaling  # [T, E]
        if memo is not None:
            memo[key] = gates
    stacked_B = None if get_stacked_B is None else get_stacked_B()  # [N, E*r] or None
    y = dense_small_products(x2, lora_A, lora_B, gates, base_weight, base_bias, stacked_B)
    return y.view(*x.shape[:-1], y.shape[1])
