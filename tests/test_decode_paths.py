"""MiXSE decoding with a KV cache: the decode-sized torch paths give the numbers of the general path.

The library picks ``gathered`` at batch 1 and ``dense-small`` for small batches (torch_dispatch.py);
``SELFMOE_TORCH_PATH=dense`` forces the general formulation. Fresh random experts (B nonzero), a router
spread so that every expert is used, float64 and float32.
"""
import pytest
import torch

from selfmoe import MiXSE
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH
from selfmoe.tiny_model import build_model
from helpers import TOL, rel_err

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")]


def _mixse(dtype: torch.dtype, seed: int) -> MiXSE:
    base = build_model(97, seed=seed).to(dtype).eval()
    model = MiXSE.from_scratch(base, num_experts=4, r=3, lora_alpha=5, top_k=2, router="shared")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.lora_modules.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.1)
        model.router.linear.weight.copy_(torch.randn(model.router.linear.weight.shape, generator=g) * 2.0)
    return model.eval()


def _decode_logits(model: MiXSE, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode with the cache: the logits of every step, ``[B, steps, V]``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_paths_equal_the_general_path(monkeypatch, dtype, batch):
    seed = 11 * batch + (dtype == torch.float64)
    model = _mixse(dtype, seed)
    prompt = torch.randint(1, 97, (batch, 5), generator=torch.Generator().manual_seed(seed))
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    with model.routing_stats() as stats:
        fast = _decode_logits(model, prompt, 6)
    assert (stats.usage_matrix().sum(0) > 0).all(), "every expert must be routed to, or this proves little"
    monkeypatch.setenv(ENV_TORCH_PATH, "dense")
    general = _decode_logits(model, prompt, 6)
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    assert rel_err(fast, general) <= TOL[dtype]
    with monkeypatch.context() as m:  # and the experts matter: without them the logits differ
        m.setenv(ENV_TORCH_PATH, "dense")
        with model.disable_experts():
            bare = _decode_logits(model, prompt, 6)
    assert rel_err(bare, general) > 100 * TOL[dtype]
