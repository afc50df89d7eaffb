"""The benchmark record format of ``selfmoe eval``: reading and checking the examples.

Data: JSONL, one example per line, each with a ``task`` kind (or one given for the whole file)::

    {"task": "multiple_choice", "instruction": "Which planet ...? (A) Venus (B) Mars (C) ...", "answer": "B"}
    {"task": "exact_match", "instruction": "...", "answer": "True"}
    {"task": "numeric", "instruction": "Tom has 3 apples ...", "answer": "8"}
    {"task": "code", "instruction": "def add(a, b):\\n    \\"\\"\\"Sum.\\"\\"\\"\\n", "tests": "assert add(1, 2) == 3",
     "entry_point": "add"}

Optional keys: ``input`` (Alpaca input), ``id`` (copied to the predictions), ``domain`` (a non-empty
string, e.g. the MMLU subject or the BBH subtask: the summary then reports accuracy, and routing
statistics, per domain too). Few-shot examples, when
wanted, go into the instruction. Every prompt is the template the experts were trained with
(:attr:`EvalExample.prompt`): Alpaca, or the model's chat template (:meth:`EvalExample.with_format`). Gold answers are checked here, where the file and line are known: a
multiple-choice answer must be one option letter, a numeric one must hold a finite number (read with
:func:`selfmoe.eval_scoring.extract_number`, like responses), so a record that could never be scored
correct is an error naming ``file:line``, not a silent zero.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

# data's "file:line: " / "record N: " prefix, so eval records and training records report errors alike.
from .data import DataFormatError, PathLike, format_prompt, iter_json_lines, where_prefix
from .eval_scoring import TASKS, extract_number

__all__ = ["EvalExample", "validate_eval_record", "load_eval_records"]


@dataclass(frozen=True)
class EvalExample:
    """One validated example. ``answer``: the normalised gold answer (a letter for multiple choice, the
    text for exact match, a float for numeric, None for code). ``source``: ``file:line`` or ``record N``;
    ``file``: the file it came from (None for records given in Python); ``domain``: the record's own.
    ``formatted``: the prompt rendered in another format than Alpaca (see :meth:`with_format`)."""

    task: str
    instruction: str
    input: str = ""
    answer: Any = None
    tests: Optional[str] = None
    entry_point: Optional[str] = None
    id: Any = None
    source: str = ""
    raw_answer: Any = None
    domain: Optional[str] = None
    file: Optional[str] = None
    formatted: Optional[str] = field(default=None, repr=False)

    @property
    def prompt(self) -> str:
        """The model's prompt: the Alpaca template unless :meth:`with_format` rendered another."""
        if self.formatted is not None:
            return self.formatted
        return format_prompt(self.instruction, self.input)

    def with_format(self, fmt: str, tokenizer: Any = None) -> "EvalExample":
        """This example prompted in ``fmt`` (``"alpaca"``, ``"chat"``: ``tokenizer``'s chat template, or
        ``"auto"``; see :mod:`selfmoe.prompt_format`)."""
        from .prompt_format import resolve_prompt_format

        if resolve_prompt_format(fmt, tokenizer) == "alpaca":
            return dataclasses.replace(self, formatted=None)
        return dataclasses.replace(self, formatted=format_prompt(self.instruction, self.input, fmt="chat",
                                                                 tokenizer=tokenizer))


def _nonempty_str(rec: Mapping[str, Any], key: str, where: str) -> str:
    if key not in rec:
        raise DataFormatError(f"{where}missing required key {key!r} (keys: {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataFormatError(f"{where}{key!r} is empty")
    return value


def validate_eval_record(obj: Any, *, task: Optional[str] = None, path: Optional[PathLike] = None,
                         line: Optional[int] = None) -> EvalExample:
    """Check one record and return it as an :class:`EvalExample`.

    ``task``: the kind for records without a ``task`` key (a record with a different one is an
    error). Raises :class:`selfmoe.data.DataFormatError` naming ``path:line`` and the key.
    """
    where = where_prefix(path, line)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if isinstance(obj, EvalExample):
        return obj
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("task")
    if kind is None:
        if task is None:
            raise DataFormatError(f"{where}missing required key 'task' (one of {list(TASKS)}; or give the kind "
                                  "for the whole file)")
        kind = task
    elif kind not in TASKS:
        raise DataFormatError(f"{where}'task' must be one of {list(TASKS)}, got {kind!r}")
    elif task is not None and kind != task:
        raise DataFormatError(f"{where}record has task {kind!r} but {task!r} was given for this file")
    instruction = _nonempty_str(obj, "instruction", where)
    inp = obj.get("input") or ""
    if not isinstance(inp, str):
        raise DataFormatError(f"{where}'input' must be a string, got {type(inp).__name__}")
    domain = obj.get("domain")
    if domain is not None and (not isinstance(domain, str) or not domain.strip()):
        raise DataFormatError(f"{where}'domain' must be a non-empty string, got {domain!r}")
    source = where[:-2] if where.endswith(": ") else where
    common = dict(task=kind, instruction=instruction, input=inp, id=obj.get("id"), source=source,
                  raw_answer=obj.get("answer"), domain=domain.strip() if domain else None,
                  file=os.fspath(path) if path is not None else None)
    if kind == "code":
        tests = _nonempty_str(obj, "tests", where)
        entry = _nonempty_str(obj, "entry_point", where).strip()
        if not entry.isidentifier():
            raise DataFormatError(f"{where}'entry_point' must be a Python identifier, got {entry!r}")
        return EvalExample(tests=tests, entry_point=entry, **common)
    if "answer" not in obj:
        raise DataFormatError(f"{where}missing required key 'answer' (keys: {sorted(obj)})")
    answer = obj["answer"]
    if kind == "numeric":
        if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
            raise DataFormatError(f"{where}'answer' must be a number or a string holding one, got {answer!r}")
        value = float(answer) if not isinstance(answer, str) else extract_number(answer)
        if value is None or not math.isfinite(value):
            raise DataFormatError(f"{where}'answer' {answer!r} holds no finite number")
        return EvalExample(answer=value, **common)
    if not isinstance(answer, str) or not answer.strip():
        raise DataFormatError(f"{where}'answer' must be a non-empty string, got {answer!r}")
    if kind == "multiple_choice":
        letter = answer.strip().strip("()").strip().upper()
        if len(letter) != 1 or not "A" <= letter <= "Z":
            raise DataFormatError(f"{where}'answer' must be one option letter such as \"B\" or \"(B)\", got {answer!r}")
        return EvalExample(answer=letter, **common)
    return EvalExample(answer=answer, **common)


def load_eval_records(path: PathLike, *, task: Optional[str] = None) -> List[EvalExample]:
    """The examples of one JSONL file (see :func:`validate_eval_record`); errors name ``file:line``.
    Blank lines are skipped; an empty file is an error (an evaluation of nothing is a mistake)."""
    out = [validate_eval_record(obj, task=task, path=path, line=lineno) for lineno, obj in iter_json_lines(path)]
    if not out:
        raise DataFormatError(f"{os.fspath(path)}: no records")
    return out
