//! Stress (issue 7): keepfix never hangs, crashes, leaks or harms a program.
//!
//! 1. Signal handlers call close(), dup(), dup2(), dup3() and F_DUPFD (and make connections of
//!    their own) while the interrupted thread is inside socket, listen, connect, accept, close and
//!    dup hooks, and while the watchdog releases sockets.
//! 2. fd reuse under automatic release: socket threads leak, close promptly and close late, while
//!    file threads check their data byte for byte, under a low RLIMIT_NOFILE.
//! 3. fork, vfork, posix_spawn, exec chains and threads under churn: no hang, no crash, children
//!    with a working watchdog, exec'd images that adopt what they inherit.
//! 4. A soak: hundreds of thousands (KEEPFIX_SOAK_CONNS; a million by hand) of connections through
//!    a leaky server in close mode, with fds, memory and keepfix's table flat, and every client
//!    served.
//!
//! Every test has a deadline (a hang fails it, with the kernel's view of every thread), proves
//! that it exercised what it claims (handler runs counted inside each hooked call, releases and
//! vacates counted in keepfix's metrics file), and checks every result the program saw. The tests
//! below "Reproductions" each pin one defect found while writing these; they fail until it is
//! fixed. The tests take both cores, so they run one at a time.
mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

// --- Helpers ------------------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// One stress test at a time: they each load both cores, and timings matter.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A directory for one test's files (metrics, data files), removed afterwards.
/// What every thread of `pid` is doing, for a hang's report: name, state, kernel wait channel.
fn threads_of(pid: i32) -> String {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let t = e.path();
            let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default().trim().to_string();
            let stat = read("stat");
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap_or('?')).unwrap_or('?');
            out.push(format!(
                "{} {} state={state} wchan={}",
                e.file_name().to_string_lossy(),
                read("comm"),
                read("wchan")
            ));
        }
    }
    out.join("; ")
}

/// Reads `p`'s stdout until a line starts with `prefix` (returned), from `*from` on; fails the
/// test as a hang after `d`, with what each of its threads is waiting for.
fn await_line(p: &mut Proc, from: &mut usize, prefix: &str, d: Duration) -> String {
    let deadline = Instant::now() + d;
    loop {
        let lines = p.lines_for(Duration::from_millis(50));
        if let Some((i, l)) = lines.iter().enumerate().skip(*from).find(|(_, l)| l.starts_with(prefix)) {
            *from = i + 1;
            return l.clone();
        }
        if Instant::now() > deadline || p.child.try_wait().ok().flatten().is_some() {
            let exited = p.child.try_wait().ok().flatten();
            // Let the readers catch up with what it wrote last (a panic message, say).
            let lines = p.lines_for(Duration::from_millis(300));
            let tail: Vec<&String> = lines.iter().rev().take(30).rev().collect();
            let err = p.stderr();
            let err_tail: Vec<&str> = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            panic!(
                "no {prefix:?} line within {d:?} (exited: {exited:?}); threads: [{}]; last stdout: {tail:#?}; last stderr: {err_tail:#?}",
                threads_of(p.pid())
            );
        }
    }
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key).parse().unwrap_or_else(|_| panic!("{key}= is not a number in {line:?}"))
}

/// The lines of `lines` starting with `prefix`.
fn lines_with<'a>(lines: &'a [String], prefix: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.starts_with(prefix)).collect()
}

/// keepfix's log lines of process `pid` containing `part`.
fn log_of(stderr: &str, pid: impl std::fmt::Display, part: &str) -> Vec<String> {
    let tag = format!("keepfix[{pid}]: ");
    stderr.lines().filter(|l| l.contains(&tag) && l.contains(part)).map(String::from).collect()
}

/// close mode, acting at once, with a busy watchdog.
fn close_mode_busy(r: Run, scan: &str) -> Run {
    r.env("KEEPFIX_CLOSE_WAIT", "close").env("KEEPFIX_CLOSE_WAIT_AFTER", "0s").env("KEEPFIX_SCAN_INTERVAL", scan)
}

// --- 1. Signals -----------------------------------------------------------------------------------

