"""Token-level routers over LoRA experts, the gate hand-off between modules, and optional router losses.

Three router placements are supported by :class:`selfmoe.MiXSE` (the math is the same
:class:`TopKRouter` each time, only where it reads its input and who uses its gates differ):

- ``"shared"``: one router for the whole model (Self-MoE's "one linear layer shared across all LoRA
  layers"). It reads each decoder layer's input hidden state; the gates are computed once per layer
  and handed to every LoRA linear of that layer through a :class:`GateSlot`. One forward pass.
- ``"xlora"``: the paper's actual implementation (PEFT X-LoRA): an adapter-free scaling pass, the
  router on its final hidden states, then the real pass with those gates in every layer. Two passes.
- ``"per_layer"``: one router per LoRA linear, reading that linear's own input (MoLoRA / MixLoRA).

Gates: ``top_k(softmax(W h + b))`` (Self-MoE keeps the raw probabilities; ``renormalize=True`` rescales
the kept ones to sum to 1, as MixLoRA/HyperMoE do). ``mode="random"`` draws the logits from N(0, 1)
per token instead (the paper's random-routing ablation), keeping the same top-k/gate semantics.

Router losses (off by default: Self-MoE trains the router on the LM loss alone) are recorded per
router call and combined by :func:`compute_aux_loss`; see :data:`AUX_LOSSES`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from selfmoe.kernels import route_topk
from selfmoe.kernels.topk import softmax_topk

from .choices import ROUTER_KINDS, ROUTING_MODES, check_aux_loss  # defined once, torch-free (the CLI offers them too)
from .stats import RoutingStats

__all__ = [
    "ROUTER_KINDS",
    "ROUTING_MODES",
    "AUX_LOSSES",
    "RouterOutput",
    "RouterState",
    "GateSlot",
    "TopKRouter",
    "check_aux_loss",
    "check_top_k",
    "load_balancing_loss",
    "router_z_loss",
    "mutual_information_loss",
    "load_concentration_loss",
    "compute_aux_loss",
]


def check_top_k(top_k: object, num_experts: int, where: str = "top_k") -> int:
    """Return ``top_k`` if it is an int in ``[1, num_experts]``, else raise ``ValueError`` naming it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"{where} must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    return top_k


class RouterOutput(NamedTuple):
    """One router call: ``weights [..., k]`` float32, ``ids [..., k]`` int64, ``logits [..., E]`` float32
    (``None`` for random routing)."""

    weights: torch.Tensor
    ids: torch.Tensor
    logits: Optional[torch.Tensor]


