//! Forked children (issue 13, D1): a child that serves one connection and exits costs nothing
//! (no thread, no line, no fd of keepfix's opened); the tree logs one `start` line; keepalive is
//! on every child's socket; and a long-lived child still gets CLOSE_WAIT detection, under its
//! own pid.
mod common;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

/// One request on a fresh connection: a line, its answer, then close.
fn request(port: u16) {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"hi\n").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong\n");
}

fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

#[test]
fn short_lived_children_get_no_thread_and_log_nothing() {
    // A scan tick of 1 s: every child here lives a few milliseconds.
    let mut p = Run::new("fork_server").env("KEEPFIX_SCAN_INTERVAL", "1s").args(["0"]).spawn();
    let port = p.port();
    for _ in 0..40 {
        request(port);
    }
    let children: Vec<String> = (0..40).map(|_| p.expect("CHILD")).collect();
    for c in &children {
        assert_eq!(field(c, "threads"), "1", "a short-lived child has keepfix's thread: {c}\n{}", p.stderr());
    }
    // The parent opened its fds when its watchdog started; a child opened none of keepfix's.
    let (_, st) = p.finish();
    assert!(st.success());
}

#[test]
fn one_start_line_for_the_tree_and_children_lines_carry_their_pid() {
    let mut p = Run::new("fork_server").env("KEEPFIX_SCAN_INTERVAL", "1s").args(["0"]).spawn();
    let port = p.port();
    for _ in 0..20 {
        request(port);
    }
    for _ in 0..20 {
        p.expect("CHILD");
    }
    std::thread::sleep(Duration::from_millis(300));
    let err = p.stderr();
    let starts: Vec<&str> = err.lines().filter(|l| l.contains("]: start ")).collect();
    assert_eq!(starts.len(), 1, "{err}");
    let me = format!("keepfix[{}]", p.pid());
    // The short-lived children said nothing: every line is the parent's.
    for l in err.lines().filter(|l| l.starts_with("keepfix[")) {
        assert!(l.starts_with(&me), "a short-lived child logged: {l}\n{err}");
    }
}

#[test]
fn keepalive_is_on_a_childs_connection() {
    let mut p = Run::new("fork_server").args(["--linger", "3000", "0"]).spawn();
    let port = p.port();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"hi\n").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    let mut kids = Vec::new();
    eventually("a child", Duration::from_secs(5), || {
        kids = children_of(p.pid());
        !kids.is_empty()
    });
    let kid = kids[0];
    // The child's connection: the one TCP socket it holds (it closed the listener).
    let fds = tcp_fds(kid);
    assert_eq!(fds.len(), 1, "{fds:?}");
    let k = keepalive_of(kid, fds[0].fd);
    assert!(k.on, "no keepalive on the child's connection: {k:?}");
    assert_eq!((k.idle, k.intvl, k.cnt), (60, 10, 6), "{k:?}");
    drop(c);
}

#[test]
fn a_long_lived_child_gets_its_own_watchdog_and_its_leak_is_found() {
    // The child keeps the connection it has seen the end of for 3 s, and connects out every
    // 200 ms: at its first connect() after one scan tick its own watchdog starts and reports the
    // socket, under the child's pid.
    let mut p = Run::new("fork_server")
        .env("KEEPFIX_SCAN_INTERVAL", "100ms")
        .env("KEEPFIX_CLOSE_WAIT_AFTER", "0s")
        .args(["--linger", "3000", "0"])
        .spawn();
    let port = p.port();
    request(port);
    let line = p.wait_log(&["close_wait fd=", "action=logged"], Duration::from_secs(5));
    let pid: i32 = line.trim_start_matches("keepfix[").split(']').next().unwrap().parse().unwrap();
    assert_ne!(pid, p.pid(), "the parent reported the child's socket: {line}");
    let child = p.expect_within("CHILD", Duration::from_secs(6));
    assert_eq!(field(&child, "pid"), pid.to_string(), "{child}");
    assert_eq!(field(&child, "threads"), "2", "the long-lived child has no watchdog: {child}");
    assert_eq!(p.stderr().matches("]: start ").count(), 1, "{}", p.stderr());
}
