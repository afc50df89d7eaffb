"""Saved files are byte-identical for identical contents, whatever the process: safetensors itself writes
its metadata in hash-map order, which changes from one process to the next, so a resumed run's files
would differ from an uninterrupted run's by sha256 although every tensor is equal."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import torch
from safetensors.torch import load, save

from selfmoe.io_utils import safetensors_bytes

SCRIPT = """
import hashlib, torch
from selfmoe.io_utils import safetensors_bytes
{save}
t = {{f"w{{i}}": torch.arange(i + 1, dtype=torch.float32) for i in range(5)}}
m = {{k: str(i) for i, k in enumerate(["format", "step", "selfmoe_version", "alpha", "zeta", "beta", "gamma"])}}
print(hashlib.sha256({fn}(t, metadata=m)).hexdigest())
"""


def digests(fn: str, runs: int = 4) -> set:
    script = SCRIPT.format(save="from safetensors.torch import save", fn=fn)
    return {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(runs)}


def test_safetensors_bytes_are_the_same_in_every_process():
    assert len(digests("safetensors_bytes")) == 1


def test_safetensors_bytes_load_back_with_the_same_tensors_and_metadata():
    tensors = {"b": torch.randn(3, 4), "a": torch.arange(6, dtype=torch.int64), "c": torch.randn(2).half()}
    meta = {"format": "pt", "step": "7", "z": "last"}
    data = safetensors_bytes(tensors, metadata=meta)
    assert len(data) == len(save(tensors, metadata=meta))  # same layout: only the header's key order differs
    back = load(data)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    from safetensors import safe_open
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        with safe_open(path, "pt") as f:
            assert f.metadata() == meta


def test_saved_adapters_and_mixse_directories_are_byte_identical(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfmoe import MiXSE, save_lora_adapter

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    weights = {n: (torch.randn(2, m.in_features), torch.randn(m.out_features, 2))
               for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    for name in ("a1", "a2"):
        save_lora_adapter(tmp_path / name, weights, r=2, lora_alpha=4)
    model = MiXSE.from_adapters(base, {"a": tmp_path / "a1", "b": tmp_path / "a2"})
    model.save_pretrained(tmp_path / "m1")
    model.save_pretrained(tmp_path / "m2")

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha(tmp_path / "a1" / "adapter_model.safetensors") == sha(tmp_path / "a2" / "adapter_model.safetensors")
    for f in ("experts.safetensors", "router.safetensors", "mixse_config.json"):
        assert sha(tmp_path / "m1" / f) == sha(tmp_path / "m2" / f)
