//! Old kernels (issue 15): RHEL 7 runs Linux 3.10, RHEL 8 runs 4.18. c-tests/oldkernel.c emulates
//! them with a seccomp filter (every later system call fails with ENOSYS, newer madvise advice,
//! socket options and prctl options fail as those kernels fail them). These tests prove that the
//! emulation is real (kernel_probe, against the real kernel as control), that keepfix logs under it
//! and names what it goes without, that its fallbacks keep its promises (a full stderr pipe never
//! blocks the program, a close_range that fails forgets no socket, errno parity), and that the
//! `keepfix` command works there. The core suites run under the same filter with
//! `KEEPFIX_TEST_KERNEL=3.10` (or 4.18) `cargo test --test keepalive ...` (see .ci/run).
//!
//! Removing each feature fails a test: log.rs falling back only on EOPNOTSUPP/EINVAL logs nothing
//! under 3.10 (logs_and_names_what_it_goes_without); a plain write() fallback without poll blocks
//! the program's constructor on a full pipe under 4.18 (a_full_stderr_pipe_never_blocks); claiming
//! the range before a close_range that fails loses the socket (a_failed_close_range_forgets_nothing);
//! closefrom restoring errno over close_range's differs from glibc (errno_parity); std's RandomState
//! in closewait.rs keeps /dev/urandom open on fd 4 of the program's under 3.10
//! (logs_and_names_what_it_goes_without).
mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// This file picks its kernels itself.
fn no_outer_kernel() {
    assert!(
        test_kernel().is_none(),
        "run tests/oldkernel.rs without KEEPFIX_TEST_KERNEL: it emulates each kernel itself"
    );
}

/// `name` from c-tests, under the filter for `kernel` ("3.10", "4.18"), or the real kernel ("").
fn under(kernel: &str, name: &str) -> Run {
    if kernel.is_empty() {
        return Run::new(name);
    }
    Run::path(oldkernel()).args([kernel.to_string(), c_program(name).to_string_lossy().into_owned()])
}

