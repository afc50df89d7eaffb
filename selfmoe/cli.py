"""The ``selfmoe`` command line: the whole Self-MoE pipeline from seeds to a routed MiXSE.

Subcommands (``selfmoe <command> --help`` shows each one's flags and examples)::

    selfmoe specialize    seeds -> self-generated, filtered instruction data per domain (JSONL)
    selfmoe train-expert  JSONL -> one LoRA expert (PEFT adapter); --all-domains: instance-merging baseline
    selfmoe train-router  base + experts + JSONL -> MiXSE directory (router trained, experts frozen)
    selfmoe merge         experts -> one merged adapter (linear / TIES / DARE) or a merged base model
    selfmoe generate      complete prompts with a base model, a LoRA adapter or a MiXSE
    selfmoe eval          accuracy on MMLU/BBH/GSM8K/HumanEval-style JSONL (multiple choice, exact match, numeric, code)
    selfmoe bench         run the kernel benchmark from a source checkout (arguments passed through)

Exit codes: 0 success, 1 training stopped on a NaN/inf loss, 2 bad input (the message names the file,
line or flag; no traceback unless ``--debug``), 130 interrupted (a checkpoint was written: rerun with
``--resume``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "CLIError", "load_model"]

from .names import is_safe_name

PROG = "selfmoe"
EXIT_INTERNAL_ERROR = 3  # 0 ok, 1 NaN/inf loss, 2 bad input, 130 interrupted: see MAIN_EPILOG
DTYPES = ("auto", "float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user error: printed as ``selfmoe <command>: error: <message>``, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Shared helpers


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, *, dtype: Optional[str] = None, device: Optional[str] = None) -> Tuple[Any, Any]:
    """Model and tokenizer from a local directory or a hub name (``AutoModelForCausalLM``).

    ``dtype``: ``auto`` (the checkpoint's), ``float32``, ``float16``, ``bfloat16`` or None (transformers'
    default). ``device``: where the model goes (None: stays where transformers put it, the CPU).
    Raises :class:`CLIError` naming ``--model`` when either cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load this name"
        raise CLIError(f"--model {name_or_path}: cannot load the tokenizer: {exc}") from exc
    kwargs: Dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        raise CLIError(f"--model {name_or_path}: cannot load the model: {exc}") from exc
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, ValueError) as exc:
            raise CLIError(f"--device {device}: {exc}") from exc
    return model.eval(), tok


def _named_paths(items: Sequence[str], flag: str) -> Dict[str, str]:
    """``NAME=DIR`` (or ``DIR``, named after its last component) -> ``{name: dir}``, names unique."""
    out: Dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, pathlib.Path(item.rstrip("/\\")).name
        if not name or not path:
            raise CLIError(f"{flag} {item!r}: expected NAME=DIR or DIR")
        if not is_safe_name(name):
            raise CLIError(f"{flag} {item!r}: the name {name!r} must be letters, digits, '_', '-' or '.' (not first); "
                           "give one with NAME=DIR")
        if name in out:
            raise CLIError(f"{flag}: the name {name!r} is given twice ({out[name]} and {path})")
        out[name] = path
    return out


