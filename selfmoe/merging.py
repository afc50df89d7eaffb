"""Weight-merging baselines for LoRA experts: linear (task arithmetic), TIES, DARE, DARE+TIES.

Self-MoE compares MiXSE against merging the experts into one set of weights (TIES and DARE). Merging
works on each expert's **full** update of a module, ``delta_e = scaling_e * B_e @ A_e`` (``[out, in]``):
low-rank factors of different experts live in unrelated bases, so averaging the factors themselves
would be meaningless.

With per-expert weights ``w_e`` (default 1 each, the task-arithmetic convention) and ``n`` experts:

- ``linear``:    ``sum_e w_e * delta_e``.
- ``ties``:      (Yadav et al., 2023) trim each ``delta_e`` to its ``floor(density * numel)`` largest
  magnitudes (the rest set to 0); ``v_e = w_e * trimmed_e``; elect a sign per entry,
  ``s = sign(sum_e v_e)``; disjoint mean ``sum_{e: sign(v_e) = s} v_e / #{e: sign(v_e) = s}`` (entries
  where no expert agrees, including ``s = 0``, are 0). With all ``w_e = lam`` this is the paper's
  ``lam * tau_m``.
- ``dare``:      (Yu et al., 2024) drop each entry of each ``delta_e`` independently with probability
  ``drop_rate``, rescale survivors by ``1 / (1 - drop_rate)`` (unbiased), then ``linear``.
- ``dare_ties``: the DARE drop-and-rescale, then TIES sign election and disjoint mean (no magnitude
  trim), as in PEFT / mergekit.

Then :func:`merge_into_base` adds the merged deltas into a base model's linears, or
:func:`merged_to_lora` factors them back into a single LoRA (truncated SVD) for ``save_lora_adapter``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapters import LoRAAdapter, check_same_base
from .choices import MERGE_METHODS  # defined once, torch-free (the CLI offers them too)

__all__ = [
    "DEFAULT_DENSITY",
    "DEFAULT_DROP_RATE",
    "MERGE_METHODS",
    "dare_drop",
    "iter_merged_deltas",
    "lora_approximation_error",
    "merge_adapters",
    "merge_deltas",
    "merge_into_base",
    "merged_to_lora",
    "ties_disjoint_merge",
    "trim_by_magnitude",
]

MergeMethod = Literal["linear", "ties", "dare", "dare_ties"]
DEFAULT_DENSITY = 0.2  # TIES paper: keep the top 20% of each task vector
DEFAULT_DROP_RATE = 0.9  # DARE paper's usual drop rate for fine-tuned deltas

Weights = Union[Sequence[float], torch.Tensor, None]


# ------------------------------------------------------------------------------------------------------
# Building blocks (public so experiments can compose them differently)
# ------------------------------------------------------------------------------------------------------
def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``floor(density * numel)`` entries of ``delta`` with the largest ``|value|``; zero the rest.

    Exactly that many entries are kept; among equal magnitudes the lower flat index wins, so the result is
    deterministic on every device. Returns a new tensor of ``delta``'s shape and dtype.
    """
    _check_fraction("density", density, low_open=True, high_open=False)
    n = delta.numel()
    # The epsilon guards against float products such as 0.29 * 100 = 28.999999999999996.
    k = min(n, int(math.floor(density * n + 1e-6)))
    if k >= n:
        return delta.clone()
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        keep = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
        out[keep] = flat[keep]
    return out.reshape(delta.shape)


