"""``selfmoe compare``: tables across evaluations, from hand-written summary.json files (no model)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from selfmoe.compare import compare_results, format_markdown


def acc(n, correct):
    return {"n": n, "correct": correct, "accuracy": correct / n}


def write_eval(folder, tasks, *, sources=None, domains=None, predictions=None, mc_scoring=None):
    """A `selfmoe eval` output folder as write_results leaves it (only what compare reads)."""
    folder.mkdir(parents=True)
    n = sum(t["n"] for t in tasks.values())
    correct = sum(t["correct"] for t in tasks.values())
    summary = {"tasks": tasks, "overall": {"n": n, "correct": correct, "accuracy": correct / n,
                                           "macro_accuracy": sum(t["accuracy"] for t in tasks.values()) / len(tasks)},
               "sampling": {"max_new_tokens": 8}}
    if sources is not None:
        summary["sources"] = sources
    if domains is not None:
        summary["domains"] = domains
    if mc_scoring is not None:
        summary["mc_scoring"] = mc_scoring
    (folder / "summary.json").write_text(json.dumps(summary, sort_keys=True))
    if predictions is not None:
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in predictions))
    return folder


def se(p, n):
    return math.sqrt(p * (1 - p) / n)


def test_compare_per_task_cells_stderr_and_average(tmp_path):
    base = write_eval(tmp_path / "eval" / "base", {"numeric": acc(40, 10), "multiple_choice": acc(100, 45)})
    mixse = write_eval(tmp_path / "eval" / "mixse", {"multiple_choice": acc(100, 60), "numeric": acc(40, 20),
                                                     "code": acc(10, 3)}, mc_scoring="loglik")
    table = compare_results([base, mixse])
    # columns in the task order of selfmoe eval, whatever the order in the files
    assert table["by"] == "task" and table["columns"] == ["multiple_choice", "numeric", "code"]
    b, m = table["systems"]
    assert (b["name"], m["name"]) == ("base", "mixse") and m["mc_scoring"] == "loglik" and b["mc_scoring"] == "generate"
    assert b["cells"]["multiple_choice"] == {"n": 100, "correct": 45, "accuracy": 0.45, "stderr": pytest.approx(se(0.45, 100))}
    assert m["cells"]["numeric"]["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 40))
    assert "code" not in b["cells"] and b["average"] is None  # no mean over other columns than the rest's
    avg = m["average"]
    assert avg["accuracy"] == pytest.approx((0.6 + 0.5 + 0.3) / 3) and avg["n"] == 150 and avg["columns"] == 3
    assert avg["stderr"] == pytest.approx(math.sqrt(se(0.6, 100) ** 2 + se(0.5, 40) ** 2 + se(0.3, 10) ** 2) / 3)

    md = format_markdown(table)
    lines = md.splitlines()
    assert lines[0] == "| system | multiple_choice | numeric | code | average |"
    assert lines[1] == "|:---|---:|---:|---:|---:|"
    assert lines[2] == "| base | 45.0 ± 5.0 (n=100) | 25.0 ± 6.8 (n=40) | – | – |"
    assert lines[3] == "| mixse | 60.0 ± 4.9 (n=100) | 50.0 ± 7.9 (n=40) | 30.0 ± 14.5 (n=10) | 46.7 ± 5.7 (n=150) |"
    assert "sqrt(p(1-p)/n)" in md and "base: generate" in md and "mixse: loglik" in md


def test_names_name_equals_dir_and_duplicates(tmp_path):
    a = write_eval(tmp_path / "a" / "run", {"numeric": acc(4, 1)})
    b = write_eval(tmp_path / "b" / "run", {"numeric": acc(4, 3)})
    # the same folder name twice: the paths as given tell them apart
    assert [s["name"] for s in compare_results([a, b])["systems"]] == [str(a), str(b)]
    table = compare_results([f"first={a}", f"second={b / 'summary.json'}"])
    assert [s["name"] for s in table["systems"]] == ["first", "second"]
    assert table["systems"][1]["cells"]["numeric"]["accuracy"] == 0.75
    assert [s["name"] for s in compare_results({"x": a})["systems"]] == ["x"]
    with pytest.raises(ValueError, match="two systems are named 'x'"):
        compare_results([f"x={a}", f"x={b}"])
    with pytest.raises(FileNotFoundError, match="no summary.json there"):
        compare_results([tmp_path / "a"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        compare_results([tmp_path / "nope"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable summary"):
        compare_results([tmp_path / "bad"])
    with pytest.raises(ValueError, match="by must be one of"):
        compare_results([a], by="file")


def test_compare_by_source_and_domain_from_the_summary_or_the_predictions(tmp_path):
    new = write_eval(tmp_path / "new", {"multiple_choice": acc(3, 2)},
                     sources={"data/mmlu.jsonl": acc(2, 1), "data/bbh.jsonl": acc(1, 1)},
                     domains={"law": acc(2, 2), "math": acc(1, 0)})
    # an evaluation written before summaries had sources/domains: counted from predictions.jsonl
    rows = [{"source": "../data/mmlu.jsonl:1", "correct": True, "domain": "law"},
            {"source": "../data/mmlu.jsonl:2", "correct": False, "domain": "math"},
            {"source": "../data/bbh.jsonl:7", "correct": False, "domain": "law"},
            {"source": "record 3", "correct": True}]  # given in Python: no file, no domain
    old = write_eval(tmp_path / "old", {"multiple_choice": acc(4, 2)}, predictions=rows)
    by_source = compare_results([new, old], by="source")
    assert by_source["columns"] == ["bbh", "mmlu"]  # stems: the same benchmark from another folder lines up
    n, o = by_source["systems"]
    assert n["cells"]["mmlu"]["accuracy"] == 0.5 and o["cells"]["mmlu"] == {"n": 2, "correct": 1, "accuracy": 0.5,
                                                                            "stderr": pytest.approx(0.5 / math.sqrt(2))}
    assert o["cells"]["bbh"]["n"] == 1 and o["average"]["accuracy"] == pytest.approx(0.25)
    by_domain = compare_results([new, old], by="domain")
    assert by_domain["columns"] == ["law", "math"]
    assert by_domain["systems"][1]["cells"]["law"] == {"n": 2, "correct": 1, "accuracy": 0.5, "stderr": pytest.approx(0.5 / math.sqrt(2))}
    # columns asked for: that order (and only those); one that no evaluation has is an error naming it
    ordered = compare_results([new, old], by="domain", columns=["math", "law"])
    assert ordered["columns"] == ["math", "law"] and list(ordered["systems"][0]["cells"]) == ["math", "law"]
    assert compare_results([new, old], by="domain", columns=["math"])["systems"][0]["average"]["columns"] == 1
    with pytest.raises(ValueError, match=r"\['coding'\]"):
        compare_results([new, old], by="domain", columns=["math", "coding"])
    # no per-domain numbers anywhere: an error, not an empty table
    bare = write_eval(tmp_path / "bare", {"numeric": acc(2, 1)})
    with pytest.raises(ValueError, match="per-domain results"):
        compare_results([bare], by="domain")
    # two files with one stem in one summary keep their paths
    twin = write_eval(tmp_path / "twin", {"numeric": acc(2, 1)}, sources={"a/x.jsonl": acc(1, 1), "b/x.jsonl": acc(1, 0)})
    assert compare_results([twin], by="source")["columns"] == ["a/x.jsonl", "b/x.jsonl"]


def run_cli(capsys, *argv):
    from selfmoe.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compare_writes_markdown_and_json(tmp_path, capsys):
    a = write_eval(tmp_path / "base", {"numeric": acc(4, 1)})
    b = write_eval(tmp_path / "mixse", {"numeric": acc(4, 3)})
    md, js = tmp_path / "out" / "t.md", tmp_path / "t.json"
    (tmp_path / "out").mkdir()
    code, stdout, err = run_cli(capsys, "compare", a, f"MiXSE={b}", "--output", md, "--json", js)
    assert code == 0, err
    assert md.read_text() == stdout and "| MiXSE | 75.0 ± 21.7 (n=4) |" in stdout
    table = json.loads(js.read_text())
    assert table == json.loads(json.dumps(compare_results([a, f"MiXSE={b}"])))
    code, _, err = run_cli(capsys, "compare", a, tmp_path / "missing")
    assert code == 2 and "missing: no such folder" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "compare", a, "--json", tmp_path)
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli(capsys, "compare", a, "--by", "task", "--columns", "numeric,code")
    assert code == 2 and err.startswith("selfmoe compare: error: --columns:") and "'code'" in err


def test_compare_help_is_torch_free():
    script = ("import sys\nfrom selfmoe.cli import main\ntry:\n    main(['compare', '--help'])\nexcept SystemExit:\n"
              "    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "examples:" in proc.stdout and "\n  selfmoe compare " in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH"
