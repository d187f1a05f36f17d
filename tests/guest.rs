//! A quiet guest: keepfix must not write where the program did not ask it to (G1), start a
//! thread it did not need (G2), outlive a sandbox (G3), keep privileges (G4), take the program's
//! memory (G5), its fds (G6) or its tasks (G8), and a number the program closes is closed (G7).
//! Each test runs a C program from c-tests/ with and without keepfix, with the default settings
//! and again with KEEPFIX_CLOSE_WAIT=close.
//!
//! fails on 2eb0aae: 4 of the 5 tests, run before the fix. (a) the daemon's `wal` file (fd 2)
//! held keepfix's `start` and `app_override` lines; (b) the socketpair's peer received 322 bytes
//! of keepfix's lines; G5: malloc_fill got 78 MiB with keepfix against 143 MiB without (the
//! watchdog's glibc arena); G8: fork_fill got 6 workers with keepfix against 7 without. The
//! control (c) passes there too, as it must. G6 (at_a_low_limit_keepfix_takes_none_of_the_programs_fds)
//! fails on 2606c9b: under `ulimit -n 12` keepfix's epoll set, reserve and /proc files sat at
//! fds 3..6 (the program's next numbers): the server accepted 4 clients against 8, on other numbers.
//! G7 (a_close_everything_loop_closes_keepfix_fds_too) fails on 2eb0aae: close() of keepfix's
//! fds returned EBADF while fcntl(F_GETFD) said they were open, and the daemon exited with 1.
//!
//! G2, G3, G4 (issue 12): no thread the program did not need, a sandbox wins, no privilege of its
//! own. Each failed on 2606c9b, run before the fix: G2 (a) the exec'd helper had 2 threads before
//! main() and its raw unshare(CLONE_NEWUSER) got EINVAL (22); G2 (b) unshare(3),
//! syscall(SYS_unshare) and setns(CLONE_NEWNS) all returned -1 EINVAL with keepfix, 0 without;
//! G3 the program was killed by its own filter (SIGSYS, status 159) at its first connect() after
//! the filter, and in strict mode the process never ended (keepfix's thread outlived the main
//! thread's SYS_exit); G4 after capset (and after syscall(SYS_setresuid), and raw instructions)
//! keepfix's thread kept Uid 0 and its capabilities while the main thread had none. G4's
//! glibc case passed there (glibc changes every thread), and is kept: with keepfix's thread
//! holding no capability, glibc would abort the process (its threads' results would differ) if the
//! hooks did not end the thread first (measured: abort, status 134).
mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The two settings every test runs under: the defaults, and close mode.
const MODES: [Option<&str>; 2] = [None, Some("close")];

fn with_mode(r: Run, mode: Option<&str>) -> Run {
    let r = r.env("KEEPFIX_SCAN_INTERVAL", "100ms");
    match mode {
        Some(m) => r.env("KEEPFIX_CLOSE_WAIT", m).env("KEEPFIX_CLOSE_WAIT_AFTER", "0s"),
        None => r,
    }
}

fn wait_exit(p: Proc) -> std::process::ExitStatus {
    let (_, st) = p.finish();
    st
}

// --- G1: keepfix writes only where asked -------------------------------------------------------

/// (a) A daemon closes 0, 1, 2 and opens its database files on those numbers: keepfix's lines
/// (`start`, which races the close, and `app_override`, which comes after it) must not land in
/// them.
#[test]
fn a_daemons_database_on_fd_2_gets_only_its_records() {
    for preload in [false, true] {
        for mode in MODES {
            let dir = TempDir::new(&format!("guest-db-{preload}-{}", mode.unwrap_or("default")));
            let mut r = with_mode(Run::new("guest_daemon").args(["0", dir.str()]), mode);
            if !preload {
                r = r.plain();
            }
            let mut p = r.spawn();
            p.expect("READY");
            let st = wait_exit(p);
            assert!(st.success(), "guest_daemon failed: {st:?}");
            for name in ["data", "index", "wal"] {
                let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
                let records: Vec<&str> = text.lines().collect();
                let foreign: Vec<&&str> =
                    records.iter().filter(|l| !l.starts_with(&format!("record {name} "))).collect();
                assert!(
                    foreign.is_empty(),
                    "preload={preload} mode={mode:?}: the program's {name} file (fd {}) holds lines it never wrote: {foreign:#?}",
                    ["data", "index", "wal"].iter().position(|n| *n == name).unwrap_or(9)
                );
                assert_eq!(records.len(), 10, "preload={preload} mode={mode:?}: {name}: {text}");
            }
        }
    }
}

