//! aarch64 (issue 15): the aarch64 libkeepfix.so, preloaded into aarch64 builds of the sample C
//! servers, run under qemu-user (`qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_PRELOAD=..`).
//!
//! qemu-user runs the program in one host process that maps the guest's fds 1:1 onto its own and
//! makes the guest's socket calls as host syscalls, so everything is checked from outside as
//! natively: pidfd_getfd on the qemu process for the keepalive options, /proc/net/tcp and
//! /proc/PID/fd for CLOSE_WAIT. Each check has its control: the same program without the library.
//!
//! Tools: qemu-user-static (or qemu-user), gcc-aarch64-linux-gnu, libc6-dev-arm64-cross (the
//! sysroot) and the rustup target aarch64-unknown-linux-gnu (.ci/run installs them). The library
//! is built with `cargo build --lib --target aarch64-unknown-linux-gnu`, linked by
//! aarch64-linux-gnu-gcc. When something is missing the suite says so on stderr; under CI=true
//! it fails.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
const CC: &str = "aarch64-linux-gnu-gcc";

struct Arm {
    qemu: PathBuf,
    lib: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// What this machine lacks to run the suite, one entry per tool.
fn missing_tools() -> Vec<String> {
    let mut missing = vec![];
    if on_path("qemu-aarch64-static").or_else(|| on_path("qemu-aarch64")).is_none() {
        missing.push("qemu-aarch64-static (apt-get install qemu-user-static)".to_string());
    }
    if on_path(CC).is_none() {
        missing.push(format!("{CC} (apt-get install gcc-aarch64-linux-gnu)"));
    }
    for f in ["lib/ld-linux-aarch64.so.1", "include/stdio.h"] {
        if !Path::new(SYSROOT).join(f).exists() {
            missing.push(format!("{SYSROOT}/{f} (apt-get install libc6-dev-arm64-cross)"));
        }
    }
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().ok();
    let has_target = sysroot.is_some_and(|o| {
        let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
        Path::new(&dir).join("lib/rustlib").join(TRIPLE).join("lib").is_dir()
    });
    if !has_target {
        missing.push(format!("the Rust target {TRIPLE} (rustup target add {TRIPLE})"));
    }
    missing
}

static ARM: OnceLock<Option<Arm>> = OnceLock::new();

/// The tools and the aarch64 library, or None when this machine cannot run aarch64 programs and
/// skipping is allowed (tests/common's `require`: a missing tool fails the test, always under CI,
/// and elsewhere unless KFX_ALLOW_SKIP=1, which lists it as SKIPPED after the summary).
fn arm() -> Option<&'static Arm> {
    ARM.get_or_init(|| {
        let missing = missing_tools();
        if !require(
            missing.is_empty(),
            &missing.join(", "),
            "apt-get install the packages named (.ci/run installs them)",
        ) {
            return None;
        }
        let qemu = on_path("qemu-aarch64-static").or_else(|| on_path("qemu-aarch64")).unwrap();
        Some(Arm { qemu, lib: build_lib() })
    })
    .as_ref()
}

/// libkeepfix.so for aarch64, of the same profile as this test, linked by the cross gcc.
fn build_lib() -> PathBuf {
    let dir = target_dir();
    let profile = dir.file_name().unwrap().to_string_lossy().to_string();
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(["build", "--lib", "--quiet", "--target", TRIPLE])
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", CC)
        .current_dir(root());
    if profile == "release" {
        c.arg("--release");
    }
    let st = c.status().expect("cargo build --lib --target aarch64-unknown-linux-gnu");
    assert!(st.success(), "cargo build --lib --target {TRIPLE} failed");
    let lib = dir.parent().unwrap().join(TRIPLE).join(&profile).join("libkeepfix.so");
    assert!(lib.exists(), "{} is missing after the build", lib.display());
    lib
}

static BUILD: Mutex<()> = Mutex::new(());

