"""``selfmoe prune``: a MiXSE directory -> a smaller one without the experts a task hardly routes to."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any, Dict, Optional

from .choices import PROMPT_FORMATS
from .cli_common import CLIError, add_command, add_model_args, default_device, load_model, say

__all__ = ["PRUNE_DESCRIPTION", "PRUNE_EPILOG", "_add_prune", "_cmd_prune"]

PRUNE_DESCRIPTION = ("Drop experts from a MiXSE (ModuleFormer's pruning): those whose share of the routed "
                     "token-slots on some data is below a threshold, all but the most used ones, or all but the "
                     "named ones. The rest is unchanged; tokens that never used a dropped expert give the same "
                     "outputs as before.")
PRUNE_EPILOG = """\
examples:
  # route the task's data through the MiXSE, drop experts under 5% of the token-slots
  selfmoe prune --model ./llama-7b --mixse mixse/ --data data/math.jsonl --min-share 0.05 --output mixse-math/

  # keep the two most used experts, from statistics written by `selfmoe generate --routing-stats-json`
  selfmoe prune --model ./llama-7b --mixse mixse/ --stats routing.json --top-n 2 --output mixse-2/

  # keep these experts by name
  selfmoe prune --model ./llama-7b --mixse mixse/ --keep math --keep coding --output mixse-mc/

Shares are averaged over all layers, weighted by tokens (the `overall` row of --routing-stats). Train
the router with `--aux-loss concentration=0.01` first to gather a task on few experts.
"""


def _add_prune(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "prune", help="drop rarely routed experts from a MiXSE -> a smaller MiXSE directory",
                    description=PRUNE_DESCRIPTION, epilog=PRUNE_EPILOG)
    add_model_args(p)
    p.add_argument("--mixse", required=True, metavar="DIR", help="MiXSE directory to prune (left as it is)")
    p.add_argument("--output", required=True, metavar="DIR", help="the pruned MiXSE directory")
    which = p.add_argument_group("which experts stay")
    which.add_argument("--keep", action="append", default=[], metavar="NAME", help="keep this expert (repeat)")
    which.add_argument("--min-share", type=float, default=None, help="drop experts below this share (0..1)")
    which.add_argument("--top-n", type=int, default=None, help="keep the N most used experts")
    src = p.add_argument_group("routing statistics (for --min-share / --top-n)")
    src.add_argument("--data", nargs="+", default=None, metavar="PATH",
                     help="JSONL records (instruction, input, output) to route; prompt and response both count")
    src.add_argument("--stats", default=None, metavar="FILE",
                     help="per-layer statistics JSON from `selfmoe generate --routing-stats-json`")
    src.add_argument("--stat", choices=("usage", "mean_gate", "mean_prob"), default="usage",
                     help="usage: share of token-slots; mean_gate / mean_prob: mean gate / router probability")
    src.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto", help="how --data records are encoded")
    src.add_argument("--max-length", type=int, default=1024, help="tokens per --data record")
    src.add_argument("--batch-size", type=int, default=8, help="--data records per forward")
    p.add_argument("--drop-normalizer", action="store_true",
                   help="also drop the pruned experts' router rows from the softmax (gates then change)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _read_stats(path: str) -> Dict[str, Any]:
    from .io_utils import read_json_object

    p = pathlib.Path(path)
    if not p.is_file():
        raise CLIError(f"--stats {p}: file not found")
    return read_json_object(p, missing=f"--stats {p}: file not found")


def _route_data(model: Any, tok: Any, args: argparse.Namespace) -> Any:
    """Routing statistics of ``--data`` through ``model`` (no grad, padding not counted)."""
    import torch
    from tqdm.auto import tqdm

    from .data import SFTCollator, SFTDataset
    from .prompt_format import resolve_prompt_format
    from .train import load_records

    records = load_records(args.data)
    try:
        fmt = resolve_prompt_format(args.prompt_format, tok)
    except ValueError as exc:
        raise CLIError(f"--prompt-format: {exc}") from None
    dataset = SFTDataset(records, tok, max_length=args.max_length, prompt_format=fmt)
    if not len(dataset):
        raise CLIError(f"--data: no record fits --max-length {args.max_length}")
    collate = SFTCollator.for_tokenizer(tok)
    device = next(model.parameters()).device
    with torch.no_grad(), model.routing_stats() as stats:
        for start in tqdm(range(0, len(dataset), args.batch_size), desc="route", unit="batch", disable=args.no_progress):
            batch = collate([dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))])
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return stats


def _cmd_prune(args: argparse.Namespace) -> int:
    by_share = args.min_share is not None or args.top_n is not None
    if bool(args.keep) == by_share:
        raise CLIError("pass --keep NAME (repeat), or --min-share and/or --top-n")
    if by_share and (args.data is None) == (args.stats is None):
        raise CLIError("--min-share / --top-n need routing statistics: pass --data PATH or --stats FILE (one of them)")
    if not by_share and (args.data or args.stats):
        raise CLIError("--data / --stats choose experts by share: use them with --min-share or --top-n, not --keep")
    out = pathlib.Path(args.output)
    if out.exists() and not args.overwrite:
        raise CLIError(f"--output {out}: exists; pass --overwrite to replace it")
    if pathlib.Path(args.mixse).resolve() == out.resolve():
        raise CLIError("--output must differ from --mixse (the input stays as it is)")
    stats: Optional[Any] = _read_stats(args.stats) if args.stats else None
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device or default_device())
    from .model import MiXSE
    from .pruning import expert_shares
    from .stats import format_routing_overview, routing_overview

    mixse = MiXSE.from_pretrained(args.mixse, model)
    if args.data:
        stats = _route_data(mixse, tok, args).summary()
    if stats is not None:
        say(format_routing_overview(routing_overview({"data": stats}, stat=args.stat)))
        expert_shares(stats, mixse.expert_names, args.stat)  # a mismatch fails here, before anything changes
    before = mixse.expert_names
    dropped = mixse.prune_experts(args.keep or None, min_share=args.min_share, top_n=args.top_n, stats=stats,
                                  stat=args.stat, keep_normalizer=not args.drop_normalizer)
    mixse.save_pretrained(out, overwrite=True)
    say(f"pruned {len(before)} -> {len(mixse.expert_names)} experts (dropped {dropped or 'none'}; kept "
        f"{mixse.expert_names}) -> {out}")
    return 0
