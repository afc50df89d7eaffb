"""The torch path's own skinny fp32 GEMMs on a CPU, through oneDNN where it beats torch's BLAS.

torch sends a float32 ``mm`` on a CPU to its BLAS (MKL in the x86 wheels). On the AMD EPYC this project
benchmarks on (Zen 5), MKL runs an AVX2 code path and reaches ~80-95 GFLOP/s on one core, while
oneDNN, which torch also ships (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU
backend emits for linears), uses the full AVX-512 width: measured 0.45-0.7x the time of ``torch.mm``
for the rank-space products of the sorted and dense formulations once a product has about a million
multiply-adds, but up to 2x slower below that (a fixed cost of ~10 us per call; benchmarks/NOTES.md,
issue 13 item 3, "Change: the rank-space GEMMs through oneDNN"). Both accumulate in float32: the
results differ from torch.mm's in rounding only (tested against a float64 reference).

Only the products the LoRA mixture adds go through here. The base layer's ``x @ W^T`` stays on torch's
``addmm``, the GEMM ``nn.Linear`` runs, so a MiXSE layer and its base model compute the base product
alike and the benchmarks' ratios to the base measure what the routing adds.

``SELFMOE_CPU_GEMM``: ``auto`` (default: oneDNN for float32 CPU products with at least
``ONEDNN_MIN_MACS`` multiply-adds per thread, where the op is there and passed its self-check),
``onednn`` (every float32 CPU product it can take, for tests and A/B runs) or ``torch`` (never).
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch

ENV_CPU_GEMM = "SELFMOE_CPU_GEMM"
CPU_GEMMS = ("auto", "onednn", "torch")
# The crossover measured on one core (m*n*k multiply-adds at which oneDNN's time fell under MKL's, for
# the rank-space shapes: ~1.2M at 1 thread, 2-4M at 2 threads), so the rule scales it by the threads.
ONEDNN_MIN_MACS = 1_500_000


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op on an x86-64 CPU and it computes a GEMM right
    (a small float32 product checked against float64 once per process)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # elsewhere oneDNN runs on other backends (e.g. ACL on Arm): not measured here
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(24, 40, generator=gen)
        b = torch.randn(40, 8, generator=gen)
        got = onednn_mm(a, b).double()
    except Exception:  # noqa: BLE001 - any failure of the probe means: do not use it
        return False
    want = a.double() @ b.double()
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))


def onednn_mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a [M, K] @ b [K, N] (+ bias [N])`` through oneDNN, a new ``[M, N]`` tensor; float32 CPU tensors,
    for callers that asked ``use_onednn`` (no autograd: the torch path's hand-written backwards call it)."""
    # _linear_pointwise(X [M, K], W [N, K], bias) = X @ W^T + bias; strided X and W are taken as they are.
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


def _mode() -> str:
    mode = os.environ.get(ENV_CPU_GEMM, "auto") or "auto"
    if mode not in CPU_GEMMS:
        raise ValueError(f"{ENV_CPU_GEMM} must be one of {CPU_GEMMS}, got {mode!r}")
    return mode


def onednn_pays(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a ``[M, K] @ [K, N]`` product of ``dtype`` tensors on ``device`` goes through oneDNN: float32
    on a CPU, ``SELFMOE_CPU_GEMM`` not ``torch``, oneDNN there (``onednn_available``), and under ``auto``
    at least ``ONEDNN_MIN_MACS`` multiply-adds per torch thread."""
    if dtype != torch.float32 or device.type != "cpu" or not (M and N and K):
        return False
    mode = _mode()
    if mode == "torch" or (mode == "auto" and M * N * K < ONEDNN_MIN_MACS * torch.get_num_threads()):
        return False
    return onednn_available()


def use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b`` (a ``[M, K]``, b ``[K, N]``, 2-D) goes through oneDNN (``onednn_pays``)."""
    if a.dim() != 2 or b.dim() != 2 or a.dtype != b.dtype or b.device != a.device:
        return False
    return onednn_pays(a.shape[0], b.shape[1], a.shape[1], a.dtype, a.device)


def mm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a [M, K] @ b [K, N] -> [M, N]``, like ``torch.mm`` (no autograd: the torch path's hand-written
    backwards call it). ``out``: written and returned (oneDNN makes its own result: copied in, so give
    ``out`` for small results only and take the fresh tensor for big ones, see ``mm_rows``)."""
    if use_onednn(a, b):
        y = onednn_mm(a, b)
        return y if out is None else out.copy_(y)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def mm_rows(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [K, N]``: oneDNN's own result, else torch's written into ``buf`` (``[M, N]``, a
    buffer the caller reuses; a copy into it would cost what oneDNN saves on row-sized results)."""
    if use_onednn(a, b):
        return onednn_mm(a, b)
    return torch.mm(a, b, out=buf)
