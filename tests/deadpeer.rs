//! Dead peers, end to end: a server in one network namespace, its client in another, joined by a
//! veth pair; then the client's link is cut (`ip link set dev v1 down` in the client's namespace:
//! packets vanish, nobody sends a reset). keepfix's keepalive must find the vanished peer in about
//! idle + intvl × cnt, and TCP_USER_TIMEOUT must bound it when unacknowledged data is in flight
//! (keepalive is suspended then). Each test runs a control beside it, in the same namespaces, cut by
//! the same command at the same instant and watched for the same time: without keepfix (or
//! without the user timeout) the connection is still ESTABLISHED.
//!
//! Needs root and iproute2 (`ip`). The namespaces are named `kfxdp-PID-N-{s,c}`, always deleted
//! (a Drop guard, so also after a failed assertion), and those left by a crashed earlier run (whose
//! PID is gone) are deleted first. Without root or `ip` the tests fail, saying what is missing;
//! KFX_ALLOW_SKIP=1 lets them pass without, listed as SKIPPED after the summary (never under CI:
//! tests/common, `require`).
//!
//! Checked to fail without the feature: with the keepfix servers started without LD_PRELOAD (and
//! the keepalive_of assertions removed), both tests fail waiting for READ_ERR/WRITE_ERR.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PREFIX: &str = "kfxdp-";
const SERVER_ADDR: &str = "198.18.0.1"; // RFC 2544 benchmarking range, only inside our namespaces
const CLIENT_ADDR: &str = "198.18.0.2";

/// iproute2's `ip`, found by [`NetPair::new`].
static IP: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn ip_bin() -> &'static std::path::Path {
    IP.get().expect("NetPair::new looks for ip first")
}

/// Runs `ip ARGS`, failing the test with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new(ip_bin()).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces, server (`s`) and client (`c`), joined by veth v0 (198.18.0.1) – v1 (198.18.0.2).
/// Dropping it deletes both (and so the veth pair and every socket left in them).
struct NetPair {
    s: String,
    c: String,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl NetPair {
    /// Needs root and `ip`: without them the test fails, or returns None (and the test returns)
    /// when KFX_ALLOW_SKIP=1 lets it pass without (tests/common, `require`).
    fn new() -> Option<NetPair> {
        if !require_root("it makes network namespaces and veth pairs") {
            return None;
        }
        let _ = IP.set(require_tool("ip", "iproute2")?);
        remove_stale();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        let pair = NetPair { s: format!("{base}-s"), c: format!("{base}-c") };
        ip(&["netns", "add", &pair.s]);
        ip(&["netns", "add", &pair.c]);
        // Made inside the server's namespace, the peer end straight into the client's: the names
        // never exist in the root namespace, so parallel tests cannot collide.
        ip(&["-n", &pair.s, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", &pair.c]);
        ip(&["-n", &pair.s, "addr", "add", &format!("{SERVER_ADDR}/24"), "dev", "v0"]);
        ip(&["-n", &pair.c, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "v1"]);
        for (ns, dev) in [(&pair.s, "v0"), (&pair.c, "v1"), (&pair.s, "lo"), (&pair.c, "lo")] {
            ip(&["-n", ns, "link", "set", "dev", dev, "up"]);
        }
        Some(pair)
    }

    /// Cuts the link on the client's side: the server's packets are dropped silently.
    fn cut(&self) {
        ip(&["-n", &self.c, "link", "set", "dev", "v1", "down"]);
    }

    /// A program run inside the server's namespace. LD_PRELOAD reaches the program, not `ip`.
    fn server(&self, keepfix: bool, env: &[(&str, &str)], args: &[&str]) -> Proc {
        let mut a: Vec<String> = ["netns", "exec", &self.s, "env"].iter().map(|s| s.to_string()).collect();
        if keepfix {
            a.push(format!("LD_PRELOAD={}", lib().display()));
        }
        a.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        a.push(c_program("peer_writer").display().to_string());
        a.extend(args.iter().map(|s| s.to_string()));
        Run::path(ip_bin().to_path_buf()).plain().args(a).spawn()
    }

    /// A TCP connection made from inside the client's namespace (a thread that entered it with
    /// setns; the socket belongs to the namespace it was made in).
    fn connect(&self, port: u16) -> TcpStream {
        let path = format!("/run/netns/{}", self.c);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let s =
                TcpStream::connect_timeout(&format!("{SERVER_ADDR}:{port}").parse().unwrap(), Duration::from_secs(5))
                    .expect("connect across the veth pair");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .join()
        .expect("client thread")
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.s, &self.c] {
            let _ = Command::new(ip_bin()).args(["netns", "del", ns]).status();
        }
    }
}

/// Deletes namespaces left by an earlier run of this test that crashed (its PID is gone).
fn remove_stale() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Quiet: the other test of this binary may be deleting the same one.
            let _ = Command::new(ip_bin()).args(["netns", "del", &name]).stderr(std::process::Stdio::null()).status();
        }
    }
}

