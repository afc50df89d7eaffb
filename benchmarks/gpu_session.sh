#!/usr/bin/env bash
# Everything that needs a GPU, for a session that is lent one (H100/H200, no network there):
#   bash benchmarks/gpu_session.sh tests   # install, the GPU tests, then the whole suite    (~5 min)
#   bash benchmarks/gpu_session.sh bench   # install, kernel + train-step benchmarks        (~8 min)
#   bash benchmarks/gpu_session.sh compile # the compile report on the GPU's own toolchain, compiled vs
#                                          # built-at-launch registers and time per kernel   (~4 min)
#   bash benchmarks/gpu_session.sh all     # everything (may not fit one 10-minute device call)
# Logs and result files are copied to $OUT (the device tool brings that folder back); result files
# are also written to benchmarks/results/<device>.csv / .png / train_step_<device>.csv as usual:
# commit those from what comes back, never edited.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-/tmp/selfmoe-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

# The image has torch, triton, transformers, peft, pytest, accelerate: install only this project.
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/selfmoe-install.log 2>&1 || {
    cat /tmp/selfmoe-install.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$stage" = tests ] || [ "$stage" = all ]; then
    python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/tests_gpu.log" || status=1
    python3 -m pytest -q -p no:cacheprovider -x --durations=10 2>&1 | tee "$OUT/tests_all.log" | tail -25 || status=1
fi

if [ "$stage" = compile ] || [ "$stage" = all ]; then
    # The AOT table for this GPU's target (default configs: what a first launch builds), then the same
    # kernels launched for real: registers / spills / shared memory of the binaries Triton built at run
    # time next to the AOT prediction, and the measured time per kernel (settles the dispatcher's model).
    cap=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")
    python3 benchmarks/compile_report.py --targets "$cap" --dtypes bf16 --configs default \
        --csv "$OUT/compile_report_aot_$cap.csv" 2>&1 | tail -30 | tee "$OUT/compile_report.log" || status=1
    python3 -m selfmoe.kernels.compile_check --measure --csv "$OUT/compile_measured_$cap.csv" 2>&1 \
        | tail -40 | tee "$OUT/compile_measured.log" || status=1
fi

if [ "$stage" = bench ] || [ "$stage" = all ]; then
    python3 benchmarks/bench_lora_mix.py --results-dir benchmarks/results 2>&1 | tee "$OUT/bench_lora_mix.log" || status=1
    python3 benchmarks/bench_train_step.py --device cuda --preset large --providers bare,xlora,mixse \
        --results-dir benchmarks/results 2>&1 \
        | tee "$OUT/bench_train_step.log" || status=1
    # Only this run's files (the device tool brings back at most 8 files).
    find benchmarks/results -type f -newer "$OUT/gpu.txt" -exec cp {} "$OUT/" \;
fi
exit $status
