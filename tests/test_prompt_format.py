"""Prompts in the model's own chat template (``prompt_format``: auto / chat / alpaca), tiny models only.

The chat tokenizer is the tiny test tokenizer with a ChatML template like SmolLM2-Instruct's, its
``<|im_start|>``/``<|im_end|>`` added as special tokens and ``<|im_end|>`` as EOS.
"""
from __future__ import annotations

import json

import pytest

from selfmoe.choices import PROMPT_FORMATS
from selfmoe.data import IGNORE_INDEX, encode_prompt, format_prompt, tokenize_example
from selfmoe.eval_partial import PartialMismatchError
from selfmoe.evaluation import check_partial, eval_settings, evaluate
from selfmoe.generate import Completion
from selfmoe.prompt_format import chat_target, resolve_prompt_format

from _tiny_lm import build_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template=CHATML):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat_lm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-lm") / "tiny-chat"
    tok = chat_tokenizer()
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def old_tokenize_example(record, tokenizer):
    """tokenize_example as it was before prompt formats existed (Alpaca only), for the byte-for-byte check."""
    eos = tokenizer.eos_token_id
    prompt = format_prompt(record["instruction"], record.get("input", "") or "")
    response = record["output"]
    prompt_ids = encode_prompt(tokenizer, prompt)
    full_ids = encode_prompt(tokenizer, prompt + response)
    if len(full_ids) > len(prompt_ids) and full_ids[:len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids):]
    else:
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    response_ids = response_ids + [eos]
    ids = prompt_ids + response_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


RECORDS = [
    {"instruction": "What is 12 + 30?", "input": "", "output": "The answer is 42."},
    {"instruction": "Sum the list.", "input": "[1, 2, 3]", "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Which planet is red?", "output": "Mars (B)."},
]


# ------------------------------------------------------------------------------------------ choosing


def test_auto_picks_chat_iff_the_tokenizer_has_a_template():
    plain, chat = build_tokenizer(), chat_tokenizer()
    assert PROMPT_FORMATS == ("auto", "chat", "alpaca")
    assert resolve_prompt_format("auto", plain) == "alpaca"
    assert resolve_prompt_format("auto", chat) == "chat"
    assert resolve_prompt_format("auto", None) == "alpaca"
    assert resolve_prompt_format("alpaca", chat) == "alpaca"
    assert resolve_prompt_format("chat", chat) == "chat"
    with pytest.raises(ValueError, match="chat template"):
        resolve_prompt_format("chat", plain)
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        resolve_prompt_format("chatml", chat)


def test_chat_prompt_is_the_templates_rendering():
    tok = chat_tokenizer()
    for r in RECORDS:
        content = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        want = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        assert format_prompt(r["instruction"], r.get("input", ""), fmt="chat", tokenizer=tok) == want
        assert format_prompt(r["instruction"], r.get("input", ""), fmt="auto", tokenizer=tok) == want
        assert want.endswith("<|im_start|>assistant\n")
        # alpaca stays the public default, with or without a tokenizer
        assert format_prompt(r["instruction"], r.get("input", "")) == format_prompt(
            r["instruction"], r.get("input", ""), fmt="alpaca", tokenizer=tok)
        assert format_prompt(r["instruction"]).startswith("Below is an instruction")


# ------------------------------------------------------------------------------------------ SFT encoding


def test_alpaca_encoding_is_unchanged():
    for tok in (build_tokenizer(), build_tokenizer(bos=False), chat_tokenizer()):
        for r in RECORDS:
            assert tokenize_example(r, tok, prompt_format="alpaca") == old_tokenize_example(r, tok)
    plain = build_tokenizer()
    for r in RECORDS:  # auto on a tokenizer without a template is alpaca
        assert tokenize_example(r, plain) == old_tokenize_example(r, plain)


