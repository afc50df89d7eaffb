"""Evaluation on the paper's kinds of benchmark: multiple choice (MMLU), exact match (BBH), numeric
answers (GSM8K) and code with tests (HumanEval, pass@1).

Data: JSONL, one example per line, each with a ``task`` kind (or one given for the whole file)::

    {"task": "multiple_choice", "instruction": "Which planet ...? (A) Venus (B) Mars (C) ...", "answer": "B"}
    {"task": "exact_match", "instruction": "...", "answer": "True"}
    {"task": "numeric", "instruction": "Tom has 3 apples ...", "answer": "8"}
    {"task": "code", "instruction": "def add(a, b):\\n    \\"\\"\\"Sum.\\"\\"\\"\\n", "tests": "assert add(1, 2) == 3",
     "entry_point": "add"}

Optional keys: ``input`` (Alpaca input), ``id`` (copied to the predictions). Few-shot examples, when
wanted, go into the instruction. Every prompt is the Alpaca template the experts were trained with,
decoded greedily by default (the paper's evaluation is greedy), cut at the template's stop marks.

Scoring rules (the functions named here are public and tested):

- ``multiple_choice`` (:func:`extract_choice`): the letter of the last "answer is X" / "answer: X" /
  "answer is (X)" (case-insensitive "answer", upper-case letter not followed by a letter or digit); if
  there is none, the last "(X)" in the response; if there is none, a response that is just one letter
  ("B", "B.", "B)"). Only the options' letters count (the "(X)" letters of the instruction; A-Z if it
  has none). No letter found: wrong. The gold answer may be written "B", "b" or "(B)".
- ``exact_match`` (:func:`extract_final_answer`, :func:`normalize_answer`): the text after the last
  "answer is" (to the end of that line, a leading ":" dropped), or else the last non-empty line;
  both sides are normalised: lower case, whitespace runs collapsed to one space, surrounding quotes,
  ``**`` and spaces removed, trailing periods removed. Equal strings are correct.
- ``numeric`` (:func:`extract_number`): the last number in the response ("1,234", "$5", "-3", "2.50",
  ".5"; a "-" right after a letter, digit or ")" is a range dash, not a sign). The gold answer is read
  the same way (so GSM8K's "... #### 72" works). Equal within 1e-6 relative tolerance.
- ``code`` (:func:`build_program`, :func:`run_program`): the code is the first fenced block
  (```` ```python ````) of the response (an unclosed fence runs to the end), or the whole response.
  If it defines ``def <entry_point>(`` it runs after the instruction (when the instruction compiles as
  Python: its imports and helpers stay; the new definition wins); otherwise it is taken as the body
  that continues the instruction's signature. Then the tests run (a ``def check(candidate)`` in them
  is called with the entry point). Passed only if the program runs to its end within the limits:
  a program that crashes, raises, calls ``sys.exit(0)``/``os._exit(0)`` early, loops forever, prints
  past the output limit or exceeds another limit fails.

Running code is opt-in: ``evaluate`` raises :class:`CodeExecutionNotAllowed` before generating
anything when code examples are present, unless ``allow_code_execution=True`` (CLI:
``--allow-code-execution``) or the environment has ``SELFMOE_ALLOW_CODE_EVAL=1``. Each program then
runs in :mod:`selfmoe.sandbox` (a fresh work dir and ``HOME``, resource limits, no process left behind,
and as root also no network, its own unprivileged uid and private tmp dirs; the verdict comes from a
trusted runner over a pipe with a per-run secret, so printing anything or exiting early cannot pass).
That module's docstring says exactly what is and is not contained.

Resuming: with ``partial_path``, completions are appended to that JSONL file (fsynced) as they are
generated, one line per chunk of prompts. A rerun with the same records, sampling and ``run_info``
reuses them and generates only the rest; the final predictions equal those of an uninterrupted run
(chunk boundaries do not depend on what was already saved). A file made with other settings is refused
(:class:`PartialMismatchError`) unless ``restart=True``, which discards it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .data import DataFormatError, PathLike, append_jsonl, format_prompt, iter_json_lines, repair_jsonl_tail, write_jsonl
from .generate import Completion, SamplingConfig, TextGenerator
from .io_utils import atomic_write_json
from .sandbox import SandboxConfig, check_sandbox, run_python

__all__ = [
    "TASKS", "EvalExample", "EvalResult", "CodeResult", "CodeExecutionNotAllowed", "PartialMismatchError",
    "ALLOW_CODE_ENV", "code_execution_allowed", "check_partial",
    "validate_eval_record", "load_eval_records", "default_sampling", "evaluate", "write_results",
    "score", "extract_choice", "extract_final_answer", "normalize_answer", "extract_number",
    "extract_code", "build_program", "run_program",
]

TASKS = ("multiple_choice", "exact_match", "numeric", "code")
#: Set to ``1`` to allow running the model's programs when ``allow_code_execution`` is not given.
ALLOW_CODE_ENV = "SELFMOE_ALLOW_CODE_EVAL"


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class EvalExample:
    """One validated example. ``answer``: the normalised gold answer (a letter for multiple choice, the
    text for exact match, a float for numeric, None for code). ``source``: ``file:line`` or ``record N``."""

    task: str
    instruction: str
    input: str = ""
    answer: Any = None
    tests: Optional[str] = None
    entry_point: Optional[str] = None
    id: Any = None
    source: str = ""
    raw_answer: Any = None

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)


def _where(path: Optional[PathLike], line: Optional[int]) -> str:
    if path is None:
        return "record: " if line is None else f"record {line}: "
    return f"{os.fspath(path)}:{line}: " if line is not None else f"{os.fspath(path)}: "


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
    where = _where(path, line)
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
    source = where[:-2] if where.endswith(": ") else where
    common = dict(task=kind, instruction=instruction, input=inp, id=obj.get("id"), source=source,
                  raw_answer=obj.get("answer"))
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


# ----------------------------------------------------------------------------------------------------
# Scorers

_ANSWER_LETTER = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:=]?\s*(?:(?i:option)\s+)?\(?([A-Z])\)?(?![A-Za-z0-9])")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def _option_letters(instruction: str) -> str:
    letters = sorted(set(_PAREN_LETTER.findall(instruction or "")))
    return "".join(letters) if letters else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def extract_choice(response: str, instruction: str = "") -> Optional[str]:
    """The option letter a response picks, or None (see the module docstring for the rule)."""
    valid = _option_letters(instruction)
    hits = [m.group(1) for m in _ANSWER_LETTER.finditer(response) if m.group(1) in valid]
    if hits:
        return hits[-1]
    hits = [x for x in _PAREN_LETTER.findall(response) if x in valid]
    if hits:
        return hits[-1]
    bare = response.strip().rstrip(".)").lstrip("(").strip()
    if len(bare) == 1 and bare in valid:
        return bare
    return None


_ANSWER_IS = re.compile(r"answer\s+is", re.I)


def extract_final_answer(response: str) -> str:
    """Text after the last "answer is" (to the end of its line), else the last non-empty line ("" if none)."""
    last = None
    for m in _ANSWER_IS.finditer(response):
        last = m
    if last is not None:
        rest = response[last.end():].lstrip(" \t:")
        line = rest.split("\n", 1)[0].strip()
        if line:
            return line
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding quotes/``**``/spaces and trailing periods removed."""
    t = " ".join(str(text).lower().split())
    prev = None
    while t != prev:
        prev = t
        t = t.strip().strip("*").strip().rstrip(".").strip()
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'`":
            t = t[1:-1]
    return t


