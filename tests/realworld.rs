//! Real programs nobody here wrote (issue 7, item 9): nginx, redis-server and memcached from
//! Debian's packages, under keepfix on loopback, with close mode on (KEEPFIX_CLOSE_WAIT=close,
//! after 1 s, 100 ms scans) and fast keepalive (1 s / 1 s / 2). For each server:
//! - its sockets get keepalive, read from outside with pidfd_getfd: listeners, accepted
//!   connections (in nginx's worker process), and nginx's outbound connection to its upstream;
//!   redis sets its own TCP_KEEPIDLE (300 s) and keepfix puts its value back;
//! - it serves correctly under load: wrk against nginx, redis-benchmark against redis, a small
//!   checking client against memcached (every value read back is the one written);
//! - a leaked connection is caught. nginx with `proxy_ignore_client_abort on` holds a client's
//!   connection in CLOSE_WAIT while the upstream hangs: keepfix releases it. redis and memcached
//!   keep the connection of a client that vanished without a FIN or a reset (its socket dropped
//!   with TCP_REPAIR, as when a host dies): keepalive's probe draws a reset and the server closes
//!   its fd. Each leak has a control: the same server without keepfix still holds the connection.
//!
//! The servers come from Debian: `apt-get install nginx redis-server redis-tools memcached wrk` (.ci/run
//! does it). A test whose server is missing fails, saying what to install; so does the dead-peer
//! part without root (TCP_REPAIR needs CAP_NET_ADMIN). KFX_ALLOW_SKIP=1 lets them pass without,
//! listed as SKIPPED after the summary (never under CI: tests/common, `require`). Run alone:
//! `cargo test --test realworld`.
//!
//! Checked to fail without the feature: run with `.plain()` instead of keepfix (no LD_PRELOAD),
//! every keepalive assertion fails, nginx's CLOSE_WAIT is never released, and the vanished
//! clients are never dropped.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const FAST: [(&str, &str); 6] = [
    ("KEEPFIX_IDLE", "1"),
    ("KEEPFIX_INTVL", "1"),
    ("KEEPFIX_CNT", "2"),
    ("KEEPFIX_CLOSE_WAIT", "close"),
    ("KEEPFIX_CLOSE_WAIT_AFTER", "1s"),
    ("KEEPFIX_SCAN_INTERVAL", "100ms"),
];

