"""``selfmoe train-expert`` and ``selfmoe train-router``, and the training flags they share.

Each training flag sets one :class:`selfmoe.train_config.TrainConfig` field and defaults to None (the field's
own default applies); ``--help`` shows that default, read from TrainConfig only when help is printed.
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .choices import (AUX_LOSS_NAMES, EXPERT_KINDS, HYPER_DEFAULTS, LR_SCHEDULERS, MIXED_PRECISIONS, PROMPT_FORMATS,
                      ROUTER_CHOICES)
from .cli_common import PROG, CLIError, HelpFormatter, add_command, add_model_args, load_model, say
from .names import is_safe_name

__all__ = ["TRAIN_EXPERT_DESCRIPTION", "TRAIN_EXPERT_EPILOG", "_add_train_expert", "_cmd_train_expert",
           "TRAIN_ROUTER_DESCRIPTION", "TRAIN_ROUTER_EPILOG", "_add_train_router", "_cmd_train_router"]

# ----------------------------------------------------------------------------------------------------
# The training flags (both commands)

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
    from .train_config import TrainConfig

    value = TrainConfig.__dataclass_fields__[name].default
    return "" if value is None or isinstance(value, bool) else f" (default: {value})"


class _TrainHelpFormatter(HelpFormatter):
    """Also shows TrainConfig's default for each flag added by :func:`_config_flag`. TrainConfig is read
    here, when help is printed, not when the parser is built (``selfmoe.train_config`` still imports torch
    through ``selfmoe.routers``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        field = getattr(action, "config_field", None)
        return text + _config_default(field) if field else text


def _config_flag(group: Any, flag: str, *, dest: str, help: str, **kwargs: Any) -> None:
    """A flag that sets the TrainConfig field ``dest`` (default None: the field's default applies)."""
    action = group.add_argument(flag, dest=dest, default=None, help=help, **kwargs)
    action.config_field = dest  # read by _TrainHelpFormatter


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    for flag, dest, typ, help in _TRAIN_FLAGS:
        _config_flag(g, flag, dest=dest, type=typ, help=help)
    _config_flag(g, "--scheduler", dest="lr_scheduler", choices=LR_SCHEDULERS, help="learning-rate decay after warm-up")
    _config_flag(g, "--mixed-precision", dest="mixed_precision", choices=MIXED_PRECISIONS,
                 help="auto: bf16 autocast on a GPU that has it, float32 otherwise")
    _config_flag(g, "--prompt-format", dest="prompt_format", choices=PROMPT_FORMATS,
                 help="how records become prompts: the tokenizer's chat template (chat) or the Alpaca template; "
                      "auto: chat when the tokenizer has a chat template. Evaluate and generate with the same one")
    g.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, ~30%% slower)")
    g.add_argument("--accelerate", action="store_true",
                   help="use accelerate even when not launched by accelerate launch/torchrun")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the frozen base over the launched processes (FSDP2; under torchrun / accelerate "
                        "launch); what trains stays whole on every process")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --output")


def _train_config(args: argparse.Namespace, extra: Mapping[str, Any]):
    from .train import TrainConfig

    fields = {dest: getattr(args, dest) for _, dest, _, _ in _TRAIN_FLAGS}
    fields.update(lr_scheduler=args.lr_scheduler, mixed_precision=args.mixed_precision,
                  prompt_format=args.prompt_format, gradient_checkpointing=args.gradient_checkpointing, **extra)
    fields = {k: v for k, v in fields.items() if v is not None}
    fields["progress"] = not args.no_progress
    return TrainConfig(**fields)


