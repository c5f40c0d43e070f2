#!/usr/bin/env bash
# The GPU check: one call of at most ~8 minutes on a GPU machine that has
# CUDA, PyTorch and g++ but no Rust. Everything goes to one folder.
#
#   scripts/gpu-bundle.sh            # here, with cargo: .gpu-bundle/ (binaries + sm_90 kernel cache)
#   scripts/gpu-check.sh [OUT_DIR]   # there, with carry: [".gpu-bundle"]
#
# OUT_DIR: the argument, else $OUT, else .gpu-check/<date>. Steps, in order;
# a failing step never stops the later ones:
#   1. probe (~10 s): nvidia-smi; where libcuda, libcublas, libcublasLt,
#      libnvrtc and libnccl are (loader cache, /usr/local/cuda, a Python
#      environment's nvidia/*/lib); the folders found are exported on
#      LD_LIBRARY_PATH; cuBLAS must open by name (cudarc opens it so);
#      `aha info`.
#   2. the kernel cache: .gpu-bundle/kernel-cache (sm_90 cubins from NVRTC
#      13.0) copied into OUT_DIR and used as AHA_KERNEL_CACHE; the files it
#      gains during the run are cache misses (compiled on the GPU machine),
#      reported at the end.
#   3. every test of the GPU test binaries, each in its own process under
#      `timeout`, with AHA_CUDA_SYNC=1 (a kernel fault names its kernel);
#      tests.json: name, pass/fail/skip, seconds; logs/ has each log.
#   4. compute-sanitizer memcheck, racecheck and synccheck over the
#      small-shape kernel tests, where the tool exists.
#   5. kernel_bench with few iterations, then the PyTorch peer scripts;
#      `aha bench train --device cuda --precision bf16` (plain, with
#      --offload-optimizer and with --lora) on a Qwen2.5-1.5B and
#      a reduced Qwen3-MoE config next to scripts/bench_train_torch.py,
#      `aha bench generate --device cuda` at batch 64 and 256 next to
#      scripts/bench_generate_torch.py, and
#      `aha demo --quick --device cuda`.
#   6. a short table.
#
# Dry run (CI, scripts/test.sh): AHA_EMULATED_GPU=1 runs the same script
# on the emulated GPU; AHA_GPU_CHECK_BIN names a folder of test
# executables (default .gpu-bundle/bin), AHA_GPU_CHECK_TESTS a subset of
# "binary[:filter]" entries; the sanitizer, the benchmark and the peers are
# skipped there and say so. Exit status: 1 when a test failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
start_all=$SECONDS

out="${1:-${OUT:-.gpu-check/$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$out/logs"
out="$(cd "$out" && pwd)"
bin="${AHA_GPU_CHECK_BIN:-$root/.gpu-bundle/bin}"
# gpu-bundle.sh ships the executables as bin.tar.xz (40 MB become 7, so the
# bundle and the working tree fit one call's 64 MiB); unpack them once.
if [ ! -d "$bin" ] && [ -f "$root/.gpu-bundle/bin.tar.xz" ]; then
    python3 -c 'import sys, tarfile; t = tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' \
        "$root/.gpu-bundle/bin.tar.xz" "$root/.gpu-bundle" || echo "gpu-check: unpacking bin.tar.xz failed" >&2
fi
emulated=0
if [ "${AHA_EMULATED_GPU:-0}" = 1 ]; then emulated=1; fi
iters="${AHA_GPU_CHECK_ITERS:-5}"
budget="${AHA_GPU_CHECK_BUDGET_S:-420}"   # tests stop being started past this
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
step() { echo; echo "== $*"; }

# ---- 1. probe
step "probe"
probe="$out/probe.txt"
{
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv
        timeout 10 nvidia-smi | head -20
    else
        echo "nvidia-smi: not found"
    fi
} >"$probe" 2>&1
cat "$probe"
pydirs=""
if command -v python3 >/dev/null 2>&1; then
    # A Python environment's nvidia wheels (torch's CUDA libraries).
    pydirs="$(timeout 10 python3 -c 'import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print("\n".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})))' 2>/dev/null || true)"
fi
libdirs=()
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libnccl.so.2; do
    found="$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l { print $NF; exit }')"
    if [ -z "$found" ]; then
        for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib $pydirs; do
            if [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
        done
    fi
    echo "$lib: ${found:-not found}" | tee -a "$probe"
    if [ -n "$found" ]; then
        d="$(dirname "$found")"
        case " ${libdirs[*]:-} " in *" $d "*) ;; *) libdirs+=("$d") ;; esac
        if [ "$lib" = libnvrtc.so.13 ] && [ -z "${AHA_CUDA_ROOT:-}" ]; then
            export AHA_CUDA_ROOT="$(dirname "$d")"
        fi
    fi
