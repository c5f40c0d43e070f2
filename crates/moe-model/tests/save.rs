//! Saving keeps a Hugging Face folder whole: the dtype the weights had
//! (bf16 in, bf16 out unless told otherwise; FP8 out as bf16 without its
//! quantization_config), sharding with an index, the tokenizer, chat
//! template and every other file copied, and DeepSeek-V3's
//! multi-token-prediction layers written back unchanged (or dropped).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use aha_moe_model::st::read_header;
use aha_moe_model::{Model, SaveDtype, SaveOptions};
use safetensors::Dtype;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aha-save-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every tensor of a saved folder: name -> (dtype, shape).
fn dtypes(dir: &Path) -> std::collections::BTreeMap<String, (Dtype, Vec<usize>)> {
    aha_moe_model::params::checkpoint_files(dir)
        .unwrap()
        .iter()
        .flat_map(|f| read_header(f).unwrap())
        .map(|(n, l)| (n, (l.dtype, l.shape)))
        .collect()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";

/// A bf16 Llama folder with the files a downloaded checkpoint has.
fn bf16_llama(tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    let m = Model::load(&fixture("llama-tiny")).unwrap();
    m.save_as(
        &d,
        &SaveOptions {
            dtype: SaveDtype::Bf16,
            ..SaveOptions::default()
        },
    )
    .unwrap();
    let tc = serde_json::json!({"chat_template": TEMPLATE, "bos_token": "<s>", "model_max_length": 512});
    std::fs::write(d.join("tokenizer_config.json"), tc.to_string()).unwrap();
    std::fs::write(d.join("chat_template.jinja"), TEMPLATE).unwrap();
    std::fs::write(d.join("special_tokens_map.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    std::fs::write(d.join("README.md"), "a model card\n").unwrap();
    d
}

#[test]
fn a_fine_tuned_bf16_model_saves_as_a_whole_bf16_folder() {
    let src = bf16_llama("src");
    let mut m = Model::load(&src).unwrap();
    assert!(dtypes(&src).values().all(|(d, _)| *d == Dtype::BF16));
    assert_eq!(config(&src)["dtype"], "bfloat16");
    // One plain gradient step: the weights move.
    let ids: Vec<u32> = (0..16).map(|i| (i * 37 % 300) as u32).collect();
    let mut g = vec![0f32; m.params.len()];
    m.next_token_loss(&ids, 2, 8, &mut g).unwrap();
    m.params.iter_mut().zip(&g).for_each(|(p, g)| *p -= 0.5 * g);

    for (tag, shard) in [("single", usize::MAX), ("sharded", 200_000)] {
        let out = tmpdir(tag);
        m.save(&out, shard).unwrap();
        // The dtype the input had, sharded with an index when asked.
        assert!(dtypes(&out).values().all(|(d, _)| *d == Dtype::BF16), "{tag}");
        assert_eq!(out.join("model.safetensors.index.json").is_file(), tag == "sharded");
        // Every other file of the folder, byte for byte.
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
            "generation_config.json",
            "README.md",
        ] {
            assert_eq!(
                std::fs::read(src.join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
                "{tag}: {f}"
            );
        }
        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let want = tokenizers::Tokenizer::from_file(fixture("llama-tiny").join("tokenizer.json")).unwrap();
        let text = "a fine-tuned model keeps its tokenizer";
        assert_eq!(
            tok.encode(text, false).unwrap().get_ids(),
            want.encode(text, false).unwrap().get_ids()
        );
        let tc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(tc["chat_template"], TEMPLATE);
        // The fine-tuned weights come back as their bf16 rounding.
        let back = Model::load(&out).unwrap();
        assert!(back
            .params
            .iter()
            .zip(&m.params)
            .all(|(a, b)| a.to_bits() == half::bf16::from_f32(*b).to_f32().to_bits()));
        let _ = std::fs::remove_dir_all(&out);
    }
    // Told otherwise: f32.
    let out = tmpdir("f32");
    m.save_as(
        &out,
        &SaveOptions {
            dtype: SaveDtype::F32,
            ..SaveOptions::default()
        },
    )
    .unwrap();
    assert!(dtypes(&out).values().all(|(d, _)| *d == Dtype::F32));
    assert_eq!(config(&out)["dtype"], "float32");
    let back = Model::load(&out).unwrap();
    assert!(back
        .params
        .iter()
        .zip(&m.params)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&src);
}

/// The FP8 fixture plus a multi-token-prediction layer (layer 2 of 2): an
/// FP8 projection with its scales, an f32 norm and a bf16 embedding.
fn fp8_with_mtp(tag: &str) -> PathBuf {
    let src = fixture("deepseek-v3-fp8-tiny");
    let d = tmpdir(tag);
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let file = src.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let q = st.tensor("model.layers.1.self_attn.o_proj.weight").unwrap();
    let s = st.tensor("model.layers.1.self_attn.o_proj.weight_scale_inv").unwrap();
    tensors.push((
        "model.layers.2.eh_proj.weight".into(),
        Dtype::F8_E4M3,
        q.shape().to_vec(),
        q.data().to_vec(),
    ));
    tensors.push((
        "model.layers.2.eh_proj.weight_scale_inv".into(),
        Dtype::F32,
        s.shape().to_vec(),
        s.data().to_vec(),
    ));
    tensors.push((
        "model.layers.2.enorm.weight".into(),
        Dtype::F32,
        vec![2],
        [1f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
    ));
    tensors.push((
        "model.layers.2.embed_tokens.weight".into(),
        Dtype::BF16,
        vec![3],
        vec![1, 2, 3, 4, 5, 6],
    ));
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, dt, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
    d
}

#[test]
fn fp8_saves_as_bf16_and_keeps_the_mtp_layers() {
    let src = fp8_with_mtp("fp8src");
    let m = Model::load(&src).unwrap();
    let out = tmpdir("fp8out");
    m.save(&out, usize::MAX).unwrap();
    let cfg = config(&out);
    assert!(cfg.get("quantization_config").is_none());
    assert_eq!(cfg["rope_parameters"]["rope_type"], "yarn");
    let saved = dtypes(&out);
    assert_eq!(saved["model.layers.0.self_attn.q_b_proj.weight"].0, Dtype::BF16);
    // Unquantized tensors keep their f32.
    assert_eq!(saved["model.norm.weight"].0, Dtype::F32);
    assert!(!saved.keys().any(|n| n.ends_with("_scale_inv")));
    // The MTP layer: FP8 dequantized to bf16, the rest byte for byte.
    assert_eq!(saved["model.layers.2.eh_proj.weight"], (Dtype::BF16, vec![128, 128]));
    let raw = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    assert_eq!(st.tensor("model.layers.2.enorm.weight").unwrap().dtype(), Dtype::F32);
    assert_eq!(
        st.tensor("model.layers.2.embed_tokens.weight").unwrap().data(),
        &[1, 2, 3, 4, 5, 6]
    );
    let back = Model::load(&out).unwrap();
    assert!(back
        .params
        .iter()
        .zip(&m.params)
        .all(|(a, b)| a.to_bits() == half::bf16::from_f32(*b).to_f32().to_bits() || a.to_bits() == b.to_bits()));
    // The MTP projection equals the dequantized o_proj it was copied from.
    let mtp = st.tensor("model.layers.2.eh_proj.weight").unwrap();
    let o = m
        .layout
        .get("model.layers.1.self_attn.o_proj.weight")
        .unwrap()
        .slot
        .of(&m.params);
    assert!(mtp
        .data()
        .chunks_exact(2)
        .zip(o)
        .all(|(b, w)| half::bf16::from_le_bytes([b[0], b[1]]) == half::bf16::from_f32(*w)));

    // Dropped on request.
    let out2 = tmpdir("fp8drop");
    m.save_as(
        &out2,
        &SaveOptions {
            keep_extra_layers: false,
            ..SaveOptions::default()
        },
    )
    .unwrap();
    assert!(!dtypes(&out2).keys().any(|n| n.starts_with("model.layers.2.")));
    for d in [src, out, out2] {
        let _ = std::fs::remove_dir_all(d);
    }
}
