"""One router-training step (forward, backward, optimizer step) of a causal LM with LoRA experts.

Providers, all on the same random base model and the same E adapters (rank r on all 7 projections):
  bare    the frozen base model alone; a trainable zero vector added to the input embeddings makes
          backward run through every layer, as it must for a router at every layer
  xlora   PEFT X-LoRA (the Self-MoE paper's stack): adapter-free scaling pass, classifier, real pass;
          top-k LoRA masking; adapters named "0".."E-1" (peft's X-LoRA training path needs digit names)
  mixse   selfmoe.MiXSE, shared router (one pass), top-k, fused lora_mix (Triton on CUDA via "auto")
  mixse-conc         mixse plus ModuleFormer's load concentration loss (aux_loss concentration=0.01)
  mixse-hyper        mixse plus HyperMoE's HyperExpert (paper sizes: embeddings 128, bottleneck 128,
                     adapter 64), its adapter computed through the bottleneck (no per-token weights)
  mixse-hyper-naive  the same HyperExpert materialising per-token adapter weights (T x d x 64): the
                     baseline the factored form is measured against (not in the default set: it needs
                     T x a x (d_in + d_out) floats per linear kept for backward)
  mixse-intuition    mixse with the intuition prior (Liu et al. 2024) mixed into the router: centroids =
                     the E experts (fitted on the batch), prior from the mean-pooled token embeddings
  mor1e              MiXSE.from_rank1: a rank-r LoRA whose r rank-1 components are the experts, per-layer
                     routers, dense softmax; experts and routers both train (an expert-training step)
  mor1e-mm           the 4 x 8 mix-and-match variant (32 pair experts from 4 A rows and 8 B columns), dense

Memory, per provider, for one step: saved_mb = what autograd keeps for backward (distinct storages,
parameters excluded), measured on every device; peak_mb = torch.cuda.max_memory_allocated on CUDA.

Presets:
  tiny    Llama hidden 64, 2 layers, batch 2x64 (a smoke run of every provider in seconds)
  small   Llama hidden 256, 4 layers, 8 heads / 4 KV heads, intermediate 688, vocab 2048; batch 4x256;
          4 experts of rank 8, top-1 (the CPU target: mixse <= 1.25x bare, >= 2x faster than xlora)
  large   Llama hidden 2048, 16 layers, 16 heads / 8 KV heads, intermediate 5632, vocab 32000;
          batch 4x1024; same experts (for CUDA, bf16)
  smollm2-135m  the built-in model's shape (SmolLM2-135M-Instruct: hidden 576, 30 layers, 9 heads /
          3 KV heads of 64, intermediate 1536, vocab 49152, tied embeddings); its real weights when it is
          in the selfmoe cache, random weights otherwise; batch 4x128; same experts (CPU target: mixse <=
          1.25x bare, xlora / mixse >= 2x)

Usage:
  python benchmarks/bench_train_step.py                        # small on CPU (or large on CUDA)
  python benchmarks/bench_train_step.py --device cuda --preset large
  python benchmarks/bench_train_step.py --providers bare,mixse --reps 20
  python benchmarks/bench_train_step.py --providers bare,mixse,mixse-intuition,mor1e,mor1e-mm

Results: a table on stdout and <results-dir>/train_step_<device>.csv (device, versions, commit,
ms, ratio to bare). Ratios compare timings from the same run only (CPU: round-robin timing, so load
from other processes lands on all providers alike; on CPU each ratio is the median over rounds of the
same-round ratio).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (LOCAL_RESULTS_DIR, device_label, device_slug, git_commit, median_ratio, time_many_ms,
                               time_rounds_ms, timestamp, versions, write_csv)


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    experts: int = 4
    rank: int = 8
    alpha: int = 16
    top_k: int = 1
    head_dim: int = 0  # 0: hidden // heads
    tie_embeddings: bool = False
    builtin: str = ""  # a selfmoe built-in model whose cached weights are used when present


PRESETS = {
    "tiny": Preset("tiny", 64, 2, 4, 2, 128, 256, 2, 64),
    "small": Preset("small", 256, 4, 8, 4, 688, 2048, 4, 256),
    "large": Preset("large", 2048, 16, 16, 8, 5632, 32000, 4, 1024),
    "smollm2-135m": Preset("smollm2-135m", 576, 30, 9, 3, 1536, 49152, 4, 128, head_dim=64, tie_embeddings=True,
                           builtin="smollm2-135m"),
}
PROVIDERS = ("bare", "xlora", "mixse", "mixse-conc", "mixse-hyper", "mixse-hyper-naive", "mixse-intuition", "mor1e",
             "mor1e-mm")
# the issue-13 targets, plus the ModuleFormer / HyperMoE rows; the other related designs on request
DEFAULT_PROVIDERS = ("bare", "xlora", "mixse", "mixse-conc", "mixse-hyper")


def builtin_weights(p: Preset) -> str:
    """The cached folder of the preset's built-in model, or "" (absent, or no built-in model); never downloads."""
    if not p.builtin:
        return ""
    from selfmoe.builtin_models import BUILTIN_MODELS, _models_dir, is_complete

    folder = _models_dir(None) / p.builtin
    return str(folder) if is_complete(folder, BUILTIN_MODELS[p.builtin]) else ""


