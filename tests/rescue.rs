//! `keepfix rescue PID` (issue 14): relief for a server that is already running, started without
//! keepfix. The targets are real servers: sample C programs (c-tests/) and a Go server built here
//! (tests/go/rescue_server), which LD_PRELOAD could not help. Every effect is checked from outside:
//! socket options through pidfd_getfd + getsockopt and `ss -tnoi`, states in /proc/net/tcp, limits
//! in /proc/PID/limits, and the servers' own stdout (served, errors, file-thread failures).
//!
//! - keepalive on existing sockets and on sockets accepted after the rescue (inherited from the
//!   listener), with keepfix's timings or the flags';
//! - the stricter value wins: Go's 15 s idle stays, its 15 s interval and the kernel's 9 probes
//!   become 10 s and 6; --respect-app leaves Go's sockets alone;
//! - CLOSE_WAIT shut down after --after, with the server still serving, a live connection
//!   untouched and a file-writing thread seeing no error; before --after, nothing; unread data
//!   only with --include-unread, and still readable after;
//! - the SIGPIPE guard: a SIG_DFL server is refused without --force and survives a late write;
//!   with --force the same write kills it (why the guard exists);
//! - sockets in CLOSE with the fd open (a reset peer) are counted and listed, though no table has them;
//! - --dry-run changes nothing; --raise-nofile stops at 1024 for a select() program;
//! - exit codes: 1 for a gone PID, an already traced process, another uid's process (each named
//!   with the reason), 2 for bad arguments; --watch repeats and ends with 0 on SIGTERM;
//! - --json parses, and every field it has is documented in --help.
//!
//! Under CI=true a missing `go`, `prlimit` or root is a failure, never a skip.
//!
//! Checked to fail with the feature removed (src/bin/keepfix/rescue.rs, preflight.rs): no
//! setsockopt (keepalive tests), the program's value never winning (the Go test), no SIGPIPE
//! guard (the guard test: the refused server dies), --dry-run ignored, the select() cap or the
//! prlimit itself gone (raise_nofile), --after ignored or no shutdown (close_wait), no TracerPid
//! check (traced), the permission or seccomp reason misnamed, --watch doing one pass, a
//! duplicate kept (mem::forget) across passes, the accept queue not read.
mod common;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips a test whose tool or privilege is missing, except under CI=true, where it fails.
fn require(ok: bool, what: &str) -> bool {
    if !ok {
        assert!(!in_ci(), "CI=true and {what}");
        eprintln!("SKIPPED: {what}");
    }
    ok
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn keepfix(args: &[&str]) -> Output {
    Command::new(keepfix_bin()).args(args).env_remove("LD_PRELOAD").output().expect("run keepfix")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `keepfix rescue ARGS --json`: the exit code and the parsed report.
fn rescue_json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["rescue", "--json"];
    all.extend_from_slice(args);
    let o = keepfix(&all);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("rescue --json gave no JSON ({e}): {}\nstderr: {}", text(&o.stdout), text(&o.stderr))
    });
    (o.status.code().unwrap_or(-1), v)
}

fn process(v: &Value) -> &Value {
    &v["processes"][0]
}

/// The server-side socket of a client connection, found by the client's port.
fn server_side(pid: i32, client: &TcpStream) -> TcpFd {
    let port = client.local_addr().unwrap().port();
    let mut found = None;
    eventually("the server's side of the connection in /proc/net/tcp", Duration::from_secs(5), || {
        found = tcp_fds(pid).into_iter().find(|t| t.remote_port == port);
        found.is_some()
    });
    found.unwrap()
}

fn listener_fd(pid: i32) -> i32 {
    tcp_fds(pid).into_iter().find(|t| t.state == LISTEN).expect("a listener").fd
}

fn close_wait_count(pid: i32) -> usize {
    tcp_fds(pid).iter().filter(|t| t.state == CLOSE_WAIT).count()
}

