"""Compile every Triton kernel for NVIDIA GPUs on a machine without one, and read what the GPU build costs.

The real launchers (dense, decode and grouped forward and backward, grouping metadata, route_topk
forward and backward) run on CPU tensors of realistic shapes while ``Autotuner.run`` and
``JITFunction.run`` are replaced by a recorder: every launch is recorded with the exact arguments the
launcher passes, and with the configs the autotuner could pick for it (what survives the kernel's
shared-memory pruning, planned for the target through ``utils.assume_device``). Each recorded launch
is then compiled, once per candidate config and target, the way Triton's JIT would compile it on the
GPU: the same binder specialises the arguments (ints equal to 1 become constants, ints divisible by
16 and 16-byte aligned pointers get divisibility hints, ``do_not_specialize`` respected), then
``triton.compile`` for ``GPUTarget("cuda", 90 | 80, 32)`` with the ptxas Triton ships.

Per compile it reports registers, spill bytes and stack (ptxas ``-v``), shared memory against the
target's opt-in limit, the pruner's estimate of it, whether the dots lowered to wgmma (sm_90) or
mma.sync, and whether global loads were pipelined (cp.async / TMA). ``variant_counts`` records a
sweep of token counts and counts the distinct binaries and autotune keys per kernel (the bound on
recompiles).

Entry points: ``python -m selfmoe.kernels.compile_check --ci`` (the CI subset the ``compile`` test
runs: default configs, bf16, sm_90, headline shapes) and ``benchmarks/compile_report.py`` (every
config, dtype, target and shape; writes ``benchmarks/results/compile_report.csv``). Must run without
``TRITON_INTERPRET`` (the interpreter cuts the config tables to one entry at import).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from .tuning import Tuner
from .utils import assume_device, interpreting


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    smem_limit: int  # opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    sms: int
    devices: str


TARGETS = {
    "sm_90": Target("sm_90", 90, 232448, 132, "H100 / H200"),
    "sm_80": Target("sm_80", 80, 166912, 108, "A100"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EXIT_CANNOT_COMPILE = 77


# ----------------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    case: str
    dtype: str  # the case's float dtype ("int" for the grouping kernels)
    fn: JITFunction  # the @triton.jit function under any autotuner
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]  # the launcher's keyword args (constexprs, num_warps), no grid
    grid: Any
    configs: List[Optional[triton.Config]]  # candidates (first = default); [None] for a plain launch
    tuner: Optional[Tuner] = None
    autotune_key: Optional[Tuple] = None
    estimates: Dict[str, Optional[int]] = field(default_factory=dict)  # str(config) -> smem estimate

    @property
    def kernel(self) -> str:
        return self.fn.__name__


def _jit_of(k) -> JITFunction:
    while not isinstance(k, JITFunction):
        k = k.fn
    return k


@contextlib.contextmanager
def recording(target: Target, into: List[Launch], case: List[str]):
    """Within the block, kernel launches are appended to ``into`` (labelled ``case[0]``, dtype ``case[1]``), not run, and
    launch heuristics and pruning plan for ``target``."""
    tuner_run, jit_run = Autotuner.run, JITFunction.run

    def record_tuner(self, *args, grid, warmup=False, **kwargs):
        named = dict(zip(self.arg_names, args))
        if isinstance(self, Tuner) and len(self.configs) > 1:
            cands = self.candidates(named, kwargs)
        else:
            cands = list(self.configs)
        allargs = {**named, **kwargs}
        key = tuple((k, allargs[k]) for k in self.keys if k in allargs) + tuple(
            str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
        launch = Launch(case[0], case[1], _jit_of(self), args, kwargs, grid, cands, self, key)
        if isinstance(self, Tuner):
            launch.estimates = {str(c): self.estimate(c, named, kwargs) for c in cands}
        into.append(launch)

    def record_jit(self, *args, grid, warmup=False, **kwargs):
        into.append(Launch(case[0], case[1], self, args, kwargs, grid, [None]))

    Autotuner.run, JITFunction.run = record_tuner, record_jit
    try:
        with assume_device(target.sms, target.smem_limit, target.capability):
            yield
    finally:
        Autotuner.run, JITFunction.run = tuner_run, jit_run


# ----------------------------------------------------------------------------------------------------
# The shape table
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call of a public entry point. ``kind``: dense | decode | grouped | topk | grouping.
    ``mode``: train (every grad) | router (x and gates) | gates (gates only) | infer (no grad)."""

    kind: str
    T: int
    K: int = 4096
    N: int = 4096
    E: int = 4
    r: int = 8
    k: int = 2
    mode: str = "train"
    base: bool = True
    per_expert: bool = False
    ids32: bool = False
    renorm: bool = False
    ci: bool = False  # in the CI subset

    @property
    def label(self) -> str:
        if self.kind == "topk":
            return f"topk T{self.T} E{self.E} k{self.k}{' renorm' if self.renorm else ''}"
        if self.kind == "grouping":
            return f"grouping T{self.T} E{self.E} k{self.k} {'i32' if self.ids32 else 'i64'}"
        return (f"{self.kind} T{self.T} K{self.K} N{self.N} E{self.E} r{self.r} k{self.k} {self.mode}"
                f"{'' if self.base else ' nobase'}{' per-expert' if self.per_expert else ''}")