/// The server or load generator `name` (Debian package `package`); None, and the test returns, when
/// it is missing and KFX_ALLOW_SKIP=1 lets the test pass without it (tests/common: `require`).
macro_rules! need {
    ($name:expr, $package:expr) => {
        match require_tool($name, $package) {
            Some(p) => p,
            None => return,
        }
    };
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

fn wait_listening(port: u16) {
    eventually(&format!("something listens on port {port}"), Duration::from_secs(15), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// Starts a server (with keepfix unless `plain`), with the FAST settings.
fn server(bin: &Path, args: &[&str], keepfix: bool) -> Proc {
    let mut r = Run::path(bin.to_path_buf()).args(args.iter().copied());
    if keepfix {
        for (k, v) in FAST {
            r = r.env(k, v);
        }
    } else {
        r = r.plain();
    }
    r.spawn()
}

/// The processes forked by `pid` (nginx's workers).
fn children(pid: i32) -> Vec<i32> {
    let mut v = vec![];
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        v.extend(c.split_whitespace().filter_map(|s| s.parse::<i32>().ok()));
    }
    v
}

/// The fd (and inode) of `pid`'s socket whose peer is `peer_port`, as /proc/net/tcp lists it.
fn fd_for_peer(pid: i32, peer_port: u16) -> Option<TcpFd> {
    tcp_fds(pid).into_iter().find(|t| t.remote_port == peer_port)
}

fn listener_of(pid: i32, port: u16) -> TcpFd {
    tcp_fds(pid).into_iter().find(|t| t.state == LISTEN && t.local_port == port).expect("listener")
}

/// Drops a client socket without a FIN or a reset, as a host that died would (TCP_REPAIR: root).
fn vanish(s: TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: a valid int option on our own socket.
    let r = unsafe { libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_REPAIR, (&raw const one).cast(), 4) };
    assert_eq!(r, 0, "TCP_REPAIR: {}", std::io::Error::last_os_error());
    drop(s);
}

/// A client vanishes from `fixed` (keepfix) and from `plain` (the control) at the same instant.
/// keepfix's keepalive must make the server close its fd; the control must still hold it.
/// `connect` makes a served connection to a port.
fn dead_peer_is_caught(fixed: &Proc, fport: u16, plain: &Proc, pport: u16, connect: impl Fn(u16) -> TcpStream) {
    if !require_root("the dead-peer part drops a client's socket with TCP_REPAIR") {
        return;
    }
    let (cf, cp) = (connect(fport), connect(pport));
    let sf = fd_for_peer(fixed.pid(), cf.local_addr().unwrap().port()).expect("fixed: server side of the client");
    let sp = fd_for_peer(plain.pid(), cp.local_addr().unwrap().port()).expect("plain: server side of the client");
    let t0 = Instant::now();
    vanish(cf);
    vanish(cp);
    let holds = |pid: i32, inode: u64| socket_fds(pid).iter().any(|&(_, i)| i == inode);
    eventually("the server under keepfix closed the vanished client's fd", Duration::from_secs(15), || {
        !holds(fixed.pid(), sf.inode)
    });
    let took = t0.elapsed();
    std::thread::sleep((took + Duration::from_secs(2)).saturating_sub(t0.elapsed()).max(Duration::from_secs(2)));
    assert!(holds(plain.pid(), sp.inode), "the control (no keepfix) still holds the vanished client");
    assert_eq!(proc_net_tcp().get(&sp.inode).map(|e| e.0), Some(ESTABLISHED));
    eprintln!(
        "dead peer: closed by the server {took:?} after it vanished; control still ESTABLISHED at {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// nginx

struct Nginx {
    p: Proc,
    port: u16,
    _dir: TempDir,
}

/// The master is the test's child; its workers would outlive a SIGKILL of it: kill them first.
impl Drop for Nginx {
    fn drop(&mut self) {
        for w in children(self.p.pid()) {
            // SAFETY: signalling a worker of our own nginx.
            unsafe { libc::kill(w, libc::SIGKILL) };
        }
    }
}

fn nginx(bin: &Path, keepfix: bool, upstream: u16) -> Nginx {
    let dir = TempDir::new(if keepfix { "nginx" } else { "nginx-plain" });
    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off; master_process on; worker_processes 1; user root root; pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
  uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 \"ok\\n\"; }}
    location /hang {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_ignore_client_abort on;
      proxy_read_timeout 1h;
    }}
  }}
}}
"
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let p = server(bin, &["-p", &d.to_string(), "-c", conf_path.to_str().unwrap(), "-e", "stderr"], keepfix);
    wait_listening(port);
    Nginx { p, port, _dir: dir }
}

