#!/usr/bin/env python3
"""The peer for the fused lm-head log-prob rows of kernel_bench: PyTorch on
the same GPU at N = 16,384 tokens, C = 2,048, V = 151,936.

  naive:     logits = h @ W.T; logp = log_softmax(logits / T).gather(target),
             forward, and forward + backward to h and W (autograd), in f32
             and bf16, with the peak memory the step allocated;
  selective: TRL's selective_log_softmax idea on given logits (logsumexp
             row by row for f32, log_softmax row by row for bf16), the
             number the ">= 2x" goal is measured against.

Prints one table in the kernel_bench format. Run by scripts/gpu-check.sh;
needs torch with CUDA (the device image has it).
"""
import sys
import time

try:
    import torch
except ImportError:
    print("bench_logprob_torch: skipped: torch is not installed")
    sys.exit(0)

if not torch.cuda.is_available():
    print("bench_logprob_torch: skipped: no GPU")
    sys.exit(0)

N, C, V = 16_384, 2_048, 151_936
ITERS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
dev = torch.device("cuda")


def timed(fn):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(ITERS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / ITERS


def row(name, shape, secs, tflop, mem):
    print(f"| {name:<22} | {shape:<28} | {secs * 1e3:>11.2f} | {tflop / secs:>9.1f} | {mem / 1e6:>6.0f} MB |")


def per_row_lse(logits):
    # one row at a time, as TRL does to avoid a second [N, V] buffer
    return torch.stack([torch.logsumexp(r, dim=-1) for r in logits])


def selective_f32(logits, index):
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - per_row_lse(logits)


def selective_bf16(logits, index):
    out = []
    for r, i in zip(logits, index):
        out.append(torch.log_softmax(r, dim=-1).gather(-1, i.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {ITERS} iterations per row")
print("| torch peer             | N x C x V                    |   time (ms) |   TFLOP/s | peak mem |")
print("|---|---|---:|---:|---:|")
flops = 2.0 * N * C * V / 1e12
target = torch.randint(0, V, (N,), device=dev)
for dtype in (torch.float32, torch.bfloat16):
    name = "f32" if dtype == torch.float32 else "bf16"
    try:
        h = (torch.randn(N, C, device=dev) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(V, C, device=dev) * 0.02).to(dtype).requires_grad_()

        def fwd():
            with torch.no_grad():
                x = (h @ w.T).float()
                return x.log_softmax(-1).gather(-1, target.unsqueeze(-1))

        def fwd_bwd():
            x = (h @ w.T).float()
            lp = x.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            lp.sum().backward()
            h.grad = None
            w.grad = None

        for label, fn, mult in (("naive fwd", fwd, 1.0), ("naive fwd + bwd", fwd_bwd, 3.0)):
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            secs = timed(fn)
            peak = torch.cuda.max_memory_allocated() - base
            row(f"{label} {name}", f"{N} x {C} x {V}", secs, mult * flops, peak)
        del h, w
    except torch.cuda.OutOfMemoryError as e:
        print(f"| naive {name} | out of memory: {str(e).splitlines()[0]} |")
    torch.cuda.empty_cache()

for dtype, fn in ((torch.float32, selective_f32), (torch.bfloat16, selective_bf16)):
    name = "f32" if dtype == torch.float32 else "bf16"
    n = 4_096
    logits = torch.randn(n, V, device=dev).to(dtype)
    idx = target[:n]
    secs = timed(lambda: fn(logits, idx))
    gbs = logits.numel() * logits.element_size() / secs / 1e9
    print(f"(selective_log_softmax {name}, {n} x {V} given logits: {secs * 1e3:.2f} ms, {gbs:.0f} GB/s of logits read)")
    del logits
    torch.cuda.empty_cache()