SHAPES: List[Case] = [
    # dense-rank path: the paper's E=4 r=8, wider ranks, odd dims, GQA-sized N=1024, router training
    Case("dense", 8192, E=4, r=8, ci=True),
    Case("dense", 8192, E=8, r=16, ci=True),
    Case("dense", 2048, E=64, r=16, per_expert=True),
    Case("dense", 1000, K=1000, N=600, E=4, r=64, k=1),
    Case("dense", 512, E=1, r=128, k=1),
    Case("dense", 2048, N=1024, E=8, r=16),
    Case("dense", 4096, E=4, r=8, mode="router"),
    Case("dense", 4096, E=4, r=8, mode="gates", base=False),
    # small T: the shrink splits K (partials + a reduce launch); train saves H through the reduce
    Case("dense", 1, E=8, r=16, mode="infer", ci=True),
    Case("dense", 16, E=8, r=16, mode="infer"),
    Case("dense", 64, N=1024, E=8, r=16, mode="train"),
    # decode: T up to 64, rank tile up to its cap (128); split-K at every one of these (N=1024: 16 N tiles)
    Case("decode", 1, E=4, r=8, mode="infer", ci=True),
    Case("decode", 16, E=8, r=16, mode="infer", ci=True),
    Case("decode", 64, E=4, r=8, mode="infer"),
    Case("decode", 1, N=1024, E=8, r=16, mode="infer"),
    Case("decode", 16, N=1024, E=8, r=16, mode="infer"),
    Case("decode", 64, N=1024, E=8, r=16, mode="infer"),
    Case("decode", 1, E=16, r=8, mode="infer"),
    Case("decode", 8, E=8, r=16, mode="train"),
    Case("decode", 16, K=1001, N=600, E=4, r=8, mode="infer"),  # odd d_in: scalar, unpipelined loads
    # grouped: decode, small and large prefill, k=1 in place, r up to 128, 64K tokens
    Case("grouped", 1, E=64, r=16, ci=True),
    Case("grouped", 64, K=1024, N=1024, E=64, r=8),
    Case("grouped", 4096, K=1024, N=1024, E=64, r=16, per_expert=True, ci=True),
    Case("grouped", 513, K=512, N=512, E=8, r=64, k=1),
    Case("grouped", 2048, K=1024, N=1024, E=16, r=128),
    Case("grouped", 65536, K=1024, N=1024, E=64, r=16, base=False),
    # router and grouping metadata
    Case("topk", 4096, E=4, k=2),
    Case("topk", 4096, E=64, k=2, renorm=True, ci=True),
    Case("topk", 4096, E=256, k=8, renorm=True, ci=True),
    Case("grouping", 1, E=64, k=2, ci=True),
    Case("grouping", 512, E=8, k=2),
    Case("grouping", 65536, E=64, k=2, ci=True),
    Case("grouping", 8192, E=256, k=8, ids32=True),
]


