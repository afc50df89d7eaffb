"""Benchmark the routed multi-LoRA linear against the ways people run LoRA mixtures today.

Providers (each computes ``y = x @ W.T + b + sum_j w_j * s * B_e A_e x`` for top-k routed tokens):
  base              bare ``F.linear`` — the roofline every ratio is measured against
  selfmoe-torch     ``lora_mix(..., backend="torch")`` with the base fused (the CPU path / fallback):
                    whatever formulation the torch-side dispatcher picks (torch_dispatch.py)
  selfmoe-torch-dense   the same, forced to the dense-rank formulation (``SELFMOE_TORCH_PATH=dense``)
  selfmoe-torch-sorted  the same, forced to the sorted formulation (``SELFMOE_TORCH_PATH=sorted``:
                    slots sorted by expert, only the k chosen experts' rank columns, its own backward)
  selfmoe-torch-blas    ``selfmoe-torch`` with its rank-space GEMMs on torch's BLAS (``SELFMOE_CPU_GEMM=
                    torch``; the dispatcher then fits its choice to that): the torch path before
                    kernels/cpu_gemm.py, for the A/B in the same run
  base-onednn       the base linear itself through oneDNN (x86 CPUs, float32): what the bare GEMM costs
                    there, for reference only. Every ratio, selfmoe's included, stays against ``base``
                    (``F.linear``, the GEMM the base model runs); selfmoe computes its base product with
                    that same GEMM
  selfmoe-dense     dense-rank Triton kernels: shrink + expand fused into the base GEMM's K loop  (CUDA)
  selfmoe-grouped   grouped Triton kernels: tokens sorted by expert, only the k chosen experts     (CUDA)
  selfmoe-decode    one-launch decode kernel; only for T <= 64                                    (CUDA)
  selfmoe-auto      ``lora_mix(..., backend="auto")``: whatever the dispatcher picks               (CUDA)
  torch-grouped-mm  ``torch.nn.functional.grouped_mm`` on expert-sorted slots (where torch has it) (CUDA)
  per-expert-loop   PEFT/MixLoRA style: a Python loop over experts, gather tokens, index_add back
  sorted-expert-loop  the same loop at its best: slots sorted once, in-place index_add_ (only k*r columns;
                    autograd's backward; the prototype of selfmoe-torch-sorted)
  dense-all-experts X-LoRA style: every expert on every token, scaled by dense gates

The Triton providers run on CUDA only: on CPU they would run under the Triton interpreter, whose
timings mean nothing, so they are skipped with a message.

Modes:
  fwd               inference forward (no autograd)
  fwd+bwd-router    router training: gradients for x and the gates; experts and base frozen
  fwd+bwd-experts   expert training: gradients for x, gates, lora_A and lora_B

Usage:
  python benchmarks/bench_lora_mix.py                 # default shapes for the device present
  python benchmarks/bench_lora_mix.py --shapes paper-cpu --modes fwd+bwd-router --reps 20
  python benchmarks/bench_lora_mix.py --shapes rank1 --reps 3   # rank-1 experts, E up to 256

Results: a table on stdout, ``<results-dir>/<device>.csv`` (one row per provider, mode and
shape, with device, versions and commit) and ``<results-dir>/<device>.png`` (time relative to the
base linear per shape and mode; skipped with a message when matplotlib is not installed). Ratios
compare timings from the same run only.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LOCAL_RESULTS_DIR, device_label, device_slug, git_commit, time_many_ms, timestamp, versions, write_csv
from selfmoe.kernels import lora_mix
from selfmoe.kernels.cpu_gemm import ENV_CPU_GEMM, onednn_available, onednn_mm
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH


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
    # Rank-1 experts (MoR1E, Liu et al. 2024): a rank-r LoRA whose r rank-1 components are the experts,
    # so E is the rank and may run into the hundreds: dense softmax gating (k = E), sparse top-8, and the
    # 4 x 8 mix-and-match count (32 experts). "-cpu": the same at a CPU-sized width.
    "r1-E256-dense": Shape("r1-E256-dense", 8192, 4096, 4096, 256, 1, 256),
    "r1-E256-top8": Shape("r1-E256-top8", 8192, 4096, 4096, 256, 1, 8),
    "r1-E32-dense": Shape("r1-E32-dense", 8192, 4096, 4096, 32, 1, 32),
    "r1-E256-decode-T1": Shape("r1-E256-decode-T1", 1, 4096, 4096, 256, 1, 256),
    "r1-E256-dense-cpu": Shape("r1-E256-dense-cpu", 1024, 1024, 1024, 256, 1, 256),
    "r1-E256-top8-cpu": Shape("r1-E256-top8-cpu", 1024, 1024, 1024, 256, 1, 8),
    "r1-E32-dense-cpu": Shape("r1-E32-dense-cpu", 1024, 1024, 1024, 32, 1, 32),
}
RANK1_SHAPES = {"cpu": ["r1-E256-dense-cpu", "r1-E256-top8-cpu", "r1-E32-dense-cpu"],
                "cuda": ["r1-E256-dense", "r1-E256-top8", "r1-E32-dense", "r1-E256-decode-T1"]}
DEFAULT_SHAPES = {"cpu": ["paper-cpu", "top2-cpu"],
                  "cuda": ["prefill", "paper", "many-experts", "decode-T1", "decode-T16", "decode-T64", *RANK1_SHAPES["cuda"]]}
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


def _selfmoe_torch_with(variable: str, value: str):
    """``selfmoe-torch`` with the environment variable ``variable`` set to ``value`` for the call
    (forward and backward both: the backward runs the formulation and GEMMs its forward chose)."""
    def provider(inp):
        with mock.patch.dict(os.environ, {variable: value}):
            return selfmoe_torch(inp)
    provider.__name__ = f"selfmoe_torch_{variable.lower()}_{value}"
    return provider


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with both GEMMs through oneDNN; the gradient for x only (what ``base`` trains too)."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(W)
        return onednn_mm(x, W.t(), b)

    @staticmethod
    def backward(ctx, dy):
        (W,) = ctx.saved_tensors
        return onednn_mm(dy, W), None, None


def base_onednn(inp):
    return _OneDNNLinear.apply(inp["x"], inp["W"], inp["b"])


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


def sorted_expert_loop(inp):
    """The per-expert loop done as well as torch allows (the candidate sparse torch path of issue 13):
    token-slots sorted by expert once, one gather of x per expert, two GEMMs on only that expert's
    tokens, in-place ``index_add_`` into the base output. Pays k*r rank columns, not E*r."""
    x, ids, w = inp["x"], inp["ids"], inp["w"]
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [S] slots grouped by expert
    counts = torch.bincount(flat, minlength=inp["A"].shape[0]).tolist()  # host read: fine on CPU
    coef = w.reshape(-1) * SCALING
    y = F.linear(x, inp["W"], inp["b"])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        tok = slots // k
        h = F.linear(x.index_select(0, tok), inp["A"][e]) * coef.index_select(0, slots).unsqueeze(1)
        y.index_add_(0, tok, F.linear(h, inp["B"][e]))
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


def _triton_call(fn_name: str):
    def provider(inp):
        from selfmoe.kernels import lora_mix_decode, lora_mix_dense

        fn = {"dense": lora_mix_dense, "decode": lora_mix_decode}[fn_name]
        return fn(inp["x"], inp["A"], inp["B"], inp["ids"], inp["w"], SCALING, inp["W"], inp["b"])
    provider.__name__ = f"selfmoe_{fn_name}"
    return provider


selfmoe_dense = _triton_call("dense")
selfmoe_decode = _triton_call("decode")


def selfmoe_grouped(inp):
    from selfmoe.kernels.grouped import lora_mix_grouped

    return lora_mix_grouped(inp["x"], inp["A"], inp["B"], inp["ids"], inp["w"], SCALING, inp["W"], inp["b"])


def selfmoe_auto(inp):
    return lora_mix(inp["x"], inp["A"], inp["B"], inp["ids"], inp["w"], SCALING,
                    base_weight=inp["W"], base_bias=inp["b"], backend="auto")


def torch_grouped_mm(inp):
    """MoE-style: sort token-slots by expert, two ``F.grouped_mm`` calls (shrink, expand), index_add back."""
    x, ids, w, A, B = inp["x"], inp["ids"], inp["w"], inp["A"], inp["B"]
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [S] slots grouped by expert
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=A.shape[0]), 0).to(torch.int32)  # [E] group ends
    h = F.grouped_mm(x[tok], A.transpose(1, 2), offs=offs)  # [S, r]; mat_b [E, d_in, r], column-major
    ys = F.grouped_mm(h, B.transpose(1, 2), offs=offs)  # [S, d_out]
    gate = (w.reshape(-1)[order] * SCALING).unsqueeze(-1)
    return F.linear(x, inp["W"], inp["b"]).index_add(0, tok, ys * gate)


PROVIDERS: Dict[str, Callable] = {
    "base": base,
    "selfmoe-torch": selfmoe_torch,
    "selfmoe-torch-dense": _selfmoe_torch_with(ENV_TORCH_PATH, "dense"),
    "selfmoe-torch-sorted": _selfmoe_torch_with(ENV_TORCH_PATH, "sorted"),
    "selfmoe-torch-blas": _selfmoe_torch_with(ENV_CPU_GEMM, "torch"),
    "base-onednn": base_onednn,
    "selfmoe-dense": selfmoe_dense,
    "selfmoe-grouped": selfmoe_grouped,
    "selfmoe-decode": selfmoe_decode,
    "selfmoe-auto": selfmoe_auto,
    "torch-grouped-mm": torch_grouped_mm,
    "per-expert-loop": per_expert_loop,
    "sorted-expert-loop": sorted_expert_loop,
    "dense-all-experts": dense_all_experts,
}
TRITON_PROVIDERS = ("selfmoe-dense", "selfmoe-grouped", "selfmoe-decode", "selfmoe-auto")
DECODE_MAX_T = 64


def skip_reason(name: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why a provider does not run here (None: it runs)."""
    if name in TRITON_PROVIDERS and device.type != "cuda":
        return "CUDA only: on CPU Triton runs under its interpreter, whose timings mean nothing"
    if name == "base-onednn":
        if device.type != "cpu" or dtype != torch.float32 or not onednn_available():
            return "float32 on an x86 CPU with torch's oneDNN only"
    if name == "torch-grouped-mm" and device.type != "cuda":
        return "CUDA only: grouped_mm is the CUDA grouped-GEMM baseline"
    if name in TRITON_PROVIDERS:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    if name == "selfmoe-grouped":
        try:
            from selfmoe.kernels.grouped import lora_mix_grouped  # noqa: F401
        except ImportError as err:
            return f"grouped path not importable ({err})"
    if name == "selfmoe-decode" and shape.T > DECODE_MAX_T:
        return f"decode kernel is for T <= {DECODE_MAX_T}"
    if name == "torch-grouped-mm":
        if not hasattr(F, "grouped_mm"):
            return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
        if dtype != torch.bfloat16:
            return "F.grouped_mm takes bfloat16 only"
    return None