fn http_get(port: u16, path: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    (s, String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The nginx worker's pid (the only child of the master).
fn worker_of(n: &Nginx) -> i32 {
    let mut w = vec![];
    eventually("nginx has its worker", Duration::from_secs(10), || {
        w = children(n.p.pid());
        w.len() == 1
    });
    w[0]
}

/// nginx's master forks its worker just as keepfix's thread opens its /proc files. fork copies
/// the fd table before the memory, so the worker could believe it owned an fd it did not have,
/// and closing it aborted the worker (rustix asserts close() succeeds in debug builds): 3 runs in
/// 4 before the fix in ownfd (sys::close_raw).
#[test]
fn nginx_workers_survive_a_fork_racing_keepfix() {
    let bin = need!("nginx", "nginx");
    for round in 0..4 {
        let n = nginx(&bin, true, free_port());
        let w = worker_of(&n);
        let got = std::panic::catch_unwind(|| http_get(n.port, "/").1).unwrap_or_else(|_| "no answer".into());
        assert!(got.starts_with("HTTP/1.1 200"), "round {round}: {got}\n{}", n.p.stderr());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(children(n.p.pid()), vec![w], "round {round}: the worker died:\n{}", n.p.stderr());
        assert!(!n.p.stderr().contains("exited on signal"), "round {round}:\n{}", n.p.stderr());
    }
}

#[test]
fn nginx_keepalive_load_and_a_close_wait_leak() {
    let bin = need!("nginx", "nginx");
    let wrk = need!("wrk", "wrk");
    // The upstream of /hang: accepts and never answers.
    let up = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let up_port = up.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for s in up.incoming().flatten() {
            h2.lock().unwrap().push(s);
        }
    });
    let n = nginx(&bin, true, up_port);
    let worker = worker_of(&n);

    // Keepalive: the master's listener, the worker's accepted connection.
    assert_eq!(keepalive_of(n.p.pid(), listener_of(n.p.pid(), n.port).fd), ka(1, 1, 2), "listener");
    let (c, resp) = http_get(n.port, "/");
    assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("ok\n"), "{resp}");
    let cport = c.local_addr().unwrap().port();
    let acc = fd_for_peer(worker, cport).unwrap_or_else(|| {
        panic!(
            "no socket of worker {worker} (children {:?}) has peer port {cport}: {:?}\nstderr:\n{}",
            children(n.p.pid()),
            tcp_fds(worker),
            n.p.stderr()
        )
    });
    assert_eq!(keepalive_of(worker, acc.fd), ka(1, 1, 2), "accepted connection in the worker");
    drop(c);

    // Load, close mode on: every request answered 200, no socket error.
    let out = Command::new(&wrk)
        .args(["-t2", "-c32", "-d3s", "--timeout", "5s", &format!("http://127.0.0.1:{}/", n.port)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk: {text}");
    let requests: u64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in").map(|(n, _)| n.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    assert!(requests > 1000, "only {requests} requests:\n{text}");
    assert!(!text.contains("Non-2xx") && !text.contains("Socket errors"), "errors under load:\n{text}");
    eprintln!("nginx under keepfix (close mode): {requests} requests in 3 s, all 200, no socket error");

    // The leak: a client asks for /hang, then leaves. nginx ignores the abort and holds its socket
    // in CLOSE_WAIT; the outbound connection to the upstream gets keepalive too.
    let plain = nginx(&bin, false, up_port);
    let pworker = worker_of(&plain);
    let mut leaks = vec![];
    for (ng, w) in [(&n, worker), (&plain, pworker)] {
        let mut s = TcpStream::connect(("127.0.0.1", ng.port)).unwrap();
        s.write_all(b"GET /hang HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let cport = s.local_addr().unwrap().port();
        eventually("nginx connected to the upstream", Duration::from_secs(10), || {
            tcp_fds(w).iter().any(|t| t.remote_port == up_port)
        });
        leaks.push((w, cport, fd_for_peer(w, cport).expect("server side").inode));
        drop(s);
    }
    let out = tcp_fds(worker).into_iter().find(|t| t.remote_port == up_port).unwrap();
    assert_eq!(keepalive_of(worker, out.fd), ka(1, 1, 2), "nginx's outbound connection to its upstream");
    let state = |inode: u64| proc_net_tcp().get(&inode).map(|e| e.0);
    eventually("the control holds the client in CLOSE_WAIT", Duration::from_secs(5), || {
        state(leaks[1].2) == Some(CLOSE_WAIT)
    });
    let line = n.p.wait_log(&["close_wait fd=", &format!("peer=127.0.0.1:{} ", leaks[0].1)], Duration::from_secs(10));
    // Shut down (our FIN to the client), the socket kept at its number until nginx closes it:
    // nginx never read that client's EOF, so its number is not keepfix's to free.
    assert!(line.contains("action=shutdown"), "{line}");
    assert_ne!(state(leaks[0].2), Some(CLOSE_WAIT), "the socket was released");
    assert!(tcp_fds(worker).iter().all(|t| t.state != CLOSE_WAIT), "nothing left in CLOSE_WAIT");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state(leaks[1].2), Some(CLOSE_WAIT), "without keepfix nginx still holds it");
    // nginx still serves.
    let (_c, resp) = http_get(n.port, "/");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    eprintln!("nginx: {line}");
}

// ---------------------------------------------------------------------------------------------
// redis

fn redis(bin: &Path, keepfix: bool) -> (Proc, u16, TempDir) {
    let dir = TempDir::new(if keepfix { "redis" } else { "redis-plain" });
    let port = free_port();
    let p = server(
        bin,
        &[
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--tcp-keepalive",
            "300",
            "--dir",
            dir.str(),
        ],
        keepfix,
    );
    wait_listening(port);
    (p, port, dir)
}

/// One RESP command, its reply's first line.
fn redis_cmd(s: &mut TcpStream, args: &[&str]) -> String {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        s.read_exact(&mut b).unwrap();
        reply.push(b[0]);
    }
    let head = String::from_utf8_lossy(&reply).trim_end().to_string();
    if let Some(len) = head.strip_prefix('$').and_then(|l| l.parse::<usize>().ok()) {
        let mut body = vec![0u8; len + 2];
        s.read_exact(&mut body).unwrap();
        return String::from_utf8_lossy(&body[..len]).into_owned();
    }
    head
}

