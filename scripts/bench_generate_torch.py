#!/usr/bin/env python3
"""The peer of `aha bench generate --device cuda --precision bf16`:
transformers' `generate` on randomly initialised bf16 weights of the same
config, the same batch, prompt length and new tokens (every sequence runs
to the end: no EOS, `min_new_tokens` = `max_new_tokens`), sampling at
temperature 1 with top-p 0.95 as aha's benchmark does.

    python3 scripts/bench_generate_torch.py CONFIG.json [BATCH PROMPT NEW]

Prints one JSON line with tokens/s (the fields of aha's bench line), so
scripts/gpu-check.sh can put both side by side. A missing package or GPU
prints one line saying so and exits 0.
"""
import json
import sys
import time

try:
    import torch
except ImportError:
    print("bench_generate_torch: skipped: torch is not installed")
    sys.exit(0)
try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as e:
    print(f"bench_generate_torch: skipped: transformers is not installed ({e})")
    sys.exit(0)

if not torch.cuda.is_available():
    print("bench_generate_torch: skipped: no GPU")
    sys.exit(0)

if len(sys.argv) < 2:
    print("usage: bench_generate_torch.py CONFIG.json [BATCH PROMPT NEW]")
    sys.exit(2)
config_path = sys.argv[1]
B = int(sys.argv[2]) if len(sys.argv) > 2 else 64
P = int(sys.argv[3]) if len(sys.argv) > 3 else 512
N = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
dev = torch.device("cuda")

cfg = AutoConfig.from_pretrained(config_path)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).to(dev).eval()
ids = torch.randint(0, cfg.vocab_size, (B, P), device=dev)
mask = torch.ones_like(ids)
kw = dict(
    attention_mask=mask,
    do_sample=True,
    temperature=1.0,
    top_p=0.95,
    max_new_tokens=N,
    min_new_tokens=N,
    pad_token_id=0,
    eos_token_id=None,
)
with torch.no_grad():
    model.generate(ids[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2, "attention_mask": mask[:1]})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
secs = time.perf_counter() - t0
generated = (out.shape[1] - P) * B
print(
    json.dumps(
        {
            "bench": "generate_torch",
            "config": config_path,
            "batch": B,
            "prompt": P,
            "new": N,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0),
            "tokens_per_s": generated / secs,
            "total_s": secs,
        }
    )
)
