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
#
# Without cargo (the device image has CUDA, PyTorch and g++ but no Rust):
# run scripts/gpu-bundle.sh on a machine with cargo first and carry
# .gpu-bundle/ (release test binaries, kernel_bench, aha; stripped); this
# script then runs those instead of building.
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

if command -v cargo >/dev/null 2>&1; then
    mode=cargo
    echo "== build"
    cargo build --release -p aha-cuda-kernels --example kernel_bench
    cargo test --release -p aha-cuda-kernels -p aha-tensor -p aha-sampler -p aha-moe-model -p aha-grpo --no-run
    bench=./target/release/examples/kernel_bench
elif [ -d .gpu-bundle/bin ]; then
    mode=bundle
    echo "== no cargo: running the binaries of .gpu-bundle/"
    # The tests open fixtures under the source path baked in at build time.
    root="$(cat .gpu-bundle/root)"
    if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
        mkdir -p "$(dirname "$root")"
        ln -s "$PWD" "$root"
    fi
    mkdir -p target/release
    cp .gpu-bundle/bin/aha target/release/aha
    bench=.gpu-bundle/bin/kernel_bench
else
    echo "gpu-check: neither cargo nor .gpu-bundle/ (run scripts/gpu-bundle.sh where cargo is and carry .gpu-bundle)" >&2
    exit 1
fi

# run_test CRATE TEST [FILTER]: one test binary with --nocapture, output
# logged; a failure is recorded and the check goes on, so that one device
# call reports every test and the benchmark.
failed=()
run_test() {
    local rc=0
    if [ "$mode" = cargo ]; then
        cargo test --release -p "$1" --test "$2" -- ${3:-} --nocapture --test-threads=1 2>&1 | tee -a "$log" || rc=$?
    else
        ".gpu-bundle/bin/$1-$2" ${3:-} --nocapture --test-threads=1 2>&1 | tee -a "$log" || rc=$?
    fi
    if [ "$rc" != 0 ]; then
        failed+=("$1/$2")
    fi
}

echo "== GPU tests"
run_test aha-cuda-kernels nvrtc_compile
run_test aha-cuda-kernels emulation
run_test aha-tensor gpu_twins
run_test aha-tensor gpu_kernels
run_test aha-tensor gpu_moe
run_test aha-tensor gpu_flash
run_test aha-tensor gpu_lmhead
run_test aha-sampler gpu_sampling
run_test aha-moe-model gpu_model
run_test aha-grpo gpu_loss
run_test aha cli on_cuda
if grep -q "skipped: no GPU" "$log"; then
    echo "gpu-check: GPU tests were skipped: no GPU was found" >&2
    if [ "${AHA_GPU_CHECK_ALLOW_SKIP:-0}" != "1" ]; then
        exit 1
    fi
fi
echo "== failed test binaries: ${failed[*]:-none}"

echo "== kernel benchmark"
"$bench" "$iters"

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

if [ "${#failed[@]}" != 0 ]; then
    echo "gpu-check: failed: ${failed[*]}" >&2
    exit 1
fi
