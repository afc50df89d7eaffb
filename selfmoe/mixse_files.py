"""A MiXSE on disk: save it, load it back onto a base model, export one expert as a PEFT adapter.

Format (see docs/design.md, "File formats"): ``mixse_config.json`` (:class:`MiXSEConfig`),
``experts.safetensors`` (``<module>.lora_A [E, r_max, d_in]``, ``<module>.lora_B [E, d_out, r_max]``)
and ``router.safetensors`` (``router.<name>`` for one model-level router, ``<module>.router.<name>``
for per-layer routers). Directories are written atomically. Loading treats the files as untrusted:
every config field, tensor name, shape and value (finite) is checked against the base model before
the base model is touched, and a load that fails after that puts the base model back.
"""
from __future__ import annotations

import pathlib
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Type

import torch
from torch import nn

from .adapters import save_lora_adapter
from .io_utils import PathLike, atomic_directory, atomic_write_json, read_json_object, safetensors_bytes, write_bytes
from .layer import MoLoRALinear
from .mixse_build import check_not_wrapped
from .intuition import INTUITION_NAME
from .mixse_config import CONFIG_NAME, EXPERTS_NAME, ROUTER_NAME, MiXSEConfig
from .placements import make_placement
from .targets import linear_modules
from .version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .model import MiXSE

__all__ = ["load_mixse", "save_mixse", "export_expert"]


def save_mixse(model: "MiXSE", directory: PathLike, *, overwrite: bool = True) -> None:
    """:meth:`selfmoe.MiXSE.save_pretrained`: config, experts and router, atomically."""
    cfg = model.mixse_config
    cfg.validate()
    experts: Dict[str, torch.Tensor] = {}
    for path, m in model._lora_modules.items():
        experts[f"{path}.lora_A"] = m.lora_A
        experts[f"{path}.lora_B"] = m.lora_B
    router = model.router_state_dict()
    intuition = model.intuition.tensors() if model.intuition is not None else {}
    experts, router, intuition = ({k: v.detach().to("cpu", copy=True).contiguous() for k, v in d.items()}
                                  for d in (experts, router, intuition))
    meta = {"format": "pt", "selfmoe_version": __version__}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_bytes(tmp / EXPERTS_NAME, safetensors_bytes(experts, metadata=meta))
        write_bytes(tmp / ROUTER_NAME, safetensors_bytes(router, metadata=meta))
        if model.intuition is not None:
            if not model.intuition.fitted:
                raise ValueError("save_pretrained: the intuition prior has no centroids yet (fit_intuition first)")
            write_bytes(tmp / INTUITION_NAME, safetensors_bytes(intuition, metadata=meta))
        atomic_write_json(tmp / CONFIG_NAME, cfg.to_dict())