def _key_values(items: Sequence[str], flag: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise CLIError(f"{flag} {item!r}: expected NAME=NUMBER")
    return out


def _floats(text: Optional[str], flag: str) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _target_modules(text: Optional[str]) -> Any:
    if text is None:
        return None
    if text == "all-linear" or "," not in text and not text.isidentifier():
        return text  # "all-linear" or a regex
    return [t.strip() for t in text.split(",") if t.strip()]


def _desc(text: str) -> str:
    """Descriptions are kept verbatim by the raw formatter (for the examples), so wrap them here."""
    return textwrap.fill(text, 100)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples' line breaks; show a flag's default when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def check_device(text: str) -> None:
    """Raise :class:`CLIError` naming ``--device`` unless ``text`` is a torch device this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--device {text}: not a device (cpu, cuda, cuda:1, mps ...): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
                           f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {text}: MPS is not available here; use --device cpu")


def _add_model_args(p: argparse.ArgumentParser, *, required: bool = True, help: str = "base model: a local directory or a hub name") -> None:
    p.add_argument("--model", required=required, metavar="PATH", help=help)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: transformers' default)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")


# ----------------------------------------------------------------------------------------------------
# specialize

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


def _add_specialize(sub: Any) -> None:
    p = sub.add_parser("specialize", help="generate + filter instruction data per domain from seeds",
                       description=_desc("Self-specialization: the base model brainstorms instructions from seed "
                                         "examples and answers them; filtered pairs are appended to "
                                         "<output>/<domain>.jsonl (resumable)."),
                       epilog=SPECIALIZE_EPILOG, formatter_class=_Formatter)
    _add_model_args(p)
    p.add_argument("--seeds", required=True, metavar="PATH", help="seed JSONL file, a directory of <domain>.jsonl, or 'builtin' (6 seeds each for "
                   "knowledge, reasoning, math, coding, shipped with selfmoe)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory for <domain>.jsonl")
    p.add_argument("--domains", default=None, help="comma-separated domains to run (default: all in the seeds)")
    p.add_argument("--num-pairs", type=int, default=5000, help="pairs to keep per domain")
    p.add_argument("--brainstorm-shots", type=int, default=3, help="seed instructions in each brainstorm prompt")
    p.add_argument("--response-shots", type=int, default=5, help="seed pairs in each response prompt")
    p.add_argument("--prompts-per-round", type=int, default=64, help="instructions brainstormed per round (checkpoint unit)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (hf backend)")
    p.add_argument("--max-attempts", type=int, default=None, help="most instructions brainstormed (default: 20 x missing pairs)")
    p.add_argument("--brainstorm-max-new-tokens", type=int, default=256)
    p.add_argument("--response-max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0, help="brainstorm sampling temperature")
    p.add_argument("--top-p", type=float, default=0.98, help="brainstorm nucleus sampling")
    p.add_argument("--min-instruction-words", type=int, default=3)
    p.add_argument("--min-response-words", type=int, default=1)
    p.add_argument("--near-dup-threshold", type=float, default=0.7, help="ROUGE-L F for near duplicates; 0 turns the check off")
    p.add_argument("--keep-unfinished", action="store_true", help="keep texts that hit the token limit")
    p.add_argument("--templates", default=None, metavar="JSON", help="prompt template overrides (see selfmoe.prompts)")
    p.add_argument("--backend", choices=("hf", "vllm", "auto"), default="hf", help="generation backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start the domains' files over instead of continuing them")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_specialize)


def _cmd_specialize(args: argparse.Namespace) -> int:
    from .data import load_seeds
    from .filters import FilterConfig
    from .generate import make_generator
    from .specialize import SpecializeConfig, check_seed_counts, specialize

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
        filters=FilterConfig(min_instruction_words=args.min_instruction_words, min_response_words=args.min_response_words,
                             drop_unfinished=not args.keep_unfinished,
                             near_dup_threshold=args.near_dup_threshold or None),
    )
    check_seed_counts(seeds, cfg)  # before the (slow) model load
    backend = args.backend
    if backend == "auto":
        import torch

        from .generate import vllm_available

        backend = "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    generator = None
    if backend == "vllm":
        from transformers import AutoTokenizer

        # vLLM loads the model itself; the tokenizer only counts tokens for the length filters.
        generator = make_generator(args.model, backend="vllm", progress=not args.no_progress,
                                   **({"dtype": args.dtype} if args.dtype else {}))
        model, tok = None, AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device or _default_device())
    stats = specialize(model, tok, seeds, args.output, num_pairs=args.num_pairs, config=cfg, generator=generator)
    for domain, st in stats.items():
        dropped = ", ".join(f"{k}={v}" for k, v in st["removed"].items() if v) or "none"
        _say(f"{domain}: {st['kept']}/{st['target']} pairs -> {st['output']} "
             f"({'complete' if st['complete'] else 'INCOMPLETE'}; attempts {st['attempts']}; dropped: {dropped})")
    return 0


# ----------------------------------------------------------------------------------------------------
# training (shared flags)

_TRAIN_FLAGS: Tuple[Tuple[str, str, type, str], ...] = (
    # flag, TrainConfig field, type, help (the default is appended from TrainConfig)
    ("--lr", "learning_rate", float, "peak learning rate"),
    ("--epochs", "num_epochs", int, "epochs"),
    ("--max-steps", "max_steps", int, "optimizer steps; replaces --epochs"),
    ("--batch-size", "batch_size", int, "effective batch in examples"),
    ("--micro-batch-size", "micro_batch_size", int, "examples per forward per device; the rest is gradient accumulation"),
    ("--warmup-ratio", "warmup_ratio", float, "fraction of steps for linear warm-up"),
    ("--warmup-steps", "warmup_steps", int, "warm-up steps; overrides --warmup-ratio"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm"),
    ("--max-length", "max_length", int, "tokens per example; longer responses are cut"),
    ("--seed", "seed", int, "seed for init, data order and dropout"),
    ("--save-steps", "save_steps", int, "checkpoint every N steps (and always at the end)"),
    ("--logging-steps", "logging_steps", int, "a log.jsonl line every N steps"),
)


def _config_default(name: str) -> str:
    from .train import TrainConfig

    value = TrainConfig.__dataclass_fields__[name].default
    return "" if value is None or isinstance(value, bool) else f" (default: {value})"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    for flag, dest, typ, help in _TRAIN_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, default=None, help=help + _config_default(dest))
    g.add_argument("--scheduler", dest="lr_scheduler", choices=("cosine", "linear", "constant"), default=None,
                   help="learning-rate decay after warm-up" + _config_default("lr_scheduler"))
    g.add_argument("--mixed-precision", dest="mixed_precision", choices=("auto", "no", "bf16"), default=None,
                   help="auto: bf16 autocast on a GPU that has it, float32 otherwise" + _config_default("mixed_precision"))
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, ~30%% slower)")
    g.add_argument("--accelerate", action="store_true",
                   help="use accelerate even when not launched by accelerate launch/torchrun")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --output")


def _train_config(args: argparse.Namespace, extra: Mapping[str, Any]):
    from .train import TrainConfig

    fields = {dest: getattr(args, dest) for _, dest, _, _ in _TRAIN_FLAGS}
    fields.update(lr_scheduler=args.lr_scheduler, mixed_precision=args.mixed_precision,
                  gradient_checkpointing=args.gradient_checkpointing, **extra)
    fields = {k: v for k, v in fields.items() if v is not None}
    fields["progress"] = not args.no_progress
    return TrainConfig(**fields)


def _run_training(args: argparse.Namespace, what: str, fn: Any) -> int:
    from .train import NonFiniteLossError, TrainingInterrupted

    try:
        result = fn()
    except FileExistsError as exc:  # the library says "resume"/"overwrite": name the flags
        raise CLIError(f"{exc} (flags: --resume, --overwrite)") from exc
    except TrainingInterrupted as exc:
        _say(f"{PROG} {args.command}: {exc}")
        if exc.checkpoint is not None:
            _say(f"continue with the same command plus --resume (output: {args.output})")
        return 130
    except NonFiniteLossError as exc:
        _say(f"{PROG} {args.command}: error: {exc}")
        return 1
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    _say(f"{what} -> {result.output_dir} (step {result.step}/{result.total_steps}, last step loss {loss})")
    return 0


def _device_for_training(args: argparse.Namespace) -> Optional[str]:
    return args.device  # None: the loop picks CUDA when present (or accelerate places the model)


# ----------------------------------------------------------------------------------------------------
# train-expert

TRAIN_EXPERT_EPILOG = """\
examples:
  # one expert per domain (the paper: rank 8, alpha 16, all linear modules, lr 3e-4, 3 epochs, batch 32)
  selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math
  selfmoe train-expert --model ./llama-7b --data data/ --domain coding --output experts/coding

  # the instance-merging baseline: one LoRA on every domain's data
  selfmoe train-expert --model ./llama-7b --data data/ --all-domains --output experts/union

  # interrupted (Ctrl-C writes a checkpoint)? rerun the same command with --resume
  selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math --resume

  # several GPUs
  accelerate launch -m selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math

output: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors; loads with
peft.PeftModel.from_pretrained) plus train_config.json, log.jsonl and checkpoint/.
"""


def _add_train_expert(sub: Any) -> None:
    p = sub.add_parser("train-expert", help="train one LoRA expert (or the instance-merging baseline) on JSONL data",
                       description=_desc("Train a LoRA adapter on instruction data (Alpaca prompt, loss on responses only)."),
                       epilog=TRAIN_EXPERT_EPILOG, formatter_class=_Formatter)
    _add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="JSONL files and/or directories of *.jsonl")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--domain", default=None, help="train on this domain's records only")
    which.add_argument("--all-domains", action="store_true", help="train on every record (instance-merging baseline)")
    p.add_argument("--output", required=True, metavar="DIR", help="run / adapter directory")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", dest="lora_r", type=int, default=None, help="rank" + _config_default("lora_r"))
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=None, help="alpha" + _config_default("lora_alpha"))
    g.add_argument("--lora-dropout", dest="lora_dropout", type=float, default=None, help="dropout on the LoRA input" + _config_default("lora_dropout"))
    g.add_argument("--target-modules", default=None,
                   help="all-linear (the default), comma-separated names (q_proj,v_proj) or a full-match regex")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train_expert)


def _pick_records(records: List[Dict[str, Any]], args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], str]:
    from .train import select_domain

    if args.all_domains:
        return records, "instance-merging expert (all domains)"
    if args.domain:
        return select_domain(records, args.domain), f"expert {args.domain!r}"
    domains = sorted({str(r.get("domain")) for r in records})
    if len(domains) > 1:
        raise CLIError(f"--data holds several domains {domains}: pass --domain NAME (one expert) or --all-domains "
                       "(instance-merging baseline)")
    return records, f"expert {domains[0]!r}"


def _cmd_train_expert(args: argparse.Namespace) -> int:
    from .train import load_records, train_expert

    records, what = _pick_records(load_records(args.data), args)
    config = _train_config(args, {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                                  "target_modules": _target_modules(args.target_modules)})
    model, tok = load_model(args.model, dtype=args.dtype)
    return _run_training(args, what, lambda: train_expert(
        model, tok, records, args.output, config, resume=args.resume, overwrite=args.overwrite,
        accelerate=True if args.accelerate else None, device=_device_for_training(args)))


# ----------------------------------------------------------------------------------------------------
# train-router

TRAIN_ROUTER_EPILOG = """\
examples:
  # MiXSE: the four experts behind a shared top-1 router, trained on the union of all domains' data
  selfmoe train-router --model ./llama-7b --data data/ --output mixse/ \\
      --expert knowledge=experts/knowledge --expert reasoning=experts/reasoning \\
      --expert math=experts/math --expert coding=experts/coding

  # top-2, the paper's two-pass X-LoRA router, a small load-balancing loss
  selfmoe train-router --model ./llama-7b --data data/ --output mixse-x/ --expert experts/math \\
      --expert experts/coding --top-k 2 --router xlora --aux-loss load_balancing=0.01

