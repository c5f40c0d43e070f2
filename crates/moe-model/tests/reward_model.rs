//! The scalar reward model (`*ForSequenceClassification`, one label):
//! transformers' scores of qwen2-rm-tiny (right-padded rows, read at each
//! row's last non-pad token) on the CPU and on the GPU, Llama and Qwen3-MoE
//! bodies scoring their causal model's last hidden state, the pad-token
//! pooling rule, batching that does not change a score, and folders that
//! are refused with the file, key or tensor named. Without a GPU the GPU
//! test prints "skipped: no GPU"; CI runs it on the emulated GPU.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aha_moe_model::st::{read_file, write_f32, NamedTensor};
use aha_moe_model::{Model, Precision, RewardModel};
use aha_tensor::{CpuStorage, Device};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-rm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tensors(path: &Path) -> HashMap<String, NamedTensor> {
    read_file(path)
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

fn f32s(t: &NamedTensor) -> Vec<f32> {
    match &t.data {
        CpuStorage::F32(v) => v.clone(),
        other => panic!("{}: expected f32, got {:?}", t.name, other.dtype()),
    }
}

fn i64s(t: &NamedTensor) -> Vec<i64> {
    match &t.data {
        CpuStorage::I64(v) => v.clone(),
        other => panic!("{}: expected i64, got {:?}", t.name, other.dtype()),
    }
}

/// The fixture's rows cut to their lengths, and transformers' scores.
fn reference() -> (Vec<Vec<u32>>, Vec<f32>) {
    let r = tensors(&fixture("qwen2-rm-tiny").join("reference.safetensors"));
    let ids = i64s(&r["input_ids"]);
    let t = r["input_ids"].shape[1];
    let lengths = i64s(&r["lengths"]);
    let mask = i64s(&r["attention_mask"]);
    let seqs: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let len = len as usize;
            assert_eq!(mask[i * t..(i + 1) * t].iter().sum::<i64>() as usize, len);
            ids[i * t..i * t + len].iter().map(|&x| x as u32).collect()
        })
        .collect();
    assert_eq!(r["scores"].shape, vec![seqs.len(), 1]);
    (seqs, f32s(&r["scores"]))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_fixture(device: Device) {
    let rm = RewardModel::load(&fixture("qwen2-rm-tiny"), device, Precision::F32).unwrap();
    assert_eq!(rm.head_config().architecture, "Qwen2ForSequenceClassification");
    assert_eq!(rm.head_config().pad_token_id, Some(0));
    let (seqs, want) = reference();
    // One padded forward for the whole batch, then other batchings.
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let got = rm.score_batch(&refs).unwrap();
    let d = max_abs_diff(&got, &want);
    eprintln!("qwen2-rm-tiny on {device}: scores {got:?}, transformers {want:?}, max |diff| {d:.3e}");
    assert!(d <= 1e-4, "scores differ from transformers by {d:e}");
    for bs in [1, 2, 3] {
        let g = rm.score(&seqs, bs).unwrap();
        let d = max_abs_diff(&g, &want);
        assert!(d <= 1e-4, "batch size {bs}: scores differ from transformers by {d:e}");
    }
}

#[test]
fn fixture_scores_match_transformers_on_the_cpu() {
    check_fixture(Device::Cpu);
}

#[test]
fn fixture_scores_match_transformers_on_the_gpu() {
    if let Some(reason) = aha_cuda_kernels::no_gpu_reason() {
        eprintln!("fixture_scores_match_transformers_on_the_gpu: skipped: no GPU ({reason})");
        return;
    }
    check_fixture(Device::Cuda(0));
}

/// A reward-model folder from a causal fixture: its config with the
/// sequence-classification architecture, one label and `pad`, its body
/// tensors and a score head `w`.
fn rm_from_causal(name: &str, architecture: &str, pad: u32, tag: &str) -> (PathBuf, Model, Vec<f32>) {
    let model = Model::load(&fixture(name)).unwrap();
    let d = tmpdir(tag);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!([architecture]);
    cfg["id2label"] = serde_json::json!({"0": "LABEL_0"});
    cfg["label2id"] = serde_json::json!({"LABEL_0": 0});
    cfg["pad_token_id"] = serde_json::json!(pad);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let c = model.config.hidden_size;
    let w: Vec<f32> = (0..c).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 50.0).collect();
    let mut out: Vec<(String, Vec<usize>, &[f32])> = model
        .layout
        .entries
        .iter()
        .filter(|e| e.name != "lm_head.weight")
        .map(|e| (e.name.clone(), e.shape.clone(), e.slot.of(&model.params)))
        .collect();
    out.push(("score.weight".into(), vec![1, c], &w));
    write_f32(&d.join("model.safetensors"), &out).unwrap();
    (d, model, w)
}

