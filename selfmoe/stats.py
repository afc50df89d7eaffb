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

Summaries over layers (:func:`overall_shares`, :meth:`RoutingStats.overall`, :func:`routing_overview`,
:func:`format_routing_overview`) work on the plain dicts of :meth:`RoutingStats.summary` (and of
``summary.json``): an expert's share is its statistic averaged over every key, weighted by each key's
token count, so a model with 30 layers is described by one row of E numbers per task or domain.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

__all__ = ["RoutingStats", "RowGroupedStats", "overall_shares", "routing_overview", "format_routing_overview"]

#: A per-key summary: ``{key: {"tokens": int, "usage": {expert: float}, "mean_gate": ..., "mean_prob": ...}}``.
PerKey = Mapping[str, Mapping[str, Any]]


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

    def overall(self, stat: str = "usage") -> Dict[str, float]:
        """``{expert: share}``: ``stat`` averaged over every key, token-weighted (see :func:`overall_shares`)."""
        return overall_shares(self.summary(), stat)

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


# ----------------------------------------------------------------------------------------------------
# Summaries over layers, on plain dicts (RoutingStats.summary() or summary.json)


def _weighted(per_key: PerKey, stat: str) -> tuple:
    sums: Dict[str, float] = {}
    weight = 0.0
    for entry in per_key.values():
        values = entry.get(stat)
        if not values:
            continue
        t = float(entry.get("tokens", 0))
        weight += t
        for name, v in values.items():
            sums[name] = sums.get(name, 0.0) + float(v) * t
    return sums, weight


