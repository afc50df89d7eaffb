"""Input validation for the routed multi-LoRA op.

Every error names the argument and the shapes involved, so a user can see at a glance which tensor
is wrong. The id range check reads the ids back (a device sync on CUDA); it is skipped during CUDA
graph capture and can be switched off with ``SELFMOE_CHECK_IDS=0``.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the torch backend (for gradcheck and references), not by the Triton kernels.
TORCH_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)
ID_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "torch", "triton")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_float(name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype} with shape {_shape(t)}")


def id_check_enabled(expert_ids: torch.Tensor, check_ids: Optional[bool] = None) -> bool:
    """Whether the (syncing) id range check runs for these ids.

    ``check_ids=False``: the caller vouches for the ids (e.g. they come straight from ``route_topk``).
    ``None``: on unless ``SELFMOE_CHECK_IDS=0``. Never during CUDA graph capture (a sync is illegal there).
    """
    if check_ids is False:
        return False
    if check_ids is None and os.environ.get("SELFMOE_CHECK_IDS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if expert_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_lora_mix_inputs(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    base_weight: Optional[torch.Tensor],
    base_bias: Optional[torch.Tensor],
    backend: str,
    check_ids: Optional[bool] = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` if the arguments of ``lora_mix`` break its contract."""
    x = _require_tensor("x", x)
    lora_A = _require_tensor("lora_A", lora_A)
    lora_B = _require_tensor("lora_B", lora_B)
    expert_ids = _require_tensor("expert_ids", expert_ids)
    expert_weights = _require_tensor("expert_weights", expert_weights)

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    _require_float("x", x, TORCH_FLOAT_DTYPES)
    _require_float("lora_A", lora_A, TORCH_FLOAT_DTYPES)
    _require_float("lora_B", lora_B, TORCH_FLOAT_DTYPES)
    _require_float("expert_weights", expert_weights, TORCH_FLOAT_DTYPES)
    if expert_ids.dtype not in ID_DTYPES:
        raise TypeError(
            f"expert_ids must be int32 or int64, got {expert_ids.dtype} with shape {_shape(expert_ids)}"
        )

    if x.dim() < 1:
        raise ValueError("x must have shape [..., d_in], got a 0-d tensor")
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must have shape [E, r, d_in], got {_shape(lora_A)}")
    if lora_B.dim() != 3:
        raise ValueError(f"lora_B must have shape [E, d_out, r], got {_shape(lora_B)}")
    E, r, d_in = lora_A.shape
    if E < 1 or r < 1:
        raise ValueError(f"lora_A must have at least one expert and rank >= 1, got {_shape(lora_A)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has d_in={x.shape[-1]} (shape {_shape(x)}) but lora_A has d_in={d_in} (shape {_shape(lora_A)})")
    if lora_B.shape[0] != E or lora_B.shape[2] != r:
        raise ValueError(
            f"lora_B must have shape [E={E}, d_out, r={r}] to match lora_A {_shape(lora_A)}, got {_shape(lora_B)}"
        )
    d_out = lora_B.shape[1]

    if expert_ids.dim() != x.dim():
        raise ValueError(
            f"expert_ids must have shape [..., k] with the leading dims of x {_shape(x)}, got {_shape(expert_ids)}"
        )
    if expert_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"expert_ids {_shape(expert_ids)} must share the leading dims of x {_shape(x)}")
    if expert_weights.shape != expert_ids.shape:
        raise ValueError(
            f"expert_weights {_shape(expert_weights)} must have the same shape as expert_ids {_shape(expert_ids)}"
        )

    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (E,) or not scaling.is_floating_point():
            raise ValueError(f"scaling must be a float or a float tensor of shape [E={E}], got {scaling.dtype} {_shape(scaling)}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a float or a tensor of shape [E={E}], got {type(scaling).__name__}")

    if base_weight is not None:
        _require_tensor("base_weight", base_weight)
        _require_float("base_weight", base_weight, TORCH_FLOAT_DTYPES)
        if base_weight.shape != (d_out, d_in):
            raise ValueError(
                f"base_weight must have shape [d_out={d_out}, d_in={d_in}] (from lora_B {_shape(lora_B)} and x {_shape(x)}), "
                f"got {_shape(base_weight)}"
            )
    if base_bias is not None:
        if base_weight is None:
            raise ValueError("base_bias was given without base_weight")
        _require_tensor("base_bias", base_bias)
        _require_float("base_bias", base_bias, TORCH_FLOAT_DTYPES)
        if base_bias.shape != (d_out,):
            raise ValueError(f"base_bias must have shape [d_out={d_out}], got {_shape(base_bias)}")

    # Compared first, the message built only on a mismatch: this runs on every call (7 per decoder layer
    # and token at decode).
    dev = x.device
    if (lora_A.device != dev or lora_B.device != dev or expert_ids.device != dev or expert_weights.device != dev
            or (isinstance(scaling, torch.Tensor) and scaling.device != dev)
            or (base_weight is not None and base_weight.device != dev)
            or (base_bias is not None and base_bias.device != dev)):
        _raise_device_mismatch(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)

    if expert_ids.numel() > 0 and id_check_enabled(expert_ids, check_ids):
        lo, hi = torch.aminmax(expert_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= E:
            raise ValueError(
                f"expert_ids {_shape(expert_ids)} must lie in [0, E={E}), got values in [{lo}, {hi}]"
            )


def _raise_device_mismatch(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias) -> None:
    tensors = {"x": x, "lora_A": lora_A, "lora_B": lora_B, "expert_ids": expert_ids, "expert_weights": expert_weights}
    if isinstance(scaling, torch.Tensor):
        tensors["scaling"] = scaling
    if base_weight is not None:
        tensors["base_weight"] = base_weight
    if base_bias is not None:
        tensors["base_bias"] = base_bias
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
