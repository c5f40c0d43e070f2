#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh runs into .gpu-bundle/ (ignored by
# git), for a GPU machine without a Rust toolchain (the device image has
# CUDA, PyTorch and g++, but no cargo): the GPU test binaries and the kernel
# benchmark in release, stripped, plus the `aha` binary for the CLI's CUDA
# tests. Carry the folder with the device call (`carry: [".gpu-bundle"]`);
# gpu-check.sh uses it when cargo is missing. Tests find their fixtures
# through the source path baked in at build time; gpu-check.sh links that
# path to the working tree on the GPU machine (.gpu-bundle/root holds it).
#
# It also holds kernel-cache/: every kernel file compiled for sm_90 by the
# NVRTC here (13.0, as on the device image), so that the GPU machine
# compiles nothing (gpu-check.sh reports any miss).
#
# Usage: scripts/gpu-bundle.sh   (checks the size: a call carries 64 MiB in all)
#        scripts/gpu-bundle.sh --dry-run DIR   (links the debug test
#        executables and `aha` into DIR/bin, for gpu-check.sh's dry run on
#        the emulated GPU in scripts/test.sh; builds nothing in release)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
out=.gpu-bundle
if [ "${1:-}" = --dry-run ]; then
    profile=debug
    out="${2:?usage: gpu-bundle.sh --dry-run DIR}"
fi
rm -rf "$out"
mkdir -p "$out/bin"
pwd > "$out/root"

# crate:test pairs, in the order gpu-check.sh runs them (the NVRTC and
# kernel-emulation tests are not here: they need no GPU, and CI runs them).
tests=(
    aha-cuda-kernels:emulated_driver
    aha-cuda-kernels:graph
    aha-tensor:gpu_twins
    aha-tensor:gpu_kernels
    aha-tensor:gpu_moe
    aha-tensor:gpu_flash
    aha-tensor:gpu_lmhead
    aha-sampler:gpu_sampling
    aha-sampler:gpu_engine
    aha-moe-model:gpu_model
    aha-moe-model:gpu_offload
    aha-grpo:gpu_loss
    aha:cli
)
args=()
for t in "${tests[@]}"; do
    args+=(-p "${t%%:*}" --test "${t##*:}")
done
release=()
[ "$profile" = release ] && release=(--release)
# One build; the JSON messages name each test executable.
cargo test "${release[@]}" --no-run --message-format=json "${args[@]}" >"$out/build.json"
python3 - "$out" "$profile" <<'PY'
import json, os, shutil, sys
out, profile = sys.argv[1], sys.argv[2]
for line in open(os.path.join(out, "build.json")):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    # package_id: "path+file:///dir#name@version", or "...#version" when the
    # package is named like its folder.
    pid = m["package_id"]
    tail = pid.split("#", 1)[1] if "#" in pid else pid
    pkg = tail.split("@")[0] if "@" in tail else pid.split("#")[0].rstrip("/").split("/")[-1]
    dst = os.path.join(out, "bin", f"{pkg}-{m['target']['name']}")
    if profile == "debug":
        os.symlink(m["executable"], dst)
    else:
        shutil.copy2(m["executable"], dst)
PY
rm "$out/build.json"
if [ "$profile" = debug ]; then
    cargo build --bin aha
    ln -s "$PWD/target/debug/aha" "$out/bin/aha"
    exit 0
fi
cargo build --release -p aha-cuda-kernels --example kernel_bench
cp target/release/examples/kernel_bench "$out/bin/kernel_bench"
# The CLI tests start the binary at the path cargo baked into them.
cargo build --release --bin aha
cp target/release/aha "$out/bin/aha"
strip -s "$out"/bin/* 2>/dev/null || true
# The kernels, precompiled for the H100 / H200 (sm_90).
cargo run --release -p aha-cuda-kernels --example precompile -- "$out/kernel-cache" 90
ls -l "$out/bin" "$out/kernel-cache"
# The executables travel compressed (40 MB of them become about 7 MB with
# xz): the bundle plus the working tree must fit a device call's 64 MiB.
# gpu-check.sh unpacks them.
tar -C "$out" -cf - bin | xz -T2 -6 >"$out/bin.tar.xz"
rm -rf "$out/bin"
du -sh "$out"
total=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb "$out" | cut -f1) ))
echo "working tree + bundle: $(( total / 1048576 )) MiB (the limit is 64 MiB)"
[ "$total" -lt $(( 64 * 1048576 )) ] || { echo "gpu-bundle: over 64 MiB" >&2; exit 1; }
