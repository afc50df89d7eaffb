"""The run directory: what identifies a run, claiming a directory for it, its log, and publishing the
final model into it.

An output directory is one **run**::

    train_config.json      TrainConfig + what identifies the run (kind, data fingerprint, experts, base)
    log.jsonl              one JSON object per logging step (loss, lr, grad_norm, tokens/s) and events
    checkpoint/            the latest checkpoint (see :mod:`selfmoe.checkpoints`)
    adapter_config.json, adapter_model.safetensors            (expert; PEFT format), or
    mixse_config.json, experts.safetensors, router.safetensors (router; MiXSE format)

The final files appear once training has finished (their ``.json`` config last, so a directory with a
config is complete). A directory holding another run is refused unless ``overwrite=True``, which removes
exactly the files a run writes (:data:`RUN_NAMES`) and never a user's other files; the same run without
``resume=True`` is refused too (nothing is overwritten by accident). Resuming cuts the log back to the
checkpoint's step (:func:`truncate_log`), so the log holds every step exactly once. A failed write (a full
disk) raises :class:`~selfmoe.io_utils.WriteError` (an ``OSError``) naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import uuid
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from .adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .data import Record, SFTDataset, append_jsonl
from .io_utils import WriteError, atomic_write_json, atomic_write_text, fsync_path
from .mixse_config import CONFIG_NAME as MIXSE_CONFIG_NAME
from .mixse_config import EXPERTS_NAME, ROUTER_NAME
from .train_config import BOOKKEEPING_FIELDS, TrainConfig
from .version import __version__

__all__ = ["RUN_CONFIG_NAME", "LOG_NAME", "CHECKPOINT_DIR", "CHECKPOINT_TEMPS", "FINAL_NAMES", "RUN_NAMES",
           "TEMP_PREFIXES", "run_record", "record_differences", "data_info", "dataset_fingerprint", "base_signature",
           "file_sha256", "prepare_output_dir", "remove_leftovers", "append_log", "truncate_log", "publish"]

RUN_CONFIG_NAME = "train_config.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_TEMPS = (f".{CHECKPOINT_DIR}.tmp-", f".{CHECKPOINT_DIR}.old-")  # io_utils.atomic_directory's siblings
# Every file a run may create, so --overwrite removes exactly these and never a user's other files.
FINAL_NAMES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MIXSE_CONFIG_NAME, EXPERTS_NAME, ROUTER_NAME)
RUN_NAMES = (RUN_CONFIG_NAME, LOG_NAME, CHECKPOINT_DIR) + FINAL_NAMES
# ("..final.tmp-": what atomic_directory puts next to the staging directory while export writes into it)
TEMP_PREFIXES = (f".{CHECKPOINT_DIR}.", ".final.tmp-", "..final.tmp-", f".{RUN_CONFIG_NAME}.", f".{LOG_NAME}.")


# ----------------------------------------------------------------------------------------------------
# What identifies a run (compared on resume)


def run_record(config: TrainConfig, run_info: Mapping[str, Any]) -> Dict[str, Any]:
    return {"config": config.to_dict(), "run": json.loads(json.dumps(dict(run_info))), "selfmoe_version": __version__}


def _identity(record: Mapping[str, Any]) -> Dict[str, Any]:
    cfg = {k: v for k, v in dict(record.get("config") or {}).items() if k not in BOOKKEEPING_FIELDS}
    run = {k: v for k, v in dict(record.get("run") or {}).items() if k != "base_model"}
    return {"config": cfg, "run": run}


def record_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """Human-readable ``field: saved -> new`` lines where two runs differ."""
    a, b = _identity(saved), _identity(new)
    out = []
    for section in ("config", "run"):
        for key in sorted(set(a[section]) | set(b[section])):
            va, vb = a[section].get(key), b[section].get(key)
            if va != vb:
                def short(v: Any) -> str:
                    s = json.dumps(v, sort_keys=True)
                    return s if len(s) <= 80 else s[:77] + "..."
                out.append(f"{key}: {short(va)} (saved) vs {short(vb)} (now)")
    return out


def dataset_fingerprint(dataset: SFTDataset) -> str:
    """sha256 of every example's ids and labels: covers the records, the tokenizer and max_length."""
    h = hashlib.sha256()
    for ex in dataset.examples:
        h.update(np.asarray([len(ex["input_ids"])], dtype=np.int64).tobytes())
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_info(records: Sequence[Record], dataset: SFTDataset) -> Dict[str, Any]:
    domains: Dict[str, int] = {}
    for r in records:
        key = str(r.get("domain"))
        domains[key] = domains.get(key, 0) + 1
    return {"fingerprint": dataset_fingerprint(dataset), "records": len(records), "examples": len(dataset),
            "dropped": dataset.num_dropped, "domains": dict(sorted(domains.items()))}