/// (b) A unix socketpair end dup2'ed onto fd 2 before the first socket call is the program's
/// private channel: its peer must receive none of keepfix's bytes.
#[test]
fn a_socketpair_on_fd_2_receives_no_keepfix_bytes() {
    for preload in [false, true] {
        for mode in MODES {
            let mut r = with_mode(Run::new("guest_stderr").args(["socketpair"]), mode);
            if !preload {
                r = r.plain();
            }
            let mut p = r.spawn();
            p.expect("DONE");
            let lines = p.lines_for(Duration::from_millis(0));
            let l = lines.iter().find(|l| l.starts_with("PEER bytes=")).expect("a PEER line");
            let n: u64 = field(l, "bytes").parse().unwrap();
            assert_eq!(n, 0, "preload={preload} mode={mode:?}: the peer received keepfix's bytes: {lines:#?}");
            assert!(wait_exit(p).success());
        }
    }
}

/// (c) Control: a pipe that was stderr at exec is a log destination, and keeps getting the log
/// (so the rule above does not simply turn the log off). This one passes on 2eb0aae too.
#[test]
fn a_pipe_as_stderr_at_exec_still_gets_the_log() {
    for mode in MODES {
        let mut p = with_mode(Run::new("guest_stderr").args(["none"]), mode).spawn();
        p.expect("READY");
        p.wait_log(&["keepfix[", "start idle="], Duration::from_secs(10));
        p.wait_log(&["app_override", "option=SO_KEEPALIVE"], Duration::from_secs(10));
        p.expect("DONE");
        assert!(wait_exit(p).success());
    }
}

// --- Helpers for programs run under a resource limit ------------------------------------------

/// A program started with its own pre_exec (limits, user), stdin and stdout piped.
struct Limited {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<Mutex<String>>,
}

impl Limited {
    fn spawn(mut c: Command) -> Limited {
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        Limited { child, lines: rx, stderr }
    }
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!("no {prefix:?} line; stderr:\n{}", self.stderr()),
            }
        }
    }
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Closes stdin (the program's signal to finish) and waits for it.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (st, self.stderr());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(name: &str, preload: bool, mode: Option<&str>, extra_env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(c_program(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("KEEPFIX_") || k == "LD_PRELOAD" {
            c.env_remove(k);
        }
    }
    if preload {
        c.env("LD_PRELOAD", lib());
    }
    c.env("KEEPFIX_SCAN_INTERVAL", "100ms");
    if let Some(m) = mode {
        c.env("KEEPFIX_CLOSE_WAIT", m).env("KEEPFIX_CLOSE_WAIT_AFTER", "0s");
    }
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c
}

/// The names of the threads of `pid`.
fn thread_names(pid: i32) -> Vec<String> {
    let mut v = vec![];
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        if let Ok(n) = std::fs::read_to_string(e.path().join("comm")) {
            v.push(n.trim().to_string());
        }
    }
    v.sort();
    v
}

// --- G5: no memory of the program's -------------------------------------------------------------

/// RLIMIT_AS for the malloc test, in KiB (as `ulimit -v 150000`).
const AS_LIMIT_KIB: u64 = 150_000;
/// How much less the program may malloc with keepfix than without, in MiB. keepfix's own
/// mappings count against RLIMIT_AS too, and 1 MiB is less than they take: libkeepfix.so's own
/// image (1012 KiB mapped, debug build), its thread's stack (256 KiB + guard page), its heap's
/// first 256 KiB segment and the fd table's first chunk. Measured: 141 MiB with keepfix, 143
/// without (it was 78 with keepfix before it had a heap of its own). 4 MiB leaves room for a
/// release build's or a larger heap's few hundred KiB more, and is still far below the 64 MiB
/// arena this test exists to catch.
const AS_SLACK_MIB: i64 = 4;