def dare_drop(delta: torch.Tensor, drop_rate: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE: zero each entry independently with probability ``drop_rate`` and scale the survivors by
    ``1 / (1 - drop_rate)``, so the expectation equals ``delta``.

    The uniform draws are made on ``generator``'s device (CPU by default) and moved, so a seeded CPU
    generator gives the same mask whether ``delta`` lives on CPU or GPU.
    """
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(delta.shape, generator=generator, device=gen_device, dtype=torch.float64).to(delta.device)
    keep = u >= drop_rate  # P(keep) = 1 - drop_rate
    return torch.where(keep, delta / (1.0 - drop_rate), torch.zeros((), dtype=delta.dtype, device=delta.device))


def ties_disjoint_merge(values: torch.Tensor) -> torch.Tensor:
    """TIES sign election and disjoint mean over the leading (expert) dimension.

    ``values``: ``[n, *shape]`` (already trimmed / dropped and weighted). Per entry, the elected sign is
    ``sign(sum_e values[e])``; the result is the mean of the non-zero values with that sign, 0 where none
    agree (including a tie, ``sum = 0``: no majority, nothing to keep). Returns ``[*shape]``.
    """
    elected = torch.sign(values.sum(dim=0))
    agree = (torch.sign(values) == elected) & (values != 0)
    total = torch.where(agree, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count.to(values.dtype)


# ------------------------------------------------------------------------------------------------------
# Merging full deltas
# ------------------------------------------------------------------------------------------------------
def _check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _resolve_params(
    method: str, n: int, weights: Weights, density: Optional[float], drop_rate: Optional[float]
) -> Tuple[List[float], Optional[float], Optional[float]]:
    """Validate the method and its parameters; fill in defaults. A parameter the method does not use is an
    error (passing ``density`` to ``dare`` is almost certainly a mistake: DARE's knob is ``drop_rate``)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")
    uses_density = method == "ties"
    uses_drop = method in ("dare", "dare_ties")
    if density is not None and not uses_density:
        raise ValueError(f"density is only used by method 'ties', not {method!r} (DARE's parameter is drop_rate)")
    if drop_rate is not None and not uses_drop:
        raise ValueError(f"drop_rate is only used by methods 'dare' and 'dare_ties', not {method!r}")
    if uses_density:
        density = DEFAULT_DENSITY if density is None else density
        _check_fraction("density", density, low_open=True, high_open=False)
    if uses_drop:
        drop_rate = DEFAULT_DROP_RATE if drop_rate is None else drop_rate
        _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)

    if weights is None:
        w = [1.0] * n
    else:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1:
                raise ValueError(f"weights must be 1-D with one entry per expert, got shape {list(weights.shape)}")
            weights = weights.tolist()
        w = [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"weights has {len(w)} entries but there are {n} experts")
        if not all(math.isfinite(x) for x in w):
            raise ValueError(f"weights must be finite, got {w}")
    return w, density, drop_rate


def _make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        return torch.Generator(device="cpu").manual_seed(int(seed))
    return generator


def _merge_stack(
    deltas: Sequence[torch.Tensor],
    method: str,
    w: List[float],
    density: Optional[float],
    drop_rate: Optional[float],
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    if method in ("dare", "dare_ties"):
        assert drop_rate is not None
        deltas = [dare_drop(d, drop_rate, generator) for d in deltas]
    elif method == "ties":
        assert density is not None
        deltas = [trim_by_magnitude(d, density) for d in deltas]
    weighted = torch.stack([d * wi for d, wi in zip(deltas, w)])
    if method in ("linear", "dare"):
        return weighted.sum(dim=0)
    return ties_disjoint_merge(weighted)


def _merge_setup(method: MergeMethod, n: int, weights: Weights, density: Optional[float] = None,
                 drop_rate: Optional[float] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[List[float], Optional[float], Optional[float], Optional[torch.Generator]]:
    """The merge options checked: per-expert weights, density, drop rate, and DARE's generator."""
    w, density, drop_rate = _resolve_params(method, n, weights, density, drop_rate)
    return w, density, drop_rate, _make_generator(seed, generator)


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    method: MergeMethod,
    weights: Weights = None,
    *,
    density: Optional[float] = None,
    drop_rate: Optional[float] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Merge same-shaped full deltas (one per expert) into one (see the module docstring for the maths).

    Args:
        deltas: ``n >= 1`` tensors of one shape (``[out, in]`` for a linear), on one device.
        method: ``"linear"``, ``"ties"``, ``"dare"`` or ``"dare_ties"``.
        weights: one finite float per expert; default 1 each.
        density: TIES only; fraction of entries kept per delta, in (0, 1]; default 0.2.
        drop_rate: DARE only; drop probability in [0, 1); default 0.9.
        seed / generator: DARE randomness (at most one). Neither: the global RNG (not reproducible).

    Returns the merged delta, same shape, in the inputs' promoted dtype (computed in at least float32).
    """
    if isinstance(deltas, torch.Tensor) or len(deltas) == 0:
        raise ValueError("deltas must be a non-empty list of tensors (one per expert)")
    for i, d in enumerate(deltas):
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise TypeError(f"deltas[{i}] must be a floating-point tensor, got {type(d).__name__ if not isinstance(d, torch.Tensor) else d.dtype}")
        if d.shape != deltas[0].shape:
            raise ValueError(f"deltas[{i}] has shape {list(d.shape)} but deltas[0] has shape {list(deltas[0].shape)}")
        if d.device != deltas[0].device:
            raise ValueError(f"deltas[{i}] is on {d.device} but deltas[0] is on {deltas[0].device}")
    w, density, drop_rate, gen = _merge_setup(method, len(deltas), weights, density, drop_rate, seed, generator)
    out_dtype = functools.reduce(torch.promote_types, (d.dtype for d in deltas))
    compute = torch.promote_types(out_dtype, torch.float32)  # half-precision sums/means lose too much
    merged = _merge_stack([d.to(compute) for d in deltas], method, w, density, drop_rate, gen)
    return merged.to(out_dtype)


# ------------------------------------------------------------------------------------------------------
# Merging adapters
# ------------------------------------------------------------------------------------------------------
def iter_merged_deltas(
    adapters: Sequence[LoRAAdapter],
    method: MergeMethod,
    weights: Weights = None,
    *,
    dtype: Optional[torch.dtype] = None,
    strict: bool = False,
    **options: Any,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(module, merged delta [out, in])`` one module at a time, in sorted module order (use this
    to merge a large model without holding every full delta in memory at once; :func:`merge_adapters`
    collects them). Parameters are validated before the first module is yielded.

    Args:
        adapters: the experts (modules may differ: a missing module counts as a zero update).
        method, weights: as in :func:`merge_deltas`.
        dtype: compute/result dtype; default float32 (float64 if any adapter is float64).
        strict: refuse experts that declare different base models (default: a warning); see
            :func:`selfmoe.adapters.check_same_base`.
        options: ``density``, ``drop_rate``, ``seed``, ``generator``, as in :func:`merge_deltas`. DARE
            draws its masks module by module in sorted module order, experts in list order, so a seed
            reproduces.
    """
    if isinstance(adapters, LoRAAdapter) or len(adapters) == 0:
        raise ValueError("adapters must be a non-empty list of LoRAAdapter")
    for i, a in enumerate(adapters):
        if not isinstance(a, LoRAAdapter):
            raise TypeError(f"adapters[{i}] must be a LoRAAdapter, got {type(a).__name__}")
    check_same_base({f"expert {i}": ad for i, ad in enumerate(adapters)}, strict=strict)
    w, density, drop_rate, gen = _merge_setup(method, len(adapters), weights, **options)
    if dtype is None:
        stored = [A.dtype for a in adapters for A, _ in a.weights.values()]
        dtype = torch.float64 if torch.float64 in stored else torch.float32
    modules = sorted(set().union(*(a.weights.keys() for a in adapters)))
    # Check every module's shapes across experts up front so a mismatch fails before any work is done.
    shapes: Dict[str, Tuple[int, int]] = {}
    for module in modules:
        for i, a in enumerate(adapters):
            if module not in a.weights:
                continue
            A, B = a.weights[module]
            shape = (B.shape[0], A.shape[1])
            if shapes.setdefault(module, shape) != shape:
                raise ValueError(
                    f"module {module!r}: adapters[{i}] has update shape {list(shape)} [out, in] but an earlier adapter "
                    f"has {list(shapes[module])}"
                )

    def generate() -> Iterator[Tuple[str, torch.Tensor]]:
        for module in modules:
            present = [a for a in adapters if module in a.weights]
            device = present[0].weights[module][0].device
            # An expert that does not adapt a module contributes a zero update there: it adds nothing to a
            # linear merge and neither votes nor counts in TIES.
            deltas = [
                a.delta(module, dtype=dtype).to(device) if module in a.weights
                else torch.zeros(shapes[module], dtype=dtype, device=device)
                for a in adapters
            ]
            yield module, _merge_stack(deltas, method, w, density, drop_rate, gen)

    return generate()


def merge_adapters(adapters: Sequence[LoRAAdapter], method: MergeMethod, weights: Weights = None,
                   **options: Any) -> Dict[str, torch.Tensor]:
    """Merge LoRA experts module by module on their full deltas ``scaling_e(m) * B_e @ A_e``.

    Args:
        adapters: the experts (modules may differ: a missing module counts as a zero update).
        method, weights: as in :func:`merge_deltas`.
        options: ``density``, ``drop_rate``, ``seed``, ``generator``, ``dtype``, ``strict``, as in
            :func:`iter_merged_deltas`.

    Returns ``{module: merged delta [out, in]}``, ready for :func:`merge_into_base` or :func:`merged_to_lora`.
    Raises ``ValueError`` naming the module when experts disagree on its shape.
    """
    return dict(iter_merged_deltas(adapters, method, weights, **options))


# ------------------------------------------------------------------------------------------------------
# Using the result
# ------------------------------------------------------------------------------------------------------
def _base_linear(model: nn.Module, module: str) -> nn.Linear:
    try:
        sub = model.get_submodule(module)
    except AttributeError as exc:
        raise KeyError(
            f"module {module!r} not found in {type(model).__name__}; merged deltas are keyed by paths inside the "
            "base causal LM (e.g. 'model.layers.0.self_attn.q_proj')"
        ) from exc
    # A wrapped layer (PEFT LoraLayer, selfmoe MoLoRALinear) keeps the original linear as `base_layer`.
    if not isinstance(sub, nn.Linear) and isinstance(getattr(sub, "base_layer", None), nn.Linear):
        sub = sub.base_layer
    if not isinstance(sub, nn.Linear):
        raise TypeError(f"module {module!r} is a {type(sub).__name__}, not an nn.Linear")
    return sub


@torch.no_grad()
def merge_into_base(model: nn.Module, merged_deltas: Mapping[str, torch.Tensor]) -> None:
    """Add each merged delta ``[out, in]`` into ``model``'s linear of that path, in place.

    All modules and shapes are checked before any weight changes, so an error leaves the model untouched.
    The sum is formed in at least float32 and cast back to the weight's dtype (adding a small delta
    directly in bf16 would round much of it away twice).
    """
    targets = []
    for module, delta in merged_deltas.items():
        linear = _base_linear(model, module)
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(linear.weight.shape):
            got = list(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise ValueError(f"module {module!r}: delta has shape {got} but the weight is {list(linear.weight.shape)} [out, in]")
        targets.append((linear, delta))
    for linear, delta in targets:
        weight = linear.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        summed = weight.to(compute) + delta.to(device=weight.device, dtype=compute)
        weight.copy_(summed.to(weight.dtype))


def merged_to_lora(
    merged_deltas: Mapping[str, torch.Tensor],
    r: int,
    *,
    lora_alpha: Optional[float] = None,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Factor each delta ``[out, in]`` into LoRA factors ``A [r, in]``, ``B [out, r]`` by truncated SVD.

    The factors satisfy ``(lora_alpha / r) * B @ A ~= delta`` (``lora_alpha`` defaults to ``r``: scaling 1),
    so save them with ``save_lora_adapter(path, factors, r=r, lora_alpha=lora_alpha)``. The approximation
    is the best rank-``r`` one (Eckart-Young); it is exact when ``r >= rank(delta)``. When ``r`` exceeds
    ``min(out, in)`` the extra components are zero. The singular values are split evenly
    (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) so the factors are balanced for further training.
    Factors come back in the delta's dtype and device (SVD computed in at least float32).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    alpha = float(r if lora_alpha is None else lora_alpha)
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"lora_alpha must be finite and non-zero, got {lora_alpha!r}")
    scaling = alpha / r
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for module, delta in merged_deltas.items():
        if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or not delta.is_floating_point():
            got = f"{list(delta.shape)} {delta.dtype}" if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise ValueError(f"module {module!r}: expected a 2-D floating delta [out, in], got {got}")
        out_f, in_f = delta.shape
        compute = torch.promote_types(delta.dtype, torch.float32)
        U, S, Vh = torch.linalg.svd(delta.to(compute) / scaling, full_matrices=False)
        k = min(r, S.numel())
        root = S[:k].sqrt()
        A = torch.zeros(r, in_f, dtype=compute, device=delta.device)
        B = torch.zeros(out_f, r, dtype=compute, device=delta.device)
        A[:k] = root[:, None] * Vh[:k]
        B[:, :k] = U[:, :k] * root[None, :]
        factors[module] = (A.to(delta.dtype), B.to(delta.dtype))
    return factors


def lora_approximation_error(merged_deltas: Mapping[str, torch.Tensor],
                             factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], r: int,
                             lora_alpha: Optional[float] = None) -> float:
    """How far :func:`merged_to_lora`'s factors are from the merged deltas: ``||delta - (alpha/r) B A||_F /
    ||delta||_F`` over all modules together (0 when the factorisation is exact)."""
    scaling = float(r if lora_alpha is None else lora_alpha) / r
    err = norm = 0.0
    for module, delta in merged_deltas.items():
        A, B = factors[module]
        d = delta.double()
        err += float((d - scaling * (B.double() @ A.double())).pow(2).sum())
        norm += float(d.pow(2).sum())
    return math.sqrt(err / norm) if norm > 0 else 0.0