/// Cross-compiles c-tests/NAME.c for aarch64 (when it or a header changed), as common::c_program
/// does natively.
fn arm_program(name: &str) -> PathBuf {
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = root().join("c-tests");
    let out_dir = target_dir().join("c-tests-aarch64");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    let newest_src = ["common.h", &format!("{name}.c"), "errno_check.c"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok()?.modified().ok())
        .max();
    let fresh = std::fs::metadata(&out).ok().and_then(|m| m.modified().ok());
    if fresh.is_none() || newest_src.is_some_and(|s| Some(s) > fresh) {
        let tmp = out_dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let st = Command::new(CC)
            .args(["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-pthread", "-o"])
            .arg(&tmp)
            .arg(dir.join(format!("{name}.c")))
            .status()
            .expect(CC);
        assert!(st.success(), "{CC} failed for {name}");
        std::fs::rename(&tmp, &out).unwrap();
    }
    let head = std::fs::read(&out).unwrap();
    // ELF e_machine 183: EM_AARCH64.
    assert_eq!(u16::from_le_bytes([head[18], head[19]]), 183, "{} is not an aarch64 program", out.display());
    out
}

/// The qemu-user command line for an aarch64 sample program, with or without the library.
/// qemu hands the guest its own environment, so Run::env reaches the program; LD_PRELOAD goes
/// with -E, to the guest alone.
fn qemu_args(a: &Arm, name: &str, preload: bool) -> Vec<String> {
    let mut v = vec!["-L".to_string(), SYSROOT.to_string()];
    if preload {
        v.extend(["-E".to_string(), format!("LD_PRELOAD={}", a.lib.display())]);
    }
    v.push(arm_program(name).display().to_string());
    v
}

/// Runs an aarch64 sample program under qemu (spawned by common::Run, which strips the host's
/// LD_PRELOAD and KEEPFIX_* variables).
fn qemu_run(a: &Arm, name: &str, preload: bool) -> Run {
    Run::path(a.qemu.clone()).plain().args(qemu_args(a, name, preload))
}

#[test]
fn the_aarch64_library_exports_what_the_x86_64_one_does() {
    let Some(a) = arm() else { return };
    let exports = |lib: &Path| {
        let out = Command::new("nm").args(["-D", "--defined-only"]).arg(lib).output().unwrap();
        assert!(out.status.success(), "nm {}", lib.display());
        let mut v: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(String::from))
            .collect();
        v.sort();
        v
    };
    // tests/edges.rs checks the native list; vfork is the one hook written in assembly for each
    // architecture.
    let arm_exports = exports(&a.lib);
    assert!(arm_exports.iter().any(|s| s == "vfork"), "{arm_exports:?}");
    assert_eq!(arm_exports, exports(&lib()));
}

#[test]
fn keepalive_on_listener_accepted_and_outbound_sockets() {
    let Some(a) = arm() else { return };
    // Listener and accepted socket, with the configured options.
    for preload in [true, false] {
        let mut p = qemu_run(a, "echo_server", preload)
            .env("KEEPFIX_IDLE", "7")
            .env("KEEPFIX_INTVL", "3")
            .env("KEEPFIX_CNT", "4")
            .args(["0"])
            .spawn();
        let port = p.port();
        let _c = ping(port);
        let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
        let listener = tcp_fds(p.pid()).into_iter().find(|t| t.state == LISTEN).expect("the listener");
        // The control: the same program under qemu without the library has the kernel's defaults.
        let want = if preload { ka(7, 3, 4) } else { kernel_default_ka() };
        assert_eq!(keepalive_of(p.pid(), fd), want, "accepted socket, preload={preload}");
        assert_eq!(keepalive_of(p.pid(), listener.fd), want, "listener, preload={preload}");
    }
    // Outbound, blocking and non-blocking connect.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port().to_string();
    for (flags, preload) in [(&[][..], true), (&["--nonblock"][..], true), (&[][..], false)] {
        let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        args.extend(["127.0.0.1".to_string(), port.clone(), "2".into()]);
        let mut p = qemu_run(a, "out_client", preload).env("KEEPFIX_IDLE", "13").args(args).spawn();
        let conns = [p.expect("CONNECTED"), p.expect("CONNECTED")];
        p.expect("READY");
        let want = if preload { ka(13, 10, 6) } else { kernel_default_ka() };
        for l in conns {
            let fd: i32 = field(&l, "fd").parse().unwrap();
            assert_eq!(keepalive_of(p.pid(), fd), want, "out_client {flags:?} preload={preload}");
        }
    }
}

