//! The memory plan against hand arithmetic for three real model shapes on
//! an 80 GB GPU: Qwen2.5-1.5B and Qwen2.5-7B (dense) and Qwen3-30B-A3B
//! (128 experts, top-8), and the refusal of a run that cannot fit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use aha_moe_model::memory::{memory_plan, Workload};
use aha_moe_model::{ModelConfig, Precision};

const GB80: u64 = 80_000_000_000;

fn cfg(json: &str) -> ModelConfig {
    ModelConfig::from_json_str(json, Path::new("config.json")).unwrap()
}

fn qwen25(hidden: u64, inter: u64, heads: u64, kv: u64, vocab: u64, tied: bool) -> ModelConfig {
    cfg(&format!(
        r#"{{"model_type": "qwen2", "vocab_size": {vocab}, "hidden_size": {hidden}, "intermediate_size": {inter},
        "num_hidden_layers": 28, "num_attention_heads": {heads}, "num_key_value_heads": {kv},
        "max_position_embeddings": 32768, "tie_word_embeddings": {tied}}}"#
    ))
}

/// Parameters of a Qwen2 model written out: embedding, per layer q/k/v
/// (with biases), o, two norms, the MLP, the final norm, the head if untied.
fn qwen2_params(c: u64, f: u64, h: u64, kv: u64, v: u64, layers: u64, tied: bool) -> u64 {
    let d = c / h;
    let attn = c * h * d + h * d + 2 * (c * kv * d + kv * d) + h * d * c;
    let layer = attn + 2 * c + 3 * c * f;
    v * c + layers * layer + c + if tied { 0 } else { v * c }
}

#[test]
fn qwen25_1_5b_fits_80gb_with_room_for_activations() {
    let m = qwen25(1536, 8960, 12, 2, 151_936, true);
    let p = qwen2_params(1536, 8960, 12, 2, 151_936, 28, true);
    assert_eq!(p, 1_543_714_304, "Qwen2.5-1.5B has 1.54B parameters");
    let w = Workload {
        tokens: 4096,
        scored: 2048,
        kv_tokens: 0,
        training: true,
        recompute: false,
    };
    let plan = memory_plan(&m, Precision::Bf16, &w);
    assert_eq!(plan.params as u64, p);
    // 4 + 2 + 4 + 8 = 18 bytes a parameter: 27.8 GB.
    assert_eq!(plan.weights + plan.weights_bf16 + plan.grads + plan.moments, 18 * p);
    // Saved per token per layer (f32): x_in, ln1, x_mid, ln2 (4 x 1536) and
    // 2 rstds; q and q before RoPE (2 x 1536), k, k before RoPE and v
    // (3 x 256), attention output 1536, lse 12; gate, up, act (3 x 8960):
    // 4 x (6144 + 2 + 3072 + 768 + 1536 + 12 + 26880) = 153,656 bytes; 28
    // layers and the final norm (2 x 1536 + 1 floats).
    let per_token = 28 * 153_656 + 4 * (2 * 1536 + 1);
    assert_eq!(plan.activations, per_token * 4096);
    assert!(plan.total() < GB80, "{plan}");
    assert!(plan.check(GB80, "an 80 GB GPU").is_ok());
    eprintln!("Qwen2.5-1.5B bf16, 4k tokens: {plan}");
    // 16k tokens in one forward keep 70.7 GB of activations: refused, which
    // is what micro-batches are for.
    let big = memory_plan(&m, Precision::Bf16, &Workload { tokens: 16_384, ..w });
    assert_eq!(big.activations, per_token * 16_384);
    assert!(big.check(GB80, "an 80 GB GPU").is_err(), "{big}");
    // With recomputation: 28 layer inputs (4 x 1536 bytes) and the final
    // norm's buffers per token, plus one layer's activations: 16k tokens fit.
    let re = memory_plan(
        &m,
        Precision::Bf16,
        &Workload {
            tokens: 16_384,
            recompute: true,
            ..w
        },
    );
    assert_eq!(re.activations, (28 * 4 * 1536 + 4 * (2 * 1536 + 1) + 153_656) * 16_384);
    assert!(re.check(GB80, "an 80 GB GPU").is_ok(), "{re}");
    eprintln!("Qwen2.5-1.5B bf16, 16k tokens, recomputation: {re}");
}

