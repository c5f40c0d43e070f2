//! The code sandbox: correct and wrong programs, stdin/stdout and assert
//! tests, C and Rust where a usable compiler is present, and hostile
//! programs (infinite loop, fork bomb, 10 GiB allocation, writes outside the
//! work directory, sockets, 1 GB of output, reading the parent's
//! environment), each contained, scored 0 with the right status, and
//! followed by a normal run that still passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use aha_rewards::code::{
    capabilities, extract_program, language_available, run_tests, CodeReward, ProgramLanguage, SandboxConfig, TestCase,
    SANDBOX_UID_BASE,
};
use aha_rewards::{Example, Reward, Status};

fn io(stdin: &str, stdout: &str) -> TestCase {
    TestCase::Io {
        stdin: stdin.into(),
        stdout: stdout.into(),
    }
}

/// Short limits so that hostile programs are fast to contain.
fn quick() -> SandboxConfig {
    SandboxConfig {
        timeout_s: 1.5,
        max_processes: 16,
        ..SandboxConfig::default()
    }
}

/// The tests run one at a time, so that the process count after each one
/// sees only its own leftovers.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this machine can run the sandbox at all (network namespace).
fn ready() -> bool {
    let caps = capabilities();
    if !caps.network_namespace {
        println!("skipped: no network namespace on this machine ({caps:?})");
        return false;
    }
    if !language_available(ProgramLanguage::Python, &quick()) {
        println!("skipped: no system python3");
        return false;
    }
    true
}

const ADD: &str = "a, b = map(int, input().split())\nprint(a + b)\n";

fn sane_after() {
    let out = run_tests(ADD, ProgramLanguage::Python, &[io("2 3\n", "5\n")], &quick());
    assert_eq!(
        out.status,
        Status::Correct,
        "the next evaluation is unaffected: {out:?}"
    );
    if capabilities().root {
        assert_eq!(sandbox_processes(), 0, "no sandbox process survives");
    }
}

/// Processes running under a sandbox uid.
fn sandbox_processes() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if status
            .lines()
            .any(|l| l.starts_with("State:") && (l.contains("Z (zombie)") || l.contains("X (dead)")))
        {
            continue;
        }
        let uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if uid.is_some_and(|u| (SANDBOX_UID_BASE..SANDBOX_UID_BASE + 4096).contains(&u)) {
            n += 1;
        }
    }
    n
}

#[test]
fn python_io_and_assert_tests() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let tests = [io("2 3\n", "5\n"), io("10 -4", "6")];
    assert_eq!(
        run_tests(ADD, ProgramLanguage::Python, &tests, &quick()).status,
        Status::Correct
    );
    let wrong = "a, b = map(int, input().split())\nprint(a - b)\n";
    let out = run_tests(wrong, ProgramLanguage::Python, &tests, &quick());
    assert_eq!(out.status, Status::Wrong);
    assert!(out.detail.unwrap().contains("wrong output"));
    let crash = "raise SystemExit(3)";
    let out = run_tests(crash, ProgramLanguage::Python, &tests, &quick());
    assert_eq!(out.status, Status::Wrong);
    assert!(out.detail.unwrap().contains("runtime error"));
    let f = "def sq(x):\n    return x * x\n";
    let asserts = [TestCase::Assert {
        code: "assert sq(3) == 9".into(),
    }];
    assert_eq!(
        run_tests(f, ProgramLanguage::Python, &asserts, &quick()).status,
        Status::Correct
    );
    let bad = [TestCase::Assert {
        code: "assert sq(3) == 10".into(),
    }];
    assert_eq!(
        run_tests(f, ProgramLanguage::Python, &bad, &quick()).status,
        Status::Wrong
    );
    assert_eq!(
        run_tests(f, ProgramLanguage::Python, &[], &quick()).status,
        Status::InfraError
    );
}

