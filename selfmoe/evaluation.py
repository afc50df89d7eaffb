"""Evaluation on the paper's kinds of benchmark: multiple choice (MMLU), exact match (BBH), numeric
answers (GSM8K) and code with tests (HumanEval, pass@1). :func:`evaluate` generates a response per
example and scores it; :func:`write_results` writes the predictions and the summary.

This module runs an evaluation; the parts it runs live in their own modules and are re-exported here,
so ``selfmoe.evaluation`` is the one import a user needs:

- :mod:`selfmoe.eval_records`: the JSONL record format and its checks (:func:`load_eval_records`);
- :mod:`selfmoe.eval_scoring`: the scoring rule of each kind of example (:func:`score`,
  :func:`extract_choice`, :func:`extract_final_answer`, :func:`normalize_answer`,
  :func:`extract_number`, :func:`build_program`, :func:`run_program`);
- :mod:`selfmoe.eval_partial`: the partial-predictions file that lets an interrupted run resume;
- :mod:`selfmoe.sandbox`: where the programs of code examples run, and what it does and does not contain.

Every prompt is the Alpaca template the experts were trained with, decoded greedily by default (the
paper's evaluation is greedy), cut at the template's stop marks.

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
import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .data import PathLike, repair_jsonl_tail, write_jsonl
from .eval_partial import PartialMismatchError, PartialWriter, partial_settings, read_partial
from .eval_records import EvalExample, load_eval_records, validate_eval_record
from .eval_scoring import (TASKS, CodeResult, build_program, extract_choice, extract_code, extract_final_answer,
                           extract_number, normalize_answer, run_program, score)
from .generate import Completion, SamplingConfig, TextGenerator
from .io_utils import atomic_write_json
from .sandbox import SandboxConfig, check_sandbox

__all__ = [
    "TASKS", "EvalExample", "EvalResult", "CodeResult", "CodeExecutionNotAllowed", "PartialMismatchError",
    "ALLOW_CODE_ENV", "code_execution_allowed", "check_partial",
    "validate_eval_record", "load_eval_records", "default_sampling", "evaluate", "write_results",
    "score", "extract_choice", "extract_final_answer", "normalize_answer", "extract_number",
    "extract_code", "build_program", "run_program",
]

#: Set to ``1`` to allow running the model's programs when ``allow_code_execution`` is not given.
ALLOW_CODE_ENV = "SELFMOE_ALLOW_CODE_EVAL"


# ----------------------------------------------------------------------------------------------------
# The opt-in for running the model's programs


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


# ----------------------------------------------------------------------------------------------------
# Running an evaluation


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
    box_info = _code_sandbox(examples, allow_code_execution, box)
    settings = partial_settings(examples, config, run_info, routing_stats)
    writer = PartialWriter(partial_path, settings, restart) if partial_path is not None else None
    if generator is None:
        from .generate import HFGenerator

        generator = HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress)

    by_task: Dict[str, List[int]] = {t: [i for i, e in enumerate(examples) if e.task == t] for t in TASKS}
    by_task = {t: idx for t, idx in by_task.items() if idx}
    try:
        done, parts = _generate(examples, by_task, generator, config, chunk, model if routing_stats else None, writer)
    finally:
        if writer is not None:
            writer.close()
    routing = {task: _merge_routing(parts[task]) for task in by_task} if routing_stats else None
    predictions = _predictions(examples, done, box, code_workers)

    tasks: Dict[str, Dict[str, Any]] = {}
    for task, idx in by_task.items():
        ok = sum(1 for i in idx if predictions[i]["correct"])
        tasks[task] = {"n": len(idx), "correct": ok, "accuracy": ok / len(idx)}
    return EvalResult(tasks=tasks, predictions=predictions, sampling=dataclasses.asdict(config), routing=routing,
                      sandbox=box_info, resumed=len(writer.completions) if writer else 0)


def _code_sandbox(examples: List[EvalExample], allow: Optional[bool], box: SandboxConfig) -> Optional[Dict[str, Any]]:
    """For code examples: refuse unless allowed, and check the sandbox runs here, both before anything
    is generated (a refusal after an hour of generation would waste the hour). Returns what the summary
    records about the sandbox (None without code examples)."""
    n_code = sum(1 for e in examples if e.task == "code")
    if not n_code:
        return None
    if not code_execution_allowed(allow):
        raise CodeExecutionNotAllowed(_refusal(n_code))
    contained = check_sandbox(box)
    if not contained.full:
        warnings.warn(f"code examples run with partial containment on this machine: {contained.describe()} "
                      "(see selfmoe.sandbox)", RuntimeWarning, stacklevel=3)  # 3: evaluate()'s caller
    box_info = {"containment": dataclasses.asdict(contained), "limits": dataclasses.asdict(box)}
    box_info["containment"]["notes"] = list(contained.notes)
    return box_info


def _generate(examples: List[EvalExample], by_task: Dict[str, List[int]], generator: Any, config: SamplingConfig,
              chunk: int, stats_model: Any, writer: Optional[PartialWriter]
              ) -> Tuple[Dict[int, Completion], Dict[str, List[Tuple[int, Dict[str, Any]]]]]:
    """A completion per example, generated chunk by chunk (``chunk`` prompts of one task per call) and
    saved by ``writer`` after each; completions the writer already holds are reused. ``stats_model``:
    the MiXSE whose routing statistics are collected per chunk (None: none). Returns the completions by
    example index, and per task the chunks' routing summaries keyed by their first index."""
    done: Dict[int, Completion] = dict(writer.completions) if writer else {}
    parts: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {t: list(writer.routing.get(t, [])) if writer else []
                                                         for t in by_task}
    for task, idx in by_task.items():
        # Chunks are cut from the task's full index list, not from what is left to do, so a resumed run
        # makes the same calls (and the same routing summaries) as an uninterrupted one.
        chunks = [idx[k:k + chunk] for k in range(0, len(idx), chunk)]
        for n, part in enumerate(chunks):
            todo = [i for i in part if i not in done]
            if not todo:
                continue
            prompts = [examples[i].prompt for i in todo]
            desc = f"eval {task}" + (f" {n + 1}/{len(chunks)}" if len(chunks) > 1 else "")
            summary = None
            if stats_model is not None:
                with stats_model.routing_stats() as stats:
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
    return done, parts


