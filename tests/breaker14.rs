//! Breaker 14: adversarial tests of `keepfix rescue PID` (issue 14), the no-pause part. Each test
//! is an attack on one guarantee. A test that passes shows that the guarantee held, and fails if
//! the guarantee is removed (each says how). A test marked `#[ignore = "BROKE: ..."]` shows a
//! defect: it asserts the guarantee, and fails today.
//!
//! The targets run without keepfix (c-tests/break14_*.c and the sample servers). Effects are
//! checked from outside (pidfd_getfd + getsockopt, /proc/net/tcp, `ss --tos`) and by the targets
//! themselves (whether a peer saw a FIN, how a child died).
mod common;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::Duration;

fn keepfix(args: &[&str]) -> Output {
    Command::new(keepfix_bin()).args(args).env_remove("LD_PRELOAD").output().expect("run keepfix")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn rescue_json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["rescue", "--json"];
    all.extend_from_slice(args);
    let o = keepfix(&all);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("rescue --json gave no JSON ({e}): {}\nstderr: {}", text(&o.stdout), text(&o.stderr))
    });
    (o.status.code().unwrap_or(-1), v)
}

fn close_wait_entries(v: &Value) -> Vec<Value> {
    v["processes"][0]["close_wait"].as_array().cloned().unwrap_or_default()
}

fn state_of(pid: i32, fd: i32) -> Option<u8> {
    tcp_fds(pid).into_iter().find(|t| t.fd == fd).map(|t| t.state)
}

// ---- 1. a number reused between the scan and the shutdown ---------------------------------------

/// The program swaps another CLOSE_WAIT socket (B, which rescue never decided on) in at the
/// number of the one rescue decided on (A), between rescue's scan and its shutdown. Rescue must
/// see the change through the duplicate it would shut down, and leave B alone. Fails if the inode
/// comparison in `shut_down` is removed (B, idle in CLOSE_WAIT too, would be shut down: its
/// client sees a FIN).
#[test]
fn a_socket_swapped_in_at_the_number_between_scan_and_shutdown_is_left_alone() {
    for attempt in 0..3 {
        let fillers = (2000 << attempt).to_string();
        let mut p = Run::new("break14_swap").plain().args(["--mode", "swap", "--fillers", &fillers]).spawn();
        let ready = p.expect("READY");
        let pid = p.pid();
        let na: i64 = field(&ready, "na").parse().unwrap();
        let inode_a: u64 = field(&ready, "inode_a").parse().unwrap();
        let inode_b: u64 = field(&ready, "inode_b").parse().unwrap();
        let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
        assert_eq!(code, 0, "{v}");
        p.expect("SWAPPED");
        let cw = close_wait_entries(&v);
        let at_na = cw.iter().find(|c| c["fd"] == na).unwrap_or_else(|| panic!("no entry for fd {na}: {v}"));
        assert_eq!(at_na["inode"], inode_a, "the entry names the socket rescue decided on: {v}");
        assert!(!cw.iter().any(|c| c["inode"] == inode_b && c["action"] == "shut_down"), "B was shut down: {v}");
        p.send("check");
        let check = p.expect("CHECK");
        assert_eq!(field(&check, "b_eof"), "0", "B's client saw a FIN: rescue shut down a socket it never chose: {v}");
        if at_na["action"] == "shut_down" {
            // Rescue reached NA's shutdown before the program swapped (A was shut down, B not):
            // the attack did not happen.
            eprintln!("attempt {attempt}: the swap came too late, again with more fillers");
            continue;
        }
        assert_eq!(at_na["action"], "changed", "{v}");
        assert_eq!(state_of(pid, na as i32), Some(CLOSE_WAIT), "B, now at NA, is still in CLOSE_WAIT");
        return;
    }
    panic!("the program never won the race against rescue's scan, even with 8000 fillers");
}

// ---- 2. SIGPIPE changed between the preflight and the shutdown ----------------------------------

/// The program ignores SIGPIPE at the preflight and puts it back to SIG_DFL during rescue's scan.
/// Rescue must read the disposition again before each shutdown and refuse. Fails if the shutdown
/// uses the preflight's reading.
#[test]
fn sigpipe_put_back_to_default_during_the_scan_is_seen_before_the_shutdown() {
    let mut p = Run::new("break14_swap").plain().args(["--mode", "sigpipe", "--fillers", "3000"]).spawn();
    p.expect("READY");
    let pid = p.pid();
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    p.expect("SIGDFL");
    assert_eq!(v["processes"][0]["preflight"]["sigpipe"], "ignored", "{v}");
    let cw = close_wait_entries(&v);
    assert_eq!(cw.len(), 2, "{v}");
    for c in &cw {
        assert_eq!(c["action"], "refused_sigpipe", "{v}");
    }
    p.send("check");
    let check = p.expect("CHECK");
    assert_eq!((field(&check, "a_eof"), field(&check, "b_eof")), ("0".into(), "0".into()), "{check}");
    assert!(p.child.try_wait().unwrap().is_none());
}