def _run_training(args: argparse.Namespace, what: str, fn: Any) -> int:
    from .train_config import CheckpointError, DistributedError, NonFiniteLossError, TrainingInterrupted
    from .train_runtime import process_rank

    # Under a launcher every process runs this command: the outcome is told once, by rank 0 (errors that
    # concern one process only, such as a failed collective, by that process).
    main = process_rank() == 0
    try:
        result = fn()
    except FileExistsError as exc:  # the library says "resume"/"overwrite": name the flags
        raise CLIError(f"{exc} (flags: --resume, --overwrite)") from exc
    except CheckpointError as exc:  # a damaged checkpoint: the way out is the --overwrite flag
        raise CLIError(str(exc).replace("pass overwrite", "pass --overwrite")) from exc
    except TrainingInterrupted as exc:
        if main:
            say(f"{PROG} {args.command}: {exc}")
            if exc.checkpoint is not None:
                say(f"continue with the same command plus --resume (output: {args.output})")
        return 130
    except NonFiniteLossError as exc:
        if main:
            say(f"{PROG} {args.command}: error: {exc}")
        return 1
    except DistributedError as exc:  # not a bug here: another process failed; this one says so and stops
        say(f"{PROG} {args.command}: error: {exc}".replace("rerun with resume", "rerun with --resume"))
        return 3
    if main:
        loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
        say(f"{what} -> {result.output_dir} (step {result.step}/{result.total_steps}, last step loss {loss})")
    return 0


def _device_for_training(args: argparse.Namespace) -> Optional[str]:
    return args.device  # None: the loop picks CUDA when present (or accelerate places the model)


# ----------------------------------------------------------------------------------------------------
# train-expert

TRAIN_EXPERT_DESCRIPTION = "Train a LoRA adapter on instruction data (Alpaca prompt, loss on responses only)."
TRAIN_EXPERT_EPILOG = """\
examples:
  # one expert per domain (the paper: rank 8, alpha 16, all linear modules, lr 3e-4, 3 epochs, batch 32)
  selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math
  selfmoe train-expert --model ./llama-7b --data data/ --domain coding --output experts/coding

  # the instance-merging baseline: one LoRA on every domain's data
  selfmoe train-expert --model ./llama-7b --data data/ --all-domains --output experts/union

  # interrupted (Ctrl-C writes a checkpoint)? rerun the same command with --resume
  selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math --resume

  # MoR1E: rank 8 = 8 rank-1 experts per linear behind per-layer routers (dense), with an intuition prior;
  # or 4 x 8 mix-and-match pairs, top-4 (output: a MiXSE directory; selfmoe generate --mixse DIR)
  selfmoe train-expert --model ./llama-7b --data data/ --domain math --output mor1e/math --experts rank1 --intuition
  selfmoe train-expert --model ./llama-7b --data data/ --domain math --output mor1e/math-mm --experts rank1 \\
      --mix-and-match 4x8 --top-k 4

  # several GPUs (or CPU processes over gloo: accelerate launch --multi_gpu --num_processes 2 ..., or torchrun)
  accelerate launch -m selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math
  torchrun --nproc_per_node 8 -m selfmoe train-expert --model ./llama-7b --data data/ --domain math --output experts/math

output: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors; loads with
peft.PeftModel.from_pretrained) plus train_config.json, log.jsonl and checkpoint/.
"""


def _add_train_expert(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "train-expert", help="train one LoRA expert (or the instance-merging baseline) on JSONL data",
                    description=TRAIN_EXPERT_DESCRIPTION, epilog=TRAIN_EXPERT_EPILOG, formatter_class=_TrainHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="JSONL files and/or directories of *.jsonl")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--domain", default=None, help="train on this domain's records only")
    which.add_argument("--all-domains", action="store_true", help="train on every record (instance-merging baseline)")
    p.add_argument("--output", required=True, metavar="DIR", help="run / adapter directory")
    g = p.add_argument_group("LoRA")
    _config_flag(g, "--lora-r", dest="lora_r", type=int, help="rank")
    _config_flag(g, "--lora-alpha", dest="lora_alpha", type=float, help="alpha")
    _config_flag(g, "--lora-dropout", dest="lora_dropout", type=float, help="dropout on the LoRA input")
    g.add_argument("--target-modules", default=None,
                   help="all-linear (the default), comma-separated names (q_proj,v_proj) or a full-match regex")
    r1 = p.add_argument_group("rank-1 experts (MoR1E)")
    _config_flag(r1, "--experts", dest="experts", choices=EXPERT_KINDS,
                 help="lora: one plain LoRA (a PEFT adapter); rank1: the rank's components are experts behind "
                      "per-layer token routers, trained together (a MiXSE directory)")
    r1.add_argument("--mix-and-match", default=None, metavar="R1xR2",
                    help="rank1: the R1*R2 experts are the pairs of R1 A rows and R2 B columns (replaces --lora-r)")
    _config_flag(r1, "--top-k", dest="expert_top_k", type=int, help="rank1: experts per token (default: all, dense softmax)")
    r1.add_argument("--intuition", action="store_true", default=None,
                    help="rank1: mix an instance-level prior (k-means clusters of the training data) into the routers")
    _add_intuition_args(r1)
    _add_train_args(p)
    return p