def base_signature(model: nn.Module) -> Dict[str, Any]:
    """Architecture facts of the base model that a resumed run must share (hashing 14 GB of weights
    to check identity would cost minutes; a moved model directory should still resume)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return {k: getattr(cfg, k, None) for k in keys}


# ----------------------------------------------------------------------------------------------------
# The directory, its log and the final model


def _clear_run(out: pathlib.Path) -> None:
    """Remove what a run writes (and only that: a user's other files in the directory stay)."""
    for child in out.iterdir():
        if child.name in RUN_NAMES or child.name.startswith(TEMP_PREFIXES):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def prepare_output_dir(out: pathlib.Path, record: Dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """Check ``out`` against the run about to start (``record``: :func:`run_record`) and claim it; return
    True when ``out`` already holds this run and ``resume`` continues it (its checkpoints:
    :func:`selfmoe.checkpoints.checkpoint_candidates`), False when the run starts from scratch.

    Raises ``FileExistsError`` (another run, or this run without ``resume``/``overwrite``),
    ``NotADirectoryError``, ``ValueError`` (both flags).
    """
    if resume and overwrite:
        raise ValueError("pass resume or overwrite, not both")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output path exists and is not a directory")
    saved_path = out / RUN_CONFIG_NAME
    if overwrite and out.is_dir():
        _clear_run(out)
    saved: Optional[Dict[str, Any]] = None
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FileExistsError(f"{saved_path}: unreadable run config ({exc}); pass overwrite to start over") from None
    if saved is None:
        leftovers = [c.name for c in out.iterdir() if not c.name.startswith(".")] if out.is_dir() else []
        if leftovers and not overwrite:
            raise FileExistsError(
                f"{out}: directory is not empty and holds no selfmoe training run ({', '.join(sorted(leftovers)[:5])}); "
                "choose another output directory, or pass overwrite to replace a run's files there")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved_path, record)
        return False
    diffs = record_differences(saved, record)
    if diffs:
        raise FileExistsError(
            f"{out} holds a different training run ({saved_path}); refusing to " + ("resume it" if resume else "touch it")
            + ". Differences: " + "; ".join(diffs) + ". Use another output directory, or overwrite to start over.")
    if not resume:
        raise FileExistsError(f"{out} already holds this training run; pass resume to continue it or overwrite to start over")
    atomic_write_json(saved_path, record)  # bookkeeping fields may have changed
    return True


def append_log(out: pathlib.Path, entry: Mapping[str, Any]) -> None:
    """Append one line to the run's ``log.jsonl``; a failed write raises :class:`~selfmoe.io_utils.WriteError`
    naming the log."""
    path = out / LOG_NAME
    try:
        append_jsonl(path, [entry])
    except OSError as exc:
        raise WriteError.wrap(exc, path) from exc


def truncate_log(path: pathlib.Path, step: int) -> None:
    """Drop log lines written after ``step`` (the resumed run writes them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
        line_step = obj.get("step", 0) if isinstance(obj, dict) else None
        if isinstance(line_step, int) and line_step <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def _os_error_code(exc: BaseException) -> Optional[int]:
    """The errno of an OSError, or of a library error that only quotes it (safetensors: "... (os error 28)")."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return int(m.group(1)) if m else None


def publish(out: pathlib.Path, export: Callable[[pathlib.Path], None]) -> None:
    """Write the final model with ``export`` into a staging directory, then move its files into ``out``,
    ``.json`` configs last: a directory that shows a config holds the complete model.

    A failed write (a full disk) raises :class:`~selfmoe.io_utils.WriteError` naming the final file when
    the failure says which one (``out`` otherwise); nothing in ``out`` has been replaced by then."""
    staging = out / f".final.tmp-{uuid.uuid4().hex[:12]}"
    try:
        export(staging)
        names = sorted(os.listdir(staging), key=lambda n: (n.endswith(".json"), n))
        for name in names:
            os.replace(staging / name, out / name)
        fsync_path(out, directory=True)
    except Exception as exc:
        code = _os_error_code(exc)
        if code is None:
            raise
        filename = getattr(exc, "filename", None)
        target = out / os.path.basename(os.fspath(filename)) if filename else out
        raise WriteError(code, os.strerror(code), str(target)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_path(path: pathlib.Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # the real work is done; a leftover only wastes space
        warnings.warn(f"could not remove {path}: {exc}", RuntimeWarning, stacklevel=3)


def remove_leftovers(out: pathlib.Path, prefixes: Tuple[str, ...] = CHECKPOINT_TEMPS) -> None:
    """Remove what in ``out`` starts with ``prefixes``: by default the temporary and replaced checkpoints
    (each a full copy) that killed saves left behind; :data:`TEMP_PREFIXES`: every temporary a run writes."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.name.startswith(prefixes):
            _remove_path(child)
