//! Rewards written outside Rust: a long-lived scorer process speaking JSON
//! lines ([`CommandReward`]) or an HTTP endpoint ([`HttpReward`], OpenRLHF's
//! remote reward protocol).
//!
//! Both send, per completion, the request object
//! `{"prompt": ..., "completion": ..., "example": {...the dataset row...}}`
//! (`prompt` is the row's `prompt` field when it is a string, else empty).
//! A scorer that crashes, hangs, answers late or prints something that is
//! not a reward never stops training: the affected completions get
//! [`Status::InfraError`] (score NaN, left out of the group baseline) and one
//! warning line on stderr.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::batch::Item;
use crate::error::{Error, Result};
use crate::outcome::{Example, Outcome, Reward, Status};

/// Longest reply line (or HTTP response) read from a scorer, in bytes.
const MAX_REPLY_BYTES: u64 = 16 << 20;

/// One request object, as sent to a scorer.
pub fn request_json(example: &Example, completion: &str) -> Value {
    let prompt = example.get("prompt").and_then(Value::as_str).unwrap_or("");
    json!({"prompt": prompt, "completion": completion, "example": example})
}

/// Read a reward from a scorer's reply: a number, or an object with a
/// numeric `reward` (or `score`) field. `None` otherwise.
pub fn parse_reward(v: &Value) -> Option<f64> {
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::Object(m) => m.get("reward").or_else(|| m.get("score")).and_then(Value::as_f64),
        _ => None,
    }?;
    x.is_finite().then_some(x)
}

fn infra(name: &str, why: &str) -> Outcome {
    eprintln!("warning: reward `{name}`: {why}");
    Outcome::zero(Status::InfraError).with_detail(why.to_string())
}

fn scored(x: f64) -> Outcome {
    Outcome::new(x, if x > 0.0 { Status::Correct } else { Status::Wrong })
}

/// Settings of a [`CommandReward`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The name used in metrics.
    pub name: String,
    /// The program and its arguments (`["python3", "score.py"]`).
    pub command: Vec<String>,
    /// Time allowed for a whole batch's replies, in milliseconds (default
    /// 30000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    30_000
}

impl CommandConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(Error::Config("command reward: empty command".into()));
        }
        if self.timeout_ms == 0 {
            return Err(Error::Config("command reward: timeout_ms must be positive".into()));
        }
        Ok(())
    }
}

/// A running scorer: the child, a writer thread's channel and the reply lines.
struct Scorer {
    child: Child,
    to_stdin: mpsc::Sender<Vec<u8>>,
    lines: Receiver<std::io::Result<Vec<u8>>>,
}

