"""``MiXSE``: a Hugging Face causal LM with its target linears replaced, in place, by ``MoLoRALinear``.

Three lines::

    base = AutoModelForCausalLM.from_pretrained(...)
    model = MiXSE.from_adapters(base, {"math": "experts/math", "code": "experts/code"}, top_k=1)
    out = model(input_ids, attention_mask=mask, labels=input_ids); out.loss.backward()  # trains the router only

Design (docs/design.md, "The model layer"):

- The wrapped model stays a normal ``transformers`` model: routing happens inside its modules (the
  LoRA linears, and forward pre-hooks on the decoder layers or the inner decoder model), so its own
  ``forward``/``generate``/KV cache/gradient checkpointing keep working. ``MiXSE.forward`` and
  ``MiXSE.generate`` simply call the wrapped model.
- Router kinds, one :mod:`selfmoe.placements` class each: ``"shared"`` (one router, gates computed once
  per decoder layer from the layer's input hidden state), ``"xlora"`` (the paper's two-pass X-LoRA),
  ``"per_layer"`` (a router per LoRA linear). ``top_k``, ``renormalize`` and the routing mode live in
  the routers; :attr:`MiXSE.mixse_config` reads them from there.
- Building (:mod:`selfmoe.mixse_build`): adapters targeting different module sets are merged as a union;
  trainable are only the router(s) for ``from_adapters``/``from_pretrained`` (base and experts frozen,
  as in Self-MoE), experts and router for ``from_scratch`` (MixLoRA-style joint training).
- On disk (:mod:`selfmoe.mixse_files`): ``mixse_config.json``, ``experts.safetensors``,
  ``router.safetensors``, written atomically; the base model is not saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import mixse_build, mixse_files
from .adapters import LoRAAdapter
from .io_utils import PathLike
from .layer import MoLoRALinear
from .mixse_config import CONFIG_NAME, EXPERTS_NAME, ROUTER_NAME, MiXSEConfig
from .intuition import IntuitionConfig, IntuitionPrior, kmeans, masked_mean
from .placements import _new_cache, input_arg, make_placement
from .prefix_cache import cache_kwarg
from .routers import ROUTING_MODES, RouterState, TopKRouter, check_top_k, compute_aux_loss
from .stats import RoutingStats, RowGroupedStats
from .targets import find_decoder_layers, layer_index_of, linear_modules, model_device

__all__ = ["MiXSE", "MiXSEConfig", "CONFIG_NAME", "EXPERTS_NAME", "ROUTER_NAME"]


class MiXSE(nn.Module):
    """A causal LM with E LoRA experts on its target linears and a token-level router.

    Build with :meth:`from_adapters`, :meth:`from_scratch` or :meth:`from_pretrained` (the constructor
    is internal). Attributes not found on MiXSE are looked up on the wrapped model (``config``,
    ``device``, ``get_input_embeddings`` ...).

    Attributes:
        base_model: the wrapped ``transformers`` model (modified in place; :meth:`unload` restores it).
        router: the shared / X-LoRA :class:`TopKRouter` (``None`` for ``"per_layer"``: each
            ``MoLoRALinear`` then has its own ``router``).
        mixse_config: :class:`MiXSEConfig` as it stands (a fresh copy on each read).
    """

    def __init__(self, base_model: nn.Module, config: MiXSEConfig, layers: Dict[str, MoLoRALinear]) -> None:
        super().__init__()
        config.validate()
        placement = make_placement(config.router)
        layers_prefix, decoder_layers = find_decoder_layers(base_model)
        E = len(config.expert_names)

        # ---- validate everything before touching base_model -------------------------------------------
        mixse_build.check_not_wrapped(base_model)
        if not layers:
            raise ValueError("no target modules: nothing to wrap")
        linears = linear_modules(base_model)
        for path, layer in layers.items():
            if path not in linears:
                raise ValueError(f"module {path!r} is not an nn.Linear of {type(base_model).__name__}")
            if layer.base_layer is not linears[path]:
                raise ValueError(f"module {path!r}: MoLoRALinear does not wrap the model's own linear")
            if layer.num_experts != E:
                raise ValueError(f"module {path!r} has {layer.num_experts} experts, config names {E}: {config.expert_names}")
            why = placement.check_module(path, layer_index_of(path, layers_prefix, len(decoder_layers)))
            if why:
                raise ValueError(why)
        inner_model = base_model.get_submodule(layers_prefix.rsplit(".", 1)[0]) if "." in layers_prefix else base_model

        # ---- mutate; unload() undoes whatever was done if it fails --------------------------------------
        self.base_model = base_model
        self._config = config
        self._placement = placement
        self._state = RouterState()
        self._state.aux_coefficients = dict(config.aux_loss)
        self._layers_prefix = layers_prefix
        self._decoder_layers = [decoder_layers]  # in a list: not registered twice
        # Model order, whatever order the caller (or a config file, whose keys are sorted) gave: the
        # HyperExpert's layer embeddings are indexed by it. A plain dict: already registered in base_model.
        self._lora_modules: Dict[str, MoLoRALinear] = {p: layers[p] for p in linears if p in layers}
        self._hooks: list = []
        self._attached = True
        self.router: Optional[TopKRouter] = None
        self.hyper: Optional[nn.Module] = None
        # Intuition routing (selfmoe/intuition.py): the prior module, a user's sequence encoder, the prior
        # kept per KV cache (so new tokens reuse their prompt's prior) and the flag of the embedding pass.
        self.intuition: Optional[IntuitionPrior] = None
        self._intuition_encoder: Optional[Callable[..., torch.Tensor]] = None
        self._priors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._prior_pass = False
        # Flags as the user had them; MoLoRALinear already froze its base layer, but it remembers the originals.
        self._orig_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        for path, layer in layers.items():
            for n, flag in layer._base_requires_grad.items():
                self._orig_requires_grad[f"{path}.{n}"] = flag
        try:
            self._mutate(base_model, config, inner_model)
        except BaseException:
            self.unload()  # puts back every linear already swapped, removes hooks, restores requires_grad
            raise

    def _mutate(self, base_model: nn.Module, config: MiXSEConfig, inner_model: nn.Module) -> None:
        router = self._placement.make_router(base_model, config, model_device(base_model))
        if router is not None:
            router.state = self._state
            self.router = router
        decoder_layers = self._decoder_layers[0]
        for path, layer in self._lora_modules.items():
            base_model.set_submodule(path, layer)
            self._placement.attach_layer(self, path, layer, layer_index_of(path, self._layers_prefix, len(decoder_layers)))
        # Freeze the base model; experts per config; routers trainable.
        for p in base_model.parameters():
            p.requires_grad_(False)
        for layer in self._lora_modules.values():
            layer.lora_A.requires_grad_(config.trainable_experts)
            layer.lora_B.requires_grad_(config.trainable_experts)
        for rt in self._placement.routers(self):
            rt.requires_grad_(True)
        if config.hyper_expert is not None:  # trains with the router(s)
            from .hyper import HyperExpert

            shapes = [(m.in_features, m.out_features) for m in self._lora_modules.values()]
            self.hyper = HyperExpert(len(config.expert_names), shapes, config.hyper_expert, device=model_device(base_model))
            self.hyper.requires_grad_(True)
            self._wire_hyper()
        if config.intuition is not None:
            icfg = IntuitionConfig.from_dict(config.intuition)
            if icfg.layer > len(decoder_layers):
                raise ValueError(f"intuition.layer={icfg.layer}: the model has {len(decoder_layers)} decoder layers")
            self.intuition = IntuitionPrior(icfg, len(config.expert_names), device=model_device(base_model))
            for rt in self._placement.routers(self):
                rt.enable_prior()
        # Per-forward bookkeeping (and the X-LoRA scaling pass) around the inner decoder model.
        self._hooks.append(inner_model.register_forward_pre_hook(self._inner_pre_hook, with_kwargs=True))
        self._hooks.append(inner_model.register_forward_hook(self._inner_post_hook))

    def _wire_hyper(self) -> None:
        """Tell every LoRA linear the HyperExpert and its index there (model order)."""
        for i, m in enumerate(self._lora_modules.values()):
            m.hyper_expert = (self.hyper, i) if self.hyper is not None else None

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
        hyper_expert: Union[None, bool, Dict[str, int]] = None,
        intuition: Optional[IntuitionConfig] = None,
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
            aux_loss: optional ``{"load_balancing"|"z_loss"|"mutual_information"|"concentration": coefficient}``; the
                weighted sum is returned as ``output.aux_loss`` for the training loop to add.
            expert_dtype: dtype of the stacked experts (default: each base linear's dtype).
            strict: refuse experts that declare different ``base_model_name_or_path`` values (default:
                a warning).
            hyper_expert: HyperMoE's HyperExpert (:mod:`selfmoe.hyper`): ``True`` (its sizes:
                ``selfmoe.choices.HYPER_DEFAULTS``) or a dict overriding some of them. Per token, the
                unselected experts' embeddings generate an adapter added to the selected experts' output;
                it trains with the router (:meth:`router_parameters`) and starts as a no-op.
            intuition: add an intuition prior (:mod:`selfmoe.intuition`) to the router(s); fit its
                centroids with :meth:`fit_intuition` before the first forward.

        Raises ``ValueError``/``FileNotFoundError``/``AdapterFormatError`` naming the expert, file,
        module and shapes; the base model is left untouched when anything fails.
        """
        config, layers = mixse_build.build_from_adapters(
            base_model, adapters, top_k=top_k, router=router, target_modules=target_modules, renormalize=renormalize,
            routing=routing, aux_loss=aux_loss, expert_dtype=expert_dtype, strict=strict, hyper_expert=hyper_expert)
        config.intuition = intuition.to_dict() if intuition is not None else None
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
        hyper_expert: Union[None, bool, Dict[str, int]] = None,
        intuition: Optional[IntuitionConfig] = None,
    ) -> "MiXSE":
        """Fresh, trainable experts (PEFT init: B = 0, so the model starts equal to its base) and router,
        for joint expert+router training (MixLoRA style). ``target_modules`` defaults to every linear in
        the decoder layers (``"all-linear"``)."""
        config, layers = mixse_build.build_from_scratch(
            base_model, num_experts, r=r, lora_alpha=lora_alpha, top_k=top_k, router=router,
            target_modules=target_modules, expert_names=expert_names, renormalize=renormalize, routing=routing,
            aux_loss=aux_loss, expert_dtype=expert_dtype, hyper_expert=hyper_expert)
        config.intuition = intuition.to_dict() if intuition is not None else None
        return cls._attach(base_model, config, layers)

    @classmethod
    def from_rank1(
        cls,
        base_model: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        top_k: Optional[int] = None,
        target_modules: Optional[Union[str, Sequence[str]]] = None,
        *,
        mix_and_match: Optional[Sequence[int]] = None,
        router: str = "per_layer",
        renormalize: bool = False,
        aux_loss: Optional[Dict[str, float]] = None,
        expert_dtype: Optional[torch.dtype] = None,
        intuition: Optional[IntuitionConfig] = None,
    ) -> "MiXSE":
        """A mixture of rank-1 experts (MoR1E, Liu et al. 2024; :mod:`selfmoe.rank1`): on every target
        linear a rank-``r`` LoRA whose ``r`` rank-1 components are the experts, gated per token by a
        router per layer (``router="per_layer"``, the paper's; or ``"shared"``), trained jointly from the
        PEFT init (B = 0: the model starts equal to its base).

        Args:
            r: the LoRA rank = the number of experts (ignored with ``mix_and_match``).
            lora_alpha: each component is scaled by ``lora_alpha / r`` (``/ r1`` for mix-and-match), the
                scaling of the rank-r LoRA it is part of.
            top_k: experts per token; ``None`` (default) = all of them (dense softmax gating, the paper's).
            mix_and_match: ``(r1, r2)``: the ``r1 * r2`` experts are the pairs ``b_j a_i^T`` of ``r1`` A
                rows and ``r2`` B columns (expert ``i * r2 + j``, named ``a<i>b<j>``).
            intuition: an intuition prior mixed into every router (fit it with :meth:`fit_intuition`).
            Other arguments as in :meth:`from_scratch`. ``target_modules`` defaults to ``"all-linear"``.
        """
        if mix_and_match is not None:
            from .rank1 import check_mix_and_match

            r1, r2 = check_mix_and_match(tuple(mix_and_match))
            num, a_rows = r1 * r2, r1
            names = [f"a{i}b{j}" for i in range(r1) for j in range(r2)]
        else:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"r must be an int >= 1 (the number of rank-1 experts), got {r!r}")
            num, a_rows = r, r
            names = [f"rank{i}" for i in range(r)]
        k = num if top_k is None else top_k
        config, layers = mixse_build.build_from_scratch(
            base_model, num, r=1, lora_alpha=float(lora_alpha) / a_rows, top_k=k, router=router,
            target_modules=target_modules, expert_names=names, renormalize=renormalize, routing="learned",
            aux_loss=aux_loss, expert_dtype=expert_dtype,
            mix_and_match=None if mix_and_match is None else (r1, r2))
        config.intuition = intuition.to_dict() if intuition is not None else None
        return cls._attach(base_model, config, layers)

    @classmethod
    def from_pretrained(cls, directory: PathLike, base_model: nn.Module, *,
                        expert_dtype: Optional[torch.dtype] = None,
                        intuition_encoder: Optional[Callable[..., torch.Tensor]] = None) -> "MiXSE":
        """Re-attach a MiXSE saved with :meth:`save_pretrained` to (a fresh copy of) its base model.

        Everything is read and checked (config fields, finite values, tensor names and shapes against
        the base linears) before the base model is modified; a failure after that restores it. Errors
        name the file and the module. ``intuition_encoder``: the sequence encoder of a MiXSE whose
        intuition prior was fitted with one (see :meth:`set_intuition_encoder`).
        """
        model = mixse_files.load_mixse(cls, directory, base_model, expert_dtype)
        if intuition_encoder is not None:
            model.set_intuition_encoder(intuition_encoder)
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

    # ------------------------------------------------------------------------------------------------
    # hooks on the inner decoder model

    def _inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if getattr(self._placement, "in_scaling_pass", False) or self._prior_pass:
            return None
        if module.training and torch.is_grad_enabled():
            _refuse_reentrant_checkpointing(self._decoder_layers[0])
        self._state.begin_forward(input_arg(args, kwargs, "attention_mask", 1))
        if self.intuition is None:
            return self._placement.before_forward(self, module, args, kwargs)
        kwargs = self._route_prior(module, args, dict(kwargs))
        out = self._placement.before_forward(self, module, args, kwargs)
        return (args, kwargs) if out is None else out

    # ------------------------------------------------------------------------------------------------
    # intuition routing (selfmoe/intuition.py)

    def set_intuition_encoder(self, encoder: Optional[Callable[..., torch.Tensor]]) -> None:
        """Embed sequences with ``encoder(input_ids=..., attention_mask=...) -> [B, D]`` instead of the base
        model's pooled hidden state (e.g. a sentence encoder). Not saved: pass it again after loading."""
        if self.intuition is None:
            raise ValueError("this MiXSE has no intuition prior")
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be callable, got {type(encoder).__name__}")
        self._intuition_encoder = encoder

    @torch.no_grad()
    def sequence_embeddings(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                            inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, D]`` float32 embedding of each sequence, as the intuition prior sees it: the user's encoder,
        or the base model's hidden state at ``intuition.layer`` (0: the token embeddings) mean-pooled over
        ``attention_mask``, computed without experts and without gradient."""
        if self.intuition is None:
            raise ValueError("this MiXSE has no intuition prior")
        if self._intuition_encoder is not None:
            emb = self._intuition_encoder(input_ids=input_ids, attention_mask=attention_mask)
            if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
                raise ValueError(f"the intuition encoder must return a [B, D] tensor, got {getattr(emb, 'shape', emb)!r}")
            return emb.float()
        layer = self.intuition.config.layer
        if layer == 0:
            hidden = inputs_embeds if inputs_embeds is not None else self.base_model.get_input_embeddings()(input_ids)
            return masked_mean(hidden, attention_mask)
        return masked_mean(self._hidden_at(layer, input_ids, attention_mask, inputs_embeds), attention_mask)

    def _hidden_at(self, layer: int, input_ids, attention_mask, inputs_embeds) -> torch.Tensor:
        """The output of decoder layer ``layer`` (1-based) from an expert-free pass that stops right after it."""
        inner = self._inner_model()
        captured: Dict[str, torch.Tensor] = {}

        def grab(module: nn.Module, args: tuple, output: Any) -> None:
            captured["h"] = output[0] if isinstance(output, (tuple, list)) else output
            raise _StopPass

        handle = self._decoder_layers[0][layer - 1].register_forward_hook(grab)
        slots = self._placement.slots
        bypass = [slot.bypass for slot in slots]
        self._prior_pass = True
        try:
            for slot in slots:
                slot.bypass = True
            with self.disable_experts():
                inner(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False)
        except _StopPass:
            pass
        finally:
            handle.remove()
            self._prior_pass = False
            for slot, b in zip(slots, bypass):
                slot.bypass = b
        return captured["h"]

    def _inner_model(self) -> nn.Module:
        prefix = self._layers_prefix
        return self.base_model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else self.base_model

    def _route_prior(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """Put this forward's prior ``[B, E]`` in the router state: computed from the input when the KV
        cache is empty (or absent), else the one kept for that cache (a generated token reuses its
        prompt's prior). Returns the forward's kwargs, with a cache added when ``use_cache`` needs one
        (so the prior can be kept against it)."""
        cache_name = cache_kwarg(module)
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = input_arg(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        if past is None and kwargs.get("use_cache", getattr(getattr(module, "config", None), "use_cache", False)):
            past = _new_cache(getattr(module, "config", None))
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            kwargs[cache_name] = past
        seen = past.get_seq_length() if past is not None else 0
        if seen > 0:
            prior = self._priors.get(past)
            if prior is None:
                raise RuntimeError("intuition routing: this KV cache holds tokens this MiXSE did not see, so their "
                                   "prior is unknown; start generation/caching through this model")
            B = (input_ids if input_ids is not None else embeds).shape[0]
            if prior.shape[0] != B:
                raise RuntimeError(f"intuition routing: the cache was started for {prior.shape[0]} sequences, this step "
                                   f"has {B} (beam search and cache reordering are not supported)")
        else:
            prior = self.intuition(self.sequence_embeddings(input_ids, kwargs.get("attention_mask"), embeds))
            if past is not None:
                self._priors[past] = prior.detach()
        self._state.prior = prior
        return kwargs

    @torch.no_grad()
    def fit_intuition(self, batches: Iterable[Mapping[str, torch.Tensor]], labels: Optional[Sequence[int]] = None,
                      *, seed: int = 0, iters: int = 50) -> torch.Tensor:
        """Fit the prior's centroids on training data and return them ``[C, D]``.

        ``batches``: mappings with ``input_ids [B, S]`` and ``attention_mask [B, S]`` (the training data in
        batches). Without ``labels``: spherical k-means into ``intuition.clusters`` clusters (deterministic
        for ``seed``). With ``labels`` (one expert index per sequence, in batch order; the experts' own
        domains): centroid e = the normalised mean embedding of the sequences labelled e (C = E).
        """
        if self.intuition is None:
            raise ValueError("this MiXSE has no intuition prior")
        device = self.intuition.centroids.device
        embs = []
        for b in batches:
            mask = b.get("attention_mask")
            embs.append(self.sequence_embeddings(b["input_ids"].to(device), None if mask is None else mask.to(device)))
        if not embs:
            raise ValueError("fit_intuition: no batches")
        points = torch.cat(embs).float()
        C = self.intuition.config.clusters
        if labels is None:
            centroids = kmeans(points, C, iters=iters, seed=seed)
        else:
            lab = torch.as_tensor(list(labels), dtype=torch.long, device=points.device)
            if lab.shape[0] != points.shape[0]:
                raise ValueError(f"fit_intuition: {lab.shape[0]} labels for {points.shape[0]} sequences")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= C):
                raise ValueError(f"fit_intuition: labels must lie in [0, {C}), got {int(lab.min())}..{int(lab.max())}")
            counts = torch.bincount(lab, minlength=C)
            if (counts == 0).any():
                missing = [self.expert_names[i] if i < self.num_experts else i for i in (counts == 0).nonzero().flatten().tolist()]
                raise ValueError(f"fit_intuition: no training sequences for clusters {missing}")
            unit = torch.nn.functional.normalize(points, dim=-1)
            centroids = torch.zeros(C, points.shape[1], device=points.device).index_add_(0, lab, unit) / counts[:, None]
        self.intuition.set_centroids(centroids.to(device))
        return self.intuition.centroids.detach().clone()

    def _inner_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if getattr(self._placement, "in_scaling_pass", False):
            return None
        # Drop the gates (and the autograd graph they hold) once the forward is over, unless gradient
        # checkpointing will replay the layers during backward: the replay reads them from the slots.
        replay = any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in self._decoder_layers[0])
        if not replay:
            for slot in self._placement.slots:
                slot.clear()
        return None

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
    def routing_stats_by_rows(self, num_groups: int) -> Iterator[RowGroupedStats]:
        """Like :meth:`routing_stats`, but kept apart for ``num_groups`` groups of batch rows: call
        ``set_rows([group of each row])`` on the yielded object before each forward whose batch
        changed; its ``groups[g]`` is group ``g``'s :class:`RoutingStats`."""
        stats = RowGroupedStats(self.expert_names, num_groups)
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
        if top_k is not None:
            check_top_k(top_k, self.num_experts)
        if routing is not None and routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        for rt in self._placement.routers(self):
            if top_k is not None:
                rt.top_k = top_k
            if renormalize is not None:
                rt.renormalize = bool(renormalize)
            if routing is not None:
                rt.mode = routing

    # ------------------------------------------------------------------------------------------------
    # introspection

    @property
    def mixse_config(self) -> MiXSEConfig:
        """The configuration as it stands: routing settings from the routers, ranks from the layers."""
        rt = self._placement.routers(self)[0]
        cfg = self._config
        return dataclasses.replace(
            cfg, expert_names=list(cfg.expert_names), top_k=rt.top_k, renormalize=rt.renormalize, routing=rt.mode,
            aux_loss=dict(self._state.aux_coefficients), expert_configs={k: dict(v) for k, v in cfg.expert_configs.items()},
            pruned_experts=list(cfg.pruned_experts),
            hyper_expert=dict(cfg.hyper_expert) if cfg.hyper_expert is not None else None,
            modules={p: mixse_build.module_info(m) for p, m in self._lora_modules.items()},
        )

    @property
    def expert_names(self) -> List[str]:
        return list(self._config.expert_names)

    @property
    def num_experts(self) -> int:
        return len(self._config.expert_names)

    @property
    def lora_modules(self) -> Dict[str, MoLoRALinear]:
        """``{module path: MoLoRALinear}`` in model order."""
        return dict(self._lora_modules)

    def router_parameters(self) -> List[nn.Parameter]:
        """The router parameters (what Self-MoE trains), the HyperExpert's when there is one, and with
        intuition routing the learned cluster map."""
        params = [p for rt in self._placement.routers(self) for p in rt.parameters()]
        if self.hyper is not None:
            params += list(self.hyper.parameters())
        if self.intuition is not None:
            params += list(self.intuition.parameters())
        return params

    def router_state_dict(self) -> Dict[str, torch.Tensor]:
        """The router tensors under their names in ``router.safetensors`` (``router.<name>`` or
        ``<module>.router.<name>``, and ``hyper.<name>`` for a HyperExpert); they share storage with the
        live modules."""
        self._check_attached()
        state = self._placement.router_tensors(self)
        if self.hyper is not None:
            state.update({f"hyper.{k}": v for k, v in self.hyper.state_dict().items()})
        return state

    @torch.no_grad()
    def load_router_state_dict(self, state: Mapping[str, torch.Tensor], where: str = "router state") -> None:
        """Copy router tensors saved by :meth:`save_pretrained` (``router.safetensors``) into this model's
        router(s) in place, e.g. to resume training. Names and shapes must match exactly and values be
        finite; ``ValueError`` (prefixed with ``where``) names the tensor otherwise, and nothing is changed."""
        own = self.router_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{where}: router tensors do not match this MiXSE (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        for name, t in own.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"{where}: {name} has shape {list(state[name].shape)}, this MiXSE's {list(t.shape)}")
            if state[name].is_floating_point() and not torch.isfinite(state[name]).all():
                raise ValueError(f"{where}: {name} holds NaN or inf")
        for name, t in own.items():
            t.copy_(state[name])

    def num_parameters_summary(self) -> Dict[str, int]:
        """``{"trainable", "router", "experts", "total"}`` parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        experts = sum(m.lora_A.numel() + m.lora_B.numel() for m in self._lora_modules.values())
        router = sum(p.numel() for p in self.router_parameters())
        return {"trainable": trainable, "router": router, "experts": experts, "total": total}

    # ------------------------------------------------------------------------------------------------
    # saving, and changing the expert set

    def save_pretrained(self, save_directory: PathLike, overwrite: bool = True) -> None:
        """Write config, experts and router (not the base model) to ``save_directory`` atomically: the
        directory appears complete or not at all (see :func:`selfmoe.io_utils.atomic_directory`)."""
        self._check_attached()
        mixse_files.save_mixse(self, save_directory, overwrite=overwrite)

    def save_expert(self, name: str, save_directory: PathLike, overwrite: bool = True) -> None:
        """Export one expert as a PEFT LoRA adapter directory (loads in PEFT and in :meth:`from_adapters`).

        Per-module ranks/alphas that differ from the most common one are written as exact
        ``rank_pattern``/``alpha_pattern`` entries.
        """
        self._check_attached()
        mixse_files.export_expert(self, name, save_directory, overwrite=overwrite)

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
        if self.intuition is not None:
            raise ValueError("add_expert: the intuition prior's clusters map onto the current experts; "
                             "build the MiXSE again with the new expert and refit the prior")
        return mixse_build.add_expert(self, name, adapter, router_init_logit)

    def prune_experts(
        self, keep: Optional[Sequence[Union[int, str]]] = None, *, min_share: Optional[float] = None,
        top_n: Optional[int] = None, stats: Any = None, stat: str = "usage", keep_normalizer: bool = True,
    ) -> List[str]:
        """Drop experts (ModuleFormer's pruning after concentrated fine-tuning); returns the dropped names.

        Which experts stay: ``keep`` (names or indices), or from routing statistics ``stats`` (a
        :class:`RoutingStats` from :meth:`routing_stats`, its ``summary()`` / the JSON of ``selfmoe generate
        --routing-stats-json``, or ``{expert: share}``): experts whose ``stat`` share (``"usage"``: fraction
        of routed token-slots over all layers, token-weighted) is below ``min_share`` go, and/or only the
        ``top_n`` largest stay. Kept experts keep their order and names.

        Every LoRA linear and router (shared, X-LoRA or per layer) loses the dropped experts' factors and
        rows; a module left without weights becomes its plain ``nn.Linear`` again. ``keep_normalizer=True``
        (default) keeps the dropped router rows as a frozen softmax normaliser, so any token whose top-k
        held only kept experts gives exactly the old output; ``False`` drops them too (gates then come from
        a softmax over the kept experts; the same for ``renormalize=True`` routers). ``save_pretrained``
        writes the smaller MiXSE; parameters are new objects, so rebuild optimizers. ``ValueError`` (the
        model unchanged) for unknown names, empty selections or ``top_k`` above the kept count.
        """
        self._check_attached()
        if self.intuition is not None:
            raise ValueError("prune_experts: the intuition prior's clusters map onto the current experts; "
                             "build the MiXSE again with the kept experts and refit the prior")
        from .pruning import prune_experts

        return prune_experts(self, keep, min_share=min_share, top_n=top_n, stats=stats, stat=stat,
                             keep_normalizer=keep_normalizer)

    def unload(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back (unmerged, same objects), remove the hooks, restore the
        base parameters' ``requires_grad`` flags and return the plain base model. This MiXSE is unusable after."""
        self._check_attached()
        base = self.base_model
        for path, m in self._lora_modules.items():
            base.set_submodule(path, m.unwrap())
            m.gate_slot = None
            m.hyper_expert = None
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
        cfg = self.mixse_config if self._attached else self._config
        return (
            f"experts={cfg.expert_names}, router={cfg.router!r}, top_k={cfg.top_k}, renormalize={cfg.renormalize}, "
            f"routing={cfg.routing!r}, lora_modules={len(self._lora_modules)}"
            + (f", hyper_expert={cfg.hyper_expert}" if cfg.hyper_expert is not None else "")
        )


class _StopPass(Exception):
    """Ends the intuition embedding pass once the chosen layer has run."""


def _refuse_reentrant_checkpointing(decoder_layers: nn.ModuleList) -> None:
    """Refuse reentrant gradient checkpointing: the gates reach the LoRA layers through slots, not as
    inputs of the checkpointed function, so a reentrant replay would give the router no gradient
    (transformers 4.x defaults to reentrant; 5.x does not)."""
    for layer in decoder_layers:
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