#[test]
fn qwen25_7b_full_training_does_not_fit_80gb_and_is_refused() {
    let m = qwen25(3584, 18_944, 28, 4, 152_064, false);
    let p = qwen2_params(3584, 18_944, 28, 4, 152_064, 28, false);
    assert_eq!(p, 7_615_616_512, "Qwen2.5-7B has 7.62B parameters");
    let w = Workload {
        tokens: 4096,
        scored: 2048,
        kv_tokens: 0,
        training: true,
        recompute: false,
    };
    let plan = memory_plan(&m, Precision::Bf16, &w);
    // Weights, bf16 copy, gradients and moments alone: 18 x 7.62e9 = 137 GB.
    assert_eq!(plan.weights + plan.weights_bf16 + plan.grads + plan.moments, 18 * p);
    assert!(plan.total() > GB80);
    let err = plan.check(GB80, "an 80 GB GPU").unwrap_err().to_string();
    assert!(
        err.contains("an 80 GB GPU") && err.contains("AdamW moments 60.92 GB"),
        "{err}"
    );
    // Scoring only (a reference model) in 2k-token forwards: 4 + 2 bytes a
    // parameter and the activations fit.
    let score = memory_plan(
        &m,
        Precision::Bf16,
        &Workload {
            tokens: 2048,
            training: false,
            ..w
        },
    );
    assert_eq!(score.grads + score.moments, 0);
    assert!(score.total() < GB80, "{score}");
}

#[test]
fn qwen3_30b_a3b_counts_every_expert_and_its_buffers() {
    let m = cfg(
        r#"{"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 32768,
        "tie_word_embeddings": false}"#,
    );
    // Per layer: q (2048 x 4096), k, v (2048 x 512 each), o (4096 x 2048),
    // q/k norms (128 each), two norms, router (128 x 2048), 128 experts x 3
    // x 768 x 2048.
    let layer: u64 =
        2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128 + 2 * 2048 + 128 * 2048 + 128 * 3 * 768 * 2048;
    let p = 151_936 * 2048 * 2 + 48 * layer + 2048;
    assert_eq!(p, 30_532_122_624, "Qwen3-30B-A3B has 30.5B parameters");
    let w = Workload {
        tokens: 4096,
        scored: 2048,
        kv_tokens: 0,
        training: true,
        recompute: false,
    };
    let plan = memory_plan(&m, Precision::Bf16, &w);
    assert_eq!(plan.params as u64, p);
    // 18 bytes a parameter: 550 GB; refused on one 80 GB GPU.
    assert!(plan.check(GB80, "an 80 GB GPU").is_err());
    // The MoE layer's buffers per token (f32 4, bf16 2): logits, probs,
    // dlogits (3 x 128), ids, w, dw, perm maps (6 x 8) and denom: 4 x 433;
    // xe, dye (2 x 8 x 2048) and act, dg, du (3 x 8 x 768) in bf16: 2 x
    // 51,200; g, u, dact (3 x 8 x 768) and ye, dxe (2 x 8 x 2048) in f32:
    // 4 x 51,200. Attention with q/k norms: 4 x (2 x 4096 + 2 x 512 + 512 +
    // 4096 + 32 + 36); the residual stream: 4 x (4 x 2048 + 2).
    let moe = 4 * 433 + 2 * 51_200 + 4 * 51_200;
    let attn = 4 * (2 * 4096 + 2 * 512 + 512 + 4096 + 32 + 36);
    let common = 4 * (4 * 2048 + 2);
    let per_token = 48 * (moe + attn + common) + 4 * (2 * 2048 + 1);
    assert_eq!(plan.activations, per_token * 4096);
    eprintln!("Qwen3-30B-A3B bf16, 4k tokens: {plan}");
    // Expert parallel over 8 ranks with the experts' memory sharded: each
    // rank holds 16 of the 128 experts, so its weights, gradients and
    // moments lose 7/8 of the 48 x 128 x 3 x 768 x 2048 expert parameters
    // (18 bytes each in bf16 training).
    let shard = aha_moe_model::Layout::with_expert_shard(&m, 16..32).unwrap();
    let ep = plan.with_expert_shard(&shard, Precision::Bf16);
    let experts: u64 = 48 * 128 * 3 * 768 * 2048;
    assert_eq!(ep.params as u64, p - experts / 8 * 7);
    let bytes = |x: &aha_moe_model::memory::MemoryPlan| x.weights + x.weights_bf16 + x.grads + x.moments;
    assert_eq!(bytes(&plan) - bytes(&ep), 18 * experts / 8 * 7);
    assert_eq!((ep.activations, ep.workspace), (plan.activations, plan.workspace));
    eprintln!("Qwen3-30B-A3B bf16, experts over 8 ranks: {ep}");
    // One MoE layer's stacked f32 gradients (router and 128 x 3 expert
    // matrices) are workspace of a full-model backward; a LoRA layout's
    // frozen MoE layers allocate none: 2.42 GB less.
    let stacked = 4 * (128 * 2048 + 128 * 3 * 768 * 2048);
    assert_eq!(stacked, 2_416_967_680);
    let layout = aha_moe_model::Layout::with_lora(&m, &aha_moe_model::plan::plan_lora_config(16)).unwrap();
    assert_eq!(aha_moe_model::memory::moe_grad_bytes(&layout), stacked);
    let lora = memory_plan(&m, Precision::Bf16, &w).with_lora(&layout, Precision::Bf16);
    assert_eq!(plan.workspace - lora.workspace, stacked);
}