def runner(provider: Callable, inp: Dict[str, torch.Tensor], mode: str) -> Callable[[], None]:
    """A no-argument callable doing one timed step of `mode`."""
    leaves = [inp[n] for n in GRADS[mode]]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                provider(inp)
        return step
    if provider in (base, base_onednn):
        # The bare linear trains nothing of the mixture: it only passes the gradient to x.
        leaves = [inp["x"]]
    dy = torch.randn(inp["x"].shape[0], inp["W"].shape[0], dtype=inp["x"].dtype, device=inp["x"].device)

    def step():
        for t in leaves:
            t.grad = None
        provider(inp).backward(dy)
    return step


def _works(name: str, step: Callable[[], None]) -> Optional[str]:
    """Run one step of a kernel provider outside the timer. A provider that fails here (a kernel that
    does not compile on this GPU, an API this torch lacks) is reported and left out instead of ending
    the run; one that works has done its autotuning, which would otherwise land in do_bench's first
    call and make it pick far too few repetitions."""
    try:
        step()
    except Exception as err:  # noqa: BLE001 - any failure of a provider is reported, not fatal
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return None


def run(shapes: List[str], modes: List[str], providers: List[str], dtype: torch.dtype, device: torch.device,
        reps: int) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    meta = {"device": device_label(device), **versions(), "commit": git_commit(), "date": timestamp()}
    reported = set()
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for mode in modes:
            inp = make_inputs(shape, dtype, device, mode, seed=0)  # one input set: every provider sees the same data
            steps = {}
            for name in providers:
                reason = skip_reason(name, shape, device, dtype)
                step = runner(PROVIDERS[name], inp, mode) if reason is None else None
                if step is not None and (name in TRITON_PROVIDERS or name == "torch-grouped-mm"):
                    reason = _works(name, step)
                if reason is not None:
                    if (name, reason) not in reported:
                        print(f"skipping {name} ({shape.name}, {mode}): {reason}")
                        reported.add((name, reason))
                    continue
                steps[name] = step
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
    header = f"{'shape':<14}{'mode':<17}{'provider':<22}{'ms':>10}{'x base':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['shape']:<14}{row['mode']:<17}{row['provider']:<22}{row['ms']:>10.3f}{row['ratio_to_base']:>9.3f}")


