"""The ``selfmoe`` command line, in-process (``selfmoe.cli.main``) and once as ``python -m selfmoe``.

The pipeline test runs every step on a tiny random Llama from a local directory, as a user would:
specialize (generation + filtering) for two domains, an expert per domain, the router, generation with
the MiXSE and with one adapter, and both merge outputs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import selfmoe.cli_bench as cli_bench
import selfmoe.train as train_mod
from selfmoe import choices
from selfmoe import MiXSE
from selfmoe.adapters import load_lora_adapter
from selfmoe.cli import main
from selfmoe.data import read_jsonl, write_jsonl

from _tiny_lm import load_tiny_lm

# Tiny shapes run fastest on one thread (conftest restores the setting after the module).
pytestmark = pytest.mark.usefixtures("one_thread")

RECORD_KEYS = {"instruction", "input", "output", "domain"}
SEEDS = {
    "math": [{"instruction": f"Tom has {i} apples and buys {i + 2} more. How many apples now?",
              "output": f"{i} + {i + 2} = {2 * i + 2} apples."} for i in range(5)],
    "coding": [{"instruction": f"Write a function f{i}(x) that returns x + {i}.",
                "output": f"def f{i}(x):\n    return x + {i}"} for i in range(5)],
}
# Tiny and fast: short generations, garbage kept (a random model rarely stops by itself), few steps.
SPECIALIZE_FAST = ["--num-pairs", "4", "--prompts-per-round", "4", "--batch-size", "4", "--max-attempts", "40",
                   "--brainstorm-max-new-tokens", "12", "--response-max-new-tokens", "12", "--min-instruction-words", "1",
                   "--keep-unfinished", "--no-progress"]
TRAIN_FAST = ["--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--no-progress", "--logging-steps", "1"]


def write_seeds(root):
    for domain, seeds in SEEDS.items():
        write_jsonl(root / f"{domain}.jsonl", [{**s, "domain": domain} for s in seeds])
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- help


def test_python_m_selfmoe_help_runs_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "selfmoe", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("specialize", "train-expert", "train-router", "merge", "generate", "eval", "bench"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("cmd", ["specialize", "train-expert", "train-router", "merge", "prune", "generate", "eval"])
def test_every_subcommand_has_help_with_examples(capsys, cmd):
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "examples:" in out and f"\n  selfmoe {cmd} --" in out


# Each help below runs in one fresh interpreter, in order; the script prints whether torch was loaded
# after each step. STUB: register a bare ``selfmoe`` package, so that only the CLI's own modules load
# (not selfmoe/__init__.py, which imports the whole library).
HELP_STEPS = ["--help", "specialize --help", "merge --help", "prune --help", "generate --help", "eval --help", "demo --help",
              "train-expert --help", "train-router --help"]
HELP_SCRIPT = """
import json, sys, types
if {stub}:
    pkg = types.ModuleType("selfmoe")
    pkg.__path__ = [{pkg_dir!r}]
    sys.modules["selfmoe"] = pkg
from selfmoe.cli import build_parser, main
build_parser()
seen = {{"build_parser": "torch" in sys.modules}}
for step in {steps!r}:
    try:
        main(step.split())
    except SystemExit:
        pass
    seen[step] = "torch" in sys.modules
