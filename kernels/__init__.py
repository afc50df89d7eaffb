"""selfmoe.kernels: the routed multi-LoRA op and routing, with PyTorch references beside every kernel.

Installed from the top-level ``kernels/`` folder as ``selfmoe.kernels`` (see setup.py). The Triton-backed
functions (``lora_mix_dense``, ``lora_mix_decode``, ``route_topk_triton``) are exported when triton is
installed; without it the package still imports and everything runs on the torch path.
"""
from .dispatch import choose_lora_path
from .lora_mix import lora_mix, resolve_backend
from .lora_mix_torch import lora_mix_torch
from .naive import lora_mix_naive, route_topk_naive
from .route_topk import route_topk

__all__ = [
    "lora_mix", "lora_mix_torch", "lora_mix_naive", "route_topk", "route_topk_naive", "resolve_backend",
    "choose_lora_path",
]

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs without triton: the torch path is complete on its own
    pass
else:
    # Imported eagerly, not through a lazy __getattr__: these functions share their module's name, and
    # the first import of the submodule (from anywhere) would bind the package attribute to the module.
    from .lora_mix_dense import lora_mix_decode, lora_mix_dense
    from .routing import RoutingMeta, routing_metadata
    from .route_topk_triton import route_topk_triton

    # lora_mix_grouped stays a module attribute on purpose (selfmoe.kernels.lora_mix_grouped.lora_mix_grouped):
    # binding the function to the package would shadow the module for `import ... as` (tests patch it).
    __all__ += ["lora_mix_dense", "lora_mix_decode", "route_topk_triton", "RoutingMeta", "routing_metadata"]
