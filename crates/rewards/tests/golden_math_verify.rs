//! Agreement with the verdicts of Math-Verify's own test suite
//! (`tests/fixtures/rewards/math_verify_suite_cases.jsonl`): both sides are
//! extracted leniently, as Math-Verify's `verify(parse(gold), parse(pred))`
//! does by default.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_rewards::math::{verify, Extraction, MathConfig};
use aha_rewards::Status;

/// The agreement reached when this test was written (see the README).
const FLOOR: f64 = 0.95;

#[test]
fn agreement_with_math_verify_suite() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/rewards/math_verify_suite_cases.jsonl"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = MathConfig {
        extraction: Extraction::Any,
        ..MathConfig::default()
    };
    let (mut agreed, mut total, mut agreed_default) = (0, 0, 0);
    for (i, line) in text.lines().enumerate() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let gold = case["gold"].as_str().unwrap();
        let pred = case["pred"].as_str().unwrap();
        let expected = case["expected"].as_i64().unwrap() == 1;
        let mv_default = case["math_verify_default"].as_i64().unwrap() == 1;
        let out = verify(gold, pred, &cfg);
        let ours = out.status == Status::Correct;
        total += 1;
        if ours == expected {
            agreed += 1;
        } else {
            println!(
                "line {}: {} expected {expected} got {ours} ({:?}, {:?})\n  gold {:?}\n  pred {:?}",
                i + 1,
                case["test"],
                out.status,
                out.detail,
                gold.chars().take(160).collect::<String>(),
                pred.chars()
                    .rev()
                    .take(160)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            );
        }
        if ours == mv_default {
            agreed_default += 1;
        }
    }
    let rate = agreed as f64 / total as f64;
    println!("agreement with the suite's expected verdict: {agreed}/{total} = {rate:.4}");
    println!("agreement with Math-Verify's default verify(): {agreed_default}/{total}");
    assert!(rate >= FLOOR, "agreement {agreed}/{total} below {FLOOR}");
}
