"""``lora_mix``: the routed multi-LoRA linear (see docs/design.md, section 'The op contract').

Validated (checks.py), run under autocast like ``nn.Linear``, given a backend (``resolve_backend``, then
dispatch.py for the Triton path) and run through ``contract.run_backend``, which prepares the inputs
once for whichever backend runs.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .checks import check_lora_mix_inputs
from .contract import Backend, run_backend
from .torch_path import TORCH
from .utils import interpreting


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map ``"auto"`` to a concrete backend for x's device; check that ``"triton"`` can run there."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if not x.is_cuda:  # CPU tensors always stay on torch under "auto" (dispatch.auto_backend agrees)
            return "torch"
        # CUDA tensors in fp32/fp16/bf16 take the Triton kernels when triton imports; CPU tensors stay
        # on torch (the interpreter is for tests). SELFMOE_LORA_PATH=torch keeps "auto" on torch.
        from .dispatch import auto_backend, triton_available

        return auto_backend(x.is_cuda, x.dtype, x.is_cuda and triton_available())
    # backend == "triton"
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (x is on {x.device}) or TRITON_INTERPRET=1 for the CPU interpreter"
        )
    if x.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32/float16/bfloat16 inputs, got x of dtype float64")
    return "triton"


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a linear in for x's device, or None when autocast is off there."""
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know
        return None


def _triton_backend(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, k: int, has_base: bool,
                    training: bool = False) -> Backend:
    """The Triton path ``choose_lora_path`` picks from (T, d_in, d_out, E, r, k) and whether a backward
    follows: see dispatch.py."""
    from .dispatch import triton_backend

    E, r, d_in = lora_A.shape
    T = math.prod(x.shape[:-1])
    return triton_backend(T, d_in, lora_B.shape[1], E, r, k, has_base=has_base, dtype_bytes=x.element_size(),
                          training=training)


def lora_mix(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: Union[float, torch.Tensor] = 1.0,
    *,
    base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_ids: Optional[bool] = None,
) -> torch.Tensor:
    """Routed mixture of LoRA experts, optionally fused with the base linear.

    ``y = sum_j expert_weights[..., j] * scaling * (x @ lora_A[e_j].T) @ lora_B[e_j].T``
    (``e_j = expert_ids[..., j]``), plus ``x @ base_weight.T + base_bias`` when ``base_weight`` is given.

    Args:
        x: ``[..., d_in]`` float32 / float16 / bfloat16 (float64 on the torch backend).
        lora_A: ``[E, r, d_in]`` — PEFT ``lora_A.weight`` stacked over experts.
        lora_B: ``[E, d_out, r]`` — PEFT ``lora_B.weight`` stacked over experts.
        expert_ids: ``[..., k]`` int32/int64 in ``[0, E)``; duplicate ids within a token add up; k may be E.
        expert_weights: ``[..., k]`` gate values (float).
        scaling: LoRA scaling ``lora_alpha / r``: a float, or a ``[E]`` tensor of per-expert scalings
            (experts of different rank or alpha, zero-padded to a common r). No gradient flows to it.
        base_weight: optional ``[d_out, d_in]`` base weight fused into the same op.
        base_bias: optional ``[d_out]`` base bias (only with ``base_weight``).
        backend: ``"torch"`` (any device), ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``),
            ``"auto"`` (the best available for x's device).
        check_ids: check that ``expert_ids`` lie in ``[0, E)``. ``None`` (default): yes, unless
            ``SELFMOE_CHECK_IDS=0``. The check reads the ids back, a device sync on CUDA; pass False
            only for ids that cannot be out of range (``MoLoRALinear`` does so for its router's ids).

    Returns:
        ``[..., d_out]`` in x's dtype. Differentiable w.r.t. x, lora_A, lora_B, expert_weights,
        base_weight and base_bias; only the gradients that are asked for are computed.

    Raises:
        TypeError / ValueError naming the argument and shapes on bad input. The id range check syncs
        on CUDA; it is skipped during CUDA graph capture, with ``SELFMOE_CHECK_IDS=0`` and with
        ``check_ids=False``.

    Under ``torch.autocast`` the op behaves like ``nn.Linear`` there: a float32 ``x`` is cast to the
    autocast dtype (bf16/fp16) and the whole op, base GEMM included, runs in it; gate gradients stay
    in the gates' dtype.
    """
    amp_dtype = _autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    if amp_dtype is not None:
        # Run the op as one unit with autocast off: autocast would otherwise recast some products
        # inside it and leave operands of in-place accumulations in different dtypes.
        if x.dtype == torch.float32 and amp_dtype != torch.float32:
            x = x.to(amp_dtype)
        with torch.autocast(x.device.type, enabled=False):
            return lora_mix(x, lora_A, lora_B, expert_ids, expert_weights, scaling,
                            base_weight=base_weight, base_bias=base_bias, backend=backend, check_ids=check_ids)
    check_lora_mix_inputs(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias, backend,
                          check_ids)
    if resolve_backend(backend, x) == "torch":
        chosen = TORCH
    else:
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, lora_A, lora_B, expert_weights, base_weight, base_bias))
        chosen = _triton_backend(x, lora_A, lora_B, expert_ids.shape[-1], base_weight is not None, training)
    return run_backend(chosen, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
