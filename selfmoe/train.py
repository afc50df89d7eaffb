"""Training loops: one LoRA expert per domain, the instance-merging baseline, and the MiXSE router.

One loop (:func:`fit`), three uses:

- :func:`train_expert` — a plain LoRA (rank 8, alpha 16, every linear of the decoder layers; the paper's
  setup) on one domain's records, saved as a PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``). A single expert needs no router, so it is trained as a plain
  :class:`LoRALinear` per module, not as a one-expert MiXSE.
- the **instance-merging** baseline — :func:`train_expert` on the union of every domain's records.
- :func:`train_router` — :meth:`MiXSE.from_adapters` with base and experts frozen; only the router
  learns, on the union data; saved with :meth:`MiXSE.save_pretrained`. ``output.aux_loss`` (when an
  auxiliary router loss is configured) is added to the LM loss.

The loss is the token-level cross-entropy on response tokens, summed over the whole effective batch and
divided by its number of target tokens (so gradient accumulation and several processes give the same
update as one big batch).

An output directory is one **run**::

    train_config.json      TrainConfig + what identifies the run (kind, data fingerprint, experts, base)
    log.jsonl              one JSON object per logging step (loss, lr, grad_norm, tokens/s) and events
    checkpoint/            the latest checkpoint, replaced atomically: trainable weights, optimizer,
                           scheduler, RNG states, trainer_state.json (step, epoch, position), config,
                           and manifest.json (written last: every file's size and sha256)
    adapter_config.json, adapter_model.safetensors            (expert; PEFT format), or
    mixse_config.json, experts.safetensors, router.safetensors (router; MiXSE format)

The final files appear once training has finished (their ``.json`` config last, so a directory with a
config is complete). ``resume=True`` continues from ``checkpoint/`` and gives bit-identical weights to an
uninterrupted run on the same device (the RNG states and the position in the epoch are restored, the
already-seen micro-batches skipped).

Crash safety: a step's log line is written before its checkpoint, and resuming cuts the log back to the
checkpoint's step, so the log holds every step exactly once. A checkpoint is complete when its manifest
is there and every file has the recorded size and checksum; a hard kill while one is being replaced can
leave it in a ``.checkpoint.tmp-*`` / ``.checkpoint.old-*`` sibling, and resuming takes the newest
complete one of them all (then removes the others). A checkpoint that is corrupt, truncated or does not
fit the run (a ``trainer_state.json`` whose step the optimizer never took, say) raises
:class:`CheckpointError` naming the file, unless an older complete checkpoint is there to fall back on.
A failed write (a full disk) raises :class:`~selfmoe.io_utils.WriteError` (an ``OSError``) naming the
file; the previous checkpoint stays as it was. A directory holding another run is refused unless
``overwrite=True``; the same run without ``resume=True`` is refused too (nothing is overwritten by
accident). Ctrl-C stops at the end of the current micro-batch (twice: at once), writes a checkpoint of
the last completed step and raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). A NaN/inf
loss or gradient norm stops before the update with :class:`NonFiniteLossError`, naming the step; the
last good checkpoint stays as it was and no final model is written.

Multi-GPU: under ``accelerate launch`` / ``torchrun`` (or with ``accelerate=True``) the loop uses
``accelerate.Accelerator`` for processes, DDP and autocast; every process reads the same deterministic
list of micro-batches and takes its share, so no sampler needs preparing. The single-process path
needs neither accelerate nor torch.distributed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoRAAdapter, load_lora_adapter, save_lora_adapter
from .data import IGNORE_INDEX, LengthGroupedBatchSampler, SFTCollator, SFTDataset, append_jsonl, read_jsonl
from .io_utils import WriteError, atomic_directory, atomic_write_json, atomic_write_text, fsync_path, write_bytes
from .model import CONFIG_NAME as MIXSE_CONFIG_NAME
from .model import EXPERTS_NAME, ROUTER_NAME, MiXSE, _find_decoder_layers, _linear_modules, _match_targets
from .routers import ROUTER_KINDS, check_aux_loss, check_top_k
from .version import __version__

PathLike = Union[str, "os.PathLike[str]"]
Record = Dict[str, Any]
Callback = Callable[["TrainState", nn.Module], None]

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "CheckpointError",
    "LoRALinear",
    "add_lora",
    "attach_lora_adapter",
    "remove_lora",
    "lora_weights",
    "load_records",
    "select_domain",
    "set_seed",
    "token_loss_sum",
    "evaluate_loss",
    "fit",
    "train_expert",
    "train_router",
    "RUN_CONFIG_NAME",
    "LOG_NAME",
    "CHECKPOINT_DIR",
]

RUN_CONFIG_NAME = "train_config.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pt"
MANIFEST_NAME = "manifest.json"  # written last: a checkpoint directory without it is incomplete
CHECKPOINT_FILES = (TRAINER_STATE_NAME, TRAINABLE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME, RUN_CONFIG_NAME)
_CHECKPOINT_TEMPS = (f".{CHECKPOINT_DIR}.tmp-", f".{CHECKPOINT_DIR}.old-")  # io_utils.atomic_directory's siblings
# Every file a run may create, so --overwrite removes exactly these and never a user's other files.
FINAL_NAMES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MIXSE_CONFIG_NAME, EXPERTS_NAME, ROUTER_NAME)
RUN_NAMES = (RUN_CONFIG_NAME, LOG_NAME, CHECKPOINT_DIR) + FINAL_NAMES
# ("..final.tmp-": what atomic_directory puts next to the staging directory while export writes into it)
_TEMP_PREFIXES = (f".{CHECKPOINT_DIR}.", ".final.tmp-", "..final.tmp-", f".{RUN_CONFIG_NAME}.", f".{LOG_NAME}.")

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "no", "bf16")
# Fields that change how a run is reported or saved, never what it computes: they may differ on resume.
BOOKKEEPING_FIELDS = frozenset({"save_steps", "logging_steps", "progress"})


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (saved as ``train_config.json`` with checkpoints and outputs).

    Defaults are the paper's expert training: LoRA rank 8, alpha 16 on all linear modules, lr 3e-4,
    3 epochs, effective batch 32. ``batch_size`` is the effective (global) batch in examples; each
    process runs ``micro_batch_size`` examples per forward and accumulates gradients over
    ``batch_size / (micro_batch_size x processes)`` micro-batches. ``max_steps`` (optimizer steps)
    replaces ``num_epochs`` when set. ``warmup_steps`` overrides ``warmup_ratio`` (fraction of all
    steps); the learning rate rises linearly to ``learning_rate`` and then follows ``lr_scheduler``
    down to 0 (``cosine``/``linear``) or stays (``constant``). ``max_grad_norm=None`` disables clipping
    (the norm is still computed, logged and checked for NaN). ``mixed_precision``: ``"auto"`` = bf16
    autocast on a GPU that supports it, float32 otherwise; ``"no"``; ``"bf16"``.
    ``lora_*``/``target_modules`` apply to expert training (``target_modules``: ``"all-linear"`` = every
    ``nn.Linear`` in the decoder layers, a list of names/suffixes, or a full-match regex); ``router``,
    ``top_k``, ``aux_loss`` to router training. ``save_steps``/``logging_steps``/``progress`` are
    bookkeeping and may change when resuming; every other field must match the saved run.
    """

    learning_rate: float = 3e-4
    num_epochs: int = 3
    max_steps: Optional[int] = None
    batch_size: int = 32
    micro_batch_size: int = 4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    max_length: int = 1024
    seed: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, List[str]] = "all-linear"
    router: str = "shared"
    top_k: int = 1
    aux_loss: Dict[str, float] = field(default_factory=dict)
    save_steps: int = 200
    logging_steps: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # JSON gives lists back
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any value out of range."""
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig.{name} {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < float("inf"), "learning_rate", "must be > 0")
        need(is_int(self.num_epochs) and self.num_epochs >= 1, "num_epochs", "must be an int >= 1")
        need(self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1), "max_steps", "must be None or an int >= 1")
        need(is_int(self.micro_batch_size) and self.micro_batch_size >= 1, "micro_batch_size", "must be an int >= 1")
        need(is_int(self.batch_size) and self.batch_size >= 1 and self.batch_size % self.micro_batch_size == 0,
             "batch_size", f"must be a positive multiple of micro_batch_size={self.micro_batch_size}")
        need(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {SCHEDULERS}")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.warmup_steps is None or (is_int(self.warmup_steps) and self.warmup_steps >= 0), "warmup_steps", "must be None or an int >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "must be two floats in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be None or > 0")
        need(is_int(self.max_length) and self.max_length >= 2, "max_length", "must be an int >= 2")
        need(is_int(self.seed), "seed", "must be an int")
        need(self.mixed_precision in PRECISIONS, "mixed_precision", f"must be one of {PRECISIONS}")
        need(is_int(self.lora_r) and self.lora_r >= 1, "lora_r", "must be an int >= 1")
        need(isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(isinstance(self.target_modules, str) or (isinstance(self.target_modules, list) and self.target_modules
                                                      and all(isinstance(t, str) for t in self.target_modules)),
             "target_modules", "must be 'all-linear', a regex string or a non-empty list of module names")
        need(self.router in ROUTER_KINDS, "router", f"must be one of {ROUTER_KINDS}")
        need(is_int(self.top_k) and self.top_k >= 1, "top_k", "must be an int >= 1")
        try:
            self.aux_loss = check_aux_loss(dict(self.aux_loss))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TrainConfig.aux_loss: {exc}") from None
        need(is_int(self.save_steps) and self.save_steps >= 1, "save_steps", "must be an int >= 1")
        need(is_int(self.logging_steps) and self.logging_steps >= 1, "logging_steps", "must be an int >= 1")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "TrainConfig") -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown TrainConfig field(s) {unknown}")
        return cls(**dict(d))

    def identity(self) -> Dict[str, Any]:
        """The fields that decide what a run computes (everything but the bookkeeping ones)."""
        return {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_FIELDS}


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint as ``trainer_state.json``.

    ``step``: optimizer steps done; ``epoch``: current epoch (0-based); ``step_in_epoch``: optimizer
    steps done in it (the next one starts at micro-batch ``step_in_epoch * batch_size /
    micro_batch_size`` of that epoch's deterministic order); ``tokens``: non-padding tokens seen;
    ``loss``/``lr``/``grad_norm``: of the last step.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    total_steps: int = 0
    tokens: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    world_size: int = 1

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    """What :func:`fit` returns: ``loss`` of the last step, ``history`` the metric lines logged during this
    call (each a mean over its logging window), ``resumed_from`` the checkpoint step or None."""

    output_dir: pathlib.Path
    step: int
    total_steps: int
    loss: Optional[float]
    history: List[Dict[str, Any]]
    resumed_from: Optional[int] = None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a ``KeyboardInterrupt`` from a callback) stopped training; a checkpoint was written.

    ``step``: optimizer steps completed and saved; ``checkpoint``: the checkpoint directory, or
    ``None`` when the interrupt hit an optimizer update and nothing could be saved safely.
    """

    def __init__(self, message: str, step: int, checkpoint: Optional[pathlib.Path]) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the run being resumed.

    The message starts with the file (``<path>: <what is wrong>``); ``path`` is that file.
    """

    def __init__(self, message: str, path: PathLike) -> None:
        super().__init__(message)
        self.path = pathlib.Path(os.fspath(path))


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; training stopped before that step's update.

    ``step``: the 1-based step that failed; ``checkpoint``: the last good checkpoint (or ``None``).
    """

    def __init__(self, message: str, step: int, checkpoint: Optional[pathlib.Path]) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------------------------------