#[test]
fn reward_reads_the_example_and_the_last_code_block() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let completion = format!("First try:\n```python\nprint(0)\n```\nBetter:\n```python\n{ADD}```\n");
    assert_eq!(extract_program(&completion).unwrap().1, ADD);
    let ex: Example = serde_json::from_value(serde_json::json!({
        "tests": [{"stdin": "1 2", "stdout": "3"}, {"stdin": "5 5", "stdout": "10\n"}]
    }))
    .unwrap();
    let reward = CodeReward { config: quick() };
    assert_eq!(reward.score(&ex, &completion).status, Status::Correct);
    assert_eq!(reward.score(&ex, "no code").status, Status::NoAnswer);
    assert_eq!(
        reward.score(&Example::new(), &completion).status,
        Status::UnparsableGold
    );
}

#[test]
fn parallel_runs_do_not_interfere() {
    let _guard = serial();
    if !ready() {
        return;
    }
    use std::sync::Arc;
    let reward: Arc<dyn Reward> = Arc::new(CodeReward { config: quick() });
    let items: Vec<aha_rewards::Item> = (0..6)
        .map(|i| aha_rewards::Item {
            example: serde_json::from_value(
                serde_json::json!({"tests": [{"stdin": format!("{i} 1"), "stdout": format!("{}", i + 1)}]}),
            )
            .unwrap(),
            completion: if i == 2 {
                "```python\nwhile True: pass\n```".to_string()
            } else {
                format!("```python\n{ADD}```")
            },
        })
        .collect();
    let out = aha_rewards::evaluate_batch(reward, Arc::new(items), &aha_rewards::BatchConfig::default()).unwrap();
    for (i, o) in out.iter().enumerate() {
        let want = if i == 2 { Status::Timeout } else { Status::Correct };
        assert_eq!(o.status, want, "item {i}: {o:?}");
    }
}

#[test]
fn c_and_rust_where_available() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let c = "#include <stdio.h>\nint main(void){long a,b; if(scanf(\"%ld %ld\",&a,&b)!=2) return 1; printf(\"%ld\\n\", a+b); return 0;}\n";
    let tests = [io("2 3", "5")];
    if language_available(ProgramLanguage::C, &quick()) {
        let out = run_tests(c, ProgramLanguage::C, &tests, &quick());
        assert_eq!(out.status, Status::Correct, "{out:?}");
        let out = run_tests("int main( {", ProgramLanguage::C, &tests, &quick());
        assert_eq!(out.status, Status::Wrong);
        assert!(out.detail.unwrap().contains("compilation failed"));
    } else {
        println!("skipped C: no gcc");
    }
    let rs = "use std::io::Read;\nfn main(){let mut s=String::new();std::io::stdin().read_to_string(&mut s).unwrap();let v:Vec<i64>=s.split_whitespace().map(|x|x.parse().unwrap()).collect();println!(\"{}\",v[0]+v[1]);}\n";
    if language_available(ProgramLanguage::Rust, &quick()) {
        let out = run_tests(rs, ProgramLanguage::Rust, &tests, &quick());
        match out.status {
            Status::Correct => {}
            Status::InfraError => println!("skipped Rust: {:?}", out.detail),
            other => panic!("rust: {other:?} {out:?}"),
        }
    } else {
        println!("skipped Rust: no rustc");
    }
}

#[test]
fn hostile_infinite_loop_times_out() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let t = Instant::now();
    let out = run_tests(
        "while True:\n    pass\n",
        ProgramLanguage::Python,
        &[io("", "1")],
        &quick(),
    );
    assert_eq!(out.status, Status::Timeout);
    assert_eq!(out.score, 0.0);
    assert!(t.elapsed() < Duration::from_secs(5));
    sane_after();
}

#[test]
fn hostile_fork_bomb_is_contained() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let t = Instant::now();
    let out = run_tests(bomb, ProgramLanguage::Python, &[io("", "1")], &quick());
    assert_eq!(out.score, 0.0);
    assert!(matches!(out.status, Status::Timeout | Status::Wrong), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    sane_after();
}

#[test]
fn hostile_allocation_fails() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let hog = "x = bytearray(10 * 1024 ** 3)\nprint('allocated')\n";
    let out = run_tests(hog, ProgramLanguage::Python, &[io("", "allocated")], &quick());
    assert_eq!(out.status, Status::Wrong, "{out:?}");
    assert!(out.detail.unwrap().contains("MemoryError"));
    sane_after();
}

