"""``selfmoe demo``: the whole Self-MoE pipeline on the built-in model, seeds and benchmark, end to end.

Every stage runs the command a user would type (``selfmoe.cli.main([...])``), in this order::

    model        resolve the base model once (built-in name -> local folder; --quick: a tiny random Llama)
    specialize   built-in seeds -> <out>/data/<domain>.jsonl for knowledge, reasoning, math, coding
    expert-*     one LoRA expert per domain            -> <out>/experts/<domain>
    union        instance merging (--all-domains)       -> <out>/experts/union
    ties, dare   weight merging of the four experts     -> <out>/merged/ties, <out>/merged/dare
    mixse        shared top-1 router over the experts  -> <out>/mixse
    mixse-intuition  (--intuition) the same with the intuition prior mixed in -> <out>/mixse-intuition
    benchmark    the built-in benchmark                 -> <out>/bench/<domain>.jsonl
    eval-*       base, each expert, union, ties, dare, MiXSE top-1 and top-2 (+ mixse-intuition) -> <out>/eval/<system>
    compare      a row per system, a column per domain + average -> <out>/results.md, results.json
    heatmap      routing of MiXSE top-1, benchmark domain x expert -> <out>/routing_heatmap.txt (.png)

Resumable: a stage whose output is complete and built from the same inputs is skipped; an interrupted
training run is continued with ``--resume``; ``specialize`` and ``eval`` continue their own saved work
when rerun. A stage that runs again (more pairs, a deleted expert, another eval size) makes the stages
that read its output run again too (``<out>/demo_state.json``, :mod:`selfmoe.demo_state`). Wall time
per stage goes to ``<out>/timings.json`` and ``<out>/pipeline.csv``.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["run_demo", "DemoStageError", "DOMAINS", "SYSTEMS", "DEFAULTS", "QUICK"]

DOMAINS = ("knowledge", "reasoning", "math", "coding")
# rows of the results table, in order
SYSTEMS = ("base",) + DOMAINS + ("union", "ties", "dare", "mixse-top1", "mixse-top2")

# The real run (the built-in model on a CPU): small on purpose; every size can be raised by flag.
DEFAULTS = {"num_pairs": 8, "epochs": 1, "eval_size": 16}
# Most instructions brainstormed per domain and run (so a domain the model writes little usable data for,
# like math on the built-in model, cannot hold the demo up): then the demo goes on with what was kept.
ATTEMPTS_PER_PAIR = 8
# --quick: the tiny random model, a handful of items everywhere (the numbers are noise).
QUICK = {"num_pairs": 4, "epochs": None, "eval_size": 4}

_SPECIALIZE_QUICK = ["--prompts-per-round", "4", "--batch-size", "4", "--max-attempts", "40",
                     "--brainstorm-max-new-tokens", "12", "--response-max-new-tokens", "12",
                     "--min-instruction-words", "1", "--keep-unfinished"]
# The real run on a CPU: small rounds (progress is saved per round) and bounded generations, so that a
# laptop sees pairs within minutes instead of the library defaults' 64 x 512-token rounds. A CPU decode
# step costs about as much for 16 rows as for 8 (it mostly reads the weights), so rounds of 16 take about
# half the steps of rounds of 8 for the same attempts.
_SPECIALIZE_REAL = ["--prompts-per-round", "16", "--batch-size", "16", "--brainstorm-max-new-tokens", "96",
                    "--response-max-new-tokens", "192"]
_TRAIN_QUICK = ["--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
                "--logging-steps", "1"]
_TRAIN_REAL = ["--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-3"]
_EVAL_QUICK = ["--max-new-tokens", "8", "--code-timeout", "5"]
# One batch holds every generated item of a system at the default size (3 domains x 16): finished rows
# leave it at once, and the steps are paid once instead of once per domain.
_EVAL_REAL = ["--max-new-tokens", "160", "--batch-size", "48"]


class DemoStageError(RuntimeError):
    """A stage's command failed; ``code`` is its exit code, ``stage`` its name."""

    def __init__(self, stage: str, code: int) -> None:
        super().__init__(f"stage {stage} failed (exit {code}); fix the cause and rerun the same command to continue")
        self.stage = stage
        self.code = code


