//! Every line and metric is true (issue 13, D2 to D6): a limit "change" that changes nothing says
//! nothing, and `used=` is a count taken then (D2); `suppressed` comes at most once per 10 s
//! (D3); a breakdown at EMFILE is counted, never all zeros (D5); the fd gauge is never an old
//! count (D6). D4 (a summary that reports nothing) is a unit test of the detector's rule
//! (src/watchdog/detector.rs), as it needs a quiet minute.
mod common;
use common::*;
use std::time::{Duration, Instant};

fn fast(r: Run) -> Run {
    r.env("KEEPFIX_SCAN_INTERVAL", "100ms")
}

#[test]
fn rlimit_nofile_is_logged_only_when_it_changes_with_a_true_count() {
    let mut p = fast(Run::new("many_files")).args(["0"]).spawn();
    let _port = p.port();
    p.send("open 20");
    p.expect("OPENED");
    // The JVM's way: the limits set to what they are.
    p.send("rlimit");
    assert_eq!(field(&p.expect("RLIMIT"), "rc"), "0");
    std::thread::sleep(Duration::from_millis(600));
    assert!(p.log_lines("rlimit_nofile").is_empty(), "a change that changed nothing: {}", p.stderr());
    p.send("rlimit 900");
    assert_eq!(field(&p.expect("RLIMIT"), "rc"), "0");
    let line = p.wait_log(&["rlimit_nofile soft=900"], Duration::from_secs(5));
    let used: usize = field(&line, "used").parse().unwrap_or_else(|_| panic!("no counted used= in {line}"));
    assert_eq!(used, fd_count(p.pid()), "{line}");
    assert!(used > 20, "{line}");
}

#[test]
fn suppressed_is_written_at_most_once_per_ten_seconds() {
    // A steady leak far over the rate limit (60 lines, then 5 a second) for 12 s.
    let mut p = fast(Run::new("leak_eof_server")).env("KEEPFIX_CLOSE_WAIT_AFTER", "0s").args(["0"]).spawn();
    let port = p.port();
    let t0 = Instant::now();
    let mut conns = 0;
    while t0.elapsed() < Duration::from_secs(12) {
        for _ in 0..4 {
            drop(ping(port));
            conns += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let suppressed = p.log_lines("suppressed lines=");
    let lines = p.log_lines("close_wait fd=");
    assert!(conns > 400 && lines.len() < conns, "{} lines for {conns} leaks: nothing was suppressed", lines.len());
    assert!(!suppressed.is_empty(), "lines were held back and no suppressed line says so");
    assert!(suppressed.len() <= 2, "{} suppressed lines in 12 s: {suppressed:#?}", suppressed.len());
}

#[test]
fn an_emfile_breakdown_is_counted_and_never_zeros() {
    // The table is full, so keepfix gives its /proc fds back: the census probes the numbers
    // instead (before, it counted nothing and wrote used=0 tcp=0 ... for a full table).
    let mut p = Run::new("fdfill_poll").args(["--nofile", "128", "0"]).spawn();
    let port = p.port();
    p.expect("FILLED");
    // The numbers keepfix gave back when the table filled are the program's: it accepts on them
    // until the table is full again, and the next client meets EMFILE.
    let mut held = vec![];
    let l = loop {
        held.push(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        if let Some(l) = p.log_lines("emfile listener=").into_iter().next() {
            break l;
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(held.len() < 8, "no emfile line: {}", p.stderr());
    };
    assert!(l.contains("limit=128"), "{l}");
    let n = |k: &str| -> u64 { field(&l, k).parse().unwrap_or_else(|_| panic!("no {k}= in {l}")) };
    assert!(n("used") >= 127, "{l}");
    assert_eq!(n("tcp_listen"), 1, "{l}");
    assert!(n("other_fds") > 100, "{l}");
    assert_eq!(n("used"), n("tcp") + n("other_sockets") + n("other_fds") + n("keepfix"), "{l}");
}

#[test]
fn the_fd_gauge_is_counted_for_each_write() {
    let dir = TempDir::new("events-gauge");
    let mut p = fast(Run::new("many_files")).env("KEEPFIX_METRICS", dir.str()).args(["0"]).spawn();
    let _port = p.port();
    await_metrics(dir.path(), p.pid());
    // Far from the warning level: the fd monitor has no reason to count, the gauge must anyway.
    p.send("open 50");
    p.expect("OPENED");
    let want = fd_count(p.pid()) as f64;
    let mut got = 0.0;
    eventually("keepfix_fds_used to show the 50 new files", Duration::from_secs(5), || {
        got = metrics(dir.path(), p.pid()).map_or(0.0, |m| metric(&m, "keepfix_fds_used"));
        got == want
    });
}
