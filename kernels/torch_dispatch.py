"""Which formulation the torch backend runs, from the problem's sizes (the torch-side dispatcher).

``kernels/dispatch.py`` chooses among the Triton paths on GPUs; this module chooses inside the torch
backend (torch_path.py), on any device:

- ``"gathered"`` (torch_gathered.py, inference only): each token-slot gathers its expert's factors.
  For decode: fewer token-slots than experts (``T*k < E``), or a single token. Reads ``k`` experts
  instead of all ``E`` and skips stacking ``lora_B``.
- ``"dense-small"`` (torch_path.py, inference only): the dense-rank forward in fewer ops, for at
  most ``SMALL_T`` tokens (decode batches), where each op's fixed cost outweighs its arithmetic.
  Bitwise the same numbers as ``"dense"``.
- ``"sorted"`` (torch_sorted.py, training and inference, on a CPU): token-slots sorted by expert, each
  expert's GEMMs on its own rows only, gathered and scattered back with ``index_add_``. Pays ``k*r``
  rank columns plus a gather and a scatter per slot and a few ops per expert: chosen by
  ``sorted_pays`` when ``E*r`` is large against ``k*r`` and T is not small.
- ``"dense"`` (torch_path.py): the dense-rank formulation, all ``E*r`` rank columns in two skinny GEMMs.
  Pays ``E*r`` rank columns where ``k*r`` are needed, but with no gather or scatter.

The thresholds were measured on a 2-core CPU (benchmarks/NOTES.md); ``SELFMOE_TORCH_PATH=dense|sorted|
gathered|dense-small`` forces one (``gathered`` and ``dense-small`` only apply to inference: with
gradients asked for they fall back to ``dense``). The sorted path is chosen on a CPU only: it reads the
per-expert counts on the host, a sync (and no CUDA-graph capture) on a GPU, where the Triton grouped
path is the many-experts path.
"""
from __future__ import annotations

import os
from typing import Optional

from .contract import GradNeeds

TORCH_PATHS = ("dense", "dense-small", "gathered", "sorted")
SMALL_T = 64
ENV_TORCH_PATH = "SELFMOE_TORCH_PATH"
# The sorted rule (``sorted_pays``), fitted to same-run A/B timings on a 2-core AMD EPYC at 1 thread
# (benchmarks/NOTES.md, issue 13 item 3), in units of one rank column of dense-rank work per token:
SORTED_SLOT_COST = 32  # a slot's row gather and index_add_, beside its r rank columns
SORTED_EXPERT_COST = 1024  # an expert's fixed cost (its ~8 small ops), spread over the T tokens
# A dense rank column's cost when oneDNN computes the dense products (kernels/cpu_gemm.py), in units of
# one computed by torch's BLAS: refitted on the same shapes with oneDNN (NOTES, "Change: the dense
# path's rank-space products through oneDNN"), where the dense path ran in 0.85-0.95x its old time.
ONEDNN_DENSE_COLUMN_COST = 0.5


def choose_torch_path(T: int, E: int, k: int, needs: GradNeeds, *, r: int, cpu: bool = True,
                      onednn: bool = False) -> str:
    """The torch formulation for ``T`` tokens, ``E`` experts of rank ``r`` and top-``k`` (``needs``:
    gradients asked for; ``cpu``: the tensors are on a CPU; ``onednn``: the dense formulation's
    rank-space products would go through oneDNN, see ``sorted_pays``)."""
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
    if cpu and sorted_pays(T, E, k, r, onednn=onednn):
        return "sorted"
    return "dense"


def sorted_pays(T: int, E: int, k: int, r: int, *, onednn: bool = False) -> bool:
    """Whether the sorted formulation beats dense-rank for ``T`` tokens, ``E`` experts of rank ``r``, top-``k``.

    Per token, dense-rank computes ``E*r`` rank columns. Sorted computes ``k*r``, moves each of its ``k``
    slots through memory twice (a gather of the x row, an ``index_add_`` of the output row: about
    ``SORTED_SLOT_COST`` rank columns each) and pays a fixed cost per expert (``SORTED_EXPERT_COST``
    over all tokens)::

        sorted when  T * (c*E*r - k*(r + SORTED_SLOT_COST)) > E * SORTED_EXPERT_COST

    with ``c = 1``, or ``ONEDNN_DENSE_COLUMN_COST`` when oneDNN computes the dense path's products
    (``onednn``: float32 on an x86 CPU, kernels/cpu_gemm.py), where its rank columns cost about half.

    Measured (1 thread, T=2048 unless said, d=1024; forward and router training): sorted wins at
    (E, r, k) = (8, 16, 2), (8, 16, 1), (16, 8, 2), (64, 16, 2) also at T=1024, and (4, 16, 1) at
    T=4096; dense wins at (4, 8, 1) (paper-cpu) and (8, 8, 2), and at (8, 16, 2) with T=128; they tie
    at T=256-512. With oneDNN (refitted on the same shapes): sorted wins at (8, 16, 1), (16, 16, 2),
    (32, 16, 2) also at T=512, (64, 16, 2) down to T=256; dense at (8, 16, 2) (top2-cpu), (16, 8, 2),
    (8, 8, 2), (4, 16, 1), (4, 8, 1) and at T <= 512 for (8, 16, 2). The rule does not look at the
    thread count: at 2 threads the per-op cost depends on whether the other core is free (see
    benchmarks/NOTES.md), which a dispatcher cannot see.
    """
    column = ONEDNN_DENSE_COLUMN_COST if onednn else 1.0
    return T * (column * E * r - k * (r + SORTED_SLOT_COST)) > E * SORTED_EXPERT_COST


def inference_path(T: int, E: int, k: int) -> Optional[str]:
    """The decode-sized inference formulation for ``T`` tokens, ``E`` experts and top-``k``:
    ``"gathered"`` (a single token, or fewer token-slots than experts), ``"dense-small"`` (up to
    ``SMALL_T`` tokens), or None (the general ``"dense"``, or ``"sorted"`` where it pays)."""
    if T == 1 or T * k < E:
        return "gathered"
    if T <= SMALL_T:
        return "dense-small"
    return None
