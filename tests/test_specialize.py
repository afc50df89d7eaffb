"""Self-specialization: prompts, filters, the pipeline end to end, resume, interrupts and bad input."""
from __future__ import annotations

import dataclasses
import json
import random
import time

import numpy as np
import pytest

import selfmoe.filters as filters_mod
from selfmoe.data import DataFormatError, append_jsonl, load_seeds, read_jsonl, write_jsonl
from selfmoe.filters import (FILTER_KEYS, FilterConfig, NearDuplicateIndex, filter_records, lcs_length, normalize_tokens,
                             rouge_l_f)
from selfmoe.generate import Completion, HFGenerator, SamplingConfig
from selfmoe.prompts import (DEFAULT_TEMPLATES, STOP_MARKS, build_brainstorm_prompt, build_response_prompt, get_template,
                             load_templates, seed_instruction_text)
from selfmoe.specialization import SpecializeConfig, parse_completion, specialize, specialize_domain, stats_path

from _tiny_lm import load_tiny_lm, save_tiny_lm

RECORD_KEYS = {"instruction", "input", "output", "domain"}

MATH_SEEDS = [
    {"instruction": "Tom has 3 apples and buys 5 more apples at the market. How many apples does Tom have now?",
     "output": "3 + 5 = 8. Tom has 8 apples."},
    {"instruction": "A train travels 60 miles per hour for 3 hours. How far does it travel in total?",
     "output": "60 * 3 = 180 miles."},
    {"instruction": "Anna saves 4 dollars each week. How much has she saved after 9 weeks?",
     "output": "4 * 9 = 36 dollars."},
    {"instruction": "A box holds 12 eggs. How many eggs are in 7 boxes?", "output": "12 * 7 = 84 eggs."},
    {"instruction": "Sum the numbers in the list.", "input": "[2, 4, 6]", "output": "2 + 4 + 6 = 12."},
]

WORDS = ("apple river stone green quickly market seven orange window bridge silent garden copper winter laugh "
         "pencil ocean marble thunder velvet candle forest rocket mirror lemon planet shadow tiger violin harbor "
         "crystal meadow falcon puzzle saddle timber lantern engine glacier pepper cactus walnut magnet ribbon").split()


def random_instruction(rng: random.Random, n: int = 10) -> str:
    """Independent random word strings: their pairwise ROUGE-L stays far below 0.7."""
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "?"


def instruction_of(response_prompt: str) -> str:
    return response_prompt.rsplit("### Instruction:\n", 1)[1].rsplit("\n\n### Response:", 1)[0]


class ScriptedGenerator:
    """A backend that replays planted texts: brainstorm prompts take the next scripted instruction,
    response prompts the next scripted answer for their instruction (or a default answer)."""

    def __init__(self, instructions=None, answers=None, seed=0, fail_on_call=None):
        self.instructions = list(instructions or [])
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.rng = random.Random(seed)
        self.fail_on_call = fail_on_call
        self.calls = []  # (kind, prompts, config)

    @staticmethod
    def _completion(item):
        return item if isinstance(item, Completion) else Completion(item, "stop")

    def generate(self, prompts, config, *, desc=None):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt  # what Ctrl-C looks like from inside a generate call
        kind = "response" if prompts[0].endswith("### Response:\n") else "brainstorm"
        self.calls.append((kind, list(prompts), config))
        out = []
        for p in prompts:
            if kind == "brainstorm":
                item = self.instructions.pop(0) if self.instructions else random_instruction(self.rng)
            else:
                queue = self.answers.get(instruction_of(p))
                item = queue.pop(0) if queue else "The answer follows from the numbers given: 42."
            out.append(self._completion(item))
        return out


def lines_of(path):
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def fast_config(**kw):
    base = dict(prompts_per_round=4, batch_size=4, progress=False,
                brainstorm=SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.98, stop=STOP_MARKS),
                response=SamplingConfig(max_new_tokens=12, do_sample=False, stop=STOP_MARKS))
    base.update(kw)
    return SpecializeConfig(**base)


