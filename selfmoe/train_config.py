"""What a training run is told and what it reports: :class:`TrainConfig` (the hyper-parameters, checked),
:class:`TrainState` (where a run is; saved in every checkpoint), :class:`TrainResult` (what :func:`selfmoe.train.fit`
returns) and the errors that stop a run (:class:`TrainingInterrupted`, :class:`CheckpointError`,
:class:`NonFiniteLossError`, :class:`DistributedError`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .io_utils import PathLike
from .choices import LR_SCHEDULERS as SCHEDULERS
from .choices import MIXED_PRECISIONS as PRECISIONS
from .choices import EXPERT_KINDS, PROMPT_FORMATS, ROUTER_CHOICES, check_aux_loss, check_hyper_sizes

__all__ = ["TrainConfig", "TrainState", "TrainResult", "TrainingInterrupted", "CheckpointError", "NonFiniteLossError",
           "DistributedError", "SCHEDULERS", "PRECISIONS", "BOOKKEEPING_FIELDS"]

# Fields that change how a run is reported or saved, never what it computes: they may differ on resume.
# ``prompt_format`` is what was asked for ("auto" may mean either format): the format it resolved to is
# part of the run's identity instead (``run_info["prompt_format"]`` when chat, and the data fingerprint,
# which covers every token), so "auto" and the format it picks resume each other, a switch is refused, and
# runs saved before the field existed (all Alpaca) still resume.
BOOKKEEPING_FIELDS = frozenset({"save_steps", "logging_steps", "progress", "prompt_format"})
# Fields added with the related designs (HyperExpert, rank-1 experts, intuition routing): written only when
# not at their default, so runs saved before they existed keep the same identity (and resume).
_LATER_DEFAULTS = {"hyper_expert": None, "experts": "lora", "mix_and_match": None, "expert_top_k": None,
                   "intuition": False, "intuition_clusters": 32, "intuition_layer": 0}


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
    ``prompt_format``: how records become prompts (:mod:`selfmoe.prompt_format`): ``"auto"`` = the
    tokenizer's chat template when it has one, else Alpaca; ``"chat"``; ``"alpaca"``.
    ``lora_*``/``target_modules`` apply to expert training (``target_modules``: ``"all-linear"`` = every
    ``nn.Linear`` in the decoder layers, a list of names/suffixes, or a full-match regex); ``router``,
    ``top_k``, ``aux_loss``, ``hyper_expert`` (HyperMoE's HyperExpert sizes, or None) to router training
    (``router="intuition"``: the shared router with an intuition prior, :mod:`selfmoe.intuition`). ``experts="rank1"`` makes expert training a mixture of ``lora_r``
    rank-1 experts (or ``mix_and_match = [r1, r2]`` pairs) with ``expert_top_k`` experts per token (None:
    all) and, with ``intuition=True``, an intuition prior of ``intuition_clusters`` k-means clusters;
    ``intuition_layer``: the hidden state the prior pools (0: token embeddings).
    ``save_steps``/``logging_steps``/``progress`` are bookkeeping and may change when resuming; every
    other field must match the saved run.
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
    prompt_format: str = "auto"
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
    hyper_expert: Optional[Dict[str, int]] = None
    experts: str = "lora"
    mix_and_match: Optional[List[int]] = None
    expert_top_k: Optional[int] = None
    intuition: bool = False
    intuition_clusters: int = 32
    intuition_layer: int = 0
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
        need(self.prompt_format in PROMPT_FORMATS, "prompt_format", f"must be one of {PROMPT_FORMATS}")
        need(self.mixed_precision in PRECISIONS, "mixed_precision", f"must be one of {PRECISIONS}")
        need(is_int(self.lora_r) and self.lora_r >= 1, "lora_r", "must be an int >= 1")
        need(isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(isinstance(self.target_modules, str) or (isinstance(self.target_modules, list) and self.target_modules
                                                      and all(isinstance(t, str) for t in self.target_modules)),
             "target_modules", "must be 'all-linear', a regex string or a non-empty list of module names")
        need(self.router in ROUTER_CHOICES, "router", f"must be one of {ROUTER_CHOICES}")
        need(self.experts in EXPERT_KINDS, "experts", f"must be one of {EXPERT_KINDS}")
        need(self.mix_and_match is None or (isinstance(self.mix_and_match, (list, tuple)) and len(self.mix_and_match) == 2
                                            and all(is_int(v) and v >= 1 for v in self.mix_and_match)),
             "mix_and_match", "must be None or two ints >= 1 [r1, r2]")
        if self.mix_and_match is not None:
            self.mix_and_match = list(self.mix_and_match)
        need(self.expert_top_k is None or (is_int(self.expert_top_k) and self.expert_top_k >= 1), "expert_top_k",
             "must be None (all experts) or an int >= 1")
        need(isinstance(self.intuition, bool), "intuition", "must be true or false")
        need(is_int(self.intuition_clusters) and self.intuition_clusters >= 1, "intuition_clusters", "must be an int >= 1")
        need(is_int(self.intuition_layer) and self.intuition_layer >= 0, "intuition_layer", "must be an int >= 0")
        need(self.experts == "rank1" or (self.mix_and_match is None and self.expert_top_k is None and not self.intuition),
             "experts", "must be 'rank1' for mix_and_match, expert_top_k and intuition")
        need(is_int(self.top_k) and self.top_k >= 1, "top_k", "must be an int >= 1")
        try:
            self.aux_loss = check_aux_loss(dict(self.aux_loss))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TrainConfig.aux_loss: {exc}") from None
        try:
            self.hyper_expert = check_hyper_sizes(self.hyper_expert)
        except ValueError as exc:
            raise ValueError(f"TrainConfig.{exc}") from None
        need(is_int(self.save_steps) and self.save_steps >= 1, "save_steps", "must be an int >= 1")
        need(is_int(self.logging_steps) and self.logging_steps >= 1, "logging_steps", "must be an int >= 1")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists; the later fields only when set)."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        for key, default in _LATER_DEFAULTS.items():
            if d.get(key) == default:
                del d[key]
        return d

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
    """What :func:`~selfmoe.train.fit` returns: ``loss`` of the last step, ``history`` the metric lines logged
    during this call (each a mean over its logging window), ``resumed_from`` the checkpoint step or None."""

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


class DistributedError(RuntimeError):
    """A collective of a multi-process run failed: another process died, hung past the collective timeout
    (``SELFMOE_COLLECTIVE_TIMEOUT``) or closed its connection. This process stopped instead of waiting.

    ``rank``/``world_size``: this process; ``checkpoint``: the last checkpoint of the run (or ``None``),
    from which ``resume`` continues.
    """

    def __init__(self, message: str, rank: int, world_size: int, checkpoint: Optional[pathlib.Path]) -> None:
        super().__init__(message)
        self.rank = rank
        self.world_size = world_size
        self.checkpoint = checkpoint
