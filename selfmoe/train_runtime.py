"""How the training loop runs on this machine: one process or ``accelerate`` (:class:`SingleProcess`,
:class:`AccelerateRuntime`, :func:`make_runtime`), Ctrl-C turned into a stop at a safe point
(:class:`InterruptGuard`), and the random-number state a run seeds, saves and restores
(:func:`set_seed`, :func:`capture_rng`, :func:`restore_rng`).

Multi-GPU: under ``accelerate launch`` / ``torchrun`` (or with ``accelerate=True``) the loop uses
``accelerate.Accelerator`` for processes, DDP and autocast. The single-process path needs neither
accelerate nor torch.distributed.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = ["set_seed", "capture_rng", "restore_rng", "launched_distributed", "SingleProcess", "AccelerateRuntime",
           "make_runtime", "InterruptGuard"]


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


def make_runtime(precision: str, accelerate: Optional[bool],
                 device: Optional[Union[str, torch.device]]) -> SingleProcess:
    """``AccelerateRuntime`` when ``accelerate`` (``None``: when a launcher started this process), else
    ``SingleProcess``; ``precision`` is :attr:`TrainConfig.mixed_precision`."""
    use = launched_distributed() if accelerate is None else bool(accelerate)
    return AccelerateRuntime(device, precision) if use else SingleProcess(device, precision)


# ----------------------------------------------------------------------------------------------------
# Ctrl-C


class InterruptGuard:
    """Turn the first Ctrl-C into a request honoured at the next safe point (end of a micro-batch), so an
    optimizer update is never cut in half; a second Ctrl-C raises at once. Only the main thread can
    install signal handlers; elsewhere this does nothing and Ctrl-C behaves as usual."""

    def __init__(self) -> None:
        self.requested = False
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
            raise KeyboardInterrupt
        self.requested = True
        print("\nselfmoe: stopping after the current micro-batch and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
