//! Format, tag-count, language consistency, countdown and length shaping,
//! plus the weighted sum, metrics and the batch evaluator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use aha_rewards::countdown::{self, CountdownReward, FORMAT_SCORE};
use aha_rewards::format::{check_format, tag_count, FormatConfig, FormatReward, FormatStyle};
use aha_rewards::language::{chain_of_thought, consistency, word_scripts, LanguageReward, Script};
use aha_rewards::length::{cosine_scaled, soft_overlong_penalty, CosineConfig, OverlongConfig};
use aha_rewards::math::MathReward;
use aha_rewards::{
    combined_metrics, evaluate_batch, metrics, BatchConfig, Example, Item, Outcome, Reward, Status, WeightedSum,
};
use proptest::prelude::*;

fn ex(v: serde_json::Value) -> Example {
    v.as_object().unwrap().clone()
}

#[test]
fn r1_zero_format() {
    let cfg = FormatConfig::default();
    let ok = "<think>\nlet me see\n</think>\n<answer>\n42\n</answer>";
    assert_eq!(check_format(ok, &cfg), Ok(()));
    assert_eq!(check_format("  <think>a</think> <answer>b</answer>\n", &cfg), Ok(()));
    let bad = [
        ("missing think", "<answer>42</answer>"),
        ("missing answer", "<think>x</think>"),
        ("duplicated think", "<think>a</think><think>b</think><answer>1</answer>"),
        ("nested", "<think>a<think>b</think></think><answer>1</answer>"),
        (
            "duplicated answer",
            "<think>a</think><answer>1</answer><answer>2</answer>",
        ),
        ("text after answer", "<think>a</think><answer>1</answer> and more"),
        ("text before think", "Sure! <think>a</think><answer>1</answer>"),
        ("text between", "<think>a</think> so <answer>1</answer>"),
        ("empty think", "<think> </think><answer>1</answer>"),
        ("empty answer", "<think>a</think><answer>\n</answer>"),
        ("answer inside think", "<think>a<answer>1</answer></think>"),
        ("wrong order", "<answer>1</answer><think>a</think>"),
        ("unclosed", "<think>a<answer>1</answer>"),
    ];
    for (what, text) in bad {
        assert!(check_format(text, &cfg).is_err(), "{what}: {text}");
    }
    for (_, text) in bad {
        assert!(check_format(
            text,
            &FormatConfig {
                style: FormatStyle::R1,
                think_opened_in_prompt: true,
                ..FormatConfig::default()
            }
        )
        .is_err());
    }
    let r = FormatReward::default();
    assert_eq!(r.score(&Example::new(), ok).score, 1.0);
    assert_eq!(r.score(&Example::new(), "<answer>1</answer>").status, Status::Wrong);
}

#[test]
fn r1_format_and_opened_think() {
    let cfg = FormatConfig {
        style: FormatStyle::R1,
        think_opened_in_prompt: false,
        ..FormatConfig::default()
    };
    assert_eq!(
        check_format("<think>reasoning</think>\nThe answer is \\boxed{2}.", &cfg),
        Ok(())
    );
    assert!(check_format("<think>reasoning</think>", &cfg).is_err(), "no summary");
    assert!(
        check_format("<think>r</think>s<answer>1</answer>", &cfg).is_err(),
        "R1 has no answer tag"
    );
    let opened = FormatConfig {
        style: FormatStyle::R1,
        think_opened_in_prompt: true,
        ..FormatConfig::default()
    };
    assert_eq!(check_format("reasoning</think>summary", &opened), Ok(()));
    assert!(
        check_format("<think>reasoning</think>summary", &opened).is_err(),
        "opened twice"
    );
}

#[test]
fn tag_count_reward() {
    assert_eq!(tag_count("<think>\na\n</think>\n<answer>\nb\n</answer>"), 1.0);
    assert_eq!(tag_count("<think>a</think>"), 0.5);
    assert_eq!(tag_count("<think><think>a</think><answer>"), 0.5);
    assert_eq!(tag_count("nothing"), 0.0);
}

