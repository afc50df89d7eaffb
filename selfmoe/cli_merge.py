"""``selfmoe merge``: LoRA experts -> one merged adapter (linear / TIES / DARE) or a merged base model."""
from __future__ import annotations

import argparse
import pathlib
from typing import Any, List, Optional

from .choices import MERGE_METHODS
from .cli_common import CLIError, add_command, add_model_args, load_model, say

__all__ = ["MERGE_DESCRIPTION", "MERGE_EPILOG", "_add_merge", "_cmd_merge"]

MERGE_DESCRIPTION = "Weight merging of LoRA experts on their full updates scaling * B @ A."
MERGE_EPILOG = """\
examples:
  # TIES merge of the experts into one LoRA adapter (weight-merging baseline)
  selfmoe merge --expert experts/math --expert experts/coding --method ties --density 0.2 --output merged-ties/

  # DARE, reproducible, merged straight into the base weights (a full model directory)
  selfmoe merge --expert experts/math --expert experts/coding --method dare --drop-rate 0.9 --seed 0 \\
      --into-base --model ./llama-7b --output llama-7b-dare/
"""


def _add_merge(sub: Any) -> argparse.ArgumentParser:
    p = add_command(sub, "merge", help="merge experts (linear/ties/dare) into one adapter or into the base model",
                    description=MERGE_DESCRIPTION, epilog=MERGE_EPILOG)
    p.add_argument("--expert", required=True, action="append", metavar="DIR", help="PEFT adapter directory (repeat)")
    p.add_argument("--method", required=True, choices=MERGE_METHODS)
    p.add_argument("--weights", default=None, help="comma-separated weight per expert (default 1 each)")
    p.add_argument("--density", type=float, default=None, help="TIES: fraction of entries kept (default 0.2)")
    p.add_argument("--drop-rate", type=float, default=None, help="DARE: drop probability (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="DARE masks")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--rank", type=int, default=None,
                   help="adapter output: rank of the factored merge (default: sum of the experts' ranks, exact for linear)")
    p.add_argument("--into-base", action="store_true", help="write the base model with the merge added (needs --model)")
    add_model_args(p, required=False, help="base model for --into-base")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--strict", action="store_true",
                   help="refuse experts that declare different base models (default: a warning)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _floats(text: Optional[str], flag: str) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from .adapters import load_lora_adapter, save_lora_adapter
    from .io_utils import atomic_directory
    from .merging import iter_merged_deltas, lora_approximation_error, merge_into_base, merged_to_lora

    if args.into_base and not args.model:
        raise CLIError("--into-base needs --model (the base model to merge into)")
    adapters = [load_lora_adapter(p) for p in args.expert]
    weights = _floats(args.weights, "--weights")
    if weights is not None and len(weights) != len(adapters):
        raise CLIError(f"--weights has {len(weights)} values for {len(adapters)} experts")
    out = pathlib.Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CLIError(f"--output {out}: exists and is not empty; pass --overwrite to replace it")
    from tqdm.auto import tqdm

    merged = iter_merged_deltas(adapters, args.method, weights, density=args.density, drop_rate=args.drop_rate,
                                seed=args.seed, strict=args.strict)
    n_modules = len(set().union(*(a.weights.keys() for a in adapters)))
    deltas = dict(tqdm(merged, total=n_modules, desc=f"{args.method} merge", unit="module", disable=args.no_progress))
    if args.into_base:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        merge_into_base(model, deltas)
        with atomic_directory(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        say(f"{args.method} merge of {len(adapters)} experts added into {args.model} -> {out}")
        return 0
    rank = args.rank if args.rank is not None else sum(a.r for a in adapters)
    factors = merged_to_lora(deltas, rank)
    base_name = adapters[0].config.get("base_model_name_or_path")
    save_lora_adapter(out, factors, r=rank, lora_alpha=float(rank), base_model_name_or_path=base_name)
    say(f"{args.method} merge of {len(adapters)} experts -> {out} (LoRA rank {rank})")
    error = lora_approximation_error(deltas, factors, rank)
    if error > 1e-4:  # a linear merge at the summed rank is exact; TIES/DARE updates are full-rank in general
        say(f"note: the merged update is not of rank {rank}; as a rank-{rank} LoRA it is approximated (best "
            f"rank-{rank} by SVD, relative error {error:.1%} of the update); --rank R keeps more, --into-base "
            "--model DIR writes the exact merge into the base weights")
    return 0