def test_chat_labels_mask_the_prompt_and_end_with_the_end_of_turn_token():
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    for r in RECORDS:
        ex = tokenize_example(r, tok)  # auto -> chat
        prompt_ids = encode_prompt(tok, format_prompt(r["instruction"], r.get("input", ""), fmt="chat", tokenizer=tok))
        n = len(prompt_ids)
        assert ex["input_ids"][:n] == prompt_ids
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        target = ex["labels"][n:]
        assert target == ex["input_ids"][n:] and IGNORE_INDEX not in target
        assert target[-1] == im_end and target.count(im_end) == 1  # stops there: no trailing "\n" trained
        assert tok.decode(target, skip_special_tokens=False) == r["output"] + "<|im_end|>"
        # the ids equal what the model sees when it generates after the prompt
        assert ex["input_ids"] == encode_prompt(tok, tok.apply_chat_template(
            [{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")},
             {"role": "assistant", "content": r["output"]}], tokenize=False))[:len(ex["input_ids"])]


def test_chat_target_across_a_merging_boundary_is_tokenised_separately():
    # The generation prompt ends in "Wr" and the answer starts with "ite": "Wr" + "ite" encode as other
    # tokens than "Write", so the prompt's ids are not a prefix of the whole text's: the parts are encoded apart.
    template = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nWr{% endif %}").replace(
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}",
        "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}Wr{% endif %}{{ m['content'] }}")
    tok = chat_tokenizer(template)
    r = {"instruction": "Say it.", "output": "ite a response."}
    prompt = format_prompt(r["instruction"], fmt="chat", tokenizer=tok)
    target = chat_target(tok, r["instruction"], "", r["output"])
    assert target == "ite a response.<|im_end|>\n"
    p_ids, full = encode_prompt(tok, prompt), encode_prompt(tok, prompt + target)
    assert full[:len(p_ids)] != p_ids  # the precondition: the boundary merges
    ex = tokenize_example(r, tok)
    assert ex["input_ids"][:len(p_ids)] == p_ids and ex["labels"][:len(p_ids)] == [IGNORE_INDEX] * len(p_ids)
    want = list(tok(target, add_special_tokens=False)["input_ids"])
    want = want[:len(want) - want[::-1].index(tok.eos_token_id)]
    assert ex["labels"][len(p_ids):] == want and want[-1] == tok.eos_token_id


def test_chat_template_that_renders_the_answer_differently_falls_back_to_response_plus_eos():
    # Assistant turns are rendered as "bot", the generation prompt as "assistant": the answered
    # conversation does not start with the prompt, so the target is the bare response + EOS.
    template = CHATML.replace("<|im_start|>{{ m['role'] }}", "<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}")
    tok = chat_tokenizer(template)
    r = RECORDS[0]
    assert chat_target(tok, r["instruction"], "", r["output"]) is None
    ex = tokenize_example(r, tok)
    n = ex["labels"].count(IGNORE_INDEX)
    assert tok.decode(ex["labels"][n:], skip_special_tokens=False) == r["output"] + "<|im_end|>"


def test_a_template_that_writes_bos_does_not_get_a_second_one():
    tok = chat_tokenizer("{{ bos_token }}" + CHATML)
    prompt = format_prompt("Hi.", fmt="chat", tokenizer=tok)
    assert prompt.startswith("<s>")
    ids = encode_prompt(tok, prompt)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


# ------------------------------------------------------------------------------------------ training


def test_train_config_prompt_format_defaults_and_old_configs_load():
    from selfmoe.train_config import TrainConfig

    assert TrainConfig().prompt_format == "auto"
    old = TrainConfig().to_dict()
    del old["prompt_format"]  # a train_config.json written before the field existed
    assert TrainConfig.from_dict(old).prompt_format == "auto"
    assert "prompt_format" not in TrainConfig(prompt_format="chat").identity()  # the resolved one is compared
    with pytest.raises(ValueError, match="prompt_format"):
        TrainConfig(prompt_format="chatml")


