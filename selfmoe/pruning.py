"""Pruning a MiXSE's experts (ModuleFormer): drop experts a task hardly routes to, keep a smaller MiXSE.

:meth:`selfmoe.MiXSE.prune_experts` is documented there. Which experts stay comes from an explicit list
or from routing statistics (:class:`~selfmoe.stats.RoutingStats`, its ``summary()``, the JSON that
``selfmoe generate --routing-stats-json`` writes, or ``{expert: share}``): an expert's share is its
statistic averaged over every layer, token-weighted (:func:`~selfmoe.stats.overall_shares`).

What is exact: the kept experts' factors, ranks and scalings are copied; the router keeps their rows and,
by default, moves the pruned rows into a frozen normaliser (:meth:`~selfmoe.routers.TopKRouter.prune`),
so a token whose top-k held only kept experts gets the same gates and the same output as before. A
module where no kept expert has weights goes back to its plain ``nn.Linear``. With a HyperExpert, the
pruned experts' embeddings are always "unselected" from now on, so their sum becomes a constant of the
HyperExpert (:meth:`~selfmoe.hyper.HyperExpert.prune_experts`), which keeps its adapter exact too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from .stats import RoutingStats, overall_shares

if TYPE_CHECKING:  # pragma: no cover
    from .model import MiXSE

__all__ = ["expert_shares", "choose_kept_experts", "prune_experts"]

ExpertRef = Union[int, str]


def expert_shares(stats: Any, expert_names: Sequence[str], stat: str = "usage") -> Dict[str, float]:
    """``{expert: share}`` for every expert in ``expert_names`` from ``stats``: a :class:`RoutingStats`, a
    per-layer summary ``{layer: {"tokens", "usage": {...}, ...}}``, or ``{expert: share}``. ``ValueError``
    when it names other experts, or has no tokens."""
    if isinstance(stats, RoutingStats):
        stats = stats.summary()
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError(f"stats must be RoutingStats, a per-layer routing summary or {{expert: share}}, got {stats!r}")
    if all(isinstance(v, Mapping) for v in stats.values()):
        if not any(v.get(stat) for v in stats.values()):
            raise ValueError(f"stats: no layer has the statistic {stat!r} (known: usage, mean_gate, mean_prob)")
        if sum(float(v.get("tokens", 0)) for v in stats.values()) <= 0:
            raise ValueError("stats: counted no tokens; run data through the model inside routing_stats() first")
        shares = overall_shares(stats, stat)
    else:
        shares = {str(k): float(v) for k, v in stats.items()}
    unknown = sorted(set(shares) - set(expert_names))
    missing = [n for n in expert_names if n not in shares]
    if unknown or missing:
        raise ValueError(f"stats: experts do not match this MiXSE's {list(expert_names)} "
                         f"(unknown {unknown}, missing {missing})")
    return {n: shares[n] for n in expert_names}


def choose_kept_experts(expert_names: Sequence[str], keep: Optional[Sequence[ExpertRef]] = None, *,
                        min_share: Optional[float] = None, top_n: Optional[int] = None, stats: Any = None,
                        stat: str = "usage") -> List[int]:
    """Indices of the experts to keep, in their current order: ``keep`` (indices or names), or from the
    shares in ``stats``: those with share >= ``min_share``, then (if given) the ``top_n`` largest of them
    (ties: the earlier expert). Raises ``ValueError`` naming the argument."""
    names = list(expert_names)
    E = len(names)
    if keep is not None:
        if min_share is not None or top_n is not None:
            raise ValueError("pass keep=[...] or min_share=/top_n= (with stats=), not both")
        if isinstance(keep, (str, int)):
            keep = [keep]
        out: List[int] = []
        for ref in keep:
            if isinstance(ref, str):
                if ref not in names:
                    raise ValueError(f"keep: no expert named {ref!r}; experts are {names}")
                out.append(names.index(ref))
            elif isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < E:
                out.append(ref)
            else:
                raise ValueError(f"keep: {ref!r} is neither an expert name nor an index in [0, {E})")
        if not out or len(set(out)) != len(out):
            raise ValueError(f"keep must name distinct experts, at least one, got {list(keep)}")
        return sorted(out)
    if min_share is None and top_n is None:
        raise ValueError("prune_experts needs keep=[...], or min_share= and/or top_n= with stats=")
    if stats is None:
        raise ValueError("min_share= / top_n= need stats= (routing statistics on the data, e.g. from "
                         "model.routing_stats())")
    if min_share is not None and (isinstance(min_share, bool) or not isinstance(min_share, (int, float))
                                  or not 0 <= min_share <= 1):
        raise ValueError(f"min_share must be a number in [0, 1], got {min_share!r}")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= E):
        raise ValueError(f"top_n must be an int in [1, {E}], got {top_n!r}")
    shares = expert_shares(stats, names, stat)
    kept = [e for e, n in enumerate(names) if min_share is None or shares[n] >= min_share]
    if top_n is not None:
        kept = sorted(sorted(kept, key=lambda e: -shares[names[e]])[:top_n])
    if not kept:
        best = max(shares.values())
        raise ValueError(f"min_share={min_share}: no expert reaches it (largest share {best:.4f}: {shares})")
    return kept


def prune_experts(model: "MiXSE", keep: Optional[Sequence[ExpertRef]] = None, *, min_share: Optional[float] = None,
                  top_n: Optional[int] = None, stats: Any = None, stat: str = "usage",
                  keep_normalizer: bool = True) -> List[str]:
    """:meth:`selfmoe.MiXSE.prune_experts` (documented there): checks everything, then shrinks the model."""
    cfg = model._config
    names = list(cfg.expert_names)
    kept = choose_kept_experts(names, keep, min_share=min_share, top_n=top_n, stats=stats, stat=stat)
    dropped = [n for e, n in enumerate(names) if e not in kept]
    if not dropped:
        return []
    placement = model._placement
    top_k = max(rt.top_k for rt in placement.routers(model))
    if top_k > len(kept):
        raise ValueError(f"top_k={top_k} experts per token, but only {len(kept)} would be kept "
                         f"({[names[e] for e in kept]}); lower it first with configure_routing(top_k=...)")
    lora = model._lora_modules
    emptied = [p for p, m in lora.items() if max(m.ranks[e] for e in kept) < 1]
    if len(emptied) == len(lora):
        raise ValueError(f"the kept experts {[names[e] for e in kept]} have no weights in any module")

    # All checks passed: mutate.
    if model.hyper is not None:
        model.hyper.prune_experts(kept)
        if emptied:
            model.hyper.keep_linears([i for i, p in enumerate(lora) if p not in emptied])
    for path in emptied:
        layer = lora.pop(path)
        model.base_model.set_submodule(path, layer.unwrap())
        placement.detach_layer(model, path, layer)
    for layer in lora.values():
        layer.prune_experts(kept, keep_normalizer=keep_normalizer)
    if model.router is not None:
        model.router.prune(kept, keep_normalizer=keep_normalizer)
    model._wire_hyper()
    cfg.expert_names = [names[e] for e in kept]
    cfg.expert_configs = {n: c for n, c in cfg.expert_configs.items() if n in cfg.expert_names}
    cfg.pruned_experts = (list(cfg.pruned_experts) + dropped) if keep_normalizer else []
    return dropped
