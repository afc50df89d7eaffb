"""Evaluation: the scorers on hand-written responses, code run in a subprocess (pass / fail / timeout /
early exit), ``evaluate`` end to end with a scripted generator, and ``selfmoe eval`` on the tiny model."""
from __future__ import annotations

import json
import time

import pytest
import torch

from selfmoe.data import DataFormatError
from selfmoe.evaluation import (
    EvalExample,
    build_program,
    evaluate,
    extract_choice,
    extract_code,
    extract_final_answer,
    extract_number,
    load_eval_records,
    normalize_answer,
    run_program,
    score,
    validate_eval_record,
    write_results,
)
from selfmoe.generate import Completion

# Tiny shapes run fastest on one thread (conftest restores the setting after the module).
pytestmark = pytest.mark.usefixtures("one_thread")


MC_Q = "Which planet is known as the red planet? (A) Venus (B) Mars (C) Jupiter (D) Saturn"
ADD_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


# ------------------------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("response,expected", [
    ("The answer is (B).", "B"),
    ("The answer is B", "B"),
    ("Answer: C", "C"),
    ("answer is option D.", "D"),
    ("(A) is wrong because Venus is yellow. So the answer is (B).", "B"),  # "answer is" beats earlier (X)
    ("The answer is (B). Not (C), which is Jupiter.", "B"),  # ... even when an (X) follows it
    ("Venus (A) or Mars (B)? It is (B)", "B"),  # no "answer is": the last (X)
    ("B", "B"),
    ("B.", "B"),
    ("(D)", "D"),
    ("The answer is Alice.", None),  # a word, not a letter
    ("The answer is (E).", None),  # not one of the options
    ("I am not sure, maybe A or B", None),  # ambiguous: no pattern at all
    ("", None),
])
def test_extract_choice(response, expected):
    assert extract_choice(response, MC_Q) == expected


def test_multiple_choice_score_and_gold_formats():
    for gold in ("B", "b", "(B)", " B "):
        ex = validate_eval_record({"task": "multiple_choice", "instruction": MC_Q, "answer": gold})
        assert ex.answer == "B"
        assert score(ex, "So the answer is (B).")["correct"]
        assert not score(ex, "So the answer is (C).")["correct"]
        assert not score(ex, "no idea")["correct"]