def _predictions(examples: List[EvalExample], done: Dict[int, Completion], box: SandboxConfig,
                 code_workers: int) -> List[Dict[str, Any]]:
    """One scored prediction row per example (input order). Code examples' programs run in the sandbox,
    ``code_workers`` at a time, while the other examples are scored."""
    predictions: List[Dict[str, Any]] = []
    code_jobs: Dict[int, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=code_workers) as pool:
        try:
            for i, ex in enumerate(examples):
                c = done[i]
                text = c.text.strip("\n") if ex.task == "code" else c.text.strip()  # code: keep the indentation
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
    return predictions


def check_partial(path: PathLike, records: Iterable[Union[EvalExample, Mapping[str, Any]]], *,
                  sampling: Optional[SamplingConfig] = None, max_new_tokens: int = 256,
                  run_info: Optional[Mapping[str, Any]] = None, routing_stats: bool = False) -> int:
    """How many completions :func:`evaluate` would reuse from ``path`` with these arguments (0 when the
    file does not exist); changes nothing but a torn last line (as :func:`evaluate` would). Raises
    :class:`PartialMismatchError` when the file was made with other settings, so a caller can refuse
    before loading a model."""
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    config = sampling if sampling is not None else default_sampling(max_new_tokens)
    p = pathlib.Path(path)
    if p.is_file():
        repair_jsonl_tail(p)
    saved = read_partial(p, partial_settings(examples, config, run_info, routing_stats))
    return 0 if saved is None else len(saved[0])


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
