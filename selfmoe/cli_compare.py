"""``selfmoe compare``: accuracy of several ``selfmoe eval`` outputs side by side (Markdown / JSON)."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from .cli_common import CLIError, add_command, say

__all__ = ["COMPARE_DESCRIPTION", "COMPARE_EPILOG", "_add_compare", "_cmd_compare"]

COMPARE_DESCRIPTION = ("One table over several `selfmoe eval` output folders: a row per system, a column per task "
                       "kind (or data file, or record domain) plus the average; each cell accuracy ± its binomial "
                       "standard error sqrt(p(1-p)/n), with n.")
COMPARE_EPILOG = """\
examples:
  # base model, one expert and the MiXSE, per task kind; Markdown on stdout and into a file
  selfmoe compare eval/base eval/math eval/mixse --output results.md

  # name the rows, one column per data file, and keep the numbers as JSON too
  selfmoe compare base=eval/base mixse=eval/mixse --by source --json results.json

rows: the folders' names, or NAME of NAME=DIR. --by task (default): multiple_choice, exact_match,
numeric, code; --by source: the --data files, by stem (mmlu for data/mmlu.jsonl); --by domain: the
records' "domain". average: the mean of the columns, only for systems that have all of them.
Reads each folder's summary.json (and predictions.jsonl for per-source/per-domain numbers of
evaluations written before summary.json recorded them). Torch-free.
"""

from .choices import COMPARE_BY as BY_CHOICES  # defined once, torch-free


def _add_compare(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "compare", help="a table of accuracies across several `selfmoe eval` outputs",
                    description=COMPARE_DESCRIPTION, epilog=COMPARE_EPILOG)
    p.add_argument("dirs", nargs="+", metavar="[NAME=]EVAL_DIR", help="`selfmoe eval` --output folders")
    p.add_argument("--by", choices=BY_CHOICES, default="task", help="what the columns are")
    p.add_argument("--columns", default=None, metavar="A,B,...",
                   help="these columns, in this order (default: all found)")
    p.add_argument("--output", default=None, metavar="FILE.md", help="also write the Markdown table here")
    p.add_argument("--json", default=None, metavar="FILE.json", help="write the table as JSON here")
    return p


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_results, format_markdown
    from .io_utils import atomic_write_json, atomic_write_text

    for flag, value in (("--output", args.output), ("--json", args.json)):
        if value is not None and pathlib.Path(value).is_dir():
            raise CLIError(f"{flag} {value}: is a directory (give a file name)")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        table = compare_results(args.dirs, by=args.by, columns=columns)
    except ValueError as exc:
        if columns is not None and "column(s)" in str(exc):
            raise CLIError(f"--columns: {exc}") from None
        raise
    text = format_markdown(table)
    print(text, end="", flush=True)
    if args.output is not None:
        atomic_write_text(args.output, text)
        say(f"table -> {args.output}")
    if args.json is not None:
        atomic_write_json(args.json, table)
        say(f"table -> {args.json}")
    return 0
