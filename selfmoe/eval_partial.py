"""The partial-predictions file that lets an interrupted ``selfmoe eval`` resume.

:func:`selfmoe.evaluation.evaluate` with ``partial_path`` appends its completions to this JSONL file as
they are generated: a header line holding the run's settings (:func:`partial_settings`: a hash of the
prompts, the sampling, ``routing_stats``, ``run_info`` and the multiple-choice scoring when it is not
``generate``), then one line per chunk of prompts (fsynced by :func:`selfmoe.data.append_jsonl`), each
``{"task", "completions": [[index, text, finish_reason], ...], "routing"}`` (``"logliks": [[index,
{letter: log-likelihood}], ...]`` instead of ``"completions"`` for multiple choice scored by
log-likelihood; ``"domain"`` when the chunk's records have one). A line is the unit of progress: a crash mid-write leaves a torn last line, which
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
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

from .data import DataFormatError, PathLike, append_jsonl, iter_json_lines, repair_jsonl_tail
from .eval_scoring import OptionScores, loglik_json
from .generate import Completion, SamplingConfig

if TYPE_CHECKING:
    from .eval_records import EvalExample

__all__ = ["PartialMismatchError", "PartialWriter", "partial_settings", "settings_differences", "read_partial"]


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
                     routing_stats: bool, mc_scoring: str = "generate") -> Dict[str, Any]:
    """What generation depends on, as plain JSON (compared with a partial file's header, and with the
    ``settings`` of a finished evaluation's summary). ``mc_scoring`` appears only when it is not
    ``generate``, so files written before it existed still match."""
    # The records' domains group the chunks (and routing statistics), so they are part of the hash,
    # but only when present: files written before domains existed still match.
    prompts = json.dumps([[e.task, e.prompt] + ([e.domain] if e.domain is not None else []) for e in examples],
                         ensure_ascii=False)
    settings = {"records": hashlib.sha256(prompts.encode("utf-8")).hexdigest(), "n_records": len(examples),
                "sampling": dataclasses.asdict(config), "routing_stats": bool(routing_stats),
                "run": dict(run_info or {})}
    if mc_scoring != "generate":
        settings["mc_scoring"] = mc_scoring
    try:
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run_info must hold JSON values only: {exc}") from None


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(saved: Any, now: Dict[str, Any]) -> List[str]:
    """What differs between two :func:`partial_settings`, one short phrase each (empty: the same)."""
    if not isinstance(saved, dict):
        return ["header (unreadable settings)"]
    out = []
    for key in list(now) + [k for k in saved if k not in now]:
        a, b = saved.get(key), now.get(key)
        if key == "mc_scoring":  # absent means "generate"
            a, b = a or "generate", b or "generate"
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


settings_differences = _differences


Saved = Union[Completion, OptionScores]


def read_partial(path: pathlib.Path, settings: Dict[str, Any]
                 ) -> Optional[Tuple[Dict[int, Saved], List[Tuple[int, Dict[str, Any]]]]]:
    """Completions or option scores (by example index) and per-chunk routing summaries (keyed by the
    chunk's first index) saved in ``path``; None if it holds nothing yet. Raises
    :class:`PartialMismatchError` (other settings) or ``DataFormatError`` (not such a file)."""
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
    completions: Dict[int, Saved] = {}
    routing: List[Tuple[int, Dict[str, Any]]] = []
    for lineno, row in rows:
        try:
            got: Dict[int, Saved]
            if "logliks" in row:
                got = {int(i): OptionScores({str(k): float("-inf") if v is None else float(v) for k, v in scores.items()})
                       for i, scores in row["logliks"]}
            else:
                got = {int(i): Completion(str(text), str(reason)) for i, text, reason in row["completions"]}
            if not got or not all(0 <= i < n for i in got):
                raise ValueError("index out of range")
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise DataFormatError(f"{path}:{lineno}: not a partial-predictions row ({exc}); pass restart=True to "
                                  "discard the file") from None
        completions.update(got)
        if row.get("routing") is not None:
            routing.append((min(got), row["routing"]))
    return completions, routing


class PartialWriter:
    """The partial-predictions file of one evaluation, locked against a second writer (``flock``: two
    evaluations appending to one file would interleave their chunks). ``completions`` / ``routing``: what
    the file already held when opened (:func:`read_partial`), for the evaluation to reuse."""

    completions: Dict[int, Saved]
    routing: List[Tuple[int, Dict[str, Any]]]

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
                saved = ({}, [])
            self.completions, self.routing = saved
        except BaseException:
            os.close(self._fd)
            raise

    def append(self, task: str, completions: Mapping[int, Saved], routing: Optional[Dict[str, Any]],
               domain: Optional[str] = None) -> None:
        """One line per chunk: it is either complete on disk or dropped as a torn line on the next start."""
        row: Dict[str, Any] = {"task": task}
        if domain is not None:
            row["domain"] = domain
        if all(isinstance(c, OptionScores) for c in completions.values()):
            row["logliks"] = [[i, loglik_json(c.logliks)] for i, c in completions.items()]  # type: ignore[union-attr]
        else:
            row["completions"] = [[i, c.text, c.finish_reason] for i, c in completions.items()]  # type: ignore[union-attr]
        row["routing"] = routing
        append_jsonl(self.path, [row])

    def close(self) -> None:
        os.close(self._fd)
