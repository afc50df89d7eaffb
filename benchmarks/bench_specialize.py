"""Self-specialization throughput: kept pairs per minute of ``specialize`` on the built-in model, A/B.

Each measurement is a fresh subprocess that imports selfmoe from a source tree: this checkout ("new")
and, with ``--against COMMIT``, a ``git worktree`` of that commit ("old"). The two alternate
(old, new, old, new, ...) so that load from other processes on a shared machine lands on both alike;
ratios come from the same run. Both run ``specialize_domain`` on the same domains with the same
settings and seed, each version building its generator the way its own ``specialize`` does.

Per measurement: wall time, kept pairs, attempts, and from hooks on the model's forward, prefill
(calls of more than one token) and decode (one token per row) separately: tokens computed and seconds.

Greedy match rate (``new`` only): the response prompts of the run, with the responses the pipeline
got, are generated again by the plain generator (per-prompt left padding, no shared prefix); the rate
is the share of identical texts (greedy is deterministic: anything but float rounding would show).

Usage:
  python benchmarks/bench_specialize.py --against c6361f4 --repeats 2
  python benchmarks/bench_specialize.py --domains math --rounds 1        # this checkout only

Results: a table on stdout and <results-dir>/specialize_<device>.csv (git-ignored
benchmarks/results/local unless --results-dir benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

# Run as a script: make `benchmarks.common` importable; a worker imports selfmoe from PYTHONPATH only.
if __package__ in (None, "") and "--worker" not in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def _worker(args: argparse.Namespace) -> None:
    """One measurement, in a process whose ``selfmoe`` comes from ``--src`` (PYTHONPATH)."""
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import selfmoe
    from selfmoe.builtin_models import resolve_model
    from selfmoe.data import builtin_seeds_dir, load_seeds
    from selfmoe.generate import HFGenerator, SamplingConfig
    from selfmoe.prompts import STOP_MARKS
    from selfmoe.specialization import SpecializeConfig, specialize

    assert Path(selfmoe.__file__).resolve().is_relative_to(Path(args.src).resolve()), selfmoe.__file__
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    seeds = load_seeds(builtin_seeds_dir())
    fields = {f for f in SpecializeConfig.__dataclass_fields__}
    cfg = SpecializeConfig(
        prompts_per_round=args.prompts_per_round, batch_size=args.batch_size, progress=False, seed=args.seed,
        max_attempts=args.rounds * args.prompts_per_round,
        brainstorm=SpecializeConfig().brainstorm.replace(max_new_tokens=args.brainstorm_max_new_tokens),
        response=SpecializeConfig().response.replace(max_new_tokens=args.response_max_new_tokens),
        **({"share_shots": True} if "share_shots" in fields else {}),
        **({"one_paragraph_instructions": {"auto": None, "on": True, "off": False}[args.one_paragraph]}
           if "one_paragraph_instructions" in fields else {}))
    # The generator each version's specialize() builds for itself.
    kw = {"prefix_cache": cfg.share_shots} if "prefix_cache" in inspect.signature(HFGenerator).parameters else {}
    inner = HFGenerator(model, tok, batch_size=cfg.batch_size, progress=False, **kw)

    timing = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_rows": 0, "decode_s": 0.0}
    started: List[float] = []

    def pre(_module, a, k):
        started.append(time.perf_counter())

    def post(_module, a, k, _out):
        ids = k.get("input_ids") if k.get("input_ids") is not None else a[0]
        dt = time.perf_counter() - started.pop()
        b, s = ids.shape
        if s > 1:
            timing["prefill_tokens"] += b * s
            timing["prefill_s"] += dt
        else:
            timing["decode_rows"] += b
            timing["decode_s"] += dt

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    responses: List[Any] = []

    class Recorder:
        """The version's own generator, with the greedy responses recorded (for the match rate)."""

        def generate(self, prompts, config, *, desc=None):
            out = inner.generate(prompts, config, desc=desc)
            if not config.do_sample:
                responses.extend(zip(prompts, [c.text for c in out]))
            return out

        def _wrap(self, task):
            try:
                sent = None
                while True:
                    try:
                        call = next(task) if sent is None else task.send(sent)
                    except StopIteration as stop:
                        return stop.value
                    sent = yield call
                    first = call[0] if isinstance(call, list) else call  # a list: `sent` answers its first call
                    if not first.config.do_sample:
                        responses.extend(zip(first.prompts, [c.text for c in sent]))
            finally:
                task.close()

    if hasattr(inner, "run_tasks"):  # a version whose domains share the decode batches
        Recorder.run_tasks = lambda self, tasks: inner.run_tasks([self._wrap(t) for t in tasks])

    result: Dict[str, Any] = {"version": args.label, "domains": args.domains}
    t0, c0 = time.perf_counter(), os.times()
    kept = attempts = 0
    with tempfile.TemporaryDirectory() as tmp:  # all domains in one call, as `selfmoe specialize` runs them
        stats = specialize(model, tok, seeds, tmp, args.num_pairs, domains=args.domains.split(","), config=cfg,
                           generator=Recorder())
        for st in stats.values():
            kept += st["kept"]
            attempts += st["attempts"]
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    result.update(wall_s=round(wall, 2), cpu_s=round(cpu, 2), kept=kept, attempts=attempts,
                  kept_per_min=round(kept / wall * 60, 3), kept_per_cpu_min=round(kept / max(cpu, 1e-9) * 60, 3),
                  prefill_tokens=timing["prefill_tokens"], prefill_s=round(timing["prefill_s"], 2),
                  prefill_tok_per_s=round(timing["prefill_tokens"] / max(timing["prefill_s"], 1e-9), 1),
                  decode_rows=timing["decode_rows"], decode_s=round(timing["decode_s"], 2),
                  decode_tok_per_s=round(timing["decode_rows"] / max(timing["decode_s"], 1e-9), 1),
                  generated_tokens=getattr(inner, "counters", {}).get("generated_tokens", ""),
                  decode_row_steps=getattr(inner, "counters", {}).get("decode_row_steps", ""))
    if args.match:
        plain = HFGenerator(model, tok, batch_size=cfg.batch_size, progress=False)
        prompts = [p for p, _ in responses][: args.match]
        again = plain.generate(prompts, SamplingConfig(max_new_tokens=args.response_max_new_tokens, do_sample=False,
                                                       stop=STOP_MARKS))
        same = sum(a.text == t for a, (_, t) in zip(again, responses))
        result.update(match=same, match_of=len(prompts))
    Path(args.out).write_text(json.dumps(result))