/// SIGPIPE at SIG_DFL but blocked (sigprocmask) in the program's only thread: a write to a
/// shut-down socket would leave a SIGPIPE pending, which kills the process the moment it is
/// unblocked (or is delivered to a thread that does not block it). Rescue reads SigIgn and SigCgt
/// only, so it counts this as "default" and refuses: the safe answer. Fails if a blocked SIGPIPE
/// (SigBlk) were taken for a harmless one.
#[test]
fn a_blocked_but_default_sigpipe_is_treated_as_default() {
    let mut p = Run::new("break14_swap").plain().args(["--mode", "blocked", "--fillers", "10"]).spawn();
    p.expect("READY");
    let pid = p.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("SigBlk:\t0000000000001000"), "SIGPIPE blocked: {status}");
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["processes"][0]["preflight"]["sigpipe"], "default", "{v}");
    let cw = close_wait_entries(&v);
    assert_eq!(cw.len(), 2, "{v}");
    assert!(cw.iter().all(|c| c["action"] == "refused_sigpipe"), "{v}");
    p.send("check");
    let check = p.expect("CHECK");
    assert_eq!(field(&check, "b_eof"), "0", "{check}");
}

/// SIGPIPE caught by a handler installed with SA_RESETHAND (what glibc's signal() gives a program
/// built with -std=c99: System V semantics, measured here): /proc shows it as caught, so rescue
/// allows the shutdown of both CLOSE_WAIT sockets; the program's late answers then meet EPIPE
/// twice: the first SIGPIPE runs the handler and puts SIGPIPE back to SIG_DFL, the second kills
/// the program. /proc has no sigaction flags, so a no-pause rescue cannot tell; README now says
/// so. (A fix needs the flags from inside: under --release's stop, an injected
/// rt_sigaction(SIGPIPE, NULL, &old).)
#[test]
#[ignore = "BROKE (undetectable from outside, documented): a one-shot SA_RESETHAND SIGPIPE handler counts as caught; the second late write kills the program"]
fn a_one_shot_sigpipe_handler_is_not_taken_for_a_lasting_one() {
    let mut p = Run::new("break14_swap").plain().args(["--mode", "resethand", "--fillers", "10"]).spawn();
    p.expect("READY");
    let pid = p.pid();
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let actions: Vec<Value> = close_wait_entries(&v).iter().map(|c| c["action"].clone()).collect();
    p.send("poke");
    let mut died = None;
    eventually("both late writes done, or the program dead", Duration::from_secs(5), || {
        died = p.child.try_wait().unwrap();
        died.is_some() || p.lines_for(Duration::ZERO).iter().filter(|l| l.starts_with("POKE")).count() == 2
    });
    assert!(died.is_none(), "rescue said {actions:?}, and the program died: {died:?}");
}

// ---- 3. a socket shared with a child whose SIGPIPE is at its default ----------------------------

