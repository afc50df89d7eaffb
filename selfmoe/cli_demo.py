"""``selfmoe demo``: the whole pipeline on the built-in model, seeds and benchmark (see :mod:`selfmoe.demo`)."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any

from .cli_common import CLIError, add_command, say

__all__ = ["DEMO_DESCRIPTION", "_add_demo", "_cmd_demo"]

DEMO_DESCRIPTION = ("The whole Self-MoE pipeline end to end, with the same commands a user types: specialize "
                    "(built-in seeds; knowledge, reasoning, math, coding) -> one LoRA expert per domain, the "
                    "instance-merging (--all-domains) and TIES/DARE weight-merging baselines -> MiXSE (shared "
                    "top-1 router) -> eval of every system on the built-in benchmark -> one table (rows: systems; "
                    "columns: domains + average, with standard errors) and the MiXSE routing heat map.")
_EPILOG_TEMPLATE = """\
examples:
  # the real thing on the built-in model (smollm2-135m; fetched and converted on first use, needs .[demo])
  selfmoe demo --output selfmoe-demo

  # the plumbing only, in seconds: a tiny random Llama (its numbers are noise)
  selfmoe demo --quick --output /tmp/selfmoe-quick

  # bigger: more self-generated pairs, more epochs, a larger benchmark sample, on a GPU
  selfmoe demo --output demo-big --num-pairs 200 --epochs 3 --eval-size 100 --device cuda

stages (names printed as they start): model, specialize, expert-<domain> x4, union, ties, dare, mixse,
benchmark, eval-<system> x10 (base, 4 experts, union, ties, dare, mixse-top1, mixse-top2), compare, heatmap
(--intuition: also mixse-intuition and its eval).

sizes: default --num-pairs {num_pairs} per domain (at most {attempts} brainstormed instructions per pair),
--epochs {epochs} (batch 4, lr 1e-3), --eval-size {eval_size} per domain (multiple choice by option
log-likelihood, up to 160 new tokens otherwise). --quick: {q_pairs} pairs per domain kept with loose
filters, 2 optimizer steps per training run, {q_eval} items per domain, 8 new tokens. README says how long
the default run took on 2 CPU cores; --quick takes seconds.

code execution: the coding benchmark runs the programs the model writes (eval --allow-code-execution),
in selfmoe.sandbox (see `selfmoe eval --help` for what it contains and what it does not).

resume: rerun the same command. A finished stage is skipped, an interrupted training run continues from
its checkpoint (--resume), specialize and eval continue their saved work. Ctrl-C exits 130 naming the
stage. A stage that fails exits with its command's code; fix the cause and rerun.

output (<output>/): data/, experts/<domain>|union, merged/ties|dare, mixse/, bench/, eval/<system>/,
results.md and results.json (the table), routing_heatmap.txt (and .png with matplotlib),
timings.json and pipeline.csv (wall time per stage), demo_state.json (what each finished stage was built
from).
"""

def _epilog() -> str:
    from .demo import ATTEMPTS_PER_PAIR, DEFAULTS, QUICK

    return _EPILOG_TEMPLATE.format(num_pairs=DEFAULTS["num_pairs"], epochs=DEFAULTS["epochs"],
                                   eval_size=DEFAULTS["eval_size"], attempts=ATTEMPTS_PER_PAIR,
                                   q_pairs=QUICK["num_pairs"], q_eval=QUICK["eval_size"])


def _add_demo(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "demo", help="the whole pipeline on the built-in model, seeds and benchmark (--quick: seconds)",
                    description=DEMO_DESCRIPTION, epilog=_epilog())
    p.add_argument("--output", default="selfmoe-demo", metavar="DIR", help="where everything goes")
    p.add_argument("--quick", action="store_true",
                   help="a tiny random Llama (built locally, no download) and a handful of items per stage")
    p.add_argument("--model", default="smollm2-135m", metavar="NAME_OR_DIR",
                   help="base model: a built-in name or a local directory (ignored with --quick)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    p.add_argument("--num-pairs", type=int, default=None, help="self-generated pairs per domain (default: see below)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every training run (default: 1; --quick: 2 optimizer steps)")
    p.add_argument("--eval-size", type=int, default=None, help="benchmark items per domain (default: see below)")
    p.add_argument("--intuition", action="store_true",
                   help="also a MiXSE with the intuition router (train-router --router intuition: an instance-level "
                        "prior from the domains' mean embeddings mixed into the shared router), row mixse-intuition")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoStageError, run_demo

    for flag, value in (("--num-pairs", args.num_pairs), ("--epochs", args.epochs), ("--eval-size", args.eval_size)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    try:
        result = run_demo(args.output, model=args.model, quick=args.quick, num_pairs=args.num_pairs,
                          epochs=args.epochs, eval_size=args.eval_size, device=args.device,
                          progress=not args.no_progress, intuition=args.intuition)
    except DemoStageError as exc:
        say(f"selfmoe demo: {exc}")
        return exc.code
    paths = result["paths"]
    print(pathlib.Path(paths["results_md"]).read_text(encoding="utf-8"), end="")
    print()
    print(pathlib.Path(paths["routing_heatmap_txt"]).read_text(encoding="utf-8"), end="", flush=True)
    stages = result["timings"]["stages"]
    width = max(len(n) for n in stages)
    say("wall time per stage (s; 'skipped': done by an earlier run, its time then in parentheses):")
    for name, t in stages.items():
        secs = "" if t["seconds"] is None else f"{t['seconds']:.1f}"
        say(f"  {name:<{width}}  " + (f"skipped ({secs})" if t["skipped"] and secs else "skipped" if t["skipped"] else secs))
    say(f"  {'total':<{width}}  {result['timings']['total_seconds_this_run']:.1f} (this run)")
    say(f"output: {result['output']} (results.md, results.json, routing_heatmap.*, timings.json)")
    return 0

