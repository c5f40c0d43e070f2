#!/usr/bin/env python3
"""The peer for the flash-attention rows of kernel_bench: PyTorch's
scaled_dot_product_attention with the flash backend only, on the same GPU
and shapes: bf16, D = 128, causal, 16 heads, 16,384 tokens a call as
16384 / T sequences of T, T = 1k .. 16k. Forward, and backward alone
(forward + backward minus forward), in TFLOP/s of causal work (forward
2 * 2 * B * H * T^2 * D / 2, backward 2.5 times that), the same table
format as kernel_bench.

Run by scripts/gpu-check.sh after kernel_bench; prints one "skipped" line
and exits 0 where torch, CUDA or the flash backend is missing.
  python3 scripts/bench_sdpa.py [ITERS]
"""
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("bench_sdpa: skipped: torch is not installed")
    sys.exit(0)

if not torch.cuda.is_available():
    print("bench_sdpa: skipped: no GPU")
    sys.exit(0)

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash_only():
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
except ImportError:  # torch < 2.3

    def flash_only():
        return torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)


H, D, TOKENS = 16, 128, 16_384
ITERS = max(1, min(int(sys.argv[1]) if len(sys.argv) > 1 else 10, 10))
dev = torch.device("cuda")


def timed(fn):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(ITERS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / ITERS


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {ITERS} iterations per row")
    print("| flash attention (SDPA) | B x T, H 16, D 128, causal   |   time (ms) |   TFLOP/s |")
    print("|---|---|---:|---:|")
    for t in [1024, 2048, 4096, 8192, 16_384]:
        b = TOKENS // t
        q, k, v = (torch.randn(b, H, t, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, H, t, D, device=dev, dtype=torch.bfloat16)
        flops = 2 * 2 * b * H * t * t * D / 2
        shape = f"{b} x {t}"
        try:
            with flash_only():

                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def fwd_bwd():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    torch.autograd.grad(o, (q, k, v), dout)

                f = timed(fwd)
                fb = timed(fwd_bwd)
        except RuntimeError as e:
            print(f"bench_sdpa: skipped T {t}: the flash backend refused ({e})")
            continue
        print(f"| {'fwd':<22} | {shape:<28} | {f * 1e3:>11.2f} | {flops / f / 1e12:>9.1f} |")
        bwd = max(fb - f, 1e-9)
        print(f"| {'bwd':<22} | {shape:<28} | {bwd * 1e3:>11.2f} | {2.5 * flops / bwd / 1e12:>9.1f} |")
        del q, k, v, dout
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
