"""``selfmoe eval``: accuracy of a base model, a LoRA adapter or a MiXSE on benchmark JSONL (multiple
choice, exact match, numeric, code)."""
from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, List

from .choices import EVAL_TASKS, MC_SCORING, PROMPT_FORMATS
from .cli_common import CLIError, add_command, add_runner_args, load_runner, say

__all__ = ["EVAL_DESCRIPTION", "EVAL_EPILOG", "_add_eval", "_cmd_eval"]

EVAL_DESCRIPTION = ("Greedy generation, in the model's chat template or the Alpaca template (--prompt-format), on "
                    "multiple-choice (MMLU), exact-match (BBH), numeric (GSM8K) and code (HumanEval, run sandboxed "
                    "with --allow-code-execution) examples (multiple choice optionally by option log-likelihood); "
                    "accuracy per task and domain.")
EVAL_EPILOG = """\
examples:
  # the MiXSE on four benchmarks converted to selfmoe's JSONL (each record carries "task")
  selfmoe eval --model ./llama-7b --mixse mixse/ --data mmlu.jsonl --data bbh.jsonl --data gsm8k.jsonl \\
      --data humaneval.jsonl --output eval/mixse --routing-stats

  # one expert; records without "task" get the kind given per file (KIND=FILE) or by --task
  selfmoe eval --model ./llama-7b --adapter experts/math --data numeric=gsm8k.jsonl --output eval/math \\
      --max-new-tokens 512

record kinds ("task"): multiple_choice {"instruction", "answer": "B"}; exact_match {"instruction",
"answer"}; numeric {"instruction", "answer": "42"}; code {"instruction", "tests", "entry_point"}
(optional: "input", "id"). Greedy decoding in the model's chat template when its tokenizer has one, else
the Alpaca template (--prompt-format; use the one the experts were trained with); scoring rules: selfmoe.evaluation.
output: <output>/predictions.jsonl (one row per example: source, task, response, prediction, correct)
and <output>/summary.json (per-task n/correct/accuracy, overall, sampling, routing per task).

code records run the programs the model writes: refused (exit 2) unless --allow-code-execution (or
SELFMOE_ALLOW_CODE_EVAL=1). Each runs in selfmoe.sandbox: own work dir and HOME, limits on memory,
CPU, file size, processes, open files, no process left behind; as root also no network, its own
unprivileged uid and private /tmp. Non-root: see selfmoe.sandbox for what is not contained.

multiple choice: --mc-scoring generate (default) reads the letter from the greedy response; loglik
scores each option letter by its log-probability right after the prompt (like lm-evaluation-harness
on MMLU): no generation, about one forward of the prompt per example; predictions.jsonl then holds
"logliks" per letter.

resume: completions are saved to <output>/predictions.partial.jsonl as they are generated; rerunning
the same command after an interruption generates only the rest. Other settings are refused unless
--restart (which discards the saved completions).

finished: an --output holding a finished evaluation (summary.json) with the same settings is not
recomputed: its table is printed again. Other settings are refused (exit 2) unless --overwrite.

--routing-stats prints each expert's share (all layers, token-weighted) per task and per record
"domain", as a text heat map; summary.json keeps the per-layer numbers ("routing").
"""