def _add_intuition_args(g: Any) -> None:
    _config_flag(g, "--intuition-clusters", dest="intuition_clusters", type=int,
                 help="intuition prior: k-means clusters (when the clusters are not the experts' domains)")
    _config_flag(g, "--intuition-layer", dest="intuition_layer", type=int,
                 help="intuition prior: the hidden state mean-pooled per sequence (0: the token embeddings)")


def _mix_and_match(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    a, sep, b = text.lower().partition("x")
    if not sep or not a.isdigit() or not b.isdigit() or int(a) < 1 or int(b) < 1:
        raise CLIError(f"--mix-and-match {text!r}: expected R1xR2 with positive integers, e.g. 4x8")
    return [int(a), int(b)]


def _target_modules(text: Optional[str]) -> Any:
    if text is None:
        return None
    if text == "all-linear" or "," not in text and not text.isidentifier():
        return text  # "all-linear" or a regex
    return [t.strip() for t in text.split(",") if t.strip()]


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
    extra = {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
             "target_modules": _target_modules(args.target_modules), "experts": args.experts,
             "mix_and_match": _mix_and_match(args.mix_and_match), "expert_top_k": args.expert_top_k,
             "intuition": args.intuition, "intuition_clusters": args.intuition_clusters,
             "intuition_layer": args.intuition_layer}
    if args.experts != "rank1":
        given = [f for f, v in (("--mix-and-match", args.mix_and_match), ("--top-k", args.expert_top_k),
                                ("--intuition", args.intuition)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)}: only with --experts rank1")
    config = _train_config(args, extra)
    model, tok = load_model(args.model, dtype=args.dtype)
    return _run_training(args, what, lambda: train_expert(
        model, tok, records, args.output, config, resume=args.resume, overwrite=args.overwrite,
        accelerate=True if args.accelerate else None, device=_device_for_training(args), fsdp=args.fsdp))


# ----------------------------------------------------------------------------------------------------
# train-router

TRAIN_ROUTER_DESCRIPTION = ("Attach the experts to the frozen base behind a token-level router and train only the "
                            "router on the union data (base and expert weights stay bit-identical).")
TRAIN_ROUTER_EPILOG = """\
examples:
  # MiXSE: the four experts behind a shared top-1 router, trained on the union of all domains' data
  selfmoe train-router --model ./llama-7b --data data/ --output mixse/ \\
      --expert knowledge=experts/knowledge --expert reasoning=experts/reasoning \\
      --expert math=experts/math --expert coding=experts/coding

  # intuition routing: a per-sequence prior (cosine to each domain's mean embedding) mixed into the router
  selfmoe train-router --model ./llama-7b --data data/ --output mixse-i/ --expert experts/math \\
      --expert experts/coding --router intuition

  # top-2, the paper's two-pass X-LoRA router, a small load-balancing loss
  selfmoe train-router --model ./llama-7b --data data/ --output mixse-x/ --expert experts/math \\
      --expert experts/coding --top-k 2 --router xlora --aux-loss load_balancing=0.01

  # HyperMoE's HyperExpert beside the router (a smaller generated adapter than the paper's 64)
  selfmoe train-router --model ./llama-7b --data data/ --output mixse-h/ --expert experts/math \\
      --expert experts/coding --hyper-expert --hyper-size adapter_dim=32

  # 8 GPUs, the frozen base sharded over them (FSDP2); the router and experts stay whole on each
  torchrun --nproc_per_node 8 -m selfmoe train-router --fsdp --model ./llama-7b --data data/ --output mixse/ \\
      --expert experts/math --expert experts/coding

output: a MiXSE directory (mixse_config.json, experts.safetensors, router.safetensors; load with
MiXSE.from_pretrained(dir, base_model)) plus train_config.json, log.jsonl and checkpoint/.
"""


def _add_train_router(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "train-router", help="train the MiXSE router over frozen experts -> MiXSE directory",
                    description=TRAIN_ROUTER_DESCRIPTION, epilog=TRAIN_ROUTER_EPILOG, formatter_class=_TrainHelpFormatter)
    add_model_args(p)
    p.add_argument("--expert", required=True, action="append", metavar="NAME=DIR",
                   help="a PEFT adapter directory (repeat; NAME defaults to the directory name)")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="JSONL files and/or directories of *.jsonl")
    p.add_argument("--output", required=True, metavar="DIR", help="run / MiXSE directory")
    g = p.add_argument_group("router")
    _config_flag(g, "--router", dest="router", choices=ROUTER_CHOICES,
                 help="shared (one pass), xlora (the paper's two passes), per_layer, intuition (shared, with an "
                      "instance-level prior from the domains' mean embeddings mixed in)")
    _add_intuition_args(g)
    _config_flag(g, "--top-k", dest="top_k", type=int, help="experts per token")
    g.add_argument("--aux-loss", action="append", default=[], metavar="NAME=COEF",
                   help=f"auxiliary router loss: {', '.join(AUX_LOSS_NAMES)} (repeat); concentration: "
                        "ModuleFormer's load concentration (a task on few experts, to prune the rest: selfmoe prune)")
    g.add_argument("--hyper-expert", action="store_true",
                   help="HyperMoE's HyperExpert: the unselected experts' embeddings generate a per-token adapter "
                        "added to the selected experts' output; trains with the router")
    g.add_argument("--hyper-size", action="append", default=[], metavar="NAME=N",
                   help=f"a HyperExpert size (repeat): {', '.join(f'{k}={v}' for k, v in HYPER_DEFAULTS.items())}")
    p.add_argument("--strict", action="store_true",
                   help="refuse experts that declare different base models (default: a warning)")
    _add_train_args(p)
    return p


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
    extra: Dict[str, Any] = {"router": args.router, "top_k": args.top_k, "intuition_clusters": args.intuition_clusters,
                             "intuition_layer": args.intuition_layer}
    if args.router != "intuition" and (args.intuition_clusters is not None or args.intuition_layer is not None):
        raise CLIError("--intuition-clusters / --intuition-layer: only with --router intuition")
    if args.aux_loss:
        extra["aux_loss"] = _key_values(args.aux_loss, "--aux-loss")
    if args.hyper_size and not args.hyper_expert:
        raise CLIError("--hyper-size sets a HyperExpert size: pass --hyper-expert too")
    if args.hyper_expert:
        sizes = _key_values(args.hyper_size, "--hyper-size")
        if any(v != int(v) for v in sizes.values()):
            raise CLIError(f"--hyper-size: sizes are integers, got {sizes}")
        extra["hyper_expert"] = {k: int(v) for k, v in sizes.items()}
    config = _train_config(args, extra)
    model, tok = load_model(args.model, dtype=args.dtype)
    return _run_training(args, f"MiXSE router over {list(experts)}", lambda: train_router(
        model, tok, experts, records, args.output, config, resume=args.resume, overwrite=args.overwrite,
        accelerate=True if args.accelerate else None, device=_device_for_training(args), fsdp=args.fsdp))
