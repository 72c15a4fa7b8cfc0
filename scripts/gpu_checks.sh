#!/usr/bin/env bash
# The prepared GPU run (a lent machine: torch + Triton, no vLLM; minutes of budget):
#   1. the Triton kernels against the torch oracle, and the CUDA backend's eviction step
#      (engine/paged_eviction.py) with them on CUDA tensors, including decode and prompt
#      evictions run under torch.cuda.set_sync_debug_mode("error") (tests/test_kernels.py);
#   2. the kernel benchmark: scoring GB/s vs the measured copy bandwidth, and the decode
#      step's eviction vs attention alone, in the same run.
# Output goes to $OUT (the device tool brings it back) or build/gpu-checks.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu-checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/test_kernels.txt"
tests_rc=${PIPESTATUS[0]}
python3 scripts/bench_kernels.py --json "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.txt"
bench_rc=${PIPESTATUS[0]}
echo "test_kernels rc=$tests_rc bench_kernels rc=$bench_rc" | tee -a "$out/gpu.txt"
exit $(( tests_rc || bench_rc ))
