//! The metrics file (KEEPFIX_METRICS=DIR → DIR/keepfix-PID.prom): valid Prometheus text format,
//! figures that match the program's real state, shown by `keepfix status`, and gone after a
//! normal exit.
mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One metric family: its HELP, TYPE and samples.
#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<(BTreeMap<String, String>, f64)>,
}

/// A strict parser of the Prometheus text exposition format (version 0.0.4). Every line must
/// parse; a family's HELP and TYPE come once each, before its samples; a family's lines are
/// together; no series appears twice; every family has HELP, TYPE and a sample. The error names
/// the line.
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, Family>, String> {
    if !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut closed: BTreeSet<String> = BTreeSet::new();
    let mut series: BTreeSet<String> = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        // A family's lines must be together: entering one already left is an error.
        let mut enter = |name: &str| -> Result<(), String> {
            if current.as_deref() != Some(name) {
                if let Some(prev) = current.replace(name.to_string()) {
                    closed.insert(prev);
                }
                if closed.contains(name) {
                    return Err(bad("the lines of this family are not together"));
                }
            }
            Ok(())
        };
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match words.as_slice() {
                ["HELP", name, help @ ..] if valid_name(name) => {
                    enter(name)?;
                    let f = families.entry(name.to_string()).or_default();
                    if f.help.is_some() || !f.samples.is_empty() {
                        return Err(bad("HELP twice, or after samples"));
                    }
                    f.help = Some(help.first().copied().unwrap_or_default().to_string());
                }
                ["TYPE", name, kind] if valid_name(name) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) {
                        return Err(bad("unknown TYPE"));
                    }
                    enter(name)?;
                    let f = families.entry(name.to_string()).or_default();
                    if f.kind.is_some() || !f.samples.is_empty() {
                        return Err(bad("TYPE twice, or after samples"));
                    }
                    f.kind = Some(kind.to_string());
                }
                ["HELP" | "TYPE", ..] => return Err(bad("malformed HELP or TYPE")),
                _ => {} // a plain comment
            }
            continue;
        }
        let (name, labels, rest) = parse_series(line).ok_or_else(|| bad("malformed sample"))?;
        let mut words = rest.split(' ');
        let value = words.next().and_then(parse_value).ok_or_else(|| bad("bad value"))?;
        match (words.next(), words.next()) {
            (None, None) => {}
            (Some(ts), None) if ts.parse::<i64>().is_ok() => {} // a timestamp
            _ => return Err(bad("trailing text after the value")),
        }
        enter(&name)?;
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(bad("the same series twice"));
        }
        families.entry(name).or_default().samples.push((labels, value));
    }
    for (name, f) in &families {
        if f.help.is_none() || f.kind.is_none() || f.samples.is_empty() {
            return Err(format!("{name} lacks its HELP, its TYPE or a sample"));
        }
    }
    Ok(families)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{a="x",b="y"} rest` → (name, labels, rest).
fn parse_series(line: &str) -> Option<(String, BTreeMap<String, String>, &str)> {
    let end = line.find(['{', ' '])?;
    let name = &line[..end];
    if !valid_name(name) {
        return None;
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[end..];
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inner.split_once("=\"")?;
            if !valid_name(key) || key.contains(':') || labels.contains_key(key) {
                return None;
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    (_, '\n') => return None,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.to_string(), value);
            inner = &after[close + 1..];
            inner = inner.strip_prefix(',').unwrap_or(inner);
        }
    }
    Some((name.to_string(), labels, rest.strip_prefix(' ')?))
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if v.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) && !v.is_empty() => v.parse().ok(),
        _ => None,
    }
}

/// The value of `name` with these labels (besides pid and program).
fn value(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = families.get(name).unwrap_or_else(|| panic!("no metric {name}"));
    let matching: Vec<f64> = f
        .samples
        .iter()
        .filter(|(l, _)| labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(matching.len(), 1, "{name}{labels:?}: {:?}", f.samples);
    matching[0]
}

/// A fresh directory for one test's metrics, removed when dropped.
struct MetricsDir(PathBuf);

impl MetricsDir {
    fn new(test: &str) -> MetricsDir {
        let d = std::env::temp_dir().join(format!("keepfix-metrics-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        MetricsDir(d)
    }
    fn file_of(&self, pid: i32) -> PathBuf {
        self.0.join(format!("keepfix-{pid}.prom"))
    }
}

impl Drop for MetricsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The metrics file, parsed; `None` while it does not exist. Any format error fails the test.
fn read_metrics(path: &Path) -> Option<BTreeMap<String, Family>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(parse_prometheus(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display())))
}

#[test]
fn metrics_match_the_program_and_keepfix_status_and_go_at_exit() {
    const LEAKED: usize = 3;
    let dir = MetricsDir::new("leak");
    let mut p = Run::new("leak_eof_server")
        .env("KEEPFIX_METRICS", dir.0.to_str().unwrap())
        .env("KEEPFIX_SCAN_INTERVAL", "100ms")
        .env("KEEPFIX_CLOSE_WAIT", "close")
        .env("KEEPFIX_CLOSE_WAIT_AFTER", "0s")
        .nofile(500)
        .args(["0"])
        .spawn();
    let port = p.port();
    let pid = p.pid();
    for _ in 0..LEAKED {
        drop(ping(port)); // the server never closes its end: keepfix releases it
    }
    let file = dir.file_of(pid);
    eventually("the metrics file counts 3 sockets shut down", Duration::from_secs(10), || {
        read_metrics(&file)
            .is_some_and(|m| value(&m, "keepfix_close_wait_actions_total", &[("action", "shutdown")]) == 3.0)
    });
    eventually("no socket left in CLOSE_WAIT", Duration::from_secs(5), || {
        tcp_fds(pid).iter().all(|t| t.state != CLOSE_WAIT)
    });
    // Two scans later, every figure is settled.
    std::thread::sleep(Duration::from_millis(250));
    let m = read_metrics(&file).unwrap();

    for (name, f) in &m {
        for (labels, _) in &f.samples {
            assert_eq!(labels.get("pid"), Some(&pid.to_string()), "{name}");
            assert_eq!(labels.get("program").map(String::as_str), Some("leak_eof_server"), "{name}");
        }
    }
    assert_eq!(value(&m, "keepfix_up", &[]), 1.0);
    assert_eq!(value(&m, "keepfix_close_wait_found_total", &[]), LEAKED as f64);
    assert_eq!(value(&m, "keepfix_close_wait_actions_total", &[("action", "shutdown")]), LEAKED as f64);
    assert_eq!(
        value(&m, "keepfix_sockets", &[("state", "released")]),
        LEAKED as f64,
        "shut down, the numbers still the program's"
    );
    assert_eq!(value(&m, "keepfix_sockets", &[("state", "close_wait")]), 0.0);
    assert_eq!(value(&m, "keepfix_sockets", &[("state", "listen")]), 1.0);
    assert_eq!(value(&m, "keepfix_tracked_sockets", &[("role", "listener")]), 1.0);
    assert_eq!(value(&m, "keepfix_emfile_total", &[]), 0.0);
    assert_eq!(value(&m, "keepfix_fds_limit", &[("kind", "soft")]), 500.0);
    assert_eq!(value(&m, "keepfix_fds_limit", &[("kind", "hard")]), 500.0);
    let fds_used = value(&m, "keepfix_fds_used", &[]);
    let real = fd_count(pid) as f64;
    assert!((fds_used - real).abs() <= 2.0, "keepfix_fds_used {fds_used}, /proc/{pid}/fd has {real}");
    assert_eq!(m["keepfix_close_wait_found_total"].kind.as_deref(), Some("counter"));
    assert_eq!(m["keepfix_fds_used"].kind.as_deref(), Some("gauge"));

    // `keepfix status` finds the file through the process's environment and shows its figures.
    lib();
    let o = std::process::Command::new(keepfix_bin()).args(["status", "--json", &pid.to_string()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = &v["processes"][0];
    assert_eq!(s["keepfix_loaded"], true);
    let k = &s["keepfix_metrics"];
    assert_eq!(k["file"], file.to_str().unwrap());
    assert_eq!(k["shut_down"], LEAKED);
    // Far from the fd limit: no number needed freeing.
    assert_eq!(k["released"], 0);
    assert_eq!(k["close_wait_found"], LEAKED);
    assert_eq!(k["close_wait_held"], 0);
    assert_eq!(k["emfile_events"], 0);
    assert_eq!(k["fds_used"].as_f64(), Some(fds_used));
    assert!(k["age_seconds"].as_f64().unwrap() < 5.0, "{k}");
    assert_eq!(s["tcp_states"]["close_wait"], 0);
    let o = std::process::Command::new(keepfix_bin()).args(["status", &pid.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("CLOSE_WAIT found {LEAKED}, numbers freed 0, shut down {LEAKED}")), "{text}");

    // A normal exit (SIGTERM → exit 0) removes the file: no stale figures for a dead process.
    let (_, status) = p.stop();
    assert!(status.success(), "{status:?}");
    assert!(!file.exists(), "{} is still there after exit", file.display());
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n";
    assert_eq!(parse_prometheus(good).unwrap()["a_total"].samples.len(), 1);
    for (bad, why) in [
        ("a_total 3\n", "no HELP, no TYPE"),
        ("# HELP a A.\n# TYPE a gauge\na{x=\"1} 3\n", "unterminated label value"),
        ("# HELP a A.\n# TYPE a gauge\na 3 extra\n", "trailing text"),
        ("# HELP a A.\n# TYPE a gauge\na three\n", "bad value"),
        ("# HELP a A.\n# TYPE a meter\na 1\n", "unknown type"),
        ("# HELP a A.\n# TYPE a gauge\na 1\na 2\n", "the same series twice"),
        ("# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b gauge\nb 1\na{x=\"1\"} 2\n", "split family"),
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted ({why}): {bad:?}");
    }
}

/// Field 22 of /proc/PID/stat: the process's start time, in clock ticks since boot.
fn start_time(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// The inode of our PID namespace, as keepfix records it in a file's first line.
fn pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").unwrap().ino()
}

/// A PID that no process has: a child's, after it was reaped.
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// The keepfix-PID.prom files in `dir`, by PID.
fn prom_files(dir: &Path) -> BTreeSet<i32> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            n.strip_prefix("keepfix-")?.strip_suffix(".prom")?.parse().ok()
        })
        .collect()
}

/// `prog` under keepfix, writing metrics into `dir` every 100 ms.
fn writing_into(dir: &MetricsDir, prog: &str) -> Run {
    Run::new(prog).env("KEEPFIX_METRICS", dir.0.to_str().unwrap()).env("KEEPFIX_SCAN_INTERVAL", "100ms")
}

/// A keepfix process writing metrics into `dir` every 100 ms.
fn metrics_server(dir: &MetricsDir) -> Proc {
    let mut p = writing_into(dir, "echo_server").args(["0"]).spawn();
    p.port();
    let file = dir.file_of(p.pid());
    eventually("the server's metrics file", Duration::from_secs(10), || file.exists());
    p
}

/// D7: a SIGKILLed process runs no destructor, and its file stayed for ever. The next live
/// keepfix process to write into the directory removes it, and keeps the files of the living.
/// Fails without the sweep: the dead process's file is still there.
#[test]
fn a_killed_process_file_is_removed_by_a_live_process() {
    let dir = MetricsDir::new("killed");
    let mut victim = metrics_server(&dir);
    let victim_pid = victim.pid();
    let text = std::fs::read_to_string(dir.file_of(victim_pid)).unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(
        first,
        format!("# keepfix pid={victim_pid} start={} pidns={}", start_time(victim_pid as u32), pid_ns()),
        "the file's first line says which process wrote it"
    );
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(dir.file_of(victim_pid).exists(), "SIGKILL ran a destructor? the test proves nothing");

    // A file of an older keepfix (no first line) of a dead PID goes too.
    let old = dir.file_of(dead_pid() as i32);
    std::fs::write(&old, "# HELP keepfix_up 1 while keepfix's watchdog runs in this process.\n").unwrap();

    let live = metrics_server(&dir);
    eventually("the killed process's file is removed", Duration::from_secs(10), || {
        !dir.file_of(victim_pid).exists() && !old.exists()
    });
    // A second live process's sweep (before its first write) keeps the first one's file.
    let other = metrics_server(&dir);
    assert_eq!(prom_files(&dir.0), BTreeSet::from([live.pid(), other.pid()]));
}

/// D7, PID reuse: a file whose PID now belongs to another program (another start time) is
/// removed; one whose PID and start time match a living process, one from another PID namespace,
/// and a live keepfix process's are kept. Fails without the sweep: the reused PID's file stays.
#[test]
fn a_file_whose_pid_now_belongs_to_another_program_is_removed() {
    let dir = MetricsDir::new("reused");
    let sleeper = ChildGuard(std::process::Command::new("sleep").arg("60").spawn().unwrap());
    let sleeper2 = ChildGuard(std::process::Command::new("sleep").arg("60").spawn().unwrap());
    let (pid, pid2) = (sleeper.0.id(), sleeper2.0.id());
    let body = "# HELP keepfix_up 1 while keepfix's watchdog runs in this process.\n# TYPE keepfix_up gauge\n";
    // Written by an earlier process with this PID: another start time.
    let reused = dir.file_of(pid as i32);
    std::fs::write(&reused, format!("# keepfix pid={pid} start={} pidns={}\n{body}", start_time(pid) + 1, pid_ns()))
        .unwrap();
    // The identity matches the process at that PID: kept.
    let matching = dir.file_of(pid2 as i32);
    std::fs::write(&matching, format!("# keepfix pid={pid2} start={} pidns={}\n{body}", start_time(pid2), pid_ns()))
        .unwrap();
    // Another PID namespace's PID means nothing here (a container sharing the directory): kept.
    let dead = dead_pid();
    let foreign = dir.file_of(dead as i32);
    std::fs::write(&foreign, format!("# keepfix pid={dead} start=1 pidns={}\n{body}", pid_ns() + 1)).unwrap();
    // Another tool's file in the collector's directory: never touched.
    let unrelated = dir.0.join("node_other.prom");
    std::fs::write(&unrelated, body).unwrap();

    let live = metrics_server(&dir);
    // The sweep that removes it (before the live server's first write) keeps the others.
    eventually("the reused PID's file is removed", Duration::from_secs(10), || !reused.exists());
    assert!(matching.exists(), "a file whose process lives was removed");
    assert!(foreign.exists(), "a file of another PID namespace was removed");
    assert!(unrelated.exists(), "another tool's file was removed");
    assert!(dir.file_of(live.pid()).exists());
}

/// Kills and reaps a child at the end of a test.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// D7, fork: each pre-forked worker writes its own file under its own PID (the parent's file
/// is the parent's). A SIGKILLed worker's file goes at a live process's next write; the workers'
/// `_exit()` runs no destructor, so the parent, which reaped them, removes their files at its
/// exit. Fails without the sweep: a worker's file outlives it.
#[test]
fn forked_workers_write_their_own_files_and_none_outlives_the_run() {
    let dir = MetricsDir::new("prefork");
    let mut p = writing_into(&dir, "prefork_server").args(["--workers", "2", "0"]).spawn();
    let workers: BTreeSet<i32> = (0..2).map(|_| field(&p.expect("WORKER"), "pid").parse().unwrap()).collect();
    let port = p.port();
    let parent = p.pid();
    // Each worker leaks a connection (CLOSE_WAIT), so each has work for its own watchdog.
    let mut served = BTreeSet::new();
    for _ in 0..50 {
        drop(ping(port));
        served.insert(field(&p.expect("ACCEPT"), "pid").parse::<i32>().unwrap());
        if served == workers {
            break;
        }
    }
    assert_eq!(served, workers, "both workers accepted");
    let all: BTreeSet<i32> = workers.iter().copied().chain([parent]).collect();
    eventually("a file for the parent and each worker", Duration::from_secs(10), || prom_files(&dir.0) == all);
    for pid in &all {
        let m = read_metrics(&dir.file_of(*pid)).unwrap();
        assert_eq!(m["keepfix_up"].samples[0].0.get("pid"), Some(&pid.to_string()), "the file of {pid}");
        let text = std::fs::read_to_string(dir.file_of(*pid)).unwrap();
        assert!(text.starts_with(&format!("# keepfix pid={pid} start={} ", start_time(*pid as u32))), "{text}");
    }
    let killed = *workers.iter().next().unwrap();
    // SAFETY: signalling our child's child.
    unsafe { libc::kill(killed, libc::SIGKILL) };
    // Each of the two processes left sweeps every 5 s (src/watchdog/metrics.rs, SWEEP_EVERY_MS).
    eventually("the killed worker's file is removed", Duration::from_secs(15), || !dir.file_of(killed).exists());
    let (_, status) = p.stop();
    assert!(status.success(), "{status:?}");
    assert_eq!(prom_files(&dir.0), BTreeSet::new(), "files left after the run");
}
