"""Shared test helpers: fresh random inputs for the routed LoRA op and the relative-error metric."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch

# Relative-error budgets of the op contract (docs/design.md, section 'The op contract'):
# ||out - ref|| / ||ref||, reference in float64.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm()
    if denom == 0:
        raise AssertionError("reference is all zeros: the comparison could not fail")
    return float((out64 - ref64).norm() / denom)


@dataclass
class MixCase:
    x: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    scaling: object
    base_weight: Optional[torch.Tensor]
    base_bias: Optional[torch.Tensor]

    def tensors(self) -> Dict[str, torch.Tensor]:
        named = {
            "x": self.x, "lora_A": self.lora_A, "lora_B": self.lora_B, "expert_weights": self.expert_weights,
            "base_weight": self.base_weight, "base_bias": self.base_bias,
        }
        return {k: v for k, v in named.items() if v is not None}

    def to(self, dtype: torch.dtype, requires_grad: Optional[Dict[str, bool]] = None) -> "MixCase":
        """Copy with float tensors cast to dtype (ids kept) as fresh leaves."""
        requires_grad = requires_grad or {}

        def cast(name, t):
            if t is None:
                return None
            return t.detach().to(dtype).requires_grad_(requires_grad.get(name, False))

        return MixCase(
            cast("x", self.x), cast("lora_A", self.lora_A), cast("lora_B", self.lora_B), self.expert_ids,
            cast("expert_weights", self.expert_weights), self.scaling,
            cast("base_weight", self.base_weight), cast("base_bias", self.base_bias),
        )

    def call(self, fn: Callable, **kwargs) -> torch.Tensor:
        return fn(
            self.x, self.lora_A, self.lora_B, self.expert_ids, self.expert_weights, self.scaling,
            base_weight=self.base_weight, base_bias=self.base_bias, **kwargs,
        )


def make_case(
    T: int, d_in: int, d_out: int, E: int, r: int, k: int, *,
    lead: tuple = (), base: bool = True, bias: bool = True, per_expert_scaling: bool = False,
    ids: Optional[torch.Tensor] = None, seed: int = 0, id_dtype: torch.dtype = torch.int64,
) -> MixCase:
    """Fresh random float64 inputs (never zeros); `lead` reshapes the T tokens into leading dims."""
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead else (T,)
    x = torch.randn(*shape, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g, dtype=torch.float64) / r**0.5
    if ids is None:
        ids = torch.randint(0, E, (*shape, k), generator=g)
    ids = ids.reshape(*shape, k).to(id_dtype)
    w = torch.rand(*shape, k, generator=g, dtype=torch.float64) + 0.1
    scaling = (torch.rand(E, generator=g, dtype=torch.float64) + 0.5) if per_expert_scaling else 1.7
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5 if base else None
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if (base and bias) else None
    return MixCase(x, A, B, ids, w, scaling, W, b)


def check_against_reference(case: MixCase, fn: Callable, dtype: torch.dtype, grads=None, **kwargs) -> None:
    """Run `fn` in `dtype` and the naive reference in float64 on the same (rounded) inputs; compare
    the output and the gradients of every tensor in `grads` (default: all float inputs)."""
    from selfmoe.kernels import lora_mix_naive

    names = list(case.tensors()) if grads is None else list(grads)
    low = case.to(dtype, {n: True for n in names})
    ref = low.to(torch.float64, {n: True for n in names})  # same rounded values, exact arithmetic

    out = low.call(fn, **kwargs)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    expected = ref.call(lora_mix_naive)
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    err = rel_err(out, expected)
    assert err <= TOL[dtype], f"forward rel err {err:.3g} > {TOL[dtype]:.0e}"

    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(dtype)
    out.backward(g)
    expected.backward(g.double())  # the same rounded upstream gradient
    for name in names:
        got, want = getattr(low, name).grad, getattr(ref, name).grad
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == getattr(low, name).dtype
        assert torch.isfinite(got).all(), f"non-finite gradient for {name}"
        err = rel_err(got, want)
        # Gradients are long reductions over T or d_out: allow the same budget as the forward.
        assert err <= TOL[dtype], f"grad {name} rel err {err:.3g} > {TOL[dtype]:.0e}"


@contextlib.contextmanager
def no_host_sync(where: str) -> Iterator[None]:
    """Every Python-level way a tensor value reaches the host raises ``AssertionError`` inside the block
    ("host synchronisation in <where>"): on CPU this finds the reads that would sync a GPU stream."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"host synchronisation in {where}")

    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def random_adapter(path, base: torch.nn.Module, seed: int, scale: float = 0.3):
    """A rank-8 PEFT-format adapter with random A and B on every linear of ``base``'s decoder layers, saved
    at ``path`` (nonzero B, so the expert changes the output)."""
    from selfmoe.adapters import save_lora_adapter

    g = torch.Generator().manual_seed(seed)
    weights = {n: (torch.randn(8, m.in_features, generator=g) * scale, torch.randn(m.out_features, 8, generator=g) * scale)
               for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    save_lora_adapter(path, weights, r=8, lora_alpha=16)
    return path


def spread_tiny_mixse(dtype: torch.dtype, seed: int, top_k: int):
    """A MiXSE over the tiny random Llama (vocab 97): 4 experts of rank 3 on every projection with fresh
    nonzero B, a shared router spread wide enough that tokens reach different experts; eval mode."""
    from selfmoe import MiXSE
    from selfmoe.tiny_model import build_model

    base = build_model(97, seed=seed).to(dtype).eval()
    model = MiXSE.from_scratch(base, num_experts=4, r=3, lora_alpha=5, top_k=top_k, router="shared")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.lora_modules.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.1)
        model.router.linear.weight.copy_(torch.randn(model.router.linear.weight.shape, generator=g) * 2.0)
    return model.eval()


def greedy_decode_logits(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode of ``prompt [B, S]`` with the KV cache: the logits of every step, ``[B, steps, V]``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            logits = model(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.stack(out, 1)
