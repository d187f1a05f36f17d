//! Metrics: with KEEPFIX_METRICS=DIR, the watchdog writes `DIR/keepfix-PID.prom` in Prometheus
//! text format at every scan (a temporary file renamed over the old one, so a reader never sees
//! half a file), for node_exporter's textfile collector. The file is removed at normal exit.
//!
//! The dead leave files too (SIGKILL, SIGTERM without a handler, `_exit` in a forked child), and a
//! collector would export them for ever. So the file's first line says which process wrote it
//! (`# keepfix pid=P start=S pidns=N`: the start time from /proc/PID/stat, field 22, in clock
//! ticks since boot, and the PID namespace's inode), and before a write the watchdog sweeps the
//! directory (at most every 5 s, and every N s when it holds N files of other processes: each
//! process spends what one file's check costs, about 20 µs, a second, however many share the
//! directory): it removes the files of PIDs that no longer exist, and of PIDs that now belong to
//! another process (another start time). A file it cannot judge stays:
//! one from another PID namespace, one without that line, one whose process /proc hides
//! (hidepid). An abandoned temporary file (older than a minute) goes too.
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
use crate::watchdog::monitor;
use core::fmt::Write as _;

pub struct Writer {
    /// `DIR/keepfix-PID.prom`, and the temporary name beside it.
    path: Option<(String, String)>,
    /// The directory, for the sweep.
    dir: String,
    program: String,
    failed_logged: bool,
    /// The file's first line: which process wrote it. `None` without /proc (then no sweep: the
    /// other processes could not be checked either).
    identity: Option<Identity>,
    /// When the directory is swept next (monotonic ms; 0: at the first write).
    sweep_at_ms: u64,
}

/// What tells this process from a later one with the same PID, and the PIDs of one namespace
/// from another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    pid: i32,
    /// /proc/PID/stat field 22: clock ticks since boot when the process started (exec keeps it).
    start: u64,
    /// The inode of /proc/self/ns/pid.
    pidns: u64,
}

/// The sweep runs at most this often (poked ticks near the fd limit come every millisecond)...
const SWEEP_EVERY_MS: u64 = 5000;
/// ... and waits this long per file of another process it saw: N processes sharing a directory
/// check N files each, every N seconds.
const SWEEP_PER_FILE_MS: u64 = 1000;
/// A temporary file lives for one write (microseconds); one older than this was abandoned.
const TMP_ABANDONED_S: i64 = 60;

