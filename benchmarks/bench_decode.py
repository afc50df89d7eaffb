"""Greedy decode per token: MiXSE (shared router, top-k) against its base model, on the built-in model.

Setup: the built-in SmolLM2-135M-Instruct (30 layers, hidden 576) when it is in the selfmoe cache,
otherwise a random Llama with its config (``--random-base`` forces that); MiXSE.from_scratch with E
experts of rank r on all 7 projections of every layer (random nonzero factors: the timing does not
depend on the values), shared router, top-k. Two copies of the same base weights: one bare, one wrapped.

Per repetition and batch size: prefill a random prompt of ``--prompt`` tokens (not timed), then time
``--tokens`` greedy steps (forward of the last token with the KV cache, argmax), for base and MiXSE
in turn (round-robin, so load from other processes lands on both alike). The figure is ms per
decode step (a step decodes one token for each of the B sequences); the ratio is MiXSE / base from
the same run, median over repetitions. MiXSE decodes inside ``selfmoe.decode_cache`` (as selfmoe's
generation does: each routed layer stacks its experts' B once per generation, not once per call).
``--ab-dense`` adds ``mixse-dense``, the same MiXSE with the torch path forced to its general
(dense-rank, training) formulation: the A/B of the decode paths; ``--ab-cache`` adds ``mixse-nocache``,
the same MiXSE outside that block.

Usage:
  python benchmarks/bench_decode.py                       # batch 1 and 16, 32 tokens, 5 reps
  python benchmarks/bench_decode.py --batches 1 --reps 9 --results-dir benchmarks/results

Results: a table on stdout and <results-dir>/decode_<device>.csv (default results dir
benchmarks/results/local, ignored by git).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LOCAL_RESULTS_DIR, device_label, device_slug, git_commit, timestamp, versions, write_csv

MODEL = "smollm2-135m"


def builtin_folder() -> Tuple[str, bool]:
    """``(folder, present)`` of the built-in model in the selfmoe cache (never downloads)."""
    from selfmoe.builtin_models import BUILTIN_MODELS, _models_dir, is_complete

    folder = _models_dir(None) / MODEL
    return str(folder), is_complete(folder, BUILTIN_MODELS[MODEL])


def smollm2_config():
    """SmolLM2-135M's LlamaConfig (for random weights when the model is not cached)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, use_cache=True,
    )


def load_base(random_base: bool, device: torch.device) -> Tuple[nn.Module, str]:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    folder, present = builtin_folder()
    if present and not random_base:
        model, source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), MODEL
    else:
        torch.manual_seed(0)
        model, source = LlamaForCausalLM(smollm2_config()), f"{MODEL} config, random weights"
    return model.to(device).eval(), source


def make_mixse(base: nn.Module, experts: int, rank: int, top_k: int) -> nn.Module:
    from selfmoe import MiXSE

    model = MiXSE.from_scratch(base, experts, r=rank, lora_alpha=2 * rank, top_k=top_k, router="shared")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.lora_modules.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        model.router.linear.weight.copy_(torch.randn(model.router.linear.weight.shape, generator=g) * 0.05)
    return model.eval()