def _grouped_block_m(case: Case) -> int:
    from .grouped import _block_m

    return _block_m(case.T * case.k, case.E)


def run_case(case: Case, dtype: torch.dtype) -> Optional[str]:
    """Call the case's entry point (under ``recording`` nothing runs). Returns the launcher's refusal
    message when it rejects the case (a ValueError), else None."""
    from .dense import lora_mix_decode, lora_mix_dense
    from .grouped import lora_mix_grouped
    from .grouping import grouping_metadata_triton
    from .topk_triton import route_topk_triton

    g = torch.Generator().manual_seed(0)
    T, K, N, E, r, k = case.T, case.K, case.N, case.E, case.r, case.k

    def ids_for(n):
        ids = torch.randint(0, E, (n, k), generator=g)
        return ids.to(torch.int32 if case.ids32 else torch.int64)

    if case.kind == "grouping":
        grouping_metadata_triton(ids_for(T), E, 64 if T * k > 4096 else 16)
        return None
    if case.kind == "topk":
        logits = torch.empty(T, E, dtype=dtype).requires_grad_(True)
        w, _ = route_topk_triton(logits, k, case.renorm)
        w.backward(torch.empty_like(w))
        return None
    grads = {"train": "xABwWb", "router": "xw", "gates": "w", "infer": ""}[case.mode]

    def leaf(*shape, name):
        return torch.empty(*shape, dtype=dtype).requires_grad_(name in grads)

    x, A, B = leaf(T, K, name="x"), leaf(E, r, K, name="A"), leaf(E, N, r, name="B")
    w = leaf(T, k, name="w")
    W = leaf(N, K, name="W") if case.base else None
    b = leaf(N, name="b") if case.base else None
    scale = torch.full((E,), 2.0) if case.per_expert else 2.0
    fn = {"dense": lora_mix_dense, "decode": lora_mix_decode, "grouped": lora_mix_grouped}[case.kind]
    try:
        with torch.set_grad_enabled(bool(grads)):
            y = fn(x, A, B, ids_for(T), w, scale, W, b)
            if grads:
                y.backward(torch.empty_like(y))
    except ValueError as err:
        return str(err)
    return None


def record(cases: Sequence[Case], dtypes: Sequence[str], target: Target) -> Tuple[List[Launch], Dict[str, str]]:
    """Launches of every case x dtype (int-only cases once), and the cases a launcher refused."""
    launches: List[Launch] = []
    refused: Dict[str, str] = {}
    label = ["", ""]
    with recording(target, launches, label):
        for case in cases:
            for dn in (dtypes if case.kind != "grouping" else dtypes[:1]):
                label[0] = case.label + ("" if case.kind == "grouping" else f" {dn}")
                label[1] = "int" if case.kind == "grouping" else dn
                msg = run_case(case, DTYPES[dn])
                if msg is not None:
                    refused[label[0]] = msg
    return launches, refused


# ----------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------


