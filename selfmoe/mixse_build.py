"""Building a MiXSE's layers: from PEFT adapters, from scratch, and one more expert on a live model.

Each builder checks everything against the base model first and returns ``(MiXSEConfig, {path:
MoLoRALinear})``; :class:`selfmoe.MiXSE` then attaches them (and undoes the attach if it fails).
Adapters that target different module sets are merged as a **union**: a module some adapters do not
touch gets a zero (rank-0) expert for them, which is exactly what those adapters do on their own.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapters import LoRAAdapter, check_same_base, load_lora_adapter
from .choices import check_hyper_sizes
from .io_utils import PathLike
from .layer import MoLoRALinear, check_expert_factors
from .mixse_config import MiXSEConfig
from .names import check_safe_name
from .placements import make_placement
from .routers import check_top_k
from .targets import find_decoder_layers, layer_index_of, linear_modules, match_targets

if TYPE_CHECKING:  # pragma: no cover
    from .model import MiXSE

__all__ = ["build_from_adapters", "build_from_scratch", "add_expert", "module_info", "check_not_wrapped"]

Layers = Dict[str, MoLoRALinear]


def module_info(layer: MoLoRALinear) -> Dict[str, Any]:
    """One ``MiXSEConfig.modules`` entry: per-expert ranks, alphas and scalings, and the layer's widths."""
    return {
        "ranks": list(layer.ranks),
        "lora_alphas": [float(a) for a in layer.lora_alphas],
        "scalings": [float(s) for s in layer.expert_scaling.tolist()],
        "in_features": layer.in_features,
        "out_features": layer.out_features,
    }


def base_name(base_model: nn.Module) -> Optional[str]:
    """The base model's ``name_or_path`` as transformers recorded it, or None."""
    name = getattr(getattr(base_model, "config", None), "_name_or_path", None)
    return name or None


