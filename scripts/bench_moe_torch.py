#!/usr/bin/env python3
"""The peer for the MoE rows of kernel_bench: transformers'
Qwen3-MoE sparse block (Qwen3MoeSparseMoeBlock: softmax top-k router, a
Python loop over the experts that got tokens, index_add_ combine) in bf16
on the same GPU, at the first kernel_bench MoE shape: N = 4096 tokens,
C = 2048, 128 experts, top-8, expert width 768, norm_topk_prob = True.

Times the forward, and forward + backward (autograd to the input and every
weight), and prints rows in the kernel_bench format. Run by
scripts/gpu-check.sh after kernel_bench; a missing package or GPU prints
one line saying so and exits 0. Run status: docs/gpu-verification.md.
"""
import sys
import time

try:
    import torch
except ImportError:
    print("bench_moe_torch: skipped: torch is not installed")
    sys.exit(0)
try:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
except ImportError as e:
    print(f"bench_moe_torch: skipped: transformers with Qwen3-MoE is not installed ({e})")
    sys.exit(0)

if not torch.cuda.is_available():
    print("bench_moe_torch: skipped: no GPU")
    sys.exit(0)

N, C, E, K, F = 4096, 2048, 128, 8, 768
ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
dev = torch.device("cuda")


def timed(fn):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(ITERS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / ITERS


def main():
    cfg = Qwen3MoeConfig(
        hidden_size=C,
        moe_intermediate_size=F,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(cfg).to(device=dev, dtype=torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=C**-0.5)
    x = torch.randn(1, N, C, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(1, N, C, device=dev, dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            out = block(x)
        return out[0] if isinstance(out, tuple) else out

    def fwd_bwd():
        xr = x.detach().requires_grad_(True)
        out = block(xr)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(dy)
        block.zero_grad(set_to_none=True)

    flops = 2.0 * (3 * N * K * C * F + N * C * E)
    shape = f"qwen3-30b-a3b N {N} E {E} K {K}"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {ITERS} iterations")
    print("| transformers MoE (bf16) | shape                        |  time (us) |   TFLOP/s | of 800 |")
    print("|---|---|---:|---:|---:|")
    for name, fn, fl in [("sparse block forward", fwd, flops), ("sparse block fwd+bwd", fwd_bwd, 3.0 * flops)]:
        secs = timed(fn)
        tf = fl / secs / 1e12
        print(f"| {name:<23} | {shape:<28} | {secs * 1e6:>10.1f} | {tf:>9.1f} | {100 * tf / 800:>5.1f}% |")


if __name__ == "__main__":
    main()
