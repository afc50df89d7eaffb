"""``MiXSE``: a Hugging Face causal LM with its target linears replaced, in place, by ``MoLoRALinear``.

Three lines::

    base = AutoModelForCausalLM.from_pretrained(...)
    model = MiXSE.from_adapters(base, {"math": "experts/math", "code": "experts/code"}, top_k=1)
    out = model(input_ids, attention_mask=mask, labels=input_ids); out.loss.backward()  # trains the router only

Design:

- The wrapped model stays a normal ``transformers`` model: routing happens inside its modules (the
  LoRA linears, and forward pre-hooks on the decoder layers or the inner decoder model), so its own
  ``forward``/``generate``/KV cache/gradient checkpointing keep working. ``MiXSE.forward`` and
  ``MiXSE.generate`` simply call the wrapped model.
- Router kinds (see :mod:`selfmoe.routers`): ``"shared"`` (one router, gates computed once per decoder
  layer from the layer's input hidden state, used by every LoRA linear of that layer), ``"xlora"``
  (X-LoRA: adapter-free scaling pass under ``no_grad``, router on its final hidden states, then the
  real pass; with a KV cache the scaling pass keeps a cache of its own), ``"per_layer"`` (a router per
  LoRA linear).
- Adapters targeting different module sets: **union**. A module that some adapters do not touch gets a
  zero (rank-0) expert for them, which is exactly what those adapters do on their own. With an
  explicit ``target_modules``, adapter weights outside it are an error (never silently dropped).
- Trainable: only the router(s) for ``from_adapters``/``from_pretrained`` (base and experts frozen, as
  in Self-MoE); experts and router for ``from_scratch`` (MixLoRA-style joint training).

On disk (``save_pretrained``), written atomically: ``mixse_config.json``, ``experts.safetensors``
(``<module>.lora_A [E, r_max, d_in]``, ``<module>.lora_B [E, d_out, r_max]``), ``router.safetensors``.
The base model is not saved; ``from_pretrained(dir, base_model)`` re-attaches to a fresh copy of it.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import pathlib
import re
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .names import check_safe_name
from .adapters import LoRAAdapter, check_same_base, load_lora_adapter, save_lora_adapter
from .io_utils import atomic_directory, atomic_write_json
from .layer import MoLoRALinear
from .routers import (
    ROUTER_KINDS,
    ROUTING_MODES,
    GateSlot,
    RoutingState,
    TopKRouter,
    check_aux_loss,
    check_top_k,
    compute_aux_loss,
)
from .stats import RoutingStats
from .version import __version__

__all__ = ["MiXSE", "MiXSEConfig", "CONFIG_NAME", "EXPERTS_NAME", "ROUTER_NAME"]

PathLike = Union[str, "os.PathLike[str]"]
CONFIG_NAME = "mixse_config.json"
EXPERTS_NAME = "experts.safetensors"
ROUTER_NAME = "router.safetensors"
FORMAT_VERSION = 1
_XLORA_KEY = "xlora"


@dataclass
class MiXSEConfig:
    """Everything needed to rebuild a MiXSE on a base model (saved as ``mixse_config.json``).

    ``modules[path] = {"ranks": [E], "lora_alphas": [E], "scalings": [E], "in_features", "out_features"}``
    (rank 0: that expert is absent from the module). ``expert_configs[name]`` keeps per-expert adapter
    options needed to export it again (``use_rslora``, ``source``).
    """

    expert_names: List[str]
    router: str = "shared"
    top_k: int = 1
    renormalize: bool = False
    routing: str = "learned"
    aux_loss: Dict[str, float] = field(default_factory=dict)
    trainable_experts: bool = False
    modules: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    expert_configs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    base_model_name_or_path: Optional[str] = None
    format_version: int = FORMAT_VERSION
    selfmoe_version: str = __version__

    def validate(self) -> None:
        names = self.expert_names
        if not isinstance(names, list) or not names:
            raise ValueError(f"expert_names must be a non-empty list, got {names!r}")
        for n in names:  # names may become directory names (save_expert, the CLI's experts/<name>)
            check_safe_name(n, "expert name")
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        check_top_k(self.top_k, len(names))
        for flag in ("renormalize", "trainable_experts"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not isinstance(self.aux_loss, dict):
            raise ValueError(f"aux_loss must be an object {{name: coefficient}}, got {self.aux_loss!r}")
        self.aux_loss = check_aux_loss(self.aux_loss)
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string or null, got {self.base_model_name_or_path!r}")
        if not isinstance(self.expert_configs, dict) or not all(isinstance(v, dict) for v in self.expert_configs.values()):
            raise ValueError(f"expert_configs must be an object {{expert name: {{...}}}}, got {self.expert_configs!r}")
        if not isinstance(self.modules, dict):
            raise ValueError(f"modules must be an object {{module path: {{ranks, lora_alphas, scalings}}}}, "
                             f"got {type(self.modules).__name__}")
        E = len(names)
        for path, info in self.modules.items():
            if not isinstance(info, dict):
                raise ValueError(f"module {path!r}: expected an object, got {info!r}")
            for key in ("ranks", "lora_alphas", "scalings"):
                values = info.get(key)
                if not isinstance(values, list) or len(values) != E:
                    raise ValueError(f"module {path!r}: {key} must be a list of {E} entries (one per expert), got {values!r}")
            if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in info["ranks"]) or max(info["ranks"]) < 1:
                raise ValueError(f"module {path!r}: ranks must be integers >= 0, at least one > 0, got {info['ranks']!r}")
            for key in ("lora_alphas", "scalings"):
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in info[key]):
                    raise ValueError(f"module {path!r}: {key} must be finite numbers, got {info[key]!r}")
            for key in ("in_features", "out_features"):
                v = info.get(key)
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                    raise ValueError(f"module {path!r}: {key} must be a positive integer, got {v!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> "MiXSEConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        if "expert_names" not in d:
            raise ValueError(f"{where}: missing field 'expert_names'")
        cfg = cls(**dict(d))
        try:
            cfg.validate()
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        return cfg


# --------------------------------------------------------------------------------------------------------
# model structure helpers


def _find_decoder_layers(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``model.layers`` for Llama/Mistral/Qwen2/Gemma/Phi-3)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "num_hidden_layers", None)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    preferred = [c for c in candidates if c[0].split(".")[-1] in ("layers", "h", "blocks")]
    pick = preferred or candidates
    if not pick:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of "
            f"config.num_hidden_layers={n} blocks (e.g. model.layers)"
        )
    return pick[0]


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    size = getattr(cfg, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{type(model).__name__}.config has no integer hidden_size; cannot size the router")
    return size


def _linear_modules(model: nn.Module) -> Dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _match_targets(
    linears: Mapping[str, nn.Linear], target_modules: Union[str, Sequence[str]], layers_prefix: str
) -> List[str]:
    """Linear paths selected by ``target_modules`` (PEFT semantics: a list of names matching a path or
    its dot-separated suffix; a string is a full-match regex; ``"all-linear"`` = every linear inside the
    decoder layers). Every listed name must match something, else ``ValueError`` listing the names."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            picked = [p for p in linears if p.startswith(layers_prefix + ".")]
        else:
            try:
                rx = re.compile(target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({exc})") from exc
            picked = [p for p in linears if rx.fullmatch(p)]
        if not picked:
            raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear in the base model")
        return picked
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a list of module names or a regex string, got {target_modules!r}")
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in linears})
    picked = []
    for t in target_modules:
        hits = [p for p in linears if p == t or p.endswith("." + t)]
        if not hits:
            raise ValueError(
                f"target_modules: {t!r} matches no nn.Linear in the base model; linear module names are {leaf_names}"
            )
    wanted = set(target_modules)
    for p in linears:
        if p in wanted or any(p.endswith("." + t) for t in wanted):
            picked.append(p)
    return picked


