//! Code execution reward: a program (the last fenced code block of the
//! completion) run against test cases in a sandbox.
//!
//! Each run gets a fresh work directory, a cleared environment, its own
//! process group (killed with SIGKILL at the deadline; the deadline is a
//! wall-clock poll, not a signal), and `setrlimit` on address space, CPU
//! time, processes, file size, open files and core dumps. Output is
//! captured up to a cap; past it the run is stopped.
//!
//! Isolation beyond rlimits depends on privileges:
//! - network: a new network namespace (`unshare(CLONE_NEWNET)`; unprivileged
//!   users try a user namespace too). Where the kernel refuses,
//!   [`NetworkIsolation::Required`] (the default) makes every run an
//!   `InfraError` (never a wrong answer), and [`NetworkIsolation::BestEffort`]
//!   runs with the host's network.
//! - as root: a new mount namespace where the work directory is bind-mounted
//!   on `/tmp` and fresh small tmpfs cover `/var/tmp` and `/dev/shm`, then the
//!   program runs as an unprivileged uid of its own (`SANDBOX_UID_BASE + slot`,
//!   reserved by a file lock so that concurrent runs, in this process or
//!   another, never share one) with no supplementary groups and `no_new_privs`. So it cannot write
//!   outside its directory, read the parent's `/proc/<pid>/environ`, or
//!   signal other processes, and `RLIMIT_NPROC` (which does not bind root)
//!   applies. After each run, every process of that uid is killed
//!   (`kill(-1, SIGKILL)` from a child that takes the uid), so even a
//!   fork bomb that escaped its process group is gone before the next run.
//! - not root: the program runs as the calling user; process-group kill and
//!   rlimits still apply, but files writable by that user are writable.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::outcome::{Example, Outcome, Reward, Status};

/// First uid used for sandboxed programs when running as root; each
/// concurrent run takes its own uid in `SANDBOX_UID_BASE..SANDBOX_UID_BASE + 4096`.
pub const SANDBOX_UID_BASE: u32 = 700_000;
const UID_SLOTS: u32 = 4096;

/// What to do where no network namespace can be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NetworkIsolation {
    /// Refuse to run (status `InfraError`): no code ever runs with network.
    #[default]
    Required,
    /// Run anyway, with the host's network.
    BestEffort,
}

/// The language of a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProgramLanguage {
    /// Python 3 (a system interpreter the sandbox user can run).
    #[default]
    Python,
    /// C, compiled with `gcc -O2 -std=gnu11 -lm`.
    C,
    /// Rust, compiled with `rustc -O --edition 2021`.
    Rust,
}

impl std::str::FromStr for ProgramLanguage {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Ok(ProgramLanguage::Python),
            "c" => Ok(ProgramLanguage::C),
            "rust" | "rs" => Ok(ProgramLanguage::Rust),
            other => Err(Error::field(
                "program_language",
                format!("unsupported language {other:?}"),
            )),
        }
    }
}

/// Limits of the sandbox.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Wall-clock limit per test in seconds (default 10).
    pub timeout_s: f64,
    /// Address-space limit in MiB (default 1024).
    pub memory_mib: u64,
    /// Processes (RLIMIT_NPROC) for the sandbox uid (default 64).
    pub max_processes: u64,
    /// Largest file the program may write, in bytes (default 16 MiB).
    pub max_file_bytes: u64,
    /// Open file descriptors (default 64).
    pub max_open_files: u64,
    /// Captured stdout in bytes; past it the run stops (default 1 MiB).
    pub max_output_bytes: usize,
    /// Wall-clock limit for compiling C or Rust, in seconds (default 60).
    pub compile_timeout_s: f64,
    /// Address-space limit for compilers in MiB (default 4096).
    pub compile_memory_mib: u64,
    /// Where network namespaces are unavailable (default: refuse).
    pub network: NetworkIsolation,
    /// Python interpreter (default: the first of /usr/bin/python3,
    /// /usr/local/bin/python3, /bin/python3).
    pub python: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            timeout_s: 10.0,
            memory_mib: 1024,
            max_processes: 64,
            max_file_bytes: 16 << 20,
            max_open_files: 64,
            max_output_bytes: 1 << 20,
            compile_timeout_s: 60.0,
            compile_memory_mib: 4096,
            network: NetworkIsolation::Required,
            python: None,
        }
    }
}

impl SandboxConfig {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        let ok = self.timeout_s.is_finite()
            && self.timeout_s > 0.0
            && self.compile_timeout_s.is_finite()
            && self.compile_timeout_s > 0.0
            && self.memory_mib >= 16
            && self.max_processes >= 1
            && self.max_open_files >= 8
            && self.max_output_bytes >= 1;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!("sandbox limits out of range: {self:?}")))
        }
    }
}

