"""Benchmark the routed multi-LoRA linear against the ways people run LoRA mixtures today.

Providers (each computes ``y = x @ W.T + b + sum_j w_j * s * B_e A_e x`` for top-k routed tokens):
  base              bare ``F.linear`` — the roofline every ratio is measured against
  selfmoe-torch     ``lora_mix(..., backend="torch")`` with the base fused (the CPU path / fallback)
  per-expert-loop   PEFT/MixLoRA style: a Python loop over experts, gather tokens, index_add back
  dense-all-experts X-LoRA style: every expert on every token, scaled by dense gates

Modes:
  fwd               inference forward (no autograd)
  fwd+bwd-router    router training: gradients for x and the gates; experts and base frozen
  fwd+bwd-experts   expert training: gradients for x, gates, lora_A and lora_B

Usage:
  python benchmarks/bench_lora_mix.py                 # default shapes for the device present
  python benchmarks/bench_lora_mix.py --shapes paper-cpu --modes fwd+bwd-router --reps 20

Results: a table on stdout and ``benchmarks/results/<device>.csv`` (one row per provider, mode and
shape, with device, versions and commit). Ratios compare timings from the same run only.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, device_label, device_slug, git_commit, time_many_ms, timestamp, versions, write_csv
from selfmoe.kernels import lora_mix


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    d_in: int
    d_out: int
    E: int
    r: int
    k: int


SHAPES: Dict[str, Shape] = {
    # CPU: the target shape (paper setup at a CPU-sized width) and a top-2 variant.
    "paper-cpu": Shape("paper-cpu", 4096, 1024, 1024, 4, 8, 1),
    "top2-cpu": Shape("top2-cpu", 2048, 1024, 1024, 8, 16, 2),
    # GPU: prefill/training headline, the paper's setup, many experts, decode.
    "prefill": Shape("prefill", 8192, 4096, 4096, 8, 16, 2),
    "paper": Shape("paper", 8192, 4096, 4096, 4, 8, 1),
    "many-experts": Shape("many-experts", 8192, 4096, 4096, 64, 16, 2),
    **{f"decode-T{t}": Shape(f"decode-T{t}", t, 4096, 4096, 8, 16, 2) for t in (1, 16, 64)},
}
DEFAULT_SHAPES = {"cpu": ["paper-cpu", "top2-cpu"], "cuda": ["prefill", "paper", "many-experts", "decode-T1", "decode-T16", "decode-T64"]}
MODES = ("fwd", "fwd+bwd-router", "fwd+bwd-experts")
GRADS = {"fwd": (), "fwd+bwd-router": ("x", "w"), "fwd+bwd-experts": ("x", "w", "A", "B")}
SCALING = 2.0


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, mode: str, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    logits = torch.randn(shape.T, shape.E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(shape.k, dim=-1)
    inp = {
        "x": rand(shape.T, shape.d_in),
        "A": rand(shape.E, shape.r, shape.d_in, scale=shape.d_in**-0.5),
        "B": rand(shape.E, shape.d_out, shape.r, scale=shape.r**-0.5),
        "W": rand(shape.d_out, shape.d_in, scale=shape.d_in**-0.5),
        "b": rand(shape.d_out),
        "ids": ids.to(device),
        "w": w.to(device=device, dtype=dtype),
    }
    for name in GRADS[mode]:
        inp[name].requires_grad_(True)
    return inp


# ---- providers: each maps inputs to the layer output ----

def base(inp):
    return F.linear(inp["x"], inp["W"], inp["b"])


def selfmoe_torch(inp):
    return lora_mix(inp["x"], inp["A"], inp["B"], inp["ids"], inp["w"], SCALING,
                    base_weight=inp["W"], base_bias=inp["b"], backend="torch")


def per_expert_loop(inp):
    """The usual MoE-LoRA implementation: per expert, gather its tokens, run its LoRA, scatter back."""
    x, ids, w = inp["x"], inp["ids"], inp["w"]
    y = F.linear(x, inp["W"], inp["b"])
    for e in range(inp["A"].shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        delta = F.linear(F.linear(x[tok], inp["A"][e]), inp["B"][e])
        y = y.index_add(0, tok, delta * (w[tok, slot] * SCALING).unsqueeze(-1))
    return y


def dense_all_experts(inp):
    """X-LoRA style: every expert's LoRA on every token, weighted by dense (mostly zero) gates."""
    x, ids, w = inp["x"], inp["ids"], inp["w"]
    E = inp["A"].shape[0]
    gates = torch.zeros(x.shape[0], E, dtype=w.dtype, device=x.device).scatter_add(1, ids, w)
    y = F.linear(x, inp["W"], inp["b"])
    for e in range(E):
        y = y + F.linear(F.linear(x, inp["A"][e]), inp["B"][e]) * (gates[:, e : e + 1] * SCALING)
    return y


