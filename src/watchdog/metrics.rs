//! Metrics: with KEEPFIX_METRICS=DIR, the watchdog writes `DIR/keepfix-PID.prom` in Prometheus
//! text format at every scan (a temporary file renamed over the old one, so a reader never sees
//! half a file), for node_exporter's textfile collector. The file is removed at normal exit.
//!
//! Socket states are keepfix's view, from the fd table and the CLOSE_WAIT detector: no system
//! call per socket, so writing metrics costs a table walk.

use crate::event::{Action, Event, Used, metric as name};
use crate::hooksafe::emfile;
use crate::hooksafe::fdtable::{self, Role, State};
use crate::hooksafe::release;
use crate::hooksafe::settings::Runtime;
use crate::sys;
use crate::watchdog::detector::Detector;
use crate::watchdog::monitor::{self, Monitor};
use core::fmt::Write as _;

pub struct Writer {
    /// `DIR/keepfix-PID.prom`, and the temporary name beside it.
    path: Option<(String, String)>,
    program: String,
    failed_logged: bool,
}

/// The file this process writes, for the destructor to remove.
static mut PATH: [u8; 600] = [0; 600];
static PATH_SET: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

impl Writer {
    pub fn new(rt: &'static Runtime) -> Writer {
        let pid = sys::getpid();
        let path = rt.cfg.metrics_dir.as_ref().map(|d| {
            let d = d.display().to_string();
            let d = d.trim_end_matches('/');
            (format!("{d}/keepfix-{pid}.prom"), format!("{d}/.keepfix-{pid}.prom.tmp"))
        });
        if let Some((p, _)) = &path {
            remember(p);
        }
        Writer { path, program: rt.program.clone(), failed_logged: false }
    }

    pub fn write(&mut self, detector: &Detector, monitor: &Monitor, now: u64) {
        let Some((path, tmp)) = &self.path else { return };
        let text = render(detector, monitor, now, &self.program);
        // A failure is said once, and so is the recovery: a stale file never goes unnoticed.
        use core::sync::atomic::Ordering::*;
        if WRITING.compare_exchange(0, 1, AcqRel, Acquire).is_err() {
            return; // exiting
        }
        let written = write_atomically(path, tmp, text.as_bytes());
        if written.is_err() {
            let _ = rustix::fs::unlink(tmp.as_str());
        }
        let _ = WRITING.compare_exchange(1, 0, AcqRel, Acquire);
        match written {
            Err(e) if !self.failed_logged => {
                self.failed_logged = true;
                crate::hooksafe::log::event(&Event::MetricsFailed { path: path.as_bytes(), errno: e.raw_os_error() });
            }
            Ok(()) if self.failed_logged => {
                self.failed_logged = false;
                crate::hooksafe::log::event(&Event::MetricsRecovered { path: path.as_bytes() });
            }
            _ => {}
        }
    }
}

fn remember(p: &str) {
    let b = p.as_bytes();
    // SAFETY: written once by the watchdog before PATH_SET is published; read at exit.
    unsafe {
        let dst = &mut *core::ptr::addr_of_mut!(PATH);
        if let (Some(head), Some(end)) = (dst.get_mut(..b.len()).map(|h| h.copy_from_slice(b)), dst.get_mut(b.len())) {
            let () = head;
            *end = 0;
            PATH_SET.store(true, core::sync::atomic::Ordering::Release);
        }
    }
}

/// At normal exit: the file goes, so a dead process leaves no stale figures behind.
/// The file's writer and the destructor exclude each other: 0 idle, 1 the watchdog is writing,
/// 2 the process is exiting (no more writes: a rename after the destructor's unlink would leave
/// a dead process's file behind).
static WRITING: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

pub fn remove_at_exit() {
    use core::sync::atomic::Ordering::*;
    // Wait (at most 200 ms: a write is a few system calls) for a write under way to end.
    let deadline = sys::now_ms() + 200;
    while WRITING.compare_exchange(0, 2, AcqRel, Acquire).is_err_and(|s| s == 1) && sys::now_ms() < deadline {
        rustix::thread::sched_yield();
    }
    WRITING.store(2, Release);
    if !PATH_SET.load(Acquire) {
        return;
    }
    // SAFETY: PATH is complete once PATH_SET is true.
    let p = unsafe { &*core::ptr::addr_of!(PATH) };
    let len = p.iter().position(|&c| c == 0).unwrap_or(0);
    if let Some(Ok(path)) = p.get(..len).map(core::str::from_utf8) {
        // Only the file of this process (a forked child has its own).
        if path.ends_with(&format!("/keepfix-{}.prom", sys::getpid())) {
            let _ = rustix::fs::unlink(path);
        }
    }
}

