"""PEFT-format adapter I/O (selfmoe.adapters) and atomic writes (selfmoe.io_utils).

Compatibility is checked against the real ``peft`` package both ways on tiny random models: adapters PEFT
saves load here with identical tensors, ranks and scalings; adapters saved here load in PEFT with
identical per-module updates. Bad inputs must fail with an error that names the file / module.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfmoe import adapters as adapters_mod
from selfmoe.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterFormatError,
    LoRAAdapter,
    load_lora_adapter,
    save_lora_adapter,
)
from selfmoe.io_utils import atomic_directory, atomic_write_json

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_PROJ = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    configs = {
        "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig, "phi3": transformers.Phi3Config,
    }
    torch.manual_seed(seed)
    kwargs = dict(TINY)
    if family == "phi3":
        kwargs["pad_token_id"] = 0  # Phi-3's default pad id (32000) is outside the tiny vocabulary
    return transformers.AutoModelForCausalLM.from_config(configs[family](**kwargs)).eval()


def lora_layers(peft_model) -> dict:
    """{module path relative to the base causal LM: PEFT LoRA layer}."""
    prefix = "base_model.model."
    return {name[len(prefix):]: mod for name, mod in peft_model.named_modules()
            if isinstance(mod, peft.tuners.lora.LoraLayer)}


def randomise_lora(peft_model, seed: int = 1) -> None:
    # PEFT initialises lora_B to zero; a zero B would make every comparison of B (and of deltas) vacuous.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def linear_shapes(model, names) -> dict:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names}


def random_factors(shapes: dict, r: int, seed: int = 0, ranks: dict | None = None, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (o, i) in sorted(shapes.items()):
        rm = (ranks or {}).get(module, r)
        out[module] = (torch.randn(rm, i, generator=g).to(dtype), torch.randn(o, rm, generator=g).to(dtype))
    return out


def listing(path: pathlib.Path) -> dict:
    """Relative path -> bytes for every file under `path` (to prove a directory is untouched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------
# PEFT -> selfmoe
# ------------------------------------------------------------------------------------------------------
PEFT_CASES = {
    # Llama with per-module rank and alpha patterns (the patterns are regexes on a path suffix).
    "llama-patterns": ("llama", LLAMA_PROJ, dict(rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
                                                 alpha_pattern={"o_proj": 3.0})),
    "llama-rslora": ("llama", LLAMA_PROJ, dict(use_rslora=True)),
    "mistral": ("mistral", LLAMA_PROJ, {}),
    "qwen2": ("qwen2", LLAMA_PROJ, {}),
    "gemma": ("gemma", LLAMA_PROJ, {}),
    "phi3-fused": ("phi3", PHI3_PROJ, {}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_saved_adapter_loads_with_identical_tensors_ranks_and_scalings(tmp_path, case):
    family, targets, extra = PEFT_CASES[case]
    pm = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  task_type="CAUSAL_LM", **extra))
    randomise_lora(pm)
    pm.save_pretrained(tmp_path)

    adapter = load_lora_adapter(tmp_path)

    layers = lora_layers(pm)
    assert len(layers) == 2 * len(targets)
    assert set(adapter.weights) == set(layers)
    assert adapter.r == 4 and adapter.lora_alpha == 8
    assert sorted(adapter.target_modules) == sorted(targets)
    for module, layer in layers.items():
        A, B = adapter.weights[module]
        assert torch.equal(A, layer.lora_A["default"].weight.detach()), module
        assert torch.equal(B, layer.lora_B["default"].weight.detach()), module
        assert adapter.rank_for(module) == layer.r["default"], module
        assert adapter.scaling_for(module) == pytest.approx(layer.scaling["default"], rel=1e-12), module
        # The update PEFT adds to the weight, orientation included.
        torch.testing.assert_close(adapter.delta(module), layer.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
    if case == "llama-patterns":  # the patterns really changed something
        assert adapter.rank_for("model.layers.1.self_attn.q_proj") == 2
        assert adapter.rank_for("model.layers.0.self_attn.q_proj") == 4
        assert adapter.rank_for("model.layers.0.mlp.down_proj") == 3
        assert adapter.scaling_for("model.layers.0.self_attn.o_proj") == pytest.approx(3.0 / 4)
    if case == "llama-rslora":
        assert adapter.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(8 / math.sqrt(4))


def test_load_dtype_and_device_arguments(tmp_path):
    weights = random_factors({"model.layers.0.self_attn.q_proj": (64, 64)}, r=2)
    save_lora_adapter(tmp_path, weights, r=2, lora_alpha=4)
    a16 = load_lora_adapter(tmp_path, dtype=torch.float16, device=torch.device("cpu"))
    A, B = a16.weights["model.layers.0.self_attn.q_proj"]
    assert A.dtype == B.dtype == torch.float16
    assert torch.equal(A, weights["model.layers.0.self_attn.q_proj"][0].half())


# ------------------------------------------------------------------------------------------------------
# selfmoe -> PEFT
# ------------------------------------------------------------------------------------------------------
def test_saved_adapter_loads_in_peft_with_identical_updates(tmp_path):
    base = tiny_model("llama")
    shapes = linear_shapes(base, LLAMA_PROJ)
    odd = "model.layers.1.mlp.up_proj"  # a module at another rank: must reach PEFT through rank_pattern
    weights = random_factors(shapes, r=4, ranks={odd: 2}, seed=3)
    save_lora_adapter(tmp_path, weights, r=4, lora_alpha=8, base_model_name_or_path="tiny-llama",
                      extra_config={"alpha_pattern": {"v_proj": 2.0}})

    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == "tiny-llama"
    assert sorted(config["target_modules"]) == sorted(LLAMA_PROJ)
    assert list(config["rank_pattern"].values()) == [2]
    keys = set(load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME)))
    assert f"base_model.model.{odd}.lora_A.weight" in keys and len(keys) == 2 * len(shapes)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected keys: make that fail
        pm = peft.PeftModel.from_pretrained(base, tmp_path)
    ours = load_lora_adapter(tmp_path)
    layers = lora_layers(pm)
    assert set(layers) == set(weights)
    for module, layer in layers.items():
        A, B = weights[module]
        assert layer.r["default"] == A.shape[0], module
        assert torch.equal(layer.lora_A["default"].weight.detach(), A), module
        assert torch.equal(layer.lora_B["default"].weight.detach(), B), module
        assert layer.scaling["default"] == pytest.approx(ours.scaling_for(module), rel=1e-12), module
        torch.testing.assert_close(layer.get_delta_weight("default"), ours.delta(module), rtol=1e-6, atol=1e-7)
    assert layers[odd].r["default"] == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(2.0 / 4)


