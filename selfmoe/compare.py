"""Accuracy tables across evaluations: the systems ``selfmoe eval`` scored, side by side.

:func:`compare_results` reads the ``summary.json`` of several ``selfmoe eval`` output folders (see
:func:`selfmoe.evaluation.write_results`) and builds one table: a row per system (the folder's name, or
the ``NAME`` of ``NAME=DIR``), a column per group present in any of them, plus the average.
:func:`format_markdown` prints it. Groups (``by``):

- ``task``: the record kinds (``multiple_choice``, ``exact_match``, ``numeric``, ``code``); every summary has them.
- ``source``: the data files, named by their stem (``mmlu`` for ``data/mmlu.jsonl``, so the same benchmark
  read from another folder lines up); the full path when two files of one summary share a stem.
- ``domain``: the records' ``domain`` (MMLU subject, BBH subtask ...).

``source`` and ``domain`` come from the summary's ``sources`` / ``domains`` (written since they were
added), else from the folder's ``predictions.jsonl`` (each row's ``source`` is ``file:line``, and its
``domain``), so older evaluations compare too.

Each cell: ``n``, ``correct``, ``accuracy`` and its binomial standard error ``sqrt(p (1 - p) / n)``.
The average is the mean of a system's column accuracies (the paper's macro average), its standard
error ``sqrt(sum se_i^2) / k`` (columns independent); it is left empty (None) for a system that lacks
one of the columns, since a mean over other columns would not compare with the rest.

Torch-free: this reads JSON only.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .choices import COMPARE_BY, EVAL_TASKS  # defined once, torch-free (the CLI offers them too)

__all__ = ["COMPARE_BY", "compare_results", "format_markdown", "cell"]

PathLike = Union[str, "os.PathLike[str]"]


def cell(n: int, correct: int) -> Dict[str, Any]:
    """``{"n", "correct", "accuracy", "stderr"}``, the standard error binomial: ``sqrt(p (1 - p) / n)``."""
    p = correct / n if n else 0.0
    return {"n": n, "correct": correct, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


def _systems(dirs: Union[Sequence[Any], Mapping[str, Any]]) -> List[Tuple[str, pathlib.Path]]:
    """``(name, folder)`` per system: a mapping's items, ``"NAME=DIR"`` strings, or folders (named by
    their last component, or by the path as given when two share it)."""
    if isinstance(dirs, Mapping):
        named = [(str(k), pathlib.Path(v)) for k, v in dirs.items()]
    else:
        named = []
        for item in dirs:
            text = os.fspath(item)
            name, sep, rest = text.partition("=")
            if sep and name and rest and not pathlib.Path(text).exists():
                named.append((name, pathlib.Path(rest)))
            else:
                named.append(("", pathlib.Path(text)))
    if not named:
        raise ValueError("no evaluation folders to compare")
    default = [p.resolve().name if p.name in ("", ".", "..") else p.name for _, p in named]
    out = []
    for (name, path), base in zip(named, default):
        if not name:
            name = base if default.count(base) == 1 else os.fspath(path)
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two systems are named {dup[0]!r}: name them with NAME=DIR")
    return out


def _read_summary(path: pathlib.Path) -> Tuple[pathlib.Path, Dict[str, Any]]:
    """The folder and its summary (``path`` may also be the summary.json file itself)."""
    folder, file = (path.parent, path) if path.is_file() else (path, path / "summary.json")
    if not file.is_file():
        what = "no such folder" if not path.exists() else "no summary.json there (is it a `selfmoe eval` --output?)"
        raise FileNotFoundError(f"{os.fspath(path)}: {what}")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{os.fspath(file)}: not a readable summary ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise ValueError(f"{os.fspath(file)}: not a `selfmoe eval` summary (no \"tasks\")")
    return folder, summary


def _source_names(paths: Sequence[str]) -> Dict[str, str]:
    """A short column name per data file: its stem, unless two files share one (then the path)."""
    stems = [pathlib.PurePath(p).stem for p in paths]
    return {p: (s if stems.count(s) == 1 else p) for p, s in zip(paths, stems)}


def _from_predictions(folder: pathlib.Path, by: str) -> Dict[str, Dict[str, int]]:
    """Per-source or per-domain counts from ``predictions.jsonl`` (for summaries written before those
    were recorded); empty when the file is missing."""
    path = folder / "predictions.jsonl"
    if not path.is_file():
        return {}
    counts: Dict[str, Dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)}:{lineno}: invalid JSON ({exc})") from None
            if by == "domain":
                key = row.get("domain")
            else:
                file, sep, num = str(row.get("source") or "").rpartition(":")
                key = file if sep and num.isdigit() else None  # "record N": given in Python, no file
            if key is None:
                continue
            c = counts.setdefault(str(key), {"n": 0, "correct": 0})
            c["n"] += 1
            c["correct"] += 1 if row.get("correct") else 0
    return counts


def _groups(folder: pathlib.Path, summary: Mapping[str, Any], by: str) -> Dict[str, Dict[str, int]]:
    """``{column: {"n", "correct"}}`` of one evaluation."""
    if by == "task":
        raw = summary["tasks"]
    else:
        raw = summary.get("sources" if by == "source" else "domains")
        if raw is None:
            raw = _from_predictions(folder, by)
    out = {str(k): {"n": int(v["n"]), "correct": int(v["correct"])} for k, v in raw.items() if int(v.get("n", 0)) > 0}
    if by == "source":
        names = _source_names(list(out))
        out = {names[k]: v for k, v in out.items()}
    return out


def compare_results(dirs: Union[Sequence[Any], Mapping[str, Any]], *, by: str = "task",
                    columns: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """One table over several ``selfmoe eval`` output folders (see the module docstring).

    ``dirs``: folders (or their ``summary.json``), ``"NAME=DIR"`` strings, or a ``{name: folder}``
    mapping. ``by``: ``task``, ``source`` or ``domain``. Returns plain JSON::

        {"by": "task", "columns": ["multiple_choice", ...],
         "systems": [{"name", "dir", "mc_scoring", "cells": {column: cell(...)},
                      "average": {"n", "accuracy", "stderr", "columns"} or None}]}

    ``columns``: the columns, in this order (e.g. the paper's knowledge, reasoning, math, coding);
    default: every one found (tasks in their usual order, otherwise in order of appearance).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder that cannot be read, and
    ``ValueError`` when no folder has a ``by`` breakdown at all or a requested column is in none.
    """
    if by not in COMPARE_BY:
        raise ValueError(f"by must be one of {list(COMPARE_BY)}, got {by!r}")
    rows = []
    for name, path in _systems(dirs):
        folder, summary = _read_summary(path)
        rows.append((name, path, summary, _groups(folder, summary, by)))
    seen: List[str] = []
    for *_, groups in rows:
        seen += [k for k in groups if k not in seen]
    if not seen:
        raise ValueError(f"none of the evaluations has per-{by} results (records without {by}s?)")
    if columns is not None:
        missing = [c for c in columns if c not in seen]
        if missing or not columns:
            raise ValueError(f"column(s) {missing or columns} not in the evaluations' per-{by} results {seen}")
        columns = list(columns)
    else:
        columns = [t for t in EVAL_TASKS if t in seen] + [k for k in seen if k not in EVAL_TASKS] if by == "task" else seen
    systems = []
    for name, path, summary, groups in rows:
        cells = {c: cell(groups[c]["n"], groups[c]["correct"]) for c in columns if c in groups}
        average = None
        if len(cells) == len(columns):
            k = len(cells)
            average = {"n": sum(x["n"] for x in cells.values()),
                       "accuracy": sum(x["accuracy"] for x in cells.values()) / k,
                       "stderr": math.sqrt(sum(x["stderr"] ** 2 for x in cells.values())) / k, "columns": k}
        systems.append({"name": name, "dir": os.fspath(path), "mc_scoring": summary.get("mc_scoring", "generate"),
                        "cells": cells, "average": average})
    return {"by": by, "columns": columns, "systems": systems}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(c: Optional[Mapping[str, Any]]) -> str:
    if c is None:
        return "–"
    return f"{100 * c['accuracy']:.1f} ± {100 * c['stderr']:.1f} (n={c['n']})"


def format_markdown(table: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`compare_results`: accuracy % ± standard error (n) per cell, "–" where
    a system has no result; a note under it says how the numbers are made."""
    columns = list(table["columns"])
    head = ["system"] + columns + ["average"]
    lines = ["| " + " | ".join(_md(h) for h in head) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in table["systems"]:
        cells = [_fmt(s["cells"].get(c)) for c in columns] + [_fmt(s.get("average"))]
        lines.append("| " + " | ".join([_md(s["name"])] + cells) + " |")
    scorings = sorted({s.get("mc_scoring", "generate") for s in table["systems"]})
    note = (f"\nAccuracy (%) ± binomial standard error sqrt(p(1-p)/n), per {table['by']}; average: the mean of the "
            "columns (its error sqrt(sum se²)/k), only for systems with every column.")
    if len(scorings) > 1:
        note += " Multiple choice was scored differently across systems: " + ", ".join(
            f"{_md(s['name'])}: {s.get('mc_scoring', 'generate')}" for s in table["systems"]) + "."
    return "\n".join(lines) + "\n" + note + "\n"