@torch.no_grad()
def decode_ms(model: nn.Module, prompt: torch.Tensor, tokens: int) -> Tuple[float, torch.Tensor]:
    """Prefill ``prompt [B, S]`` (not timed), then ``tokens`` greedy steps: ``(ms per step, tokens [B, n])``."""
    from transformers import DynamicCache

    from selfmoe.prefix_cache import cache_kwarg

    cache = DynamicCache(config=model.config)
    name = cache_kwarg(model)  # `cache` from transformers 5.24 on (`past_key_values` goes in 5.40)
    out = model(input_ids=prompt, **{name: cache}, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    produced = [nxt]
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=nxt, **{name: cache}, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        produced.append(nxt)
    return (time.perf_counter() - start) * 1e3 / tokens, torch.cat(produced, 1)


def timed_decode(name: str, model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """``decode_ms`` of one provider. MiXSE decodes inside ``decode_cache`` as selfmoe's own generation
    does (the routed layers keep their stacked B for the generation), except ``mixse-nocache`` (the A/B
    of that block); ``mixse-dense`` runs with ``SELFMOE_TORCH_PATH=dense`` (the A/B of the decode-sized
    torch paths against the general one, in the same run)."""
    from selfmoe.decode_cache import decode_cache
    from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH

    if name in ("base", "mixse-nocache"):
        return decode_ms(model, prompt, tokens)[0]
    if name != "mixse-dense":
        with decode_cache(model):
            return decode_ms(model, prompt, tokens)[0]
    old = os.environ.get(ENV_TORCH_PATH)
    os.environ[ENV_TORCH_PATH] = "dense"
    try:
        with decode_cache(model):
            return decode_ms(model, prompt, tokens)[0]
    finally:
        if old is None:
            del os.environ[ENV_TORCH_PATH]
        else:
            os.environ[ENV_TORCH_PATH] = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (prefill, not timed)")
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--random-base", action="store_true", help="random weights with SmolLM2's config")
    ap.add_argument("--ab-dense", action="store_true",
                    help="also time mixse-dense: MiXSE with the torch path forced to its general formulation")
    ap.add_argument("--ab-cache", action="store_true",
                    help="also time mixse-nocache: MiXSE decoding outside selfmoe.decode_cache")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results-dir", default=str(LOCAL_RESULTS_DIR),
                    help="where decode_<device>.csv goes (default: benchmarks/results/local, ignored by git)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, source = load_base(args.random_base, device)
    wrapped_base, _ = load_base(args.random_base, device)
    mixse = make_mixse(wrapped_base, args.experts, args.rank, args.top_k)
    models: Dict[str, nn.Module] = {"base": base, "mixse": mixse}
    if args.ab_dense:
        models["mixse-dense"] = mixse  # the same model with the torch path forced to the general formulation
    if args.ab_cache:
        models["mixse-nocache"] = mixse  # the same model, its B stacked on every call
    label = device_label(device)
    vers = versions()
    print(f"decode, {source}, {args.experts} experts r={args.rank} top-{args.top_k} shared router, {label}")
    print(f"{'batch':>5} {'provider':<13} {'ms/step':>9} {'ms/token':>9} {'x base':>7}")
    rows: List[Dict[str, object]] = []
    g = torch.Generator().manual_seed(3)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, base.config.vocab_size, (batch, args.prompt), generator=g).to(device)
        for model in models.values():  # warm-up
            decode_ms(model, prompt, 2)
        samples: Dict[str, List[float]] = {name: [] for name in models}
        for _ in range(args.reps):
            ms = {name: timed_decode(name, model, prompt, args.tokens) for name, model in models.items()}
            for name, v in ms.items():
                samples[name].append(v)
        med = {name: statistics.median(v) for name, v in samples.items()}
        for name in models:
            ratios = [a / b for a, b in zip(samples[name], samples["base"])]
            ratio = statistics.median(ratios)
            print(f"{batch:>5} {name:<13} {med[name]:>9.3f} {med[name] / batch:>9.3f} {ratio:>7.3f}")
            rows.append({
                "timestamp": timestamp(), "device": label, "model": source, "provider": name, "batch": batch,
                "prompt": args.prompt, "tokens": args.tokens, "ms_per_step": round(med[name], 4),
                "ms_per_token": round(med[name] / batch, 4), "ratio_to_base": round(ratio, 4),
                "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4),
                "experts": args.experts, "rank": args.rank, "top_k": args.top_k, "reps": args.reps,
                "threads": torch.get_num_threads() if device.type == "cpu" else "",
                "torch": vers["torch"], "commit": git_commit(),
            })
    out = Path(args.results_dir) / f"decode_{device_slug(device)}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
