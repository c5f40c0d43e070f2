//! `aha rewards`: JSONL in, the same lines with `reward` and `status` out;
//! a malformed line is an error naming its line number.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn tmp(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aha-cli-rewards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aha"))
        .arg("rewards")
        .args(args)
        .output()
        .expect("run aha")
}

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn math_strict_and_lenient() {
    let input = tmp(
        "math.jsonl",
        concat!(
            r#"{"id": 1, "gold": "\\frac{1}{2}", "completion": "so \\boxed{0.5}"}"#,
            "\n",
            r#"{"id": 2, "gold": "3", "completion": "the answer is 3"}"#,
            "\n",
            r#"{"id": 3, "gold": "", "completion": "\\boxed{1}"}"#,
            "\n"
        ),
    );
    let path = input.to_str().unwrap();
    let rows = lines(&run(&["--kind", "math", "--input", path]));
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[0]["id"].as_i64(), rows[0]["reward"].as_f64()),
        (Some(1), Some(1.0))
    );
    assert_eq!(rows[0]["status"], "correct");
    assert_eq!(rows[1]["status"], "no_answer");
    assert_eq!(rows[2]["status"], "unparsable_gold");
    assert!(rows[2]["reward"].is_null(), "excluded from the baseline");
    let rows = lines(&run(&["--kind", "math", "--input", path, "--math-extraction", "any"]));
    assert_eq!(rows[1]["status"], "correct");
    // --out writes the file; key order of the input is kept.
    let out = input.with_extension("out.jsonl");
    let o = run(&["--kind", "math", "--input", path, "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.lines().next().unwrap().starts_with(r#"{"id": 1, "gold""#),
        "{text}"
    );
}

#[test]
fn other_kinds() {
    let cd = tmp(
        "cd.jsonl",
        "{\"nums\": [3, 5, 7], \"target\": 22, \"completion\": \"<answer>3*5+7</answer>\"}\n{\"nums\": [3, 5, 7], \"target\": 22, \"completion\": \"<answer>3*5-7</answer>\"}\n",
    );
    let rows = lines(&run(&["--kind", "countdown", "--input", cd.to_str().unwrap()]));
    assert_eq!(
        (rows[0]["reward"].as_f64(), rows[1]["reward"].as_f64()),
        (Some(1.0), Some(0.1))
    );
    let f = tmp(
        "f.jsonl",
        "{\"completion\": \"<think>a</think><answer>b</answer>\"}\n{\"completion\": \"b\"}\n",
    );
    let rows = lines(&run(&["--kind", "format", "--input", f.to_str().unwrap()]));
    assert_eq!(
        (rows[0]["reward"].as_f64(), rows[1]["reward"].as_f64()),
        (Some(1.0), Some(0.0))
    );
    let rows = lines(&run(&["--kind", "tag-count", "--input", f.to_str().unwrap()]));
    assert_eq!(rows[0]["reward"].as_f64(), Some(1.0));
    let l = tmp(
        "l.jsonl",
        "{\"language\": \"zh\", \"completion\": \"<think>我们计算</think>\"}\n",
    );
    let rows = lines(&run(&["--kind", "language", "--input", l.to_str().unwrap()]));
    assert_eq!(rows[0]["reward"].as_f64(), Some(1.0));
    let c = tmp(
        "c.jsonl",
        "{\"tests\": [{\"stdin\": \"2 3\", \"stdout\": \"5\"}], \"completion\": \"```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```\"}\n",
    );
    let rows = lines(&run(&[
        "--kind",
        "code",
        "--input",
        c.to_str().unwrap(),
        "--code-timeout",
        "5",
    ]));
    assert!(
        rows[0]["status"] == "correct" || rows[0]["status"] == "infra_error",
        "{:?} (infra_error only where the sandbox cannot run)",
        rows[0]
    );
}

#[test]
fn malformed_lines_name_their_line_number() {
    let cases = [
        (
            "{\"gold\": \"1\", \"completion\": \"\\\\boxed{1}\"}\nnot json\n",
            "math",
            ":2: not a JSON value",
        ),
        (
            "{\"gold\": \"1\", \"completion\": \"x\"}\n{\"gold\": \"1\"}\n",
            "math",
            ":2: field `completion`",
        ),
        ("{\"completion\": \"x\"}\n", "math", ":1"),
        ("{\"nums\": [1], \"completion\": \"x\"}\n", "countdown", ":1"),
        ("[1, 2]\n", "format", ":1: not a JSON object"),
        ("{\"completion\": \"x\", \"tests\": 3}\n", "code", ":1"),
        ("{\"completion\": \"x\"}\n", "language", ":1"),
        (
            "{\"completion\": \"x\"}\n\n{\"completion\": \"y\"}\n",
            "format",
            ":2: not a JSON value",
        ),
    ];
    for (i, (content, kind, want)) in cases.iter().enumerate() {
        let p = tmp(&format!("bad{i}.jsonl"), content);
        let out = run(&["--kind", kind, "--input", p.to_str().unwrap()]);
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "case {i}: {err}");
        assert!(out.stdout.is_empty(), "nothing is written for a bad file");
    }
    let out = run(&["--kind", "math", "--input", "/nonexistent.jsonl"]);
    assert!(!out.status.success());
}

#[test]
fn a_scorer_process_scores_the_file_in_one_batch() {
    let script = tmp(
        "score.py",
        "import json, sys\nfor line in sys.stdin:\n    req = json.loads(line)\n    \
         print(json.dumps({\"reward\": len(req[\"completion\"]) + req[\"example\"][\"bonus\"]}), flush=True)\n",
    );
    let input = tmp(
        "cmd.jsonl",
        "{\"completion\": \"ab\", \"bonus\": 0.5}\n{\"completion\": \"abcd\", \"bonus\": 0}\n",
    );
    let rows = lines(&run(&[
        "--kind",
        "command",
        "--command",
        "python3",
        script.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]));
    assert_eq!(
        (rows[0]["reward"].as_f64(), rows[1]["reward"].as_f64()),
        (Some(2.5), Some(4.0))
    );
    // Nothing listening: every line is unscorable (null), not an error.
    let rows = lines(&run(&[
        "--kind",
        "http",
        "--url",
        "http://127.0.0.1:9/reward",
        "--timeout-ms",
        "500",
        "--input",
        input.to_str().unwrap(),
    ]));
    assert!(
        rows.iter()
            .all(|r| r["reward"].is_null() && r["status"] == "infra_error"),
        "{rows:?}"
    );
    let out = run(&["--kind", "http", "--input", input.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--url"));
}
