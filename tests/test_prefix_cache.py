"""Shared-prefix prefill (selfmoe.prefix_cache) and the shot groups of self-specialization that feed it."""
from __future__ import annotations

import random

import pytest
import torch

from selfmoe.data import encode_prompt
from selfmoe.generate import HFGenerator, SamplingConfig
from selfmoe.prefix_cache import common_prefix_length, prefix_batches, suffix_block, supports_prefix_cache
from selfmoe.specialization import SpecializeConfig, _draw_shots

from _tiny_lm import load_tiny_lm, save_tiny_lm, sharp_tiny_lm

# A long few-shot head shared by every prompt, then suffixes of different lengths: batches must pad.
HEAD = ("You are a careful assistant. Here are solved examples. Tom has 3 apples and buys 5 more, so he has 8. "
        "A train goes 60 miles per hour for 3 hours, so it travels 180 miles. ")
SUFFIXES = ["Anna saves 4 dollars a week for 9 weeks. How much?", "Two plus two?",
            "A box holds 12 eggs. How many eggs are in 7 boxes, and how many in 9?", "Why?", "Sum 2, 4 and 6."]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return sharp_tiny_lm(tmp_path_factory.mktemp("lm"))


def alone(model, tok, prompt, max_new_tokens):
    """One prompt, no padding, no cache tricks: the reference."""
    gen = HFGenerator(model, tok, batch_size=1, progress=False)
    return gen.generate([prompt], SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False))[0]


def test_common_prefix_length_stops_one_short_of_the_shortest():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical: the last token is left to generate
    assert common_prefix_length([[1, 2, 3], [4, 2, 3]]) == 0
    assert common_prefix_length([[7]]) == 0
    assert common_prefix_length([]) == 0


def test_suffix_block_layout():
    ids, mask, pos = suffix_block([[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 7, 8]], 2, pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[0, 3, 4], [0, 0, 5], [6, 7, 8]]  # each row's own tokens end in the last column
    assert mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]  # [prefix | pad | suffix]
    assert pos.tolist() == [[0, 2, 3], [0, 0, 2], [2, 3, 4]]  # positions continue the prefix, no gap


def test_prefix_batches_keep_shot_groups_together():
    system = list(range(100))
    group_a = [system + [500] * 300 + [1000 + i] for i in range(5)]
    group_b = [system + [600] * 300 + [2000 + i, i] for i in range(3)]
    single = [system + [700] * 300 + [9]]
    encoded = group_b + single + group_a  # input order does not matter
    batches = prefix_batches(encoded, 4, 32)
    as_sets = sorted(sorted(b) for b in batches)
    assert as_sets == [[0, 1, 2], [3], [4, 5, 6, 7], [8]]
    assert sorted(i for b in batches for i in b) == list(range(len(encoded)))
    # Prompts that share little (less than min_shared_prefix) are simply batched in token order.
    assert [len(b) for b in prefix_batches([[i, 1] for i in range(7)], 3, 32)] == [3, 3, 1]


@pytest.mark.parametrize("batch_size", [2, 5])
def test_prefix_cached_generation_equals_each_prompt_alone(lm, batch_size):
    model, tok = lm
    prompts = [HEAD + s for s in SUFFIXES]
    encoded = [encode_prompt(tok, p) for p in prompts]
    shared = common_prefix_length(encoded)
    assert shared >= 32 and len({len(e) for e in encoded}) >= 4  # premise: a long shared head, ragged suffixes
    gen = HFGenerator(model, tok, batch_size=batch_size, progress=False, prefix_cache=True)
    assert gen.prefix_cache
    got = gen.generate(prompts, SamplingConfig(max_new_tokens=10, do_sample=False))
    ref = [alone(model, tok, p, 10) for p in prompts]
    assert got == ref
    assert all(c.text for c in got)
    # The shared head ran once for the whole call (its KV cache is kept while the group's rows join the
    # continuous batch a few at a time), not once per prompt or per batch; each row's own suffix ran once
    # (padded to the widest suffix that joined with it).
    c = gen.counters
    assert c["prompts"] == len(prompts) and c["prompt_tokens"] == sum(map(len, encoded))
    suffixes = [len(e) - shared for e in encoded]
    assert shared + sum(suffixes) <= c["prefill_tokens"] <= shared + len(prompts) * max(suffixes)
    plain = HFGenerator(model, tok, batch_size=batch_size, progress=False)
    assert plain.generate(prompts, SamplingConfig(max_new_tokens=10, do_sample=False)) == ref
    assert c["prefill_tokens"] < plain.counters["prefill_tokens"] - (shared - 1)
    assert 0 < c["generated_tokens"] <= 10 * len(prompts)