/// The TCP state of a socket (by inode) as the process's own network namespace sees it:
/// /proc/PID/net/tcp. None when it is not listed (CLOSE, or gone).
fn state_in_ns(pid: i32, inode: u64) -> Option<u8> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    t.lines().skip(1).find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.len() > 9 && w[9].parse::<u64>().ok()? == inode).then(|| u8::from_str_radix(w[3], 16).ok())?
    })
}

/// A served connection: the server's fd and socket inode, and the client's end.
struct Conn {
    fd: i32,
    inode: u64,
    client: TcpStream,
}

fn accept_one(net: &NetPair, p: &mut Proc, port: u16) -> Conn {
    let mut client = net.connect(port);
    client.write_all(b"ping\n").unwrap();
    let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
    let inode = socket_fds(p.pid()).into_iter().find(|&(f, _)| f == fd).map(|(_, i)| i).expect("accepted fd");
    assert_eq!(state_in_ns(p.pid(), inode), Some(ESTABLISHED));
    Conn { fd, inode, client }
}

fn read_pong(c: &mut TcpStream) {
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong\n");
}

/// Waits for the program's READ_ERR/WRITE_ERR on `fd`; returns (errno, time since `t0`).
fn wait_error(p: &mut Proc, fd: i32, t0: Instant, limit: Duration) -> (i32, Duration) {
    let deadline = t0 + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = p.expect_within("", left.max(Duration::from_millis(1)));
        if (l.starts_with("READ_ERR") || l.starts_with("WRITE_ERR")) && field(&l, "fd") == fd.to_string() {
            return (field(&l, "errno").parse().unwrap(), t0.elapsed());
        }
        assert!(Instant::now() < deadline, "no READ_ERR/WRITE_ERR on fd {fd} within {limit:?}");
    }
}

/// Error lines the program printed so far (it must print none in a control run).
fn error_lines(p: &mut Proc) -> Vec<String> {
    p.lines_for(Duration::from_millis(10)).into_iter().filter(|l| l.contains("_ERR")).collect()
}

const FAST_KA: [(&str, &str); 3] = [("KEEPFIX_IDLE", "1s"), ("KEEPFIX_INTVL", "1s"), ("KEEPFIX_CNT", "2")];

#[test]
fn keepalive_finds_a_vanished_peer_in_3s_and_without_keepfix_it_stays_established() {
    let Some(net) = NetPair::new() else { return };
    let mut fixed = net.server(true, &FAST_KA, &["--bind", SERVER_ADDR, "0"]);
    let mut plain = net.server(false, &[], &["--bind", SERVER_ADDR, "0"]);
    let (pf, pp) = (fixed.port(), plain.port());
    let mut cf = accept_one(&net, &mut fixed, pf);
    let mut cp = accept_one(&net, &mut plain, pp);
    read_pong(&mut cf.client);
    read_pong(&mut cp.client);
    assert_eq!(keepalive_of(fixed.pid(), cf.fd), ka(1, 1, 2), "keepfix configured the accepted socket");
    assert!(!keepalive_of(plain.pid(), cp.fd).on, "the control has no keepalive");
    // Idle for longer than KEEPFIX_IDLE: probes are already going out and being answered.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state_in_ns(fixed.pid(), cf.inode), Some(ESTABLISHED), "answered probes keep it alive");

    let t0 = Instant::now();
    net.cut();
    let (errno, took) = wait_error(&mut fixed, cf.fd, t0, Duration::from_secs(10));
    assert_eq!(errno, libc::ETIMEDOUT, "the program learns its peer is gone as a timeout");
    // idle 1 + intvl 1 × cnt 2 = 3 s at most after the last answered probe (measured: 2.6 s).
    assert!(took <= Duration::from_millis(4500), "keepalive took {took:?}, expected about 3 s");
    assert_ne!(state_in_ns(fixed.pid(), cf.inode), Some(ESTABLISHED));

    // The control, cut at the same instant: wait at least as long again, it must not notice.
    let watched = took.max(Duration::from_secs(3)) + Duration::from_secs(2);
    std::thread::sleep(watched.saturating_sub(t0.elapsed()));
    assert_eq!(
        state_in_ns(plain.pid(), cp.inode),
        Some(ESTABLISHED),
        "without keepfix the dead peer stays ESTABLISHED"
    );
    assert_eq!(error_lines(&mut plain), Vec::<String>::new());
    eprintln!("keepalive: ETIMEDOUT {took:?} after the cut; control still ESTABLISHED after {:?}", t0.elapsed());
}