def test_training_records_the_resolved_format_and_refuses_a_switch_on_resume(chat_lm_path, tmp_path):
    from selfmoe.train import RUN_CONFIG_NAME, TrainConfig, train_expert
    from _tiny_lm import load_tiny_lm

    model, tok = load_tiny_lm(chat_lm_path)
    assert tok.chat_template
    recs = [dict(r, domain="math") for r in RECORDS]
    cfg = TrainConfig(batch_size=2, micro_batch_size=1, max_steps=1, progress=False, save_steps=1000, warmup_ratio=0.0)
    out = tmp_path / "run"
    train_expert(model, tok, recs, out, cfg)
    saved = json.loads((out / RUN_CONFIG_NAME).read_text())
    assert saved["run"]["prompt_format"] == "chat" and saved["config"]["prompt_format"] == "auto"
    # "chat" is what "auto" picked: the same run
    res = train_expert(model, tok, recs, out, cfg, resume=True, prompt_format="chat")
    assert res.resumed_from == 1
    with pytest.raises(FileExistsError, match="different training run.*prompt_format"):
        train_expert(model, tok, recs, out, cfg, resume=True, prompt_format="alpaca")


def test_an_alpaca_run_records_no_format_so_older_runs_still_resume(lm_path, tmp_path):
    from selfmoe.train import RUN_CONFIG_NAME, TrainConfig, train_expert
    from _tiny_lm import load_tiny_lm

    model, tok = load_tiny_lm(lm_path)
    recs = [dict(r, domain="math") for r in RECORDS]
    cfg = TrainConfig(batch_size=2, micro_batch_size=1, max_steps=1, progress=False, save_steps=1000, warmup_ratio=0.0)
    out = tmp_path / "run"
    train_expert(model, tok, recs, out, cfg)
    path = out / RUN_CONFIG_NAME
    saved = json.loads(path.read_text())
    assert "prompt_format" not in saved["run"]
    del saved["config"]["prompt_format"]  # as an older selfmoe wrote it
    path.write_text(json.dumps(saved))
    assert train_expert(model, tok, recs, out, cfg, resume=True, prompt_format="alpaca").resumed_from == 1


# ------------------------------------------------------------------------------------------ evaluation


class RecordingGenerator:
    def __init__(self, text="The answer is (B)."):
        self.text, self.calls = text, []

    def generate(self, prompts, config, *, desc=None):
        self.calls.append((list(prompts), config))
        return [Completion(self.text, "stop") for _ in prompts]


EVAL = [{"task": "multiple_choice", "instruction": "Which planet is red? (A) Venus (B) Mars", "answer": "B"},
        {"task": "numeric", "instruction": "What is 2 + 3?", "input": "Show the sum.", "answer": "5"}]


def test_eval_prompts_follow_the_format_and_resume_refuses_another(tmp_path):
    tok = chat_tokenizer()
    gen = RecordingGenerator()
    partial = tmp_path / "partial.jsonl"
    res = evaluate(None, tok, EVAL[:1], generator=gen, partial_path=partial)  # auto -> chat
    (prompts, config), = gen.calls
    assert prompts == [format_prompt(EVAL[0]["instruction"], fmt="chat", tokenizer=tok)]
    assert config.stop == ()  # the chat turn ends at <|im_end|>, not at Alpaca's marks
    assert res.settings["prompt_format"] == "chat" and res.predictions[0]["correct"]
    assert check_partial(partial, EVAL[:1], tokenizer=tok) == 1
    assert check_partial(partial, EVAL[:1], tokenizer=tok, prompt_format="chat") == 1
    with pytest.raises(PartialMismatchError, match="prompt_format"):
        check_partial(partial, EVAL[:1], tokenizer=tok, prompt_format="alpaca")
    with pytest.raises(PartialMismatchError):
        evaluate(None, tok, EVAL[:1], generator=RecordingGenerator(), partial_path=partial, prompt_format="alpaca")

    gen = RecordingGenerator()
    res = evaluate(None, tok, EVAL, generator=gen, prompt_format="alpaca")
    assert [p for ps, _ in gen.calls for p in ps] == [format_prompt(r["instruction"], r.get("input", "")) for r in EVAL]
    assert "prompt_format" not in res.settings  # alpaca settings are what they were before the format existed
    assert gen.calls[0][1].stop  # Alpaca's stop marks
    plain = eval_settings(EVAL)  # no tokenizer: alpaca
    assert plain == eval_settings(EVAL, tokenizer=build_tokenizer()) == eval_settings(EVAL, tokenizer=tok, prompt_format="alpaca")


