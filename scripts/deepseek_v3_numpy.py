#!/usr/bin/env python3
"""An independent float64 numpy forward of a DeepSeek-V3 model folder (MLA
with interleaved RoPE, YaRN, sigmoid group-limited routing with the
correction bias, shared experts), written from the transformers modelling
code, with FP8 block-quantized weights dequantized as w = q x scale_inv.

It prints the largest |logit difference| against the folder's
reference.safetensors (transformers' logits), and with --write PATH saves
its own logits for the reference's input_ids: the second reference of
tests/fixtures/models/deepseek-v3-fp8-tiny (see crates/moe-model/README.md).
With --noise SCALE it also reports how far logits move when every FP8
weight moves uniformly within SCALE x its e4m3 rounding interval. Needs
numpy and safetensors.

  python3 scripts/deepseek_v3_numpy.py tests/fixtures/models/deepseek-v3-fp8-tiny [--write out.safetensors] [--noise 1.0]
"""
import json, math, struct, sys

import numpy as np
from safetensors.numpy import load_file, save_file


def read_raw(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def e4m3(b):
    """float8_e4m3fn bytes to float64: bias 7, subnormals, S.1111.111 NaN."""
    b = np.frombuffer(b, dtype=np.uint8).astype(np.int64)
    s = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 15, b & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7))
    return s * np.where((e == 15) & (m == 7), np.nan, v)


def weights(folder):
    raw, out, fp8 = read_raw(folder + "/model.safetensors"), {}, {}
    for k, (dt, shape, b) in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if dt == "F8_E4M3":
            q = e4m3(b).reshape(shape)
            sdt, sshape, sb = raw[k + "_scale_inv"]
            assert sdt == "F32" and sshape == [-(-shape[0] // 128), -(-shape[1] // 128)], k
            s = np.frombuffer(sb, dtype=np.float32).reshape(sshape).astype(np.float64)
            full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:shape[0], :shape[1]]
            out[k], fp8[k] = q * full, (q, full)
        else:
            assert dt == "F32", (k, dt)
            out[k] = np.frombuffer(b, dtype=np.float32).reshape(shape).astype(np.float64)
    return out, fp8


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1 + np.exp(-x))


def rope_tables(cfg, t):
    """cos, sin [t, d] and the softmax-scale multiplier (transformers' YaRN)."""
    rp, dim = cfg["rope_parameters"], cfg["qk_rope_head_dim"]
    base = rp["rope_theta"]
    pf = base ** (np.arange(0, dim, 2) / dim)
    inv, attn_factor, mult = 1.0 / pf, 1.0, 1.0
    if rp.get("rope_type", "default") == "yarn":
        omax = rp["original_max_position_embeddings"]
        factor = cfg["max_position_embeddings"] / omax

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attn_factor = mscale(factor, rp["mscale"]) / mscale(factor, rp["mscale_all_dim"])

        def corr(n):
            return dim * math.log(omax / (n * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = max(math.floor(corr(rp["beta_fast"])), 0), min(math.ceil(corr(rp["beta_slow"])), dim - 1)
        ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo if hi > lo else 0.001), 0, 1)
        inv = (1 / (factor * pf)) * ramp + (1 / pf) * (1 - ramp)
        mult = mscale(factor, rp["mscale_all_dim"]) ** 2
    f = np.outer(np.arange(t), inv)
    e = np.concatenate([f, f], -1)
    return np.cos(e) * attn_factor, np.sin(e) * attn_factor, mult


