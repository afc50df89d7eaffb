"""PEFT-format LoRA adapters on disk, without depending on the ``peft`` package.

On-disk format (what ``peft`` writes with ``save_pretrained`` and reads with ``from_pretrained``):

- ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern`` / ``alpha_pattern`` (regex -> per-module rank / alpha), ``use_rslora``, ...
- ``adapter_model.safetensors``: for each adapted linear ``m`` (a path inside the base causal LM, e.g.
  ``model.layers.0.self_attn.q_proj``) the keys ``base_model.model.<m>.lora_A.weight`` (``[r_m, in]``)
  and ``base_model.model.<m>.lora_B.weight`` (``[out, r_m]``). The adapter name is not part of the keys.

The layer computes ``y = W x + scaling_m * B_m @ A_m @ x`` with ``scaling_m = alpha_m / r_m``
(``alpha_m / sqrt(r_m)`` with rsLoRA).

Loading is all-or-nothing: every check runs before a ``LoRAAdapter`` is returned, and every error names
the file and, where relevant, the module and the shapes. ``adapter_model.bin`` (a pickle) is refused:
unpickling can run arbitrary code, and converting once to safetensors is cheap.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .io_utils import PathLike, atomic_directory, read_json_object, safetensors_bytes, write_bytes, write_json

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterFormatError",
    "LoRAAdapter",
    "check_same_base",
    "load_lora_adapter",
    "save_lora_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_WEIGHTS_NAME = "adapter_model.bin"
_KEY_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

LoRAWeights = Dict[str, Tuple[torch.Tensor, torch.Tensor]]

# Config options that change what the saved tensors mean (extra tensors, other layer types, a different
# forward). Loading such an adapter as plain LoRA would silently compute the wrong thing, so they are
# refused by name. Options that only affect training or initialisation (dropout, init_lora_weights,
# loftq/eva/corda/lora_ga, velora) leave plain LoRA weights and are accepted.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA adds a magnitude vector per module",
    "fan_in_fan_out": "fan_in_fan_out targets transposed (GPT-2 Conv1D) weights, not nn.Linear",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "modules_to_save": "modules_to_save stores full copies of other modules",
    "trainable_token_indices": "trainable_token_indices stores embedding rows",
    "target_parameters": "target_parameters adapts raw nn.Parameters (e.g. MoE experts), not nn.Linear",
    "layer_replication": "layer_replication changes the layer stack",
    "use_qalora": "QA-LoRA pools the input features of lora_A",
    "alora_invocation_tokens": "aLoRA only activates after invocation tokens",
    "kasa_config": "KaSA inserts a learned diagonal between A and B",
    "monteclora_config": "MonteCLoRA samples the adapter",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routing is a different forward",
}
_SUPPORTED_TASK_TYPES = (None, "CAUSAL_LM")


class AdapterFormatError(ValueError):
    """An adapter directory or weight dict is not a valid plain-LoRA PEFT adapter (message says why)."""


def _pattern_key(patterns: Iterable[str], module: str) -> Optional[str]:
    r"""First pattern matching ``module`` the way PEFT matches rank/alpha patterns: a regex that must
    match a dot-separated suffix of the module path (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``).

    Each suffix is full-matched on its own instead of through PEFT's ``(.*\.)?(key)$`` wrapper, whose
    nested quantifier is a backtracking hazard; the patterns themselves passed :func:`_check_regex`."""
    parts = module.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    for key in patterns:
        if any(re.fullmatch(key, s) for s in suffixes):
            return key
    return None


# Regexes from adapter_config.json are untrusted: a pattern like "(a+)+b" makes Python's backtracking
# engine run for hours on a short module name. Allowed: at most _MAX_REPEATS quantifiers, none nested
# in another and none around an alternation (the shapes that backtrack exponentially), no
# back-references, at most _MAX_PATTERN_CHARS characters. Module-name patterns never need more.
_MAX_PATTERN_CHARS = 512
_MAX_REPEATS = 4


def _regex_hazard(pattern: str) -> Optional[str]:
    """Why ``pattern`` could backtrack catastrophically (see above), or None when it is bounded."""
    try:
        from re import _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.9/3.10
        import sre_parse  # type: ignore[no-redef]
    if len(pattern) > _MAX_PATTERN_CHARS:
        return f"longer than {_MAX_PATTERN_CHARS} characters"
    repeats = 0

    def walk(items: Any, in_repeat: bool) -> Optional[str]:
        nonlocal repeats
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                repeats += 1
                if in_repeat:
                    return "a quantifier inside a quantified group"
                why = walk(arg[2], True)
            elif name == "SUBPATTERN":
                why = walk(arg[-1], in_repeat)
            elif name == "BRANCH":
                if in_repeat:
                    return "an alternation inside a quantified group"
                why = next((w for w in (walk(b, in_repeat) for b in arg[1]) if w), None)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "a back-reference"
            elif name in ("ASSERT", "ASSERT_NOT", "ATOMIC_GROUP"):
                why = walk(arg[-1], in_repeat)
            else:
                why = None
            if why:
                return why
        return None

    why = walk(sre_parse.parse(pattern), False)
    if why is None and repeats > _MAX_REPEATS:
        why = f"more than {_MAX_REPEATS} quantifiers"
    return why


def _matches_target(module: str, target_modules: Union[str, Sequence[str], None]) -> bool:
    """Whether PEFT would put a LoRA layer on ``module`` given ``target_modules`` (PEFT semantics:
    a string is a full-match regex, a list entry matches the module path or a dot-separated suffix)."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _rank_from_config(config: Mapping[str, Any], r: int, module: str) -> int:
    patterns = config.get("rank_pattern") or {}
    key = _pattern_key(patterns, module)
    return int(patterns[key]) if key is not None else int(r)


