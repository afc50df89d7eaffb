"""selfmoe.kernels: the routed multi-LoRA op and routing, with PyTorch references beside every kernel.

Installed from the top-level ``kernels/`` folder as ``selfmoe.kernels`` (see setup.py). Modules:

    op.py            lora_mix (the public op): validation, autocast, backend choice
    contract.py      the op contract once: LoRAMixInputs, prepare_inputs, run_backend, the autograd Function
    torch_path.py    torch backend (the CPU path and the fallback): TORCH, lora_mix_torch; its decode
                     formulations in torch_gathered.py, its many-experts one in torch_sorted.py, chosen
                     by torch_dispatch.py
    cpu_gemm.py      the torch path's float32 rank-space GEMMs through oneDNN on x86 CPUs where that is faster
    torch_inference.py  lora_mix_small_inference, DecodePlan: decode-sized calls without the per-call checks
                     (MoLoRALinear's shortcut; bitwise the op)
    dense.py         dense-rank and decode Triton backends: DENSE, DECODE, lora_mix_dense, lora_mix_decode
    grouped.py       grouped Triton backend: GROUPED, lora_mix_grouped
    *_kernels.py     the @triton.jit kernels of dense.py and grouped.py
    grouping.py      slot-sort metadata of the grouped path (GroupingMeta, grouping_metadata)
    topk.py          route_topk (router: softmax + top-k); topk_triton.py its fused kernel
    dispatch.py      backend and Triton path choice; checks.py input validation; naive.py references
    tuning.py        autotune policy; utils.py helpers shared by every kernel module
    compile_check.py ahead-of-time compiles for sm_90/sm_80 through the real launchers (registers, spills,
                     shared memory): the CI gate and benchmarks/compile_report.py

The Triton-backed names (``lora_mix_dense``, ``lora_mix_decode``, ``lora_mix_grouped``,
``route_topk_triton``, ``GroupingMeta``, ``grouping_metadata``) are exported when triton is installed;
without it the package still imports and everything runs on the torch path.
"""
from .contract import LoRAMixInputs, prepare_inputs
from .dispatch import choose_lora_path
from .naive import lora_mix_naive, route_topk_naive
from .op import lora_mix, resolve_backend
from .topk import route_topk
from .torch_path import lora_mix_torch

__all__ = [
    "lora_mix", "lora_mix_torch", "lora_mix_naive", "route_topk", "route_topk_naive", "resolve_backend",
    "choose_lora_path", "LoRAMixInputs", "prepare_inputs",
]

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs without triton: the torch path is complete on its own
    pass
else:
    from .dense import lora_mix_decode, lora_mix_dense
    from .grouped import lora_mix_grouped
    from .grouping import GroupingMeta, grouping_metadata
    from .topk_triton import route_topk_triton

    __all__ += ["lora_mix_dense", "lora_mix_decode", "lora_mix_grouped", "route_topk_triton", "GroupingMeta",
                "grouping_metadata"]