/// A CGI-style host ignores SIGPIPE, forks a child per connection and leaks its own copy; the
/// child has SIGPIPE at SIG_DFL, reads the request to EOF (the client half-closed and waits for
/// the answer) and answers 2.5 s later. `rescue --after 1s PARENT` checks only the parent's
/// SIGPIPE (ignored), shuts the shared socket down, and the child dies of SIGPIPE when it
/// answers. The guard ("refuse the shutdown where it could kill the program") must look at every
/// process that holds the socket.
/// Broke before the fix (the guard read only the named PID: the child died of SIGPIPE, its
/// answer lost); now every process holding the socket is looked at. Fails without that.
#[test]
fn a_socket_shared_with_a_sig_dfl_child_is_not_shut_down_under_it() {
    let mut p = Run::new("break14_sharedchild").plain().args(["--work-ms", "2500", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"request\n").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let accept = p.expect("ACCEPT");
    let child: i32 = field(&accept, "child").parse().unwrap();
    eventually("the parent's copy in CLOSE_WAIT", Duration::from_secs(5), || {
        tcp_fds(pid).iter().any(|t| t.state == CLOSE_WAIT)
    });
    std::thread::sleep(Duration::from_millis(1300)); // idle longer than --after 1s
    let (code, v) = rescue_json(&["--after", "1s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let e = &close_wait_entries(&v)[0];
    assert_eq!(e["action"], "refused_sigpipe", "{v}");
    assert!(e["error"].as_str().unwrap_or_default().contains(&format!("process {child} ")), "{e}");
    let reaped = p.expect_within("REAPED", Duration::from_secs(10));
    assert_eq!(field(&reaped, "child"), child.to_string());
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; 7]; // the parent's leaked copy keeps the connection open: no EOF
    let n = c.read(&mut got).unwrap_or(0);
    got.truncate(n);
    assert_eq!(
        (field(&reaped, "signal"), text(&got)),
        ("0".to_string(), "answer\n".to_string()),
        "the child was killed (signal 13 is SIGPIPE) and its answer lost; rescue said {}",
        close_wait_entries(&v).first().map(|c| c["action"].to_string()).unwrap_or_default()
    );
}

// ---- 3b. a half-closed client waiting for a late answer: the documented risk ----------------------

/// A client sends its request and half-closes; the server reads it to EOF and answers 2.5 s
/// later. With --after 5s a rescue during the work leaves the socket ("recent") and the answer
/// arrives; with --after 1s the socket, idle 1.3 s, is shut down and the late write fails with
/// EPIPE: the risk README's "Rescue a running server" states ("a program that answers more than
/// `--after` after its peer's half-close ... gets EPIPE"). Fails if --after is not honoured, or if
/// README stops saying it.
#[test]
fn a_late_answer_is_delivered_within_after_and_lost_past_it_as_readme_says() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(readme.contains("a program that answers more than `--after` after its peer's half-close"), "README");
    for (after, delivered) in [("5s", true), ("1s", false)] {
        let mut p = Run::new("harm_late_write").plain().args(["--work-ms", "2500", "0"]).spawn();
        let port = p.port();
        let pid = p.pid();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"req-7\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        p.expect("EOF");
        std::thread::sleep(Duration::from_millis(1300));
        let (code, v) = rescue_json(&["--after", after, &pid.to_string()]);
        assert_eq!(code, 0, "{v}");
        let action = close_wait_entries(&v)[0]["action"].clone();
        let write = p.expect("WRITE");
        let mut got = String::new();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.read_to_string(&mut got);
        if delivered {
            assert_eq!((action.as_str(), field(&write, "ret").as_str()), (Some("recent"), "13"), "{write}");
            assert_eq!(got, "answer-for-7\n");
        } else {
            assert_eq!(action, "shut_down", "{v}");
            assert_eq!(field(&write, "errno"), libc::EPIPE.to_string(), "{write}");
            assert_eq!(got, "");
        }
    }
}

// ---- 4. keepalive ACKs reset "idle" --------------------------------------------------------------

/// leak_eof_server with one connection whose client has shut down its write side and stays:
/// the server forgets it in CLOSE_WAIT, the client (FIN_WAIT2) answers keepalive probes.
fn half_closed_leak() -> (Proc, i32, TcpStream) {
    let mut p = Run::new("leak_eof_server").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let c = ping(port);
    c.shutdown(Shutdown::Write).unwrap();
    p.expect("EOF");
    (p, pid, c)
}

/// A client half-closes and stays (its side in FIN_WAIT2 answers keepalive probes); the server
/// forgets the socket in CLOSE_WAIT. Nothing is sent either way for 4 s. Rescue's first pass put
/// keepalive (1 s idle) on it; every probe's ACK resets TCP_INFO's last_ack_recv, so rescue's
/// "idle" (the smallest of last data received, last ack received, last data sent) never reaches
/// --after 2s, and the socket is "recent" forever. Measured: lastack cycles 0..idle while
/// lastrcv/lastsnd grow. The same holds with the default --after 30s for a Go server (its own
/// 15 s keepalive), and for any --after above keepfix's own 60 s idle after a first pass.
/// Still so for single passes (a pass cannot tell a probe's ACK from the FIN's; README says so);
/// --watch is fixed, see the next test.
#[test]
#[ignore = "BROKE (single passes; documented): keepalive probe ACKs reset last_ack_recv, so a socket whose keepalive idle is below --after is never idle enough"]
fn a_half_closed_socket_with_keepalive_becomes_idle_enough() {
    let (_p, pid, c) = half_closed_leak();
    let ka = ["--idle", "1s", "--intvl", "1s"];
    let (code, v) = rescue_json(&[&ka[..], &["--after", "1h", &pid.to_string()]].concat());
    assert_eq!(code, 0, "{v}");
    std::thread::sleep(Duration::from_secs(4));
    let (code, v) = rescue_json(&[&ka[..], &["--after", "2s", &pid.to_string()]].concat());
    assert_eq!(code, 0, "{v}");
    let e = &close_wait_entries(&v)[0];
    assert_eq!(e["action"], "shut_down", "4 s without a byte either way, yet rescue says {e}");
    drop(c);
}

/// The same socket under `--watch`: once passes have seen it in CLOSE_WAIT for --after, the
/// keepalive ACKs no longer count, and a later pass shuts it down. Fails without
/// `Access::close_wait_since` (every pass says "recent", idle below 1 s).
#[test]
fn watch_shuts_down_a_half_closed_socket_that_keepalive_acks_keep_recent() {
    let (_p, pid, c) = half_closed_leak();
    let pid_s = pid.to_string();
    let args = ["rescue", "--json", "--watch", "300ms", "--idle", "1s", "--intvl", "1s", "--after", "2s", &pid_s];
    let mut w = Run::path(keepfix_bin()).plain().args(args).spawn();
    let mut shut = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while shut.is_none() && std::time::Instant::now() < deadline {
        let line = w.expect_within("{", Duration::from_secs(5));
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(e) = close_wait_entries(&v).iter().find(|e| e["action"] == "shut_down") {
            shut = Some((v["pass"].as_u64().unwrap(), e.clone()));
        }
    }
    let (_, status) = w.stop();
    assert_eq!(status.code(), Some(0));
    let (pass, e) = shut.expect("no pass shut the socket down");
    assert!(pass > 1, "the first pass cannot know how long it has been in CLOSE_WAIT: {e}");
    assert!(e["idle_ms"].as_u64().unwrap() >= 2000, "{e}");
    let mut c = c;
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap(), 0, "the client gets the FIN");
}

