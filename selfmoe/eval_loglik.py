"""Log-likelihood scoring: summed log-probabilities of continuations given prompts, from batched forward
passes (no generation). ``selfmoe eval --mc-scoring loglik`` scores each option letter of a
multiple-choice record with it (the way lm-evaluation-harness scores MMLU's letters)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .data import encode_prompt
from .generate import BatchedRunner

__all__ = ["LoglikScorer"]


class LoglikScorer(BatchedRunner):
    """Summed log-probabilities of continuations given prompts, from batched forward passes (no
    generation): what ``mc_scoring="loglik"`` runs.

    Each prompt is encoded like a generation prompt (:func:`selfmoe.data.encode_prompt`: BOS, never a
    trailing EOS); a continuation's ids are those that follow the prompt's when prompt + continuation is
    encoded as one text (the ids a model would produce after this prompt), or its own encoding when the
    tokenizer merges across the boundary. One row per distinct ``prompt + continuation[:-1]``: when every
    continuation is a single token (option letters, usually), the prompt alone is one row and all of
    them are read off its last position. Rows are left-padded (position ids from the attention mask, as
    in generation), ``batch_size`` per forward, longest first; log-softmax in float64; only the last
    positions' logits are computed when the model takes ``logits_to_keep``.

    ``model``: a causal LM (a base model, one with a LoRA adapter attached, or a :class:`selfmoe.MiXSE`:
    routing statistics see every row's tokens, padding excluded).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, progress: bool = False) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, progress=progress)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # masked out: any id will do
        self._keep = _takes_logits_to_keep(model)

    def _continuation_ids(self, prompt: str, prompt_ids: List[int], continuation: str) -> List[int]:
        full = encode_prompt(self.tokenizer, prompt + continuation)
        if len(full) > len(prompt_ids) and full[:len(prompt_ids)] == prompt_ids:
            return full[len(prompt_ids):]
        ids = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        return ids

    def score(self, prompts: Sequence[str], continuations: Sequence[Sequence[str]], *,
              desc: Optional[str] = None) -> List[Dict[str, float]]:
        """For each prompt, ``{continuation: summed log-probability}`` of each of its continuations."""
        import torch
        from tqdm.auto import tqdm

        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuation lists")
        rows: List[List[int]] = []
        targets: List[List[Tuple[int, str, List[int]]]] = []  # per row: (request, continuation, its ids)
        for r, (prompt, conts) in enumerate(zip(prompts, continuations)):
            p_ids = encode_prompt(self.tokenizer, prompt)
            if not p_ids:
                raise ValueError(f"prompt {r} encodes to no tokens (an empty prompt without BOS cannot be continued)")
            seen: Dict[Tuple[int, ...], int] = {}
            for c in conts:
                c_ids = self._continuation_ids(prompt, p_ids, c)
                key = tuple(p_ids + c_ids[:-1])
                if key not in seen:
                    seen[key] = len(rows)
                    rows.append(list(key))
                    targets.append([])
                targets[seen[key]].append((r, c, c_ids))
        out: List[Dict[str, float]] = [{} for _ in prompts]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: an OOM shows up at once
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(rows), desc=desc or "loglik", disable=not self.progress, unit="seq", leave=False)
        try:
            with torch.no_grad():
                for b in range(0, len(order), self.batch_size):
                    batch = order[b:b + self.batch_size]
                    width = max(len(rows[i]) for i in batch)
                    keep = max(len(c_ids) for i in batch for _, _, c_ids in targets[i])
                    ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for j, i in enumerate(batch):
                        ids[j, width - len(rows[i]):] = torch.as_tensor(rows[i], dtype=torch.long)
                        mask[j, width - len(rows[i]):] = 1
                    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
                    kwargs: Dict[str, Any] = {"logits_to_keep": keep} if self._keep else {}
                    res = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     position_ids=position_ids.to(device), **kwargs)
                    logits = res.logits if hasattr(res, "logits") else res[0]
                    last = logits[:, -keep:].double().log_softmax(-1).cpu()  # [B, keep, V]
                    for j, i in enumerate(batch):
                        for r, c, c_ids in targets[i]:
                            n = len(c_ids)
                            lp = last[j, keep - n:].gather(-1, torch.as_tensor(c_ids, dtype=torch.long)[:, None]).sum()
                            value = float(lp)
                            if math.isnan(value):
                                raise FloatingPointError(f"the model's log-probabilities are NaN for prompt {r}")
                            out[r][c] = value
                    bar.update(len(batch))
        finally:
            bar.close()
            self.model.train(was_training)
        return out


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether ``model(...)`` accepts ``logits_to_keep`` (transformers' causal LMs do; a MiXSE passes it on)."""
    import inspect

    from .model import MiXSE

    target = model.base_model if isinstance(model, MiXSE) else model
    try:
        return "logits_to_keep" in inspect.signature(target.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
