"""Helpers every kernel module shares, one of each (the role of Liger-Kernel's ``ops/utils.py``).

- ``interpreting()``: Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``).
- ``num_sms(device)`` / ``max_smem(device)``: device facts for launch heuristics and autotune pruning,
  cached per device; ``assume_device(...)`` overrides both (the compile check plans launches for an
  H100 or A100 on a machine without one).
- ``device_class(name)``: "h200", "h100", "a100" or "other" from a CUDA device name (the dispatcher's
  constants and the compile check's targets are per class).
- ``dot_precision(dtype)``: the ``tl.dot`` input precision, following torch's TF32 switch.
- ``POISON`` / ``poisoned_empty``: the debug switch that fills every buffer a kernel must write with NaN
  (ints with ``INT_POISON``) before the launch, and the one allocator for such buffers.
- ``device_guard(t)``: makes t's GPU the current device around launches.

Importable without triton (the package must import on CPU-only installs): nothing here imports it at
module level.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Tuple

import torch


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# (sms, max_smem, capability) assumed by ``assume_device``, or None: the real device answers.
_ASSUMED: Optional[Tuple[int, int, int]] = None


@contextlib.contextmanager
def assume_device(sms: int, smem: int, capability: int):
    """``with assume_device(132, 232448, 90):`` launch heuristics and pruning plan for that device,
    whatever the tensors' device is (the compile check records launches on CPU tensors for sm_90)."""
    global _ASSUMED
    before = _ASSUMED
    _ASSUMED = (int(sms), int(smem), int(capability))
    try:
        yield
    finally:
        _ASSUMED = before


def device_class(name: str) -> str:
    """"h200", "h100", "a100" or "other" from a device name (``torch.cuda.get_device_name``)."""
    n = name.lower()
    for cls in ("h200", "h100", "a100"):
        if cls in n:
            return cls
    return "other"


_NUM_SMS: Dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index).

    Elsewhere (the interpreter) 4: it only sets how eagerly the split heuristics split.
    """
    if _ASSUMED is not None:
        return _ASSUMED[0]
    if device.type != "cuda":
        return 4
    idx = _device_index(device)
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


_MAX_SMEM: Dict[int, int] = {}


def max_smem(device: torch.device) -> int:
    """Opt-in shared memory per block of the device (Triton's driver query, cached; 99 KiB if it fails)."""
    if _ASSUMED is not None:
        return _ASSUMED[1]
    if device.type != "cuda":
        return 227 * 1024  # the interpreter has no limit; plan as for an H100
    idx = _device_index(device)
    if idx not in _MAX_SMEM:
        try:
            import triton

            _MAX_SMEM[idx] = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception:  # pragma: no cover - driver without the query
            _MAX_SMEM[idx] = 99 * 1024
    return _MAX_SMEM[idx]


def capability(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 90 off CUDA (plan as for an H100)."""
    if _ASSUMED is not None:
        return _ASSUMED[2]
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(_device_index(device))
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows torch's TF32 switch (off by default, and the 1e-5 fp32
    budget needs it off); for fp16/bf16 the value only restates Triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Debug switch: fill every buffer allocated through ``poisoned_empty`` with NaN (floats) or INT_POISON
# (ints) before kernels run, so an element no kernel wrote shows up in the result. Tests flip it with
# monkeypatch; ``SELFMOE_DEBUG_POISON=1`` turns it on for a whole run. Off on the hot path.
POISON = os.environ.get("SELFMOE_DEBUG_POISON", "0") == "1"
INT_POISON = -2  # distinct from the padding sentinel -1 of the grouping metadata


def poisoned_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """The allocator for kernel outputs: ``torch.empty``, or NaN / ``INT_POISON``-filled when ``POISON`` is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else INT_POISON)
    return out


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """``with device_guard(x):`` launches on x's GPU, not on whichever device happens to be current (a
    model may be split over several GPUs). A no-op off CUDA (CPU, the interpreter)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return _NO_GUARD