/// Connects, pings, and closes: a server that forgets its connections at EOF leaves it in
/// CLOSE_WAIT. Waits for the server's EOF line.
fn leave_close_wait(p: &mut Proc, port: u16) {
    let s = ping(port);
    drop(s);
    p.expect("EOF");
}

fn ka_with_ut(idle: i32, intvl: i32, cnt: i32, user_timeout: i32) -> Ka {
    Ka { on: true, idle, intvl, cnt, user_timeout }
}

/// Does `ss -tnoi` show a keepalive timer on the server side of this connection?
fn ss_keepalive_timer(server_port: u16, client_port: u16) -> bool {
    let o = Command::new("ss")
        .args(["-tnoi", "state", "established", &format!("( sport = :{server_port} and dport = :{client_port} )")])
        .output()
        .expect("ss");
    text(&o.stdout).contains("timer:(keepalive")
}

#[test]
fn keepalive_on_existing_and_new_connections_with_the_flags_timings() {
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let old = ping(port);
    let old_fd = server_side(pid, &old).fd;
    let lfd = listener_fd(pid);
    assert_eq!(keepalive_of(pid, old_fd), kernel_default_ka(), "started without keepfix: no keepalive");
    assert!(!ss_keepalive_timer(port, old.local_addr().unwrap().port()));

    let o =
        keepfix(&["rescue", "--idle", "20s", "--intvl", "4", "--cnt", "3", "--user-timeout", "auto", &pid.to_string()]);
    assert_eq!(o.status.code(), Some(0), "stdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("preflight:") && out.contains("SIGPIPE:") && out.contains("fds:"), "{out}");
    // user timeout auto = idle + intvl x cnt = 20 + 4 x 3 s.
    let want = ka_with_ut(20, 4, 3, 32_000);
    assert_eq!(keepalive_of(pid, lfd), want, "the listener");
    assert_eq!(keepalive_of(pid, old_fd), want, "a connection accepted before the rescue");
    assert!(ss_keepalive_timer(port, old.local_addr().unwrap().port()), "ss -tnoi shows the keepalive timer");

    // A connection accepted after the rescue inherits the listener's options: no second pass.
    let new = ping(port);
    assert_eq!(keepalive_of(pid, server_side(pid, &new).fd), want, "a connection accepted after the rescue");
    assert!(ss_keepalive_timer(port, new.local_addr().unwrap().port()));
    // The old connection still works.
    let mut old = old;
    old.write_all(b"again\n").unwrap();
    let mut b = [0u8; 5];
    old.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong\n");
    let (lines, _) = p.stop();
    assert!(lines.iter().any(|l| l.starts_with("STATS") && l.contains("errors=0")), "{lines:?}");
}

static GO_SERVER: OnceLock<Option<PathBuf>> = OnceLock::new();

/// tests/go/rescue_server, built once per test run into target/go/ (no module downloads).
fn go_server() -> Option<PathBuf> {
    GO_SERVER
        .get_or_init(|| {
            let go = Command::new("go").arg("version").output();
            if !require(go.is_ok_and(|o| o.status.success()), "go is not installed (apt-get install golang-go)") {
                return None;
            }
            let dir = target_dir().join("go");
            let out = dir.join("rescue_server");
            let st = Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(root().join("tests/go/rescue_server"))
                .env("GOCACHE", dir.join("cache"))
                .env("GOPATH", dir.join("path"))
                .env("GOFLAGS", "-mod=mod")
                .env("GOPROXY", "off")
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", "0")
                .status()
                .expect("go build");
            assert!(st.success(), "go build of tests/go/rescue_server failed");
            Some(out)
        })
        .clone()
}

#[test]
fn a_go_server_keeps_its_stricter_idle_and_gets_the_rest_and_its_close_wait_shut_down() {
    let Some(server) = go_server() else { return };
    let mut p = Run::path(server).plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let live = ping(port);
    p.expect("ACCEPT");
    let live_fd = server_side(pid, &live).fd;
    let default_cnt = kernel_default_ka().cnt;
    assert_eq!(keepalive_of(pid, live_fd), ka(15, 15, default_cnt), "Go's own keepalive on an accepted connection");
    let lfd = listener_fd(pid);
    assert!(!keepalive_of(pid, lfd).on, "Go's listener has no keepalive");
    leave_close_wait(&mut p, port);
    eventually("CLOSE_WAIT in the Go server", Duration::from_secs(5), || close_wait_count(pid) == 1);

    // --respect-app: the sockets that have keepalive keep Go's settings; the listener gets keepfix's.
    let (code, v) = rescue_json(&["--respect-app", "--after", "1h", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(keepalive_of(pid, live_fd), ka(15, 15, default_cnt), "--respect-app leaves Go's keepalive");
    assert_eq!(keepalive_of(pid, lfd), ka(60, 10, 6));
    assert_eq!(process(&v)["summary"]["keepalive_app"], 2, "{v}");
    assert_eq!(close_wait_count(pid), 1, "--after 1h: the CLOSE_WAIT socket is too recent");

    // Then the stricter value wins per option: 15 s idle stays, 15 s -> 10 s, 9 -> 6.
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(keepalive_of(pid, live_fd), ka(15, 10, 6));
    let entry = process(&v)["keepalive"].as_array().unwrap().iter().find(|k| k["fd"] == live_fd).unwrap().clone();
    assert_eq!(entry["before"]["intvl_s"], 15);
    assert_eq!(entry["after"]["intvl_s"], 10);
    assert_eq!(process(&v)["summary"]["shut_down"], 1, "{v}");
    eventually("no CLOSE_WAIT left", Duration::from_secs(5), || close_wait_count(pid) == 0);

    // Go sets its own 15/15 on each connection it accepts; the count comes from the listener.
    // A second pass (what --watch does) brings the interval down too.
    let new = ping(port);
    let new_fd = server_side(pid, &new).fd;
    assert_eq!(keepalive_of(pid, new_fd), ka(15, 15, 6), "a new connection: Go's 15/15, the listener's 6 probes");
    let (code, _) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0);
    assert_eq!(keepalive_of(pid, new_fd), ka(15, 10, 6));
    // Still serving, on the old connection and on new ones.
    let mut live = live;
    live.write_all(b"ping\n").unwrap();
    let mut b = [0u8; 5];
    live.read_exact(&mut b).unwrap();
    drop(ping(port));
    let (lines, _) = p.stop();
    assert!(!lines.iter().any(|l| l.starts_with("ERR")), "{lines:?}");
}

#[test]
fn close_wait_is_shut_down_and_the_server_keeps_serving_with_its_file_thread_unharmed() {
    let dir = TempDir::new("rescue-file");
    let file = dir.path().join("data");
    let mut p = Run::new("leak_eof_server").plain().args(["--file-thread", file.to_str().unwrap(), "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let mut live = ping(port);
    for _ in 0..5 {
        leave_close_wait(&mut p, port);
    }
    eventually("5 sockets in CLOSE_WAIT", Duration::from_secs(5), || close_wait_count(pid) == 5);
    let fds_before = fd_count(pid);

    // Default --after 30s: these are seconds old, nothing is shut down.
    let (code, v) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let actions: Vec<&Value> = process(&v)["close_wait"].as_array().unwrap().iter().map(|c| &c["action"]).collect();
    assert_eq!(actions.len(), 5, "{v}");
    assert!(actions.iter().all(|a| *a == "recent"), "{actions:?}");
    assert_eq!(close_wait_count(pid), 5);

    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let r = process(&v);
    assert_eq!(r["before"]["tcp_states"]["close_wait"], 5, "{v}");
    assert_eq!(r["summary"]["shut_down"], 5, "{v}");
    for c in r["close_wait"].as_array().unwrap() {
        assert_eq!(c["action"], "shut_down", "{c}");
        assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{c}");
    }
    assert_eq!(r["after"]["tcp_states"]["close_wait"], 0, "{v}");
    eventually("no CLOSE_WAIT left", Duration::from_secs(5), || close_wait_count(pid) == 0);
    // The fd numbers stay the program's (rescue frees none), and keepfix holds no copy.
    assert_eq!(fd_count(pid), fds_before);

    // The server goes on: the live connection, a new one, the file thread.
    live.write_all(b"ping\n").unwrap();
    let mut b = [0u8; 5];
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong\n");
    drop(ping(port));
    std::thread::sleep(Duration::from_millis(200)); // file rounds after the rescue
    let (lines, _) = p.stop();
    let stats = lines.iter().find(|l| l.starts_with("STATS")).unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(field(stats, "errors"), "0", "{stats}");
    assert_eq!(field(stats, "file_err"), "0", "{stats}");
    assert!(field(stats, "file_ok").parse::<u64>().unwrap() > 0, "{stats}");
    assert!(!lines.iter().any(|l| l.starts_with("FILE_ERR") || l.starts_with("READ_ERR")), "{lines:?}");
}

#[test]
fn the_sigpipe_guard_refuses_a_sig_dfl_server_which_survives_and_force_shows_why() {
    // Refused: the server keeps its CLOSE_WAIT socket and survives its late write.
    let mut p = Run::new("rescue_select_server").plain().args(["--sigpipe-default", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let mut live = ping(port);
    leave_close_wait(&mut p, port);
    eventually("CLOSE_WAIT", Duration::from_secs(5), || close_wait_count(pid) == 1);
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(process(&v)["preflight"]["sigpipe"], "default");
    assert_eq!(process(&v)["close_wait"][0]["action"], "refused_sigpipe", "{v}");
    assert_eq!(process(&v)["summary"]["refused_sigpipe"], 1);
    let o = keepfix(&["rescue", "--after", "0s", &pid.to_string()]);
    assert!(text(&o.stdout).contains("refused: SIGPIPE"), "{}", text(&o.stdout));
    assert_eq!(close_wait_count(pid), 1, "not shut down");
    p.send("poke");
    let poke = p.expect("POKE ");
    assert_eq!(field(&poke, "ret"), "5", "the late write succeeds, as it would without keepfix: {poke}");
    p.expect("POKED");
    live.write_all(b"ping\n").unwrap();
    let mut b = [0u8; 5];
    live.read_exact(&mut b).unwrap();
    assert!(p.child.try_wait().unwrap().is_none(), "the server is alive");

    // --force: the same late write to a socket keepfix shut down kills it with SIGPIPE.
    let mut p = Run::new("rescue_select_server").plain().args(["--sigpipe-default", "0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    leave_close_wait(&mut p, port);
    eventually("CLOSE_WAIT", Duration::from_secs(5), || close_wait_count(pid) == 1);
    let (code, v) = rescue_json(&["--after", "0s", "--force", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(process(&v)["close_wait"][0]["action"], "shut_down", "{v}");
    // One write: the server acts on "poke" as soon as it reads it, and may be dead before a
    // second write could reach its stdin.
    let _ = p.stdin.as_mut().unwrap().write_all(b"poke\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the SIG_DFL server survived a write to a shut-down socket");
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}");
}

/// `prlimit --nofile=SOFT:HARD -- PROGRAM`: prlimit execs the program, so the pid is the program's.
fn with_limits(soft: u64, hard: u64, program: PathBuf, args: &[&str]) -> Option<Run> {
    let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"].into_iter().map(PathBuf::from).find(|p| p.exists());
    if !require(prlimit.is_some(), "prlimit is not installed (util-linux)") {
        return None;
    }
    let mut all = vec![format!("--nofile={soft}:{hard}"), "--".into(), program.to_string_lossy().into_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    Some(Run::path(prlimit.unwrap()).plain().args(all))
}

fn soft_nofile(pid: i32) -> u64 {
    let t = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = t.lines().find(|l| l.starts_with("Max open files")).unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn dry_run_changes_nothing() {
    let Some(run) = with_limits(256, 4096, c_program("leak_eof_server"), &["0"]) else { return };
    let mut p = run.spawn();
    let port = p.port();
    let pid = p.pid();
    let live = ping(port);
    let live_fd = server_side(pid, &live).fd;
    leave_close_wait(&mut p, port);
    eventually("CLOSE_WAIT", Duration::from_secs(5), || close_wait_count(pid) == 1);
    let lfd = listener_fd(pid);

    let (code, v) = rescue_json(&["--dry-run", "--after", "0s", "--raise-nofile", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["dry_run"], true);
    let r = process(&v);
    assert!(r["keepalive"].as_array().unwrap().iter().all(|k| k["action"] == "would_set"), "{v}");
    assert_eq!(r["close_wait"][0]["action"], "would_shut_down", "{v}");
    assert_eq!(r["nofile"]["action"], "would_raise", "{v}");
    assert_eq!(r["nofile"]["soft_after"], 4096, "{v}");
    // Nothing changed, seen from outside.
    assert_eq!(keepalive_of(pid, lfd), kernel_default_ka());
    assert_eq!(keepalive_of(pid, live_fd), kernel_default_ka());
    assert_eq!(close_wait_count(pid), 1);
    assert_eq!(soft_nofile(pid), 256);
    let o = keepfix(&["rescue", "--dry-run", "--after", "0s", &pid.to_string()]);
    assert!(text(&o.stdout).contains("dry run: nothing changed") && text(&o.stdout).contains("would shut down"));
    assert_eq!(close_wait_count(pid), 1);
}

#[test]
fn raise_nofile_goes_to_the_hard_limit_but_not_past_1024_for_select() {
    let Some(run) = with_limits(256, 4096, c_program("echo_server"), &["0"]) else { return };
    let mut p = run.spawn();
    p.port();
    let (code, v) = rescue_json(&["--raise-nofile", &p.pid().to_string()]);
    assert_eq!(code, 0, "{v}");
    let n = &process(&v)["nofile"];
    assert_eq!((n["action"].as_str(), n["uses_select"].as_bool()), (Some("raised"), Some(false)), "{v}");
    assert_eq!(soft_nofile(p.pid()), 4096);

    let Some(run) = with_limits(256, 4096, c_program("rescue_select_server"), &["0"]) else { return };
    let mut s = run.spawn();
    s.port();
    let (code, v) = rescue_json(&["--raise-nofile", &s.pid().to_string()]);
    assert_eq!(code, 0, "{v}");
    let n = &process(&v)["nofile"];
    assert_eq!(n["uses_select"], true, "{v}");
    assert!(n["decided_by"].as_str().unwrap().contains("select is among"), "{v}");
    assert_eq!(n["soft_after"], 1024, "{v}");
    assert_eq!(soft_nofile(s.pid()), 1024, "a select() program stays at 1024");
}

#[test]
fn a_gone_pid_fails_with_1_and_the_others_are_still_rescued() {
    let mut dead = Command::new("true").spawn().unwrap();
    let gone = dead.id();
    dead.wait().unwrap();
    let o = keepfix(&["rescue", &gone.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains(&format!("process {gone}: no such process")), "{}", text(&o.stderr));

    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let (code, v) = rescue_json(&[&gone.to_string(), &p.pid().to_string()]);
    assert_eq!(code, 1);
    assert_eq!(v["failed"][0]["reason"], "gone", "{v}");
    assert_eq!(process(&v)["pid"], p.pid(), "{v}");
    assert_eq!(keepalive_of(p.pid(), listener_fd(p.pid())), ka(60, 10, 6));
}

#[test]
fn bad_arguments_exit_2_naming_the_flag() {
    for (args, named) in [
        (&["rescue"][..], "PID"),
        (&["rescue", "abc"], "abc"),
        (&["rescue", "0"], "0"),
        (&["rescue", "--idle", "banana", "1"], "--idle"),
        (&["rescue", "--cnt", "500", "1"], "--cnt"),
        (&["rescue", "--after", "5x", "1"], "--after"),
        (&["rescue", "--user-timeout", "soon", "1"], "--user-timeout"),
        (&["rescue", "--watch", "nope", "1"], "--watch"),
        (&["rescue", "--watch", "0s", "1"], "--watch"),
    ] {
        let o = keepfix(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains(named), "{args:?} does not name {named}: {}", text(&o.stderr));
    }
}

#[test]
fn an_already_traced_process_is_left_alone_with_1() {
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let pid = p.pid();
    let mut tracer = Run::new("rescue_tracer").plain().args([pid.to_string()]).spawn();
    let tracer_pid = field(&tracer.expect("READY"), "tracer");
    let (code, v) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["failed"][0]["reason"], "traced", "{v}");
    assert!(v["failed"][0]["message"].as_str().unwrap().contains(&format!("traced by process {tracer_pid}")), "{v}");
    let o = keepfix(&["rescue", &pid.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains(&format!("process {pid}: already traced")), "{}", text(&o.stderr));
    assert!(!keepalive_of(pid, listener_fd(pid)).on, "nothing was changed");
    // Once the tracer is gone, the same rescue works.
    let _ = tracer.finish();
    eventually("TracerPid 0", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().contains("TracerPid:\t0\n")
    });
    let (code, v) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert!(keepalive_of(pid, listener_fd(pid)).on);
}

#[test]
fn another_users_process_is_refused_for_permission_with_1() {
    if !require(is_root(), "not root: cannot switch to another uid") {
        return;
    }
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let pid = p.pid();
    // A copy of keepfix that nobody may run, wherever the checkout is.
    let dir = TempDir::new("rescue-perm");
    let bin = dir.path().join("keepfix");
    std::fs::copy(keepfix_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["rescue", "--json", &pid.to_string()])
        .output()
        .expect("setpriv");
    assert_eq!(o.status.code(), Some(1), "stdout {} stderr {}", text(&o.stdout), text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["failed"][0]["reason"], "permission", "{v}");
    let err = text(&o.stderr);
    assert!(err.contains(&format!("process {pid}:")) && err.contains("uid 0"), "{err}");
    assert!(!keepalive_of(pid, listener_fd(pid)).on, "nothing was changed");
}

#[test]
fn watch_repeats_until_sigterm_and_exits_0() {
    let mut server = Run::new("leak_eof_server").plain().args(["0"]).spawn();
    let port = server.port();
    let pid = server.pid();
    let mut w = Run::path(keepfix_bin())
        .plain()
        .args(["rescue", "--watch", "100ms", "--after", "0s", &pid.to_string()])
        .spawn();
    w.expect("pass 2");
    // A leak made while the watch runs is shut down by a later pass.
    leave_close_wait(&mut server, port);
    let mut seen = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen && Instant::now() < deadline {
        seen =
            w.lines_for(Duration::from_millis(100)).iter().any(|l| l.contains("shut down") && l.contains("127.0.0.1"));
    }
    assert!(seen, "no later pass shut the new CLOSE_WAIT down: {:?}", w.lines_for(Duration::ZERO));
    eventually("no CLOSE_WAIT left", Duration::from_secs(5), || close_wait_count(pid) == 0);
    let (lines, status) = w.stop();
    assert_eq!(status.code(), Some(0), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("stopped after")), "{lines:?}");
}

/// Every key of a JSON object (and of the objects in it), recursively.
fn keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn json_parses_and_every_field_is_documented_in_help() {
    let Some(run) = with_limits(256, 4096, c_program("leak_eof_server"), &["0"]) else { return };
    let mut p = run.spawn();
    let port = p.port();
    let _live = ping(port);
    leave_close_wait(&mut p, port);
    let (code, v) = rescue_json(&["--after", "0s", "--raise-nofile", &p.pid().to_string()]);
    assert_eq!(code, 0, "{v}");
    let help = text(&keepfix(&["rescue", "--help"]).stdout);
    let mut all = Vec::new();
    keys(&v, &mut all);
    for k in ["keepalive", "close_wait", "close", "nofile", "release", "summary", "preflight", "before", "after"] {
        assert!(all.iter().any(|a| a == k), "no {k} in {v}");
    }
    for k in all {
        assert!(help.contains(&k), "JSON field {k} is not documented in rescue --help");
    }
}

#[test]
fn watch_stops_with_1_when_the_process_exits() {
    let mut server = Run::new("echo_server").plain().args(["0"]).spawn();
    server.port();
    let pid = server.pid();
    let mut w = Run::path(keepfix_bin()).plain().args(["rescue", "--watch", "50ms", &pid.to_string()]).spawn();
    w.expect("pass 2");
    drop(server); // killed and reaped: its pid may be reused, keepfix's pidfd still names the old process
    let mut status = None;
    eventually("keepfix rescue --watch ends", Duration::from_secs(10), || {
        status = w.child.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.unwrap().code(), Some(1));
    let err = w.stderr();
    assert!(err.contains(&format!("process {pid}:")) && err.contains("no process left to watch"), "{err}");
}

#[test]
fn keepfix_inside_a_seccomp_sandbox_that_forbids_pidfd_getfd_says_so_with_1() {
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let o = Command::new(c_program("rescue_seccomp_exec"))
        .arg(keepfix_bin())
        .args(["rescue", "--json", &p.pid().to_string()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["failed"][0]["reason"], "seccomp", "{v}");
    assert!(text(&o.stderr).contains("CAP_SYS_PTRACE"), "{}", text(&o.stderr));
    assert!(!keepalive_of(p.pid(), listener_fd(p.pid())).on, "nothing was changed");
}

#[test]
fn connections_queued_before_the_rescue_are_counted_and_a_second_pass_covers_them() {
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    // Stopped, the server accepts nothing: this connection waits in the accept queue, its
    // handshake done before the listener had keepalive.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut queued = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (code, v) = rescue_json(&[&pid.to_string()]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(code, 0, "{v}");
    let listener =
        process(&v)["keepalive"].as_array().unwrap().iter().find(|k| k["role"] == "listener").unwrap().clone();
    assert_eq!(listener["accept_queue"], 1, "{v}");
    queued.write_all(b"ping\n").unwrap();
    let mut b = [0u8; 5];
    queued.read_exact(&mut b).unwrap();
    let fd = server_side(pid, &queued).fd;
    assert_eq!(keepalive_of(pid, fd), kernel_default_ka(), "queued before: not inherited");
    let (code, _) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0);
    assert_eq!(keepalive_of(pid, fd), ka(60, 10, 6), "the second pass covers it");
}

#[test]
fn watch_holds_no_duplicate_between_passes() {
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let mut early = ping(port);
    let mut w = Run::path(keepfix_bin()).plain().args(["rescue", "--watch", "50ms", &pid.to_string()]).spawn();
    w.expect("pass 3");
    // echo_server closes at EOF. Had keepfix kept its duplicate of that socket, the close would
    // not be the last reference: no FIN would reach the client while the watch runs.
    early.shutdown(std::net::Shutdown::Write).unwrap();
    early.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(early.read(&mut b).unwrap(), 0, "the client gets the server's FIN");
    p.expect("CLOSE fd=");
    let (_, status) = w.stop();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn unread_data_is_left_alone_unless_include_unread_and_stays_readable() {
    let mut p = Run::new("leak_noread_server").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"request\n").unwrap();
    p.expect("ACCEPT");
    drop(c);
    eventually("CLOSE_WAIT", Duration::from_secs(5), || close_wait_count(pid) == 1);
    let (code, v) = rescue_json(&["--after", "0s", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let entry = &process(&v)["close_wait"][0];
    assert_eq!((entry["action"].as_str(), entry["recv_q"].as_u64()), (Some("unread"), Some(8)), "{v}");
    assert_eq!(close_wait_count(pid), 1, "left alone: the program may still read it and answer");

    let (code, v) = rescue_json(&["--after", "0s", "--include-unread", &pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(process(&v)["close_wait"][0]["action"], "shut_down", "{v}");
    eventually("no CLOSE_WAIT left", Duration::from_secs(5), || close_wait_count(pid) == 0);
    // The shutdown lost nothing the program had not read: through a duplicate, the bytes, then EOF.
    let fd = process(&v)["close_wait"][0]["fd"].as_i64().unwrap() as i32;
    let dup = grab_fd(pid, fd);
    let mut s = TcpStream::from(dup);
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request\n");
}

#[test]
fn sockets_in_close_with_the_fd_open_are_counted_and_listed() {
    let mut p = Run::new("leak_eof_server").plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let reset = ping(port);
    close_with_rst(reset); // the server's read gets ECONNRESET and forgets the fd: CLOSE
    let line = p.expect("READ_ERR");
    let fd: i32 = field(&line, "fd").parse().unwrap();
    let inode = socket_fds(pid).into_iter().find(|(f, _)| *f == fd).expect("the fd is still open").1;
    assert!(!proc_net_tcp().contains_key(&inode), "a socket in CLOSE is in no table (ss cannot see it)");
    let (code, v) = rescue_json(&[&pid.to_string()]);
    assert_eq!(code, 0, "{v}");
    let r = process(&v);
    assert_eq!(r["before"]["tcp_states"]["close"], 1, "{v}");
    let close = r["close"].as_array().unwrap();
    assert_eq!(close.len(), 1, "{v}");
    assert_eq!((close[0]["fd"].as_i64(), close[0]["inode"].as_u64()), (Some(fd.into()), Some(inode)), "{v}");
    let o = keepfix(&["rescue", &pid.to_string()]);
    assert!(text(&o.stdout).contains("CLOSE:      1"), "{}", text(&o.stdout));
}

#[test]
fn the_preflight_says_whether_keepfix_is_loaded() {
    let mut plain = Run::new("echo_server").plain().args(["0"]).spawn();
    plain.port();
    let mut under = Run::new("echo_server").args(["0"]).spawn();
    under.port();
    let (code, v) = rescue_json(&["--dry-run", &plain.pid().to_string(), &under.pid().to_string()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["processes"][0]["preflight"]["keepfix_loaded"], false, "{v}");
    assert_eq!(v["processes"][1]["preflight"]["keepfix_loaded"], true, "{v}");
    // Under keepfix the listener already has keepfix's options: nothing to set.
    assert_eq!(v["processes"][1]["summary"]["keepalive_kept"], 1, "{v}");
}

#[test]
fn watch_brings_new_go_connections_to_keepfixs_interval() {
    let Some(server) = go_server() else { return };
    let mut p = Run::path(server).plain().args(["0"]).spawn();
    let port = p.port();
    let pid = p.pid();
    let mut w = Run::path(keepfix_bin()).plain().args(["rescue", "--watch", "100ms", &pid.to_string()]).spawn();
    w.expect("pass 2");
    // Accepted after the first pass: Go puts its own 15 s interval on it, a later pass fixes it.
    let new = ping(port);
    let fd = server_side(pid, &new).fd;
    eventually("keepfix's 10 s interval on the new connection", Duration::from_secs(10), || {
        keepalive_of(pid, fd) == ka(15, 10, 6)
    });
    let (_, status) = w.stop();
    assert_eq!(status.code(), Some(0));
}
