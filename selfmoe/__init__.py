"""selfmoe: MiXSE (Self-MoE) — self-specialized LoRA experts behind a learned token-level router.

The routed multi-LoRA op lives in :mod:`selfmoe.kernels` (``lora_mix``, ``route_topk``); the model layer
on Hugging Face ``transformers`` is ``MoLoRALinear`` (one linear), the routers, and ``MiXSE`` (a whole
causal LM).

Importing ``selfmoe`` is cheap: each name below loads its module (and torch) on first use, so that the
command line's ``--help`` does not import torch.
"""
from typing import Any, List

from .version import __version__

# name -> the module (in this package) that defines it
_EXPORTS = {
    "AdapterFormatError": "adapters",
    "LoRAAdapter": "adapters",
    "load_lora_adapter": "adapters",
    "save_lora_adapter": "adapters",
    "DataFormatError": "data",
    "decode_cache": "decoding_cache",
    "LengthGroupedBatchSampler": "data",
    "SFTCollator": "data",
    "SFTDataset": "data",
    "format_prompt": "data",
    "resolve_prompt_format": "prompt_format",
    "load_seeds": "data",
    "read_jsonl": "data",
    "write_jsonl": "data",
    "EvalResult": "evaluation",
    "evaluate": "evaluation",
    "load_eval_records": "evaluation",
    "write_results": "evaluation",
    "FilterConfig": "filters",
    "filter_records": "filters",
    "SamplingConfig": "generate",
    "generate_texts": "generate",
    "make_generator": "generate",
    "atomic_directory": "io_utils",
    "atomic_write_json": "io_utils",
    "WriteError": "io_utils",
    "CheckpointError": "train_config",
    "merge_adapters": "merging",
    "merge_deltas": "merging",
    "merge_into_base": "merging",
    "merged_to_lora": "merging",
    "MoLoRALinear": "layer",
    "IntuitionConfig": "intuition",
    "MiXSE": "model",
    "MiXSEConfig": "model",
    "AUX_LOSSES": "routers",
    "ROUTER_KINDS": "routers",
    "ROUTING_MODES": "routers",
    "GateSlot": "routers",
    "RouterOutput": "routers",
    "TopKRouter": "routers",
    "load_balancing_loss": "routers",
    "mutual_information_loss": "routers",
    "load_concentration_loss": "routers",
    "router_z_loss": "routers",
    "SpecializeConfig": "specialization",
    "specialize": "specialization",
    "specialize_domain": "specialization",
    "RoutingStats": "stats",
    "fit": "train",
    "train_expert": "train",
    "train_router": "train",
    "NonFiniteLossError": "train_config",
    "TrainConfig": "train_config",
    "TrainingInterrupted": "train_config",
}

__all__ = [
    "__version__",
    "MoLoRALinear",
    "MiXSE",
    "MiXSEConfig",
    "IntuitionConfig",
    "LoRAAdapter",
    "load_lora_adapter",
    "save_lora_adapter",
    "AdapterFormatError",
    "atomic_directory",
    "atomic_write_json",
    "merge_adapters",
    "merge_deltas",
    "merge_into_base",
    "merged_to_lora",
    "DataFormatError",
    "load_seeds",
    "read_jsonl",
    "write_jsonl",
    "format_prompt",
    "resolve_prompt_format",
    "SFTDataset",
    "SFTCollator",
    "LengthGroupedBatchSampler",
    "SamplingConfig",
    "make_generator",
    "generate_texts",
    "decode_cache",
    "evaluate",
    "load_eval_records",
    "write_results",
    "EvalResult",
    "FilterConfig",
    "filter_records",
    "SpecializeConfig",
    "specialize",
    "specialize_domain",
    "TrainConfig",
    "train_expert",
    "train_router",
    "fit",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "CheckpointError",
    "WriteError",
    "TopKRouter",
    "RouterOutput",
    "GateSlot",
    "RoutingStats",
    "ROUTER_KINDS",
    "ROUTING_MODES",
    "AUX_LOSSES",
    "load_balancing_loss",
    "router_z_loss",
    "mutual_information_loss",
    "load_concentration_loss",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfmoe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