def _measure(src: Path, label: str, args: argparse.Namespace, match: int) -> Dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--src", str(src), "--label", label, "--out", out,
           "--model", args.model, "--domains", args.domains, "--rounds", str(args.rounds),
           "--prompts-per-round", str(args.prompts_per_round), "--batch-size", str(args.batch_size),
           "--brainstorm-max-new-tokens", str(args.brainstorm_max_new_tokens),
           "--response-max-new-tokens", str(args.response_max_new_tokens), "--num-pairs", str(args.num_pairs),
           "--seed", str(args.seed), "--threads", str(args.threads), "--match", str(match),
           "--one-paragraph", args.one_paragraph]
    env = dict(os.environ, PYTHONPATH=str(src), TOKENIZERS_PARALLELISM="false")
    print(f"[{label}] running ...", flush=True)
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    print(f"[{label}] {result}", flush=True)
    return result


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--domains", default="math,knowledge", help="comma-separated built-in domains")
    p.add_argument("--rounds", type=int, default=2, help="rounds per domain (max_attempts = rounds x prompts per round)")
    p.add_argument("--prompts-per-round", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--brainstorm-max-new-tokens", type=int, default=96)
    p.add_argument("--response-max-new-tokens", type=int, default=192)
    p.add_argument("--num-pairs", type=int, default=1000, help="target pairs (high: the rounds bound the run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one-paragraph", choices=("auto", "on", "off"), default="auto",
                   help="SpecializeConfig.one_paragraph_instructions (versions that have it; auto = the default)")
    p.add_argument("--against", default=None, metavar="COMMIT", help="also measure this commit (a git worktree)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--match", type=int, default=16, help="response prompts re-generated for the greedy match rate")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", default=str(REPO), help=argparse.SUPPRESS)
    p.add_argument("--label", default="new", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    import torch

    from benchmarks.common import LOCAL_RESULTS_DIR, cpu_model, device_slug, git_commit, timestamp, versions, write_csv

    torch.set_num_threads(args.threads)
    sources = {"new": REPO}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="selfmoe-ab-")) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.against], check=True,
                       capture_output=True)
        sources = {"old": worktree, "new": REPO}
    rows = []
    try:
        for rep in range(args.repeats):
            for label, src in sources.items():
                r = _measure(src, label, args, args.match if (label == "new" and rep == 0) else 0)
                rows.append(r)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    device = f"{cpu_model()} ({args.threads} threads)"
    out_rows = []
    for r in rows:
        out_rows.append({"device": device, **versions(), "commit": git_commit(),
                         "against": args.against or "", "timestamp": timestamp(),
                         "settings": f"rounds={args.rounds} ppr={args.prompts_per_round} bs={args.batch_size} "
                                     f"bmax={args.brainstorm_max_new_tokens} rmax={args.response_max_new_tokens} "
                                     f"one_paragraph={args.one_paragraph}",
                         **{k: r.get(k, "") for k in ("version", "domains", "wall_s", "cpu_s", "kept", "attempts", "kept_per_min",
                                                      "kept_per_cpu_min",
                                                      "prefill_tokens", "prefill_s", "prefill_tok_per_s", "decode_rows",
                                                      "decode_s", "decode_tok_per_s", "generated_tokens", "decode_row_steps", "match",
                                                      "match_of")}})
    if args.against:
        import statistics

        for key in ("kept_per_min", "kept_per_cpu_min"):
            per = {v: statistics.median([r[key] for r in rows if r["version"] == v]) for v in sources}
            print(f"{key}: old {per['old']:.2f}, new {per['new']:.2f}, ratio {per['new'] / max(per['old'], 1e-9):.2f}x "
                  f"(device: {device}; medians of {args.repeats} alternating run(s))")
    results_dir = Path(args.results_dir) if args.results_dir else LOCAL_RESULTS_DIR
    path = results_dir / f"specialize_{device_slug(torch.device('cpu'))}.csv"
    write_csv(path, out_rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