#[test]
fn language_segmentation_and_scores() {
    use Script::*;
    assert_eq!(word_scripts("Hello, world! l'été"), vec![Latin, Latin, Latin]);
    assert_eq!(word_scripts("我们计算x"), vec![Cjk, Cjk, Cjk, Cjk, Latin]);
    assert_eq!(word_scripts("Привет мир"), vec![Cyrillic, Cyrillic]);
    assert_eq!(word_scripts("مرحبا بالعالم"), vec![Arabic, Arabic]);
    assert_eq!(word_scripts("नमस्ते दुनिया"), vec![Devanagari, Devanagari]);
    assert_eq!(word_scripts("ひらがなカタカナ한국어"), vec![Cjk; 11]);
    // Math and LaTeX commands are not words.
    assert_eq!(word_scripts("所以 $\\frac{a}{b} = x$ 和 \\(y\\)"), vec![Cjk, Cjk, Cjk]);
    assert_eq!(consistency("12 + 3 = 15", Latin), None);
    assert_eq!(consistency("the 答案 is", Latin), Some(0.5));
    assert_eq!(chain_of_thought("<think>abc</think>tail"), "abc");
    assert_eq!(chain_of_thought("abc</think>tail"), "abc");
    assert_eq!(Script::of_language("zh-CN").unwrap(), Cjk);
    assert!(Script::of_language("xx").is_err());

    let r = LanguageReward::default();
    let zh = ex(serde_json::json!({"language": "zh"}));
    let out = r.score(&zh, "<think>我们先计算 then 再检查</think>答案");
    assert!((out.score - 8.0 / 9.0).abs() < 1e-12, "{out:?}");
    assert_eq!(out.status, Status::Wrong);
    let out = r.score(&zh, "<think>全部中文</think>");
    assert_eq!((out.score, out.status), (1.0, Status::Correct));
    let en = ex(serde_json::json!({"language": "en"}));
    assert_eq!(r.score(&en, "<think>1 + 1 = 2</think>").status, Status::NoAnswer);
    assert_eq!(r.score(&en, "<think>all English words</think>").score, 1.0);
    let bad = ex(serde_json::json!({"language": "klingon"}));
    assert_eq!(r.score(&bad, "x").status, Status::InfraError);
}

#[test]
fn countdown_scores() {
    let nums = [3, 5, 7];
    let ans = |e: &str| format!("<think>...</think><answer>{e}</answer>");
    assert_eq!(
        countdown::score(&ans("(7 - 5) * 3 + 0"), &nums, 6).score,
        FORMAT_SCORE,
        "0 is not given"
    );
    assert_eq!(countdown::score(&ans("(7 - 5) * 3"), &nums, 6).status, Status::Correct);
    assert_eq!(countdown::score(&ans("3 * 5 + 7"), &nums, 22).score, 1.0);
    assert_eq!(countdown::score(&ans("3 * 5 - 7"), &nums, 22).score, FORMAT_SCORE);
    assert_eq!(
        countdown::score(&ans("3 * 5"), &nums, 15).score,
        FORMAT_SCORE,
        "7 unused"
    );
    assert_eq!(
        countdown::score(&ans("3 * 5 + 7 + 7"), &nums, 29).score,
        FORMAT_SCORE,
        "7 twice"
    );
    assert_eq!(
        countdown::score(&ans("7 / (5 - 5) + 3"), &[3, 5, 5, 7], 1).score,
        FORMAT_SCORE
    );
    // Exact arithmetic: 1/3 * 3 is exactly 1, and no float rounding.
    assert_eq!(countdown::score(&ans("(1 / 3) * 3"), &[1, 3, 3], 1).score, 1.0);
    assert_eq!(countdown::score(&ans("import os"), &nums, 1).score, 0.0);
    assert_eq!(
        countdown::score(&ans("__import__('os').system('ls')"), &nums, 1).score,
        0.0
    );
    assert_eq!(countdown::score(&ans("3.0 * 5 + 7"), &nums, 22).score, 0.0);
    assert_eq!(countdown::score("no tags", &nums, 22).status, Status::NoAnswer);
    assert_eq!(countdown::score(&ans("3 * 5 + 7 = 22"), &nums, 22).score, 1.0);
    let r = CountdownReward;
    let e = ex(serde_json::json!({"nums": [3, 5, 7], "target": 22}));
    assert_eq!(r.score(&e, &ans("7+3*5")).score, 1.0);
    assert_eq!(r.score(&Example::new(), &ans("7+3*5")).status, Status::UnparsableGold);
    let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
    assert_eq!(countdown::score(&ans(&deep), &[1], 1).score, 0.0);
}

