"""Grouping metadata for the grouped kernels: every implementation against the naive reference, the
invariants the kernels rely on checked directly, and no host synchronisation."""
import pytest
import torch

import selfmoe.kernels.grouping as grouping
import selfmoe.kernels.utils as utils
from selfmoe.kernels.grouping import (
    GroupingMeta,
    grouping_capacity,
    grouping_metadata,
    grouping_metadata_naive,
    grouping_metadata_torch,
    grouping_metadata_triton,
)

from helpers import no_host_sync


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every buffer starts as -2: an element no kernel wrote cannot match the reference
    monkeypatch.setattr(utils, "POISON", True)


def _triton_small_blocks(ids, E, BM):
    # 16-slot blocks: many blocks per call, so cross-block prefixes and ranks are exercised
    return grouping_metadata_triton(ids, E, BM, block_s=16)


def _triton_torch_prefix(ids, E, BM):
    # more blocks than the in-kernel prefix loop takes: the prefix comes from one torch cumsum
    old = grouping._PREFIX_LOOP_MAX_BLOCKS
    grouping._PREFIX_LOOP_MAX_BLOCKS = 2
    try:
        return grouping_metadata_triton(ids, E, BM, block_s=16)
    finally:
        grouping._PREFIX_LOOP_MAX_BLOCKS = old


IMPLS = {
    "torch": grouping_metadata_torch,
    "triton": grouping_metadata_triton,
    "triton-small-blocks": _triton_small_blocks,
    "triton-torch-prefix": _triton_torch_prefix,
}


def _ids(name, g):
    """(expert_ids, E): each case breaks something specific."""
    if name == "E64-sparse-k2":  # the target regime: most experts get no slot
        return torch.randint(0, 64, (40, 2), generator=g), 64
    if name == "empty-expert":  # expert 2 of 5 has no slot: zero-length run, offsets must repeat
        return torch.tensor([0, 1, 3, 4])[torch.randint(0, 4, (33, 2), generator=g)], 5
    if name == "all-on-one":  # one expert owns every slot: several full tiles of one expert
        return torch.full((70, 1), 3, dtype=torch.long), 6
    if name == "T=1":  # decode: two slots, capacity of two tiles
        return torch.tensor([[5, 2]]), 8
    if name == "E=1":
        return torch.zeros(17, 1, dtype=torch.long), 1
    if name == "k=E":  # dense gating: every token on every expert
        return torch.stack([torch.randperm(4, generator=g) for _ in range(9)]), 4
    if name == "duplicates":  # the same expert twice in one token: two slots, both kept, in order
        return torch.tensor([[2, 2], [0, 2], [2, 0], [1, 1]] * 5), 3
    if name == "tile-edges":  # runs of exactly BM, BM + 1 and BM - 1 slots (BM = 16)
        e = [0] * 16 + [1] * 17 + [2] * 15
        return torch.tensor(e)[torch.randperm(len(e), generator=g)].reshape(-1, 1), 3
    if name == "last-expert-only":  # ids at E - 1 only: the owner search must stop at E
        return torch.full((9, 2), 6, dtype=torch.long), 7
    raise KeyError(name)


CASES = ["E64-sparse-k2", "empty-expert", "all-on-one", "T=1", "E=1", "k=E", "duplicates", "tile-edges",
         "last-expert-only"]


def _assert_equal_meta(got: GroupingMeta, want: GroupingMeta):
    for name, a, b in zip(GroupingMeta._fields, got, want):
        if isinstance(b, torch.Tensor):
            assert a.dtype == torch.int32, f"{name}: dtype {a.dtype}"
            assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
            assert torch.equal(a, b), f"{name} differs from the reference:\n{a}\n{b}"
        else:
            assert a == b, f"{name}: {a} vs {b}"