# A single LoRA: the expert being trained (no router: one expert's gate is always 1)


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * B @ A @ dropout(x)``, PEFT's plain LoRA (same init, same forward).

    ``lora_A [r, in]`` (kaiming-uniform, a=sqrt(5)) and ``lora_B [out, r]`` (zeros) are float32 by
    default whatever the base dtype (as PEFT's ``autocast_adapter_dtype``): bf16 adapters lose their
    small updates. ``base_layer`` is frozen; :func:`remove_lora` puts it back.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                 scaling: Optional[float] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.scaling = float(scaling) if scaling is not None else self.lora_alpha / self.r
        dev = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, base_layer.in_features, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, self.r, dtype=dtype, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def unwrap(self) -> nn.Linear:
        for n, p in self.base_layer.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling}"


def add_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
             target_modules: Union[str, Sequence[str]] = "all-linear") -> Dict[str, LoRALinear]:
    """Wrap the target linears of a causal LM in :class:`LoRALinear`, in place; freeze everything else.

    ``target_modules`` follows PEFT: ``"all-linear"`` (every ``nn.Linear`` in the decoder layers, not
    ``lm_head``), names matching a module path or its dot-suffix, or a full-match regex. Returns
    ``{module path: LoRALinear}``; :func:`remove_lora` undoes it.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds LoRALinear modules; remove_lora() first")
    prefix, _ = _find_decoder_layers(model)
    linears = _linear_modules(model)
    paths = _match_targets(linears, target_modules, prefix)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model._selfmoe_lora_flags = flags  # restored by remove_lora
    out: Dict[str, LoRALinear] = {}
    for path in paths:
        layer = LoRALinear(linears[path], r, lora_alpha, lora_dropout)
        model.set_submodule(path, layer)
        out[path] = layer
    return out


def attach_lora_adapter(model: nn.Module, adapter: Union[PathLike, LoRAAdapter]) -> Dict[str, LoRALinear]:
    """Put a saved PEFT LoRA adapter on ``model`` (in place, frozen): what :func:`train_expert` trained,
    as it was trained (each module with its own rank and scaling). Undo with :func:`remove_lora`."""
    ad = adapter if isinstance(adapter, LoRAAdapter) else load_lora_adapter(adapter)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds LoRALinear modules; remove_lora() first")
    linears = _linear_modules(model)
    missing = [p for p in ad.weights if p not in linears]
    if missing:
        raise ValueError(f"adapter modules {missing[:5]} are not nn.Linear modules of {type(model).__name__}")
    for path, (A, B) in ad.weights.items():  # every check before the first module is replaced
        base = linears[path]
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
            raise ValueError(f"adapter module {path!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit "
                             f"the base linear [{base.in_features} -> {base.out_features}]")
    model._selfmoe_lora_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out: Dict[str, LoRALinear] = {}
    for path, (A, B) in ad.weights.items():
        layer = LoRALinear(linears[path], A.shape[0], ad.alpha_for(path), scaling=ad.scaling_for(path), dtype=A.dtype)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.requires_grad_(False)
        model.set_submodule(path, layer)
        out[path] = layer
    return out


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original linears back (same objects) and restore the ``requires_grad`` flags."""
    for path, m in [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]:
        model.set_submodule(path, m.unwrap())
    flags = getattr(model, "_selfmoe_lora_flags", None)
    if flags is not None:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        del model._selfmoe_lora_flags
    return model