fn in_close_wait(pid: i32) -> usize {
    tcp_fds(pid).iter().filter(|t| t.state == CLOSE_WAIT).count()
}

#[test]
fn close_mode_releases_the_sockets_a_leaky_server_forgot() {
    let Some(a) = arm() else { return };
    let leak = |p: &mut Proc| {
        let port = p.port();
        for _ in 0..3 {
            drop(ping(port));
        }
        eventually("3 connections at EOF", Duration::from_secs(10), || {
            p.lines_for(Duration::ZERO).iter().filter(|l| l.starts_with("EOF")).count() == 3
        });
        port
    };
    // The control: without the library the 3 sockets stay in CLOSE_WAIT.
    let mut plain = qemu_run(a, "leak_eof_server", false).args(["0"]).spawn();
    leak(&mut plain);
    eventually("3 sockets in CLOSE_WAIT", Duration::from_secs(5), || in_close_wait(plain.pid()) == 3);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(in_close_wait(plain.pid()), 3);
    drop(plain);

    let mut p = qemu_run(a, "leak_eof_server", true)
        .env("KEEPFIX_CLOSE_WAIT", "close")
        .env("KEEPFIX_CLOSE_WAIT_AFTER", "0s")
        .env("KEEPFIX_SCAN_INTERVAL", "100ms")
        .args(["0"])
        .spawn();
    let port = leak(&mut p);
    eventually("no CLOSE_WAIT left", Duration::from_secs(10), || in_close_wait(p.pid()) == 0);
    // keepfix says what it did (its log falls back to write(): qemu-user has no pwritev2). The
    // peer is "-": qemu-user does not pass getsockopt(SO_PEERNAME) on.
    eventually("3 close_wait lines", Duration::from_secs(10), || p.log_lines("close_wait fd=").len() >= 3);
    for l in p.log_lines("close_wait fd=") {
        assert!(l.contains("action=shutdown") && l.contains(&format!("local=127.0.0.1:{port}")), "{l}");
    }
    // The server goes on serving.
    drop(ping(port));
}

fn run_checker(a: &Arm, name: &str, preload: bool, respect_app: bool) -> String {
    let mut c = Command::new(&a.qemu);
    c.args(qemu_args(a, name, preload)).env_remove("LD_PRELOAD").stderr(std::process::Stdio::null());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEPFIX_")) {
        c.env_remove(k);
    }
    if respect_app {
        c.env("KEEPFIX_RESPECT_APP", "1");
    }
    let out = c.output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{name} (preload={preload}) failed under qemu: {text}");
    assert!(text.ends_with("DONE\n"), "{text}");
    text
}

#[test]
fn every_hooked_call_returns_what_libc_returns_on_aarch64() {
    let Some(a) = arm() else { return };
    for name in ["errno_check", "errno_check64"] {
        let plain = run_checker(a, name, false, false);
        let respected = run_checker(a, name, true, true);
        assert_eq!(plain, respected, "{name}: keepfix changed what the aarch64 program sees");
        let enforced = run_checker(a, name, true, false);
        let diff: Vec<(&str, &str)> = plain.lines().zip(enforced.lines()).filter(|(x, y)| x != y).collect();
        assert_eq!(diff, Vec::<(&str, &str)>::new(), "{name}");
        assert!(plain.lines().count() > 100, "{plain}");
    }
}

#[test]
fn vfork_returns_to_parent_and_child_on_aarch64() {
    let Some(a) = arm() else { return };
    // keepfix's own vfork (assembly, one per architecture): the child runs and execs, the parent
    // gets its pid back and its socket stays tracked, so its setsockopt(SO_KEEPALIVE, 0) is undone.
    // qemu-user runs CLONE_VFORK as a plain fork, so this checks the return paths of the aarch64
    // code, not a child sharing the parent's memory (tests/edges.rs checks that natively).
    let mut p = qemu_run(a, "vfork_close", true).args(["0"]).spawn();
    let port = p.port();
    let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
    assert_eq!(field(&p.expect("CHILD"), "status"), "0");
    p.expect("DONE");
    assert!(keepalive_of(p.pid(), fd).on);
}
