"""Which implementation of ``lora_mix`` runs: ``backend="auto"`` and the choice among the Triton paths.

Backend (``resolve_backend`` in op.py calls ``auto_backend``): ``"auto"`` takes the Triton kernels
for CUDA tensors in fp32/fp16/bf16 when triton imports, and the torch path otherwise (CPU tensors always
stay on torch under "auto", interpreter or not: the interpreter is for tests, not speed).

Triton path (``choose_lora_path``), from ``(T, d_in, d_out, E, r, k)``:

- ``"dense"``  dense-rank: shrink kernel + the expand fused into the base GEMM's K loop (dense.py).
- ``"decode"`` one launch, shrink recomputed per N tile (dense.py), for a handful of tokens.
- ``"grouped"`` tokens sorted by expert, per-expert GEMMs on only the k selected experts
  (grouped.py); falls back to ``"dense"`` while that module is not importable.

**The thresholds are provisional, from a cost model; to be replaced by measured thresholds.** No GPU
was available when this was written, so nothing below has been measured. The model prices each kernel
as a roofline ``max(FLOPs / peak, HBM bytes / bandwidth)`` (plus L2 bytes for decode), adds a fixed cost
per launch, and sums the kernels of a path, since separate launches do not overlap. Constants are
rough H100-SXM figures (``PEAK_FLOPS``, ``HBM_BW``, ``L2_BW``, ``LAUNCH_S`` below)::

    ER = E*r rank columns, b = bytes per element, S = T*k slots, Eu = min(E, S) experts touched
    dense   shrink  max(2T ER K / F, (TK + ER K + 2T ER) b / BW)
            fused   max((2TKN + 2T ER N) / F, (TK + KN + TN + T ER + N ER) b / BW)          2 launches
    decode  one     max((2TKN + 2*T16*ER16*K*N/64 + 2*T16*ER16*N) / F, (TK + KN + TN + ER K + N ER) b / BW,
                        (N/64) ER K b / L2)  (T16, ER16: tl.dot pads M and the rank tile to >= 16)  1 launch
    grouped base    max(2TKN / F, (TK + KN + TN) b / BW)                                   (cuBLAS)
            shrink  max(2SrK / F, (SK + Eu r K + Sr) b / BW)   (x rows gathered once per slot)
            expand  k=1: max(2SrN / F, (Sr + Eu r N + 2TN) b / BW)   (adds into y in its epilogue)
                    k>1: max(2SrN / F, (Sr + Eu r N + SN) b / BW) + (SN + 2TN) b / BW
                         (per-slot [S, N] buffer, then a combine pass adds the k slots into y)
            launches: base + 2 grouping metadata + shrink + split-K reduce + expand (+ combine if k>1)

(The grouped terms follow kernels/grouped.py as written: base by cuBLAS, not fused.)

What it predicts (bf16, d_in = d_out = 4096): prefill T=8192 picks dense for the paper's E=4, r=8 and
for E=8, r=16 (the dense path's extra ``2T ER (K+N)`` FLOPs cost less than the grouped path's x gather,
y read-modify-write, slot combine and extra launches) and grouped for E=64, r=16 (ER=1024: the dense
path does E/k = 32x the LoRA FLOPs it needs). The crossover at that size is near ``E*r`` = 1000 for
k=2 (the combine pass is a fixed cost of the grouped path) and 420 for k=1. At T <= 64 with ``E*r``
<= 128 and a base weight, decode wins by one launch and no H round-trip. fp32 uses the FMA (not
tensor-core) peak, which makes the dense path's wasted FLOPs dearer and moves the crossover down.

Override: ``SELFMOE_LORA_PATH=dense|grouped|decode|torch`` forces a path (``auto`` or unset: the model).
``torch`` makes ``backend="auto"`` take the torch path on CUDA too; an explicit ``backend="triton"``
wins over it. Forcing ``grouped`` while grouped.py is not importable raises instead of falling back.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional

import torch

from .utils import interpreting

PATHS = ("dense", "grouped", "decode", "torch")
ENV_PATH = "SELFMOE_LORA_PATH"

# Provisional machine model (H100 SXM, rounded down to what kernels reach): see the module docstring.
PEAK_FLOPS = {2: 6.0e14, 4: 5.0e13}  # by bytes per element: bf16/fp16 tensor cores; fp32 IEEE (FMA units)
HBM_BW = 2.8e12  # bytes/s
L2_BW = 8.0e12  # bytes/s
LAUNCH_S = 4.0e-6  # per kernel launch, including the ramp-up/tail of a small grid

# Decode kernel limits: its per-program [BLOCK_M, BLOCK_C] shrink accumulator lives in registers and a
# [BLOCK_K, BLOCK_C] slice of A_all sits in every pipeline stage. BLOCK_C = pow2(E) * pow2(r): at 256
# the default config spills, at 1024 no config fits in shared memory (compile report).
DECODE_MAX_T = 64
DECODE_MAX_RANK_COLS = 128


def decode_rank_tile(E: int, r: int) -> int:
    """The decode kernel's rank tile ``BLOCK_C``: every expert, each padded to a power of two, >= 16."""
    return max(16, (1 << max(0, E - 1).bit_length()) * (1 << max(0, r - 1).bit_length()))
