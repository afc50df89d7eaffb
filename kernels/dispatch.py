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
was available when this was written, so nothing below has been measured (``benchmarks/gpu_session.sh
compile`` records compiled resources and time per kernel on the first GPU run, to settle it). The model
prices each kernel as a roofline ``max(FLOPs / (peak * eff), HBM bytes / BW, L2 bytes / L2BW)``, divides
it by the fraction of the GPU its grid can fill (``fill = min(1, programs / SMs)``: an 8-program
kernel streams at 8/132 of the bandwidth), adds a fixed cost per launch, and sums the kernels of a path,
since separate launches do not overlap. ``eff`` is the Triton GEMM efficiency against cuBLAS (0.75,
provisional; cuBLAS kernels get 1). Constants per device class (``MACHINES``: H100, H200, A100, chosen
from the device name, H100 when unknown)::

    ER = E*r rank columns, b = bytes per element, S = T*k slots, Eu = min(E, S) experts touched
    split-K (dense shrink, decode): s = split_k(tiles, K, SMs): 1 while the tiles fill more than half
                    the SMs, else min(cdiv(SMs, tiles), K // 256, 16); the launchers use the same function
    dense   shrink  max(2T ER K / F', (TK + ER K) b + out / BW, A_all re-read per 64-row tile / L2)
                    tiles cdiv(T, 64) * cdiv(E, 128 / pow2(r)), programs tiles * s;
                    out = 2T ER b (H, Hg) unsplit, s T ER 4 (fp32 partials) split
                    s > 1: + reduce (out + 2T ER b) / BW over cdiv(T, 32) rank tiles, + 1 launch
            fused   max((2TKN + 2T ER N) / F', (TK + KN + TN + T ER + N ER) b / BW,
                        (x per 128-col tile + W per 128-row tile) / L2)     programs cdiv(T,128) cdiv(N,128)
    decode  one     max((2TKN + 2*T16*ER16*K*N/64 + s*2*T16*ER16*N) / F', (TK + KN + ER K + N ER) b + out / BW,
                        (N/64) ER K b / L2)  (T16, ER16: tl.dot pads M and the rank tile to >= 16;
                        each split expands its own partial H)
                    tiles cdiv(N, 64) * cdiv(T, 64), programs tiles * s; out = TN b, or s T N 4 split
                    s > 1: + reduce (out + TN b) / BW over the tiles, + 1 launch          1 launch (2 split)
    grouped base    max(2TKN / F, (TK + KN + TN) b / BW)                                   (cuBLAS)
            shrink  max(2SrK / F', (SK + Eu r K + Sr) b / BW)   (x rows gathered once per slot)
                    programs tiles * split-K (split-K fills the GPU: about 2 programs per SM)
            expand  k=1: max(2SrN / F', (Sr + Eu r N + 2TN) b / BW)   (adds into y in its epilogue)
                    k>1: max(2SrN / F', (Sr + Eu r N + SN) b / BW) + (SN + 2TN) b / BW
                         (per-slot [S, N] buffer, then a combine pass adds the k slots into y)
                    programs tiles * cdiv(N, 128)
            launches: base + 2 grouping metadata + shrink + split-K reduce + expand (+ combine if k>1)
    training (``training=True``) adds the backward: dense dHg (T N ER), dx (T N (K + ER)), dA (T ER K),
            dB (T N ER); grouped dh (S r N, split-K), dx (S r K + base T N K), dA/dB (S r (K + N));
            the base weight's own gradient is left out (frozen in LoRA training).

(The grouped terms follow kernels/grouped.py as written: base by cuBLAS, not fused.)

What it predicts on an H100 (bf16, d_in = d_out = 4096; ``test_dispatch.py`` pins each of these):

- prefill T=8192, k=2: dense up to ``E*r`` = 128 (E=8, r=16), grouped from 256 (E=64, r=16: the dense
  path does E/k = 32x the LoRA FLOPs it needs). With cuBLAS-peak pricing the crossover was ~1000; the
  Triton efficiency factor moves it down, because the dense path runs the base GEMM inside its fused
  Triton kernel while the grouped path leaves it to cuBLAS;
- prefill T=8192, k=1: grouped even for the paper's E=4, r=8 (no combine pass, and the base GEMM stays
  on cuBLAS: the 25% Triton penalty on it outweighs the gather and y read-modify-write);
- T <= 64 with a base weight: decode while its rank tile fits (``E*r`` <= 128), also at a GQA
  projection's N = 1024 (split-K: 16 N tiles x 9 splits = 144 programs; unsplit, its 16 programs lost to
  grouped); grouped beyond the rank tile (at T=1, E=64, r=16 the dense shrink splits K to 8 x 16
  programs, but the fused kernel runs cdiv(N, 128) = 32 on 132 SMs); T=128: grouped;
- an A100 (less bandwidth per FLOP) and training (the backward prices the dense path's extra rank-space
  FLOPs twice more) tilt further toward grouped. fp32 uses the FMA (not tensor-core) peak.

Override: ``SELFMOE_LORA_PATH=dense|grouped|decode|torch`` forces a path (``auto`` or unset: the model).
``torch`` makes ``backend="auto"`` take the torch path on CUDA too; an explicit ``backend="triton"``
wins over it. Forcing ``grouped`` while grouped.py is not importable raises instead of falling back.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, NamedTuple, Optional

import torch

from .utils import interpreting

PATHS = ("dense", "grouped", "decode", "torch")
ENV_PATH = "SELFMOE_LORA_PATH"

class Machine(NamedTuple):
    """Provisional machine model of one device class, rounded down to what kernels reach."""

    peak_flops: Dict[int, float]  # by bytes per element: 16-bit tensor cores; fp32 IEEE (FMA units)
    hbm_bw: float  # bytes/s
    l2_bw: float  # bytes/s
    sms: int
    launch_s: float  # per kernel launch, including the ramp-up/tail of a small grid


MACHINES = {
    "h100": Machine({2: 6.0e14, 4: 5.0e13}, 2.8e12, 8.0e12, 132, 4.0e-6),  # H100 SXM: 989 TF, 3.35 TB/s
    "h200": Machine({2: 6.0e14, 4: 5.0e13}, 4.0e12, 8.0e12, 132, 4.0e-6),  # same chip, 4.8 TB/s HBM3e
    "a100": Machine({2: 2.5e14, 4: 1.5e13}, 1.6e12, 4.5e12, 108, 5.0e-6),  # A100 SXM: 312 TF, 2.0 TB/s
}
# H100 figures under their old names (callers and tests price against them)
PEAK_FLOPS = MACHINES["h100"].peak_flops
HBM_BW = MACHINES["h100"].hbm_bw
L2_BW = MACHINES["h100"].l2_bw
LAUNCH_S = MACHINES["h100"].launch_s
TRITON_EFF = 0.75  # Triton GEMM throughput against cuBLAS (provisional, to be measured)


@functools.lru_cache(maxsize=None)
def current_machine() -> str:
    """The device class of the current CUDA device ("h100" without CUDA or when unknown)."""
    if not torch.cuda.is_available():
        return "h100"
    from .utils import device_class

    cls = device_class(torch.cuda.get_device_name())
    return cls if cls in MACHINES else "h100"


# Decode kernel limits: its per-program [BLOCK_M, BLOCK_C] shrink accumulator lives in registers and a
# [BLOCK_K, BLOCK_C] slice of A_all sits in every pipeline stage. BLOCK_C = pow2(E) * pow2(r): at 256
# the default config spills, at 1024 no config fits in shared memory (compile report).
DECODE_MAX_T = 64
DECODE_MAX_RANK_COLS = 128


def decode_rank_tile(E: int, r: int) -> int:
    """The decode kernel's rank tile ``BLOCK_C``: every expert, each padded to a power of two, >= 16."""
    return max(16, (1 << max(0, E - 1).bit_length()) * (1 << max(0, r - 1).bit_length()))
_DECODE_BLOCK_N = 64  # the decode kernel's default BLOCK_N (its first autotune config)
_SHRINK_BLOCK_M = 64  # the dense shrink's default BLOCK_M
_SHRINK_RANK_CAP = 128  # the dense shrink's widest rank tile (dense._rank_tiling)

# Split-K of the dense shrink and the decode kernel (run-time factors, see ``split_k``): each split
# streams at least SPLIT_MIN_K of the reduced dimension (2 steps of the widest BLOCK_K, 4 of the default),
# and at most SPLIT_MAX splits write fp32 partials.
SPLIT_MIN_K = 256
SPLIT_MAX = 16
ENV_SPLIT = "SELFMOE_DENSE_SPLIT_K"  # tests only: force the split factor (1 = the unsplit path)


def split_k(tiles: int, K: int, sms: int) -> int:
    """Split-K factor of the dense shrink and the decode kernel, whose output has ``tiles`` tiles over a
    reduction of length ``K``, on a device with ``sms`` SMs (the launchers and the cost model both use it).

    1 while the tiles already occupy more than half the SMs (splitting would add the fp32 partials'
    traffic and a reduce launch for at most a 2x fill); otherwise enough splits for one program per SM,
    at most ``K // SPLIT_MIN_K`` and ``SPLIT_MAX``.
    """
    tiles = max(1, int(tiles))
    if 2 * tiles > sms:
        return 1
    return int(max(1, min(-(-sms // tiles), K // SPLIT_MIN_K, SPLIT_MAX)))


def forced_split() -> Optional[int]:
    """The split factor forced by ``SELFMOE_DENSE_SPLIT_K`` (tests only: it forces the split path on CPU
    shapes, where K is far below SPLIT_MIN_K and the interpreter reports 4 SMs), or None when unset."""
    text = os.environ.get(ENV_SPLIT, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_SPLIT} must be a positive int, got {text!r}")
    return value


def shrink_tiles(T: int, E: int, r: int) -> int:
    """Programs of the dense shrink before split-K at its default BLOCK_M: token tiles x rank tiles
    (a rank tile holds whole experts, at most 128 columns unless one expert is wider)."""
    r_pad = 1 << max(0, r - 1).bit_length()
    return -(-max(1, T) // _SHRINK_BLOCK_M) * -(-E // max(1, _SHRINK_RANK_CAP // r_pad))


def decode_tiles(T: int, N: int) -> int:
    """Programs of the decode kernel before split-K at its default BLOCK_N (BLOCK_M covers 64 tokens)."""
    return -(-N // _DECODE_BLOCK_N) * -(-max(1, T) // DECODE_MAX_T)


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


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def estimate_seconds(
    T: int, d_in: int, d_out: int, E: int, r: int, k: int, *, has_base: bool = True, dtype_bytes: int = 2,
    machine: str = "h100", training: bool = False,
) -> Dict[str, float]:
    """Modelled seconds per Triton path (forward, plus backward when ``training``; base GEMM included when
    ``has_base``) on a device class of ``MACHINES``; see the module docstring."""
    m = MACHINES[machine]
    K, N, ER, b = d_in, d_out, E * r, dtype_bytes
    peak = m.peak_flops.get(b, m.peak_flops[2])
    tri = peak * TRITON_EFF
    cdiv = lambda a, c: -(-int(a) // int(c))  # noqa: E731

    def kernel(flops, hbm, programs, l2=0.0, fp=tri):
        # roofline, slowed by the fraction of SMs a small grid leaves idle
        t = max(flops / fp, hbm / m.hbm_bw, l2 / m.l2_bw)
        return t / min(1.0, programs / m.sms)

    base_flops = 2.0 * T * K * N if has_base else 0.0
    base_bytes = (K * N) * b if has_base else 0.0  # W; x and y are counted per kernel below

    # dense: shrink (split-K when its grid leaves most SMs idle: fp32 partials [T, split, ER] written, then
    # summed by a reduce launch that applies the gate epilogue), then the fused base + expand kernel.
    s_tiles = shrink_tiles(T, E, r)
    s_split = split_k(s_tiles, K, m.sms)
    h_out = s_split * T * ER * 4 if s_split > 1 else 2 * T * ER * b
    shrink = kernel(2.0 * T * ER * K, (T * K + ER * K) * b + h_out, s_tiles * s_split,
                    l2=cdiv(T, 64) * ER * K * b)
    if s_split > 1:
        shrink += kernel(0.0, h_out + 2 * T * ER * b, cdiv(T, 32) * (s_tiles // cdiv(T, 64))) + m.launch_s
    fused = kernel(base_flops + 2.0 * T * ER * N, base_bytes + (T * K * has_base + T * N + T * ER + N * ER) * b,
                   cdiv(T, 128) * cdiv(N, 128), l2=(cdiv(N, 128) * T * K + cdiv(T, 128) * K * N * has_base) * b)
    dense = shrink + fused + 2 * m.launch_s

    # decode: one kernel; every N tile recomputes the shrink (padded tiles) and re-reads A_all from L2.
    # Split-K: each split expands its partial H (split x the expand FLOPs) into fp32 partials of y
    # [T, split, N], which a reduce launch sums (and adds the bias to).
    n_tiles = math.ceil(N / _DECODE_BLOCK_N)
    d_split = split_k(decode_tiles(T, N), K, m.sms)
    t16, er16 = _pow2_at_least_16(T), _pow2_at_least_16(ER)
    decode_flops = base_flops + 2.0 * t16 * er16 * K * N / _DECODE_BLOCK_N + d_split * 2.0 * t16 * er16 * N
    y_out = d_split * T * N * 4 if d_split > 1 else T * N * b
    decode_hbm = base_bytes + (T * K + ER * K + N * ER) * b + y_out
    decode = kernel(decode_flops, decode_hbm, decode_tiles(T, N) * d_split, l2=n_tiles * ER * K * b) + m.launch_s
    if d_split > 1:
        decode += kernel(0.0, y_out + T * N * b, decode_tiles(T, N)) + m.launch_s

    # grouped: separate base GEMM, grouping metadata, gathered shrink, expand (+ combine of the k slots).
    S = T * k
    Eu = min(E, S)
    bm = 16 if S <= 16 * Eu else (32 if S <= 32 * Eu else 64)
    tiles = cdiv(S, bm) + Eu
    y_rw = (2 if has_base else 1) * T * N  # y read-modify-write after the base GEMM, or a plain write
    g_base = kernel(base_flops, base_bytes + (T * K + T * N) * b, m.sms, fp=peak) if has_base else 0.0
    split = max(1, min(cdiv(2 * m.sms, tiles), K // 256, 16))
    g_shrink = kernel(2.0 * S * r * K, (S * K + Eu * r * K + S * r) * b, tiles * split)
    if k == 1:
        g_expand = kernel(2.0 * S * r * N, (S * r + Eu * r * N + y_rw) * b, tiles * cdiv(N, 128))
    else:
        g_expand = kernel(2.0 * S * r * N, (S * r + Eu * r * N + S * N) * b, tiles * cdiv(N, 128))
        g_expand += (S * N + y_rw) * b / m.hbm_bw  # combine pass
    launches = int(has_base) + 2 + 2 + 1 + int(k > 1)
    grouped = g_base + g_shrink + g_expand + launches * m.launch_s

    if training:
        # dense backward: dHg (+ gate grads), dx = [dy | dH] @ [W ; A_all], dA, dB
        d_bwd = (kernel(2.0 * T * N * ER, (T * N + N * ER + 2 * T * ER) * b, cdiv(T, 64))
                 + kernel(base_flops + 2.0 * T * ER * K, base_bytes + (T * N + T * ER + ER * K + T * K) * b,
                          cdiv(T, 128) * cdiv(K, 128))
                 + kernel(2.0 * T * ER * K, (T * ER + T * K + ER * K) * b, 2 * m.sms)
                 + kernel(2.0 * T * ER * N, (T * ER + T * N + ER * N) * b, 2 * m.sms) + 4 * m.launch_s)
        dense += d_bwd
        decode += d_bwd  # decode shares the dense-rank backward
        # grouped backward: dh shrink (split-K over N), dx expand + base dx by cuBLAS, dA / dB outer products
        g_bwd = (kernel(2.0 * S * r * N, (S * N + Eu * r * N + S * r) * b, tiles * split)
                 + kernel(2.0 * S * r * K, (S * r + Eu * r * K + (S + T) * K) * b, tiles * cdiv(K, 128))
                 + (kernel(base_flops, base_bytes + (T * N + T * K) * b, m.sms, fp=peak) if has_base else 0.0)
                 + kernel(2.0 * S * r * (K + N), (S * (K + N) + 2 * S * r + Eu * r * (K + N)) * b,
                          Eu * cdiv(K + N, 128)) + 6 * m.launch_s)
        grouped += g_bwd

    return {"dense": dense, "decode": decode, "grouped": grouped}


def choose_lora_path(
    T: int, d_in: int, d_out: int, E: int, r: int, k: int, *,
    has_base: bool = True, dtype_bytes: int = 2, grouped_ok: Optional[bool] = None,
    machine: Optional[str] = None, training: bool = False,
) -> str:
    """Pick ``"dense"``, ``"decode"`` or ``"grouped"`` (or what ``SELFMOE_LORA_PATH`` forces).

    Decode is only a candidate for ``T <= DECODE_MAX_T`` and ``decode_rank_tile(E, r) <=
    DECODE_MAX_RANK_COLS`` (its shrink accumulator is in registers); grouped only when ``grouped_ok``
    (default: the module imports).
    ``machine``: a key of ``MACHINES`` (default: the current CUDA device's class); ``training``: price
    the backward too. ``"torch"`` is returned only when forced by the environment.
    """
    forced = path_override()
    if forced is not None:
        return forced
    if grouped_ok is None:
        grouped_ok = grouped_available()
    if machine is None:
        machine = current_machine()
    if machine not in MACHINES:
        raise ValueError(f"machine must be one of {sorted(MACHINES)}, got {machine!r}")
    return _model_choice(T, d_in, d_out, E, r, k, has_base, dtype_bytes, grouped_ok, machine, training)


@functools.lru_cache(maxsize=4096)
def _model_choice(T: int, d_in: int, d_out: int, E: int, r: int, k: int, has_base: bool, dtype_bytes: int,
                  grouped_ok: bool, machine: str = "h100", training: bool = False) -> str:
    # Cached: the same layer shapes come back every step, and decode steps are microseconds long.
    cost = estimate_seconds(T, d_in, d_out, E, r, k, has_base=has_base, dtype_bytes=dtype_bytes, machine=machine,
                            training=training)
    candidates = {"dense": cost["dense"]}
    if T <= DECODE_MAX_T and decode_rank_tile(E, r) <= DECODE_MAX_RANK_COLS:
        candidates["decode"] = cost["decode"]
    if grouped_ok:
        candidates["grouped"] = cost["grouped"]
    # Ties go to the first in this order: dense (fewest assumptions), decode, grouped.
    return min(candidates, key=lambda name: (candidates[name], list(candidates).index(name)))


def triton_backend(T: int, d_in: int, d_out: int, E: int, r: int, k: int, *, has_base: bool, dtype_bytes: int,
                   training: bool = False):
    """The Triton backend (contract.Backend) of the path ``choose_lora_path`` picks for these sizes
    (``training``: a backward will follow, priced in)."""
    path = choose_lora_path(T, d_in, d_out, E, r, k, has_base=has_base, dtype_bytes=dtype_bytes, training=training)
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
