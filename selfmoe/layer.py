"""``MoLoRALinear``: a drop-in ``nn.Linear`` replacement carrying E LoRA experts behind a token router.

``y = base_layer(x) + sum_j g_j * s[e_j] * B[e_j] @ A[e_j] @ x`` for the top-k experts ``e_j`` of each
token with gates ``g_j``; computed in one fused call of :func:`selfmoe.kernels.lora_mix` (base GEMM and
all experts together, Triton on CUDA via ``backend="auto"``).

Experts of different rank live in one stacked tensor zero-padded to the largest rank; each expert keeps
its own scaling ``lora_alpha_e / r_e`` (a ``[E]`` tensor handed to the op), so padding changes nothing.
An expert of rank 0 is absent from this module (adapters targeting different module sets: union, with
zero experts where an adapter has no weights — exactly what that adapter does on its own).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from selfmoe.kernels import lora_mix
from selfmoe.kernels.torch_inference import lora_mix_small_inference

from .decoding_cache import decode_plan
from .rank1 import check_mix_and_match, mix_and_match_lora, pair_of
from .routers import ROUTING_MODES, GateSlot, TopKRouter, check_top_k

__all__ = ["BaseLayerProxy", "MoLoRALinear"]

ExpertFactors = Optional[Tuple[torch.Tensor, torch.Tensor]]  # (A [r, d_in], B [d_out, r]) or None (absent)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _per_expert(name: str, value, num_experts: int) -> list:
    """A scalar broadcast to E experts, or a sequence of exactly E values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * num_experts
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    try:
        values = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a number or a sequence of {num_experts} numbers, got {type(value).__name__}") from None
    if len(values) != num_experts:
        raise ValueError(f"{name} must have one value per expert (num_experts={num_experts}), got {len(values)}: {values}")
    return values


def check_expert_factors(base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, what: str) -> None:
    """Raise ``TypeError``/``ValueError`` (message starting with ``what``) unless ``A [r, d_in]`` and
    ``B [d_out, r]`` (PEFT's shapes, r >= 1) fit ``base_layer``."""
    d_in, d_out = base_layer.in_features, base_layer.out_features
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise TypeError(f"{what}: lora_A and lora_B must be tensors, got {type(A).__name__}, {type(B).__name__}")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"{what}: lora_A must be [r, d_in] and lora_B [d_out, r], got {_shape(A)} and {_shape(B)}")
    r = A.shape[0]
    if A.shape[1] != d_in or B.shape[0] != d_out or B.shape[1] != r or r < 1:
        raise ValueError(
            f"{what}: lora_A {_shape(A)} / lora_B {_shape(B)} do not fit the base linear "
            f"(in_features={d_in}, out_features={d_out}): expected lora_A [r, {d_in}] and lora_B [{d_out}, r]"
        )


