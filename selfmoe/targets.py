"""Where LoRA layers go in a Hugging Face causal LM: its decoder layers, its linears, the linears a
``target_modules`` setting picks (PEFT semantics), and which decoder layer holds a module.

Used by :class:`selfmoe.MiXSE` (many experts) and by the single-adapter training layer alike.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["find_decoder_layers", "hidden_size_of", "linear_modules", "match_targets", "layer_index_of", "model_device"]


def find_decoder_layers(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``model.layers`` for Llama/Mistral/Qwen2/Gemma/Phi-3)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "num_hidden_layers", None)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    preferred = [c for c in candidates if c[0].split(".")[-1] in ("layers", "h", "blocks")]
    pick = preferred or candidates
    if not pick:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of "
            f"config.num_hidden_layers={n} blocks (e.g. model.layers)"
        )
    return pick[0]


def hidden_size_of(model: nn.Module) -> int:
    """``config.hidden_size`` of a (possibly multimodal) causal LM: the width a shared router reads."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    size = getattr(cfg, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(model).__name__}.config has no integer hidden_size; cannot size the router")
    return size


def linear_modules(model: nn.Module) -> Dict[str, nn.Linear]:
    """``{path: module}`` for every ``nn.Linear`` of ``model``, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def match_targets(
    linears: Mapping[str, nn.Linear], target_modules: Union[str, Sequence[str]], layers_prefix: str
) -> List[str]:
    """Linear paths selected by ``target_modules`` (PEFT semantics: a list of names matching a path or
    its dot-separated suffix; a string is a full-match regex; ``"all-linear"`` = every linear inside the
    decoder layers). Every listed name must match something, else ``ValueError`` listing the names."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            picked = [p for p in linears if p.startswith(layers_prefix + ".")]
        else:
            try:
                rx = re.compile(target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({exc})") from exc
            picked = [p for p in linears if rx.fullmatch(p)]
        if not picked:
            raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear in the base model")
        return picked
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a list of module names or a regex string, got {target_modules!r}")
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in linears})
    picked = []
    for t in target_modules:
        hits = [p for p in linears if p == t or p.endswith("." + t)]
        if not hits:
            raise ValueError(
                f"target_modules: {t!r} matches no nn.Linear in the base model; linear module names are {leaf_names}"
            )
    wanted = set(target_modules)
    for p in linears:
        if p in wanted or any(p.endswith("." + t) for t in wanted):
            picked.append(p)
    return picked


def layer_index_of(path: str, layers_prefix: str, num_layers: int) -> Optional[int]:
    """Index of the decoder layer holding module ``path``, or None when it is outside the layers."""
    if not path.startswith(layers_prefix + "."):
        return None
    idx = path[len(layers_prefix) + 1:].split(".", 1)[0]
    return int(idx) if idx.isdigit() and int(idx) < num_layers else None


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