@pytest.mark.parametrize("response,expected", [
    ("Let's think. The first is true.\nSo the answer is True.", "True."),
    ("So the answer is: No.\nI hope that helps.", "No."),  # cut at the end of that line
    ("the answer is 3. Wait, the answer is (C).", "(C)."),  # the last "answer is"
    ("Some reasoning\n\n  valid  \n", "valid"),  # no "answer is": the last non-empty line
    ("", ""),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_exact_match_normalisation():
    assert normalize_answer('  "True."  ') == "true"
    assert normalize_answer("**Not  Plausible**.") == "not plausible"
    assert normalize_answer("(A)") == "(a)"
    ex = validate_eval_record({"task": "exact_match", "instruction": "q", "answer": "not plausible"})
    assert score(ex, "Thinking...\nSo the answer is Not   Plausible.")["correct"]
    assert score(ex, "not plausible")["correct"]
    assert not score(ex, "So the answer is plausible.")["correct"]
    assert not score(ex, "So the answer is not plausible at all.")["correct"]


@pytest.mark.parametrize("text,expected", [
    ("He pays $1,234.50 in total.", 1234.5),
    ("so 12 + 30 = 42.", 42.0),
    ("The temperature is -5 degrees", -5.0),
    ("a loss of -$3", -3.0),
    ("$-3", -3.0),
    ("pages 3-4", 4.0),  # a range dash, not a minus sign
    ("It takes 0.5 hours or .25 days", 0.25),
    ("1,000,000 people", 1_000_000.0),
    ("#### 72", 72.0),
    ("5kg of flour", 5.0),
    ("no numbers here", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numeric_score():
    ex = validate_eval_record({"task": "numeric", "instruction": "q", "answer": "1,000"})
    assert ex.answer == 1000.0
    assert score(ex, "The answer is $1,000.")["correct"]
    assert score(ex, "1000.00")["correct"]
    assert not score(ex, "It is 1000, plus 1 = 1001")["correct"]  # the last number counts
    assert not score(ex, "I cannot tell")["correct"]
    assert validate_eval_record({"task": "numeric", "instruction": "q", "answer": -7}).answer == -7.0
    assert validate_eval_record({"task": "numeric", "instruction": "q", "answer": "Janet... #### 18"}).answer == 18.0


# ---------------------------------------------------------------------------------------------- code


def run_code(response, *, prompt=ADD_PROMPT, tests=ADD_TESTS, timeout=5.0):
    return run_program(build_program(prompt, response, tests, "add"), timeout=timeout)


def test_code_passes_full_function_fenced_and_body_only():
    assert run_code("```python\ndef add(a, b):\n    return a + b\n```\nThis adds.").passed
    assert run_code("def add(a, b):\n    return a + b").passed
    assert run_code("    return a + b").passed  # body continuing the instruction's signature
    assert run_code("```python\ndef add(a, b):\n    return a + b").passed  # fence cut by the token limit
    # imports of the instruction stay available to a full redefinition
    prompt = "from typing import List\n\n\ndef add(a: List[int], b):\n    \"\"\"Sum.\"\"\"\n"
    assert run_code("def add(a: List[int], b):\n    return a + b", prompt=prompt).passed
    # HumanEval-style check(candidate) is called with the entry point
    assert run_code("def add(a, b):\n    return a + b", tests="def check(candidate):\n    assert candidate(2, 2) == 4\n").passed
    # prose instructions are not prepended to a full function
    assert run_code("def add(a, b):\n    return a + b", prompt="Write add(a, b) that returns the sum.").passed


@pytest.mark.parametrize("response,status", [
    ("def add(a, b):\n    return a - b", "failed"),  # wrong
    ("def add(a, b):\n    raise ValueError('no')", "failed"),  # raises
    ("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", "failed"),  # exits 0 before the tests
    ("def add(a, b):\n    import sys; sys.exit(0)", "failed"),  # exits 0 from inside the tests
    ("def add(a, b):\n    import os; os._exit(0)", "failed"),
    ("def add(a, b)\n    return a + b", "failed"),  # syntax error
    ("def add(a, b):\n    while True:\n        pass", "timeout"),
    ("def other(a, b):\n    return a + b", "failed"),  # no add defined: the instruction's stub returns None
])
def test_code_failures(response, status):
    t = time.time()
    res = run_code(response, timeout=1.0)
    assert not res.passed and res.status == status, res
    assert time.time() - t < 4


def test_check_without_entry_point_call_fails_when_check_fails():
    res = run_code("def add(a, b):\n    return 0", tests="def check(candidate):\n    assert candidate(2, 2) == 4\n")
    assert not res.passed and "AssertionError" in res.detail


def test_extract_code_prefers_the_block_defining_the_entry_point():
    resp = "Example:\n```\nprint(1)\n```\nSolution:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(resp, "add").startswith("def add")
    assert extract_code("no fences", "add") == "no fences"


# ----------------------------------------------------------------------------------------- records


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("line,message", [
    ('{"instruction": "q", "answer": "B"}', "missing required key 'task'"),
    ('{"task": "essay", "instruction": "q", "answer": "B"}', "'task' must be one of"),
    ('{"task": "multiple_choice", "instruction": "q", "answer": "BC"}', "one option letter"),
    ('{"task": "multiple_choice", "instruction": "  ", "answer": "B"}', "'instruction' is empty"),
    ('{"task": "numeric", "instruction": "q", "answer": "many"}', "holds no finite number"),
    ('{"task": "numeric", "instruction": "q", "answer": true}', "must be a number"),
    ('{"task": "exact_match", "instruction": "q"}', "missing required key 'answer'"),
    ('{"task": "code", "instruction": "def f():", "entry_point": "f"}', "missing required key 'tests'"),
    ('{"task": "code", "instruction": "def f():", "tests": "assert f()", "entry_point": "f x"}', "identifier"),
    ('{"task": "code", "instruction": "q", "tests": "assert f()", "entry_point": "f", "input": 3}', "'input' must be a string"),
    ('[1, 2]', "expected a JSON object"),
    ('{"task": "numeric", ', "invalid JSON"),
])
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    good = '{"task": "numeric", "instruction": "1+1?", "answer": "2"}'
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(DataFormatError) as info:
        load_eval_records(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_task_per_file(tmp_path):
    path = write_lines(tmp_path / "gsm.jsonl", ['{"instruction": "1+1?", "answer": "2"}',
                                                '{"task": "numeric", "instruction": "2+2?", "answer": 4, "id": "q2"}'])
    recs = load_eval_records(path, task="numeric")
    assert [r.task for r in recs] == ["numeric", "numeric"] and recs[1].id == "q2"
    assert recs[0].source == f"{path}:1"
    with pytest.raises(DataFormatError, match=r":2: record has task 'numeric' but 'exact_match'"):
        load_eval_records(path, task="exact_match")
    with pytest.raises(DataFormatError, match="no records"):
        load_eval_records(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError):
        load_eval_records(tmp_path / "missing.jsonl")


# -------------------------------------------------------------------------------------- end to end


class ScriptedGenerator:
    """Answers each prompt with the response scripted for the instruction it contains."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompts, config, *, desc=None):
        self.calls.append((list(prompts), config))
        out = []
        for p in prompts:
            hits = [r for key, r in self.script.items() if f"### Instruction:\n{key}" in p]
            assert len(hits) == 1, p
            out.append(Completion(hits[0], "stop"))
        return out


RECORDS = [
    {"task": "multiple_choice", "instruction": MC_Q, "answer": "B", "id": "mc1"},
    {"task": "multiple_choice", "instruction": "Pick one. (A) x (B) y", "answer": "A"},
    {"task": "multiple_choice", "instruction": "Pick two. (A) x (B) y", "answer": "A"},
    {"task": "exact_match", "instruction": "Is it sunny?", "answer": "Yes"},
    {"task": "exact_match", "instruction": "Is it raining?", "answer": "No"},
    {"task": "numeric", "instruction": "What is 12 + 30?", "answer": "42"},
    {"task": "numeric", "instruction": "What is 2 - 3?", "answer": "-1"},
    {"task": "numeric", "instruction": "What is 10 * 10?", "answer": "100"},
    {"task": "numeric", "instruction": "What is 1000 + 234?", "answer": "1,234"},
    {"task": "code", "instruction": ADD_PROMPT, "tests": ADD_TESTS, "entry_point": "add"},
    {"task": "code", "instruction": 'def sub(a, b):\n    """a - b"""\n', "tests": "assert sub(3, 1) == 2", "entry_point": "sub"},
]
SCRIPT = {
    MC_Q: "Mars is red, so the answer is (B).",
    "Pick one.": "(B)",
    "Pick two.": "The answer is A.",
    "Is it sunny?": "Looking outside.\nSo the answer is yes.",
    "Is it raining?": "So the answer is yes.",
    "What is 12 + 30?": "12 + 30 = 42",
    "What is 2 - 3?": "2 - 3 = -1.",
    "What is 10 * 10?": "10 * 10 = 100, then add 1: 101",
    "What is 1000 + 234?": "The answer is $1,234.",
    "def add(a, b)": "```python\ndef add(a, b):\n    return a + b\n```",
    "def sub(a, b)": "    import sys\n    sys.exit(0)",
}


def test_evaluate_end_to_end_with_a_scripted_generator(tmp_path):
    gen = ScriptedGenerator(SCRIPT)
    result = evaluate(None, None, RECORDS, generator=gen, max_new_tokens=17, code_timeout=5, allow_code_execution=True)
    assert result.tasks == {
        "multiple_choice": {"n": 3, "correct": 2, "accuracy": 2 / 3},
        "exact_match": {"n": 2, "correct": 1, "accuracy": 0.5},
        "numeric": {"n": 4, "correct": 3, "accuracy": 0.75},
        "code": {"n": 2, "correct": 1, "accuracy": 0.5},
    }
    assert (result.n, result.correct) == (11, 7)
    assert result.macro_accuracy == pytest.approx((2 / 3 + 0.5 + 0.75 + 0.5) / 4)
    # the tasks' prompts chained into one generate call (chunks cross tasks; 11 < the default chunk of 32),
    # greedy, Alpaca prompts, the template's stop marks
    assert len(gen.calls) == 1 and len(gen.calls[0][0]) == 11
    for prompts, config in gen.calls:
        assert not config.do_sample and config.max_new_tokens == 17 and "### Instruction" in config.stop
        assert all(p.startswith("Below is an instruction") and p.endswith("### Response:\n") for p in prompts)
    preds = result.predictions
    assert [p["index"] for p in preds] == list(range(11))
    assert preds[0]["id"] == "mc1" and preds[0]["prediction"] == "B" and preds[0]["correct"] is True
    assert preds[1]["prediction"] == "B" and preds[1]["correct"] is False
    assert preds[7]["prediction"] == 101.0
    assert preds[9]["status"] == "passed" and preds[10]["status"] == "failed"
    assert preds[10]["answer"] is None and "sys.exit" in preds[10]["prediction"]

    paths = write_results(result, tmp_path / "out", extra={"model": "m"})
    rows = [json.loads(x) for x in paths["predictions"].read_text().splitlines()]
    assert [r["correct"] for r in rows] == [r["correct"] for r in preds]
    summary = json.loads(paths["summary"].read_text())
    assert summary["model"] == "m" and summary["overall"]["correct"] == 7
    assert summary["tasks"]["numeric"]["accuracy"] == 0.75 and summary["sampling"]["do_sample"] is False
    assert "routing" not in summary
    assert "macro avg" in result.table()


def test_evaluate_argument_errors():
    gen = ScriptedGenerator(SCRIPT)
    with pytest.raises(ValueError, match="no examples"):
        evaluate(None, None, [], generator=gen)
    with pytest.raises(DataFormatError, match="record 1: missing required key 'task'"):
        evaluate(None, None, [RECORDS[0], {"instruction": "q", "answer": "1"}], generator=gen)
    with pytest.raises(ValueError, match="need a MiXSE"):
        evaluate(torch.nn.Linear(2, 2), None, RECORDS[:1], generator=gen, routing_stats=True)
    assert isinstance(validate_eval_record(RECORDS[0]), EvalExample)


# --------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *argv):
    from selfmoe.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_writes_predictions_and_summary(lm_path, tmp_path, capsys):
    mc = write_lines(tmp_path / "mc.jsonl", [json.dumps(r) for r in RECORDS[:3]])
    num = write_lines(tmp_path / "gsm.jsonl", [json.dumps({k: v for k, v in r.items() if k != "task"}) for r in RECORDS[5:7]])
    code_file = write_lines(tmp_path / "code.jsonl", [json.dumps(RECORDS[9])])
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "eval", "--model", lm_path, "--data", mc, "--data", f"numeric={num}",
                                "--data", code_file, "--output", out, "--max-new-tokens", "4", "--batch-size", "2",
                                "--no-progress", "--code-timeout", "5", "--allow-code-execution")
    assert code == 0, err
    assert stdout.splitlines()[0].split() == ["task", "n", "correct", "accuracy"]
    assert "multiple_choice" in stdout and "numeric" in stdout and "overall" in stdout
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["multiple_choice"] * 3 + ["numeric"] * 2 + ["code"]
    assert rows[3]["source"] == f"{num}:1" and rows[0]["id"] == "mc1"
    for r in rows:
        assert {"index", "source", "task", "instruction", "response", "prediction", "correct", "finish_reason"} <= set(r)
        assert isinstance(r["correct"], bool)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"multiple_choice", "numeric", "code"}
    assert summary["overall"]["n"] == 6 and summary["sampling"]["max_new_tokens"] == 4
    assert summary["model"] == str(lm_path) and summary["mixse"] is None
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary files left behind


def test_cli_eval_bad_input_exits_2(lm_path, tmp_path, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", ['{"task": "numeric", "instruction": "q", "answer": "1"}',
                                               '{"task": "numeric", "instruction": "q"}'])
    code, _, err = run_cli(capsys, "eval", "--model", lm_path, "--data", bad, "--output", tmp_path / "o")
    assert code == 2 and f"{bad}:2: missing required key 'answer'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "eval", "--model", lm_path, "--data", tmp_path / "nope.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "file not found" in err
    code, _, err = run_cli(capsys, "eval", "--model", lm_path, "--data", f"maths={bad}", "--output", tmp_path / "o")
    assert code == 2 and "unknown task kind 'maths'" in err
    code, _, err = run_cli(capsys, "eval", "--model", lm_path, "--data", bad, "--output", tmp_path / "o", "--routing-stats")
    assert code == 2 and "--routing-stats needs --mixse" in err
    code, _, err = run_cli(capsys, "eval", "--model", lm_path, "--data", bad, "--output", tmp_path / "o", "--max-new-tokens", "0")
    assert code == 2 and "max_new_tokens" in err
    assert not (tmp_path / "o").exists()


def test_cli_eval_mixse_routing_stats(lm_path, tmp_path, capsys):
    from selfmoe import MiXSE
    from selfmoe.adapters import save_lora_adapter

    from _tiny_lm import load_tiny_lm

    base, _ = load_tiny_lm(lm_path)
    g = torch.Generator().manual_seed(0)
    experts = {}
    for name in ("a", "b"):
        weights = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(2, 64, generator=g) * 0.1,
                                                           torch.randn(64, 2, generator=g) * 0.1) for i in range(2)}
        save_lora_adapter(tmp_path / name, weights, r=2, lora_alpha=4)
        experts[name] = tmp_path / name
    MiXSE.from_adapters(base, experts).save_pretrained(tmp_path / "mixse")
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(RECORDS[0]), json.dumps(RECORDS[5])])
    code, _, err = run_cli(capsys, "eval", "--model", lm_path, "--mixse", tmp_path / "mixse", "--data", data,
                           "--output", tmp_path / "out", "--max-new-tokens", "3", "--routing-stats", "--no-progress")
    assert code == 0, err
    routing = json.loads((tmp_path / "out" / "summary.json").read_text())["routing"]
    assert set(routing) == {"multiple_choice", "numeric"}
    for per_layer in routing.values():
        assert list(per_layer) == ["model.layers.0", "model.layers.1"]
        for entry in per_layer.values():
            assert entry["tokens"] > 0 and set(entry["usage"]) == {"a", "b"}
            assert sum(entry["usage"].values()) == pytest.approx(1.0)


def test_cli_eval_help_has_examples(capsys):
    from selfmoe.cli import main

    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "examples:" in out and "\n  selfmoe eval --" in out and "multiple_choice" in out


# ------------------------------------------------------------------------------------ code opt-in


CODE_RECORDS = [r for r in RECORDS if r["task"] == "code"]


def test_code_records_are_refused_without_opt_in_before_generation(monkeypatch):
    from selfmoe.evaluation import CodeExecutionNotAllowed

    monkeypatch.delenv("SELFMOE_ALLOW_CODE_EVAL", raising=False)
    gen = ScriptedGenerator(SCRIPT)
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_execution=True") as info:
        evaluate(None, None, RECORDS, generator=gen)
    assert isinstance(info.value, PermissionError) and "SELFMOE_ALLOW_CODE_EVAL=1" in str(info.value)
    assert gen.calls == []  # refused before anything was generated
    # no code records: nothing to allow
    assert evaluate(None, None, RECORDS[:3], generator=gen).n == 3
    # the environment variable allows it; an explicit False wins over it
    monkeypatch.setenv("SELFMOE_ALLOW_CODE_EVAL", "1")
    result = evaluate(None, None, CODE_RECORDS, generator=ScriptedGenerator(SCRIPT), code_timeout=5)
    assert [p["status"] for p in result.predictions] == ["passed", "failed"]
    assert result.summary()["sandbox"]["limits"]["timeout"] == 5
    with pytest.raises(CodeExecutionNotAllowed):
        evaluate(None, None, CODE_RECORDS, generator=ScriptedGenerator(SCRIPT), allow_code_execution=False)


def test_a_forged_pass_fails_end_to_end():
    # The wrong function reads the program's own source (and anything else) and prints it before
    # os._exit(0): nothing it can read makes it pass.
    forged = ("```python\nimport os, sys\ndef add(a, b):\n    return a - b\n"
              "print(open(__file__).read(), sys.argv, dict(os.environ), flush=True)\nos._exit(0)\n```")
    result = evaluate(None, None, CODE_RECORDS[:1], generator=ScriptedGenerator({"def add(a, b)": forged}),
                      allow_code_execution=True, code_timeout=5)
    assert result.predictions[0]["status"] == "failed" and result.predictions[0]["correct"] is False


def test_cli_eval_refuses_code_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SELFMOE_ALLOW_CODE_EVAL", raising=False)
    data = write_lines(tmp_path / "code.jsonl", [json.dumps(r) for r in CODE_RECORDS])
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "no-such-model", "--data", data,
                           "--output", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert "2 code example(s)" in err and "--allow-code-execution" in err and "SELFMOE_ALLOW_CODE_EVAL=1" in err
    assert "--model" not in err  # refused before the model was looked at
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_eval_checks_the_output_dir_before_loading_the_model(tmp_path, capsys):
    data = write_lines(tmp_path / "num.jsonl", [json.dumps(RECORDS[5])])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path / "no-such-model", "--data", data,
                           "--output", blocker / "out")
    assert code == 2 and f"--output {blocker / 'out'}: cannot write there" in err and "--model" not in err


# ------------------------------------------------------------------------------------------ resume


class CountingGenerator(ScriptedGenerator):
    """A ScriptedGenerator that raises KeyboardInterrupt once ``stop_after`` prompts were answered."""

    def __init__(self, script, stop_after=None):
        super().__init__(script)
        self.stop_after = stop_after
        self.prompts = []

    def generate(self, prompts, config, *, desc=None):
        if self.stop_after is not None and len(self.prompts) + len(prompts) > self.stop_after:
            raise KeyboardInterrupt
        self.prompts.extend(prompts)
        return super().generate(prompts, config, desc=desc)


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path):
    partial = tmp_path / "out" / "predictions.partial.jsonl"
    kwargs = dict(max_new_tokens=17, code_timeout=5, allow_code_execution=True, chunk_size=2,
                  run_info={"model": "m"})
    reference = evaluate(None, None, RECORDS, generator=CountingGenerator(SCRIPT), **kwargs)

    first = CountingGenerator(SCRIPT, stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        evaluate(None, None, RECORDS, generator=first, partial_path=partial, **kwargs)
    saved = [json.loads(x) for x in partial.read_text().splitlines()]
    # header + one line per task of each finished call; calls of 2 prompts cut across tasks: (mc, mc),
    # (mc, exact match), then the third call was interrupted
    assert saved[0]["selfmoe_eval_partial"] == 1 and [len(r["completions"]) for r in saved[1:]] == [2, 1, 1]
    assert [r["task"] for r in saved[1:]] == ["multiple_choice", "multiple_choice", "exact_match"]
    assert len(first.prompts) == 4

    from selfmoe.evaluation import check_partial

    assert check_partial(partial, RECORDS, max_new_tokens=17, run_info={"model": "m"}) == 4
    second = CountingGenerator(SCRIPT)
    resumed = evaluate(None, None, RECORDS, generator=second, partial_path=partial, **kwargs)
    assert len(second.prompts) == len(RECORDS) - 4 and not set(second.prompts) & set(first.prompts)
    assert resumed.resumed == 4
    assert resumed.predictions == reference.predictions and resumed.summary() == reference.summary()

    # a third run with the same settings generates nothing at all
    third = CountingGenerator(SCRIPT)
    assert evaluate(None, None, RECORDS, generator=third, partial_path=partial, **kwargs).predictions == reference.predictions
    assert third.prompts == []


def test_a_partial_file_from_other_settings_is_refused_unless_restart(tmp_path):
    from selfmoe.evaluation import PartialMismatchError, check_partial

    partial = tmp_path / "p.jsonl"
    records = RECORDS[:9]
    evaluate(None, None, records, generator=ScriptedGenerator(SCRIPT), partial_path=partial, max_new_tokens=17)
    with pytest.raises(PartialMismatchError, match=r"sampling\.max_new_tokens \(17, now 18\).*restart=True"):
        evaluate(None, None, records, generator=ScriptedGenerator(SCRIPT), partial_path=partial, max_new_tokens=18)
    with pytest.raises(PartialMismatchError, match=r"records"):
        check_partial(partial, records[::-1], max_new_tokens=17)
    with pytest.raises(PartialMismatchError, match=r"run\.model \(null, now \"m\"\)"):
        check_partial(partial, records, max_new_tokens=17, run_info={"model": "m"})
    gen = CountingGenerator(SCRIPT)
    result = evaluate(None, None, records, generator=gen, partial_path=partial, max_new_tokens=18, restart=True)
    assert len(gen.prompts) == 9 and result.resumed == 0
    assert check_partial(partial, records, max_new_tokens=18) == 9
    # a torn last line (a crash mid-write) is dropped, and its examples are generated again
    with open(partial, "a") as f:
        f.write('{"task": "numeric", "compl')
    gen = CountingGenerator(SCRIPT)
    evaluate(None, None, records, generator=gen, partial_path=partial, max_new_tokens=18)
    assert gen.prompts == []


def test_routing_summaries_of_chunks_merge_to_token_weighted_means():
    from selfmoe.evaluation import _merge_routing

    a = {"l0": {"tokens": 3, "usage": {"x": 1.0, "y": 0.0}, "mean_gate": {"x": 0.9, "y": 0.0}}}
    b = {"l0": {"tokens": 1, "usage": {"x": 0.0, "y": 1.0}, "mean_gate": {"x": 0.0, "y": 0.5}}}
    merged = _merge_routing([(5, b), (0, a)])
    assert merged["l0"]["tokens"] == 4
    assert merged["l0"]["usage"] == pytest.approx({"x": 0.75, "y": 0.25})
    assert merged["l0"]["mean_gate"] == pytest.approx({"x": 0.675, "y": 0.125})
    assert _merge_routing([(0, a)]) == a


def test_cli_eval_resumes_after_an_interrupt(lm_path, tmp_path, capsys, monkeypatch):
    from selfmoe.generate import HFGenerator

    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS[:9]])
    args = ["eval", "--model", lm_path, "--data", data, "--max-new-tokens", "3", "--batch-size", "1", "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "ref")
    assert code == 0, err
    reference = (tmp_path / "ref" / "predictions.jsonl").read_text()
    assert not (tmp_path / "ref" / "predictions.partial.jsonl").exists()

    real = HFGenerator.generate
    calls = []

    def flaky(self, prompts, config, *, desc=None):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, config, desc=desc)

    monkeypatch.setattr(HFGenerator, "generate", flaky)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *args, "--output", out)
    assert code == 130 and "rerun the same command to continue" in err
    assert (out / "predictions.partial.jsonl").is_file() and not (out / "predictions.jsonl").exists()
    monkeypatch.setattr(HFGenerator, "generate", real)
    code, _, err = run_cli(capsys, *args, "--output", out, "--max-new-tokens", "4")
    assert code == 2 and "sampling.max_new_tokens (3, now 4)" in err and "--restart" in err
    code, _, err = run_cli(capsys, *args, "--output", out)
    assert code == 0 and "resuming: 4 of 9 completions" in err, err  # the first call (4 prompts) was saved
    assert (out / "predictions.jsonl").read_text() == reference
    assert not (out / "predictions.partial.jsonl").exists()


# ---------------------------------------------------------------------- multiple choice by log-likelihood


MC_RECORDS = [
    {"task": "multiple_choice", "instruction": MC_Q, "answer": "B"},
    {"task": "multiple_choice", "instruction": "Pick one. (A) x (B) y", "answer": "A"},
    {"task": "multiple_choice", "instruction": "Tom has 3 apples and buys 5 more. How many? (A) 8 (B) 2 (C) 15",
     "answer": "C", "input": "Count them."},
]


def tiny_model_and_tokenizer():
    from _tiny_lm import build_model, build_tokenizer

    tok = build_tokenizer()
    return build_model(len(tok), seed=3), tok


MERGED = []  # continuations reference_logliks had to encode on their own


def reference_logliks(model, tok, prompt, continuations):
    """Summed log-probabilities by hand: a float64 copy, one unpadded forward per continuation."""
    import copy

    from selfmoe.data import encode_prompt

    m64 = copy.deepcopy(model).double().eval()
    p_ids = encode_prompt(tok, prompt)
    out = {}
    for c in continuations:
        full = encode_prompt(tok, prompt + c)
        if full[:len(p_ids)] == p_ids and len(full) > len(p_ids):
            c_ids = full[len(p_ids):]
        else:  # the tokenizer merges across the boundary: the continuation encoded on its own
            MERGED.append(c)
            c_ids = tok(c, add_special_tokens=False)["input_ids"]
            full = p_ids + c_ids
        with torch.no_grad():
            logits = m64(torch.tensor([full])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        out[c] = sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(c_ids))
    return out


def test_loglik_scoring_matches_a_hand_computed_float64_forward():
    from selfmoe.evaluation import option_letters

    model, tok = tiny_model_and_tokenizer()
    result = evaluate(model, tok, MC_RECORDS, mc_scoring="loglik", batch_size=2)  # rows of unequal length: padding
    assert result.summary()["mc_scoring"] == "loglik"
    for rec, pred in zip(MC_RECORDS, result.predictions):
        ex = validate_eval_record(rec)
        expected = reference_logliks(model, tok, ex.prompt, list(option_letters(ex.instruction)))
        assert list(pred["logliks"]) == sorted(expected)
        assert pred["logliks"] == pytest.approx(expected, abs=2e-4)
        best = max(expected, key=expected.get)
        assert pred["prediction"] == best and pred["correct"] == (best == ex.answer)
        assert pred["scoring"] == "loglik" and pred["response"] is None
    assert result.tasks["multiple_choice"]["correct"] == sum(p["correct"] for p in result.predictions)


def test_loglik_scorer_in_float64_and_multi_token_continuations():
    from selfmoe.evaluation import LoglikScorer

    model, tok = tiny_model_and_tokenizer()
    model = model.double()
    prompts = [validate_eval_record(r).prompt for r in MC_RECORDS]
    conts = [["Mars", "Venus planet", "A"], ["x", "y"], ["The answer is (C).", "8"]]
    got = LoglikScorer(model, tok, batch_size=3).score(prompts, conts)
    MERGED.clear()
    for prompt, cs, scores in zip(prompts, conts, got):
        assert scores == pytest.approx(reference_logliks(model, tok, prompt, cs), abs=1e-9, rel=1e-9)
    assert "The answer is (C)." in MERGED  # "\nThe" is one token here: the boundary fallback is covered too
    # batch size does not change the numbers (beyond rounding)
    again = LoglikScorer(model, tok, batch_size=1).score(prompts, conts)
    for a, b in zip(got, again):
        assert a == pytest.approx(b, abs=1e-9)


def test_loglik_picks_the_letter_the_lm_head_is_biased_to():
    from selfmoe.data import encode_prompt

    model, tok = tiny_model_and_tokenizer()
    prompt = validate_eval_record(MC_RECORDS[0]).prompt
    letter_c = encode_prompt(tok, prompt + "C")[-1]
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[letter_c] = 30.0
    model.lm_head = biased
    result = evaluate(model, tok, MC_RECORDS, mc_scoring="loglik")
    assert [p["prediction"] for p in result.predictions][0::2] == ["C", "C"]
    # "Pick one." has only (A) and (B): C is not an option there
    assert set(result.predictions[1]["logliks"]) == {"A", "B"}
    assert result.predictions[2]["correct"] and not result.predictions[0]["correct"]
    for p in (result.predictions[0], result.predictions[2]):
        assert p["logliks"]["C"] > -1e-3  # the bias makes C nearly certain


class ScriptedScorer:
    """Log-likelihoods from a script: {instruction start: {letter: value}}; counts the prompts scored."""

    def __init__(self, script, stop_after=None):
        self.script = script
        self.prompts = []
        self.stop_after = stop_after

    def score(self, prompts, continuations, *, desc=None):
        if self.stop_after is not None and len(self.prompts) + len(prompts) > self.stop_after:
            raise KeyboardInterrupt
        self.prompts.extend(prompts)
        out = []
        for p, letters in zip(prompts, continuations):
            hits = [v for key, v in self.script.items() if f"### Instruction:\n{key}" in p]
            assert len(hits) == 1, p
            out.append({c: hits[0][c] for c in letters})
        return out


LOGLIK_SCRIPT = {
    MC_Q: {"A": -3.0, "B": -1.0, "C": -2.0, "D": float("-inf")},
    "Pick one.": {"A": -0.5, "B": -0.5},  # a tie: the earlier letter
    "Pick two.": {"A": -4.0, "B": -0.1},
}


def test_loglik_evaluate_end_to_end_resumes_and_records_the_scoring(tmp_path):
    from selfmoe.evaluation import PartialMismatchError

    kwargs = dict(max_new_tokens=17, code_timeout=5, allow_code_execution=True, chunk_size=2, mc_scoring="loglik")
    gen = CountingGenerator(SCRIPT)
    reference = evaluate(None, None, RECORDS, generator=gen, scorer=ScriptedScorer(LOGLIK_SCRIPT), **kwargs)
    assert not any("Which planet" in p or "Pick" in p for p in gen.prompts)  # multiple choice is not generated
    preds = reference.predictions
    assert [p["prediction"] for p in preds[:3]] == ["B", "A", "B"] and [p["correct"] for p in preds[:3]] == [True, True, False]
    assert preds[0]["logliks"] == {"A": -3.0, "B": -1.0, "C": -2.0, "D": None}  # -inf: null in JSON
    assert reference.tasks["multiple_choice"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert reference.tasks["numeric"]["correct"] == 3  # the other tasks are generated as before
    paths = write_results(reference, tmp_path / "ref")
    summary = json.loads(paths["summary"].read_text())
    assert summary["mc_scoring"] == "loglik" and summary["settings"]["mc_scoring"] == "loglik"

    partial = tmp_path / "out" / "predictions.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(None, None, RECORDS, generator=CountingGenerator(SCRIPT),
                 scorer=ScriptedScorer(LOGLIK_SCRIPT, stop_after=2), partial_path=partial, **kwargs)
    saved = [json.loads(x) for x in partial.read_text().splitlines()]
    assert saved[1]["logliks"][0] == [0, {"A": -3.0, "B": -1.0, "C": -2.0, "D": None}]
    with pytest.raises(PartialMismatchError, match=r"mc_scoring \(\"loglik\", now \"generate\"\)"):
        evaluate(None, None, RECORDS, generator=CountingGenerator(SCRIPT), partial_path=partial,
                 **{**kwargs, "mc_scoring": "generate"})
    scorer = ScriptedScorer(LOGLIK_SCRIPT)
    resumed = evaluate(None, None, RECORDS, generator=CountingGenerator(SCRIPT), scorer=scorer, partial_path=partial, **kwargs)
    assert len(scorer.prompts) == 1 and resumed.resumed == 2
    assert resumed.predictions == reference.predictions and resumed.summary() == reference.summary()


def test_loglik_argument_errors():
    with pytest.raises(ValueError, match="mc_scoring must be one of"):
        evaluate(None, None, RECORDS[:1], generator=ScriptedGenerator(SCRIPT), mc_scoring="logprob")
    with pytest.raises(ValueError, match="needs a model"):
        evaluate(None, None, RECORDS[:1], generator=ScriptedGenerator(SCRIPT), mc_scoring="loglik")
    ex = validate_eval_record(RECORDS[0])
    from selfmoe.evaluation import score_options

    assert score_options(ex, {"A": -1.0, "B": -1.0}) == {"prediction": "A", "correct": False,
                                                         "logliks": {"A": -1.0, "B": -1.0}}


def test_cli_mc_scoring_choices_are_the_library_s():
    from selfmoe.cli import build_parser
    from selfmoe.evaluation import MC_SCORING

    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    action = next(a for a in eval_parser._actions if a.dest == "mc_scoring")
    assert tuple(action.choices) == MC_SCORING and action.default == "generate"


def make_mixse(lm_path, tmp_path):
    from selfmoe import MiXSE
    from selfmoe.adapters import save_lora_adapter

    from _tiny_lm import load_tiny_lm

    base, _ = load_tiny_lm(lm_path)
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        weights = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(2, 64, generator=g) * 0.1,
                                                           torch.randn(64, 2, generator=g) * 0.1) for i in range(2)}
        save_lora_adapter(tmp_path / name, weights, r=2, lora_alpha=4)
    MiXSE.from_adapters(base, {n: tmp_path / n for n in ("a", "b")}).save_pretrained(tmp_path / "mixse")
    return tmp_path / "mixse"


def test_cli_loglik_with_a_mixse_routing_summary_per_task_and_domain(lm_path, tmp_path, capsys):
    mixse = make_mixse(lm_path, tmp_path)
    recs = [dict(MC_RECORDS[0], domain="astronomy"), dict(MC_RECORDS[1], domain="letters"),
            dict(RECORDS[5], domain="arithmetic"), dict(MC_RECORDS[2], domain="arithmetic")]
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in recs])
    code, stdout, err = run_cli(capsys, "eval", "--model", lm_path, "--mixse", mixse, "--data", data,
                                "--output", tmp_path / "out", "--max-new-tokens", "3", "--routing-stats",
                                "--mc-scoring", "loglik", "--no-progress")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mc_scoring"] == "loglik"
    assert summary["domains"]["arithmetic"] == {"n": 2, "correct": summary["domains"]["arithmetic"]["correct"],
                                                "accuracy": summary["domains"]["arithmetic"]["accuracy"]}
    assert list(summary["sources"]) == [str(data)] and summary["sources"][str(data)]["n"] == 4
    # the per-layer numbers stay; the overview has one row per task / domain
    assert list(summary["routing"]) == ["multiple_choice", "numeric"]
    assert list(summary["routing"]["multiple_choice"]) == ["model.layers.0", "model.layers.1"]
    assert set(summary["routing_domains"]) == {"astronomy", "letters", "arithmetic"}
    overview = summary["routing_summary"]
    assert overview["experts"] == ["a", "b"] and set(overview["domains"]) == {"astronomy", "letters", "arithmetic"}
    for row in [overview["overall"], *overview["tasks"].values(), *overview["domains"].values()]:
        assert row["tokens"] > 0 and sum(row["shares"].values()) == pytest.approx(1.0)
    assert overview["overall"]["tokens"] == sum(r["tokens"] for r in overview["tasks"].values())
    assert overview["overall"]["tokens"] == sum(r["tokens"] for r in overview["domains"].values())
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r.get("scoring") for r in rows] == ["loglik", "loglik", None, "loglik"]
    assert rows[0]["domain"] == "astronomy" and set(rows[0]["logliks"]) == set("ABCD")
    # printed: the accuracy table, the domains, and the routing heat map (not one block per layer)
    assert "routing:" in stdout and "model.layers.0" not in stdout
    heat = stdout[stdout.index("routing:"):].splitlines()
    assert heat[1].split()[:4] == ["task/domain", "tokens", "a", "b"]
    assert sum(1 for line in heat if line.split()[:1] in (["astronomy"], ["letters"], ["arithmetic"])) == 3


def test_cli_loglik_with_an_adapter(lm_path, tmp_path, capsys):
    from selfmoe.adapters import save_lora_adapter

    g = torch.Generator().manual_seed(1)
    weights = {"model.layers.0.self_attn.v_proj": (torch.randn(2, 64, generator=g), torch.randn(32, 2, generator=g))}
    save_lora_adapter(tmp_path / "ad", weights, r=2, lora_alpha=4)
    data = write_lines(tmp_path / "mc.jsonl", [json.dumps(r) for r in MC_RECORDS])
    outs = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", tmp_path / "ad"])):
        code, _, err = run_cli(capsys, "eval", "--model", lm_path, *extra, "--data", data, "--output", tmp_path / name,
                               "--mc-scoring", "loglik", "--no-progress")
        assert code == 0, err
        outs[name] = [json.loads(x)["logliks"] for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    assert outs["base"] != outs["adapter"]  # the adapter is applied


def test_routing_overview_and_overall_shares():
    from selfmoe.stats import RoutingStats, format_routing_overview, overall_shares, routing_overview

    # two layers seeing 4 tokens; shares weighted by tokens (equal here: the plain mean over layers)
    mc = {"l0": {"tokens": 4, "usage": {"x": 1.0, "y": 0.0}}, "l1": {"tokens": 4, "usage": {"x": 0.5, "y": 0.5}}}
    num = {"l0": {"tokens": 12, "usage": {"x": 0.0, "y": 1.0}}, "l1": {"tokens": 12, "usage": {"x": 0.0, "y": 1.0}}}
    assert overall_shares(mc) == pytest.approx({"x": 0.75, "y": 0.25})
    ov = routing_overview({"multiple_choice": mc, "numeric": num}, {"math": num, "trivia": mc})
    assert ov["tasks"]["multiple_choice"] == {"tokens": 4, "shares": pytest.approx({"x": 0.75, "y": 0.25})}
    # overall: (4 * 0.75 + 12 * 0) / 16 for x
    assert ov["overall"]["tokens"] == 16 and ov["overall"]["shares"] == pytest.approx({"x": 0.1875, "y": 0.8125})
    assert set(ov["domains"]) == {"math", "trivia"}
    text = format_routing_overview(ov)
    lines = text.splitlines()
    assert lines[1].split() == ["task/domain", "tokens", "x", "y"]
    row = next(line for line in lines if line.startswith("multiple_choice"))
    assert row.split() == ["multiple_choice", "4", "75.0", "#", "25.0", ":"]
    assert next(line for line in lines if line.startswith("overall")).split()[:3] == ["overall", "16", "18.8"]
    assert len(lines) < 12
    # RoutingStats.overall(): the same over what it counted
    stats = RoutingStats(["x", "y"])
    stats.update("l0", torch.tensor([[0], [0], [1], [0]]), torch.ones(4, 1))
    stats.update("l1", torch.tensor([[1], [1], [1], [0]]), torch.ones(4, 1))
    assert stats.overall() == pytest.approx({"x": 0.5, "y": 0.5})
    assert stats.overall("mean_gate") == pytest.approx({"x": 0.5, "y": 0.5})


def test_domains_and_sources_in_the_summary(tmp_path):
    recs = [dict(RECORDS[5], domain="add"), dict(RECORDS[6], domain="sub"), dict(RECORDS[7], domain="add")]
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in recs[:2]])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps(recs[2])])
    examples = load_eval_records(a) + load_eval_records(b)
    gen = ScriptedGenerator(SCRIPT)
    result = evaluate(None, None, examples, generator=gen, chunk_size=8)
    # without routing statistics the domains share one call (accuracy is still kept per domain)
    assert [len(p) for p, _ in gen.calls] == [3]
    summary = result.summary()
    assert summary["domains"] == {"add": {"n": 2, "correct": 1, "accuracy": 0.5}, "sub": {"n": 1, "correct": 1, "accuracy": 1.0}}
    assert summary["sources"] == {str(a): {"n": 2, "correct": 2, "accuracy": 1.0}, str(b): {"n": 1, "correct": 0, "accuracy": 0.0}}
    assert result.predictions[1]["domain"] == "sub"
    assert "domain" in result.table() and "add" in result.table()
    with pytest.raises(DataFormatError, match="'domain' must be a non-empty string"):
        validate_eval_record(dict(RECORDS[5], domain=""))
    # records without domains or files: no such keys (summaries stay as they were)
    plain = evaluate(None, None, RECORDS[:3], generator=ScriptedGenerator(SCRIPT)).summary()
    assert "domains" not in plain and "sources" not in plain


# ------------------------------------------------------------------------------- a finished --output


def test_cli_eval_finished_output_is_reused_refused_or_overwritten(lm_path, tmp_path, capsys, monkeypatch):
    import selfmoe.cli_eval as cli_eval

    recs = [dict(RECORDS[5], domain="z"), dict(RECORDS[0], domain="a"), RECORDS[6]]  # the table's order != sorted keys
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in recs])
    out = tmp_path / "out"
    args = ["eval", "--model", lm_path, "--data", data, "--output", out, "--batch-size", "2", "--no-progress"]
    code, first, err = run_cli(capsys, *args, "--max-new-tokens", "2")
    assert code == 0, err
    summary = (out / "summary.json").read_text()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_eval, "load_runner", no_model)
    # same settings, finished: the table again, nothing recomputed
    code, stdout, err = run_cli(capsys, *args, "--max-new-tokens", "2")
    assert code == 0 and "already holds this evaluation" in err and "--overwrite" in err
    assert stdout == first and "multiple_choice" in stdout and "domain" in stdout
    assert (out / "summary.json").read_text() == summary
    # other settings: refused in one line, naming what differs
    code, _, err = run_cli(capsys, *args, "--max-new-tokens", "3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "finished evaluation with other settings: sampling.max_new_tokens (2, now 3)" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, *args, "--max-new-tokens", "2", "--mc-scoring", "loglik")
    assert code == 2 and 'mc_scoring ("generate", now "loglik")' in err
    assert (out / "summary.json").read_text() == summary
    # a summary without recorded settings (an older selfmoe): refused too
    old = json.loads(summary)
    del old["settings"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps(old))
    code, _, err = run_cli(capsys, *args[:-5], "--output", tmp_path / "old", "--batch-size", "2", "--no-progress")
    assert code == 2 and "settings were not recorded" in err
    # --overwrite recomputes with the new settings
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--max-new-tokens", "3", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["sampling"]["max_new_tokens"] == 3
    assert not (out / "predictions.partial.jsonl").exists()


def test_routing_statistics_per_domain_when_domains_share_batches(lm_path, tmp_path):
    """A MiXSE's generated domains share batches; its routing statistics still come out per domain, equal
    to evaluating each domain on its own (rows are told apart as they enter and leave the batch)."""
    from selfmoe import MiXSE

    from _tiny_lm import load_tiny_lm

    mixse_dir = make_mixse(lm_path, tmp_path)
    records = [dict(r, domain="arith") for r in RECORDS if r["task"] == "numeric"] + \
              [dict(r, domain="weather") for r in RECORDS if r["task"] == "exact_match"]
    base, tok = load_tiny_lm(lm_path)
    model = MiXSE.from_pretrained(mixse_dir, base)
    calls = []
    real = model.routing_stats_by_rows

    def counting(num_groups):
        calls.append(num_groups)
        return real(num_groups)

    model.routing_stats_by_rows = counting
    shared = evaluate(model, tok, records, max_new_tokens=6, batch_size=4, routing_stats=True, progress=False)
    assert calls == [2]  # one call over both domains, statistics split by row
    for domain in ("arith", "weather"):
        alone = evaluate(model, tok, [r for r in records if r["domain"] == domain], max_new_tokens=6, batch_size=4,
                         routing_stats=True, progress=False)
        got, ref = shared.routing_domains[domain], alone.routing_domains[domain]
        assert got.keys() == ref.keys() and len(got) == 2  # both layers' routers
        for layer in ref:
            assert got[layer]["tokens"] == ref[layer]["tokens"] > 0
            assert got[layer]["usage"] == pytest.approx(ref[layer]["usage"], abs=1e-9)
            assert got[layer]["mean_gate"] == pytest.approx(ref[layer]["mean_gate"], abs=1e-6)
    assert [p["response"] for p in shared.predictions] == \
        [p["response"] for d in ("arith", "weather") for p in evaluate(
            model, tok, [r for r in records if r["domain"] == d], max_new_tokens=6, batch_size=4,
            progress=False).predictions]


def test_row_grouped_stats_split_rows_and_refuse_unknown_rows():
    from selfmoe.stats import RoutingStats, RowGroupedStats

    grouped = RowGroupedStats(["x", "y"], 2)
    ids, w = torch.tensor([[[0], [1]], [[1], [1]], [[0], [0]]]), torch.ones(3, 2, 1)  # [B=3, S=2, k=1]
    with pytest.raises(RuntimeError, match="set_rows"):
        grouped.update("l0", ids, w)
    grouped.set_rows([1, 0, 1])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    grouped.update("l0", ids, w, mask=mask)
    ref0, ref1 = RoutingStats(["x", "y"]), RoutingStats(["x", "y"])
    ref0.update("l0", ids[1:2], w[1:2], mask=mask[1:2])
    ref1.update("l0", ids[[0, 2]], w[[0, 2]], mask=mask[[0, 2]])
    assert grouped.groups[0].summary() == ref0.summary() and grouped.groups[1].summary() == ref1.summary()
    assert grouped.groups[1].summary()["l0"]["tokens"] == 4
    with pytest.raises(RuntimeError, match=r"\[3, 2, 1\] for 2 batch rows"):
        grouped.set_rows([0, 1])
        grouped.update("l0", ids, w)
    with pytest.raises(ValueError, match="row groups must lie in"):
        grouped.set_rows([0, 2])
