//! Rewards outside Rust: a JSON-lines scorer process and an HTTP endpoint,
//! including scorers that crash, hang and print garbage, and a server that
//! fails once, then answers. Every case is bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use aha_rewards::external::{CommandConfig, CommandReward, HttpConfig, HttpReward};
use aha_rewards::{Example, Item, Reward, Status};

/// Reward 1 when the completion equals the row's gold, else 0; it exits
/// after `exit_after` requests when that argument is given.
const SCORER: &str = r#"
import json, sys
limit = int(sys.argv[1]) if len(sys.argv) > 1 else -1
for n, line in enumerate(sys.stdin):
    r = json.loads(line)
    ok = r["completion"].strip() == str(r["example"].get("gold"))
    print(json.dumps({"reward": 1.0 if ok else 0.0}), flush=True)
    if n + 1 == limit:
        sys.exit(0)
"#;

fn item(gold: &str, completion: &str) -> Item {
    let mut example = Example::new();
    example.insert("gold".into(), gold.into());
    example.insert("prompt".into(), "What is it? ".into());
    Item {
        example,
        completion: completion.into(),
    }
}

fn python(args: &[&str]) -> Vec<String> {
    let mut v = vec!["python3".to_string(), "-c".to_string(), SCORER.to_string()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn command(cmd: Vec<String>, timeout_ms: u64) -> CommandReward {
    CommandReward::new(CommandConfig {
        name: "user".into(),
        command: cmd,
        timeout_ms,
    })
    .unwrap()
}

#[test]
fn command_scorer_scores_a_batch_in_order() {
    let r = command(python(&[]), 10_000);
    let items = [item("4", "4"), item("4", "5"), item("x", "x")];
    let out = r.score_batch(&items);
    let scores: Vec<f64> = out.iter().map(|o| o.score).collect();
    assert_eq!(scores, vec![1.0, 0.0, 1.0]);
    assert_eq!(out[1].status, Status::Wrong);
    // The same process serves the next call (through the Reward trait).
    assert_eq!(r.score(&items[0].example, "4").score, 1.0);
}

#[test]
fn command_scorer_that_exits_is_restarted() {
    let r = command(python(&["1"]), 10_000);
    let items = [item("1", "1"), item("1", "2")];
    let out = r.score_batch(&items);
    assert_eq!(out[0].score, 1.0);
    assert_eq!(out[1].status, Status::InfraError);
    assert!(out[1].score.is_nan());
    // A fresh process answers the next batch.
    let out = r.score_batch(&items[..1]);
    assert_eq!(out[0].score, 1.0);
}

#[test]
fn crashing_hanging_and_garbage_scorers_give_infra_errors() {
    let sh = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
    let items = [item("1", "1"), item("1", "1")];
    for (script, timeout_ms) in [
        ("exit 3", 5_000),
        ("sleep 30", 500),
        (
            "cat > /dev/null & while true; do echo 'hello there'; sleep 0.01; done",
            5_000,
        ),
        ("echo '{\"reward\": \"high\"}'; echo 'null'; sleep 30", 5_000),
    ] {
        let r = command(sh(script), timeout_ms);
        let t = Instant::now();
        let out = r.score_batch(&items);
        assert!(t.elapsed() < Duration::from_secs(8), "{script}: took {:?}", t.elapsed());
        for o in &out {
            assert_eq!(o.status, Status::InfraError, "{script}: {o:?}");
            assert!(o.score.is_nan());
        }
    }
    let missing = command(vec!["/nonexistent/scorer".into()], 1_000);
    assert_eq!(missing.score_batch(&items)[0].status, Status::InfraError);
    assert!(CommandReward::new(CommandConfig {
        name: "x".into(),
        command: vec![],
        timeout_ms: 1
    })
    .is_err());
}

/// A local server answering `replies` connections in turn: `Some(status)`
/// answers with that status (rewards = completion lengths on 200), `None`
/// reads the request and never answers.
fn server(replies: Vec<Option<u16>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/reward", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for reply in replies {
            let Ok((mut s, _)) = listener.accept() else { return };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let body = loop {
                let k = s.read(&mut buf).unwrap_or(0);
                if k == 0 {
                    break Vec::new();
                }
                raw.extend_from_slice(&buf[..k]);
                let text = String::from_utf8_lossy(&raw).to_string();
                if let Some(p) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if raw.len() >= p + 4 + len {
                        break raw[p + 4..p + 4 + len].to_vec();
                    }
                }
            };
            match reply {
                None => held.push(s),
                Some(status) => {
                    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let rewards: Vec<f64> = req["items"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|i| i["completion"].as_str().unwrap().len() as f64)
                                .collect()
                        })
                        .unwrap_or_default();
                    assert_eq!(req["labels"][0], "7");
                    assert!(req["query"][0].as_str().unwrap().starts_with("What is it? "));
                    let body = serde_json::json!({ "rewards": rewards }).to_string();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes());
                }
            }
        }
        std::thread::sleep(Duration::from_secs(10));
        drop(held);
    });
    url
}

fn http(url: String, timeout_ms: u64, retries: u32) -> HttpReward {
    HttpReward::new(HttpConfig {
        name: "remote".into(),
        url,
        timeout_ms,
        retries,
    })
    .unwrap()
}

#[test]
fn http_reward_posts_a_batch_and_retries() {
    let r = http(server(vec![Some(200)]), 5_000, 0);
    let out = r.score_batch(&[item("7", "abc"), item("7", "")]);
    assert_eq!(out[0].score, 3.0);
    assert_eq!(out[1].status, Status::Wrong);
    // A 503 and a silent connection, then an answer: retried.
    let r = http(server(vec![Some(503), None, Some(200)]), 700, 2);
    let t = Instant::now();
    let out = r.score_batch(&[item("7", "ab")]);
    assert_eq!(out[0].score, 2.0, "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn http_reward_failures_are_infra_errors() {
    // Silent server: every attempt times out.
    let r = http(server(vec![None, None]), 300, 1);
    let t = Instant::now();
    let out = r.score_batch(&[item("7", "ab")]);
    assert_eq!(out[0].status, Status::InfraError);
    assert!(out[0].score.is_nan());
    assert!(t.elapsed() < Duration::from_secs(4));
    // A client error is not retried.
    let r = http(server(vec![Some(404)]), 2_000, 3);
    assert_eq!(r.score_batch(&[item("7", "ab")])[0].status, Status::InfraError);
    // Nothing listening.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = http(format!("http://127.0.0.1:{port}/"), 500, 1);
    assert_eq!(r.score_batch(&[item("7", "ab")])[0].status, Status::InfraError);
    assert!(HttpReward::new(HttpConfig {
        name: "x".into(),
        url: "https://example.com".into(),
        timeout_ms: 1,
        retries: 0
    })
    .is_err());
}
