"""Grouping metadata for the grouped multi-LoRA kernels: token-slots sorted by expert, padded to tiles.

A token t routed to k experts owns k *slots* ``s = t * k + j`` (``j`` indexes its top-k choice). Grouped
kernels want the slots of one expert next to each other, in tiles of ``BLOCK_M`` rows that never mix
experts, so each tile is a plain dense matmul against one expert's weights. (Routing, which picks the
experts, is ``route_topk`` in topk.py; this module only groups the slots the router chose.) Built here::

    expert_ids [T, k] ──flatten──> e(s) for s in [0, S)              S = T * k
    stable sort by expert, each expert's run padded up to a multiple of BLOCK_M:

    position:  0 ....... BM ....... 2BM ....... 3BM ...... capacity
    slots:     [e0 e0 e0 -1 ][e2 e2 e2 e2 ][e2 -1 -1 -1 ][-1 ... ]
    block_expert:  0             2             2           -1

- ``sorted_slots[p]``: the slot at padded position p, or ``-1`` for padding (kernels mask those rows).
- ``slot_to_sorted[s]``: the inverse, the padded position of slot s (to scatter results back).
- ``block_expert[b]``: the expert of tile b, ``-1`` for tiles past the last used one (kernels exit).
- ``expert_offsets`` / ``padded_offsets`` ``[E+1]``: where each expert's slots start, unpadded / padded.

**No host synchronisation** (CUDA-graph safe): every buffer is sized from Python ints known from the
shapes alone, using the upper bound ``capacity = S + min(E, S) * (BLOCK_M - 1)`` rounded up to a
multiple of BLOCK_M (at most ``min(E, S)`` experts are used and each wastes fewer than BLOCK_M rows);
how much of it is used is only known on the device (``padded_offsets[E]``), and the kernels read it
there. Nothing calls ``.item()``, ``.tolist()``, ``bool(tensor)`` or ``torch.nonzero``.

Three implementations, all with the same result:

- ``grouping_metadata_triton``: two Triton kernels (count per slot block, then place); 2 launches
  (3 for very large S), which matters in decode where the LoRA math itself is microseconds.
- ``grouping_metadata_torch``: stable ``torch.sort`` + ``searchsorted`` + ``cumsum`` + ``scatter_``;
  sync-free as well, about fifteen small launches.
- ``grouping_metadata_naive``: Python lists, the readable reference for tests (syncs; never on a hot path).

Stability: slots of one expert keep their slot order (token-major, then top-k position), so results
never depend on how a sort broke ties.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import device_guard, interpreting, poisoned_empty

class GroupingMeta(NamedTuple):
    """Slot order for grouped kernels. Tensors are int32 on the ids' device; the ints are shape facts."""

    sorted_slots: torch.Tensor  # [capacity]: slot id at each padded sorted position, -1 = padding
    slot_to_sorted: torch.Tensor  # [S]: padded sorted position of each slot
    block_expert: torch.Tensor  # [num_blocks]: expert of each BLOCK_M tile, -1 = unused tile
    expert_offsets: torch.Tensor  # [E+1]: first slot of each expert in the unpadded sorted order
    padded_offsets: torch.Tensor  # [E+1]: first row of each expert in the padded order (multiples of BLOCK_M)
    num_slots: int  # S = T * k
    top_k: int  # k (token of slot s is s // k)
    num_experts: int  # E
    block_m: int  # BLOCK_M

    @property
    def capacity(self) -> int:
        return self.sorted_slots.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """``[E]`` slots per expert (a device op, no sync)."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]

    @property
    def num_padded(self) -> torch.Tensor:
        """``[1]`` rows in use (``padded_offsets[E]``), on the device."""
        return self.padded_offsets[-1:]


def grouping_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on padded rows: ``S + min(E, S) * (BLOCK_M - 1)``, rounded up to a multiple of BLOCK_M."""
    rows = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


