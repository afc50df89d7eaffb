"""selfmoe.generate: batched left-padded HF generation on a tiny random Llama loaded from a directory."""
from __future__ import annotations

import pytest
import torch

from selfmoe.data import encode_prompt
from selfmoe.generate import Completion, HFGenerator, SamplingConfig, generate_texts, make_generator, vllm_available

from _tiny_lm import build_tokenizer, load_tiny_lm, save_tiny_lm

PROMPTS = [
    "Hi",
    "### Instruction:\nWhat is 12 + 30?\n\n### Response:\n",
    "Tom has 3 apples and buys 5 more.",
    "Which planet is known as the red planet? (A) Venus (B) Mars",
    "a",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_tiny_lm(save_tiny_lm(tmp_path_factory.mktemp("lm")))


def reference_greedy(model, tok, prompt, max_new_tokens):
    """One prompt, no padding, raw model.generate: the new tokens decoded."""
    ids = torch.tensor([encode_prompt(tok, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [2, 5])
def test_left_padded_batch_equals_per_prompt_greedy(lm, batch_size):
    model, tok = lm
    lengths = {len(encode_prompt(tok, p)) for p in PROMPTS}
    assert len(lengths) >= 4  # the premise: prompts of different lengths, so batches really pad
    cfg = SamplingConfig(max_new_tokens=12, do_sample=False)
    got = HFGenerator(model, tok, batch_size=batch_size, progress=False).generate(PROMPTS, cfg)
    ref = [reference_greedy(model, tok, p, 12) for p in PROMPTS]
    assert [c.text for c in got] == ref
    assert all(c.text for c in got)  # the comparison is not between empty strings
    assert not any(p in c.text for p, c in zip(PROMPTS[1:4], got[1:4]))  # only new text comes back


def test_tokenizer_and_model_state_untouched(lm):
    model, tok = lm
    tok.padding_side = "right"
    model.train()
    try:
        HFGenerator(model, tok, progress=False).generate(PROMPTS[:2], SamplingConfig(max_new_tokens=3, do_sample=False))
        assert tok.padding_side == "right" and tok.pad_token == "<pad>"
        assert model.training
    finally:
        model.eval()


def test_pad_token_falls_back_to_eos(lm):
    model, tok = lm
    nopad = build_tokenizer(bos=True, pad=False)
    assert nopad.pad_token is None and nopad.get_vocab() == tok.get_vocab()
    cfg = SamplingConfig(max_new_tokens=8, do_sample=False)
    a = HFGenerator(model, nopad, batch_size=5, progress=False).generate(PROMPTS, cfg)
    b = HFGenerator(model, tok, batch_size=5, progress=False).generate(PROMPTS, cfg)
    assert a == b
    assert nopad.pad_token is None  # still none: the generator pads without touching the tokenizer


def test_sampling_is_seeded_and_leaves_global_rng_alone(lm):
    model, tok = lm
    gen = HFGenerator(model, tok, batch_size=3, progress=False)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.98, seed=123)
    torch.manual_seed(0)
    a = gen.generate(PROMPTS, cfg)
    after_a = torch.rand(3)
    torch.manual_seed(0)
    b = gen.generate(PROMPTS, cfg)
    assert a == b
    torch.manual_seed(0)
    assert torch.equal(after_a, torch.rand(3))  # the seeded call consumed nothing from the caller's stream
    c = gen.generate(PROMPTS, cfg.replace(seed=124))
    assert [x.text for x in c] != [x.text for x in a]
    greedy = gen.generate(PROMPTS, SamplingConfig(max_new_tokens=10, do_sample=False))
    assert [x.text for x in a] != [x.text for x in greedy]


def test_stop_string_cuts_text_and_sets_finish_reason(lm):
    model, tok = lm
    gen = HFGenerator(model, tok, batch_size=2, progress=False)
    base = gen.generate(PROMPTS[:3], SamplingConfig(max_new_tokens=16, do_sample=False))
    # Pick, for prompt 1, a stop string from the middle of its own continuation.
    text = base[1].text
    assert len(text) >= 6
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = gen.generate(PROMPTS[:3], SamplingConfig(max_new_tokens=16, do_sample=False, stop=(stop,)))
    assert cut[1] == Completion(text[:text.find(stop)], "stop")
    for full, c in zip(base, cut):
        assert full.text.startswith(c.text)
        assert c.finish_reason == ("stop" if stop in full.text or full.finish_reason == "stop" else "length")


def test_finish_reason_length_means_budget_used(lm):
    model, tok = lm
    out = HFGenerator(model, tok, progress=False).generate(PROMPTS, SamplingConfig(max_new_tokens=5, do_sample=False))
    for p, c in zip(PROMPTS, out):
        if c.finish_reason == "length":
            ids = encode_prompt(tok, p)
            gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            assert gen.shape[1] - len(ids) == 5 and tok.eos_token_id not in gen[0, len(ids):].tolist()


def test_generate_texts_and_errors(lm):
    model, tok = lm
    texts = generate_texts(model, tok, PROMPTS[:2], SamplingConfig(max_new_tokens=4, do_sample=False), progress=False)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    gen = HFGenerator(model, tok, progress=False)
    assert gen.generate([], SamplingConfig()) == []
    with pytest.raises(TypeError, match="not one string"):
        gen.generate("Hi", SamplingConfig())
    with pytest.raises(ValueError, match="backend"):
        make_generator(model, tok, backend="tgi")
    with pytest.raises(TypeError, match="path"):
        make_generator("some/path", tok, backend="hf")
    if not vllm_available():
        with pytest.raises(ImportError, match="vllm"):
            make_generator("some/path", backend="vllm")
    with pytest.raises(ValueError, match="batch_size"):
        HFGenerator(model, tok, batch_size=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop=("",)), "stop"),
])
def test_sampling_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
    assert SamplingConfig(stop="###").stop == ("###",)
    assert SamplingConfig(do_sample=False, temperature=0.0).do_sample is False  # greedy ignores temperature


def test_vllm_adapter_maps_parameters_and_outputs(monkeypatch):
    """No vLLM here (it needs a GPU): a stand-in module checks what the thin adapter sends and returns."""
    import sys
    import types

    seen = {}

    class FakeParams:
        def __init__(self, **kw):
            seen["params"] = kw

    class FakeLLM:
        def __init__(self, model, **kw):
            seen["model"], seen["llm_kwargs"] = model, kw

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"] = prompts
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f"answer {i}", finish_reason=r)]) for i, r in enumerate(["stop", "length"])]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeParams))
    gen = make_generator("/models/base", backend="vllm", dtype="bfloat16")
    greedy = gen.generate(["p0", "p1"], SamplingConfig(max_new_tokens=7, do_sample=False, stop=("###",)))
    assert greedy == [Completion("answer 0", "stop"), Completion("answer 1", "length")]
    assert seen["model"] == "/models/base" and seen["llm_kwargs"] == {"dtype": "bfloat16"}
    assert seen["params"] == {"n": 1, "max_tokens": 7, "seed": None, "temperature": 0.0, "stop": ["###"]}
    gen.generate(["p0", "p1"], SamplingConfig(temperature=1.0, top_p=0.98, top_k=40, seed=3))
    assert seen["params"] == {"n": 1, "max_tokens": 256, "seed": 3, "temperature": 1.0, "top_p": 0.98, "top_k": 40}
