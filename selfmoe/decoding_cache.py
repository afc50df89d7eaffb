"""``decode_cache(model)``: within the block, routed layers settle what their weights decide once.

A decode step calls each routed projection on a handful of tokens, where the per-call work that
depends only on the weights costs as much as the arithmetic: checking their dtypes and layout, making
the views the products multiply by, and for a batched step (2 to ``SMALL_T`` tokens on a CPU) stacking
all experts' B as one ``[E*r, d_out]`` matrix (``torch_path.stack_B``, a copy). Outside this block none
of it can be kept: a write through ``param.data`` leaves the parameter's version counter alone, and a
cache keyed on it would go stale without a sign. A generation does not change the weights, so for its
duration each layer keeps a ``DecodePlan`` (kernels/torch_inference.py) made on its first call; on
the built-in SmolLM2-135M the stacks were about 3% of a batch-16 decode step and the per-call checks
about 2.5% more (benchmarks/NOTES.md, issue 13 item 2). The products are the same bits as without the
block: the very functions, on the very operands (tested).

Inside the block a plan is still checked on every call against the layer's tensors (the same objects
at the same addresses, else a new plan) and its stack against lora_B's version, so a replaced parameter
or an in-place update that torch records (an optimizer step, ``copy_`` under ``no_grad``) is seen; only
writes through ``.data`` into lora_B are not, so do not make them inside the block. Leaving the
outermost block drops every plan it made. selfmoe's own generation (``selfmoe.generate``) runs in this
block; use it around your own decode loop over a MiXSE model::

    with decode_cache(model), torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, List, Optional

import torch
from torch import nn

from selfmoe.kernels.torch_inference import DecodePlan

__all__ = ["decode_cache", "decode_plan", "cached_stacked_B"]


class _Entry:
    """One layer's state while some ``decode_cache`` block holds it."""

    __slots__ = ("depth", "plan")

    def __init__(self) -> None:
        self.depth = 0  # how many open blocks hold the layer (blocks nest)
        self.plan: Optional[DecodePlan] = None  # made on the layer's first call in the block


# Weak keys: a layer dropped inside a block leaves no entry behind for a new object to inherit.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()


def _routed_layers(model: nn.Module) -> List[nn.Module]:
    from .layer import MoLoRALinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"decode_cache: model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MoLoRALinear)]


@contextlib.contextmanager
def decode_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Let the routed layers (``MoLoRALinear``) inside ``model`` keep their decode plans (checks, views,
    stacked B) between calls until the block ends; yields ``model``. A no-op for a model without routed
    layers. Blocks nest: the outermost one drops the plans. Do not write to the layers' ``lora_B`` through
    ``.data`` inside the block (module docstring)."""
    layers = _routed_layers(model)
    for layer in layers:
        entry = _ACTIVE.get(layer)
        if entry is None:
            entry = _ACTIVE[layer] = _Entry()
        entry.depth += 1
    try:
        yield model
    finally:
        for layer in layers:
            entry = _ACTIVE.get(layer)
            if entry is None:
                continue
            entry.depth -= 1
            if entry.depth <= 0:
                del _ACTIVE[layer]


def decode_plan(layer: nn.Module) -> Optional[DecodePlan]:
    """The ``DecodePlan`` of a routed layer held by a ``decode_cache`` block (made on first use, made anew
    when one of its tensors was replaced or moved, or its scaling changed), or None outside a block.
    Which layers may use one (a uniform scaling, no mix-and-match or HyperExpert) is the layer's call."""
    entry = _ACTIVE.get(layer)
    if entry is None:
        return None
    A, B, W, b = _layer_tensors(layer)
    plan = entry.plan
    if plan is None or not plan.holds(A, B, W, b, layer._uniform_scaling):
        plan = entry.plan = DecodePlan(A, B, W, b, layer._uniform_scaling)
    return plan


def _layer_tensors(layer: nn.Module) -> tuple:
    """``(lora_A, lora_B, base weight, base bias)`` as ``layer.lora_A`` ... would return them, read from the
    modules' parameter tables where they are registered there (``Module.__getattr__`` costs about half
    a microsecond per name, and a decode step asks 4 names of 210 layers)."""
    params, base = layer._parameters, layer._modules.get("base_layer")
    base_params = base._parameters if base is not None else {}
    A, B, W = params.get("lora_A"), params.get("lora_B"), base_params.get("weight")
    if A is None or B is None or W is None or "bias" not in base_params:  # not registered there: ask the module
        base = layer.base_layer
        return layer.lora_A, layer.lora_B, base.weight, base.bias
    return A, B, W, base_params["bias"]


def cached_stacked_B(layer: nn.Module) -> Optional[torch.Tensor]:
    """``layer.lora_B`` stacked ``[E*r, d_out]`` (``stack_B``'s bytes) as its ``decode_cache`` plan keeps
    it (made on first use, again when lora_B's version moves), or None outside a block or for a layer
    the plan does not serve (its tensors not all on the CPU in one dtype)."""
    plan = decode_plan(layer)
    if plan is None or not plan.served:
        return None
    return plan.operands()[1]
