//! Adversarial tests of keepfix's promise (it never harms the program), from a real program's
//! point of view: c-tests/break_*.c run under keepfix and as a plain control, checked from
//! outside (client bytes, file bytes, the program's own reports). See each test's comment for
//! the attack, the check and the verdict; the figures are from `cargo test --test breaker` on
//! 70934fa (2 cores), where the two hand-over tests failed (fixed since: a hook that waited in
//! vain checks the number's inode before it hands a close over), and the SIGPIPE one, kept as a
//! documented limitation (ignored, with its reason).
mod common;
use common::*;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

fn close_mode(run: Run) -> Run {
    run.env("KEEPFIX_CLOSE_WAIT", "close").env("KEEPFIX_CLOSE_WAIT_AFTER", "0s").env("KEEPFIX_SCAN_INTERVAL", "100ms")
}

fn stats(lines: &[String]) -> String {
    lines.iter().find(|l| l.starts_with("STATS")).cloned().unwrap_or_else(|| panic!("no STATS line in {lines:?}"))
}

fn with_prefix(lines: &[String], p: &str) -> Vec<String> {
    lines.iter().filter(|l| l.starts_with(p)).cloned().collect()
}

// ---- ptrace: holding keepfix's thread at one instant ------------------------------------------

/// The thread named `keepfix` of process `pid`.
fn watchdog_tid(pid: i32) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(t) = watchdog_tid_now(pid) {
            return Some(t);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn watchdog_tid_now(pid: i32) -> Option<i32> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        if std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).is_ok_and(|c| c.trim() == "keepfix") {
            return Some(tid);
        }
    }
    None
}

#[repr(C)]
#[derive(Default)]
struct SyscallInfo {
    op: u8,
    pad: [u8; 3],
    arch: u32,
    ip: u64,
    sp: u64,
    /// entry: nr, args[6]; exit: rval (i64), is_error (u8)
    data: [u64; 7],
}

const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;

/// Traces thread `tid` (keepfix's) and, each time it returns 0 from a close() of a number for
/// which `pick` says yes, holds it stopped right there, just after that system call, for `hold`;
/// after `holds` such stops, or `within`, lets it go. Returns the numbers it held it at. Must run
/// on one thread (ptrace's tracer is a thread).
fn hold_after_close(tid: i32, pick: impl Fn(i32) -> bool, hold: Duration, holds: usize, within: Duration) -> Vec<i32> {
    // SAFETY: ptrace and waitpid on a thread of our own child process.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, libc::PTRACE_O_TRACESYSGOOD as usize) != 0 {
            panic!("PTRACE_SEIZE {tid}: {}", std::io::Error::last_os_error());
        }
        libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
        let deadline = Instant::now() + within;
        let mut last_close: Option<i32> = None;
        let mut sig: usize;
        let mut found = vec![];
        loop {
            let mut st = 0;
            if libc::waitpid(tid, &mut st, libc::__WALL) != tid || !libc::WIFSTOPPED(st) {
                return found;
            }
            let s = libc::WSTOPSIG(st);
            if s == (libc::SIGTRAP | 0x80) {
                let mut info = SyscallInfo::default();
                libc::ptrace(
                    PTRACE_GET_SYSCALL_INFO as libc::c_uint,
                    tid,
                    std::mem::size_of::<SyscallInfo>(),
                    &mut info as *mut SyscallInfo,
                );
                match info.op {
                    1 => {
                        last_close = (info.data[0] == libc::SYS_close as u64).then_some(info.data[1] as i32);
                    }
                    2 => {
                        if let Some(fd) = last_close.take() {
                            if info.data[0] == 0 && pick(fd) {
                                found.push(fd);
                                std::thread::sleep(hold);
                            }
                        }
                    }
                    _ => {}
                }
                sig = 0;
            } else if (st >> 16) != 0 {
                // PTRACE_EVENT_STOP (our interrupt, or a group stop)
                sig = 0;
            } else {
                sig = s as usize; // a signal for the thread: deliver it
            }
            if found.len() >= holds || Instant::now() > deadline {
                libc::ptrace(libc::PTRACE_DETACH, tid, 0, sig);
                return found;
            }
            libc::ptrace(libc::PTRACE_SYSCALL, tid, 0, sig);
        }
    }
}