def lora_weights(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A [r, in], B [out, r])}`` of every :class:`LoRALinear` in ``model`` (CPU copies)."""
    return {p: (m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone())
            for p, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------------------------
# Data


def load_records(paths: Union[PathLike, Sequence[PathLike]]) -> List[Record]:
    """Training records from JSONL files and/or directories of them (every ``*.jsonl``, not recursive,
    sorted by name), in order. Records need ``instruction`` and ``output``; ``domain`` is optional.
    Errors name ``file:line`` (:class:`~selfmoe.data.DataFormatError`) or the missing path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Record] = []
    for raw in paths:
        p = pathlib.Path(raw)
        if p.is_dir():
            files = sorted(q for q in p.glob("*.jsonl") if q.is_file())
            if not files:
                raise FileNotFoundError(f"{os.fspath(raw)}: directory holds no *.jsonl data files")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"{os.fspath(raw)}: training data not found (expected a .jsonl file or a directory of them)")
        for q in files:
            out.extend(read_jsonl(q, require_domain=False))
    if not out:
        raise ValueError(f"no training records in {[os.fspath(p) for p in paths]}")
    return out


def select_domain(records: Sequence[Record], domain: str) -> List[Record]:
    """The records of one domain; ``ValueError`` listing the domains present when there are none."""
    picked = [r for r in records if r.get("domain") == domain]
    if not picked:
        present = sorted({str(r.get("domain")) for r in records})
        raise ValueError(f"no records of domain {domain!r}; the data holds domains {present}")
    return picked


def _dataset_fingerprint(dataset: SFTDataset) -> str:
    """sha256 of every example's ids and labels: covers the records, the tokenizer and max_length."""
    h = hashlib.sha256()
    for ex in dataset.examples:
        h.update(np.asarray([len(ex["input_ids"])], dtype=np.int64).tobytes())
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()


def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_info(records: Sequence[Record], dataset: SFTDataset) -> Dict[str, Any]:
    domains: Dict[str, int] = {}
    for r in records:
        key = str(r.get("domain"))
        domains[key] = domains.get(key, 0) + 1
    return {"fingerprint": _dataset_fingerprint(dataset), "records": len(records), "examples": len(dataset),
            "dropped": dataset.num_dropped, "domains": dict(sorted(domains.items()))}