output: a MiXSE directory (mixse_config.json, experts.safetensors, router.safetensors; load with
MiXSE.from_pretrained(dir, base_model)) plus train_config.json, log.jsonl and checkpoint/.
"""


def _add_train_router(sub: Any) -> None:
    p = sub.add_parser("train-router", help="train the MiXSE router over frozen experts -> MiXSE directory",
                       description=_desc("Attach the experts to the frozen base behind a token-level router and train "
                                         "only the router on the union data (base and expert weights stay "
                                         "bit-identical)."),
                       epilog=TRAIN_ROUTER_EPILOG, formatter_class=_Formatter)
    _add_model_args(p)
    p.add_argument("--expert", required=True, action="append", metavar="NAME=DIR",
                   help="a PEFT adapter directory (repeat; NAME defaults to the directory name)")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="JSONL files and/or directories of *.jsonl")
    p.add_argument("--output", required=True, metavar="DIR", help="run / MiXSE directory")
    g = p.add_argument_group("router")
    g.add_argument("--router", dest="router", choices=("shared", "xlora", "per_layer"), default=None,
                   help="shared (one pass), xlora (the paper's two passes), per_layer" + _config_default("router"))
    g.add_argument("--top-k", dest="top_k", type=int, default=None, help="experts per token" + _config_default("top_k"))
    g.add_argument("--aux-loss", action="append", default=[], metavar="NAME=COEF",
                   help="auxiliary router loss: load_balancing, z_loss, mutual_information (repeat)")
    p.add_argument("--strict", action="store_true",
                   help="refuse experts that declare different base models (default: a warning)")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train_router)


def _cmd_train_router(args: argparse.Namespace) -> int:
    from .train import load_records, train_router

    experts = _named_paths(args.expert, "--expert")
    for name, path in experts.items():
        if not pathlib.Path(path).is_dir():
            raise CLIError(f"--expert {name}={path}: directory not found")
    if args.strict:  # before the model loads; without --strict, MiXSE.from_adapters warns
        from .adapters import check_same_base, load_lora_adapter

        check_same_base({name: load_lora_adapter(path) for name, path in experts.items()}, strict=True)
    records = load_records(args.data)
    extra: Dict[str, Any] = {"router": args.router, "top_k": args.top_k}
    if args.aux_loss:
        extra["aux_loss"] = _key_values(args.aux_loss, "--aux-loss")
    config = _train_config(args, extra)
    model, tok = load_model(args.model, dtype=args.dtype)
    return _run_training(args, f"MiXSE router over {list(experts)}", lambda: train_router(
        model, tok, experts, records, args.output, config, resume=args.resume, overwrite=args.overwrite,
        accelerate=True if args.accelerate else None, device=_device_for_training(args)))


# ----------------------------------------------------------------------------------------------------
# merge

MERGE_EPILOG = """\
examples:
  # TIES merge of the experts into one LoRA adapter (weight-merging baseline)
  selfmoe merge --expert experts/math --expert experts/coding --method ties --density 0.2 --output merged-ties/

  # DARE, reproducible, merged straight into the base weights (a full model directory)
  selfmoe merge --expert experts/math --expert experts/coding --method dare --drop-rate 0.9 --seed 0 \\
      --into-base --model ./llama-7b --output llama-7b-dare/