def plot(rows: List[Dict[str, object]], path: Path) -> None:
    """Time relative to the base linear, one panel per mode, grouped bars per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "base"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 1.6 * len(shapes) + 2), 3.2 * len(modes)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, mode in zip(axes[:, 0], modes):
        for i, prov in enumerate(providers):
            ratio = {r["shape"]: r["ratio_to_base"] for r in rows if r["mode"] == mode and r["provider"] == prov}
            xs = [j + i * width for j, sh in enumerate(shapes) if ratio.get(sh, "") != ""]
            ys = [float(ratio[sh]) for sh in shapes if ratio.get(sh, "") != ""]
            ax.bar(xs, ys, width, label=prov)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set_yscale("log")
        ax.set_ylabel("time / base linear")
        ax.set_title(mode)
    axes[0, 0].legend(fontsize="small", ncol=2)
    fig.suptitle(f"{rows[0]['device']} | {rows[0]['dtype']} | torch {rows[0]['torch']} | commit {rows[0]['commit']}",
                 fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, from: {', '.join(SHAPES)}; 'rank1' = the rank-1-expert shapes of the device")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads; default: torch's own, one per core)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument("--results-dir", default=str(LOCAL_RESULTS_DIR),
                        help="where <device>.csv and .png go (default: benchmarks/results/local, ignored by git; "
                             "pass benchmarks/results to update the committed files on purpose)")
    parser.add_argument("--out", default=None, help="CSV path (overrides --results-dir)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES[device.type]
    shapes = [s for name in shapes for s in (RANK1_SHAPES[device.type] if name == "rank1" else [name])]
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
    out = Path(args.out) if args.out else Path(args.results_dir) / f"{device_slug(device)}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")
    if rows:
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
