"""``selfmoe bench``: run a kernel benchmark script of the source checkout, every argument passed through."""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
from typing import Any, Sequence

from .cli_common import CLIError, add_command

__all__ = ["BENCH_DESCRIPTION", "BENCH_EPILOG", "benchmarks_dir", "_add_bench", "_cmd_bench"]

BENCH_DESCRIPTION = "Run benchmarks/bench_lora_mix.py from the source checkout."
BENCH_EPILOG = """\
usage: selfmoe bench [train-step] [BENCHMARK ARGS...]

Runs benchmarks/bench_lora_mix.py (or bench_train_step.py with "train-step") from the source checkout
this package was installed from (pip install -e .); every other argument goes to the benchmark.

examples:
  selfmoe bench --help                                  # the benchmark's own flags
  selfmoe bench --shapes paper-cpu --modes fwd --reps 5
  selfmoe bench train-step --providers bare,mixse
"""

_BENCHMARKS = {"lora-mix": "bench_lora_mix.py", "train-step": "bench_train_step.py"}


def benchmarks_dir() -> pathlib.Path:
    """Where the source checkout's ``benchmarks/`` folder would be (next to the ``selfmoe`` package)."""
    return pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _cmd_bench(argv: Sequence[str]) -> int:
    argv = list(argv)
    which = "lora-mix"
    if argv and argv[0] in _BENCHMARKS:
        which = argv.pop(0)
    script = benchmarks_dir() / _BENCHMARKS[which]
    if not script.is_file():
        raise CLIError(f"benchmark script not found at {script}: `selfmoe bench` runs the benchmarks of a source "
                       "checkout; clone the repository and install it with `pip install -e .` (or run "
                       f"`python benchmarks/{_BENCHMARKS[which]}` there)")
    if argv[:1] in (["-h"], ["--help"]):
        print(BENCH_EPILOG, flush=True)
    return subprocess.call([sys.executable, str(script), *argv], cwd=str(script.parent.parent))


def _add_bench(sub: Any) -> argparse.ArgumentParser:
    """Listed in ``selfmoe --help`` only: :func:`selfmoe.cli.main` hands everything after ``bench`` to
    :func:`_cmd_bench` before the parser runs."""
    return add_command(sub, "bench", help="run the kernel benchmark (source checkout only; arguments passed through)",
                       description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