"""


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge experts (linear/ties/dare) into one adapter or into the base model",
                       description=_desc("Weight merging of LoRA experts on their full updates scaling * B @ A."),
                       epilog=MERGE_EPILOG, formatter_class=_Formatter)
    p.add_argument("--expert", required=True, action="append", metavar="DIR", help="PEFT adapter directory (repeat)")
    p.add_argument("--method", required=True, choices=("linear", "ties", "dare", "dare_ties"))
    p.add_argument("--weights", default=None, help="comma-separated weight per expert (default 1 each)")
    p.add_argument("--density", type=float, default=None, help="TIES: fraction of entries kept (default 0.2)")
    p.add_argument("--drop-rate", type=float, default=None, help="DARE: drop probability (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="DARE masks")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--rank", type=int, default=None,
                   help="adapter output: rank of the factored merge (default: sum of the experts' ranks, exact for linear)")
    p.add_argument("--into-base", action="store_true", help="write the base model with the merge added (needs --model)")
    _add_model_args(p, required=False, help="base model for --into-base")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--strict", action="store_true",
                   help="refuse experts that declare different base models (default: a warning)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .adapters import load_lora_adapter, save_lora_adapter
    from .io_utils import atomic_directory
    from .merging import merge_adapters, merge_into_base, merged_to_lora

    if args.into_base and not args.model:
        raise CLIError("--into-base needs --model (the base model to merge into)")
    adapters = [load_lora_adapter(p) for p in args.expert]
    weights = _floats(args.weights, "--weights")
    if weights is not None and len(weights) != len(adapters):
        raise CLIError(f"--weights has {len(weights)} values for {len(adapters)} experts")
    out = pathlib.Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"--output {out}: exists and is not empty; pass --overwrite to replace it")
    deltas = merge_adapters(adapters, args.method, weights, density=args.density, drop_rate=args.drop_rate, seed=args.seed,
                            strict=args.strict)
    if args.into_base:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        merge_into_base(model, deltas)
        with atomic_directory(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        _say(f"{args.method} merge of {len(adapters)} experts added into {args.model} -> {out}")
        return 0
    rank = args.rank if args.rank is not None else sum(a.r for a in adapters)
    factors = merged_to_lora(deltas, rank)
    base_name = adapters[0].config.get("base_model_name_or_path")
    save_lora_adapter(out, factors, r=rank, lora_alpha=float(rank), base_model_name_or_path=base_name)
    _say(f"{args.method} merge of {len(adapters)} experts -> {out} (LoRA rank {rank})")
    return 0


# ----------------------------------------------------------------------------------------------------
# generate

GENERATE_EPILOG = """\
examples:
  selfmoe generate --model ./llama-7b --mixse mixse/ --prompt "What is 17 * 23?"
  selfmoe generate --model ./llama-7b --adapter experts/math --input questions.jsonl --output answers.jsonl
  selfmoe generate --model ./llama-7b --prompt "def fib(n):" --raw --max-new-tokens 64