/// Runs stress_signals for `seconds` and returns its HITS, LOOP and DONE lines (and the metrics
/// file read before it exits, when `dir` is given).
fn run_signals(
    run: Run,
    seconds: u64,
    dir: Option<&TempDir>,
) -> (String, String, String, Option<HashMap<String, f64>>) {
    let mut p = run.args(["--seconds", &seconds.to_string(), "--hold"]).spawn();
    let mut at = 0;
    await_line(&mut p, &mut at, "READY", Duration::from_secs(10));
    // The program stops by itself after `seconds`; a deadlock in a hook (or in the handler) stops
    // it for ever.
    let hits = await_line(&mut p, &mut at, "HITS", Duration::from_secs(seconds + 25));
    let lp = await_line(&mut p, &mut at, "LOOP", Duration::from_secs(5));
    let done = await_line(&mut p, &mut at, "DONE", Duration::from_secs(5));
    let m = dir.map(|d| await_metrics(d.path(), p.pid()));
    let (lines, status) = p.finish();
    let failures: Vec<&String> =
        lines.iter().filter(|l| l.starts_with("FAIL") || l.starts_with("HANDLER_FAIL")).collect();
    assert!(status.success(), "{done}: {failures:#?}");
    assert_eq!((num(&done, "failures"), num(&done, "handler_failures")), (0, 0), "{failures:#?}");
    (hits, lp, done, m)
}

/// The handler must really have interrupted every kind of hooked call, many times.
fn assert_hits(hits: &str) {
    for op in ["socket", "listen", "connect", "accept", "close", "dup", "dup2", "dup3", "fcntl", "setsockopt"] {
        assert!(num(hits, op) >= 10, "the handler ran only {} times inside {op}(): {hits}", num(hits, op));
    }
    assert!(num(hits, "total") >= 5000, "{hits}");
}

#[test]
fn signal_handlers_close_and_dup_while_hooks_run() {
    let _g = serial();
    // The program's own expectations, without keepfix: every check holds.
    let (hits, _, _, _) = run_signals(Run::new("stress_signals").plain(), 2, None);
    assert_hits(&hits);
    // keepfix by default (log mode), then in close mode with its watchdog waking every 1 ms and
    // releasing the connections the program leaks, some while the program (or its handler)
    // closes them.
    let (hits, _, _, _) = run_signals(Run::new("stress_signals"), 2, None);
    assert_hits(&hits);
    let dir = TempDir::new("signals");
    let run = close_mode_busy(Run::new("stress_signals"), "1ms").env("KEEPFIX_METRICS", dir.str());
    let (hits, lp, _, m) = run_signals(run, 4, Some(&dir));
    assert_hits(&hits);
    let m = m.unwrap();
    let closed = metric(&m, "keepfix_close_wait_actions_total{action=\"shutdown\"}");
    let closed_by_program = metric(&m, "keepfix_released_closed_by_program_total");
    // The program closes every leaked connection late (both the main loop's and the handler's):
    // keepfix released hundreds first, and those closes of placeholders returned 0 (checked).
    assert!(closed >= 300.0, "keepfix released only {closed} sockets: {lp}");
    assert!(closed_by_program >= 200.0, "{closed_by_program} closes of released numbers: {lp}");
    assert!(num(&lp, "handler_late_closes") >= 1000, "{lp}");
}

// --- 2. fd reuse under automatic release -------------------------------------------------------------

struct Churn {
    stats: String,
    failures: Vec<String>,
    metrics: Option<HashMap<String, f64>>,
    stderr: String,
}

/// Runs stress_churn against a plain server that closes every connection at once.
fn run_churn(preload: bool, mix: &str, seconds: u64, nofile: u64, late: u64) -> Churn {
    let dir = TempDir::new("churn");
    let mut server = Run::new("stress_churn").plain().args(["--server", "0"]).spawn();
    let port = server.port();
    let mut run = Run::new("stress_churn").nofile(nofile).env("KEEPFIX_METRICS", dir.str());
    run = if preload { close_mode_busy(run, "2ms") } else { run.plain() };
    let mut p = run
        .args(["--sock-threads", "4", "--file-threads", "4", "--seconds", &seconds.to_string(), "--mix", mix])
        .args(["--late", &late.to_string()])
        .args(["--hold", "--dir", dir.str(), "127.0.0.1", &port.to_string()])
        .spawn();
    let mut at = 0;
    await_line(&mut p, &mut at, "READY", Duration::from_secs(10));
    let stats = await_line(&mut p, &mut at, "STATS", Duration::from_secs(seconds + 30));
    let metrics = preload.then(|| await_metrics(dir.path(), p.pid()));
    let stderr = p.stderr();
    let (lines, _) = p.finish();
    server.stop();
    Churn { stats, failures: lines.into_iter().filter(|l| l.starts_with("FAIL")).collect(), metrics, stderr }
}