/// Qwen2.5-7B (DeepSeek-R1-Distill-Qwen-7B's shape) on one 80 GB GPU, the
/// three ways `aha plan` prints, against hand arithmetic: full-parameter
/// training needs 18 bytes a parameter (137 GB) and is refused; with AdamW
/// and the f32 master weights on the host the GPU keeps 6 bytes a parameter
/// (bf16 weights, f32 gradients) plus the tensors read in f32 and 12 go to
/// the host; LoRA r16 on every
/// projection keeps the base in bf16 (plus the tensors read in f32) and 18
/// bytes per adapter parameter.
#[test]
fn qwen25_7b_on_one_80gb_gpu_full_offload_and_lora() {
    use aha_moe_model::plan::{gpu_spec, param_counts, plan, Interconnect, StepShape, Strategy};
    let m = qwen25(3584, 18944, 28, 4, 152_064, false);
    let p = qwen2_params(3584, 18944, 28, 4, 152_064, 28, false);
    assert_eq!(p, 7_615_616_512, "Qwen2.5-7B has 7.62B parameters");
    let counts = param_counts(&m);
    assert_eq!(counts.total, p);
    assert_eq!(
        counts.active,
        p - 152_064 * 3584,
        "a dense model uses every parameter but the embedding"
    );
    // LoRA: (in + out) per rank over q, k, v, o, gate, up, down of 28 layers.
    let (c, kv, f) = (3584u64, 4 * 128u64, 18944u64);
    let per_layer = (c + c) + 2 * (c + kv) + (c + c) + 2 * (c + f) + (f + c);
    assert_eq!(counts.lora_per_rank, 28 * per_layer);
    let a = 16 * counts.lora_per_rank;
    assert_eq!(a, 40_370_176, "LoRA r16 adds 40.4M parameters");

    let step = StepShape {
        completions: 64,
        prompt_len: 512,
        completion_len: 4096,
        micro_batch_tokens: 8192,
    };
    let rows = plan(&m, gpu_spec("h100").unwrap(), 1, Interconnect::NvLink, &step, 16).unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.strategy.name()).collect();
    assert_eq!(
        names,
        ["DP", "offload", "LoRA r16"],
        "one GPU: no ZeRO-1 row, no expert parallel"
    );
    let act = memory_plan(
        &m,
        Precision::Bf16,
        &Workload {
            tokens: 8192,
            scored: 8192,
            kv_tokens: 0,
            training: true,
            recompute: true,
        },
    );
    let (full, off, lora) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(full.device.total(), 18 * p + act.activations + act.workspace);
    assert!(!full.fits, "137 GB of weights and optimizer state do not fit 80 GB");
    // Offload: the device keeps bf16 weights (2), f32 gradients (4) and in
    // f32 only what its kernels read in f32: the embedding table and the
    // 1-D tensors (two norms, q/k/v biases per layer, the final norm).
    let r = 152_064 * 3584 + 28 * (2 * 3584 + 3584 + 2 * 512) + 3584;
    assert_eq!(r, 545_330_688, "545M parameters stay in f32 on the device");
    assert_eq!(off.device.weights, 4 * r);
    assert_eq!(off.device.moments, 0);
    assert_eq!(off.device.total(), 6 * p + 4 * r + act.activations + act.workspace);
    // The host: the f32 master copy (4) and two moments (8) of every
    // parameter, page-locked, and the staging buffers of 2^24-element
    // buckets: two f32 and two bf16 of a bucket and one of each for the
    // ragged last bucket (P = 453 x 2^24 + 15,537,664).
    let bucket = 1u64 << 24;
    let last = p - 453 * bucket;
    assert_eq!(last, 15_537_664);
    assert_eq!(off.host, 12 * p + (4 + 2) * (2 * bucket + last));
    assert_eq!(off.device.host_pinned, off.host);
    assert!(off.fits, "{:?}", off.device);
    // The rollouts' bf16 KV cache: 64 sequences of 4,608 positions, 28
    // layers x 4 heads x (128 + 128) x 2 bytes a position; it replaces the
    // activations at the peak.
    let kv = 64 * 4608 * 28 * 4 * 256 * 2;
    assert_eq!(off.rollout_kv, kv);
    assert!(kv > act.activations + act.workspace);
    assert_eq!(off.peak, 6 * p + 4 * r + kv);
    assert_eq!(off.peak, 64_786_455_552, "64.8 GB of the 80");
    assert_eq!(full.peak, 18 * p + kv);
    assert_eq!(lora.strategy, Strategy::Lora { rank: 16 });
    // LoRA: the bf16 copy of base and adapters (2), the adapters' f32
    // master weights, gradients and moments (4 + 4 + 8) and, in f32, the
    // frozen base's tensors read in f32 (the same r as offload keeps): no
    // f32 master of the base, no gradient or moment of it.
    assert_eq!(lora.device.weights_bf16, 2 * (p + a));
    assert_eq!(lora.device.weights, 4 * (a + r));
    assert_eq!((lora.device.grads, lora.device.moments), (4 * a, 8 * a));
    assert_eq!(
        lora.device.weights_bf16 + lora.device.weights + lora.device.grads + lora.device.moments,
        2 * p + 18 * a + 4 * r
    );
    assert_eq!(lora.peak, 2 * p + 18 * a + 4 * r + kv);
    eprintln!("Qwen2.5-7B LoRA r16 peak: {} bytes", lora.peak);
    assert!(lora.fits && lora.device.total() < off.device.total());
    // One GPU sends nothing; offload moves f32 gradients out and bf16
    // weights back over PCIe every step (6 bytes a parameter at 55 GB/s).
    assert_eq!(full.comm_bytes, 0.0);
    assert!((off.comm_seconds - 6.0 * p as f64 / 55e9).abs() < 1e-9);
}

