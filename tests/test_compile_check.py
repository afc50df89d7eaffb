"""The Triton kernels compiled for an H100 (sm_90) without a GPU: no spills, nothing over the shared-memory
limit, pruning estimates within 10% of what the compiler allocates, bounded recompiles over a T sweep.

One subprocess runs ``python -m selfmoe.kernels.compile_check --ci --sweep`` without TRITON_INTERPRET (the
interpreter cuts every config table to one entry at import, and accepts code the compiler rejects): the
CI subset is the default config of every launch of the headline shapes (kernels/compile_check.py,
``SHAPES`` with ``ci=True``), bf16, sm_90, through the real launchers. About a minute on 2 cores. The
full table (every config, bf16/fp16/fp32, sm_90 and sm_80) is ``benchmarks/compile_report.py``.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "ci.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SELFMOE_TRITON_CONFIG")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "selfmoe.kernels.compile_check", "--ci", "--sweep", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(f"this machine cannot compile for sm_90: {proc.stdout.strip()[-300:]}")
    if not out.exists():
        pytest.fail(f"compile check crashed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    data["log"] = proc.stdout
    return data


def test_every_launch_compiles(report):
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    # every kernel of every path is in the subset: dense, decode, grouped, grouping, route_topk
    assert {"_shrink_gate_fwd_kernel", "_fused_base_lora_kernel", "_decode_fused_fwd_kernel", "_dhg_bwd_kernel",
            "_matmul_tn_kernel", "_shrink_split_reduce_kernel", "_decode_split_reduce_kernel",
            "_grouped_shrink_kernel", "_grouped_expand_kernel", "_grouped_outer_kernel",
            "_combine_slots_kernel", "_grouping_count_kernel", "_grouping_place_kernel",
            "_route_topk_fwd_kernel", "_route_topk_bwd_kernel"} <= kernels
    failed = [f"{r['kernel']} ({r['case']}): {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    # the report really comes from ptxas: registers are read for every binary
    assert all(r["registers"] > 0 for r in rows)


def test_no_spills(report):
    spills = [f"{r['kernel']} [{r['config']}] ({r['case']}): {r['spill_bytes']} B, {r['registers']} regs"
              for r in report["rows"] if r["ok"] and r["spill_bytes"] > 0]
    assert not spills, "\n".join(spills)


def test_shared_memory_within_limit_and_estimates_within_10_percent(report):
    over = [f"{r['kernel']} ({r['case']}): {r['shared']} > {r['smem_limit']}"
            for r in report["rows"] if r["ok"] and not r["fits"]]
    assert not over, "\n".join(over)
    estimated = [r for r in report["rows"] if r["ok"] and r["estimate"] is not None]
    # the kernels the pruners guard: the pipelined GEMM loops
    assert {r["kernel"] for r in estimated} >= {"_shrink_gate_fwd_kernel", "_fused_base_lora_kernel",
                                                "_decode_fused_fwd_kernel", "_dhg_bwd_kernel", "_matmul_tn_kernel",
                                                "_grouped_shrink_kernel", "_grouped_outer_kernel"}
    off = [f"{r['kernel']} [{r['config']}] ({r['case']}): estimate {r['estimate']} vs compiled {r['shared']}"
           for r in estimated if abs(r["estimate"] - r["shared"]) > 0.10 * r["shared"]]
    assert not off, "\n".join(off)


def test_tensor_cores_and_pipelining_on_the_gemms(report):
    # bf16 GEMM loops must lower to tensor-core MMAs with cp.async-pipelined loads, not FMA loops
    for r in report["rows"]:
        if r["kernel"] in ("_shrink_gate_fwd_kernel", "_fused_base_lora_kernel", "_matmul_tn_kernel",
                           "_grouped_shrink_kernel"):
            assert r["dot"] in ("wgmma", "mma") and r["pipelined"] != "no", r


def test_bounded_recompiles_over_a_token_sweep(report):
    # T from 1 to 65536 (1..64 for decode, ..16384 for grouped: the CPU side of the record gets slow):
    # binaries = distinct specialisations x candidate configs; autotune keys = distinct tuning runs;
    # problems = the keys without the token bucket (one kernel serves dA, dB and dW, say)
    sweep = report["sweep"]
    assert set(sweep) == {"dense", "decode", "grouped"}
    # Specialisations per config that T can still cause (T itself and the token bucket are unspecialised,
    # split factors are run-time ints): dense <= 4 (dA/dB/dW layouts, SPLIT == 1; the shrink: split-K or
    # not), decode 3 (BLOCK_M 16, 32, 64; every T of its sweep splits K at N = 4096), grouped 12 (BLOCK_M
    # 16/32/64 x SPLIT == 1 or not x forward/backward); <= 6 configs each.
    per_config = {"dense": 4, "decode": 3, "grouped": 12}
    for kind, per_kernel in sweep.items():
        for kname, n in per_kernel.items():
            assert n["autotune_keys"] <= 8 * n["problems"], (kind, kname, n)  # 8 token buckets per problem
            assert n["binaries"] <= per_config[kind] * 6, (kind, kname, n)
