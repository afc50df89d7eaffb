"""The training loss: next-token cross-entropy on response tokens only (labels of -100 are ignored), summed
(:func:`token_loss_sum`; the loop divides by the effective batch's response tokens) or averaged over a
set of records (:func:`evaluate_loss`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, LengthGroupedBatchSampler, Record, SFTCollator, SFTDataset
from .targets import model_device

__all__ = ["token_loss_sum", "response_tokens_per_example", "evaluate_loss"]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over positions whose label is not -100."""
    shifted = logits[:, :-1, :]
    target = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def response_tokens_per_example(dataset: SFTDataset) -> np.ndarray:
    """How many tokens of each example the loss counts (labels after the first that are not -100)."""
    return np.asarray([int(np.count_nonzero(np.asarray(ex["labels"][1:]) != IGNORE_INDEX)) for ex in dataset.examples],
                      dtype=np.int64)


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokenizer: Any, records: Sequence[Record], *, max_length: int = 1024,
                  batch_size: int = 8, prompt_format: str = "auto") -> float:
    """Mean per-token response loss of ``model`` on ``records`` (eval mode, no gradients), the records
    encoded in ``prompt_format`` (``auto``/``chat``/``alpaca``, as in training)."""
    ds = SFTDataset(records, tokenizer, max_length=max_length, prompt_format=prompt_format)
    collate = SFTCollator.for_tokenizer(tokenizer)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for idx in LengthGroupedBatchSampler(ds.lengths, batch_size, shuffle=False):
            batch = {k: v.to(device) for k, v in collate([ds[i] for i in idx]).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            total += float(token_loss_sum(out.logits, batch["labels"]))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss: the records hold no response tokens")
    return total / count
