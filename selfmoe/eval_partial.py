"""The partial-predictions file that lets an interrupted ``selfmoe eval`` resume.

:func:`selfmoe.evaluation.evaluate` with ``partial_path`` appends its completions to this JSONL file as
they are generated: a header line holding the run's settings (:func:`partial_settings`: a hash of the
prompts, the sampling, ``routing_stats`` and ``run_info``), then one line per chunk of prompts (fsynced
by :func:`selfmoe.data.append_jsonl`), each ``{"task", "completions": [[index, text, finish_reason],
...], "routing"}``. A line is the unit of progress: a crash mid-write leaves a torn last line, which
the next start drops (:func:`selfmoe.data.repair_jsonl_tail`) and regenerates.

A rerun with the same settings reuses the saved completions and generates only the rest; the final
predictions equal those of an uninterrupted run (chunk boundaries do not depend on what was already
saved). A file made with other settings is refused (:class:`PartialMismatchError`, naming what
differs), since mixing completions of two runs would give numbers that belong to neither, unless the
caller restarts, which discards it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .data import DataFormatError, PathLike, append_jsonl, iter_json_lines, repair_jsonl_tail
from .generate import Completion, SamplingConfig

if TYPE_CHECKING:
    from .eval_records import EvalExample

__all__ = ["PartialMismatchError", "PartialWriter", "partial_settings", "read_partial"]


class PartialMismatchError(ValueError):
    """A partial-predictions file was written by an evaluation with other settings.

    ``path``: the file; ``differences``: what differs (e.g. ``["sampling.max_new_tokens (4, now 8)"]``).
    """

    def __init__(self, path: PathLike, differences: List[str]) -> None:
        self.path = pathlib.Path(path)
        self.differences = differences
        self.reason = (f"{os.fspath(path)} holds completions of an evaluation with different settings: "
                       + "; ".join(differences))
        super().__init__(self.reason + "; rerun with the same settings to continue it, or pass restart=True to "
                                       "discard it")


_PARTIAL_KEY = "selfmoe_eval_partial"


def partial_settings(examples: List[EvalExample], config: SamplingConfig, run_info: Optional[Mapping[str, Any]],
                     routing_stats: bool) -> Dict[str, Any]:
    """What generation depends on, as plain JSON (compared with a partial file's header)."""
    prompts = json.dumps([[e.task, e.prompt] for e in examples], ensure_ascii=False)
    settings = {"records": hashlib.sha256(prompts.encode("utf-8")).hexdigest(), "n_records": len(examples),
                "sampling": dataclasses.asdict(config), "routing_stats": bool(routing_stats),
                "run": dict(run_info or {})}
    try:
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run_info must hold JSON values only: {exc}") from None


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(saved: Any, now: Dict[str, Any]) -> List[str]:
    if not isinstance(saved, dict):
        return ["header (unreadable settings)"]
    out = []
    for key in now:
        a, b = saved.get(key), now[key]
        if a == b:
            continue
        if key == "records":
            if saved.get("n_records") == now["n_records"]:
                out.append("records (other prompts or order)")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k} ({_short(a.get(k))}, now {_short(b.get(k))})" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        else:
            out.append(f"{key} ({_short(a)}, now {_short(b)})")
    return out


def read_partial(path: pathlib.Path, settings: Dict[str, Any]
                 ) -> Optional[Tuple[Dict[int, Completion], Dict[str, List[Tuple[int, Dict[str, Any]]]]]]:
    """Completions (and per-chunk routing summaries) saved in ``path``; None if it holds nothing yet.
    Raises :class:`PartialMismatchError` (other settings) or ``DataFormatError`` (not such a file)."""
    if not path.is_file():
        return None
    rows = iter(iter_json_lines(path))
    first = next(rows, None)
    if first is None:
        return None
    _, head = first
    if not isinstance(head, dict) or head.get(_PARTIAL_KEY) != 1:
        raise DataFormatError(f"{path}:1: not a selfmoe eval partial-predictions file (no header); move it "
                              "away or pass restart=True to overwrite it")
    diffs = _differences(head.get("settings"), settings)
    if diffs:
        raise PartialMismatchError(path, diffs)
    n = settings["n_records"]
    completions: Dict[int, Completion] = {}
    routing: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
    for lineno, row in rows:
        try:
            items = row["completions"]
            got = {int(i): Completion(str(text), str(reason)) for i, text, reason in items}
            if not got or not all(0 <= i < n for i in got):
                raise ValueError("index out of range")
        except (TypeError, KeyError, ValueError) as exc:
            raise DataFormatError(f"{path}:{lineno}: not a partial-predictions row ({exc}); pass restart=True to "
                                  "discard the file") from None
        completions.update(got)
        if row.get("routing") is not None:
            routing.setdefault(str(row.get("task")), []).append((min(got), row["routing"]))
    return completions, routing


class PartialWriter:
    """The partial-predictions file of one evaluation, locked against a second writer (``flock``: two
    evaluations appending to one file would interleave their chunks). ``completions`` / ``routing``: what
    the file already held when opened (:func:`read_partial`), for the evaluation to reuse."""

    def __init__(self, path: PathLike, settings: Dict[str, Any], restart: bool) -> None:
        import fcntl

        self.path = pathlib.Path(path)
        if self.path.exists() and not self.path.is_file():
            raise IsADirectoryError(f"partial_path {os.fspath(path)}: exists and is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RuntimeError(f"partial_path {os.fspath(path)}: another evaluation is writing it") from None
            if restart:
                os.ftruncate(self._fd, 0)
            repair_jsonl_tail(self.path)
            saved = read_partial(self.path, settings)
            if saved is None:
                os.ftruncate(self._fd, 0)
                append_jsonl(self.path, [{_PARTIAL_KEY: 1, "settings": settings}])
                saved = ({}, {})
            self.completions, self.routing = saved
        except BaseException:
            os.close(self._fd)
            raise

    def append(self, task: str, completions: Mapping[int, Completion], routing: Optional[Dict[str, Any]]) -> None:
        """One line per chunk: it is either complete on disk or dropped as a torn line on the next start."""
        append_jsonl(self.path, [{"task": task, "completions": [[i, c.text, c.finish_reason] for i, c in completions.items()],
                                  "routing": routing}])

    def close(self) -> None:
        os.close(self._fd)