def _check_and_size(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Tuple[int, int, int]:
    """Check the arguments; return ``(k, S, capacity)``."""
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must have shape [T, k], got {list(expert_ids.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must be int32 or int64, got {expert_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    T, k = expert_ids.shape
    S = T * k
    return k, S, grouping_capacity(S, num_experts, block_m)


# ----------------------------------------------------------------------------------------------------
# Naive reference (tests only: Python lists, syncs)
# ----------------------------------------------------------------------------------------------------


def grouping_metadata_naive(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> GroupingMeta:
    """Readable reference: bucket the slots per expert in slot order, pad each bucket with -1."""
    k, S, capacity = _check_and_size(expert_ids, num_experts, block_m)
    flat = expert_ids.reshape(-1).tolist()
    buckets = [[s for s, e in enumerate(flat) if e == ex] for ex in range(num_experts)]
    sorted_slots = [-1] * capacity
    slot_to_sorted = [0] * S
    block_expert = [-1] * (capacity // block_m)
    expert_offsets, padded_offsets = [0], [0]
    for ex, bucket in enumerate(buckets):
        start = padded_offsets[-1]
        for i, s in enumerate(bucket):
            sorted_slots[start + i] = s
            slot_to_sorted[s] = start + i
        padded = -(-len(bucket) // block_m) * block_m
        for b in range(start // block_m, (start + padded) // block_m):
            block_expert[b] = ex
        expert_offsets.append(expert_offsets[-1] + len(bucket))
        padded_offsets.append(start + padded)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int32, device=expert_ids.device)

    return GroupingMeta(
        as_tensor(sorted_slots), as_tensor(slot_to_sorted), as_tensor(block_expert),
        as_tensor(expert_offsets), as_tensor(padded_offsets), S, k, num_experts, block_m,
    )


# ----------------------------------------------------------------------------------------------------
# Torch implementation (sync-free)
# ----------------------------------------------------------------------------------------------------


def grouping_metadata_torch(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> GroupingMeta:
    """Sync-free torch version: stable sort, offsets by ``searchsorted`` (``bincount`` would read the
    max id back to the host on CUDA), padded positions by arithmetic, buffers filled by ``scatter_``."""
    k, S, capacity = _check_and_size(expert_ids, num_experts, block_m)
    device = expert_ids.device
    num_blocks = capacity // block_m

    flat = expert_ids.reshape(-1).to(torch.int64)  # [S]
    sorted_e, order = torch.sort(flat, stable=True)  # [S], [S]: order[i] = slot at sorted position i
    experts = torch.arange(num_experts + 1, device=device, dtype=torch.int64)
    expert_offsets = torch.searchsorted(sorted_e, experts)  # [E+1]: first sorted position of each expert
    counts = expert_offsets[1:] - expert_offsets[:-1]  # [E]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_offsets = torch.zeros(num_experts + 1, device=device, dtype=torch.int64)
    padded_offsets[1:] = torch.cumsum(padded_counts, 0)  # [E+1]

    # position in the padded order = padded start of its expert + rank inside the expert's run
    rank = torch.arange(S, device=device, dtype=torch.int64) - expert_offsets[sorted_e]  # [S]
    pos = padded_offsets[sorted_e] + rank  # [S]
    sorted_slots = torch.full((capacity,), -1, device=device, dtype=torch.int64).scatter_(0, pos, order)
    slot_to_sorted = torch.empty(S, device=device, dtype=torch.int64).scatter_(0, order, pos)

    starts = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m  # [num_blocks]
    owner = torch.searchsorted(padded_offsets[1:].contiguous(), starts, right=True)  # experts ending <= start
    block_expert = torch.where(starts < padded_offsets[-1], owner, torch.full_like(owner, -1))

    i32 = torch.int32
    return GroupingMeta(
        sorted_slots.to(i32), slot_to_sorted.to(i32), block_expert.to(i32),
        expert_offsets.to(i32), padded_offsets.to(i32), S, k, num_experts, block_m,
    )


# ----------------------------------------------------------------------------------------------------
# Triton implementation
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _grouping_count_kernel(
    ids_ptr,  # [S] int32/int64 expert of each slot
    blk_counts_ptr,  # [NB, E_P] int32 out: slots per expert in each block of BLOCK_S slots
    S,
    BLOCK_S: tl.constexpr,
    E_P: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_s = i_b * BLOCK_S + tl.arange(0, BLOCK_S)
    o_e = tl.arange(0, E_P)
    # out-of-range slots get expert -1, which matches no column
    b_e = tl.load(ids_ptr + o_s, mask=o_s < S, other=-1).to(tl.int32)  # [BS]
    b_hot = (b_e[:, None] == o_e[None, :]).to(tl.int32)  # [BS, E_P]
    tl.store(blk_counts_ptr + i_b * E_P + o_e, tl.sum(b_hot, axis=0))  # [E_P]


@triton.jit
def _grouping_place_kernel(
    ids_ptr,  # [S] expert of each slot
    blk_counts_ptr,  # [NB, E_P] int32 from _grouping_count_kernel
    blk_incl_ptr,  # [NB, E_P] int32 inclusive cumsum over blocks (read only if not PREFIX_IN_KERNEL)
    sorted_slots_ptr,  # [CAP] int32 out
    slot_to_sorted_ptr,  # [S] int32 out
    block_expert_ptr,  # [NUM_BLOCKS] int32 out
    expert_offsets_ptr,  # [E+1] int32 out
    padded_offsets_ptr,  # [E+1] int32 out
    S,
    E,
    NB,
    CAP,
    NUM_BLOCKS,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    E_P: tl.constexpr,
    PREFIX_IN_KERNEL: tl.constexpr,
):
    # Each program owns three disjoint index ranges of length BLOCK_S, so no two programs write the
    # same element and nothing needs a barrier: (i) slot block i_b (real positions), (ii) padded
    # positions [i_b*BS, (i_b+1)*BS) that are padding, (iii) tiles [i_b*BS, (i_b+1)*BS) of block_expert.
    i_b = tl.program_id(0)
    o_e = tl.arange(0, E_P)
    m_e = o_e < E

    # per-expert totals and the count in the blocks before this one (exclusive prefix over blocks)
    if PREFIX_IN_KERNEL:
        # small NB (decode, short prefill): a loop over NB rows beats one more launch
        b_total = tl.zeros([E_P], dtype=tl.int32)
        b_before = tl.zeros([E_P], dtype=tl.int32)
        for i_r in range(0, NB):
            b_row = tl.load(blk_counts_ptr + i_r * E_P + o_e)  # [E_P]
            b_total += b_row
            b_before += tl.where(i_r < i_b, b_row, 0)
    else:
        b_total = tl.load(blk_incl_ptr + (NB - 1) * E_P + o_e)  # [E_P]
        i_own = tl.minimum(i_b, NB - 1)  # programs past NB place no slots; any row is fine
        b_before = tl.load(blk_incl_ptr + i_own * E_P + o_e) - tl.load(blk_counts_ptr + i_own * E_P + o_e)

    b_padded = (b_total + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_P] (0 for columns >= E)
    b_pend = tl.cumsum(b_padded, axis=0)  # [E_P] padded end of each expert
    b_pstart = b_pend - b_padded  # [E_P]
    b_end = tl.cumsum(b_total, axis=0)  # [E_P] unpadded end

    if i_b == 0:
        tl.store(expert_offsets_ptr + o_e, b_end - b_total, mask=m_e)
        tl.store(expert_offsets_ptr + 1 + o_e, b_end, mask=o_e == E - 1)
        tl.store(padded_offsets_ptr + o_e, b_pstart, mask=m_e)
        tl.store(padded_offsets_ptr + 1 + o_e, b_pend, mask=o_e == E - 1)

    o_i = i_b * BLOCK_S + tl.arange(0, BLOCK_S)  # [BS] this program's index range

    # (i) real slots: position = padded start of the expert + slots of that expert in earlier blocks
    #     + same-expert slots earlier in this block (exclusive cumsum of the one-hot: stable)
    m_s = o_i < S
    b_e = tl.load(ids_ptr + o_i, mask=m_s, other=-1).to(tl.int32)  # [BS]
    b_hot = (b_e[:, None] == o_e[None, :]).to(tl.int32)  # [BS, E_P]
    b_rank = tl.sum((tl.cumsum(b_hot, axis=0) - b_hot) * b_hot, axis=1)  # [BS]
    b_base = tl.sum(b_hot * (b_pstart + b_before)[None, :], axis=1)  # [BS]
    b_pos = b_base + b_rank
    tl.store(sorted_slots_ptr + b_pos, o_i, mask=m_s)
    tl.store(slot_to_sorted_ptr + o_i, b_pos, mask=m_s)

    # (ii) padding: position p belongs to the first expert whose padded end is > p; it is padding if
    #      its rank in that expert's run is >= the expert's count (or p is past every expert)
    m_p = o_i < CAP
    b_owner = tl.sum(((b_pend[None, :] <= o_i[:, None]) & m_e[None, :]).to(tl.int32), axis=1)  # [BS]
    b_ohot = (b_owner[:, None] == o_e[None, :]).to(tl.int32)  # [BS, E_P]
    b_rank_p = o_i - tl.sum(b_ohot * b_pstart[None, :], axis=1)
    b_cnt_p = tl.sum(b_ohot * b_total[None, :], axis=1)
    m_pad = m_p & ((b_owner >= E) | (b_rank_p >= b_cnt_p))
    tl.store(sorted_slots_ptr + o_i, tl.full([BLOCK_S], -1, tl.int32), mask=m_pad)

    # (iii) tile owners: the expert whose padded range holds the tile's first row, -1 past the end
    m_q = o_i < NUM_BLOCKS
    b_first = o_i * BLOCK_M
    b_qowner = tl.sum(((b_pend[None, :] <= b_first[:, None]) & m_e[None, :]).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + o_i, tl.where(b_qowner < E, b_qowner, -1), mask=m_q)


# Above this many slot blocks the per-program prefix loop (O(NB) each, O(NB^2) total) loses to one
# torch cumsum launch.
_PREFIX_LOOP_MAX_BLOCKS = 32


def _grouping_block_s(num_slots: int, e_pad: int) -> int:
    # [BLOCK_S, E_P] one-hot tiles: keep them <= 8K elements (registers: 16K spilled with 8 warps too),
    # and blocks few enough that the prefix stays cheap.
    want = triton.next_power_of_2(max(1, triton.cdiv(num_slots, _PREFIX_LOOP_MAX_BLOCKS)))
    return max(32, min(want, max(32, 8192 // e_pad)))


def grouping_metadata_triton(
    expert_ids: torch.Tensor, num_experts: int, block_m: int, *, block_s: Optional[int] = None
) -> GroupingMeta:
    """Grouping metadata with two Triton kernels (count, place), sync-free. ``block_s`` overrides the
    slot-block size (tests use it to reach the multi-block and torch-prefix paths on small inputs)."""
    k, S, capacity = _check_and_size(expert_ids, num_experts, block_m)
    device = expert_ids.device
    num_blocks = capacity // block_m
    e_pad = max(16, triton.next_power_of_2(num_experts))
    BS = block_s if block_s is not None else _grouping_block_s(S, e_pad)
    nb = max(1, triton.cdiv(S, BS))

    ids = expert_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    i32 = torch.int32
    blk_counts = poisoned_empty((nb, e_pad), i32, device)
    sorted_slots = poisoned_empty((capacity,), i32, device)
    slot_to_sorted = poisoned_empty((S,), i32, device)
    block_expert = poisoned_empty((num_blocks,), i32, device)
    expert_offsets = poisoned_empty((num_experts + 1,), i32, device)
    padded_offsets = poisoned_empty((num_experts + 1,), i32, device)

    prefix_in_kernel = nb <= _PREFIX_LOOP_MAX_BLOCKS
    with device_guard(ids):
        _grouping_count_kernel[(nb,)](ids, blk_counts, S, BLOCK_S=BS, E_P=e_pad)
        blk_incl = blk_counts if prefix_in_kernel else torch.cumsum(blk_counts, 0, dtype=i32)
        grid = (max(nb, triton.cdiv(capacity, BS)),)
        # several [BS, E_P] int32 one-hot tiles are live: 8 warps above 4K elements (4 spilled at 64K slots)
        warps = 8 if BS * e_pad > 4096 else 4
        _grouping_place_kernel[grid](
            ids, blk_counts, blk_incl, sorted_slots, slot_to_sorted, block_expert, expert_offsets, padded_offsets,
            S, num_experts, nb, capacity, num_blocks,
            BLOCK_M=block_m, BLOCK_S=BS, E_P=e_pad, PREFIX_IN_KERNEL=prefix_in_kernel, num_warps=warps,
        )
    return GroupingMeta(
        sorted_slots, slot_to_sorted, block_expert, expert_offsets, padded_offsets, S, k, num_experts, block_m,
    )


def grouping_metadata(
    expert_ids: torch.Tensor, num_experts: int, block_m: int, *, impl: str = "auto"
) -> GroupingMeta:
    """Build ``GroupingMeta`` for ``expert_ids [T, k]`` (values in ``[0, E)``, not checked here).

    ``impl``: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (any device), or
    ``"auto"`` (triton on CUDA or under the interpreter, torch otherwise). All are free of host syncs.
    """
    if impl == "auto":
        impl = "triton" if (expert_ids.is_cuda or interpreting()) else "torch"
    if impl == "triton":
        return grouping_metadata_triton(expert_ids, num_experts, block_m)
    if impl == "torch":
        return grouping_metadata_torch(expert_ids, num_experts, block_m)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")


__all__ = [
    "GroupingMeta",
    "grouping_capacity",
    "grouping_metadata",
    "grouping_metadata_naive",
    "grouping_metadata_torch",
    "grouping_metadata_triton",
]
