"""How a response is scored: one rule per kind of benchmark example (the ``task`` of a record).

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
  past the output limit or exceeds another limit fails. It runs in :mod:`selfmoe.sandbox`; whether
  running it is allowed at all is the caller's decision (:func:`selfmoe.evaluation.evaluate` asks).

The functions named here are public and tested; :func:`score` applies the first three rules to an
:class:`selfmoe.eval_records.EvalExample`.

Multiple choice can instead be scored by log-likelihood (``mc_scoring="loglik"``, the way
lm-evaluation-harness scores MMLU): no text is generated; each option letter of the instruction
(:func:`option_letters`) is scored as the continuation of the prompt (the Alpaca prompt, which ends in
``"### Response:\n"``, followed directly by the letter) by its summed log-probability, and the
prediction is the letter with the highest one (:func:`score_options`; ties go to the earlier letter).
Letters, not the options' text: the records carry the options inline in the instruction and the gold
answer as a letter, so the letters are the one thing every record names unambiguously, and a letter
is one token for the usual tokenizers, so option lengths cannot bias the sum (no length normalisation
needed, unlike scoring the option text).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional

from .choices import EVAL_TASKS
from .choices import MC_SCORING as CHOICE_MC_SCORING
from .sandbox import SandboxConfig, run_python

if TYPE_CHECKING:  # eval_records reads gold answers with extract_number: a runtime import would be a cycle
    from .eval_records import EvalExample

__all__ = [
    "TASKS", "MC_SCORING", "CodeResult", "OptionScores", "score", "score_options", "option_letters", "loglik_json", "extract_choice", "extract_final_answer", "normalize_answer", "extract_number",
    "extract_code", "build_program", "run_program",
]

#: The kinds of example, one scoring rule each (in the order results are reported).
TASKS = EVAL_TASKS  # defined once, torch-free (the CLI offers them too)
#: How multiple-choice examples are scored: from a generated response, or by option log-likelihood.
MC_SCORING = CHOICE_MC_SCORING  # defined once, torch-free (the CLI offers them too)


_ANSWER_LETTER = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:=]?\s*(?:(?i:option)\s+)?\(?([A-Z])\)?(?![A-Za-z0-9])")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def option_letters(instruction: str) -> str:
    """The options' letters: the "(X)" letters of the instruction, sorted; A-Z if it has none."""
    letters = sorted(set(_PAREN_LETTER.findall(instruction or "")))
    return "".join(letters) if letters else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def extract_choice(response: str, instruction: str = "") -> Optional[str]:
    """The option letter a response picks, or None (see the module docstring for the rule)."""
    valid = option_letters(instruction)
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
class OptionScores:
    """What log-likelihood scoring computed for one multiple-choice example: ``logliks`` maps each
    option letter to the summed log-probability of that letter as the continuation of the prompt
    (``-inf`` for an option the model rules out; written as null in JSON)."""

    logliks: Dict[str, float]


def score_options(example: EvalExample, logliks: Dict[str, float]) -> Dict[str, Any]:
    """``{"prediction", "correct", "logliks"}`` for a multiple-choice example scored by log-likelihood:
    the prediction is the letter with the highest log-likelihood (the earliest letter on a tie)."""
    if example.task != "multiple_choice":
        raise ValueError(f"score_options() scores multiple_choice examples, got {example.task!r}")
    if not logliks:
        raise ValueError("no option log-likelihoods to choose from")
    value = {k: (float("-inf") if v is None else float(v)) for k, v in logliks.items()}
    best = max(sorted(value), key=lambda letter: value[letter])  # max keeps the first of equal values
    return {"prediction": best, "correct": best == example.answer, "logliks": loglik_json(value)}


def loglik_json(logliks: Dict[str, float]) -> Dict[str, Optional[float]]:
    """Log-likelihoods as JSON values: an impossible option (-inf, a model that masks a token) is null."""
    return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in logliks.items()}


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