/// One test case.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TestCase {
    /// Feed `stdin`, expect `stdout` (compared line by line, trailing
    /// whitespace ignored).
    Io {
        /// Standard input.
        stdin: String,
        /// Expected standard output.
        stdout: String,
    },
    /// Python only: code appended to the program (`assert f(2) == 4`); passes
    /// when the program exits with status 0.
    Assert {
        /// The assertion code.
        code: String,
    },
}

/// How one sandboxed process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed it, if any.
    pub signal: Option<i32>,
    /// Captured stdout (at most the cap).
    pub stdout: Vec<u8>,
    /// Captured stderr (at most 64 KiB).
    pub stderr: Vec<u8>,
    /// Killed at the wall-clock deadline.
    pub timed_out: bool,
    /// Stopped because stdout passed the cap.
    pub output_overflow: bool,
    /// Wall-clock time.
    pub elapsed: Duration,
}

struct Limits {
    timeout: Duration,
    memory_bytes: u64,
    cpu_s: u64,
    nproc: u64,
    fsize: u64,
    nofile: u64,
    max_output: usize,
}

/// What this machine allows, probed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Running as root (uid separation and the mount namespace are used).
    pub root: bool,
    /// A new network namespace can be created.
    pub network_namespace: bool,
}

/// Probe once whether network namespaces and root isolation are available.
pub fn capabilities() -> &'static Capabilities {
    static CAPS: OnceLock<Capabilities> = OnceLock::new();
    CAPS.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure only calls unshare, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if new_netns() {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let network_namespace = cmd.status().map(|s| s.success()).unwrap_or(false);
        Capabilities {
            root,
            network_namespace,
        }
    })
}

/// unshare a network namespace, through a user namespace when unprivileged.
fn new_netns() -> bool {
    // SAFETY: unshare takes flags only.
    unsafe { libc::unshare(libc::CLONE_NEWNET) == 0 || libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0 }
}

/// Everything the child needs, prepared before fork (no allocation after).
struct ChildPlan {
    netns: bool,
    isolate_fs: bool,
    uid: Option<u32>,
    workdir: CString,
    limits: [(libc::__rlimit_resource_t, u64); 6],
}

fn child_setup(plan: &ChildPlan) -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    // SAFETY: only async-signal-safe system calls on data prepared before fork.
    unsafe {
        if plan.netns && !new_netns() {
            return fail();
        }
        if plan.isolate_fs {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            if libc::mount(
                plan.workdir.as_ptr(),
                c"/tmp".as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            for dir in [c"/var/tmp", c"/dev/shm"] {
                // Best effort: a missing directory is not an error.
                libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"size=16m,mode=1777".as_ptr().cast(),
                );
            }
            if libc::chdir(c"/tmp".as_ptr()) != 0 {
                return fail();
            }
        }
        for (res, v) in plan.limits {
            let lim = libc::rlimit {
                rlim_cur: v,
                rlim_max: if res == libc::RLIMIT_CPU { v + 1 } else { v },
            };
            if libc::setrlimit(res, &lim) != 0 {
                return fail();
            }
        }
        if let Some(uid) = plan.uid {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                return fail();
            }
        }
        // After the uid change, which clears it: die with the evaluator.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return fail();
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail();
        }
    }
    Ok(())
}

/// Kill every process of `uid` (and only those): a child takes the uid and
/// calls `kill(-1, SIGKILL)`, which reaches all processes it may signal.
fn kill_uid(uid: u32) {
    for _ in 0..2 {
        // SAFETY: the child only calls async-signal-safe functions and _exit.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                if libc::setgid(uid) == 0 && libc::setuid(uid) == 0 {
                    libc::kill(-1, libc::SIGKILL);
                }
                libc::_exit(0);
            } else if pid > 0 {
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
    }
}

fn kill_group(pgid: u32) {
    // SAFETY: kill with a negative pid signals the process group.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

fn read_capped(mut r: impl Read, cap: usize, overflow: Option<Arc<AtomicBool>>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
                if n > room {
                    if let Some(flag) = &overflow {
                        flag.store(true, Ordering::SeqCst);
                        break; // closing the pipe stops the writer
                    }
                }
            }
        }
    }
    out
}