_DECODE_BLOCK_N = 64  # the decode kernel's default BLOCK_N (its first autotune config)


def path_override() -> Optional[str]:
    """The path forced by ``SELFMOE_LORA_PATH``, or None when unset / ``auto``."""
    value = os.environ.get(ENV_PATH, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise ValueError(f"{ENV_PATH} must be one of {PATHS} or 'auto', got {value!r}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def grouped_available() -> bool:
    """Whether the grouped Triton path (kernels/grouped.py) can be imported (cached per process: a failing
    import would otherwise search sys.path on every call; ``grouped_available.cache_clear()``)."""
    try:
        from .grouped import GROUPED  # noqa: F401
    except ImportError:
        return False
    return True


def auto_backend(is_cuda: bool, dtype: torch.dtype, has_triton: bool) -> str:
    """``backend="auto"``: ``"triton"`` for CUDA tensors in fp32/fp16/bf16 with triton installed, else ``"torch"``.

    ``SELFMOE_LORA_PATH=torch`` keeps "auto" on the torch path everywhere.
    """
    if path_override() == "torch":
        return "torch"
    if is_cuda and has_triton and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return "triton"
    return "torch"


def route_topk_backend(backend: str, logits: torch.Tensor) -> str:
    """Resolve ``route_topk``'s backend: "auto" takes the kernel for CUDA fp32/fp16/bf16 logits with triton.

    ``"triton"`` on CPU needs ``TRITON_INTERPRET=1`` (raises ``ValueError`` otherwise).
    """
    if backend == "auto":
        return "triton" if (logits.is_cuda and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
                            and triton_available()) else "torch"
    if backend == "triton" and not logits.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA logits (logits are on {logits.device}) or TRITON_INTERPRET=1 for the CPU interpreter"
        )
    return backend


def _roofline(flops: float, hbm_bytes: float, peak: float, l2_bytes: float = 0.0) -> float:
    return max(flops / peak, hbm_bytes / HBM_BW, l2_bytes / L2_BW)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def estimate_seconds(
    T: int, d_in: int, d_out: int, E: int, r: int, k: int, *, has_base: bool = True, dtype_bytes: int = 2,
) -> Dict[str, float]:
    """Modelled seconds per Triton path (forward, base GEMM included when ``has_base``); see the docstring."""
    K, N, ER, b = d_in, d_out, E * r, dtype_bytes
    peak = PEAK_FLOPS.get(b, PEAK_FLOPS[2])
    base_flops = 2.0 * T * K * N if has_base else 0.0
    base_bytes = (K * N) * b if has_base else 0.0  # W; x and y are counted per kernel below

    # dense: shrink, then the fused base + expand kernel.
    shrink = _roofline(2.0 * T * ER * K, (T * K + ER * K + 2 * T * ER) * b, peak)
    fused = _roofline(base_flops + 2.0 * T * ER * N, base_bytes + (T * K * has_base + T * N + T * ER + N * ER) * b, peak)
    dense = shrink + fused + 2 * LAUNCH_S

    # decode: one kernel; every N tile recomputes the shrink (padded tiles) and re-reads A_all from L2.
    n_tiles = math.ceil(N / _DECODE_BLOCK_N)
    t16, er16 = _pow2_at_least_16(T), _pow2_at_least_16(ER)
    decode_flops = base_flops + 2.0 * t16 * er16 * K * N / _DECODE_BLOCK_N + 2.0 * t16 * er16 * N
    decode_hbm = base_bytes + (T * K + T * N + ER * K + N * ER) * b
    decode = _roofline(decode_flops, decode_hbm, peak, l2_bytes=n_tiles * ER * K * b) + LAUNCH_S

    # grouped: separate base GEMM, grouping metadata, gathered shrink, expand (+ combine of the k slots).
    S = T * k
    Eu = min(E, S)
    y_rw = (2 if has_base else 1) * T * N  # y read-modify-write after the base GEMM, or a plain write
    g_base = _roofline(base_flops, base_bytes + (T * K + T * N) * b, peak) if has_base else 0.0
    g_shrink = _roofline(2.0 * S * r * K, (S * K + Eu * r * K + S * r) * b, peak)
    if k == 1:
        g_expand = _roofline(2.0 * S * r * N, (S * r + Eu * r * N + y_rw) * b, peak)
    else:
        g_expand = _roofline(2.0 * S * r * N, (S * r + Eu * r * N + S * N) * b, peak)
        g_expand += (S * N + y_rw) * b / HBM_BW  # combine pass
    launches = int(has_base) + 2 + 2 + 1 + int(k > 1)
    grouped = g_base + g_shrink + g_expand + launches * LAUNCH_S

    return {"dense": dense, "decode": decode, "grouped": grouped}


def choose_lora_path(
    T: int, d_in: int, d_out: int, E: int, r: int, k: int, *,
    has_base: bool = True, dtype_bytes: int = 2, grouped_ok: Optional[bool] = None,
) -> str:
    """Pick ``"dense"``, ``"decode"`` or ``"grouped"`` (or what ``SELFMOE_LORA_PATH`` forces).

    Decode is only a candidate for ``T <= DECODE_MAX_T`` and ``decode_rank_tile(E, r) <=
    DECODE_MAX_RANK_COLS`` (its shrink accumulator is in registers); grouped only when ``grouped_ok``
    (default: the module imports).
    ``"torch"`` is returned only when forced by the environment.
    """
    forced = path_override()
    if forced is not None:
        return forced
    if grouped_ok is None:
        grouped_ok = grouped_available()
    return _model_choice(T, d_in, d_out, E, r, k, has_base, dtype_bytes, grouped_ok)


@functools.lru_cache(maxsize=4096)
def _model_choice(T: int, d_in: int, d_out: int, E: int, r: int, k: int, has_base: bool, dtype_bytes: int,
                  grouped_ok: bool) -> str:
    # Cached: the same layer shapes come back every step, and decode steps are microseconds long.
    cost = estimate_seconds(T, d_in, d_out, E, r, k, has_base=has_base, dtype_bytes=dtype_bytes)
    candidates = {"dense": cost["dense"]}
    if T <= DECODE_MAX_T and decode_rank_tile(E, r) <= DECODE_MAX_RANK_COLS:
        candidates["decode"] = cost["decode"]
    if grouped_ok:
        candidates["grouped"] = cost["grouped"]
    # Ties go to the first in this order: dense (fewest assumptions), decode, grouped.
    return min(candidates, key=lambda name: (candidates[name], list(candidates).index(name)))


def triton_backend(T: int, d_in: int, d_out: int, E: int, r: int, k: int, *, has_base: bool, dtype_bytes: int):
    """The Triton backend (contract.Backend) of the path ``choose_lora_path`` picks for these sizes."""
    path = choose_lora_path(T, d_in, d_out, E, r, k, has_base=has_base, dtype_bytes=dtype_bytes)
    if path == "grouped":
        try:
            from .grouped import GROUPED
        except ImportError as err:
            raise RuntimeError(
                f"{ENV_PATH}=grouped but the grouped path (selfmoe.kernels.grouped) is not importable: {err}"
            ) from err
        return GROUPED
    # "torch" here only comes from SELFMOE_LORA_PATH=torch with an explicit backend="triton": that
    # explicit request wins, so run the dense-rank kernels rather than silently leaving Triton.
    from .dense import DECODE, DENSE

    return DECODE if path == "decode" else DENSE
