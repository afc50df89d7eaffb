"""Shared-prefix prefill for batched generation: a prompt prefix common to a batch is run once.

Few-shot prompts of one batch often start with the same hundreds of tokens (the same system prompt and
the same examples; :mod:`selfmoe.specialization` builds its batches that way). Running that prefix
once at batch size 1, repeating its KV cache over the batch and letting ``generate`` continue from it
turns ``B x (P + S)`` prefill tokens into ``P + B x S``.

The batch is laid out as ``[prefix | padding | suffix_i]``: the padding sits between the shared
prefix and each row's own suffix, masked out, so every row still ends at the last column (where a
decoder-only model continues) and its positions run on without a gap (``generate`` derives position
ids from the attention mask's cumulative sum). Rows therefore see exactly the tokens they would see
alone: the outputs equal unbatched generation up to float rounding (tests/test_prefix_cache.py).
"""
from __future__ import annotations

import inspect
from typing import Any, List, Sequence, Tuple

import torch

__all__ = ["common_prefix_length", "suffix_block", "last_logits_only", "prefill_prefix", "cache_kwarg", "output_cache", "supports_prefix_cache",
           "prefix_batches", "cache_layers_are_plain"]


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of ``seqs`` share, capped one short of the shortest
    sequence (the last prompt token must run with the rest of its row to give the next-token logits)."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = min(n, _shared(seqs[0], s))
    return max(n, 0)


