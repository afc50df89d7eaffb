"""Autotuning policy shared by every Triton kernel in selfmoe.kernels.

- ``autotune(configs, key, smem=...)`` is the one decorator the kernels use. It returns a ``Tuner``
  (Triton's ``Autotuner`` with two rules added):

  * **shared-memory pruning**: ``smem(params, elem_bytes)`` estimates the bytes a config's software
    pipeline allocates (``params``: the launch's constexprs merged with the config's, plus
    ``num_stages``/``num_warps``); configs over the device's opt-in limit are dropped before anything
    compiles them. If none fits, the smallest stays so the launch error names it. The estimates are
    checked against the compiled kernels by the compile check (``compile_check.py``: within 10%).
  * **no autotuning inside CUDA-graph capture**: benchmarking a config syncs the device and launches
    the kernel several times, which is illegal while a stream is being captured. A key first seen
    during capture takes the *first config that survives pruning* (the table's default, which the
    pruning makes fit the device class: same on every H100/H200, A100...) and keeps it for the
    process; warm up eagerly with the shapes you capture to get tuned configs in the graph.

- Keys bucket the token count (``token_bucket``: 1, 16, 64, ..., 65536: 8 buckets) so a sweep of batch
  sizes re-tunes at most 8 times per kernel and shape; the kernels take the bucket with
  ``do_not_specialize`` so it never forks a compile.
- ``SELFMOE_TRITON_CONFIG`` pins one config for every kernel, e.g.
  ``SELFMOE_TRITON_CONFIG="BLOCK_M=64,BLOCK_N=128,BLOCK_K=32,num_warps=4,num_stages=3"``
  (keys a kernel does not take are ignored; its own defaults fill the rest).
- Under ``TRITON_INTERPRET=1`` only the first config of each list runs: the interpreter is for
  correctness, and autotuning there would only multiply test time.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch
import triton
from triton.runtime.autotuner import Autotuner

from .utils import capability, interpreting, max_smem

# Token-count buckets: powers of 4 from 16 (T = 1 alone: the decode step), capped at 65536.
_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)


def token_bucket(T: int) -> int:
    """Bucket of the token count used as an autotune key: 1, then 16, 64, ..., 65536 (8 values)."""
    T = int(T)
    for b in _BUCKETS:
        if T <= b:
            return b
    return _BUCKETS[-1]


def pinned_config() -> Optional[Dict[str, int]]:
    """The config pinned by ``SELFMOE_TRITON_CONFIG``, as a dict, or None."""
    text = os.environ.get("SELFMOE_TRITON_CONFIG", "").strip()
    if not text:
        return None
    out: Dict[str, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"SELFMOE_TRITON_CONFIG entries must look like NAME=INT, got {item!r} in {text!r}")
        name, value = (s.strip() for s in item.split("=", 1))
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"SELFMOE_TRITON_CONFIG value for {name} must be an int, got {value!r}") from None
    return out


def select_configs(configs: List[triton.Config]) -> List[triton.Config]:
    """Apply the pin and the interpreter policy to a kernel's candidate configs (first = default)."""
    if not configs:
        raise ValueError("select_configs needs at least one candidate config")
    pin = pinned_config()
    if pin is not None:
        base = configs[0]
        kwargs = dict(base.kwargs)
        kwargs.update({k: v for k, v in pin.items() if k in base.kwargs})
        return [
            triton.Config(
                kwargs,
                num_warps=pin.get("num_warps", base.num_warps),
                num_stages=pin.get("num_stages", base.num_stages),
            )
        ]
    if interpreting():
        return configs[:1]
    return configs


# (params, elem_bytes) -> bytes; params: the launch's keyword args and the config's kwargs, num_stages,
# num_warps. elem_bytes: bytes per element of the kernel's first pointer argument (its input dtype).
SmemEstimate = Callable[[Dict[str, int], int], int]