def _check_layer_args(base_layer: Any, num_experts: Any, r: Any, lora_alpha: Any, top_k: Any, router: Any,
                      routing: Any) -> Tuple[List[int], List[float]]:
    """:class:`MoLoRALinear`'s arguments checked; returns the per-expert ranks and alphas."""
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
    if not base_layer.weight.is_floating_point():
        raise TypeError(
            f"base_layer weight must be float (quantized layers are not supported), got {base_layer.weight.dtype}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    ranks = _per_expert("r", r, num_experts)
    for e, re in enumerate(ranks):
        if isinstance(re, bool) or not isinstance(re, int) or re < 0:
            raise ValueError(f"r must be ints >= 0 (0 = expert absent), got r[{e}]={re!r}")
    if max(ranks) < 1:
        raise ValueError(f"at least one expert needs rank >= 1, got r={ranks}")
    alphas = [float(a) for a in _per_expert("lora_alpha", lora_alpha, num_experts)]
    check_top_k(top_k, num_experts)
    if router not in ("linear", None):
        raise ValueError(f"router must be 'linear' (own per-layer router) or None (gates from outside), got {router!r}")
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    return list(ranks), alphas


class BaseLayerProxy:
    """``in_features``/``out_features``/``weight``/``bias`` read from the wrapped ``self.base_layer``, so code
    that reads them off an ``nn.Linear`` keeps working on the LoRA layer that replaced it (used by
    :class:`MoLoRALinear` and by the single-adapter :class:`selfmoe.lora.LoRALinear`)."""

    base_layer: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias


class MoLoRALinear(BaseLayerProxy, nn.Module):
    """Mixture of LoRA experts around a frozen ``nn.Linear``.

    Args:
        base_layer: the ``nn.Linear`` to wrap (kept as ``self.base_layer``, parameters frozen).
        num_experts: E >= 1.
        r: LoRA rank, one int for all experts or one per expert (0 = expert absent from this module).
        lora_alpha: LoRA alpha, one or one per expert; scaling is ``lora_alpha / r`` per expert.
        top_k: experts per token for the module's own router, ``1 <= top_k <= E``.
        router: ``"linear"`` (own router on this module's input: per-layer routing) or ``None`` (gates come
            from outside: ``forward(x, expert_ids=..., expert_weights=...)`` or a shared :class:`GateSlot`).
        renormalize: own router renormalises the kept probabilities (default False: Self-MoE).
        routing: own router mode, ``"learned"`` or ``"random"``.
        expert_dtype: dtype of ``lora_A``/``lora_B`` (default: the base weight's). Experts may be float32
            on a bf16 base; the op computes in x's dtype.
        init_lora_weights: True (default) = PEFT init: ``lora_A`` kaiming-uniform(a=sqrt(5)) per expert,
            ``lora_B`` zero, so a fresh layer equals its base. False = both zero (weights loaded later).
        scalings: optional per-expert scalings overriding ``lora_alpha / r`` (e.g. rsLoRA adapters).
        mix_and_match: ``(r1, r2)`` with ``num_experts = r1 * r2`` and ``r = 1``: the rank-1 experts are the
            pairs ``b_j a_i^T`` of r1 A rows and r2 B columns (MoR1E's mix-and-match, :mod:`selfmoe.rank1`);
            ``lora_A`` is then ``[r1, 1, d_in]`` and ``lora_B`` ``[r2, d_out, 1]``, and all experts share one
            scaling.

    Parameters: ``lora_A [E, r_max, d_in]``, ``lora_B [E, d_out, r_max]`` (PEFT's ``lora_A.weight`` /
    ``lora_B.weight`` stacked over experts; ``[r1, 1, d_in]`` / ``[r2, d_out, 1]`` with ``mix_and_match``),
    ``router.linear`` when ``router="linear"``.
    Buffer: ``expert_scaling [E]`` float32 (not persistent: derived from ranks and alphas).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        r: Union[int, Sequence[int]] = 8,
        lora_alpha: Union[float, Sequence[float]] = 16,
        top_k: int = 1,
        router: Optional[str] = "linear",
        *,
        renormalize: bool = False,
        routing: str = "learned",
        expert_dtype: Optional[torch.dtype] = None,
        init_lora_weights: bool = True,
        scalings: Optional[Sequence[float]] = None,
        mix_and_match: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        ranks, alphas = _check_layer_args(base_layer, num_experts, r, lora_alpha, top_k, router, routing)
        self.base_layer = base_layer
        self.ranks: List[int] = ranks
        self.lora_alphas: List[float] = alphas
        self.mix_and_match: Optional[Tuple[int, int]] = None
        if mix_and_match is not None:
            self.mix_and_match = check_mix_and_match(mix_and_match, num_experts)
            if ranks != [1] * num_experts:
                raise ValueError(f"mix_and_match experts are rank-1 pairs: r must be 1, got {r!r}")
        self._num_experts = num_experts

        w = base_layer.weight
        dtype = expert_dtype or w.dtype
        r_max = max(ranks)
        # mix-and-match stores the r1 A rows and r2 B columns once (rank1.py), not r1*r2 experts
        rows_A, rows_B = self.mix_and_match or (num_experts, num_experts)
        self.lora_A = nn.Parameter(torch.zeros(rows_A, r_max, self.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(rows_B, self.out_features, r_max, dtype=dtype, device=w.device))
        if init_lora_weights:
            self.reset_lora_parameters()
        self.register_buffer("expert_scaling", torch.zeros(num_experts, dtype=torch.float32, device=w.device), persistent=False)
        self._set_scalings(scalings)

        self.router: Optional[TopKRouter] = (
            TopKRouter(self.in_features, num_experts, top_k, renormalize=renormalize, mode=routing, device=w.device)
            if router == "linear"
            else None
        )
        # Set by MiXSE: a shared slot with gates computed elsewhere, and the name used in errors/statistics.
        self.gate_slot: Optional[GateSlot] = None
        self.route_key: Optional[str] = None
        self.experts_enabled = True
        # Set by MiXSE when it has a HyperExpert: (that module, this linear's index in it); not a submodule.
        self.hyper_expert: Optional[Tuple[nn.Module, int]] = None
        self._merged_expert: Optional[int] = None
        self._unmerged_weight: Optional[torch.Tensor] = None
        # The base stays frozen; remember its flags so unwrap() hands it back as it came.
        self._base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------
    # construction helpers

    @classmethod
    def from_linear(
        cls,
        base_layer: nn.Linear,
        experts: Sequence[ExpertFactors],
        lora_alpha: Union[float, Sequence[float]] = 16,
        top_k: int = 1,
        router: Optional[str] = "linear",
        *,
        scalings: Optional[Sequence[float]] = None,
        **kwargs,
    ) -> "MoLoRALinear":
        """Build from per-expert PEFT weights ``(A [r_e, d_in], B [d_out, r_e])`` (``None`` = absent expert).

        Ranks are read from the shapes (different ranks are zero-padded to the largest one); shapes are
        checked against ``base_layer`` and errors name the expert index and the shapes.
        """
        experts = list(experts)
        if not experts:
            raise ValueError("experts must hold at least one (lora_A, lora_B) pair")
        ranks = []
        for e, pair in enumerate(experts):
            if pair is None:
                ranks.append(0)
                continue
            A, B = pair
            check_expert_factors(base_layer, A, B, f"expert {e}")
            ranks.append(A.shape[0])
        layer = cls(base_layer, len(experts), r=ranks, lora_alpha=lora_alpha, top_k=top_k, router=router,
                    init_lora_weights=False, scalings=scalings, **kwargs)
        with torch.no_grad():
            for e, pair in enumerate(experts):
                if pair is not None:
                    layer._write_expert(e, *pair)
        return layer

    def _write_expert(self, e: int, A: torch.Tensor, B: torch.Tensor) -> None:
        r = A.shape[0]
        self.lora_A[e].zero_()
        self.lora_B[e].zero_()
        self.lora_A[e, :r].copy_(A)
        self.lora_B[e, :, :r].copy_(B)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init per expert: A kaiming-uniform(a=sqrt(5)) over its own rows, B zero."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) on an [r, d_in] matrix
        self.lora_A.zero_()
        self.lora_B.zero_()
        if self.mix_and_match is not None:
            self.lora_A.uniform_(-bound, bound)
            return
        for e, r in enumerate(self.ranks):
            if r > 0:
                self.lora_A[e, :r].uniform_(-bound, bound)

    def _set_scalings(self, scalings: Optional[Sequence[float]] = None) -> None:
        E = self.num_experts
        if scalings is None:
            values = [a / r if r > 0 else 0.0 for a, r in zip(self.lora_alphas, self.ranks)]
        else:
            values = [float(s) for s in _per_expert("scalings", scalings, E)]
        with torch.no_grad():
            self.expert_scaling.copy_(torch.tensor(values, dtype=torch.float32))
        present = {v for v, r in zip(values, self.ranks) if r > 0}
        # One float for the op when all present experts share it (absent experts are zero anyway).
        self._uniform_scaling: Optional[float] = present.pop() if len(present) == 1 else None
        if self.mix_and_match is not None and self._uniform_scaling is None:
            raise ValueError(f"mix_and_match experts share one scaling, got {values}")

    # ------------------------------------------------------------------------------------------------
    # properties

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def r(self) -> int:
        """The stacked (padded) rank, ``max(ranks)``."""
        return self.lora_A.shape[1]

    @property
    def scaling(self) -> Union[float, torch.Tensor]:
        """``lora_alpha / r``: a float when all experts share it, else the ``[E]`` tensor."""
        return self._uniform_scaling if self._uniform_scaling is not None else self.expert_scaling

    @property
    def merged(self) -> bool:
        return self._merged_expert is not None

    @property
    def merged_expert(self) -> Optional[int]:
        return self._merged_expert

    @property
    def top_k(self) -> Optional[int]:
        """Experts per token of the module's own router; None when its gates come from outside."""
        return self.router.top_k if self.router is not None else None

    def extra_repr(self) -> str:
        ranks = self.ranks[0] if len(set(self.ranks)) == 1 else self.ranks
        scaling = self._uniform_scaling if self._uniform_scaling is not None else [round(v, 6) for v in self.expert_scaling.tolist()]
        if self.gate_slot is not None:
            src = f"shared[{self.gate_slot.name}]"
        else:
            src = "linear" if self.router is not None else "external"
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"r={ranks}, scaling={scaling}, top_k={self.top_k}, router={src}"
        )
        if self.mix_and_match is not None:
            s += f", mix_and_match={self.mix_and_match[0]}x{self.mix_and_match[1]}"
        if self.merged:
            s += f", merged_expert={self._merged_expert}"
        return s

    # ------------------------------------------------------------------------------------------------
    # forward

    def _name(self) -> str:
        return self.route_key or "MoLoRALinear"

    def _decode_shortcut(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                         memo: Optional[Dict]) -> Optional[torch.Tensor]:
        """A decode-sized call on a CPU without lora_mix's per-call checks (kernels/torch_inference.py), for
        gates from our own router(s) (ids in range; ``[..., k]`` for x's tokens), ours having been done when
        the parameters were made: the plan an open ``decode_cache`` block keeps for this layer, else one
        made for the call. The same numbers as the general path. None: not such a call (or not such a
        layer: per-expert scalings, mix-and-match, a HyperExpert)."""
        if self._uniform_scaling is None or self.mix_and_match is not None or self.hyper_expert is not None:
            return None
        plan = decode_plan(self)
        if plan is None:  # no block open
            return lora_mix_small_inference(x, self.lora_A, self.lora_B, expert_ids, expert_weights,
                                            self._uniform_scaling, self.base_layer.weight, self.base_layer.bias, memo)
        return plan(x, expert_ids, expert_weights, memo)

    def forward(
        self,
        x: torch.Tensor,
        expert_ids: Optional[torch.Tensor] = None,
        expert_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x [..., d_in] -> [..., d_out]``.

        Gates: ``expert_ids``/``expert_weights [..., k]`` when given (leading dims of x, or the same
        number of tokens); else the shared :class:`GateSlot` when MiXSE installed one; else the module's
        own router. With experts disabled or an expert merged into the base weight, this is the base layer.
        """
        if self._merged_expert is not None or not self.experts_enabled:
            return self.base_layer(x)
        slot = self.gate_slot
        tried_fast = False
        if expert_ids is None and expert_weights is None and slot is not None and not slot.bypass and slot.ids is not None:
            # The shared router's gates: try the decode shortcut before this method's own bookkeeping, which
            # at a decode step's size costs as much as the arithmetic (it checks the gates against x's tokens).
            tried_fast = True
            y = self._decode_shortcut(x, slot.ids, slot.weights, slot.memo)
            if y is not None:
                return y
        if (expert_ids is None) != (expert_weights is None):
            raise ValueError(f"{self._name()}: pass both expert_ids and expert_weights, or neither")
        # Ids from our own routers come out of top-k over E logits: always in range, so skip the range
        # check (a device sync per call on CUDA). Ids passed in by the caller are checked.
        from_router = expert_ids is None
        if expert_ids is None:
            if slot is not None:
                if slot.bypass:
                    return self.base_layer(x)
                expert_weights, expert_ids = slot.get(self._name())
            elif self.router is not None:
                expert_weights, expert_ids, _ = self.router(x, key=self.route_key)
            else:
                raise ValueError(
                    f"{self._name()}: this MoLoRALinear has no router (router=None); pass expert_ids= and expert_weights="
                )
        if expert_ids.device != x.device:  # a router on another device (model split over GPUs)
            expert_ids, expert_weights = expert_ids.to(x.device), expert_weights.to(x.device)
        lead = x.shape[:-1]
        if expert_ids.shape[:-1] != lead:
            # Some models flatten tokens ([B*S, d]) inside a layer; gates from the layer input still apply.
            if expert_ids.dim() >= 1 and expert_ids.shape[:-1].numel() == lead.numel():
                k = expert_ids.shape[-1]
                expert_ids = expert_ids.reshape(*lead, k)
                expert_weights = expert_weights.reshape(*lead, k)
            else:
                raise ValueError(
                    f"{self._name()}: gates {_shape(expert_ids)} do not match the tokens of x {_shape(x)}"
                )
        if from_router and not tried_fast:  # the module's own router, or a slot's gates reshaped above
            y = self._decode_shortcut(x, expert_ids, expert_weights, None if slot is None else slot.memo)
            if y is not None:
                return y
        try:
            if self.mix_and_match is not None:  # the factored product (rank1.py says why not lora_mix)
                if not from_router and expert_ids.numel() and not (
                        0 <= int(expert_ids.min()) and int(expert_ids.max()) < self.num_experts):
                    raise ValueError(f"expert_ids must lie in [0, {self.num_experts}), got values "
                                     f"{int(expert_ids.min())}..{int(expert_ids.max())}")
                y = mix_and_match_lora(
                    x, self.lora_A[:, 0, :], self.lora_B[:, :, 0].t(), expert_ids, expert_weights, self._uniform_scaling,
                    base_weight=self.base_layer.weight, base_bias=self.base_layer.bias)
            else:
                y = lora_mix(
                    x, self.lora_A, self.lora_B, expert_ids, expert_weights, self.scaling,
                    base_weight=self.base_layer.weight, base_bias=self.base_layer.bias, backend="auto",
                    check_ids=False if from_router else None,
                )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{self._name()}: {exc}") from exc
        if self.hyper_expert is not None:  # HyperMoE: the unselected experts' adapter, added on top
            hyper, index = self.hyper_expert
            y = y + hyper(x, expert_ids, index)
        return y

    # ------------------------------------------------------------------------------------------------
    # experts

    @torch.no_grad()
    def get_delta_weight(self, expert: int) -> torch.Tensor:
        """Dense ``[d_out, d_in]`` update ``scaling_e * B_e @ A_e`` of one expert, float32."""
        self._check_expert_index(expert)
        A, B = self._factors(expert)
        return (B.float() @ A.float()) * self.expert_scaling[expert].float()

    def _factors(self, expert: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A [r_max, d_in], B [d_out, r_max])`` of one expert as stored (a pair's rows for mix-and-match)."""
        if self.mix_and_match is not None:
            i, j = pair_of(expert, self.mix_and_match[1])
            return self.lora_A[i], self.lora_B[j]
        return self.lora_A[expert], self.lora_B[expert]

    def _check_expert_index(self, expert: int) -> None:
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < self.num_experts:
            raise ValueError(f"{self._name()}: expert must be an int in [0, {self.num_experts}), got {expert!r}")

    @torch.no_grad()
    def merge_expert(self, expert: int) -> None:
        """Fold one expert into the base weight: ``W <- W + scaling_e * B_e @ A_e`` (computed in float32).

        While merged, ``forward`` is the (merged) base linear: routing is off and no expert is added on
        top (the expert is already inside ``W``). A copy of the original weight is kept, so
        :meth:`unmerge` restores it bit for bit; that copy costs one base weight of memory. Merging a
        second expert without unmerging raises.
        """
        self._check_expert_index(expert)
        if self._merged_expert is not None:
            raise RuntimeError(
                f"{self._name()}: expert {self._merged_expert} is already merged; call unmerge() first"
            )
        W = self.base_layer.weight
        delta = self.get_delta_weight(expert)
        self._unmerged_weight = W.detach().clone()
        W.copy_((W.float() + delta).to(W.dtype))
        self._merged_expert = expert

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge_expert` (no-op when nothing is merged)."""
        if self._merged_expert is None:
            return
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._merged_expert = None

    @torch.no_grad()
    def add_expert(
        self,
        lora_A: Optional[torch.Tensor],
        lora_B: Optional[torch.Tensor],
        lora_alpha: float = 16,
        *,
        scaling: Optional[float] = None,
        router_init_logit: Optional[float] = None,
    ) -> int:
        """Append one expert ``(A [r, d_in], B [d_out, r])`` (both None: absent from this module).

        Existing experts keep their values (re-padded if the new rank is larger); the new stacked
        parameters keep the old ``requires_grad``. The parameters are new objects: rebuild optimizers.
        The own router (if any) grows by one output (see :meth:`TopKRouter.add_expert`).
        Returns the new expert's index.
        """
        if self.merged:
            raise RuntimeError(f"{self._name()}: unmerge() before adding experts")
        if self.mix_and_match is not None:
            raise ValueError(f"{self._name()}: a mix-and-match layer's experts are its r1 x r2 pairs; "
                             "experts cannot be added one at a time")
        if (lora_A is None) != (lora_B is None):
            raise ValueError(f"{self._name()}: pass both lora_A and lora_B, or neither (absent expert)")
        r_new = 0
        if lora_A is not None:
            check_expert_factors(self.base_layer, lora_A, lora_B, f"{self._name()}: new expert")
            r_new = lora_A.shape[0]
        E, r_old = self.num_experts, self.r
        self._num_experts = E + 1
        r_max = max(r_old, r_new)
        old_A, old_B = self.lora_A, self.lora_B
        A = old_A.new_zeros(E + 1, r_max, self.in_features)
        B = old_B.new_zeros(E + 1, self.out_features, r_max)
        A[:E, :r_old] = old_A
        B[:E, :, :r_old] = old_B
        if lora_A is not None:
            A[E, :r_new] = lora_A
            B[E, :, :r_new] = lora_B
        self.lora_A = nn.Parameter(A, requires_grad=old_A.requires_grad)
        self.lora_B = nn.Parameter(B, requires_grad=old_B.requires_grad)
        old_scalings = self.expert_scaling.tolist()
        self.ranks.append(r_new)
        self.lora_alphas.append(float(lora_alpha))
        new_scaling = (float(scaling) if scaling is not None else (lora_alpha / r_new if r_new else 0.0))
        self.expert_scaling = torch.zeros(E + 1, dtype=torch.float32, device=old_A.device)
        self._set_scalings(old_scalings + [new_scaling])
        if self.router is not None:
            self.router.add_expert(router_init_logit)
        return E

    @torch.no_grad()
    def prune_experts(self, keep: Sequence[int], *, keep_normalizer: bool = True) -> None:
        """Keep only the experts ``keep`` (indices, in their new order): their factors, ranks, alphas and
        scalings, and their rows of the own router (see :meth:`TopKRouter.prune`). The stacked rank shrinks
        to the largest kept rank. The parameters are new objects (same ``requires_grad``): rebuild
        optimizers. ``ValueError`` when no kept expert has weights here (the caller unwraps the module)."""
        if self.merged:
            raise RuntimeError(f"{self._name()}: unmerge() before pruning experts")
        if self.mix_and_match is not None:  # the pairs share their A rows and B columns
            raise ValueError(f"{self._name()}: mix-and-match experts cannot be pruned one by one")
        keep = list(keep)
        for e in keep:
            self._check_expert_index(e)
        if len(set(keep)) != len(keep) or not keep:
            raise ValueError(f"{self._name()}: keep must be distinct expert indices, at least one, got {keep}")
        ranks = [self.ranks[e] for e in keep]
        if max(ranks) < 1:
            raise ValueError(f"{self._name()}: none of the kept experts {keep} has weights in this module")
        if self.router is not None:
            self.router.prune(keep, keep_normalizer=keep_normalizer)
        r_max = max(ranks)
        idx = torch.tensor(keep, dtype=torch.long, device=self.lora_A.device)
        A = self.lora_A.detach().index_select(0, idx)[:, :r_max].contiguous()
        B = self.lora_B.detach().index_select(0, idx)[:, :, :r_max].contiguous()
        self.lora_A = nn.Parameter(A, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(B, requires_grad=self.lora_B.requires_grad)
        scalings = [float(self.expert_scaling[e]) for e in keep]
        self.ranks = ranks
        self.lora_alphas = [self.lora_alphas[e] for e in keep]
        self.expert_scaling = torch.zeros(len(keep), dtype=torch.float32, device=A.device)
        self._num_experts = len(keep)
        self._set_scalings(scalings)

    def expert_factors(self, expert: int) -> ExpertFactors:
        """PEFT-shaped ``(A [r_e, d_in], B [d_out, r_e])`` of one expert (unpadded), or None if absent here."""
        self._check_expert_index(expert)
        r = self.ranks[expert]
        if r == 0:
            return None
        A, B = self._factors(expert)
        return A[:r].detach(), B[:, :r].detach()

    def unwrap(self) -> nn.Linear:
        """Unmerge, restore the base parameters' ``requires_grad`` flags and return the original ``base_layer``."""
        self.unmerge()
        for n, p in self.base_layer.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        return self.base_layer