def _base_signature(model: nn.Module) -> Dict[str, Any]:
    """Architecture facts of the base model that a resumed run must share (hashing 14 GB of weights
    to check identity would cost minutes; a moved model directory should still resume)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return {k: getattr(cfg, k, None) for k in keys}


# ----------------------------------------------------------------------------------------------------
# Loss


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over positions whose label is not -100."""
    shifted = logits[:, :-1, :]
    target = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _targets_per_example(dataset: SFTDataset) -> np.ndarray:
    return np.asarray([int(np.count_nonzero(np.asarray(ex["labels"][1:]) != IGNORE_INDEX)) for ex in dataset.examples],
                      dtype=np.int64)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokenizer: Any, records: Sequence[Record], *, max_length: int = 1024,
                  batch_size: int = 8) -> float:
    """Mean per-token response loss of ``model`` on ``records`` (eval mode, no gradients)."""
    ds = SFTDataset(records, tokenizer, max_length=max_length)
    collate = SFTCollator.for_tokenizer(tokenizer)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for idx in LengthGroupedBatchSampler(ds.lengths, batch_size, shuffle=False):
            batch = {k: v.to(device) for k, v in collate([ds[i] for i in idx]).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total += float(token_loss_sum(out.logits, batch["labels"]))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss: the records hold no response tokens")
    return total / count


# ----------------------------------------------------------------------------------------------------
# Seeds and RNG states


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _capture_rng() -> Dict[str, Any]:
    st = np.random.get_state()
    out: Dict[str, Any] = {
        "python": random.getstate(),
        # The numpy key array as a tensor: checkpoints load with torch.load(weights_only=True).
        "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _restore_rng(st: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(states)} devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored (dropout may differ)", RuntimeWarning)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------
# Runtime: one process, or accelerate


def _launched_distributed() -> bool:
    """Whether ``accelerate launch`` or ``torchrun`` started this process."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1") or 1) > 1 or "LOCAL_RANK" in env or "ACCELERATE_MIXED_PRECISION" in env


def _resolve_precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class _SingleProcess:
    """The plain path: one device, ``torch.autocast`` for bf16, nothing distributed."""

    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, device: Optional[Union[str, torch.device]], precision: str) -> None:
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.precision = _resolve_precision(precision, self.device)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, model: nn.Module, skip: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def wait(self) -> None:
        pass

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model


class _AccelerateRuntime(_SingleProcess):
    """``accelerate.Accelerator`` for processes, DDP, autocast and gradient sync."""

    def __init__(self, device: Optional[Union[str, torch.device]], precision: str) -> None:
        try:
            from accelerate import Accelerator
        except ImportError as exc:
            raise ImportError("multi-process training needs the accelerate package (pip install accelerate)") from exc
        if precision == "auto":
            # A launcher's choice (accelerate config) wins over our default.
            env = os.environ.get("ACCELERATE_MIXED_PRECISION")
            probe = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            precision = env if env in ("no", "bf16") else _resolve_precision("auto", probe)
        if precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision {precision!r} is not supported (use 'no' or 'bf16')")
        self.acc = Accelerator(mixed_precision=precision, cpu=(device is not None and torch.device(device).type == "cpu"))
        self.device = self.acc.device
        self.precision = precision
        self.world_size = self.acc.num_processes
        self.rank = self.acc.process_index
        self.is_main = self.acc.is_main_process

    def prepare(self, model, optimizer):
        return self.acc.prepare(model, optimizer)

    def autocast(self):
        return self.acc.autocast()

    def no_sync(self, model, skip):
        return self.acc.no_sync(model) if skip and self.world_size > 1 else contextlib.nullcontext()

    def backward(self, loss):
        self.acc.backward(loss)

    def clip_grad_norm(self, params, max_norm):
        return self.acc.clip_grad_norm_(params, max_norm)

    def all_sum(self, t):
        return self.acc.reduce(t, reduction="sum") if self.world_size > 1 else t

    def gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object
        return gather_object([obj])

    def wait(self):
        self.acc.wait_for_everyone()

    def unwrap(self, model):
        return self.acc.unwrap_model(model)


def _make_runtime(config: TrainConfig, accelerate: Optional[bool], device: Optional[Union[str, torch.device]]):
    use = _launched_distributed() if accelerate is None else bool(accelerate)
    return _AccelerateRuntime(device, config.mixed_precision) if use else _SingleProcess(device, config.mixed_precision)


# ----------------------------------------------------------------------------------------------------
# Ctrl-C


class _InterruptGuard:
    """Turn the first Ctrl-C into a request honoured at the next safe point (end of a micro-batch), so an
    optimizer update is never cut in half; a second Ctrl-C raises at once. Only the main thread can
    install signal handlers; elsewhere this does nothing and Ctrl-C behaves as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        self._installed = False

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)
            self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nselfmoe: stopping after the current micro-batch and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------
# The run directory


def _run_record(config: TrainConfig, run_info: Mapping[str, Any]) -> Dict[str, Any]:
    return {"config": config.to_dict(), "run": json.loads(json.dumps(dict(run_info))), "selfmoe_version": __version__}


def _identity(record: Mapping[str, Any]) -> Dict[str, Any]:
    cfg = {k: v for k, v in dict(record.get("config") or {}).items() if k not in BOOKKEEPING_FIELDS}
    run = {k: v for k, v in dict(record.get("run") or {}).items() if k != "base_model"}
    return {"config": cfg, "run": run}


def _differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
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


def _clear_run(out: pathlib.Path) -> None:
    """Remove what a run writes (and only that: a user's other files in the directory stay)."""
    for child in out.iterdir():
        if child.name in RUN_NAMES or child.name.startswith(_TEMP_PREFIXES):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _prepare_output_dir(out: pathlib.Path, record: Dict[str, Any], *, resume: bool, overwrite: bool) -> List[pathlib.Path]:
    """Check ``out`` against the run about to start; return the checkpoints to resume from, newest first
    (see :func:`_checkpoint_candidates`; empty: start from scratch).

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
        return []
    diffs = _differences(saved, record)
    if diffs:
        raise FileExistsError(
            f"{out} holds a different training run ({saved_path}); refusing to " + ("resume it" if resume else "touch it")
            + ". Differences: " + "; ".join(diffs) + ". Use another output directory, or overwrite to start over.")
    if not resume:
        raise FileExistsError(f"{out} already holds this training run; pass resume to continue it or overwrite to start over")
    atomic_write_json(saved_path, record)  # bookkeeping fields may have changed
    return _checkpoint_candidates(out)


def _truncate_log(path: pathlib.Path, step: int) -> None:
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


def _publish(out: pathlib.Path, export: Callable[[pathlib.Path], None]) -> None:
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


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


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


def _remove_checkpoint_leftovers(out: pathlib.Path, prefixes: Tuple[str, ...] = _CHECKPOINT_TEMPS) -> None:
    """Remove the temporary and replaced checkpoints (each a full copy) that killed saves left behind."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.name.startswith(prefixes):
            _remove_path(child)