def rope(x, cos, sin):
    """Interleaved pairs, de-interleaved then rotated, as transformers does."""
    b, h, t, d = x.shape
    x = x.reshape(b, h, t, d // 2, 2).transpose(0, 1, 2, 4, 3).reshape(b, h, t, d)
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def forward(cfg, w, ids):
    b, t = ids.shape
    heads, eps = cfg["num_attention_heads"], cfg["rms_norm_eps"]
    dn, dr, dv, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    cos, sin, mult = rope_tables(cfg, t)
    scale = (dn + dr) ** -0.5 * mult

    def mlp(p, x):
        return (silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T

    h = w["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = p + "self_attn."
        x = rmsnorm(h, w[p + "input_layernorm.weight"], eps)
        q = rmsnorm(x @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], eps) @ w[a + "q_b_proj.weight"].T
        q = q.reshape(b, t, heads, dn + dr).transpose(0, 2, 1, 3)
        ckv = x @ w[a + "kv_a_proj_with_mqa.weight"].T
        kv = rmsnorm(ckv[..., :r], w[a + "kv_a_layernorm.weight"], eps) @ w[a + "kv_b_proj.weight"].T
        kv = kv.reshape(b, t, heads, dn + dv).transpose(0, 2, 1, 3)
        kpe = rope(ckv[..., r:].reshape(b, 1, t, dr), cos, sin)
        qs = np.concatenate([q[..., :dn], rope(q[..., dn:], cos, sin)], -1)
        ks = np.concatenate([kv[..., :dn], np.broadcast_to(kpe, (b, heads, t, dr))], -1)
        s = qs @ ks.transpose(0, 1, 3, 2) * scale + np.triu(np.full((t, t), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ kv[..., dn:]).transpose(0, 2, 1, 3).reshape(b, t, heads * dv)
        h = h + o @ w[a + "o_proj.weight"].T
        x = rmsnorm(h, w[p + "post_attention_layernorm.weight"], eps)
        if l < cfg["first_k_dense_replace"]:
            h = h + mlp(p + "mlp.", x)
            continue
        e, g, k = cfg["n_routed_experts"], cfg["n_group"], cfg["num_experts_per_tok"]
        xs = x.reshape(-1, x.shape[-1])
        score = 1 / (1 + np.exp(-(xs @ w[p + "mlp.gate.weight"].T)))
        choice = score + w[p + "mlp.gate.e_score_correction_bias"]
        group = np.sort(choice.reshape(-1, g, e // g), -1)[..., -2:].sum(-1)
        out = np.zeros_like(xs)
        for n in range(xs.shape[0]):
            keep = np.zeros(e, dtype=bool)
            for gi in np.argsort(-group[n], kind="stable")[:cfg["topk_group"]]:
                keep[gi * (e // g):(gi + 1) * (e // g)] = True
            top = np.argsort(-np.where(keep, choice[n], 0.0), kind="stable")[:k]
            wt = score[n, top]
            if cfg["norm_topk_prob"]:
                wt = wt / (wt.sum() + 1e-20)
            for ex, we in zip(top, wt * cfg["routed_scaling_factor"]):
                out[n] += we * mlp(p + f"mlp.experts.{ex}.", xs[n:n + 1])[0]
        h = h + out.reshape(x.shape) + mlp(p + "mlp.shared_experts.", x)
    return rmsnorm(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def main():
    folder = sys.argv[1]
    opts = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    cfg = json.load(open(folder + "/config.json"))
    ref = load_file(folder + "/reference.safetensors")
    w, fp8 = weights(folder)
    ids = ref["input_ids"]
    logits = forward(cfg, w, ids)
    print(f"{folder}: max |numpy - reference logits| = {np.abs(logits - ref['logits']).max():.3e}")
    if "--noise" in opts:
        grid = np.unique(np.abs(e4m3(bytes(range(256)))))
        grid = grid[np.isfinite(grid)]
        rng, moved = np.random.default_rng(0), dict(w)
        for k, (q, full) in fp8.items():
            i = np.searchsorted(grid, np.abs(q))
            gap = grid[np.clip(i + 1, 0, len(grid) - 1)] - grid[np.clip(i - 1, 0, None)]
            moved[k] = (q + float(opts["--noise"]) * rng.uniform(-0.25, 0.25, q.shape) * gap) * full
        d = forward(cfg, moved, ids) - logits
        print(f"FP8 weights moved within {opts['--noise']} x their rounding interval: logits move max {np.abs(d).max():.3f}, std {d.std():.4f}")
    if "--write" in opts:
        save_file({"logits": logits.astype(np.float32)}, opts["--write"], metadata={"format": "pt"})


if __name__ == "__main__":
    main()