#[test]
fn fd_reuse_under_auto_close_prompt_and_late_closes() {
    let _g = serial();
    // Half the connections closed at EOF, half 4000 connections (of their thread) later; none leaked for good, so
    // the fd table never nears the limit (no vacate): this is the release protocol against the
    // program's own closes, with file threads watching for any fd that changes under them.
    // The late ones stay unread for longer than keepfix waits for a program to read its EOF
    // (250 ms), so keepfix releases them while the program may close them at any moment.
    let c = run_churn(true, "5,0", 8, 19000, 4000);
    let m = c.metrics.as_ref().unwrap();
    let closed = metric(m, "keepfix_close_wait_actions_total{action=\"shutdown\"}");
    assert!(closed >= 1000.0, "keepfix released only {closed} sockets: {}", c.stats);
    assert!(metric(m, "keepfix_released_closed_by_program_total") >= 1000.0, "{}", c.stats);
    assert!(num(&c.stats, "file_rounds") >= 2000, "{}", c.stats);
    assert_eq!(num(&c.stats, "failures"), 0, "{}: {:#?}", c.stats, c.failures);
}

#[test]
fn fd_reuse_under_auto_close_with_leaks_and_vacating() {
    let _g = serial();
    // Without keepfix, the leak (3 connections in 10 never closed) exhausts 256 fds at once.
    let plain = run_churn(false, "5,3", 2, 256, 16);
    assert!(num(&plain.stats, "emfile") > 0, "the leak should exhaust the fds without keepfix: {}", plain.stats);
    // With keepfix, in close mode, at once, the watchdog waking every 2 ms: it releases the leaked
    // sockets and, the table being small, frees the numbers (vacate) of the leaked
    // ones (whose EOF the program read), never of the late ones it will still close.
    let c = run_churn(true, "5,3", 12, 256, 16);
    let m = c.metrics.as_ref().unwrap();
    let closed = metric(m, "keepfix_close_wait_actions_total{action=\"shutdown\"}");
    let vacated = metric(m, "keepfix_close_wait_actions_total{action=\"vacated\"}");
    let vacate_lines = c.stderr.lines().filter(|l| l.contains(": vacate count=")).count();
    assert!(closed >= 5000.0 && vacated >= 2000.0, "keepfix did not act enough: closed={closed} vacated={vacated}");
    assert!(vacate_lines >= 1, "no vacate line in the log");
    assert!(num(&c.stats, "file_rounds") >= 2000, "{}", c.stats);
    // No file operation may see EBADF or another thread's data, and every close() succeeds.
    assert_eq!(
        num(&c.stats, "failures"),
        0,
        "the program was harmed (vacated numbers the program still owned were reused, then closed or used by it): {}: {:#?}",
        c.stats,
        c.failures
    );
}

// --- 3. fork, vfork, posix_spawn, exec chains, threads ---------------------------------------------------

struct ForkRun {
    lines: Vec<String>,
    stats: String,
    stderr: String,
    /// The exec chain's last image, and the keepalive options of its fd 3 (read from outside).
    leaf: (i32, Ka),
    metrics: HashMap<String, f64>,
}

fn run_fork(extra: &[&str], seconds: u64) -> ForkRun {
    let dir = TempDir::new("fork");
    let mut p = close_mode_busy(Run::new("stress_fork"), "1ms")
        .env("KEEPFIX_METRICS", dir.str())
        .args(["--seconds", &seconds.to_string(), "--hold"])
        .args(extra.iter().copied())
        .spawn();
    let mut at = 0;
    await_line(&mut p, &mut at, "READY", Duration::from_secs(10));
    // The exec chain's last image: its keepfix adopted fd 3 and set its own timings on it.
    let mut leaf_at = at;
    let leaf = await_line(&mut p, &mut leaf_at, "LEAF", Duration::from_secs(10));
    let leaf_pid: i32 = field(&leaf, "pid").parse().unwrap();
    let leaf_ka = keepalive_of(leaf_pid, 3);
    let stats = await_line(&mut p, &mut at, "STATS", Duration::from_secs(seconds + 40));
    let metrics = await_metrics(dir.path(), p.pid());
    let stderr = p.stderr();
    let (lines, _) = p.finish();
    ForkRun { lines, stats, stderr, leaf: (leaf_pid, leaf_ka), metrics }
}

