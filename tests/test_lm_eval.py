"""lm-evaluation-harness evaluates a MiXSE and a single expert through its Python API
(``HFLM(pretrained=model, tokenizer=tok)``), offline, on local tasks written here (YAML + JSONL in tmp_path):
a multiple-choice task (log-likelihood requests) and a ``generate_until`` task.

The harness's numbers are checked against the model itself: every log-likelihood it reports equals the sum
of the continuation tokens' log-probabilities computed here with a plain forward (encoding as HFLM does:
context and context + continuation tokenized, the continuation being what the second adds), and every
generation equals the model's own greedy ``generate`` cut at the stop string. Skips without ``lm_eval``
(``pip install 'selfmoe[eval]'``).
"""
from __future__ import annotations

import json

import pytest
import torch

from helpers import random_adapter

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_GEN = 6


def _docs(n=4):
    return [{"question": f"What is {i} plus {i + 1}?", "choices": [str(2 * i + 1), str(2 * i + 2), str(i)],
             "answer": i % 3} for i in range(n)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
    (root / "mc.yaml").write_text("task: selfmoe_mc\n" + common + """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "gen.yaml").write_text("task: selfmoe_gen\n" + common + f"""output_type: generate_until
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def evaluate(model, tok, tasks, names=("selfmoe_mc", "selfmoe_gen")):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    return simple_evaluate(model=lm, tasks=list(names), task_manager=TaskManager(include_path=str(tasks)),
                           log_samples=True, bootstrap_iters=0)


@torch.no_grad()
def loglikelihood(model, tok, context, continuation):
    """Sum of log p(continuation tokens | context) and whether each is the argmax, encoded as HFLM encodes."""
    n = len(context) - len(context.rstrip())
    if n:  # HFLM moves the context's trailing spaces to the continuation
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    pos = range(len(ctx), len(whole))
    total = sum(float(logp[p - 1, whole[p]]) for p in pos)
    greedy = all(int(logp[p - 1].argmax()) == whole[p] for p in pos)
    return total, greedy


@torch.no_grad()
def greedy_text(model, tok, context, until, max_new):
    enc = tok(context, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    for stop in until:
        text = text.split(stop)[0]
    return text


def check_against_the_model(results, model, tok):
    """Every number the harness reports is the model's own."""
    mc = results["samples"]["selfmoe_mc"]
    assert len(mc) == len(_docs())
    correct = 0
    for sample in mc:
        got = [r[0] for r in sample["resps"]]
        want = [loglikelihood(model, tok, ctx, cont) for ctx, cont in sample["arguments"]]
        for (g_ll, g_greedy), (w_ll, w_greedy) in zip(got, want):
            assert g_ll == pytest.approx(w_ll, rel=1e-5, abs=1e-4) and bool(g_greedy) == w_greedy
        correct += int(max(range(len(want)), key=lambda i: want[i][0]) == sample["target"])
    assert results["results"]["selfmoe_mc"]["acc,none"] == pytest.approx(correct / len(mc))
    gen = results["samples"]["selfmoe_gen"]
    assert len(gen) == len(_docs())
    for sample in gen:
        ((ctx, kwargs),) = sample["arguments"]
        assert sample["resps"][0][0] == greedy_text(model, tok, ctx, kwargs["until"], kwargs["max_gen_toks"])
    return [[r[0][0] for r in s["resps"]] for s in mc]


def _prompts():
    return [[(f"Question: {d['question']}\nAnswer:", f" {c}") for c in d["choices"]] for d in _docs()]


def _max_diff(a, b):
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_a_mixse_and_an_expert_through_hflm(lm_path, tmp_path, tasks):
    from selfmoe import MiXSE
    from selfmoe.lora import attach_lora_adapter, remove_lora
    from _tiny_lm import load_tiny_lm

    base, tok = load_tiny_lm(lm_path)
    experts = {"a": random_adapter(tmp_path / "a", base, 2), "b": random_adapter(tmp_path / "b", base, 3)}
    torch.manual_seed(0)  # the (untrained) router's init
    mixse = MiXSE.from_adapters(base, experts, top_k=1).eval()
    mixse_ll = check_against_the_model(evaluate(mixse, tok, tasks), mixse, tok)
    with mixse.disable_experts():
        plain = [[loglikelihood(mixse, tok, c, k)[0] for c, k in doc] for doc in _prompts()]
    assert _max_diff(mixse_ll, plain) > 1e-2  # the experts are in use: the comparisons above could fail
    mixse.unload()

    attach_lora_adapter(base, experts["a"])  # one expert: the plain transformers model with LoRA linears
    try:
        expert_ll = check_against_the_model(evaluate(base, tok, tasks), base, tok)
    finally:
        remove_lora(base)
    assert _max_diff(expert_ll, mixse_ll) > 1e-2 and _max_diff(expert_ll, plain) > 1e-2
