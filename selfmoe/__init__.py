"""selfmoe: MiXSE (Self-MoE) — self-specialized LoRA experts behind a learned token-level router.

The routed multi-LoRA op lives in :mod:`selfmoe.kernels` (``lora_mix``, ``route_topk``); the model layer
on Hugging Face ``transformers`` is ``MoLoRALinear`` (one linear), the routers, and ``MiXSE`` (a whole
causal LM).
"""
from .version import __version__
from .adapters import AdapterFormatError, LoRAAdapter, load_lora_adapter, save_lora_adapter
from .data import (
    DataFormatError,
    LengthGroupedBatchSampler,
    SFTCollator,
    SFTDataset,
    format_prompt,
    load_seeds,
    read_jsonl,
    write_jsonl,
)
from .evaluate import EvalResult, evaluate, load_eval_records, write_results
from .filters import FilterConfig, filter_records
from .generate import SamplingConfig, generate_texts, make_generator
from .io_utils import atomic_directory, atomic_write_json
from .merging import merge_adapters, merge_deltas, merge_into_base, merged_to_lora
from .layer import MoLoRALinear
from .model import MiXSE, MiXSEConfig
from .routers import (
    AUX_LOSSES,
    ROUTER_KINDS,
    ROUTING_MODES,
    GateSlot,
    RouterOutput,
    TopKRouter,
    load_balancing_loss,
    mutual_information_loss,
    router_z_loss,
)
from .specialize import SpecializeConfig, specialize, specialize_domain
from .stats import RoutingStats
from .train import fit, train_expert, train_router
from .train_config import NonFiniteLossError, TrainConfig, TrainingInterrupted

__all__ = [
    "__version__",
    "MoLoRALinear",
    "MiXSE",
    "MiXSEConfig",
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
    "SFTDataset",
    "SFTCollator",
    "LengthGroupedBatchSampler",
    "SamplingConfig",
    "make_generator",
    "generate_texts",
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
]