#[test]
fn countdown_generator_is_seeded_and_solvable() {
    let a = countdown::generate(7, 50, 4, 99, 100).unwrap();
    let b = countdown::generate(7, 50, 4, 99, 100).unwrap();
    let c = countdown::generate(8, 50, 4, 99, 100).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    for t in &a {
        let text = format!("<answer>{}</answer>", t.solution);
        assert_eq!(countdown::score(&text, &t.nums, t.target).score, 1.0, "{t:?}");
        assert!((1..=100).contains(&t.target));
    }
}

proptest! {
    #[test]
    fn format_never_panics(s in "(<think>|</think>|<answer>|</answer>|[a-z ]){0,40}", opened: bool, r1: bool, strict: bool) {
        let style = if r1 { FormatStyle::R1 } else { FormatStyle::R1Zero };
        let _ = check_format(&s, &FormatConfig { style, think_opened_in_prompt: opened, strict });
        let t = tag_count(&s);
        prop_assert!((0.0..=1.0).contains(&t));
    }

    #[test]
    fn language_never_panics(s in "\\PC{0,200}") {
        let _ = word_scripts(&s);
        let _ = chain_of_thought(&s);
        if let Some(x) = consistency(&s, Script::Cjk) {
            prop_assert!((0.0..=1.0).contains(&x));
        }
    }

    #[test]
    fn countdown_never_panics(s in ".{0,200}", nums in proptest::collection::vec(0i64..100, 0..5), target in -10i64..1000) {
        let out = countdown::score(&format!("<answer>{s}</answer>"), &nums, target);
        prop_assert!(out.score == 0.0 || out.score == FORMAT_SCORE || out.score == 1.0);
    }

    #[test]
    fn length_shaping_is_bounded(len in 0usize..50_000, correct: bool) {
        let p = soft_overlong_penalty(len, &OverlongConfig::default());
        prop_assert!((-1.0..=0.0).contains(&p));
        let c = cosine_scaled(correct, len, &CosineConfig::default());
        prop_assert!((-1.0..=1.0).contains(&c));
        prop_assert_eq!(c > 0.0, correct);
    }
}

