"""Training checkpoints: writing ``<run>/checkpoint/`` atomically, finding the checkpoints a resume may start
from, checking one completely before loading it, and tidying up after a resume.

A checkpoint holds the trainable weights, optimizer, scheduler, RNG states, ``trainer_state.json`` (step,
epoch, position), the run config, and ``manifest.json`` (written last: every file's size and sha256). It is
complete when its manifest is there and every file has the recorded size and checksum; a hard kill while
one is being replaced can leave it in a ``.checkpoint.tmp-*`` / ``.checkpoint.old-*`` sibling, and
resuming takes the newest complete one of them all (then removes the others). A checkpoint that is
corrupt, truncated or does not fit the run (a ``trainer_state.json`` whose step the optimizer never took,
say) raises :class:`~selfmoe.train_config.CheckpointError` naming the file, unless an older complete
checkpoint is there to fall back on. A failed write (a full disk) raises
:class:`~selfmoe.io_utils.WriteError` naming the file; the previous checkpoint stays as it was.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
import sys
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .io_utils import WriteError, atomic_directory, fsync_path, safetensors_bytes, write_bytes
from .run_dir import (CHECKPOINT_DIR, CHECKPOINT_TEMPS, RUN_CONFIG_NAME, TEMP_PREFIXES, record_differences,
                      remove_leftovers)
from .train_config import CheckpointError, TrainState
from .train_runtime import restore_rng

__all__ = ["TRAINER_STATE_NAME", "TRAINABLE_NAME", "OPTIMIZER_NAME", "SCHEDULER_NAME", "RNG_NAME", "MANIFEST_NAME",
           "CHECKPOINT_FILES", "trainable_parameters", "save_checkpoint", "checkpoint_candidates", "checkpoint_step",
           "settle_checkpoints", "load_checkpoint", "restore_checkpoint_rng"]

TRAINER_STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pt"
MANIFEST_NAME = "manifest.json"  # written last: a checkpoint directory without it is incomplete
CHECKPOINT_FILES = (TRAINER_STATE_NAME, TRAINABLE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME, RUN_CONFIG_NAME)


# ----------------------------------------------------------------------------------------------------
# Writing


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires grad: what a run trains and a checkpoint holds."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def save_checkpoint(out: pathlib.Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, rng: List[Dict[str, Any]], record: Mapping[str, Any]) -> pathlib.Path:
    """Write ``out/checkpoint`` atomically (every file serialised first, the manifest written last), then
    remove older checkpoint copies that killed saves left. A failed write raises
    :class:`~selfmoe.io_utils.WriteError` naming the file; the previous checkpoint is left as it was."""
    tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable_parameters(model)}
    files = {
        TRAINABLE_NAME: safetensors_bytes(tensors, metadata={"format": "pt", "step": str(state.step)}),
        OPTIMIZER_NAME: _torch_bytes(optimizer.state_dict()),
        SCHEDULER_NAME: _torch_bytes(scheduler.state_dict()),
        RNG_NAME: _torch_bytes(rng),
        TRAINER_STATE_NAME: _json_bytes(state.to_dict()),
        RUN_CONFIG_NAME: _json_bytes(dict(record)),
    }
    manifest = {"format": 1, "step": state.step,
                "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}}
    path = out / CHECKPOINT_DIR
    try:
        with atomic_directory(path) as tmp:
            for name, data in files.items():
                write_bytes(tmp / name, data)
            write_bytes(tmp / MANIFEST_NAME, _json_bytes(manifest))  # last: marks the directory complete
    except OSError as exc:
        # Name the checkpoint file, not the temporary directory it was being written in.
        filename = getattr(exc, "filename", None)
        inside = filename is not None and os.path.basename(os.fspath(filename)) in files.keys() | {MANIFEST_NAME}
        raise WriteError.wrap(exc, path / os.path.basename(os.fspath(filename)) if inside else path) from exc
    remove_leftovers(out)
    return path


# ----------------------------------------------------------------------------------------------------
# Finding


def _manifest_step(path: pathlib.Path, require_manifest: bool) -> Optional[int]:
    """The step of a checkpoint directory that looks complete (manifest there, every file of the recorded
    size), or None. Without a manifest (a checkpoint from an older selfmoe) ``trainer_state.json``'s step,
    unless ``require_manifest``. Checksums are verified when loading."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        if require_manifest:
            return None
        try:
            step = json.loads((path / TRAINER_STATE_NAME).read_bytes()).get("step")
        except (OSError, ValueError, AttributeError):
            return None
        return step if isinstance(step, int) and not isinstance(step, bool) else None
    except (OSError, ValueError):
        return None
    try:
        step, files = manifest["step"], manifest["files"]
        if not isinstance(step, int) or isinstance(step, bool) or not set(CHECKPOINT_FILES) <= set(files):
            return None
        for name in CHECKPOINT_FILES:
            if (path / name).stat().st_size != files[name]["bytes"]:
                return None
    except (OSError, KeyError, TypeError, AttributeError):
        return None
    return step


