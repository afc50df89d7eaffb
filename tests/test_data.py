"""selfmoe.data: JSONL records, the Alpaca template, response-only labels, length bucketing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfmoe.data import (
    ALPACA_PROMPT_NO_INPUT,
    DataFormatError,
    LengthGroupedBatchSampler,
    SFTCollator,
    SFTDataset,
    append_jsonl,
    encode_prompt,
    format_prompt,
    load_seeds,
    padding_stats,
    read_jsonl,
    repair_jsonl_tail,
    tokenize_example,
    write_jsonl,
)

from _tiny_lm import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(bos=True)


def rec(i, domain="math", **kw):
    r = {"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}.", "domain": domain}
    r.update(kw)
    return r


# ---------------------------------------------------------------------------------------- template


def test_alpaca_template_exact_strings():
    assert format_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert format_prompt("Sum the list.", "[1, 2]") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSum the list.\n\n### Input:\n[1, 2]\n\n### Response:\n")
    # Whitespace-only input is no input; braces in the text are not format fields.
    assert format_prompt("Use {x}.", "  \n") == ALPACA_PROMPT_NO_INPUT.replace("{instruction}", "Use {x}.")


# ------------------------------------------------------------------------------------------ JSONL


def test_jsonl_roundtrip_and_defaults(tmp_path):
    p = tmp_path / "d.jsonl"
    records = [rec(0), {"instruction": "Ünïcode ✓", "output": "multi\nline", "domain": "x", "id": 7}]
    write_jsonl(p, records)
    back = read_jsonl(p)
    assert back[0] == records[0]
    assert back[1] == {**records[1], "input": ""}  # input defaults to "", extra keys survive
    assert p.read_text(encoding="utf-8").count("\n") == 2  # one record per line even with "\n" inside


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "a", "output": "b", "domain": "m"', "invalid JSON"),
    ('{"output": "b", "domain": "m"}', "missing required key 'instruction'"),
    ('{"instruction": "a", "output": 3, "domain": "m"}', "'output' must be a string"),
    ('{"instruction": "  ", "output": "b", "domain": "m"}', "'instruction' is empty"),
    ('{"instruction": "a", "output": "b"}', "missing required key 'domain'"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    # A blank line before the bad one: line numbers count physical lines.
    p.write_text(json.dumps(rec(0)) + "\n\n" + line + "\n" + json.dumps(rec(1)) + "\n")
    with pytest.raises(DataFormatError) as ei:
        read_jsonl(p)
    assert f"{p}:3:" in str(ei.value) and message in str(ei.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_write_jsonl_is_atomic_on_bad_record(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [rec(0)])
    with pytest.raises(ValueError):
        write_jsonl(p, [rec(1), {"instruction": "x", "output": float("nan"), "domain": "m"}])
    assert read_jsonl(p) == [rec(0)]
    assert [q.name for q in tmp_path.iterdir()] == ["d.jsonl"]  # no temporary left behind


def test_repair_tail_drops_incomplete_line_only(tmp_path):
    p = tmp_path / "d.jsonl"
    append_jsonl(p, [rec(0), rec(1)])
    good = p.read_bytes()
    with open(p, "ab") as f:
        f.write(b'{"instruction": "Question numb')  # a crash mid-write
    assert repair_jsonl_tail(p) == len(b'{"instruction": "Question numb')
    assert p.read_bytes() == good
    assert repair_jsonl_tail(p) == 0
    # Only the newline lost: the record is complete and is kept.
    with open(p, "ab") as f:
        f.write(json.dumps(rec(2)).encode())
    assert repair_jsonl_tail(p) == 0
    assert [r["instruction"] for r in read_jsonl(p)] == [rec(i)["instruction"] for i in range(3)]
    # A truncated multi-byte character is an incomplete line too.
    with open(p, "ab") as f:
        f.write('{"instruction": "é'.encode()[:-1])
    assert repair_jsonl_tail(p) > 0 and len(read_jsonl(p)) == 3
    assert repair_jsonl_tail(tmp_path / "absent.jsonl") == 0


def test_corrupt_middle_line_is_not_repaired(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(rec(0)) + "\n{broken\n" + json.dumps(rec(1)) + "\n")
    assert repair_jsonl_tail(p) == 0
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: invalid JSON"):
        read_jsonl(p)


# ------------------------------------------------------------------------------------------ seeds


def test_load_seeds_file_groups_by_domain(tmp_path):
    p = tmp_path / "seeds.jsonl"
    write_jsonl(p, [rec(0, "math"), rec(1, "coding"), rec(2, "math")])
    seeds = load_seeds(p)
    assert list(seeds) == ["math", "coding"]
    assert [r["instruction"] for r in seeds["math"]] == ["Question number 0?", "Question number 2?"]
    assert list(load_seeds(p, domains=["coding"])) == ["coding"]
    with pytest.raises(ValueError, match=r"no seeds for domain\(s\) \['law'\]"):
        load_seeds(p, domains=["law"])


def test_load_seeds_directory_uses_file_stem(tmp_path):
    d = tmp_path / "seeds"
    d.mkdir()
    write_jsonl(d / "math.jsonl", [rec(0, "math")])
    (d / "coding.jsonl").write_text(json.dumps({"instruction": "Write f.", "output": "def f(): pass"}) + "\n")
    seeds = load_seeds(d)
    assert sorted(seeds) == ["coding", "math"] and seeds["coding"][0]["domain"] == "coding"
    write_jsonl(d / "law.jsonl", [rec(0, "law"), rec(1, "math")])
    with pytest.raises(DataFormatError, match=r"law\.jsonl:2: record has domain 'math' but 'law' was expected"):
        load_seeds(d)


def test_load_seeds_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_seeds(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        load_seeds(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_seeds(tmp_path / "blank.jsonl")


# ------------------------------------------------------------------------------------ tokenisation


def test_labels_only_on_response_with_eos(tok):
    r = {"instruction": "What is 12 + 30?", "input": "", "output": "The answer is 42."}
    ex = tokenize_example(r, tok)
    prompt_ids = encode_prompt(tok, format_prompt(r["instruction"]))
    n = len(prompt_ids)
    assert prompt_ids[0] == tok.bos_token_id  # this tokenizer adds BOS; the prompt keeps it
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]  # every response token is supervised
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert tok.eos_token_id not in ex["input_ids"][:-1]
    assert tok.decode(ex["input_ids"][n:-1]) == r["output"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_prompt_never_ends_in_eos_even_if_tokenizer_appends_it():
    from tokenizers import processors

    t = build_tokenizer(bos=True)
    bos, eos = t.bos_token_id, t.eos_token_id
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    assert t("hi")["input_ids"][-1] == eos  # the premise: this tokenizer appends EOS
    ids = encode_prompt(t, "hi there")
    assert ids[0] == bos and ids[-1] != eos
    ex = tokenize_example({"instruction": "Say hi.", "output": "hi"}, t)
    assert ex["input_ids"].count(eos) == 1 and ex["input_ids"][-1] == eos


def test_truncation_and_drop(tok):
    r = {"instruction": "Tom has 3 apples.", "output": "He buys 5 more, so he has 8 apples now."}
    full = tokenize_example(r, tok)
    n_prompt = full["labels"].count(-100)
    cut = tokenize_example(r, tok, max_length=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 2] and cut["labels"][-2:] == full["labels"][n_prompt:n_prompt + 2]
    assert tokenize_example(r, tok, max_length=n_prompt + 2, overflow="drop") is None
    assert tokenize_example(r, tok, max_length=n_prompt) is None  # no room for a single response token
    ds = SFTDataset([r, r], tok, max_length=n_prompt)
    assert len(ds) == 0 and ds.num_dropped == 2
    with pytest.raises(ValueError, match="overflow"):
        tokenize_example(r, tok, overflow="left")


def test_collator_right_pads(tok):
    ds = SFTDataset([{"instruction": "Hi.", "output": "Yes."}, {"instruction": "A longer question here?", "output": "A longer answer."}], tok)
    coll = SFTCollator.for_tokenizer(tok, pad_to_multiple_of=8)
    b = coll([ds[0], ds[1]])
    n0, n1 = ds.lengths
    width = b["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(n0, n1)
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (width - n0)
    assert b["input_ids"][0, n0:].eq(tok.pad_token_id).all()
    assert b["labels"][0, n0:].eq(-100).all()
    assert b["labels"][1, :n1].tolist() == ds[1]["labels"]
    assert b["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="pad_token_id"):
        SFTCollator(-1)


# -------------------------------------------------------------------------------------- bucketing


def skewed_lengths(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.lognormal(4.0, 0.8, size=n)).astype(int) + 1


@pytest.mark.parametrize("drop_last", [False, True])
def test_length_grouped_sampler_covers_every_index_once(drop_last):
    lengths = skewed_lengths(1003)
    s = LengthGroupedBatchSampler(lengths, 16, seed=3, drop_last=drop_last, group_size=64)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        flat = [i for b in batches for i in b]
        assert len(batches) == len(s)
        if drop_last:
            assert all(len(b) == 16 for b in batches) and len(flat) == 1003 // 16 * 16 and len(set(flat)) == len(flat)
        else:
            assert sorted(flat) == list(range(1003))
        assert max(lengths[batches[0]]) == lengths.max()  # the longest batch comes first


def test_length_grouped_sampler_deterministic_and_less_padding():
    lengths = skewed_lengths(2000)
    a = LengthGroupedBatchSampler(lengths, 32, seed=7).batches()
    assert a == LengthGroupedBatchSampler(lengths, 32, seed=7).batches()
    assert a != LengthGroupedBatchSampler(lengths, 32, seed=8).batches()
    s = LengthGroupedBatchSampler(lengths, 32, seed=7)
    s.set_epoch(1)
    assert s.batches() != a
    perm = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [perm[i:i + 32] for i in range(0, len(perm), 32)]
    grouped, rand = padding_stats(lengths, a), padding_stats(lengths, random_batches)
    assert grouped["real_tokens"] == rand["real_tokens"] == int(lengths.sum())
    assert grouped["pad_fraction"] < 0.5 * rand["pad_fraction"], (grouped, rand)
    ordered = LengthGroupedBatchSampler(lengths, 32, shuffle=False).batches()
    flat = [i for b in ordered for i in b]
    assert list(lengths[flat]) == sorted(lengths, reverse=True)
    assert padding_stats(lengths, ordered)["pad_fraction"] <= grouped["pad_fraction"]


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="group_size"):
        LengthGroupedBatchSampler([1, 2], 4, group_size=2)
    assert list(LengthGroupedBatchSampler([], 4)) == []


def test_dataloader_end_to_end(tok):
    recs = [{"instruction": "Q " + "word " * (i % 7), "output": "A " * (1 + i % 5)} for i in range(40)]
    ds = SFTDataset(recs, tok)
    sampler = LengthGroupedBatchSampler(ds.lengths, 8, seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=SFTCollator.for_tokenizer(tok))
    seen = 0
    for b in dl:
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert (b["labels"] != -100).sum() > 0
        seen += b["input_ids"].shape[0]
    assert seen == 40


# --------------------------------------------------------------------------------------------------
# Built-in seeds


def test_builtin_seeds_cover_the_default_domains_and_are_valid():
    from selfmoe.data import BUILTIN_SEEDS, builtin_seeds_dir
    from selfmoe.prompts import DEFAULT_TEMPLATES
    from selfmoe.specialization import SpecializeConfig, check_seed_counts

    seeds = load_seeds(BUILTIN_SEEDS)
    assert sorted(seeds) == sorted(DEFAULT_TEMPLATES)
    check_seed_counts(seeds, SpecializeConfig())  # enough for 3 brainstorm and 5 response shots
    for domain, records in seeds.items():
        assert all(r["domain"] == domain and r["instruction"].strip() and r["output"].strip() for r in records)
        assert len({r["instruction"] for r in records}) == len(records), domain
    assert load_seeds(builtin_seeds_dir(), domains=["math"]) == {"math": seeds["math"]}


def test_builtin_knowledge_seeds_are_multiple_choice_with_an_answer_letter():
    import re

    for rec in load_seeds("builtin")["knowledge"]:
        assert all(f"({c})" in rec["instruction"] for c in "ABCD"), rec["instruction"]
        assert re.search(r"The answer is \([ABCD]\)\.$", rec["output"]), rec["output"]


def test_builtin_coding_seed_solutions_pass_their_own_tests():
    """Each coding seed is a signature + docstring + asserts; its response must pass those asserts,
    and a wrong body must not (so the asserts really test something)."""
    for rec in load_seeds("builtin")["coding"]:
        asserts = "\n".join(line for line in rec["instruction"].splitlines() if line.startswith("assert "))
        assert asserts.count("assert ") >= 3
        namespace: dict = {}
        exec(rec["output"] + "\n" + asserts, namespace)  # raises AssertionError if a seed is wrong
        name = rec["output"].split("(")[0].removeprefix("def ").strip()
        broken = {name: lambda *args, **kwargs: None}
        with pytest.raises(AssertionError):
            exec(asserts, broken)


@pytest.mark.parametrize("domain", ["../../x", "/etc/passwd", ".hidden", "a/b", "a\\b", "..", "x" * 129, "math\n"])
def test_unsafe_domains_are_refused_with_file_and_line(tmp_path, domain):
    from selfmoe.data import DataFormatError, read_jsonl

    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a", "domain": "math"}) + "\n"
                    + json.dumps({"instruction": "q", "output": "a", "domain": domain}) + "\n")
    with pytest.raises(DataFormatError, match=r"seeds.jsonl:2: 'domain' .* is not a safe name"):
        read_jsonl(path)


def test_safe_domains_pass():
    from selfmoe.data import validate_record

    for domain in ("math", "Coding_2", "bbh-boolean.v2", "x" * 128):
        assert validate_record({"instruction": "q", "output": "a", "domain": domain})["domain"] == domain


def test_a_non_utf8_line_is_reported_with_its_number(tmp_path):
    from selfmoe.data import DataFormatError, read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a", "domain": "m"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"d.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_a_mistyped_builtin_seeds_name_suggests_the_right_one(tmp_path, monkeypatch):
    from selfmoe.data import load_seeds

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="did you mean 'builtin'"):
        load_seeds("bultin")
    with pytest.raises(FileNotFoundError) as info:
        load_seeds("elsewhere")
    assert "did you mean" not in str(info.value)
    assert set(load_seeds("builtin")) == {"knowledge", "reasoning", "math", "coding"}