#[test]
fn length_shaping_values() {
    let cfg = OverlongConfig {
        max_len: 100,
        cache_len: 20,
    };
    assert_eq!(soft_overlong_penalty(80, &cfg), 0.0);
    assert_eq!(soft_overlong_penalty(90, &cfg), -0.5);
    assert_eq!(soft_overlong_penalty(100, &cfg), -1.0);
    assert_eq!(soft_overlong_penalty(101, &cfg), -1.0);
    assert!(OverlongConfig {
        max_len: 10,
        cache_len: 20
    }
    .validate()
    .is_err());
    let c = CosineConfig::default();
    assert_eq!(cosine_scaled(true, 0, &c), 1.0);
    assert!((cosine_scaled(true, 1000, &c) - 0.5).abs() < 1e-12);
    assert!((cosine_scaled(false, 0, &c) - -1.0).abs() < 1e-12);
    assert!((cosine_scaled(false, 1000, &c) - -0.5).abs() < 1e-12);
    assert!(cosine_scaled(true, 100, &c) > cosine_scaled(true, 900, &c));
    let cfg: CosineConfig = serde_json::from_str(r#"{"max_len": 10}"#).unwrap();
    assert_eq!(cfg.max_len, 10);
    assert!(serde_json::from_str::<CosineConfig>(r#"{"maxlen": 10}"#).is_err());
}

#[test]
fn weighted_sum_and_metrics() {
    let sum = WeightedSum::new()
        .add(MathReward::default(), 1.0)
        .add(FormatReward::default(), 0.5);
    let e = ex(serde_json::json!({"gold": "3"}));
    let good = sum.score(&e, "<think>1+2</think><answer>\\boxed{3}</answer>");
    assert_eq!(good.total, 1.5);
    let wrong = sum.score(&e, "<think>1+2</think><answer>\\boxed{4}</answer>");
    assert_eq!(wrong.total, 0.5);
    let nogold = sum.score(&Example::new(), "<think>1+2</think><answer>\\boxed{4}</answer>");
    assert!(nogold.total.is_nan(), "an unscorable part makes the total unscorable");
    let m = combined_metrics(&[good, wrong, nogold]);
    assert_eq!(m["math"].mean, 0.5);
    assert_eq!(m["math"].counts[&Status::UnparsableGold], 1);
    assert_eq!(m["format"].mean, 1.0);
    let single = metrics(&[Outcome::correct(), Outcome::zero(Status::Wrong)]);
    assert_eq!((single.mean, single.std), (0.5, 0.5));
}

struct Slow;

impl Reward for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn score(&self, _e: &Example, c: &str) -> Outcome {
        if c == "hang" {
            std::thread::sleep(Duration::from_secs(3));
        }
        Outcome::correct()
    }
}

#[test]
fn batch_keeps_order_and_times_out_stuck_items() {
    let items: Vec<Item> = ["a", "hang", "b", "c", "hang", "d"]
        .iter()
        .map(|c| Item {
            example: Example::new(),
            completion: c.to_string(),
        })
        .collect();
    let cfg = BatchConfig {
        workers: 2,
        item_deadline_s: 0.3,
    };
    let t = Instant::now();
    let out = evaluate_batch(Arc::new(Slow), Arc::new(items), &cfg).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a stuck item must not stall the batch"
    );
    let statuses: Vec<Status> = out.iter().map(|o| o.status).collect();
    use Status::*;
    assert_eq!(statuses, vec![Correct, Timeout, Correct, Correct, Timeout, Correct]);
    assert!(BatchConfig {
        workers: 0,
        item_deadline_s: 1.0
    }
    .validate()
    .is_err());

    // Real rewards in parallel give the same results as one by one.
    let items: Vec<Item> = (0..64)
        .map(|i| Item {
            example: ex(serde_json::json!({"gold": format!("{}", i % 7)})),
            completion: format!("\\boxed{{{}}}", i % 5),
        })
        .collect();
    let reward: Arc<dyn Reward> = Arc::new(MathReward::default());
    let par = evaluate_batch(Arc::clone(&reward), Arc::new(items.clone()), &BatchConfig::default()).unwrap();
    for (item, o) in items.iter().zip(&par) {
        assert_eq!(o.status, reward.score(&item.example, &item.completion).status);
    }
}

struct Buggy;

impl Reward for Buggy {
    fn name(&self) -> &str {
        "buggy"
    }
    fn score(&self, _e: &Example, c: &str) -> Outcome {
        if c == "boom" {
            panic!("a bug");
        }
        Outcome::correct()
    }
}

#[test]
fn a_panicking_reward_costs_only_its_item() {
    let items: Vec<Item> = ["a", "boom", "b"]
        .iter()
        .map(|c| Item {
            example: Example::new(),
            completion: c.to_string(),
        })
        .collect();
    let out = evaluate_batch(Arc::new(Buggy), Arc::new(items), &BatchConfig::default()).unwrap();
    let statuses: Vec<Status> = out.iter().map(|o| o.status).collect();
    assert_eq!(statuses, vec![Status::Correct, Status::InfraError, Status::Correct]);
    assert!(out[1].score.is_nan());
}

#[test]
fn lenient_format_checks_the_tags_only() {
    let lenient = FormatConfig {
        strict: false,
        ..FormatConfig::default()
    };
    for t in [
        "<think></think><answer></answer>",
        "<think>a</think> so <answer>1</answer>",
    ] {
        assert!(check_format(t, &FormatConfig::default()).is_err(), "{t}");
        assert_eq!(check_format(t, &lenient), Ok(()), "{t}");
    }
    for t in [
        "<answer>1</answer><think>a</think>",
        "<think>a</think><answer>1</answer>x",
        "x<think>a</think><answer>1</answer>",
    ] {
        assert!(check_format(t, &lenient).is_err(), "{t}");
    }
}

#[test]
fn length_rewards_read_the_token_count() {
    use aha_rewards::length::{CosineLengthReward, SoftOverlongReward, LENGTH_FIELD};
    let r = SoftOverlongReward {
        config: OverlongConfig {
            max_len: 100,
            cache_len: 20,
        },
    };
    let at = |n: u64| ex(serde_json::json!({ LENGTH_FIELD: n, "gold": "3" }));
    assert_eq!(r.score(&at(50), "x").score, 0.0);
    assert_eq!(r.score(&at(90), "x").score, -0.5);
    assert_eq!(r.score(&Example::new(), "x").status, Status::InfraError);
    let c = CosineLengthReward::default();
    assert_eq!(c.score(&at(0), "\\boxed{3}").score, 1.0);
    assert!((c.score(&at(1000), "\\boxed{4}").score - -0.5).abs() < 1e-12);
    assert_eq!(c.score(&at(0), "no box").score, -1.0);
    let no_gold = ex(serde_json::json!({ LENGTH_FIELD: 5 }));
    assert!(c.score(&no_gold, "\\boxed{3}").score.is_nan());
}

/// Scores a batch in one call, counting the calls.
struct Batched(std::sync::atomic::AtomicUsize);

impl Reward for Batched {
    fn name(&self) -> &str {
        "batched"
    }
    fn score(&self, _e: &Example, _c: &str) -> Outcome {
        Outcome::zero(Status::InfraError)
    }
    fn score_many(&self, items: &[Item]) -> Option<Vec<Outcome>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(
            items
                .iter()
                .map(|i| Outcome::new(i.completion.len() as f64, Status::Wrong))
                .collect(),
        )
    }
}

#[test]
fn weighted_batches_use_batch_rewards_and_keep_order() {
    let batched = Arc::new(Batched(std::sync::atomic::AtomicUsize::new(0)));
    let sum = WeightedSum::new()
        .add_shared(batched.clone(), 2.0)
        .add(FormatReward::default(), 1.0)
        .add(MathReward::default(), 0.0);
    let items: Vec<Item> = ["ab", "<think>a</think><answer>1</answer>", "abcd"]
        .iter()
        .map(|c| Item {
            example: Example::new(),
            completion: c.to_string(),
        })
        .collect();
    let rows = aha_rewards::evaluate_weighted(&sum, Arc::new(items), &BatchConfig::default()).unwrap();
    assert_eq!(
        batched.0.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one call for the batch"
    );
    let totals: Vec<f64> = rows.iter().map(|r| r.total).collect();
    assert_eq!(
        totals,
        vec![4.0, 2.0 * 34.0 + 1.0, 8.0],
        "weight 0 leaves the NaN math part out"
    );
    assert!(rows[0].parts[2].1.score.is_nan());
    assert_eq!(rows[1].parts[1].0, "format");
}
