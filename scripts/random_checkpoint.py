#!/usr/bin/env python3
"""Writes a Qwen2/Llama-shaped Hugging Face folder with random bf16 weights,
sharded as the hub ships them, without holding more than one tensor in
memory: the input of the load-memory measurement in
crates/moe-model/README.md. Needs numpy only.

  python3 scripts/random_checkpoint.py tests/fixtures/bench-configs/qwen2.5-1.5b.json /tmp/q15 [--shard-gb 2]
"""
import json, os, shutil, struct, sys

import numpy as np


def shapes(c):
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim", h // heads)
    bias = c["model_type"] == "qwen2"
    out = [("model.embed_tokens.weight", [v, h])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h])]
        for n, rows in [("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)]:
            out.append((p + f"self_attn.{n}.weight", [rows, h]))
            if bias:
                out.append((p + f"self_attn.{n}.bias", [rows]))
        out.append((p + "self_attn.o_proj.weight", [h, heads * d]))
        out += [(p + "mlp.gate_proj.weight", [f, h]), (p + "mlp.up_proj.weight", [f, h]), (p + "mlp.down_proj.weight", [h, f])]
    out.append(("model.norm.weight", [h]))
    if not c.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", [v, h]))
    return out


def bf16_bytes(rng, name, shape):
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        x = np.ones(n, dtype=np.float32)
    else:
        x = rng.standard_normal(n, dtype=np.float32) * 0.02
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def main():
    cfg_path, out = sys.argv[1], sys.argv[2]
    shard = int(float(sys.argv[4]) * 2**30) if len(sys.argv) > 4 and sys.argv[3] == "--shard-gb" else 2 << 30
    c = json.load(open(cfg_path))
    os.makedirs(out, exist_ok=True)
    shutil.copy(cfg_path, os.path.join(out, "config.json"))
    groups, size = [[]], 0
    for name, shape in shapes(c):
        nb = int(np.prod(shape)) * 2
        if size and size + nb > shard:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nb
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in g:
            nb = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, shape in g:
                f.write(bf16_bytes(rng, name, shape))
        total += off
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    print(f"{out}: {len(weight_map)} tensors, {total / 2**30:.2f} GiB in {len(groups)} shards")


if __name__ == "__main__":
    main()