@dataclass
class Stage:
    """One step of the demo. ``deps``: the stages whose outputs it reads; ``key``: its own settings;
    ``outputs``: what it writes (cleared when they were built from other inputs, see demo_state.py)."""

    name: str
    run: Callable[[], None]
    done: Callable[[], bool]
    deps: Tuple[str, ...] = ()
    key: str = ""
    outputs: Tuple[pathlib.Path, ...] = ()


def _say(msg: str) -> None:
    from .cli_common import say

    say(msg)


def _cli(stage: str, argv: Sequence[Any]) -> None:
    """Run ``selfmoe <argv>`` as a user would; 130 -> KeyboardInterrupt, another failure -> DemoStageError."""
    from .cli import main

    argv = [str(a) for a in argv]
    _say("  $ selfmoe " + " ".join(argv))
    with contextlib.redirect_stdout(sys.stderr):  # stdout: only the demo's own results at the end
        code = main(argv)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise DemoStageError(stage, code)


def _files(*paths: pathlib.Path) -> bool:
    return all(p.is_file() for p in paths)


def _train_flags(out: pathlib.Path) -> List[str]:
    """A run directory that holds an unfinished run (train_config.json, no final config) is continued."""
    return ["--resume"] if (out / "train_config.json").is_file() else []


def _heatmap_png(overview: Dict[str, Any], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = overview.get("domains") or overview.get("tasks") or {}
    experts = list(overview.get("experts") or [])
    rows = list(groups)
    grid = [[groups[r]["shares"].get(e, 0.0) for e in experts] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(experts) + 2, 0.6 * len(rows) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right")  # long names must not run together
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("expert")
    ax.set_ylabel("benchmark domain")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}%", ha="center", va="center", color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="share of token-slots")
    ax.set_title("MiXSE top-1 routing")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def device_description(device: Optional[str]) -> str:
    """The machine a run ran on, for result files: the GPU's name, or the CPU model and torch's thread count."""
    import platform

    import torch

    if device and device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _write_pipeline_csv(path: pathlib.Path, timings: Dict[str, Dict[str, Any]], settings: Dict[str, Any],
                        device: Optional[str]) -> None:
    """One row per stage: its wall time in this run (empty when it was skipped) and what it ran on."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stage", "seconds", "skipped", "device", "model", "num_pairs", "epochs", "eval_size"])
    label = device_description(device)
    for name, t in timings.items():
        writer.writerow([name, "" if t["skipped"] else t["seconds"], t["skipped"], label, settings["model"],
                         settings["num_pairs"], settings["epochs"], settings["eval_size"]])
    path.write_text(buf.getvalue(), encoding="utf-8")


def run_demo(output_dir: Any, *, model: str = "smollm2-135m", quick: bool = False, num_pairs: Optional[int] = None,
             epochs: Optional[int] = None, eval_size: Optional[int] = None, device: Optional[str] = None,
             progress: bool = True, intuition: bool = False) -> Dict[str, Any]:
    """Run (or continue) the demo in ``output_dir``; returns ``{"output", "model", "paths", "timings"}``.

    ``quick``: a tiny random Llama built by :mod:`selfmoe.tiny_model` instead of ``model``, a handful of
    items per stage. Raises :class:`DemoStageError` when a command fails and ``KeyboardInterrupt`` when
    interrupted (after naming the stage); rerunning continues either way.
    ``intuition``: also train a MiXSE whose shared router mixes in the intuition prior (the domains' mean
    embeddings; ``train-router --router intuition``) and evaluate it top-1 as the row ``mixse-intuition``,
    next to the token router's ``mixse-top1``. Turning it on in a finished demo runs only the new stages
    and the comparison.
    """
    systems = SYSTEMS + (("mixse-intuition",) if intuition else ())
    out = pathlib.Path(output_dir)
    sizes = QUICK if quick else DEFAULTS
    num_pairs = sizes["num_pairs"] if num_pairs is None else num_pairs
    epochs = sizes["epochs"] if epochs is None else epochs
    eval_size = sizes["eval_size"] if eval_size is None else eval_size
    for name, v in (("num_pairs", num_pairs), ("epochs", epochs), ("eval_size", eval_size)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    out.mkdir(parents=True, exist_ok=True)

    data, bench, evals = out / "data", out / "bench", out / "eval"
    experts = {d: out / "experts" / d for d in DOMAINS}
    union, mixse, mixse_i = out / "experts" / "union", out / "mixse", out / "mixse-intuition"
    merged = {m: out / "merged" / m for m in ("ties", "dare")}
    results_md, results_json = out / "results.md", out / "results.json"
    heat_txt, heat_png = out / "routing_heatmap.txt", out / "routing_heatmap.png"
    tiny_dir = out / "tiny-llama"
    base: Dict[str, str] = {}  # filled by the model stage

    nop = [] if progress else ["--no-progress"]
    dev = [] if device is None else ["--device", device]
    # --quick: 2 optimizer steps per run unless --epochs is given
    steps = ["--max-steps", "2"] if quick and epochs is None else ["--epochs", str(epochs)]
    train_sizes = (_TRAIN_QUICK if quick else _TRAIN_REAL) + steps

    # ---- the stages, top to bottom
    def model_done() -> bool:
        if quick:
            ok = (tiny_dir / "config.json").is_file() and (tiny_dir / "tokenizer.json").is_file()
            if ok:
                base["path"] = str(tiny_dir)
            return ok
        return False  # resolving a built-in name is cheap once it is cached: always run

    def model_run() -> None:
        if quick:
            from .tiny_model import save_tiny_lm

            base["path"] = str(save_tiny_lm(out))
        else:
            from .builtin_models import resolve_model

            base["path"] = resolve_model(model)
        _say(f"  base model: {base['path']}")

    max_attempts = ATTEMPTS_PER_PAIR * num_pairs  # per domain, over reruns too (the stats count them)

    def attempts_left(domain: str) -> int:
        """Instructions ``domain`` may still brainstorm: 0 once it has its pairs or spent its budget."""
        stats = data / f"{domain}.stats.json"
        st = json.loads(stats.read_text(encoding="utf-8")) if stats.is_file() else {}
        if int(st.get("kept") or 0) >= num_pairs:
            return 0
        return max(0, max_attempts - int(st.get("attempts") or 0)) if stats.is_file() else max_attempts

    def specialize_done() -> bool:
        return all(attempts_left(d) == 0 for d in DOMAINS)

    def specialize_run() -> None:  # continues the domains' files by itself when rerun
        # Each domain has its own attempt budget, counted over reruns; domains with the same budget left (all
        # of them on a first run) go in one call, where they share the decode batch.
        by_left: Dict[int, List[str]] = {}
        for d in DOMAINS:
            left = attempts_left(d)
            if left:
                by_left.setdefault(left, []).append(d)
        for left, domains in by_left.items():
            sizes = _SPECIALIZE_QUICK if quick else _SPECIALIZE_REAL + ["--max-attempts", left]
            _cli("specialize", ["specialize", "--model", base["path"], *dev, "--seeds", "builtin", "--output", data,
                                "--domains", ",".join(domains), "--num-pairs", num_pairs, *sizes, *nop])

    def expert_stage(domain: str) -> Stage:
        d = experts[domain]
        return Stage(f"expert-{domain}",
                     lambda: _cli(f"expert-{domain}", ["train-expert", "--model", base["path"], *dev, "--data", data,
                                                        "--domain", domain, "--output", d, *train_sizes, *nop,
                                                        *_train_flags(d)]),
                     lambda: _files(d / "adapter_config.json", d / "adapter_model.safetensors"),
                     deps=("specialize",), key=" ".join(train_sizes), outputs=(d,))

    def merge_stage(method: str) -> Stage:
        d = merged[method]
        args = ["merge", *[a for dom in DOMAINS for a in ("--expert", experts[dom])], "--method", method,
                "--seed", "0", "--output", d, *nop]
        return Stage(method, lambda: _cli(method, args + (["--overwrite"] if d.exists() else [])),
                     lambda: _files(d / "adapter_config.json", d / "adapter_model.safetensors"),
                     deps=tuple(f"expert-{dom}" for dom in DOMAINS), outputs=(d,))

    def mixse_run() -> None:
        _cli("mixse", ["train-router", "--model", base["path"], *dev, "--data", data, "--output", mixse,
                       *[a for dom in DOMAINS for a in ("--expert", f"{dom}={experts[dom]}")],
                       "--router", "shared", "--top-k", "1", *train_sizes, *nop, *_train_flags(mixse)])

    def mixse_intuition_run() -> None:
        _cli("mixse-intuition", ["train-router", "--model", base["path"], *dev, "--data", data, "--output", mixse_i,
                                 *[a for dom in DOMAINS for a in ("--expert", f"{dom}={experts[dom]}")],
                                 "--router", "intuition", "--top-k", "1", *train_sizes, *nop, *_train_flags(mixse_i)])

    def bench_run() -> None:
        from .benchmark import write_benchmark

        write_benchmark(bench, n_per_domain=eval_size, seed=0)
        (bench / "demo_benchmark.json").write_text(json.dumps({"n_per_domain": eval_size, "seed": 0}) + "\n")

    def bench_done() -> bool:
        marker = bench / "demo_benchmark.json"
        return marker.is_file() and json.loads(marker.read_text()).get("n_per_domain") == eval_size and \
            _files(*(bench / f"{d}.jsonl" for d in DOMAINS))

    eval_reads = {"base": "model", **{d: f"expert-{d}" for d in DOMAINS}, "union": "union", "ties": "ties",
                  "dare": "dare", "mixse-top1": "mixse", "mixse-top2": "mixse", "mixse-intuition": "mixse-intuition"}
    eval_targets = {"base": [], **{d: ["--adapter", experts[d]] for d in DOMAINS}, "union": ["--adapter", union],
                    "ties": ["--adapter", merged["ties"]], "dare": ["--adapter", merged["dare"]],
                    "mixse-top1": ["--mixse", mixse, "--routing-stats"],
                    "mixse-top2": ["--mixse", mixse, "--route-top-k", "2", "--routing-stats"],
                    "mixse-intuition": ["--mixse", mixse_i, "--routing-stats"]}

    def eval_stage(system: str) -> Stage:
        d = evals / system

        def run() -> None:  # an unfinished eval continues from its saved completions when rerun
            _cli(f"eval-{system}", ["eval", "--model", base["path"], *dev, *eval_targets[system],
                                    *[a for dom in DOMAINS for a in ("--data", bench / f"{dom}.jsonl")], "--output", d,
                                    "--mc-scoring", "loglik", "--allow-code-execution",
                                    *(_EVAL_QUICK if quick else _EVAL_REAL), *nop])
        return Stage(f"eval-{system}", run, lambda: _files(d / "summary.json"), deps=("benchmark", eval_reads[system]),
                     key=" ".join(_EVAL_QUICK if quick else _EVAL_REAL), outputs=(d,))

    def compare_run() -> None:
        _cli("compare", ["compare", *[f"{s}={evals / s}" for s in systems], "--by", "domain",
                         "--columns", ",".join(DOMAINS),
                         "--output", results_md, "--json", results_json])

    def heatmap_run() -> None:
        from .stats import format_routing_overview, routing_overview

        summary = json.loads((evals / "mixse-top1" / "summary.json").read_text(encoding="utf-8"))
        overview = routing_overview(summary.get("routing") or {}, summary.get("routing_domains") or None)
        order = {name: i for i, name in enumerate(DOMAINS)}  # experts and benchmark domains in pipeline order
        overview["experts"] = sorted(overview["experts"], key=lambda e: (order.get(e, len(order)), e))
        for group in ("tasks", "domains"):
            if group in overview:
                overview[group] = dict(sorted(overview[group].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        text = format_routing_overview(overview)
        (out / "routing_overview.json").write_text(json.dumps(overview, indent=2) + "\n")
        if _heatmap_png(overview, heat_png):
            _say(f"  heat map -> {heat_png}")
        else:
            _say("  note: matplotlib is not installed: no routing_heatmap.png (the text heat map is written)")
        heat_txt.write_text(text + "\n", encoding="utf-8")

    stages: List[Stage] = [
        Stage("model", model_run, model_done),
        Stage("specialize", specialize_run, specialize_done, deps=("model",), outputs=(data,)),
        *[expert_stage(d) for d in DOMAINS],
        Stage("union", lambda: _cli("union", ["train-expert", "--model", base["path"], *dev, "--data", data,
                                              "--all-domains", "--output", union, *train_sizes, *nop,
                                              *_train_flags(union)]),
              lambda: _files(union / "adapter_config.json", union / "adapter_model.safetensors"),
              deps=("specialize",), key=" ".join(train_sizes), outputs=(union,)),
        merge_stage("ties"),
        merge_stage("dare"),
        Stage("mixse", mixse_run, lambda: _files(mixse / "mixse_config.json", mixse / "router.safetensors"),
              deps=("specialize", *(f"expert-{d}" for d in DOMAINS)), key=" ".join(train_sizes), outputs=(mixse,)),
        *([Stage("mixse-intuition", mixse_intuition_run,
                 lambda: _files(mixse_i / "mixse_config.json", mixse_i / "intuition.safetensors"),
                 deps=("specialize", *(f"expert-{d}" for d in DOMAINS)), key=" ".join(train_sizes),
                 outputs=(mixse_i,))] if intuition else []),
        Stage("benchmark", bench_run, bench_done, key=f"eval_size={eval_size}", outputs=(bench,)),
        *[eval_stage(s) for s in systems],
        Stage("compare", compare_run, lambda: _files(results_md, results_json),
              deps=tuple(f"eval-{s}" for s in systems), outputs=(results_md, results_json)),
        Stage("heatmap", heatmap_run, lambda: _files(heat_txt), deps=("eval-mixse-top1",),
              outputs=(heat_txt, heat_png, out / "routing_overview.json")),
    ]

    # ---- run them
    timings_path = out / "timings.json"
    try:
        previous = json.loads(timings_path.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    timings: Dict[str, Dict[str, Any]] = {}
    from .demo_state import DemoState, clear_outputs

    state = DemoState(out / "demo_state.json")
    for i, stage in enumerate(stages, 1):
        label = f"[{i}/{len(stages)}] {stage.name}"
        inputs = state.inputs(stage.key, stage.deps)
        if stage.done() and (stage.name == "model" or state.up_to_date(stage.name, inputs)):
            _say(f"{label}: done already, skipped")
            seconds = (previous.get(stage.name) or {}).get("seconds")
            timings[stage.name] = {"seconds": seconds, "skipped": True}
            continue
        if state.built_from_other_inputs(stage.name, inputs) and clear_outputs(stage.outputs):
            _say(f"{label}: its inputs changed, its old output was removed")
        _say(f"{label} ...")
        state.started(stage.name, inputs)
        start = time.perf_counter()
        try:
            stage.run()
        except KeyboardInterrupt:
            _say(f"selfmoe demo: interrupted in stage {stage.name}; rerun the same command to continue")
            raise
        # The model stage is the same output as long as it resolves to the same folder.
        state.finished(stage.name, base.get("path") if stage.name == "model" else None)
        seconds = round(time.perf_counter() - start, 2)
        timings[stage.name] = {"seconds": seconds, "skipped": False}
        timings_path.write_text(json.dumps({"stages": {**previous, **timings}}, indent=2) + "\n")
        _say(f"{label}: {seconds:.1f} s")
    total = round(sum(t["seconds"] or 0.0 for t in timings.values() if not t["skipped"]), 2)
    record = {"stages": timings, "total_seconds_this_run": total,
              "settings": {"model": model, "quick": quick, "num_pairs": num_pairs, "epochs": epochs,
                           "eval_size": eval_size, "device": device, "intuition": intuition}}
    timings_path.write_text(json.dumps(record, indent=2) + "\n")
    _write_pipeline_csv(out / "pipeline.csv", timings, record["settings"], device)
    paths = {"data": data, "experts": {**experts, "union": union}, "merged": merged, "mixse": mixse, "bench": bench,
             "eval": {s: evals / s for s in systems}, "mixse_intuition": mixse_i if intuition else None, "results_md": results_md, "results_json": results_json,
             "routing_heatmap_txt": heat_txt, "pipeline_csv": out / "pipeline.csv", "routing_heatmap_png": heat_png if heat_png.is_file() else None,
             "timings": timings_path}
    return {"output": out, "model": base.get("path"), "paths": paths, "timings": record}
