"""How the training loop runs on this machine: one process or ``accelerate`` (:class:`SingleProcess`,
:class:`AccelerateRuntime`, :func:`make_runtime`), Ctrl-C turned into a stop at a safe point
(:class:`InterruptGuard`), and the random-number state a run seeds, saves and restores
(:func:`set_seed`, :func:`capture_rng`, :func:`restore_rng`).

Multi-GPU: under ``accelerate launch`` / ``torchrun`` (or with ``accelerate=True``) the loop uses
``accelerate.Accelerator`` for processes, DDP and autocast (gloo on CPUs, NCCL on GPUs). The single-process
path needs neither accelerate nor torch.distributed.

Several processes: collectives time out after :func:`collective_timeout` seconds (``SELFMOE_COLLECTIVE_TIMEOUT``,
default 600), so a process that dies or hangs makes the others stop with :class:`~selfmoe.train_config.DistributedError`
(see :func:`collective_failure`) instead of waiting forever. ``accelerate launch --cpu --num_processes N`` starts
one process only (accelerate runs several CPU processes only through ``--mpirun_hostfile``): that case is
detected and warned about (:func:`accelerate_cpu_single_process`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = ["set_seed", "capture_rng", "restore_rng", "launched_distributed", "process_rank", "SingleProcess",
           "AccelerateRuntime", "make_runtime", "InterruptGuard", "COLLECTIVE_TIMEOUT_ENV", "DEFAULT_COLLECTIVE_TIMEOUT",
           "collective_timeout", "collective_failure", "accelerate_cpu_single_process"]

COLLECTIVE_TIMEOUT_ENV = "SELFMOE_COLLECTIVE_TIMEOUT"
# Long enough for rank 0 to write a checkpoint or the final model of a 7B run while the others wait at a
# barrier; short enough that a dead peer is reported within minutes rather than torch's 30.
DEFAULT_COLLECTIVE_TIMEOUT = 600.0


# ----------------------------------------------------------------------------------------------------
# Seeds and RNG states


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng() -> Dict[str, Any]:
    """This process's Python, NumPy, torch (and initialised CUDA) RNG states, loadable with
    ``torch.load(weights_only=True)`` once saved."""
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


def restore_rng(st: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng` took (CUDA only on as many devices as were saved, else a warning)."""
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


def launched_distributed() -> bool:
    """Whether ``accelerate launch`` or ``torchrun`` started this process."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1") or 1) > 1 or "LOCAL_RANK" in env or "ACCELERATE_MIXED_PRECISION" in env


def process_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``; 0 when not launched distributed)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def collective_timeout() -> float:
    """Seconds a collective (all-reduce, barrier) may wait for the other processes: ``SELFMOE_COLLECTIVE_TIMEOUT``
    or :data:`DEFAULT_COLLECTIVE_TIMEOUT`. ``ValueError`` naming the variable when it is not a positive number."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_COLLECTIVE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


# What gloo and NCCL say when a peer is gone or silent (they raise plain RuntimeErrors).
_COLLECTIVE_FAILURE = re.compile(r"\bgloo\b|\bnccl\b|timed out|connection (closed|reset|refused)|broken pipe|"
                                 r"\bpeer\b|TCPStore|ProcessGroup", re.IGNORECASE)


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer that died, hung or closed its connection), as opposed to
    an error of this process's own computation."""
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc).split("\n", 1)[0]))


def accelerate_cpu_single_process() -> bool:
    """Whether ``accelerate launch --cpu --num_processes N`` (N > 1) started this process alone: without
    ``--mpirun_hostfile`` accelerate's CPU launcher runs one process, setting ``MASTER_ADDR`` but no ``WORLD_SIZE``."""
    env = os.environ
    mpi = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK")
    return (env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in env
            and "WORLD_SIZE" not in env and not any(k in env for k in mpi))


def _resolve_precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


class SingleProcess:
    """The plain path: one device, ``torch.autocast`` for bf16, nothing distributed."""

    world_size = 1
    rank = 0
    is_main = True

    def __init__(self, device: Optional[Union[str, torch.device]], precision: str) -> None:
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.precision = _resolve_precision(precision, self.device)

    def place(self, model: nn.Module) -> None:
        """Put ``model`` on this runtime's device (sharded, for :class:`~selfmoe.fsdp.FSDPRuntime`); the
        trainable parameters stay the same objects."""
        model.to(self.device)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Make the step's accumulated gradients the same on every process (DDP does it in backward)."""

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


class AccelerateRuntime(SingleProcess):
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
        from accelerate.utils import InitProcessGroupKwargs

        self.timeout = collective_timeout()
        # The timeout applies when accelerate creates the process group (not to one the caller made).
        handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=self.timeout))]
        self.acc = Accelerator(mixed_precision=precision, cpu=(device is not None and torch.device(device).type == "cpu"),
                               kwargs_handlers=handlers)
        self.device = self.acc.device
        self.precision = precision
        self.world_size = self.acc.num_processes
        self.rank = self.acc.process_index
        self.is_main = self.acc.is_main_process

    def prepare(self, model, optimizer):
        if self.world_size > 1:
            # DDP broadcasts every parameter from rank 0 when it wraps the model: for a frozen 7B base that is
            # 14 GB sent for nothing (every process loaded the same files). Only what trains needs syncing.
            model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
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


def make_runtime(precision: str, accelerate: Optional[bool], device: Optional[Union[str, torch.device]],
                 fsdp: bool = False) -> SingleProcess:
    """:class:`~selfmoe.fsdp.FSDPRuntime` when ``fsdp``; else ``AccelerateRuntime`` when ``accelerate`` (``None``:
    when a launcher started this process), else ``SingleProcess``; ``precision`` is
    :attr:`TrainConfig.mixed_precision`."""
    if fsdp:
        from .fsdp import FSDPRuntime

        return FSDPRuntime(device, precision)
    if accelerate_cpu_single_process():
        warnings.warn("accelerate launch --cpu started this process alone (accelerate runs several CPU processes only "
                      "with --mpirun_hostfile): training in one process. For N processes on CPUs (gloo) use "
                      "`accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`", RuntimeWarning)
    use = launched_distributed() if accelerate is None else bool(accelerate)
    return AccelerateRuntime(device, precision) if use else SingleProcess(device, precision)


# ----------------------------------------------------------------------------------------------------
# Ctrl-C


class InterruptGuard:
    """Turn the first Ctrl-C into a request honoured at the next safe point (end of a micro-batch; with
    several processes the end of the step they all agree on), so an optimizer update is never cut in half;
    a second Ctrl-C raises at once. Only the main thread can install signal handlers; elsewhere this does
    nothing and Ctrl-C behaves as usual.

    ``same_press``: a second SIGINT within this many seconds of the first counts as the same Ctrl-C. Under a
    launcher a terminal's Ctrl-C reaches every process twice, at once: from the terminal (the whole process
    group) and forwarded by ``torchrun``/``accelerate launch``; taking the second for "stop now" would lose
    the checkpoint."""

    def __init__(self, same_press: float = 0.0) -> None:
        self.requested = False
        self.same_press = same_press
        self._first = 0.0
        self._old: Any = None
        self._installed = False

    def __enter__(self) -> "InterruptGuard":
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
            if time.monotonic() - self._first < self.same_press:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()
        print("\nselfmoe: stopping after the current micro-batch and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
