"""Which formulation the torch backend runs, from the problem's sizes (the torch-side dispatcher).

``kernels/dispatch.py`` chooses among the Triton paths on GPUs; this module chooses inside the torch
backend (torch_path.py), on any device:

- ``"gathered"`` (torch_gathered.py, inference only): each token-slot gathers its expert's factors.
  For decode: fewer token-slots than experts (``T*k < E``), or a single token. Reads ``k`` experts
  instead of all ``E`` and skips stacking ``lora_B``.
- ``"dense-small"`` (torch_path.py, inference only): the dense-rank forward in fewer ops, for at
  most ``SMALL_T`` tokens (decode batches), where each op's fixed cost outweighs its arithmetic.
  Bitwise the same numbers as ``"dense"``.
- ``"dense"`` (torch_path.py): the dense-rank formulation, all ``E*r`` rank columns in two skinny GEMMs.
  Pays ``E*r`` rank columns where ``k*r`` are needed, but with no gather or scatter.

The thresholds were measured on a 2-core CPU (benchmarks/NOTES.md); ``SELFMOE_TORCH_PATH=dense|gathered``
forces one (``gathered`` and ``dense-small`` only apply to inference; training always runs ``dense``).
"""
from __future__ import annotations

import os
from typing import Optional

from .contract import GradNeeds

TORCH_PATHS = ("dense", "dense-small", "gathered")
SMALL_T = 64
ENV_TORCH_PATH = "SELFMOE_TORCH_PATH"


def choose_torch_path(T: int, E: int, k: int, needs: GradNeeds) -> str:
    """The torch formulation for ``T`` tokens, ``E`` experts and top-``k`` (``needs``: gradients asked for)."""
    forced = os.environ.get(ENV_TORCH_PATH, "")
    inference = not any(needs)
    if forced:
        if forced not in TORCH_PATHS and forced != "auto":
            raise ValueError(f"{ENV_TORCH_PATH} must be one of {TORCH_PATHS} or 'auto', got {forced!r}")
        if forced == "dense" or (forced != "auto" and inference):
            return forced
        if forced != "auto":
            return "dense"
    if inference:
        small = inference_path(T, E, k)
        if small is not None:
            return small
    return "dense"


def inference_path(T: int, E: int, k: int) -> Optional[str]:
    """The decode-sized inference formulation for ``T`` tokens, ``E`` experts and top-``k``:
    ``"gathered"`` (a single token, or fewer token-slots than experts), ``"dense-small"`` (up to
    ``SMALL_T`` tokens), or None (the general ``"dense"``)."""
    if T == 1 or T * k < E:
        return "gathered"
    if T <= SMALL_T:
        return "dense-small"
    return None