#[test]
fn hostile_writes_stay_inside() {
    let _guard = serial();
    if !ready() {
        return;
    }
    // A world-writable directory on the host: only the sandbox's own
    // file-system view (or uid) keeps the program out of it.
    let target = std::env::temp_dir().join(format!("aha-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&target).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let escape = target.join("escaped.txt");
    let prog = format!(
        "import os\nok = 0\nfor p in [{:?}, '/escaped.txt', '/etc/escaped.txt', '../escaped.txt', '../../escaped.txt']:\n    try:\n        open(p, 'w').write('x')\n        ok += 1\n    except OSError:\n        pass\nprint('escaped' if ok else 'contained')\n",
        escape.display().to_string()
    );
    let out = run_tests(&prog, ProgramLanguage::Python, &[io("", "escaped")], &quick());
    let exists = escape.exists() || std::path::Path::new("/escaped.txt").exists();
    let _ = std::fs::remove_dir_all(&target);
    if capabilities().root {
        assert_eq!(out.status, Status::Wrong, "{out:?}");
        assert!(!exists, "a file was written outside the sandbox");
    } else {
        println!("not root: writes are limited only by this user's permissions ({out:?})");
    }
    // Files larger than the limit are cut (RLIMIT_FSIZE).
    let big = "f = open('big', 'wb')\nf.write(b'x' * (64 << 20))\nprint('wrote')\n";
    let out = run_tests(big, ProgramLanguage::Python, &[io("", "wrote")], &quick());
    assert_eq!(out.status, Status::Wrong, "{out:?}");
    sane_after();
}

#[test]
fn hostile_socket_has_no_network() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let prog = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\nprint('connected')\n"
    );
    let out = run_tests(&prog, ProgramLanguage::Python, &[io("", "connected")], &quick());
    assert_eq!(out.status, Status::Wrong, "{out:?}");
    assert!(listener.accept().is_err(), "the sandbox reached the host's loopback");
    let dns = "import socket\nsocket.getaddrinfo('example.com', 80)\nprint('resolved')\n";
    assert_eq!(
        run_tests(dns, ProgramLanguage::Python, &[io("", "resolved")], &quick()).status,
        Status::Wrong
    );
    sane_after();
}

#[test]
fn hostile_output_flood_is_capped() {
    let _guard = serial();
    if !ready() {
        return;
    }
    let flood = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n";
    let t = Instant::now();
    let out = run_tests(flood, ProgramLanguage::Python, &[io("", "x")], &quick());
    assert_eq!(out.status, Status::Wrong, "{out:?}");
    assert!(out.detail.unwrap().contains("output limit"));
    assert!(t.elapsed() < Duration::from_secs(5));
    sane_after();
}

#[test]
fn hostile_environment_is_not_readable() {
    let _guard = serial();
    if !ready() {
        return;
    }
    // Set by cargo for this test process.
    let secret = std::env::var("CARGO_MANIFEST_DIR")
        .or_else(|_| std::env::var("PATH"))
        .unwrap();
    let prog = format!(
        "import os\nsecret = {secret:?}\nleak = any(secret in v for v in os.environ.values())\ntry:\n    leak = leak or secret in open('/proc/%d/environ' % os.getppid()).read()\nexcept OSError:\n    pass\nprint(sorted(os.environ))\nprint('leaked' if leak else 'clean')\n"
    );
    let out = run_tests(&prog, ProgramLanguage::Python, &[io("", "leaked")], &quick());
    if capabilities().root {
        assert_eq!(out.status, Status::Wrong, "{out:?}");
    }
    // Only the sandbox's own variables are set.
    let env = "import os\nprint(' '.join(sorted(os.environ)))\n";
    let want = "HOME LANG PATH PYTHONDONTWRITEBYTECODE PYTHONHASHSEED TMPDIR";
    let out = run_tests(env, ProgramLanguage::Python, &[io("", want)], &quick());
    assert_eq!(out.status, Status::Correct, "{out:?}");
    sane_after();
}