#[test]
fn fork_vfork_spawn_exec_and_threads_under_churn() {
    let _g = serial();
    let r = run_fork(&[], 8);
    let problems: Vec<&String> = r
        .lines
        .iter()
        .filter(|l| ["CHILD_FAIL", "HUNG", "FAIL", "SLOW_CLOSE", "BAD_CLOSE"].iter().any(|p| l.starts_with(p)))
        .collect();
    assert_eq!(
        (num(&r.stats, "child_failures"), num(&r.stats, "hung"), num(&r.stats, "failures")),
        (0, 0, 0),
        "{}: {problems:#?}",
        r.stats
    );
    // Enough of everything happened, while the watchdog released hundreds of sockets.
    for (what, min) in [("closeall", 100), ("leak", 25), ("vfork", 50), ("spawn", 50), ("thread", 50), ("churn", 5000)]
    {
        assert!(num(&r.stats, what) >= min, "{what}: {}", r.stats);
    }
    // The parent's watchdog saw its churned sockets fall into CLOSE_WAIT. It shuts few of them
    // down: each was dup()ed and the process forks all the time, so each may be shared, and is
    // only released after 2 s without data sent (issue 11, I2); the program closes it sooner.
    let found = metric(&r.metrics, "keepfix_close_wait_found_total");
    assert!(found >= 1000.0, "the parent's watchdog found only {found} sockets in CLOSE_WAIT");
    // Each forked worker's own watchdog released its leaked socket (seen from its /proc).
    let leaks = lines_with(&r.lines, "CHILD_LEAK");
    assert_eq!(leaks.len(), 25, "{leaks:#?}");
    for l in &leaks {
        assert_eq!(field(l, "released"), "1", "{l}");
    }
    // The exec chain: each image loaded keepfix afresh and adopted the inherited connection; the
    // last one's own setting (KEEPFIX_IDLE=40, each image stricter than the one before: the
    // stricter value wins) is on the socket, read from outside.
    let (leaf_pid, leaf_ka) = r.leaf;
    assert_eq!(leaf_ka, ka(40, 10, 6), "the exec'd image did not configure the socket it inherited");
    let adopted = log_of(&r.stderr, leaf_pid, "adopt fd=3 ");
    assert!(!adopted.is_empty() && adopted[0].contains("action=keepalive_on"), "{adopted:#?}");
}

// --- 4. Soak ---------------------------------------------------------------------------------------