impl Scorer {
    fn spawn(command: &[String]) -> std::io::Result<Scorer> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty command"))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (to_stdin, from_main) = mpsc::channel::<Vec<u8>>();
        // Writes happen off the caller's thread: a scorer that stops reading
        // fills the pipe and would block a direct write for ever.
        std::thread::Builder::new()
            .name("aha-scorer-stdin".into())
            .spawn(move || writer(stdin, &from_main))?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("aha-scorer-stdout".into())
            .spawn(move || {
                let mut r = BufReader::new(stdout);
                loop {
                    let mut buf = Vec::new();
                    match r.by_ref().take(MAX_REPLY_BYTES).read_until(b'\n', &mut buf) {
                        Ok(0) => return,
                        Ok(_) if buf.last() != Some(&b'\n') && buf.len() as u64 >= MAX_REPLY_BYTES => {
                            let _ = tx.send(Err(std::io::Error::other("reply line too long")));
                            return;
                        }
                        Ok(_) => {
                            if tx.send(Ok(buf)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            })?;
        Ok(Scorer { child, to_stdin, lines })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn writer(mut stdin: ChildStdin, from_main: &Receiver<Vec<u8>>) {
    while let Ok(bytes) = from_main.recv() {
        if stdin.write_all(&bytes).and_then(|_| stdin.flush()).is_err() {
            return;
        }
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A reward computed by an external long-lived process.
///
/// The process reads one JSON request per line on stdin (see
/// [`request_json`]) and writes one reply per line on stdout, in order: a
/// number or `{"reward": x}`. A batch is written at once and its replies are
/// awaited for [`CommandConfig::timeout_ms`]; past it, or when the process
/// exits, the process is killed and started again for the next batch. A
/// reply that is not a reward costs only its own item. Calls are serialised
/// (one process).
pub struct CommandReward {
    config: CommandConfig,
    scorer: Mutex<Option<Scorer>>,
}

impl CommandReward {
    /// A command reward; the process starts on the first batch.
    pub fn new(config: CommandConfig) -> Result<Self> {
        config.validate()?;
        Ok(CommandReward {
            config,
            scorer: Mutex::new(None),
        })
    }

    /// Score a batch with one round trip; one outcome per item, in order.
    pub fn score_batch(&self, items: &[Item]) -> Vec<Outcome> {
        let name = self.config.name.as_str();
        if items.is_empty() {
            return Vec::new();
        }
        let mut guard = match self.scorer.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        // A process that exited since the last batch is replaced.
        if let Some(s) = guard.as_mut() {
            if !matches!(s.child.try_wait(), Ok(None)) {
                *guard = None;
            }
        }
        if guard.is_none() {
            match Scorer::spawn(&self.config.command) {
                Ok(s) => *guard = Some(s),
                Err(e) => {
                    let o = infra(name, &format!("cannot start {:?}: {e}", self.config.command[0]));
                    return vec![o; items.len()];
                }
            }
        }
        let Some(scorer) = guard.as_mut() else {
            return vec![infra(name, "no scorer process"); items.len()];
        };
        let mut payload = Vec::new();
        for it in items {
            payload.extend_from_slice(request_json(&it.example, &it.completion).to_string().as_bytes());
            payload.push(b'\n');
        }
        if scorer.to_stdin.send(payload).is_err() {
            *guard = None;
            return vec![infra(name, "the scorer's stdin is closed"); items.len()];
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.timeout_ms);
        let mut out = Vec::with_capacity(items.len());
        let mut broken: Option<String> = None;
        for _ in items {
            if let Some(why) = &broken {
                out.push(Outcome::zero(Status::InfraError).with_detail(why.clone()));
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match scorer.lines.recv_timeout(left) {
                Ok(Ok(line)) => {
                    let reply = serde_json::from_slice::<Value>(&line).ok();
                    match reply.as_ref().and_then(parse_reward) {
                        Some(x) => out.push(scored(x)),
                        None => {
                            let text = String::from_utf8_lossy(&line);
                            let short: String = text.trim().chars().take(80).collect();
                            out.push(infra(name, &format!("not a reward: {short:?}")));
                        }
                    }
                }
                Ok(Err(e)) => broken = Some(format!("reading the scorer: {e}")),
                Err(RecvTimeoutError::Timeout) => {
                    broken = Some(format!(
                        "the scorer did not answer within {} ms",
                        self.config.timeout_ms
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => broken = Some("the scorer exited".into()),
            }
            if let Some(why) = &broken {
                eprintln!("warning: reward `{name}`: {why}; restarting it for the next batch");
                out.push(Outcome::zero(Status::InfraError).with_detail(why.clone()));
            }
        }
        if broken.is_some() {
            // Its replies are out of step with the requests now.
            *guard = None;
        }
        out
    }
}

impl Reward for CommandReward {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let item = Item {
            example: example.clone(),
            completion: completion.to_string(),
        };
        self.score_batch(std::slice::from_ref(&item))
            .pop()
            .unwrap_or_else(|| Outcome::zero(Status::InfraError))
    }

    fn score_many(&self, items: &[Item]) -> Option<Vec<Outcome>> {
        Some(self.score_batch(items))
    }
}

/// Settings of an [`HttpReward`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The name used in metrics.
    pub name: String,
    /// `http://host:port/path` (plain HTTP; put a TLS proxy in front for
    /// HTTPS).
    pub url: String,
    /// Time allowed per attempt (connect, send, whole reply), in
    /// milliseconds (default 30000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Further attempts after a connection error, a timeout or a 5xx reply
    /// (default 2).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_retries() -> u32 {
    2
}

/// A reward computed by an HTTP endpoint, with OpenRLHF's remote reward
/// protocol: one `POST` per batch of
/// `{"query": [prompt + completion, ...], "prompts": [...], "labels": [gold, ...], "items": [request, ...]}`
/// (`items` are [`request_json`] objects), answered by
/// `{"rewards": [x, ...]}` (or `"scores"`), one per item. HTTP/1.1 over a
/// `TcpStream` from the standard library: no dependency.
pub struct HttpReward {
    config: HttpConfig,
    host: String,
    addr: String,
    path: String,
}

impl HttpReward {
    /// An HTTP reward; the URL must be `http://host[:port][/path]`.
    pub fn new(config: HttpConfig) -> Result<Self> {
        let rest = config.url.strip_prefix("http://").ok_or_else(|| {
            Error::Config(format!(
                "http reward: url must start with http://, got {:?}",
                config.url
            ))
        })?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if hostport.is_empty() || config.timeout_ms == 0 {
            return Err(Error::Config(format!(
                "http reward: bad url or timeout in {:?}",
                config.url
            )));
        }
        let addr = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        Ok(HttpReward {
            host: hostport.to_string(),
            addr,
            path,
            config,
        })
    }

    /// Score a batch with one request (retried as configured); one outcome
    /// per item, in order.
    pub fn score_batch(&self, items: &[Item]) -> Vec<Outcome> {
        let name = self.config.name.as_str();
        if items.is_empty() {
            return Vec::new();
        }
        let requests: Vec<Value> = items.iter().map(|i| request_json(&i.example, &i.completion)).collect();
        let label = |e: &Example| match e.get("gold").or_else(|| e.get("answer")) {
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(v) => v.clone(),
            None => Value::Null,
        };
        let body = json!({
            "query": items.iter().zip(&requests).map(|(i, r)| {
                format!("{}{}", r["prompt"].as_str().unwrap_or(""), i.completion)
            }).collect::<Vec<_>>(),
            "prompts": requests.iter().map(|r| r["prompt"].clone()).collect::<Vec<_>>(),
            "labels": items.iter().map(|i| label(&i.example)).collect::<Vec<_>>(),
            "items": requests,
        })
        .to_string();
        let mut last_err = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(10))));
            }
            match self.post(&body) {
                Ok((status, reply)) if (200..300).contains(&status) => return self.read_rewards(&reply, items.len()),
                Ok((status, _)) if status < 500 => {
                    return vec![infra(name, &format!("HTTP {status} from {}", self.config.url)); items.len()];
                }
                Ok((status, _)) => last_err = format!("HTTP {status}"),
                Err(e) => last_err = e.to_string(),
            }
        }
        let why = format!(
            "{} failed after {} attempts: {last_err}",
            self.config.url,
            self.config.retries + 1
        );
        vec![infra(name, &why); items.len()]
    }

    fn read_rewards(&self, reply: &[u8], n: usize) -> Vec<Outcome> {
        let name = self.config.name.as_str();
        let v: Value = match serde_json::from_slice(reply) {
            Ok(v) => v,
            Err(e) => return vec![infra(name, &format!("reply is not JSON: {e}")); n],
        };
        let list = v.get("rewards").or_else(|| v.get("scores")).and_then(Value::as_array);
        match list {
            Some(l) if l.len() == n => l
                .iter()
                .map(|x| match parse_reward(x) {
                    Some(x) => scored(x),
                    None => infra(name, &format!("not a reward: {x}")),
                })
                .collect(),
            _ => vec![infra(name, &format!("reply has no list of {n} rewards")); n],
        }
    }

    /// One POST; the status code and the body.
    fn post(&self, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let deadline = Instant::now() + timeout;
        let addr = self
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("cannot resolve {}", self.addr)))?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_write_timeout(Some(timeout))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        stream.flush()?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "reply timed out"));
            }
            stream.set_read_timeout(Some(left))?;
            let k = stream.read(&mut chunk)?;
            if k == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..k]);
            if raw.len() as u64 > MAX_REPLY_BYTES {
                return Err(std::io::Error::other("reply too large"));
            }
            if let Some(done) = complete_response(&raw) {
                return done;
            }
        }
        complete_response(&raw).unwrap_or_else(|| Err(std::io::Error::other("truncated reply")))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The status and body of a complete HTTP/1.1 response; `None` while more