# ----------------------------------------------------------------------------------------- prompts


def test_prompts_hold_the_seeds_and_open_slot():
    tpl = get_template("math")
    p = build_brainstorm_prompt(tpl, MATH_SEEDS[:3])
    assert p.startswith(tpl.brainstorm) and p.endswith("### Instruction:\n")
    assert p.count("### Instruction:") == 4 and "### Response" not in p
    for s in MATH_SEEDS[:3]:
        assert s["instruction"] in p
    r = build_response_prompt(tpl, MATH_SEEDS, "How many legs do 3 cats have?")
    assert r.startswith("You are a math expert") and r.endswith("How many legs do 3 cats have?\n\n### Response:\n")
    assert r.count("### Instruction:") == 6 and r.count("### Response:") == 6
    assert "Sum the numbers in the list.\n\n[2, 4, 6]" in r  # a seed's input rides along with its instruction
    assert set(DEFAULT_TEMPLATES) == {"knowledge", "reasoning", "math", "coding"}


def test_templates_override_and_errors(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"math": {"system": "You are a {domain} wizard."}, "law": {"brainstorm": "Write a {domain} question."}}))
    t = load_templates(f)
    assert get_template("math", t).system == "You are a math wizard."
    assert get_template("math", t).brainstorm == DEFAULT_TEMPLATES["math"].brainstorm  # untouched key kept
    assert get_template("law", t).brainstorm == "Write a law question."
    assert get_template("law", t).system == "You are a law expert. Answer the task accurately and completely."
    assert "medicine" in get_template("medicine").brainstorm  # generic template for an unknown domain
    f.write_text(json.dumps({"math": {"sytem": "x"}}))
    with pytest.raises(ValueError, match=r"domain 'math' has unknown key\(s\) \['sytem'\]"):
        load_templates(f)
    f.write_text('{"math":\n {"system": }}')
    with pytest.raises(ValueError, match=r"t\.json:2: invalid JSON"):
        load_templates(f)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_templates(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"'math'\.system must be a non-empty string"):
        load_templates({"math": {"system": " "}})


def test_parse_completion_tolerates_garbage():
    assert parse_completion("  A new problem.\n\n### Instruction:\nanother") == "A new problem."
    assert parse_completion("x### Response: y") == "x"
    assert parse_completion("\x00\r\n ~~ \ufffd") == "\x00\r\n ~~ \ufffd".strip()
    assert parse_completion("") == ""


# ----------------------------------------------------------------------------------------- filters


def brute_lcs(a, b):
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            d[i + 1][j + 1] = d[i][j] + 1 if x == y else max(d[i][j + 1], d[i + 1][j])
    return d[-1][-1]


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 5) for _ in range(rng.randint(0, 70))]  # > 64: crosses a machine word
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == brute_lcs(a, b)
    assert rouge_l_f("a b c d".split(), "a b x d".split()) == pytest.approx(0.75)


def test_near_duplicate_index_equals_brute_force():
    rng = random.Random(1)
    vocab = WORDS[:8]  # a small vocabulary: many near duplicates, so the comparison has both outcomes
    texts = [[rng.choice(vocab) for _ in range(rng.randint(1, 12))] for _ in range(250)]
    idx = NearDuplicateIndex(0.7)
    stored = []
    outcomes = set()
    for i, t in enumerate(texts):
        exact = [src for s, src in stored if s == t]
        near = [src for s, src in stored if 2 * brute_lcs(s, t) / (len(s) + len(t)) >= 0.7]
        want = (("exact", "seed" if "seed" in exact else "generated") if exact else
                ("near", "seed" if "seed" in near else "generated") if near else None)
        assert idx.find(t) == want, (i, t)
        outcomes.add(want)
        src = "seed" if i < 20 else "generated"
        if want is None or i < 20:
            idx.add(t, src)
            stored.append((t, src))
    assert {None, ("exact", "generated"), ("near", "generated"), ("near", "seed")} <= outcomes