/// LoRA r16 on Qwen2.5-7B with the optimizer offloaded (`[lora]` and
/// `offload_optimizer = true`): the page-locked host memory holds the
/// adapters' f32 master copy and two moments (12 bytes an adapter
/// parameter) and the staging buffers of 2^24-element buckets, nothing of
/// the frozen base; the device keeps every weight in bf16, the adapters'
/// gradients and, in f32, only the base's tensors read in f32.
#[test]
fn lora_with_offload_holds_only_the_adapters_on_the_host() {
    use aha_moe_model::plan::plan_lora_config;
    use aha_moe_model::Layout;
    let m = qwen25(3584, 18944, 28, 4, 152_064, false);
    let p = qwen2_params(3584, 18944, 28, 4, 152_064, 28, false);
    let layout = Layout::with_lora(&m, &plan_lora_config(16)).unwrap();
    // (in + out) x 16 over q, k, v, o, gate, up, down of 28 layers.
    let (c, kv, f) = (3584u64, 4 * 128u64, 18944u64);
    let a = 28 * 16 * ((c + c) + 2 * (c + kv) + (c + c) + 2 * (c + f) + (f + c));
    assert_eq!(a, 40_370_176);
    assert_eq!((layout.trainable as u64, layout.size as u64), (a, p + a));
    let w = Workload {
        tokens: 8192,
        scored: 8192,
        kv_tokens: 0,
        training: true,
        recompute: true,
    };
    let bucket = 1usize << 24;
    let plan = memory_plan(&m, Precision::Bf16, &w)
        .with_lora(&layout, Precision::Bf16)
        .with_offload(&layout, Precision::Bf16, bucket);
    // Buckets: 2 x 2^24 + 6,815,744; staging is two f32 and two bf16
    // buffers of a bucket and one of each for the ragged last one.
    let last = a - 2 * (1 << 24);
    assert_eq!(last, 6_815_744);
    let staging = (4 + 2) * (2 * (1 << 24) + last);
    assert_eq!(plan.host_pinned, 12 * a + staging);
    assert_eq!(plan.host_pinned, 726_663_168, "0.73 GB of page-locked host memory");
    // (The whole model's master copy would add 4 bytes a base parameter,
    // 30.5 GB.)
    // The device: every weight in bf16, in f32 the embedding and the 1-D
    // tensors only (the adapters' master is on the host), the adapters'
    // gradients, no moments.
    let r = 152_064 * 3584 + 28 * (2 * 3584 + 3584 + 2 * 512) + 3584;
    assert_eq!(
        (plan.weights_bf16, plan.weights, plan.grads, plan.moments),
        (2 * (p + a), 4 * r, 4 * a, 0)
    );
    eprintln!("Qwen2.5-7B LoRA r16 + offload: {plan}");
}