// ---- 4b. the stricter value, when keepalive is off -----------------------------------------------

/// The program set TCP_KEEPIDLE 5 s on its listener with SO_KEEPALIVE off, and turns keepalive on
/// on each connection it accepts: its connections probe after 5 s. Rescue takes timings on a
/// socket with keepalive off for "in force nowhere" and puts its 60 s on the listener, so every
/// later connection probes after 60 s: looser than the program asked, against "keepfix never
/// loosens what the program asked for". (The library's setsockopt hook keeps the program's 5 s,
/// whatever SO_KEEPALIVE is; rescue follows the library's rule for sockets it did not see made,
/// `stricter_already`.) Fix: per option, keep a stricter (> 0, no larger) value whether
/// keepalive is on or off (`plan_keepalive`'s `cur.on &&`).
#[test]
#[ignore = "BROKE (design): with keepalive off, rescue replaces a stricter program timing (TCP_KEEPIDLE 5 s on a listener) by its own 60 s"]
fn a_stricter_timing_set_while_keepalive_is_off_is_kept() {
    let mut p = Run::new("break14_kaoff").plain().spawn();
    let port = p.port();
    let pid = p.pid();
    let (code, v) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let accept = p.expect("ACCEPT");
    assert_eq!(field(&accept, "idle"), "5", "the program's connections probe after 60 s now, not 5 s: {accept}");
}

// ---- 4c. an MPTCP listener (Go 1.24 and later make them by default) -------------------------------

/// Go 1.24 and later listen with IPPROTO_MPTCP by default on Linux. rescue's is_tcp() took only
/// IPPROTO_TCP, so such a listener was an "other socket": no keepalive on it, and so none on the
/// connections it accepts later (plain TCP clients fall back to ordinary TCP sockets, which
/// inherit the listener's options: measured). Fixed: an MPTCP listener gets keepalive as a TCP
/// one does (MPTCP connections, whose TCP_INFO is their first subflow's, are still left alone).
/// Fails without the fix.
#[test]
fn an_mptcp_listener_gets_keepalive_and_passes_it_on() {
    let mut p = Run::new("break14_mptcp").plain().args(["0"]).spawn();
    let first = p.expect_within("", Duration::from_secs(10));
    if first.starts_with("NOMPTCP") {
        assert!(!under_ci(), "this kernel has no MPTCP: {first}");
        return;
    }
    let port: u16 = field(&first, "port").parse().unwrap();
    let pid = p.pid();
    let (code, v) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let r = &v["processes"][0];
    assert_eq!(r["summary"]["listeners"], 1, "the MPTCP listener is not seen as one: {}", r["before"]);
    let _c = ping(port);
    let accept = p.expect("ACCEPT");
    assert_eq!(field(&accept, "proto"), "6", "a plain TCP client falls back to TCP: {accept}");
    let fd: i32 = field(&accept, "fd").parse().unwrap();
    assert_eq!(keepalive_of(pid, fd), ka(60, 10, 6), "a connection accepted after the rescue");
}