fn malloc_total(preload: bool, mode: Option<&str>) -> (i64, Vec<String>, String) {
    let mut c = command("malloc_fill", preload, mode, &[]);
    c.args(["--leaks", "8", "--settle-ms", "1000"]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            let l = libc::rlimit { rlim_cur: AS_LIMIT_KIB * 1024, rlim_max: AS_LIMIT_KIB * 1024 };
            if libc::setrlimit(libc::RLIMIT_AS, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut p = Limited::spawn(c);
    p.expect("READY");
    let l = p.expect("TOTAL");
    let total: i64 = field(&l, "mib").parse().unwrap();
    // The program is still running, holding every block: keepfix's thread must still be there.
    let threads = thread_names(p.pid());
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.pid())).unwrap_or_default();
    let lib_kib: u64 = maps
        .lines()
        .filter(|l| l.contains("libkeepfix"))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?) / 1024)
        })
        .sum();
    std::thread::sleep(Duration::from_millis(300));
    let (st, stderr) = p.finish();
    assert!(st.success(), "malloc_fill failed ({st:?}); stderr:\n{stderr}");
    (total, threads, format!("libkeepfix.so mapped: {lib_kib} KiB\n{stderr}"))
}

#[test]
fn keepfix_takes_none_of_the_programs_memory() {
    for mode in MODES {
        let (plain, _, _) = malloc_total(false, mode);
        let (with, threads, log) = malloc_total(true, mode);
        eprintln!(
            "mode={mode:?}: malloc total under RLIMIT_AS {AS_LIMIT_KIB} KiB: {plain} MiB without keepfix, {with} MiB with; {}",
            log.lines().next().unwrap_or("")
        );
        assert!(threads.iter().any(|t| t == "keepfix"), "mode={mode:?}: no keepfix thread: {threads:?}\n{log}");
        assert!(threads.iter().any(|t| t == "malloc_fill"), "mode={mode:?}: {threads:?}");
        if mode == Some("close") {
            assert!(log.contains("action=shutdown"), "mode={mode:?}: the detector did not release the leaks:\n{log}");
        }
        assert!(
            with >= plain - AS_SLACK_MIB,
            "mode={mode:?}: the program could malloc {with} MiB with keepfix, {plain} MiB without\n{log}"
        );
    }
}

// --- G8: no task of the program's ---------------------------------------------------------------

/// The per-user task limit of the fork test, and the user it runs as (root ignores RLIMIT_NPROC).
const NPROC: u64 = 8;
const NOBODY: u32 = 65534;
/// The fork tests share user nobody's task count: one at a time.
static NOBODY_TASKS: Mutex<()> = Mutex::new(());

// --- G7: a closed number is closed --------------------------------------------------------------

/// A daemon closes every fd whose fcntl(F_GETFD) succeeds and fails on a close() error: with
/// keepfix's fds among them, each close returns 0 and the number is free afterwards, and keepfix
/// goes on working (its fds made again elsewhere).
#[test]
fn a_close_everything_loop_closes_keepfix_fds_too() {
    for preload in [false, true] {
        for mode in MODES {
            let mut r = with_mode(Run::new("guest_closeall"), mode);
            if !preload {
                r = r.plain();
            }
            let mut p = r.spawn();
            let port = p.port();
            let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let closed = p.expect("CLOSED");
            let port2 = p.port();
            let mut c2 = std::net::TcpStream::connect(("127.0.0.1", port2)).unwrap();
            c2.write_all(b"ping\n").unwrap();
            let served = p.expect("SERVED");
            let err = p.stderr();
            let st = wait_exit(p);
            let what = format!("preload={preload} mode={mode:?}: {closed}, {served}\n{err}");
            assert_eq!((field(&closed, "bad").as_str(), field(&closed, "still_open").as_str()), ("0", "0"), "{what}");
            assert_eq!(field(&served, "ok"), "1", "{what}");
            assert!(st.success(), "{what}");
        }
    }
}

// --- G6: keepfix takes none of the program's fds at a low limit ---------------------------------

/// The fd numbers leak_noread_server accepts clients on under `ulimit -n LIMIT` (it keeps every
/// connection): 30 clients try, one after the other, each kept open.
fn accepted_numbers(limit: u64, preload: bool, mode: Option<&str>) -> Vec<i32> {
    let mut r = with_mode(Run::new("leak_noread_server").nofile(limit).args(["0"]), mode);
    if !preload {
        r = r.plain();
    }
    let mut p = r.spawn();
    let port = p.port();
    let mut held = vec![];
    let mut fds = vec![];
    let mut at = p.lines_for(Duration::ZERO).len();
    for _ in 0..30 {
        let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) else { break };
        held.push(c);
        let lines = p.lines_for(Duration::from_millis(150));
        let new = lines.get(at..).unwrap_or(&[]).iter().find(|l| l.starts_with("ACCEPT fd=")).cloned();
        at = lines.len();
        match new {
            Some(l) => fds.push(field(&l, "fd").parse().unwrap()),
            None => break,
        }
    }
    drop(held);
    fds
}