def check_not_wrapped(model: nn.Module) -> None:
    if any(isinstance(m, MoLoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds MoLoRALinear modules (wrapped twice?); unload() the MiXSE first")


def build_from_adapters(
    base_model: nn.Module, adapters: Mapping[str, Union[PathLike, LoRAAdapter]], *, top_k: int, router: str,
    target_modules: Optional[Union[str, Sequence[str]]], renormalize: bool, routing: str,
    aux_loss: Optional[Dict[str, float]], expert_dtype: Optional[torch.dtype], strict: bool,
    hyper_expert: Any = None,
) -> Tuple[MiXSEConfig, Layers]:
    """The layers of :meth:`selfmoe.MiXSE.from_adapters` (arguments documented there)."""
    check_not_wrapped(base_model)
    hyper_expert = check_hyper_sizes(hyper_expert)
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(f"adapters must be a non-empty dict {{expert name: adapter path}}, got {adapters!r}")
    names = list(adapters)
    make_placement(router)
    check_top_k(top_k, len(names))
    loaded: Dict[str, LoRAAdapter] = {}
    sources: Dict[str, Optional[str]] = {}
    for name in names:
        src = adapters[name]
        if isinstance(src, LoRAAdapter):
            loaded[name], sources[name] = src, None
        else:
            loaded[name], sources[name] = load_lora_adapter(src), os.fspath(src)
    check_same_base(loaded, strict=strict)
    layers_prefix, _ = find_decoder_layers(base_model)
    linears = linear_modules(base_model)
    allowed = set(match_targets(linears, target_modules, layers_prefix)) if target_modules is not None else None

    # Union of adapter modules, in model order; every weight checked against its base linear.
    wanted: Dict[str, None] = {}
    for name, ad in loaded.items():
        where = f"adapter {name!r}" + (f" ({sources[name]})" if sources[name] else "")
        for path, (A, B) in ad.weights.items():
            if path not in linears:
                kind = "does not exist" if path not in dict(base_model.named_modules()) else "is not an nn.Linear"
                raise ValueError(f"{where}: module {path!r} {kind} in {type(base_model).__name__}")
            if allowed is not None and path not in allowed:
                raise ValueError(
                    f"{where}: has weights for {path!r}, which target_modules={target_modules!r} excludes "
                    "(refusing to drop adapter weights silently)"
                )
            _check_shapes(linears[path], A, B, f"{where}: module {path!r}")
            wanted[path] = None

    placement = make_placement(router)
    layers: Layers = {}
    for path in (p for p in linears if p in wanted):
        experts, alphas, scalings = [], [], []
        for name in names:
            ad = loaded[name]
            if path in ad.weights:
                experts.append(ad.weights[path])
                alphas.append(ad.alpha_for(path))
                scalings.append(ad.scaling_for(path))
            else:
                experts.append(None)
                alphas.append(float(ad.lora_alpha))
                scalings.append(0.0)
        layers[path] = MoLoRALinear.from_linear(
            linears[path], experts, lora_alpha=alphas, top_k=top_k, router=placement.layer_router, scalings=scalings,
            renormalize=renormalize, routing=routing, expert_dtype=expert_dtype,
        )
    config = MiXSEConfig(
        expert_names=names, router=router, top_k=top_k, renormalize=renormalize, routing=routing,
        aux_loss=dict(aux_loss or {}), trainable_experts=False, modules={p: module_info(m) for p, m in layers.items()},
        expert_configs={n: {"use_rslora": bool(loaded[n].config.get("use_rslora", False)), "source": sources[n]} for n in names},
        base_model_name_or_path=base_name(base_model), hyper_expert=hyper_expert,
    )
    return config, layers


def build_from_scratch(
    base_model: nn.Module, num_experts: int, *, r: int, lora_alpha: float, top_k: int, router: str,
    target_modules: Optional[Union[str, Sequence[str]]], expert_names: Optional[Sequence[str]], renormalize: bool,
    routing: str, aux_loss: Optional[Dict[str, float]], expert_dtype: Optional[torch.dtype], hyper_expert: Any = None,
    mix_and_match: Optional[Tuple[int, int]] = None,
) -> Tuple[MiXSEConfig, Layers]:
    """The layers of :meth:`selfmoe.MiXSE.from_scratch` (arguments documented there; ``mix_and_match``:
    :meth:`selfmoe.MiXSE.from_rank1`)."""
    check_not_wrapped(base_model)
    hyper_expert = check_hyper_sizes(hyper_expert)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    placement = make_placement(router)
    check_top_k(top_k, num_experts)
    names = list(expert_names) if expert_names is not None else [f"expert_{i}" for i in range(num_experts)]
    if len(names) != num_experts:
        raise ValueError(f"expert_names has {len(names)} names for num_experts={num_experts}")
    layers_prefix, _ = find_decoder_layers(base_model)
    linears = linear_modules(base_model)
    paths = match_targets(linears, "all-linear" if target_modules is None else target_modules, layers_prefix)
    layers = {
        path: MoLoRALinear(linears[path], num_experts, r=r, lora_alpha=lora_alpha, top_k=top_k,
                           router=placement.layer_router, renormalize=renormalize, routing=routing,
                           expert_dtype=expert_dtype, mix_and_match=mix_and_match)
        for path in paths
    }
    config = MiXSEConfig(
        expert_names=names, router=router, top_k=top_k, renormalize=renormalize, routing=routing,
        aux_loss=dict(aux_loss or {}), trainable_experts=True, modules={p: module_info(m) for p, m in layers.items()},
        expert_configs={n: {"use_rslora": False, "source": None} for n in names}, base_model_name_or_path=base_name(base_model),
        hyper_expert=hyper_expert,
        mix_and_match=list(mix_and_match) if mix_and_match is not None else None,
    )
    return config, layers


def add_expert(model: "MiXSE", name: str, adapter: Union[PathLike, LoRAAdapter],
               router_init_logit: Optional[float]) -> int:
    """:meth:`selfmoe.MiXSE.add_expert` (documented there): checks everything, then grows the model."""
    cfg = model._config
    check_safe_name(name, "expert name")
    if name in cfg.expert_names:
        raise ValueError(f"an expert named {name!r} already exists: {list(cfg.expert_names)}")
    source = None
    if isinstance(adapter, LoRAAdapter):
        ad = adapter
    else:
        ad, source = load_lora_adapter(adapter), os.fspath(adapter)
    where = f"adapter {name!r}" + (f" ({source})" if source else "")
    E = len(cfg.expert_names)
    lora = model._lora_modules
    base_linears: Dict[str, nn.Linear] = {}
    for p, m in model.base_model.named_modules():
        if isinstance(m, MoLoRALinear):
            base_linears[p] = m.base_layer
        elif isinstance(m, nn.Linear) and not _inside(p, lora):
            base_linears[p] = m
    decoder_layers = model._decoder_layers[0]
    placement = model._placement
    new_paths: List[str] = []
    for path, (A, B) in ad.weights.items():
        if path not in base_linears:
            raise ValueError(f"{where}: module {path!r} is not an nn.Linear of {type(model.base_model).__name__}")
        _check_shapes(base_linears[path], A, B, f"{where}: module {path!r}")
        if path not in lora:
            why = placement.check_module(path, layer_index_of(path, model._layers_prefix, len(decoder_layers)))
            if why:
                raise ValueError(f"{where}: {why}")
            new_paths.append(path)
    if new_paths and model.hyper is not None:
        raise ValueError(f"{where}: adds modules the MiXSE does not wrap yet ({new_paths[:3]}); with a HyperExpert "
                         "the new expert must stay within the wrapped modules (they own its layer embeddings)")
    dtype_ref = next(iter(lora.values())).lora_A.dtype
    routers = placement.routers(model)

    # All checks passed: mutate.
    for path, m in lora.items():
        if path in ad.weights:
            A, B = ad.weights[path]
            m.add_expert(A.to(m.lora_A.device), B.to(m.lora_B.device), ad.alpha_for(path),
                         scaling=ad.scaling_for(path), router_init_logit=router_init_logit)
        else:
            m.add_expert(None, None, float(ad.lora_alpha), router_init_logit=router_init_logit)
    for path in (p for p in base_linears if p in new_paths):
        layer = MoLoRALinear.from_linear(
            base_linears[path], [None] * E + [ad.weights[path]],
            lora_alpha=[float(ad.lora_alpha)] * E + [ad.alpha_for(path)], top_k=routers[0].top_k,
            router=placement.layer_router, scalings=[0.0] * E + [ad.scaling_for(path)],
            renormalize=routers[0].renormalize, routing=routers[0].mode, expert_dtype=dtype_ref,
        )
        layer.lora_A.requires_grad_(cfg.trainable_experts)
        layer.lora_B.requires_grad_(cfg.trainable_experts)
        model.base_model.set_submodule(path, layer)
        placement.attach_layer(model, path, layer, layer_index_of(path, model._layers_prefix, len(decoder_layers)))
        lora[path] = layer
    if new_paths:
        order = [p for p, _ in model.base_model.named_modules()]
        model._lora_modules = {p: lora[p] for p in order if p in lora}
    placement.add_expert(model, router_init_logit)
    if model.hyper is not None:
        model.hyper.add_expert()
    cfg.expert_names.append(name)
    cfg.expert_configs[name] = {"use_rslora": bool(ad.config.get("use_rslora", False)), "source": source}
    return E


def _check_shapes(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, where: str) -> None:
    try:
        check_expert_factors(base, A, B, where)
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def _inside(path: str, lora: Mapping[str, MoLoRALinear]) -> bool:
    """Whether ``path`` is a child of one of the MoLoRALinear modules (its base layer or router)."""
    for suffix in (".base_layer", ".router.linear"):
        if path.endswith(suffix) and path[: -len(suffix)] in lora:
            return True
    return False
