"""``decode_cache``: a generation keeps each routed layer's plan (its views and stacked B); the numbers
do not move.

Inside the block each layer's ``DecodePlan`` serves its decode calls, and a batched decode (the
dense-small path, 2..SMALL_T tokens) reuses one stack per layer instead of stacking ``lora_B`` on every
call. It must give the very bits of the decode outside the block, build each stack once per block, see
in-place updates that torch records and replaced or moved tensors, and leave nothing behind.
"""
import pytest
import torch

import selfmoe.decoding_cache as decode_cache_module
from selfmoe import MiXSE
from selfmoe.decoding_cache import cached_stacked_B, decode_cache, decode_plan
from selfmoe.kernels.torch_inference import DecodePlan
from selfmoe.kernels import lora_mix
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH
from selfmoe.kernels.torch_path import stack_B
from helpers import greedy_decode_logits, spread_tiny_mixse

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")]


def _routed_call(layer, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with gates from its shared router's slot, the way a decode step calls it (the only
    calls the decode shortcut serves: ids passed in by a caller go through lora_mix's checks)."""
    layer.gate_slot.set(w, ids)
    try:
        return layer(x)
    finally:
        layer.gate_slot.clear()


@pytest.fixture
def counted_stacks(monkeypatch):
    """How many times a decode plan stacked a layer's B (kept in a decode_cache block, or made for the
    call outside one)."""
    built = []

    def counting(lora_B):
        built.append(lora_B.shape)
        return stack_B(lora_B)

    import selfmoe.kernels.torch_inference as torch_inference

    monkeypatch.setattr(torch_inference, "stack_B", counting)
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [1, 2])
def test_cached_decode_is_bitwise_the_uncached_one(monkeypatch, counted_stacks, dtype, top_k):
    seed = 3 * top_k + (dtype == torch.float64)
    model = spread_tiny_mixse(dtype, seed, top_k=top_k)
    prompt = torch.randint(1, 97, (5, 5), generator=torch.Generator().manual_seed(seed))  # 5 tokens x k >= E: dense-small
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    plain = greedy_decode_logits(model, prompt, 5)
    assert len(counted_stacks) == 6 * len(model.lora_modules)  # prefill and 5 steps, each layer stacking anew
    counted_stacks.clear()
    with model.routing_stats() as stats, decode_cache(model) as held:
        assert held is model
        cached = greedy_decode_logits(model, prompt, 5)
    assert (stats.usage_matrix().sum(0) > 0).sum() >= 3, "the tokens must spread over the experts"
    # one stack per layer for the whole block (five steps, each layer called every step)
    assert len(counted_stacks) == len(model.lora_modules)
    assert torch.isfinite(cached).all()
    assert torch.equal(cached, plain)
    monkeypatch.setenv(ENV_TORCH_PATH, "dense")  # and both are the general path's numbers
    general = greedy_decode_logits(model, prompt, 5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (cached - general).abs().max() <= tol * general.abs().max()


def test_in_place_update_inside_the_block_is_seen(counted_stacks):
    """An update torch records (copy_ / mul_ under no_grad, an optimizer step) moves the version: the next
    call stacks again, and the outputs are those of the updated weights."""
    model = spread_tiny_mixse(torch.float64, 7, top_k=1)
    layer = next(iter(model.lora_modules.values()))
    x = torch.randn(4, layer.base_layer.in_features, dtype=torch.float64)
    ids = torch.tensor([[0], [1], [2], [3]])
    w = torch.rand(4, 1)
    with torch.no_grad(), decode_cache(model):
        before = _routed_call(layer, x, ids, w)
        assert len(counted_stacks) == 1  # the shortcut served the call from the block's stack
        stack_before = cached_stacked_B(layer).clone()
        layer.lora_B.mul_(3.0)
        after = _routed_call(layer, x, ids, w)
        assert len(counted_stacks) == 2
        assert torch.equal(cached_stacked_B(layer), 3 * stack_before)
    with torch.no_grad():
        expected = _routed_call(layer, x, ids, w)  # outside the block: stacked afresh
        base = layer.base_layer(x)
    assert torch.equal(after, expected)
    torch.testing.assert_close(after - base, 3 * (before - base), rtol=1e-12, atol=1e-12)


def test_a_replaced_parameter_inside_the_block_is_seen(counted_stacks):
    """A new lora_B Parameter (same shape, possibly at the old one's address once that is freed) is
    stacked anew: the entry holds the tensor it stacked, so its memory cannot be reused meanwhile."""
    model = spread_tiny_mixse(torch.float64, 21, top_k=1)
    layer = next(iter(model.lora_modules.values()))
    x = torch.randn(4, layer.base_layer.in_features, dtype=torch.float64)
    ids, w = torch.tensor([[0], [1], [2], [3]]), torch.rand(4, 1)
    with torch.no_grad(), decode_cache(model):
        _routed_call(layer, x, ids, w)
        new_B = torch.randn(layer.lora_B.shape, dtype=torch.float64)
        layer.lora_B = torch.nn.Parameter(new_B.clone())
        after = _routed_call(layer, x, ids, w)
        assert len(counted_stacks) == 2
    with torch.no_grad():
        assert torch.equal(after, _routed_call(layer, x, ids, w))


def test_blocks_nest_and_leave_nothing_behind():
    model = spread_tiny_mixse(torch.float32, 9, top_k=1)
    layer = next(iter(model.lora_modules.values()))
    assert cached_stacked_B(layer) is None
    with decode_cache(model):
        with decode_cache(model):
            first = cached_stacked_B(layer)
        # the inner block's end keeps the outer one's stack (the same memory: `first` holds it, so a new
        # stack could not land there)
        assert cached_stacked_B(layer).data_ptr() == first.data_ptr()
        assert torch.equal(first, stack_B(layer.lora_B.detach()))
    assert cached_stacked_B(layer) is None
    assert len(decode_cache_module._ACTIVE) == 0
    # a write through .data after the block is seen (nothing cached any more)
    x = torch.randn(3, layer.base_layer.in_features)
    ids, w = torch.tensor([[0], [1], [3]]), torch.ones(3, 1)
    with torch.no_grad():
        layer.lora_B.data.mul_(2.0)
        y = _routed_call(layer, x, ids, w)
        layer.lora_B.data.div_(2.0)
        y_half = _routed_call(layer, x, ids, w)
    base = layer.base_layer(x).detach()
    torch.testing.assert_close(y - base, 2 * (y_half - base))


def test_block_ends_even_on_error_and_rejects_non_modules():
    model = spread_tiny_mixse(torch.float32, 13, top_k=1)
    layer = next(iter(model.lora_modules.values()))
    with pytest.raises(RuntimeError, match="boom"):
        with decode_cache(model):
            assert cached_stacked_B(layer) is not None
            raise RuntimeError("boom")
    assert cached_stacked_B(layer) is None
    with pytest.raises(TypeError, match="decode_cache: model must be a torch.nn.Module"):
        with decode_cache("not a model"):
            pass


def test_selfmoe_generation_runs_in_a_block(tmp_path, monkeypatch, counted_stacks):
    """selfmoe's generator decodes a MiXSE inside decode_cache: the same texts as without the block, one
    stack per layer per generate call, and nothing held afterwards."""
    from selfmoe.generate import HFGenerator, SamplingConfig
    from selfmoe.tiny_model import load_tiny_lm, save_tiny_lm

    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    base, tok = load_tiny_lm(save_tiny_lm(tmp_path / "lm"))
    model = MiXSE.from_scratch(base, num_experts=4, r=3, lora_alpha=5, top_k=1, router="shared")
    with torch.no_grad():
        for layer in model.lora_modules.values():
            layer.lora_B.normal_(0.0, 0.1)
    prompts = ["Hi", "Tom has 3 apples and buys 5 more.", "What is 12 + 30?"]
    cfg = SamplingConfig(max_new_tokens=6, do_sample=False)
    cached = HFGenerator(model, tok, batch_size=3, progress=False).generate(prompts, cfg)
    assert len(counted_stacks) == len(model.lora_modules)
    assert len(decode_cache_module._ACTIVE) == 0
    counted_stacks.clear()

    class NoBlock:  # the same generation with decode_cache a no-op
        def __init__(self, model):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(decode_cache_module, "decode_cache", NoBlock)
    plain = HFGenerator(model, tok, batch_size=3, progress=False).generate(prompts, cfg)
    # no block: each batched call stacks for itself (here only the prefill: 3 one-token rows x top-1 < 4
    # experts go the gathered path), and nothing is held afterwards
    assert len(counted_stacks) == len(model.lora_modules)
    assert len(decode_cache_module._ACTIVE) == 0
    assert [c.text for c in cached] == [c.text for c in plain]
    assert any(c.text for c in cached)


def test_package_exports_the_function_even_after_its_module_loaded():
    """``from selfmoe import decode_cache`` is the context manager, also once the layer (which imports
    its module) is loaded: the module's name must not be the function's, or the submodule would shadow
    the lazy export."""
    import importlib

    import selfmoe
    import selfmoe.layer  # noqa: F401  (loads selfmoe.decoding_cache)

    from selfmoe import decode_cache as exported

    assert exported is decode_cache and callable(exported)
    assert importlib.import_module("selfmoe").decode_cache is decode_cache
    assert "decode_cache" in selfmoe.__all__


@pytest.mark.parametrize("dtype, batch", [(torch.float32, 1), (torch.float64, 1), (torch.float32, 5),
                                          (torch.bfloat16, 5)])
def test_plans_serve_the_decode_with_the_same_bits(monkeypatch, dtype, batch):
    """Inside the block every projection call of a decode step is served by its layer's plan (one-token
    top-1 at batch 1, dense-small at batch 5 (5 slots >= 4 experts), bfloat16 too), never by the per-call function, and the
    logits are bitwise those outside the block."""
    import selfmoe.layer as layer_module

    model = spread_tiny_mixse(dtype, 31 + batch, top_k=1)
    prompt = torch.randint(1, 97, (batch, 4), generator=torch.Generator().manual_seed(batch))
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    plain = greedy_decode_logits(model, prompt, 4)
    per_call, served = [], []
    real_call = DecodePlan.__call__

    def counting_call(self, *args, **kwargs):
        y = real_call(self, *args, **kwargs)
        served.append(y is not None)
        return y

    monkeypatch.setattr(layer_module, "lora_mix_small_inference", lambda *a, **k: per_call.append(1) or None)
    monkeypatch.setattr(DecodePlan, "__call__", counting_call)
    with model.routing_stats() as stats, decode_cache(model):
        held = greedy_decode_logits(model, prompt, 4)
    if batch > 1:
        assert (stats.usage_matrix().sum(0) > 0).sum() >= 3, "the tokens must spread over the experts"
    assert not per_call  # the plans served every decode-sized call (the prefill's 4*batch tokens too)
    assert len(served) == 5 * len(model.lora_modules) and all(served)
    assert torch.isfinite(held.float()).all()
    assert torch.equal(held, plain)


def test_a_moved_or_updated_tensor_inside_the_block_is_seen():
    """The plan's views follow in-place updates of lora_A and the base weight; a tensor that moves (a
    new ``.data``, e.g. a merge that writes a new base weight) or a new scaling makes a new plan."""
    model = spread_tiny_mixse(torch.float64, 41, top_k=1)
    layer = next(iter(model.lora_modules.values()))
    x = torch.randn(4, layer.base_layer.in_features, dtype=torch.float64)
    ids, w = torch.tensor([[0], [1], [2], [3]]), torch.rand(4, 1, dtype=torch.float64)

    def fresh():  # the same call with no block open: nothing kept
        with decode_cache(torch.nn.Module()):
            return layer._decode_shortcut(x, ids, w, {})

    with torch.no_grad():
        with decode_cache(model):
            before = _routed_call(layer, x, ids, w)
            plan = decode_plan(layer)
            layer.lora_A.mul_(2.0)  # in place: the same plan, its views see it
            layer.base_layer.weight.add_(0.5)
            got = _routed_call(layer, x, ids, w)
            assert decode_plan(layer) is plan
            assert torch.equal(got, fresh()) and not torch.equal(got, before)
            layer.lora_A.data = torch.randn(layer.lora_A.shape, dtype=torch.float64)  # moved: a new plan
            layer.base_layer.weight.data = layer.base_layer.weight.data.clone() * 0.5
            got = _routed_call(layer, x, ids, w)
            assert decode_plan(layer) is not plan
            assert torch.equal(got, fresh())
            plan = decode_plan(layer)
            layer._uniform_scaling = 2 * layer._uniform_scaling
            got = _routed_call(layer, x, ids, w)
            assert decode_plan(layer) is not plan
            assert torch.equal(got, fresh())
        assert decode_plan(layer) is None


def test_plans_decline_what_they_cannot_serve():
    """Mixed dtypes, a non-contiguous lora_A or tensors off the CPU: no plan serves them (the layer goes
    on to lora_mix); the same for calls with autograd on, another x dtype or a non-contiguous x. What
    a plan serves is bitwise the op's."""
    E, r, K, N = 4, 3, 8, 5
    A, B, W = torch.randn(E, r, K), torch.randn(E, N, r), torch.randn(N, K)
    x, ids, w = torch.randn(5, K), torch.tensor([[0], [1], [2], [3], [0]]), torch.rand(5, 1)
    assert DecodePlan(A, B, W, None, 0.5).served
    assert not DecodePlan(A, B.double(), W, None, 0.5).served
    assert not DecodePlan(A, B, W, torch.randn(N, dtype=torch.float64), 0.5).served
    assert not DecodePlan(A.transpose(1, 2).contiguous().transpose(1, 2), B, W, None, 0.5).served
    plan = DecodePlan(A, B, W, None, 0.5)
    assert plan(x, ids, w) is None  # autograd is on
    with torch.no_grad():
        meta = DecodePlan(A.to("meta"), B.to("meta"), W.to("meta"), None, 0.5)
        assert not meta.served and meta(x, ids, w) is None
        y = plan(x, ids, w)
        assert y is not None and y.shape == (5, N)
        assert plan(x.double(), ids, w) is None  # x in another dtype
        assert plan(torch.randn(K, 5).t(), ids, w) is None  # not contiguous
        # 2 slots < 4 experts: the gathered path, served too (the same bits as the op)
        want = lora_mix(x[:2], A, B, ids[:2], w[:2], 0.5, base_weight=W)
        assert torch.equal(plan(x[:2], ids[:2], w[:2]), want)
        assert torch.equal(y, lora_mix(x, A, B, ids, w, 0.5, base_weight=W))


@pytest.mark.parametrize("router", ["per_layer", "xlora"])
def test_other_router_kinds_decode_the_same_inside_the_block(monkeypatch, router):
    """Per-layer routers (each layer routes its own input) and X-LoRA's scaling pass reach the plans
    through the layer's other entry; the logits stay bitwise those outside the block."""
    from selfmoe.tiny_model import build_model

    base = build_model(97, seed=51).eval()
    model = MiXSE.from_scratch(base, num_experts=4, r=3, lora_alpha=5, top_k=2, router=router).eval()
    g = torch.Generator().manual_seed(52)
    with torch.no_grad():
        for layer in model.lora_modules.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    prompt = torch.randint(1, 97, (3, 4), generator=torch.Generator().manual_seed(53))
    monkeypatch.delenv(ENV_TORCH_PATH, raising=False)
    plain = greedy_decode_logits(model, prompt, 4)
    with decode_cache(model):
        held = greedy_decode_logits(model, prompt, 4)
        planned = [decode_plan(layer) for layer in model.lora_modules.values()]
    assert all(p is not None and p.served and p._operands is not None for p in planned)  # the plans served calls
    assert torch.isfinite(held).all()
    assert torch.equal(held, plain)