// ---- 1. a close() handed over to a release that already closed the number --------------------
//
// Attack: break_handover (RLIMIT_NOFILE 128, close mode, AFTER=0s, scan 100 ms) fills its table
// past 90% with /dev/null and 14 connections it read to EOF and kept, so the watchdog vacates
// them (vacate_forgotten_many). A worker thread opens, closes and re-checks a log file in a
// loop. keepfix's thread is held (ptrace, 300 ms) right after its close() of a vacated number
// returned, before end_release: the "stopped or starved" thread the README says hooks cope with.
// The worker's open() gets that number (lowest free), its close() finds the slot Releasing,
// waits 1 ms, hands the close over and returns 0 without closing; end_release then sees
// CLOSE_PENDING with closed == true and closes nothing. Check: every close() that returned 0
// closed the file (the kernel no longer has that file at that number). The control (plain, and
// keepfix without the hold) never shows it.
//
// Verdict on 70934fa: BROKE. See the report: fdtable.rs end_release / hooks.rs before_close.

/// Runs break_handover under RLIMIT_NOFILE 128 with 14 half-closed clients; with `trace`,
/// keepfix's thread is held after each close() of a number `pick` selects. Returns the
/// program's lines and the numbers keepfix's thread was held at.
fn handover_run(run: Run, trace: Option<fn(i32) -> bool>, conns: usize) -> (Vec<String>, Vec<i32>) {
    let dir = TempDir::new("break-handover");
    let run = run.env("KEEPFIX_METRICS", dir.str()).args(["--conns", &conns.to_string()]);
    let mut p = run.args([dir.str()]).nofile(128).spawn();
    let port = p.port();
    p.expect("FILLED");
    let pid = p.pid();
    let tracer = trace.map(|pick| {
        let tid = watchdog_tid(pid).expect("no keepfix thread");
        std::thread::spawn(move || hold_after_close(tid, pick, Duration::from_millis(60), 10, Duration::from_secs(4)))
    });
    // Give the tracer time to attach before the table fills.
    std::thread::sleep(Duration::from_millis(200));
    let mut clients = vec![];
    for _ in 0..conns {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"req\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        clients.push(c);
    }
    for _ in 0..conns {
        p.expect("EOF");
    }
    let held = tracer.map(|t| t.join().unwrap()).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(if trace.is_some() { 200 } else { 1200 }));
    drop(p.stdin.take());
    let (lines, st) = p.finish();
    assert!(st.success(), "break_handover exited {st:?}: {lines:?}");
    (lines, held)
}

fn no_noop(what: &str, lines: &[String], held: &[i32]) {
    let noop = with_prefix(lines, "CLOSE_NOOP");
    let still = with_prefix(lines, "STILL_OPEN");
    assert!(
        noop.is_empty() && still.is_empty(),
        "{what} (keepfix's thread held after its close of {held:?}): the program's close() returned 0 and did not close: {noop:?}; at exit {still:?}; {}",
        stats(lines)
    );
}

#[test]
fn close_handed_over_after_the_release_closed() {
    let plain =
        std::thread::spawn(|| handover_run(Run::new("break_handover").plain().args(["--batch", "4"]), None, 14));
    let free =
        std::thread::spawn(|| handover_run(close_mode(Run::new("break_handover")).args(["--batch", "4"]), None, 14));
    let (held, at) =
        handover_run(close_mode(Run::new("break_handover")).args(["--batch", "4"]), Some(|fd| fd < 112), 14);
    let (plain, _) = plain.join().unwrap();
    let (free, _) = free.join().unwrap();
    no_noop("control", &plain, &[]);
    no_noop("keepfix, thread not held", &free, &[]);
    assert!(!at.is_empty(), "keepfix's thread never closed a vacated number (no vacate?): {}", stats(&held));
    no_noop("keepfix, vacate", &held, &at);
}

// ---- 2. the same with one of keepfix's own fds (ownfd::close) --------------------------------
//
// Attack: break_handover with every number below keepfix's own (112..) taken (--fill 112, no
// connections) and KEEPFIX_METRICS on: each tick the watchdog writes its metrics file through a
// Temp fd high in the table and closes it with ownfd::close (Own -> Own|BUSY, close, force_none).
// keepfix's thread is held just after that close. The worker (4 files per round) gets the number,
// closes it: the slot is Own|BUSY, the close waits 1 ms, is handed over and returns 0; then
// force_none() forgets the slot and closes nothing. Check and control as in test 1.
//
// Verdict on 70934fa: BROKE. See the report: ownfd.rs close().

#[test]
fn close_handed_over_after_keepfix_closed_its_own_fd() {
    let plain = std::thread::spawn(|| {
        handover_run(Run::new("break_handover").plain().args(["--batch", "4", "--fill", "112"]), None, 0)
    });
    let (held, at) = handover_run(
        Run::new("break_handover").env("KEEPFIX_SCAN_INTERVAL", "100ms").args(["--batch", "4", "--fill", "112"]),
        Some(|fd| fd >= 112),
        0,
    );
    let (plain, _) = plain.join().unwrap();
    no_noop("control", &plain, &[]);
    assert!(!at.is_empty(), "keepfix's thread closed no fd of its own: {}", stats(&held));
    no_noop("keepfix, own fd", &held, &at);
}