struct Sandbox {
    dir: PathBuf,
    uid: Option<u32>,
    netns: bool,
    /// The lock that reserves `uid` across threads and processes.
    _uid_lock: Option<std::fs::File>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            kill_uid(uid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reserve a sandbox uid: an exclusive `flock` on `<tmp>/aha-sandbox-uids/<slot>`,
/// held while the sandbox lives, so that concurrent runs (threads or other
/// processes) never share a uid, and so never kill each other's programs.
fn reserve_uid(seed: u32) -> std::result::Result<(u32, std::fs::File), String> {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join("aha-sandbox-uids");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    set_mode(&dir, 0o700)?;
    for i in 0..UID_SLOTS {
        let slot = (seed.wrapping_add(i)) % UID_SLOTS;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(slot.to_string()))
            .map_err(|e| format!("uid lock: {e}"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((SANDBOX_UID_BASE + slot, f));
        }
    }
    Err("all sandbox uids are in use".into())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    fn new(config: &SandboxConfig) -> std::result::Result<Self, String> {
        let caps = capabilities();
        let netns = caps.network_namespace;
        if !netns && config.network == NetworkIsolation::Required {
            return Err("no network namespace can be created here and network isolation is required".into());
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let (uid, lock) = if caps.root {
            let (uid, lock) = reserve_uid(std::process::id().wrapping_mul(31).wrapping_add(n))?;
            (Some(uid), Some(lock))
        } else {
            (None, None)
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("aha-sandbox-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let sb = Sandbox {
            dir,
            uid,
            netns,
            _uid_lock: lock,
        };
        if let Some(uid) = uid {
            // Leftovers of an earlier run with this uid, if any.
            kill_uid(uid);
            std::os::unix::fs::chown(&sb.dir, Some(uid), Some(uid)).map_err(|e| format!("chown: {e}"))?;
        }
        set_mode(&sb.dir, 0o700)?;
        Ok(sb)
    }

    fn write(&self, name: &str, content: &str) -> std::result::Result<(), String> {
        let p = self.dir.join(name);
        std::fs::write(&p, content).map_err(|e| format!("writing {name}: {e}"))?;
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).map_err(|e| format!("chown: {e}"))?;
        }
        Ok(())
    }

    /// Run `argv` in the sandbox with `stdin`.
    fn run(&self, argv: &[&str], stdin: &[u8], lim: &Limits) -> std::result::Result<RunResult, String> {
        let (prog, args) = argv.split_first().ok_or("empty command")?;
        let workdir = CString::new(self.dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        let plan = ChildPlan {
            netns: self.netns,
            isolate_fs: self.uid.is_some(),
            uid: self.uid,
            workdir,
            limits: [
                (libc::RLIMIT_AS, lim.memory_bytes),
                (libc::RLIMIT_CPU, lim.cpu_s),
                (libc::RLIMIT_NPROC, lim.nproc),
                (libc::RLIMIT_FSIZE, lim.fsize),
                (libc::RLIMIT_NOFILE, lim.nofile),
                (libc::RLIMIT_CORE, 0),
            ],
        };
        let home = if self.uid.is_some() {
            "/tmp".to_string()
        } else {
            self.dir.display().to_string()
        };
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &home)
            .env("TMPDIR", &home)
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONHASHSEED", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: child_setup only makes async-signal-safe system calls on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || child_setup(&plan));
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {prog}: {e}"))?;
        let pgid = child.id();
        let overflow = Arc::new(AtomicBool::new(false));
        let out_reader = child.stdout.take().map(|s| {
            let cap = lim.max_output;
            let flag = Arc::clone(&overflow);
            std::thread::spawn(move || read_capped(s, cap, Some(flag)))
        });
        let err_reader = child
            .stderr
            .take()
            .map(|s| std::thread::spawn(move || read_capped(s, 64 << 10, None)));
        if let Some(mut sin) = child.stdin.take() {
            let data = stdin.to_vec();
            std::thread::spawn(move || {
                let _ = sin.write_all(&data);
            });
        }
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(_) => break None,
            }
            if overflow.load(Ordering::SeqCst) {
                kill_group(pgid);
            }
            if start.elapsed() >= lim.timeout {
                timed_out = true;
                kill_group(pgid);
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(3));
        };
        let elapsed = start.elapsed();
        // Stragglers of the group (and of the uid) die with the run.
        kill_group(pgid);
        if let Some(uid) = self.uid {
            kill_uid(uid);
        }
        let stdout = out_reader.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(RunResult {
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout,
            stderr,
            timed_out,
            output_overflow: overflow.load(Ordering::SeqCst),
            elapsed,
        })
    }
}

fn set_mode(p: &Path, mode: u32) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| format!("chmod: {e}"))
}