@dataclass
class LoRAAdapter:
    """One plain LoRA adapter: per-module factors plus the config that gives each module's scaling.

    ``weights[m] = (A, B)`` with ``A: [r_m, in_features]``, ``B: [out_features, r_m]`` for module path ``m``
    relative to the base causal LM; the module's update is ``scaling_for(m) * B @ A`` (``[out, in]``).
    """

    r: int
    lora_alpha: float
    target_modules: List[str]
    weights: LoRAWeights
    config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate_weights(self.weights, self.rank_for)

    # -- per-module hyper-parameters (PEFT semantics) ---------------------------------------------------
    def rank_for(self, module: str) -> int:
        """Rank of ``module``: the first matching ``rank_pattern`` entry, else ``r``."""
        return _rank_from_config(self.config, self.r, module)

    def alpha_for(self, module: str) -> float:
        """LoRA alpha of ``module``: the first matching ``alpha_pattern`` entry, else ``lora_alpha``."""
        patterns = self.config.get("alpha_pattern") or {}
        key = _pattern_key(patterns, module)
        return float(patterns[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        """Factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora`` (rank-stabilised LoRA)."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora", False) else alpha / r

    # -- conveniences -----------------------------------------------------------------------------------
    @property
    def modules(self) -> List[str]:
        """Adapted module paths, sorted."""
        return sorted(self.weights)

    def delta(self, module: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Full weight update ``scaling_for(module) * B @ A`` of shape ``[out, in]`` (in ``dtype`` if given,
        else the factors' dtype). Raises ``KeyError`` naming the module when it is not adapted."""
        if module not in self.weights:
            raise KeyError(f"adapter has no weights for module {module!r}; it adapts {len(self.weights)} modules, e.g. {self.modules[:3]}")
        A, B = self.weights[module]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return (B @ A) * self.scaling_for(module)

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "LoRAAdapter":
        """Copy with every factor moved to ``device`` / cast to ``dtype`` (config shared by value)."""
        moved = {m: (A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)) for m, (A, B) in self.weights.items()}
        return LoRAAdapter(self.r, self.lora_alpha, list(self.target_modules), moved, dict(self.config))


def _validate_weights(weights: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], rank_for) -> None:
    """Check every ``(A [r_m, in], B [out, r_m])`` pair: 2-D floating tensors whose inner ranks agree with
    each other and with ``rank_for(module)``. Raises ``AdapterFormatError`` naming module and shapes."""
    if not isinstance(weights, Mapping):
        raise AdapterFormatError(f"weights must be a dict module -> (lora_A, lora_B), got {type(weights).__name__}")
    for module, pair in weights.items():
        if not isinstance(module, str) or not module:
            raise AdapterFormatError(f"module paths must be non-empty strings, got {module!r}")
        if module.startswith(_KEY_PREFIX) or module.endswith((".lora_A", ".lora_B", _A_SUFFIX, _B_SUFFIX)):
            raise AdapterFormatError(
                f"module {module!r}: give the path inside the base causal LM (e.g. 'model.layers.0.self_attn.q_proj'), "
                f"without the {_KEY_PREFIX!r} prefix or lora_A/lora_B suffixes"
            )
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise AdapterFormatError(f"module {module!r}: expected a pair (lora_A, lora_B), got {type(pair).__name__}")
        A, B = pair
        for name, t in (("lora_A", A), ("lora_B", B)):
            if not isinstance(t, torch.Tensor):
                raise AdapterFormatError(f"module {module!r}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise AdapterFormatError(f"module {module!r}: {name} must be 2-D, got shape {list(t.shape)}")
            if not t.is_floating_point():
                raise AdapterFormatError(f"module {module!r}: {name} must be floating point, got {t.dtype}")
        if A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"module {module!r}: lora_A {list(A.shape)} (expected [r, in]) and lora_B {list(B.shape)} "
                f"(expected [out, r]) disagree on the rank ({A.shape[0]} vs {B.shape[1]})"
            )
        expected = rank_for(module)
        if A.shape[0] != expected:
            raise AdapterFormatError(
                f"module {module!r}: config rank is {expected} (r / rank_pattern) but lora_A has shape "
                f"{list(A.shape)} and lora_B has shape {list(B.shape)}"
            )


