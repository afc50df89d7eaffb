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
  is called with the entry point), then a random sentinel is printed. Passed only if the program
  exits with status 0 and the sentinel is the last line of its output, within the timeout: a
  program that crashes, raises, calls ``sys.exit(0)``/``os._exit`` early or loops forever fails.
  The sentinel is random per :func:`evaluate` call, so a program cannot print it by itself.
  Programs run in a fresh ``python -I`` subprocess in a temporary directory, never in this process;
  that is isolation from the evaluator, not a security sandbox: run untrusted models in a container.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from .data import DataFormatError, PathLike, format_prompt, iter_json_lines, write_jsonl
from .generate import Completion, SamplingConfig, TextGenerator
from .io_utils import atomic_write_json

__all__ = [
    "TASKS", "EvalExample", "EvalResult", "CodeResult",
    "validate_eval_record", "load_eval_records", "default_sampling", "evaluate", "write_results",
    "score", "extract_choice", "extract_final_answer", "normalize_answer", "extract_number",
    "extract_code", "build_program", "run_program",
]

TASKS = ("multiple_choice", "exact_match", "numeric", "code")


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


def build_program(instruction: str, response: str, tests: str, entry_point: str, sentinel: str) -> str:
    """The program a code example runs (see the module docstring)."""
    code = extract_code(response, entry_point)
    if _defines(code, entry_point):
        prefix = instruction if _compiles(instruction) else ""
        solution = (prefix.rstrip() + "\n\n\n" if prefix.strip() else "") + code
    else:
        solution = instruction.rstrip("\n") + "\n" + code
    parts = [solution.rstrip(), "", "", tests.rstrip()]
    if re.search(r"^def\s+check\s*\(", tests, re.M):
        parts.append(f"check({entry_point})")
    parts.append(f"print({sentinel!r}, flush=True)")
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str  # "passed", "failed" (assertion, exception, early exit, no sentinel) or "timeout"
    detail: str = ""  # the tail of stderr (or why it failed)


def _tail(path: pathlib.Path, n: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read().decode("utf-8", errors="replace")


def run_program(program: str, sentinel: str, *, timeout: float = 10.0) -> CodeResult:
    """Run ``program`` in a fresh ``python -I`` subprocess in a temporary directory; passed only on exit
    status 0 with ``sentinel`` as the last line of stdout, within ``timeout`` seconds. On timeout the
    whole process group is killed. Output goes to files (a program printing forever costs no memory)."""
    with tempfile.TemporaryDirectory(prefix="selfmoe-eval-") as tmp:
        d = pathlib.Path(tmp)
        (d / "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        posix = os.name == "posix"
        with open(d / "stdout", "wb") as out, open(d / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "program.py"], cwd=tmp, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=posix)
            try:
                rc: Optional[int] = proc.wait(timeout=timeout)
            except BaseException as exc:  # timeout, or KeyboardInterrupt while waiting
                rc = None
                if posix:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the group, before reaping: children it forked too
                    except (ProcessLookupError, PermissionError):
                        pass
                proc.kill()
                proc.wait()
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
        stderr = _tail(d / "stderr", 2000).strip()
        if rc is None:
            return CodeResult(False, "timeout", f"timed out after {timeout:g} s")
        lines = _tail(d / "stdout", 4096).rstrip().splitlines()
        if rc == 0 and lines and lines[-1].strip() == sentinel:
            return CodeResult(True, "passed", "")
        why = stderr[-1000:] or (f"exit status {rc}" if rc else "exited before the tests finished")
        return CodeResult(False, "failed", why)


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
    """

    tasks: Dict[str, Dict[str, Any]]
    predictions: List[Dict[str, Any]]
    sampling: Dict[str, Any]
    routing: Optional[Dict[str, Any]] = None

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
             code_timeout: float = 10.0, code_workers: int = 2) -> EvalResult:
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
        code_timeout: seconds per code example; ``code_workers``: programs run at once.
    """
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    if not examples:
        raise ValueError("no examples to evaluate")
    if code_timeout <= 0:
        raise ValueError(f"code_timeout must be > 0, got {code_timeout}")
    if code_workers < 1:
        raise ValueError(f"code_workers must be >= 1, got {code_workers}")
    config = sampling if sampling is not None else default_sampling(max_new_tokens)
    if routing_stats and not hasattr(model, "routing_stats"):
        raise ValueError(f"routing statistics need a MiXSE model, got {type(model).__name__}")
    if generator is None:
        from .generate import HFGenerator

        generator = HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress)

    by_task: Dict[str, List[int]] = {t: [i for i, e in enumerate(examples) if e.task == t] for t in TASKS}
    by_task = {t: idx for t, idx in by_task.items() if idx}
    completions: List[Optional[Completion]] = [None] * len(examples)
    routing: Optional[Dict[str, Any]] = {} if routing_stats else None
    for task, idx in by_task.items():
        prompts = [examples[i].prompt for i in idx]
        if routing_stats:
            with model.routing_stats() as stats:
                outs = generator.generate(prompts, config, desc=f"eval {task}")
            routing[task] = stats.summary()
        else:
            outs = generator.generate(prompts, config, desc=f"eval {task}")
        if len(outs) != len(prompts):
            raise RuntimeError(f"the generator returned {len(outs)} completions for {len(prompts)} prompts")
        for i, c in zip(idx, outs):
            completions[i] = c if isinstance(c, Completion) else Completion(str(c), "stop")

    predictions: List[Dict[str, Any]] = []
    code_jobs: Dict[int, Any] = {}
    sentinel = "SELFMOE-EVAL-PASSED-" + secrets.token_hex(12)
    with concurrent.futures.ThreadPoolExecutor(max_workers=code_workers) as pool:
        for i, (ex, c) in enumerate(zip(examples, completions)):
            assert c is not None
            text = c.text.strip("\n") if ex.task == "code" else c.text.strip()
            row: Dict[str, Any] = {"index": i, "source": ex.source, "task": ex.task}
            if ex.id is not None:
                row["id"] = ex.id
            row.update(instruction=ex.instruction, input=ex.input, answer=ex.raw_answer, response=text,
                       finish_reason=c.finish_reason)
            if ex.task == "code":
                row["answer"] = None
                row["prediction"] = extract_code(text, ex.entry_point)
                program = build_program(ex.instruction, text, ex.tests, ex.entry_point, sentinel)
                code_jobs[i] = pool.submit(run_program, program, sentinel, timeout=code_timeout)
            else:
                row.update(score(ex, text))
            predictions.append(row)
        for i, fut in code_jobs.items():
            res = fut.result()
            predictions[i].update(correct=res.passed, status=res.status, error=res.detail or None)

    tasks: Dict[str, Dict[str, Any]] = {}
    for task, idx in by_task.items():
        ok = sum(1 for i in idx if predictions[i]["correct"])
        tasks[task] = {"n": len(idx), "correct": ok, "accuracy": ok / len(idx)}
    return EvalResult(tasks=tasks, predictions=predictions, sampling=dataclasses.asdict(config), routing=routing)


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