#[test]
fn llama_and_qwen3_moe_bodies_score_their_last_hidden_state() {
    for (name, arch) in [
        ("llama-tiny", "LlamaForSequenceClassification"),
        ("qwen3-moe-tiny", "Qwen3MoeForSequenceClassification"),
    ] {
        let pad = 3;
        let (dir, causal, w) = rm_from_causal(name, arch, pad, name);
        let rm = RewardModel::load(&dir, Device::Cpu, Precision::F32).unwrap();
        let c = causal.config.hidden_size;
        let seqs: Vec<Vec<u32>> = vec![vec![9, 17, 4, 30, 2], vec![11, 5], vec![40, 41, 42, 43, 44, 45, 46]];
        let got = rm.score(&seqs, 2).unwrap();
        for (s, g) in seqs.iter().zip(&got) {
            // Alone, unpadded, through the causal model: hidden[last] . w.
            let acts = causal.forward(s, 1, s.len()).unwrap();
            let h = &acts.hidden[(s.len() - 1) * c..s.len() * c];
            let want: f32 = h.iter().zip(&w).map(|(a, b)| a * b).sum();
            assert!((g - want).abs() <= 1e-4, "{name}: {g} vs {want}");
        }
        // Trailing pad tokens are skipped, as transformers pools.
        let padded = vec![vec![9, 17, 4, 30, 2, pad, pad]];
        let p = rm.score(&padded, 1).unwrap();
        assert!((p[0] - got[0]).abs() <= 1e-5, "{name}: {} vs {}", p[0], got[0]);
        assert_eq!(rm.score_position(&[pad, pad]), 0);
        assert_eq!(rm.score_position(&[5, pad, 6, pad]), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A copy of qwen2-rm-tiny with its config edited by `edit` and its
/// checkpoint's tensors by `tensors`.
fn bad_copy(
    tag: &str,
    edit: impl Fn(&mut serde_json::Value),
    tensors_edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let src = fixture("qwen2-rm-tiny");
    let d = tmpdir(tag);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = read_file(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.shape.clone(), f32s(&t)))
        .collect();
    tensors_edit(&mut ts);
    let view: Vec<(String, Vec<usize>, &[f32])> = ts
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    write_f32(&d.join("model.safetensors"), &view).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    let e = RewardModel::load(dir, Device::Cpu, Precision::F32)
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    e
}

#[test]
fn bad_folders_are_refused_naming_the_file_and_tensor() {
    let keep = |_: &mut Vec<(String, Vec<usize>, Vec<f32>)>| {};
    // Two labels.
    let d = bad_copy(
        "two-labels",
        |c| c["id2label"] = serde_json::json!({"0": "BAD", "1": "GOOD"}),
        keep,
    );
    let e = load_err(&d);
    assert!(e.contains("config.json") && e.contains("num_labels is 2"), "{e}");
    let d = bad_copy("num-labels", |c| c["num_labels"] = serde_json::json!(3), keep);
    assert!(load_err(&d).contains("num_labels is 3"));
    let d = bad_copy(
        "no-labels",
        |c| {
            c.as_object_mut().unwrap().remove("id2label");
        },
        keep,
    );
    assert!(load_err(&d).contains("assumes 2 labels"));
    // Other architectures, by name.
    let d = bad_copy(
        "causal",
        |c| c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]),
        keep,
    );
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("`Qwen2ForCausalLM` is not a supported reward model"),
        "{e}"
    );
    let d = bad_copy(
        "mismatch",
        |c| c["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]),
        keep,
    );
    assert!(load_err(&d).contains("does not go with model_type \"qwen2\""));
    // The head: missing, or the shape of two labels.
    let d = bad_copy("no-score", |_| {}, |ts| ts.retain(|t| t.0 != "score.weight"));
    let e = load_err(&d);
    assert!(e.contains("no-score") && e.contains("`score.weight` is missing"), "{e}");
    let d = bad_copy(
        "score-2",
        |_| {},
        |ts| {
            for t in ts.iter_mut().filter(|t| t.0 == "score.weight") {
                let row = t.2.clone();
                t.1 = vec![2, row.len()];
                t.2.extend(row);
            }
        },
    );
    let e = load_err(&d);
    assert!(e.contains("`score.weight`") && e.contains("[2, 64]"), "{e}");
    // A body tensor missing, and an unexpected bias on the head.
    let d = bad_copy("no-norm", |_| {}, |ts| ts.retain(|t| t.0 != "model.norm.weight"));
    assert!(load_err(&d).contains("model.norm.weight"));
    let d = bad_copy("bias", |_| {}, |ts| ts.push(("score.bias".into(), vec![1], vec![0.5])));
    assert!(load_err(&d).contains("unexpected: score.bias"));
    for tag in [
        "two-labels",
        "num-labels",
        "no-labels",
        "causal",
        "mismatch",
        "no-score",
        "score-2",
        "no-norm",
        "bias",
    ] {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("aha-rm-{tag}-{}", std::process::id())));
    }
}

#[test]
fn bad_inputs_are_errors() {
    let rm = RewardModel::load(&fixture("qwen2-rm-tiny"), Device::Cpu, Precision::F32).unwrap();
    assert!(rm
        .score(&[vec![1, 2], vec![]], 4)
        .unwrap_err()
        .to_string()
        .contains("sequence 1 is empty"));
    assert!(rm.score(&[vec![1, 2]], 0).is_err());
    assert!(rm.score(&[vec![1, 2, 300]], 1).unwrap_err().to_string().contains("300"));
    let long = vec![vec![5u32; rm.max_len() + 1]];
    assert!(rm
        .score(&long, 1)
        .unwrap_err()
        .to_string()
        .contains("exceed max_position_embeddings"));
    assert!(rm.score(&[], 4).unwrap().is_empty());
}
