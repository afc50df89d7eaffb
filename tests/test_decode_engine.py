"""Continuous batching (selfmoe.decode_engine) and the generation tasks that feed it (selfmoe.generate)."""
from __future__ import annotations

import pytest
import torch

from selfmoe.decode_engine import ContinuousBatcher, DecodeRequest, _merge, _restack
from selfmoe.generate import Completion, GenerateCall, HFGenerator, SamplingConfig, run_tasks

from _tiny_lm import sharp_tiny_lm

HEAD = ("You are a careful assistant. Here are solved examples. Tom has 3 apples and buys 5 more, so he has 8. "
        "A train goes 60 miles per hour for 3 hours, so it travels 180 miles. ")
SHORT = ["Two plus two?", "Why?", "Name a color.", "Count to three, slowly and clearly please."]
LONG = [HEAD + s for s in ("Anna saves 4 dollars a week for 9 weeks. How much?", "Sum 2, 4 and 6.",
                           "A box holds 12 eggs. How many eggs are in 7 boxes, and how many in 9?")]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return sharp_tiny_lm(tmp_path_factory.mktemp("lm"))


def alone(model, tok, prompt, config):
    """One prompt through plain ``model.generate`` (no padding, no cache handling of ours): the reference."""
    return HFGenerator(model, tok, batch_size=1, progress=False).generate([prompt], config)[0]


def test_rows_of_many_requests_share_the_batch_and_equal_each_prompt_alone(lm):
    """More prompts than places, two requests with their own lengths and stop strings, prompts of very
    different widths joining a running batch, and a request submitted from another's on_done."""
    model, tok = lm
    greedy = SamplingConfig(max_new_tokens=9, do_sample=False)
    stopping = SamplingConfig(max_new_tokens=14, do_sample=False, stop=("e", "a"))
    later = SamplingConfig(max_new_tokens=5, do_sample=False)
    gen = HFGenerator(model, tok, batch_size=3, progress=False, prefix_cache=True)
    assert gen.continuous
    order = []

    def task_a():
        first = yield GenerateCall(SHORT + LONG, greedy)
        order.append("a1")
        second = yield GenerateCall(LONG[:1] + SHORT[:1], later)  # joins while task b's rows still run
        order.append("a2")
        return first, second

    def task_b():
        got = yield GenerateCall(LONG + SHORT, stopping)
        order.append("b")
        return got

    (first, second), stopped = gen.run_tasks([task_a(), task_b()])
    assert first == [alone(model, tok, p, greedy) for p in SHORT + LONG]
    assert second == [alone(model, tok, p, later) for p in LONG[:1] + SHORT[:1]]
    assert stopped == [alone(model, tok, p, stopping) for p in LONG + SHORT]
    assert any(c.finish_reason == "stop" for c in stopped)  # the stop strings did end rows
    assert sorted(order) == ["a1", "a2", "b"]
    c = gen.counters
    # Every decode row-step produced one token: no finished row was computed again, no place left idle by a
    # row that was done.
    assert c["decode_row_steps"] == c["generated_tokens"] > 0


def test_continuous_generate_equals_the_batch_by_batch_loop(lm):
    model, tok = lm
    prompts = SHORT + LONG + [HEAD + "Why?"] * 2
    cfg = SamplingConfig(max_new_tokens=11, do_sample=False, stop=("o",))
    continuous = HFGenerator(model, tok, batch_size=2, progress=False, prefix_cache=True)
    assert continuous.generate(prompts, cfg) == continuous._generate_batches(prompts, cfg)


def test_seeded_sampling_is_reproducible_and_the_seed_matters(lm):
    model, tok = lm
    prompts = [HEAD + "Write a question."] * 4 + SHORT
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3)
    runs = [HFGenerator(model, tok, batch_size=3, progress=False, prefix_cache=True).generate(prompts, cfg)
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = HFGenerator(model, tok, batch_size=3, progress=False, prefix_cache=True).generate(prompts, cfg.replace(seed=4))
    assert other != runs[0]
    assert len({c.text for c in runs[0][:4]}) > 1  # identical prompts still sample different texts


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, layers):
        self.layers = layers


def _cache(batch, width, fill, layers=2):
    return _Cache([_Layer(torch.full((batch, 3, width, 4), fill + n), torch.full((batch, 3, width, 4), -fill - n))
                   for n in range(layers)])


def test_merge_right_aligns_both_blocks_with_finite_zero_padding():
    running, joining = _cache(2, 5, 1.0), _cache(3, 7, 10.0)
    for layer in running.layers:  # the reserved columns of a buffer hold garbage: they must never be read
        layer._key_buffer = torch.full((2, 3, 9, 4), float("nan"))
    _merge(running, joining, 7, room=4)
    for n, layer in enumerate(running.layers):
        assert layer.keys.shape == (5, 3, 7, 4) and layer._key_buffer.shape == (5, 3, 11, 4)
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        assert (layer.keys[:2, :, :2] == 0).all() and (layer.values[:2, :, :2] == 0).all()  # the narrower block's padding
        assert (layer.keys[:2, :, 2:] == 1.0 + n).all() and (layer.values[:2, :, 2:] == -1.0 - n).all()
        assert (layer.keys[2:] == 10.0 + n).all() and (layer.values[2:] == -10.0 - n).all()
        # keys/values are views into the buffers, so the model's next token is written in place
        assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()