def checkpoint_candidates(out: pathlib.Path) -> List[pathlib.Path]:
    """The checkpoint directories a resume may start from, newest first.

    ``checkpoint/`` whenever it exists (only a complete checkpoint is ever renamed to it, so a damaged one
    is reported rather than skipped), and the ``.checkpoint.tmp-*`` / ``.checkpoint.old-*`` directories a
    killed save left, when they look complete (see :func:`_manifest_step`): a kill between the two
    renames of a save leaves no ``checkpoint/`` at all, only these.
    """
    if not out.is_dir():
        return []
    found: List[Tuple[int, int, pathlib.Path]] = []
    main = out / CHECKPOINT_DIR
    if main.is_dir():
        step = _manifest_step(main, require_manifest=False)
        # Damaged (a file short, say): tried first, so that its error is reported when an older one is used.
        found.append((step if step is not None else sys.maxsize, 1, main))
    for child in sorted(out.iterdir()):
        if child.name.startswith(CHECKPOINT_TEMPS) and child.is_dir() and not child.is_symlink():
            step = _manifest_step(child, require_manifest=True)
            if step is not None:
                found.append((step, 0, child))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)  # newest; on a tie checkpoint/ itself
    return [p for _, _, p in found]


def checkpoint_step(out: pathlib.Path) -> int:
    """The step of ``out/checkpoint`` as its ``trainer_state.json`` says, or -1 when there is none to read."""
    try:
        return int(json.loads((out / CHECKPOINT_DIR / TRAINER_STATE_NAME).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def settle_checkpoints(out: pathlib.Path, chosen: Optional[pathlib.Path]) -> Optional[pathlib.Path]:
    """After a resume loaded ``chosen``: make it ``out/checkpoint`` and remove every other checkpoint copy
    and temporary file a killed run left. A kill in here leaves ``chosen`` where the next resume finds it."""
    main = out / CHECKPOINT_DIR
    if chosen is not None and chosen != main:
        if main.exists():
            os.rename(main, out / f".{CHECKPOINT_DIR}.old-{uuid.uuid4().hex[:12]}")
        os.rename(chosen, main)
        fsync_path(out, directory=True)
    remove_leftovers(out, TEMP_PREFIXES)
    return main if chosen is not None else None


# ----------------------------------------------------------------------------------------------------
# Loading


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_checkpoint_files(path: pathlib.Path) -> Tuple[Dict[str, bytes], Optional[Dict[str, Any]]]:
    """Every checkpoint file's bytes, checked against the manifest (size and sha256) when there is one."""
    mpath = path / MANIFEST_NAME
    manifest: Optional[Dict[str, Any]] = None
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_bytes())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError("no 'files' table")
        except ValueError as exc:
            raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({_first_line(exc)})", mpath) from None
    out: Dict[str, bytes] = {}
    for name in CHECKPOINT_FILES:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint is incomplete", f)
        data = f.read_bytes()
        if manifest is not None:
            entry = manifest["files"].get(name)
            if not isinstance(entry, dict):
                raise CheckpointError(f"{f}: not listed in {mpath}", f)
            if len(data) != entry.get("bytes"):
                raise CheckpointError(f"{f}: has {len(data)} bytes, {MANIFEST_NAME} records {entry.get('bytes')} "
                                      "(the file is truncated or was modified)", f)
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise CheckpointError(f"{f}: its sha256 differs from the one {MANIFEST_NAME} records "
                                      "(the file is corrupted or was modified)", f)
        out[name] = data
    return out, manifest


def _parse(path: pathlib.Path, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # safetensors, pickle, zip and JSON readers all raise their own types
        raise CheckpointError(f"{path}: unreadable {what} ({_first_line(exc)})", path) from None


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_trainer_state(raw: Any, sp: pathlib.Path, total_steps: int, steps_per_epoch: int,
                         world_size: int) -> TrainState:
    """``trainer_state.json`` as a :class:`TrainState`, refused unless it is a position this run can be at."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{sp}: not a JSON object", sp)
    for key, low in (("step", 0), ("epoch", 0), ("step_in_epoch", 0), ("total_steps", 0), ("tokens", 0),
                     ("world_size", 1)):
        v = raw.get(key)
        if not (_is_int(v) and v >= low):
            raise CheckpointError(f"{sp}: {key} must be an int >= {low}, got {v!r}", sp)
    for key in ("loss", "lr", "grad_norm"):
        v = raw.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise CheckpointError(f"{sp}: {key} must be a finite number or null, got {v!r}", sp)
    state = TrainState.from_dict(raw)
    if state.step > total_steps:
        raise CheckpointError(f"{sp}: step {state.step} is beyond this run's last step {total_steps}", sp)
    # The plan (steps per epoch, total steps) depends on the number of processes when the last step of an
    # epoch is cut to a multiple of it: a checkpoint of another world size resumes only where the plans agree.
    spe = steps_per_epoch
    other = (f" (the checkpoint was written by {state.world_size} process(es), this run has {world_size}: resume "
             f"with {state.world_size})" if state.world_size != world_size else "")
    if state.total_steps != total_steps:
        raise CheckpointError(f"{sp}: total_steps {state.total_steps} does not match this run's {total_steps}{other}", sp)
    if state.step_in_epoch > spe or state.epoch * spe + state.step_in_epoch != state.step:
        raise CheckpointError(f"{sp}: step {state.step} does not match epoch {state.epoch} and step_in_epoch "
                              f"{state.step_in_epoch} ({spe} steps per epoch){other}", sp)
    return state


def load_checkpoint(path: pathlib.Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int, total_steps: int, steps_per_epoch: int, world_size: int,
                    record: Optional[Mapping[str, Any]] = None) -> Tuple[TrainState, Optional[Dict[str, Any]]]:
    """Load weights, optimizer and scheduler in place; return the trainer state and this rank's RNG state.

    Every file is read and checked before anything is changed: complete (manifest sizes and checksums),
    readable, and consistent with each other and the run (step within the plan and matching epoch and
    position, the optimizer's and scheduler's step counts, the weights' step, the run record). Raises
    :class:`CheckpointError` naming the file.
    """
    from safetensors.torch import load as safetensors_load

    data, manifest = _read_checkpoint_files(path)
    sp, wp, op, cp, rp = (path / n for n in (TRAINER_STATE_NAME, TRAINABLE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME))
    raw_state = _parse(sp, "trainer state", lambda: json.loads(data[TRAINER_STATE_NAME]))
    saved_record = _parse(path / RUN_CONFIG_NAME, "run config", lambda: json.loads(data[RUN_CONFIG_NAME]))
    tensors = _parse(wp, "safetensors file", lambda: safetensors_load(data[TRAINABLE_NAME]))
    meta = _parse(wp, "safetensors header", lambda: _safetensors_metadata(data[TRAINABLE_NAME]))
    load_pt = lambda name: torch.load(io.BytesIO(data[name]), map_location="cpu", weights_only=True)  # noqa: E731
    opt_sd = _parse(op, "optimizer state", lambda: load_pt(OPTIMIZER_NAME))
    sched_sd = _parse(cp, "scheduler state", lambda: load_pt(SCHEDULER_NAME))
    rngs = _parse(rp, "RNG state", lambda: load_pt(RNG_NAME))

    state = _check_trainer_state(raw_state, sp, total_steps, steps_per_epoch, world_size)
    step = state.step
    if record is not None:
        if not isinstance(saved_record, dict):
            raise CheckpointError(f"{path / RUN_CONFIG_NAME}: not a JSON object", path / RUN_CONFIG_NAME)
        diffs = record_differences(saved_record, record)
        if diffs:
            raise CheckpointError(f"{path / RUN_CONFIG_NAME}: the checkpoint belongs to a different run ("
                                  + "; ".join(diffs[:3]) + ")", path / RUN_CONFIG_NAME)
    params = dict(trainable_parameters(model))
    if set(tensors) != set(params):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise CheckpointError(f"{wp}: trainable parameters do not match the model "
                              f"(unexpected {extra[:3]}, missing {missing[:3]})", wp)
    for n, p in params.items():
        if tuple(tensors[n].shape) != tuple(p.shape):
            raise CheckpointError(f"{wp}: {n} has shape {list(tensors[n].shape)}, the model {list(p.shape)}", wp)
    if not (isinstance(opt_sd, dict) and isinstance(opt_sd.get("state"), dict) and isinstance(opt_sd.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt_sd["param_groups"])):
        raise CheckpointError(f"{op}: not an optimizer state", op)
    n_saved = sum(len(g["params"]) for g in opt_sd["param_groups"])
    if n_saved != len(params):
        raise CheckpointError(f"{op}: holds {n_saved} parameters, the model trains {len(params)}", op)
    try:
        taken = max((int(float(v["step"])) for v in opt_sd["state"].values()), default=0)
    except (TypeError, KeyError, ValueError, RuntimeError):
        raise CheckpointError(f"{op}: malformed per-parameter state (no step count)", op) from None
    if taken != step:
        raise CheckpointError(f"{op}: the optimizer has taken {taken} steps, {TRAINER_STATE_NAME} says step {step}", op)
    last = sched_sd.get("last_epoch") if isinstance(sched_sd, dict) else None
    if not _is_int(last):
        raise CheckpointError(f"{cp}: not a learning-rate scheduler state", cp)
    if last != step:
        raise CheckpointError(f"{cp}: the scheduler has taken {last} steps, {TRAINER_STATE_NAME} says step {step}", cp)
    if not (isinstance(rngs, list) and rngs and all(isinstance(r, dict) and {"python", "numpy", "torch"} <= set(r)
                                                    for r in rngs)):
        raise CheckpointError(f"{rp}: not a list of RNG states", rp)
    if "step" in meta and meta["step"] != str(step):
        raise CheckpointError(f"{wp}: weights of step {meta['step']}, {TRAINER_STATE_NAME} says step {step}", wp)
    if manifest is not None and manifest.get("step") != step:
        raise CheckpointError(f"{path / MANIFEST_NAME}: step {manifest.get('step')!r}, {TRAINER_STATE_NAME} says {step}",
                              path / MANIFEST_NAME)

    try:
        optimizer.load_state_dict(opt_sd)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{op}: does not fit the optimizer ({_first_line(exc)})", op) from None
    try:
        scheduler.load_state_dict(sched_sd)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{cp}: does not fit the scheduler ({_first_line(exc)})", cp) from None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    rng = rngs[rank] if rank < len(rngs) else None
    return state, rng


def restore_checkpoint_rng(path: pathlib.Path, rng: Optional[Mapping[str, Any]]) -> None:
    """Restore this process's RNG state ``rng`` as :func:`load_checkpoint` returned it from checkpoint ``path``
    (``None``: nothing saved for this rank); a malformed state raises :class:`CheckpointError` naming the file."""
    if rng is None:
        return
    try:
        restore_rng(rng)
    except Exception as exc:  # a malformed state of the right outer shape
        raise CheckpointError(f"{path / RNG_NAME}: unusable RNG state ({_first_line(exc)})", path / RNG_NAME) from None
