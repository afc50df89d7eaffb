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

Every prompt is the template the experts were trained with (``prompt_format``: Alpaca, or the model's
chat template), decoded greedily by default (the paper's evaluation is greedy), cut at the Alpaca
template's stop marks (a chat turn ends at the model's end-of-turn token instead).

Multiple choice by log-likelihood (``mc_scoring="loglik"``, the way lm-evaluation-harness scores MMLU):
nothing is generated for those examples; :class:`LoglikScorer` runs batched forward passes and each
option letter gets the summed log-probability of the letter as the continuation of the prompt; the
prediction is the best letter (see :mod:`selfmoe.eval_scoring`). A forward of the prompt alone suffices
when every letter is one token (the usual case), so this costs about one prompt's prefill per example.
The default stays ``"generate"`` (scored from the greedy response), so results and resume files of
earlier runs keep their meaning.

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
from .eval_partial import (PartialMismatchError, PartialWriter, partial_settings, read_partial,
                           settings_differences)
from .eval_records import EvalExample, load_eval_records, validate_eval_record
from .eval_scoring import (MC_SCORING, TASKS, CodeResult, OptionScores, build_program, extract_choice, extract_code,
                           extract_final_answer, extract_number, normalize_answer, option_letters, run_program, score,
                           score_options)
from .eval_loglik import LoglikScorer
from .generate import Completion, SamplingConfig, TextGenerator
from .io_utils import atomic_write_json
from .sandbox import SandboxConfig, check_sandbox

__all__ = [
    "TASKS", "MC_SCORING", "EvalExample", "EvalResult", "CodeResult", "OptionScores", "CodeExecutionNotAllowed",
    "PartialMismatchError", "LoglikScorer",
    "ALLOW_CODE_ENV", "code_execution_allowed", "check_partial", "eval_settings", "settings_differences",
    "validate_eval_record", "load_eval_records", "default_sampling", "evaluate", "write_results", "format_summary",
    "score", "score_options", "option_letters", "extract_choice", "extract_final_answer", "normalize_answer",
    "extract_number", "extract_code", "build_program", "run_program",
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


def default_sampling(max_new_tokens: int = 256, prompt_format: str = "alpaca") -> SamplingConfig:
    """Greedy decoding (the paper evaluates greedily), cut at the Alpaca template's stop marks; with
    ``prompt_format="chat"`` no stop strings (a chat turn ends at the model's end-of-turn token)."""
    from .prompts import STOP_MARKS

    stop = () if prompt_format == "chat" else STOP_MARKS
    return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, stop=stop)


def _formatted(examples: List[EvalExample], prompt_format: str, tokenizer: Any) -> Tuple[str, List[EvalExample]]:
    """The resolved prompt format and the examples prompted in it (see :mod:`selfmoe.prompt_format`)."""
    from .prompt_format import resolve_prompt_format

    fmt = resolve_prompt_format(prompt_format, tokenizer)
    return fmt, [e.with_format(fmt, tokenizer) for e in examples]


def _settings(examples: List[EvalExample], config: SamplingConfig, run_info: Optional[Mapping[str, Any]],
              routing_stats: bool, mc_scoring: str, fmt: str) -> Dict[str, Any]:
    """:func:`partial_settings` plus the prompt format when it is not Alpaca (so files written before
    the format existed still match; the records' hash covers the prompts themselves)."""
    settings = partial_settings(examples, config, run_info, routing_stats, mc_scoring)
    if fmt != "alpaca":
        settings["prompt_format"] = fmt
    return settings


