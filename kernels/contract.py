"""The op contract of ``lora_mix``, implemented once (see docs/design.md, section 'The op contract').

``lora_mix`` validates its arguments (checks.py), picks a backend (op.py, dispatch.py) and calls
``run_backend``, which is the only place that prepares inputs, handles zero tokens, chooses between
the autograd Function and the no-grad fast path, and restores leading dims. The direct entry points
(``lora_mix_torch``, ``lora_mix_dense``, ``lora_mix_decode``, ``lora_mix_grouped``) are thin wrappers
made by ``entry_point``: the same signature as ``lora_mix`` minus its keywords, no validation.

Every backend (torch_path.py, dense.py, grouped.py) receives the same prepared inputs,
``LoRAMixInputs``, and never imports another backend::

    x            [T, d_in]        contiguous; its dtype is the compute dtype
    lora_A       [E, r, d_in]     x's dtype, contiguous
    lora_B       [E, d_out, r]    x's dtype, contiguous
    ids          [T, k]           int32 / int64 as given, contiguous
    gates        [T, k]           float, dtype as given (their gradient comes back in it), contiguous
    scaling      [E]              float32 (float64 for float64 x), detached, on x's device
    uniform      float | None     the caller's float scaling (None for a per-expert tensor): the kernels
                                  specialise on it and the torch path caches its expander
    base_weight  [d_out, d_in] or None; base_bias [d_out] or None (x's dtype, contiguous)

A backend provides ``forward(inp, needs) -> (y [T, d_out], saved, state)`` (``saved``: tensors or None
for ``ctx.save_for_backward``; ``state``: anything else backward needs) and
``backward(saved, state, dy [T, d_out], needs) -> (dx, dA, dB, dgates, dW, db)`` (2-D where the inputs
are, None where not needed). ``needs`` says which gradients are asked for (all False without autograd).

Flattening and casting run inside ``LoRAMixFunction.forward``, where autograd records nothing: no view
or cast nodes per call. The engine casts each returned gradient back to its input's dtype (experts or
base in another dtype than x get their gradients in their own), and leading dims are restored here.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from .utils import device_guard

Scaling = Union[float, torch.Tensor]
ScaleArgs = Tuple[torch.Tensor, float, bool]  # the kernels' (scale_ptr, scale_val, PER_EXPERT_SCALE)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Half-width inputs: the torch formulations keep H, dHg and the gate products in fp32 for them.
HALF_DTYPES = (torch.float16, torch.bfloat16)


class LoRAMixInputs(NamedTuple):
    """The prepared inputs every backend takes (shapes and dtypes in the module docstring)."""

    x: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    ids: torch.Tensor
    gates: torch.Tensor
    scaling: torch.Tensor
    uniform: Optional[float]
    base_weight: Optional[torch.Tensor]
    base_bias: Optional[torch.Tensor]

    def scale_args(self) -> ScaleArgs:
        """``(scale_ptr, scale_val, PER_EXPERT_SCALE)`` for the kernels: the float when uniform, else the tensor."""
        if self.uniform is None:
            return self.scaling, 1.0, True
        return self.scaling, self.uniform, False


class GradNeeds(NamedTuple):
    """Which gradients backward must produce (from ``ctx.needs_input_grad``)."""

    x: bool
    lora_A: bool
    lora_B: bool
    gates: bool
    base_weight: bool
    base_bias: bool


NO_GRADS = GradNeeds(False, False, False, False, False, False)


class Backend:
    """One implementation of the op on prepared inputs (see the module docstring for the interface)."""

    name = "?"
    dtypes: Tuple[torch.dtype, ...] = KERNEL_DTYPES  # x dtypes it computes in

    def forward(self, inp: LoRAMixInputs, needs: GradNeeds):
        raise NotImplementedError

    def backward(self, saved, state, dy: torch.Tensor, needs: GradNeeds):
        raise NotImplementedError


_UNIFORM: Dict[tuple, torch.Tensor] = {}


def _uniform_scaling(num_experts: int, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[E]`` tensor full of a float scaling, cached (a fresh one during CUDA graph capture)."""
    key = (num_experts, value, dtype, device)
    t = _UNIFORM.get(key)
    if t is None:
        t = torch.full((num_experts,), value, dtype=dtype, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return t  # graph-pool memory, filled only on replay: never cache it
        if len(_UNIFORM) >= 256:
            _UNIFORM.clear()
        _UNIFORM[key] = t
    return t


def prepare_inputs(x, lora_A, lora_B, expert_ids, expert_weights, scaling: Scaling = 1.0, base_weight=None,
                   base_bias=None) -> LoRAMixInputs:
    """Flatten, cast and normalise ``lora_mix``'s arguments into ``LoRAMixInputs`` (no validation).

    Written out flat, without helper calls: it runs on every call, and at T=1 on a CPU every
    microsecond of Python counts.
    """
    dtype = x.dtype
    if x.dim() != 2:
        T = math.prod(x.shape[:-1])  # explicit: reshape(-1, d_in) is ambiguous when T == 0
        # view where it can (the usual case): one dispatch instead of reshape's two
        x = x.view(T, x.shape[-1]) if x.is_contiguous() else x.reshape(T, x.shape[-1])
        expert_ids = (expert_ids.view(T, expert_ids.shape[-1]) if expert_ids.is_contiguous()
                      else expert_ids.reshape(T, expert_ids.shape[-1]))
        expert_weights = (expert_weights.view(T, expert_weights.shape[-1]) if expert_weights.is_contiguous()
                          else expert_weights.reshape(T, expert_weights.shape[-1]))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(scaling, torch.Tensor):
        scale_t, uniform = scaling.detach().to(device=x.device, dtype=acc).contiguous(), None
    else:
        uniform = float(scaling)
        scale_t = _uniform_scaling(lora_A.shape[0], uniform, acc, x.device)
    # ``.to`` only where the dtype differs: a no-op ``.to`` still costs a dispatch (about 1 us).
    if lora_A.dtype != dtype:
        lora_A = lora_A.to(dtype)
    if lora_B.dtype != dtype:
        lora_B = lora_B.to(dtype)
    if base_weight is not None and base_weight.dtype != dtype:
        base_weight = base_weight.to(dtype)
    if base_bias is not None and base_bias.dtype != dtype:
        base_bias = base_bias.to(dtype)
    return LoRAMixInputs(
        x.contiguous(), lora_A.contiguous(), lora_B.contiguous(), expert_ids.contiguous(),
        expert_weights.contiguous(), scale_t, uniform,
        None if base_weight is None else base_weight.contiguous(),
        None if base_bias is None else base_bias.contiguous(),
    )


class LoRAMixFunction(torch.autograd.Function):
    """The one autograd Function: prepares inside forward (no view or cast nodes) and runs a backend."""

    @staticmethod
    def forward(ctx, backend, scaling, x, lora_A, lora_B, expert_ids, expert_weights, base_weight, base_bias):
        n = ctx.needs_input_grad
        needs = GradNeeds(n[2], n[3], n[4], n[6], n[7], n[8])
        inp = prepare_inputs(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
        with device_guard(inp.x):
            y, saved, state = backend.forward(inp, needs)
        ctx.save_for_backward(*saved)
        ctx.backend, ctx.state, ctx.needs = backend, state, needs
        ctx.x_shape, ctx.w_shape = x.shape, expert_weights.shape
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        T = math.prod(ctx.x_shape[:-1])
        dy = dy.reshape(T, dy.shape[-1]).contiguous()  # [T, d_out]
        with device_guard(dy):
            dx, dA, dB, dw, dW, db = ctx.backend.backward(ctx.saved_tensors, ctx.state, dy, ctx.needs)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        if dw is not None:
            dw = dw.view(ctx.w_shape)
        return None, None, dx, dA, dB, None, dw, dW, db


def torch_base_grads(dy: torch.Tensor, x: torch.Tensor, needs: GradNeeds):
    """``(dW, db)`` of the base linear by torch (``dy.T @ x``, ``sum_t dy``), each only when asked for."""
    return (dy.t() @ x if needs.base_weight else None), (dy.sum(0) if needs.base_bias else None)


def run_backend(backend: Backend, x, lora_A, lora_B, expert_ids, expert_weights, scaling: Scaling = 1.0,
                base_weight=None, base_bias=None) -> torch.Tensor:
    """Run one backend on ``lora_mix``'s arguments (any leading dims, no validation): ``[..., d_out]``."""
    if expert_ids.shape[-1] == 0 or x.numel() == 0:
        from .torch_path import TORCH  # nothing to route: no launch; torch gives the empty result and grads

        backend = TORCH
    if x.dtype not in backend.dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise TypeError(f"the {backend.name} path takes x in {names}, got x of dtype {x.dtype}")
    if torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad or expert_weights.requires_grad
        or (base_weight is not None and base_weight.requires_grad)
        or (base_bias is not None and base_bias.requires_grad)
    ):
        return LoRAMixFunction.apply(backend, scaling, x, lora_A, lora_B, expert_ids, expert_weights, base_weight,
                                     base_bias)
    # Inference (generation, eval): the same forward without the autograd Function's bookkeeping.
    inp = prepare_inputs(x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)
    with device_guard(inp.x):
        y = backend.forward(inp, NO_GRADS)[0]
    return y.view(*x.shape[:-1], y.shape[1])


def entry_point(backend: Backend, name: str, doc: str):
    """A direct entry point for one backend: ``name(x, lora_A, lora_B, expert_ids, expert_weights,
    scaling=1.0, base_weight=None, base_bias=None)``, ``run_backend`` under a public name."""

    def entry(x, lora_A, lora_B, expert_ids, expert_weights, scaling: Scaling = 1.0, base_weight=None,
              base_bias=None) -> torch.Tensor:
        return run_backend(backend, x, lora_A, lora_B, expert_ids, expert_weights, scaling, base_weight, base_bias)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = type(backend).__module__
    entry.__doc__ = doc
    return entry