Prompts are wrapped in the Alpaca template the experts were trained with (--raw: sent as they are).
--input: JSONL records with "instruction" (and optional "input"), or a .txt file with one prompt per line.
--output: JSONL, each input record with "output" set (raw prompts: {"prompt", "output"}).
"""


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="complete prompts with a base model, a LoRA adapter or a MiXSE",
                       description=_desc("Batched generation with the base model, optionally with one LoRA adapter or a "
                                   "trained MiXSE attached."), epilog=GENERATE_EPILOG, formatter_class=_Formatter)
    _add_model_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mixse", default=None, metavar="DIR", help="MiXSE directory (from train-router)")
    which.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter directory (expert or merge)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat)")
    p.add_argument("--input", default=None, metavar="FILE", help="JSONL records or a .txt file of prompts")
    p.add_argument("--output", default=None, metavar="FILE", help="write JSONL here instead of printing")
    p.add_argument("--raw", action="store_true", help="send prompts as they are (no Alpaca template, no stop marks)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--route-top-k", type=int, default=None, help="MiXSE: experts per token at inference")
    p.add_argument("--routing-stats", action="store_true", help="MiXSE: print per-layer expert usage (JSON) to stderr")
    p.set_defaults(func=_cmd_generate)


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


def _load_runner(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The model ``generate``/``eval`` run: the base, with ``--mixse DIR`` attached (routing top-k per
    ``--route-top-k``) or ``--adapter DIR`` applied. Returns ``(model, tokenizer)``."""
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device or _default_device())
    if args.mixse:
        from .model import MiXSE

        mixse = MiXSE.from_pretrained(args.mixse, model)
        if args.route_top_k is not None:
            mixse.configure_routing(top_k=args.route_top_k)
        return mixse, tok
    if args.adapter:
        from .train import attach_lora_adapter

        attach_lora_adapter(model, args.adapter)
    return model, tok


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import format_prompt, write_jsonl
    from .generate import HFGenerator, SamplingConfig
    from .prompts import STOP_MARKS

    items = _read_prompts(args)
    runner, tok = _load_runner(args)
    prompts = [it["instruction"] if args.raw else format_prompt(it["instruction"], it.get("input", "")) for it in items]
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=() if args.raw else STOP_MARKS)
    gen = HFGenerator(runner, tok, batch_size=args.batch_size, progress=False)
    if args.routing_stats and args.mixse:
        with runner.routing_stats() as stats:
            completions = gen.generate(prompts, config)
        _say(json.dumps(stats.summary(), indent=1))
    else:
        completions = gen.generate(prompts, config)
    texts = [c.text.strip() for c in completions]
    if args.output:
        rows = ([{"prompt": p, "output": t} for p, t in zip(prompts, texts)] if args.raw
                else [{**it, "output": t} for it, t in zip(items, texts)])
        write_jsonl(args.output, rows)
        _say(f"{len(rows)} completions -> {args.output}")
    else:
        for i, t in enumerate(texts):
            if len(texts) > 1:
                print(f"=== [{i}] {items[i]['instruction'][:60]}")
            print(t)
    return 0