class GateSlot:
    """Gates computed once and read by several :class:`~selfmoe.MoLoRALinear` modules.

    The shared router fills one slot per decoder layer (in a forward pre-hook); the X-LoRA router fills
    one slot for the whole model. MiXSE clears the slots when the model's forward ends, except under
    gradient checkpointing: transformers then recomputes the layer body during backward *without*
    re-running module hooks, and the recomputation must read the gates of that same forward. (So, with
    gradient checkpointing, run backward before the next forward, as the usual training loop does.)

    ``bypass`` switches the experts off for every module reading the slot (X-LoRA's scaling pass).
    """

    __slots__ = ("name", "ids", "weights", "bypass", "memo")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ids: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.bypass = False
        # What the readers derive from these gates alone (e.g. the dense per-expert gates of a decode
        # step), computed by the first reader and reused by the rest; emptied whenever the gates change.
        self.memo: Dict[Any, torch.Tensor] = {}

    def set(self, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """Store one router call's gates, in the order the router returns them: ``(weights, ids)``."""
        self.weights, self.ids = weights, ids
        self.memo = {}

    def clear(self) -> None:
        self.ids = self.weights = None
        self.memo = {}

    def get(self, requester: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(weights, ids)`` of the current forward; ``requester`` is named in the error when empty."""
        if self.ids is None or self.weights is None:
            raise RuntimeError(
                f"{requester}: no gates in slot {self.name!r}. Its router runs in a forward pre-hook of "
                f"{self.name!r}: call the module through that parent (or the whole model), or pass "
                "expert_ids= and expert_weights= explicitly."
            )
        return self.weights, self.ids


# ----------------------------------------------------------------------------------------------------
# Router losses. Each takes one router call's logits [..., E] (and ids [..., k]) plus an optional token
# mask [...] (True = count the token), and returns a float32 scalar.


def _flat(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    E = logits.shape[-1]
    lg = logits.reshape(-1, E).float()
    if mask is None:
        m = torch.ones(lg.shape[0], dtype=torch.float32, device=lg.device)
    else:
        m = mask.reshape(-1).to(device=lg.device, dtype=torch.float32)
    return lg, m


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``x [T, ...]`` weighted by ``m [T]``."""
    m_ = m.reshape(-1, *([1] * (x.dim() - 1)))
    return (x * m_).sum(0) / m.sum().clamp_min(1.0)


def load_balancing_loss(logits: torch.Tensor, expert_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``: f = fraction of token-slots sent to e
    (not differentiable), P = mean router probability of e. Equals 1 for perfectly balanced routing."""
    lg, m = _flat(logits, mask)
    E = lg.shape[-1]
    ids = expert_ids.reshape(lg.shape[0], -1)
    k = ids.shape[-1]
    probs = torch.softmax(lg, dim=-1)
    sel = torch.zeros_like(probs).scatter_add_(1, ids, torch.full(ids.shape, 1.0 / k, device=lg.device))
    f = _masked_mean(sel, m)
    P = _masked_mean(probs, m)
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor, expert_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_tokens(logsumexp(logits)^2)``: keeps logits small and stable."""
    lg, m = _flat(logits, mask)
    return _masked_mean(torch.logsumexp(lg, dim=-1).square(), m)


def _usage_entropy(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``H(mean_x p(e|x))`` of probabilities ``p [T, E]`` over the tokens weighted by ``m [T]``."""
    mean_p = _masked_mean(p, m)  # [E]
    return -(mean_p * torch.log(mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny))).sum()


def mutual_information_loss(logits: torch.Tensor, expert_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ModuleFormer ``L_MI = -H(mean_x p(e|x)) + mean_x H(p(e|x))``: balanced usage, confident tokens."""
    lg, m = _flat(logits, mask)
    logp = torch.log_softmax(lg, dim=-1)
    p = logp.exp()
    token_entropy = -(p * logp).sum(-1)  # [T]
    return -_usage_entropy(p, m) + _masked_mean(token_entropy, m)


def load_concentration_loss(logits: torch.Tensor, expert_ids: Optional[torch.Tensor] = None,
                            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ModuleFormer's load concentration loss ``L_conc = H(mean_x p(e|x))``, minimised when fine-tuning on
    one task: the task's tokens gather on few experts, so the rest can be pruned
    (:meth:`selfmoe.MiXSE.prune_experts`). 0 when every token puts all its mass on one expert, ``log E``
    for uniform usage. ``logits [..., E]``, ``mask [...]`` (True = count the token); float32 scalar."""
    lg, m = _flat(logits, mask)
    return _usage_entropy(torch.softmax(lg, dim=-1), m)


AUX_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "load_balancing": load_balancing_loss,
    "z_loss": router_z_loss,
    "mutual_information": mutual_information_loss,
    "concentration": load_concentration_loss,
}


def compute_aux_loss(records: Sequence[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]], coefficients: Dict[str, float]) -> torch.Tensor:
    """``sum_name coef * mean_over_calls(loss_name(call))`` over recorded ``(logits, ids, mask)`` calls.

    Returns a float32 scalar; 0 when nothing was recorded (random routing, or no forward yet).
    """
    if not records or not coefficients:
        device = records[0][0].device if records else None
        return torch.zeros((), dtype=torch.float32, device=device)
    total = None
    for name, coef in coefficients.items():
        fn = AUX_LOSSES[name]
        value = torch.stack([fn(lg, ids, m) for lg, ids, m in records]).mean() * coef
        total = value if total is None else total + value
    return total


class RouterState:
    """Per-model switches shared by all routers of one :class:`~selfmoe.MiXSE`; everything is off
    (``None`` / empty) unless asked for, so a router call pays two attribute checks.

    Attributes:
        stats: the active :class:`~selfmoe.stats.RoutingStats`, or None.
        aux_coefficients: ``{loss name: coefficient}``; empty = no records kept.
        aux_records: ``(logits, ids, mask)`` of each router call of the current forward.
        attention_mask: the 2-D attention mask of the current forward (to skip padding), or None.
        prior: the intuition prior ``[B, E]`` of the current forward's sequences (routers with a
            ``prior_logit`` mix it in; see :mod:`selfmoe.intuition`), or None.
    """

    def __init__(self) -> None:
        self.stats: Optional[RoutingStats] = None
        self.aux_coefficients: Dict[str, float] = {}
        self.aux_records: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
        self.attention_mask: Optional[torch.Tensor] = None
        self.prior: Optional[torch.Tensor] = None

    @property
    def active(self) -> bool:
        return self.stats is not None or bool(self.aux_coefficients)

    def begin_forward(self, attention_mask: Optional[torch.Tensor]) -> None:
        """Called at the start of each (outer) model forward."""
        self.aux_records = []
        am = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        self.attention_mask = am

    def token_mask(self, lead: torch.Size) -> Optional[torch.Tensor]:
        """Bool ``[B, S]`` mask for router inputs with leading dims ``(B, S)``: the last S columns of the
        attention mask (with a KV cache the mask also covers the past tokens)."""
        am = self.attention_mask
        if am is None or len(lead) != 2 or am.shape[0] != lead[0] or am.shape[1] < lead[1]:
            return None
        return am[:, am.shape[1] - lead[1]:].bool()

    def record(self, key: str, gates: RouterOutput, lead: torch.Size) -> None:
        mask = self.token_mask(lead)
        if self.stats is not None:
            probs = torch.softmax(gates.logits.float(), dim=-1) if gates.logits is not None else None
            self.stats.update(key, gates.ids, gates.weights, probs, mask)
        if self.aux_coefficients and gates.logits is not None:
            self.aux_records.append((gates.logits, gates.ids, mask))


class PrunedRows(nn.Module):
    """Router rows of pruned experts (``weight [P, d]``, ``bias [P]``, frozen buffers saved with the router):
    they only normalise the softmax, so the kept experts' gates stay what they were before pruning."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())


class TopKRouter(nn.Module):
    """``top_k(softmax(linear(h)))`` over ``num_experts`` experts.

    Args:
        in_features: width of the hidden state the router reads.
        num_experts: E.
        top_k: experts per token, ``1 <= top_k <= E`` (``top_k = E``: dense, "all experts").
        renormalize: rescale the kept probabilities to sum to 1 (Self-MoE: False).
        mode: ``"learned"`` or ``"random"`` (logits ~ N(0, 1) per token; the linear is then unused).
        bias: give the router a bias (X-LoRA's classifier has one; it also lets :meth:`add_expert`
            start a new expert closed).
        dtype: parameter dtype; float32 by default (the hidden state is cast to it: routing decisions in
            bf16 flip on rounding noise).

    ``forward(h [..., in_features], key=None) -> RouterOutput(weights [..., k], ids [..., k], logits [..., E])``.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int = 1,
        *,
        renormalize: bool = False,
        mode: str = "learned",
        bias: bool = True,
        dtype: Optional[torch.dtype] = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        check_top_k(top_k, num_experts)
        if mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
        self.top_k = top_k
        self.renormalize = bool(renormalize)
        self.mode = mode
        self.linear = nn.Linear(in_features, num_experts, bias=bias, dtype=dtype, device=device)
        if bias:
            nn.init.zeros_(self.linear.bias)
        # Set by MiXSE; None for a standalone router (no stats, no aux records).
        self.state: Optional[RouterState] = None
        # The rows of pruned experts, kept only to normalise the softmax (see prune_experts); None if none.
        self.pruned: Optional[PrunedRows] = None
        # Intuition routing (enable_prior): the learned mixing weight's logit, w = sigmoid(prior_logit).
        self.prior_logit: Optional[nn.Parameter] = None

    def enable_prior(self, init_logit: float = 0.0) -> None:
        """Mix an instance-level prior into the gates: ``R = softmax(W h) * w + prior * (1 - w)``, top-k of R,
        with ``w = sigmoid(prior_logit)`` learned (a new parameter, ``prior_logit``, saved with the router).
        The prior ``[B, E]`` comes from ``state.prior`` on each call (set by MiXSE, :mod:`selfmoe.intuition`)."""
        if self.prior_logit is None:
            w = self.linear.weight
            self.prior_logit = nn.Parameter(torch.full((), float(init_logit), dtype=torch.float32, device=w.device))

    @property
    def num_experts(self) -> int:
        return self.linear.out_features

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def num_pruned(self) -> int:
        """How many pruned experts' rows still normalise the softmax (0: none)."""
        return 0 if self.pruned is None else self.pruned.weight.shape[0]

    def extra_repr(self) -> str:
        pruned = f", normalising over {self.num_pruned} pruned experts" if self.pruned is not None else ""
        prior = ", intuition_prior=True" if self.prior_logit is not None else ""
        return f"top_k={self.top_k}, renormalize={self.renormalize}, mode={self.mode!r}{pruned}{prior}"

    def _kept_mass(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``[..., 1]`` float32: the probability mass of the kept experts in a softmax that also counts the
        pruned ones, ``sigmoid(lse(kept logits) - lse(pruned logits))``. route_topk's gates (a softmax over
        the kept experts) times this are the gates the router gave before pruning."""
        pr = self.pruned
        pruned_logits = F.linear(hidden.to(device=pr.weight.device, dtype=pr.weight.dtype), pr.weight, pr.bias)
        lse_kept = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        lse_pruned = torch.logsumexp(pruned_logits.float(), dim=-1, keepdim=True)
        return torch.sigmoid(lse_kept - lse_pruned)

    @torch.no_grad()
    def prune(self, keep: Sequence[int], *, keep_normalizer: bool = True) -> None:
        """Keep the experts ``keep`` (indices, in the new order) and drop the other rows.

        ``keep_normalizer=True``: the dropped rows move to :attr:`pruned` (frozen buffers, never selected),
        where they still count in the softmax's denominator, so a token whose top-k holds only kept experts
        gets exactly its old gates. ``False``: they are gone; the softmax then runs over the kept experts
        only (the gates of ``renormalize=True`` routers are the same either way).
        """
        E = self.num_experts
        keep = list(keep)
        if not keep or any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E for e in keep) \
                or len(set(keep)) != len(keep):
            raise ValueError(f"keep must be distinct expert indices in [0, {E}), at least one, got {keep}")
        check_top_k(self.top_k, len(keep), "top_k (experts per token) after pruning")
        old = self.linear
        idx = torch.tensor(keep, dtype=torch.long, device=old.weight.device)
        new = nn.Linear(old.in_features, len(keep), bias=old.bias is not None, dtype=old.weight.dtype,
                        device=old.weight.device)
        new.weight.copy_(old.weight.index_select(0, idx))
        if old.bias is not None:
            new.bias.copy_(old.bias.index_select(0, idx))
        new.requires_grad_(old.weight.requires_grad)
        if keep_normalizer:
            dropped = torch.tensor([e for e in range(E) if e not in set(keep)], dtype=torch.long, device=idx.device)
            if dropped.numel():
                w = old.weight.detach().index_select(0, dropped)
                b = (old.bias.detach().index_select(0, dropped) if old.bias is not None
                     else w.new_zeros(dropped.numel()))
                if self.pruned is not None:
                    w, b = torch.cat([self.pruned.weight, w]), torch.cat([self.pruned.bias, b])
                self.pruned = PrunedRows(w, b)
        else:
            self.pruned = None
        self.linear = new

    def reserve_pruned(self, count: int) -> None:
        """Zero :attr:`pruned` rows for ``count`` pruned experts, to be filled by ``load_state_dict``."""
        w = self.linear.weight
        self.pruned = PrunedRows(w.new_zeros(count, w.shape[1]), w.new_zeros(count)) if count else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` float logits of the learned router."""
        linear = self.linear
        w = linear.weight
        if hidden.dtype != w.dtype or hidden.device != w.device:  # a model split over devices shares one router
            hidden = hidden.to(device=w.device, dtype=w.dtype)
        return F.linear(hidden, w, linear.bias)

    def forward(self, hidden: torch.Tensor, key: Optional[str] = None) -> RouterOutput:
        if hidden.shape[-1] != self.in_features:
            raise ValueError(
                f"router expects hidden states [..., {self.in_features}], got {list(hidden.shape)}"
                + (f" (at {key})" if key else "")
            )
        if self.mode == "random":
            logits = torch.randn(*hidden.shape[:-1], self.num_experts, device=self.linear.weight.device, dtype=torch.float32)
            weights, ids = route_topk(logits, self.top_k, self.renormalize)
            gates = RouterOutput(weights, ids, None)
        elif self.prior_logit is not None:
            gates = self._with_prior(self.logits(hidden), key)
        else:
            logits = self.logits(hidden)
            if logits.is_cuda:  # route_topk picks its fused kernel there
                weights, ids = route_topk(logits, self.top_k, self.renormalize)
            else:  # route_topk's own torch body, without re-checking the top_k its setters checked
                weights, ids = softmax_topk(logits, self.top_k, self.renormalize)
            if self.pruned is not None and not self.renormalize:
                weights = weights * self._kept_mass(hidden, logits).to(weights.dtype)
            gates = RouterOutput(weights, ids, logits)
        state = self.state
        if state is not None and key is not None and state.active:
            state.record(key, gates, hidden.shape[:-1])
        return gates

    def _with_prior(self, logits: torch.Tensor, key: Optional[str]) -> RouterOutput:
        """Top-k of ``softmax(logits) * w + prior * (1 - w)``; the returned logits are ``log R`` (their
        softmax is R again, so router losses and statistics see the mixed distribution)."""
        from .intuition import mix_with_prior

        prior = self.state.prior if self.state is not None else None
        if prior is None:
            raise RuntimeError(
                f"router{f' at {key}' if key else ''} mixes an intuition prior, but none was computed for this "
                "forward: call it through its MiXSE (which embeds each sequence first)")
        mixed = mix_with_prior(torch.softmax(logits.float(), dim=-1), prior, self.prior_logit)  # [..., E], sums to 1
        weights, ids = mixed.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return RouterOutput(weights, ids, torch.log(mixed.clamp_min(torch.finfo(mixed.dtype).tiny)))

    @torch.no_grad()
    def add_expert(self, init_logit: Optional[float] = None) -> None:
        """Grow the router by one output; existing rows keep their exact values.

        ``init_logit=None``: the new weight row is drawn like ``nn.Linear``'s default init and its bias is
        0, so the new expert competes from the start. A float: weight row 0 and bias ``init_logit``, so a
        very negative value starts the expert closed (the model's outputs are unchanged until the router
        learns to open it; note a closed expert also gets almost no gradient).
        """
        old = self.linear
        E, d = old.out_features, old.in_features
        new = nn.Linear(d, E + 1, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
        new.weight[:E] = old.weight
        if init_logit is None:
            bound = 1.0 / math.sqrt(d)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
            new.weight[E].uniform_(-bound, bound)
        else:
            new.weight[E].zero_()
        if old.bias is not None:
            new.bias[:E] = old.bias
            new.bias[E] = 0.0 if init_logit is None else float(init_logit)
        elif init_logit is not None:
            raise ValueError("add_expert(init_logit=...) needs a router with a bias")
        new.weight.requires_grad_(old.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        self.linear = new
