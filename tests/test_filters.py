"""Domain-aware filters (issue 11): coding responses must parse (and, opt-in, pass the instruction's
asserts in the sandbox); multiple-choice answer letters stay balanced across a domain's kept pairs."""
from __future__ import annotations

import json
import sys

import pytest

from selfmoe.data import load_seeds
from selfmoe.filters import (FILTER_KEYS, AnswerBalance, FilterConfig, assert_lines, check_code, empty_stats,
                             filter_records)
from selfmoe.generate import Completion
from selfmoe.specialization import SpecializeConfig, specialize_domain, stats_path

# The scripted runs stop at max_attempts on purpose (every attempt is planted).
pytestmark = pytest.mark.filterwarnings("ignore:domain .* pairs after:RuntimeWarning")

NEW_KEYS = ("code_syntax", "code_asserts", "answer_letter_share")


def instruction_of(response_prompt: str) -> str:
    return response_prompt.rsplit("### Instruction:\n", 1)[1].rsplit("\n\n### Response:", 1)[0]


class Scripted:
    """Brainstorm prompts get the next planted instruction; response prompts the planted answer."""

    def __init__(self, instructions, answers):
        self.instructions = list(instructions)
        self.answers = dict(answers)

    def generate(self, prompts, config, *, desc=None):
        if prompts[0].endswith("### Response:\n"):
            return [Completion(self.answers[instruction_of(p)], "stop") for p in prompts]
        return [Completion(self.instructions.pop(0), "stop") for _ in prompts]


def run(domain, instructions, answers, tmp_path, **filters):
    seeds = load_seeds("builtin", domains=[domain])[domain]
    cfg = SpecializeConfig(prompts_per_round=4, progress=False, prompt_format="alpaca",
                           filters=FilterConfig(**{"near_dup_threshold": None, **filters}))  # planted texts are alike
    out = tmp_path / f"{domain}.jsonl"
    stats = specialize_domain(None, None, seeds, domain, out, num_pairs=len(instructions),
                              config=cfg, generator=Scripted(instructions, answers), max_attempts=len(instructions))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    return stats, recs


# ------------------------------------------------------------------------------------------ coding


def code_instruction(n: int) -> str:
    return (f"def add_{n}(a, b):\n    \"\"\"Return the sum of a and b, plus the constant {n} ({'x' * n}).\"\"\"\n\n"
            f"assert add_{n}(1, 2) == {3 + n}\nassert add_{n}(0, 0) == {n}")


def test_assert_lines_and_check_code():
    assert assert_lines(code_instruction(2)) == ["assert add_2(1, 2) == 5", "assert add_2(0, 0) == 2"]
    assert assert_lines("Write a function. Do not assert anything weird:") == []
    cfg = FilterConfig()
    assert check_code("x", "def f(:\n    return", cfg) == "code_syntax"
    assert check_code("x", "Here it is:\n```python\ndef f(x):\n    return x\n```\nDone.", cfg) is None
    assert check_code("x", "```python\ndef f(x) return x\n```", cfg) == "code_syntax"
    assert check_code("x", "def f(:", FilterConfig(code_must_parse=False)) is None
    # Parse check only: a wrong but parsing answer is not run without the opt-in.
    assert check_code(code_instruction(1), "def add_1(a, b):\n    return 0", cfg) is None


def test_coding_response_that_does_not_parse_is_dropped_and_counted(tmp_path):
    ins = [code_instruction(n) for n in (1, 5)]
    answers = {ins[0]: "def add_1(a, b) return a + b + 1",                      # does not parse
               ins[1]: "```python\ndef add_5(a, b):\n    return a + b + 5\n```"}  # parses
    stats, recs = run("coding", ins, answers, tmp_path)
    assert [r["instruction"] for r in recs] == [ins[1]]
    assert stats["removed"]["code_syntax"] == 1 and stats["removed"]["code_asserts"] == 0
    assert stats["attempts"] == stats["kept"] + sum(stats["removed"].values()) + stats["surplus"]
    saved = json.loads(stats_path(tmp_path / "coding.jsonl").read_text())
    assert saved["removed"]["code_syntax"] == 1 and set(NEW_KEYS) <= set(saved["removed"])
    assert saved["config"]["filters"]["code_must_parse"] is True
    assert saved["config"]["filters"]["run_code_asserts"] is False


