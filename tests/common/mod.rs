//! Test harness shared by the integration tests: builds the sample C programs, runs them with and
//! without libkeepfix.so, reads their stdout protocol, and looks at their sockets from outside
//! (pidfd_getfd, /proc/PID/fd, /proc/net/tcp).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/debug (or target/release): where cargo put this test and libkeepfix.so.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

static LIB: OnceLock<PathBuf> = OnceLock::new();

/// libkeepfix.so, of the same profile as this test. Cargo does not build a cdylib for integration
/// tests, so the first call builds it (`cargo build --lib`, a no-op when it is up to date).
pub fn lib() -> PathBuf {
    LIB.get_or_init(|| {
        let dir = target_dir();
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.args(["build", "--lib", "--quiet"]).current_dir(root());
        if dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let st = c.status().expect("cargo build --lib");
        assert!(st.success(), "cargo build --lib failed");
        let p = dir.join("libkeepfix.so");
        assert!(p.exists(), "{} is missing after cargo build --lib", p.display());
        p
    })
    .clone()
}

/// The `keepfix` command built with this test.
pub fn keepfix_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keepfix"))
}

static BUILD: Mutex<()> = Mutex::new(());

/// Compiles c-tests/NAME.c (once per test run, or when the source changed) and returns the binary.
pub fn c_program(name: &str) -> PathBuf {
    c_program_with(name, &[])
}

/// c-tests/oldkernel.c, linked static so that LD_PRELOAD is for the program it execs only.
pub fn oldkernel() -> PathBuf {
    c_program_with("oldkernel", &["-static"])
}

/// The kernel the tests emulate (`KEEPFIX_TEST_KERNEL=3.10` or `4.18`): every program [`Run`]
/// starts then runs under c-tests/oldkernel.c's seccomp filter for that version.
pub fn test_kernel() -> Option<String> {
    std::env::var("KEEPFIX_TEST_KERNEL").ok().filter(|v| !v.is_empty())
}

