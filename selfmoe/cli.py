"""The ``selfmoe`` command line: the whole Self-MoE pipeline from seeds to a routed MiXSE.

Subcommands (``selfmoe <command> --help`` shows each one's flags and examples)::

    selfmoe specialize    seeds -> self-generated, filtered instruction data per domain (JSONL)
    selfmoe train-expert  JSONL -> one LoRA expert (PEFT adapter); --all-domains: instance-merging baseline
    selfmoe train-router  base + experts + JSONL -> MiXSE directory (router trained, experts frozen)
    selfmoe merge         experts -> one merged adapter (linear / TIES / DARE) or a merged base model
    selfmoe prune         MiXSE -> a smaller MiXSE without the experts a task hardly routes to (ModuleFormer)
    selfmoe generate      complete prompts with a base model, a LoRA adapter or a MiXSE
    selfmoe eval          accuracy on MMLU/BBH/GSM8K/HumanEval-style JSONL (multiple choice, exact match, numeric, code)
    selfmoe bench         run the kernel benchmark from a source checkout (arguments passed through)

Exit codes: 0 success, 1 training stopped on a NaN/inf loss, 2 bad input (the message names the file,
line or flag; no traceback unless ``--debug``), 130 interrupted (a checkpoint was written: rerun with
``--resume``).

This module assembles the parser and maps errors to exit codes. Each command lives in its own module
(``cli_specialize``, ``cli_train`` (train-expert, train-router), ``cli_merge``, ``cli_prune``, ``cli_generate``,
``cli_eval``, ``cli_bench``) as ``_add_<command>(subparsers)`` and ``_cmd_<command>(args)``; what they
share is in ``cli_common``, and the choices they offer in :mod:`selfmoe.choices`. None of them imports
torch before a command runs.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, Optional, Sequence, Tuple

from .cli_bench import _add_bench, _cmd_bench
from .cli_compare import _add_compare, _cmd_compare
from .cli_demo import _add_demo, _cmd_demo
from .cli_common import PROG, CLIError, check_device, describe, load_model, say
from .cli_eval import _add_eval, _cmd_eval
from .cli_generate import _add_generate, _cmd_generate
from .cli_merge import _add_merge, _cmd_merge
from .cli_prune import _add_prune, _cmd_prune
from .cli_specialize import _add_specialize, _cmd_specialize
from .cli_train import _add_train_expert, _add_train_router, _cmd_train_expert, _cmd_train_router

__all__ = ["main", "build_parser", "CLIError", "load_model"]

EXIT_INTERNAL_ERROR = 3  # 0 ok, 1 NaN/inf loss, 2 bad input, 130 interrupted: see MAIN_EPILOG

MAIN_EPILOG = """\
the pipeline on a local model (each step is resumable; see `selfmoe <command> --help`):
  selfmoe specialize   --model ./base --seeds seeds/ --output data/ --num-pairs 5000
  selfmoe train-expert --model ./base --data data/ --domain math   --output experts/math
  selfmoe train-expert --model ./base --data data/ --domain coding --output experts/coding
  selfmoe train-router --model ./base --data data/ --output mixse/ \\
      --expert math=experts/math --expert coding=experts/coding
  selfmoe generate     --model ./base --mixse mixse/ --prompt "What is 17 * 23?"
  selfmoe eval         --model ./base --mixse mixse/ --data gsm8k.jsonl --output eval/

exit codes: 0 ok, 1 NaN/inf loss, 2 bad input, 130 interrupted (checkpoint written; rerun with --resume),
3 internal error (a bug: please report it with the output of --debug)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``selfmoe`` argument parser (all subcommands).

    Each command's parser runs the ``_cmd_<command>`` of this module, looked up when the parser is built.
    """
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description=describe("Self-MoE / MiXSE: self-specialized LoRA experts behind a learned token-level router."),
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_specialize(sub).set_defaults(func=_cmd_specialize)
    _add_train_expert(sub).set_defaults(func=_cmd_train_expert)
    _add_train_router(sub).set_defaults(func=_cmd_train_router)
    _add_merge(sub).set_defaults(func=_cmd_merge)
    _add_prune(sub).set_defaults(func=_cmd_prune)
    _add_generate(sub).set_defaults(func=_cmd_generate)
    _add_eval(sub).set_defaults(func=_cmd_eval)
    _add_compare(sub).set_defaults(func=_cmd_compare)
    _add_demo(sub).set_defaults(func=_cmd_demo)
    _add_bench(sub)  # main() runs bench before parsing
    return parser


def _user_errors() -> Tuple[type, ...]:
    from .adapters import AdapterFormatError
    from .data import DataFormatError

    # ValueError covers DataFormatError/AdapterFormatError and bad values; OSError covers missing files,
    # existing run directories (FileExistsError) and unreadable ones.
    return (CLIError, DataFormatError, AdapterFormatError, ValueError, OSError, ImportError)


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    """--no-progress also silences transformers' own bars ("Loading weights"), for this command only."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (``python -m selfmoe`` / the ``selfmoe`` script exit with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1]
    if debug:
        argv = argv[1:]
    command = argv[0] if argv else None
    try:
        if command == "bench":  # everything after "bench" belongs to the benchmark script
            return _cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if getattr(args, "device", None) is not None:  # before any data or model is read
            check_device(args.device)
        if getattr(args, "no_progress", False):
            with _transformers_bars_off():
                return args.func(args)
        return args.func(args)
    except SystemExit:  # argparse: --help, --version, usage errors (passed on before _user_errors loads the library)
        raise
    except KeyboardInterrupt:
        say(f"{PROG} {command}: interrupted")
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        say(f"{PROG} {command}: error: {exc}")
        return 2
    except Exception as exc:  # a bug, not bad input: say so in one line; --debug shows the traceback
        if debug:
            raise
        say(f"{PROG} {command}: internal error: {type(exc).__name__}: {exc} (please report it; rerun with "
            f"`{PROG} --debug {command} ...` for the traceback)")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