/// How many connections the soak makes: KEEPFIX_SOAK_CONNS, or 200 000 (about 15 s here). The
/// million (about 70 s on this 2-core machine, debug build) by hand:
/// `KEEPFIX_SOAK_CONNS=1000000 cargo test --test stress soak -- --nocapture`
fn soak_conns() -> u64 {
    std::env::var("KEEPFIX_SOAK_CONNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}

fn vm_rss_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// A server whose stdout is read on the fly: its per-connection lines (ACCEPT, EOF) are counted
/// and dropped (a million of them would not fit in a test's memory); the others are kept.
struct Quiet {
    child: std::process::Child,
    lines: Receiver<String>,
    stderr: PathBuf,
}

impl Quiet {
    fn spawn(prog: PathBuf, args: &[&str], env: &[(&str, &str)], nofile: u64, stderr: PathBuf) -> Quiet {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(prog);
        c.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(std::fs::File::create(&stderr).unwrap());
        for (k, _) in std::env::vars() {
            if k.starts_with("KEEPFIX_") || k == "LD_PRELOAD" {
                c.env_remove(k);
            }
        }
        c.env("LD_PRELOAD", lib());
        for (k, v) in env {
            c.env(k, v);
        }
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                let l = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = c.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ACCEPT fd=") || line.starts_with("EOF fd=") {
                    continue;
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Quiet { child, lines: rx, stderr }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn expect(&self, prefix: &str, d: Duration, seen: &mut Vec<String>) -> String {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => {
                    panic!("no {prefix:?} line within {d:?}; threads: [{}]; lines: {seen:#?}", threads_of(self.pid()))
                }
            }
        }
    }
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn soak_short_connections_through_a_leaky_server() {
    let _g = serial();
    let n = soak_conns();
    let nofile = 1024u64;
    let dir = TempDir::new("soak");
    let server = Quiet::spawn(
        c_program("leak_eof_server"),
        &["0"],
        &[
            ("KEEPFIX_CLOSE_WAIT", "close"),
            ("KEEPFIX_CLOSE_WAIT_AFTER", "0s"),
            ("KEEPFIX_SCAN_INTERVAL", "10ms"),
            ("KEEPFIX_METRICS", dir.str()),
        ],
        nofile,
        dir.path().join("server.err"),
    );
    let mut seen = Vec::new();
    let ready = server.expect("READY", Duration::from_secs(10), &mut seen);
    let port = field(&ready, "port");
    let pid = server.pid();
    let t0 = Instant::now();
    let mut client = Command::new(c_program("load_client"))
        .args(["--count", &n.to_string(), "--parallel", "8", "--timeout-ms", "5000", "127.0.0.1", &port])
        .env_remove("LD_PRELOAD")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Samples while the load runs: open fds, RSS, and keepfix's own table size.
    let mut samples: Vec<(Duration, usize, u64, f64)> = Vec::new();
    let budget = Duration::from_secs(30 + n / 2_000);
    let status = loop {
        if let Some(st) = client.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < budget,
            "the soak did not finish within {budget:?}; server threads: [{}]",
            threads_of(pid)
        );
        let table = metrics(dir.path(), pid).and_then(|m| m.get("keepfix_table_bytes").copied()).unwrap_or(0.0);
        samples.push((t0.elapsed(), fd_count(pid), vm_rss_kb(pid).unwrap_or(0), table));
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    let mut out = String::new();
    std::io::Read::read_to_string(client.stdout.as_mut().unwrap(), &mut out).unwrap();
    let result = out.lines().find(|l| l.starts_with("RESULT")).unwrap_or_default().to_string();
    eprintln!("soak: {n} connections in {took:?} ({:.0}/s): {result}", n as f64 / took.as_secs_f64());
    // After the load, keepfix leaves nothing in CLOSE_WAIT.
    eventually("no CLOSE_WAIT left after the load", Duration::from_secs(5), || {
        tcp_fds(pid).iter().filter(|t| t.state == CLOSE_WAIT).count() == 0
    });
    let m = await_metrics(dir.path(), pid);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stats = server.expect("STATS", Duration::from_secs(10), &mut seen);
    let stderr = server.stderr();

    // Flat: fds never past the limit, memory and keepfix's table the same at the end as after
    // the first tenth of the run.
    assert!(samples.len() >= 10, "{} samples", samples.len());
    let warm = samples.len() / 10;
    let max_fds = samples.iter().map(|s| s.1).max().unwrap();
    assert!(max_fds as u64 <= nofile, "{max_fds} fds open");
    let rss_warm = samples[..=warm].iter().map(|s| s.2).max().unwrap();
    let rss_max = samples.iter().map(|s| s.2).max().unwrap();
    assert!(rss_max <= rss_warm + 1024, "server RSS grew from {rss_warm} kB to {rss_max} kB");
    let table_max = samples.iter().map(|s| s.3).fold(0.0, f64::max);
    assert!(table_max <= 32768.0 && metric(&m, "keepfix_table_bytes") <= 32768.0, "keepfix's table: {table_max} bytes");
    // keepfix did the work: under a 1024-fd limit, the number of nearly every connection was
    // freed (vacated: the program had read its EOF, and it was done with it).
    let vacated = metric(&m, "keepfix_close_wait_actions_total{action=\"vacated\"}");
    assert!(vacated >= 0.95 * n as f64, "keepfix freed {vacated} of {n} numbers");
    // Nothing lost: every client served, the server saw every connection and no error.
    let others: Vec<&String> =
        seen.iter().filter(|l| !l.starts_with("READY") && !l.starts_with("STATS")).take(20).collect();
    let emfile_lines: Vec<&str> = stderr.lines().filter(|l| l.contains(": emfile ")).take(5).collect();
    assert!(
        status.success() && num(&result, "ok") == n && num(&result, "fail") == 0,
        "{result}; {stats}; {others:#?}; {emfile_lines:#?}"
    );
    for key in ["accepted", "served"] {
        assert_eq!(num(&stats, key), n, "{stats}; {others:#?}");
    }
    assert_eq!((num(&stats, "errors"), num(&stats, "accept_err")), (0, 0), "{stats}; {others:#?}; {emfile_lines:#?}");
}

// --- Reproductions ------------------------------------------------------------------------------------
//
// Each of these pins one defect found by the stress tests above, as small and as deterministic as
// it could be made. They fail until the defect is fixed.

#[test]
fn a_pooled_connection_keepfix_released_is_never_vacated_under_the_pool() {
    let _g = serial();
    // A pooled connection the pool has not yet noticed is dead (it never read the EOF): keepfix
    // shuts it down (the socket keeps its number); the fd table then passes 90% of the limit,
    // where keepfix really closes ("vacates") numbers of forgotten sockets. Were this one vacated, the next
    // file the program opens would get the number, the pool's next use would write its request
    // into that file and its close() would close it. Only placeholders of sockets whose end the
    // program had read itself are vacated (tests/closewait.rs and tests/harm.rs show those are).
    let dir = TempDir::new("vacate");
    let p = close_mode_busy(Run::new("stress_vacate_reuse"), "10ms").nofile(64).args([dir.str()]).spawn();
    let (lines, status) = p.finish();
    assert!(status.success(), "{lines:#?}");
    let get = |prefix: &str| lines.iter().find(|l| l.starts_with(prefix)).cloned().unwrap_or_default();
    assert_eq!(field(&get("RELEASED"), "ok"), "1", "{lines:#?}");
    assert_eq!(field(&get("VACATED"), "ok"), "0", "the pool's number was closed under it: {lines:#?}");
    assert_eq!(field(&get("DONE"), "harmed"), "0", "the program's own fd was given away under it: {lines:#?}");
}

#[test]
fn repro_a_signal_handler_dup_starts_the_watchdog_inside_malloc() {
    let _g = serial();
    // A process whose watchdog is not running yet (an exec'd program with an inherited
    // connection): the first hook that may start it is a dup() in a SIGALRM handler, while the
    // main thread is inside malloc(). pthread_create() then re-enters malloc: heap corruption
    // (glibc aborts) or a deadlock.
    let mut p = Run::new("stress_sigstart").args(["--mode", "exec", "--children", "200"]).spawn();
    let mut at = 0;
    let done = await_line(&mut p, &mut at, "DONE", Duration::from_secs(60));
    let stderr = p.stderr();
    let (lines, _) = p.finish();
    let bad: Vec<&String> = lines.iter().filter(|l| l.starts_with("BAD_EXIT") || l.starts_with("HANG")).collect();
    let glibc: Vec<&str> = stderr.lines().filter(|l| l.contains("malloc") || l.contains("corrupted")).take(3).collect();
    assert_eq!((num(&done, "hung"), num(&done, "bad_exit")), (0, 0), "{done}: {bad:#?} {glibc:#?}");
}

#[test]
fn repro_a_signal_handler_close_of_the_socket_accept_is_releasing() {
    let _g = serial();
    // accept() at EMFILE releases dead connections itself, in the program's thread; a SIGALRM
    // handler on that thread closes one of them meanwhile: its close() waits 5 s for a release
    // that cannot end before the handler returns, then the interrupted release closes the number
    // a second time (EBADF: a debug build aborts; a release build could close a reused number).
    let p = close_mode_busy(Run::new("stress_sigaccept"), "1h").nofile(64).args(["--seconds", "4"]).spawn();
    let (lines, status) = p.finish();
    let stats = lines.iter().find(|l| l.starts_with("STATS")).cloned();
    assert!(status.success(), "exit {status:?}: {lines:#?}");
    let stats = stats.unwrap();
    assert!(num(&stats, "sweeps") >= 100, "{stats}");
    assert!(num(&stats, "slowest_close_ms") < 1000, "a close() in the handler waited: {stats}");
    assert_eq!(num(&stats, "close_fail"), 0, "{stats}");
}

#[test]
fn repro_a_forked_child_inherits_marks_of_keepfix_fds_it_does_not_have() {
    let _g = serial();
    // fork() copies the fd table before memory, while the parent's watchdog keeps running: the
    // child can inherit the "keepfix's own" mark of an fd opened after the table was copied.
    // (a) A child whose first hook starts its own watchdog closes the parent's /proc fds it
    // believes it inherited: EBADF (rustix's debug assertion aborts the child).
    let mut p =
        Run::new("stress_forkown").env("KEEPFIX_SCAN_INTERVAL", "1ms").nofile(64).args(["--fresh", "300"]).spawn();
    let mut at = 0;
    let fresh = await_line(&mut p, &mut at, "DONE", Duration::from_secs(60));
    let (fresh_lines, _) = p.finish();
    // (b) A child using every fd number: its close() of its own file at a number marked as
    // keepfix's returns EBADF and leaves the file open (rarer: a metrics file every tick).
    let dir = TempDir::new("forkown");
    let mut p = Run::new("stress_forkown")
        .env("KEEPFIX_SCAN_INTERVAL", "1ms")
        .env("KEEPFIX_METRICS", dir.str())
        .nofile(64)
        .args(["--children", "20000"])
        .spawn();
    let mut at = 0;
    let seq = await_line(&mut p, &mut at, "DONE", Duration::from_secs(90));
    let (seq_lines, _) = p.finish();
    let bad: Vec<&String> = fresh_lines
        .iter()
        .chain(seq_lines.iter())
        .filter(|l| l.starts_with("CHILD_DIED") || l.starts_with("BAD_CLOSE"))
        .collect();
    assert_eq!(
        (num(&fresh, "died"), num(&fresh, "bad"), num(&seq, "died"), num(&seq, "bad")),
        (0, 0, 0, 0),
        "{fresh} / {seq}: {bad:#?}"
    );
}

#[test]
fn repro_a_forked_child_logs_its_releases_under_its_own_pid() {
    let _g = serial();
    // A busy parent has spent its log budget (60 lines, 5 a second); its forked workers inherit the
    // empty bucket and the parent's count of suppressed lines: a worker's release is not logged,
    // and its first line claims the parent's suppressed lines as its own.
    let r = run_fork(&[], 2);
    let leaks = lines_with(&r.lines, "CHILD_LEAK");
    assert!(!leaks.is_empty());
    let mut missing = Vec::new();
    for l in &leaks {
        let (pid, fd) = (field(l, "pid"), field(l, "fd"));
        if log_of(&r.stderr, &pid, &format!("close_wait fd={fd} ")).is_empty() {
            missing.push(format!("{l}: {:?}", log_of(&r.stderr, &pid, "")));
        }
    }
    assert!(missing.is_empty(), "{} of {} workers' releases were not logged: {missing:#?}", missing.len(), leaks.len());
}

#[test]
fn repro_underscore_fork_children() {
    let _g = serial();
    // glibc's _Fork() (2.34+, async-signal-safe) runs no atfork handlers: the child keeps the
    // parent's watchdog state (no watchdog of its own ever starts: its leaks are never released)
    // and a release the parent's watchdog had under way at fork time (a close() of that number in
    // the child waits 5 s).
    let dir = TempDir::new("underscore-fork");
    let mut p = close_mode_busy(Run::new("stress_fork"), "1ms")
        .env("KEEPFIX_METRICS", dir.str())
        .args(["--seconds", "3", "--fork-fn", "_Fork"])
        .spawn();
    let mut at = 0;
    let stats = await_line(&mut p, &mut at, "STATS", Duration::from_secs(40));
    let (lines, _) = p.finish();
    let leaks = lines_with(&lines, "CHILD_LEAK");
    let unreleased = leaks.iter().filter(|l| field(l, "released") == "0").count();
    let slow: Vec<&String> = lines_with(&lines, "SLOW_CLOSE");
    assert!(
        unreleased == 0 && slow.is_empty() && num(&stats, "child_failures") == 0,
        "{stats}: {unreleased} of {} _Fork children's leaks never released; slow closes: {slow:#?}",
        leaks.len()
    );
}