fn redis_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(redis_cmd(&mut s, &["PING"]), "+PONG");
    s
}

#[test]
fn redis_keepalive_load_and_a_vanished_client() {
    let bin = need!("redis-server", "redis-server");
    let bench = need!("redis-benchmark", "redis-tools");
    let (p, port, _d) = redis(&bin, true);
    assert_eq!(keepalive_of(p.pid(), listener_of(p.pid(), port).fd), ka(1, 1, 2), "listener");
    let mut c = redis_client(port);
    let acc = fd_for_peer(p.pid(), c.local_addr().unwrap().port()).unwrap();
    // redis sets TCP_KEEPIDLE 300 itself (--tcp-keepalive 300); keepfix keeps its own.
    assert_eq!(keepalive_of(p.pid(), acc.fd), ka(1, 1, 2), "accepted connection");
    p.wait_log(&["app_override", "option=TCP_KEEPIDLE"], Duration::from_secs(5));

    let out = Command::new(&bench)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-n", "20000", "-c", "20", "-t", "set,get", "-q"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "redis-benchmark: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    for t in ["SET: ", "GET: "] {
        assert!(text.lines().any(|l| l.contains(t) && l.contains("requests per second")), "{text}");
    }
    // Correct answers after the load.
    for i in 0..200 {
        let (k, v) = (format!("kfx:{i}"), format!("value-{i}-{}", i * 7919));
        assert_eq!(redis_cmd(&mut c, &["SET", &k, &v]), "+OK");
        assert_eq!(redis_cmd(&mut c, &["GET", &k]), v);
    }
    eprintln!("redis under keepfix (close mode): {}", text.replace('\r', " ").trim());

    let (plain, pport, _pd) = redis(&bin, false);
    dead_peer_is_caught(&p, port, &plain, pport, redis_client);
}

// ---------------------------------------------------------------------------------------------
// memcached

fn memcached(bin: &Path, keepfix: bool) -> (Proc, u16) {
    let port = free_port();
    let p = server(bin, &["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-u", "root", "-t", "2"], keepfix);
    wait_listening(port);
    (p, port)
}

fn mc_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).trim_end().to_string()
}

fn mc_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"version\r\n").unwrap();
    assert!(mc_line(&mut s).starts_with("VERSION"));
    s
}

#[test]
fn memcached_keepalive_load_and_a_vanished_client() {
    let bin = need!("memcached", "memcached");
    let (p, port) = memcached(&bin, true);
    assert_eq!(keepalive_of(p.pid(), listener_of(p.pid(), port).fd), ka(1, 1, 2), "listener");
    let c = mc_client(port);
    let acc = fd_for_peer(p.pid(), c.local_addr().unwrap().port()).unwrap();
    assert_eq!(keepalive_of(p.pid(), acc.fd), ka(1, 1, 2), "accepted connection");
    drop(c);

    // Load: 8 clients, each writes and reads back its own keys; short-lived connections too.
    let t0 = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            std::thread::spawn(move || {
                let mut ops = 0u64;
                for round in 0..5 {
                    let mut s = mc_client(port);
                    for i in 0..200 {
                        let (k, v) = (format!("kfx{w}_{round}_{i}"), format!("v{}", w * 1_000_003 + i * 31 + round));
                        // One write per request (write! would make several: Nagle and delayed ACKs).
                        s.write_all(format!("set {k} 0 0 {}\r\n{v}\r\n", v.len()).as_bytes()).unwrap();
                        assert_eq!(mc_line(&mut s), "STORED");
                        s.write_all(format!("get {k}\r\n").as_bytes()).unwrap();
                        assert_eq!(mc_line(&mut s), format!("VALUE {k} 0 {}", v.len()));
                        assert_eq!(mc_line(&mut s), v);
                        assert_eq!(mc_line(&mut s), "END");
                        ops += 2;
                    }
                }
                ops
            })
        })
        .collect();
    let ops: u64 = workers.into_iter().map(|w| w.join().expect("a memcached client failed")).sum();
    eprintln!("memcached under keepfix (close mode): {ops} checked operations in {:?}", t0.elapsed());

    let (plain, pport) = memcached(&bin, false);
    dead_peer_is_caught(&p, port, &plain, pport, mc_client);
}