/// On 8 GPUs, ZeRO-1 as `zero_stage = 1` runs it in bf16 divides the
/// moments and the f32 master by 8 (the last GPU's shard holds the
/// remainder), keeps in f32 on every GPU only the tensors the kernels read
/// in f32 (the embedding and the 1-D tensors: 545,330,688 parameters for
/// Qwen2.5-7B), and sends 4 x 7/8 bytes a parameter for the
/// reduce-scatter of f32 gradients, 2 x 7/8 for the all-gather of bf16
/// weights and 4 bytes per f32-resident parameter for their broadcasts:
/// less than plain data parallel's 2 x 4 x 7/8 (ring all-reduce).
#[test]
fn zero1_shards_the_optimizer_moments_and_master_as_the_trainer_allocates_them() {
    use aha_moe_model::plan::{gpu_spec, plan, zero1_f32_resident, Interconnect, StepShape};
    let m = qwen25(3584, 18944, 28, 4, 152_064, false);
    let p = qwen2_params(3584, 18944, 28, 4, 152_064, 28, false) as f64;
    let step = StepShape {
        completions: 512,
        prompt_len: 512,
        completion_len: 4096,
        micro_batch_tokens: 8192,
    };
    let rows = plan(&m, gpu_spec("h100").unwrap(), 8, Interconnect::NvLink, &step, 0).unwrap();
    let (dp, z) = (&rows[0], &rows[1]);
    let pi = p as u64;
    let r = 152_064 * 3584 + 28 * (2 * 3584 + 3584 + 2 * 512) + 3584;
    assert_eq!(zero1_f32_resident(&m), r);
    assert_eq!(dp.device.moments, 8 * pi);
    assert_eq!(dp.device.weights, 4 * pi);
    // P = 7,615,616,512 = 8 x 951,952,064: no remainder.
    let shard = pi / 8 + pi % 8;
    assert_eq!(shard, 951_952_064);
    assert_eq!(z.device.moments, 8 * shard);
    assert_eq!(z.device.weights, 4 * (shard + r));
    assert_eq!(z.device.weights_bf16, dp.device.weights_bf16);
    assert_eq!(z.device.grads, dp.device.grads);
    // Per GPU: 2 (bf16) + 4 (gradients) bytes a parameter, 12 a shard
    // parameter, 4 a parameter read in f32.
    assert_eq!(
        z.device.total() - z.device.activations - z.device.workspace,
        6 * pi + 12 * shard + 4 * r
    );
    assert!((dp.comm_bytes - 2.0 * 4.0 * p * 7.0 / 8.0).abs() < 1.0);
    assert!((z.comm_bytes - (6.0 * p * 7.0 / 8.0 + 4.0 * r as f64)).abs() < 1.0);
    // 450 GB/s NVLink at 80%.
    assert!((z.comm_seconds - z.comm_bytes / 360e9).abs() < 1e-9);
}

