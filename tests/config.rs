//! Configuration and logging (issue 2): every bad value is one clear line naming the variable and
//! the value used instead, and the program runs on with the defaults; log destinations, the
//! journald priority prefix, and the line format.
mod common;
use common::*;
use std::time::Duration;

/// Runs echo_server with one variable set, serves a client, and returns the accepted socket's
/// keepalive options.
fn with(var: &str, value: &str) -> Ka {
    let mut p = Run::new("echo_server").env(var, value).args(["0"]).spawn();
    let port = p.port();
    let _c = ping(port);
    let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
    let got = keepalive_of(p.pid(), fd);
    // The program keeps running and serving.
    let _c2 = ping(port);
    let (_, status) = p.stop();
    assert!(status.success(), "{var}={value:?}: the program did not exit cleanly");
    got
}

fn stderr_of(var: &str, value: &str) -> String {
    let mut p = Run::new("echo_server").env(var, value).args(["0"]).spawn();
    let port = p.port();
    let _c = ping(port);
    // The line was written before READY, but stderr is read by another thread than stdout: wait
    // for it rather than race it.
    p.wait_log(&[&format!("config {var}")], Duration::from_secs(5));
    let err = p.stderr();
    drop(p);
    err
}

#[test]
fn each_bad_value_is_named_and_the_default_used() {
    let cases = [
        ("KEEPFIX_IDLE", "abc", "is not a duration", "using 60s"),
        ("KEEPFIX_IDLE", "0", "is out of range 1s..32767s", "using 60s"),
        ("KEEPFIX_IDLE", "40000", "is out of range 1s..32767s", "using 60s"),
        ("KEEPFIX_INTVL", "-5", "is not a duration", "using 10s"),
        ("KEEPFIX_INTVL", "99999s", "is out of range", "using 10s"),
        ("KEEPFIX_CNT", "0", "is out of range 1..127", "using 6"),
        ("KEEPFIX_CNT", "many", "is not a whole number", "using 6"),
        ("KEEPFIX_CNT", "128", "is out of range 1..127", "using 6"),
        ("KEEPFIX_USER_TIMEOUT", "soon", "is not a duration", "using off"),
        ("KEEPFIX_RESPECT_APP", "maybe", "is not 0 or 1", "using 0"),
        ("KEEPFIX_LOG", "relative.log", "is not stderr, syslog or an absolute file path", "using stderr"),
        ("KEEPFIX_DISABLE", "2", "is not 0 or 1", "using 0"),
        ("KEEPFIX_CLOSE_WAIT", "explode", "is not off, log, shutdown or close", "using log"),
        ("KEEPFIX_CLOSE_WAIT_AFTER", "-1", "is not a duration", "using 30s"),
        ("KEEPFIX_CLOSE_WAIT_UNREAD", "lose", "is not keep or drop", "using keep"),
        ("KEEPFIX_SCAN_INTERVAL", "0s", "is out of range 1ms..", "using 5s"),
        ("KEEPFIX_NOFILE_WARN", "150", "is out of range 1..100", "using 80"),
        ("KEEPFIX_NOFILE_RAISE", "yes please", "is not 0 or 1", "using 0"),
        ("KEEPFIX_METRICS", "metrics/dir", "is not an absolute directory path", "metrics off"),
    ];
    for (var, value, problem, outcome) in cases {
        let err = stderr_of(var, value);
        let line = err
            .lines()
            .find(|l| l.contains(&format!("config {var}=\"{value}\"")))
            .unwrap_or_else(|| panic!("no config line for {var}={value:?}; stderr:\n{err}"));
        assert!(line.starts_with("keepfix["), "{line}");
        assert!(line.contains(problem) && line.ends_with(outcome), "{var}={value:?}: {line}");
        assert_eq!(err.lines().filter(|l| l.contains("config ")).count(), 1, "{err}");
    }
}

#[test]
fn bad_timings_leave_the_defaults_on_the_socket() {
    for (var, value) in [("KEEPFIX_IDLE", "abc"), ("KEEPFIX_INTVL", "0"), ("KEEPFIX_CNT", "500")] {
        let got = with(var, value);
        assert_eq!(got, ka(60, 10, 6), "{var}={value:?}");
    }
}

