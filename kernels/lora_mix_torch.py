"""The routed multi-LoRA linear on plain PyTorch: the CPU path and the fallback on any device.

Dense-rank formulation (DESIGN.md): all experts are one ``[E*r, d_in]`` matrix, so the whole mixture is
two skinny GEMMs around a per-token gate, with no gather, no scatter and no Python loop over tokens or
experts::

    G  = dense gates [T, E]              (scatter-add of the top-k weights; duplicate ids add up)
    Gc = (G * scaling) @ expander        [T, E*r]   (each expert's gate copied onto its r columns)
    H  = x @ A_all.T                     [T, E*r]   (fp32 for half inputs: it feeds the gate grads)
    Hg = H * Gc                          [T, E*r]
    y  = x @ W.T + b + Hg @ B_all.T      [T, d_out]

Backward, each product only when some input asks for it::

    dHg = dy @ B_all                     [T, E*r]
    dG  = scaling * (dHg * H) @ expander.T [T, E] (gate grads in rank space, never [T, k, d_out])
    dH  = dHg * Gc
    dx  = dy @ W + dH @ A_all,  dA = dH.T @ x,  dB = dy.T @ Hg,  dW = dy.T @ x,  db = sum_t dy

Cost next to the base GEMM: ``4 * E*r / d`` more FLOPs for router training (grads for x and gates),
which is a few percent at the paper's sizes. For large ``E*r`` with sparse top-k the grouped Triton
kernels are the fast path; this one stays correct there, only slower.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

Scaling = Union[float, torch.Tensor]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # Gates and gate gradients are kept in fp32 (fp64 for fp64 inputs): they are [T, E], tiny, and
    # the gate gradient is a long dot product that bf16 would round badly.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_HALF = (torch.float16, torch.bfloat16)
_cuda_mm_out_dtype = True  # flips to False once torch.mm(..., out_dtype=) turns out to be missing


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a result in the accumulation dtype (fp32 for half inputs).

    H and dHg feed the gate gradient, a short dot product ``sum_r dHg * H`` prone to cancellation:
    rounding either to bf16 first can leave a tiny gate gradient with no correct digit. They are
    skinny ([T, E*r]), so keeping them in fp32 costs little. CUDA can return fp32 straight from a
    half GEMM; elsewhere the operands are upcast.
    """
    global _cuda_mm_out_dtype
    if a.dtype not in _HALF:
        return a @ b
    if a.is_cuda and _cuda_mm_out_dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _cuda_mm_out_dtype = False
    return a.float() @ b.float()