/// At `ulimit -n 12` and 16 the program accepts exactly as many clients as without keepfix, on
/// exactly the same numbers: below 64 fds keepfix holds none of its own (no epoll set, no
/// reserve, no /proc file; it scans its sockets and probes fd numbers instead).
#[test]
fn at_a_low_limit_keepfix_takes_none_of_the_programs_fds() {
    for limit in [12, 16] {
        let plain = accepted_numbers(limit, false, None);
        assert!(!plain.is_empty(), "the control accepted nobody under {limit} fds");
        for mode in MODES {
            let with = accepted_numbers(limit, true, mode);
            assert_eq!(
                with, plain,
                "ulimit -n {limit}, mode={mode:?}: the fd numbers accepted with keepfix, against without"
            );
        }
    }
}

fn fork_workers(preload: bool, mode: Option<&str>) -> (u64, String) {
    let mut c = command("fork_fill", preload, mode, &[]);
    // SAFETY: setrlimit, setgroups, setgid and setuid are async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            let l = libc::rlimit { rlim_cur: NPROC, rlim_max: NPROC };
            if libc::setrlimit(libc::RLIMIT_NPROC, &l) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut p = Limited::spawn(c);
    p.expect("READY");
    let l = p.expect("WORKERS");
    let n: u64 = field(&l, "n").parse().unwrap();
    let (st, stderr) = p.finish();
    assert!(st.success(), "fork_fill failed ({st:?}); stderr:\n{stderr}");
    (n, stderr)
}

fn nobody_tasks() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let uid = st.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|u| u.split_whitespace().next());
        if uid == Some("65534") {
            n += std::fs::read_dir(e.path().join("task")).map(|d| d.count()).unwrap_or(0);
        }
    }
    n
}

#[test]
fn keepfix_takes_none_of_the_programs_tasks() {
    if !require_root("it runs the program as nobody under RLIMIT_NPROC, which root ignores") {
        return;
    }
    let _g = NOBODY_TASKS.lock().unwrap_or_else(|e| e.into_inner());
    let before = nobody_tasks();
    for mode in MODES {
        let (plain, _) = fork_workers(false, mode);
        let (with, log) = fork_workers(true, mode);
        eprintln!(
            "mode={mode:?}: RLIMIT_NPROC {NPROC} as nobody ({before} tasks of nobody's elsewhere): {plain} workers without keepfix, {with} with\n{log}"
        );
        assert!(plain > 0, "the plain run forked no worker");
        assert_eq!(with, plain, "mode={mode:?}: {with} workers with keepfix, {plain} without; keepfix's log:\n{log}");
        // Said once each: the children run without a thread (the limit is near), and the
        // parent's thread gave its task to the fork that needed it.
        let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
        assert_eq!(count("watchdog_unavailable in=forked_children"), 1, "mode={mode:?}:\n{log}");
        assert_eq!(count("watchdog_stopped reason=fork_eagain"), 1, "mode={mode:?}:\n{log}");
    }
    let _ = std::io::stderr().flush();
}

// --- G2: no thread the program did not need ----------------------------------------------------

/// What to do when even the plain control cannot make a user namespace (see tests/common, `require`).
const USERNS: &str = "allow them: sysctl -w user.max_user_namespaces=15000 (kernel.unprivileged_userns_clone=1 \
                      where it exists); in a container, one whose seccomp profile allows unshare(CLONE_NEWUSER)";

/// Waits at most `d` for the program to exit; kills it after that.
fn exit_within(p: &mut Proc, d: Duration) -> Option<std::process::ExitStatus> {
    drop(p.stdin.take());
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if let Some(st) = p.child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = p.child.kill();
    None
}