_NUMBER = re.compile(r"(?<![\w.)])(-)?\$?(-)?(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def extract_number(text: str) -> Optional[float]:
    """The last number in ``text`` as a float, or None (see the module docstring)."""
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    if last is None:
        return None
    value = float(last.group(3).replace(",", ""))
    return -value if (last.group(1) or last.group(2)) else value


def _numbers_equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(response: str, entry_point: Optional[str] = None) -> str:
    """The first fenced code block (the first one defining ``entry_point`` if several), else the response."""
    blocks = [m.group(2) for m in _FENCE.finditer(response)]
    if not blocks:
        return response
    if entry_point:
        for b in blocks:
            if _defines(b, entry_point):
                return b
    return blocks[0]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _compiles(code: str) -> bool:
    try:
        compile(code, "<instruction>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def build_program(instruction: str, response: str, tests: str, entry_point: str) -> str:
    """The program a code example runs (see the module docstring): solution, tests, ``check`` call.
    It holds nothing secret: whether it ran to its end is reported by the sandbox's runner."""
    code = extract_code(response, entry_point)
    if _defines(code, entry_point):
        prefix = instruction if _compiles(instruction) else ""
        solution = (prefix.rstrip() + "\n\n\n" if prefix.strip() else "") + code
    else:
        solution = instruction.rstrip("\n") + "\n" + code
    parts = [solution.rstrip(), "", "", tests.rstrip()]
    if re.search(r"^def\s+check\s*\(", tests, re.M):
        parts.append(f"check({entry_point})")
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str  # "passed", "failed" (assertion, exception, early exit, a limit) or "timeout"
    detail: str = ""  # why it failed: the limit hit and/or the tail of stderr
    limit: Optional[str] = None  # the limit that ended it: "timeout", "cpu", "output" (see selfmoe.sandbox)


def run_program(program: str, *, timeout: Optional[float] = None, sandbox: Optional[SandboxConfig] = None) -> CodeResult:
    """Run ``program`` in :func:`selfmoe.sandbox.run_python`: passed only if it runs to its end (the
    sandbox's runner reports it; output and exit status alone cannot) within the limits.

    ``timeout``: wall-clock seconds (default ``sandbox.timeout``, else 10). ``sandbox``: the other
    limits and isolation (default :class:`selfmoe.sandbox.SandboxConfig`). Calling this function is
    the opt-in: it runs the program. A failing program is a result, never an exception;
    :class:`selfmoe.sandbox.SandboxError` means the sandbox itself cannot run here.
    """
    cfg = sandbox if sandbox is not None else SandboxConfig()
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        cfg = cfg.replace(timeout=float(timeout))
    res = run_python(program, cfg)
    if res.completed:
        return CodeResult(True, "passed", "")
    if res.status == "timeout":
        return CodeResult(False, "timeout", f"timed out after {cfg.timeout:g} s", limit="timeout")
    stderr = res.stderr.strip()[-1000:]
    if res.limit is not None or not stderr:
        detail = res.reason + (f"\n{stderr[-800:]}" if stderr else "")
    else:
        detail = stderr
    return CodeResult(False, "failed", detail, limit=res.limit)


def score(example: EvalExample, response: str) -> Dict[str, Any]:
    """``{"prediction", "correct"}`` for a non-code example (code needs :func:`run_program`)."""
    if example.task == "multiple_choice":
        pred: Any = extract_choice(response, example.instruction)
        return {"prediction": pred, "correct": pred is not None and pred == example.answer}
    if example.task == "exact_match":
        pred = extract_final_answer(response)
        return {"prediction": pred, "correct": normalize_answer(pred) == normalize_answer(example.answer)}
    if example.task == "numeric":
        pred = extract_number(response)
        return {"prediction": pred, "correct": pred is not None and _numbers_equal(pred, example.answer)}
    raise ValueError(f"score() handles {list(TASKS[:3])}; {example.task!r} examples are run with run_program()")


# ----------------------------------------------------------------------------------------------------
# Opt-in and resumable progress


class CodeExecutionNotAllowed(PermissionError):
    """Code examples are present, and running the programs a model writes was not allowed."""


def code_execution_allowed(allow: Optional[bool] = None) -> bool:
    """``allow`` when given (True/False), else whether the environment has ``SELFMOE_ALLOW_CODE_EVAL=1``."""
    if allow is not None:
        return bool(allow)
    return os.environ.get(ALLOW_CODE_ENV, "").strip() == "1"


def _refusal(n_code: int) -> str:
    return (f"{n_code} code example(s) would run the programs the model writes on this machine; allow it with "
            f"allow_code_execution=True (CLI: --allow-code-execution) or {ALLOW_CODE_ENV}=1 (they run in "
            "selfmoe.sandbox: see its documentation for what it contains)")


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


def _settings(examples: List[EvalExample], config: SamplingConfig, run_info: Optional[Mapping[str, Any]],
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


def _read_partial(path: pathlib.Path, settings: Dict[str, Any]
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


def check_partial(path: PathLike, records: Iterable[Union[EvalExample, Mapping[str, Any]]], *,
                  sampling: Optional[SamplingConfig] = None, max_new_tokens: int = 256,
                  run_info: Optional[Mapping[str, Any]] = None, routing_stats: bool = False) -> int:
    """How many completions :func:`evaluate` would reuse from ``path`` with these arguments (0 when the
    file does not exist); changes nothing but a torn last line (as :func:`evaluate` would). Raises :class:`PartialMismatchError` when the file was made
    with other settings, so a caller can refuse before loading a model."""
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    config = sampling if sampling is not None else default_sampling(max_new_tokens)
    p = pathlib.Path(path)
    if p.is_file():
        repair_jsonl_tail(p)
    saved = _read_partial(p, _settings(examples, config, run_info, routing_stats))
    return 0 if saved is None else len(saved[0])


class _PartialWriter:
    """The partial-predictions file of one evaluation, locked against a second writer."""

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
            saved = _read_partial(self.path, settings)
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


def _merge_routing(parts: List[Tuple[int, Dict[str, Any]]]) -> Dict[str, Any]:
    """One routing summary from per-chunk ones (token-weighted means), merged in index order, so an
    interrupted-and-resumed run gives the same numbers as an uninterrupted one."""
    if len(parts) == 1:
        return parts[0][1]
    totals: Dict[str, Dict[str, Any]] = {}
    for _, part in sorted(parts, key=lambda p: p[0]):
        for key, entry in part.items():
            acc = totals.setdefault(key, {"tokens": 0, "sums": {}, "weights": {}})
            t = int(entry.get("tokens", 0))
            acc["tokens"] += t
            for stat in ("usage", "mean_gate", "mean_prob"):
                if stat in entry:
                    sums = acc["sums"].setdefault(stat, {})
                    acc["weights"][stat] = acc["weights"].get(stat, 0) + t
                    for name, v in entry[stat].items():
                        sums[name] = sums.get(name, 0.0) + float(v) * t
    out: Dict[str, Any] = {}
    for key, acc in totals.items():
        entry: Dict[str, Any] = {"tokens": acc["tokens"]}
        for stat, sums in acc["sums"].items():
            w = acc["weights"][stat]
            entry[stat] = {name: (s / w if w else 0.0) for name, s in sums.items()}
        out[key] = entry
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluation


def default_sampling(max_new_tokens: int = 256) -> SamplingConfig:
    """Greedy decoding cut at the Alpaca template's stop marks (the paper evaluates greedily)."""
    from .prompts import STOP_MARKS

    return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, stop=STOP_MARKS)


@dataclass
class EvalResult:
    """Per-task and overall accuracy, and one prediction record per example (input order).

    ``tasks``: ``{task: {"n", "correct", "accuracy"}}`` in :data:`TASKS` order (tasks present only).
    ``routing``: ``{task: RoutingStats.summary()}`` when routing statistics were collected.
    ``sandbox``: how code examples ran (limits and :class:`selfmoe.sandbox.Containment`), when any did.
    ``resumed``: completions reused from ``partial_path`` instead of generated.
    """

    tasks: Dict[str, Dict[str, Any]]
    predictions: List[Dict[str, Any]]
    sampling: Dict[str, Any]
    routing: Optional[Dict[str, Any]] = None
    sandbox: Optional[Dict[str, Any]] = None
    resumed: int = 0

    @property
    def n(self) -> int:
        return sum(t["n"] for t in self.tasks.values())

    @property
    def correct(self) -> int:
        return sum(t["correct"] for t in self.tasks.values())

    @property
    def accuracy(self) -> float:
        """Micro average over all examples."""
        return self.correct / self.n if self.n else 0.0

    @property
    def macro_accuracy(self) -> float:
        """Mean of the per-task accuracies (how the paper averages its benchmarks)."""
        return sum(t["accuracy"] for t in self.tasks.values()) / len(self.tasks) if self.tasks else 0.0

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "tasks": self.tasks,
            "overall": {"n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                        "macro_accuracy": self.macro_accuracy},
            "sampling": self.sampling,
        }
        if self.routing is not None:
            out["routing"] = self.routing
        if self.sandbox is not None:
            out["sandbox"] = self.sandbox
        return out

    def table(self) -> str:
        """A small text table: task, n, correct, accuracy (percent)."""
        rows = [(t, str(v["n"]), str(v["correct"]), f"{100 * v['accuracy']:.1f}") for t, v in self.tasks.items()]
        rows.append(("overall", str(self.n), str(self.correct), f"{100 * self.accuracy:.1f}"))
        if len(self.tasks) > 1:
            rows.append(("macro avg", "", "", f"{100 * self.macro_accuracy:.1f}"))
        head = ("task", "n", "correct", "accuracy")
        w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        fmt = lambda r: f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}"  # noqa: E731
        return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def evaluate(model: Any, tokenizer: Any, records: Iterable[Union[EvalExample, Mapping[str, Any]]], *,
             sampling: Optional[SamplingConfig] = None, max_new_tokens: int = 256, batch_size: int = 8,
             progress: bool = False, generator: Optional[TextGenerator] = None, routing_stats: bool = False,
             code_timeout: Optional[float] = None, code_workers: int = 2,
             allow_code_execution: Optional[bool] = None, sandbox: Optional[SandboxConfig] = None,
             partial_path: Optional[PathLike] = None, restart: bool = False,
             run_info: Optional[Mapping[str, Any]] = None, chunk_size: Optional[int] = None) -> EvalResult:
    """Generate a response per example (one task at a time) and score it.

    Args:
        model, tokenizer: what :class:`selfmoe.generate.HFGenerator` runs (a base model, a model with a
            LoRA adapter attached, or a :class:`selfmoe.MiXSE`); unused when ``generator`` is given.
        records: :class:`EvalExample` objects or record dicts (validated here; dicts need ``task``).
        sampling: decoding; default :func:`default_sampling` with ``max_new_tokens`` (greedy).
        generator: any object with ``.generate(prompts, config)`` returning
            :class:`selfmoe.generate.Completion` objects (tests, vLLM); default an ``HFGenerator``.
        routing_stats: collect :meth:`MiXSE.routing_stats` per task (``model`` must be a MiXSE). Counts
            every token the model reads: prompt tokens and generated ones.
        allow_code_execution: run the programs of ``code`` examples. None: only if the environment has
            ``SELFMOE_ALLOW_CODE_EVAL=1``. Not allowed with code examples present: raises
            :class:`CodeExecutionNotAllowed` before generating anything.
        code_timeout: seconds per code example (default ``sandbox.timeout``, else 10); ``sandbox``: the
            other limits (:class:`selfmoe.sandbox.SandboxConfig`); ``code_workers``: programs at once.
        partial_path: a JSONL file where completions are saved as they are generated; an existing one
            made with the same records, sampling, ``routing_stats`` and ``run_info`` is resumed (only the
            missing completions are generated). It is left in place: delete it once the results are
            written (the CLI does). ``restart``: discard an existing one instead.
        run_info: JSON values that identify the run beyond the records and sampling (the CLI passes the
            model, adapter, MiXSE and routing flags): a partial file from another run is refused.
        chunk_size: prompts per generate call and per saved line (default ``4 * batch_size``).
    """
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    if not examples:
        raise ValueError("no examples to evaluate")
    box = sandbox if sandbox is not None else SandboxConfig()
    if not isinstance(box, SandboxConfig):
        raise ValueError(f"sandbox must be a selfmoe.sandbox.SandboxConfig, got {type(box).__name__}")
    if code_timeout is not None:
        if not isinstance(code_timeout, (int, float)) or code_timeout <= 0:
            raise ValueError(f"code_timeout must be > 0, got {code_timeout}")
        box = box.replace(timeout=float(code_timeout))
    if code_workers < 1:
        raise ValueError(f"code_workers must be >= 1, got {code_workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk = 4 * batch_size if chunk_size is None else chunk_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    config = sampling if sampling is not None else default_sampling(max_new_tokens)
    if routing_stats and not hasattr(model, "routing_stats"):
        raise ValueError(f"routing statistics need a MiXSE model, got {type(model).__name__}")
    n_code = sum(1 for e in examples if e.task == "code")
    box_info: Optional[Dict[str, Any]] = None
    if n_code:
        if not code_execution_allowed(allow_code_execution):
            raise CodeExecutionNotAllowed(_refusal(n_code))
        contained = check_sandbox(box)  # before generating: a sandbox that cannot run fails now
        if not contained.full:
            warnings.warn(f"code examples run with partial containment on this machine: {contained.describe()} "
                          "(see selfmoe.sandbox)", RuntimeWarning, stacklevel=2)
        box_info = {"containment": dataclasses.asdict(contained), "limits": dataclasses.asdict(box)}
        box_info["containment"]["notes"] = list(contained.notes)
    settings = _settings(examples, config, run_info, routing_stats)
    writer = _PartialWriter(partial_path, settings, restart) if partial_path is not None else None
    if generator is None:
        from .generate import HFGenerator

        generator = HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress)

    by_task: Dict[str, List[int]] = {t: [i for i, e in enumerate(examples) if e.task == t] for t in TASKS}
    by_task = {t: idx for t, idx in by_task.items() if idx}
    done: Dict[int, Completion] = dict(writer.completions) if writer else {}
    parts: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {t: list(writer.routing.get(t, [])) if writer else []
                                                         for t in by_task}
    try:
        for task, idx in by_task.items():
            chunks = [idx[k:k + chunk] for k in range(0, len(idx), chunk)]
            for n, part in enumerate(chunks):
                todo = [i for i in part if i not in done]
                if not todo:
                    continue
                prompts = [examples[i].prompt for i in todo]
                desc = f"eval {task}" + (f" {n + 1}/{len(chunks)}" if len(chunks) > 1 else "")
                summary = None
                if routing_stats:
                    with model.routing_stats() as stats:
                        outs = generator.generate(prompts, config, desc=desc)
                    summary = stats.summary()
                else:
                    outs = generator.generate(prompts, config, desc=desc)
                if len(outs) != len(prompts):
                    raise RuntimeError(f"the generator returned {len(outs)} completions for {len(prompts)} prompts")
                new = {i: c if isinstance(c, Completion) else Completion(str(c), "stop") for i, c in zip(todo, outs)}
                done.update(new)
                if summary is not None:
                    parts[task].append((todo[0], summary))
                if writer is not None:
                    writer.append(task, new, summary)
    finally:
        if writer is not None:
            writer.close()
    routing = {task: _merge_routing(parts[task]) for task in by_task} if routing_stats else None

    predictions: List[Dict[str, Any]] = []
    code_jobs: Dict[int, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=code_workers) as pool:
        try:
            for i, ex in enumerate(examples):
                c = done[i]
                text = c.text.strip("\n") if ex.task == "code" else c.text.strip()
                row: Dict[str, Any] = {"index": i, "source": ex.source, "task": ex.task}
                if ex.id is not None:
                    row["id"] = ex.id
                row.update(instruction=ex.instruction, input=ex.input, answer=ex.raw_answer, response=text,
                           finish_reason=c.finish_reason)
                if ex.task == "code":
                    row["answer"] = None
                    row["prediction"] = extract_code(text, ex.entry_point)
                    program = build_program(ex.instruction, text, ex.tests, ex.entry_point)
                    code_jobs[i] = pool.submit(run_program, program, sandbox=box)
                else:
                    row.update(score(ex, text))
                predictions.append(row)
            for i, fut in code_jobs.items():
                res = fut.result()
                predictions[i].update(correct=res.passed, status=res.status, error=res.detail or None)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: no new programs; running ones end within the timeout
            raise

    tasks: Dict[str, Dict[str, Any]] = {}
    for task, idx in by_task.items():
        ok = sum(1 for i in idx if predictions[i]["correct"])
        tasks[task] = {"n": len(idx), "correct": ok, "accuracy": ok / len(idx)}
    return EvalResult(tasks=tasks, predictions=predictions, sampling=dataclasses.asdict(config), routing=routing,
                      sandbox=box_info, resumed=len(writer.completions) if writer else 0)


def write_results(result: EvalResult, output_dir: PathLike, *, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, pathlib.Path]:
    """Write ``predictions.jsonl`` (one row per example, input order) and ``summary.json``
    (:meth:`EvalResult.summary` plus ``extra``) into ``output_dir``, each file atomically."""
    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{os.fspath(output_dir)}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": out / "predictions.jsonl", "summary": out / "summary.json"}
    write_jsonl(paths["predictions"], result.predictions)
    summary = result.summary()
    if extra:
        summary = {**dict(extra), **summary}
    atomic_write_json(paths["summary"], summary)
    return paths