fn c_program_with(name: &str, extra: &[&str]) -> PathBuf {
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let src = root().join("c-tests").join(format!("{name}.c"));
    let out_dir = target_dir().join("c-tests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    let newest_src = ["common.h", &format!("{name}.c"), "errno_check.c"]
        .iter()
        .filter_map(|f| std::fs::metadata(root().join("c-tests").join(f)).ok()?.modified().ok())
        .max();
    let fresh = std::fs::metadata(&out).ok().and_then(|m| m.modified().ok());
    if fresh.is_none() || newest_src.is_some_and(|s| Some(s) > fresh) {
        let tmp = out_dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let st = Command::new("gcc")
            .args(["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"])
            .args(extra)
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("gcc");
        assert!(st.success(), "gcc failed for {name}");
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// Makes `c` run with this soft and hard RLIMIT_NOFILE.
pub fn set_nofile(c: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            let l = libc::rlimit { rlim_cur: n, rlim_max: n };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A sample program running under test.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

/// How to run a program: its arguments, environment, and whether keepfix is preloaded.
pub struct Run {
    prog: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    preload: bool,
    nofile: Option<u64>,
}

impl Run {
    pub fn new(name: &str) -> Run {
        Run { prog: c_program(name), args: vec![], env: vec![], preload: true, nofile: None }
    }
    pub fn path(prog: PathBuf) -> Run {
        Run { prog, args: vec![], env: vec![], preload: true, nofile: None }
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Run {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Run {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn plain(mut self) -> Run {
        self.preload = false;
        self
    }
    /// Runs with this soft and hard RLIMIT_NOFILE.
    pub fn nofile(mut self, n: u64) -> Run {
        self.nofile = Some(n);
        self
    }
    pub fn spawn(self) -> Proc {
        let mut c = Command::new(&self.prog);
        if let Some(version) = test_kernel() {
            c = Command::new(oldkernel());
            c.arg(version).arg(&self.prog);
        }
        c.args(&self.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("KEEPFIX_") || k == "LD_PRELOAD" {
                c.env_remove(k);
            }
        }
        if self.preload {
            c.env("LD_PRELOAD", lib());
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(n) = self.nofile {
            set_nofile(&mut c, n);
        }
        let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", self.prog.display()));
        let (tx, rx) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        let stdin = child.stdin.take();
        Proc { child, stdin, lines: rx, seen: vec![], stderr }
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    pub fn expect(&mut self, prefix: &str) -> String {
        self.expect_within(prefix, Duration::from_secs(10))
    }

    pub fn expect_within(&mut self, prefix: &str, d: Duration) -> String {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    let tail: Vec<&String> = self.seen.iter().rev().take(20).rev().collect();
                    let err = self.stderr();
                    let err_tail: Vec<&str> =
                        err.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
                    panic!(
                        "no line starting with {prefix:?} within {d:?}; last stdout lines: {tail:?}; last stderr lines: {err_tail:#?}"
                    )
                }
            }
        }
    }

    /// The stdout lines read so far, and any that arrive within `d`.
    pub fn lines_for(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(l);
        }
        self.seen.clone()
    }

    pub fn port(&mut self) -> u16 {
        let l = self.expect("READY");
        field(&l, "port").parse().unwrap()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until keepfix's log (stderr) has a line containing all of `parts`; returns it.
    pub fn wait_log(&self, parts: &[&str], d: Duration) -> String {
        let deadline = Instant::now() + d;
        loop {
            if let Some(l) = self.stderr().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            assert!(Instant::now() < deadline, "no log line with {parts:?} within {d:?}; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_lines(&self, part: &str) -> Vec<String> {
        self.stderr().lines().filter(|l| l.contains(part)).map(String::from).collect()
    }

    pub fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        s.flush().unwrap();
    }

    /// SIGTERM, then waits; returns every stdout line and the exit status.
    pub fn stop(self) -> (Vec<String>, std::process::ExitStatus) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.finish()
    }

    /// Closes stdin and waits for the program to end by itself.
    pub fn finish(mut self) -> (Vec<String>, std::process::ExitStatus) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let lines = self.lines_for(Duration::from_millis(200));
                return (lines, st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in a protocol line.
pub fn field(line: &str, key: &str) -> String {
    let k = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&k))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

/// A copy of another process's fd, by pidfd_getfd. Closing it drops our reference.
pub fn grab_fd(pid: i32, fd: i32) -> OwnedFd {
    // SAFETY: plain syscalls; the returned fds are ours.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        let err = std::io::Error::last_os_error();
        libc::close(pidfd);
        assert!(copy >= 0, "pidfd_getfd({pid}, {fd}): {err}");
        OwnedFd::from_raw_fd(copy)
    }
}

fn getsockopt_int(fd: &OwnedFd, level: i32, name: i32) -> i32 {
    let mut v: i32 = -1;
    let mut len = 4u32;
    // SAFETY: a valid int buffer.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut i32).cast(), &mut len) };
    assert_eq!(r, 0, "getsockopt({level}, {name}): {}", std::io::Error::last_os_error());
    v
}

/// The keepalive options of a socket, read from outside its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ka {
    pub on: bool,
    pub idle: i32,
    pub intvl: i32,
    pub cnt: i32,
    pub user_timeout: i32,
}

pub fn keepalive_of(pid: i32, fd: i32) -> Ka {
    let s = grab_fd(pid, fd);
    ka_of_fd(&s)
}

pub fn ka_of_fd(s: &OwnedFd) -> Ka {
    Ka {
        on: getsockopt_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        idle: getsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        intvl: getsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        cnt: getsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        user_timeout: getsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    }
}

/// The kernel's defaults on this machine (what a socket keepfix did not touch has).
pub fn kernel_default_ka() -> Ka {
    let r = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).unwrap().trim().parse().unwrap();
    Ka {
        on: false,
        idle: r("tcp_keepalive_time"),
        intvl: r("tcp_keepalive_intvl"),
        cnt: r("tcp_keepalive_probes"),
        user_timeout: 0,
    }
}

pub fn ka(idle: i32, intvl: i32, cnt: i32) -> Ka {
    Ka { on: true, idle, intvl, cnt, user_timeout: 0 }
}

/// SO_KEEPALIVE of any socket of another process (UDP, unix…).
pub fn so_keepalive(pid: i32, fd: i32) -> bool {
    let s = grab_fd(pid, fd);
    getsockopt_int(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0
}

/// One TCP socket of a process: its fd, and what /proc/net/tcp{,6} says of it.
#[derive(Clone, Debug)]
pub struct TcpFd {
    pub fd: i32,
    pub inode: u64,
    /// Kernel state number: 1 ESTABLISHED, 8 CLOSE_WAIT, 10 LISTEN…
    pub state: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub recv_q: u64,
}

pub const ESTABLISHED: u8 = 1;
pub const CLOSE_WAIT: u8 = 8;
pub const LISTEN: u8 = 10;

/// /proc/net/tcp and tcp6 (of this network namespace), by inode.
pub fn proc_net_tcp() -> HashMap<u64, (u8, u16, u16, u64)> {
    let mut m = HashMap::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(f) else { continue };
        for line in t.lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() < 10 {
                continue;
            }
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
            let state = u8::from_str_radix(w[3], 16).unwrap();
            let rx = u64::from_str_radix(w[4].split(':').nth(1).unwrap(), 16).unwrap();
            let inode: u64 = w[9].parse().unwrap();
            if inode != 0 {
                m.insert(inode, (state, port(w[1]), port(w[2]), rx));
            }
        }
    }
    m
}

/// The fds of `pid` that are sockets, with their inodes.
pub fn socket_fds(pid: i32) -> Vec<(i32, u64)> {
    let mut v = vec![];
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return v };
    for e in rd.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(link) = std::fs::read_link(e.path()) else { continue };
        let l = link.to_string_lossy();
        if let Some(ino) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            v.push((fd, ino.parse().unwrap()));
        }
    }
    v.sort();
    v
}