fn python_path(config: &SandboxConfig) -> Option<PathBuf> {
    if let Some(p) = &config.python {
        return Some(p.clone());
    }
    ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The real `rustc` (not the rustup proxy), if one is installed.
fn rustc_path() -> Option<PathBuf> {
    static RUSTC: OnceLock<Option<PathBuf>> = OnceLock::new();
    RUSTC
        .get_or_init(|| {
            let out = Command::new("rustc")
                .args(["--print", "sysroot"])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            let sysroot = String::from_utf8(out.stdout).ok()?;
            let p = PathBuf::from(sysroot.trim()).join("bin").join("rustc");
            p.exists().then_some(p)
        })
        .clone()
}

/// Whether a compiler or interpreter for `lang` is present (it may still be
/// unusable by the sandbox user; running reports that as `InfraError`).
pub fn language_available(lang: ProgramLanguage, config: &SandboxConfig) -> bool {
    match lang {
        ProgramLanguage::Python => python_path(config).is_some(),
        ProgramLanguage::C => Path::new("/usr/bin/gcc").exists(),
        ProgramLanguage::Rust => rustc_path().is_some(),
    }
}

fn outputs_match(got: &[u8], want: &str) -> bool {
    let got = String::from_utf8_lossy(got);
    let norm = |s: &str| {
        s.trim_end()
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect::<Vec<_>>()
    };
    norm(&got) == norm(want)
}

fn last_line(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let l = s.trim_end().lines().last().unwrap_or("").to_string();
    l.chars().take(200).collect()
}

fn infra(why: impl Into<String>) -> Outcome {
    Outcome::zero(Status::InfraError).with_detail(why)
}

/// Run `program` in `lang` against `tests`. Correct when every test passes;
/// the first failure decides the status (Wrong, Timeout) and the detail.
pub fn run_tests(program: &str, lang: ProgramLanguage, tests: &[TestCase], config: &SandboxConfig) -> Outcome {
    if let Err(e) = config.validate() {
        return infra(e.to_string());
    }
    if tests.is_empty() {
        return infra("no test cases");
    }
    let sb = match Sandbox::new(config) {
        Ok(s) => s,
        Err(e) => return infra(e),
    };
    let cpu_s = config.timeout_s.ceil() as u64 + 1;
    let run_limits = Limits {
        timeout: Duration::from_secs_f64(config.timeout_s),
        memory_bytes: config.memory_mib << 20,
        cpu_s,
        nproc: config.max_processes,
        fsize: config.max_file_bytes,
        nofile: config.max_open_files,
        max_output: config.max_output_bytes,
    };
    let compile_limits = Limits {
        timeout: Duration::from_secs_f64(config.compile_timeout_s),
        memory_bytes: config.compile_memory_mib << 20,
        cpu_s: config.compile_timeout_s.ceil() as u64 + 1,
        nproc: config.max_processes.max(64),
        fsize: 256 << 20,
        nofile: 256,
        max_output: 64 << 10,
    };
    let python = match lang {
        ProgramLanguage::Python => match python_path(config) {
            Some(p) => Some(p.display().to_string()),
            None => return infra("no python3 interpreter found"),
        },
        _ => None,
    };
    let binary = match lang {
        ProgramLanguage::Python => None,
        ProgramLanguage::C | ProgramLanguage::Rust => {
            let (src, compiler) = match lang {
                ProgramLanguage::C => ("main.c", Some("/usr/bin/gcc".to_string())),
                _ => ("main.rs", rustc_path().map(|p| p.display().to_string())),
            };
            let Some(compiler) = compiler.filter(|c| Path::new(c).exists()) else {
                return infra(format!("{lang:?} compiler not found"));
            };
            if let Err(e) = sb.write(src, program) {
                return infra(e);
            }
            let argv: Vec<&str> = match lang {
                ProgramLanguage::C => vec![&compiler, "-O2", "-std=gnu11", "-o", "prog", src, "-lm"],
                _ => vec![&compiler, "-O", "--edition", "2021", "-o", "prog", src],
            };
            match sb.run(&argv, b"", &compile_limits) {
                Err(e) => return infra(format!("compiler cannot run in the sandbox: {e}")),
                Ok(r) if r.exit_code == Some(0) => Some("./prog"),
                Ok(r) if r.timed_out => return Outcome::zero(Status::Timeout).with_detail("compilation timed out"),
                Ok(r) if r.exit_code == Some(127) || r.exit_code == Some(126) => {
                    return infra(format!(
                        "compiler unusable by the sandbox user: {}",
                        last_line(&r.stderr)
                    ))
                }
                Ok(r) => {
                    return Outcome::zero(Status::Wrong)
                        .with_detail(format!("compilation failed: {}", last_line(&r.stderr)))
                }
            }
        }
    };
    for (i, test) in tests.iter().enumerate() {
        let (stdin, want, source) = match test {
            TestCase::Io { stdin, stdout } => (stdin.as_str(), Some(stdout.as_str()), program.to_string()),
            TestCase::Assert { code } => {
                if lang != ProgramLanguage::Python {
                    return infra("assert-style tests are for Python only");
                }
                ("", None, format!("{program}\n\n{code}\n"))
            }
        };
        let argv: Vec<&str> = match (&python, binary) {
            (Some(py), _) => {
                if let Err(e) = sb.write("main.py", &source) {
                    return infra(e);
                }
                vec![py.as_str(), "-S", "main.py"]
            }
            (None, Some(bin)) => vec![bin],
            (None, None) => return infra("nothing to run"),
        };
        let r = match sb.run(&argv, stdin.as_bytes(), &run_limits) {
            Ok(r) => r,
            Err(e) => return infra(e),
        };
        let which = format!("test {}/{}", i + 1, tests.len());
        if r.timed_out || r.signal == Some(libc::SIGXCPU) {
            return Outcome::zero(Status::Timeout).with_detail(format!("{which}: time limit exceeded"));
        }
        if r.output_overflow {
            return Outcome::zero(Status::Wrong).with_detail(format!("{which}: output limit exceeded"));
        }
        if r.exit_code == Some(126) || r.exit_code == Some(127) {
            return infra(format!(
                "{which}: interpreter unusable by the sandbox user: {}",
                last_line(&r.stderr)
            ));
        }
        if r.exit_code != Some(0) {
            let how = match r.signal {
                Some(s) => format!("killed by signal {s}"),
                None => format!("exit status {:?}", r.exit_code),
            };
            return Outcome::zero(Status::Wrong)
                .with_detail(format!("{which}: runtime error ({how}): {}", last_line(&r.stderr)));
        }
        if let Some(want) = want {
            if !outputs_match(&r.stdout, want) {
                return Outcome::zero(Status::Wrong).with_detail(format!("{which}: wrong output"));
            }
        }
    }
    Outcome::correct().with_detail(format!("{} tests passed", tests.len()))
}

/// The last fenced code block (```` ```lang ... ``` ````) of a completion,
/// with its language tag.
pub fn extract_program(completion: &str) -> Option<(Option<String>, String)> {
    let mut blocks = Vec::new();
    let mut rest = completion;
    while let Some(st) = rest.find("```") {
        let after = &rest[st + 3..];
        let Some(nl) = after.find('\n') else { break };
        let tag = after[..nl].trim();
        let body = &after[nl + 1..];
        let Some(end) = body.find("```") else { break };
        blocks.push(((!tag.is_empty()).then(|| tag.to_string()), body[..end].to_string()));
        rest = &body[end + 3..];
    }
    blocks.pop()
}

/// The code reward: reads `tests` (a list of `{"stdin", "stdout"}` or
/// `{"code"}` objects) and an optional `program_language` (default python);
/// runs the completion's last fenced code block.
#[derive(Debug, Clone, Default)]
pub struct CodeReward {
    /// The sandbox's limits.
    pub config: SandboxConfig,
}

/// The test cases and language of an example.
pub fn task_of(example: &Example) -> Result<(Vec<TestCase>, ProgramLanguage)> {
    let tests = example.get("tests").ok_or_else(|| Error::field("tests", "missing"))?;
    let tests: Vec<TestCase> = serde_json::from_value(tests.clone())
        .map_err(|e| Error::field("tests", format!("must be a list of {{stdin, stdout}} or {{code}}: {e}")))?;
    let lang = match example.get("program_language") {
        None | Some(serde_json::Value::Null) => ProgramLanguage::Python,
        Some(serde_json::Value::String(s)) => s.parse()?,
        Some(_) => return Err(Error::field("program_language", "must be a string")),
    };
    Ok((tests, lang))
}

impl Reward for CodeReward {
    fn name(&self) -> &str {
        "code"
    }

    fn score(&self, example: &Example, completion: &str) -> Outcome {
        let (tests, lang) = match task_of(example) {
            Ok(t) => t,
            Err(e) => return Outcome::zero(Status::UnparsableGold).with_detail(e.to_string()),
        };
        match extract_program(completion) {
            None => Outcome::zero(Status::NoAnswer).with_detail("no fenced code block"),
            Some((_, program)) => run_tests(&program, lang, &tests, &self.config),
        }
    }
}