def test_restack_selects_rows_and_cuts_shared_leading_columns():
    cache = _cache(4, 6, 0.0, layers=1)
    layer = cache.layers[0]
    layer.keys = torch.arange(4 * 3 * 6 * 4, dtype=torch.float32).view(4, 3, 6, 4)
    before = layer.keys.clone()
    _restack(cache, [(torch.tensor([3, 1]), 2)], 4, room=2)
    assert torch.equal(layer.keys, before[[3, 1]][:, :, 2:])
    assert layer._key_buffer.shape == (2, 3, 6, 4)


def test_run_tasks_list_calls_answer_the_first_and_run_the_rest_in_the_background(lm):
    model, tok = lm
    a = SamplingConfig(max_new_tokens=3, do_sample=False)
    b = SamplingConfig(max_new_tokens=12, do_sample=False)

    def task(log):
        respond, ahead = GenerateCall(SHORT[:2], a), GenerateCall(LONG[:2], b)
        got_a = yield [respond, ahead]
        log.append(len(got_a))
        got_b = yield ahead  # the same object: its completions, computed meanwhile
        log.append(len(got_b))
        empty = yield GenerateCall([], a)
        return got_a, got_b, empty

    for generator in (HFGenerator(model, tok, batch_size=4, progress=False, prefix_cache=True),
                      HFGenerator(model, tok, batch_size=4, progress=False)):  # continuous, and one call at a time
        log = []
        (got_a, got_b, empty), = generator.run_tasks([task(log)])
        assert log == [2, 2] and empty == []
        assert got_a == [alone(model, tok, p, a) for p in SHORT[:2]]
        assert got_b == [alone(model, tok, p, b) for p in LONG[:2]]


class _Plain:
    """A generator with ``generate`` only (as a vLLM or custom backend): tasks run one after the other."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, config, *, desc=None):
        self.calls.append(desc)
        return [Completion(f"{desc}:{p}", "stop") for p in prompts]


def test_run_tasks_on_a_plain_generator_runs_background_calls_when_asked():
    cfg = SamplingConfig(max_new_tokens=2, do_sample=False)

    def task():
        first = yield [GenerateCall(["x"], cfg, "respond"), GenerateCall(["y"], cfg, "ahead")]
        return first

    plain = _Plain()
    assert run_tasks(plain, [task()]) == [[Completion("respond:x", "stop")]]
    assert plain.calls == ["respond"]  # a background call nobody asked for is never run


@pytest.mark.parametrize("continuous", [True, False])
def test_an_error_in_one_task_closes_every_task(lm, continuous):
    model, tok = lm
    cfg = SamplingConfig(max_new_tokens=4, do_sample=False)
    closed = []

    def good():
        try:
            yield GenerateCall(LONG, cfg)
            yield GenerateCall(LONG, cfg)
        finally:
            closed.append("good")

    def bad():
        try:
            yield GenerateCall(SHORT[:1], cfg)
            raise KeyboardInterrupt  # what Ctrl-C inside a task's own work looks like
        finally:
            closed.append("bad")

    gen = HFGenerator(model, tok, batch_size=2, progress=False, decode_loop=continuous)
    assert gen.continuous == continuous
    with pytest.raises(KeyboardInterrupt):
        gen.run_tasks([good(), bad()])
    assert sorted(closed) == ["bad", "good"]
    # The generator is usable afterwards: nothing of the aborted run is left queued.
    assert gen.generate(SHORT[:2], cfg) == [alone(model, tok, p, cfg) for p in SHORT[:2]]


def test_batcher_rejects_bad_requests(lm):
    model, tok = lm
    engine = ContinuousBatcher(model, tok, max_rows=2, eos_ids=[tok.eos_token_id], pad_id=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.submit(DecodeRequest([], 4))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(DecodeRequest([[1, 2], []], 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(DecodeRequest([[1, 2]], 0))
    with pytest.raises(ValueError, match="max_rows"):
        ContinuousBatcher(model, tok, max_rows=0, eos_ids=[1], pad_id=0)


def test_a_sliding_window_cache_keeps_the_batch_by_batch_loop(lm):
    """The engine pads, merges and cuts cache layers itself, so only plain DynamicLayers qualify: a model
    whose cache has sliding-window layers must fall back to the batch-by-batch loop and still answer
    every call of its tasks correctly."""
    from transformers import MistralConfig, MistralForCausalLM

    from selfmoe.prefix_cache import cache_layers_are_plain

    _, tok = lm
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, pad_token_id=tok.pad_token_id)).eval()
    assert cache_layers_are_plain(lm[0]) and not cache_layers_are_plain(sliding)
    gen = HFGenerator(sliding, tok, batch_size=2, progress=False, decode_loop=True)
    assert not gen.continuous
    cfg = SamplingConfig(max_new_tokens=6, do_sample=False)

    def task(prompts):
        return (yield GenerateCall(prompts, cfg))

    got = gen.run_tasks([task(SHORT[:3]), task(SHORT[3:])])
    assert got == [[alone(sliding, tok, p, cfg) for p in SHORT[:3]], [alone(sliding, tok, p, cfg) for p in SHORT[3:]]]