def _layer_of(path: str, layers_prefix: str, num_layers: int) -> Optional[int]:
    """Index of the decoder layer holding module ``path``, or None when it is outside the layers."""
    if not path.startswith(layers_prefix + "."):
        return None
    idx = path[len(layers_prefix) + 1:].split(".", 1)[0]
    return int(idx) if idx.isdigit() and int(idx) < num_layers else None


def _check_not_wrapped(model: nn.Module) -> None:
    if any(isinstance(m, MoLoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds MoLoRALinear modules (wrapped twice?); unload() the MiXSE first")


def _input_arg(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _check_finite(tensors: Mapping[str, torch.Tensor], path: pathlib.Path) -> None:
    """Refuse a file holding NaN/inf: a NaN in one expert reaches every token on the dense-rank path."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")


def _cache_argument(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes its KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config) -> Any:
    """An empty ``DynamicCache`` laid out for ``config`` (transformers 5 takes the config; 4.x does not)."""
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------


class MiXSE(nn.Module):
    """A causal LM with E LoRA experts on its target linears and a token-level router.

    Build with :meth:`from_adapters`, :meth:`from_scratch` or :meth:`from_pretrained` (the constructor
    is internal). Attributes not found on MiXSE are looked up on the wrapped model (``config``,
    ``device``, ``get_input_embeddings`` ...).

    Attributes:
        base_model: the wrapped ``transformers`` model (modified in place; :meth:`unload` restores it).
        router: the shared / X-LoRA :class:`TopKRouter` (``None`` for ``"per_layer"``: each
            ``MoLoRALinear`` then has its own ``router``).
        mixse_config: :class:`MiXSEConfig`.
    """

    def __init__(self, base_model: nn.Module, config: MiXSEConfig, layers: Dict[str, MoLoRALinear]) -> None:
        super().__init__()
        config.validate()
        layers_prefix, decoder_layers = _find_decoder_layers(base_model)
        E = len(config.expert_names)

        # ---- validate everything before touching base_model -------------------------------------------
        _check_not_wrapped(base_model)
        if not layers:
            raise ValueError("no target modules: nothing to wrap")
        linears = _linear_modules(base_model)
        layer_index: Dict[str, int] = {}
        for path, layer in layers.items():
            if path not in linears:
                raise ValueError(f"module {path!r} is not an nn.Linear of {type(base_model).__name__}")
            if layer.base_layer is not linears[path]:
                raise ValueError(f"module {path!r}: MoLoRALinear does not wrap the model's own linear")
            if layer.num_experts != E:
                raise ValueError(f"module {path!r} has {layer.num_experts} experts, config names {E}: {config.expert_names}")
            idx = _layer_of(path, layers_prefix, len(decoder_layers))
            if config.router == "shared" and idx is None:
                raise ValueError(
                    f"module {path!r} is outside the decoder layers ({layers_prefix}.*): the shared router reads a "
                    "decoder layer's input, so it cannot route it; use router='per_layer' or 'xlora', or drop it "
                    "from target_modules"
                )
            if idx is not None:
                layer_index[path] = idx
        inner_model = base_model.get_submodule(layers_prefix.rsplit(".", 1)[0]) if "." in layers_prefix else base_model

        # ---- mutate ------------------------------------------------------------------------------------
        self.base_model = base_model
        self.mixse_config = config
        self._state = RoutingState()
        self._state.aux_coefficients = dict(config.aux_loss)
        self._layers_prefix = layers_prefix
        self._lora_modules: Dict[str, MoLoRALinear] = dict(layers)  # plain dict: already registered in base_model
        self._hooks: list = []
        self._attached = True
        self._in_scaling_pass = False
        self._xlora_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.router = None
        self._slots: List[GateSlot] = []
        # Flags as the user had them; MoLoRALinear already froze its base layer, but it remembers the originals.
        self._orig_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        for path, layer in layers.items():
            for n, flag in layer._base_requires_grad.items():
                self._orig_requires_grad[f"{path}.{n}"] = flag

        try:
            self._mutate(base_model, config, layers, layer_index, inner_model, decoder_layers, layers_prefix)
        except BaseException:
            self.unload()  # puts back every linear already swapped, removes hooks, restores requires_grad
            raise

    def _mutate(self, base_model: nn.Module, config: MiXSEConfig, layers: Dict[str, MoLoRALinear],
                layer_index: Dict[str, int], inner_model: nn.Module, decoder_layers: nn.ModuleList,
                layers_prefix: str) -> None:
        """The part of ``__init__`` that changes ``base_model`` (undone by :meth:`unload` if it fails)."""
        E = len(config.expert_names)
        device = _model_device(base_model)
        if config.router in ("shared", "xlora"):
            self.router: Optional[TopKRouter] = TopKRouter(
                _hidden_size(base_model), E, config.top_k, renormalize=config.renormalize, mode=config.routing, device=device
            )
            self.router.state = self._state
        for path, layer in layers.items():
            base_model.set_submodule(path, layer)
            layer.route_key = path
            if layer.router is not None:
                layer.router.state = self._state

        # Freeze the base model; experts per config; routers trainable.
        for p in base_model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.lora_A.requires_grad_(config.trainable_experts)
            layer.lora_B.requires_grad_(config.trainable_experts)
            if layer.router is not None:
                layer.router.requires_grad_(True)

        # Hooks: per-forward bookkeeping (+ the X-LoRA scaling pass) on the inner model, shared gates per layer.
        self._inner_model = [inner_model]  # in a list: not a second registration of the same module
        self._hooks.append(inner_model.register_forward_pre_hook(self._inner_pre_hook, with_kwargs=True))
        self._hooks.append(inner_model.register_forward_hook(self._inner_post_hook))
        self._decoder_layers = [decoder_layers]  # in a list: not registered twice
        if config.router == "shared":
            by_layer: Dict[int, List[MoLoRALinear]] = {}
            for path, idx in layer_index.items():
                by_layer.setdefault(idx, []).append(layers[path])
            for idx, mods in sorted(by_layer.items()):
                key = f"{layers_prefix}.{idx}"
                slot = GateSlot(key)
                self._slots.append(slot)
                for m in mods:
                    m.gate_slot = slot
                self._hooks.append(
                    decoder_layers[idx].register_forward_pre_hook(self._make_shared_hook(key, slot), with_kwargs=True)
                )
        elif config.router == "xlora":
            self._xlora_slot = GateSlot(_XLORA_KEY)
            self._slots.append(self._xlora_slot)
            for m in layers.values():
                m.gate_slot = self._xlora_slot

    # ------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_adapters(
        cls,
        base_model: nn.Module,
        adapters: Mapping[str, Union[PathLike, LoRAAdapter]],
        top_k: int = 1,
        router: str = "shared",
        target_modules: Optional[Union[str, Sequence[str]]] = None,
        *,
        renormalize: bool = False,
        routing: str = "learned",
        aux_loss: Optional[Dict[str, float]] = None,
        expert_dtype: Optional[torch.dtype] = None,
        strict: bool = False,
    ) -> "MiXSE":
        """Attach one PEFT LoRA adapter per expert to ``base_model`` (in place) behind a router.

        Args:
            base_model: a ``transformers`` causal LM with ``nn.Linear`` projections.
            adapters: ``{expert name: adapter directory or LoRAAdapter}`` in router-output order. Each
                adapter's rank/alpha/rank_pattern/alpha_pattern/rsLoRA come from its config; ranks may differ.
            top_k: experts per token, ``1 <= top_k <= len(adapters)``.
            router: ``"shared"`` (default, one pass), ``"xlora"`` (paper's two-pass X-LoRA), ``"per_layer"``.
            target_modules: restrict to these modules (names/suffixes, regex string or ``"all-linear"``).
                Default: the union of the adapters' modules. Adapter weights outside it raise.
            renormalize: renormalise the kept top-k probabilities (default False, as Self-MoE).
            routing: ``"learned"`` or ``"random"`` (ablation).
            aux_loss: optional ``{"load_balancing"|"z_loss"|"mutual_information": coefficient}``; the
                weighted sum is returned as ``output.aux_loss`` for the training loop to add.
            expert_dtype: dtype of the stacked experts (default: each base linear's dtype).
            strict: refuse experts that declare different ``base_model_name_or_path`` values (default:
                a warning).

        Raises ``ValueError``/``FileNotFoundError``/``AdapterFormatError`` naming the expert, file,
        module and shapes; the base model is left untouched when anything fails.
        """
        _check_not_wrapped(base_model)
        if not isinstance(adapters, Mapping) or not adapters:
            raise ValueError(f"adapters must be a non-empty dict {{expert name: adapter path}}, got {adapters!r}")
        names = list(adapters)
        if router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {router!r}")
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
        layers_prefix, _ = _find_decoder_layers(base_model)
        linears = _linear_modules(base_model)
        allowed = set(_match_targets(linears, target_modules, layers_prefix)) if target_modules is not None else None

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
                try:
                    MoLoRALinear._check_expert_shapes(linears[path], A, B, f"{where}: module {path!r}")
                except (ValueError, TypeError) as exc:
                    raise ValueError(str(exc)) from None
                wanted[path] = None
        ordered = [p for p in linears if p in wanted]

        layers: Dict[str, MoLoRALinear] = {}
        modules_info: Dict[str, Dict[str, Any]] = {}
        for path in ordered:
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
            layer = MoLoRALinear.from_linear(
                linears[path], experts, lora_alpha=alphas, top_k=top_k,
                router="linear" if router == "per_layer" else None, scalings=scalings,
                renormalize=renormalize, routing=routing, expert_dtype=expert_dtype,
            )
            layers[path] = layer
            modules_info[path] = cls._module_info(layer)
        config = MiXSEConfig(
            expert_names=names, router=router, top_k=top_k, renormalize=renormalize, routing=routing,
            aux_loss=dict(aux_loss or {}), trainable_experts=False, modules=modules_info,
            expert_configs={n: {"use_rslora": bool(loaded[n].config.get("use_rslora", False)), "source": sources[n]} for n in names},
            base_model_name_or_path=cls._base_name(base_model),
        )
        return cls._attach(base_model, config, layers)

    @classmethod
    def from_scratch(
        cls,
        base_model: nn.Module,
        num_experts: int,
        r: int = 8,
        lora_alpha: float = 16,
        top_k: int = 1,
        router: str = "shared",
        target_modules: Optional[Union[str, Sequence[str]]] = None,
        *,
        expert_names: Optional[Sequence[str]] = None,
        renormalize: bool = False,
        routing: str = "learned",
        aux_loss: Optional[Dict[str, float]] = None,
        expert_dtype: Optional[torch.dtype] = None,
    ) -> "MiXSE":
        """Fresh, trainable experts (PEFT init: B = 0, so the model starts equal to its base) and router,
        for joint expert+router training (MixLoRA style). ``target_modules`` defaults to every linear in
        the decoder layers (``"all-linear"``)."""
        _check_not_wrapped(base_model)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {router!r}")
        check_top_k(top_k, num_experts)
        names = list(expert_names) if expert_names is not None else [f"expert_{i}" for i in range(num_experts)]
        if len(names) != num_experts:
            raise ValueError(f"expert_names has {len(names)} names for num_experts={num_experts}")
        layers_prefix, _ = _find_decoder_layers(base_model)
        linears = _linear_modules(base_model)
        paths = _match_targets(linears, "all-linear" if target_modules is None else target_modules, layers_prefix)
        layers: Dict[str, MoLoRALinear] = {}
        for path in paths:
            layers[path] = MoLoRALinear(
                linears[path], num_experts, r=r, lora_alpha=lora_alpha, top_k=top_k,
                router="linear" if router == "per_layer" else None, renormalize=renormalize, routing=routing,
                expert_dtype=expert_dtype,
            )
        config = MiXSEConfig(
            expert_names=names, router=router, top_k=top_k, renormalize=renormalize, routing=routing,
            aux_loss=dict(aux_loss or {}), trainable_experts=True,
            modules={p: cls._module_info(m) for p, m in layers.items()},
            expert_configs={n: {"use_rslora": False, "source": None} for n in names},
            base_model_name_or_path=cls._base_name(base_model),
        )
        return cls._attach(base_model, config, layers)

    @classmethod
    def from_pretrained(
        cls, directory: PathLike, base_model: nn.Module, *, expert_dtype: Optional[torch.dtype] = None
    ) -> "MiXSE":
        """Re-attach a MiXSE saved with :meth:`save_pretrained` to (a fresh copy of) its base model.

        Everything is read and checked (config fields, tensor names and shapes against the base
        linears) before the base model is modified. Errors name the file and the module.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_not_wrapped(base_model)
        root = pathlib.Path(os.fspath(directory))
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: MiXSE directory not found")
        cfg_path = root / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: {CONFIG_NAME} not found (is this a MiXSE directory?)")
        try:
            with open(cfg_path, "r", encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from exc
        config = MiXSEConfig.from_dict(raw, where=str(cfg_path))

        def read(name: str) -> Dict[str, torch.Tensor]:
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found")
            try:
                return load_file(str(path), device="cpu")
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{path}: cannot read safetensors file (corrupt or truncated?): {exc}") from exc

        experts = read(EXPERTS_NAME)
        router_sd = read(ROUTER_NAME)
        for name, tensors in ((EXPERTS_NAME, experts), (ROUTER_NAME, router_sd)):
            _check_finite(tensors, root / name)

        # ---- check everything against the base model before touching it -------------------------------
        linears = _linear_modules(base_model)
        E = len(config.expert_names)
        expected_keys = set()
        for path, info in config.modules.items():
            where = f"{root / EXPERTS_NAME}: module {path!r}"
            if path not in linears:
                raise ValueError(f"{where} is not an nn.Linear of {type(base_model).__name__}")
            base = linears[path]
            r_max = max(info["ranks"])
            kA, kB = f"{path}.lora_A", f"{path}.lora_B"
            expected_keys.update((kA, kB))
            if kA not in experts or kB not in experts:
                raise ValueError(f"{where}: missing tensor {kA if kA not in experts else kB!r}")
            A, B = experts[kA], experts[kB]
            if tuple(A.shape) != (E, r_max, base.in_features) or tuple(B.shape) != (E, base.out_features, r_max):
                raise ValueError(
                    f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit: expected "
                    f"[{E}, {r_max}, {base.in_features}] / [{E}, {base.out_features}, {r_max}] for the base linear"
                )
        unexpected = sorted(set(experts) - expected_keys)
        if unexpected:
            raise ValueError(f"{root / EXPERTS_NAME}: unexpected tensors {unexpected[:5]} (not in {CONFIG_NAME})")
        in_features = {path: linears[path].in_features for path in config.modules}
        router_sds = cls._split_router_state(router_sd, config, in_features, root / ROUTER_NAME)

        # ---- build and attach; undone if anything fails from here on ------------------------------------
        layers: Dict[str, MoLoRALinear] = {}
        try:
            for path, info in config.modules.items():
                A, B = experts[f"{path}.lora_A"], experts[f"{path}.lora_B"]
                layer = MoLoRALinear(
                    linears[path], E, r=list(info["ranks"]), lora_alpha=info["lora_alphas"], top_k=config.top_k,
                    router="linear" if config.router == "per_layer" else None, renormalize=config.renormalize,
                    routing=config.routing, expert_dtype=expert_dtype or A.dtype, init_lora_weights=False,
                    scalings=info["scalings"],
                )
                layers[path] = layer
                with torch.no_grad():
                    layer.lora_A.copy_(A)
                    layer.lora_B.copy_(B)
        except BaseException:
            for layer in layers.values():
                layer.unwrap()
            raise
        model = cls._attach(base_model, config, layers)
        try:
            with torch.no_grad():
                for owner, sd in router_sds.items():
                    target = model.router if owner == "" else model._lora_modules[owner].router
                    target.load_state_dict(dict(sd), strict=True)
        except BaseException as exc:
            model.unload()
            if isinstance(exc, RuntimeError):  # load_state_dict: keys or shapes the router does not have
                raise ValueError(f"{root / ROUTER_NAME}: {exc}") from exc
            raise
        return model

    @classmethod
    def _attach(cls, base_model: nn.Module, config: MiXSEConfig, layers: Dict[str, MoLoRALinear]) -> "MiXSE":
        """``cls(...)``, undoing the base-layer freezing the new MoLoRALinear modules did if it fails."""
        try:
            return cls(base_model, config, layers)
        except BaseException:
            for layer in layers.values():
                layer.unwrap()
            raise

    @staticmethod
    def _split_router_state(
        sd: Dict[str, torch.Tensor], config: MiXSEConfig, in_features: Dict[str, int], where: pathlib.Path
    ) -> Dict[str, Dict[str, torch.Tensor]]:
        """``{"" (shared/xlora) or module path: router state dict}``, checked for names and shapes
        (``in_features``: each wrapped module's input width, for per-layer routers)."""
        E = len(config.expert_names)
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        if config.router == "per_layer":
            owners: Dict[str, Optional[int]] = dict(in_features)
        else:
            owners = {"": None}
        for owner, d_in in owners.items():
            prefix = "router." if owner == "" else f"{owner}.router."
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and (owner != "" or k.count(".") == 2)}
            if "linear.weight" not in sub:
                raise ValueError(f"{where}: missing tensor {prefix + 'linear.weight'!r}")
            w = sub["linear.weight"]
            if w.dim() != 2 or w.shape[0] != E or (d_in is not None and w.shape[1] != d_in):
                raise ValueError(f"{where}: {prefix}linear.weight has shape {list(w.shape)}, expected [{E}, {d_in or 'hidden_size'}]")
            out[owner] = sub
        claimed = {("router." if o == "" else f"{o}.router.") + k for o, s in out.items() for k in s}
        unexpected = sorted(set(sd) - claimed)
        if unexpected:
            raise ValueError(f"{where}: unexpected tensors {unexpected[:5]}")
        return out

    @staticmethod
    def _module_info(layer: MoLoRALinear) -> Dict[str, Any]:
        return {
            "ranks": list(layer.ranks),
            "lora_alphas": [float(a) for a in layer.lora_alphas],
            "scalings": [float(s) for s in layer.expert_scaling.tolist()],
            "in_features": layer.in_features,
            "out_features": layer.out_features,
        }

    @staticmethod
    def _base_name(base_model: nn.Module) -> Optional[str]:
        name = getattr(getattr(base_model, "config", None), "_name_or_path", None)
        return name or None

    # ------------------------------------------------------------------------------------------------
    # hooks

    def _make_shared_hook(self, key: str, slot: GateSlot):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = _input_arg(args, kwargs, "hidden_states", 0)
            if not isinstance(hidden, torch.Tensor):
                raise RuntimeError(f"{key}: cannot find the decoder layer's hidden_states argument (got {type(hidden).__name__})")
            weights, ids, _ = self.router(hidden, key=key)
            slot.set(ids, weights)
            return None

        return hook

    def _inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._in_scaling_pass:
            return None
        if module.training and torch.is_grad_enabled():
            self._check_checkpointing()
        self._state.begin_forward(_input_arg(args, kwargs, "attention_mask", 1))
        if self.mixse_config.router == "xlora":
            return self._xlora_scaling_pass(module, args, kwargs)
        return None

    def _check_checkpointing(self) -> None:
        """Refuse reentrant gradient checkpointing: the gates reach the LoRA layers through slots, not as
        inputs of the checkpointed function, so a reentrant replay would give the router no gradient
        (transformers 4.x defaults to reentrant; 5.x does not)."""
        for layer in self._decoder_layers[0]:
            if not (getattr(layer, "gradient_checkpointing", False) and layer.training):
                continue
            fn = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", True):
                raise RuntimeError(
                    "MiXSE training needs non-reentrant gradient checkpointing (reentrant checkpointing gives the "
                    "router no gradient): enable it with gradient_checkpointing_enable("
                    "gradient_checkpointing_kwargs={'use_reentrant': False})"
                )
            return

    def _inner_post_hook(self, module: nn.Module, args: tuple, output):
        if self._in_scaling_pass:
            return None
        # Drop the gates (and the autograd graph they hold) once the forward is over, unless gradient
        # checkpointing will replay the layers during backward: the replay reads them from the slots.
        replay = any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in self._decoder_layers[0])
        if not replay:
            for slot in self._slots:
                slot.clear()
        return None

    def _xlora_scaling_pass(self, module: nn.Module, args: tuple, kwargs: dict):
        """X-LoRA: run the inner model once without experts (no grad), route on its last hidden state,
        and hand the gates to every LoRA linear for the real pass that follows."""
        named = dict(kwargs)
        if args:
            params = list(inspect.signature(module.forward).parameters)
            for name, value in zip(params, args):
                named[name] = value
        # transformers 5.24 renamed the cache argument ``past_key_values`` -> ``cache`` (the old name is
        # still accepted by callers until 5.40): read either, hand the inner model the name it declares.
        cache_name = _cache_argument(module)
        past = named.pop("cache", None)
        legacy = named.pop("past_key_values", None)
        if past is None:
            past = legacy
        use_cache = named.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(getattr(module, "config", None), "use_cache", False))
        cfg = getattr(module, "config", None)
        scaling_cache = None
        if past is not None:
            scaling_cache = self._xlora_caches.get(past)
            if scaling_cache is None:
                if past.get_seq_length() > 0:
                    raise RuntimeError(
                        "router='xlora': past_key_values holds tokens this MiXSE did not see; the X-LoRA scaling pass "
                        "keeps a KV cache of its own, so start generation/caching through this model"
                    )
                scaling_cache = _new_cache(cfg)
                self._xlora_caches[past] = scaling_cache
            elif scaling_cache.get_seq_length() != past.get_seq_length():
                raise RuntimeError(
                    f"router='xlora': the scaling-pass cache ({scaling_cache.get_seq_length()} tokens) is out of step with "
                    f"past_key_values ({past.get_seq_length()} tokens); caches cropped or reordered outside the model "
                    "(assisted decoding, beam search) are not supported with router='xlora'"
                )
        elif use_cache:
            past = _new_cache(cfg)
            scaling_cache = _new_cache(cfg)
            self._xlora_caches[past] = scaling_cache
        if past is not None:
            named[cache_name] = past
        scaling_kwargs = dict(named)
        scaling_kwargs[cache_name] = scaling_cache
        scaling_kwargs["use_cache"] = scaling_cache is not None
        scaling_kwargs.pop("output_attentions", None)
        scaling_kwargs.pop("output_hidden_states", None)
        slot = self._xlora_slot
        slot.bypass = True
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                out = module(**scaling_kwargs)
        finally:
            slot.bypass = False
            self._in_scaling_pass = False
        hidden = out[0] if not isinstance(out, torch.Tensor) else out
        weights, ids, _ = self.router(hidden, key=_XLORA_KEY)
        slot.set(ids, weights)
        return (), named

    # ------------------------------------------------------------------------------------------------
    # running

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules", "_parameters", "_buffers") or name.startswith("_"):
                raise
            return getattr(self._modules["base_model"], name)

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this MiXSE was unloaded; its base model no longer holds the experts")

    def forward(self, *args, **kwargs):
        """Same arguments and outputs as the wrapped model (``input_ids``, ``attention_mask``, ``labels``,
        ``past_key_values`` ... -> ``.loss``, ``.logits``). With ``aux_loss`` configured, the output also
        has ``aux_loss`` (already weighted; add it to ``loss`` in the training loop)."""
        self._check_attached()
        out = self.base_model(*args, **kwargs)
        if self._state.aux_coefficients and hasattr(out, "keys"):
            out["aux_loss"] = self.router_aux_loss()
        return out

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate`` (KV cache included; routing runs per new token)."""
        self._check_attached()
        return self.base_model.generate(*args, **kwargs)

    def router_aux_loss(self) -> torch.Tensor:
        """Weighted router losses of the last forward (float32 scalar; 0 if none configured)."""
        return compute_aux_loss(self._state.aux_records, self._state.aux_coefficients)

    @contextlib.contextmanager
    def routing_stats(self) -> Iterator[RoutingStats]:
        """Collect per-layer, per-expert routing statistics inside the block::

            with model.routing_stats() as stats:
                model(**batch)
            stats.summary()  # {layer: {"usage": {expert: fraction}, "mean_gate": ..., "tokens": n}}
        """
        stats = RoutingStats(self.expert_names)
        previous, self._state.stats = self._state.stats, stats
        try:
            yield stats
        finally:
            self._state.stats = previous

    @contextlib.contextmanager
    def disable_experts(self) -> Iterator[None]:
        """Run as the plain base model inside the block (routers are not called)."""
        layers = list(self._lora_modules.values())
        previous = [m.experts_enabled for m in layers]
        for m in layers:
            m.experts_enabled = False
        try:
            yield
        finally:
            for m, p in zip(layers, previous):
                m.experts_enabled = p

    def configure_routing(
        self, *, top_k: Optional[int] = None, renormalize: Optional[bool] = None, routing: Optional[str] = None
    ) -> None:
        """Change top-k / renormalisation / routing mode of every router in place (e.g. for the paper's
        top-2, all-experts and random-routing ablations on one trained model)."""
        cfg = self.mixse_config
        if top_k is not None:
            check_top_k(top_k, len(cfg.expert_names))
        if routing is not None and routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        routers = [self.router] if self.router is not None else [m.router for m in self._lora_modules.values()]
        for rt in routers:
            if top_k is not None:
                rt.top_k = top_k
            if renormalize is not None:
                rt.renormalize = bool(renormalize)
            if routing is not None:
                rt.mode = routing
        for m in self._lora_modules.values():
            if top_k is not None:
                m.top_k = top_k
        cfg.top_k = top_k if top_k is not None else cfg.top_k
        cfg.renormalize = bool(renormalize) if renormalize is not None else cfg.renormalize
        cfg.routing = routing if routing is not None else cfg.routing

    # ------------------------------------------------------------------------------------------------
    # introspection

    @property
    def expert_names(self) -> List[str]:
        return list(self.mixse_config.expert_names)

    @property
    def num_experts(self) -> int:
        return len(self.mixse_config.expert_names)

    @property
    def lora_modules(self) -> Dict[str, MoLoRALinear]:
        """``{module path: MoLoRALinear}`` in model order."""
        return dict(self._lora_modules)

    def router_parameters(self) -> List[nn.Parameter]:
        """The router parameters (what Self-MoE trains)."""
        if self.router is not None:
            return list(self.router.parameters())
        return [p for m in self._lora_modules.values() for p in m.router.parameters()]

    def num_parameters_summary(self) -> Dict[str, int]:
        """``{"trainable", "router", "experts", "total"}`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        experts = sum(m.lora_A.numel() + m.lora_B.numel() for m in self._lora_modules.values())
        router = sum(p.numel() for p in self.router_parameters())
        return {"trainable": trainable, "router": router, "experts": experts, "total": total}

    # ------------------------------------------------------------------------------------------------
    # saving

    def _expert_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for path, m in self._lora_modules.items():
            out[f"{path}.lora_A"] = m.lora_A.detach().to("cpu", copy=True).contiguous()
            out[f"{path}.lora_B"] = m.lora_B.detach().to("cpu", copy=True).contiguous()
        return out

    def _router_tensors(self) -> Dict[str, torch.Tensor]:
        if self.router is not None:
            items = {f"router.{k}": v for k, v in self.router.state_dict().items()}
        else:
            items = {f"{p}.router.{k}": v for p, m in self._lora_modules.items() for k, v in m.router.state_dict().items()}
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in items.items()}

    def save_pretrained(self, save_directory: PathLike, overwrite: bool = True) -> None:
        """Write config, experts and router (not the base model) to ``save_directory`` atomically: the
        directory appears complete or not at all (see :func:`selfmoe.io_utils.atomic_directory`)."""
        from safetensors.torch import save_file

        self._check_attached()
        cfg = self.mixse_config
        cfg.modules = {p: self._module_info(m) for p, m in self._lora_modules.items()}
        cfg.validate()
        meta = {"format": "pt", "selfmoe_version": __version__}
        experts, router = self._expert_tensors(), self._router_tensors()
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            save_file(experts, str(tmp / EXPERTS_NAME), metadata=meta)
            save_file(router, str(tmp / ROUTER_NAME), metadata=meta)
            atomic_write_json(tmp / CONFIG_NAME, cfg.to_dict())

    def save_expert(self, name: str, save_directory: PathLike, overwrite: bool = True) -> None:
        """Export one expert as a PEFT LoRA adapter directory (loads in PEFT and in :meth:`from_adapters`).

        Per-module ranks/alphas that differ from the most common one are written as exact
        ``rank_pattern``/``alpha_pattern`` entries.
        """
        self._check_attached()
        if name not in self.mixse_config.expert_names:
            raise KeyError(f"no expert named {name!r}; experts are {self.expert_names}")
        e = self.mixse_config.expert_names.index(name)
        rslora = bool(self.mixse_config.expert_configs.get(name, {}).get("use_rslora", False))
        weights, alphas = {}, {}
        for path, m in self._lora_modules.items():
            pair = m.expert_weights(e)
            if pair is None:
                continue
            weights[path] = pair
            alphas[path] = m.lora_alphas[e]
            r_e = pair[0].shape[0]
            expected = alphas[path] / (r_e ** 0.5 if rslora else r_e)
            actual = float(m.expert_scaling[e])
            if abs(expected - actual) > 1e-6 * max(1.0, abs(actual)):
                raise ValueError(
                    f"expert {name!r} at {path!r}: scaling {actual} is not lora_alpha/r ({expected}); "
                    "it cannot be written as a PEFT adapter config"
                )
        if not weights:
            raise ValueError(f"expert {name!r} has no weights in any module")
        r = Counter(p[0].shape[0] for p in weights.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        alpha_pattern = {re.escape(p): a for p, a in alphas.items() if a != alpha}
        extra: Dict[str, Any] = {"alpha_pattern": alpha_pattern, "use_rslora": rslora}
        save_lora_adapter(
            save_directory, weights, r=int(r), lora_alpha=alpha, base_model_name_or_path=self.mixse_config.base_model_name_or_path,
            extra_config=extra, overwrite=overwrite,
        )

    # ------------------------------------------------------------------------------------------------
    # changing the expert set

    def add_expert(
        self, name: str, adapter: Union[PathLike, LoRAAdapter], *, router_init_logit: Optional[float] = None
    ) -> int:
        """Add one more expert from a PEFT adapter (ModuleFormer-style extension).

        The router(s) grow by one output; old router rows and old experts keep their exact values and
        experts stay frozen. Modules the new adapter targets that were not wrapped yet are wrapped, with
        absent (zero) old experts. ``router_init_logit``: see :meth:`TopKRouter.add_expert` (a very
        negative value starts the expert closed, so outputs are unchanged until the router learns).
        Parameters are replaced by larger ones: rebuild the optimizer. Returns the new expert's index.
        """
        self._check_attached()
        cfg = self.mixse_config
        check_safe_name(name, "expert name")
        if name in cfg.expert_names:
            raise ValueError(f"an expert named {name!r} already exists: {self.expert_names}")
        source = None
        if isinstance(adapter, LoRAAdapter):
            ad = adapter
        else:
            ad, source = load_lora_adapter(adapter), os.fspath(adapter)
        where = f"adapter {name!r}" + (f" ({source})" if source else "")
        E = len(cfg.expert_names)
        base_linears: Dict[str, nn.Linear] = {}
        for p, m in self.base_model.named_modules():
            if isinstance(m, MoLoRALinear):
                base_linears[p] = m.base_layer
            elif isinstance(m, nn.Linear) and not self._inside_lora_module(p):
                base_linears[p] = m
        layers_prefix, decoder_layers = _find_decoder_layers(self.base_model)
        new_paths = []
        for path, (A, B) in ad.weights.items():
            if path not in base_linears:
                raise ValueError(f"{where}: module {path!r} is not an nn.Linear of {type(self.base_model).__name__}")
            try:
                MoLoRALinear._check_expert_shapes(base_linears[path], A, B, f"{where}: module {path!r}")
            except (ValueError, TypeError) as exc:
                raise ValueError(str(exc)) from None
            if path not in self._lora_modules:
                if cfg.router == "shared" and _layer_of(path, layers_prefix, len(decoder_layers)) is None:
                    raise ValueError(f"{where}: module {path!r} is outside the decoder layers; the shared router cannot route it")
                new_paths.append(path)
        dtype_ref = next(iter(self._lora_modules.values())).lora_A.dtype

        # All checks passed: mutate.
        for path, m in self._lora_modules.items():
            if path in ad.weights:
                A, B = ad.weights[path]
                m.add_expert(A.to(m.lora_A.device), B.to(m.lora_B.device), ad.alpha_for(path),
                             scaling=ad.scaling_for(path), router_init_logit=router_init_logit)
            else:
                m.add_expert(None, None, float(ad.lora_alpha), router_init_logit=router_init_logit)
        for path in [p for p in base_linears if p in new_paths]:
            experts: List[Any] = [None] * E + [ad.weights[path]]
            layer = MoLoRALinear.from_linear(
                base_linears[path], experts, lora_alpha=[float(ad.lora_alpha)] * E + [ad.alpha_for(path)],
                top_k=cfg.top_k, router="linear" if cfg.router == "per_layer" else None,
                scalings=[0.0] * E + [ad.scaling_for(path)], renormalize=cfg.renormalize, routing=cfg.routing,
                expert_dtype=dtype_ref,
            )
            layer.lora_A.requires_grad_(cfg.trainable_experts)
            layer.lora_B.requires_grad_(cfg.trainable_experts)
            self.base_model.set_submodule(path, layer)
            layer.route_key = path
            if layer.router is not None:
                layer.router.state = self._state
            if cfg.router == "shared":
                idx = _layer_of(path, layers_prefix, len(decoder_layers))
                layer.gate_slot = self._shared_slot(idx, layers_prefix, decoder_layers)
            elif cfg.router == "xlora":
                layer.gate_slot = self._xlora_slot
            self._lora_modules[path] = layer
        if new_paths:
            order = [p for p, _ in self.base_model.named_modules()]
            self._lora_modules = {p: self._lora_modules[p] for p in order if p in self._lora_modules}
        if self.router is not None:
            self.router.add_expert(router_init_logit)
        cfg.expert_names.append(name)
        cfg.expert_configs[name] = {"use_rslora": bool(ad.config.get("use_rslora", False)), "source": source}
        cfg.modules = {p: self._module_info(m) for p, m in self._lora_modules.items()}
        return E

    def _inside_lora_module(self, path: str) -> bool:
        """Whether ``path`` is a child of one of our MoLoRALinear modules (its base layer or router)."""
        for suffix in (".base_layer", ".router.linear"):
            if path.endswith(suffix) and path[: -len(suffix)] in self._lora_modules:
                return True
        return False

    def _shared_slot(self, idx: int, layers_prefix: str, decoder_layers: nn.ModuleList) -> GateSlot:
        """The gate slot of decoder layer ``idx`` (created, with its hook, when a layer gets its first expert)."""
        key = f"{layers_prefix}.{idx}"
        for m in self._lora_modules.values():
            if m.gate_slot is not None and m.gate_slot.name == key:
                return m.gate_slot
        slot = GateSlot(key)
        self._slots.append(slot)
        self._hooks.append(decoder_layers[idx].register_forward_pre_hook(self._make_shared_hook(key, slot), with_kwargs=True))
        return slot

    def unload(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back (unmerged, same objects), remove the hooks, restore the
        base parameters' ``requires_grad`` flags and return the plain base model. This MiXSE is unusable after."""
        self._check_attached()
        base = self.base_model
        for path, m in self._lora_modules.items():
            base.set_submodule(path, m.unwrap())
            m.gate_slot = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for n, p in base.named_parameters():
            if n in self._orig_requires_grad:
                p.requires_grad_(self._orig_requires_grad[n])
        self._lora_modules = {}
        self._attached = False
        return base

    def extra_repr(self) -> str:
        cfg = self.mixse_config
        return (
            f"experts={cfg.expert_names}, router={cfg.router!r}, top_k={cfg.top_k}, renormalize={cfg.renormalize}, "
            f"routing={cfg.routing!r}, lora_modules={len(self._lora_modules)}"
        )
