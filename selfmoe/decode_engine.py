"""Continuous batching: rows of many generate requests share one decode batch, and a finished row's
place is refilled at once.

:func:`selfmoe.decode_loop.decode_shared_prefix` runs one batch to its end: as its rows finish the
batch shrinks, and the last long row runs alone. On a CPU a decode step costs a fixed part (reading
the weights, ~65 ms on the built-in model) plus a part per row (~10 ms), so a batch of one costs
nearly what a batch of eight does. Here the batch holds up to ``max_rows`` rows from any submitted
request; when rows finish, queued rows are prefilled and join the running batch before the next step.

Layout. The running batch's KV cache is one ``DynamicCache`` whose layers hold ``[B, H, W, D]``
(views into buffers with room to grow, :mod:`selfmoe.prefix_cache`). Rows of different lengths are
left-padded (zeros, masked out) to the common width ``W``; a joining block is padded to the wider of
the two. Each row keeps its own position ids, so padding never shifts its positions and a row sees
exactly the tokens it would see alone (outputs equal unbatched decoding up to float rounding). After
rows leave, the padding columns that every remaining row has are cut away.

Prefill. A request's prompts are grouped by shared token prefix
(:func:`~selfmoe.prefix_cache.prefix_batches`); a group's prefix runs once (batch 1) and its KV cache
is kept until the last row of the group has joined, so rows that join one or two at a time do not
recompute it. Sampling draws from a ``torch.Generator`` per request seeded from ``SamplingConfig.seed``
(the global RNG when it has none): the draws of a request do not depend on other requests' rows.

The schedule is deterministic: rows join in submission order, and a request's ``on_done`` runs between
steps, so what it submits (e.g. the responses to the instructions just generated) depends only on the
outputs, never on timing.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

from .decode_loop import _stop_hit, next_tokens
from .prefix_cache import (cache_kwarg, common_prefix_length, last_logits_only, output_cache, prefill_prefix,
                           prefix_batches, reserve_capacity, suffix_block)

__all__ = ["DecodeRequest", "ContinuousBatcher"]


@dataclass
class DecodeRequest:
    """Prompts (token lists) to continue with one set of sampling settings.

    ``on_done(rows)`` gets the new tokens of every prompt, in prompt order (EOS included where a row
    ended with it; a row that hit a stop string ends with the token that completed it), once the last
    row finished; it may submit further requests to the same batcher.
    """

    seqs: Sequence[Sequence[int]]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()
    seed: Optional[int] = None
    on_done: Optional[Callable[[List[List[int]]], None]] = None
    outputs: List[List[int]] = field(default_factory=list, init=False)
    left: int = field(default=0, init=False)
    rng: Optional[torch.Generator] = field(default=None, init=False)
    stop_window: int = field(default=0, init=False)


@dataclass
class _Group:
    """Rows of one request waiting to join, sharing ``prefix_len`` prompt tokens (0: nothing shared)."""

    request: DecodeRequest
    rows: List[int]
    prefix_len: int
    prefix_cache: Any = None


class ContinuousBatcher:
    """Decode the rows of submitted :class:`DecodeRequest` s, at most ``max_rows`` at a time (module docstring).

    ``model`` must allow its cache to be handled outside ``generate``
    (:func:`selfmoe.prefix_cache.supports_prefix_cache`); ``prefix_cache``: share the prefill of prompt
    prefixes of at least ``min_shared_prefix`` tokens within a request. ``counters`` (a dict, optional)
    gets ``prefill_tokens``, ``decode_row_steps`` and ``generated_tokens`` added.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_rows: int, eos_ids: Sequence[int], pad_id: int,
                 prefix_cache: bool = True, min_shared_prefix: int = 32, counters: Optional[dict] = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.eos = set(int(e) for e in eos_ids)
        self.pad_id = pad_id
        self.prefix_cache = prefix_cache
        self.min_shared_prefix = min_shared_prefix
        self.counters = counters if counters is not None else {}
        for key in ("prefill_tokens", "decode_row_steps", "generated_tokens"):
            self.counters.setdefault(key, 0)
        self.device = next(model.parameters()).device
        self._cache_name = cache_kwarg(model)
        self._queue: List[_Group] = []
        # The running batch: per row (request, prompt index); the cache, attention mask [B, W], the next
        # position of each row [B], and the logits each row's next token is chosen from [B, V].
        self._rows: List[tuple] = []
        self._cache: Any = None
        self._mask: Optional[torch.Tensor] = None
        self._next_pos: Optional[torch.Tensor] = None
        self._logits: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- requests
    def submit(self, request: DecodeRequest) -> None:
        """Queue ``request``'s prompts behind those already submitted."""
        if not request.seqs:
            raise ValueError("a DecodeRequest needs at least one prompt")
        if any(len(s) == 0 for s in request.seqs):
            raise ValueError("every prompt must have at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        request.outputs = [[] for _ in request.seqs]
        request.left = len(request.seqs)
        # Tokens decoded to look for a stop string: each is at least a character, but may render as none.
        request.stop_window = max((len(stop) for stop in request.stop), default=0) + 2
        if request.do_sample and request.seed is not None:
            request.rng = torch.Generator(device=self.device)
            request.rng.manual_seed(int(request.seed))
        if self.prefix_cache and len(request.seqs) > 1:
            batches = prefix_batches(request.seqs, len(request.seqs), self.min_shared_prefix)
        else:  # longest first, as HFGenerator batches: similar lengths join together
            batches = [sorted(range(len(request.seqs)), key=lambda i: -len(request.seqs[i]))]
        for rows in batches:
            shared = common_prefix_length([request.seqs[i] for i in rows]) if self.prefix_cache and len(rows) > 1 else 0
            self._queue.append(_Group(request, list(rows), shared if shared >= self.min_shared_prefix else 0))

    @torch.no_grad()
    def run(self) -> None:
        """Decode until every submitted request (and every request their ``on_done`` submits) is done."""
        try:
            while self._queue or self._rows:
                self._admit()
                chosen = self._choose()
                finished = self._append(chosen)
                if finished:
                    keep = [b for b in range(len(self._rows)) if b not in finished]
                    done = self._drop(finished, keep)
                    chosen = chosen[torch.as_tensor(keep, dtype=torch.long, device=self.device)] if keep else None
                    for request in done:  # between steps: what they submit joins at the next admission
                        if request.on_done is not None:
                            request.on_done(request.outputs)
                if self._rows:
                    self._step(chosen)
        finally:  # an error or Ctrl-C mid-run: nothing half-done stays queued for a later run
            self._queue.clear()
            self._rows, self._cache, self._mask, self._next_pos, self._logits = [], None, None, None, None

    # ---------------------------------------------------------------- one step
    def _choose(self) -> torch.Tensor:
        """``[B]`` the next token of every running row: greedy rows by argmax, sampled rows per request."""
        chosen = self._logits.argmax(dim=-1)
        by_request: dict = {}
        for b, (request, _) in enumerate(self._rows):
            if request.do_sample:
                by_request.setdefault(id(request), (request, []))[1].append(b)
        for request, rows in by_request.values():
            index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
            chosen[index] = next_tokens(self._logits[index], do_sample=True, temperature=request.temperature,
                                        top_p=request.top_p, top_k=request.top_k, generator=request.rng)
        return chosen

    def _append(self, chosen: torch.Tensor) -> set:
        """Append each row's token; returns the batch positions of the rows that finished."""
        self.counters["decode_row_steps"] += len(self._rows)
        finished = set()
        for b, token in enumerate(chosen.tolist()):
            request, i = self._rows[b]
            row = request.outputs[i]
            row.append(token)
            self.counters["generated_tokens"] += 1
            if (token in self.eos or len(row) >= request.max_new_tokens
                    or _stop_hit(self.tokenizer, row, request.stop, request.stop_window)):
                finished.add(b)
        return finished

    def _step(self, chosen: torch.Tensor) -> None:
        """One forward of every running row with its chosen token."""
        B = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((B, 1))], dim=1)
        out = self.model(input_ids=chosen[:, None], attention_mask=self._mask, position_ids=self._next_pos[:, None],
                         use_cache=True, **{self._cache_name: self._cache})
        self._logits = out.logits[:, -1]
        self._next_pos = self._next_pos + 1

    # ---------------------------------------------------------------- rows leaving
    def _drop(self, finished: set, keep: List[int]) -> List[DecodeRequest]:
        """Take the finished rows out of the batch (and the padding columns all others have); returns the
        requests that have no row left."""
        done = []
        for b in sorted(finished):
            request, _ = self._rows[b]
            request.left -= 1
            if request.left == 0:
                done.append(request)
        if not keep:
            self._rows, self._cache, self._mask, self._next_pos, self._logits = [], None, None, None, None
            return done
        index = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask[index]
        # Columns that are padding for every remaining row (leading zeros) are cut: attention over them is waste.
        lead = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        self._mask = mask[:, lead:]
        self._rows = [self._rows[b] for b in keep]
        self._next_pos = self._next_pos[index]
        self._logits = self._logits[index]
        _restack(self._cache, [(index, lead)], self._mask.shape[1], self._room())
        return done

    def _room(self) -> int:
        """Cache columns to reserve beyond the current width: the most tokens a running row may still add."""
        return max((request.max_new_tokens - len(request.outputs[i]) for request, i in self._rows), default=0) + 1

    # ---------------------------------------------------------------- rows joining
    def _admit(self) -> None:
        """Prefill queued rows into the free places of the batch."""
        while self._queue and len(self._rows) < self.max_rows:
            group = self._queue[0]
            take = group.rows[: self.max_rows - len(self._rows)]
            group.rows = group.rows[len(take):]
            if not group.rows:
                self._queue.pop(0)
            self._join(group, take)

    def _join(self, group: _Group, rows: List[int]) -> None:
        request = group.request
        seqs = [request.seqs[i] for i in rows]
        ids, mask, positions = suffix_block(seqs, group.prefix_len, self.pad_id, self.device)
        self.counters["prefill_tokens"] += ids.numel()
        if group.prefix_len:
            if group.prefix_cache is None:  # kept until the group's last row joined
                group.prefix_cache = prefill_prefix(self.model, seqs[0][: group.prefix_len], 1)
                self.counters["prefill_tokens"] += group.prefix_len
            cache = copy.deepcopy(group.prefix_cache)
            if len(rows) > 1:
                cache.batch_repeat_interleave(len(rows))
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **last_logits_only(self.model), **{self._cache_name: cache})
        else:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **last_logits_only(self.model))
            cache = output_cache(out)
        logits = out.logits[:, -1]
        next_pos = torch.as_tensor([len(s) for s in seqs], dtype=torch.long, device=self.device)
        new_rows = [(request, i) for i in rows]
        if not self._rows:
            self._cache, self._mask, self._next_pos, self._logits, self._rows = cache, mask, next_pos, logits, new_rows
            if not reserve_capacity(cache, mask.shape[1] + self._room()):
                raise TypeError(f"{type(self.model).__name__}'s KV cache has layers other than plain DynamicLayer: "
                                "continuous batching cannot reshape it")
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._rows = self._rows + new_rows
        _merge(self._cache, cache, width, self._room())
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)], dim=0)
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self._logits = torch.cat([self._logits, logits.to(self._logits.dtype)])


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, W]`` mask padded with zeros on the left to ``[B, width]``."""
    return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], dim=1) if width > mask.shape[1] else mask


def _restack(cache: Any, parts: Sequence[tuple], width: int, room: int) -> None:
    """Rebuild every layer of ``cache`` from ``parts``: ``(index, lead)`` (rows of this cache, ``None``: all;
    first column kept) or ``(other_cache, None)`` (all its rows and columns); each part right-aligned in ``width`` columns, zeros to its left, with
    ``room`` columns reserved after. A single ``(index, lead)`` part selects rows and cuts leading columns."""
    for n, layer in enumerate(cache.layers):
        blocks_k, blocks_v = [], []
        for part, lead in parts:
            if lead is None:
                other = part.layers[n]
                blocks_k.append(other.keys)
                blocks_v.append(other.values)
            elif part is None:  # every row, in order: no gather
                blocks_k.append(layer.keys[:, :, lead:])
                blocks_v.append(layer.values[:, :, lead:])
            else:
                blocks_k.append(layer.keys[part][:, :, lead:])
                blocks_v.append(layer.values[part][:, :, lead:])
        B = sum(k.shape[0] for k in blocks_k)
        shape = list(blocks_k[0].shape)
        shape[0], shape[2] = B, width + room
        key_buffer = blocks_k[0].new_empty(shape)
        value_buffer = blocks_v[0].new_empty(shape)
        start = 0
        for k, v in zip(blocks_k, blocks_v):
            b, pad = k.shape[0], width - k.shape[2]
            # Padding is masked out, but must be finite: a masked column still meets 0 * value in attention.
            key_buffer[start:start + b, :, :pad].zero_()
            value_buffer[start:start + b, :, :pad].zero_()
            key_buffer[start:start + b, :, pad:width].copy_(k)
            value_buffer[start:start + b, :, pad:width].copy_(v)
            start += b
        layer._key_buffer, layer._value_buffer = key_buffer, value_buffer
        layer.keys, layer.values = key_buffer[:, :, :width], value_buffer[:, :, :width]


def _merge(cache: Any, joining: Any, width: int, room: int) -> None:
    """Append the rows of ``joining`` (a filled cache) to ``cache``, both right-aligned in ``width`` columns."""
    _restack(cache, [(None, 0), (joining, None)], width, room)