def load_mixse(cls: Type["MiXSE"], directory: PathLike, base_model: nn.Module,
               expert_dtype: Optional[torch.dtype] = None) -> "MiXSE":
    """:meth:`selfmoe.MiXSE.from_pretrained` (documented there)."""
    check_not_wrapped(base_model)
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: MiXSE directory not found")
    config = _read_config(root / CONFIG_NAME)
    experts = _read_tensors(root / EXPERTS_NAME)
    router_sd = _read_tensors(root / ROUTER_NAME)
    intuition_sd = _read_tensors(root / INTUITION_NAME) if config.intuition is not None else None
    pairs = tuple(config.mix_and_match) if config.mix_and_match is not None else None
    # stacked rows: one per expert, or mix-and-match's r1 A rows and r2 B columns (selfmoe/rank1.py)
    rows_A, rows_B = pairs or (len(config.expert_names),) * 2

    # ---- check everything against the base model before touching it -----------------------------------
    linears = linear_modules(base_model)
    E = len(config.expert_names)
    expected = set()
    for path, info in config.modules.items():
        where = f"{root / EXPERTS_NAME}: module {path!r}"
        if path not in linears:
            raise ValueError(f"{where} is not an nn.Linear of {type(base_model).__name__}")
        base = linears[path]
        r_max = max(info["ranks"])
        kA, kB = f"{path}.lora_A", f"{path}.lora_B"
        expected.update((kA, kB))
        if kA not in experts or kB not in experts:
            raise ValueError(f"{where}: missing tensor {kA if kA not in experts else kB!r}")
        A, B = experts[kA], experts[kB]
        if tuple(A.shape) != (rows_A, r_max, base.in_features) or tuple(B.shape) != (rows_B, base.out_features, r_max):
            raise ValueError(
                f"{where}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit: expected "
                f"[{rows_A}, {r_max}, {base.in_features}] / [{rows_B}, {base.out_features}, {r_max}] for the base linear"
            )
    unexpected = sorted(set(experts) - expected)
    if unexpected:
        raise ValueError(f"{root / EXPERTS_NAME}: unexpected tensors {unexpected[:5]} (not in {CONFIG_NAME})")
    placement = make_placement(config.router)
    in_features = {path: linears[path].in_features for path in config.modules}
    hyper_sd = {k[len("hyper."):]: router_sd.pop(k) for k in [k for k in router_sd if k.startswith("hyper.")]}
    if bool(hyper_sd) != (config.hyper_expert is not None):
        raise ValueError(f"{root / ROUTER_NAME}: " + ("has hyper.* tensors but the config has no hyper_expert"
                                                      if hyper_sd else "the config has a hyper_expert but no hyper.* tensors"))
    router_sds = placement.split_router_state(router_sd, E, in_features, root / ROUTER_NAME)

    # ---- build and attach; undone if anything fails from here on ----------------------------------------
    layers: Dict[str, MoLoRALinear] = {}
    try:
        for path, info in config.modules.items():
            A, B = experts[f"{path}.lora_A"], experts[f"{path}.lora_B"]
            layer = MoLoRALinear(
                linears[path], E, r=list(info["ranks"]), lora_alpha=info["lora_alphas"], top_k=config.top_k,
                router=placement.layer_router, renormalize=config.renormalize, routing=config.routing,
                expert_dtype=expert_dtype or A.dtype, init_lora_weights=False, scalings=info["scalings"],
                mix_and_match=pairs,
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
        if config.pruned_experts:  # room for the pruned experts' router rows (load_state_dict checks them)
            for rt in model._placement.routers(model):
                rt.reserve_pruned(len(config.pruned_experts))
        with torch.no_grad():
            for owner, sd in router_sds.items():
                model._placement.router_of(model, owner).load_state_dict(dict(sd), strict=True)
            if model.hyper is not None:
                model.hyper.load_state_dict(hyper_sd, strict=True)
        if intuition_sd is not None:
            model.intuition.load_tensors(intuition_sd, str(root / INTUITION_NAME))
    except BaseException as exc:
        model.unload()
        if isinstance(exc, RuntimeError):  # load_state_dict: keys or shapes the router does not have
            raise ValueError(f"{root / ROUTER_NAME}: {exc}") from exc
        raise
    return model


def export_expert(model: "MiXSE", name: str, directory: PathLike, *, overwrite: bool = True) -> None:
    """:meth:`selfmoe.MiXSE.save_expert`: one expert as a PEFT LoRA adapter directory."""
    cfg = model._config
    if name not in cfg.expert_names:
        raise KeyError(f"no expert named {name!r}; experts are {list(cfg.expert_names)}")
    e = cfg.expert_names.index(name)
    rslora = bool(cfg.expert_configs.get(name, {}).get("use_rslora", False))
    weights, alphas = {}, {}
    for path, m in model._lora_modules.items():
        pair = m.expert_factors(e)
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
    save_lora_adapter(directory, weights, r=int(r), lora_alpha=alpha, base_model_name_or_path=cfg.base_model_name_or_path,
                      extra_config=extra, overwrite=overwrite)


def _read_config(path: pathlib.Path) -> MiXSEConfig:
    raw = read_json_object(path, missing=f"{CONFIG_NAME} not found (is this a MiXSE directory?)")
    return MiXSEConfig.from_dict(raw, where=str(path))


def _read_tensors(path: pathlib.Path) -> Dict[str, torch.Tensor]:
    """A safetensors file, refused when unreadable or holding NaN/inf (a NaN in one expert reaches every
    token on the dense-rank path)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read safetensors file (corrupt or truncated?): {exc}") from exc
    _check_finite(tensors, path)
    return tensors


def _check_finite(tensors: Mapping[str, torch.Tensor], path: pathlib.Path) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