/// The trainer's own preflight plan under ZeRO-1 (`MemoryPlan::with_zero1`,
/// applied by `aha grpo` and `aha sft` at `zero_stage = 1`) is the plan
/// row's: in bf16 the moments and the f32 master of the largest shard
/// (P = 7,615,616,512 over 3 ranks: 2,538,538,837 + a remainder of 1) and
/// the tensors read in f32; in f32 the f32 weights stay whole; a LoRA
/// layout keeps its adapters' master whole; one rank changes nothing.
#[test]
fn the_trainers_zero1_plan_shards_the_master_in_bf16_only() {
    use aha_moe_model::plan::zero1_f32_resident;
    use aha_moe_model::Layout;
    let m = qwen25(3584, 18944, 28, 4, 152_064, false);
    let p = qwen2_params(3584, 18944, 28, 4, 152_064, 28, false);
    let layout = Layout::new(&m);
    let w = Workload {
        tokens: 8192,
        scored: 8192,
        kv_tokens: 0,
        training: true,
        recompute: true,
    };
    let bf16 = memory_plan(&m, Precision::Bf16, &w);
    let shard = p / 3 + p % 3;
    assert_eq!(shard, 2_538_538_838);
    let z = bf16.with_zero1(&layout, Precision::Bf16, 3);
    assert_eq!(z.moments, 8 * shard);
    assert_eq!(z.weights, 4 * (shard + zero1_f32_resident(&m)));
    assert_eq!((z.weights_bf16, z.grads), (bf16.weights_bf16, bf16.grads));
    assert_eq!(bf16.with_zero1(&layout, Precision::Bf16, 1), bf16);
    let f32 = memory_plan(&m, Precision::F32, &w);
    let zf = f32.with_zero1(&layout, Precision::F32, 3);
    assert_eq!((zf.weights, zf.moments), (4 * p, 8 * shard));
    let lora = Layout::with_lora(&m, &aha_moe_model::plan::plan_lora_config(16)).unwrap();
    let a = lora.trainable as u64;
    let l = bf16.with_lora(&lora, Precision::Bf16);
    let zl = l.with_zero1(&lora, Precision::Bf16, 2);
    assert_eq!((zl.weights, zl.moments), (l.weights, 8 * (a / 2 + a % 2)));
    // Inference plans have no optimizer state to shard.
    let inf = memory_plan(&m, Precision::Bf16, &Workload { training: false, ..w });
    assert_eq!(inf.with_zero1(&layout, Precision::Bf16, 8), inf);
}
