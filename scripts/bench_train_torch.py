#!/usr/bin/env python3
"""The peer of `aha bench train --device cuda --precision bf16`: one training
step in PyTorch + transformers the way TRL's GRPOTrainer takes it (bf16
autocast, the logits of completion positions through a selective
log-softmax, d loss / d log-prob, backward, gradient clipping at 1.0,
AdamW), on randomly initialised weights of the same config.

    python3 scripts/bench_train_torch.py CONFIG.json [BATCH SEQ STEPS]

Prints one JSON line with tokens/s (the same fields as aha's bench line),
so scripts/gpu-check.sh can put both side by side. A missing package or
GPU prints one line saying so and exits 0.
"""
import json
import sys
import time

try:
    import torch
except ImportError:
    print("bench_train_torch: skipped: torch is not installed")
    sys.exit(0)
try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as e:
    print(f"bench_train_torch: skipped: transformers is not installed ({e})")
    sys.exit(0)

if not torch.cuda.is_available():
    print("bench_train_torch: skipped: no GPU")
    sys.exit(0)

if len(sys.argv) < 2:
    print("usage: bench_train_torch.py CONFIG.json [BATCH SEQ STEPS]")
    sys.exit(2)
config_path = sys.argv[1]
B = int(sys.argv[2]) if len(sys.argv) > 2 else 8
T = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
STEPS = int(sys.argv[4]) if len(sys.argv) > 4 else 5
dev = torch.device("cuda")

cfg = AutoConfig.from_pretrained(config_path)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).to(dev)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)


def selective_log_softmax(logits, index):
    # TRL's memory-frugal form: logsumexp row by row, then gather.
    out = []
    for row_logits, row_index in zip(logits, index):
        lp = row_logits.float().log_softmax(dim=-1)
        out.append(lp.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits[:, :-1, :]
    logp = selective_log_softmax(logits, ids[:, 1:])
    loss = -logp.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(STEPS):
    loss = step()
torch.cuda.synchronize()
secs = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
print(
    json.dumps(
        {
            "bench": "train_torch",
            "config": config_path,
            "params": params,
            "batch": B,
            "seq": T,
            "steps": STEPS,
            "tokens_per_s": B * T * STEPS / secs,
            "step_ms": secs * 1e3 / STEPS,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
            "loss_last": loss,
        }
    )
)