def test_round_trip_keeps_tensors_dtype_and_config(tmp_path):
    weights = random_factors({"model.layers.0.self_attn.q_proj": (32, 64), "model.layers.0.mlp.down_proj": (64, 16)},
                             r=3, dtype=torch.bfloat16)
    save_lora_adapter(tmp_path, weights, r=3, lora_alpha=5.5, extra_config={"use_rslora": True, "lora_dropout": 0.05})
    a = load_lora_adapter(tmp_path)
    assert a.target_modules == ["down_proj", "q_proj"]
    assert a.config["lora_dropout"] == 0.05
    assert a.scaling_for("model.layers.0.mlp.down_proj") == pytest.approx(5.5 / math.sqrt(3))
    for m, (A, B) in weights.items():
        assert a.weights[m][0].dtype == torch.bfloat16
        assert torch.equal(a.weights[m][0], A) and torch.equal(a.weights[m][1], B)


def test_rank_alpha_scaling_follow_peft_pattern_rules():
    cfg = {"rank_pattern": {"layers.1.self_attn.q_proj": 2, "q_proj": 6}, "alpha_pattern": {"o_proj": 4}}
    w = {"model.layers.1.self_attn.q_proj": (torch.ones(2, 3), torch.ones(5, 2)),
         "model.layers.0.self_attn.q_proj": (torch.ones(6, 3), torch.ones(5, 6)),
         "model.layers.0.self_attn.qq_proj": (torch.ones(8, 3), torch.ones(5, 8)),
         "model.layers.0.self_attn.o_proj": (torch.ones(8, 3), torch.ones(5, 8))}
    a = LoRAAdapter(r=8, lora_alpha=16, target_modules=["q_proj", "qq_proj", "o_proj"], weights=w, config=cfg)
    assert a.rank_for("model.layers.1.self_attn.q_proj") == 2  # first matching pattern wins
    assert a.rank_for("model.layers.0.self_attn.q_proj") == 6
    assert a.rank_for("model.layers.0.self_attn.qq_proj") == 8  # "q_proj" must match a whole path component
    assert a.scaling_for("model.layers.1.self_attn.q_proj") == 16 / 2
    assert a.scaling_for("model.layers.0.self_attn.o_proj") == 4 / 8
    assert a.alpha_for("model.layers.0.self_attn.qq_proj") == 16
    torch.testing.assert_close(a.delta("model.layers.0.self_attn.o_proj"), torch.full((5, 3), 8 * 0.5))
    with pytest.raises(KeyError, match="v_proj"):
        a.delta("model.layers.0.self_attn.v_proj")