/// This process's identity, for the destructor's sweep (its pid is a parent's in a forked child
/// that never wrote: then no sweep).
static EXIT_ID: (core::sync::atomic::AtomicI32, core::sync::atomic::AtomicU64, core::sync::atomic::AtomicU64) = (
    core::sync::atomic::AtomicI32::new(0),
    core::sync::atomic::AtomicU64::new(0),
    core::sync::atomic::AtomicU64::new(0),
);

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
        let dir = rt.cfg.metrics_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
        // Only with a metrics directory: reading /proc/PID/stat opens a file on keepfix's thread,
        // which for an instant holds the lowest free number (README, What keepfix holds).
        let identity = if path.is_some() { own_identity(pid) } else { None };
        if let Some(id) = identity {
            use core::sync::atomic::Ordering::Relaxed;
            EXIT_ID.0.store(id.pid, Relaxed);
            EXIT_ID.1.store(id.start, Relaxed);
            EXIT_ID.2.store(id.pidns, Relaxed);
        }
        Writer { path, dir, program: rt.program.clone(), failed_logged: false, identity, sweep_at_ms: 0 }
    }

    pub fn write(&mut self, detector: &Detector, now: u64) {
        let Some((path, tmp)) = &self.path else { return };
        if let Some(id) = self.identity {
            if now >= self.sweep_at_ms {
                let (_, seen) = sweep(&self.dir, &id);
                self.sweep_at_ms = now + SWEEP_EVERY_MS.max(seen as u64 * SWEEP_PER_FILE_MS);
            }
        }
        let mut text = match self.identity {
            Some(id) => header(&id),
            None => format!("# keepfix pid={}\n", sys::getpid()),
        };
        text.push_str(&render(detector, now, &self.program));
        // A failure is said once, and so is the recovery: a stale file never goes unnoticed.
        use core::sync::atomic::Ordering::*;
        let me = sys::getpid();
        // The state may be a parent's: fork() copied it while the parent's watchdog was writing.
        match WRITING.compare_exchange(0, me, AcqRel, Acquire) {
            Ok(_) => {}
            Err(EXITING) => return,
            Err(other) if other != me && WRITING.compare_exchange(other, me, AcqRel, Acquire).is_ok() => {}
            Err(_) => return,
        }
        let written = write_atomically(path, tmp, text.as_bytes());
        if written.is_err() {
            let _ = rustix::fs::unlink(tmp.as_str());
        }
        let _ = WRITING.compare_exchange(me, 0, AcqRel, Acquire);
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
/// The file's writer and the destructor exclude each other: 0 idle, a PID while that process's
/// watchdog is writing, [`EXITING`] once the process is exiting (no more writes: a rename after
/// the destructor's unlink would leave a dead process's file behind). A PID, not a flag: a forked
/// child copies the word, and a parent's write under way at the fork is not the child's.
static WRITING: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(0);
const EXITING: i32 = -1;

pub fn remove_at_exit() {
    use core::sync::atomic::Ordering::*;
    let me = sys::getpid();
    // Wait (at most 200 ms: a write is a few system calls) for a write of ours under way to end.
    let deadline = sys::now_ms() + 200;
    while WRITING.compare_exchange(0, EXITING, AcqRel, Acquire).is_err_and(|s| s == me) && sys::now_ms() < deadline {
        rustix::thread::sched_yield();
    }
    WRITING.store(EXITING, Release);
    if !PATH_SET.load(Acquire) {
        return;
    }
    // SAFETY: PATH is complete once PATH_SET is true.
    let p = unsafe { &*core::ptr::addr_of!(PATH) };
    let len = p.iter().position(|&c| c == 0).unwrap_or(0);
    if let Some(Ok(path)) = p.get(..len).map(core::str::from_utf8) {
        // Only the file of this process (a forked child has its own).
        if path.ends_with(&format!("/keepfix-{me}.prom")) {
            let _ = rustix::fs::unlink(path);
        }
        // The workers a parent reaped before it returned from main() died with _exit(), which
        // runs no destructor: their files go now, or they would stay until another keepfix
        // process writes into this directory.
        let id =
            Identity { pid: EXIT_ID.0.load(Relaxed), start: EXIT_ID.1.load(Relaxed), pidns: EXIT_ID.2.load(Relaxed) };
        if id.pid == me {
            if let Some(dir) = path.rsplit_once('/').map(|(d, _)| d) {
                sweep(if dir.is_empty() { "/" } else { dir }, &id);
            }
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
pub fn render(detector: &Detector, now: u64, program: &str) -> String {
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
    // be taken, the lower bound goes under its own name, and keepfix_fds_used is absent; when not
    // even that (probing is at most once a second), neither is written.
    match monitor::used_now() {
        None => {}
        Some(Used::Counted(n)) => {
            metric(name::FDS_USED, "gauge", "Open fds, counted for this write.", &[("", n as f64)])
        }
        Some(Used::AtLeast(n)) => metric(
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

/// The file's first line: `# keepfix pid=P start=S pidns=N`.
fn header(id: &Identity) -> String {
    format!("# keepfix pid={} start={} pidns={}\n", id.pid, id.start, id.pidns)
}

/// The identity in a file's first line; `None` if it has none (or not all of it).
fn parse_header(text: &[u8]) -> Option<Identity> {
    let line = text.split(|&b| b == b'\n').next()?;
    let line = core::str::from_utf8(line).ok()?.strip_prefix("# keepfix ")?;
    let (mut pid, mut start, mut pidns) = (None, None, None);
    for w in line.split(' ') {
        match w.split_once('=') {
            Some(("pid", v)) => pid = v.parse().ok(),
            Some(("start", v)) => start = v.parse().ok(),
            Some(("pidns", v)) => pidns = v.parse().ok(),
            _ => {}
        }
    }
    Some(Identity { pid: pid?, start: start?, pidns: pidns? })
}

fn own_identity(pid: i32) -> Option<Identity> {
    let pidns = rustix::fs::stat("/proc/self/ns/pid").ok()?.st_ino;
    Some(Identity { pid, start: start_time(pid)?, pidns })
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot. `None` if
/// the file cannot be read (no such process, or /proc hides it).
fn start_time(pid: i32) -> Option<u64> {
    use rustix::fs::{Mode, OFlags};
    let f = crate::hooksafe::ownfd::Temp::open(&format!("/proc/{pid}/stat"), OFlags::RDONLY, Mode::empty()).ok()?;
    let mut buf = [0u8; 1024];
    let n = f.with(|b| rustix::io::read(b, &mut buf).ok())??;
    parse_start_time(buf.get(..n)?)
}

/// `PID (comm) S ppid …`: the comm may hold spaces and parentheses, so fields count from the
/// last `)`. Field 22 is the 20th after it.
fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = core::str::from_utf8(stat.get(close + 1..)?).ok()?;
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The PID in a name this code writes: `keepfix-PID.prom`, or `.keepfix-PID.prom.tmp` (true).
fn file_pid(name: &[u8]) -> Option<(i32, bool)> {
    let name = core::str::from_utf8(name).ok()?;
    let (digits, tmp) = match name.strip_prefix(".keepfix-").and_then(|r| r.strip_suffix(".prom.tmp")) {
        Some(d) => (d, true),
        None => (name.strip_prefix("keepfix-")?.strip_suffix(".prom")?, false),
    };
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok().filter(|&p: &i32| p > 0)?, tmp))
}

/// Removes the files of the dead from `dir` (see the module's comment). Returns how many went,
/// and how many files of other processes it looked at.
fn sweep(dir: &str, me: &Identity) -> (usize, usize) {
    use rustix::fs::{Mode, OFlags, RawDir};
    let Ok(d) = crate::hooksafe::ownfd::Temp::open(dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) else {
        return (0, 0);
    };
    let mut found: Vec<(String, i32, bool)> = Vec::new();
    d.with(|b| {
        let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut it = RawDir::new(b, &mut buf);
        while let Some(Ok(ent)) = it.next() {
            let name = ent.file_name().to_bytes();
            if let Some((pid, tmp)) = file_pid(name) {
                if pid != me.pid {
                    found.push((String::from_utf8_lossy(name).into_owned(), pid, tmp));
                }
            }
        }
    });
    drop(d);
    let dir = dir.trim_end_matches('/');
    let seen = found.len();
    let mut removed = 0;
    for (name, pid, tmp) in found {
        let path = format!("{dir}/{name}");
        let stale = if tmp { tmp_abandoned(&path) } else { is_stale(&path, pid, me) };
        if stale && rustix::fs::unlink(path.as_str()).is_ok() {
            removed += 1;
        }
    }
    (removed, seen)
}

/// Is the file at `path`, named for `pid`, one of a process that is gone?
fn is_stale(path: &str, pid: i32, me: &Identity) -> bool {
    use rustix::fs::{FileType, Mode, OFlags};
    // No FIFO can block the watchdog, and no symlink is followed.
    let Ok(f) =
        crate::hooksafe::ownfd::Temp::open(path, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK, Mode::empty())
    else {
        return false;
    };
    let mut buf = [0u8; 256];
    let read = f.with(|b| {
        let st = rustix::fs::fstat(b).ok()?;
        (FileType::from_raw_mode(st.st_mode) == FileType::RegularFile).then(|| rustix::io::read(b, &mut buf).ok())?
    });
    drop(f);
    let Some(Some(n)) = read else { return false };
    let file = parse_header(buf.get(..n).unwrap_or(&[]));
    let alive = match rustix::process::Pid::from_raw(pid) {
        // EPERM: it exists, under another user.
        Some(p) => !matches!(rustix::process::test_kill_process(p), Err(rustix::io::Errno::SRCH)),
        None => true,
    };
    match file {
        // A PID of another namespace means nothing here.
        Some(f) if f.pidns != me.pidns || f.pid != pid => false,
        Some(f) => !alive || start_time(pid).is_some_and(|s| s != f.start),
        // A file of an older keepfix: only its PID to go by.
        None => !alive,
    }
}

/// A temporary file older than [`TMP_ABANDONED_S`]: its writer died between open and rename.
fn tmp_abandoned(path: &str) -> bool {
    let Ok(st) = rustix::fs::lstat(path) else { return false };
    let (now, _) = sys::wall_time();
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
        && now.saturating_sub(st.st_mtime) > TMP_ABANDONED_S
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lines() {
        assert_eq!(file_pid(b"keepfix-123.prom"), Some((123, false)));
        assert_eq!(file_pid(b".keepfix-9.prom.tmp"), Some((9, true)));
        for bad in
            ["keepfix-.prom", "keepfix-0.prom", "keepfix-01.prom", "keepfix-1x.prom", "node.prom", "keepfix-1.prom.tmp"]
        {
            assert_eq!(file_pid(bad.as_bytes()), None, "{bad}");
        }
        let id = Identity { pid: 42, start: 123456, pidns: 4026531836 };
        assert_eq!(parse_header(format!("{}# HELP x\n", header(&id)).as_bytes()), Some(id));
        assert_eq!(parse_header(b"# keepfix pid=42\n"), None);
        assert_eq!(parse_header(b"# HELP keepfix_up 1\n"), None);
        let stat = b"42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
    }
}
