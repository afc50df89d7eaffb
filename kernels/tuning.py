"""Autotuning policy shared by every Triton kernel in selfmoe.kernels.

- Keys bucket the token count (``token_bucket``) so changing batch sizes do not re-tune.
- ``SELFMOE_TRITON_CONFIG`` pins one config for every kernel, e.g.
  ``SELFMOE_TRITON_CONFIG="BLOCK_M=64,BLOCK_N=128,BLOCK_K=32,num_warps=4,num_stages=3"``
  (keys a kernel does not take are ignored; its own defaults fill the rest).
- Under ``TRITON_INTERPRET=1`` only the first config of each list runs: the interpreter is for
  correctness, and autotuning there would only multiply test time.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import triton

from .utils import interpreting


def token_bucket(T: int) -> int:
    """Power-of-two bucket of the token count (1, 2, 4, ..., 65536), used as an autotune key."""
    if T <= 1:
        return 1
    return min(1 << (int(T) - 1).bit_length(), 1 << 16)


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