@dataclass
class EvalResult:
    """Per-task and overall accuracy, and one prediction record per example (input order).

    ``tasks``: ``{task: {"n", "correct", "accuracy"}}`` in :data:`TASKS` order (tasks present only).
    ``sources``: the same per data file (records read from files only); ``domains``: per record
    ``domain`` (records that have one only); None when there are none.
    ``routing``: ``{task: RoutingStats.summary()}`` when routing statistics were collected;
    ``routing_domains``: the same per domain (when records have domains).
    ``sandbox``: how code examples ran (limits and :class:`selfmoe.sandbox.Containment`), when any did.
    ``mc_scoring``: how multiple choice was scored (``"generate"`` or ``"loglik"``).
    ``settings``: what the run depends on (:func:`eval_settings`), so a finished run can be recognised.
    ``resumed``: completions reused from ``partial_path`` instead of generated.
    """

    tasks: Dict[str, Dict[str, Any]]
    predictions: List[Dict[str, Any]]
    sampling: Dict[str, Any]
    routing: Optional[Dict[str, Any]] = None
    sandbox: Optional[Dict[str, Any]] = None
    resumed: int = 0
    mc_scoring: str = "generate"
    sources: Optional[Dict[str, Dict[str, Any]]] = None
    domains: Optional[Dict[str, Dict[str, Any]]] = None
    routing_domains: Optional[Dict[str, Any]] = None
    settings: Optional[Dict[str, Any]] = None

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
        """What ``summary.json`` holds: ``tasks``, ``overall``, ``sampling``, ``mc_scoring``; ``sources``,
        ``domains`` when known; with routing statistics ``routing`` (per task, per layer),
        ``routing_domains`` (per domain, per layer) and ``routing_summary``
        (:func:`selfmoe.stats.routing_overview`: per-expert shares over all layers); ``sandbox``;
        ``settings``."""
        out: Dict[str, Any] = {
            "tasks": self.tasks,
            "overall": {"n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                        "macro_accuracy": self.macro_accuracy},
            "sampling": self.sampling,
            "mc_scoring": self.mc_scoring,
        }
        if self.sources:
            out["sources"] = self.sources
        if self.domains:
            out["domains"] = self.domains
        if self.routing is not None:
            from .stats import routing_overview

            out["routing"] = self.routing
            if self.routing_domains:
                out["routing_domains"] = self.routing_domains
            out["routing_summary"] = routing_overview(self.routing, self.routing_domains)
        if self.sandbox is not None:
            out["sandbox"] = self.sandbox
        if self.settings is not None:
            out["settings"] = self.settings
        return out

    def table(self) -> str:
        """A small text table: task, n, correct, accuracy (percent); per domain too when known."""
        return format_summary(self.summary(), routing=False)


def _accuracy_rows(groups: Mapping[str, Mapping[str, Any]]) -> List[Tuple[str, str, str, str]]:
    return [(name, str(v["n"]), str(v["correct"]), f"{100 * v['accuracy']:.1f}") for name, v in groups.items()]


def _text_table(head: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> List[str]:
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join([f"{r[0]:<{w[0]}}"] + [f"{c:>{w[i + 1]}}" for i, c in enumerate(r[1:])])  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def format_summary(summary: Mapping[str, Any], *, routing: bool = True) -> str:
    """The text ``selfmoe eval`` prints, from a summary (:meth:`EvalResult.summary` or ``summary.json``):
    accuracy per task (plus overall and macro average), per domain when the records had domains, and
    with ``routing`` the per-expert routing shares (:func:`selfmoe.stats.format_routing_overview`)."""
    # summary.json has its keys sorted: tasks go back to TASKS order, domains are listed sorted either
    # way, so a finished run's table prints the same from the result and from its summary.json.
    tasks = _ordered_tasks(summary.get("tasks") or {})
    overall = summary.get("overall") or {}
    rows = _accuracy_rows(tasks)
    rows.append(("overall", str(overall.get("n", "")), str(overall.get("correct", "")),
                 f"{100 * overall.get('accuracy', 0.0):.1f}"))
    if len(tasks) > 1:
        rows.append(("macro avg", "", "", f"{100 * overall.get('macro_accuracy', 0.0):.1f}"))
    lines = _text_table(("task", "n", "correct", "accuracy"), rows)
    if summary.get("domains"):
        lines += [""] + _text_table(("domain", "n", "correct", "accuracy"), _accuracy_rows(dict(sorted(summary["domains"].items()))))
    if routing and summary.get("routing"):
        from .stats import format_routing_overview, routing_overview

        overview = dict(summary.get("routing_summary") or routing_overview(summary["routing"], summary.get("routing_domains")))
        overview["tasks"] = _ordered_tasks(overview.get("tasks") or {})
        if overview.get("domains"):
            overview["domains"] = dict(sorted(overview["domains"].items()))
        lines += [""] + format_routing_overview(overview).splitlines()
    return "\n".join(lines)


def _ordered_tasks(groups: Mapping[str, Any]) -> Dict[str, Any]:
    return {**{t: groups[t] for t in TASKS if t in groups}, **{k: v for k, v in groups.items() if k not in TASKS}}


# ----------------------------------------------------------------------------------------------------
# Running an evaluation


def eval_settings(records: Iterable[Union[EvalExample, Mapping[str, Any]]], *, sampling: Optional[SamplingConfig] = None,
                  max_new_tokens: int = 256, run_info: Optional[Mapping[str, Any]] = None, routing_stats: bool = False,
                  mc_scoring: str = "generate", prompt_format: str = "auto", tokenizer: Any = None) -> Dict[str, Any]:
    """What an evaluation with these arguments depends on, as JSON (the ``settings`` of its summary and
    of its partial file); :func:`settings_differences` names what differs between two of them.
    ``prompt_format``/``tokenizer``: as for :func:`evaluate`."""
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    fmt, examples = _formatted(examples, prompt_format, tokenizer)
    config = sampling if sampling is not None else default_sampling(max_new_tokens, fmt)
    return _settings(examples, config, run_info, routing_stats, _check_mc_scoring(mc_scoring), fmt)


def _check_mc_scoring(mc_scoring: str) -> str:
    if mc_scoring not in MC_SCORING:
        raise ValueError(f"mc_scoring must be one of {list(MC_SCORING)}, got {mc_scoring!r}")
    return mc_scoring


def evaluate(model: Any, tokenizer: Any, records: Iterable[Union[EvalExample, Mapping[str, Any]]], *,
             sampling: Optional[SamplingConfig] = None, max_new_tokens: int = 256, batch_size: int = 8,
             progress: bool = False, generator: Optional[TextGenerator] = None, routing_stats: bool = False,
             code_timeout: Optional[float] = None, code_workers: int = 2,
             allow_code_execution: Optional[bool] = None, sandbox: Optional[SandboxConfig] = None,
             partial_path: Optional[PathLike] = None, restart: bool = False,
             run_info: Optional[Mapping[str, Any]] = None, chunk_size: Optional[int] = None,
             mc_scoring: str = "generate", scorer: Optional[Any] = None, prompt_format: str = "auto") -> EvalResult:
    """Generate a response per example (one task, and within it one domain, at a time) and score it.

    Args:
        model, tokenizer: what :class:`selfmoe.generate.HFGenerator` runs (a base model, a model with a
            LoRA adapter attached, or a :class:`selfmoe.MiXSE`); unused when ``generator`` (and, for
            ``mc_scoring="loglik"``, ``scorer``) is given.
        records: :class:`EvalExample` objects or record dicts (validated here; dicts need ``task``).
        prompt_format: ``"auto"`` (default: the tokenizer's chat template when it has one, else the
            Alpaca template; Alpaca without a tokenizer), ``"chat"`` or ``"alpaca"``
            (:mod:`selfmoe.prompt_format`); use the format the model was trained with. Part of the
            settings a resumed run must match.
        sampling: decoding; default :func:`default_sampling` with ``max_new_tokens`` (greedy; stop
            strings only with the Alpaca template).
        generator: any object with ``.generate(prompts, config)`` returning
            :class:`selfmoe.generate.Completion` objects (tests, vLLM); default an ``HFGenerator``.
        mc_scoring: ``"generate"`` (default: the letter is read from the greedy response) or
            ``"loglik"`` (each option letter scored by its log-likelihood after the prompt, argmax;
            nothing generated; predictions then hold ``logliks`` per letter). ``scorer``: what computes
            them, an object with ``.score(prompts, continuations, desc=...)`` like
            :class:`LoglikScorer` (the default, on ``model``).
        routing_stats: collect :meth:`MiXSE.routing_stats` per task and per domain (``model`` must be a
            MiXSE). Counts every token the model reads: prompt tokens and generated ones (with
            ``loglik``: the scored rows' tokens).
        allow_code_execution: run the programs of ``code`` examples. None: only if the environment has
            ``SELFMOE_ALLOW_CODE_EVAL=1``. Not allowed with code examples present: raises
            :class:`CodeExecutionNotAllowed` before generating anything.
        code_timeout: seconds per code example (default ``sandbox.timeout``, else 10); ``sandbox``: the
            other limits (:class:`selfmoe.sandbox.SandboxConfig`); ``code_workers``: programs at once.
        partial_path: a JSONL file where completions are saved as they are generated; an existing one
            made with the same records, sampling, ``routing_stats``, ``mc_scoring`` and ``run_info`` is
            resumed (only the missing completions are generated). It is left in place: delete it once
            the results are written (the CLI does). ``restart``: discard an existing one instead.
        run_info: JSON values that identify the run beyond the records and sampling (the CLI passes the
            model, adapter, MiXSE and routing flags): a partial file from another run is refused.
        chunk_size: prompts per generate call and per saved line (default ``4 * batch_size``).
    """
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    if not examples:
        raise ValueError("no examples to evaluate")
    _check_mc_scoring(mc_scoring)
    fmt, examples = _formatted(examples, prompt_format, tokenizer)
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
    config = sampling if sampling is not None else default_sampling(max_new_tokens, fmt)
    if routing_stats and not hasattr(model, "routing_stats"):
        raise ValueError(f"routing statistics need a MiXSE model, got {type(model).__name__}")
    loglik = mc_scoring == "loglik"
    if loglik and scorer is None and model is None:
        raise ValueError("mc_scoring='loglik' needs a model (or a scorer)")
    box_info = _code_sandbox(examples, allow_code_execution, box)
    settings = _settings(examples, config, run_info, routing_stats, mc_scoring, fmt)
    writer = PartialWriter(partial_path, settings, restart) if partial_path is not None else None

    def make_generator() -> Any:
        from .generate import HFGenerator

        # decode_loop: a batch's finished rows stop costing at once (greedy outputs as generate's).
        return HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress, decode_loop=True)

    def make_scorer() -> Any:
        return LoglikScorer(model, tokenizer, batch_size=batch_size, progress=progress)

    # Groups by task and domain: accuracy (and routing statistics) are reported per task and per domain.
    groups: Dict[Tuple[str, Optional[str]], List[int]] = {}
    for t in TASKS:
        for i, e in enumerate(examples):
            if e.task == t:
                groups.setdefault((t, e.domain), []).append(i)
    runners = _Runners(generator, make_generator, scorer if loglik else None, make_scorer if loglik else None)
    try:
        done, parts = _generate(examples, groups, runners, config, chunk, model if routing_stats else None, writer)
    finally:
        if writer is not None:
            writer.close()
    routing = routing_domains = None
    if routing_stats:
        routing = {t: _merge_routing([p for p in parts if examples[p[0]].task == t]) for t in dict.fromkeys(t for t, _ in groups)}
        domains = list(dict.fromkeys(d for _, d in groups if d is not None))
        if domains:
            routing_domains = {d: _merge_routing([p for p in parts if examples[p[0]].domain == d]) for d in domains}
    predictions = _predictions(examples, done, box, code_workers)

    tasks = _accuracy(predictions, [(t, i) for (t, _), idx in groups.items() for i in idx])
    sources = _accuracy(predictions, [(e.file, i) for i, e in enumerate(examples) if e.file is not None])
    domains_acc = _accuracy(predictions, [(e.domain, i) for i, e in enumerate(examples) if e.domain is not None])
    return EvalResult(tasks=tasks, predictions=predictions, sampling=dataclasses.asdict(config), routing=routing,
                      sandbox=box_info, resumed=len(writer.completions) if writer else 0, mc_scoring=mc_scoring,
                      sources=sources or None, domains=domains_acc or None, routing_domains=routing_domains,
                      settings=settings)


def _accuracy(predictions: List[Dict[str, Any]], members: List[Tuple[str, int]]) -> Dict[str, Dict[str, Any]]:
    """``{group: {"n", "correct", "accuracy"}}`` over ``(group, example index)`` pairs, groups in first-seen order."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, i in members:
        g = out.setdefault(name, {"n": 0, "correct": 0})
        g["n"] += 1
        g["correct"] += 1 if predictions[i]["correct"] else 0
    for g in out.values():
        g["accuracy"] = g["correct"] / g["n"]
    return out


@dataclass
class _Runners:
    """The generator and the log-likelihood scorer (None: multiple choice is generated), each made on
    first use, so an evaluation that needs only one of them never builds the other."""

    generator: Any
    make_generator: Any
    scorer: Any
    make_scorer: Any

    def get_generator(self) -> Any:
        if self.generator is None:
            self.generator = self.make_generator()
        return self.generator

    def get_scorer(self) -> Any:
        if self.scorer is None:
            self.scorer = self.make_scorer()
        return self.scorer

    @property
    def loglik(self) -> bool:
        return self.scorer is not None or self.make_scorer is not None


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


def _calls(groups: Dict[Tuple[str, Optional[str]], List[int]], loglik: bool, chunk: int, *, per_group: bool
           ) -> List[Tuple[int, int, str, bool, List[Tuple[Tuple[str, Optional[str]], List[int]]]]]:
    """The model calls of an evaluation: ``(n, calls of its kind, task, by_loglik, [(group, indices)])``.

    Multiple choice scored by log-likelihood runs group by group in chunks of ``chunk``, and so does
    every group when ``per_group`` (routing statistics wanted from a generator that cannot say which
    batch row is which prompt). Otherwise the generated groups (all greedy with the same settings) are
    chained and cut into chunks across groups: on a CPU a decode step costs about the same for 2 rows
    as for 16 (it is reading the weights), so one batch over several small groups takes far fewer steps
    than a batch per group. Chunks are cut from the full index lists, never from what is left to do, so
    a resumed run makes the same calls as an uninterrupted one.
    """
    out: List[Tuple[int, int, str, bool, List[Tuple[Tuple[str, Optional[str]], List[int]]]]] = []
    chained: List[Tuple[Tuple[str, Optional[str]], int]] = []
    for g, idx in groups.items():
        by_loglik = g[0] == "multiple_choice" and loglik
        if by_loglik or per_group:
            cuts = [idx[k:k + chunk] for k in range(0, len(idx), chunk)]
            out += [(n, len(cuts), g[0], by_loglik, [(g, part)]) for n, part in enumerate(cuts)]
        else:
            chained += [(g, i) for i in idx]
    cuts = [chained[k:k + chunk] for k in range(0, len(chained), chunk)]
    for n, cut in enumerate(cuts):
        members: Dict[Tuple[str, Optional[str]], List[int]] = {}
        for g, i in cut:
            members.setdefault(g, []).append(i)
        tasks = list(dict.fromkeys(g[0] for g in members))
        out.append((n, len(cuts), "+".join(tasks), False, list(members.items())))
    return out


def _generate(examples: List[EvalExample], groups: Dict[Tuple[str, Optional[str]], List[int]], runners: _Runners,
              config: SamplingConfig, chunk: int, stats_model: Any, writer: Optional[PartialWriter]
              ) -> Tuple[Dict[int, Any], List[Tuple[int, Dict[str, Any]]]]:
    """A completion (or, for multiple choice by log-likelihood, an :class:`OptionScores`) per example,
    made call by call (:func:`_calls`) and saved by ``writer`` after each; what the writer already holds
    is reused. ``stats_model``: the MiXSE whose routing statistics are collected per group of each call
    (None: none); a call over several groups keeps them apart by batch row (the HF generator's
    ``row_listener`` and :meth:`selfmoe.MiXSE.routing_stats_by_rows`). Returns the results by example
    index, and the routing summaries, one per group of a call, keyed by that group's first index."""
    done: Dict[int, Any] = dict(writer.completions) if writer else {}
    parts: List[Tuple[int, Dict[str, Any]]] = list(writer.routing) if writer else []
    # Only built when some group is generated (it would be anyway), so a log-likelihood-only run never builds it.
    generated = any(not (task == "multiple_choice" and runners.loglik) for task, _ in groups)
    rows_known = stats_model is not None and generated and hasattr(stats_model, "routing_stats_by_rows") \
        and hasattr(runners.get_generator(), "row_listener")
    for n, n_calls, task, by_loglik, members in _calls(groups, runners.loglik, chunk,
                                                       per_group=stats_model is not None and not rows_known):
        todo = [(g, i) for g, part in members for i in part if i not in done]
        if not todo:
            continue
        prompts = [examples[i].prompt for _, i in todo]
        domains = list(dict.fromkeys(g[1] for g, _ in members if g[1] is not None))
        desc = f"eval {task}" + (f" {','.join(domains)}" if domains else "") + (f" {n + 1}/{n_calls}" if n_calls > 1 else "")
        if by_loglik:
            letters = [list(option_letters(examples[i].instruction)) for _, i in todo]
            scorer = runners.get_scorer()
            run = lambda: scorer.score(prompts, letters, desc=desc)  # noqa: E731
        else:
            generator = runners.get_generator()
            run = lambda: generator.generate(prompts, config, desc=desc)  # noqa: E731
        summaries: Dict[Tuple[str, Optional[str]], Dict[str, Any]] = {}
        if stats_model is not None and len(members) > 1:  # several groups share the batches: split by row
            member_of = {g: m for m, (g, _) in enumerate(members)}
            row_group = [member_of[g] for g, _ in todo]
            with stats_model.routing_stats_by_rows(len(members)) as grouped:
                generator.row_listener = lambda rows: grouped.set_rows([row_group[j] for j in rows])
                try:
                    outs = run()
                finally:
                    generator.row_listener = None
            summaries = {g: grouped.groups[member_of[g]].summary() for g, part in members
                         if any(i not in done for i in part)}
        elif stats_model is not None:
            with stats_model.routing_stats() as stats:
                outs = run()
            summaries = {members[0][0]: stats.summary()}
        else:
            outs = run()
        if len(outs) != len(prompts):
            raise RuntimeError(f"{len(outs)} results for {len(prompts)} prompts")
        if by_loglik:
            new: Dict[int, Any] = {i: OptionScores(dict(o)) for (_, i), o in zip(todo, outs)}
        else:
            new = {i: c if isinstance(c, Completion) else Completion(str(c), "stop") for (_, i), c in zip(todo, outs)}
        done.update(new)
        for g, part in members:
            mine = {i: new[i] for i in part if i in new}
            if not mine:
                continue
            if g in summaries:
                parts.append((next(iter(mine)), summaries[g]))
            if writer is not None:  # one saved line per group of the call (a line never mixes tasks or domains)
                writer.append(g[0], mine, summaries.get(g), g[1])
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
                row: Dict[str, Any] = {"index": i, "source": ex.source, "task": ex.task}
                if ex.id is not None:
                    row["id"] = ex.id
                if ex.domain is not None:
                    row["domain"] = ex.domain
                if isinstance(c, OptionScores):  # multiple choice by log-likelihood: nothing was generated
                    row.update(instruction=ex.instruction, input=ex.input, answer=ex.raw_answer, response=None,
                               finish_reason=None, scoring="loglik")
                    row.update(score_options(ex, c.logliks))
                    predictions.append(row)
                    continue
                text = c.text.strip("\n") if ex.task == "code" else c.text.strip()  # code: keep the indentation
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
                  run_info: Optional[Mapping[str, Any]] = None, routing_stats: bool = False,
                  mc_scoring: str = "generate", prompt_format: str = "auto", tokenizer: Any = None) -> int:
    """How many completions :func:`evaluate` would reuse from ``path`` with these arguments (0 when the
    file does not exist); changes nothing but a torn last line (as :func:`evaluate` would). Raises
    :class:`PartialMismatchError` when the file was made with other settings, so a caller can refuse
    before loading a model (``tokenizer``: the model's, for ``prompt_format`` ``auto``/``chat``)."""
    examples = [validate_eval_record(r, line=i) for i, r in enumerate(records)]
    fmt, examples = _formatted(examples, prompt_format, tokenizer)
    config = sampling if sampling is not None else default_sampling(max_new_tokens, fmt)
    p = pathlib.Path(path)
    if p.is_file():
        repair_jsonl_tail(p)
    saved = read_partial(p, _settings(examples, config, run_info, routing_stats, _check_mc_scoring(mc_scoring), fmt))
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
    (:meth:`EvalResult.summary` plus ``extra``) into ``output_dir``, each file atomically (existing
    ones are replaced: ``selfmoe eval`` checks before it runs)."""
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