/// The TCP sockets of `pid` that /proc/net/tcp lists (sockets in CLOSE are not listed there).
pub fn tcp_fds(pid: i32) -> Vec<TcpFd> {
    let net = proc_net_tcp();
    socket_fds(pid)
        .into_iter()
        .filter_map(|(fd, inode)| {
            net.get(&inode).map(|&(state, local_port, remote_port, recv_q)| TcpFd {
                fd,
                inode,
                state,
                local_port,
                remote_port,
                recv_q,
            })
        })
        .collect()
}

/// The number of open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Waits until `f` holds, or fails the test with `what`.
pub fn eventually(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + d;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {d:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP client connection to 127.0.0.1:port (or ::1), that sends a line and reads the pong.
pub fn ping(port: u16) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping\n").unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong\n");
    s
}

/// Closes a client socket with a reset (SO_LINGER 0).
pub fn close_with_rst(s: std::net::TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid linger struct on our own socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    drop(s);
}

/// A process's CPU time (user + system) in clock ticks, from /proc/PID/stat.
pub fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let w: Vec<&str> = after.split_whitespace().collect();
    w[11].parse::<u64>().unwrap() + w[12].parse::<u64>().unwrap()
}

/// A OnceLock-cached value shared by the tests of one binary.
pub fn once<T: Send + Sync + 'static>(cell: &'static OnceLock<T>, f: impl FnOnce() -> T) -> &'static T {
    cell.get_or_init(f)
}

/// A directory of the test's own, removed at the end.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory, unique to this call: two tests of one binary run at once, and may use
    /// the same name.
    pub fn new(name: &str) -> TempDir {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("keepfix-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// keepfix's metrics file for `pid`, as `name{labels}` → value, without the pid and program
/// labels (`keepfix_close_wait_actions_total{action="closed"}`, `keepfix_table_bytes`).
pub fn metrics(dir: &Path, pid: i32) -> Option<HashMap<String, f64>> {
    let text = std::fs::read_to_string(dir.join(format!("keepfix-{pid}.prom"))).ok()?;
    let mut m = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let (name, labels) = match key.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (key, ""),
        };
        let kept: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty() && !l.starts_with("pid=") && !l.starts_with("program="))
            .collect();
        let k = if kept.is_empty() { name.to_string() } else { format!("{name}{{{}}}", kept.join(",")) };
        if let Ok(v) = value.parse() {
            m.insert(k, v);
        }
    }
    Some(m)
}

pub fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no {key} in the metrics: {m:?}"))
}

/// Waits until keepfix's metrics file for `pid` exists and returns it.
pub fn await_metrics(dir: &Path, pid: i32) -> HashMap<String, f64> {
    let mut found = None;
    eventually("keepfix's metrics file", Duration::from_secs(10), || {
        found = metrics(dir, pid);
        found.is_some()
    });
    found.unwrap()
}

