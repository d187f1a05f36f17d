//! The `keepfix` command: `run` (options set, pid kept, LD_PRELOAD merged, bad flags and a
//! missing library refused), `status` (counts checked against /proc/net/tcp, the listing, unknown
//! PIDs, another network namespace), `check` (good and bad environments) and `demo`.
mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// `keepfix ARGS` with a clean KEEPFIX_*/LD_PRELOAD environment plus `env`; waits for it.
fn keepfix(args: &[&str], env: &[(&str, &str)]) -> Output {
    lib(); // keepfix finds libkeepfix.so next to itself: build it first
    let mut c = Command::new(keepfix_bin());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("KEEPFIX_") || k == "LD_PRELOAD" {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `keepfix run FLAGS -- PROGRAM ARGS` as a Proc: after exec its pid is the program's.
fn keepfix_run(flags: &[&str], program: &Path, args: &[&str]) -> Run {
    lib();
    let mut all: Vec<String> = vec!["run".into()];
    all.extend(flags.iter().map(|s| s.to_string()));
    all.push("--".into());
    all.push(program.to_str().unwrap().into());
    all.extend(args.iter().map(|s| s.to_string()));
    Run::path(keepfix_bin()).plain().args(all)
}

fn environ_var(pid: i32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .filter_map(|e| std::str::from_utf8(e).ok())
        .find_map(|e| e.strip_prefix(&format!("{name}=")).map(String::from))
}

/// A shared library this process already has mapped (libc), harmless to preload.
fn harmless_library() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so"))
        .expect("libc in /proc/self/maps")
        .to_string()
}

#[test]
fn run_sets_the_options_and_execs_in_place() {
    let echo = c_program("echo_server");
    let mut p =
        keepfix_run(&["--idle", "7", "--intvl", "3", "--cnt", "4", "--user-timeout", "9s"], &echo, &["0"]).spawn();
    let port = p.port();
    let _client = ping(port);
    let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
    assert_eq!(keepalive_of(p.pid(), fd), Ka { on: true, idle: 7, intvl: 3, cnt: 4, user_timeout: 9000 });
    // exec, not spawn: the pid keepfix was started as is now echo_server itself.
    let exe = std::fs::read_link(format!("/proc/{}/exe", p.pid())).unwrap();
    assert_eq!(exe, echo.canonicalize().unwrap());
    assert_eq!(environ_var(p.pid(), "KEEPFIX_IDLE").as_deref(), Some("7"));
}

#[test]
fn run_keeps_an_existing_ld_preload_and_adds_keepfix_once() {
    let echo = c_program("echo_server");
    let other = harmless_library();
    let ours = lib().canonicalize().unwrap();
    let ours = ours.to_str().unwrap();

    let mut p = keepfix_run(&[], &echo, &["0"]).env("LD_PRELOAD", &other).spawn();
    p.port();
    assert_eq!(environ_var(p.pid(), "LD_PRELOAD").unwrap(), format!("{other}:{ours}"));
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.pid())).unwrap();
    assert!(maps.contains("libkeepfix.so"), "keepfix is not loaded");
    drop(p);

    // Already there (space-separated, as ld.so also accepts): not added again.
    let mut p = keepfix_run(&[], &echo, &["0"]).env("LD_PRELOAD", &format!("{other} {ours}")).spawn();
    p.port();
    assert_eq!(environ_var(p.pid(), "LD_PRELOAD").unwrap(), format!("{other}:{ours}"));
}