class RowGroupedStats:
    """Routing statistics kept apart for groups of batch rows: one :class:`RoutingStats` per group
    (:attr:`groups`), so that prompts of several groups (e.g. benchmark domains) can share a batch.

    Before each forward whose batch composition changed, :meth:`set_rows` says which group each batch
    row belongs to; a router call then adds each row to its group's counters. It stands wherever a
    :class:`RoutingStats` is updated (:meth:`selfmoe.MiXSE.routing_stats_by_rows`).
    """

    def __init__(self, expert_names: Sequence[str], num_groups: int) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
        self.groups: List[RoutingStats] = [RoutingStats(expert_names) for _ in range(num_groups)]
        self._rows: Optional[torch.Tensor] = None  # [B] group of each batch row

    def set_rows(self, groups: Optional[Sequence[int]]) -> None:
        """The group of each row of the coming forwards (``None``: unknown; an update then fails)."""
        if groups is not None and any(not 0 <= int(g) < len(self.groups) for g in groups):
            raise ValueError(f"row groups must lie in [0, {len(self.groups)}), got {list(groups)[:8]}")
        self._rows = None if groups is None else torch.as_tensor([int(g) for g in groups], dtype=torch.long)

    @torch.no_grad()
    def update(self, key: str, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
               probs: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> None:
        """:meth:`RoutingStats.update` of each row's group (the gates' first dim is the batch row)."""
        rows = self._rows
        if rows is None:
            raise RuntimeError("RowGroupedStats: a router ran before set_rows() said which group each batch row is in")
        if expert_ids.dim() < 2 or expert_ids.shape[0] != rows.numel():
            raise RuntimeError(f"RowGroupedStats: gates {list(expert_ids.shape)} for {rows.numel()} batch rows "
                               "(row-grouped statistics need [B, ..., k] gates)")
        rows = rows.to(expert_ids.device)
        for g in torch.unique(rows).tolist():  # a handful of groups per batch, never a loop over tokens
            sel = (rows == g).nonzero().squeeze(1)
            self.groups[g].update(key, expert_ids.index_select(0, sel), expert_weights.index_select(0, sel),
                                  None if probs is None else probs.index_select(0, sel),
                                  None if mask is None else mask.index_select(0, sel))


def overall_shares(per_key: PerKey, stat: str = "usage") -> Dict[str, float]:
    """``{expert: share}`` over every key (layer) of one summary: ``stat`` (``usage``, ``mean_gate`` or
    ``mean_prob``) weighted by each key's token count. Experts in the summary's order; all 0 without tokens."""
    sums, weight = _weighted(per_key, stat)
    return {name: (s / weight if weight else 0.0) for name, s in sums.items()}


def _tokens(per_key: PerKey) -> int:
    """Tokens one group read: every key counts the same tokens (the largest count, should they differ)."""
    return max((int(e.get("tokens", 0)) for e in per_key.values()), default=0)


def routing_overview(by_task: Mapping[str, PerKey], by_domain: Optional[Mapping[str, PerKey]] = None, *,
                     stat: str = "usage") -> Dict[str, Any]:
    """Per-expert shares overall, per task and per domain, from per-layer summaries (what
    ``summary.json`` holds under ``routing`` and ``routing_domains``)::

        {"stat": "usage", "experts": [...], "overall": {"tokens": n, "shares": {expert: share}},
         "tasks": {task: {"tokens": n, "shares": {...}}}, "domains": {...}}

    ``overall`` weighs every task's keys by their tokens (domains cover the same tokens again, so they
    are not added in). ``domains`` is present only when ``by_domain`` is given.
    """
    experts: List[str] = []
    for group in list(by_task.values()) + list((by_domain or {}).values()):
        for entry in group.values():
            for name in entry.get(stat) or {}:
                if name not in experts:
                    experts.append(name)

    def row(per_key: PerKey) -> Dict[str, Any]:
        shares = overall_shares(per_key, stat)
        return {"tokens": _tokens(per_key), "shares": {e: shares.get(e, 0.0) for e in experts}}

    total_sums: Dict[str, float] = {}
    total_weight = 0.0
    for per_key in by_task.values():
        sums, weight = _weighted(per_key, stat)
        total_weight += weight
        for name, v in sums.items():
            total_sums[name] = total_sums.get(name, 0.0) + v
    overall = {"tokens": sum(_tokens(p) for p in by_task.values()),
               "shares": {e: (total_sums.get(e, 0.0) / total_weight if total_weight else 0.0) for e in experts}}
    out: Dict[str, Any] = {"stat": stat, "experts": experts, "overall": overall,
                           "tasks": {name: row(p) for name, p in by_task.items()}}
    if by_domain:
        out["domains"] = {name: row(p) for name, p in by_domain.items()}
    return out


_SHADES = " .:-=+*#%@"  # 0-10 % ... 90-100 %: a text heat map that survives any terminal and log file


def _shade(share: float) -> str:
    return _SHADES[min(len(_SHADES) - 1, max(0, int(share * len(_SHADES))))]


def format_routing_overview(overview: Mapping[str, Any]) -> str:
    """A compact text table of :func:`routing_overview`: rows = tasks, then domains, then overall;
    columns = tokens and one per expert, each share in percent followed by a shade character
    (`` .:-=+*#%@``, blank below 10 %, ``@`` from 90 %) so the table reads as a heat map."""
    experts = list(overview.get("experts") or [])
    stat = overview.get("stat", "usage")
    what = {"usage": "% of token-slots", "mean_gate": "mean gate, %", "mean_prob": "mean router probability, %"}
    lines = [f"routing: {what.get(stat, stat)} per expert, all layers (token-weighted)"]
    sections = [("task", overview.get("tasks") or {})]
    if overview.get("domains"):
        sections.append(("domain", overview["domains"]))
    rows: List[List[str]] = []
    for _, groups in sections:
        for name, r in groups.items():
            rows.append([str(name), str(r.get("tokens", ""))] +
                        [f"{100 * r['shares'].get(e, 0.0):5.1f} {_shade(r['shares'].get(e, 0.0))}" for e in experts])
        rows.append([])  # a rule after each section
    ov = overview.get("overall") or {"tokens": "", "shares": {}}
    rows.append(["overall", str(ov.get("tokens", ""))] +
                [f"{100 * ov['shares'].get(e, 0.0):5.1f} {_shade(ov['shares'].get(e, 0.0))}" for e in experts])
    head = ["/".join(s for s, _ in sections), "tokens"] + experts
    width = [max(len(r[i]) for r in rows + [head] if r) for i in range(len(head))]

    def fmt(r: List[str]) -> str:
        if not r:
            return "-" * (sum(width) + 2 * (len(width) - 1))
        return "  ".join([f"{r[0]:<{width[0]}}"] + [f"{c:>{width[i + 1]}}" for i, c in enumerate(r[1:])])

    lines += [fmt(head)] + [fmt(r) for r in rows]
    return "\n".join(lines)