def test_adapter_constructor_rejects_rank_mismatch():
    with pytest.raises(AdapterFormatError, match=r"q_proj.*config rank is 4.*\[3, 8\].*\[5, 3\]"):
        LoRAAdapter(r=4, lora_alpha=8, target_modules=["q_proj"],
                    weights={"m.q_proj": (torch.zeros(3, 8), torch.zeros(5, 3))})


# ------------------------------------------------------------------------------------------------------
# Bad adapter directories: clear errors naming the file / module, never a partial adapter
# ------------------------------------------------------------------------------------------------------
GOOD_MODULES = {"model.layers.0.self_attn.q_proj": (16, 8), "model.layers.0.mlp.up_proj": (24, 8)}


@pytest.fixture
def good_dir(tmp_path) -> pathlib.Path:
    path = tmp_path / "adapter"
    save_lora_adapter(path, random_factors(GOOD_MODULES, r=4), r=4, lora_alpha=8)
    return path


def _edit_config(path: pathlib.Path, **changes) -> None:
    config = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    config.update(changes)
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))


def _edit_tensors(path: pathlib.Path, fn) -> None:
    file = path / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_lora_adapter(tmp_path / "nope")


def test_missing_config(good_dir):
    (good_dir / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora_adapter(good_dir)


def test_config_not_json(good_dir):
    (good_dir / ADAPTER_CONFIG_NAME).write_text("{\"r\": 4,")
    with pytest.raises(AdapterFormatError, match="adapter_config.json.*not valid JSON"):
        load_lora_adapter(good_dir)


def test_missing_weights(good_dir):
    (good_dir / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_lora_adapter(good_dir)


def test_pickle_weights_are_refused(good_dir):
    (good_dir / ADAPTER_WEIGHTS_NAME).unlink()
    torch.save({}, good_dir / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin.*pickle"):
        load_lora_adapter(good_dir)


@pytest.mark.parametrize("keep", [0, 7, 9, 60, 0.5, -1])
def test_truncated_safetensors(good_dir, keep):
    file = good_dir / ADAPTER_WEIGHTS_NAME
    data = file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    file.write_bytes(data[:n])
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors.*corrupt or truncated"):
        load_lora_adapter(good_dir)


def test_lora_A_without_lora_B(good_dir):
    _edit_tensors(good_dir, lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"))
    with pytest.raises(AdapterFormatError, match=r"model\.layers\.0\.mlp\.up_proj.*has lora_A but no lora_B"):
        load_lora_adapter(good_dir)


def test_lora_B_without_lora_A(good_dir):
    _edit_tensors(good_dir, lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"))
    with pytest.raises(AdapterFormatError, match=r"up_proj.*has lora_B but no lora_A"):
        load_lora_adapter(good_dir)


def test_config_rank_disagrees_with_weights(good_dir):
    _edit_config(good_dir, r=3)
    with pytest.raises(AdapterFormatError,
                       match=r"adapter_model\.safetensors.*module 'model\.layers\.0\.mlp\.up_proj'.*config rank is 3"
                             r".*lora_A has shape \[4, 8\].*lora_B has shape \[24, 4\]"):
        load_lora_adapter(good_dir)


def test_lora_A_and_lora_B_ranks_disagree(good_dir):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_tensors(good_dir, lambda t: t.__setitem__(key, torch.zeros(16, 5)))
    with pytest.raises(AdapterFormatError, match=r"q_proj.*\[4, 8\].*\[16, 5\]"):
        load_lora_adapter(good_dir)


@pytest.mark.parametrize("peft_type", ["LOHA", "IA3", None])
def test_non_lora_peft_type(good_dir, peft_type):
    _edit_config(good_dir, peft_type=peft_type)
    with pytest.raises(AdapterFormatError, match=f"adapter_config.json: peft_type is {peft_type!r}"):
        load_lora_adapter(good_dir)


@pytest.mark.parametrize("option,value", [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"),
                                          ("fan_in_fan_out", True), ("task_type", "SEQ_CLS")])
def test_unsupported_options_are_named(good_dir, option, value):
    _edit_config(good_dir, **{option: value})
    with pytest.raises(AdapterFormatError, match=f"adapter_config.json: .*{option}"):
        load_lora_adapter(good_dir)


@pytest.mark.parametrize("extra_key", [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",  # DoRA
    "base_model.model.lm_head.weight",  # modules_to_save
    "model.layers.0.self_attn.q_proj.lora_A.weight",  # missing base_model.model. prefix
])
def test_unexpected_keys(good_dir, extra_key):
    _edit_tensors(good_dir, lambda t: t.__setitem__(extra_key, torch.zeros(4)))
    with pytest.raises(AdapterFormatError, match=f"unexpected keys '{extra_key}'"):
        load_lora_adapter(good_dir)


def test_non_finite_weights(good_dir):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(good_dir, lambda t: t[key].__setitem__((0, 0), float("nan")))
    with pytest.raises(AdapterFormatError, match=r"up_proj.*lora_A.*NaN"):
        load_lora_adapter(good_dir)


def test_weights_outside_target_modules(good_dir):
    _edit_config(good_dir, target_modules=["q_proj"])
    with pytest.raises(AdapterFormatError, match=r"model\.layers\.0\.mlp\.up_proj.*not matched by target_modules"):
        load_lora_adapter(good_dir)


def test_regex_target_modules_are_accepted(good_dir):
    _edit_config(good_dir, target_modules=r".*\.(q_proj|up_proj)")
    assert load_lora_adapter(good_dir).target_modules == ["q_proj", "up_proj"]


# ------------------------------------------------------------------------------------------------------
# save_lora_adapter validation and atomicity
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,match", [
    ({"m.q_proj": (torch.zeros(4, 8), torch.zeros(16, 3))}, r"'m\.q_proj'.*\[4, 8\].*\[16, 3\]"),
    ({"m.q_proj": (torch.zeros(4, 8, 1), torch.zeros(16, 4))}, r"'m\.q_proj': lora_A must be 2-D"),
    ({"base_model.model.m.q_proj": (torch.zeros(4, 8), torch.zeros(16, 4))}, r"without the 'base_model\.model\.'"),
    ({"m.q_proj": (torch.zeros(4, 8, dtype=torch.int64), torch.zeros(16, 4))}, r"'m\.q_proj': lora_A must be floating"),
    ({}, "weights is empty"),
])
def test_save_rejects_bad_weights_before_writing(tmp_path, weights, match):
    with pytest.raises(AdapterFormatError, match=match):
        save_lora_adapter(tmp_path / "out", weights, r=4, lora_alpha=8)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_modules_outside_target_modules(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"'m\.up_proj' is not matched by target_modules"):
        save_lora_adapter(tmp_path / "out", random_factors({"m.q_proj": (4, 4), "m.up_proj": (4, 4)}, r=2),
                          r=2, lora_alpha=2, target_modules=["q_proj"])


def test_save_rejects_extra_config_clashing_with_arguments(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"extra_config must not set \['r'\]"):
        save_lora_adapter(tmp_path / "out", random_factors({"m.q_proj": (4, 4)}, r=2), r=2, lora_alpha=2,
                          extra_config={"r": 4})


def test_save_overwrite_false_keeps_existing(good_dir):
    before = listing(good_dir)
    with pytest.raises(FileExistsError, match="overwrite=False"):
        save_lora_adapter(good_dir, random_factors({"m.q_proj": (4, 4)}, r=2), r=2, lora_alpha=2, overwrite=False)
    assert listing(good_dir) == before


def test_failed_save_leaves_previous_adapter_intact(good_dir, monkeypatch):
    before = listing(good_dir)

    def half_write_then_crash(filename, data):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters_mod, "write_bytes", half_write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora_adapter(good_dir, random_factors({"m.q_proj": (4, 4)}, r=2), r=2, lora_alpha=2)
    assert listing(good_dir) == before
    assert sorted(p.name for p in good_dir.parent.iterdir()) == [good_dir.name]  # no temp leftovers
    load_lora_adapter(good_dir)


def test_save_replaces_previous_adapter_completely(good_dir):
    save_lora_adapter(good_dir, random_factors({"m.q_proj": (4, 4)}, r=2), r=2, lora_alpha=2)
    assert sorted(load_lora_adapter(good_dir).weights) == ["m.q_proj"]
    assert sorted(p.name for p in good_dir.parent.iterdir()) == [good_dir.name]


# ------------------------------------------------------------------------------------------------------
# io_utils
# ------------------------------------------------------------------------------------------------------
def test_atomic_directory_creates_new_path_and_parents(tmp_path):
    target = tmp_path / "a" / "b"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not target.exists()
        (tmp / "x.txt").write_text("new")
    assert (target / "x.txt").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b"]


def test_atomic_directory_replaces_existing(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(target) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_directory_exception_leaves_path_untouched(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert listing(target) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_directory_exception_on_new_path_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_overwrite_false(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    with atomic_directory(target, overwrite=False) as tmp:  # an empty directory may be filled
        (tmp / "f").write_text("1")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(target, overwrite=False):
            pytest.fail("the body must not run when the target exists")
    assert listing(target) == {"f": b"1"}


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "f"):
            pass
    assert (tmp_path / "f").read_text() == "keep"


def test_atomic_directory_rolls_back_when_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory in: fail after the old one was moved aside
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (failed) in, rollback
    assert listing(target) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_directory_through_symlink_replaces_the_real_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_directory(link) as tmp:
        (tmp / "new").write_text("new")
    assert link.is_symlink() and listing(real) == {"new": b"new"}


def test_atomic_directory_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d"):
            pass
        atomic_write_json(tmp_path / "f.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_atomic_write_json(tmp_path):
    path = tmp_path / "sub" / "c.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, None]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5, None]}
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    for bad, exc in (({"x": object()}, TypeError), ({"x": float("nan")}, ValueError)):
        with pytest.raises(exc):
            atomic_write_json(path, bad)
    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.json"]


def test_atomic_write_text_failed_replace_keeps_the_old_file(tmp_path, monkeypatch):
    from selfmoe import io_utils

    path = tmp_path / "sub" / "log.jsonl"
    io_utils.atomic_write_text(path, "one\ntwo\n")
    assert path.read_bytes() == b"one\ntwo\n"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io_utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io_utils.atomic_write_text(path, "three\n")
    assert path.read_bytes() == b"one\ntwo\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["log.jsonl"]  # no temporary left behind