done
if [ "${#libdirs[@]}" -gt 0 ]; then
    LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" | tee -a "$probe"
echo "AHA_CUDA_ROOT=${AHA_CUDA_ROOT:-<unset>}" | tee -a "$probe"
if [ "$emulated" = 1 ]; then
    note "probe: emulated GPU (AHA_EMULATED_GPU=1): cuBLAS by name not checked"
elif command -v python3 >/dev/null 2>&1; then
    if timeout 10 python3 -c 'import ctypes; ctypes.CDLL("libcublas.so.13"); ctypes.CDLL("libcublasLt.so.13")' >>"$probe" 2>&1; then
        note "probe: libcublas.so.13 opens by name"
    else
        note "probe: libcublas.so.13 does NOT open by name (the cuBLAS tests will fail)"
    fi
fi
aha="$bin/aha"
if [ -x "$aha" ]; then
    timeout 30 "$aha" info 2>&1 | tee -a "$probe" || note "probe: aha info failed"
else
    note "probe: no $aha"
fi

# The tests open fixtures under the source path baked in at build time.
if [ "$bin" = "$root/.gpu-bundle/bin" ] && [ -f .gpu-bundle/root ]; then
    built="$(cat .gpu-bundle/root)"
    if [ "$built" != "$root" ] && [ ! -e "$built" ]; then
        mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"
    fi
    # The CLI tests start the binary at the path cargo baked into them.
    mkdir -p target/release
    [ -x "$aha" ] && cp "$aha" target/release/aha
fi