# ----------------------------------------------------------------------------------------------------
# eval

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
(optional: "input", "id"). Greedy decoding in the Alpaca template; scoring rules: selfmoe.evaluate.
output: <output>/predictions.jsonl (one row per example: source, task, response, prediction, correct)
and <output>/summary.json (per-task n/correct/accuracy, overall, sampling, routing per task).

code records run the programs the model writes: refused (exit 2) unless --allow-code-execution (or
SELFMOE_ALLOW_CODE_EVAL=1). Each runs in selfmoe.sandbox: own work dir and HOME, limits on memory,
CPU, file size, processes, open files, no process left behind; as root also no network, its own
unprivileged uid and private /tmp. Non-root: see selfmoe.sandbox for what is not contained.

resume: completions are saved to <output>/predictions.partial.jsonl as they are generated; rerunning
the same command after an interruption generates only the rest. Other settings are refused unless
--restart (which discards the saved completions).
"""


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a base model, a LoRA adapter or a MiXSE on benchmark JSONL",
                       description=_desc("Greedy generation on multiple-choice (MMLU), exact-match (BBH), numeric "
                                         "(GSM8K) and code (HumanEval, run in a subprocess) examples; accuracy per "
                                         "task."), epilog=EVAL_EPILOG, formatter_class=_Formatter)
    _add_model_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mixse", default=None, metavar="DIR", help="MiXSE directory (from train-router)")
    which.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter directory (expert or merge)")
    p.add_argument("--data", required=True, action="append", metavar="[KIND=]FILE",
                   help="JSONL examples (repeat); KIND= sets the task kind for records without one")
    p.add_argument("--task", default=None, choices=("multiple_choice", "exact_match", "numeric", "code"),
                   help="task kind for records without one, in every --data file without KIND=")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for predictions.jsonl and summary.json")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each --data file only")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per code example")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run the programs of code records (sandboxed; without it code records are refused)")
    p.add_argument("--restart", action="store_true",
                   help="discard completions saved by an interrupted run with other settings, start over")
    p.add_argument("--route-top-k", type=int, default=None, help="MiXSE: experts per token at inference")
    p.add_argument("--routing-stats", action="store_true", help="MiXSE: per-task expert usage into summary.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import os

    from .evaluate import (TASKS, PartialMismatchError, check_partial, code_execution_allowed, default_sampling,
                           evaluate, load_eval_records, write_results)

    if args.routing_stats and not args.mixse:
        raise CLIError("--routing-stats needs --mixse (only a MiXSE has a router)")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    if args.code_timeout <= 0:
        raise CLIError(f"--code-timeout must be > 0, got {args.code_timeout}")
    out = pathlib.Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {out}: exists and is not a directory")
    sampling = default_sampling(args.max_new_tokens)  # checks --max-new-tokens before the model loads
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    records: List[Any] = []
    for item in args.data:
        kind, sep, path = item.partition("=")
        if not sep or kind not in TASKS:
            if sep and kind.isidentifier() and not pathlib.Path(item).is_file():
                raise CLIError(f"--data {item}: unknown task kind {kind!r} (one of {', '.join(TASKS)})")
            kind, path = args.task, item
        if not pathlib.Path(path).is_file():
            raise CLIError(f"--data {path}: file not found")
        records.extend(load_eval_records(path, task=kind)[:args.limit])
    n_code = sum(1 for r in records if r.task == "code")
    allowed = code_execution_allowed(True if args.allow_code_execution else None)
    if n_code and not allowed:
        raise CLIError(f"{n_code} code example(s) would run the programs the model writes on this machine; pass "
                       "--allow-code-execution (or set SELFMOE_ALLOW_CODE_EVAL=1) to allow it (sandboxed: see "
                       "`selfmoe eval --help`)")
    try:  # before the model loads: a run must not fail at its end on an unwritable --output
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".selfmoe-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--output {out}: cannot write there: {exc}") from None
    partial = out / "predictions.partial.jsonl"
    run_info = {"model": args.model, "mixse": args.mixse, "adapter": args.adapter, "dtype": args.dtype,
                "route_top_k": args.route_top_k}
    if not args.restart:
        try:
            saved = check_partial(partial, records, sampling=sampling, run_info=run_info, routing_stats=args.routing_stats)
        except PartialMismatchError as exc:
            raise CLIError(f"{exc.reason}; rerun with the same settings to continue it, or pass --restart to "
                           "discard it") from None
        if saved:
            _say(f"resuming: {saved} of {len(records)} completions already saved in {partial}")
    runner, tok = _load_runner(args)
    try:
        result = evaluate(runner, tok, records, sampling=sampling, batch_size=args.batch_size,
                          progress=not args.no_progress, routing_stats=args.routing_stats,
                          code_timeout=args.code_timeout, allow_code_execution=allowed, partial_path=partial,
                          restart=args.restart, run_info=run_info)
    except KeyboardInterrupt:
        if partial.is_file():
            _say(f"completions so far are saved in {partial}: rerun the same command to continue")
        raise
    extra = {"model": args.model, "mixse": args.mixse, "adapter": args.adapter, "data": list(args.data)}
    paths = write_results(result, out, extra=extra)
    partial.unlink()
    print(result.table(), flush=True)
    _say(f"{result.n} examples -> {paths['predictions']}, {paths['summary']}")
    return 0


# ----------------------------------------------------------------------------------------------------
# bench

BENCH_EPILOG = """\
usage: selfmoe bench [train-step] [BENCHMARK ARGS...]