// ---- 5. --dry-run changes nothing ----------------------------------------------------------------

/// Every option keepfix might touch, and a few it should never, of one socket.
fn options(pid: i32, fd: i32) -> Vec<(&'static str, i32)> {
    let s = grab_fd(pid, fd);
    let get = |level: i32, name: i32| {
        let mut v = [0i32; 2];
        let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
        // SAFETY: a valid buffer of `len` bytes.
        let r = unsafe { libc::getsockopt(s.as_raw_fd(), level, name, v.as_mut_ptr().cast(), &mut len) };
        if r == 0 { v[0] ^ (v[1] << 16) } else { -1 }
    };
    vec![
        ("SO_KEEPALIVE", get(libc::SOL_SOCKET, libc::SO_KEEPALIVE)),
        ("TCP_KEEPIDLE", get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)),
        ("TCP_KEEPINTVL", get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)),
        ("TCP_KEEPCNT", get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT)),
        ("TCP_USER_TIMEOUT", get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)),
        ("SO_LINGER", get(libc::SOL_SOCKET, libc::SO_LINGER)),
        ("SO_PRIORITY", get(libc::SOL_SOCKET, libc::SO_PRIORITY)),
        ("TCP_NODELAY", get(libc::IPPROTO_TCP, libc::TCP_NODELAY)),
        ("SO_RCVBUF", get(libc::SOL_SOCKET, libc::SO_RCVBUF)),
        ("SO_SNDBUF", get(libc::SOL_SOCKET, libc::SO_SNDBUF)),
    ]
}

