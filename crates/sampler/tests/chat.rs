#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Chat templates against transformers: every case of
//! `tests/fixtures/chat_templates/cases.json` (written by `make_fixtures.py`
//! with transformers' `apply_chat_template`) renders byte for byte; loading
//! from a model folder in each of its forms; errors name the file. The real
//! DeepSeek-V3 / R1 tokenizer folder renders and encodes the conversations of
//! `deepseek-r1-cases.json` (written by `make_r1_fixtures.py`) exactly as
//! transformers does.

use std::path::{Path, PathBuf};

use aha_sampler::chat::{json_value, render_r1_zero, ChatTemplate, Value, R1_ZERO};
use aha_sampler::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates")
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aha-chat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The template a case names: a folder is loaded as a model folder, a
/// `.jinja` file is read with the case's special tokens.
fn case_template(case: &serde_json::Value) -> ChatTemplate {
    let path = fixtures().join(case["template"].as_str().unwrap());
    let mut t = if path.is_dir() {
        ChatTemplate::load(&path).unwrap()
    } else {
        ChatTemplate::new(std::fs::read_to_string(&path).unwrap(), path.display().to_string()).unwrap()
    };
    for (k, v) in case["special_tokens"].as_object().unwrap() {
        match v.as_str() {
            Some(s) if path.is_dir() => assert_eq!(t.special_token(k), Some(s), "{k} from tokenizer_config.json"),
            Some(s) => t = t.with_special_token(k, s),
            None => assert_eq!(t.special_token(k), None),
        }
    }
    t
}

#[test]
fn golden_cases_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    // Read as template values so object keys keep their order (tools are
    // written back with tojson).
    let doc = json_value(&text).unwrap();
    let plain: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = plain["cases"].as_array().unwrap();
    assert!(cases.len() >= 15, "expected the full fixture set");
    let mut kinds = std::collections::BTreeSet::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        kinds.insert(name.split('/').next().unwrap().to_string());
        let raw = doc.get_attr("cases").unwrap().get_item_by_index(i).unwrap();
        let t = case_template(case);
        let mut extra: Vec<(String, Value)> = Vec::new();
        let tools = raw.get_attr("tools").unwrap();
        if !tools.is_none() {
            extra.push(("tools".into(), tools));
        }
        let kwargs = raw.get_attr("kwargs").unwrap();
        for k in kwargs.try_iter().unwrap() {
            let key = k.as_str().unwrap().to_string();
            extra.push((key, kwargs.get_item(&k).unwrap()));
        }
        let extra_refs: Vec<(&str, Value)> = extra.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let got = t
            .render(
                &raw.get_attr("messages").unwrap(),
                case["add_generation_prompt"].as_bool().unwrap(),
                &extra_refs,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = case["expected"].as_str().unwrap();
        assert_eq!(got, want, "case {name}");
    }
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["qwen2.5", "qwen3", "r1-distill"],
        "every template kind is covered"
    );
}

#[test]
fn r1_distill_strips_reasoning_and_uses_added_token_bos() {
    let t = ChatTemplate::load(&fixtures().join("deepseek-r1-distill-qwen-32b")).unwrap();
    assert_eq!(t.special_token("bos_token"), Some("<｜begin▁of▁sentence｜>"));
    assert_eq!(t.special_token("eos_token"), Some("<｜end▁of▁sentence｜>"));
    assert_eq!(t.special_token("unk_token"), None);
    let messages = json_value(
        r#"[{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>one and one</think>2"},
            {"role": "user", "content": "2+2?"}]"#,
    )
    .unwrap();
    let got = t.render(&messages, true, &[]).unwrap();
    assert_eq!(
        got,
        "<｜begin▁of▁sentence｜><｜User｜>1+1?<｜Assistant｜>2<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>"
    );
    assert!(t.origin().ends_with("tokenizer_config.json"));
}

#[test]
fn loads_string_and_named_list_forms_of_tokenizer_config() {
    let dir = tmp_dir("string");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "pad_token": null,
            "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"}"#,
    )
    .unwrap();
    let t = ChatTemplate::load(&dir).unwrap();
    assert_eq!(t.special_token("eos_token"), Some("</s>"));
    assert_eq!(t.special_token("pad_token"), None);
    assert_eq!(t.render_user_prompt("hi").unwrap(), "<s>[user]hi</s>");
    assert!(ChatTemplate::load_named(&dir, Some("tool_use")).is_err());

    let dir = tmp_dir("named");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [
              {"name": "tool_use", "template": "TOOLS {{ tools | length }}"},
              {"name": "default", "template": "DEFAULT {{ messages | length }}"}]}"#,
    )
    .unwrap();
    let msgs = json_value(r#"[{"role": "user", "content": "x"}]"#).unwrap();
    let t = ChatTemplate::load(&dir).unwrap();
    assert_eq!(t.render(&msgs, false, &[]).unwrap(), "DEFAULT 1");
    let t = ChatTemplate::load_named(&dir, Some("tool_use")).unwrap();
    let tools = json_value(r#"[{"a": 1}, {"b": 2}]"#).unwrap();
    assert_eq!(t.render(&msgs, false, &[("tools", tools)]).unwrap(), "TOOLS 2");
    let err = ChatTemplate::load_named(&dir, Some("rag")).unwrap_err().to_string();
    assert!(err.contains("rag") && err.contains("tool_use"), "{err}");

    let dir = tmp_dir("nodefault");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#,
    )
    .unwrap();
    let err = ChatTemplate::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("default"),
        "{err}"
    );
}

