#!/usr/bin/env bash
# The GPU check, meant for one call on a machine with an NVIDIA GPU:
#   1. builds the kernel tests and the benchmark (release),
#   2. runs every GPU test (kernel compile + ptxas report, the GPU-vs-CPU-twin
#      tests of aha-tensor incl. cuBLAS products and the scratch pool, the
#      sampling kernel against aha-sampler, the dense models' GPU forward
#      against the CPU and transformers) with --nocapture so that timings print, and fails
#      if any of them says "skipped: no GPU" (set AHA_GPU_CHECK_ALLOW_SKIP=1
#      to only compile and run what can run),
#   3. times every kernel on model-sized shapes and prints a table: kernel,
#      shape, time, GB/s, fraction of 3.0 TB/s (the H100's measured
#      device-copy bandwidth), then the cuBLAS products in TFLOP/s against
#      ~800 (bf16 dense).
#
# NVRTC: $AHA_CUDA_ROOT, else .cuda-wheels/ (scripts/test.sh installs it;
# carry it to a machine that cannot reach pip), else /usr/local/cuda.
# Usage: scripts/gpu-check.sh [BENCH_ITERS]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."

iters="${1:-20}"
if [ -z "${AHA_CUDA_ROOT:-}" ] && [ -f .cuda-wheels/nvidia/cu13/lib/libnvrtc.so.13 ]; then
    export AHA_CUDA_ROOT="$PWD/.cuda-wheels/nvidia/cu13"
fi
export AHA_REQUIRE_NVRTC=1
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

echo "== device"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
else
    echo "nvidia-smi not found"
fi
echo "AHA_CUDA_ROOT=${AHA_CUDA_ROOT:-<unset>}"

echo "== build"
cargo build --release -p aha-cuda-kernels --example kernel_bench
cargo test -p aha-cuda-kernels -p aha-tensor -p aha-sampler -p aha-moe-model -p aha-grpo --no-run

echo "== GPU tests"
cargo test -p aha-cuda-kernels --test nvrtc_compile -- --nocapture --test-threads=1 2>&1 | tee -a "$log"
cargo test -p aha-tensor --test gpu_twins --test gpu_kernels -- --nocapture --test-threads=1 2>&1 | tee -a "$log"
cargo test -p aha-tensor --test gpu_moe -- --nocapture --test-threads=1 2>&1 | tee -a "$log"
cargo test -p aha-tensor --test gpu_flash -- --nocapture --test-threads=1 2>&1 | tee -a "$log"
cargo test -p aha-sampler --test gpu_sampling -- --nocapture 2>&1 | tee -a "$log"
cargo test -p aha-moe-model --test gpu_model -- --nocapture 2>&1 | tee -a "$log"
cargo test -p aha-tensor --test gpu_lmhead -- --nocapture 2>&1 | tee -a "$log"
cargo test -p aha-grpo --test gpu_loss -- --nocapture 2>&1 | tee -a "$log"
cargo test -p aha --test cli on_cuda -- --nocapture 2>&1 | tee -a "$log"
if grep -q "skipped: no GPU" "$log"; then
    echo "gpu-check: GPU tests were skipped: no GPU was found" >&2
    if [ "${AHA_GPU_CHECK_ALLOW_SKIP:-0}" != "1" ]; then
        exit 1
    fi
fi

echo "== kernel benchmark"
./target/release/examples/kernel_bench "$iters"

echo "== PyTorch peer: transformers Qwen3-MoE sparse block (bf16; same shape as the first MoE rows)"
if command -v python3 >/dev/null 2>&1; then
    python3 scripts/bench_moe_torch.py "$iters" || echo "bench_moe_torch.py failed (see above)"
else
    echo "python3 not found: MoE peer rows skipped"
fi

echo "== PyTorch peer: lm-head log-probs (naive and selective_log_softmax)"
if command -v python3 >/dev/null 2>&1; then
    python3 scripts/bench_logprob_torch.py 5 || echo "bench_logprob_torch.py failed (see above)"
else
    echo "python3 not found: PyTorch peer rows skipped"
fi

echo "== PyTorch peer: flash attention (SDPA, flash backend; same shapes as the flash rows)"
if command -v python3 >/dev/null 2>&1; then
    python3 scripts/bench_sdpa.py "$iters" || echo "bench_sdpa.py failed (see above)"
else
    echo "python3 not found: SDPA peer rows skipped"
fi
