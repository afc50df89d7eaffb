"""Helpers every kernel module shares, one of each (the role of Liger-Kernel's ``ops/utils.py``).

- ``interpreting()``: Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``).
- ``num_sms(device)`` / ``max_smem(device)``: device facts for launch heuristics and autotune pruning,
  cached per device.
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
from typing import Dict

import torch


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_NUM_SMS: Dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index).

    Elsewhere (the interpreter) 4: it only sets how eagerly the split heuristics split.
    """
    if device.type != "cuda":
        return 4
    idx = _device_index(device)
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


_MAX_SMEM: Dict[int, int] = {}


def max_smem(device: torch.device) -> int:
    """Opt-in shared memory per block of the device (Triton's driver query, cached; 99 KiB if it fails)."""
    idx = _device_index(device)
    if idx not in _MAX_SMEM:
        try:
            import triton

            _MAX_SMEM[idx] = int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception:  # pragma: no cover - driver without the query
            _MAX_SMEM[idx] = 99 * 1024
    return _MAX_SMEM[idx]


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