Runs benchmarks/bench_lora_mix.py (or bench_train_step.py with "train-step") from the source checkout
this package was installed from (pip install -e .); every other argument goes to the benchmark.

examples:
  selfmoe bench --help                                  # the benchmark's own flags
  selfmoe bench --shapes paper-cpu --modes fwd --reps 5
  selfmoe bench train-step --providers bare,mixse
"""

_BENCHMARKS = {"lora-mix": "bench_lora_mix.py", "train-step": "bench_train_step.py"}


def benchmarks_dir() -> pathlib.Path:
    """Where the source checkout's ``benchmarks/`` folder would be (next to the ``selfmoe`` package)."""
    return pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _cmd_bench(argv: Sequence[str]) -> int:
    argv = list(argv)
    which = "lora-mix"
    if argv and argv[0] in _BENCHMARKS:
        which = argv.pop(0)
    script = benchmarks_dir() / _BENCHMARKS[which]
    if not script.is_file():
        raise CLIError(f"benchmark script not found at {script}: `selfmoe bench` runs the benchmarks of a source "
                       "checkout; clone the repository and install it with `pip install -e .` (or run "
                       f"`python benchmarks/{_BENCHMARKS[which]}` there)")
    if argv[:1] in (["-h"], ["--help"]):
        print(BENCH_EPILOG, flush=True)
    return subprocess.call([sys.executable, str(script), *argv], cwd=str(script.parent.parent))


