"""The built-in benchmark (selfmoe.benchmark): counts and record format, balanced answer letters,
deterministic generators, every item scored right and wrong through the real scorers (code through
build_program + run_program), math and reasoning answers recomputed from the text, no overlap with
the self-specialization seeds, stable ids."""
from __future__ import annotations

import ast
import collections
import datetime
import difflib
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from selfmoe.benchmark import (BENCHMARK_VERSION, DEFAULT_COUNTS, DOMAINS, TASK_OF, load_benchmark,
                               reference_solutions, write_benchmark)
from selfmoe.data import builtin_seeds_dir
from selfmoe.eval_records import load_eval_records, validate_eval_record
from selfmoe.eval_scoring import build_program, extract_choice, normalize_answer, run_program, score


@pytest.fixture(scope="module")
def bench():
    return {d: load_benchmark(d) for d in DOMAINS}


@pytest.fixture(scope="module")
def seeds():
    out = []
    for path in sorted(builtin_seeds_dir().glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(out) >= 24
    return out


def _key(text):
    return " ".join(str(text).lower().split())


def _options(instruction):
    """{letter: option text} of a multiple-choice instruction written "question\\n(A) ...\\n(B) ..."."""
    return dict(re.findall(r"^\(([A-Z])\) (.+)$", instruction, re.M))


# ------------------------------------------------------------------------------------ counts, format


def test_counts_tasks_and_record_format(bench):
    assert DOMAINS == ("knowledge", "reasoning", "math", "coding")
    counts = {d: len(bench[d]) for d in DOMAINS}
    assert counts == DEFAULT_COUNTS
    assert counts["knowledge"] >= 120 and counts["coding"] >= 40
    assert counts["reasoning"] >= 300 and counts["math"] >= 300
    for d in DOMAINS:
        for rec in bench[d]:
            assert rec["domain"] == d and rec["task"] == TASK_OF[d]
            ex = validate_eval_record(rec)  # the format selfmoe eval reads
            assert ex.id == rec["id"] and ex.task == TASK_OF[d]
            if d == "coding":
                assert set(rec) == {"id", "domain", "task", "instruction", "tests", "entry_point"}
            else:
                assert isinstance(rec["answer"], str) and rec["answer"].strip() == rec["answer"] != ""


def test_ids_unique_stable_and_instructions_unique(bench):
    ids = [r["id"] for d in DOMAINS for r in bench[d]]
    assert len(ids) == len(set(ids))
    assert [r["id"] for r in bench["knowledge"][:3]] == ["knowledge-001", "knowledge-002", "knowledge-003"]
    assert bench["coding"][-1]["id"] == f"coding-{len(bench['coding']):03d}"
    assert [r["id"] for r in bench["math"][:2]] == ["math-s0-0000", "math-s0-0001"]
    assert load_benchmark("reasoning", n=3, seed=7)[2]["id"] == "reasoning-s7-0002"
    for d in DOMAINS:
        keys = [_key(r["instruction"]) for r in bench[d]]
        assert len(keys) == len(set(keys)), d
    # a sample keeps each item's id
    by_id = {r["id"]: r for r in bench["knowledge"]}
    for rec in load_benchmark("knowledge", n=10, seed=3):
        assert rec == by_id[rec["id"]]


# Digests of each domain's default items (and, through the fixed files, of every knowledge and coding
# item): a change to any item must bump BENCHMARK_VERSION (results from different versions are not
# comparable) and update these on purpose.
PINNED = {
    "knowledge": "9c51446074c77e4e",
    "reasoning": "aeb7e1131637ce6b",
    "math": "8ede9d263b79477b",
    "coding": "8af272cac53d3766",
}


def _digest(records):
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def test_items_are_pinned_to_the_benchmark_version():
    assert BENCHMARK_VERSION == 1
    got = {d: _digest(load_benchmark(d)) for d in DOMAINS}
    assert got == PINNED, "benchmark items changed: bump BENCHMARK_VERSION and update PINNED"


# --------------------------------------------------------------------------------------- knowledge


def test_knowledge_four_options_balanced_letters(bench):
    recs = bench["knowledge"]
    letters = collections.Counter(r["answer"] for r in recs)
    assert set(letters) == set("ABCD")
    for letter in "ABCD":
        assert abs(letters[letter] / len(recs) - 0.25) <= 0.02, letters
    for rec in recs:
        opts = _options(rec["instruction"])
        assert list(opts) == list("ABCD"), rec["id"]
        assert len({_key(o) for o in opts.values()}) == 4, rec["id"]
        # the scorer sees exactly these four letters, no stray "(X)" in the question or the options
        assert sorted(set(re.findall(r"\(([A-Z])\)", rec["instruction"]))) == list("ABCD"), rec["id"]
        assert rec["instruction"].split("\n")[0].endswith("?"), rec["id"]
    subjects = collections.Counter(r["subject"] for r in recs)
    assert len(subjects) >= 8 and max(subjects.values()) <= len(recs) // 4


def test_knowledge_scored_right_and_wrong(bench):
    for rec in bench["knowledge"]:
        ex = validate_eval_record(rec)
        right = rec["answer"]
        wrong = "ABCD"[("ABCD".index(right) + 1) % 4]
        assert score(ex, f"The correct option is {_options(rec['instruction'])[right]}. The answer is ({right}).")["correct"]
        assert score(ex, right)["correct"]
        assert not score(ex, f"The answer is ({wrong}).")["correct"]
        assert not score(ex, "I do not know.")["correct"]
        assert extract_choice(f"answer: {right}", rec["instruction"]) == right


def test_fixed_domains_sample_deterministically():
    a = load_benchmark("knowledge", n=20, seed=1)
    assert a == load_benchmark("knowledge", n=20, seed=1)
    assert [r["id"] for r in a] != [r["id"] for r in load_benchmark("knowledge", n=20, seed=2)]
    assert [r["id"] for r in a] == sorted(r["id"] for r in a)  # file order
    assert len(load_benchmark("coding", n=5, seed=0)) == 5
    with pytest.raises(ValueError, match="more than"):
        load_benchmark("coding", n=DEFAULT_COUNTS["coding"] + 1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            load_benchmark("knowledge", n=bad)
    with pytest.raises(ValueError, match="domain must be one of"):
        load_benchmark("poetry")


# ------------------------------------------------------------------------------ generated domains


@pytest.mark.parametrize("domain", ["reasoning", "math"])
def test_generators_are_deterministic_and_seeded(domain):
    a = load_benchmark(domain, n=60, seed=0)
    assert a == load_benchmark(domain, n=60, seed=0)
    assert load_benchmark(domain, n=15, seed=0) == a[:15]  # a prefix does not depend on n
    b = load_benchmark(domain, n=60, seed=1)
    shared = {_key(r["instruction"]) for r in a} & {_key(r["instruction"]) for r in b}
    assert len(shared) <= 3, shared  # a different seed gives different items (a tiny family may repeat one)
    assert [r["family"] for r in a] == [r["family"] for r in b]  # the same families in the same order
    assert len(load_benchmark(domain, n=7)) == 7


@pytest.mark.parametrize("domain,families", [("reasoning", 8), ("math", 12)])
def test_families_balanced(bench, domain, families):
    counts = collections.Counter(r["family"] for r in bench[domain])
    assert len(counts) == families
    assert max(counts.values()) - min(counts.values()) <= 1


def test_reasoning_scored_right_and_wrong(bench):
    by_family = collections.defaultdict(list)
    for rec in bench["reasoning"]:
        by_family[rec["family"]].append(rec)
    for family, recs in by_family.items():
        answers = sorted({r["answer"] for r in recs})
        assert len(answers) >= 2, family
        for rec in recs:
            ex = validate_eval_record(rec)
            assert score(ex, f"Let me work through it.\nSo the answer is {rec['answer']}.")["correct"], rec
            assert score(ex, f"Step by step...\n**{rec['answer'].lower()}**")["correct"], rec
            other = next(a for a in answers if normalize_answer(a) != normalize_answer(rec["answer"]))
            assert not score(ex, f"So the answer is {other}.")["correct"], rec
            if family == "word_sorting":  # the right words in the wrong order
                assert not score(ex, "The answer is " + " ".join(reversed(rec["answer"].split())))["correct"]


def test_reasoning_answer_forms_are_balanced(bench):
    for family, values in (("boolean_expressions", {"True", "False"}), ("navigation", {"Yes", "No"})):
        counts = collections.Counter(r["answer"] for r in bench["reasoning"] if r["family"] == family)
        assert set(counts) == values
        assert min(counts.values()) >= 0.3 * sum(counts.values()), (family, counts)


def _check_boolean(rec):
    expr = rec["instruction"].split("\n")[-1]
    assert set(expr.split()) <= {"True", "False", "not", "and", "or", "(", ")"}
    assert str(eval(expr, {"__builtins__": {}}, {})) == rec["answer"]  # noqa: S307 - only the tokens above


def _check_word_sorting(rec):
    words = rec["instruction"].split("List: ")[1].split()
    assert rec["answer"] == " ".join(sorted(words)) and len(set(words)) == len(words)


def _check_brackets(rec):
    closing = {"(": ")", "[": "]", "{": "}", "<": ">"}
    stack = []
    for tok in rec["instruction"].split("Sequence: ")[1].split():
        if tok in closing:
            stack.append(tok)
        else:
            assert closing[stack.pop()] == tok
    assert stack and rec["answer"] == " ".join(closing[t] for t in reversed(stack))


def _check_navigation(rec):
    x = y = 0
    steps = re.findall(r"Take (\d+) steps? (forward|backward|left|right)\.", rec["instruction"])
    assert len(steps) >= 3
    for k, way in steps:
        dx, dy = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}[way]
        x, y = x + int(k) * dx, y + int(k) * dy
    assert rec["answer"] == ("Yes" if (x, y) == (0, 0) else "No")


def _check_ordering(rec):
    text = rec["instruction"]
    pairs = re.findall(r"(\w+) is (\w+)er than (\w+)\.", text)
    pos_words = {"tall", "old", "fast", "heavi"}
    above = collections.defaultdict(set)  # above[a] = who a has more of the quality than
    for a, comp, b in pairs:
        (above[a] if comp in pos_words else above[b]).add(b if comp in pos_words else a)
    people = set(above) | {p for s in above.values() for p in s}

    def below(p):
        return set().union(*[{q} | below(q) for q in above[p]]) if above[p] else set()

    order = sorted(people, key=lambda p: -len(below(p)))  # a total order: ranks 0..n-1 all distinct
    assert sorted(len(below(p)) for p in people) == list(range(len(people)))
    m = re.search(r"Who is the (second )?(\w+)\?", text)
    rank = 1 if m.group(1) else 0
    most = m.group(2) in {"tallest", "oldest", "fastest", "heaviest"}
    assert rec["answer"] == (order[rank] if most else order[-1 - rank])


def _check_swaps(rec):
    text = rec["instruction"]
    holding = dict(re.findall(r"(\w+) has an? (\w+) \w+", text))
    for a, b in re.findall(r"(\w+) and (\w+) swap \w+\.", text):
        holding[a], holding[b] = holding[b], holding[a]
    who = re.search(r"that (\w+) holds\?", text).group(1)
    assert rec["answer"] == holding[who]


_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _check_date(rec):
    text = rec["instruction"]
    day, month, year = re.search(r"(\d{1,2}) (%s) (\d{4})" % "|".join(_MONTHS), text).groups()
    start = datetime.date(int(year), _MONTHS.index(month) + 1, int(day))
    k, unit, way = re.search(r"(\d+) (days|weeks) (later|after|before)", text).groups()
    delta = datetime.timedelta(days=int(k) * (7 if unit == "weeks" else 1))
    assert rec["answer"] == (start - delta if way == "before" else start + delta).isoformat()


_WORD_NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def _check_counting(rec):
    listed = re.search(r"I have (.+?)\. How many", rec["instruction"]).group(1)
    counts = [_WORD_NUMBERS[m] for m in re.findall(r"(?:^|, | and )(a|an|two|three|four|five) ", listed)]
    assert 2 <= int(rec["answer"]) < sum(counts)  # at least two of the category, other things listed too


REASONING_CHECKS = {
    "boolean_expressions": _check_boolean, "word_sorting": _check_word_sorting, "bracket_closing": _check_brackets,
    "navigation": _check_navigation, "ordering": _check_ordering, "swap_tracking": _check_swaps,
    "date_arithmetic": _check_date, "object_counting": _check_counting,
}


def test_reasoning_answers_recomputed_from_the_text(bench):
    for rec in bench["reasoning"] + load_benchmark("reasoning", n=80, seed=5):
        REASONING_CHECKS[rec["family"]](rec)


# Each template's answer from the numbers of its text, in order (the docstrings of selfmoe.benchmark.math_tasks).
MATH_FORMULAS = {
    "weekly_savings": lambda w, h, d, s, k: (w * h * d - s) * k,
    "library_books": lambda a, b, c, g: a + b * c - g,
    "fuel_round_trip": lambda litres, hundred, km: litres * 2 * km / hundred,
    "club_activities": lambda n, pct, one, q: (n - n * pct / 100) - (n - n * pct / 100) * one / q,
    "apple_sharing": lambda a, d, kept, friends: (a * d - kept) / friends,
    "fence_cost": lambda length, width, gate, cost: (2 * (length + width) - gate) * cost,
    "bus_passengers": lambda a, off, on, later: (a - off + on) / 2 + later,
    "piano_practice": lambda weekday, weekend, weeks: weeks * (5 * weekday + 2 * weekend),
    "recipe_scaling": lambda serves, grams, guests, have: grams / serves * guests - have,
    "savings_goal": lambda price, have, per_week: (price - have) / per_week,
    "pencil_packs": lambda per_pack, each, students, have: (each * students - have) / per_pack,
    "lemonade_profit": lambda price, cost, sat, extra: (sat + sat + extra) * (price - cost),
}


def test_math_answers_recomputed_from_the_text(bench):
    assert set(MATH_FORMULAS) == {r["family"] for r in bench["math"]}
    for rec in bench["math"] + load_benchmark("math", n=120, seed=11):
        numbers = [int(x) for x in re.findall(r"\d+", rec["instruction"])]
        expected = MATH_FORMULAS[rec["family"]](*numbers)
        assert float(rec["answer"]) == expected and expected == int(expected) and expected > 0, rec
        # the intermediate divisions are exact too (no hidden rounding)
        if rec["family"] == "club_activities":
            n, pct, _, q = numbers
            assert n * pct % 100 == 0 and (n - n * pct // 100) % q == 0
        if rec["family"] == "apple_sharing":
            assert 1 <= numbers[2] < numbers[0] * numbers[1]


def test_math_scored_right_and_wrong(bench):
    for rec in bench["math"]:
        ex = validate_eval_record(rec)
        value = int(rec["answer"])
        assert score(ex, f"Working it out step by step gives {value}. The answer is {value}.")["correct"]
        assert score(ex, f"#### {value:,}")["correct"]
        assert not score(ex, f"The answer is {value + 1}.")["correct"]
        assert not score(ex, "There is not enough information.")["correct"]


# ------------------------------------------------------------------------------------------ coding


def test_coding_specs_are_well_formed(bench):
    refs = reference_solutions()
    assert set(refs) == {r["id"] for r in bench["coding"]}
    entry_points = [r["entry_point"] for r in bench["coding"]]
    assert len(set(entry_points)) == len(entry_points)
    for rec in bench["coding"]:
        tree = ast.parse(rec["instruction"])  # compiles: build_program keeps it before a full definition
        (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert fn.name == rec["entry_point"] and ast.get_docstring(fn)
        assert len(fn.body) == 1  # signature and docstring only: no body, no solution
        assert sum(1 for n in ast.parse(rec["tests"]).body if isinstance(n, ast.Assert)) >= 4, rec["id"]
        ref = refs[rec["id"]]
        assert ref["entry_point"] == rec["entry_point"]
        assert ref["solution"].strip() not in rec["instruction"] and "solution" not in rec
        assert ref["solution"] != ref["wrong"]


def _run(rec, response):
    return run_program(build_program(rec["instruction"], response, rec["tests"], rec["entry_point"]), timeout=10)


def test_coding_reference_passes_and_wrong_solutions_fail_in_the_sandbox(bench):
    """The real code path (build_program + run_program, which is the opt-in): every reference solution
    passes (as a fenced full definition); its plausible wrong twin and an empty body fail."""
    refs = reference_solutions()
    jobs = []
    for rec in bench["coding"]:
        ref = refs[rec["id"]]
        jobs += [(rec, f"Here is my solution.\n```python\n{ref['solution']}```\n", True),
                 (rec, ref["wrong"], False),
                 (rec, "    pass\n", False)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _run(job[0], job[1]), jobs))
    bad = [(rec["id"], expected, res) for (rec, _, expected), res in zip(jobs, results) if res.passed != expected]
    assert not bad, bad


# ---------------------------------------------------------------------------------- seeds: no leak


def _shingles(text, k=3):
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def test_no_item_repeats_a_seed(bench, seeds):
    seed_keys = [_key(s["instruction"]) for s in seeds]
    seed_shingles = [_shingles(s["instruction"]) for s in seeds]
    for d in DOMAINS:
        for rec in bench[d] + (load_benchmark(d, n=200, seed=1) if d in ("reasoning", "math") else []):
            key = _key(rec["instruction"])
            sh = _shingles(rec["instruction"])
            for skey, ssh in zip(seed_keys, seed_shingles):
                assert key != skey and key not in skey and skey not in key, (rec["id"], skey)
                overlap = len(sh & ssh) / max(1, min(len(sh), len(ssh)))
                assert overlap < 0.5, (rec["id"], skey, sorted(sh & ssh))


def test_knowledge_questions_and_answers_differ_from_the_seeds(bench, seeds):
    seed_questions, seed_answers = [], set()
    for s in seeds:
        if s["domain"] != "knowledge":
            continue
        seed_questions.append(_key(s["instruction"].split("\n")[0]))
        letter = re.search(r"answer is \(([A-D])\)", s["output"]).group(1)
        seed_answers.add(_key(_options(s["instruction"])[letter]))
    assert len(seed_questions) >= 6
    for rec in bench["knowledge"]:
        question = _key(rec["instruction"].split("\n")[0])
        for sq in seed_questions:
            assert difflib.SequenceMatcher(None, question, sq).ratio() < 0.8, (rec["id"], sq)
        assert _key(_options(rec["instruction"])[rec["answer"]]) not in seed_answers, rec["id"]


def test_generated_templates_and_coding_specs_differ_from_the_seeds(bench, seeds):
    """Template level: a few items of each family, digits masked, are far from every seed question;
    no seed's answer text is a benchmark answer; no coding entry point is a seed's function."""

    def skeleton(text):
        return re.sub(r"\d+", "#", _key(text))

    seed_skeletons = [skeleton(s["instruction"]) for s in seeds]
    for d in ("reasoning", "math"):
        by_family = collections.defaultdict(list)
        for rec in bench[d]:
            by_family[rec["family"]].append(rec)
        for family, recs in by_family.items():
            for rec in recs[:3]:
                sk = skeleton(rec["instruction"])
                for ss in seed_skeletons:
                    assert difflib.SequenceMatcher(None, sk, ss).ratio() < 0.6, (family, ss)
    seed_outputs = [_key(s["output"]) for s in seeds]
    for rec in bench["reasoning"]:
        if len(rec["answer"].split()) >= 3:  # multi-word answers (sorted word lists)
            assert not any(_key(rec["answer"]) in out for out in seed_outputs), rec["id"]
    seed_functions = {m for s in seeds if s["domain"] == "coding" for m in re.findall(r"def (\w+)\(", s["instruction"])}
    assert seed_functions and not seed_functions & {r["entry_point"] for r in bench["coding"]}


# ----------------------------------------------------------------------------------------- writing


def test_write_benchmark_files_load_as_eval_records(tmp_path):
    paths = write_benchmark(tmp_path / "bench", n_per_domain=6, seed=2)
    assert list(paths) == list(DOMAINS)
    for d, path in paths.items():
        assert path == tmp_path / "bench" / f"{d}.jsonl"
        examples = load_eval_records(path)  # what selfmoe eval --data does
        assert len(examples) == 6 and {e.task for e in examples} == {TASK_OF[d]}
        assert [e.id for e in examples] == [r["id"] for r in load_benchmark(d, n=6, seed=2)]
    assert "solution" not in paths["coding"].read_text() and "wrong" not in paths["coding"].read_text()
    # an integer larger than a fixed domain gives all of it; a mapping is passed as is
    paths = write_benchmark(tmp_path / "all", n_per_domain=1000, domains=("knowledge",))
    assert list(paths) == ["knowledge"] and len(load_eval_records(paths["knowledge"])) == DEFAULT_COUNTS["knowledge"]
    paths = write_benchmark(tmp_path / "map", n_per_domain={"math": 4, "coding": None}, domains=("math", "coding"))
    assert [len(load_eval_records(p)) for p in paths.values()] == [4, DEFAULT_COUNTS["coding"]]
    with pytest.raises(ValueError, match="unknown domains"):
        write_benchmark(tmp_path / "x", n_per_domain={"poetry": 3})
    with pytest.raises(ValueError, match="domain must be one of"):
        write_benchmark(tmp_path / "x", domains=("math", "poetry"))
    assert not (tmp_path / "x").exists()  # nothing is written when the arguments are wrong


def test_module_entry_point_writes_the_files(tmp_path, capsys):
    from selfmoe.benchmark.__main__ import main

    assert main([str(tmp_path / "b"), "--n", "3", "--domains", "math,knowledge"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["knowledge.jsonl", "math.jsonl"]
    assert "math:" in capsys.readouterr().out
    assert main([str(tmp_path / "c"), "--domains", "poetry"]) == 2
    assert "domain must be one of" in capsys.readouterr().err


def test_evaluate_end_to_end_on_written_files(tmp_path):
    """selfmoe.evaluation.evaluate on the written files, with a generator that gives the reference
    answers: every task scores 1.0; with wrong answers every task scores 0."""
    from selfmoe.evaluation import evaluate
    from selfmoe.generate import Completion

    paths = write_benchmark(tmp_path, n_per_domain=4, seed=0)
    records = [r for d in DOMAINS for r in load_benchmark(d, n=4, seed=0)]
    refs = reference_solutions()
    right, wrong = {}, {}
    for r in records:
        if r["task"] == "code":
            right[r["instruction"]] = f"```python\n{refs[r['id']]['solution']}```"
            wrong[r["instruction"]] = refs[r["id"]]["wrong"]
        elif r["task"] == "multiple_choice":
            right[r["instruction"]] = f"The answer is ({r['answer']})."
            wrong[r["instruction"]] = f"The answer is ({'ABCD'[('ABCD'.index(r['answer']) + 1) % 4]})."
        elif r["task"] == "numeric":
            right[r["instruction"]] = f"The answer is {r['answer']}."
            wrong[r["instruction"]] = f"The answer is {int(r['answer']) + 1}."
        else:
            right[r["instruction"]] = f"The answer is {r['answer']}."
            wrong[r["instruction"]] = "The answer is unknown."

    class Scripted:
        def __init__(self, script):
            self.script = script

        def generate(self, prompts, config, *, desc=None):
            out = []
            for p in prompts:
                (hit,) = [resp for instr, resp in self.script.items() if f"### Instruction:\n{instr}\n\n" in p]
                out.append(Completion(hit, "stop"))
            return out

    examples = [e for p in paths.values() for e in load_eval_records(p)]
    for script, accuracy in ((right, 1.0), (wrong, 0.0)):
        result = evaluate(None, None, examples, generator=Scripted(script), allow_code_execution=True, code_timeout=10)
        assert {t: v["accuracy"] for t, v in result.tasks.items()} == {t: accuracy for t in TASK_OF.values()}
        assert result.n == 16
        # the records' domain gives the per-domain rows of the summary
        assert {d: v["n"] for d, v in result.summary()["domains"].items()} == {d: 4 for d in DOMAINS}