def test_parse_check_is_for_the_coding_domain_only(tmp_path):
    ins = ["Explain in one sentence why the sky looks blue at noon.",
           "Name three metals that conduct electricity well and why."]
    answers = {ins[0]: "Rayleigh scattering: short (blue) wavelengths scatter most.",
               ins[1]: "Copper, silver and gold: free electrons carry the current."}
    stats, recs = run("reasoning", ins, answers, tmp_path)
    assert len(recs) == 2 and stats["removed"]["code_syntax"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")
def test_run_code_asserts_drops_failing_code_and_keeps_correct_code(tmp_path):
    ins = [code_instruction(n) for n in (1, 5, 9)]
    answers = {ins[0]: "def add_1(a, b):\n    return a + b",                     # fails its asserts
               ins[1]: "```python\ndef add_5(a, b):\n    return a + b + 5\n```",  # passes
               ins[2]: "def add_9(a, b):\n    raise RuntimeError('no')"}          # raises
    stats, recs = run("coding", ins, answers, tmp_path, run_code_asserts=True)
    assert [r["instruction"] for r in recs] == [ins[1]]
    assert stats["removed"]["code_asserts"] == 2 and stats["removed"]["code_syntax"] == 0
    # Without the opt-in nothing runs: all three parse, all three are kept.
    stats, recs = run("coding", ins, answers, tmp_path / "off")
    assert len(recs) == 3 and stats["removed"]["code_asserts"] == 0


# ----------------------------------------------------------------------------------- answer balance


TOPICS = ("volcano", "glacier", "orchestra", "satellite", "enzyme", "parliament", "telescope", "vaccine", "desert",
          "alphabet", "harbor", "currency", "pyramid", "comet")


def mc_instruction(i: int) -> str:
    t = TOPICS[i]
    return (f"Which statement about the {t} is correct, number {i}?\n"
            f"(A) {t} alpha\n(B) {t} beta\n(C) {t} gamma\n(D) {t} delta")


def test_answer_balance_unit():
    bal = AnswerBalance(0.5, 8)
    assert bal.letter("What is 2 + 2?", "The answer is (C).") is None  # no lettered options
    ins = mc_instruction(0)
    assert bal.letter(ins, "Because of gamma. The answer is (C).") == "C"
    for _ in range(7):
        assert bal.check("C") is None
        bal.add("C")
    assert bal.check("C") is None  # 7 kept: fewer than 8, small runs are not blocked
    bal.add("C")
    assert bal.check("C") == "answer_letter_share" and bal.check("A") is None
    assert AnswerBalance(None, 8).check("C") is None
    with pytest.raises(ValueError):
        FilterConfig(max_answer_letter_share=0)


def test_letter_balance_drops_the_over_represented_letter_after_8_kept(tmp_path):
    ins = [mc_instruction(i) for i in range(12)]
    letters = ["C"] * 10 + ["A", "C"]
    answers = {q: f"It follows from the definition. The answer is ({x})." for q, x in zip(ins, letters)}
    stats, recs = run("knowledge", ins, answers, tmp_path)
    # 8 C answers are kept freely; the 9th and 10th C would hold 9/9 and 9/10 > 0.5; A is kept;
    # the last C would hold 9/10 > 0.5 too.
    assert stats["removed"]["answer_letter_share"] == 3
    kept_letters = [r["output"][-3] for r in recs]
    assert kept_letters == ["C"] * 8 + ["A"]
    # The existing output counts: a resumed run judges new answers against the file's letters.
    more = [mc_instruction(i) for i in (12, 13)]
    answers2 = {more[0]: "The answer is (C).", more[1]: "So the answer is (B)."}
    seeds = load_seeds("builtin", domains=["knowledge"])["knowledge"]
    s2 = specialize_domain(None, None, seeds, "knowledge", tmp_path / "knowledge.jsonl", num_pairs=11,
                           config=SpecializeConfig(prompts_per_round=2, progress=False, prompt_format="alpaca",
                                                   filters=FilterConfig(near_dup_threshold=None)),
                           generator=Scripted(more, answers2), max_attempts=2)
    assert s2["removed"]["answer_letter_share"] == 4 and s2["written"] == 1


def test_letter_balance_off_and_small_runs(tmp_path):
    ins = [mc_instruction(i) for i in range(10)]
    answers = {q: "The answer is (D)." for q in ins}
    stats, recs = run("knowledge", ins, answers, tmp_path, max_answer_letter_share=None)
    assert len(recs) == 10 and stats["removed"]["answer_letter_share"] == 0


def test_new_keys_are_reported_and_filter_records_applies_them():
    assert set(NEW_KEYS) <= set(FILTER_KEYS) and set(NEW_KEYS) <= set(empty_stats())
    recs = [{"instruction": code_instruction(1), "output": "def add_1(a, b) return", "domain": "coding"},
            {"instruction": code_instruction(3), "output": "def add_3(a, b):\n    return a + b + 3", "domain": "coding"},
            {"instruction": "Explain this sentence to me", "output": "def (", "domain": "reasoning"}]
    kept, stats = filter_records(recs)
    assert len(kept) == 2 and stats["code_syntax"] == 1


def test_cli_help_documents_the_new_flags(capsys):
    from selfmoe.cli import main

    with pytest.raises(SystemExit):
        main(["specialize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--run-code-asserts" in out and "sandbox" in out and "model-written code" in out
    assert "--max-answer-letter-share" in out and "--no-code-parse-check" in out