/// A client that keeps reading (so the server's data is acknowledged until the cut).
fn drain(mut c: TcpStream, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut total = 0u64;
        let mut b = [0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            match c.read(&mut b) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        total
    })
}

#[test]
fn user_timeout_bounds_a_dead_peer_with_unacknowledged_data_and_keepalive_alone_does_not() {
    let Some(net) = NetPair::new() else { return };
    let args = ["--write", "--bind", SERVER_ADDR, "0"];
    let ut = |v| [FAST_KA[0], FAST_KA[1], FAST_KA[2], ("KEEPFIX_USER_TIMEOUT", v)];
    let mut ms3000 = net.server(true, &ut("3000ms"), &args);
    let mut auto = net.server(true, &ut("auto"), &args);
    let mut ka_only = net.server(true, &FAST_KA, &args);
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = vec![];
    let mut readers = vec![];
    for p in [&mut ms3000, &mut auto, &mut ka_only] {
        let port = p.port();
        let c = accept_one(&net, p, port);
        readers.push(drain(c.client.try_clone().unwrap(), stop.clone()));
        conns.push(c);
    }
    let ka_3s = Ka { user_timeout: 3000, ..ka(1, 1, 2) };
    assert_eq!(keepalive_of(ms3000.pid(), conns[0].fd), ka_3s);
    assert_eq!(keepalive_of(auto.pid(), conns[1].fd), ka_3s, "auto = idle + intvl x cnt = 3 s");
    assert_eq!(keepalive_of(ka_only.pid(), conns[2].fd), ka(1, 1, 2));
    // Data flows (20 ms chunks, acknowledged by the readers) for a while before the cut.
    std::thread::sleep(Duration::from_millis(1500));

    let t0 = Instant::now();
    net.cut();
    let (e1, t1) = wait_error(&mut ms3000, conns[0].fd, t0, Duration::from_secs(15));
    let (e2, t2) = wait_error(&mut auto, conns[1].fd, t0, Duration::from_secs(15));
    assert_eq!((e1, e2), (libc::ETIMEDOUT, libc::ETIMEDOUT));
    for (what, t) in [("3000ms", t1), ("auto", t2)] {
        // The timer counts from the first unacknowledged segment, which is at most 20 ms after the
        // cut; the kernel checks it at retransmission time (measured: about 3.2 s).
        assert!(t >= Duration::from_millis(2500), "{what}: failed after {t:?}, before the user timeout");
        assert!(t <= Duration::from_millis(6500), "{what}: took {t:?}, expected 3 to 5 s");
    }
    // Keepalive alone, same cut, same data: still ESTABLISHED well after the other two failed.
    let watched = t1.max(t2) + Duration::from_secs(3);
    std::thread::sleep(watched.saturating_sub(t0.elapsed()));
    assert_eq!(
        state_in_ns(ka_only.pid(), conns[2].inode),
        Some(ESTABLISHED),
        "keepalive is suspended while data is unacknowledged: without TCP_USER_TIMEOUT the dead peer is not found"
    );
    assert_eq!(error_lines(&mut ka_only), Vec::<String>::new());
    stop.store(true, Ordering::Relaxed);
    let got: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(got.iter().all(|&n| n > 10_000), "data flowed before the cut: {got:?}");
    eprintln!("user timeout: 3000ms {t1:?}, auto {t2:?}; keepalive only still ESTABLISHED after {:?}", t0.elapsed());
}
