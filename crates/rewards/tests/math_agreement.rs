//! Agreement with Math-Verify on hand-written completions, per behaviour
//! category (`tests/fixtures/rewards/math_agreement_cases.jsonl`; the
//! verdicts were recorded by `scripts/math_verify_agreement.py`). Both
//! sides extract leniently, as Math-Verify's default
//! `verify(parse(gold), parse(pred))` does. Prints the table kept in the
//! README and asserts a floor per category.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use aha_rewards::math::{verify, Extraction, MathConfig};
use aha_rewards::Status;

/// The lowest agreement accepted in any one category.
const FLOOR: f64 = 0.9;

#[test]
fn agreement_with_math_verify_per_category() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/rewards/math_agreement_cases.jsonl"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = MathConfig {
        extraction: Extraction::Any,
        ..MathConfig::default()
    };
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let category = case["category"].as_str().unwrap().to_string();
        let gold = case["gold"].as_str().unwrap();
        let pred = case["pred"].as_str().unwrap();
        let expected = case["math_verify"].as_i64().unwrap() == 1;
        let out = verify(gold, pred, &cfg);
        let ours = out.status == Status::Correct;
        let entry = per.entry(category.clone()).or_default();
        entry.1 += 1;
        if ours == expected {
            entry.0 += 1;
        } else {
            println!(
                "line {} [{category}]: Math-Verify {expected}, ours {ours} ({:?}, {:?})\n  gold {gold:?}\n  pred {pred:?}",
                i + 1,
                out.status,
                out.detail
            );
        }
    }
    let (mut agreed, mut total) = (0, 0);
    for (category, (a, n)) in &per {
        println!("{category:>12}: {a}/{n} = {:.1}%", 100.0 * *a as f64 / *n as f64);
        agreed += a;
        total += n;
    }
    println!(
        "{:>12}: {agreed}/{total} = {:.1}%",
        "all",
        100.0 * agreed as f64 / total as f64
    );
    for (category, (a, n)) in &per {
        let rate = *a as f64 / *n as f64;
        assert!(rate >= FLOOR, "{category}: agreement {a}/{n} below {FLOOR}");
    }
}
