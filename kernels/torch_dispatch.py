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

TORCH_PATHS = ("dense", "dense-small", "gathered", "sorted")
SMALL_T = 64
ENV_TORCH_PATH = "SELFMOE_TORCH_PATH"
# The sorted rule (see ``sorted_pays``), measured on a 2-core CPU (benchmarks/NOTES.md, issue 13 item 3).
SORTED_MIN_ROWS = 128  # token-slots per expert, on average, below which per-expert GEMMs run slowly
SORTED_SLOT_COST = 32  # a slot's gather and index_add, in rank columns of dense-rank work


def choose_torch_path(T: int, E: int, k: int, needs: GradNeeds, *, r: Optional[int] = None, cpu: bool = True) -> str:
    """The torch formulation for ``T`` tokens, ``E`` experts of rank ``r`` and top-``k`` (``needs``:
    gradients asked for; ``cpu``: the tensors are on a CPU). Without ``r`` the sorted path is never chosen."""
    forced = os.environ.get(ENV_TORCH_PATH, "")
    inference = not any(needs)
    if forced:
        if forced not in TORCH_PATHS and forced != "auto":
            raise ValueError(f"{ENV_TORCH_PATH} must be one of {TORCH_PATHS} or 'auto', got {forced!r}")
        if forced in ("dense", "sorted") or (forced != "auto" and inference):
            return forced
        if forced != "auto":
            return "dense"
    if inference:
        small = inference_path(T, E, k)
        if small is not None:
            return small
    if r is not None and cpu and sorted_pays(T, E, k, r):
        return "sorted"
    return "dense"


def sorted_pays(T: int, E: int, k: int, r: int) -> bool:
    """Whether the sorted formulation beats dense-rank for ``T`` tokens, ``E`` experts of rank ``r``, top-``k``.

    Dense-rank computes ``E*r`` rank columns per token; sorted computes ``k*r`` and moves each of the
    ``T*k`` slots twice (a gather of its x row, an ``index_add_`` of its output row), which costs about
    as much as ``SORTED_SLOT_COST`` rank columns. So sorted pays when ``r*(E - k) > SORTED_SLOT_COST*k``,
    and when each expert gets enough rows (``T*k >= SORTED_MIN_ROWS*E``) for its GEMMs to run at speed.
    """
    return T * k >= SORTED_MIN_ROWS * E and r * (E - k) > SORTED_SLOT_COST * k


def inference_path(T: int, E: int, k: int) -> Optional[str]:
    """The decode-sized inference formulation for ``T`` tokens, ``E`` experts and top-``k``:
    ``"gathered"`` (a single token, or fewer token-slots than experts), ``"dense-small"`` (up to
    ``SMALL_T`` tokens), or None (the general ``"dense"``)."""
    if T == 1 or T * k < E:
        return "gathered"
    if T <= SMALL_T:
        return "dense-small"
    return None
