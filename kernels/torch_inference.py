"""The torch path's decode-sized inference call without the public op's per-call bookkeeping.

A decode step of a Self-MoE model calls the routed linear 7 times per layer, each on a handful of
tokens, where ``lora_mix``'s validation, autocast probe, backend resolution, input preparation and
path choice cost as much as the arithmetic (benchmarks/NOTES.md, issue 13 item 2). A caller whose
parameters were checked when they were made (``MoLoRALinear``), with ids from its own router, can
skip all of that here. It runs the very products of the formulation ``lora_mix`` would pick for the
call (``gathered`` or ``dense-small``, torch_dispatch.py), so the result is bitwise the same (tested).
The two calls a decode makes most, one token with top-1 and a small batch on dense-small, go straight
to the functions that hold their products (``top1_one_token``, ``dense_small_apply``) without the
prepared inputs (measured: at batch 1 each extra view or check is a visible part of the call;
benchmarks/NOTES.md); the rest go through ``gathered_forward``.

``memo`` lets the projections that read one router call share what depends only on the gates: a dict
the caller empties whenever the gates change (``GateSlot`` does, on ``set`` and ``clear``).

``DecodePlan`` holds what only the weights decide (whether their dtypes and layout can be served, the
views the dense-small products multiply by, all experts' B stacked as one matrix) and serves calls
with it. ``lora_mix_small_inference`` makes one per call; a caller whose weights stay put keeps one
(``selfmoe.decode_cache``, a generation) and settles all that once. One code path, so the same bits.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from .contract import HALF_DTYPES, LoRAMixInputs, _uniform_scaling
from .op import _autocast_dtype
from .torch_dispatch import ENV_TORCH_PATH, SMALL_T, inference_path
from .torch_gathered import gathered_forward, top1_one_token
from .torch_path import dense_gates, dense_small_apply, dense_small_operands, stack_B


def _served_tokens(x: torch.Tensor, d_in: int) -> int:
    """The token count T of a call this module serves, else 0: no gradient recorded, x not on CUDA (the
    torch backend keeps CPU), no autocast on x's device, x contiguous ``[..., d_in]`` with ``0 < T <=
    SMALL_T``, and no path forced by ``SELFMOE_TORCH_PATH``."""
    if torch.is_grad_enabled() or x.is_cuda:
        return 0
    if torch.is_autocast_enabled("cpu") if x.is_cpu else _autocast_dtype(x) is not None:
        return 0
    if x.shape[-1] != d_in or not x.is_contiguous():
        return 0
    T = x.numel() // d_in if d_in else 0
    if not 0 < T <= SMALL_T or os.environ.get(ENV_TORCH_PATH, "auto") != "auto":
        return 0
    return T


def _shared_dense_gates(expert_ids: torch.Tensor, expert_weights: torch.Tensor, T: int, k: int, E: int,
                        scaling: float, acc: torch.dtype, memo: Optional[Dict]) -> torch.Tensor:
    """``[T, E, 1]`` per-expert gate x scaling in ``acc`` (as ``dense_small_apply`` takes them), shared
    through ``memo`` by the projections that read one router call (the first one makes it)."""
    key = ("dense_gates", E, scaling, acc)
    gates = None if memo is None else memo.get(key)
    if gates is None:
        # the scaling in place: one op fewer for the first projection of each decoder layer, which pays
        # these with cold caches at a decode step
        gates = dense_gates(expert_ids.reshape(T, k), expert_weights.reshape(T, k), E, acc).mul_(scaling).unsqueeze(2)
        if memo is not None:
            memo[key] = gates
    return gates


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
) -> Optional[torch.Tensor]:
    """``lora_mix(x, ..., base_weight=, base_bias=)`` for a decode-sized call, or None when not served.

    Shapes as ``lora_mix``: x ``[..., d_in]``, lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, ids and
    weights ``[..., k]`` for x's tokens (ids in range: not checked), a uniform float scaling,
    base_weight ``[d_out, d_in]``; returns ``[..., d_out]``. A ``DecodePlan`` made for this call: served
    as it serves. Anything else returns None, and the caller goes through ``lora_mix``, which validates
    and explains.
    """
    return DecodePlan(lora_A, lora_B, base_weight, base_bias, scaling)(x, expert_ids, expert_weights, memo)


class DecodePlan:
    """The decode-sized inference calls on one layer's weights, with what only the weights decide.

    Holds the layer's tensors (lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, base weight ``[d_out,
    d_in]`` and bias, a uniform float scaling) and settles from them: whether they can be served (all
    on the CPU in one dtype, lora_A contiguous) and, on the first dense-small call, the views
    ``dense_small_apply`` multiplies by with all experts' B stacked (``stack_B``, a copy: made again when
    lora_B's version moves, i.e. after an update torch records). A caller that keeps a plan asks
    ``holds`` before each call and makes a new one when a tensor was replaced or moved (``param.data =
    ...``); writes through ``.data`` into lora_B's memory are not seen by the stack, so a plan may be
    kept only while nothing writes lora_B that way (``selfmoe.decode_cache``, a generation).
    """

    __slots__ = ("lora_A", "lora_B", "base_weight", "base_bias", "scaling", "_ptrs", "served", "dtype",
                 "E", "r", "K", "N", "_acc", "_operands", "_B_version")

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, base_weight: torch.Tensor,
                 base_bias: Optional[torch.Tensor], scaling: float) -> None:
        # The tensors are held: while the plan lives, their memory cannot pass to a new tensor at the same
        # address (which ``holds`` would take for the old one).
        self.lora_A, self.lora_B, self.base_weight, self.base_bias, self.scaling = (
            lora_A, lora_B, base_weight, base_bias, scaling)
        self._ptrs = _addresses(lora_A, lora_B, base_weight, base_bias)
        self.dtype = dtype = lora_A.dtype
        self.E, self.r, self.K = lora_A.shape
        self.N = base_weight.shape[0]
        self.served = (lora_A.device.type == "cpu" and lora_A.is_contiguous() and lora_B.dtype == dtype
                       and base_weight.dtype == dtype and (base_bias is None or base_bias.dtype == dtype))
        self._acc = torch.float64 if dtype == torch.float64 else torch.float32
        self._operands = None  # (A_t, B_rows, W_t): on the first dense-small call (one-token decode never needs them)
        self._B_version = -1

    def holds(self, lora_A: torch.Tensor, lora_B: torch.Tensor, base_weight: torch.Tensor,
              base_bias: Optional[torch.Tensor], scaling: float) -> bool:
        """Whether this plan is for these very tensors, still at the addresses it was made for."""
        return (lora_A is self.lora_A and lora_B is self.lora_B and base_weight is self.base_weight
                and base_bias is self.base_bias and scaling == self.scaling
                and _addresses(lora_A, lora_B, base_weight, base_bias) == self._ptrs)

    def operands(self) -> tuple:
        """``dense_small_operands`` of the plan's tensors, with lora_B stacked: ``(A_t [K, E*r], B_rows [E*r,
        N], W_t [K, N])``, made again if lora_B's version moved since."""
        B = self.lora_B
        if self._operands is None or B._version != self._B_version:
            with torch.no_grad():
                self._operands = dense_small_operands(self.lora_A, stack_B(B.detach()), self.base_weight)
            self._B_version = B._version
        return self._operands

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                 memo: Optional[Dict] = None) -> Optional[torch.Tensor]:
        """``lora_mix(x, <the plan's tensors>, expert_ids, expert_weights)`` bitwise for a decode-sized call
        (x ``[..., d_in]``, ids and weights ``[..., k]`` for x's T tokens, ids in range: not checked),
        through the formulation ``lora_mix`` would pick (``gathered`` or ``dense-small``,
        torch_dispatch.py); None when not served: a plan that cannot be, autograd, CUDA or autocast, x
        not contiguous or in another dtype, more than ``SMALL_T`` tokens, a path forced by
        ``SELFMOE_TORCH_PATH``, or gates that do not match x's tokens. ``memo``: see the module."""
        if not self.served:
            return None
        K = self.K
        T = _served_tokens(x, K)
        k = expert_ids.shape[-1]
        if not T or x.dtype != self.dtype or expert_ids.numel() != T * k or expert_ids.is_cuda:
            return None
        x2 = x.view(T, K)
        if T == 1 and k == 1 and self.dtype not in HALF_DTYPES:
            # One sequence, top-1 (a Self-MoE model's decode): where gathered_forward -> _top1_forward would go.
            y = top1_one_token(x2, self.lora_A, self.lora_B, int(expert_ids), expert_weights.view(1, 1), self.scaling,
                               self.base_weight, self.base_bias)  # int(): a CPU tensor, no device sync
        elif inference_path(T, self.E, k) == "gathered":  # else "dense-small": T <= SMALL_T was checked above
            ids, weights = expert_ids.reshape(T, k).contiguous(), expert_weights.reshape(T, k).contiguous()
            y = gathered_forward(LoRAMixInputs(x2, self.lora_A, self.lora_B, ids, weights,
                                               _uniform_scaling(self.E, self.scaling, self._acc, x.device),
                                               self.scaling, self.base_weight, self.base_bias))
        else:  # dense-small, the gates x scaling shared through ``memo`` by the projections of one router call
            gates = _shared_dense_gates(expert_ids, expert_weights, T, k, self.E, self.scaling, self._acc, memo)
            y = dense_small_apply(x2, *self.operands(), self.base_bias, gates, self.E, self.r)
        return y.view(*x.shape[:-1], self.N)


def _addresses(*tensors: Optional[torch.Tensor]) -> tuple:
    return tuple(0 if t is None else t.data_ptr() for t in tensors)