#[test]
fn fractions_are_rounded_up_and_said() {
    let got = with("KEEPFIX_IDLE", "1500ms");
    assert_eq!(got.idle, 2);
    let err = stderr_of("KEEPFIX_INTVL", "2.5s");
    assert!(err.contains("config KEEPFIX_INTVL=\"2.5s\" is not a whole number of seconds"), "{err}");
    assert!(err.contains("rounded up to 3s"), "{err}");
}

#[test]
fn a_misspelt_variable_is_named() {
    let err = stderr_of("KEEPFIX_IDEL", "5");
    assert!(
        err.contains("config KEEPFIX_IDEL is not a keepfix variable; ignored (did you mean KEEPFIX_IDLE?)"),
        "{err}"
    );
}

#[test]
fn hostile_values_stay_on_one_line() {
    let err = stderr_of("KEEPFIX_CNT", "1\nkeepfix[1]: forged line\u{1b}[31m");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("KEEPFIX_CNT")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("\nkeepfix[1]: forged"), "{err}");
    assert!(!err.contains('\u{1b}'), "{err}");
}

#[test]
fn log_to_a_file_with_timestamps() {
    let dir = tempdir();
    let path = dir.join("kf.log");
    let mut p =
        Run::new("echo_server").env("KEEPFIX_LOG", path.to_str().unwrap()).env("KEEPFIX_CNT", "x").args(["0"]).spawn();
    let port = p.port();
    let _c = ping(port);
    eventually("the start line in the log file", Duration::from_secs(5), || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains(" start "))
    });
    let text = std::fs::read_to_string(&path).unwrap();
    let pid = p.pid();
    for l in text.lines() {
        // 2026-11-25T04:06:00.123Z keepfix[PID]: event …
        let (ts, rest) = l.split_once(' ').unwrap();
        assert_eq!(ts.len(), 24, "{l}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{l}");
        assert!(rest.starts_with(&format!("keepfix[{pid}]: ")), "{l}");
    }
    assert!(text.contains("config KEEPFIX_CNT=\"x\" is not a whole number; using 6"), "{text}");
    assert!(!p.stderr().contains("keepfix["), "stderr got lines meant for the file: {}", p.stderr());
}

#[test]
fn journald_gets_priority_prefixes() {
    // Make stderr a pipe whose device and inode JOURNAL_STREAM names, as systemd does.
    let (r, w) = pipe();
    let st = fstat(&w);
    let child = std::process::Command::new(c_program("echo_server"))
        .arg("0")
        .env("LD_PRELOAD", lib())
        .env("KEEPFIX_IDLE", "bad")
        .env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino))
        .stdout(std::process::Stdio::null())
        .stderr(w)
        .spawn()
        .unwrap();
    let mut child = scopeguard(child);
    let text = read_until(r, "is not a duration", Duration::from_secs(5));
    let line = text.lines().find(|l| l.contains("KEEPFIX_IDLE")).unwrap();
    assert!(line.starts_with(&format!("<3>keepfix[{}]: config KEEPFIX_IDLE=", child.0.id())), "{line}");
    let _ = child.0.kill();
}

#[test]
fn without_journal_stream_no_prefix() {
    let err = stderr_of("KEEPFIX_IDLE", "bad");
    let line = err.lines().find(|l| l.contains("KEEPFIX_IDLE")).unwrap();
    assert!(line.starts_with("keepfix["), "{line}");
}

// --- small helpers ------------------------------------------------------------------------------

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("keepfix-test-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: a two-int array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds we own.
    unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) }
}

fn fstat(fd: &std::os::fd::OwnedFd) -> libc::stat {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    st
}

fn read_until(r: std::os::fd::OwnedFd, needle: &str, d: Duration) -> String {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut buf = [0u8; 4096];
        let mut text = String::new();
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = tx.send(text.clone());
        }
    });
    let deadline = std::time::Instant::now() + d;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        if let Ok(t) = rx.recv_timeout(Duration::from_millis(50)) {
            last = t;
            if last.contains(needle) {
                return last;
            }
        }
    }
    panic!("{needle:?} not seen; got {last:?}");
}

struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn scopeguard(c: std::process::Child) -> Guard {
    Guard(c)
}