def _save_checkpoint(out: pathlib.Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     state: TrainState, rng: List[Dict[str, Any]], record: Mapping[str, Any]) -> pathlib.Path:
    """Write ``out/checkpoint`` atomically (every file serialised first, the manifest written last), then
    remove older checkpoint copies that killed saves left. A failed write raises
    :class:`~selfmoe.io_utils.WriteError` naming the file; the previous checkpoint is left as it was."""
    from safetensors.torch import save as safetensors_bytes

    tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in _trainable(model)}
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
    _remove_checkpoint_leftovers(out)
    return path


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


def _checkpoint_candidates(out: pathlib.Path) -> List[pathlib.Path]:
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
        if child.name.startswith(_CHECKPOINT_TEMPS) and child.is_dir() and not child.is_symlink():
            step = _manifest_step(child, require_manifest=True)
            if step is not None:
                found.append((step, 0, child))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)  # newest; on a tie checkpoint/ itself
    return [p for _, _, p in found]


def _settle_checkpoints(out: pathlib.Path, chosen: Optional[pathlib.Path]) -> Optional[pathlib.Path]:
    """After a resume loaded ``chosen``: make it ``out/checkpoint`` and remove every other checkpoint copy
    and temporary file a killed run left. A kill in here leaves ``chosen`` where the next resume finds it."""
    main = out / CHECKPOINT_DIR
    if chosen is not None and chosen != main:
        if main.exists():
            os.rename(main, out / f".{CHECKPOINT_DIR}.old-{uuid.uuid4().hex[:12]}")
        os.rename(chosen, main)
        fsync_path(out, directory=True)
    _remove_checkpoint_leftovers(out, _TEMP_PREFIXES)
    return main if chosen is not None else None


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


def _check_trainer_state(raw: Any, sp: pathlib.Path, plan: "_Plan", world_size: int) -> TrainState:
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
    if state.step > plan.total_steps:
        raise CheckpointError(f"{sp}: step {state.step} is beyond this run's last step {plan.total_steps}", sp)
    if state.world_size == world_size:  # the plan depends on the number of processes
        spe = plan.steps_per_epoch
        if state.total_steps != plan.total_steps:
            raise CheckpointError(f"{sp}: total_steps {state.total_steps} does not match this run's {plan.total_steps}", sp)
        if state.step_in_epoch > spe or state.epoch * spe + state.step_in_epoch != state.step:
            raise CheckpointError(f"{sp}: step {state.step} does not match epoch {state.epoch} and step_in_epoch "
                                  f"{state.step_in_epoch} ({spe} steps per epoch)", sp)
    return state


def _load_checkpoint(path: pathlib.Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     rank: int, plan: "_Plan", world_size: int,
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

    state = _check_trainer_state(raw_state, sp, plan, world_size)
    step = state.step
    if record is not None:
        if not isinstance(saved_record, dict):
            raise CheckpointError(f"{path / RUN_CONFIG_NAME}: not a JSON object", path / RUN_CONFIG_NAME)
        diffs = _differences(saved_record, record)
        if diffs:
            raise CheckpointError(f"{path / RUN_CONFIG_NAME}: the checkpoint belongs to a different run ("
                                  + "; ".join(diffs[:3]) + ")", path / RUN_CONFIG_NAME)
    params = dict(_trainable(model))
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


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class _Plan:
    micro_per_step: int  # global micro-batches per optimizer step
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _make_plan(num_examples: int, config: TrainConfig, world_size: int) -> _Plan:
    if config.batch_size % (config.micro_batch_size * world_size):
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of micro_batch_size x processes = "
                         f"{config.micro_batch_size} x {world_size}")
    if num_examples == 0:
        raise ValueError("no training examples (every record was dropped or the data is empty)")
    group = config.batch_size // config.micro_batch_size
    n_micro = -(-num_examples // config.micro_batch_size)
    rem = n_micro % group
    rem -= rem % world_size  # every process must run the same number of micro-batches
    steps_per_epoch = n_micro // group + (1 if rem else 0)
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} examples give fewer micro-batches than the {world_size} processes")
    total = config.max_steps if config.max_steps is not None else steps_per_epoch * config.num_epochs
    warm = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total)
    return _Plan(group, steps_per_epoch, total, min(warm, total))


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        # (step + 1) / (warmup + 1): the first step already learns a little (HF's step / warmup wastes it).
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _epoch_groups(sampler: LengthGroupedBatchSampler, epoch: int, plan: _Plan, world: int) -> List[List[List[int]]]:
    """The epoch's micro-batches (global, deterministic) cut into optimizer steps."""
    sampler.set_epoch(epoch)
    batches = sampler.batches()
    groups = [batches[i:i + plan.micro_per_step] for i in range(0, len(batches), plan.micro_per_step)]
    if groups and len(groups[-1]) % world:
        groups[-1] = groups[-1][: len(groups[-1]) - len(groups[-1]) % world]
    return [g for g in groups if g]


def _enable_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    target = model.base_model if isinstance(model, MiXSE) else model
    # Non-reentrant: the frozen base's inputs need no requires_grad trick, and LoRA/router grads flow.
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return target.activation_checkpointing_disable
    if hasattr(target, "gradient_checkpointing_enable"):
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return target.gradient_checkpointing_disable
    warnings.warn(f"{type(target).__name__} supports no gradient checkpointing; training without it", RuntimeWarning)
    return lambda: None


