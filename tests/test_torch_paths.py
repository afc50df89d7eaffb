"""The torch backend's formulations (torch_dispatch.py): each against the float64 reference and each other.

``SELFMOE_TORCH_PATH`` forces a formulation; every test draws fresh random inputs (never zeros).
"""
import zlib

import pytest
import torch

from selfmoe.kernels import lora_mix
from selfmoe.kernels.contract import GradNeeds, NO_GRADS
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH, choose_torch_path
from helpers import TOL, make_case, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

# (T, d_in, d_out, E, r, k, options): decode shapes the inference paths take on their own, and others
# they only take when forced (each is correct for any T).
GATHERED_CASES = {
    "T=1 top-1": (1, 40, 24, 4, 8, 1, {}),
    "T=1 top-2": (1, 33, 20, 8, 4, 2, {}),
    "T=3 top-1 E=8": (3, 24, 17, 8, 5, 1, {"per_expert_scaling": True}),
    "T=3 top-1 uniform": (3, 24, 17, 8, 5, 1, {}),
    "T=1 top-1 per-expert": (1, 24, 17, 4, 5, 1, {"per_expert_scaling": True}),
    "k=E duplicates": (5, 16, 12, 3, 2, 3, {}),
    "no base": (2, 20, 12, 4, 3, 2, {"base": False}),
    "base no bias": (1, 20, 12, 4, 3, 1, {"bias": False}),
    "lead dims": (6, 16, 8, 4, 2, 2, {"lead": (2, 3)}),
    "int32 ids": (4, 16, 8, 9, 2, 2, {"id_dtype": torch.int32}),
}


def _force(monkeypatch, path):
    monkeypatch.setenv(ENV_TORCH_PATH, path)


@pytest.mark.parametrize("path", ["gathered", "dense-small"])
@pytest.mark.parametrize("name", list(GATHERED_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_inference_paths_match_reference_and_dense(monkeypatch, path, name, dtype):
    """The inference-only formulations against the float64 reference and the general (autograd) path."""
    from selfmoe.kernels import lora_mix_naive

    T, K, N, E, r, k, opts = GATHERED_CASES[name]
    case = make_case(T, K, N, E, r, k, seed=zlib.crc32(name.encode()), **opts)
    if "T=1" in name:  # a duplicate id in a single token too
        case.expert_ids[..., -1] = case.expert_ids[..., 0]
    low = case.to(dtype)
    want = low.to(torch.float64).call(lora_mix_naive)
    with torch.no_grad():
        _force(monkeypatch, path)
        got = low.call(lora_mix, backend="torch")
        _force(monkeypatch, "dense")
        dense = low.call(lora_mix, backend="torch")
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(got, dense.double()) <= TOL[dtype]  # the general path gives the same numbers
    if path == "dense-small":
        assert torch.equal(got, dense)  # the same products in the same order: bitwise


def test_inference_paths_are_taken_for_decode_and_nowhere_else(monkeypatch):
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    train = GradNeeds(True, False, False, True, False, False)
    assert choose_torch_path(1, 4, 1, NO_GRADS, r=8) == "gathered"
    assert choose_torch_path(3, 8, 2, NO_GRADS, r=8) == "gathered"  # 6 slots < 8 experts
    assert choose_torch_path(16, 4, 1, NO_GRADS, r=8) == "dense-small"
    assert choose_torch_path(65, 4, 1, NO_GRADS, r=8) == "dense"
    assert choose_torch_path(1, 4, 1, train, r=8) == "dense"  # no backward of their own: never with autograd
    assert choose_torch_path(16, 4, 1, train, r=8) == "dense"
    for path in ("gathered", "dense-small"):
        _force(monkeypatch, path)
        assert choose_torch_path(4096, 4, 1, NO_GRADS, r=8) == path
        assert choose_torch_path(64, 4, 1, train, r=8) == "dense"
    _force(monkeypatch, "bogus")
    with pytest.raises(ValueError, match=ENV_TORCH_PATH):
        choose_torch_path(1, 4, 1, NO_GRADS, r=8)


def test_decode_with_autograd_still_gets_every_gradient(monkeypatch):
    """At T=1 with gradients asked for, the dense path runs (the gathered one has no backward)."""
    from helpers import check_against_reference

    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    check_against_reference(make_case(1, 24, 16, 4, 4, 2, seed=5), lora_mix, torch.float32, backend="torch")
