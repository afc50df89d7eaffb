"""``lora_mix_small_inference``: the decode-sized call without lora_mix's bookkeeping, bitwise the op.

Fresh random inputs per case; the reference is ``lora_mix`` itself (whose torch paths are checked
against float64 in test_torch_paths.py), compared with ``torch.equal``: the shortcut must run the very
same products, not merely close ones.
"""
import pytest
import torch

from selfmoe.kernels import lora_mix
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH, SMALL_T
from selfmoe.kernels.torch_inference import lora_mix_small_inference

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(T, k, dtype, seed, bias=True, E=4, r=3, K=10, N=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, K, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(E, r, K, generator=g, dtype=torch.float64).to(dtype)
    B = torch.randn(E, N, r, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(2 * T)]).view(2, T, k)
    w = torch.rand(2, T, k, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, A, B, ids, w, W, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (2, 1), (5, 2), (SMALL_T // 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_lora_mix_bitwise(monkeypatch, dtype, T, k, bias):
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    x, A, B, ids, w, W, b = _case(T, k, dtype, seed=T * 10 + k + bias)
    with torch.no_grad():
        want = lora_mix(x, A, B, ids, w, 0.75, base_weight=W, base_bias=b)
        memo = {}
        got = lora_mix_small_inference(x, A, B, ids, w, 0.75, W, b, memo)
        # a second projection reading the same gates through the memo (another d_out, the same tokens)
        B2, W2 = torch.randn(4, 5, 3, dtype=dtype), torch.randn(5, 10, dtype=dtype)
        got2 = lora_mix_small_inference(x, A, B2, ids, w, 0.75, W2, None, memo)
        want2 = lora_mix(x, A, B2, ids, w, 0.75, base_weight=W2)
    assert got is not None and got.shape == want.shape == (2, T, 7)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    assert torch.equal(got2, want2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(1, 1), (1,), ()])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_one_token_equals_lora_mix_bitwise(monkeypatch, dtype, lead, k, bias):
    """A single token (batch-1 decode; top-1 has its own op-by-op code), whatever its leading dims."""
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    x, A, B, ids, w, W, b = _case(1, k, dtype, seed=len(lead) * 7 + k + 3 * bias, bias=bias)
    x, ids, w = x[0].reshape(*lead, 10), ids[0].reshape(*lead, k), w[0].reshape(*lead, k)
    w32 = w.float()  # a router's gates are float32 whatever the layer's dtype
    with torch.no_grad():
        want = lora_mix(x, A, B, ids, w32, 0.75, base_weight=W, base_bias=b)
        got = lora_mix_small_inference(x, A, B, ids, w32, 0.75, W, b, {})
    assert got is not None and got.shape == want.shape == (*lead, 7)
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_declines_what_it_does_not_serve(monkeypatch):
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    x, A, B, ids, w, W, b = _case(3, 1, torch.float32, seed=1)
    with torch.no_grad():
        assert lora_mix_small_inference(x, A, B, ids, w, 0.5, W, b) is not None
        big = torch.randn(1, SMALL_T + 1, 10)
        big_ids = torch.zeros(1, SMALL_T + 1, 1, dtype=torch.long)
        assert lora_mix_small_inference(big, A, B, big_ids, big_ids.float(), 0.5, W, b) is None
        assert lora_mix_small_inference(x.double(), A, B, ids, w, 0.5, W, b) is None  # mixed dtypes
        assert lora_mix_small_inference(x.transpose(0, 1), A, B, ids.transpose(0, 1), w, 0.5, W, b) is None
        assert lora_mix_small_inference(x[..., :9].contiguous(), A, B, ids, w, 0.5, W, b) is None  # wrong d_in
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lora_mix_small_inference(x, A, B, ids, w, 0.5, W, b) is None
        monkeypatch.setenv(ENV_TORCH_PATH, "dense")  # a forced path is honoured by going through lora_mix
        assert lora_mix_small_inference(x, A, B, ids, w, 0.5, W, b) is None
    monkeypatch.delenv(ENV_TORCH_PATH)
    assert lora_mix_small_inference(x, A, B, ids, w, 0.5, W, b) is None  # autograd is on
