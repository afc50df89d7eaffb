"""Benchmark plumbing shared by the scripts in benchmarks/: device naming, timing, result files."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import random
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

# Committed result files live in RESULTS_DIR and are written there only on purpose (--results-dir
# benchmarks/results); by default a run writes to LOCAL_RESULTS_DIR, which git ignores, so trying a
# benchmark in a checkout never overwrites the committed figures.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """Human-readable device, e.g. 'NVIDIA H100 80GB HBM3' or 'Intel Xeon ... (2 threads)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device, used for benchmarks/results/<device>.csv."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_model())}-{torch.get_num_threads()}t"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def time_rounds_ms(fns: Dict[str, Callable[[], object]], reps: int = 10, warmup: int = 2,
                   seed: int = 0) -> Dict[str, List[float]]:
    """Milliseconds of each ``fn()`` per round (CPU): every function is warmed up, then they are timed in
    rounds, one call each per round, so load from other processes lands on all of them alike.

    Each round runs the functions in a new order (shuffled, seeded): a call's time depends on what ran
    just before it. In a fixed order the same code read 1.311x the base in the slot right after
    ``dense-all-experts`` and 1.160x in the slot after ``base`` (top2-cpu router training, 9 rounds;
    benchmarks/NOTES.md, issue 13 item 3). A fixed or cyclic order gives that cost to the same function
    every round; shuffled, it lands on each one in a few rounds, which the medians then leave out."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def median_ratio(samples: Dict[str, List[float]], name: str, ref: str) -> float:
    """Median over rounds of ``name``'s time / ``ref``'s time in the same round (a shared machine's load
    changes between rounds; within one round both saw about the same)."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[ref]))


def time_many_ms(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int = 10, warmup: int = 2) -> Dict[str, float]:
    """Median milliseconds of each ``fn()``.

    CUDA: ``triton.testing.do_bench`` per function (warm-up, median). CPU: ``time_rounds_ms``
    (round-robin), median per function.
    """
    if device.type == "cuda":
        import triton.testing

        return {name: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) for name, fn in fns.items()}
    samples = time_rounds_ms(fns, reps, warmup)
    return {name: statistics.median(times) for name, times in samples.items()}


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    """Write result rows (all with the same keys) to `path`, replacing it atomically."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
