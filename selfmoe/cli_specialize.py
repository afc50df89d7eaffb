"""``selfmoe specialize``: seeds -> self-generated, filtered instruction data per domain (JSONL)."""
from __future__ import annotations

import argparse
from typing import Any

from .choices import GENERATION_BACKENDS, PROMPT_FORMATS
from .cli_common import CLIError, add_command, add_model_args, default_device, load_model, say

__all__ = ["SPECIALIZE_DESCRIPTION", "SPECIALIZE_EPILOG", "_add_specialize", "_cmd_specialize"]

SPECIALIZE_DESCRIPTION = ("Self-specialization: the base model brainstorms instructions from seed examples and "
                          "answers them; filtered pairs are appended to <output>/<domain>.jsonl (resumable).")
SPECIALIZE_EPILOG = """\
examples:
  # 5,000 pairs per domain from 100 seeds each (the paper's setup); seeds: one JSONL file whose
  # records carry "domain", or a directory with one <domain>.jsonl per domain
  selfmoe specialize --model ./llama-7b --seeds seeds/ --output data/ --num-pairs 5000

  # two domains only, vLLM for generation, resume an interrupted run (just rerun the same command)
  selfmoe specialize --model meta-llama/Llama-2-7b-hf --seeds seeds.jsonl --output data/ \\
      --domains math,coding --backend vllm

output: data/<domain>.jsonl ({"instruction", "input", "output", "domain"} per line) and
data/<domain>.stats.json (kept pairs, dropped ones per filter, attempts).
"""


