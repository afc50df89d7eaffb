"""Where a MiXSE's router sits and how its gates reach the LoRA linears: one class per router kind.

- :class:`SharedPlacement` (``"shared"``): one router; a forward pre-hook on each decoder layer that
  holds experts routes that layer's input hidden state once and puts the gates in the layer's
  :class:`~selfmoe.routers.GateSlot`, read by every LoRA linear of the layer. One pass.
- :class:`XLoRAPlacement` (``"xlora"``, the paper's X-LoRA scheme): before each forward of the inner
  decoder model, an expert-free scaling pass (no grad) produces the last hidden state; the router
  reads it and one slot hands the gates to every LoRA linear for the real pass. With a KV cache the
  scaling pass keeps a cache of its own, paired with the model's cache.
- :class:`PerLayerPlacement` (``"per_layer"``, MoLoRA/MixLoRA style): every LoRA linear routes its own
  input with its own router.

A placement owns what differs between the kinds: building the router, wiring layers to it (slots and
hooks), the pre-forward work, the names of the router tensors on disk and which modules it can route.
:class:`selfmoe.MiXSE` owns what they share. ``top_k``, ``renormalize`` and the routing mode live in
the routers alone (:meth:`Placement.routers`).
"""
from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import nn

from .layer import MoLoRALinear
from .mixse_config import MiXSEConfig
from .prefix_cache import cache_kwarg
from .routers import GateSlot, TopKRouter
from .targets import hidden_size_of

if TYPE_CHECKING:  # pragma: no cover
    from .model import MiXSE

__all__ = ["Placement", "SharedPlacement", "XLoRAPlacement", "PerLayerPlacement", "make_placement", "input_arg"]

_XLORA_KEY = "xlora"


