"""selfmoe: MiXSE (Self-MoE) — self-specialized LoRA experts behind a learned token-level router.

The routed multi-LoRA op lives in :mod:`selfmoe.kernels` (``lora_mix``, ``route_topk``).
"""
from .version import __version__

__all__ = ["__version__"]