def test_near_duplicate_prefilter_skips_most_lcs(monkeypatch):
    """5,000 x 5,000 is 12.5M pairs; the bound must leave only a tiny fraction for the exact LCS."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    probs = 1.0 / np.arange(1, 3001)  # Zipf: common words shared by everything, like real text
    probs /= probs.sum()
    texts = [" ".join(rng.choice(vocab, size=int(rng.integers(8, 30)), p=probs)) for _ in range(1500)]
    calls = [0]
    real = filters_mod.lcs_length

    def counting(a, b):
        calls[0] += 1
        return real(a, b)

    monkeypatch.setattr(filters_mod, "lcs_length", counting)
    t0 = time.perf_counter()
    kept, stats = filter_records([{"instruction": t, "output": "ok"} for t in texts], config=FilterConfig(min_instruction_words=1))
    elapsed = time.perf_counter() - t0
    pairs = 1500 * 1499 / 2
    assert calls[0] < 0.02 * pairs, (calls[0], pairs)
    assert len(kept) + stats["near_dup"] + stats["exact_dup"] == 1500
    assert elapsed < 30  # generous: a hang or an accidental all-pairs loop, not a benchmark


def test_filter_records_counts_planted_duplicates():
    seeds = MATH_SEEDS
    recs = [
        {"instruction": "Sara reads 12 pages every day for a week. How many pages is that?", "output": "84"},
        {"instruction": "TOM has 3 apples, and buys 5 more apples at the market -- how many apples does Tom have now",
         "output": "8"},  # seed copy after normalisation
        {"instruction": "Tom has 4 apples and buys 5 more apples at the market. How many apples does Tom have now?",
         "output": "9"},  # near seed copy
        {"instruction": "Sum the numbers in the list.", "input": "[2, 4, 6]", "output": "12"},  # seed with input
        {"instruction": "Sara reads 12 pages every day for a week. How many pages is that?", "output": "x"},  # exact
        {"instruction": "Sara reads 15 pages every day for a week. How many pages is that?", "output": "y"},  # near
        {"instruction": "A farmer plants 8 rows of 11 trees each. How many trees?", "output": "88"},
        {"instruction": "A bakery sells 30 cakes a day. How many in 4 days?", "output": "   "},  # empty output
        {"instruction": "Go", "output": "z"},  # too short
    ]
    kept, stats = filter_records(recs, seeds)
    assert [r["output"] for r in kept] == ["84", "88"]
    assert {k: v for k, v in stats.items() if v} == {
        "seed_exact": 2, "seed_near": 1, "exact_dup": 1, "near_dup": 1, "response_empty": 1, "instruction_short": 1}
    assert set(stats) == set(FILTER_KEYS)


# ----------------------------------------------------------------------------------- pipeline: fake


def test_pipeline_drops_each_planted_defect_and_counts_it(tmp_path):
    G1 = "Sara reads 12 pages every day for a week. How many pages does she read?"
    POOL = "A pool fills at 3 liters per minute. How long does it take to fill 90 liters?"
    PEN = "A shop sells pens at 2 dollars each. What do 7 pens cost in total?"
    MIA = "Mia has twice as many stickers as Leo, who has 9. How many does Mia have?"
    G2 = "A farmer plants 8 rows of 11 trees. How many trees does he plant?"
    script = [
        # round 1
        G1 + "\n\n### Instruction:\nand more",                                        # kept (text cut at the mark)
        "tom HAS 3 apples, and buys 5 more apples at the market! How many apples does Tom have now",  # seed_exact
        MATH_SEEDS[0]["instruction"].replace("3 apples", "4 apples"),                 # seed_near
        G1.upper(),                                                                   # exact_dup (same round)
        # round 2
        G1.replace("12", "15"),                                                       # near_dup (earlier round)
        "   ",                                                                        # instruction_empty
        "Hi there",                                                                   # instruction_short
        Completion("A baker bakes 20 loaves each", "length"),                         # instruction_unfinished
        # round 3
        "What is 2 + 2 here?\n### Input:\nnothing",                                   # instruction_format
        " ".join(["word"] * 50),                                                      # instruction_long
        POOL,                                                                         # response_empty
        PEN,                                                                          # response_unfinished
        # round 4
        MIA,                                                                          # response_format
        G2,                                                                           # kept
        POOL,                                   # kept: its twin's response was dropped, so it is not a duplicate
        G2 + " ",                                                                     # exact_dup, and surplus...
    ]
    answers = {POOL: ["  ", "Divide: 90 / 3 = 30 minutes."], PEN: [Completion("7 * 2 = 1", "length")],
               MIA: ["2 * 9 = 18 ### Input: leak"]}
    gen = ScriptedGenerator(script, answers)
    out = tmp_path / "math.jsonl"
    cfg = fast_config(filters=FilterConfig(max_instruction_tokens=40))
    stats = specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=3, config=cfg, generator=gen)
    recs = lines_of(out)
    assert [r["instruction"] for r in recs] == [G1, G2, POOL]
    assert recs[2]["output"] == "Divide: 90 / 3 = 30 minutes."
    assert all(set(r) == RECORD_KEYS and r["domain"] == "math" and r["input"] == "" for r in recs)
    expected = {"seed_exact": 1, "seed_near": 1, "exact_dup": 2, "near_dup": 1, "instruction_empty": 1,
                "instruction_short": 1, "instruction_unfinished": 1, "instruction_format": 1, "instruction_long": 1,
                "response_empty": 1, "response_unfinished": 1, "response_format": 1}
    assert {k: v for k, v in stats["removed"].items() if v} == expected
    assert stats["kept"] == 3 and stats["complete"] and stats["attempts"] == 16 and stats["rounds"] == 4
    assert stats["attempts"] == stats["kept"] + sum(stats["removed"].values()) + stats["surplus"]
    assert json.loads(stats_path(out).read_text()) == stats  # the report next to the output matches
    # Paper defaults reach the backend: 3 seeds + sampling for instructions, 5 seeds + greedy for answers.
    kinds = [k for k, _, _ in gen.calls]
    # Round 2 keeps no instruction, so it asks for no responses.
    assert kinds == ["brainstorm", "response", "brainstorm", "brainstorm", "response", "brainstorm", "response"]
    for kind, prompts, c in gen.calls:
        for p in prompts:
            if kind == "brainstorm":
                assert p.count("### Instruction:") == 3 + 1
            else:
                assert p.count("### Response:") == 5 + 1 and p.startswith("You are a math expert")
        assert (c.do_sample, c.temperature, c.top_p) == ((True, 1.0, 0.98) if kind == "brainstorm" else (False, 1.0, 1.0))
        assert c.stop == STOP_MARKS


def test_paper_defaults():
    cfg = SpecializeConfig()
    assert (cfg.brainstorm_shots, cfg.response_shots) == (3, 5)
    assert (cfg.brainstorm.do_sample, cfg.brainstorm.temperature, cfg.brainstorm.top_p) == (True, 1.0, 0.98)
    assert cfg.response.do_sample is False
    assert cfg.filters.near_dup_threshold == 0.7
    import inspect
    assert inspect.signature(specialize_domain).parameters["num_pairs"].default == 5000


def test_custom_templates_reach_the_prompts(tmp_path):
    gen = ScriptedGenerator()
    t = {"math": {"brainstorm": "BRAIN {domain} HEADER", "system": "SYSTEM {domain} TEXT"}}
    specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "m.jsonl", num_pairs=2,
                      config=fast_config(templates=t), generator=gen)
    assert all(p.startswith("BRAIN math HEADER\n") for p in gen.calls[0][1])
    assert all(p.startswith("SYSTEM math TEXT\n") for p in gen.calls[1][1])


def test_resume_continues_without_duplicates_and_drops_truncated_tail(tmp_path):
    out = tmp_path / "math.jsonl"
    s1 = specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=5, config=fast_config(),
                           generator=ScriptedGenerator(seed=1))
    first = out.read_text()
    assert s1["kept"] == 5 and len(lines_of(out)) == 5
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"instruction": "Half a rec')  # a crash in the middle of a write
    # The second run's backend repeats some of the first run's instructions: they must be caught.
    repeats = [r["instruction"] for r in lines_of_prefix(first)[:2]]
    gen2 = ScriptedGenerator(instructions=repeats, seed=2)
    s2 = specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=12, config=fast_config(), generator=gen2)
    recs = lines_of(out)
    assert out.read_text().startswith(first)  # nothing rewritten
    assert len(recs) == 12 and s2["kept"] == 12 and s2["written"] == 7 and s2["runs"] == 2
    assert s2["repaired_bytes"] == len('{"instruction": "Half a rec')
    assert s2["removed"]["exact_dup"] == 2
    norm = [tuple(normalize_tokens(r["instruction"])) for r in recs]
    assert len(set(norm)) == 12
    assert s2["attempts"] == s2["kept"] + sum(s2["removed"].values()) + s2["surplus"]
    # Already complete: a third call generates nothing.
    gen3 = ScriptedGenerator(seed=3)
    s3 = specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=12, config=fast_config(), generator=gen3)
    assert gen3.calls == [] and s3["written"] == 0 and s3["complete"]


def lines_of_prefix(text):
    return [json.loads(line) for line in text.splitlines()]


def test_ctrl_c_leaves_valid_file_and_resume_finishes(tmp_path):
    out = tmp_path / "math.jsonl"
    gen = ScriptedGenerator(seed=5, fail_on_call=5)  # rounds 1-2 complete, round 3 dies in its brainstorm
    with pytest.raises(KeyboardInterrupt):
        specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=20, config=fast_config(), generator=gen)
    recs = read_jsonl(out)
    assert len(recs) == 8
    st = json.loads(stats_path(out).read_text())
    assert st["kept"] == 8 and st["rounds"] == 2 and not st["complete"]
    s = specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=20, config=fast_config(),
                          generator=ScriptedGenerator(seed=6))
    recs = read_jsonl(out)
    assert len(recs) == 20 and s["complete"] and s["runs"] == 2
    assert len({tuple(normalize_tokens(r["instruction"])) for r in recs}) == 20


def test_max_attempts_bounds_a_useless_model(tmp_path):
    gen = ScriptedGenerator(instructions=[""] * 100)
    with pytest.warns(RuntimeWarning, match=r"'math': 0/5 pairs after 6 attempts"):
        s = specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "m.jsonl", num_pairs=5,
                              config=fast_config(max_attempts=6), generator=gen)
    assert s["attempts"] == 6 and s["removed"]["instruction_empty"] == 6 and not s["complete"]
    assert sum(len(p) for k, p, _ in gen.calls if k == "brainstorm") == 6  # the last round is cut to fit
    assert (tmp_path / "m.jsonl").read_text() == ""  # the output exists (empty) even when nothing was kept


# -------------------------------------------------------------------------------------- bad input


def test_seeds_file_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="seeds.jsonl"):
        load_seeds(tmp_path / "seeds.jsonl")
    p = tmp_path / "seeds.jsonl"
    p.write_text(json.dumps({**MATH_SEEDS[0], "domain": "math"}) + "\n" + '{"instruction": "x", "domain": "math"}\n')
    with pytest.raises(DataFormatError, match=r"seeds\.jsonl:2: missing required key 'output'"):
        load_seeds(p)
    with pytest.raises(DataFormatError, match=r"seeds for domain 'math', item 1: .*'output'"):
        specialize_domain(None, None, [MATH_SEEDS[0], {"instruction": "x"}], "math", tmp_path / "o.jsonl",
                          generator=ScriptedGenerator())


def test_too_few_seeds_fails_before_any_generation(tmp_path):
    gen = ScriptedGenerator()
    seeds = {"math": MATH_SEEDS, "law": MATH_SEEDS[:2]}
    with pytest.raises(ValueError, match=r"domain 'law' has 2 seed\(s\).*response_shots=5 need at least 5"):
        specialize(None, None, seeds, tmp_path / "out", num_pairs=2, config=fast_config(), generator=gen)
    assert gen.calls == [] and not (tmp_path / "out" / "math.jsonl").exists()
    # Fewer shots: two seeds are then enough.
    specialize(None, None, seeds, tmp_path / "out", num_pairs=1, domains=["law"], generator=gen,
               config=fast_config(brainstorm_shots=2, response_shots=2))
    assert len(read_jsonl(tmp_path / "out" / "law.jsonl")) == 1
    with pytest.raises(ValueError, match=r"no seeds for domain\(s\) \['code'\]"):
        specialize(None, None, seeds, tmp_path / "out", domains=["code"], generator=gen)


def test_output_of_another_domain_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "law.jsonl"
    write_jsonl(out, [{**MATH_SEEDS[0], "domain": "math"}])
    with pytest.raises(ValueError, match=r"law\.jsonl:1: output file holds records of domain 'math', not 'law'.*overwrite=True"):
        specialize_domain(None, None, MATH_SEEDS, "law", out, num_pairs=2, config=fast_config(), generator=ScriptedGenerator())
    assert len(read_jsonl(out)) == 1  # untouched
    s = specialize_domain(None, None, MATH_SEEDS, "law", out, num_pairs=2, config=fast_config(overwrite=True),
                          generator=ScriptedGenerator())
    recs = read_jsonl(out)
    assert len(recs) == 2 and {r["domain"] for r in recs} == {"law"} and s["runs"] == 1


def test_corrupt_middle_of_output_is_an_error_with_line(tmp_path):
    out = tmp_path / "math.jsonl"
    append_jsonl(out, [{"instruction": "a b c", "input": "", "output": "d", "domain": "math"}])
    with open(out, "a") as f:
        f.write("not json\n")
    append_jsonl(out, [{"instruction": "e f g", "input": "", "output": "h", "domain": "math"}])
    with pytest.raises(DataFormatError, match=r"math\.jsonl:2: invalid JSON"):
        specialize_domain(None, None, MATH_SEEDS, "math", out, num_pairs=5, config=fast_config(), generator=ScriptedGenerator())


def test_config_and_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="prompts_per_round"):
        SpecializeConfig(prompts_per_round=0)
    with pytest.raises(ValueError, match="max_attempts"):
        SpecializeConfig(max_attempts=0)
    with pytest.raises(ValueError, match="num_pairs"):
        specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "m.jsonl", num_pairs=0, generator=ScriptedGenerator())
    with pytest.raises(ValueError, match="model and tokenizer, or a generator"):
        specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "m.jsonl")
    with pytest.raises(TypeError):
        specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "m.jsonl", generator=ScriptedGenerator(), bogus=1)


# ------------------------------------------------------------------------------- tiny random model


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_tiny_lm(save_tiny_lm(tmp_path_factory.mktemp("lm")))


def tiny_config(**kw):
    # Garbage text rarely ends by itself: keep unfinished texts and one-word instructions, so records flow.
    return fast_config(filters=FilterConfig(min_instruction_words=1, drop_unfinished=False), max_attempts=40, **kw)


def test_end_to_end_on_tiny_random_model(lm, tmp_path):
    model, tok = lm
    seeds = {"math": MATH_SEEDS, "coding": [{"instruction": f"Write a function f{i}(x) that returns x + {i}.",
                                             "output": f"def f{i}(x):\n    return x + {i}"} for i in range(5)]}
    stats = specialize(model, tok, seeds, tmp_path / "out", num_pairs=3, config=tiny_config())
    assert set(stats) == {"math", "coding"}
    for domain, st in stats.items():
        path = tmp_path / "out" / f"{domain}.jsonl"
        recs = lines_of(path)
        assert len(recs) == st["kept"] == 3 and st["complete"]
        for r in recs:
            assert set(r) == RECORD_KEYS and r["domain"] == domain and r["input"] == ""
            assert r["instruction"].strip() and r["output"].strip()
            assert not any(m in r["instruction"] or m in r["output"] for m in STOP_MARKS)
        assert read_jsonl(path) == recs  # the documented format: readable by the data layer as-is
        saved = json.loads((tmp_path / "out" / f"{domain}.stats.json").read_text())
        assert saved["kept"] == 3 and set(saved["removed"]) == set(FILTER_KEYS)
        assert saved["attempts"] == saved["kept"] + sum(saved["removed"].values()) + saved["surplus"]


def test_tiny_model_run_is_reproducible_and_resumable(lm, tmp_path):
    model, tok = lm
    a = specialize_domain(model, tok, MATH_SEEDS, "math", tmp_path / "a.jsonl", num_pairs=4, config=tiny_config())
    specialize_domain(model, tok, MATH_SEEDS, "math", tmp_path / "b.jsonl", num_pairs=4, config=tiny_config())
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert a["kept"] == 4
    # Stop after 2, then resume to 4: the file grows, keeps its first lines and holds no duplicate.
    specialize_domain(model, tok, MATH_SEEDS, "math", tmp_path / "c.jsonl", num_pairs=2, config=tiny_config())
    head = (tmp_path / "c.jsonl").read_text()
    s = specialize_domain(model, tok, MATH_SEEDS, "math", tmp_path / "c.jsonl", num_pairs=4, config=tiny_config())
    text = (tmp_path / "c.jsonl").read_text()
    assert text.startswith(head) and s["kept"] == 4 and s["runs"] == 2
    recs = lines_of(tmp_path / "c.jsonl")
    assert len({tuple(normalize_tokens(r["instruction"])) for r in recs}) == 4


def test_specialize_refuses_unsafe_domain_names_before_writing(tmp_path):
    from selfmoe.specialization import specialize

    seeds = {"../escape": [{"instruction": f"q{i}", "output": "a", "domain": "math"} for i in range(6)]}
    with pytest.raises(ValueError, match="domain '../escape' is not a safe name"):
        specialize(None, None, seeds, tmp_path / "out", num_pairs=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.jsonl").exists()


def test_a_run_that_would_take_hours_says_so_once_with_the_measured_speed(tmp_path, monkeypatch):
    import selfmoe.specialization as spec_mod

    clock = {"t": 1000.0}

    class SlowGenerator(ScriptedGenerator):
        def generate(self, prompts, config, *, desc=None):
            clock["t"] += 900.0  # a quarter of an hour per generate call
            return super().generate(prompts, config, desc=desc)

    monkeypatch.setattr(spec_mod.time, "time", lambda: clock["t"])
    with pytest.warns(RuntimeWarning, match=r"remaining \d+ pairs need about [\d.]+ h") as record:
        specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "math.jsonl", 20, generator=SlowGenerator(),
                          config=fast_config(), max_attempts=12)
    slow = [w for w in record if "need about" in str(w.message)]
    assert len(slow) == 1  # once per call, not once per round

    clock["t"] = 1000.0

    class FastGenerator(ScriptedGenerator):
        def generate(self, prompts, config, *, desc=None):
            clock["t"] += 0.5
            return super().generate(prompts, config, desc=desc)

    import warnings as w_mod
    with w_mod.catch_warnings():
        w_mod.simplefilter("error", RuntimeWarning)
        specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / "fast.jsonl", 8, generator=FastGenerator(),
                          config=fast_config())


def test_domains_share_the_decode_batches_and_a_run_is_reproducible(lm, tmp_path, monkeypatch):
    """specialize() runs its domains as tasks of one continuous batch; the schedule depends only on the
    outputs, so two runs with the same seed write the same files."""
    model, tok = lm
    seeds = {"math": MATH_SEEDS, "logic": [{"instruction": f"Is statement {i} true or false?", "output": "True."}
                                           for i in range(5)]}
    runs = []
    original = HFGenerator.run_tasks

    def spy(self, tasks):
        runs.append((self.continuous, len(tasks)))
        return original(self, tasks)

    monkeypatch.setattr(HFGenerator, "run_tasks", spy)
    texts = []
    for name in ("a", "b"):
        stats = specialize(model, tok, seeds, tmp_path / name, num_pairs=5, config=tiny_config(prompts_per_round=3))
        assert all(st["kept"] == 5 and st["attempts"] == st["kept"] + sum(st["removed"].values()) + st["surplus"]
                   for st in stats.values())
        texts.append([(tmp_path / name / f"{d}.jsonl").read_text() for d in seeds])
    assert runs == [(True, 2), (True, 2)]  # both domains in one continuous run, each time
    assert texts[0] == texts[1]


def test_one_paragraph_instructions_auto_follows_the_format_and_the_seeds():
    from selfmoe.specialization import PARAGRAPH_STOP, brainstorm_sampling

    cfg = SpecializeConfig()
    code = [{"instruction": "def f(x):\n    \"\"\"Return x.\"\"\"\n\nassert f(1) == 1", "output": "return x"}]
    one = [s for s in MATH_SEEDS if PARAGRAPH_STOP not in seed_instruction_text(s)]
    assert 3 <= len(one) < len(MATH_SEEDS)  # one seed has an input, shown as a second paragraph
    assert brainstorm_sampling(cfg, MATH_SEEDS, "chat") == cfg.brainstorm
    assert brainstorm_sampling(cfg, one, "chat").stop == tuple(STOP_MARKS) + (PARAGRAPH_STOP,)
    assert brainstorm_sampling(cfg, code, "chat") == cfg.brainstorm  # instructions with code span paragraphs
    assert brainstorm_sampling(cfg, one, "alpaca") == cfg.brainstorm  # the ### marks end instructions there
    forced = dataclasses.replace(cfg, one_paragraph_instructions=True)
    assert PARAGRAPH_STOP in brainstorm_sampling(forced, code, "alpaca").stop
    assert brainstorm_sampling(dataclasses.replace(cfg, one_paragraph_instructions=False), one, "chat") == cfg.brainstorm
    # Already a stop string: not added twice.
    twice = dataclasses.replace(forced, brainstorm=cfg.brainstorm.replace(stop=(PARAGRAPH_STOP,)))
    assert brainstorm_sampling(twice, one, "chat").stop == (PARAGRAPH_STOP,)


def test_a_one_paragraph_lead_in_counts_as_unfinished(tmp_path):
    """With the paragraph stop, an instruction ending in a colon announced content the stop cut off."""
    keep = "A pool fills at 3 liters per minute. How long does it take to fill 90 liters?"
    script = ["Here are two new word problems:", keep, "Write one more problem, like this:", "   "]
    for on in (True, False):
        gen = ScriptedGenerator(script)
        stats = specialize_domain(None, None, MATH_SEEDS, "math", tmp_path / f"{on}.jsonl", num_pairs=10,
                                  config=fast_config(one_paragraph_instructions=on, max_attempts=4), generator=gen)
        brainstorm = [c for kind, _, c in gen.calls if kind == "brainstorm"][0]
        assert ("\n\n" in brainstorm.stop) == on
        kept = [r["instruction"] for r in lines_of(tmp_path / f"{on}.jsonl")]
        if on:
            assert kept == [keep] and stats["removed"]["instruction_unfinished"] == 2
        else:  # without the paragraph rule a colon is just text
            assert len(kept) == 3 and stats["removed"]["instruction_unfinished"] == 0