PROVIDERS: Dict[str, Callable] = {
    "base": base,
    "selfmoe-torch": selfmoe_torch,
    "per-expert-loop": per_expert_loop,
    "dense-all-experts": dense_all_experts,
}


def runner(provider: Callable, inp: Dict[str, torch.Tensor], mode: str) -> Callable[[], None]:
    """A no-argument callable doing one timed step of `mode`."""
    leaves = [inp[n] for n in GRADS[mode]]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                provider(inp)
        return step
    if provider is base:
        # The bare linear trains nothing of the mixture: it only passes the gradient to x.
        leaves = [inp["x"]]
    dy = torch.randn(inp["x"].shape[0], inp["W"].shape[0], dtype=inp["x"].dtype, device=inp["x"].device)

    def step():
        for t in leaves:
            t.grad = None
        provider(inp).backward(dy)
    return step


def run(shapes: List[str], modes: List[str], providers: List[str], dtype: torch.dtype, device: torch.device,
        reps: int) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    meta = {"device": device_label(device), **versions(), "commit": git_commit(), "date": timestamp()}
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for mode in modes:
            inp = make_inputs(shape, dtype, device, mode, seed=0)  # one input set: every provider sees the same data
            steps = {name: runner(PROVIDERS[name], inp, mode) for name in providers}
            timings = time_many_ms(steps, device, reps=reps)
            del inp, steps
            base_ms = timings.get("base")
            for name, ms in timings.items():
                rows.append({
                    "device": meta["device"], "provider": name, "mode": mode, "shape": shape.name,
                    "T": shape.T, "d_in": shape.d_in, "d_out": shape.d_out, "E": shape.E, "r": shape.r,
                    "k": shape.k, "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 4),
                    "ratio_to_base": round(ms / base_ms, 4) if base_ms else "",
                    "torch": meta["torch"], "triton": meta["triton"], "commit": meta["commit"], "date": meta["date"],
                })
    return rows


def print_table(rows: List[Dict[str, object]]) -> None:
    header = f"{'shape':<14}{'mode':<17}{'provider':<20}{'ms':>10}{'x base':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['shape']:<14}{row['mode']:<17}{row['provider']:<20}{row['ms']:>10.3f}{row['ratio_to_base']:>9.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<device>.csv)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES[device.type]
    modes = args.modes.split(",")
    providers = args.providers.split(",")
    for value, known, what in ((shapes, SHAPES, "shape"), (modes, MODES, "mode"), (providers, PROVIDERS, "provider")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    if "base" not in providers:
        providers = ["base"] + providers  # every ratio needs the base from the same run

    print(f"device: {device_label(device)} | torch {versions()['torch']} | triton {versions()['triton']} | {dtype}")
    rows = run(shapes, modes, providers, dtype, device, args.reps)
    print_table(rows)
    out = Path(args.out) if args.out else RESULTS_DIR / f"{device_slug(device)}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