def input_arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A forward argument given by keyword or at ``position``; None when absent."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class Placement:
    """Base class: the router kind's wiring (see the module docstring). Subclasses set ``kind``."""

    kind = ""
    #: what each MoLoRALinear builds for itself (``"linear"``: its own router; None: gates from outside)
    layer_router: Optional[str] = None

    def __init__(self) -> None:
        self.slots: List[GateSlot] = []
        self.slot_hooks: Dict[str, Any] = {}  # slot name -> the hook handle that fills it (shared placement)

    # -- construction ----------------------------------------------------------------------------------
    def make_router(self, base_model: nn.Module, config: MiXSEConfig, device: torch.device) -> Optional[TopKRouter]:
        """The model-level router (registered as ``MiXSE.router``), or None when the layers route."""
        return TopKRouter(hidden_size_of(base_model), len(config.expert_names), config.top_k,
                          renormalize=config.renormalize, mode=config.routing, device=device)

    def check_module(self, path: str, layer_index: Optional[int]) -> Optional[str]:
        """Why this placement cannot route module ``path`` (``layer_index``: its decoder layer), or None."""
        return None

    def attach_layer(self, model: "MiXSE", path: str, layer: MoLoRALinear, layer_index: Optional[int]) -> None:
        """Wire one LoRA linear (at construction, or added later by ``add_expert``) to the gates."""
        layer.route_key = path
        if layer.router is not None:
            layer.router.state = model._state

    def detach_layer(self, model: "MiXSE", path: str, layer: MoLoRALinear) -> None:
        """Undo :meth:`attach_layer` for a LoRA linear leaving the model (pruning took all its experts);
        ``path`` is already gone from ``model._lora_modules``."""
        layer.gate_slot = None
        if layer.router is not None:
            layer.router.state = None

    def before_forward(self, model: "MiXSE", module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Work before each forward of the inner decoder model; returns what a forward pre-hook returns."""
        return None

    # -- the routers and their tensors -------------------------------------------------------------------
    def routers(self, model: "MiXSE") -> List[TopKRouter]:
        """Every router of the model (one, or one per LoRA linear)."""
        return [model.router]

    def router_tensors(self, model: "MiXSE") -> Dict[str, torch.Tensor]:
        """``router.safetensors`` contents: ``router.<name>`` (one router) or ``<module>.router.<name>``."""
        return {f"router.{k}": v for k, v in model.router.state_dict().items()}

    def owners(self, in_features: Dict[str, int]) -> Dict[str, Optional[int]]:
        """``{owner: input width or None (hidden size)}``; owner "" is the model-level router."""
        return {"": None}

    def router_of(self, model: "MiXSE", owner: str) -> TopKRouter:
        return model.router if owner == "" else model._lora_modules[owner].router

    def split_router_state(self, sd: Dict[str, torch.Tensor], num_experts: int, in_features: Dict[str, int],
                           where: Any) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{owner: router state dict}`` from a ``router.safetensors`` dict, checked for names and shapes
        (``in_features``: each wrapped module's input width). Raises ``ValueError`` naming ``where``."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for owner, d_in in self.owners(in_features).items():
            prefix = "router." if owner == "" else f"{owner}.router."
            # ("router.prior_logit": one dot; "router.linear.weight": two)
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and (owner != "" or k.count(".") <= 2)}
            if "linear.weight" not in sub:
                raise ValueError(f"{where}: missing tensor {prefix + 'linear.weight'!r}")
            w = sub["linear.weight"]
            if w.dim() != 2 or w.shape[0] != num_experts or (d_in is not None and w.shape[1] != d_in):
                raise ValueError(f"{where}: {prefix}linear.weight has shape {list(w.shape)}, "
                                 f"expected [{num_experts}, {d_in or 'hidden_size'}]")
            out[owner] = sub
        claimed = {("router." if o == "" else f"{o}.router.") + k for o, s in out.items() for k in s}
        unexpected = sorted(set(sd) - claimed)
        if unexpected:
            raise ValueError(f"{where}: unexpected tensors {unexpected[:5]}")
        return out

    def add_expert(self, model: "MiXSE", router_init_logit: Optional[float]) -> None:
        """Grow the model-level router by one output (per-layer routers grow with their layers)."""
        model.router.add_expert(router_init_logit)


class _RouteLayerInput:
    """The shared router's forward pre-hook on one decoder layer: route the layer's input hidden state
    and put the gates in the layer's slot. An object rather than a closure so that ``copy.deepcopy`` of
    a MiXSE hands the copy's hooks the copy's router and slots (a closure is not copied: the copy's
    decoder layers would fill the original's slots and its LoRA linears would find theirs empty)."""

    def __init__(self, model: "MiXSE", key: str, slot: GateSlot) -> None:
        self.model, self.key, self.slot = model, key, slot

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.slot.bypass:  # an expert-free pass (the intuition prior's embedding pass): nothing to route
            return
        hidden = input_arg(args, kwargs, "hidden_states", 0)
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError(
                f"{self.key}: cannot find the decoder layer's hidden_states argument (got {type(hidden).__name__})")
        weights, ids, _ = self.model.router(hidden, key=self.key)
        self.slot.set(weights, ids)


class SharedPlacement(Placement):
    kind = "shared"

    def check_module(self, path: str, layer_index: Optional[int]) -> Optional[str]:
        if layer_index is None:
            return (f"module {path!r} is outside the decoder layers: the shared router reads a decoder layer's input, "
                    "so it cannot route it; use router='per_layer' or 'xlora', or drop it from target_modules")
        return None

    def attach_layer(self, model: "MiXSE", path: str, layer: MoLoRALinear, layer_index: Optional[int]) -> None:
        super().attach_layer(model, path, layer, layer_index)
        layer.gate_slot = self._slot(model, layer_index)

    def _slot(self, model: "MiXSE", index: int) -> GateSlot:
        """Decoder layer ``index``'s slot, created with its routing hook when the layer gets its first expert."""
        key = f"{model._layers_prefix}.{index}"
        for slot in self.slots:
            if slot.name == key:
                return slot
        slot = GateSlot(key)
        self.slots.append(slot)
        decoder_layer = model._decoder_layers[0][index]
        handle = decoder_layer.register_forward_pre_hook(_RouteLayerInput(model, key, slot), with_kwargs=True)
        model._hooks.append(handle)
        self.slot_hooks[key] = handle
        return slot

    def detach_layer(self, model: "MiXSE", path: str, layer: MoLoRALinear) -> None:
        slot = layer.gate_slot
        super().detach_layer(model, path, layer)
        if slot is None or any(m.gate_slot is slot for m in model._lora_modules.values()):
            return
        # The decoder layer holds no experts any more: stop routing it (no router call, no statistics).
        handle = self.slot_hooks.pop(slot.name)
        handle.remove()
        model._hooks.remove(handle)
        self.slots.remove(slot)


class XLoRAPlacement(Placement):
    kind = "xlora"

    def __init__(self) -> None:
        super().__init__()
        self.slot = GateSlot(_XLORA_KEY)
        self.slots.append(self.slot)
        self.in_scaling_pass = False
        # model's KV cache -> the scaling pass's own cache, kept only as long as the model's cache lives
        self.caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def attach_layer(self, model: "MiXSE", path: str, layer: MoLoRALinear, layer_index: Optional[int]) -> None:
        super().attach_layer(model, path, layer, layer_index)
        layer.gate_slot = self.slot

    def before_forward(self, model: "MiXSE", module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """X-LoRA: run the inner model once without experts (no grad), route on its last hidden state,
        and hand the gates to every LoRA linear for the real pass that follows."""
        named = dict(kwargs)
        if args:
            for name, value in zip(inspect.signature(module.forward).parameters, args):
                named[name] = value
        # transformers 5.24 renamed the cache argument ``past_key_values`` -> ``cache`` (the old name is
        # still accepted by callers until 5.40): read either, hand the inner model the name it declares.
        cache_name = cache_kwarg(module)
        past = named.pop("cache", None)
        legacy = named.pop("past_key_values", None)
        if past is None:
            past = legacy
        use_cache = named.get("use_cache")
        cfg = getattr(module, "config", None)
        if use_cache is None:
            use_cache = bool(getattr(cfg, "use_cache", False))
        scaling_cache = None
        if past is not None:
            scaling_cache = self._scaling_cache_for(past, cfg)
        elif use_cache:
            past = _new_cache(cfg)
            scaling_cache = _new_cache(cfg)
            self.caches[past] = scaling_cache
        if past is not None:
            named[cache_name] = past
        scaling_kwargs = dict(named)
        scaling_kwargs[cache_name] = scaling_cache
        scaling_kwargs["use_cache"] = scaling_cache is not None
        scaling_kwargs.pop("output_attentions", None)
        scaling_kwargs.pop("output_hidden_states", None)
        self.slot.bypass = True
        self.in_scaling_pass = True
        try:
            with torch.no_grad():
                out = module(**scaling_kwargs)
        finally:
            self.slot.bypass = False
            self.in_scaling_pass = False
        hidden = out[0] if not isinstance(out, torch.Tensor) else out
        weights, ids, _ = model.router(hidden, key=_XLORA_KEY)
        self.slot.set(weights, ids)
        return (), named

    def _scaling_cache_for(self, past: Any, cfg: Any) -> Any:
        scaling_cache = self.caches.get(past)
        if scaling_cache is None:
            if past.get_seq_length() > 0:
                raise RuntimeError(
                    "router='xlora': past_key_values holds tokens this MiXSE did not see; the X-LoRA scaling pass "
                    "keeps a KV cache of its own, so start generation/caching through this model"
                )
            scaling_cache = _new_cache(cfg)
            self.caches[past] = scaling_cache
        elif scaling_cache.get_seq_length() != past.get_seq_length():
            raise RuntimeError(
                f"router='xlora': the scaling-pass cache ({scaling_cache.get_seq_length()} tokens) is out of step with "
                f"past_key_values ({past.get_seq_length()} tokens); caches cropped or reordered outside the model "
                "(assisted decoding, beam search) are not supported with router='xlora'"
            )
        return scaling_cache


class PerLayerPlacement(Placement):
    kind = "per_layer"
    layer_router = "linear"

    def make_router(self, base_model: nn.Module, config: MiXSEConfig, device: torch.device) -> Optional[TopKRouter]:
        return None

    def routers(self, model: "MiXSE") -> List[TopKRouter]:
        return [m.router for m in model._lora_modules.values()]

    def router_tensors(self, model: "MiXSE") -> Dict[str, torch.Tensor]:
        return {f"{p}.router.{k}": v for p, m in model._lora_modules.items() for k, v in m.router.state_dict().items()}

    def owners(self, in_features: Dict[str, int]) -> Dict[str, Optional[int]]:
        return dict(in_features)

    def add_expert(self, model: "MiXSE", router_init_logit: Optional[float]) -> None:
        return None


PLACEMENTS = {p.kind: p for p in (SharedPlacement, XLoRAPlacement, PerLayerPlacement)}


def make_placement(kind: str) -> Placement:
    """A fresh placement for router kind ``kind`` (``"shared"``, ``"xlora"`` or ``"per_layer"``)."""
    if kind not in PLACEMENTS:
        raise ValueError(f"router must be one of {tuple(PLACEMENTS)}, got {kind!r}")
    return PLACEMENTS[kind]()


def _new_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` laid out for ``config`` (transformers 5 takes the config; 4.x does not)."""
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()