def _bind(launch: Launch, config: Optional[triton.Config], target: Target):
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    kw = dict(launch.kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    kw.setdefault("debug", False)
    bound, spec, options = binder(*launch.args, **kw)
    return backend, kw, bound, spec, options


def binary_key(launch: Launch, config: Optional[triton.Config], target: Target) -> Tuple:
    """What decides the binary Triton builds: the kernel, the argument specialisation, the options."""
    _, _, _, spec, options = _bind(launch, config, target)
    return launch.kernel, repr(spec), repr(sorted((k, repr(v)) for k, v in options.items()))


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_one(launch: Launch, config: Optional[triton.Config], target: Target, is_default: bool) -> Dict[str, Any]:
    """Compile one launch under one config for one target; the report row."""
    cfg = "-" if config is None else ", ".join(
        [f"{k}={v}" for k, v in config.kwargs.items()] + [f"warps={config.num_warps}", f"stages={config.num_stages}"])
    row: Dict[str, Any] = dict(kernel=launch.kernel, case=launch.case, config=cfg, default=is_default,
                               target=target.name, dtype=launch.dtype, smem_limit=target.smem_limit)
    t0 = time.time()
    try:
        backend, kw, bound, spec, options = _bind(launch, config, target)
        options, signature, constexprs, attrs = launch.fn._pack_args(backend, kw, bound, spec, options)
        out = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v always runs; this prints its report
        with contextlib.redirect_stdout(out):
            ck = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                target=GPUTarget("cuda", target.capability, 32), options=options.__dict__)
        log = out.getvalue()
        ptx = ck.asm.get("ptx", "")
        regs, spill, stack = _RE_REGS.search(log), _RE_SPILL.search(log), _RE_STACK.search(log)
        if regs is None:
            raise RuntimeError("no ptxas report (was the binary taken from Triton's cache?)")
        est = launch.estimates.get(str(config)) if config is not None else None
        shared = int(ck.metadata.shared)
        row.update(
            ok=True, registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) if spill else 0,
            stack=int(stack.group(1)) if stack else 0, shared=shared, estimate=est,
            estimate_error=None if est is None or shared == 0 else round((est - shared) / shared, 3),
            fits=shared <= target.smem_limit, warps=ck.metadata.num_warps, stages=ck.metadata.num_stages,
            dot=("wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else
                 "fma" if "fma.rn.f32" in ptx and "tt.dot" in ck.asm.get("ttir", "") else "none"),
            pipelined=("tma" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async" in ptx else "no"),
        )
    except Exception as err:  # noqa: BLE001 - a failed compile is a report row, not a crash
        text = f"{type(err).__name__}: {err}".strip()
        row.update(ok=False, error=text.splitlines()[0][:300])
    row["programs"] = _grid_size(launch, config)
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _grid_size(launch: Launch, config: Optional[triton.Config]) -> Optional[int]:
    try:
        meta = dict(zip(launch.fn.arg_names, launch.args))
        meta.update(launch.kwargs)
        if config is not None:
            meta.update(config.kwargs)
        g = launch.grid(meta) if callable(launch.grid) else launch.grid
        n = 1
        for v in g:
            n *= int(v)
        return n
    except Exception:  # noqa: BLE001
        return None


def plan(launches: List[Launch], target: Target, all_configs: bool) -> List[Tuple[Launch, Optional[triton.Config], bool]]:
    """Distinct (launch, config) compiles: default configs only, or every candidate."""
    seen = set()
    jobs = []
    for launch in launches:
        cands = launch.configs if all_configs else launch.configs[:1]
        for i, cfg in enumerate(cands):
            key = binary_key(launch, cfg, target)
            if key in seen:
                continue
            seen.add(key)
            jobs.append((launch, cfg, i == 0))
    return jobs


_JOBS: List[Tuple[Launch, Optional[triton.Config], bool, Target]] = []


def _run_job(i: int) -> Dict[str, Any]:
    launch, cfg, is_default, target = _JOBS[i]
    return compile_one(launch, cfg, target, is_default)


def compile_all(cases: Sequence[Case], dtypes: Sequence[str], targets: Sequence[str], all_configs: bool,
                jobs: int = 1, progress: Optional[Callable[[str], None]] = None,
                kernels: Optional[str] = None) -> Tuple[List[Dict], Dict[str, str]]:
    """Record and compile (``kernels``: a regex on kernel names, None = all); returns the report rows
    and the refused cases."""
    _JOBS.clear()
    refused_all: Dict[str, str] = {}
    for tname in targets:
        target = TARGETS[tname]
        launches, refused = record(cases, dtypes, target)
        refused_all.update(refused)
        if kernels:
            launches = [launch for launch in launches if re.search(kernels, launch.kernel)]
        _JOBS.extend((launch, cfg, d, target) for launch, cfg, d in plan(launches, target, all_configs))
    if progress:
        progress(f"{len(_JOBS)} distinct compiles")
    rows: List[Dict] = []
    if jobs > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            for n, row in enumerate(pool.imap_unordered(_run_job, range(len(_JOBS))), 1):
                rows.append(row)
                if progress and (n % 20 == 0 or problems([row])):
                    progress(f"[{n}/{len(_JOBS)}] {_describe(row)}")
    else:
        for n in range(len(_JOBS)):
            rows.append(_run_job(n))
            if progress and ((n + 1) % 20 == 0 or problems(rows[-1:])):
                progress(f"[{n + 1}/{len(_JOBS)}] {_describe(rows[-1])}")
    rows.sort(key=lambda r: (r["kernel"], r["target"], r["dtype"], r["case"], not r["default"], r["config"]))
    return rows, refused_all


