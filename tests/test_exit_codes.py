"""The command line's exit-code contract, case by case: 0 ok, 1 NaN/inf loss (only that), 2 user or
input error, 130 interrupted, 3 internal error. Every error is one line naming the file or the flag,
never a traceback. (The NaN (1) and Ctrl-C (130) cases run in test_cli.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import selfmoe.cli as cli
from selfmoe import MiXSE
from selfmoe.cli import main
from selfmoe.data import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = {"instruction": "Tom has 3 apples and buys 2 more. How many apples now?", "output": "3 + 2 = 5 apples."}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line or ": internal error: " in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def mixse_dir(lm_path, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(lm_path)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mixse")
    MiXSE.from_scratch(base, 2, r=2, expert_names=["a", "b"]).save_pretrained(out)
    return out


def case_device_without_cuda(tmp_path, lm_path, mixse_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["generate", "--model", lm_path, "--prompt", "hi", "--device", "cuda"], "--device cuda: CUDA is not available"


def case_non_utf8_jsonl(tmp_path, lm_path, mixse_dir):
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps({**SEED, "domain": "math"}).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n')
    return (["train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output", tmp_path / "o"],
            "data.jsonl:2: not UTF-8")


def case_mixse_modules_as_list(tmp_path, lm_path, mixse_dir):
    import shutil

    bad = tmp_path / "mixse"
    shutil.copytree(mixse_dir, bad)
    cfg = json.loads((bad / "mixse_config.json").read_text())
    cfg["modules"] = list(cfg["modules"])
    (bad / "mixse_config.json").write_text(json.dumps(cfg))
    return (["generate", "--model", lm_path, "--mixse", bad, "--prompt", "hi", "--max-new-tokens", "2"],
            "mixse_config.json: modules must be an object")


def case_unsafe_domain_in_seeds(tmp_path, lm_path, mixse_dir):
    seeds = tmp_path / "seeds.jsonl"
    write_jsonl(seeds, [{**SEED, "domain": "math"}] * 2 + [{**SEED, "domain": "../../escaped"}])
    return (["specialize", "--model", lm_path, "--seeds", seeds, "--output", tmp_path / "out"],
            "seeds.jsonl:3: 'domain' '../../escaped' is not a safe name")


def case_absolute_domain_in_seeds(tmp_path, lm_path, mixse_dir):
    seeds = tmp_path / "seeds.jsonl"
    write_jsonl(seeds, [{**SEED, "domain": str(tmp_path / "abs")}])
    return (["specialize", "--model", lm_path, "--seeds", seeds, "--output", tmp_path / "out"],
            "seeds.jsonl:1: 'domain'")


def case_unsafe_expert_name(tmp_path, lm_path, mixse_dir):
    (tmp_path / "e").mkdir()
    return (["train-router", "--model", lm_path, "--data", tmp_path, "--expert", f"../x={tmp_path / 'e'}",
             "--output", tmp_path / "o"], "--expert '../x=")


CASES = [case_device_without_cuda, case_non_utf8_jsonl, case_mixse_modules_as_list, case_unsafe_domain_in_seeds,
         case_absolute_domain_in_seeds, case_unsafe_expert_name]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_input_errors_exit_2_with_one_line_naming_the_file_or_flag(case, tmp_path, lm_path, mixse_dir, capsys):
    argv, message = case(tmp_path, lm_path, mixse_dir)
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert message in one_line_error(err)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # nothing written beside the test's folder
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jsonl"))


def test_a_bug_is_one_line_exit_3_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise KeyError("some internal key")

    monkeypatch.setattr(cli, "_cmd_merge", broken)
    code, _, err = run(capsys, "merge", "--expert", "x", "--method", "linear", "--output", "y")
    assert code == 3
    line = one_line_error(err)
    assert "internal error: KeyError" in line and "--debug" in line
    with pytest.raises(KeyError):
        main(["--debug", "merge", "--expert", "x", "--method", "linear", "--output", "y"])


def test_merge_of_experts_from_different_bases_warns_or_is_refused_with_strict(tmp_path, capsys):
    from selfmoe.adapters import save_lora_adapter

    g = torch.Generator().manual_seed(0)
    for name, base in (("a", "org/base-one"), ("b", "org/base-two")):
        factors = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))}
        save_lora_adapter(tmp_path / name, factors, r=2, lora_alpha=4.0, base_model_name_or_path=base)
    argv = ["merge", "--expert", tmp_path / "a", "--expert", tmp_path / "b", "--method", "linear"]
    with pytest.warns(UserWarning, match="different base models"):
        code, _, err = run(capsys, *argv, "--output", tmp_path / "merged")
    assert code == 0, err
    code, _, err = run(capsys, *argv, "--output", tmp_path / "strict", "--strict")
    assert code == 2 and "different base models" in one_line_error(err) and "base-two" in err
    assert not (tmp_path / "strict").exists()


# ------------------------------------------------------------------------------------------------------
# training runs: damaged checkpoints and a full disk, through the CLI

TRAIN_ARGS = ["--domain", "math", "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
              "--save-steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(lm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_jsonl(root / "math.jsonl", [{**SEED, "instruction": f"{SEED['instruction']} ({i})", "domain": "math"}
                                      for i in range(4)])
    out = root / "out"
    assert main([str(a) for a in ["train-expert", "--model", lm_path, "--data", root / "math.jsonl", "--output", out,
                                  *TRAIN_ARGS]]) == 0
    return root


def train_argv(lm_path, root, out):
    return ["train-expert", "--model", lm_path, "--data", root / "math.jsonl", "--output", out, *TRAIN_ARGS]


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt"])
def test_a_truncated_checkpoint_file_on_resume_is_exit_2_naming_it(name, finished_run, lm_path, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_run / "out", out)
    damaged = out / "checkpoint" / name
    damaged.write_bytes(damaged.read_bytes()[:50])
    code, _, err = run(capsys, *train_argv(lm_path, finished_run, out), "--resume")
    assert code == 2, err
    line = one_line_error(err)
    assert str(damaged) in line and "--overwrite" in line


def test_a_full_disk_while_saving_a_checkpoint_is_exit_2_naming_the_file(finished_run, lm_path, tmp_path, capsys,
                                                                          monkeypatch):
    import errno
    import os

    import selfmoe.io_utils as io_utils

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is being written")
    real = io_utils._write_all

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(io_utils, "_write_all", full_disk)
    code, _, err = run(capsys, *train_argv(lm_path, finished_run, tmp_path / "out"))
    assert code == 2, err
    line = one_line_error(err)
    assert "optimizer.pt" in line and "No space left on device" in line and str(tmp_path / "out") in line