fn probe(kernel: &str) -> BTreeMap<String, String> {
    let mut c = if kernel.is_empty() {
        std::process::Command::new(c_program("kernel_probe"))
    } else {
        let mut c = std::process::Command::new(oldkernel());
        c.arg(kernel).arg(c_program("kernel_probe"));
        c
    };
    let out = c.env_remove("LD_PRELOAD").output().unwrap();
    assert!(out.status.success(), "kernel_probe under {kernel:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("DONE\n"), "{text}");
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn the_filter_answers_as_each_kernel_would() {
    no_outer_kernel();
    let real = probe("");
    // The control: the machine's kernel has what the filter takes away (CI runs a current one).
    for name in
        ["close_range", "pwritev2", "statx", "pidfd_open", "clone3", "madv_wipeonfork", "so_meminfo", "getrandom"]
    {
        assert_eq!(real[name], "ok", "the real kernel lacks {name}: {real:?}");
    }
    let expect = |kernel: &str, answers: &[(&str, &[&str])]| {
        let got = probe(kernel);
        let mut want: BTreeMap<String, String> = got.keys().map(|k| (k.clone(), "ok".to_string())).collect();
        for (errno, names) in answers {
            for n in *names {
                assert!(want.insert(n.to_string(), errno.to_string()).is_some(), "no probe {n}");
            }
        }
        assert_eq!(got, want, "under oldkernel {kernel}");
    };
    expect(
        "3.10",
        &[
            (
                "ENOSYS",
                &[
                    "close_range",
                    "pwritev2",
                    "statx",
                    "pidfd_open",
                    "clone3",
                    "rseq",
                    "membarrier",
                    "getrandom",
                    "getrandom_insecure",
                    "memfd_create",
                    "epoll_pwait2",
                    "io_uring_setup",
                    "openat2",
                    "seccomp",
                    "pwritev2_nowait_pipe",
                    "futex_lock_pi2",
                ],
            ),
            ("EINVAL", &["madv_free", "madv_wipeonfork", "madv_cold", "pr_cap_ambient", "pr_get_auxv"]),
            ("ENOPROTOOPT", &["so_meminfo", "tcp_notsent_lowat", "tcp_inq"]),
        ],
    );
    expect(
        "4.18",
        &[
            (
                "ENOSYS",
                &["close_range", "pidfd_open", "clone3", "epoll_pwait2", "io_uring_setup", "openat2", "futex_lock_pi2"],
            ),
            ("EINVAL", &["getrandom_insecure", "madv_cold", "pr_get_auxv"]),
            ("EOPNOTSUPP", &["pwritev2_nowait_pipe"]),
        ],
    );
}

#[test]
fn logs_and_names_what_it_goes_without() {
    no_outer_kernel();
    let degraded = |kernel: &str| -> (Vec<String>, String) {
        let dir = TempDir::new("oldkernel-degraded");
        let mut p = under(kernel, "echo_server")
            .env("KEEPFIX_IDLE", "bad")
            .env("KEEPFIX_METRICS", dir.str())
            .env("KEEPFIX_SCAN_INTERVAL", "100ms")
            .args(["0"])
            .spawn();
        let port = p.port();
        let _c = ping(port);
        let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
        // Keepalive is on, with the defaults the bad value left.
        assert_eq!(keepalive_of(p.pid(), fd), ka(60, 10, 6), "under {kernel:?}");
        p.wait_log(&["config KEEPFIX_IDLE=\"bad\" is not a duration"], Duration::from_secs(5));
        p.wait_log(&[" start idle=60s"], Duration::from_secs(5));
        // keepfix's thread writes the degraded lines right after the start line, and its first
        // metrics file after them: once that is there, every degraded line has been written.
        await_metrics(dir.path(), p.pid());
        // keepfix holds no file of its own on a number of the program's: std's HashMap keys came
        // from getrandom, and without it from a /dev/urandom that std kept open (it was fd 4).
        let urandom: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .filter(|l| l.contains("random"))
            .collect();
        assert_eq!(urandom, Vec::<String>::new(), "under {kernel:?}");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(p.pid(), libc::SIGTERM) };
        p.expect("STATS");
        std::thread::sleep(Duration::from_millis(200));
        let err = p.stderr();
        drop(p);
        let lines = err.lines().filter(|l| l.contains(": degraded ")).map(String::from).collect();
        (lines, err)
    };
    let (real, err) = degraded("");
    assert_eq!(real, Vec::<String>::new(), "the real kernel has everything: {err}");
    let (old, err) = degraded("3.10");
    let features: Vec<String> = old.iter().map(|l| format!("{} {}", field(l, "feature"), field(l, "reason"))).collect();
    assert_eq!(features, ["pwritev2 ENOSYS", "MADV_WIPEONFORK EINVAL"], "{err}");
    // 4.18 has both; its lack of close_range costs closefrom a walk of /proc/self/fd, no line.
    let (rhel8, err) = degraded("4.18");
    assert_eq!(rhel8, Vec::<String>::new(), "{err}");
}

#[test]
fn a_full_stderr_pipe_never_blocks_the_program() {
    no_outer_kernel();
    for kernel in ["3.10", "4.18", ""] {
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe; both ends are ours.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: just made.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Fill it through a non-blocking description of our own: the program's fd 2 stays blocking.
        let mut filler = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
            .unwrap();
        let block = [b'x'; 4096];
        while filler.write(&block).is_ok() {}
        let mut c = if kernel.is_empty() {
            std::process::Command::new(c_program("echo_server"))
        } else {
            let mut c = std::process::Command::new(oldkernel());
            c.arg(kernel).arg(c_program("echo_server"));
            c
        };
        // A bad value: the constructor writes a line at load, in the program's own thread.
        c.arg("0").env("LD_PRELOAD", lib()).env("KEEPFIX_IDLE", "bad").env("KEEPFIX_SCAN_INTERVAL", "100ms");
        let mut child =
            c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(w).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(10));
        let served = ready.as_ref().ok().map(|l| {
            let port: u16 = field(l, "port").parse().unwrap();
            let _c = ping(port);
            rx.recv_timeout(Duration::from_secs(10)).is_ok_and(|l| l.starts_with("ACCEPT"))
        });
        let _ = child.kill();
        let _ = child.wait();
        drop(r);
        assert!(ready.is_ok(), "under {kernel:?}: the program never got past keepfix's first line into a full pipe");
        assert_eq!(served, Some(true), "under {kernel:?}: the program stopped serving");
    }
}