def problems(rows: List[Dict], est_tol: float = 0.10) -> List[str]:
    """Failures, spills, shared memory over the limit, and estimates more than ``est_tol`` off."""
    out = []
    for r in rows:
        if not r["ok"]:
            out.append(f"FAILED {_describe(r)}")
            continue
        if r["spill_bytes"] > 0:
            out.append(f"SPILL {r['spill_bytes']} B {_describe(r)}")
        if not r["fits"]:
            out.append(f"SMEM {r['shared']} > {r['smem_limit']} {_describe(r)}")
        if r["estimate_error"] is not None and abs(r["estimate_error"]) > est_tol:
            out.append(f"ESTIMATE {r['estimate']} vs compiled {r['shared']} {_describe(r)}")
    return out


def _describe(r: Dict) -> str:
    extra = (f"regs {r['registers']} spill {r['spill_bytes']} smem {r['shared']}/{r['smem_limit']}"
             if r["ok"] else r["error"])
    return f"{r['target']} {r['kernel']} [{r['config']}] ({r['case']}): {extra}"


COLUMNS = ["kernel", "case", "config", "default", "target", "dtype", "ok", "registers", "spill_bytes", "stack",
           "shared", "smem_limit", "estimate", "estimate_error", "fits", "dot", "pipelined", "warps", "stages",
           "programs", "seconds", "error"]


