"""A decode loop for one batch (that may share a prompt prefix): finished rows leave the batch at once.

``model.generate`` keeps computing a row after it finished (EOS or a stop string) until the whole
batch is done; on a CPU a decode step costs a fixed part (reading the weights) plus a part per row
(reading that row's KV cache: ~10 ms per row at 700 cached tokens on the built-in model, 2 cores), so
rows that stopped early keep costing until the longest one ends. Here a finished row is dropped from
the batch and its cache (``batch_select_indices``) as soon as it stops.

The prompt prefix that all rows share (if any) runs once (:func:`selfmoe.prefix_cache.prefill_prefix`), then
the rows' own suffixes as one ``[B, S]`` block laid out ``[prefix | pad | suffix]`` with explicit
position ids (:mod:`selfmoe.prefix_cache`), then one token per step. Decoding matches
``generate``: greedy is the argmax; sampling applies temperature, then top-k, then top-p (the order
of transformers' logits warpers) and draws from the global RNG (seeded by the caller).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .prefix_cache import cache_kwarg, last_logits_only, output_cache, prefill_prefix, reserve_capacity, suffix_block

__all__ = ["decode_shared_prefix", "next_tokens", "sampling_scores"]


def sampling_scores(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """``[B, V]`` float32 scores to sample from: logits / temperature, then everything outside the top-k and
    outside the top-p nucleus set to -inf (the order and tie rules of transformers' logits warpers)."""
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int = 0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B]`` next token ids from ``[B, V]`` logits: argmax, or a draw from :func:`sampling_scores`
    (from ``generator``, or the global RNG)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = sampling_scores(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


def _stop_hit(tokenizer: Any, row: List[int], stops: Sequence[str], window: int) -> bool:
    """Whether a stop string ends in the last tokens of ``row`` (it must, if it completed this step)."""
    if not stops:
        return False
    tail = tokenizer.decode(row[-window:], skip_special_tokens=True)
    return any(s in tail for s in stops)


@torch.no_grad()
def decode_shared_prefix(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], prefix_len: int, *,
                         max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, stop: Sequence[str] = (),
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                         top_k: int = 0, on_rows: Optional[Callable[[List[int]], None]] = None
                         ) -> Tuple[List[List[int]], int]:
    """Generate for ``seqs`` (token lists sharing their first ``prefix_len`` tokens, ``prefix_len`` shorter
    than every seq; 0: nothing shared, the rows are simply left-padded). Returns the new tokens of each row
    (EOS included when it ended there; a row that hit a stop string ends with the token that completed it)
    and the row-steps computed. ``on_rows``: told, before the first forward and whenever rows left, which
    rows of ``seqs`` the batch holds, in order (e.g. to keep statistics per row; needs ``prefix_len`` 0,
    since the prefix runs as one row for all)."""
    B = len(seqs)
    if prefix_len < 0 or any(len(s) <= prefix_len for s in seqs):
        raise ValueError(f"prefix_len {prefix_len} must be >= 0 and shorter than every sequence "
                         f"(lengths {sorted(len(s) for s in seqs)[:5]}...)")
    if on_rows is not None and prefix_len:
        raise ValueError(f"on_rows needs prefix_len 0 (got {prefix_len}): a shared prefix runs as one row for all")
    if on_rows is not None:
        on_rows(list(range(B)))
    device = next(model.parameters()).device
    ids, mask, positions = suffix_block(seqs, prefix_len, pad_id, device)
    name = cache_kwarg(model)
    if prefix_len:
        cache = prefill_prefix(model, seqs[0][:prefix_len], B)
        reserve_capacity(cache, mask.shape[1] + max_new_tokens)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **last_logits_only(model), **{name: cache})
    else:  # the model starts its own cache with the block; room to grow is reserved once it holds the prompt
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_logits_only(model))
        cache = output_cache(out)
        reserve_capacity(cache, mask.shape[1] + max_new_tokens)
    kw = {name: cache, "use_cache": True}
    logits = out.logits[:, -1]
    next_pos = torch.as_tensor([len(s) for s in seqs], dtype=torch.long, device=device)

    eos = set(int(e) for e in eos_ids)
    window = max((len(s) for s in stop), default=0) + 2  # tokens are at least a character, but may render as none
    outputs: List[List[int]] = [[] for _ in range(B)]
    alive = list(range(B))  # original row index of each batch row
    row_steps = 0
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
        row_steps += len(alive)
        keep: List[int] = []
        for b, token in enumerate(chosen.tolist()):
            row = outputs[alive[b]]
            row.append(token)
            if token in eos or _stop_hit(tokenizer, row, stop, window):
                continue
            keep.append(b)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):  # drop finished rows from every tensor and the cache
            index = torch.as_tensor(keep, device=device)
            cache.batch_select_indices(index)
            chosen, mask, next_pos = chosen[index], mask[index], next_pos[index]
            alive = [alive[b] for b in keep]
            if on_rows is not None:
                on_rows(list(alive))
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos[:, None], **kw).logits[:, -1]
        next_pos = next_pos + 1
    return outputs, row_steps
