"""The routed multi-LoRA linear on plain PyTorch: the CPU path and the fallback on any device.

Dense-rank formulation (the contract: see docs/design.md, section 'The op contract'): all experts
are one ``[E*r, d_in]`` matrix, so the whole mixture is two skinny GEMMs around a per-token gate, with
no gather, no scatter and no Python loop over tokens or experts::

    G  = dense gates [T, E]              (scatter-add of the top-k weights; duplicate ids add up)
    Gc = (G * scaling) @ expander        [T, E*r]   (each expert's gate copied onto its r columns)
    H  = x @ A_all.T                     [T, E*r]   (fp32 for half inputs: it feeds the gate grads)
    Hg = H * Gc                          [T, E*r]
    y  = x @ W.T + b + Hg @ B_rows       [T, d_out]   (B_rows = stack_B(lora_B) [E*r, d_out])

Backward, each product only when some input asks for it::

    dHg = dy @ B_rows.T                  [T, E*r]
    dG  = scaling * (dHg * H) @ expander.T [T, E] (gate grads in rank space, never [T, k, d_out])
    dH  = dHg * Gc
    dx  = dy @ W + dH @ A_all,  dA = dH.T @ x,  dB = dy.T @ Hg,  dW = dy.T @ x,  db = sum_t dy

Cost next to the base GEMM: ``4 * E*r / d`` more FLOPs for router training (grads for x and gates),
which is a few percent at the paper's sizes. For large ``E*r`` with sparse top-k the grouped Triton
kernels are the fast path; this one stays correct there, only slower.

On a CPU, for float32 calls of more than ``SMALL_T`` tokens, the six rank-space products (``H``, the
expand, ``dHg``, ``dH @ A_all``, ``dA``, ``dB``, each ``T x E*r x d``) go through oneDNN where it pays
(cpu_gemm.py: 0.85-0.95x the dense path's time on the AMD EPYC measured); the expand then writes y with
the bias and the base GEMM adds ``x @ W.T`` last on torch's ``addmm`` (beta = 1), as ``nn.Linear``
computes it, and ``dx`` likewise. ``dense-small`` keeps torch's GEMMs: bitwise the same as here at its sizes.

Other formulations are chosen per call by torch_dispatch.py: at decode sizes (inference only)
``dense-small`` here (the same products in fewer ops, bitwise the same result) and ``gathered``
(torch_gathered.py: only the selected experts' factors); for many experts on a CPU (``E*r`` large
against ``k*r``, training and inference) ``sorted`` (torch_sorted.py: slots sorted by expert, its own
backward, dispatched from here by the type of the saved state).

The backend (``TORCH``) takes prepared inputs (contract.py); ``lora_mix_torch`` is its direct entry point.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from . import cpu_gemm
from .contract import HALF_DTYPES, Backend, LoRAMixInputs, entry_point, torch_base_grads
from .torch_dispatch import SMALL_T, choose_torch_path
from .torch_gathered import gathered_forward
from .torch_sorted import SortedState, sorted_backward, sorted_forward


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # Gates and gate gradients are kept in fp32 (fp64 for fp64 inputs): they are [T, E], tiny, and
    # the gate gradient is a long dot product that bf16 would round badly.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_cuda_mm_out_dtype = True  # flips to False once torch.mm(..., out_dtype=) turns out to be missing


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a result in the accumulation dtype (fp32 for half inputs).

    H and dHg feed the gate gradient, a short dot product ``sum_r dHg * H`` prone to cancellation:
    rounding either to bf16 first can leave a tiny gate gradient with no correct digit. They are
    skinny ([T, E*r]), so keeping them in fp32 costs little. CUDA can return fp32 straight from a
    half GEMM; elsewhere the operands are upcast.
    """
    global _cuda_mm_out_dtype
    if a.dtype not in HALF_DTYPES:
        return a @ b
    if a.is_cuda and _cuda_mm_out_dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _cuda_mm_out_dtype = False
    return a.float() @ b.float()