#[test]
fn a_failed_close_range_forgets_nothing() {
    no_outer_kernel();
    for kernel in ["3.10", "4.18"] {
        let mut p = under(kernel, "fd_moves")
            .env("KEEPFIX_CLOSE_WAIT_AFTER", "0s")
            .env("KEEPFIX_SCAN_INTERVAL", "100ms")
            .args(["0"])
            .spawn();
        let port = p.port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        p.send("hold");
        let fd = field(&p.expect("ACCEPT"), "fd");
        // Past a scan tick, so that the socket is in keepfix's epoll set.
        std::thread::sleep(Duration::from_millis(300));
        p.send("closeall");
        let l = p.expect("CLOSED");
        assert_eq!((field(&l, "ret").as_str(), field(&l, "errno").as_str()), ("-1", "38"), "under {kernel}: {l}");
        // The connection is still the program's: keepfix still knows it, and reports it left in
        // CLOSE_WAIT once the peer is gone.
        drop(c);
        p.wait_log(&["close_wait fd=", &format!("fd={fd} "), "state=CLOSE_WAIT"], Duration::from_secs(5));
    }
}

#[test]
fn errno_parity_under_old_kernels() {
    no_outer_kernel();
    for kernel in ["3.10", "4.18"] {
        for name in ["errno_check", "errno_check64"] {
            let run = |preload: bool| {
                let mut c = std::process::Command::new(oldkernel());
                c.arg(kernel).arg(c_program(name)).env_remove("LD_PRELOAD").stderr(std::process::Stdio::null());
                if preload {
                    c.env("LD_PRELOAD", lib());
                }
                let out = c.output().unwrap();
                assert!(out.status.success(), "{name} under {kernel}");
                let text = String::from_utf8(out.stdout).unwrap();
                assert!(text.ends_with("DONE\n"), "{text}");
                text
            };
            let plain = run(false);
            assert!(plain.contains("CASE close_range_inverted ret=-1 errno=38"), "not the emulated kernel: {plain}");
            let with = run(true);
            let diff: Vec<(&str, &str)> = plain.lines().zip(with.lines()).filter(|(a, b)| a != b).collect();
            assert_eq!(diff, Vec::<(&str, &str)>::new(), "{name} under {kernel}");
            assert_eq!(plain.lines().count(), with.lines().count());
        }
    }
}

#[test]
fn the_keepfix_command_works_there() {
    no_outer_kernel();
    lib(); // keepfix finds libkeepfix.so next to itself: build it first
    let mut server = under("3.10", "echo_server").args(["0"]).spawn();
    let port = server.port();
    let _c = ping(port);
    server.expect("ACCEPT");
    for kernel in ["3.10", "4.18"] {
        let keepfix = |args: &[&str]| {
            let out = std::process::Command::new(oldkernel())
                .arg(kernel)
                .arg(keepfix_bin())
                .args(args)
                .env_remove("LD_PRELOAD")
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (code, out, err) = keepfix(&["check"]);
        assert_eq!(code, Some(0), "check under {kernel}: {out}{err}");
        let (code, out, err) = keepfix(&["status", "--json", &server.pid().to_string()]);
        assert_eq!(code, Some(0), "status under {kernel}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let text = v.to_string();
        assert!(text.contains("\"keepfix_loaded\":true"), "{text}");
        assert!(!err.contains("NETLINK_SOCK_DIAG failed"), "{err}");
        // run execs the program with the library: it serves with keepalive on.
        let mut p = Run::path(oldkernel())
            .plain()
            .args([kernel.to_string(), keepfix_bin().to_string_lossy().into_owned(), "run".into(), "--".into()])
            .args([c_program("echo_server").to_string_lossy().into_owned(), "0".into()])
            .spawn();
        let port = p.port();
        let _c = ping(port);
        let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
        assert_eq!(keepalive_of(p.pid(), fd), ka(60, 10, 6), "keepfix run under {kernel}");
    }
}