def _add_eval(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "eval", help="score a base model, a LoRA adapter or a MiXSE on benchmark JSONL",
                    description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG)
    add_runner_args(p)
    p.add_argument("--data", required=True, action="append", metavar="[KIND=]FILE",
                   help="JSONL examples (repeat); KIND= sets the task kind for records without one")
    p.add_argument("--task", default=None, choices=EVAL_TASKS,
                   help="task kind for records without one, in every --data file without KIND=")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for predictions.jsonl and summary.json")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each --data file only")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per code example")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run the programs of code records (sandboxed; without it code records are refused)")
    p.add_argument("--mc-scoring", choices=MC_SCORING, default="generate",
                   help="multiple choice: letter from the generated response, or the option letter with the "
                        "highest log-likelihood after the prompt (no generation)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="chat: the tokenizer's chat template; alpaca: the Alpaca template; auto: chat when the "
                        "tokenizer has a chat template (default: %(default)s)")
    p.add_argument("--restart", action="store_true",
                   help="discard completions saved by an interrupted run with other settings, start over")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished evaluation in --output (and any saved completions)")
    p.add_argument("--route-top-k", type=int, default=None, help="MiXSE: experts per token at inference")
    p.add_argument("--routing-stats", action="store_true", help="MiXSE: per-task expert usage into summary.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_flags(args: argparse.Namespace) -> None:
    if args.routing_stats and not args.mixse:
        raise CLIError("--routing-stats needs --mixse (only a MiXSE has a router)")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    if args.code_timeout <= 0:
        raise CLIError(f"--code-timeout must be > 0, got {args.code_timeout}")


def _read_records(args: argparse.Namespace) -> List[Any]:
    """Every ``--data`` file's examples (the first ``--limit`` of each), task kinds per ``KIND=`` or ``--task``."""
    from .evaluation import load_eval_records

    records: List[Any] = []
    for item in args.data:
        kind, sep, path = item.partition("=")
        if not sep or kind not in EVAL_TASKS:
            if sep and kind.isidentifier() and not pathlib.Path(item).is_file():
                raise CLIError(f"--data {item}: unknown task kind {kind!r} (one of {', '.join(EVAL_TASKS)})")
            kind, path = args.task, item
        if not pathlib.Path(path).is_file():
            raise CLIError(f"--data {path}: file not found")
        records.extend(load_eval_records(path, task=kind)[:args.limit])
    return records


def _check_writable(out: pathlib.Path) -> None:
    """Before the model loads: a run must not fail at its end on an unwritable ``--output``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".selfmoe-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--output {out}: cannot write there: {exc}") from None


def _finished(out: pathlib.Path, settings: Any, overwrite: bool) -> Any:
    """The summary of a finished evaluation in ``out`` made with ``settings`` (None: none there, or
    ``overwrite``); raises :class:`CLIError` when the one there was made with other settings."""
    import json

    from .evaluation import settings_differences

    path = out / "summary.json"
    if overwrite or not path.is_file():
        return None
    fix = "pass --overwrite to replace it, or choose another --output"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"--output {out} holds an unreadable summary.json ({exc}); {fix}") from None
    saved = summary.get("settings") if isinstance(summary, dict) else None
    if saved is None:
        raise CLIError(f"--output {out} holds a finished evaluation whose settings were not recorded (an older "
                       f"selfmoe wrote it); {fix}")
    diffs = settings_differences(saved, settings)
    if diffs:
        raise CLIError(f"--output {out} holds a finished evaluation with other settings: {'; '.join(diffs)}; {fix}")
    return summary


def _resolve_format(fmt: str, tok: Any) -> str:
    from .prompt_format import resolve_prompt_format

    return resolve_prompt_format(fmt, tok)


def _early_tokenizer(model: str) -> Any:
    """The model's tokenizer, without the model; None when it cannot be read here (the caller then
    loads the model first, which reports why)."""
    try:
        from .builtin_models import resolve_model

        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            path = resolve_model(model)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - any failure: load_runner reports it properly
        return None


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import (PartialMismatchError, check_partial, code_execution_allowed, default_sampling, eval_settings,
                             evaluate, format_summary, write_results)

    _check_flags(args)
    out = pathlib.Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out}: exists and is not a directory")
    sampling = default_sampling(args.max_new_tokens)  # checks --max-new-tokens before the model loads
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    records = _read_records(args)
    n_code = sum(1 for r in records if r.task == "code")
    allowed = code_execution_allowed(True if args.allow_code_execution else None)
    if n_code and not allowed:
        raise CLIError(f"{n_code} code example(s) would run the programs the model writes on this machine; pass "
                       "--allow-code-execution (or set SELFMOE_ALLOW_CODE_EVAL=1) to allow it (sandboxed: see "
                       "`selfmoe eval --help`)")
    partial = out / "predictions.partial.jsonl"
    run_info = {"model": args.model, "mixse": args.mixse, "adapter": args.adapter, "dtype": args.dtype,
                "route_top_k": args.route_top_k}
    restart = args.restart or args.overwrite
    # The prompts (so the settings) depend on the tokenizer unless the format is alpaca: read it first
    # (cheap) so a finished or mismatched run is still recognised before the model loads.
    tok = None if args.prompt_format == "alpaca" else _early_tokenizer(args.model)
    runner = None
    if tok is None and args.prompt_format != "alpaca":
        _check_writable(out)
        runner, tok = load_runner(args)
    try:
        fmt = _resolve_format(args.prompt_format, tok)
    except ValueError as exc:
        raise CLIError(f"--prompt-format: {exc}") from None
    sampling = default_sampling(args.max_new_tokens, fmt)
    settings = eval_settings(records, sampling=sampling, run_info=run_info, routing_stats=args.routing_stats,
                             mc_scoring=args.mc_scoring, prompt_format=fmt, tokenizer=tok)
    finished = _finished(out, settings, args.overwrite)
    if finished is not None:
        say(f"--output {out} already holds this evaluation (same settings, finished): not recomputed; pass "
            "--overwrite to run it again")
        print(format_summary(finished), flush=True)
        return 0
    _check_writable(out)
    if not restart:
        try:
            saved = check_partial(partial, records, sampling=sampling, run_info=run_info,
                                  routing_stats=args.routing_stats, mc_scoring=args.mc_scoring, prompt_format=fmt,
                                  tokenizer=tok)
        except PartialMismatchError as exc:
            raise CLIError(f"{exc.reason}; rerun with the same settings to continue it, or pass --restart to "
                           "discard it") from None
        if saved:
            say(f"resuming: {saved} of {len(records)} completions already saved in {partial}")
    if runner is None:
        runner, tok = load_runner(args)
    if args.overwrite:  # once the model loaded: no longer finished, so an interrupted overwrite resumes like any run
        for name in ("summary.json", "predictions.jsonl"):
            (out / name).unlink(missing_ok=True)
    try:
        result = evaluate(runner, tok, records, sampling=sampling, batch_size=args.batch_size,
                          progress=not args.no_progress, routing_stats=args.routing_stats,
                          code_timeout=args.code_timeout, allow_code_execution=allowed, partial_path=partial,
                          restart=restart, run_info=run_info, mc_scoring=args.mc_scoring, prompt_format=fmt)
    except KeyboardInterrupt:
        if partial.is_file():
            say(f"completions so far are saved in {partial}: rerun the same command to continue")
        raise
    extra = {"model": args.model, "mixse": args.mixse, "adapter": args.adapter, "data": list(args.data)}
    paths = write_results(result, out, extra=extra)
    partial.unlink()
    print(format_summary(result.summary()), flush=True)
    say(f"{result.n} examples -> {paths['predictions']}, {paths['summary']}")
    return 0