# ------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------
def _read_config(config_path: pathlib.Path) -> Dict[str, Any]:
    config = read_json_object(config_path, missing="adapter_config.json not found (is this a PEFT adapter directory?)",
                              error=AdapterFormatError)
    _check_config(config, str(config_path))
    return config


def _check_config(config: Mapping[str, Any], where: str) -> None:
    """Validate the fields we use and refuse options whose tensors would mean something else."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{where}: peft_type is {peft_type!r}; only plain LoRA adapters (peft_type 'LORA') are supported")
    task_type = config.get("task_type")
    if task_type not in _SUPPORTED_TASK_TYPES:
        raise AdapterFormatError(
            f"{where}: task_type is {task_type!r}; only causal-LM adapters (task_type 'CAUSAL_LM' or null) are "
            "supported, because module paths are resolved inside a causal LM"
        )
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterFormatError(f"{where}: {option}={config[option]!r} is not supported ({why})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterFormatError(f"{where}: bias={bias!r} is not supported (it saves base-layer biases); only 'none'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterFormatError(f"{where}: target_modules must be a list of names or a regex string, got {targets!r}")
    if isinstance(targets, str) and targets != "all-linear":
        _compile(targets, where, "target_modules")
    for name, value_ok in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
                           ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{where}: {name} must be an object pattern -> value, got {patterns!r}")
        for key, value in patterns.items():
            _compile(key, where, f"{name} key {key!r}")
            if not value_ok(value):
                raise AdapterFormatError(f"{where}: {name}[{key!r}] has invalid value {value!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterFormatError(f"{where}: use_rslora must be true/false, got {config['use_rslora']!r}")


def check_same_base(adapters: Mapping[str, "LoRAAdapter"], *, strict: bool = False) -> None:
    """Warn (``strict=False``) or raise :class:`AdapterFormatError` (``strict=True``) when the adapters
    declare different ``base_model_name_or_path`` values: experts trained on different bases do not
    belong in one MiXSE or one merge. Adapters that declare none are not compared."""
    declared = {name: ad.config.get("base_model_name_or_path") for name, ad in adapters.items()}
    declared = {name: base for name, base in declared.items() if base}
    if len(set(declared.values())) <= 1:
        return
    listing = ", ".join(f"{name}: {base!r}" for name, base in declared.items())
    if strict:
        raise AdapterFormatError(f"experts declare different base models ({listing}); refused (strict)")
    warnings.warn(f"experts declare different base models ({listing}); pass strict=True (CLI: --strict) to refuse",
                  UserWarning, stacklevel=3)


def _compile(pattern: str, where: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterFormatError(f"{where}: {what} is not a valid regular expression ({exc})") from exc
    why = _regex_hazard(pattern)
    if why:
        raise AdapterFormatError(
            f"{where}: {what} is refused: {why} (untrusted patterns are limited so that matching cannot hang; "
            "name modules by suffix, e.g. 'q_proj' or 'layers\\.0\\.self_attn\\.q_proj')"
        )


def _split_keys(tensors: Mapping[str, torch.Tensor], where: str) -> LoRAWeights:
    """Map ``base_model.model.<m>.lora_{A,B}.weight`` keys to ``{m: (A, B)}``; anything else is an error."""
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    unexpected: List[str] = []
    for key, tensor in tensors.items():
        if key.startswith(_KEY_PREFIX) and key.endswith(_A_SUFFIX):
            halves.setdefault(key[len(_KEY_PREFIX):-len(_A_SUFFIX)], {})["A"] = tensor
        elif key.startswith(_KEY_PREFIX) and key.endswith(_B_SUFFIX):
            halves.setdefault(key[len(_KEY_PREFIX):-len(_B_SUFFIX)], {})["B"] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        shown = ", ".join(repr(k) for k in sorted(unexpected)[:5])
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise AdapterFormatError(
            f"{where}: unexpected keys {shown}{more}; a plain LoRA adapter holds only "
            f"'{_KEY_PREFIX}<module>{_A_SUFFIX}' / '{_KEY_PREFIX}<module>{_B_SUFFIX}'"
        )
    weights: LoRAWeights = {}
    for module in sorted(halves):
        pair = halves[module]
        if module == "":
            raise AdapterFormatError(f"{where}: a lora_A/lora_B key has an empty module path")
        if "A" not in pair or "B" not in pair:
            have, missing = ("lora_A", "lora_B") if "A" in pair else ("lora_B", "lora_A")
            raise AdapterFormatError(f"{where}: module {module!r} has {have} but no {missing}")
        weights[module] = (pair["A"], pair["B"])
    if not weights:
        raise AdapterFormatError(f"{where}: holds no LoRA weights")
    return weights


def load_lora_adapter(
    path: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> LoRAAdapter:
    """Load a local PEFT LoRA adapter directory.

    Args:
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        device: where the factors go.
        dtype: cast the factors to this dtype (default: keep the stored dtype).

    Returns a validated :class:`LoRAAdapter` whose ``weights`` map module paths (relative to the base
    causal LM) to ``(A [r_m, in], B [out, r_m])``.

    Raises ``FileNotFoundError`` (missing directory / config / weights) or :class:`AdapterFormatError`
    (bad JSON, unsupported options, corrupt or truncated safetensors, unexpected keys, a lone lora_A or
    lora_B, ranks that disagree with the config, non-finite values), each naming the file and module.
    """
    root = pathlib.Path(os.fspath(path))
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: adapter directory not found")
    config = _read_config(root / ADAPTER_CONFIG_NAME)
    weights_path = root / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        if (root / _PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterFormatError(
                f"{root / _PICKLE_WEIGHTS_NAME}: pickle weights are refused (loading a pickle can run arbitrary code); "
                f"convert once to {ADAPTER_WEIGHTS_NAME}, e.g. with peft: PeftModel.from_pretrained(...).save_pretrained(dir)"
            )
        raise FileNotFoundError(f"{weights_path}: adapter weights not found")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{weights_path}: cannot read safetensors file (corrupt or truncated?): {exc}") from exc
    weights = _split_keys(tensors, str(weights_path))
    for module, (A, B) in weights.items():
        for name, t in (("lora_A", A), ("lora_B", B)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{weights_path}: module {module!r} {name} holds NaN or Inf values")
    raw_targets = config["target_modules"]
    for module in weights:
        if not _matches_target(module, raw_targets):
            raise AdapterFormatError(
                f"{weights_path}: module {module!r} has weights but is not matched by target_modules={raw_targets!r} "
                f"in {ADAPTER_CONFIG_NAME}; PEFT would ignore them"
            )
    if isinstance(raw_targets, str):
        # A regex (or "all-linear") cannot be listed; the leaf names actually adapted are what callers need.
        target_modules = sorted({m.rsplit(".", 1)[-1] for m in weights})
    else:
        target_modules = list(raw_targets)
    try:
        adapter = LoRAAdapter(
            r=config["r"], lora_alpha=config["lora_alpha"], target_modules=target_modules, weights=weights, config=config
        )
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{weights_path}: {exc}") from exc
    if torch.device(device) != torch.device("cpu") or dtype is not None:
        adapter = adapter.to(device=device, dtype=dtype)
    return adapter


# ------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------
def _default_target_modules(modules: Iterable[str]) -> List[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def save_lora_adapter(
    path: PathLike,
    weights: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    target_modules: Optional[List[str]] = None,
    base_model_name_or_path: Optional[str] = None,
    extra_config: Optional[Dict[str, Any]] = None,
    overwrite: bool = True,
) -> None:
    """Write a PEFT LoRA adapter directory atomically (see :func:`selfmoe.io_utils.atomic_directory`).

    Args:
        path: output directory; replaced as a whole, or left untouched if anything fails.
        weights: module path (relative to the base causal LM) -> ``(A [r_m, in], B [out, r_m])``.
        r, lora_alpha: the default rank and alpha. Modules whose rank differs from ``r`` get an exact
            ``rank_pattern`` entry automatically (PEFT then builds them at that rank); their scaling is
            ``lora_alpha / r_m`` unless ``extra_config`` gives an ``alpha_pattern``.
        target_modules: names as PEFT takes them (``"q_proj"`` or full paths). Default: the sorted leaf
            names of ``weights`` — exact when every module with those names is adapted (the usual "all
            layers" case); otherwise PEFT also wraps the others, with zero-initialised (no-op) factors.
        base_model_name_or_path: recorded in the config for PEFT / the Hub.
        extra_config: more config entries (e.g. ``use_rslora``, ``alpha_pattern``, ``lora_dropout``);
            they override the defaults written here and are validated like a loaded config.
        overwrite: if False and ``path`` is a non-empty directory, raise ``FileExistsError``.

    Raises :class:`AdapterFormatError` for bad weights or config (naming the module and shapes), before
    anything is written.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"save_lora_adapter: r must be a positive integer, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise AdapterFormatError(f"save_lora_adapter: lora_alpha must be a finite number, got {lora_alpha!r}")
    if not weights:
        raise AdapterFormatError("save_lora_adapter: weights is empty; nothing to save")
    _validate_weights(weights, rank_for=lambda m: weights[m][0].shape[0])  # structure and A/B agreement

    if target_modules is None:
        target_modules = _default_target_modules(weights)
    elif isinstance(target_modules, str) or not all(isinstance(t, str) for t in target_modules):
        raise AdapterFormatError(f"save_lora_adapter: target_modules must be a list of strings, got {target_modules!r}")
    for module in weights:
        if not _matches_target(module, target_modules):
            raise AdapterFormatError(
                f"save_lora_adapter: module {module!r} is not matched by target_modules={list(target_modules)!r}; "
                "PEFT would ignore its weights"
            )

    extra = dict(extra_config or {})
    clashing = sorted(set(extra) & {"peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path"})
    if clashing:
        raise AdapterFormatError(f"save_lora_adapter: extra_config must not set {clashing}; pass them as arguments")
    rank_pattern: Dict[str, int] = dict(extra.pop("rank_pattern", None) or {})
    config: Dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    config.update(extra)
    config["rank_pattern"] = rank_pattern
    # Record every module whose actual rank the default r / user patterns would get wrong, as an escaped
    # (literal) path: PEFT matches pattern keys as regexes against a dot-separated suffix of the path.
    for module in sorted(weights):
        actual = int(weights[module][0].shape[0])
        if _rank_from_config(config, r, module) != actual:
            rank_pattern[re.escape(module)] = actual
    _check_config(config, "save_lora_adapter config")
    _validate_weights(weights, lambda m: _rank_from_config(config, r, m))

    tensors: Dict[str, torch.Tensor] = {}
    for module in sorted(weights):
        A, B = weights[module]
        # Own, contiguous CPU copies: safetensors refuses views that share storage.
        tensors[f"{_KEY_PREFIX}{module}{_A_SUFFIX}"] = A.detach().to("cpu", copy=True).contiguous()
        tensors[f"{_KEY_PREFIX}{module}{_B_SUFFIX}"] = B.detach().to("cpu", copy=True).contiguous()

    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_bytes(tmp / ADAPTER_WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_json(tmp / ADAPTER_CONFIG_NAME, config)