def config_params(config: triton.Config, launch_kwargs: Dict, cap: int = 90, named_args: Optional[Dict] = None,
                  elem_bytes: Optional[int] = None) -> Dict:
    """The constexpr values one launch would compile with under ``config`` (for the smem estimates),
    plus ``num_stages``, ``num_warps`` and the target's ``capability``; with ``named_args`` also the
    launch's int arguments (strides, sizes: they decide which loads Triton can vectorise, see
    ``async_tile``), and ``elem_bytes`` (the input width) when given."""
    params = {k: v for k, v in (named_args or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    params.update(launch_kwargs)
    params.update(config.kwargs)
    params["num_stages"] = config.num_stages
    params["num_warps"] = config.num_warps
    params["capability"] = cap
    if elem_bytes is not None:
        params["elem_bytes"] = elem_bytes
    return params


def only_for(config: triton.Config, *elem_bytes: int) -> triton.Config:
    """Mark ``config`` as a candidate only for inputs of these widths (bytes per element): the pruning
    drops it for the others. fp32 dots run on FMA units (ieee precision) and hold a K slice of both
    operands in registers, so fp32 wants smaller tiles than the tensor-core configs for 16-bit inputs."""
    config.selfmoe_elem_bytes = tuple(elem_bytes)
    return config


def fma_dots(p: Dict) -> bool:
    """Whether the launch's dots run on FMA units: fp32 inputs at ieee precision (``DOT_PRECISION``,
    ``utils.dot_precision``; TF32 runs on tensor cores). Without ``DOT_PRECISION`` the input width
    decides (``elem_bytes``, 2 when unknown)."""
    if "DOT_PRECISION" in p:
        return p["DOT_PRECISION"] == "ieee"
    return p.get("elem_bytes", 2) >= 4


def fma_regs_ok(p: Dict, m: int, n: int, k: int, budget: int = 1024, max_k: Optional[int] = 32) -> bool:
    """Register budget of a ``[m, k] x [k, n]`` dot with fp32 inputs (FMA units, no tensor cores):
    Triton's FMA lowering keeps the thread's accumulator values and, per value, a K slice of the
    operands live, so ``m * n / threads * k`` grows with the K tile. At <= 1024 every fp32 compile in
    the report stays under 255 registers without spills (64 x 64 x 32 on 4 warps: ~210); the default
    configs for half inputs (up to 64 values x K = 64) spilled up to 37 KB. A kernel with more live
    state next to the dot passes a smaller ``budget``. True when the dots run on tensor cores (``fma_dots``)."""
    if not fma_dots(p):
        return True
    # and K itself at most 32 (``max_k``): 32 x 64 x 64 on 4 warps (16 values x 64) spilled 360 B on sm_80
    return m * n * k <= budget * 32 * p["num_warps"] and (max_k is None or k <= max_k)


def async_tile(e: int, strides, bounds) -> bool:
    """Whether Triton can stage a 2-D tile load through cp.async (and so pipeline it, one buffer per
    stage) rather than load it to registers and copy it to shared memory once (one buffer).

    ``strides``: the tile's two element strides, ``bounds``: the mask bound along each dimension (None:
    unmasked). cp.async copies >= 4 bytes per vector, and Triton learns an int argument's divisibility
    only as "multiple of 16" (the JIT's specialisation) or nothing: a 16-bit tile whose row stride or
    contiguous-dimension bound is not a multiple of 16 is loaded 2 bytes at a time (``d_in = 1000``, a
    rank width 8 as a stride). 4-byte elements always qualify. A tile with no unit stride never does."""
    if e >= 4:
        return True
    for d in (1, 0):
        if strides[d] == 1:
            other, bound = strides[1 - d], bounds[d]
            return other % 16 == 0 and (bound is None or bound % 16 == 0)
    return False


def tile_buffers(p: Dict, e: int, dot_m: int, async_ok: bool) -> int:
    """Shared-memory copies of one dot operand tile in a K loop: ``pipeline_buffers`` when its load is
    asynchronous (``async_tile``), else one (loaded to registers, then copied for the dot)."""
    return pipeline_buffers(p, e, dot_m) if async_ok else 1


def pipeline_buffers(p: Dict, elem_bytes: int, dot_m: int) -> int:
    """Copies of each pipelined tile Triton allocates: ``num_stages`` when the dot lowers to Hopper's
    async wgmma (it still reads a stage while the next loads land: sm_90, 16-bit inputs, M >= 64,
    whole warp groups), ``num_stages - 1`` with mma.sync, whose operands leave shared memory
    synchronously (measured on the compiled kernels: compile_check.py)."""
    wgmma = p["capability"] >= 90 and elem_bytes == 2 and dot_m >= 64 and p["num_warps"] % 4 == 0
    return p["num_stages"] if wgmma else max(1, p["num_stages"] - 1)


def _first_tensor(named_args: Dict) -> torch.Tensor:
    for v in named_args.values():
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError("autotune pruning needs at least one tensor argument")


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Tuner(Autotuner):
    """``triton.Autotuner`` plus shared-memory pruning and the capture rule (see the module docstring)."""

    def __init__(self, fn, configs, key, smem: Optional[SmemEstimate], restore_value=None,
                 elem_arg: Optional[str] = None, regs: Optional[Callable[[Dict], bool]] = None):
        self.smem_estimate = smem
        self.elem_arg = elem_arg
        self.regs_ok = regs
        prune = {"early_config_prune": self._prune} if (smem is not None or regs is not None
                                                        or any(hasattr(c, "selfmoe_elem_bytes") for c in configs)) else None
        super().__init__(fn, fn.arg_names, configs, key, None, restore_value, prune_configs_by=prune)

    def estimate(self, config: triton.Config, named_args: Dict, launch_kwargs: Dict) -> Optional[int]:
        """The smem estimate of ``config`` for one launch (None when the kernel has none)."""
        if self.smem_estimate is None:
            return None
        t = self._elem_tensor(named_args)
        return int(self.smem_estimate(config_params(config, launch_kwargs, capability(t.device), named_args),
                                      t.element_size()))

    def _elem_tensor(self, named_args: Dict) -> torch.Tensor:
        return named_args[self.elem_arg] if self.elem_arg else _first_tensor(named_args)

    def _prune(self, configs, named_args, **kwargs):
        limit = max_smem(_first_tensor(named_args).device)
        t = self._elem_tensor(named_args)
        e = t.element_size()
        # configs meant for other input widths (``only_for``) are not candidates at all
        configs = [c for c in configs if e in getattr(c, "selfmoe_elem_bytes", (e,))] or configs
        est = [(self.estimate(c, named_args, kwargs) or 0, i) for i, c in enumerate(configs)]
        keep = [configs[i] for e_, i in est if e_ <= limit]
        if self.regs_ok is not None:
            # register budget: configs whose live tiles need more registers than a thread has spill
            cap = capability(t.device)
            keep = [c for c in keep if self.regs_ok(config_params(c, kwargs, cap, named_args, e))]
        return keep or [configs[min(est)[1]]]

    def candidates(self, named_args: Dict, launch_kwargs: Dict) -> List[triton.Config]:
        """The configs this launch could run with: what survives pruning (all when nothing prunes)."""
        self.nargs = named_args
        try:
            return list(Autotuner.prune_configs(self, launch_kwargs))
        finally:
            self.nargs = None

    def prune_configs(self, kwargs: Dict) -> List[triton.Config]:
        kept = super().prune_configs(kwargs)
        if len(kept) > 1 and capturing():
            # Benchmarking would sync and launch inside the capture: take the default that fits.
            return kept[:1]
        return kept


def autotune(configs: List[triton.Config], key: List[str], *, smem: Optional[SmemEstimate] = None,
             restore_value: Optional[List[str]] = None, elem_arg: Optional[str] = None,
             regs: Optional[Callable[[Dict], bool]] = None):
    """The kernels' autotune decorator: ``select_configs`` (pin, interpreter), pruning by the smem
    estimate (``elem_arg``: the pointer whose dtype sizes the tiles, default the first tensor) and by
    ``regs(params)`` (False: the config's live tiles would spill), and the capture rule."""

    def decorator(fn):
        return Tuner(fn, select_configs(configs), key, smem, restore_value, elem_arg, regs)

    return decorator