def suffix_block(seqs: Sequence[Sequence[int]], prefix_len: int, pad_id: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' own tokens after a shared ``prefix_len``-token prefix, as one left-padded block.

    Returns ``input_ids [B, W]`` (``W`` = the longest suffix), ``attention_mask [B, prefix_len + W]``
    laid out ``[prefix | pad | suffix]`` (pads 0) and ``position_ids [B, W]`` that continue each row's
    prefix without a gap. ``seqs`` must share their first ``prefix_len`` tokens and be longer than it.
    """
    width = max(len(s) for s in seqs) - prefix_len
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    positions = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s) - prefix_len
        ids[i, width - n:] = torch.as_tensor(list(s[prefix_len:]), dtype=torch.long)
        mask[i, prefix_len + width - n:] = 1
        positions[i, width - n:] = torch.arange(prefix_len, len(s))
    return ids.to(device), mask.to(device), positions.to(device)


def _forward_owner(model: Any) -> Any:
    """The module whose ``forward`` signature decides the keyword names: a MiXSE passes every argument
    through to the model it wraps."""
    return model.base_model if hasattr(model, "mixse_config") and hasattr(model, "base_model") else model


def cache_kwarg(model: Any) -> str:
    """The name under which ``model``'s forward (and so ``generate``) takes its KV cache: ``cache`` from
    transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(_forward_owner(model).forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def last_logits_only(model: Any) -> dict:
    """Forward kwargs that make ``model`` compute the logits of the last position only, where it can."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(_forward_owner(model).forward).parameters else {}


# MiXSE router kinds whose routing depends on the current token alone (no state kept per sequence or per
# cache), so that a cache may be repeated over rows or have rows dropped: not X-LoRA's paired scaling cache.
_STATELESS_ROUTERS = ("shared", "per_layer")


def supports_prefix_cache(model: Any) -> bool:
    """Whether ``model``'s KV cache may be handled outside ``generate``: repeated over a batch (a shared
    prefix) and shrunk when rows finish (:mod:`selfmoe.decode_loop`). True for a plain transformers causal
    LM (adapters put on with :func:`selfmoe.lora.attach_lora_adapter` included) and for a MiXSE over one
    whose router keeps no per-sequence state (``shared``, ``per_layer``); False for X-LoRA routing (its
    scaling pass keeps a cache of its own), an intuition prior (kept per cache), PEFT wrappers and anything
    else."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if hasattr(model, "mixse_config"):
        try:
            config = model.mixse_config
        except Exception:  # noqa: BLE001 - an unloaded MiXSE or a foreign object: not ours to drive
            return False
        # An intuition prior is kept per KV cache and per row (selfmoe.intuition): not ours to reshape either.
        if config.router not in _STATELESS_ROUTERS or getattr(config, "intuition", None) is not None:
            return False
        model = model.base_model
    if not isinstance(model, PreTrainedModel) or getattr(model.config, "is_encoder_decoder", False):
        return False
    if hasattr(model, "peft_config") or hasattr(model, "mixse_config"):
        return False
    return True


def cache_layers_are_plain(model: Any) -> bool:
    """Whether every layer of ``model``'s KV cache would be a plain ``DynamicLayer`` (no sliding window, no
    quantization): what :mod:`selfmoe.decode_engine` needs to pad, merge and cut rows of the cache itself."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=_forward_owner(model).config)
    except Exception:  # noqa: BLE001 - a transformers without per-layer caches, or a config it cannot read
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def prefill_prefix(model: Any, prefix: Sequence[int], batch_size: int) -> Any:
    """Run ``prefix`` once (batch 1) and return its KV cache repeated ``batch_size`` times, ready to pass
    to ``generate`` under :func:`cache_kwarg`. Only the last position's logits are computed when the
    model allows it (the prefix's logits are never used)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(prefix)], dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **last_logits_only(model))
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(model).__name__} returned no repeatable KV cache ({type(cache).__name__})")
    if batch_size > 1:
        cache.batch_repeat_interleave(batch_size)
    return cache


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_batches(encoded: Sequence[Sequence[int]], batch_size: int, min_shared_prefix: int) -> List[List[int]]:
    """Prompt indices in batches of at most ``batch_size`` that keep shared prefixes together.

    Prompts are sorted by their tokens, so those sharing a prefix are neighbours, and cut into groups
    where the prefix two neighbours share falls below half of what a neighbouring pair shares (a pair
    sharing ``>= min_shared_prefix`` tokens): few-shot prompts built in groups with the same examples
    (:mod:`selfmoe.specialization`) then give one group each, instead of batches that straddle two
    groups and share only the system prompt. Each group is split into batches of ``batch_size``.
    """
    order = sorted(range(len(encoded)), key=lambda i: list(encoded[i]))
    # adjacent[j]: tokens prompts order[j-1] and order[j] share (adjacent[0] unused)
    adjacent = [0] + [_shared(encoded[order[j - 1]], encoded[order[j]]) for j in range(1, len(order))]
    groups: List[List[int]] = []
    for j, i in enumerate(order):
        if j > 0:
            neighbours = max(adjacent[j - 1] if j > 1 else 0, adjacent[j + 1] if j + 1 < len(order) else 0)
            if not (neighbours >= min_shared_prefix and 2 * adjacent[j] < neighbours):
                groups[-1].append(i)
                continue
        groups.append([i])
    return [g[k:k + batch_size] for g in groups for k in range(0, len(g), batch_size)]


def _reserved_layer_class() -> Any:
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views into buffers with room to grow: appending a
        token writes in place instead of ``torch.cat`` reallocating and copying the whole layer cache
        (measured: 69% of a decode step of the built-in model at batch 8 and 700 cached tokens)."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self._key_buffer.shape[-2]:  # out of room: grow by doubling (amortised O(1) per token)
                self._grow(2 * (n + m))
            self._key_buffer[:, :, n:n + m].copy_(key_states)
            self._value_buffer[:, :, n:n + m].copy_(value_states)
            self.keys = self._key_buffer[:, :, :n + m]
            self.values = self._value_buffer[:, :, :n + m]
            return self.keys, self.values

        def _grow(self, capacity: int) -> None:
            n = self.keys.shape[-2]
            shape = list(self.keys.shape)
            shape[-2] = capacity
            key_buffer = self.keys.new_empty(shape)
            value_buffer = self.values.new_empty(shape)
            key_buffer[:, :, :n].copy_(self.keys)
            value_buffer[:, :, :n].copy_(self.values)
            self._key_buffer, self._value_buffer = key_buffer, value_buffer
            self.keys, self.values = key_buffer[:, :, :n], value_buffer[:, :, :n]

        def batch_repeat_interleave(self, repeats: int) -> None:  # not used after reserving; kept correct
            super().batch_repeat_interleave(repeats)
            self._grow(self._key_buffer.shape[-2])

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self._grow(self._key_buffer.shape[-2])

        def crop(self, *args: Any, **kwargs: Any) -> None:
            super().crop(*args, **kwargs)
            self._grow(self._key_buffer.shape[-2])

    return ReservedLayer


_RESERVED: Any = None


def reserve_capacity(cache: Any, length: int) -> bool:
    """Give every layer of a filled ``DynamicCache`` room for ``length`` tokens, so that generation
    appends in place. Returns False (and leaves the cache as it is) unless every layer is a plain
    ``DynamicLayer`` of this transformers version (sliding-window or quantized layers keep their own
    update rules)."""
    global _RESERVED
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers without cache layers
        return False
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", False)
                         or getattr(layer, "keys", None) is None or layer.keys.dim() != 4 for layer in layers):
        return False
    if _RESERVED is None:
        _RESERVED = _reserved_layer_class()
    for layer in layers:
        layer.__class__ = _RESERVED
        layer._grow(max(length, layer.keys.shape[-2]))
    return True
