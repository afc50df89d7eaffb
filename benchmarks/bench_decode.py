"""Greedy decode per token: MiXSE (shared router, top-k) against its base model, on the built-in model.

Setup: the built-in SmolLM2-135M-Instruct (30 layers, hidden 576) when it is in the selfmoe cache,
otherwise a random Llama with its config (``--random-base`` forces that); MiXSE.from_scratch with E
experts of rank r on all 7 projections of every layer (random nonzero factors: the timing does not
depend on the values), shared router, top-k. Two copies of the same base weights: one bare, one wrapped.

Per repetition and batch size: every provider prefills a random prompt of ``--prompt`` tokens into its
own KV cache (not timed), then rounds in which each provider runs 4 consecutive greedy steps (forward
of the last token with its cache, argmax), the first untimed and the other 3 timed, the order rotating
per round, until each has ``--tokens`` timed steps. The providers' steps interleave in short runs, so
the machine's drift over a repetition (this CPU's speed moves by a few percent over seconds) lands on
all of them alike (whole-decode round-robin could not resolve a 3% change), while each timed step
follows a step of the same model, as in a real generation (with steps interleaved one by one, MiXSE
/ base at batch 1 came out 1.26x against 1.22x from whole decodes, one run each: every step found the
caches holding another model's state). The
figure is ms per decode step (a step decodes one token for each of the B sequences); the ratio is
provider / base per repetition, median over repetitions. MiXSE decodes inside ``selfmoe.decode_cache``
(as selfmoe's generation does: each routed layer stacks its experts' B once per generation, not once
per call). ``--ab-dense`` adds ``mixse-dense``, the same MiXSE with the torch path forced to its
general (dense-rank, training) formulation: the A/B of the decode paths; ``--ab-cache`` adds
``mixse-nocache``, a copy of the same MiXSE decoding outside that block.

Usage:
  python benchmarks/bench_decode.py                       # batch 1 and 16, 30 timed steps, 5 reps
  python benchmarks/bench_decode.py --batches 1 --reps 9 --results-dir benchmarks/results

Results: a table on stdout and <results-dir>/decode_<device>.csv (default results dir
benchmarks/results/local, ignored by git).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

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


class Decoder:
    """One provider's greedy decode with its own KV cache, stepped one token at a time so that the
    providers' steps can interleave. ``env``: ``SELFMOE_TORCH_PATH`` during its steps (None: unset)."""

    def __init__(self, model: nn.Module, env: Optional[str] = None) -> None:
        from selfmoe.prefix_cache import cache_kwarg

        self.model, self.env = model, env
        self.cache_kw = cache_kwarg(model)  # `cache` from transformers 5.24 on (`past_key_values` goes in 5.40)
        self.cache = self.nxt = None
        self.produced: List[torch.Tensor] = []

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Prefill ``prompt [B, S]`` into a fresh cache (not timed)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        with self._env():
            out = self.model(input_ids=prompt, **{self.cache_kw: self.cache}, use_cache=True)
        self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        self.produced = [self.nxt]

    @torch.no_grad()
    def step(self) -> float:
        """One greedy step for every row; its wall time in ms."""
        with self._env():
            start = time.perf_counter()
            out = self.model(input_ids=self.nxt, **{self.cache_kw: self.cache}, use_cache=True)
            self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ms = (time.perf_counter() - start) * 1e3
        self.produced.append(self.nxt)
        return ms

    @contextlib.contextmanager
    def _env(self) -> Iterator[None]:
        from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH

        old = os.environ.pop(ENV_TORCH_PATH, None)
        if self.env is not None:
            os.environ[ENV_TORCH_PATH] = self.env
        try:
            yield
        finally:
            os.environ.pop(ENV_TORCH_PATH, None)
            if old is not None:
                os.environ[ENV_TORCH_PATH] = old


def interleaved_ms(decoders: Dict[str, Decoder], prompt: torch.Tensor, tokens: int, chunk: int = 4) -> Dict[str, float]:
    """Prefill every provider, then rounds in which each provider (the order rotating per round) runs
    ``chunk`` consecutive steps: the first untimed (it warms what the previous provider's steps pushed
    out of the caches; a real generation's steps run back to back), the others timed, until each has
    ``tokens`` timed steps. ms per timed step of each provider, over the same seconds."""
    for d in decoders.values():
        d.prefill(prompt)
    names = list(decoders)
    total = {name: 0.0 for name in names}
    done = 0
    rnd = 0
    while done < tokens:
        n = min(chunk - 1, tokens - done)
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            decoders[name].step()
            for _ in range(n):
                total[name] += decoders[name].step()
        done += n
        rnd += 1
    return {name: t / tokens for name, t in total.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (prefill, not timed)")
    ap.add_argument("--tokens", type=int, default=30, help="timed decode steps per repetition (a multiple of 3)")
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
    from selfmoe.decoding_cache import decode_cache

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, source = load_base(args.random_base, device)
    wrapped_base, _ = load_base(args.random_base, device)
    mixse = make_mixse(wrapped_base, args.experts, args.rank, args.top_k)
    stack = contextlib.ExitStack()
    stack.enter_context(decode_cache(mixse))  # as selfmoe's generation decodes (held for the whole run)
    decoders: Dict[str, Decoder] = {"base": Decoder(base), "mixse": Decoder(mixse)}
    if args.ab_dense:  # the same model with the torch path forced to the general formulation
        decoders["mixse-dense"] = Decoder(mixse, env="dense")
    if args.ab_cache:  # a second copy of the same MiXSE, outside decode_cache: B stacked on every call
        twin = make_mixse(load_base(args.random_base, device)[0], args.experts, args.rank, args.top_k)
        twin.load_state_dict(mixse.state_dict())
        decoders["mixse-nocache"] = Decoder(twin)
    label = device_label(device)
    vers = versions()
    print(f"decode, {source}, {args.experts} experts r={args.rank} top-{args.top_k} shared router, {label}")
    print(f"{'batch':>5} {'provider':<13} {'ms/step':>9} {'ms/token':>9} {'x base':>7}")
    rows: List[Dict[str, object]] = []
    g = torch.Generator().manual_seed(3)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, base.config.vocab_size, (batch, args.prompt), generator=g).to(device)
        interleaved_ms(decoders, prompt, 2)  # warm-up
        samples: Dict[str, List[float]] = {name: [] for name in decoders}
        for _ in range(args.reps):
            for name, v in interleaved_ms(decoders, prompt, args.tokens).items():
                samples[name].append(v)
        if args.ab_dense or args.ab_cache:  # the same greedy tokens, or the A/B compares different work
            ref = torch.cat(decoders["mixse"].produced, 1)
            for name in decoders:
                if name.startswith("mixse-") and not torch.equal(torch.cat(decoders[name].produced, 1), ref):
                    print(f"note: {name}'s greedy tokens differ from mixse's (float rounding of another path)")
        med = {name: statistics.median(v) for name, v in samples.items()}
        for name in decoders:
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
    stack.close()
    out = Path(args.results_dir) / f"decode_{device_slug(device)}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
