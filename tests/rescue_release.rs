//! `keepfix rescue --release` (issue 14) on real servers started without keepfix
//! (c-tests/rescue_parked.c): the sockets shut down are freed inside the running process, their
//! numbers hold the placeholder, and nothing else in the process notices: not the listener, not a
//! live connection, not a file-writing thread, not threads parked in read, accept, futex,
//! pthread_cond_wait, poll, epoll_wait, nanosleep and sigtimedwait.
//!
//! Every check is made from outside (/proc/PID/fd, /proc/net/tcp, a live client) or by the
//! program itself (UNEXPECTED, FILE_ERR and the answers to its stdin commands).

mod common;

use common::*;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether keepfix, run from here, may suspend a target's seccomp filter: CAP_SYS_ADMIN, and not
/// under seccomp itself (the kernel's rule for PTRACE_O_SUSPEND_SECCOMP).
fn may_suspend_seccomp() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("").trim().to_string();
    let cap = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
    cap & (1 << 21) != 0 && field("Seccomp:") == "0"
}

/// Every fd of `pid` and what it points to.
fn fd_links(pid: i32) -> BTreeMap<i32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Each thread's scheduling policy and nice value (/proc/PID/task/TID/stat fields 19 and 41).
fn policies(pid: i32) -> BTreeMap<i32, (String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            Some((tid, (f.get(16)?.to_string(), f.get(38)?.to_string())))
        })
        .collect()
}

/// Whether fd `fd` of `pid` is close-on-exec (/proc/PID/fdinfo's flags, octal).
fn has_cloexec(pid: i32, fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
    u64::from_str_radix(flags, 8).unwrap() & libc::O_CLOEXEC as u64 != 0
}