/// (a) A server whose listener is not close-on-exec runs a helper, as system() would: the exec'd
/// image inherits the listener and never uses it. It must get no thread, so that it can enter a
/// user namespace (the helper calls unshare(CLONE_NEWUSER) by a raw syscall instruction, past
/// any hook: this is the process as the kernel sees it).
#[test]
fn an_inherited_listener_alone_starts_no_thread() {
    if !require_root("user namespaces") {
        return;
    }
    for preload in [false, true] {
        for mode in MODES {
            let mut r = with_mode(Run::new("guest_userns").args(["exec-probe"]), mode);
            if !preload {
                r = r.plain();
            }
            let mut p = r.spawn();
            let threads = p.expect("THREADS");
            let unshare = p.expect("UNSHARE");
            let done = p.expect("DONE");
            let err = p.stderr();
            let ctx = format!("preload={preload} mode={mode:?}: {threads} / {unshare} / {done}\n{err}");
            if !preload
                && !require(
                    field(&unshare, "rc") == "0",
                    "user namespaces (the run without keepfix could not make one)",
                    USERNS,
                )
            {
                return;
            }
            assert_eq!(field(&threads, "n"), "1", "{ctx}");
            assert_eq!(field(&unshare, "rc"), "0", "{ctx}");
            assert_eq!(field(&done, "child"), "0", "{ctx}");
            if preload {
                assert!(err.contains("adopt fd=3 role=inherited-listener"), "the helper did not adopt fd 3: {ctx}");
            }
            assert!(wait_exit(p).success());
        }
    }
}

/// (b) A server that listened (keepfix's thread runs), maybe closed its socket, then enters a
/// user namespace: through unshare(3) and syscall(SYS_unshare) in forked children, setns(2) into
/// its own mount namespace (refused to a process whose threads share its filesystem attributes),
/// and unshare(3) in the process itself. Each must succeed as without keepfix, and keepfix's
/// thread must be back afterwards.
#[test]
fn unshare_and_setns_succeed_as_without_keepfix() {
    if !require_root("user namespaces, setns") {
        return;
    }
    for close in [false, true] {
        for preload in [false, true] {
            for mode in MODES {
                let mut args = vec!["unshare"];
                if close {
                    args.push("close");
                }
                let mut r = with_mode(Run::new("guest_userns").args(args), mode);
                if !preload {
                    r = r.plain();
                }
                let mut p = r.spawn();
                p.expect("DONE");
                let lines = p.lines_for(Duration::from_millis(0));
                let err = p.stderr();
                let ctx = format!("close={close} preload={preload} mode={mode:?}: {lines:#?}\n{err}");
                let calls: Vec<&String> =
                    lines.iter().filter(|l| l.starts_with("UNSHARE") || l.starts_with("SETNS")).collect();
                assert_eq!(calls.len(), 4, "{ctx}");
                if !preload
                    && !require(
                        calls.iter().all(|l| field(l, "rc") == "0"),
                        "user namespaces (the run without keepfix could not make one)",
                        USERNS,
                    )
                {
                    return;
                }
                for l in &calls {
                    assert_eq!((field(l, "rc"), field(l, "errno")), ("0".into(), "0".into()), "{l}: {ctx}");
                    // keepfix's thread is back after the call (without keepfix there is none).
                    assert_eq!(field(l, "threads_after"), if preload { "2" } else { "1" }, "{l}: {ctx}");
                }
                if preload {
                    assert!(err.contains("watchdog_restarted reason=unshare"), "{ctx}");
                    assert!(err.contains("watchdog_restarted reason=setns"), "{ctx}");
                }
                assert!(wait_exit(p).success(), "{ctx}");
            }
        }
    }
}

// --- G3: a sandbox wins -------------------------------------------------------------------------

