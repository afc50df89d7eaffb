"""``decode_cache(model)``: within the block, routed layers keep their stacked expert B between calls.

A batched decode step (2 to ``SMALL_T`` tokens on a CPU) multiplies each routed projection's gated rank
columns by all experts' B stacked as one ``[d_out, E*r]`` matrix (``torch_path.stack_B``). The stack
is a copy of the layer's ``lora_B``, made on every call: outside this block it cannot be kept, because
a write through ``param.data`` leaves the parameter's version counter alone, and a cache keyed on it
would go stale without a sign. A generation does not change the weights, so for its duration the stack
is built once per layer and reused; on the built-in SmolLM2-135M at batch 16 the copies were about 3%
of a decode step (benchmarks/NOTES.md, issue 13 item 2). The products are the same bits as without
the block: the very stack ``stack_B`` returns, in the very ops (tested).

Inside the block the cached stack is still keyed on the ``lora_B`` tensor, its storage and its
version, so a replaced parameter or an in-place update that torch records (an optimizer step,
``copy_`` under ``no_grad``) builds a fresh one; only writes through ``.data`` are not seen, so do not
make them inside the block. Leaving the outermost block drops every stack it made. selfmoe's own
generation (``selfmoe.generate``) runs in this block; use it around your own decode loop over a MiXSE
model::

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

from selfmoe.kernels.torch_path import stack_B

__all__ = ["decode_cache", "cached_stacked_B"]


class _Entry:
    """One layer's state while some ``decode_cache`` block holds it."""

    __slots__ = ("depth", "source", "key", "stacked")

    def __init__(self) -> None:
        self.depth = 0  # how many open blocks hold the layer (blocks nest)
        # The lora_B tensor stacked was built from, held so that its memory cannot be handed to a new
        # tensor while the entry lives (a replaced parameter at the same address would match the key).
        self.source: Optional[torch.Tensor] = None
        self.key: Optional[tuple] = None  # source's (address, version) when stacked was built
        self.stacked: Optional[torch.Tensor] = None  # [d_out, E*r]


# Weak keys: a layer dropped inside a block leaves no entry behind for a new object to inherit.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()


def _routed_layers(model: nn.Module) -> List[nn.Module]:
    from .layer import MoLoRALinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"decode_cache: model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MoLoRALinear)]


@contextlib.contextmanager
def decode_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Let the routed layers (``MoLoRALinear``) inside ``model`` keep their stacked B between calls
    until the block ends; yields ``model``. A no-op for a model without routed layers. Blocks nest:
    the outermost one drops the stacks. Do not write to the layers' ``lora_B`` through ``.data`` inside
    the block (module docstring)."""
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


def cached_stacked_B(layer: nn.Module) -> Optional[torch.Tensor]:
    """``layer.lora_B`` stacked ``[d_out, E*r]`` (``stack_B``'s bytes) when a ``decode_cache`` block holds
    ``layer``, built on first use and again whenever ``lora_B`` is another tensor or its storage or
    version moves; else None."""
    entry = _ACTIVE.get(layer)
    if entry is None:
        return None
    B = layer.lora_B
    key = (B.data_ptr(), B._version)
    if entry.source is not B or entry.key != key:
        with torch.no_grad():
            entry.stacked = stack_B(B.detach())
        entry.source, entry.key = B, key
    return entry.stacked
