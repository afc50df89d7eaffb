#!/usr/bin/env python3
"""Compile report: every Triton kernel x every config the autotuner or a pin can pick x dtype x target x
shape, compiled for NVIDIA GPUs on a machine without one (kernels/compile_check.py does the work).

    python benchmarks/compile_report.py                       # bf16/fp16/fp32, sm_90 + sm_80, all configs
    python benchmarks/compile_report.py --targets sm_90 --dtypes bf16 --configs default

Writes benchmarks/results/compile_report.csv (kernel, case, config, target, dtype, registers, spill
bytes, shared memory, limit, the pruner's estimate and its error, wgmma/mma, pipelined loads, programs)
and prints a summary per kernel x target x dtype. Exit status 1 when anything fails to compile, spills,
does not fit, or an estimate is more than 10% off. Run it without TRITON_INTERPRET.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from selfmoe.kernels.compile_check import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--csv") for a in argv):
        argv += ["--csv", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile_report.csv")]
    sys.exit(main(argv))