/// A program that installs a seccomp whitelist of its own calls (through prctl(3),
/// syscall(SYS_prctl), syscall(SYS_seccomp)), or enters strict mode, and then keeps using TCP:
/// it must run as without keepfix. keepfix says so once, before the filter is in place, and its
/// thread is gone (in strict mode the main thread's SYS_exit must end the process).
#[test]
fn a_seccomp_sandbox_wins() {
    for via in ["prctl", "syscall-prctl", "syscall-seccomp", "strict"] {
        for preload in [false, true] {
            for mode in MODES {
                let mut r = with_mode(Run::new("guest_seccomp").args([via]), mode);
                if !preload {
                    r = r.plain();
                }
                let mut p = r.spawn();
                p.expect("READY");
                let mut st = None;
                let lines = {
                    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.expect("DONE")));
                    if got.is_err() {
                        st = p.child.try_wait().ok().flatten();
                    }
                    p.lines_for(Duration::from_millis(0))
                };
                let ctx = |st: Option<std::process::ExitStatus>, err: String| {
                    format!("via={via} preload={preload} mode={mode:?}: exit {st:?}; {lines:#?}\n{err}")
                };
                assert!(lines.iter().any(|l| l == "DONE"), "{}", ctx(st, p.stderr()));
                let expect: &[&str] = if via == "strict" {
                    &["BYTE ok=1"]
                } else {
                    &["CONNECT rc=0", "ACCEPT ok=1", "BYTE ok=1", "CLOSE rc=0", "LISTEN rc=0"]
                };
                for e in expect {
                    assert!(lines.iter().any(|l| l == e), "no {e:?}: {}", ctx(st, p.stderr()));
                }
                let threads = thread_names(p.pid());
                assert!(
                    !threads.iter().any(|t| t == "keepfix"),
                    "keepfix's thread is still there: {threads:?}: {}",
                    ctx(st, p.stderr())
                );
                let st = exit_within(&mut p, Duration::from_secs(5));
                assert!(st.is_some_and(|s| s.success()), "{}", ctx(st, p.stderr()));
                if preload {
                    let err = p.stderr();
                    assert_eq!(err.lines().filter(|l| l.contains("sandboxed ")).count(), 1, "{}", ctx(st, p.stderr()));
                }
            }
        }
    }
}

// --- G4: no privilege of its own ----------------------------------------------------------------

/// (name, Uid line, CapEff) of every task of `pid`; the main thread first.
fn task_creds(pid: i32) -> Vec<(String, String, u64)> {
    let mut v = vec![];
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let get = |k: &str| st.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("").trim().to_string();
        let cap = u64::from_str_radix(&get("CapEff:"), 16).unwrap_or(u64::MAX);
        let main = e.file_name().to_str() == Some(&pid.to_string());
        let t = (get("Name:"), format!("{} / {}", get("Uid:"), get("Gid:")), cap);
        if main { v.insert(0, t) } else { v.push(t) }
    }
    v
}

/// A root server that listens (keepfix's thread starts) and then drops its privileges through
/// glibc's setresuid family, through capset only (every capability dropped, uid 0 kept), through
/// syscall(SYS_setresuid) on its main thread, and through raw syscall instructions. Afterwards
/// no task of the process has another uid or gid than the main thread, nor a capability the main
/// thread lacks; keepfix's thread has none at all, and is there.
#[test]
fn keepfix_holds_no_privilege_of_its_own() {
    if !require_root("it drops root's privileges") {
        return;
    }
    // It becomes nobody: not while the task test counts nobody's tasks.
    let _g = NOBODY_TASKS.lock().unwrap_or_else(|e| e.into_inner());
    for how in ["glibc", "capset", "syscall", "asm"] {
        for preload in [false, true] {
            for mode in MODES {
                let mut r = with_mode(Run::new("guest_creds").args([how]), mode);
                if !preload {
                    r = r.plain();
                }
                let mut p = r.spawn();
                p.expect("READY");
                let changed = p.expect("CHANGED");
                assert_eq!(field(&changed, "rc"), "0", "how={how}: {changed}\n{}", p.stderr());
                p.expect("AGAIN");
                let deadline = Instant::now() + Duration::from_secs(3);
                let ok = |t: &[(String, String, u64)]| {
                    let Some((_, uid, cap)) = t.first() else { return false };
                    t.iter().all(|(_, u, c)| u == uid && c & !cap == 0)
                        && (!preload || t.iter().any(|(n, _, c)| n == "keepfix" && *c == 0))
                        && t.iter().filter(|(n, _, _)| n == "keepfix").all(|(_, _, c)| *c == 0)
                };
                let mut tasks = task_creds(p.pid());
                while !ok(&tasks) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    tasks = task_creds(p.pid());
                }
                let ctx = format!("how={how} preload={preload} mode={mode:?}: {tasks:#?}\n{}", p.stderr());
                assert!(ok(&tasks), "a task keeps more than the program's main thread: {ctx}");
                if preload && how == "asm" {
                    assert!(p.stderr().contains("watchdog_stopped reason=credentials_changed"), "{ctx}");
                }
                assert!(wait_exit(p).success(), "{ctx}");
            }
        }
    }
}