def write_csv(rows: List[Dict], path: str) -> None:
    import csv

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def summary(rows: List[Dict]) -> str:
    """Per kernel x target x dtype: compiles, max registers, spilling compiles, over-limit compiles, dots."""
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["target"], r["dtype"]), []).append(r)
    lines = [f"{'kernel':28s} {'target':6s} {'dtype':5s} {'ok':>7s} {'regs':>5s} {'spill':>5s} {'over':>4s} "
             f"{'smem max':>8s}  dot / pipelined"]
    for (kname, tgt, dt), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        lines.append(
            f"{kname:28s} {tgt:6s} {dt:5s} {len(ok):3d}/{len(rs):<3d} {max([r['registers'] for r in ok], default=0):5d} "
            f"{sum(r['spill_bytes'] > 0 for r in ok):5d} {sum(not r['fits'] for r in ok):4d} "
            f"{max([r['shared'] for r in ok], default=0):8d}  {'/'.join(sorted({r['dot'] for r in ok}))} / "
            f"{'/'.join(sorted({r['pipelined'] for r in ok}))}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Recompiles over a token sweep
# ----------------------------------------------------------------------------------------------------

SWEEP_T = sorted({1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256, 500, 512, 777,
                  1000, 1024, 2047, 2048, 3000, 4096, 5000, 8191, 8192, 10000, 16384, 30000, 32768, 65535, 65536})


def variant_counts(kind: str, T_values: Sequence[int] = SWEEP_T, target: str = "sm_90", *, E: int = 64, r: int = 16,
                   k: int = 2, K: int = 4096, N: int = 4096, mode: str = "train") -> Dict[str, Dict[str, int]]:
    """Per kernel over a sweep of T: distinct binaries (every candidate config) and autotune keys."""
    tg = TARGETS[target]
    bins: Dict[str, set] = {}
    keys: Dict[str, set] = {}
    shapes: Dict[str, set] = {}
    for T in T_values:
        launches: List[Launch] = []
        with recording(tg, launches, ["sweep", "bf16"]):
            run_case(Case(kind, T, K=K, N=N, E=E, r=r, k=k, mode=mode), torch.bfloat16)
        for launch in launches:
            for cfg in launch.configs:
                bins.setdefault(launch.kernel, set()).add(binary_key(launch, cfg, tg))
            if launch.autotune_key is not None and len(launch.tuner.configs) > 1:
                keys.setdefault(launch.kernel, set()).add(launch.autotune_key)
                # the problem apart from the token count (one kernel serves dA, dB and dW, say)
                shapes.setdefault(launch.kernel, set()).add(tuple(
                    kv for kv in launch.autotune_key if not (isinstance(kv, tuple) and kv[0].endswith("_BUCKET"))))
    return {kname: {"binaries": len(b), "autotune_keys": len(keys.get(kname, ())),
                    "problems": len(shapes.get(kname, ()))} for kname, b in bins.items()}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def measure(cases: Sequence[Case], csv_path: Optional[str]) -> List[Dict[str, Any]]:
    """On a GPU: run the cases for real (bf16) and list, per kernel binary Triton built at run time, its
    registers, spills and shared memory next to the CUDA time per launch (torch.profiler), so the AOT
    table and the dispatcher's model can be checked against the device. Not run in CI (no GPU)."""
    import csv

    from torch.profiler import ProfilerActivity, profile

    from . import dense, grouped, grouping, topk_triton  # noqa: F401  (the kernels' modules)

    dev = torch.device("cuda")
    rows: List[Dict[str, Any]] = []
    for case in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        real = _real_inputs(case, dev, g)
        run = lambda: _run_real(case, real)  # noqa: E731
        run()  # compile + autotune outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        times = {e.key: e.device_time / max(1, e.count) for e in prof.key_averages()}
        for fn in _all_jit_functions():
            for cache in fn.device_caches.values():
                for ck in cache[0].values():
                    name = fn.__name__
                    if name not in times:
                        continue
                    ck._init_handles()
                    rows.append(dict(kernel=name, case=case.label, registers=ck.n_regs, spill_bytes=ck.n_spills,
                                     shared=ck.metadata.shared, warps=ck.metadata.num_warps,
                                     stages=ck.metadata.num_stages, us_per_launch=round(times[name], 2)))
            for cache in fn.device_caches.values():
                cache[0].clear()  # next case: only its own binaries
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["kernel"])
            w.writeheader()
            w.writerows(rows)
    for r in rows:
        print(r)
    return rows


def _all_jit_functions() -> List[JITFunction]:
    from . import dense_kernels, grouped_kernels, grouping, topk_triton

    out = []
    for mod in (dense_kernels, grouped_kernels, grouping, topk_triton):
        for v in vars(mod).values():
            if isinstance(v, (JITFunction, Autotuner)):
                out.append(_jit_of(v))
    return out


def _real_inputs(case: Case, dev, g):
    dt = torch.bfloat16
    T, K, N, E, r, k = case.T, case.K, case.N, case.E, case.r, case.k
    ids = torch.randint(0, E, (T, k), device=dev, generator=g)
    if case.kind in ("topk", "grouping"):
        return dict(ids=ids, logits=torch.randn(T, E, device=dev, generator=g, dtype=torch.float32).to(dt))
    grads = case.mode != "infer"
    mk = lambda *s: (torch.randn(*s, device=dev, generator=g) * 0.1).to(dt).requires_grad_(grads)  # noqa: E731
    return dict(x=mk(T, K), A=mk(E, r, K), B=mk(E, N, r), ids=ids,
                w=torch.rand(T, k, device=dev, generator=g).to(dt).requires_grad_(grads),
                W=mk(N, K) if case.base else None, b=mk(N) if case.base else None)


def _run_real(case: Case, a: Dict[str, Any]) -> None:
    from .dense import lora_mix_decode, lora_mix_dense
    from .grouped import lora_mix_grouped
    from .grouping import grouping_metadata_triton
    from .topk_triton import route_topk_triton

    if case.kind == "grouping":
        grouping_metadata_triton(a["ids"], case.E, 64 if case.T * case.k > 4096 else 16)
        return
    if case.kind == "topk":
        logits = a["logits"].detach().requires_grad_(True)
        w, _ = route_topk_triton(logits, case.k, case.renorm)
        w.sum().backward()
        return
    fn = {"dense": lora_mix_dense, "decode": lora_mix_decode, "grouped": lora_mix_grouped}[case.kind]
    with torch.set_grad_enabled(case.mode != "infer"):
        y = fn(a["x"], a["A"], a["B"], a["ids"], a["w"], 2.0, a["W"], a["b"])
        if case.mode != "infer":
            y.float().sum().backward()


