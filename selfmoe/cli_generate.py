"""``selfmoe generate``: complete prompts with a base model, a LoRA adapter or a MiXSE."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any, Dict, List

from .choices import PROMPT_FORMATS
from .cli_common import CLIError, add_command, add_runner_args, load_runner, say

__all__ = ["GENERATE_DESCRIPTION", "GENERATE_EPILOG", "_add_generate", "_cmd_generate"]

GENERATE_DESCRIPTION = ("Batched generation with the base model, optionally with one LoRA adapter or a trained MiXSE "
                        "attached.")
GENERATE_EPILOG = """\
examples:
  selfmoe generate --model ./llama-7b --mixse mixse/ --prompt "What is 17 * 23?"
  selfmoe generate --model ./llama-7b --adapter experts/math --input questions.jsonl --output answers.jsonl
  selfmoe generate --model ./llama-7b --prompt "def fib(n):" --raw --max-new-tokens 64

Prompts are wrapped in the template the experts were trained with (--prompt-format, default auto: the
model's chat template when its tokenizer has one, else the Alpaca template; --raw: sent as they are).
--input: JSONL records with "instruction" (and optional "input"), or a .txt file with one prompt per line.
--output: JSONL, each input record with "output" set (raw prompts: {"prompt", "output"}).
"""


def _add_generate(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "generate", help="complete prompts with a base model, a LoRA adapter or a MiXSE",
                    description=GENERATE_DESCRIPTION, epilog=GENERATE_EPILOG)
    add_runner_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat)")
    p.add_argument("--input", default=None, metavar="FILE", help="JSONL records or a .txt file of prompts")
    p.add_argument("--output", default=None, metavar="FILE", help="write JSONL here instead of printing")
    p.add_argument("--raw", action="store_true", help="send prompts as they are (no template, no stop marks)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="chat: the tokenizer's chat template (the turn ends at its end-of-turn token); alpaca: the "
                        "Alpaca template, cut at its '### ' marks; auto: chat when the tokenizer has a chat template "
                        "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--route-top-k", type=int, default=None, help="MiXSE: experts per token at inference")
    p.add_argument("--routing-stats", action="store_true",
                   help="MiXSE: print each expert's share of the routed token-slots over all layers to stderr")
    p.add_argument("--routing-stats-json", default=None, metavar="PATH",
                   help="MiXSE: also write the per-layer routing statistics (usage, mean gate, mean router "
                        "probability per expert and layer) as JSON")
    return p


def _read_prompts(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from .data import read_jsonl

    items: List[Dict[str, Any]] = [{"instruction": p, "input": ""} for p in args.prompt]
    if args.input:
        path = pathlib.Path(args.input)
        if not path.is_file():
            raise CLIError(f"--input {path}: file not found")
        if path.suffix == ".jsonl":
            for rec in read_jsonl(path, require_domain=False, validate=False):
                if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
                    raise CLIError(f"--input {path}: every record needs a non-empty 'instruction'")
                items.append({**rec, "input": rec.get("input") or ""})
        else:
            items.extend({"instruction": line, "input": ""} for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not items:
        raise CLIError("no prompts: pass --prompt TEXT or --input FILE")
    return items


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import format_prompt, write_jsonl
    from .generate import HFGenerator, SamplingConfig
    from .prompts import STOP_MARKS

    from .prompt_format import resolve_prompt_format

    items = _read_prompts(args)
    runner, tok = load_runner(args)
    try:
        fmt = resolve_prompt_format(args.prompt_format, tok)
    except ValueError as exc:
        raise CLIError(f"--prompt-format: {exc}") from None
    prompts = [it["instruction"] if args.raw else format_prompt(it["instruction"], it.get("input", ""), fmt=fmt, tokenizer=tok)
               for it in items]
    # A chat turn ends at the model's end-of-turn token (an EOS id); the Alpaca marks only cut Alpaca text.
    stop = () if args.raw or fmt == "chat" else STOP_MARKS
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=stop)
    gen = HFGenerator(runner, tok, batch_size=args.batch_size, progress=False, decode_loop=True)
    if (args.routing_stats or args.routing_stats_json) and args.mixse:
        from .stats import format_routing_overview, routing_overview

        with runner.routing_stats() as stats:
            completions = gen.generate(prompts, config)
        per_layer = stats.summary()
        if args.routing_stats:
            say(format_routing_overview(routing_overview({"prompts": per_layer})))
        if args.routing_stats_json:
            from .io_utils import atomic_write_json

            atomic_write_json(args.routing_stats_json, per_layer)
            say(f"per-layer routing statistics -> {args.routing_stats_json}")
    else:
        completions = gen.generate(prompts, config)
    texts = [c.text.strip() for c in completions]
    if args.output:
        rows = ([{"prompt": p, "output": t} for p, t in zip(prompts, texts)] if args.raw
                else [{**it, "output": t} for it, t in zip(items, texts)])
        write_jsonl(args.output, rows)
        say(f"{len(rows)} completions -> {args.output}")
    else:
        for i, t in enumerate(texts):
            if len(texts) > 1:
                print(f"=== [{i}] {items[i]['instruction'][:60]}")
            print(t)
    return 0
