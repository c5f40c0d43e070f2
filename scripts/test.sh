#!/usr/bin/env bash
# The test command (README): the whole suite, with NVRTC available so that
# every kernel in kernels/ is compiled for sm_80 and sm_90 even without a GPU.
#
# NVRTC comes from $AHA_CUDA_ROOT if set; otherwise the pinned pip wheels are
# installed once into .cuda-wheels/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${AHA_CUDA_ROOT:-}" ]; then
    wheels="$PWD/.cuda-wheels"
    if [ ! -f "$wheels/nvidia/cu13/lib/libnvrtc.so.13" ]; then
        echo "scripts/test.sh: installing NVRTC 13.0 into .cuda-wheels/ (pip, once)" >&2
        python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
            --target "$wheels" -r scripts/cuda-wheels.txt
    fi
    export AHA_CUDA_ROOT="$wheels/nvidia/cu13"
fi
# The kernel compile test must run here, not skip.
export AHA_REQUIRE_NVRTC=1
# So must the kernels' CPU emulation (aha_cuda_kernels::emulate: the .cu
# files compiled by a C++ compiler through a CUDA shim and run as written).
if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
    echo "scripts/test.sh: no C++ compiler (${CXX:-g++}); the emulated kernel tests need one (apt-get install g++)" >&2
    exit 1
fi
export AHA_REQUIRE_EMULATOR=1

cargo test --workspace "$@"

# The GPU tests again, on the emulated GPU (AHA_EMULATED_GPU=1: a CUDA
# driver and cuBLAS built from crates/cuda-kernels/emulate/ that run the
# kernel files on the CPU), so that the Rust launchers, the GPU model, the
# MoE layer and the CLI's --device cuda paths run on every machine; with it,
# the emulated NCCL (emulate/fake_nccl.cpp) for the collectives and the
# data-parallel runs over several processes. None of them may skip here.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
AHA_EMULATED_GPU=1 cargo test "$@" \
    -p aha-tensor --test gpu_twins --test gpu_kernels --test gpu_moe --test gpu_flash --test gpu_lmhead \
    -p aha-sampler --test gpu_sampling --test gpu_engine -p aha-moe-model --test gpu_model --test gpu_offload --test reward_model --test expert_parallel -p aha-grpo --test gpu_loss \
    -p aha-trainer --test gpu_demo -p aha-cuda-kernels --test nccl --test moe_ep --test graph \
    -p aha --test cli --test dist --test sft_cli --test expert_parallel_cli -- cuda on_the_gpu --nocapture 2>&1 | tee "$log"
if grep -q "skipped: no GPU" "$log"; then
    echo "scripts/test.sh: a GPU test skipped on the emulated GPU" >&2
    exit 1
fi

# The kernel-file emulation tests again with the threads of each block run
# in reverse and in a seeded random order between barriers (forward is the
# default above), so that a missing __syncthreads shows whichever thread a
# read depends on.
for order in reverse random:1; do
    AHA_EMU_ORDER="$order" cargo test "$@" \
        -p aha-cuda-kernels --test emulation --test emulated_driver -p aha-tensor --test emulated_kernels \
        --test gpu_kernels --test gpu_lmhead -p aha-sampler --test gpu_sampling -p aha-grpo --test gpu_loss \
        -- emulated
done

# The kernel-file emulation tests once more under AddressSanitizer and
# UndefinedBehaviorSanitizer (AHA_EMU_SANITIZE=1: the driver programs built
# with -fsanitize=address,undefined, every finding fatal), so that an
# out-of-bounds access in a kernel fails here and not on a GPU. About 65 s
# on 2 cores, most of it compiling the four sanitized programs.
AHA_EMU_SANITIZE=1 cargo test "$@" \
    -p aha-cuda-kernels --test emulation -p aha-tensor --test emulated_kernels --test gpu_kernels --test gpu_lmhead \
    -- emulated

# scripts/gpu-check.sh's dry run on the emulated GPU, over a few tests, so
# that the script a GPU machine runs cannot rot.
dry="$(mktemp -d)"
trap 'rm -f "$log"; rm -rf "$dry"' EXIT
scripts/gpu-bundle.sh --dry-run "$dry/bundle" >/dev/null
AHA_EMULATED_GPU=1 AHA_GPU_CHECK_BIN="$dry/bundle/bin" \
    AHA_GPU_CHECK_TESTS="aha-cuda-kernels-emulated_driver aha-tensor-gpu_twins aha-grpo-gpu_loss:advantages" \
    scripts/gpu-check.sh "$dry/out"