def _add_specialize(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "specialize", help="generate + filter instruction data per domain from seeds",
                    description=SPECIALIZE_DESCRIPTION, epilog=SPECIALIZE_EPILOG)
    add_model_args(p)
    p.add_argument("--seeds", required=True, metavar="PATH", help="seed JSONL file, a directory of <domain>.jsonl, or 'builtin' (6 seeds each for "
                   "knowledge, reasoning, math, coding, shipped with selfmoe)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory for <domain>.jsonl")
    p.add_argument("--domains", default=None, help="comma-separated domains to run (default: all in the seeds)")
    p.add_argument("--num-pairs", type=int, default=5000, help="pairs to keep per domain (default: %(default)s)")
    p.add_argument("--brainstorm-shots", type=int, default=3, help="seed instructions in each brainstorm prompt (default: %(default)s)")
    p.add_argument("--response-shots", type=int, default=5, help="seed pairs in each response prompt (default: %(default)s)")
    p.add_argument("--no-share-shots", action="store_true",
                   help="draw the few-shot examples per prompt instead of once per --batch-size group of prompts "
                        "(a shared draw lets the hf backend run the group's common prompt prefix once: several "
                        "times less prefill on a CPU)")
    p.add_argument("--prompts-per-round", type=int, default=64, help="instructions brainstormed per round, the unit written to disk (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="hf backend: rows decoded at once; a finished row's place goes to the next prompt of any "
                        "domain (continuous batching) (default: %(default)s)")
    p.add_argument("--max-attempts", type=int, default=None, help="most instructions brainstormed (default: 20 x missing pairs)")
    p.add_argument("--brainstorm-max-new-tokens", type=int, default=256,
                   help="token budget of a brainstormed instruction (default: %(default)s)")
    p.add_argument("--response-max-new-tokens", type=int, default=512,
                   help="token budget of a response (default: %(default)s)")
    p.add_argument("--one-paragraph-instructions", choices=("auto", "on", "off"), default="auto",
                   help="end a brainstormed instruction at its first blank line; auto: in the chat format, for "
                        "domains whose seed instructions are all one paragraph (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="brainstorm sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.98, help="brainstorm nucleus sampling (default: %(default)s)")
    p.add_argument("--min-instruction-words", type=int, default=3,
                   help="shorter instructions are dropped (default: %(default)s)")
    p.add_argument("--min-response-words", type=int, default=1,
                   help="shorter responses are dropped (default: %(default)s)")
    p.add_argument("--near-dup-threshold", type=float, default=0.7, help="ROUGE-L F for near duplicates; 0 turns the check off (default: %(default)s)")
    p.add_argument("--keep-unfinished", action="store_true", help="keep texts that hit the token limit")
    p.add_argument("--no-code-parse-check", action="store_true",
                   help="coding domain: keep responses whose code does not parse (by default they are dropped, "
                        "counted as code_syntax)")
    p.add_argument("--run-code-asserts", action="store_true",
                   help="coding domain: RUN the model-written code of each response, plus the 'assert' lines its "
                        "instruction states, in the sandbox (selfmoe.sandbox: resource limits, isolation where the "
                        "machine allows it) and drop pairs that fail (code_asserts); off by default")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per program with --run-code-asserts (default: %(default)s)")
    p.add_argument("--max-answer-letter-share", type=float, default=0.5,
                   help="multiple-choice instructions ('(A) ... (B) ...'): the largest share one answer letter may "
                        "hold among a domain's kept answers, enforced once 8 are kept (answer_letter_share); "
                        "0 turns it off (default: %(default)s)")
    p.add_argument("--templates", default=None, metavar="JSON", help="prompt template overrides (see selfmoe.prompts)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="chat: the brainstorm and response prompts in the tokenizer's chat template (system message, "
                        "few-shot turns); alpaca: few-shot '### Instruction:' continuation text; auto: chat when the "
                        "tokenizer has a chat template (default: %(default)s)")
    p.add_argument("--backend", choices=GENERATION_BACKENDS, default="hf", help="generation backend (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed-example draws and sampling (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="start the domains' files over instead of continuing them")
    p.add_argument("--no-progress", action="store_true")
    return p


def _cmd_specialize(args: argparse.Namespace) -> int:
    from .data import load_seeds
    from .filters import FilterConfig
    from .generate import make_generator
    from .specialization import SpecializeConfig, check_seed_counts, specialize

    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    seeds = load_seeds(args.seeds, domains=domains)
    base = SpecializeConfig()
    cfg = SpecializeConfig(
        brainstorm_shots=args.brainstorm_shots, response_shots=args.response_shots,
        brainstorm=base.brainstorm.replace(max_new_tokens=args.brainstorm_max_new_tokens, temperature=args.temperature,
                                           top_p=args.top_p),
        response=base.response.replace(max_new_tokens=args.response_max_new_tokens),
        prompts_per_round=args.prompts_per_round, batch_size=args.batch_size, max_attempts=args.max_attempts,
        seed=args.seed, templates=args.templates, overwrite=args.overwrite, progress=not args.no_progress,
        prompt_format=args.prompt_format, share_shots=not args.no_share_shots,
        one_paragraph_instructions={"auto": None, "on": True, "off": False}[args.one_paragraph_instructions],
        filters=FilterConfig(min_instruction_words=args.min_instruction_words, min_response_words=args.min_response_words,
                             drop_unfinished=not args.keep_unfinished,
                             near_dup_threshold=args.near_dup_threshold or None,
                             code_must_parse=not args.no_code_parse_check, run_code_asserts=args.run_code_asserts,
                             code_timeout=args.code_timeout,
                             max_answer_letter_share=args.max_answer_letter_share or None),
    )
    check_seed_counts(seeds, cfg)  # before the (slow) model load
    if args.run_code_asserts and "coding" in seeds:
        say("--run-code-asserts: model-written code of the coding domain will run in the sandbox")
    backend = args.backend
    if backend == "auto":
        import torch

        from .generate import vllm_available

        backend = "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    generator = None
    if backend == "vllm":
        from transformers import AutoTokenizer

        from .builtin_models import resolve_model

        # vLLM loads the model itself; the tokenizer only counts tokens for the length filters.
        path = resolve_model(args.model)  # a built-in name becomes its converted folder
        generator = make_generator(path, backend="vllm", progress=not args.no_progress,
                                   **({"dtype": args.dtype} if args.dtype else {}))
        model, tok = None, AutoTokenizer.from_pretrained(path)
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device or default_device())
    from .prompt_format import resolve_prompt_format

    try:
        resolve_prompt_format(args.prompt_format, tok)
    except ValueError as exc:
        raise CLIError(f"--prompt-format: {exc}") from None
    stats = specialize(model, tok, seeds, args.output, num_pairs=args.num_pairs, config=cfg, generator=generator)
    for domain, st in stats.items():
        dropped = ", ".join(f"{k}={v}" for k, v in st["removed"].items() if v) or "none"
        say(f"{domain}: {st['kept']}/{st['target']} pairs -> {st['output']} "
            f"({'complete' if st['complete'] else 'INCOMPLETE'}; attempts {st['attempts']}; dropped: {dropped})")
    return 0
