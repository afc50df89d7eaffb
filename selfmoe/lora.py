"""A single LoRA adapter on a causal LM: :class:`LoRALinear` (PEFT's plain LoRA around one ``nn.Linear``)
and putting it on and off a model — fresh for training (:func:`add_lora`), loaded from a saved PEFT adapter
(:func:`attach_lora_adapter`), taken off again (:func:`remove_lora`), its weights read out
(:func:`lora_weights`).

This is the expert being trained (no router: one expert's gate is always 1) and the way one trained
expert is run on its own; :class:`selfmoe.layer.MoLoRALinear` is the many-experts layer.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import LoRAAdapter, load_lora_adapter
from .io_utils import PathLike
from .layer import BaseLayerProxy
from .targets import find_decoder_layers, linear_modules, match_targets

__all__ = ["LoRALinear", "add_lora", "attach_lora_adapter", "remove_lora", "lora_weights"]


class LoRALinear(BaseLayerProxy, nn.Module):
    """``y = base_layer(x) + scaling * B @ A @ dropout(x)``, PEFT's plain LoRA (same init, same forward).

    ``lora_A [r, in]`` (kaiming-uniform, a=sqrt(5)) and ``lora_B [out, r]`` (zeros) are float32 by
    default whatever the base dtype (as PEFT's ``autocast_adapter_dtype``): bf16 adapters lose their
    small updates. ``base_layer`` is frozen; :func:`remove_lora` puts it back.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                 scaling: Optional[float] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.scaling = float(scaling) if scaling is not None else self.lora_alpha / self.r
        dev = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, base_layer.in_features, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, self.r, dtype=dtype, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def unwrap(self) -> nn.Linear:
        for n, p in self.base_layer.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling}"


def add_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
             target_modules: Union[str, Sequence[str]] = "all-linear") -> Dict[str, LoRALinear]:
    """Wrap the target linears of a causal LM in :class:`LoRALinear`, in place; freeze everything else.

    ``target_modules`` follows PEFT: ``"all-linear"`` (every ``nn.Linear`` in the decoder layers, not
    ``lm_head``), names matching a module path or its dot-suffix, or a full-match regex. Returns
    ``{module path: LoRALinear}``; :func:`remove_lora` undoes it.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds LoRALinear modules; remove_lora() first")
    prefix, _ = find_decoder_layers(model)
    linears = linear_modules(model)
    paths = match_targets(linears, target_modules, prefix)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model._selfmoe_lora_flags = flags  # restored by remove_lora
    out: Dict[str, LoRALinear] = {}
    for path in paths:
        layer = LoRALinear(linears[path], r, lora_alpha, lora_dropout)
        model.set_submodule(path, layer)
        out[path] = layer
    return out


def attach_lora_adapter(model: nn.Module, adapter: Union[PathLike, LoRAAdapter]) -> Dict[str, LoRALinear]:
    """Put a saved PEFT LoRA adapter on ``model`` (in place, frozen): what :func:`~selfmoe.train.train_expert`
    trained, as it was trained (each module with its own rank and scaling). Undo with :func:`remove_lora`."""
    ad = adapter if isinstance(adapter, LoRAAdapter) else load_lora_adapter(adapter)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds LoRALinear modules; remove_lora() first")
    linears = linear_modules(model)
    missing = [p for p in ad.weights if p not in linears]
    if missing:
        raise ValueError(f"adapter modules {missing[:5]} are not nn.Linear modules of {type(model).__name__}")
    for path, (A, B) in ad.weights.items():  # every check before the first module is replaced
        base = linears[path]
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
            raise ValueError(f"adapter module {path!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit "
                             f"the base linear [{base.in_features} -> {base.out_features}]")
    model._selfmoe_lora_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out: Dict[str, LoRALinear] = {}
    for path, (A, B) in ad.weights.items():
        layer = LoRALinear(linears[path], A.shape[0], ad.alpha_for(path), scaling=ad.scaling_for(path), dtype=A.dtype)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.requires_grad_(False)
        model.set_submodule(path, layer)
        out[path] = layer
    return out


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original linears back (same objects) and restore the ``requires_grad`` flags."""
    for path, m in [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]:
        model.set_submodule(path, m.unwrap())
    flags = getattr(model, "_selfmoe_lora_flags", None)
    if flags is not None:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        del model._selfmoe_lora_flags
    return model


def lora_weights(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A [r, in], B [out, r])}`` of every :class:`LoRALinear` in ``model`` (CPU copies)."""
    return {p: (m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone())
            for p, m in model.named_modules() if isinstance(m, LoRALinear)}