def _onednn_rank_products(inp: LoRAMixInputs) -> bool:
    """Whether the dense formulation's rank-space products (``x @ A_all^T`` and its kin, each ``T x E*r x
    d``) go through oneDNN (cpu_gemm.py): float32 on a CPU (prepared inputs all share x's dtype), more
    than ``SMALL_T`` tokens (so ``dense-small``, the decode path, keeps torch's GEMMs and stays bitwise
    this path) and enough work."""
    x = inp.x
    T, K = x.shape
    if T <= SMALL_T:
        return False
    E, r, _ = inp.lora_A.shape
    return cpu_gemm.onednn_pays(T, E * r, K, x.dtype, x.device)


def dense_gates(expert_ids: torch.Tensor, expert_weights: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Scatter top-k gates ``[T, k]`` (ids of any integer dtype) into dense per-expert gates ``[T, E]``;
    duplicate ids add up."""
    T = expert_ids.shape[0]
    if expert_ids.dtype != torch.int64:  # scatter takes int64 indices
        expert_ids = expert_ids.long()
    gates = torch.zeros(T, num_experts, dtype=dtype, device=expert_ids.device)
    return gates.scatter_add_(1, expert_ids, expert_weights.to(dtype))


_EXPANDERS: Dict[Tuple[int, int, float, torch.dtype, torch.device], torch.Tensor] = {}


def _expander(num_experts: int, rank: int, inp: LoRAMixInputs, dtype: torch.dtype) -> torch.Tensor:
    """``[E, E*r]`` matrix holding expert e's scaling on its r rank columns, zero elsewhere.

    ``g @ expander`` spreads per-expert gates ``[T, E]`` over the rank columns ``[T, E*r]`` with the
    scaling applied, and ``p @ expander.T`` sums rank columns back per expert (times the scaling). Each
    output element is one product plus exact zeros, so this is as exact as the elementwise version,
    and, as small GEMMs, several times cheaper on CPU than the broadcasting multiply and the
    ``view(T, E, r).sum(-1)`` it replaces. Cached per uniform (float) scaling; a per-expert scaling
    costs one small multiply per call.
    """
    device = inp.x.device
    uniform = 1.0 if inp.uniform is None else inp.uniform
    key = (num_experts, rank, uniform, dtype, device)
    m = _EXPANDERS.get(key)
    if m is None:
        if len(_EXPANDERS) >= 256:
            _EXPANDERS.clear()
        m = torch.eye(num_experts, dtype=dtype, device=device).repeat_interleave(rank, dim=1) * uniform
        _EXPANDERS[key] = m
    if inp.uniform is None:
        return m * inp.scaling.unsqueeze(1)
    return m


def stack_B(lora_B: torch.Tensor) -> torch.Tensor:
    """``[E, d_out, r] -> [E*r, d_out]``: all experts' B^T as one row-major matrix, expert e's rank rows at
    ``e*r:(e+1)*r`` (``B_rows``; ``Hg @ B_rows`` is the expand).

    Row-major ``[E*r, d_out]``, not ``[d_out, E*r]`` read transposed: a decode step finds a kept stack
    cold (the base weights streamed through the caches since the layer's last call), and there, on a
    CPU, ``hg @ B_rows`` measured 25-50% faster than the same product on the transposed layout, a
    batch-16 decode step of the built-in model 1-3% faster (benchmarks/NOTES.md, issue 13 item 2,
    change 8); warm, the two layouts take the same time. Every dense formulation takes this one stack,
    so they run the same products (``dense-small`` bitwise the general path, tested).

    A copy per call (small: the experts' B); a view only for r = 1. Not cached here on purpose: a cache
    keyed on the parameter would miss writes made through ``param.data``, which bypass the version
    counter; only a caller that knows the weights stay put may keep it (``selfmoe.decode_cache``, for a
    generation).
    """
    E, N, r = lora_B.shape
    return lora_B.transpose(1, 2).reshape(E * r, N)


def scaled_dense_gates(inp: LoRAMixInputs) -> torch.Tensor:
    """``[T, E]`` per-expert gates times each expert's scaling, in the accumulation dtype.

    Gate x scaling is rounded once, then multiplied onto H: the very products of the general path, so
    ``dense-small`` is bitwise the same as ``forward`` (tested). Depends only on the gates and the
    scaling, so the projections that share one router call can share it (torch_inference.py).
    """
    gates = dense_gates(inp.ids, inp.gates, inp.lora_A.shape[0], _acc_dtype(inp.x))  # [T, E]
    return gates * (inp.scaling if inp.uniform is None else inp.uniform)


def _dense_small_forward(inp: LoRAMixInputs, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense-rank forward for a few tokens without autograd (``dense_small_apply`` on prepared
    inputs, all experts' B stacked per call). ``gates``: ``scaled_dense_gates(inp)`` when the caller
    already has it."""
    if gates is None:
        gates = scaled_dense_gates(inp)  # [T, E]
    T = inp.x.shape[0]
    E, r, _ = inp.lora_A.shape
    operands = dense_small_operands(inp.lora_A, stack_B(inp.lora_B), inp.base_weight)
    return dense_small_apply(inp.x, *operands, inp.base_bias, gates.view(T, E, 1), E, r)


def dense_small_operands(lora_A: torch.Tensor, B_rows: torch.Tensor, base_weight: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What ``dense_small_apply`` multiplies by: ``(A_t [K, E*r], B_rows [E*r, N], W_t [K, N])`` from
    lora_A ``[E, r, K]`` (contiguous), ``B_rows = stack_B(lora_B)`` and the base weight ``[N, K]``
    (None: W_t None). A_t and W_t are views: they follow in-place updates of their tensors. A caller
    whose weights stay put makes them once (``DecodePlan``, torch_inference.py); the op's dense-small
    path makes them per call. Shared so that both run the very same products."""
    E, r, K = lora_A.shape
    return lora_A.view(E * r, K).t(), B_rows, None if base_weight is None else base_weight.t()


def dense_small_apply(x: torch.Tensor, A_t: torch.Tensor, B_rows: torch.Tensor, W_t: Optional[torch.Tensor],
                      base_bias: Optional[torch.Tensor], gates: torch.Tensor, E: int, r: int) -> torch.Tensor:
    """``y [T, N]``: the dense-rank products for a few tokens, in as few ops as possible, no autograd.

    x ``[T, K]`` contiguous; ``A_t``, ``B_rows``, ``W_t`` from ``dense_small_operands``; gates ``[T, E, 1]``
    the per-expert gate x scaling in the accumulation dtype (``scaled_dense_gates``, shaped once by
    callers sharing them across projections: each view costs about a microsecond). At decode sizes
    every op's fixed cost outweighs its arithmetic, so the gates go straight onto the rank columns with
    one broadcasting multiply, in place on the fresh H (no expander GEMM, no saved tensors; at large T
    that multiply is the slower one, see ``_expander``).
    """
    T = x.shape[0]
    hg = _mm_acc(x, A_t)  # [T, E*r], fresh
    hg.view(T, E, r).mul_(gates)  # in place: the gates onto each expert's r rank columns
    if hg.dtype != x.dtype:
        hg = hg.to(x.dtype)
    if W_t is None:
        return hg @ B_rows
    y = torch.mm(x, W_t) if base_bias is None else torch.addmm(base_bias, x, W_t)  # [T, N]
    return y.addmm_(hg, B_rows)


class DenseState(NamedTuple):
    """What the dense formulation's backward needs besides the saved tensors."""

    gates_dtype: torch.dtype
    onednn: bool  # the rank-space products went through oneDNN (``_onednn_rank_products``)


class TorchBackend(Backend):
    """PyTorch backend (any device; float64 too): the dense-rank formulation here, the others by
    torch_dispatch.py's choice (sorted: torch_sorted.py, gathered: torch_gathered.py)."""

    name = "torch"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def forward(self, inp, needs):
        x, lora_A = inp.x, inp.lora_A  # x: [T, K]
        T, K = x.shape
        E, r, _ = lora_A.shape
        cpu = x.device.type == "cpu"
        onednn = cpu and _onednn_rank_products(inp)  # where the dense path's products would run
        path = choose_torch_path(T, E, inp.ids.shape[1], needs, r=r, cpu=cpu, onednn=onednn)
        if path == "sorted":
            return sorted_forward(inp, needs)
        if path == "gathered":  # inference only
            return gathered_forward(inp), (), None
        if path == "dense-small":  # inference only
            return _dense_small_forward(inp), (), None
        ids = inp.ids if inp.ids.dtype == torch.int64 else inp.ids.long()
        acc = _acc_dtype(x)
        A_all = lora_A.reshape(E * r, K)  # [E*r, K]
        B_rows = stack_B(inp.lora_B)  # [E*r, N]
        expand = _expander(E, r, inp, acc)  # [E, E*r], scaling included

        gates = dense_gates(ids, inp.gates, E, acc)  # [T, E]
        gate_cols = gates @ expand  # [T, E*r]: each expert's gate x scaling on its r columns
        h = cpu_gemm.onednn_mm(x, A_all.t()) if onednn else _mm_acc(x, A_all.t())  # [T, E*r], fp32 for half x
        hg = (h * gate_cols).to(x.dtype)  # [T, E*r]

        if onednn:
            # the expand and the bias first (oneDNN writes y), the base GEMM last on torch's addmm, beta = 1
            y = cpu_gemm.onednn_mm(hg, B_rows, inp.base_bias)  # [T, N]
            if inp.base_weight is not None:
                y.addmm_(x, inp.base_weight.t())
        elif inp.base_weight is not None:
            if inp.base_bias is not None:
                y = torch.addmm(inp.base_bias, x, inp.base_weight.t())  # [T, N]
            else:
                y = x @ inp.base_weight.t()
            y.addmm_(hg, B_rows)
        else:
            y = hg @ B_rows  # [T, N]
        saved = (x, lora_A, B_rows, ids, h, gate_cols, inp.base_weight, expand)
        return y, saved, DenseState(inp.gates.dtype, onednn)

    def backward(self, saved, state, dy, needs):
        if isinstance(state, SortedState):
            return sorted_backward(saved, state, dy, needs)
        x, lora_A, B_rows, ids, h, gate_cols, base_weight, expand = saved
        gates_dtype, fast = state  # fast: the rank-space products through oneDNN, as in forward
        T, K = x.shape
        E, r, _ = lora_A.shape
        dx = dA = dB = dw = None

        mm = cpu_gemm.onednn_mm if fast else torch.mm  # the rank-space products (float32 when fast)
        if needs.x or needs.lora_A or needs.gates:
            dhg = mm(dy, B_rows.t()) if fast else _mm_acc(dy, B_rows.t())  # [T, E*r], fp32 for half dy
            if needs.gates:
                dgate = (dhg * h) @ expand.t()  # [T, E]: scaling x sum over each expert's rank columns
                dw = dgate.gather(1, ids).to(gates_dtype)  # [T, k]
            if needs.x or needs.lora_A:
                dh = (dhg * gate_cols).to(x.dtype)  # [T, E*r]
                A_all = lora_A.reshape(E * r, K)
                if needs.x:
                    if fast:  # the rank rows first (oneDNN writes dx), the base GEMM last on torch's addmm
                        dx = mm(dh, A_all)  # [T, K]
                        if base_weight is not None:
                            dx.addmm_(dy, base_weight)
                    elif base_weight is not None:
                        dx = dy @ base_weight  # [T, K]
                        dx.addmm_(dh, A_all)
                    else:
                        dx = dh @ A_all
                if needs.lora_A:
                    dA = mm(dh.t(), x).view(E, r, K)
        if needs.lora_B:
            hg = (h * gate_cols).to(x.dtype)
            if fast:  # as dB^T: oneDNN copies a transposed X, and hg^T is 1/8 of dy^T's bytes at top2-cpu
                dB = mm(hg.t(), dy).view(E, r, -1).transpose(1, 2).contiguous()  # [E, N, r]
            else:
                dB = (dy.t() @ hg).view(-1, E, r).transpose(0, 1).contiguous()  # [E, N, r]
        dW, db = torch_base_grads(dy, x, needs)
        return dx, dA, dB, dw, dW, db


TORCH = TorchBackend()

lora_mix_torch = entry_point(TORCH, "lora_mix_torch", """\
    Routed multi-LoRA linear on the torch path, no validation (``lora_mix`` does that).

    x ``[..., d_in]``, lora_A ``[E, r, d_in]``, lora_B ``[E, d_out, r]``, expert_ids / expert_weights
    ``[..., k]`` (the same leading dims as x), scaling a float or ``[E]`` (no gradient), optional
    base_weight ``[d_out, d_in]`` and base_bias ``[d_out]``; returns ``[..., d_out]`` in x's dtype.
    Experts and base weights in another dtype are cast to x's dtype (their grads come back in theirs).
    """)