// ---- 3..5. using the number of a half-closed connection near the fd limit --------------------

/// Runs break_eofuse in `mode` under RLIMIT_NOFILE 128 (table past 90%: the watchdog vacates);
/// `conns` clients send "id-N" and half-close, one more is the sacrificial leak. Returns the
/// program's lines, its exit status and each client's bytes.
fn eofuse_run(
    run: Run,
    mode: &str,
    conns: usize,
    fill: usize,
) -> (Vec<String>, std::process::ExitStatus, Vec<Vec<u8>>, TempDir) {
    let dir = TempDir::new("break-eofuse");
    let mut p = run
        .args(["--mode", mode, "--conns", &conns.to_string(), "--fill", &fill.to_string(), dir.str()])
        .nofile(128)
        .spawn();
    let port = p.port();
    p.expect("FILLED");
    let mut clients = vec![];
    for i in 0..=conns {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(format!("id-{i}\n").as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        clients.push(c);
        if i < conns {
            p.expect("ACCEPT");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let got: Vec<Vec<u8>> = clients.iter_mut().take(conns).map(|c| read_until(c, deadline)).collect();
    let (lines, st) = p.finish();
    (lines, st, got, dir)
}

fn keepfix_close_after(after: &str) -> Run {
    Run::new("break_eofuse")
        .env("KEEPFIX_CLOSE_WAIT", "close")
        .env("KEEPFIX_CLOSE_WAIT_AFTER", after)
        .env("KEEPFIX_SCAN_INTERVAL", "100ms")
}

fn check_replies(what: &str, lines: &[String], st: std::process::ExitStatus, got: &[Vec<u8>]) {
    assert!(st.success(), "{what}: exited {st:?}; {lines:?}");
    for (i, g) in got.iter().enumerate() {
        assert_eq!(String::from_utf8_lossy(g), format!("reply-id-{i}\n"), "{what}: client {i}; {lines:?}");
    }
    assert!(stats(lines).contains("bad=0"), "{what}: {lines:?}");
}

// Attack 3 (zeroread): the program reads the request, then makes zero-length reads on the
// half-closed connection (read(fd, buf, 0), readv with two zero-length iovecs, recvmsg with no
// iovec, recv(fd, NULL, 0, 0)), each returning 0, then answers 1.5 s later. None of those is
// proof that it saw the end, so keepfix must not vacate it; SIGPIPE is at its default, so it must
// not shut it down either. A sacrificial connection read to EOF shows that vacating did run.
// Check: each client gets its own reply, every write succeeded. Verdict on 70934fa: HELD (4/4
// replies; the sacrificial number was vacated: PROOF open=0).
#[test]
fn zero_length_reads_are_not_eof() {
    let plain = std::thread::spawn(|| eofuse_run(Run::new("break_eofuse").plain(), "zeroread", 4, 110));
    let (lines, st, got, _d) = eofuse_run(keepfix_close_after("0s"), "zeroread", 4, 110);
    let (pl, pst, pgot, _pd) = plain.join().unwrap();
    check_replies("control", &pl, pst, &pgot);
    check_replies("keepfix", &lines, st, &got);
    assert!(with_prefix(&pl, "ZERO").iter().all(|l| l.ends_with("read=0 readv=0 recvmsg=0 recv=0")), "{pl:?}");
    assert!(
        with_prefix(&lines, "PROOF").iter().any(|l| l.ends_with("open=0")),
        "keepfix did not vacate the sacrificial leak, so the test proved nothing: {lines:?}"
    );
}

// Attack 4 (sysdup3): after reading EOF on two connections, the program puts a log file on the
// first number with syscall(SYS_dup3) and frees the second with syscall(SYS_close_range), then
// opens a log there; both logs get a line every 10 ms for 1.5 s while the watchdog vacates (the
// table is past 90%). Check: no log write or close fails; each log holds exactly its own lines.
// Verdict on 70934fa: HELD.
#[test]
fn syscall_dup3_and_close_range_onto_forgotten_numbers() {
    let (lines, st, _got, dir) = eofuse_run(keepfix_close_after("0s"), "sysdup3", 2, 110);
    assert!(st.success() && stats(&lines).contains("bad=0"), "{lines:?}");
    for k in [1, 2] {
        let text = std::fs::read_to_string(dir.path().join(format!("log{k}"))).unwrap();
        let n = text.lines().count();
        assert!(n > 50, "log{k}: only {n} lines");
        for (i, l) in text.lines().enumerate() {
            assert_eq!(l, format!("log{k} {i}"), "log{k} line {i}");
        }
    }
    assert!(with_prefix(&lines, "PROOF").iter().any(|l| l.ends_with("open=0")), "nothing vacated: {lines:?}");
}

// Attack 5 (sigflip): SIGPIPE ignored while keepfix decides (AFTER=1s), the program's default
// SIGPIPE back at 1.3 s, its answer written at 2 s on the connection it read to EOF (its client
// half-closed and is still reading). Plain: the answer reaches the client and the program exits
// 0. Under keepfix the connection was shut down while SIGPIPE was ignored, so the write raises
// SIGPIPE with its default action: the program dies. The rule "no SIGPIPE the program would not
// have had" is checked at release time only. Verdict on 70934fa: BROKE (killed by SIGPIPE; the
// client got nothing). The late write itself is the documented shutdown-mode risk; the death is
// not. Kept as a known limitation (README, CLOSE_WAIT's rules): a shutdown cannot be undone
// when the disposition changes later. Run it with `cargo test --test breaker -- --ignored`.
#[test]
#[ignore = "known limitation: SIGPIPE set back to its default after keepfix shut the socket down (README, CLOSE_WAIT)"]
fn sigpipe_back_to_default_after_a_release() {
    let plain = std::thread::spawn(|| eofuse_run(Run::new("break_eofuse").plain(), "sigflip", 2, 10));
    let (lines, st, _got, _d) = eofuse_run(keepfix_close_after("1s"), "sigflip", 2, 10);
    let (pl, pst, pgot, _pd) = plain.join().unwrap();
    check_replies("control", &pl, pst, &pgot);
    use std::os::unix::process::ExitStatusExt;
    assert_ne!(st.signal(), Some(libc::SIGPIPE), "keepfix: the program was killed by SIGPIPE; it wrote {lines:?}");
}

// Attack 6 (dupsweep): keepfix shuts a forgotten socket down through a private duplicate at a
// high number. A sweeper thread of the program close_range()s 1012..1023 (where those duplicates
// land under a 1024-fd limit) and dup2()s its live connections onto those numbers, over and over,
// while a leaky accept loop gives keepfix thousands of sockets to shut down. Had keepfix's
// shutdown gone through a number the sweeper had refilled, a live client would get a FIN.
// Check: the live clients get no EOF, and the program's live sockets are ESTABLISHED at the end.
// Open (see the closing note of stop 10): keepfix's duplicate is an unmarked fd, so nothing stops
// the sweep from taking it between keepfix's inode check and its shutdown(). Making it an own fd
// (Own|BUSY while used) closes that window but did not make this test pass, and slowed the
// watchdog enough to make stress.rs's vacate-line assertion flaky; it was not kept.
#[test]
#[ignore = "unresolved: with keepfix 1-3 of 4 live connections end not ESTABLISHED; the plain control hangs once its table is full, so keepfix's part is not yet told from the program's own races (see the closing note of stop 10)"]
fn a_sweep_over_keepfixs_duplicates_never_shuts_a_live_connection() {
    sweep_run(Run::new("break_dupsweep").plain(), false);
    sweep_run(close_mode(Run::new("break_dupsweep")), true);
}

fn sweep_run(run: Run, keepfix: bool) {
    let mut p = run.nofile(1024).args(["--live", "4", "--seconds", "4"]).spawn();
    let port = p.port();
    let mut live: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    for _ in 0..4 {
        p.expect("LIVE");
    }
    let deadline = Instant::now() + Duration::from_millis(3800);
    let mut made = 0;
    while Instant::now() < deadline {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
            let _ = c.write_all(b"x\n");
            made += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let s = p.expect_within("STATS", Duration::from_secs(10));
    let shut = p.log_lines("action=shutdown").len();
    let (_, st) = p.finish();
    assert!(st.success(), "{s}");
    for (i, c) in live.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut b = [0u8; 1];
        // Still open when the program ended: exit closes it, so EOF now is expected; what must
        // not have happened is keepfix's shutdown before that, which the program saw itself.
        let _ = std::io::Read::read(c, &mut b);
        let _ = i;
    }
    assert_eq!(field(&s, "live_broken"), "0", "keepfix={keepfix}: a live connection was shut down: {s}");
    assert!(made > 1000, "too few leaks to prove anything: {made}; {s}");
    assert!(!keepfix || shut > 100, "keepfix shut down only {shut} sockets: {s}");
    assert!(field(&s, "sweeps").parse::<u64>().unwrap() > 1000, "{s}");
}
