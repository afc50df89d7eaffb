"""Routing statistics: which experts the router picks, per layer, collected only when asked for.

A :class:`RoutingStats` is handed to the routers for the duration of a ``with model.routing_stats()``
block (see :class:`selfmoe.MiXSE`); outside such a block the routers hold ``None`` and pay one
attribute check per call. Sums stay on the device as float64 ``[E]`` tensors (no host sync per call);
Python numbers are made only when :meth:`RoutingStats.summary` is read.

Definitions, per key (a decoder layer for the shared router, a linear module for per-layer routers,
``"xlora"`` for the X-LoRA classifier whose gates are the same for every layer), over the counted
tokens (padding excluded when an attention mask is known):

- ``usage[e]``: fraction of the token-slots (``tokens * top_k``) routed to expert e; sums to 1.
- ``mean_gate[e]``: mean gate of expert e over all tokens, 0 where e was not selected; sums to 1 only
  with ``renormalize=True`` or ``top_k = E``.
- ``mean_prob[e]``: mean router probability (softmax over all experts, before top-k); sums to 1.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["RoutingStats"]


class RoutingStats:
    """Per-key, per-expert routing counters.

    Args:
        expert_names: names of the E experts, in router-output order.
    """

    def __init__(self, expert_names: Sequence[str]) -> None:
        self.expert_names: List[str] = list(expert_names)
        self._slots: Dict[str, torch.Tensor] = {}  # key -> [E] float64 token-slot counts
        self._gates: Dict[str, torch.Tensor] = {}  # key -> [E] float64 sum of gates
        self._probs: Dict[str, torch.Tensor] = {}  # key -> [E] float64 sum of probabilities
        self._tokens: Dict[str, torch.Tensor] = {}  # key -> [] float64 token count

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def keys(self) -> List[str]:
        """Keys seen so far, in first-seen order (model order for a forward pass)."""
        return list(self._slots)

    @torch.no_grad()
    def update(
        self,
        key: str,
        expert_ids: torch.Tensor,
        expert_weights: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one router call.

        Args:
            key: layer/module name the gates belong to.
            expert_ids: ``[..., k]`` int ids in ``[0, E)``.
            expert_weights: ``[..., k]`` gates.
            probs: optional ``[..., E]`` router probabilities (before top-k).
            mask: optional ``[...]`` bool, True for tokens to count (e.g. not padding).
        """
        E = self.num_experts
        k = expert_ids.shape[-1]
        ids = expert_ids.reshape(-1, k).long()
        w = expert_weights.reshape(-1, k).double()
        device = ids.device
        if mask is not None:
            m = mask.reshape(-1).to(device=device, dtype=torch.float64)  # [T]
        else:
            m = torch.ones(ids.shape[0], dtype=torch.float64, device=device)
        slot_w = m[:, None].expand(-1, k)  # [T, k]
        slots = torch.zeros(E, dtype=torch.float64, device=device).index_add_(0, ids.reshape(-1), slot_w.reshape(-1))
        gates = torch.zeros(E, dtype=torch.float64, device=device).index_add_(0, ids.reshape(-1), (w * slot_w).reshape(-1))
        if probs is not None:
            p = (probs.reshape(-1, E).double() * m[:, None]).sum(0)
        else:
            p = None
        if key not in self._slots:
            self._slots[key] = torch.zeros(E, dtype=torch.float64, device=device)
            self._gates[key] = torch.zeros(E, dtype=torch.float64, device=device)
            self._tokens[key] = torch.zeros((), dtype=torch.float64, device=device)
        self._slots[key] += slots
        self._gates[key] += gates
        self._tokens[key] += m.sum()
        if p is not None:
            if key not in self._probs:
                self._probs[key] = torch.zeros(E, dtype=torch.float64, device=device)
            self._probs[key] += p

    def reset(self) -> None:
        """Forget everything counted so far."""
        self._slots.clear()
        self._gates.clear()
        self._probs.clear()
        self._tokens.clear()

    def usage(self) -> Dict[str, torch.Tensor]:
        """``{key: [E] float64}`` fraction of token-slots per expert (sums to 1 per key)."""
        return {k: v / v.sum().clamp_min(1) for k, v in self._slots.items()}

    def mean_gate(self) -> Dict[str, torch.Tensor]:
        """``{key: [E] float64}`` mean gate per expert over the counted tokens."""
        return {k: v / self._tokens[k].clamp_min(1) for k, v in self._gates.items()}

    def mean_prob(self) -> Dict[str, torch.Tensor]:
        """``{key: [E] float64}`` mean router probability per expert (keys with learned routing only)."""
        return {k: v / self._tokens[k].clamp_min(1) for k, v in self._probs.items()}

    def usage_matrix(self) -> torch.Tensor:
        """``[num_keys, E]`` usage fractions, rows in :meth:`keys` order (for heatmaps)."""
        u = self.usage()
        if not u:
            return torch.zeros(0, self.num_experts, dtype=torch.float64)
        return torch.stack([u[k].cpu() for k in self.keys()])

    def summary(self) -> Dict[str, Dict[str, object]]:
        """Plain-Python view: ``{key: {"tokens": int, "usage": {expert: float}, "mean_gate": {...}, "mean_prob": {...}}}``."""
        usage, gate, prob = self.usage(), self.mean_gate(), self.mean_prob()
        out: Dict[str, Dict[str, object]] = {}
        for key in self.keys():
            entry: Dict[str, object] = {
                "tokens": int(self._tokens[key].item()),
                "usage": dict(zip(self.expert_names, usage[key].tolist())),
                "mean_gate": dict(zip(self.expert_names, gate[key].tolist())),
            }
            if key in prob:
                entry["mean_prob"] = dict(zip(self.expert_names, prob[key].tolist()))
            out[key] = entry
        return out