#[test]
fn run_refuses_a_bad_flag_naming_it() {
    let o = keepfix(&["run", "--idle", "abc", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(r#"keepfix: --idle "abc" is not a duration (like 60, 200ms, 1.5s, 10m or 1h)"#),
        "{}",
        stderr(&o)
    );
    let o = keepfix(&["run", "--close-wait", "sometimes", "--cnt", "500", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(r#"--close-wait "sometimes" is not off, log, shutdown or close"#), "{}", stderr(&o));
    assert!(stderr(&o).contains(r#"--cnt "500" is out of range 1..127"#), "{}", stderr(&o));
}

#[test]
fn run_warns_about_the_environment_and_lets_flags_override_it() {
    let script = r#"echo "idle=$KEEPFIX_IDLE cnt=$KEEPFIX_CNT""#;
    let o = keepfix(
        &["run", "--idle", "5", "--", "sh", "-c", script],
        &[("KEEPFIX_IDLE", "abc"), ("KEEPFIX_CNT", "many"), ("KEEPFIX_NOFILE_WARN", "50")],
    );
    assert_eq!(o.status.code(), Some(0), "a bad variable in the environment is not fatal: {}", stderr(&o));
    assert!(stdout(&o).contains("idle=5 cnt=many"), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(r#"warning: config KEEPFIX_CNT="many" is not a whole number; using 6"#), "{err}");
    assert!(!err.contains("KEEPFIX_IDLE"), "the flag overrides KEEPFIX_IDLE: {err}");
    assert!(!err.contains("KEEPFIX_NOFILE_WARN"), "{err}");
}

#[test]
fn run_without_the_library_or_the_program_says_so() {
    let o = keepfix(&["run", "--", "true"], &[("KEEPFIX_LIB", "/nonexistent/libkeepfix.so")]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains(r#"KEEPFIX_LIB="/nonexistent/libkeepfix.so""#), "{}", stderr(&o));
    let o = keepfix(&["run", "--", "/nonexistent/program"], &[]);
    assert_eq!(o.status.code(), Some(127));
    assert!(stderr(&o).contains(r#"cannot run "/nonexistent/program": not found"#), "{}", stderr(&o));
    let o = keepfix(&["run", "--", "/etc/passwd"], &[]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
}

/// The process entry for `pid` in `keepfix status ... --json`.
fn status_json(args: &[&str], pid: i32) -> Value {
    let o = keepfix(&[&["status", "--json"][..], args].concat(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let entry = v["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid);
    entry.unwrap_or_else(|| panic!("pid {pid} not in {v}")).clone()
}

#[test]
fn status_counts_what_proc_net_tcp_shows() {
    // Without keepfix: its watchdog's brief fds (a /proc read) would make the fd count wobble.
    let mut p = Run::new("leak_eof_server").plain().nofile(200).args(["0"]).spawn();
    let port = p.port();
    for _ in 0..3 {
        drop(ping(port)); // the server never closes its end: CLOSE_WAIT
    }
    let _open = ping(port);
    eventually("3 CLOSE_WAIT and 1 ESTABLISHED", Duration::from_secs(5), || {
        let t = tcp_fds(p.pid());
        t.iter().filter(|s| s.state == CLOSE_WAIT).count() == 3 && t.iter().any(|s| s.state == ESTABLISHED)
    });
    let pid = p.pid();
    let tcp = tcp_fds(pid);
    let count = |state: u8| tcp.iter().filter(|t| t.state == state).count();

    let s = status_json(&[&pid.to_string()], pid);
    assert_eq!(s["program"], "leak_eof_server");
    assert_eq!(s["keepfix_loaded"], false);
    assert_eq!(s["keepfix_metrics"], Value::Null);
    assert_eq!(s["tcp_source"], "sock_diag");
    assert_eq!(s["fds"]["used"], fd_count(pid));
    assert_eq!((s["fds"]["soft_limit"].as_u64(), s["fds"]["hard_limit"].as_u64()), (Some(200), Some(200)));
    let states = &s["tcp_states"];
    assert_eq!(states["close_wait"], count(CLOSE_WAIT));
    assert_eq!(states["established"], count(ESTABLISHED));
    assert_eq!(states["listen"], count(LISTEN));
    assert_eq!(states["total"], tcp.len());
    assert_eq!(s["other_sockets"], socket_fds(pid).len() - tcp.len());
    let mut listed: Vec<(i64, u16)> = s["close_wait"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["fd"].as_i64().unwrap(), c["peer"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap()))
        .collect();
    listed.sort();
    let mut expected: Vec<(i64, u16)> =
        tcp.iter().filter(|t| t.state == CLOSE_WAIT).map(|t| (i64::from(t.fd), t.remote_port)).collect();
    expected.sort();
    assert_eq!(listed, expected);
    for c in s["close_wait"].as_array().unwrap() {
        assert_eq!(c["local"], format!("127.0.0.1:{port}"));
        assert_eq!(c["recv_q"], 0);
    }

    // The text report says the same.
    let o = keepfix(&["status", &pid.to_string()], &[]);
    let text = stdout(&o);
    assert!(text.contains("CLOSE_WAIT 3") && text.contains("ESTABLISHED 1") && text.contains("LISTEN 1"), "{text}");
    assert!(text.contains("keepfix:        not loaded"), "{text}");
}

#[test]
fn status_without_pid_lists_the_process_by_close_wait() {
    let mut p = Run::new("leak_eof_server").plain().args(["0"]).spawn();
    let port = p.port();
    for _ in 0..2 {
        drop(ping(port));
    }
    eventually("2 CLOSE_WAIT", Duration::from_secs(5), || {
        tcp_fds(p.pid()).iter().filter(|t| t.state == CLOSE_WAIT).count() == 2
    });
    let o = keepfix(&["status"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split("  ").map(str::trim).filter(|h| !h.is_empty()).collect();
    assert_eq!(
        header,
        ["PID", "COMM", "FDS", "SOFT LIMIT", "ESTABLISHED", "CLOSE_WAIT", "LISTEN", "OTHER TCP", "KEEPFIX"]
    );
    // Columns from the right: a COMM may hold spaces.
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().rev().take(7).collect()).collect();
    let line = text.lines().find(|l| l.starts_with(&format!("{} ", p.pid()))).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" leak_eof_server "), "{line}");
    let row: Vec<&str> = line.split_whitespace().rev().take(7).collect();
    // Read backwards: KEEPFIX, OTHER TCP, LISTEN, CLOSE_WAIT, ESTABLISHED, SOFT LIMIT, FDS.
    assert_eq!(row[..5], ["no", "0", "1", "2", "0"], "{line}");
    assert_eq!(row[6], fd_count(p.pid()).to_string(), "{line}");
    // Sorted by CLOSE_WAIT, most first.
    let close_waits: Vec<u64> = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    assert!(close_waits.windows(2).all(|w| w[0] >= w[1]), "{text}");
}

#[test]
fn status_of_an_unknown_pid_fails_and_goes_on() {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let gone = (2..pid_max).rev().find(|p| !Path::new(&format!("/proc/{p}")).exists()).unwrap();
    let mut p = Run::new("echo_server").plain().args(["0"]).spawn();
    p.port();
    let o = keepfix(&["status", &gone.to_string(), &p.pid().to_string()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), format!("keepfix: process {gone}: no such process"));
    assert!(stdout(&o).contains(&format!("PID {} (echo_server)", p.pid())), "{}", stdout(&o));
    let o = keepfix(&["status", "not-a-pid"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn status_reads_a_process_in_another_network_namespace_from_its_proc_net_tcp() {
    if !require_root("unshare --net makes a network namespace") {
        return;
    }
    let Some(ip) = require_tool("ip", "iproute2") else { return };
    let echo = c_program("echo_server");
    let script = format!("{} link set lo up && exec {} 0", ip.display(), echo.display());
    let mut p = Run::path(PathBuf::from("unshare")).plain().args(["--net", "sh", "-c", &script]).spawn();
    p.port();
    let s = status_json(&[&p.pid().to_string()], p.pid());
    assert_eq!(s["program"], "echo_server");
    assert_eq!(s["tcp_source"], "proc_net_tcp");
    assert_eq!(s["tcp_states"]["listen"], 1, "{s}");
    assert_eq!(s["other_sockets"], 0, "{s}");
}

#[test]
fn check_accepts_a_good_configuration() {
    let o =
        keepfix(&["check"], &[("KEEPFIX_IDLE", "30"), ("KEEPFIX_CLOSE_WAIT", "close"), ("KEEPFIX_INTVL", "1500ms")]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    let row = |var: &str| -> Vec<String> {
        let line = text.lines().find(|l| l.starts_with(&format!("{var} "))).unwrap_or_else(|| panic!("{var}: {text}"));
        line.split_whitespace().skip(1).map(String::from).collect()
    };
    assert_eq!(row("KEEPFIX_IDLE"), ["30s", "environment"]);
    assert_eq!(row("KEEPFIX_CLOSE_WAIT"), ["close", "environment"]);
    assert_eq!(row("KEEPFIX_CNT"), ["6", "default"]);
    assert_eq!(row("KEEPFIX_INTVL"), ["2s", "environment"]);
    assert!(stderr(&o).contains(r#"warning: config KEEPFIX_INTVL="1500ms""#), "{}", stderr(&o));
    assert!(text.contains("configuration OK (1 warning)"), "{text}");
}

#[test]
fn check_rejects_each_bad_variable_on_its_own_line() {
    let o = keepfix(
        &["check"],
        &[("KEEPFIX_IDLE", "soon"), ("KEEPFIX_CNT", "0"), ("KEEPFIX_LOG", "relative.log"), ("KEEPFIX_IDEL", "5")],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    for var in ["KEEPFIX_IDLE", "KEEPFIX_CNT", "KEEPFIX_LOG"] {
        let mine: Vec<&&str> = lines.iter().filter(|l| l.contains(&format!("config {var}="))).collect();
        assert_eq!(mine.len(), 1, "{var}: {err}");
        assert!(mine[0].starts_with("keepfix: error: "), "{}", mine[0]);
    }
    assert!(err.contains("KEEPFIX_IDEL is not a keepfix variable; ignored (did you mean KEEPFIX_IDLE?)"), "{err}");
    assert!(stdout(&o).contains("default (invalid value)"), "{}", stdout(&o));
    assert!(stdout(&o).contains("configuration has 3 errors, 1 warning"), "{}", stdout(&o));

    let o = keepfix(&["check"], &[("KEEPFIX_LIB", "/nonexistent.so")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(r#"KEEPFIX_LIB="/nonexistent.so""#), "{}", stderr(&o));
}

#[test]
fn demo_runs_both_servers_and_cleans_up() {
    // 40 clients stay under the 64-fd limit: both runs serve everyone, and the demo says why.
    let tmp = std::env::temp_dir().join(format!("keepfix-cli-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let o = keepfix(&["demo", "--clients", "40"], &[("TMPDIR", tmp.to_str().unwrap())]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    let row = |label: &str| -> Vec<String> {
        let line =
            text.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{label}: {text}"));
        line[line.find(label).unwrap() + label.len()..].split_whitespace().map(String::from).collect()
    };
    assert_eq!(row("clients served (of 40)"), ["40", "40"]);
    assert_eq!(row("sockets left in CLOSE_WAIT"), ["40", "0"]);
    assert_eq!(row("sockets keepfix shut down"), ["-", "40"]);
    // Under the limit, no number needed freeing.
    assert_eq!(row("fd numbers keepfix freed"), ["-", "0"]);
    assert!(text.contains("keepfix[") && text.contains("action=shutdown"), "{text}");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the demo left files in {}", tmp.display());
    std::fs::remove_dir(&tmp).unwrap();
}

#[test]
fn status_finds_the_metrics_file_of_a_process_in_a_pid_namespace() {
    if !require_root("unshare --pid makes a pid namespace") {
        return;
    }
    // In a container the program names its metrics file with its own pid (1 here), not the
    // host's; status finds it through the process's NSpid and /proc/PID/root.
    let dir = TempDir::new("cli-pidns");
    let echo = c_program("echo_server");
    let mut p = Run::path(PathBuf::from("unshare"))
        .env("KEEPFIX_METRICS", dir.str())
        .args(["--pid", "--fork", "--kill-child", &echo.display().to_string(), "0"])
        .spawn();
    p.port();
    let unshare = p.pid();
    let mut inner = 0;
    eventually("the server in its pid namespace", Duration::from_secs(5), || {
        inner = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        inner > 0 && dir.path().join("keepfix-1.prom").exists()
    });
    let s = status_json(&[&inner.to_string()], inner);
    assert_eq!(s["program"], "echo_server");
    assert_eq!(s["keepfix_loaded"], true);
    let k = &s["keepfix_metrics"];
    assert_eq!(k["file"], format!("/proc/{inner}/root{}/keepfix-1.prom", dir.str()), "{s}");
    assert_eq!(k["close_wait_found"], 0, "{s}");
}