/// bytes are needed.
fn complete_response(raw: &[u8]) -> Option<std::io::Result<(u16, Vec<u8>)>> {
    let bad = |why: &str| Some(Err(std::io::Error::other(why.to_string())));
    let end = find(raw, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    let mut lines = head.lines();
    let status: u16 = match lines.next().and_then(|l| l.split_whitespace().nth(1)).map(str::parse) {
        Some(Ok(s)) => s,
        _ => return bad("bad status line"),
    };
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let line_end = find(rest, b"\r\n")?;
            let size_text = String::from_utf8_lossy(&rest[..line_end]);
            let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
                return bad("bad chunk size");
            };
            let start = line_end + 2;
            if size == 0 {
                return Some(Ok((status, out)));
            }
            if rest.len() < start + size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[start..start + size]);
            rest = &rest[start + size + 2..];
        }
    }
    match header("content-length").map(|v| v.parse::<usize>()) {
        Some(Ok(n)) if body.len() >= n => Some(Ok((status, body[..n].to_vec()))),
        Some(Ok(_)) => None,
        Some(Err(_)) => bad("bad content-length"),
        // Without a length the body ends when the server closes.
        None => None,
    }
}

impl Reward for HttpReward {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let item = Item {
            example: example.clone(),
            completion: completion.to_string(),
        };
        self.score_batch(std::slice::from_ref(&item))
            .pop()
            .unwrap_or_else(|| Outcome::zero(Status::InfraError))
    }

    fn score_many(&self, items: &[Item]) -> Option<Vec<Outcome>> {
        Some(self.score_batch(items))
    }
}