fn write_atomically(path: &str, tmp: &str, bytes: &[u8]) -> Result<(), rustix::io::Errno> {
    use rustix::fs::{Mode, OFlags};
    let f = crate::hooksafe::ownfd::Temp::open(
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o644),
    )?;
    let mut off = 0;
    while off < bytes.len() {
        match f.with(|b| rustix::io::write(b, bytes.get(off..).unwrap_or(&[]))).unwrap_or(Err(rustix::io::Errno::BADF))
        {
            Ok(0) => return Err(rustix::io::Errno::IO),
            Ok(n) => off += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    drop(f);
    rustix::fs::rename(tmp, path)
}

/// The file's text.
pub fn render(detector: &Detector, _monitor: &Monitor, now: u64, program: &str) -> String {
    let pid = sys::getpid();
    let mut roles = [0u64; 6];
    let (mut tracked, mut released, mut vacated) = (0u64, 0u64, 0u64);
    let acting = crate::hooksafe::settings::get().is_some_and(|rt| rt.cfg.close_wait.acts());
    fdtable::for_each(0, fdtable::MAX_FD - 1, |_, s| {
        let m = s.load();
        match m.state() {
            State::Tracked | State::Releasing => {
                tracked += 1;
                if let Some(r) = roles.get_mut(m.role() as usize) {
                    *r += 1;
                }
                if acting && m.has(fdtable::flag::ACTED) {
                    released += 1;
                }
            }
            State::Vacated => vacated += 1,
            _ => {}
        }
    });
    let (held, oldest) = detector.held(now);
    let t = release::totals();
    let (soft, hard) = emfile::limits();
    let (emfile, rejected) = emfile::emfile_events();
    let rt = crate::hooksafe::settings::get();
    let l = format!("pid=\"{pid}\",program=\"{}\"", escape(program));
    let mut o = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(&str, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (extra, v) in rows {
            let sep = if extra.is_empty() { "" } else { "," };
            let _ = writeln!(o, "{name}{{{l}{sep}{extra}}} {v}");
        }
    };
    metric(name::UP, "gauge", "1 while keepfix's watchdog runs in this process.", &[("", 1.0)]);
    let role = |r: Role| roles.get(r as usize).copied().unwrap_or(0);
    let role_rows: Vec<(String, f64)> =
        Role::ALL.iter().map(|r| (format!("role=\"{}\"", r.name()), role(*r) as f64)).collect();
    let role_rows: Vec<(&str, f64)> = role_rows.iter().map(|(s, v)| (s.as_str(), *v)).collect();
    metric(name::TRACKED_SOCKETS, "gauge", "TCP sockets keepfix tracks, by role.", &role_rows);
    let open = tracked.saturating_sub(held as u64 + role(Role::Listener) + role(Role::InheritedListener));
    metric(
        name::SOCKETS,
        "gauge",
        "Tracked sockets and released numbers, by state as keepfix sees it: open, close_wait (the peer closed, the program did not: found and not yet released), listen, released (shut down by keepfix, the number still the program's), vacated (closed by keepfix to free the fd).",
        &[
            ("state=\"open\"", open as f64),
            ("state=\"close_wait\"", held as f64),
            ("state=\"listen\"", (role(Role::Listener) + role(Role::InheritedListener)) as f64),
            ("state=\"released\"", released as f64),
            ("state=\"vacated\"", vacated as f64),
        ],
    );
    metric(
        name::CLOSE_WAIT_OLDEST_SECONDS,
        "gauge",
        "Age of the oldest socket held in CLOSE_WAIT.",
        &[("", oldest as f64)],
    );
    metric(
        name::CLOSE_WAIT_FOUND_TOTAL,
        "counter",
        "Sockets found left in CLOSE_WAIT or dead.",
        &[("", t.found as f64)],
    );
    metric(
        name::CLOSE_WAIT_ACTIONS_TOTAL,
        "counter",
        "What keepfix did with sockets left in CLOSE_WAIT.",
        &[
            (&action(Action::Logged), t.logged as f64),
            (&action(Action::Shutdown), t.shutdown as f64),
            (&action(Action::Vacated), t.vacated as f64),
            (&action(Action::KeptUnread), t.unread_kept as f64),
        ],
    );
    metric(
        name::RELEASED_CLOSED_BY_PROGRAM_TOTAL,
        "counter",
        "close() calls the program made on numbers keepfix had shut down or vacated.",
        &[("", release::program_closed() as f64)],
    );
    // Counted for this write (one fstat of /proc/self/fd): never an old count. When no count can
    // be taken, the lower bound goes under its own name, and keepfix_fds_used is absent.
    match monitor::used_now() {
        Used::Counted(n) => metric(name::FDS_USED, "gauge", "Open fds, counted for this write.", &[("", n as f64)]),
        Used::AtLeast(n) => metric(
            name::FDS_USED_MIN,
            "gauge",
            "At least this many fds are open (no count could be taken for this write).",
            &[("", n as f64)],
        ),
    }
    let lim = |v: u64| if v == u64::MAX { f64::INFINITY } else { v as f64 };
    metric(name::FDS_LIMIT, "gauge", "RLIMIT_NOFILE.", &[("kind=\"soft\"", lim(soft)), ("kind=\"hard\"", lim(hard))]);
    metric(name::EMFILE_TOTAL, "counter", "accept() calls that failed with EMFILE or ENFILE.", &[("", emfile as f64)]);
    metric(
        name::EMFILE_REJECTED_TOTAL,
        "counter",
        "Pending connections keepfix accepted and closed at once because the fd table was full.",
        &[("", rejected as f64)],
    );
    metric(
        name::SELECT_TOO_BIG_TOTAL,
        "counter",
        "select() calls with nfds above FD_SETSIZE.",
        &[("", emfile::select_too_big_count() as f64)],
    );
    metric(
        name::LOG_DROPPED_TOTAL,
        "counter",
        "Log lines that could not be written.",
        &[("", crate::hooksafe::log::dropped_lines() as f64)],
    );
    metric(name::TABLE_BYTES, "gauge", "Memory of keepfix's fd table.", &[("", fdtable::mapped_bytes() as f64)]);
    let (ticks, last, max, cpu) = crate::watchdog::stats::tick_stats();
    metric(name::WATCHDOG_TICKS_TOTAL, "counter", "Periodic watchdog ticks.", &[("", ticks as f64)]);
    metric(
        name::WATCHDOG_TICK_SECONDS,
        "gauge",
        "How long the watchdog's periodic work took: the last tick and the longest.",
        &[("stat=\"last\"", last as f64 / 1e9), ("stat=\"max\"", max as f64 / 1e9)],
    );
    metric(
        name::WATCHDOG_CPU_SECONDS_TOTAL,
        "counter",
        "CPU time of keepfix's watchdog thread.",
        &[("", cpu as f64 / 1e9)],
    );
    if let Some(rt) = rt {
        let c = &rt.cfg;
        let ut = c.user_timeout_ms().map_or(0.0, |ms| f64::from(ms) / 1000.0);
        metric(
            name::CONFIG_SECONDS,
            "gauge",
            "keepfix's configured timings (user_timeout 0 = off).",
            &[
                ("name=\"idle\"", f64::from(c.idle_s)),
                ("name=\"intvl\"", f64::from(c.intvl_s)),
                ("name=\"user_timeout\"", ut),
                ("name=\"close_wait_after\"", c.close_wait_after_ms as f64 / 1000.0),
                ("name=\"scan_interval\"", c.scan_interval_ms as f64 / 1000.0),
            ],
        );
        metric(name::CONFIG_KEEPCNT, "gauge", "keepfix's configured TCP_KEEPCNT.", &[("", f64::from(c.cnt))]);
    }
    o
}

/// A label value: backslash, quote and newline escaped, as the text format wants.
/// The `action` label of keepfix_close_wait_actions_total: the `close_wait` line's action name
/// (kept_sigpipe counts as logged, dead as shutdown).
fn action(a: Action) -> String {
    format!("action=\"{}\"", a.name())
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