class _Loop:
    """State and steps of one :func:`fit` call (internal)."""

    def __init__(self, model: nn.Module, tokenizer: Any, dataset: SFTDataset, out: pathlib.Path, config: TrainConfig,
                 record: Dict[str, Any], runtime: _SingleProcess, callbacks: Sequence[Callback]) -> None:
        self.raw_model = model
        self.dataset = dataset
        self.out = out
        self.config = config
        self.record = record
        self.rt = runtime
        self.callbacks = list(callbacks)
        self.collate = SFTCollator.for_tokenizer(tokenizer)
        self.targets = _targets_per_example(dataset)
        self.plan = _make_plan(len(dataset), config, runtime.world_size)
        self.sampler = LengthGroupedBatchSampler(dataset.lengths, config.micro_batch_size, seed=config.seed, shuffle=True)
        self.state = TrainState(total_steps=self.plan.total_steps, world_size=runtime.world_size)
        self.checkpoint: Optional[pathlib.Path] = None
        self.history: List[Dict[str, Any]] = []
        self.consistent = True  # False while an optimizer update is half applied
        self.guard = _InterruptGuard()
        self._window = {"loss": 0.0, "aux": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0, "steps": 0}

        params = [p for _, p in _trainable(model)]
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        model.to(runtime.device)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config.lr_scheduler, self.plan.warmup_steps, self.plan.total_steps))

    # -- set-up -------------------------------------------------------------------------------------

    def restore(self, candidates: Sequence[pathlib.Path]) -> Optional[int]:
        """Load the first usable of ``candidates`` (newest first; none: keep the fresh state); take the RNG
        snapshot the next step starts from. Unusable newer checkpoints are skipped with a warning; when
        none is usable the error of ``checkpoint/`` itself (else of the newest) is raised."""
        resumed = None
        errors: List[CheckpointError] = []
        for ckpt in candidates:
            try:
                state, rng = _load_checkpoint(ckpt, model=self.raw_model, optimizer=self.optimizer,
                                              scheduler=self.scheduler, rank=self.rt.rank, plan=self.plan,
                                              world_size=self.rt.world_size, record=self.record)
                if rng is not None:
                    try:
                        _restore_rng(rng)
                    except Exception as exc:  # a malformed state of the right outer shape
                        raise CheckpointError(f"{ckpt / RNG_NAME}: unusable RNG state ({_first_line(exc)})",
                                              ckpt / RNG_NAME) from None
            except CheckpointError as exc:
                errors.append(exc)
                continue
            if errors:
                warnings.warn(f"resuming from {ckpt} (step {state.step}); skipped unusable newer checkpoint data: "
                              + "; ".join(str(e) for e in errors), RuntimeWarning)
            if state.world_size != self.rt.world_size:
                warnings.warn(f"resuming a run saved with {state.world_size} process(es) on {self.rt.world_size}: "
                              "the result will not be bit-identical", RuntimeWarning)
            state.total_steps, state.world_size = self.plan.total_steps, self.rt.world_size
            self.state = state
            self.checkpoint = ckpt
            resumed = state.step
            break
        else:
            if errors:
                main = [e for e in errors if e.path.parent == self.out / CHECKPOINT_DIR]
                first = (main or errors)[0]
                others = len(errors) - 1
                raise CheckpointError(f"{first}; cannot resume" + (f" (the {others} other checkpoint(s) found are unusable too)"
                                      if others else "") + "; pass overwrite to start the run over", first.path)
        self.rng = _capture_rng()
        return resumed

    # -- running ------------------------------------------------------------------------------------

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg, st = self.config, self.state
        restore_gc = _enable_gradient_checkpointing(self.raw_model) if cfg.gradient_checkpointing else (lambda: None)
        was_training = self.raw_model.training
        self.model, self.optimizer = self.rt.prepare(self.raw_model, self.optimizer)
        self.model.train()
        bar = tqdm(total=self.plan.total_steps, initial=st.step, desc="train", unit="step",
                   disable=not (cfg.progress and self.rt.is_main), dynamic_ncols=True)
        try:
            with self.guard:
                while st.step < self.plan.total_steps:
                    groups = _epoch_groups(self.sampler, st.epoch, self.plan, self.rt.world_size)
                    for g in range(st.step_in_epoch, len(groups)):
                        self._step(groups[g], bar)
                        if st.step >= self.plan.total_steps:
                            break
                    if st.step_in_epoch >= len(groups):
                        st.epoch, st.step_in_epoch = st.epoch + 1, 0
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            bar.close()
            restore_gc()
            self.raw_model.train(was_training)
        if self.state.step and (self.checkpoint is None or self._checkpoint_step() != self.state.step):
            self._save()

    def _step(self, group: List[List[int]], bar: Any) -> None:
        cfg, st, rt = self.config, self.state, self.rt
        t0 = time.perf_counter()
        mine = group[rt.rank::rt.world_size]
        group_targets = int(self.targets[[i for b in group for i in b]].sum())
        scale = rt.world_size / max(1, group_targets)
        # CE sum, aux (token-weighted), tokens; float64 so long accumulations stay exact (MPS has none)
        sums = torch.zeros(3, dtype=torch.float32 if rt.device.type == "mps" else torch.float64, device=rt.device)
        for i, idx in enumerate(mine):
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in self.collate([self.dataset[j] for j in idx]).items()}
            mb_targets = int(self.targets[idx].sum())
            with rt.no_sync(self.model, skip=i < len(mine) - 1):
                with rt.autocast():
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    ce = token_loss_sum(out.logits, batch["labels"])
                    loss = ce * scale
                    aux = out.get("aux_loss") if hasattr(out, "get") else None
                    if aux is not None:
                        # Token-weighted mean over the effective batch, like the LM loss.
                        loss = loss + aux * (mb_targets * scale)
                rt.backward(loss)
            sums[0] += ce.detach().to(sums.dtype)
            if aux is not None:
                sums[1] += aux.detach().to(sums.dtype) * mb_targets
            sums[2] += batch["attention_mask"].sum()
            self.guard.check()
        sums = rt.all_sum(sums)
        ce_sum, aux_sum, tokens = (float(v) for v in sums.tolist())
        step_loss = ce_sum / max(1, group_targets)
        step_no = st.step + 1
        if not math.isfinite(step_loss) or not math.isfinite(aux_sum):
            self._non_finite(f"loss is {step_loss}" + ("" if math.isfinite(aux_sum) else f" (aux loss {aux_sum})"), step_no)
        norm = float(rt.clip_grad_norm(self.params, cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")))
        if not math.isfinite(norm):
            self._non_finite(f"gradient norm is {norm} (loss {step_loss:.6g})", step_no)
        lr = self.scheduler.get_last_lr()[0]

        self.consistent = False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step, st.step_in_epoch = step_no, st.step_in_epoch + 1
        st.tokens += int(tokens)
        st.loss, st.lr, st.grad_norm = step_loss, lr, norm
        self.consistent = True
        self.rng = _capture_rng()

        seconds = time.perf_counter() - t0
        w = self._window
        w["loss"] += ce_sum
        w["aux"] += aux_sum
        w["targets"] += group_targets
        w["tokens"] += tokens
        w["seconds"] += seconds
        w["steps"] += 1
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}", refresh=False)
        bar.update(1)
        # The log line first: a kill between the two leaves it after the checkpoint's step, where resuming
        # cuts it off and the replayed step writes it again (the other order would lose it).
        if st.step % cfg.logging_steps == 0 or st.step == self.plan.total_steps:
            self._log_window()
        if st.step % cfg.save_steps == 0 or st.step == self.plan.total_steps:
            self._save()
        for cb in self.callbacks:
            cb(st, self.rt.unwrap(self.model))
        self.guard.check()

    # -- bookkeeping --------------------------------------------------------------------------------

    def _checkpoint_step(self) -> int:
        try:
            return int(json.loads((self.out / CHECKPOINT_DIR / TRAINER_STATE_NAME).read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1

    def _save(self, gather: bool = True) -> None:
        rngs = self.rt.gather_object(self.rng) if gather else [self.rng]
        if self.rt.is_main:
            self.checkpoint = _save_checkpoint(self.out, model=self.rt.unwrap(self.model) if hasattr(self, "model") else self.raw_model,
                                               optimizer=self.optimizer, scheduler=self.scheduler, state=self.state,
                                               rng=rngs, record=self.record)
        else:
            self.checkpoint = self.out / CHECKPOINT_DIR
        if gather:
            self.rt.wait()

    def _log(self, entry: Dict[str, Any]) -> None:
        if self.rt.is_main:
            path = self.out / LOG_NAME
            try:
                append_jsonl(path, [entry])
            except OSError as exc:
                raise WriteError.wrap(exc, path) from exc

    def _log_window(self) -> None:
        w, st = self._window, self.state
        entry = {"step": st.step, "epoch": round(st.step / self.plan.steps_per_epoch, 4),
                 "loss": w["loss"] / max(1, w["targets"]), "lr": st.lr, "grad_norm": st.grad_norm,
                 "tokens": st.tokens, "tokens_per_s": round(w["tokens"] / max(w["seconds"], 1e-9), 1)}
        if w["aux"]:
            entry["aux_loss"] = w["aux"] / max(1, w["targets"])
        self.history.append(entry)
        self._log(entry)
        self._window = {k: 0 if isinstance(v, int) else 0.0 for k, v in w.items()}

    def _interrupted(self) -> TrainingInterrupted:
        st = self.state
        if not self.consistent:
            msg = (f"interrupted during the optimizer update of step {st.step + 1}: no checkpoint written; "
                   f"the last one is {self.checkpoint} (step {self._checkpoint_step()})" if self.checkpoint else
                   f"interrupted during the optimizer update of step {st.step + 1}; no checkpoint was written")
            return TrainingInterrupted(msg, self._checkpoint_step(), self.checkpoint)
        # Parameters, optimizer and scheduler are those of the last completed step, and self.rng was taken
        # right after it: a resumed run replays the interrupted step exactly.
        self._save(gather=False)
        self._log({"event": "interrupted", "step": st.step})
        return TrainingInterrupted(f"interrupted after step {st.step}/{self.plan.total_steps}; checkpoint saved to "
                                   f"{self.checkpoint}", st.step, self.checkpoint)

    def _non_finite(self, what: str, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = (f"the last good checkpoint is {self.checkpoint} (step {self._checkpoint_step()})" if self.checkpoint
                 else "no checkpoint was written yet")
        self._log({"event": "non_finite", "step": step, "detail": what})
        raise NonFiniteLossError(
            f"training stopped at step {step} (epoch {self.state.epoch}): {what}; that step's update was not applied "
            f"and no final model was written; {where}. Lower the learning rate or check the data, then resume.",
            step, self.checkpoint)


def fit(model: nn.Module, tokenizer: Any, dataset: SFTDataset, output_dir: PathLike, config: TrainConfig, *,
        run_info: Mapping[str, Any], export: Callable[[nn.Module, pathlib.Path], None], resume: bool = False,
        overwrite: bool = False, callbacks: Sequence[Callback] = (), accelerate: Optional[bool] = None,
        device: Optional[Union[str, torch.device]] = None) -> TrainResult:
    """The training loop: AdamW on ``model``'s trainable parameters over ``dataset``, with checkpoints.

    Args:
        model: a causal LM (or :class:`~selfmoe.MiXSE`) whose parameters that require grad are trained;
            already seeded and built (its initial values are part of the run).
        tokenizer: pads the micro-batches.
        dataset: tokenized examples (:class:`~selfmoe.data.SFTDataset`).
        output_dir: the run directory (see the module docstring).
        config: hyper-parameters; ``run_info``: JSON facts that identify the run besides the config
            (kind, data fingerprint, experts ...), compared on resume.
        export: ``export(model, directory)`` writes the final model into a new ``directory``; its files
            are then moved into ``output_dir``.
        resume / overwrite: continue the run in ``output_dir`` / replace it (see module docstring).
        callbacks: ``callback(state, model)`` after every optimizer step (after its checkpoint, if any).
        accelerate: ``None`` = use accelerate when launched by ``accelerate launch``/``torchrun``;
            ``True``/``False`` to force. ``device``: single-process device (default: CUDA if present).

    Raises :class:`TrainingInterrupted`, :class:`NonFiniteLossError`, ``FileExistsError`` (run dir),
    :class:`CheckpointError` (no usable checkpoint to resume from), :class:`~selfmoe.io_utils.WriteError`
    (a write failed, e.g. a full disk).
    """
    config.validate()
    runtime = _make_runtime(config, accelerate, device)
    out = pathlib.Path(os.fspath(output_dir))
    record = _run_record(config, run_info)
    ckpts = _prepare_output_dir(out, record, resume=resume, overwrite=overwrite) if runtime.is_main else []
    runtime.wait()
    if not runtime.is_main and resume:
        ckpts = _checkpoint_candidates(out)
    loop = _Loop(model, tokenizer, dataset, out, config, record, runtime, callbacks)
    resumed = loop.restore(ckpts)
    if resume:
        runtime.wait()  # every process has read its checkpoint before it is moved
        if runtime.is_main:
            _settle_checkpoints(out, loop.checkpoint)
        if loop.checkpoint is not None:
            loop.checkpoint = out / CHECKPOINT_DIR
    if resumed is not None:
        if runtime.is_main:
            _truncate_log(out / LOG_NAME, resumed)
        loop._log({"event": "resume", "step": resumed, "total_steps": loop.plan.total_steps})
    else:
        if runtime.is_main:  # a run restarted from scratch (no checkpoint yet): its old lines are void
            (out / LOG_NAME).unlink(missing_ok=True)
        loop._log({"event": "start", "step": 0, "total_steps": loop.plan.total_steps, "examples": len(dataset),
                   "processes": runtime.world_size, "device": str(runtime.device), "precision": runtime.precision})
    loop.run()
    final = runtime.unwrap(loop.model)
    if runtime.is_main:
        _publish(out, lambda path: export(final, path))
        loop._log({"event": "done", "step": loop.state.step, "tokens": loop.state.tokens})
    runtime.wait()
    return TrainResult(out, loop.state.step, loop.plan.total_steps, loop.state.loss, loop.history, resumed)


# ----------------------------------------------------------------------------------------------------
# The three uses


def _check_records(records: Sequence[Record]) -> List[Record]:
    recs = list(records)
    if not recs:
        raise ValueError("no training records")
    return recs


def train_expert(base_model: nn.Module, tokenizer: Any, records: Sequence[Record], output_dir: PathLike,
                 config: Optional[TrainConfig] = None, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Sequence[Callback] = (), accelerate: Optional[bool] = None,
                 device: Optional[Union[str, torch.device]] = None, **overrides: Any) -> TrainResult:
    """Train one LoRA expert on ``records`` and save it to ``output_dir`` as a PEFT adapter.

    One domain's records give that domain's expert; the union of all domains gives the
    instance-merging baseline. ``base_model`` is wrapped during training and restored afterwards (also on
    errors); its weights are never changed. ``overrides``: :class:`TrainConfig` fields. See :func:`fit`
    for the other arguments.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    recs = _check_records(records)
    dataset = SFTDataset(recs, tokenizer, max_length=cfg.max_length, progress=cfg.progress)
    run_info = {"kind": "expert", "data": _data_info(recs, dataset), "base": _base_signature(base_model),
                "base_model": getattr(getattr(base_model, "config", None), "_name_or_path", None)}
    set_seed(cfg.seed)  # the LoRA init is part of the run
    add_lora(base_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    base_name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None

    def export(model: nn.Module, path: pathlib.Path) -> None:
        save_lora_adapter(path, lora_weights(model), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          base_model_name_or_path=base_name, extra_config={"lora_dropout": cfg.lora_dropout})

    try:
        return fit(base_model, tokenizer, dataset, output_dir, cfg, run_info=run_info, export=export, resume=resume,
                   overwrite=overwrite, callbacks=callbacks, accelerate=accelerate, device=device)
    finally:
        remove_lora(base_model)


def train_router(base_model: nn.Module, tokenizer: Any, experts: Mapping[str, PathLike], records: Sequence[Record],
                 output_dir: PathLike, config: Optional[TrainConfig] = None, *, resume: bool = False,
                 overwrite: bool = False, callbacks: Sequence[Callback] = (), accelerate: Optional[bool] = None,
                 device: Optional[Union[str, torch.device]] = None, **overrides: Any) -> TrainResult:
    """Train the MiXSE router over frozen ``experts`` (``{name: PEFT adapter dir}``) and save the MiXSE
    (:meth:`MiXSE.save_pretrained` format) to ``output_dir``.

    Base and expert weights stay bit-identical; only the router learns, on the plain LM loss (plus
    ``output.aux_loss`` when ``aux_loss`` is configured). ``base_model`` is restored afterwards.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError("experts must be a non-empty {name: adapter directory} mapping")
    check_top_k(cfg.top_k, len(experts))
    recs = _check_records(records)
    expert_info = {}
    for name, path in experts.items():
        weights = pathlib.Path(os.fspath(path)) / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"expert {name!r}: {weights} not found (is {os.fspath(path)} a PEFT adapter directory?)")
        expert_info[name] = _file_sha256(weights)
    dataset = SFTDataset(recs, tokenizer, max_length=cfg.max_length, progress=cfg.progress)
    run_info = {"kind": "router", "data": _data_info(recs, dataset), "experts": expert_info,
                "base": _base_signature(base_model),
                "base_model": getattr(getattr(base_model, "config", None), "_name_or_path", None)}
    set_seed(cfg.seed)  # the router init is part of the run
    model = MiXSE.from_adapters(base_model, dict(experts), top_k=cfg.top_k, router=cfg.router, aux_loss=dict(cfg.aux_loss))
    try:
        router_ids = {id(p) for p in model.router_parameters()}
        leaked = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in router_ids]
        if leaked:  # MiXSE.from_adapters freezes base and experts; training them here would be a silent bug
            raise RuntimeError(f"router training: non-router parameters require grad: {leaked[:3]}")

        def export(m: nn.Module, path: pathlib.Path) -> None:
            m.save_pretrained(path)

        return fit(model, tokenizer, dataset, output_dir, cfg, run_info=run_info, export=export, resume=resume,
                   overwrite=overwrite, callbacks=callbacks, accelerate=accelerate, device=device)
    finally:
        model.unload()