/// `keepfix rescue --release --after 0s --json [extra] PID`: exit code, the JSON, stderr.
fn release(pid: i32, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(keepfix_bin())
        .args(["rescue", "--release", "--after", "0s", "--json"])
        .args(extra)
        .arg(pid.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON: {e}; stdout {stdout}; stderr {stderr}"));
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// The release report of the one process in a rescue JSON report.
fn report(json: &serde_json::Value) -> &serde_json::Value {
    &json["processes"][0]["release"]
}

fn released_fds(json: &serde_json::Value) -> Vec<i32> {
    let mut v: Vec<i32> = report(json)["released"]
        .as_array()
        .unwrap_or_else(|| panic!("no release report in {json}"))
        .iter()
        .map(|r| r["fd"].as_i64().unwrap() as i32)
        .collect();
    v.sort_unstable();
    v
}

/// Opens `n` connections, says ping on each, and closes them: the server forgets each at EOF, in
/// CLOSE_WAIT. Returns the leaked fds with their socket inodes, once all are in CLOSE_WAIT.
fn leak(p: &mut Proc, port: u16, n: usize) -> Vec<(i32, u64)> {
    let mut fds = vec![];
    for _ in 0..n {
        drop(ping(port));
        let l = p.expect("EOF");
        fds.push(field(&l, "fd").parse::<i32>().unwrap());
    }
    let pid = p.pid();
    let mut found = vec![];
    eventually("the leaked sockets in CLOSE_WAIT", Duration::from_secs(10), || {
        let t = tcp_fds(pid);
        found = fds
            .iter()
            .filter_map(|fd| t.iter().find(|s| s.fd == *fd && s.state == CLOSE_WAIT).map(|s| (s.fd, s.inode)))
            .collect();
        found.len() == fds.len()
    });
    found
}

/// Waits until every parked thread of `pid` (comm p_NAME) is inside its blocking call.
fn wait_parked(pid: i32) {
    // read, accept, futex (both futex waits), poll, epoll_wait, nanosleep (clock_nanosleep),
    // rt_sigtimedwait on x86_64.
    let expect: &[(&str, &[i64])] = &[
        ("p_read", &[0]),
        ("p_accept", &[43, 288]),
        ("p_futex", &[202]),
        ("p_condwait", &[202]),
        // After a restart through restart_syscall, nanosleep and a poll with a timeout show 219.
        ("p_poll", &[7, 271, 219]),
        ("p_epoll", &[232, 281]),
        ("p_epoll_t", &[232, 281]),
        ("p_nanosleep", &[35, 230, 219]),
        ("p_sigwait", &[128]),
    ];
    eventually("every parked thread in its call", Duration::from_secs(10), || {
        let mut parked = HashSet::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let sys = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
            let nr: i64 = sys.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(-1);
            if let Some((name, nrs)) = expect.iter().find(|(n, _)| *n == comm.trim())
                && nrs.contains(&nr)
            {
                parked.insert(*name);
            }
        }
        parked.len() == expect.len()
    });
}

/// A client that stays connected and is answered.
fn live_client(port: u16) -> TcpStream {
    ping(port)
}

fn still_echoes(s: &mut TcpStream) {
    s.write_all(b"ping\n").unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong\n", "the live connection no longer answers");
}

/// The program's own report of anything that went wrong in it.
fn complaints(p: &mut Proc) -> Vec<String> {
    p.lines_for(Duration::from_millis(300))
        .into_iter()
        .filter(|l| l.starts_with("UNEXPECTED") || l.starts_with("FILE_ERR"))
        .collect()
}

fn inodes_in_tcp_tables() -> HashSet<u64> {
    proc_net_tcp().keys().copied().collect()
}

#[test]
fn release_frees_the_sockets_and_leaves_everything_else_alone() {
    let mut p = Run::new("rescue_parked").plain().args(["--threads", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    wait_parked(pid);
    let mut live = live_client(port);
    let leaked = leak(&mut p, port, 4);
    // One of them close-on-exec: its placeholder must be too, the others not.
    p.send(&format!("cloexec {}", leaked[2].0));
    assert_eq!(field(&p.expect("CLOEXEC"), "ret"), "0");
    let before = fd_links(pid);
    let sched_before = policies(pid);

    let (code, json, stderr) = release(pid, &[]);
    assert_eq!(code, 0, "stderr: {stderr}; {json}");
    let fds: Vec<i32> = leaked.iter().map(|l| l.0).collect();
    assert_eq!(released_fds(&json), fds, "{json}");
    let r = report(&json);
    assert!(r["stops"].as_u64().unwrap() >= 1 && r["longest_stop_us"].as_u64().unwrap() > 0, "{r}");
    for x in r["released"].as_array().unwrap() {
        assert!(x["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{x}");
    }

    // The sockets are gone: from the process and from the kernel's TCP tables.
    let after = fd_links(pid);
    let tables = inodes_in_tcp_tables();
    let mut placeholders = HashSet::new();
    for (fd, inode) in &leaked {
        let link = &after[fd];
        assert_ne!(link, &format!("socket:[{inode}]"), "fd {fd} still holds its socket");
        assert!(link.starts_with("socket:["), "fd {fd} holds {link}, not the placeholder");
        assert!(!tables.contains(inode), "socket {inode} (fd {fd}) is still in /proc/net/tcp");
        placeholders.insert(link.clone());
    }
    assert!(!placeholders.iter().any(|l| before.values().any(|b| b == l)), "a placeholder is one of the program's");
    // Everything else is exactly as it was: listener, live connection, pipe, file, epoll, std fds.
    assert_eq!(after.len(), before.len(), "fds appeared or vanished: {before:?} -> {after:?}");
    for (fd, link) in &before {
        if !fds.contains(fd) {
            assert_eq!(&after[fd], link, "fd {fd} changed");
        }
    }
    still_echoes(&mut live);
    drop(ping(port)); // the listener still accepts
    // keepfix may run the stopped threads SCHED_FIFO meanwhile: each has its own policy back.
    assert_eq!(policies(pid), sched_before, "scheduling policies changed");
    for (i, (fd, _)) in leaked.iter().enumerate() {
        assert_eq!(has_cloexec(pid, *fd), i == 2, "fd {fd}: O_CLOEXEC not as the program had it");
    }

    // What the program sees at a released number: a shut-down socket's answers, and its own
    // close() of the number returns 0.
    p.send(&format!("read {}", fds[0]));
    assert_eq!(field(&p.expect(&format!("READ fd={}", fds[0])), "ret"), "0");
    p.send(&format!("write {}", fds[1]));
    let w = p.expect(&format!("WROTE fd={}", fds[1]));
    assert_eq!((field(&w, "ret").as_str(), field(&w, "errno").as_str()), ("-1", "32"), "{w}: EPIPE expected");
    for fd in &fds {
        p.send(&format!("close {fd}"));
        let l = p.expect(&format!("CLOSED fd={fd}"));
        assert_eq!(field(&l, "ret"), "0", "the program's close of a released number: {l}");
    }
    p.send("stats");
    let s = p.expect("STATS");
    assert_eq!(field(&s, "file_err"), "0", "{s}");
    assert!(field(&s, "file_ok").parse::<u64>().unwrap() > 0, "{s}");
    assert_eq!(complaints(&mut p), Vec::<String>::new());
}

#[test]
fn threads_parked_in_blocking_calls_see_no_error() {
    let mut p = Run::new("rescue_parked").plain().args(["--threads", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    wait_parked(pid);
    // Several rounds: the thread keepfix injects through, and the stop each thread is caught in,
    // differ from one round to the next.
    for round in 0..6 {
        let leaked = leak(&mut p, port, 3);
        let (code, json, stderr) = release(pid, &[]);
        assert_eq!(code, 0, "round {round}: {stderr} {json}");
        assert_eq!(released_fds(&json).len(), leaked.len(), "round {round}: {json}");
        let links = fd_links(pid);
        for (fd, inode) in &leaked {
            assert_ne!(links[fd], format!("socket:[{inode}]"), "round {round}: fd {fd} still holds its socket");
        }
        wait_parked(pid);
    }
    assert_eq!(complaints(&mut p), Vec::<String>::new(), "a parked thread saw an error");
}

/// Runs `c` without CAP_SYS_ADMIN: dropped from the child's bounding set, so that the exec does
/// not give it back to root (a non-root runner has no capability after exec anyway).
fn without_cap_sys_admin(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl on the child itself, between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let _ = libc::prctl(libc::PR_CAPBSET_DROP, 21, 0, 0, 0);
            Ok(())
        });
    }
}

#[test]
fn a_seccomp_sandbox_that_kills_openat_and_socketpair_is_refused_or_handled() {
    let mut p = Run::new("rescue_parked").plain().args(["--seccomp", "--threads", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    wait_parked(pid);
    let leaked = leak(&mut p, port, 2);

    // Without CAP_SYS_ADMIN keepfix cannot suspend the filter: it refuses before stopping anything.
    let mut c = Command::new(keepfix_bin());
    c.args(["rescue", "--release", "--after", "0s", "--json", &pid.to_string()]);
    without_cap_sys_admin(&mut c);
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr} {json}");
    assert!(stderr.contains("seccomp") && stderr.contains("CAP_SYS_ADMIN"), "the refusal names seccomp: {stderr}");
    assert_eq!(report(&json)["stops"], 0, "{json}");
    let links = fd_links(pid);
    for (fd, inode) in &leaked {
        assert_eq!(links[fd], format!("socket:[{inode}]"), "refused, yet fd {fd} changed");
    }
    assert!(p.child.try_wait().unwrap().is_none(), "the sandboxed server died: {}", p.stderr());

    // With it (root), the filter is suspended for keepfix's injected calls only.
    if !require(
        may_suspend_seccomp(),
        "CAP_SYS_ADMIN outside a seccomp filter (to suspend the target's filter)",
        "run it as root, outside a container's seccomp profile",
    ) {
        return;
    }
    // The shutdown is done already: a second pass finds the sockets in CLOSE, not CLOSE_WAIT, so
    // the release of this pass comes from sockets leaked anew.
    let leaked = leak(&mut p, port, 2);
    let (code, json, stderr) = release(pid, &[]);
    let r = report(&json);
    assert_eq!(code, 0, "{stderr} {json}");
    assert_eq!(r["seccomp_suspended"], true, "{r}");
    assert_eq!(released_fds(&json), leaked.iter().map(|l| l.0).collect::<Vec<_>>(), "{r}");
    // Alive (its filter still kills on openat and socketpair: keepfix's socketpair went through
    // the suspension), and serving.
    assert!(p.child.try_wait().unwrap().is_none(), "the sandboxed server died: {}", p.stderr());
    drop(ping(port));
    assert_eq!(complaints(&mut p), Vec::<String>::new());
}

#[test]
fn at_the_fd_limit_the_placeholder_still_fits_and_the_limit_is_put_back() {
    // Soft limit 64 under a hard limit of 4096: raising the soft limit needs no privilege.
    let mut p = Run::new("rescue_parked").plain().nofile(4096).args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let leaked = leak(&mut p, port, 5);
    p.send("soft 64");
    assert_eq!(field(&p.expect("SOFT"), "ret"), "0");
    p.send("fill");
    p.expect("FILLED");
    let (code, json, stderr) = release(pid, &[]);
    assert_eq!(code, 0, "{stderr} {json}");
    assert_eq!(released_fds(&json).len(), leaked.len(), "{json}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(line.split_whitespace().nth(3), Some("64"), "soft limit not restored: {line}");
    assert_eq!(line.split_whitespace().nth(4), Some("4096"), "hard limit not restored: {line}");
    let links = fd_links(pid);
    for (fd, inode) in &leaked {
        assert_ne!(links[fd], format!("socket:[{inode}]"), "fd {fd} still holds its socket");
    }
    // The placeholder's two numbers are free again; the program is still at its limit.
    p.send(&format!("close {}", leaked[0].0));
    assert_eq!(field(&p.expect("CLOSED"), "ret"), "0");
    drop(ping(port));
    let n = field(&p.expect("ACCEPT"), "fd").parse::<i32>().unwrap();
    assert_eq!(n, leaked[0].0, "the program's next accept took {n}, not the number it closed");
}

#[test]
fn a_process_already_traced_is_refused_with_the_reason() {
    let mut p = Run::new("rescue_parked").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let leaked = leak(&mut p, port, 1);
    // This test's thread traces it (seized, not stopped: it keeps serving).
    // SAFETY: PTRACE_SEIZE of our own child, no buffers.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, 0usize) };
    assert_eq!(r, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
    let (code, json, stderr) = release(pid, &[]);
    assert_eq!(code, 1, "{stderr} {json}");
    assert!(stderr.contains(&pid.to_string()) && stderr.contains("already traced"), "{stderr}");
    assert_eq!(json["failed"][0]["reason"], "traced", "{json}");
    assert_eq!(fd_links(pid)[&leaked[0].0], format!("socket:[{}]", leaked[0].1), "refused, yet the fd changed");
    drop(ping(port));
}

#[test]
fn dry_run_says_what_it_would_release_and_changes_nothing() {
    let mut p = Run::new("rescue_parked").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let leaked = leak(&mut p, port, 2);
    let (code, json, stderr) = release(pid, &["--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report(&json)["dry_run"], true);
    assert_eq!(released_fds(&json), leaked.iter().map(|l| l.0).collect::<Vec<_>>(), "{json}");
    assert_eq!(report(&json)["stops"], 0, "a dry run stopped the process");
    let t = tcp_fds(pid);
    for (fd, inode) in &leaked {
        assert!(t.iter().any(|s| s.fd == *fd && s.inode == *inode && s.state == CLOSE_WAIT), "fd {fd} changed");
    }
    // And the text report says it.
    let out = Command::new(keepfix_bin())
        .args(["rescue", "--release", "--dry-run", "--after", "0s", &pid.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("would release"), "{text}");
}

#[test]
fn a_thread_that_cannot_stop_is_seen_before_anything_is_stopped() {
    // A thread vforks a child that sleeps 10 s: until then it waits in D state, and no ptrace
    // interrupt stops it. The leak comes after the vfork, so the child holds no copy of it.
    let mut p = Run::new("rescue_parked").plain().args(["--threads", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    wait_parked(pid);
    p.send("vfork 10000");
    let tid: i32 = field(&p.expect("VFORKING"), "tid").parse().unwrap();
    eventually("the vforking thread in D state", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('D')))
    });
    let leaked = leak(&mut p, port, 1);
    let t0 = Instant::now();
    let (code, json, stderr) = release(pid, &[]);
    assert_eq!(code, 1, "{stderr} {json}");
    assert!(stderr.contains(&format!("thread {tid} is in D state")), "{stderr}");
    assert_eq!(report(&json)["stops"], 0, "a process with a thread in D state was stopped: {json}");
    assert!(t0.elapsed() < Duration::from_secs(2), "gave up only after {:?}", t0.elapsed());
    assert_eq!(fd_links(pid)[&leaked[0].0], format!("socket:[{}]", leaked[0].1), "refused, yet the fd changed");
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap().contains(") D"),
        "the vforking thread left D state during the test: it proves nothing"
    );
    drop(ping(port));
    assert_eq!(complaints(&mut p), Vec::<String>::new());
    let tracer = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(tracer.lines().any(|l| l == "TracerPid:\t0"), "still traced");
}

#[test]
fn sigterm_mid_release_restores_and_detaches() {
    let mut p = Run::new("rescue_parked").plain().nofile(4096).args(["--threads", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    wait_parked(pid);
    let leaked = leak(&mut p, port, 3000);
    let before = fd_links(pid);
    let child = Command::new(keepfix_bin())
        .args(["rescue", "--release", "--after", "0s", "--json", &pid.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // SIGTERM as soon as keepfix traces the process (its first stop).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("TracerPid:") && l != "TracerPid:\t0"))
    {
        assert!(Instant::now() < deadline, "keepfix never traced the process");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report(&json)["interrupted"], true, "{json}");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let released: HashSet<i32> = released_fds(&json).into_iter().collect();
    assert!(released.len() < leaked.len(), "all {} released before the SIGTERM took effect", leaked.len());
    // Every number is either released (the placeholder) or exactly as it was; nothing else moved.
    let after = fd_links(pid);
    for (fd, link) in &before {
        if released.contains(fd) {
            assert_ne!(&after[fd], link, "fd {fd} reported released");
        } else {
            assert_eq!(&after[fd], link, "fd {fd} changed but is not reported released");
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "TracerPid:\t0"), "still traced");
    assert!(status.lines().any(|l| l.starts_with("State:\tS") || l.starts_with("State:\tR")), "{status}");
    drop(ping(port));
    wait_parked(pid);
    assert_eq!(complaints(&mut p), Vec::<String>::new());
}