#[test]
fn chat_template_jinja_wins_over_tokenizer_config() {
    let dir = tmp_dir("jinja");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "chat_template": "from config"}"#,
    )
    .unwrap();
    // Trailing newline dropped, blocks trimmed, as in transformers.
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}\n    {{ m.content }}{{ eos_token }}\n{% endfor %}\n",
    )
    .unwrap();
    let t = ChatTemplate::load(&dir).unwrap();
    assert!(t.origin().ends_with("chat_template.jinja"));
    assert_eq!(t.render_user_prompt("a").unwrap(), "    a<|im_end|>\n");

    let dir = tmp_dir("empty");
    let err = ChatTemplate::load(&dir).unwrap_err().to_string();
    assert!(err.contains("no chat_template.jinja"), "{err}");
}

#[test]
fn raise_exception_is_an_error_with_its_message() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok",
        "alternate.jinja",
    )
    .unwrap();
    let msgs = json_value(r#"[{"role": "assistant", "content": "x"}]"#).unwrap();
    let err = t.render(&msgs, false, &[]).unwrap_err();
    assert!(matches!(err, Error::Template { .. }));
    let err = err.to_string();
    assert!(
        err.contains("Conversation roles must alternate user/assistant"),
        "{err}"
    );
    assert!(err.contains("alternate.jinja"), "{err}");
}

#[test]
fn malformed_template_is_an_error_naming_the_file() {
    let dir = tmp_dir("bad");
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }").unwrap();
    let err = ChatTemplate::load(&dir).unwrap_err();
    assert!(matches!(err, Error::Template { .. }));
    let err = err.to_string();
    assert!(
        err.contains(&dir.join("chat_template.jinja").display().to_string()),
        "{err}"
    );

    let dir = tmp_dir("badjson");
    std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
    let err = ChatTemplate::load(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
}

#[test]
fn tojson_follows_python_json_dumps() {
    let t = ChatTemplate::new(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}|{{ s | tojson(ensure_ascii=true) }}",
        "tojson.jinja",
    )
    .unwrap();
    let x = json_value(r#"{"b": [1, 2.5, 1e16, true, null], "a": {"é": "<tag> & \"q\"\n"}, "c": []}"#).unwrap();
    let got = t
        .render(
            &Value::from(Vec::<Value>::new()),
            false,
            &[("x", x), ("s", Value::from("é😀\u{1}"))],
        )
        .unwrap();
    let want = concat!(
        r#"{"b": [1, 2.5, 1e+16, true, null], "a": {"é": "<tag> & \"q\"\n"}, "c": []}"#,
        "|{\n  \"b\": [\n    1,\n    2.5,\n    1e+16,\n    true,\n    null\n  ],\n  \"a\": {\n    \"é\": \"<tag> & \\\"q\\\"\\n\"\n  },\n  \"c\": []\n}",
        r#"|{"a":{"é":"<tag> & \"q\"\n"},"b":[1,2.5,1e+16,true,null],"c":[]}"#,
        r#"|"\u00e9\ud83d\ude00\u0001""#,
    );
    assert_eq!(got, want);
}

#[test]
fn python_string_methods_and_strftime_now_work() {
    let t = ChatTemplate::new(
        "{{ s.strip() }}|{{ s.split(',')[1] }}|{{ s.startswith(' a') }}|{{ s.upper().rstrip() }}|{{ strftime_now('%Y') | length }}",
        "py.jinja",
    )
    .unwrap();
    let got = t
        .render(&Value::from(Vec::<Value>::new()), false, &[("s", Value::from(" a,b "))])
        .unwrap();
    assert_eq!(got, "a,b|b |True| A,B|4", "bools print as Python does");
}

#[test]
fn r1_zero_renders_the_prompt_in_place() {
    let p = render_r1_zero("What is 2 + 3?");
    assert!(p.starts_with("A conversation between User and Assistant."));
    assert!(p.contains("<think> </think> and <answer> </answer>"));
    assert!(p.ends_with("User: What is 2 + 3?. Assistant:"));
    assert_eq!(R1_ZERO.matches("{prompt}").count(), 1);
    assert!(!p.contains("{prompt}"));
}

/// The real DeepSeek-V3 / R1 tokenizer folder (`tokenizer.json` with its
/// 818 added tokens, `tokenizer_config.json` with the Jinja chat template and
/// AddedToken special tokens): every conversation of
/// `deepseek-r1-cases.json` (a system prompt, two system prompts joined,
/// multi-turn, an assistant turn whose `<think>` reasoning the template
/// drops, tool calls and tool outputs, non-ASCII text and whitespace, with
/// and without the generation prompt) renders byte for byte as
/// transformers' `apply_chat_template`, and encodes (no special tokens
/// added) to the same ids.
#[test]
fn deepseek_r1_tokenizer_renders_and_encodes_like_transformers() {
    let folder = fixtures().join("../tokenizers/deepseek-r1");
    let t = ChatTemplate::load(&folder).unwrap();
    assert_eq!(t.special_token("bos_token"), Some("<｜begin▁of▁sentence｜>"));
    let tok = tokenizers::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(fixtures().join("deepseek-r1-cases.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    let mut saw_think = false;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let messages = json_value(&case["messages"].to_string()).unwrap();
        let got = t
            .render(&messages, case["add_generation_prompt"].as_bool().unwrap(), &[])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, case["text"].as_str().unwrap(), "case {name}: text");
        let ids = tok.encode(got.as_str(), false).unwrap().get_ids().to_vec();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "case {name}: ids");
        // The special tokens are single ids, not spelled out byte by byte.
        assert_eq!(
            ids[0],
            tok.token_to_id("<｜begin▁of▁sentence｜>").unwrap(),
            "case {name}: bos"
        );
        saw_think |= case["messages"].to_string().contains("</think>") && !got.contains("</think>");
    }
    assert!(saw_think, "a case checks that the template drops the reasoning");
}
