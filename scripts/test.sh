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