/// Each socket: fd, inode, TCP state (None: not in /proc/net/tcp), options.
type SocketView = (i32, u64, Option<u8>, Vec<(&'static str, i32)>);

fn all_options(pid: i32) -> Vec<SocketView> {
    let net = proc_net_tcp();
    socket_fds(pid).into_iter().map(|(fd, ino)| (fd, ino, net.get(&ino).map(|t| t.0), options(pid, fd))).collect()
}

/// With every flag that changes something (--after 0s --force --include-unread --raise-nofile
/// --user-timeout auto --idle 5s), --dry-run leaves every option of every socket, every TCP state,
/// the fd table and the soft limit as they were, on a server with a listener, a live connection,
/// an unread CLOSE_WAIT and SIGPIPE at SIG_DFL. Fails if any flag's action ignores --dry-run.
#[test]
fn dry_run_with_every_flag_changes_no_option_state_or_limit() {
    let Some(prlimit) = require_tool("prlimit", "util-linux") else { return };
    let server = c_program("leak_noread_server").to_string_lossy().into_owned();
    let mut p = Run::path(prlimit).plain().args(["--nofile=256:4096", "--", &server, "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let live = TcpStream::connect(("127.0.0.1", port)).unwrap();
    p.expect("ACCEPT");
    let mut gone = TcpStream::connect(("127.0.0.1", port)).unwrap();
    gone.write_all(b"unread\n").unwrap();
    p.expect("ACCEPT");
    drop(gone);
    eventually("CLOSE_WAIT", Duration::from_secs(5), || tcp_fds(pid).iter().any(|t| t.state == CLOSE_WAIT));
    let before = all_options(pid);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let (code, v) = rescue_json(&[
        "--dry-run",
        "--after",
        "0s",
        "--force",
        "--include-unread",
        "--raise-nofile",
        "--user-timeout",
        "auto",
        "--idle",
        "5s",
        &pid.to_string(),
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(close_wait_entries(&v)[0]["action"], "would_shut_down", "{v}");
    assert_eq!(v["processes"][0]["nofile"]["action"], "would_raise", "{v}");
    assert_eq!(all_options(pid), before, "--dry-run changed a socket");
    assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap(), limits);
    let mut live = live;
    live.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut b = [0u8; 1];
    assert!(live.read(&mut b).is_err(), "the live connection got no FIN and no data");
}

fn mount_net_cls(dir: &std::path::Path) -> bool {
    for opts in ["net_cls,net_prio", "net_cls"] {
        let st = Command::new("mount").args(["-t", "cgroup", "-o", opts, "b14cls"]).arg(dir).status();
        if st.is_ok_and(|s| s.success()) {
            return true;
        }
    }
    false
}

/// `ss --tos` (sock_diag, which reads without touching): each socket of the port's class_id.
fn class_ids(port: u16) -> Vec<String> {
    let o = Command::new("ss").args(["-tan", "--tos", &format!("( sport = :{port} )")]).output().expect("ss");
    text(&o.stdout).split_whitespace().filter_map(|w| w.strip_prefix("class_id:")).map(String::from).collect()
}

/// pidfd_getfd, like SCM_RIGHTS, calls the kernel's __receive_sock(), which sets the socket's
/// cgroup-v1 net_cls classid (and net_prio index) to the *caller's*. So the preflight's probe and
/// every duplicate rescue takes, --dry-run included, move each socket of the target, listeners
/// too (and so every connection accepted later), out of the net_cls class its cgroup gave it:
/// out of tc's cls_cgroup shaping and iptables' `-m cgroup --cgroup` rules. Measured:
/// class_id 0x100001 -> 0 on the listener and a live connection after `rescue --dry-run`.
/// Fixed (src/bin/keepfix/netcls.rs: keepfix joins the target's net_cls and net_prio cgroups
/// before its first duplicate); fails without the join. A real rescue keeps the class too.
#[test]
fn dry_run_and_rescue_keep_the_sockets_net_cls_class() {
    if !require_root("mounts a cgroup-v1 net_cls hierarchy") || require_tool("ss", "iproute2").is_none() {
        return;
    }
    let dir = TempDir::new("b14-netcls");
    assert!(mount_net_cls(dir.path()), "cannot mount a net_cls cgroup hierarchy");
    let group = dir.path().join(format!("b14-{}", std::process::id()));
    std::fs::create_dir_all(&group).unwrap();
    std::fs::write(group.join("net_cls.classid"), "0x100001").unwrap();
    let procs = group.join("cgroup.procs");
    let server = c_program("echo_server");
    let script = format!("echo $$ > '{}' && exec '{}' 0", procs.display(), server.display());
    let mut p = Run::path("/bin/sh".into()).plain().args(["-c", &script]).spawn();
    let port = p.port();
    let pid = p.pid();
    let live = ping(port);
    let before = class_ids(port);
    let (code, v) = rescue_json(&["--dry-run", &pid.to_string()]);
    let after = class_ids(port);
    let (code2, v2) = rescue_json(&[&pid.to_string()]);
    let after_rescue = class_ids(port);
    let ka_on = keepalive_on_listener(pid);
    drop(live);
    drop(p);
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir(&group);
    let _ = Command::new("umount").arg(dir.path()).status();
    assert_eq!(code, 0, "{v}");
    assert_eq!(before, vec!["0x100001".to_string(); 2], "the listener and the connection in class 1:1");
    assert_eq!(after, before, "--dry-run moved the sockets out of their net_cls class");
    assert_eq!(code2, 0, "{v2}");
    assert_eq!(after_rescue, before, "rescue moved the sockets out of their net_cls class");
    assert!(ka_on, "the rescue did its work");
}

/// SO_KEEPALIVE of the process's listener, through a duplicate taken by the test: called only
/// after the last class_ids(), since the test's own duplicate moves the socket's class too.
fn keepalive_on_listener(pid: i32) -> bool {
    tcp_fds(pid).iter().find(|t| t.state == LISTEN).is_some_and(|t| so_keepalive(pid, t.fd))
}

// ---- 6. odd targets ------------------------------------------------------------------------------

/// A thread id (a TID of a multi-threaded process) is not a process: rescue must say so and
/// name the process it belongs to. Before the fix: "pidfd_open failed: No such file or
/// directory", reason "kernel". Fails without the check in `rescue`.
#[test]
fn a_thread_id_is_refused_naming_its_process() {
    let dir = TempDir::new("b14-tid");
    let file = dir.path().join("f");
    let mut p = Run::new("leak_eof_server").plain().args(["--file-thread", file.to_str().unwrap(), "0"]).spawn();
    p.port();
    let pid = p.pid();
    let mut tid = None;
    eventually("a second thread", Duration::from_secs(5), || {
        tid = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|t| *t != pid);
        tid.is_some()
    });
    let tid = tid.unwrap().to_string();
    let o = keepfix(&["rescue", "--json", &tid]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&tid) && err.contains("thread") && err.contains(&format!("process {pid}")), "{err}");
    assert!(!keepalive_of(pid, tcp_fds(pid).iter().find(|t| t.state == LISTEN).unwrap().fd).on);
}

/// A kernel thread (kthreadd, found by Kthread: 1 and PPid 0) has no fds: rescue changes nothing,
/// and --raise-nofile does not raise its limit (every kernel thread and usermode helper it spawns
/// would inherit it). Only --dry-run is used on it.
#[test]
fn a_kernel_thread_is_left_unchanged() {
    let kthreadd = procfs_pids().into_iter().find(|p| {
        let s = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        s.contains("Kthread:\t1") && s.contains("PPid:\t0")
    });
    let Some(k) = kthreadd else {
        assert!(!under_ci(), "no kernel thread visible");
        return;
    };
    let (code, v) = rescue_json(&["--dry-run", "--raise-nofile", &k.to_string()]);
    assert_eq!(code, 0, "{v}");
    let r = &v["processes"][0];
    assert_eq!(r["before"]["fds"], 0, "{v}");
    assert_ne!(r["nofile"]["action"], "would_raise", "{v}");
}

fn procfs_pids() -> Vec<u32> {
    std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// keepfix pointed at itself: its own pidfd, duplicates and pipes are no TCP sockets; it does
/// nothing and exits 0 with valid JSON.
#[test]
fn keepfix_rescuing_itself_does_nothing() {
    let script = format!("exec '{}' rescue --json --after 0s --raise-nofile $$", keepfix_bin().display());
    let o = Command::new("/bin/sh").args(["-c", &script]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["processes"][0]["summary"]["tcp_sockets"], 0, "{v}");
}

// ---- 7. arguments ---------------------------------------------------------------------------------

/// Bad arguments exit 2 naming the argument: a negative duration (clap took `-1s` for a flag and
/// named `-1`, not --after, before the fix), a zero --idle, a PID past any pid_t (exit 1 "no such
/// process (not a valid pid)" before the fix).
#[test]
fn bad_arguments_exit_2_naming_the_argument() {
    for (args, named) in [
        (&["rescue", "--after", "-1s", "1"][..], "--after"),
        (&["rescue", "--after=-1s", "1"], "--after"),
        (&["rescue", "--idle", "-5", "1"], "--idle"),
        (&["rescue", "--idle", "0", "1"], "--idle"),
        (&["rescue", "--intvl", "0s", "1"], "--intvl"),
        (&["rescue", "--cnt", "0", "1"], "--cnt"),
        (&["rescue", "--watch", "-1s", "1"], "--watch"),
        (&["rescue", "2147483648"], "2147483648"),
        (&["rescue", "abc"], "abc"),
        (&["rescue", "--json", "abc"], "abc"),
    ] {
        let o = keepfix(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(named), "{args:?} does not name {named}: {err}");
    }
}

/// The same PID twice is rescued once (one report, one pass over its sockets).
#[test]
fn a_pid_given_twice_is_rescued_once() {
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let pid = p.pid().to_string();
    let (code, v) = rescue_json(&[&pid, &pid]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["processes"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["processes"][0]["summary"]["keepalive_set"], 1, "{v}");
}

/// --json on the error paths: a gone PID, a gone PID among live ones, and --watch ending because
/// its process exited all give valid JSON on stdout (the failure in "failed").
#[test]
fn json_is_valid_on_every_failure_path() {
    let mut dead = Command::new("true").spawn().unwrap();
    let gone = dead.id().to_string();
    dead.wait().unwrap();
    let (code, v) = rescue_json(&[&gone]);
    assert_eq!((code, v["failed"][0]["reason"].as_str()), (1, Some("gone")), "{v}");
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let pid = p.pid();
    let mut w =
        Run::path(keepfix_bin()).plain().args(["rescue", "--json", "--watch", "50ms", &pid.to_string()]).spawn();
    w.expect("{");
    drop(p);
    let (lines, status) = w.finish();
    assert_eq!(status.code(), Some(1));
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["pass"].as_u64().is_some(), "{l}");
    }
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["failed"][0]["reason"], "gone", "{last}");
}

// ---- 8. a PID reused during --watch; a container's PID 1 ------------------------------------------

/// In a pid namespace of its own (so that the number can be handed out again on purpose, through
/// ns_last_pid), the watched process dies and an impostor gets its number before the next pass.
/// keepfix must not touch the impostor's socket (all its work goes through the pidfd of the
/// process it opened) and must end with 1, "gone". Fails if a pass opens the number again.
/// Then, as the namespace's PID 1, the same program is rescued by `keepfix rescue 1`.
#[test]
fn a_pid_reused_during_watch_is_not_touched_and_a_containers_pid_1_can_be_rescued() {
    if !require_root("makes a pid namespace and writes its ns_last_pid") {
        return;
    }
    let Some(unshare) = require_tool("unshare", "util-linux") else { return };
    let o = Command::new(unshare)
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(c_program("break14_pidns"))
        .arg(keepfix_bin())
        .output()
        .unwrap();
    let out = text(&o.stdout);
    let result = out.lines().find(|l| l.starts_with("RESULT")).unwrap_or_else(|| panic!("{out}{}", text(&o.stderr)));
    assert_eq!(field(result, "impostor"), field(result, "target"), "the number was not reused: {out}");
    assert_eq!(field(result, "keepalive"), "0", "keepfix set keepalive on the impostor: {out}");
    assert_eq!(field(result, "keepfix_exit"), "1", "{out}");
    let last = out.lines().rfind(|l| l.starts_with("KF ")).unwrap();
    let v: Value = serde_json::from_str(&last[3..]).unwrap();
    assert_eq!(v["failed"][0]["reason"], "gone", "{out}");
    let pid1 = out.lines().find(|l| l.starts_with("PID1")).unwrap();
    assert_eq!((field(pid1, "exit"), field(pid1, "keepalive")), ("0".into(), "1".into()), "{out}");
}

// ---- 9. thousands of fds that are not TCP sockets, and a socket in another netns ------------------

/// 2,000 pipe ends, 1,000 eventfds, epoll, timerfd, memfd, /dev/null, UDP and unix sockets
/// around a CLOSE_WAIT socket, and (as root) a second CLOSE_WAIT socket in another network
/// namespace, which `ss` and this namespace's /proc/net/tcp do not show. Rescue shuts down both
/// CLOSE_WAIT sockets and nothing else: every fd still holds its object, every pipe its byte,
/// every eventfd its count. Fails if rescue touched anything but TCP sockets, or missed the other
/// namespace's socket.
#[test]
fn thousands_of_other_fds_are_untouched_and_a_socket_in_another_netns_is_handled() {
    let root = is_root();
    let mut args = vec!["--pipes", "1000", "--eventfds", "1000"];
    if root {
        args.push("--netns");
    } else {
        assert!(!under_ci(), "under CI the test runs as root");
    }
    let mut p = Run::new("break14_mixed").plain().args(args).spawn();
    let ready = p.expect("READY");
    let pid = p.pid();
    let fds: usize = field(&ready, "fds").parse().unwrap();
    let host_cw: i64 = field(&ready, "host_cw").parse().unwrap();
    let ns_cw: i64 = field(&ready, "ns_cw").parse().unwrap();
    let start = std::time::Instant::now();
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    let took = start.elapsed();
    assert_eq!(code, 0, "{v}");
    let r = &v["processes"][0];
    assert_eq!(r["before"]["fds"].as_u64(), Some(fds as u64), "{}", r["before"]);
    assert_eq!(r["before"]["other_sockets"], 2, "the UDP and the unix socket: {}", r["before"]);
    let shut: Vec<i64> = close_wait_entries(&v)
        .iter()
        .filter(|c| c["action"] == "shut_down")
        .map(|c| c["fd"].as_i64().unwrap())
        .collect();
    let mut want = vec![host_cw];
    if root {
        want.push(ns_cw);
    }
    assert_eq!(shut, want, "{}", r["close_wait"]);
    p.send("check");
    let check = p.expect("CHECK");
    assert_eq!(field(&check, "same"), "1", "an fd changed: {check}");
    assert_eq!(field(&check, "pipes_ok"), "1000", "{check}");
    assert_eq!(field(&check, "eventfds_ok"), "1000", "{check}");
    assert_eq!(field(&check, "host_eof"), "1", "{check}");
    if root {
        assert_eq!(field(&check, "ns_eof"), "1", "{check}");
    }
    eprintln!("rescue over {fds} fds took {took:?}");
}

/// --json with a bad argument: exit 2, nothing on stdout (no half-written JSON), the message on
/// stderr, as --help says. Fails if --help stops saying it, or if something is printed.
#[test]
fn json_with_a_bad_argument_prints_nothing_and_help_says_so() {
    for args in [&["rescue", "--json", "--after", "soon", "1"][..], &["rescue", "--json", "x"]] {
        let o = keepfix(args);
        assert_eq!(o.status.code(), Some(2));
        assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
        assert!(!o.stderr.is_empty());
    }
    let help = text(&keepfix(&["rescue", "--help"]).stdout);
    assert!(help.contains("A bad argument (exit 2) prints no JSON"), "{help}");
}