print(json.dumps(seen))
"""


def torch_loaded_after_each_help(stub: bool):
    script = HELP_SCRIPT.format(stub=stub, pkg_dir=os.path.dirname(choices.__file__), steps=HELP_STEPS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_cli_modules_build_the_parser_and_print_help_without_torch():
    seen = torch_loaded_after_each_help(stub=True)
    # train-expert/train-router --help show TrainConfig's defaults: selfmoe.train_config loads then (torch-free).
    assert not any(seen.values()), seen


def test_selfmoe_help_imports_no_torch():
    seen = torch_loaded_after_each_help(stub=False)
    assert not any(seen.values()), seen


def test_the_library_offers_the_choices_the_cli_offers():
    """One definition each, in selfmoe.choices (torch-free), used by the library and the CLI alike."""
    import ast
    import importlib

    evaluate, merging, routers, train = (importlib.import_module(f"selfmoe.{m}")
                                         for m in ("evaluation", "merging", "routers", "train"))

    tree = ast.parse(open(choices.__file__, encoding="utf-8").read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported <= {"annotations", "math", "Any", "Dict", "Tuple"}, imported  # standard library only
    assert routers.ROUTER_KINDS is choices.ROUTER_KINDS and routers.ROUTING_MODES is choices.ROUTING_MODES
    assert tuple(routers.AUX_LOSSES) == choices.AUX_LOSS_NAMES
    assert merging.MERGE_METHODS == choices.MERGE_METHODS
    assert evaluate.TASKS == choices.EVAL_TASKS
    for field, offered in (("lr_scheduler", choices.LR_SCHEDULERS), ("mixed_precision", choices.MIXED_PRECISIONS),
                           ("router", choices.ROUTER_KINDS)):
        for value in offered:
            train.TrainConfig(**{field: value})
        with pytest.raises(ValueError, match=field):
            train.TrainConfig(**{field: "none-of-these"})


def test_unknown_command_and_missing_flags_are_usage_errors(capsys):
    for argv in (["nope"], ["train-expert", "--model", "m"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


# ------------------------------------------------------------------------------------------ pipeline


def test_pipeline_end_to_end(lm_path, tmp_path, capsys):
    seeds = write_seeds(tmp_path / "seeds")
    data = tmp_path / "data"
    code, _, err = run(capsys, "specialize", "--model", lm_path, "--seeds", seeds, "--output", data, *SPECIALIZE_FAST)
    assert code == 0, err
    assert "math: 4/4 pairs" in err and "coding: 4/4 pairs" in err
    for domain in SEEDS:
        recs = [json.loads(line) for line in (data / f"{domain}.jsonl").read_text().splitlines()]
        assert len(recs) == 4 and all(set(r) == RECORD_KEYS and r["domain"] == domain for r in recs)
        assert all(r["instruction"].strip() and r["output"].strip() for r in recs)
        stats = json.loads((data / f"{domain}.stats.json").read_text())
        assert stats["kept"] == 4 and stats["complete"]

    experts = {}
    for domain in SEEDS:
        out = tmp_path / "experts" / domain
        code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--domain", domain,
                           "--output", out, "--epochs", "2", *TRAIN_FAST)
        assert code == 0, err
        assert f"expert '{domain}' -> {out}" in err
        ad = load_lora_adapter(out)  # PEFT format, trained on this domain only
        assert ad.r == 8 and ad.lora_alpha == 16 and len(ad.weights) == 14
        assert any(B.abs().sum() > 0 for _, B in ad.weights.values())
        run_info = json.loads((out / "train_config.json").read_text())["run"]
        assert run_info["data"]["domains"] == {domain: 4}
        experts[domain] = out

    mixse_dir = tmp_path / "mixse"
    code, _, err = run(capsys, "train-router", "--model", lm_path, "--data", data, "--output", mixse_dir,
                       "--expert", f"math={experts['math']}", "--expert", experts["coding"], "--max-steps", "3", *TRAIN_FAST)
    assert code == 0, err
    for name in ("mixse_config.json", "experts.safetensors", "router.safetensors"):
        assert (mixse_dir / name).is_file()
    config = json.loads((mixse_dir / "mixse_config.json").read_text())
    assert config["expert_names"] == ["math", "coding"] and config["router"] == "shared" and config["top_k"] == 1
    base, _ = load_tiny_lm(lm_path)
    MiXSE.from_pretrained(mixse_dir, base).unload()

    # HyperMoE's HyperExpert and ModuleFormer's concentration loss through the same flags and files
    hyper_dir = tmp_path / "mixse-hyper"
    code, _, err = run(capsys, "train-router", "--model", lm_path, "--data", data, "--output", hyper_dir,
                       "--expert", f"math={experts['math']}", "--expert", experts["coding"], "--max-steps", "2",
                       "--hyper-expert", "--hyper-size", "adapter_dim=4", "--hyper-size", "bottleneck=8",
                       "--aux-loss", "concentration=0.01", *TRAIN_FAST)
    assert code == 0, err
    config = json.loads((hyper_dir / "mixse_config.json").read_text())
    assert config["hyper_expert"]["adapter_dim"] == 4 and config["aux_loss"] == {"concentration": 0.01}
    assert any(k.startswith("hyper.") for k in load_file(str(hyper_dir / "router.safetensors")))
    code, out, err = run(capsys, "generate", "--model", lm_path, "--mixse", hyper_dir, "--prompt", "2 + 2 =",
                         "--max-new-tokens", "4")
    assert code == 0, err
    code, _, err = run(capsys, "train-router", "--model", lm_path, "--data", data, "--output", tmp_path / "bad",
                       "--expert", experts["math"], "--hyper-size", "adapter_dim=4", *TRAIN_FAST)
    assert code == 2 and "pass --hyper-expert too" in err

    (tmp_path / "questions.jsonl").write_text(json.dumps({"instruction": "What is 2 + 2?", "domain": "math"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    code, _, err = run(capsys, "generate", "--model", lm_path, "--mixse", mixse_dir, "--input", tmp_path / "questions.jsonl",
                       "--prompt", "Write a function that adds one.", "--max-new-tokens", "6", "--output", answers,
                       "--routing-stats", "--routing-stats-json", tmp_path / "routing.json")
    assert code == 0, err
    # stderr: one overview (a row per group, a column per expert), not a block per layer
    assert "routing: % of token-slots per expert, all layers" in err and "model.layers" not in err
    table = err[err.index("routing: "):]
    assert "math" in table and "coding" in table and "prompts" in table
    stats = json.loads((tmp_path / "routing.json").read_text())
    assert set(stats) == {"model.layers.0", "model.layers.1"}
    assert set(stats["model.layers.0"]["usage"]) == {"math", "coding"}
    # prune: the most used expert from those statistics; the least used one from routing the math data
    code, _, err = run(capsys, "prune", "--model", lm_path, "--mixse", mixse_dir, "--stats", tmp_path / "routing.json",
                       "--top-n", "1", "--output", tmp_path / "pruned")
    assert code == 0, err
    shares = {e: sum(s["usage"][e] * s["tokens"] for s in stats.values()) for e in ("math", "coding")}
    top = max(shares, key=shares.get)
    pruned = json.loads((tmp_path / "pruned" / "mixse_config.json").read_text())
    assert pruned["expert_names"] == [top] and pruned["pruned_experts"] == [e for e in ("math", "coding") if e != top]
    assert f"pruned 2 -> 1 experts" in err
    code, _, err = run(capsys, "prune", "--model", lm_path, "--mixse", mixse_dir, "--data", data / "math.jsonl",
                       "--top-n", "1", "--output", tmp_path / "pruned-math", "--no-progress")
    assert code == 0, err
    assert "routing: % of token-slots per expert" in err and "data" in err
    assert len(json.loads((tmp_path / "pruned-math" / "mixse_config.json").read_text())["expert_names"]) == 1
    code, _, err = run(capsys, "prune", "--model", lm_path, "--mixse", mixse_dir, "--top-n", "1", "--output", tmp_path / "x")
    assert code == 2 and "--data PATH or --stats FILE" in err
    code, _, err = run(capsys, "prune", "--model", lm_path, "--mixse", mixse_dir, "--keep", "nope", "--output", tmp_path / "x")
    assert code == 2 and "no expert named 'nope'" in err

    rows = read_jsonl(answers, require_domain=False)
    assert [r["instruction"] for r in rows] == ["Write a function that adds one.", "What is 2 + 2?"]
    assert rows[1]["domain"] == "math" and all(isinstance(r["output"], str) for r in rows)

    code, out, err = run(capsys, "generate", "--model", lm_path, "--adapter", experts["math"], "--prompt", "2 + 2 =",
                         "--raw", "--max-new-tokens", "4", "--sample", "--seed", "1")
    assert code == 0, err

    code, _, err = run(capsys, "merge", "--expert", experts["math"], "--expert", experts["coding"], "--method", "ties",
                       "--output", tmp_path / "ties")
    assert code == 0, err
    merged = load_lora_adapter(tmp_path / "ties")
    assert merged.r == 16 and set(merged.weights) == set(load_lora_adapter(experts["math"]).weights)
    code, _, err = run(capsys, "merge", "--expert", experts["math"], "--expert", experts["coding"], "--method", "linear",
                       "--into-base", "--model", lm_path, "--output", tmp_path / "merged-model")
    assert code == 0, err
    merged_model, _ = load_tiny_lm(tmp_path / "merged-model")
    orig, _ = load_tiny_lm(lm_path)
    w_new = merged_model.model.layers[0].self_attn.q_proj.weight
    w_old = orig.model.layers[0].self_attn.q_proj.weight
    delta = sum(load_lora_adapter(experts[d]).delta("model.layers.0.self_attn.q_proj") for d in SEEDS)
    torch.testing.assert_close(w_new, w_old + delta, rtol=1e-5, atol=1e-6)
    assert not torch.equal(w_new, w_old)


def test_train_expert_all_domains_is_the_instance_merging_baseline(lm_path, tmp_path, capsys):
    data = write_seeds(tmp_path / "data")
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--output", tmp_path / "x",
                       "--max-steps", "1", *TRAIN_FAST)
    assert code == 2 and "several domains ['coding', 'math']" in err and "--all-domains" in err
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--all-domains", "--output",
                       tmp_path / "union", "--max-steps", "1", *TRAIN_FAST)
    assert code == 0, err
    info = json.loads((tmp_path / "union" / "train_config.json").read_text())["run"]["data"]
    assert info["domains"] == {"coding": 5, "math": 5}


# ------------------------------------------------------------------------------------------ bad input


def test_seed_errors_exit_2_with_file_and_line(tmp_path, capsys):
    code, _, err = run(capsys, "specialize", "--model", tmp_path / "no-model", "--seeds", tmp_path / "seeds.jsonl",
                       "--output", tmp_path / "out")
    assert code == 2 and "seeds.jsonl" in err and "not found" in err and "Traceback" not in err

    bad = tmp_path / "seeds.jsonl"
    bad.write_text(json.dumps({**SEEDS["math"][0], "domain": "math"}) + "\n" + "{not json\n")
    code, _, err = run(capsys, "specialize", "--model", tmp_path / "no-model", "--seeds", bad, "--output", tmp_path / "out")
    assert code == 2 and "seeds.jsonl:2: invalid JSON" in err and "Traceback" not in err

    few = tmp_path / "few.jsonl"
    write_jsonl(few, [{**s, "domain": "math"} for s in SEEDS["math"][:2]])
    code, _, err = run(capsys, "specialize", "--model", tmp_path / "no-model", "--seeds", few, "--output", tmp_path / "out")
    assert code == 2 and "domain 'math' has 2 seed(s)" in err and "at least 5" in err


def test_bad_model_and_data_paths_exit_2(lm_path, tmp_path, capsys):
    data = write_seeds(tmp_path / "data")
    code, _, err = run(capsys, "train-expert", "--model", tmp_path / "no-model", "--data", data, "--domain", "math",
                       "--output", tmp_path / "o")
    assert code == 2 and "--model" in err and "no-model" in err and "Traceback" not in err
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", tmp_path / "nothing.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "nothing.jsonl" in err
    code, _, err = run(capsys, "train-router", "--model", lm_path, "--data", data, "--expert", f"a={tmp_path}/nope",
                       "--output", tmp_path / "o")
    assert code == 2 and "--expert a=" in err and "not found" in err
    code, _, err = run(capsys, "generate", "--model", lm_path)
    assert code == 2 and "no prompts" in err
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output",
                       tmp_path / "o", "--batch-size", "3", "--micro-batch-size", "2")
    assert code == 2 and "TrainConfig.batch_size" in err


def test_existing_run_is_refused_then_resume_and_overwrite(lm_path, tmp_path, capsys):
    data = write_seeds(tmp_path / "data")
    args = ["train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output", tmp_path / "run",
            "--max-steps", "2", *TRAIN_FAST]
    assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds this training run" in err
    code, _, err = run(capsys, *args, "--lr", "0.05", "--resume")
    assert code == 2 and "different training run" in err and "learning_rate" in err and "Traceback" not in err
    code, _, err = run(capsys, *args, "--lr", "0.05", "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["learning_rate"] == 0.05
    with pytest.raises(SystemExit) as info:  # argparse: mutually exclusive flags
        main([str(a) for a in args] + ["--resume", "--overwrite"])
    assert info.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err


def test_nan_loss_exits_1_naming_the_step(lm_path, tmp_path, capsys):
    """An absurd learning rate blows the LoRA weights up after step 1 (Adam moves each by ~lr)."""
    data = write_seeds(tmp_path / "data")
    out = tmp_path / "run"
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output", out,
                       "--max-steps", "4", "--save-steps", "1", *TRAIN_FAST, "--lr", "1e30")
    assert code == 1 and "step 2" in err and "last good checkpoint" in err and "Traceback" not in err
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    assert not (out / "adapter_model.safetensors").exists()


def test_ctrl_c_exits_130_and_resume_matches_an_uninterrupted_run(lm_path, tmp_path, capsys, monkeypatch):
    data = write_seeds(tmp_path / "data")
    common = ["train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--epochs", "3",
              "--lora-dropout", "0.1", *TRAIN_FAST]
    assert run(capsys, *common, "--output", tmp_path / "ref")[0] == 0

    original = train_mod._Loop._step

    def step_then_ctrl_c(self, group, bar):
        original(self, group, bar)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_mod._Loop, "_step", step_then_ctrl_c)
    code, _, err = run(capsys, *common, "--output", tmp_path / "run")
    assert code == 130 and "interrupted after step 2" in err and "--resume" in err
    monkeypatch.setattr(train_mod._Loop, "_step", original)
    code, _, err = run(capsys, *common, "--output", tmp_path / "run", "--resume")
    assert code == 0, err
    ref = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


# ----------------------------------------------------------------------------------------------- bench


def test_bench_without_a_source_checkout_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_bench, "benchmarks_dir", lambda: tmp_path / "benchmarks")
    code, _, err = run(capsys, "bench", "--shapes", "paper-cpu")
    assert code == 2 and "source checkout" in err and "bench_lora_mix.py" in err


def test_bench_passes_arguments_through(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli_bench.subprocess, "call", lambda cmd, cwd=None: calls.append((cmd, cwd)) or 0)
    assert main(["bench", "--shapes", "paper-cpu", "--reps", "3"]) == 0
    assert main(["bench", "train-step", "--providers", "bare"]) == 0
    (cmd1, cwd1), (cmd2, _) = calls
    assert cmd1[0] == sys.executable and cmd1[1].endswith(os.path.join("benchmarks", "bench_lora_mix.py"))
    assert cmd1[2:] == ["--shapes", "paper-cpu", "--reps", "3"] and os.path.isdir(os.path.join(cwd1, "benchmarks"))
    assert cmd2[1].endswith("bench_train_step.py") and cmd2[2:] == ["--providers", "bare"]
    assert os.path.isfile(cmd1[1])  # this checkout has the benchmarks folder


def test_merge_says_when_the_lora_output_approximates_the_merge(tmp_path, capsys):
    from selfmoe.adapters import save_lora_adapter

    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        factors = {f"model.layers.0.self_attn.{m}": (torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g))
                   for m in ("q_proj", "v_proj")}
        save_lora_adapter(tmp_path / name, factors, r=2, lora_alpha=4.0)
    argv = ["merge", "--expert", tmp_path / "a", "--expert", tmp_path / "b", "--no-progress"]
    code, _, err = run(capsys, *argv, "--method", "linear", "--output", tmp_path / "linear")
    assert code == 0 and "approximated" not in err  # rank 2 + 2 holds a linear merge exactly
    code, _, err = run(capsys, *argv, "--method", "ties", "--output", tmp_path / "ties")
    assert code == 0 and "as a rank-4 LoRA it is approximated" in err and "relative error" in err
