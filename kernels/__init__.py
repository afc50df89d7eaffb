"""selfmoe.kernels: the routed multi-LoRA op and routing, with PyTorch references beside every kernel.

Installed from the top-level ``kernels/`` folder as ``selfmoe.kernels`` (see setup.py).
"""
from .lora_mix import lora_mix, resolve_backend
from .lora_mix_torch import lora_mix_torch
from .naive import lora_mix_naive, route_topk_naive
from .route_topk import route_topk

__all__ = ["lora_mix", "lora_mix_torch", "lora_mix_naive", "route_topk", "route_topk_naive", "resolve_backend"]