def _check_invariants(meta: GroupingMeta, ids: torch.Tensor):
    """What the kernels rely on, checked from first principles (not against the reference)."""
    flat = ids.reshape(-1).long()
    S, E, BM, k = flat.numel(), meta.num_experts, meta.block_m, meta.top_k
    slots = meta.sorted_slots.long()
    assert meta.capacity == grouping_capacity(S, E, BM) and meta.capacity % BM == 0
    assert meta.num_blocks == meta.capacity // BM
    assert k == ids.shape[1] and meta.num_slots == S

    # counts and offsets
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(meta.counts.long(), counts)
    assert torch.equal(meta.expert_offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    padded = meta.padded_offsets.long()
    assert padded[0] == 0 and bool((padded % BM == 0).all())
    assert torch.equal(padded[1:] - padded[:-1], (counts + BM - 1) // BM * BM)
    used = int(padded[-1])
    assert used <= meta.capacity

    # every slot exactly once; -1 everywhere else; nothing real past the used rows
    real = slots >= 0
    assert bool(((slots >= 0) | (slots == -1)).all()), "unwritten (poisoned) or bad entries"
    assert torch.equal(slots[real].sort().values, torch.arange(S))
    assert not bool(real[used:].any())

    # sorted by expert, stable inside an expert (slot order), each run starting at its padded offset
    for e in range(E):
        run = slots[padded[e]:padded[e + 1]]
        run_real = run[run >= 0]
        assert torch.equal(run_real, torch.nonzero(flat == e).flatten()), f"expert {e} run not stable/sorted"
        assert bool((run[: counts[e]] >= 0).all()) and bool((run[counts[e]:] == -1).all())

    # tiles never mix experts; unused tiles are -1 and hold only padding
    blk = meta.block_expert.long()
    tiles = slots.view(-1, BM)
    for b in range(meta.num_blocks):
        members = tiles[b][tiles[b] >= 0]
        if blk[b] < 0:
            assert b * BM >= used and members.numel() == 0
        else:
            assert members.numel() > 0, "a used tile without any real slot"
            assert bool((flat[members] == blk[b]).all()), f"tile {b} mixes experts"

    # inverse permutation
    inv = meta.slot_to_sorted.long()
    assert torch.equal(slots[inv], torch.arange(S))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_m", [16, 64])
def test_matches_naive_and_invariants(impl, case, block_m):
    ids, E = _ids(case, torch.Generator().manual_seed(CASES.index(case)))
    want = grouping_metadata_naive(ids, E, block_m)
    _check_invariants(want, ids)  # the reference itself obeys the invariants
    got = IMPLS[impl](ids, E, block_m)
    _assert_equal_meta(got, want)
    _check_invariants(got, ids)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_int32_and_noncontiguous_ids(impl):
    g = torch.Generator().manual_seed(1)
    ids64 = torch.randint(0, 12, (2, 31), generator=g)
    ids = ids64.t()  # [31, 2] non-contiguous view
    want = grouping_metadata_naive(ids.contiguous(), 12, 16)
    _assert_equal_meta(IMPLS[impl](ids, 12, 16), want)
    _assert_equal_meta(IMPLS[impl](ids.to(torch.int32), 12, 16), want)


def test_capacity_is_a_true_upper_bound():
    # worst case for padding: every used expert has one slot more than a multiple of BM
    E, BM = 8, 16
    ids = torch.arange(E).repeat_interleave(BM + 1).reshape(-1, 1)
    meta = grouping_metadata_naive(ids, E, BM)
    assert int(meta.padded_offsets[-1]) == E * 2 * BM <= meta.capacity
    # and when S < E, at most S experts are used, so the bound shrinks with S (decode stays small)
    assert grouping_capacity(2, 64, 16) == 32


def test_mock_catches_a_sync():
    # the guard itself must be able to fail
    with pytest.raises(AssertionError, match="host synchronisation"):
        with no_host_sync("the grouping hot path"):
            grouping_metadata_naive(torch.zeros(2, 1, dtype=torch.long), 2, 16)


@pytest.mark.parametrize("impl", ["torch", "triton", "triton-torch-prefix"])
def test_no_host_sync(impl):
    ids, E = _ids("E64-sparse-k2", torch.Generator().manual_seed(3))
    want = grouping_metadata_naive(ids, E, 16)
    with no_host_sync("the grouping hot path"):
        got = IMPLS[impl](ids, E, 16)
    _assert_equal_meta(got, want)


def test_dispatch_and_bad_args():
    ids = torch.tensor([[1, 0], [1, 1]])
    want = grouping_metadata_naive(ids, 2, 16)
    for impl in ("auto", "torch", "triton"):
        _assert_equal_meta(grouping_metadata(ids, 2, 16, impl=impl), want)
    with pytest.raises(ValueError, match="impl"):
        grouping_metadata(ids, 2, 16, impl="cuda")
    with pytest.raises(ValueError, match="power of two"):
        grouping_metadata(ids, 2, 24)
    with pytest.raises(TypeError, match="int32 or int64"):
        grouping_metadata(ids.float(), 2, 16)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        grouping_metadata(ids.flatten(), 2, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E", [(1, 2, 64), (4096, 2, 64), (20000, 2, 64), (3000, 8, 256)])
def test_cuda_matches_naive_without_sync(T, k, E):
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, E, (T, k), generator=g)
    want = grouping_metadata_naive(ids, E, 64)
    ids_cuda = ids.cuda()
    for fn in (grouping_metadata_triton, grouping_metadata_torch):
        fn(ids_cuda, E, 64)  # compile outside the sync guard
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = fn(ids_cuda, E, 64)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _assert_equal_meta(GroupingMeta(*[t.cpu() for t in got[:5]], *got[5:]), want)


def test_invariant_check_can_fail():
    # the first-principles check must reject broken metadata, or the tests above prove nothing
    ids = torch.tensor([[0], [1], [0], [1], [0]])
    good = grouping_metadata_naive(ids, 2, 16)
    _check_invariants(good, ids)

    unstable = good.sorted_slots.clone()
    unstable[[0, 1]] = unstable[[1, 0]]  # two slots of expert 0 out of slot order
    mixed = good.sorted_slots.clone()
    mixed[3] = 1  # a slot of expert 1 inside expert 0's tile (and slot 1 twice)
    unwritten = good.sorted_slots.clone()
    unwritten[-1] = utils.INT_POISON
    for bad in (unstable, mixed, unwritten):
        with pytest.raises(AssertionError):
            _check_invariants(good._replace(sorted_slots=bad), ids)
    with pytest.raises(AssertionError):
        _check_invariants(good._replace(block_expert=torch.full_like(good.block_expert, 0)), ids)