def test_prefix_cache_off_for_wrappers_and_by_default(lm):
    model, tok = lm
    assert supports_prefix_cache(model)
    assert not supports_prefix_cache(torch.nn.Linear(2, 2))
    assert not HFGenerator(model, tok, progress=False).prefix_cache  # off unless asked for

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    assert not HFGenerator(Wrapped(model), tok, progress=False, prefix_cache=True).prefix_cache


def test_prefix_cached_sampling_is_seeded(lm):
    model, tok = lm
    prompts = [HEAD + "Write a question."] * 4 + [HEAD + s for s in SUFFIXES[:2]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.98, seed=7)
    a = HFGenerator(model, tok, batch_size=4, progress=False, prefix_cache=True).generate(prompts, cfg)
    b = HFGenerator(model, tok, batch_size=4, progress=False, prefix_cache=True).generate(prompts, cfg)
    assert a == b
    assert len({c.text for c in a[:4]}) > 1  # identical prompts still sample different texts


def test_shot_groups_follow_the_batch_size():
    seeds = [{"instruction": f"seed {i}", "output": str(i)} for i in range(6)]
    shared = _draw_shots(random.Random(0), seeds, 3, 10, SpecializeConfig(batch_size=4, share_shots=True))
    assert len(shared) == 10
    groups = [shared[0:4], shared[4:8], shared[8:10]]
    assert all(all(d == g[0] for d in g) for g in groups)  # one draw per batch-sized group
    assert len({tuple(s["output"] for s in g[0]) for g in groups}) > 1  # groups draw afresh
    # share_shots=False: one draw per prompt, exactly the draws of rng.sample per prompt
    rng_a, rng_b = random.Random(1), random.Random(1)
    per_prompt = _draw_shots(rng_a, seeds, 3, 5, SpecializeConfig(batch_size=4, share_shots=False))
    assert per_prompt == [rng_b.sample(seeds, 3) for _ in range(5)]


def test_stop_strings_end_rows_early_and_cut_like_generate(lm):
    model, tok = lm
    prompts = [HEAD + s for s in SUFFIXES]
    free = [alone(model, tok, p, 16).text for p in prompts]
    # A stop string taken from the middle of one row's own greedy text: that row must end there.
    victim = max(range(len(free)), key=lambda i: len(free[i]))
    text = free[victim]
    stop = text[len(text) // 3: len(text) // 3 + 3]
    assert stop.strip() and stop in text
    cfg = SamplingConfig(max_new_tokens=16, do_sample=False, stop=(stop,))
    cached = HFGenerator(model, tok, batch_size=5, progress=False, prefix_cache=True)
    got = cached.generate(prompts, cfg)
    ref = HFGenerator(model, tok, batch_size=1, progress=False).generate(prompts, cfg)
    assert got == ref
    assert got[victim].finish_reason == "stop" and got[victim].text == text[: text.index(stop)]
    # The row that stopped left the batch: fewer row-steps than rows x steps.
    assert cached.counters["decode_row_steps"] < len(prompts) * 16


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.98), (0.7, 5, 1.0), (1.3, 20, 0.5), (1.0, 0, 1.0)])
def test_sampling_scores_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from selfmoe.decode_loop import sampling_scores

    g = torch.Generator().manual_seed(int(temperature * 100) + top_k)
    logits = torch.randn(4, 50, generator=g) * 3
    logits[0, :10] = 2.0  # ties at the top-k / top-p boundary
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    got = sampling_scores(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = ~torch.isinf(got)
    assert torch.allclose(got[finite], expected[finite])
    assert finite.any(dim=-1).all()


def test_reserved_cache_appends_in_place_and_keeps_the_values(lm):
    from selfmoe.prefix_cache import cache_kwarg, prefill_prefix, reserve_capacity

    model, tok = lm
    ids = encode_prompt(tok, HEAD)
    cache = prefill_prefix(model, ids[:20], 2)
    plain = prefill_prefix(model, ids[:20], 2)
    assert reserve_capacity(cache, 40)
    layer = cache.layers[0]
    buffer = layer.keys.data_ptr()
    step = torch.tensor([[ids[20]], [ids[21]]])
    mask = torch.ones(2, 21, dtype=torch.long)
    with torch.no_grad():
        a = model(input_ids=step, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache}).logits
        b = model(input_ids=step, attention_mask=mask, use_cache=True, **{cache_kwarg(model): plain}).logits
    assert layer.keys.shape[-2] == 21 and layer.keys.data_ptr() == buffer  # written into the reserved room
    assert torch.equal(layer.keys, plain.layers[0].keys) and torch.equal(a, b)
    assert not reserve_capacity(object(), 10)  # anything but a plain DynamicCache is left alone