def make_base(p: Preset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    folder = builtin_weights(p)
    if folder:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.config.use_cache = False  # X-LoRA refuses use_cache=True
    else:
        cfg = LlamaConfig(
            hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
            num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, vocab_size=p.vocab,
            head_dim=p.head_dim or p.hidden // p.heads, tie_word_embeddings=p.tie_embeddings,
            max_position_embeddings=max(2048, p.seq), use_cache=False,  # X-LoRA refuses use_cache=True
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.train()


def make_adapters(p: Preset, base: nn.Module, root: Path) -> Dict[str, str]:
    """E PEFT adapters with random nonzero factors on every projection of every layer."""
    from selfmoe.adapters import save_lora_adapter

    paths = {}
    g = torch.Generator().manual_seed(1)
    for e in range(p.experts):
        weights = {}
        for name, mod in base.named_modules():
            if isinstance(mod, nn.Linear) and name.startswith("model.layers."):
                A = torch.randn(p.rank, mod.in_features, generator=g) / mod.in_features ** 0.5
                B = torch.randn(mod.out_features, p.rank, generator=g) * 0.02
                weights[name] = (A, B)
        path = root / str(e)
        save_lora_adapter(path, weights, r=p.rank, lora_alpha=p.alpha)
        paths[str(e)] = str(path)
    return paths


def build_bare(p, device, dtype, adapters):
    model = make_base(p, device, dtype)
    # Trainable zero vector on the embeddings' output: backward then runs through every layer (as for a
    # router) without changing the loss or training any base weight.
    shift = nn.Parameter(torch.zeros(p.hidden, device=device, dtype=dtype))
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out + shift)
    return model, [shift]


def build_xlora(p, device, dtype, adapters):
    from peft import XLoraConfig, get_peft_model

    base = make_base(p, device, dtype)
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=p.hidden, adapters=adapters, xlora_depth=1,
                      top_k_lora=p.top_k, use_trainable_adapters=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, cfg)
    model.to(device=device, dtype=dtype)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    return model, params


def build_mixse(p, device, dtype, adapters):
    from selfmoe import MiXSE

    base = make_base(p, device, dtype)
    model = MiXSE.from_adapters(base, adapters, top_k=p.top_k, router="shared")
    model.train()
    return model, model.router_parameters()


def build_mixse_conc(p, device, dtype, adapters):
    from selfmoe import MiXSE

    base = make_base(p, device, dtype)
    model = MiXSE.from_adapters(base, adapters, top_k=p.top_k, router="shared", aux_loss={"concentration": 0.01})
    model.train()
    return model, model.router_parameters()