/// Reads from `s` until EOF, an error or `deadline`; returns what arrived.
pub fn read_until(s: &mut std::net::TcpStream, deadline: Instant) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

// --- What a test needs from the machine ----------------------------------------------------------
//
// A test that needs a tool (nginx, valgrind, ip...), root, or a kernel feature asks for it here
// instead of printing SKIPPED and passing. When it is missing:
// - under CI (CI set, and not "0" or "false"), the test FAILS, naming what is missing and the
//   command that provides it: CI must run every test;
// - elsewhere it fails the same way, unless KFX_ALLOW_SKIP=1 is set: then the test returns early
//   (libtest counts it as passed), and after libtest's own summary the binary lists every test it
//   skipped that way, with what each needed and how to get it. The variable does not start with
//   KEEPFIX_ because libkeepfix.so warns about KEEPFIX_ variables it does not know.
// README.md ("Reliability tests") has the table of which test file needs what.

/// The environment variable that lets a test pass without what it needs (never under CI).
pub const ALLOW_SKIP: &str = "KFX_ALLOW_SKIP";

/// Is this a CI run? CI=true (GitHub, GitLab...), or any other value but "0" and "false".
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn skip_allowed() -> bool {
    std::env::var(ALLOW_SKIP).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// NAME of tests/NAME.rs: the test binary's name without cargo's hash.
fn test_file() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_deref().and_then(Path::file_stem).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.rsplit_once('-').map_or(stem.as_str(), |(f, _)| f).to_string()
}

/// `tests/NAME.rs TEST`, for messages (libtest names each test's thread after the test).
fn this_test() -> String {
    let file = test_file();
    match std::thread::current().name() {
        Some(n) if n != "main" => format!("tests/{file}.rs {n}"),
        _ => format!("tests/{file}.rs"),
    }
}

static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Printed when the test binary exits, after libtest's summary: the tests that passed without
/// running their checks because KFX_ALLOW_SKIP was set.
extern "C" fn print_skipped() {
    let list = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if list.is_empty() {
        return;
    }
    let mut e = std::io::stderr().lock();
    let _ = writeln!(
        e,
        "\nSKIPPED ({ALLOW_SKIP} is set): {} test(s) counted as passed above did not run (all or part of their checks):",
        list.len()
    );
    for l in list.iter() {
        let _ = writeln!(e, "  {l}");
    }
    let _ = writeln!(e);
}

/// Returns `met`. When it is false, fails the test with `what` is missing and `how` to get it,
/// unless skipping is allowed (KFX_ALLOW_SKIP=1, outside CI): then records the skip and returns
/// false, and the caller returns. The failure points at the caller's line.
#[track_caller]
pub fn require(met: bool, what: &str, how: &str) -> bool {
    if met {
        return true;
    }
    let test = this_test();
    if under_ci() {
        panic!("{test} needs {what}, which this CI machine lacks (CI never skips a test): {how}");
    }
    if !skip_allowed() {
        panic!(
            "{test} needs {what}: {how}. To let tests pass without what they need on this machine, set \
             {ALLOW_SKIP}=1 (they are then listed as SKIPPED after the summary; never under CI)."
        );
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain extern "C" function, once.
    ONCE.call_once(|| unsafe {
        libc::atexit(print_skipped);
    });
    eprintln!("SKIPPED: {test} needs {what}: {how}");
    SKIPPED.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{test}: needs {what}; {how}"));
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when running as root; otherwise see [`require`]. `why`: what the test does with root.
#[track_caller]
pub fn require_root(why: &str) -> bool {
    require(
        is_root(),
        &format!("root ({why})"),
        &format!("run it as root, as CI does: sudo -E env PATH=\"$PATH\" cargo test --test {}", test_file()),
    )
}

/// The directories searched after PATH: those a non-root user's PATH often lacks (Debian puts
/// nginx and ip there).
const SBIN: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// `name` as the shell would find it on PATH, else in the sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The path of the command `name`; when it is missing, see [`require`]: `package` is the Debian
/// package that has it (`.ci/run` installs it).
#[track_caller]
pub fn require_tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        let what = format!("`{name}` (not on PATH, nor in {})", SBIN.join(", "));
        require(false, &what, &format!("apt-get install {package} (.ci/run installs it)"));
    }
    found
}