def test_eval_loglik_scores_the_letter_after_the_chat_prompt(chat_lm_path):
    from _tiny_lm import load_tiny_lm

    model, tok = load_tiny_lm(chat_lm_path)
    res = evaluate(model, tok, EVAL[:1], mc_scoring="loglik")
    assert res.settings["prompt_format"] == "chat" and set(res.predictions[0]["logliks"]) == {"A", "B"}


# ------------------------------------------------------------------------------------------ command line


def run_cli(capsys, *argv):
    from selfmoe.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["generate", "eval", "train-expert", "train-router", "specialize"])
def test_every_command_offers_prompt_format(command, capsys):
    from selfmoe.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert "--prompt-format" in out and "{auto,chat,alpaca}" in out


def test_cli_generate_in_chat_format(chat_lm_path, lm_path, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, "generate", "--model", chat_lm_path, "--prompt", "What is 2 + 3?",
                           "--max-new-tokens", "4", "--output", out)
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 1
    code, _, err = run_cli(capsys, "generate", "--model", lm_path, "--prompt", "Hi", "--prompt-format", "chat",
                           "--max-new-tokens", "2")
    assert code == 2 and "--prompt-format" in err and "chat template" in err


def test_cli_eval_records_the_format_and_refuses_to_mix(chat_lm_path, tmp_path, capsys):
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps(EVAL[0]) + "\n")
    out = tmp_path / "eval"
    code, _, err = run_cli(capsys, "eval", "--model", chat_lm_path, "--data", data, "--output", out,
                           "--max-new-tokens", "2", "--no-progress")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["settings"]["prompt_format"] == "chat"
    code, _, err = run_cli(capsys, "eval", "--model", chat_lm_path, "--data", data, "--output", out,
                           "--max-new-tokens", "2", "--no-progress", "--prompt-format", "alpaca")
    assert code == 2 and "prompt_format" in err


# ------------------------------------------------------------------------------------------ specialization

SEEDS = [{"instruction": f"Seed question number {w}?", "input": "", "output": f"Seed answer {w}.", "domain": "math"}
         for w in ("one", "two", "three")]


def test_chat_response_prompt_has_the_system_message_and_few_shot_turns():
    from selfmoe.prompts import build_response_prompt, get_template

    tok = chat_tokenizer()
    t = get_template("math")
    text = build_response_prompt(t, SEEDS[:2], "  What is 7 * 6?  ", fmt="chat", tokenizer=tok)
    msgs = [{"role": "system", "content": t.system.strip()}]
    for s in SEEDS[:2]:
        msgs += [{"role": "user", "content": s["instruction"]}, {"role": "assistant", "content": s["output"]}]
    msgs.append({"role": "user", "content": "What is 7 * 6?"})
    assert text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n" + t.system.strip() + "<|im_end|>")
    assert text.endswith("<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n<|im_start|>assistant\n")
    assert "### " not in text
    # alpaca (the default) is the few-shot continuation text as before
    assert build_response_prompt(t, SEEDS[:2], "What is 7 * 6?").endswith("### Instruction:\nWhat is 7 * 6?\n\n### Response:\n")
    assert build_response_prompt(t, SEEDS[:2], "What is 7 * 6?", fmt="alpaca", tokenizer=tok) == build_response_prompt(
        t, SEEDS[:2], "What is 7 * 6?")