def build_mixse_intuition(p, device, dtype, adapters, ids=None):
    from selfmoe import MiXSE
    from selfmoe.intuition import IntuitionConfig

    base = make_base(p, device, dtype)
    model = MiXSE.from_adapters(base, adapters, top_k=p.top_k, router="shared",
                                intuition=IntuitionConfig(clusters=p.experts, dim=p.hidden, learned_map=False))
    # one sequence per expert's cluster (the batch stands in for the training data)
    model.fit_intuition([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                        labels=[i % p.experts for i in range(ids.shape[0])])
    model.train()
    return model, model.router_parameters()


def build_mixse_hyper(p, device, dtype, adapters, impl="factored"):
    from selfmoe import MiXSE

    base = make_base(p, device, dtype)
    model = MiXSE.from_adapters(base, adapters, top_k=p.top_k, router="shared", hyper_expert=True)
    model.hyper.impl = impl
    with torch.no_grad():  # a trained-looking HyperExpert: its up side starts at zero otherwise
        for q in model.hyper.parameters():
            if not q.abs().sum():
                q.normal_(0, 1e-3)
    model.train()
    return model, model.router_parameters()


def build_mor1e(p, device, dtype, adapters, mix_and_match=None):
    from selfmoe import MiXSE

    model = MiXSE.from_rank1(make_base(p, device, dtype), r=p.rank, lora_alpha=p.alpha, mix_and_match=mix_and_match)
    model.train()
    return model, [q for q in model.parameters() if q.requires_grad]


BUILDERS = {"bare": build_bare, "xlora": build_xlora, "mixse": build_mixse, "mixse-conc": build_mixse_conc,
            "mixse-hyper": build_mixse_hyper,
            "mixse-hyper-naive": lambda *a: build_mixse_hyper(*a, impl="naive"),
            "mixse-intuition": build_mixse_intuition,
            "mor1e": build_mor1e, "mor1e-mm": lambda *a: build_mor1e(*a, mix_and_match=(4, 8))}


def make_step(model: nn.Module, params: List[nn.Parameter], ids: torch.Tensor) -> Callable[[], float]:
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss + out["aux_loss"] if "aux_loss" in out else out.loss
        loss.backward()
        opt.step()
        return loss

    return step


def step_memory_mb(step: Callable[[], object], params: List[nn.Parameter], device: torch.device) -> Dict[str, float]:
    """One step's memory: ``saved_mb`` = the distinct storages autograd keeps for backward (not the
    parameters), ``peak_mb`` = CUDA's peak allocation during the step (CUDA only, else None)."""
    weights = {q.untyped_storage().data_ptr() for q in params}
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"saved_mb": sum(seen.values()) / 2**20, "peak_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: small on CPU, large on CUDA")
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"from {', '.join(PROVIDERS)}")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: fp32 CPU, bf16 CUDA")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--results-dir", default=str(LOCAL_RESULTS_DIR),
                    help="where train_step_<device>.csv goes (default: benchmarks/results/local, ignored by git; "
                         "pass benchmarks/results to update the committed file on purpose)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset or ("large" if device.type == "cuda" else "small")]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training-time default; fp32 runs use TF32

    ids = torch.randint(0, preset.vocab, (preset.batch, preset.seq), generator=torch.Generator().manual_seed(2)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        probe = make_base(preset, torch.device("cpu"), torch.float32) if device.type == "cpu" else None
        adapters = make_adapters(preset, probe if probe is not None else make_base(preset, device, dtype), Path(tmp))
        del probe
        steps, memory = {}, {}
        for name in providers:
            if name == "mixse-intuition":
                model, params = BUILDERS[name](preset, device, dtype, adapters, ids=ids)
            else:
                model, params = BUILDERS[name](preset, device, dtype, adapters)
            steps[name] = make_step(model, params, ids)
            loss = steps[name]()
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss.item()}")
            memory[name] = step_memory_mb(steps[name], [q for q in model.parameters()], device)
    if device.type == "cpu":  # ratios: median over rounds of the same-round ratio (load varies between rounds)
        samples = time_rounds_ms(steps, reps=args.reps, warmup=args.warmup)
        times = {name: statistics.median(v) for name, v in samples.items()}
        ratio_of = {name: median_ratio(samples, name, "bare") for name in samples} if "bare" in samples else {}
        xlora_mixse = median_ratio(samples, "xlora", "mixse") if {"xlora", "mixse"} <= set(samples) else None
    else:
        times = time_many_ms(steps, device, reps=args.reps, warmup=args.warmup)
        ratio_of = {name: times[name] / times["bare"] for name in times} if "bare" in times else {}
        xlora_mixse = times["xlora"] / times["mixse"] if {"xlora", "mixse"} <= set(times) else None

    import peft
    import transformers

    vers = versions()
    rows = []
    label = device_label(device)
    weights = builtin_weights(preset) and f"{preset.builtin} weights" or "random weights"
    print(f"\ntrain step, preset {preset.name}, {weights} ({preset.batch}x{preset.seq} tokens, {preset.layers} layers, hidden {preset.hidden}, "
          f"{preset.experts} experts r={preset.rank} top-{preset.top_k}), {dtype}, {label}")
    print(f"{'provider':<18} {'ms':>10} {'x bare':>8} {'saved MB':>9} {'peak MB':>8}")
    for name in providers:
        ratio = ratio_of.get(name, float("nan"))
        mem = memory[name]
        peak = f"{mem['peak_mb']:>8.1f}" if mem["peak_mb"] is not None else f"{'-':>8}"
        print(f"{name:<18} {times[name]:>10.2f} {ratio:>8.3f} {mem['saved_mb']:>9.1f} {peak}")
        rows.append({
            "timestamp": timestamp(), "device": label, "provider": name, "ms": round(times[name], 4),
            "ratio_to_bare": round(ratio, 4), "saved_mb": round(mem["saved_mb"], 2),
            "peak_mb": round(mem["peak_mb"], 2) if mem["peak_mb"] is not None else "", "dtype": str(dtype).replace("torch.", ""), "reps": args.reps,
            "threads": torch.get_num_threads() if device.type == "cpu" else "",
            "torch": vers["torch"], "triton": vers["triton"], "transformers": transformers.__version__,
            "peft": peft.__version__, "xlora_over_mixse": round(xlora_mixse, 4) if xlora_mixse else "", "commit": git_commit(), "weights": weights, **{f"preset_{k}": v for k, v in asdict(preset).items()},
        })
    if xlora_mixse is not None:
        print(f"xlora / mixse = {xlora_mixse:.2f}x")
    if not args.no_csv:
        suffix = "" if preset.name in ("small", "large") else f"_{preset.name}"
        out = Path(args.results_dir) / f"train_step{suffix}_{device_slug(device)}.csv"
        write_csv(out, rows)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