def _add_bench(sub: Any) -> None:
    sub.add_parser("bench", help="run the kernel benchmark (source checkout only; arguments passed through)",
                   description=_desc("Run benchmarks/bench_lora_mix.py from the source checkout."), epilog=BENCH_EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)


# ----------------------------------------------------------------------------------------------------
# main

MAIN_EPILOG = """\
the pipeline on a local model (each step is resumable; see `selfmoe <command> --help`):
  selfmoe specialize   --model ./base --seeds seeds/ --output data/ --num-pairs 5000
  selfmoe train-expert --model ./base --data data/ --domain math   --output experts/math
  selfmoe train-expert --model ./base --data data/ --domain coding --output experts/coding
  selfmoe train-router --model ./base --data data/ --output mixse/ \\
      --expert math=experts/math --expert coding=experts/coding
  selfmoe generate     --model ./base --mixse mixse/ --prompt "What is 17 * 23?"
  selfmoe eval         --model ./base --mixse mixse/ --data gsm8k.jsonl --output eval/

exit codes: 0 ok, 1 NaN/inf loss, 2 bad input, 130 interrupted (checkpoint written; rerun with --resume),
3 internal error (a bug: please report it with the output of --debug)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``selfmoe`` argument parser (all subcommands)."""
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description=_desc("Self-MoE / MiXSE: self-specialized LoRA experts behind a learned token-level router."),
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_specialize(sub)
    _add_train_expert(sub)
    _add_train_router(sub)
    _add_merge(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_bench(sub)
    return parser


def _user_errors() -> Tuple[type, ...]:
    from .adapters import AdapterFormatError
    from .data import DataFormatError

    # ValueError covers DataFormatError/AdapterFormatError and bad values; OSError covers missing files,
    # existing run directories (FileExistsError) and unreadable ones.
    return (CLIError, DataFormatError, AdapterFormatError, ValueError, OSError, ImportError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (``python -m selfmoe`` / the ``selfmoe`` script exit with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1]
    if debug:
        argv = argv[1:]
    command = argv[0] if argv else None
    try:
        if command == "bench":  # everything after "bench" belongs to the benchmark script
            return _cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if getattr(args, "device", None) is not None:  # before any data or model is read
            check_device(args.device)
        return args.func(args)
    except KeyboardInterrupt:
        _say(f"{PROG} {command}: interrupted")
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        _say(f"{PROG} {command}: error: {exc}")
        return 2
    except Exception as exc:  # a bug, not bad input: say so in one line; --debug shows the traceback
        if debug:
            raise
        _say(f"{PROG} {command}: internal error: {type(exc).__name__}: {exc} (please report it; rerun with "
             f"`{PROG} --debug {command} ...` for the traceback)")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