def test_a_template_without_system_role_gets_the_system_prompt_in_the_first_user_message():
    from selfmoe.prompts import build_response_prompt, get_template

    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                 + CHATML)
    tok = chat_tokenizer(no_system)
    t = get_template("math")
    text = build_response_prompt(t, SEEDS[:1], "What is 7 * 6?", fmt="chat", tokenizer=tok)
    assert text.startswith("<|im_start|>user\n" + t.system.strip() + "\n\n" + SEEDS[0]["instruction"] + "<|im_end|>")
    assert "<|im_start|>system" not in text


def test_chat_brainstorm_prompt_lists_the_seeds_and_asks_for_one_instruction():
    from selfmoe.prompts import BRAINSTORM_REQUEST, build_brainstorm_prompt, get_template

    tok = chat_tokenizer()
    t = get_template("math")
    text = build_brainstorm_prompt(t, SEEDS, fmt="chat", tokenizer=tok)
    content = t.brainstorm.strip() + "\n\n" + "\n\n".join(f"{i}. {s['instruction']}" for i, s in enumerate(SEEDS, 1))
    content += "\n\n" + BRAINSTORM_REQUEST
    assert text == tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert build_brainstorm_prompt(t, SEEDS).endswith("### Instruction:\n")  # alpaca unchanged


def test_parse_completion_in_both_formats():
    from selfmoe.specialization import parse_completion

    assert parse_completion("4. Compute the area of a circle.", fmt="chat", kind="instruction") == "Compute the area of a circle."
    assert parse_completion("New instruction: Find x if 2x = 8.\n### Response: x", fmt="chat", kind="instruction") == "Find x if 2x = 8."
    assert parse_completion("### Instruction: Sort a list.", fmt="chat", kind="instruction") == "Sort a list."
    assert parse_completion("1. First add.\n2. Then divide.", fmt="chat") == "1. First add.\n2. Then divide."  # responses keep lists
    assert parse_completion("Add them.\n\n### Instruction:\nMore") == "Add them."
    assert parse_completion("4. Compute it.") == "4. Compute it."  # alpaca: as before


def test_specialize_in_chat_format_end_to_end(tmp_path):
    from selfmoe.prompts import BRAINSTORM_REQUEST
    from selfmoe.specialization import specialize_domain

    questions = iter(["3. Compute the perimeter of a square with side five.",
                      "Instruction: How many minutes are in three hours and a half?",
                      "Find the smallest prime number larger than forty.",
                      "- Divide one hundred apples among seven children fairly."] * 5)

    class Scripted:
        def __init__(self):
            self.prompts = []

        def generate(self, prompts, config, *, desc=None):
            self.prompts += prompts
            return [Completion(next(questions) if BRAINSTORM_REQUEST in p else "The result is 20.", "stop") for p in prompts]

    tok, gen = chat_tokenizer(), Scripted()
    out = tmp_path / "math.jsonl"
    stats = specialize_domain(None, tok, SEEDS, "math", out, num_pairs=3, generator=gen, brainstorm_shots=2,
                              response_shots=2, prompts_per_round=4, progress=False)
    assert stats["config"]["prompt_format"] == "chat" and stats["kept"] >= 3
    assert all(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for p in gen.prompts)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in recs[:3]] == ["Compute the perimeter of a square with side five.",
                                                    "How many minutes are in three hours and a half?",
                                                    "Find the smallest prime number larger than forty."]
    assert all(r["output"] == "The result is 20." for r in recs)
    resp = [p for p in gen.prompts if BRAINSTORM_REQUEST not in p]
    assert resp and all(p.startswith("<|im_start|>system\n") and p.count("<|im_start|>assistant\n") == 3 for p in resp)
    assert resp[0].endswith("<|im_start|>user\nCompute the perimeter of a square with side five.<|im_end|>\n"
                            "<|im_start|>assistant\n")
