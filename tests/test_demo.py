"""``selfmoe demo --quick``: the whole pipeline on the package's tiny random Llama, then a rerun that skips it all."""
import json
import time

import pytest

from selfmoe.cli import main
from selfmoe.demo import DOMAINS, SYSTEMS

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = (["model", "specialize"] + [f"expert-{d}" for d in DOMAINS] + ["union", "ties", "dare", "mixse", "benchmark"]
          + [f"eval-{s}" for s in SYSTEMS] + ["compare", "heatmap"])


def _expected_files(out):
    files = [out / "tiny-llama" / "config.json", out / "results.md", out / "results.json", out / "timings.json",
             out / "routing_heatmap.txt", out / "mixse" / "mixse_config.json", out / "mixse" / "router.safetensors"]
    for d in DOMAINS:
        files += [out / "data" / f"{d}.jsonl", out / "data" / f"{d}.stats.json", out / "bench" / f"{d}.jsonl"]
    for name in list(DOMAINS) + ["union"]:
        files += [out / "experts" / name / "adapter_config.json", out / "experts" / name / "adapter_model.safetensors"]
    for m in ("ties", "dare"):
        files += [out / "merged" / m / "adapter_config.json", out / "merged" / m / "adapter_model.safetensors"]
    files += [out / "eval" / s / "summary.json" for s in SYSTEMS]
    return files


def test_demo_quick_runs_every_stage_and_a_rerun_skips_them(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--output", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    for i, name in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {name} ..." in err
    missing = [str(p) for p in _expected_files(out) if not p.is_file()]
    assert not missing, missing
    assert f"output: {out}" in err

    table = json.loads((out / "results.json").read_text())
    text = json.dumps(table)
    for system in SYSTEMS:
        assert f"| {system} |" in stdout  # every row printed
        assert f'"{system}"' in text
    header = stdout.splitlines()[0]
    for d in DOMAINS:
        assert d in header
    assert "average" in header and "±" in stdout
    # the routing heat map: benchmark domains x the four experts, printed too
    heat = (out / "routing_heatmap.txt").read_text()
    # the picture (matplotlib comes with the test and demo extras; without it only the text is written)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "routing_heatmap.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    else:
        assert not (out / "routing_heatmap.png").exists() and "matplotlib is not installed" in err
    assert all(d in heat for d in DOMAINS) and heat.strip() in stdout
    timings = json.loads((out / "timings.json").read_text())["stages"]
    assert list(timings) == STAGES and not any(t["skipped"] for t in timings.values())
    # the stage commands' own output went to stderr: stdout holds the table and the heat map only
    assert stdout.count("| system |") == 1

    start = time.perf_counter()
    code = main(["demo", "--quick", "--output", str(out), "--no-progress"])
    elapsed = time.perf_counter() - start
    stdout2, err2 = capsys.readouterr()
    assert code == 0, err2
    assert all(f"{name}: done already, skipped" in err2 for name in STAGES)
    assert "$ selfmoe" not in err2  # no command ran
    assert elapsed < 10
    assert stdout2 == stdout  # same table, same heat map
    rerun = json.loads((out / "timings.json").read_text())["stages"]
    assert all(t["skipped"] for t in rerun.values())
    assert {k: t["seconds"] for k, t in rerun.items()} == {k: t["seconds"] for k, t in timings.items()}


def test_demo_resumes_an_unfinished_stage(tmp_path, capsys):
    """A deleted eval output (as after an interruption before its summary) is redone on rerun, the rest skipped;
    an interrupted stage exits 130 naming it."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "--eval-size", "2"]) == 0
    capsys.readouterr()
    (out / "eval" / "dare" / "summary.json").unlink()
    (out / "results.md").unlink()

    import selfmoe.demo as demo

    real = demo._cli

    def interrupt_compare(stage, argv):
        if stage == "compare":
            raise KeyboardInterrupt
        return real(stage, argv)

    demo._cli = interrupt_compare
    try:
        code = main(["demo", "--quick", "--output", str(out), "--no-progress", "--eval-size", "2"])
    finally:
        demo._cli = real
    err = capsys.readouterr().err
    assert code == 130 and "interrupted in stage compare" in err
    assert "[19/23] eval-dare ..." in err and "eval-base: done already, skipped" in err
    assert (out / "eval" / "dare" / "summary.json").is_file()

    assert main(["demo", "--quick", "--output", str(out), "--no-progress", "--eval-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "[22/23] compare ..." in err and "eval-dare: done already, skipped" in err
    assert (out / "results.md").is_file()


def test_demo_rejects_bad_sizes(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path / "d"), "--eval-size", "0"]) == 2
    assert "--eval-size must be >= 1" in capsys.readouterr().err


def test_demo_reruns_exactly_the_stages_downstream_of_a_redone_one(tmp_path, capsys):
    """A removed expert is trained again, and everything that read it (merges, MiXSE, their evals, the table,
    the heat map) is rebuilt, its stale output cleared first; stages that did not read it stay skipped."""
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--output", str(out), "--no-progress", "--eval-size", "2"]
    assert main(args) == 0
    capsys.readouterr()
    router = out / "mixse" / "router.safetensors"
    before = (router.read_bytes(), router.stat().st_mtime_ns)
    import shutil

    shutil.rmtree(out / "experts" / "math")
    assert main(args) == 0
    err = capsys.readouterr().err
    rerun = {"expert-math", "ties", "dare", "mixse", "eval-math", "eval-ties", "eval-dare", "eval-mixse-top1",
             "eval-mixse-top2", "compare", "heatmap"}
    for name in STAGES:
        if name in rerun:
            assert f"] {name} ..." in err, name
        else:
            assert f"{name}: done already, skipped" in err, name
    assert "mixse: its inputs changed, its old output was removed" in err
    # trained again (written anew), and training is deterministic: the same bytes as the first time
    assert router.stat().st_mtime_ns != before[1] and router.read_bytes() == before[0]
    rows = (out / "pipeline.csv").read_text().splitlines()
    assert rows[0].startswith("stage,seconds,skipped,device") and len(rows) == 1 + len(STAGES)
    timed = {r.split(",")[0]: r.split(",")[1] for r in rows[1:]}
    assert all((timed[n] != "") == (n in rerun) for n in STAGES)


def test_demo_intuition_adds_its_row_to_a_finished_demo(tmp_path, capsys):
    # --intuition on a finished demo: only the intuition MiXSE, its eval and the comparison run
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--output", str(out), "--no-progress", "--eval-size", "2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--intuition"]) == 0
    stdout, err = capsys.readouterr()
    for name in ("mixse-intuition", "eval-mixse-intuition", "compare"):
        assert f"] {name} ..." in err
    for name in ("specialize", "expert-math", "mixse", "eval-mixse-top1", "eval-base"):
        assert f"] {name}: done already, skipped" in err
    assert "| mixse-intuition |" in stdout and "| mixse-top1 |" in stdout
    cfg = json.loads((out / "mixse-intuition" / "mixse_config.json").read_text())
    assert cfg["router"] == "shared" and cfg["intuition"]["clusters"] == len(DOMAINS)
    assert '"mixse-intuition"' in (out / "results.json").read_text()