# ---- 2. kernel cache
step "kernel cache"
export AHA_KERNEL_CACHE="$out/kernel-cache"
mkdir -p "$AHA_KERNEL_CACHE"
if [ -d .gpu-bundle/kernel-cache ]; then
    cp .gpu-bundle/kernel-cache/* "$AHA_KERNEL_CACHE"/ 2>/dev/null || true
fi
cached_before="$(ls "$AHA_KERNEL_CACHE" | sort)"
note "kernel cache: $(echo "$cached_before" | grep -c . || true) precompiled files"

# ---- 3. tests, one process each
step "tests (AHA_CUDA_SYNC=1)"
export AHA_CUDA_SYNC=1 AHA_REQUIRE_NVRTC=1 RUST_BACKTRACE=1
json="$out/tests.json"
echo "[" >"$json"
first=1
passed=0 failed=0 skipped=0
record() { # name status seconds
    [ "$first" = 1 ] || echo "," >>"$json"
    first=0
    printf '  {"name": "%s", "status": "%s", "seconds": %s}' "$1" "$2" "$3" >>"$json"
    case "$2" in pass) passed=$((passed + 1)) ;; fail) failed=$((failed + 1)) ;; *) skipped=$((skipped + 1)) ;; esac
    printf '%-70s %-5s %6ss\n' "$1" "$2" "$3"
}
# binary[:filter]: the CLI tests need only their CUDA ones.
tests="${AHA_GPU_CHECK_TESTS:-aha-cuda-kernels-emulated_driver aha-cuda-kernels-graph aha-tensor-gpu_twins aha-tensor-gpu_kernels aha-tensor-gpu_moe aha-tensor-gpu_flash aha-tensor-gpu_lmhead aha-sampler-gpu_sampling aha-sampler-gpu_engine aha-moe-model-gpu_model aha-moe-model-gpu_offload aha-grpo-gpu_loss aha-cli:cuda}"
for entry in $tests; do
    exe="$bin/${entry%%:*}"
    filter=""
    [ "$entry" != "${entry%%:*}" ] && filter="${entry#*:}"
    if [ ! -x "$exe" ]; then
        record "${entry%%:*}" fail 0
        echo "missing executable $exe" >"$out/logs/${entry%%:*}.log"
        continue
    fi
    names="$("$exe" --list --format terse $filter 2>/dev/null | sed -n 's/: test$//p')"
    for name in $names; do
        full="${entry%%:*}::$name"
        if [ $((SECONDS - start_all)) -gt "$budget" ]; then
            record "$full" skip 0
            continue
        fi
        log="$out/logs/${entry%%:*}.$name.log"
        t0=$SECONDS
        rc=0
        timeout 120 "$exe" "$name" --exact --nocapture --test-threads=1 >"$log" 2>&1 || rc=$?
        dt=$((SECONDS - t0))
        if [ "$rc" = 0 ] && grep -q "skipped" "$log"; then
            record "$full" skip "$dt"
        elif [ "$rc" = 0 ]; then
            record "$full" pass "$dt"
        else
            [ "$rc" = 124 ] && echo "gpu-check: timed out after 120 s" >>"$log"
            record "$full" fail "$dt"
        fi
    done
done
echo "" >>"$json"
echo "]" >>"$json"
note "tests: $passed passed, $failed failed, $skipped skipped (tests.json, logs/)"
unset AHA_CUDA_SYNC

# ---- 4. compute-sanitizer
step "compute-sanitizer"
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if [ "$emulated" = 1 ]; then
    note "sanitizer: skipped on the emulated GPU"
elif [ -z "$sanitizer" ]; then
    note "sanitizer: compute-sanitizer not found, skipped"
else
    # Small shapes only: the tool slows kernels 10-100x.
    for tool in memcheck racecheck synccheck; do
        for t in aha-tensor-gpu_twins; do
            [ $((SECONDS - start_all)) -gt $((budget + 60)) ] && { note "sanitizer $tool $t: skipped (time)"; continue; }
            rc=0
            timeout 60 "$sanitizer" --tool "$tool" --error-exitcode 99 "$bin/$t" --test-threads=1 \
                >"$out/logs/sanitizer-$tool-$t.log" 2>&1 || rc=$?
            note "sanitizer $tool $t: $([ "$rc" = 0 ] && echo clean || echo "exit $rc (logs/sanitizer-$tool-$t.log)")"
        done
    done
fi

# ---- 5. benchmark and peers
step "kernel_bench ($iters iterations)"
if [ "$emulated" = 1 ]; then
    note "kernel_bench: skipped on the emulated GPU (model-sized shapes)"
elif [ -x "$bin/kernel_bench" ]; then
    rc=0
    timeout 150 "$bin/kernel_bench" "$iters" 2>&1 | tee "$out/bench.txt" || rc=$?
    note "kernel_bench: $([ "$rc" = 0 ] && echo done || echo "exit $rc") (bench.txt)"
else
    note "kernel_bench: no $bin/kernel_bench"
fi
step "PyTorch peers"
if [ "$emulated" = 1 ]; then
    note "peers: skipped on the emulated GPU"
elif ! command -v python3 >/dev/null 2>&1; then
    note "peers: no python3"
else
    for s in "bench_moe_torch.py $iters" "bench_logprob_torch.py 3" "bench_sdpa.py $iters"; do
        rc=0
        timeout 60 python3 scripts/$s >"$out/peer-${s%% *}.txt" 2>&1 || rc=$?
        tail -15 "$out/peer-${s%% *}.txt"
        note "peer ${s%% *}: $([ "$rc" = 0 ] && echo done || echo "exit $rc")"
    done
fi

# ---- 5b. training: aha bench train on the GPU (bf16) next to PyTorch's
# step on the same configs, and the quick demo on the GPU next to the CPU.
step "training and rollout benchmarks and the demo on the GPU"
if [ "$emulated" = 1 ]; then
    note "training: skipped on the emulated GPU (crates/trainer/tests/gpu_demo.rs runs a shortened demo there)"
elif [ -x "$bin/aha" ]; then
    for c in qwen2.5-1.5b:8:1024 qwen3-moe-gpu-bench:8:1024; do
        IFS=: read -r name b t <<<"$c"
        cfgf="tests/fixtures/bench-configs/$name.json"
        rc=0
        timeout 90 "$bin/aha" bench train --config "$cfgf" --device cuda --precision bf16 --batch "$b" --seq "$t" \
            --steps 3 >"$out/train-$name.json" 2>"$out/logs/train-$name.log" || rc=$?
        note "aha bench train $name bf16: $([ "$rc" = 0 ] && cat "$out/train-$name.json" || echo "exit $rc")"
        if command -v python3 >/dev/null 2>&1; then
            rc=0
            timeout 90 python3 scripts/bench_train_torch.py "$cfgf" "$b" "$t" 3 >"$out/peer-train-$name.json" 2>&1 || rc=$?
            note "torch train $name: $([ "$rc" = 0 ] && tail -1 "$out/peer-train-$name.json" || echo "exit $rc")"
        fi
    done
    # Optimizer offload and LoRA on the 1.5B config: tokens/s, and for
    # offload the optimizer step's split (copies, host AdamW, exposed,
    # overlap fraction) in the line's "offload" object.
    for mode in offload:--offload-optimizer lora:--lora; do
        IFS=: read -r name flag <<<"$mode"
        cfgf=tests/fixtures/bench-configs/qwen2.5-1.5b.json
        rc=0
        timeout 120 "$bin/aha" bench train --config "$cfgf" --device cuda --precision bf16 --batch 8 --seq 1024 \
            --steps 3 "$flag" >"$out/train-qwen2.5-1.5b-$name.json" 2>"$out/logs/train-$name.log" || rc=$?
        note "aha bench train qwen2.5-1.5b bf16 $flag: $([ "$rc" = 0 ] && cat "$out/train-qwen2.5-1.5b-$name.json" || echo "exit $rc")"
    done
    # Step time without and with the optimizer offload on a small config
    # (qwen2-dense-bench, batch 4 x 512): device AdamW, offload with the
    # gradients copied after the backward, offload with each layer's
    # gradients streamed to the host during the backward. The "offload"
    # object splits the step: copy_during_backward_ms (hidden behind the
    # backward), copy_wait_after_backward_ms (exposed), cpu_adamw_ms,
    # upload_ms.
    for mode in device: offload-after:--no-stream-grads offload-streamed:; do
        IFS=: read -r name extra <<<"$mode"
        flags=()
        [ "$name" != device ] && flags+=(--offload-optimizer)
        [ -n "$extra" ] && flags+=("$extra")
        cfgf=tests/fixtures/bench-configs/qwen2-dense-bench.json
        rc=0
        timeout 120 "$bin/aha" bench train --config "$cfgf" --device cuda --precision bf16 --batch 4 --seq 512 \
            --steps 3 ${flags[@]+"${flags[@]}"} >"$out/train-small-$name.json" 2>"$out/logs/train-small-$name.log" || rc=$?
        note "aha bench train qwen2-dense-bench bf16 $name: $([ "$rc" = 0 ] && cat "$out/train-small-$name.json" || echo "exit $rc")"
    done
    # Rollouts: aha's GPU engine (paged bf16 KV cache) at batch 64 and 256,
    # 512-token prompts, 1,024 new tokens, next to transformers' generate;
    # aha's line carries the fraction of the memory-bandwidth bound.
    for b in 64 256; do
        cfgf=tests/fixtures/bench-configs/qwen2.5-1.5b.json
        rc=0
        timeout 120 "$bin/aha" bench generate --config "$cfgf" --device cuda --precision bf16 --batch "$b" \
            --prompt 512 --new 1024 >"$out/generate-$b.json" 2>"$out/logs/generate-$b.log" || rc=$?
        note "aha bench generate qwen2.5-1.5b b$b: $([ "$rc" = 0 ] && cat "$out/generate-$b.json" || echo "exit $rc")"
        if command -v python3 >/dev/null 2>&1; then
            rc=0
            timeout 120 python3 scripts/bench_generate_torch.py "$cfgf" "$b" 512 1024 >"$out/peer-generate-$b.json" 2>&1 || rc=$?
            note "torch generate b$b: $([ "$rc" = 0 ] && tail -1 "$out/peer-generate-$b.json" || echo "exit $rc")"
        fi
    done
    # What the decode graphs save: batch 64 again with every step eager.
    rc=0
    timeout 120 "$bin/aha" bench generate --config tests/fixtures/bench-configs/qwen2.5-1.5b.json --device cuda \
        --precision bf16 --batch 64 --prompt 512 --new 1024 --no-cuda-graphs >"$out/generate-64-eager.json" \
        2>"$out/logs/generate-64-eager.log" || rc=$?
    note "aha bench generate qwen2.5-1.5b b64 --no-cuda-graphs: $([ "$rc" = 0 ] && cat "$out/generate-64-eager.json" || echo "exit $rc")"
    # The CPU's numbers for the same seed are in the trainer README.
    rc=0
    timeout 120 "$bin/aha" demo --quick --device cuda --out "$out/demo-cuda" >"$out/demo-cuda.json" \
        2>"$out/logs/demo-cuda.log" || rc=$?
    note "aha demo --quick --device cuda: $([ "$rc" = 0 ] && cat "$out/demo-cuda.json" || echo "exit $rc")"
else
    note "training: no $bin/aha"
fi

# ---- 6. summary
cached_after="$(ls "$AHA_KERNEL_CACHE" | sort)"
misses="$(comm -13 <(echo "$cached_before") <(echo "$cached_after") | grep -c . || true)"
note "kernel cache misses (compiled here): $misses"
step "summary ($((SECONDS - start_all)) s, folder $out)"
grep -v '^$' "$summary"
if [ "$failed" -gt 0 ]; then
    echo "failed tests:"
    grep -o '"name": "[^"]*", "status": "fail"' "$json" | sed 's/"name": "\([^"]*\)".*/  \1/'
    exit 1
fi
exit 0
