#!/usr/bin/env python3
"""aha against PyTorch + transformers on the CPU: the training step and
generation, each measured three times, alternating with aha's own
benchmark, then the medians and the ratios.

    pip install torch transformers        # the peer (the CPU wheel is enough)
    cargo build --release --bin aha
    python3 scripts/bench_cpu_peers.py [--rounds 3] [--only train|generate]
                                       [--precision f32|bf16] [--steps 5]
                                       [--configs A.json,B.json] [--gen-config C.json]

What each side runs (both on every core of the machine, one process per
measurement, so neither inherits the other's warm caches or allocator):

- train: `aha bench train --config C --batch 8 --seq 256 --steps S` against
  transformers' model of the same config, randomly initialised, f32: the
  logits, TRL's selective log-softmax of the next tokens, the mean negative
  log-likelihood, backward, gradient clipping at 1.0, AdamW; one untimed
  step first, then S timed steps. `--precision bf16` runs the peer's
  forward under `torch.autocast("cpu", dtype=torch.bfloat16)` and passes
  `--precision bf16` to aha.
- generate: `aha bench generate --config C --batch 16 --prompt 32 --new 64`
  against `model.generate` with the same batch, prompt and new tokens,
  sampling at temperature 1 and top-p 0.95, no end-of-sequence stop.

The config defaults are the bench configs beside the repository
(`../shared/bench-configs/qwen3-moe-bench.json` and
`qwen2-dense-bench.json`). Prints one line per measurement and a table of
medians; the ratio is aha's median tokens/s over the peer's. A missing
torch or transformers prints one line saying so and exits 0.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(os.path.dirname(ROOT), "shared", "bench-configs")


def peer_train(config, batch, seq, steps, precision):
    """One peer measurement of the training step; returns its JSON dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def selective_log_softmax(logits, index):
        # TRL's f32 path: the chosen logit minus the row's logsumexp.
        chosen = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return chosen - lse

    def step():
        opt.zero_grad(set_to_none=True)
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits[:, :-1, :]
            logits = logits.float()
        else:
            logits = model(input_ids=ids).logits[:, :-1, :]
        logp = selective_log_softmax(logits, ids[:, 1:])
        loss = -logp.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    secs = time.perf_counter() - t0
    return {
        "bench": "train_peer",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "tokens_per_s": batch * seq * steps / secs,
        "step_ms": secs * 1e3 / steps,
        "loss_last": loss,
    }


def peer_generate(config, batch, prompt, new, precision):
    """One peer measurement of generation; returns its JSON dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt))
    mask = torch.ones_like(ids)
    kw = dict(
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.no_grad():
        model.generate(ids[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2, "attention_mask": mask[:1]})
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
    secs = time.perf_counter() - t0
    return {
        "bench": "generate_peer",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "tokens_per_s": (out.shape[1] - prompt) * batch / secs,
        "total_s": secs,
    }


def last_json(text):
    """The last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        try:
            v = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(v, dict):
            return v
    raise RuntimeError(f"no JSON line in:\n{text}")


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.strip()[-2000:]}")
    return last_json(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["train", "generate"])
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument(
        "--configs",
        default=",".join(os.path.join(CONFIGS, f) for f in ["qwen3-moe-bench.json", "qwen2-dense-bench.json"]),
        help="comma-separated configs of the training benchmark",
    )
    ap.add_argument("--gen-config", default=os.path.join(CONFIGS, "qwen3-moe-bench.json"))
    ap.add_argument("--aha", default=os.path.join(ROOT, "target", "release", "aha"))
    # Internal: one peer measurement in this process (what the rounds spawn).
    ap.add_argument("--peer", choices=["train", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args()

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"bench_cpu_peers: skipped: torch or transformers is not installed ({e})")
        return 0

    if a.peer == "train":
        print(json.dumps(peer_train(a.config, a.batch, a.seq, a.steps, a.precision)))
        return 0
    if a.peer == "generate":
        print(json.dumps(peer_generate(a.config, a.gen_batch, a.prompt, a.new, a.precision)))
        return 0

    if not os.path.exists(a.aha):
        print(f"bench_cpu_peers: {a.aha} not found: run `cargo build --release --bin aha` first")
        return 1
    me = [sys.executable, os.path.abspath(__file__), "--precision", a.precision]
    cases = []  # (name, aha command, peer command)
    if a.only in (None, "train"):
        for cfg in a.configs.split(","):
            name = "train " + os.path.basename(cfg).removesuffix(".json")
            sizes = ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps)]
            aha = [a.aha, "bench", "train", "--config", cfg, *sizes, "--device", "cpu", "--precision", a.precision]
            peer = [*me, "--peer", "train", "--config", cfg, *sizes]
            cases.append((name, aha, peer))
    if a.only in (None, "generate"):
        cfg = a.gen_config
        name = "generate " + os.path.basename(cfg).removesuffix(".json")
        aha = [a.aha, "bench", "generate", "--config", cfg, "--batch", str(a.gen_batch)]
        aha += ["--prompt", str(a.prompt), "--new", str(a.new), "--device", "cpu", "--precision", a.precision]
        peer = [*me, "--peer", "generate", "--config", cfg, "--gen-batch", str(a.gen_batch)]
        peer += ["--prompt", str(a.prompt), "--new", str(a.new)]
        cases.append((name, aha, peer))

    results = {name: {"aha": [], "peer": []} for name, _, _ in cases}
    peer_version = ""
    for r in range(a.rounds):
        for name, aha, peer in cases:
            for side, cmd in (("aha", aha), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("aha", aha)):
                v = run(cmd)
                results[name][side].append(v["tokens_per_s"])
                peer_version = v.get("torch", peer_version)
                print(f"round {r + 1} {name:32} {side:4} {v['tokens_per_s']:9.0f} tok/s", flush=True)

    print()
    print(f"precision {a.precision}; peer: torch {peer_version}; medians of {a.rounds} rounds")
    print(f"| {'case':32} | {'aha tok/s':>10} | {'peer tok/s':>10} | {'aha / peer':>10} |")
    print(f"| {'-' * 32} | {'-' * 10} | {'-' * 10} | {'-' * 10} |")
    for name, _, _ in cases:
        ah = statistics.median(results[name]["aha"])
        pe = statistics.median(results[name]["peer"])
        print(f"| {name:32} | {ah:10.0f} | {pe:10.0f} | {ah / pe:10.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