def test_decode_loop_without_a_shared_prefix_drops_finished_rows(lm):
    """decode_loop=True on prompts that share nothing: left-padded rows, finished ones leave the batch."""
    model, tok = lm
    prompts = ["Hi", "Two plus two?", "A box holds 12 eggs. How many eggs are in 7 boxes?", "Why?", "Name a colour."]
    encoded = [encode_prompt(tok, p) for p in prompts]
    assert common_prefix_length(encoded) == 0 or len({len(e) for e in encoded}) >= 4  # premise: ragged rows
    free = [alone(model, tok, p, 16).text for p in prompts]
    victim = max(range(len(free)), key=lambda i: len(free[i]))
    stop = free[victim][len(free[victim]) // 3:][:3]
    assert stop.strip()
    cfg = SamplingConfig(max_new_tokens=16, do_sample=False, stop=(stop,))
    gen = HFGenerator(model, tok, batch_size=5, progress=False, decode_loop=True)
    assert gen.decode_loop and not gen.prefix_cache
    got = gen.generate(prompts, cfg)
    assert got == HFGenerator(model, tok, batch_size=1, progress=False).generate(prompts, cfg)
    assert got[victim].finish_reason == "stop"
    assert gen.counters["prefill_tokens"] == len(prompts) * max(map(len, encoded))  # nothing shared: padded block
    assert gen.counters["decode_row_steps"] < len(prompts) * 16


@pytest.mark.parametrize("router", ["shared", "per_layer"])
def test_decode_loop_drives_a_mixse_like_generate(tmp_path, router):
    from selfmoe.model import MiXSE

    base, tok = load_tiny_lm(save_tiny_lm(tmp_path / "lm"))
    torch.manual_seed(0)
    mixse = MiXSE.from_scratch(base, num_experts=3, r=4, lora_alpha=8, top_k=1, router=router)
    with torch.no_grad():  # experts that change the outputs (fresh LoRA B is zero)
        for name, p in mixse.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert supports_prefix_cache(mixse)
    prompts = [HEAD + s for s in SUFFIXES]
    cfg = SamplingConfig(max_new_tokens=10, do_sample=False)
    ref = HFGenerator(mixse, tok, batch_size=1, progress=False).generate(prompts, cfg)
    with torch.no_grad():
        plain = HFGenerator(base, tok, batch_size=1, progress=False)
        mixse_off = [c.text for c in ref]
        with mixse.disable_experts():
            assert [c.text for c in plain.generate(prompts, cfg)] != mixse_off  # the experts matter
    for kwargs in ({"decode_loop": True}, {"prefix_cache": True}):
        gen = HFGenerator(mixse, tok, batch_size=5, progress=False, **kwargs)
        assert gen.decode_loop
        assert gen.generate(prompts, cfg) == ref


@pytest.mark.parametrize("kind", ["xlora", "intuition"])
def test_decode_loop_is_refused_for_routing_with_state_per_cache(tmp_path, kind):
    from selfmoe.intuition import IntuitionConfig
    from selfmoe.model import MiXSE

    base, tok = load_tiny_lm(save_tiny_lm(tmp_path / "lm"))
    if kind == "xlora":  # the scaling pass keeps a cache of its own
        mixse = MiXSE.from_scratch(base, num_experts=2, r=4, lora_alpha=8, top_k=1, router="xlora")
    else:  # the prompt's prior is kept per cache and row
        mixse = MiXSE.from_scratch(base, num_experts=2, r=4, lora_alpha=8, top_k=1,
                                   intuition=IntuitionConfig(clusters=2, dim=base.config.hidden_size, layer=0))
    assert not supports_prefix_cache(mixse)
    gen = HFGenerator(mixse, tok, batch_size=2, progress=False, decode_loop=True, prefix_cache=True)
    assert not gen.decode_loop and not gen.prefix_cache


def test_decode_loop_reports_the_rows_it_holds(lm):
    from selfmoe.decode_loop import decode_shared_prefix

    model, tok = lm
    seqs = [encode_prompt(tok, HEAD + s) for s in SUFFIXES]
    seen = []
    rows, _ = decode_shared_prefix(model, tok, seqs, 0, max_new_tokens=6, eos_ids=[tok.eos_token_id],
                                   pad_id=tok.pad_token_id, stop=("pl",), on_rows=seen.append)
    assert seen[0] == list(range(len(seqs))) and len(seen) > 1
    assert all(set(b) < set(a) for a, b in zip(seen, seen[1:]))  # rows only leave
    with pytest.raises(ValueError, match="on_rows needs prefix_len 0"):
        decode_shared_prefix(model, tok, seqs, 4, max_new_tokens=2, eos_ids=[tok.eos_token_id], pad_id=0, on_rows=print)