def dense_gates(expert_ids: torch.Tensor, expert_weights: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Scatter top-k gates ``[T, k]`` into dense per-expert gates ``[T, E]``; duplicate ids add up."""
    T = expert_ids.shape[0]
    gates = torch.zeros(T, num_experts, dtype=dtype, device=expert_ids.device)
    return gates.scatter_add_(1, expert_ids, expert_weights.to(dtype))


_EXPANDERS: Dict[Tuple[int, int, float, torch.dtype, torch.device], torch.Tensor] = {}


def _expander(num_experts: int, rank: int, scaling: Scaling, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[E, E*r]`` matrix holding expert e's scaling on its r rank columns, zero elsewhere.

    ``g @ expander`` spreads per-expert gates ``[T, E]`` over the rank columns ``[T, E*r]`` with the
    scaling applied, and ``p @ expander.T`` sums rank columns back per expert (times the scaling). Each
    output element is one product plus exact zeros, so this is as exact as the elementwise version,
    and, as small GEMMs, several times cheaper on CPU than the broadcasting multiply and the
    ``view(T, E, r).sum(-1)`` it replaces. Cached per float scaling; a per-expert scaling tensor costs
    one small multiply per call.
    """
    if isinstance(scaling, torch.Tensor):
        ones = _expander(num_experts, rank, 1.0, dtype, device)
        return ones * scaling.to(dtype).unsqueeze(1)
    key = (num_experts, rank, scaling, dtype, device)
    m = _EXPANDERS.get(key)
    if m is None:
        if len(_EXPANDERS) >= 256:
            _EXPANDERS.clear()
        m = torch.eye(num_experts, dtype=dtype, device=device).repeat_interleave(rank, dim=1) * scaling
        _EXPANDERS[key] = m
    return m


def _stack_B(lora_B: torch.Tensor) -> torch.Tensor:
    """``[E, d_out, r] -> [d_out, E*r]`` with expert e's rank columns at ``e*r:(e+1)*r``.

    A copy per call (small: the experts' B). Not cached across calls on purpose: a cache keyed on the
    parameter would miss writes made through ``param.data``, which bypass the version counter.
    """
    E, N, r = lora_B.shape
    return lora_B.transpose(0, 1).reshape(N, E * r)


def _dense_rank_forward(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias):
    """The forward math, shared by the autograd Function and the no-grad path.

    Returns ``y [..., N]`` and what the backward needs: ``x2 [T, K]``, ``B_all [N, E*r]``, ``ids2 [T, k]``,
    ``h [T, E*r]`` (ungated), ``gate_cols [T, E*r]`` and the expander ``[E, E*r]``.
    """
    K = x.shape[-1]
    E, r, _ = lora_A.shape
    k = expert_ids.shape[-1]
    T = math.prod(x.shape[:-1])  # explicit: reshape(-1, K) is ambiguous when T == 0
    x2 = x.reshape(T, K)  # [T, K]
    ids2 = expert_ids.reshape(T, k)
    acc = _acc_dtype(x)
    A_all = lora_A.reshape(E * r, K)  # [E*r, K]
    B_all = _stack_B(lora_B)  # [N, E*r]
    N = B_all.shape[0]
    expand = _expander(E, r, scaling, acc, x.device)  # [E, E*r], scaling included

    gates = dense_gates(ids2, expert_weights.reshape(T, k), E, acc)  # [T, E]
    gate_cols = gates @ expand  # [T, E*r]: each expert's gate x scaling on its r columns
    h = _mm_acc(x2, A_all.t())  # [T, E*r], fp32 for half x
    hg = (h * gate_cols).to(x.dtype)  # [T, E*r]

    if base_weight is not None:
        if base_bias is not None:
            y = torch.addmm(base_bias, x2, base_weight.t())  # [T, N]
        else:
            y = x2 @ base_weight.t()
        y.addmm_(hg, B_all.t())
    else:
        y = hg @ B_all.t()  # [T, N]
    return y.view(*x.shape[:-1], N), (x2, B_all, ids2, h, gate_cols, expand)


class LoRAMixDenseRankFunction(torch.autograd.Function):
    """Autograd for the dense-rank torch path.

    x ``[..., K]`` and the gates ``[..., k]`` keep their leading dims: flattening happens in here, so no
    autograd view nodes are added per call. Weights share x's dtype (see ``lora_mix_torch``).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias):
        y, (x2, B_all, ids2, h, gate_cols, expand) = _dense_rank_forward(
            x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
        ctx.save_for_backward(x2, lora_A, B_all, ids2, h, gate_cols, base_weight, expand)
        ctx.x_shape = x.shape
        ctx.w_shape = expert_weights.shape
        ctx.weights_dtype = expert_weights.dtype
        ctx.has_bias = base_bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, lora_A, B_all, expert_ids, h, gate_cols, base_weight, expand = ctx.saved_tensors
        need_x, need_A, need_B, _, need_w, _, need_W, need_b = ctx.needs_input_grad
        T, K = x.shape
        E, r, _ = lora_A.shape
        dy = dy.reshape(T, B_all.shape[0]).contiguous()  # [T, N]
        dx = dA = dB = dw = dW = db = None

        if need_x or need_A or need_w:
            dhg = _mm_acc(dy, B_all)  # [T, E*r], fp32 for half dy
            if need_w:
                dgate = (dhg * h) @ expand.t()  # [T, E]: scaling x sum over each expert's rank columns
                dw = dgate.gather(1, expert_ids).to(ctx.weights_dtype).view(ctx.w_shape)  # [..., k]
            if need_x or need_A:
                dh = (dhg * gate_cols).to(x.dtype)  # [T, E*r]
                A_all = lora_A.reshape(E * r, K)
                if need_x:
                    if base_weight is not None:
                        dx = dy @ base_weight  # [T, K]
                        dx.addmm_(dh, A_all)
                    else:
                        dx = dh @ A_all
                    dx = dx.view(ctx.x_shape)
                if need_A:
                    dA = (dh.t() @ x).view(E, r, K)
        if need_B:
            hg = (h * gate_cols).to(x.dtype)
            dB = (dy.t() @ hg).view(-1, E, r).transpose(0, 1).contiguous()  # [E, N, r]
        if need_W:
            dW = dy.t() @ x
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dA, dB, None, dw, None, dW, db


def lora_mix_torch(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: Scaling = 1.0,
    base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Routed multi-LoRA linear, no validation (``lora_mix`` does that).

    x ``[..., d_in]``, lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, expert_ids / expert_weights
    ``[..., k]`` (the same leading dims as x), scaling a float or ``[E]`` (no gradient); returns
    ``[..., d_out]`` in x's dtype.
    Experts and base weights in another dtype are cast to x's dtype (their grads come back in theirs).
    """
    dtype = x.dtype
    lora_A = lora_A.to(dtype)
    lora_B = lora_B.to(dtype)
    if base_weight is not None:
        base_weight = base_weight.to(dtype)
    if base_bias is not None:
        base_bias = base_bias.to(dtype)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.detach().to(_acc_dtype(x))
    else:
        scaling = float(scaling)
    args = (x.contiguous(), lora_A.contiguous(), lora_B.contiguous(), expert_ids.long(), expert_weights,
            scaling, base_weight, base_bias)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return LoRAMixDenseRankFunction.apply(*args)
    # Inference (generation, eval): the same math without the autograd.Function's bookkeeping.
    return _dense_rank_forward(*args)[0]
