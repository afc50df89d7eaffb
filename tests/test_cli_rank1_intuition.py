"""The command line of rank-1 experts and intuition routing: train, save, load, generate (tiny model)."""
import json

import pytest
import torch

from selfmoe import MiXSE
from selfmoe.cli import main
from selfmoe.data import write_jsonl
from selfmoe.tiny_model import load_tiny_lm

from helpers import random_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--no-progress", "--logging-steps", "1",
        "--max-steps", "2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _data(root):
    for domain in ("math", "coding"):
        write_jsonl(root / f"{domain}.jsonl", [{"instruction": f"{domain} question {i} about {'numbers' if domain == 'math' else 'code'}",
                                                "input": "", "output": f"answer {i}", "domain": domain} for i in range(4)])
    return root


@pytest.mark.parametrize("extra,experts", [(["--lora-r", "4", "--intuition", "--intuition-clusters", "3"], 4),
                                           (["--mix-and-match", "2x3", "--top-k", "2"], 6)])
def test_train_expert_rank1_then_generate(lm_path, tmp_path, capsys, extra, experts):
    data = _data(tmp_path / "data")
    out = tmp_path / "mor1e"
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output", out,
                       "--experts", "rank1", *extra, *FAST)
    assert code == 0, err
    cfg = json.loads((out / "mixse_config.json").read_text())
    assert len(cfg["expert_names"]) == experts and cfg["router"] == "per_layer"
    assert (out / "intuition.safetensors").is_file() == ("--intuition" in extra)
    assert json.loads((out / "train_config.json").read_text())["config"]["experts"] == "rank1"
    base, _ = load_tiny_lm(lm_path)
    model = MiXSE.from_pretrained(out, base)
    assert any(m.lora_B.abs().sum() > 0 for m in model.lora_modules.values())  # trained
    model.unload()
    code, stdout, err = run(capsys, "generate", "--model", lm_path, "--mixse", out, "--prompt", "2 + 2?",
                            "--max-new-tokens", "4")
    assert code == 0, err


def test_train_router_intuition(lm_path, tmp_path, capsys):
    data = _data(tmp_path / "data")
    base, _ = load_tiny_lm(lm_path)
    experts = [f"{d}={random_adapter(tmp_path / d, base, seed=i)}" for i, d in enumerate(("math", "coding"))]
    out = tmp_path / "mixse"
    code, _, err = run(capsys, "train-router", "--model", lm_path, "--data", data, "--output", out,
                       "--expert", experts[0], "--expert", experts[1], "--router", "intuition", *FAST)
    assert code == 0, err
    cfg = json.loads((out / "mixse_config.json").read_text())
    assert cfg["router"] == "shared" and cfg["intuition"]["learned_map"] is False and cfg["intuition"]["clusters"] == 2
    from safetensors.torch import load_file

    assert "router.prior_logit" in load_file(str(out / "router.safetensors"))
    model = MiXSE.from_pretrained(out, load_tiny_lm(lm_path)[0])
    # the domains' centroids separate the two domains' prompts
    assert model.intuition.centroids.shape == (2, base.config.hidden_size)
    code, _, err = run(capsys, "generate", "--model", lm_path, "--mixse", out, "--prompt", "hi", "--max-new-tokens", "3")
    assert code == 0, err


def test_rank1_flags_need_rank1(lm_path, tmp_path, capsys):
    data = _data(tmp_path / "data")
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output",
                       tmp_path / "x", "--intuition", *FAST)
    assert code == 2 and "only with --experts rank1" in err
    code, _, err = run(capsys, "train-expert", "--model", lm_path, "--data", data, "--domain", "math", "--output",
                       tmp_path / "x", "--experts", "rank1", "--mix-and-match", "4", *FAST)
    assert code == 2 and "--mix-and-match '4'" in err
