"""MiXSE decoding with a KV cache: the decode-sized torch paths give the numbers of the general path.

The library picks ``gathered`` at batch 1 and ``dense-small`` for small batches (torch_dispatch.py);
``SELFMOE_TORCH_PATH=dense`` forces the general formulation. Fresh random experts (B nonzero), a router
spread so that every expert is used, float64 and float32.
"""
import pytest
import torch

from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH
from helpers import TOL, greedy_decode_logits, rel_err, spread_tiny_mixse

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_paths_equal_the_general_path(monkeypatch, dtype, batch):
    seed = 11 * batch + (dtype == torch.float64)
    model = spread_tiny_mixse(dtype, seed, top_k=2)
    prompt = torch.randint(1, 97, (batch, 5), generator=torch.Generator().manual_seed(seed))
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    with model.routing_stats() as stats:
        fast = greedy_decode_logits(model, prompt, 6)
    assert (stats.usage_matrix().sum(0) > 0).all(), "every expert must be routed to, or this proves little"
    monkeypatch.setenv(ENV_TORCH_PATH, "dense")
    general = greedy_decode_logits(model, prompt, 6)
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    assert rel_err(fast, general) <= TOL[dtype]
    with monkeypatch.context() as m:  # and the experts matter: without them the logits differ
        m.setenv(ENV_TORCH_PATH, "dense")
        with model.disable_experts():
            bare = greedy_decode_logits(model, prompt, 6)
    assert rel_err(bare, general) > 100 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_layer_inference_shortcut_is_bitwise_the_op(monkeypatch, top_k, batch, dtype):
    """MoLoRALinear's decode shortcut (torch_inference.py, no per-call checks, gates shared per layer)
    gives exactly lora_mix's numbers, and it is really taken at decode. float64: the router's gates stay
    float32 while the layer computes in float64 (the promotion must match the op's)."""
    import selfmoe.layer as layer_module

    seed = 5 * batch + top_k + (dtype == torch.float64)
    model = spread_tiny_mixse(dtype, seed, top_k=top_k)
    prompt = torch.randint(1, 97, (batch, 5), generator=torch.Generator().manual_seed(seed))
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    real = layer_module.lora_mix_small_inference
    served = []

    def counting(*args, **kwargs):
        y = real(*args, **kwargs)
        served.append(y is not None)
        return y

    monkeypatch.setattr(layer_module, "lora_mix_small_inference", counting)
    with model.routing_stats() as stats:
        short = greedy_decode_logits(model, prompt, 5)
    assert (stats.usage_matrix().sum(0) > 0).sum() >= 3, "the tokens must spread over the experts"
    assert sum(served) >= 5 * len(model.lora_modules)  # every decode step of every projection
    monkeypatch.setattr(layer_module, "lora_mix_small_inference", lambda *a, **k: None)
    through_op = greedy_decode_logits(model, prompt, 5)
    assert torch.isfinite(short).all()
    assert torch.equal(short, through_op)
