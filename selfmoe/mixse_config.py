"""The MiXSE configuration (``mixse_config.json``) and the names of a MiXSE directory's files.

A MiXSE directory (:meth:`selfmoe.MiXSE.save_pretrained`) holds ``mixse_config.json`` (this class as
JSON), ``experts.safetensors`` (``<module>.lora_A [E, r_max, d_in]``, ``<module>.lora_B [E, d_out,
r_max]``) and ``router.safetensors``. The layout is described in docs/design.md ("File formats").
Every field is checked on load: the file is untrusted input.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from .names import check_safe_name
from .choices import ROUTER_KINDS, ROUTING_MODES, check_aux_loss, check_hyper_sizes
from .routers import check_top_k
from .version import __version__

__all__ = ["MiXSEConfig", "CONFIG_NAME", "EXPERTS_NAME", "ROUTER_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "mixse_config.json"
EXPERTS_NAME = "experts.safetensors"
ROUTER_NAME = "router.safetensors"
FORMAT_VERSION = 1


@dataclass
class MiXSEConfig:
    """Everything needed to rebuild a MiXSE on a base model (saved as ``mixse_config.json``).

    ``modules[path] = {"ranks": [E], "lora_alphas": [E], "scalings": [E], "in_features", "out_features"}``
    (rank 0: that expert is absent from the module). ``expert_configs[name]`` keeps per-expert adapter
    options needed to export it again (``use_rslora``, ``source``). ``pruned_experts``: experts removed by
    :meth:`~selfmoe.MiXSE.prune_experts` whose router rows still normalise the gates (``pruned.weight``
    ``[P, d]`` / ``pruned.bias [P]`` beside each router's ``linear.*``), in that order; empty by default.
    ``hyper_expert``: None (default), or the sizes of HyperMoE's HyperExpert (:mod:`selfmoe.hyper`), whose
    tensors are saved in ``router.safetensors`` as ``hyper.<name>``.

    Rank-1 experts (MoR1E, :mod:`selfmoe.rank1`): ``mix_and_match = [r1, r2]`` when the E = r1*r2 experts
    are the pairs of r1 A rows and r2 B columns (their tensors are then ``lora_A [r1, 1, d_in]`` and
    ``lora_B [r2, d_out, 1]``); null otherwise. ``intuition``: the intuition prior's settings
    (:class:`selfmoe.intuition.IntuitionConfig` as an object; its tensors in ``intuition.safetensors``),
    or null. Both fields are absent from directories written before they existed, which load unchanged.
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
    pruned_experts: List[str] = field(default_factory=list)
    hyper_expert: Optional[Dict[str, int]] = None
    mix_and_match: Optional[List[int]] = None
    intuition: Optional[Dict[str, Any]] = None
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
        self.hyper_expert = check_hyper_sizes(self.hyper_expert)
        pruned = self.pruned_experts
        if not isinstance(pruned, list):
            raise ValueError(f"pruned_experts must be a list of expert names, got {pruned!r}")
        for n in pruned:
            check_safe_name(n, "pruned expert name")
        if len(set(pruned)) != len(pruned) or set(pruned) & set(names):
            raise ValueError(f"pruned_experts must be unique names that are not experts {names}, got {pruned}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string or null, got {self.base_model_name_or_path!r}")
        if not isinstance(self.expert_configs, dict) or not all(isinstance(v, dict) for v in self.expert_configs.values()):
            raise ValueError(f"expert_configs must be an object {{expert name: {{...}}}}, got {self.expert_configs!r}")
        if not isinstance(self.modules, dict):
            raise ValueError(f"modules must be an object {{module path: {{ranks, lora_alphas, scalings}}}}, "
                             f"got {type(self.modules).__name__}")
        E = len(names)
        if self.mix_and_match is not None:
            from .rank1 import check_mix_and_match

            self.mix_and_match = list(check_mix_and_match(self.mix_and_match, E))
        if self.intuition is not None:
            from .intuition import IntuitionConfig

            IntuitionConfig.from_dict(self.intuition).validate(E)
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
        d = asdict(self)
        for key in ("mix_and_match", "intuition"):  # only written when used: older readers keep loading the rest
            if d[key] is None:
                del d[key]
        return d

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