def cannot_compile_reason(target: str = "sm_90") -> Optional[str]:
    """Why this machine cannot compile for ``target`` (no NVIDIA backend, no ptxas), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(TARGETS[target].capability).path
        if not path or not os.path.exists(path):
            return f"no ptxas for {target} ({path!r})"
    except Exception as err:  # noqa: BLE001
        return f"Triton's NVIDIA backend is not usable: {type(err).__name__}: {err}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci", action="store_true", help="the CI subset: default configs, bf16, sm_90, headline shapes")
    ap.add_argument("--targets", default="sm_90,sm_80")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--configs", choices=("all", "default"), default="all")
    ap.add_argument("--only", default=None, help="regex on case labels")
    ap.add_argument("--kernels", default=None, help="regex on kernel names (compile only those)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--csv", default=None, help="write the table here")
    ap.add_argument("--json", default=None, help="write rows, refusals and the sweep counts here")
    ap.add_argument("--sweep", action="store_true", help="also count binaries / autotune keys over a T sweep")
    ap.add_argument("--measure", action="store_true",
                    help="on a GPU: run the CI shapes for real; registers/spills/smem of the run-time binaries and "
                         "CUDA time per launch (--csv names the output)")
    a = ap.parse_args(argv)
    if a.measure:
        if not torch.cuda.is_available():
            print("compile_check --measure needs a CUDA device")
            return 2
        measure([c for c in SHAPES if c.ci], a.csv)
        return 0
    if interpreting():
        print("compile_check: unset TRITON_INTERPRET (the interpreter keeps one config per kernel)")
        return 2
    targets = ["sm_90"] if a.ci else a.targets.split(",")
    dtypes = ["bf16"] if a.ci else a.dtypes.split(",")
    for t in targets:
        reason = cannot_compile_reason(t)
        if reason:
            print(f"compile_check: cannot compile for {t}: {reason}")
            return EXIT_CANNOT_COMPILE
    cases = [c for c in SHAPES if c.ci] if a.ci else list(SHAPES)
    if a.only:
        cases = [c for c in cases if re.search(a.only, c.label)]
    t0 = time.time()
    # Triton's cache would hand back binaries without running ptxas (no register report): use a fresh one.
    with tempfile.TemporaryDirectory(prefix="selfmoe-compile-") as cache:
        knobs.cache.dir = cache
        rows, refused = compile_all(cases, dtypes, targets, all_configs=not a.ci and a.configs == "all",
                                    jobs=a.jobs, progress=lambda s: print(s, flush=True), kernels=a.kernels)
    print(summary(rows))
    for lab, msg in refused.items():
        print(f"refused: {lab}: {msg}")
    bad = problems(rows)
    print("\n".join(bad) if bad else "no failures, spills, over-limit launches or estimates off by > 10%")
    sweep = {}
    if a.sweep:
        for kind, extra in (("dense", dict(E=4, r=8)), ("decode", dict(E=8, r=16, mode="infer")),
                            ("grouped", dict(E=64, r=16, K=4096, N=4096))):
            ts = [t for t in SWEEP_T if kind != "decode" or t <= 64]
            if kind == "grouped":
                ts = [t for t in ts if t <= 16384]  # the CPU side of the record (torch addmm) gets slow
            sweep[kind] = variant_counts(kind, ts, **extra)
            print(f"sweep {kind} over {len(ts)} token counts {ts[0]}..{ts[-1]}: {sweep[kind]}")
    print(f"{len(rows)} compiles in {time.time() - t0:.0f}s")
    if a.csv:
        write_csv(rows, a.csv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "refused": refused, "sweep": sweep}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
