//! Logging: one line per event, `keepfix[PID]: event key=value …`, to stderr, syslog or a file.
//!
//! Hooks never write. They [`defer`] a small record into a lock-free ring, and the watchdog thread
//! formats and writes it. Only the constructor, the watchdog and the destructor call [`emit`].
//! Writes never block the program: pipes and files get `RWF_NOWAIT` (where the kernel or the
//! destination lacks it, a write() once poll says there is room), sockets `MSG_DONTWAIT`; a line
//! that cannot go out at once is counted as dropped. A token bucket stops floods, and a
//! `suppressed` line says what it held back. Formatting uses a stack buffer: no allocation.
//!
//! Safety rules for stderr: the constructor records what fd 2 is (device, inode, file type).
//! keepfix writes there only while fd 2 is still that object, and only if it is a log-like
//! destination: a tty or other character device, a pipe or FIFO, a regular file (a `2>>log`
//! redirect at exec), or the systemd journal's stream (JOURNAL_STREAM). Never any other socket:
//! an inetd-style service has its client connection there, a program its private channel. Once
//! fd 2 has been seen to be anything else, keepfix never writes to it again: a daemon that closed
//! 0, 1 and 2 has its own files on those numbers.

use crate::sys;
use core::fmt::{self, Write as _};
use core::sync::atomic::{AtomicBool, AtomicI32, Ordering::*};
use rustix::fd::RawFd;

pub use crate::event::Level;
use crate::event::{Event, SUPPRESSED_EVERY_MS};

// ---------------------------------------------------------------------------------------------
// Lines.

/// A line being formatted, on the stack. Text past the end is cut and marked with "...".
pub struct Line {
    buf: [u8; 1024],
    len: usize,
    cut: bool,
}

impl Line {
    pub fn new() -> Line {
        Line { buf: [0; 1024], len: 0, cut: false }
    }
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
    fn finish(&mut self) {
        if self.cut {
            self.len = self.len.min(self.buf.len() - 4);
            let _ = self.write_str("...");
        }
        if let Some(b) = self.buf.get_mut(self.len) {
            *b = b'\n';
            self.len += 1;
        }
    }
}

impl Default for Line {
    fn default() -> Self {
        Line::new()
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep one byte for the newline.
        let room = self.buf.len().saturating_sub(self.len + 1);
        let n = s.len().min(room);
        if n < s.len() {
            self.cut = true;
        }
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..self.len + n), s.as_bytes().get(..n)) {
            dst.copy_from_slice(src);
            self.len += n;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Destinations.

#[derive(Clone, Copy, PartialEq, Eq)]
enum DestKind {
    Stderr,
    Syslog,
    File,
}

/// The destination, set once at load time.
struct Dest {
    kind: DestKind,
    /// For File: the path, NUL-terminated, in a fixed buffer (set before any thread starts).
    path: [u8; 512],
    path_len: usize,
    /// JOURNAL_STREAM's device and inode: stderr is the journal when fd 2 matches.
    journal: Option<(u64, u64)>,
    /// What fd 2 was at load, if it is a destination keepfix may write to: (dev, ino, S_IFMT).
    stderr_at_load: Option<(u64, u64, u32)>,
}

struct SinkState {
    /// Our own fd for File or Syslog (an Own fd), -1 if not open.
    fd: RawFd,
    /// File: (dev, ino) of what we opened, and when we last compared it with the path.
    file_id: (u64, u64),
    file_checked_ms: u64,
    /// Rate limit: tokens × 1000, refilled at RATE per second up to BURST.
    tokens_milli: u64,
    refill_ms: u64,
    suppressed: u64,
    suppressed_since_ms: u64,
    /// When the last `suppressed` line was written (0: never).
    suppressed_written_ms: u64,
    dropped: u64,
}

const BURST: u64 = 60;
const RATE_PER_S: u64 = 5;

static mut DEST: Dest =
    Dest { kind: DestKind::Stderr, path: [0; 512], path_len: 0, journal: None, stderr_at_load: None };
/// fd 2 was seen to be another object than at load: keepfix never writes there again.
static STDERR_GONE: AtomicBool = AtomicBool::new(false);
static SINK_BUSY: AtomicBool = AtomicBool::new(false);
static mut SINK: SinkState = SinkState {
    fd: -1,
    file_id: (0, 0),
    file_checked_ms: 0,
    tokens_milli: BURST * 1000,
    refill_ms: 0,
    suppressed: 0,
    suppressed_since_ms: 0,
    suppressed_written_ms: 0,
    dropped: 0,
};
/// The pid in every line; updated in a forked child.
static PID: AtomicI32 = AtomicI32::new(0);

/// Sets the destination. Called once by the constructor, before any other thread of ours exists.
pub fn init(dest: &crate::config::LogDest, journal_stream: Option<&[u8]>) {
    PID.store(sys::getpid(), Relaxed);
    // SAFETY: called once from the constructor, before any reader exists.
    let d = unsafe { &mut *core::ptr::addr_of_mut!(DEST) };
    d.journal = journal_stream.and_then(parse_journal_stream);
    d.stderr_at_load = stderr_identity().filter(|&id| log_like(id, d.journal));
    match dest {
        crate::config::LogDest::Stderr => d.kind = DestKind::Stderr,
        crate::config::LogDest::Syslog => d.kind = DestKind::Syslog,
        crate::config::LogDest::File(p) => {
            let bytes = p.as_os_str().as_encoded_bytes();
            if let Some(dst) = d.path.get_mut(..bytes.len()).filter(|_| bytes.len() < 512 && !bytes.contains(&0)) {
                dst.copy_from_slice(bytes);
                d.kind = DestKind::File;
                d.path_len = bytes.len();
            }
        }
    }
}

pub fn set_pid(pid: i32) {
    PID.store(pid, Relaxed);
}

/// After fork(), in the child: a parent thread that was writing or draining is gone.
/// The log's own fd (file or syslog socket), or -1. Read in a forked child, single-threaded.
pub fn own_fd() -> RawFd {
    // SAFETY: a plain read of an i32; a torn value is impossible, a stale one harmless.
    unsafe { core::ptr::addr_of!(SINK.fd).read_volatile() }
}

pub fn after_fork_child() {
    if SINK_BUSY.load(Relaxed) {
        SINK_BUSY.store(false, Release);
    }
    // The parent's rate-limit state is the parent's: a child starts with a full bucket and
    // nothing suppressed, so its first events are logged under its own pid. Written only where
    // it differs (a page the child leaves alone stays shared with the parent: no fault).
    // SAFETY: a forked child has one thread; SINK_BUSY was just cleared and nothing else runs.
    unsafe {
        let sink = &mut *core::ptr::addr_of_mut!(SINK);
        let fresh = (BURST * 1000, 0, 0, 0, 0);
        if (sink.tokens_milli, sink.suppressed, sink.suppressed_since_ms, sink.suppressed_written_ms, sink.refill_ms)
            != fresh
        {
            sink.tokens_milli = BURST * 1000;
            sink.suppressed = 0;
            sink.suppressed_since_ms = 0;
            sink.suppressed_written_ms = 0;
            sink.refill_ms = 0;
        }
    }
    crate::hooksafe::ring::after_fork_child();
}

fn parse_journal_stream(v: &[u8]) -> Option<(u64, u64)> {
    let s = core::str::from_utf8(v).ok()?;
    let (dev, ino) = s.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Writes one event's line, if the rate limit allows. Never blocks, never allocates.
pub fn event(e: &Event<'_>) {
    emit(e.level(), format_args!("{e}"));
}

/// Writes one line, if the rate limit allows. Never blocks, never allocates. Every line but the
/// constructor's config diagnostics comes through [`event`].
pub fn emit(level: Level, args: fmt::Arguments<'_>) {
    if SINK_BUSY.swap(true, Acquire) {
        // Another of keepfix's threads is writing (the destructor racing the watchdog): rather
        // than wait, count it.
        return;
    }
    // SAFETY: SINK_BUSY gives us exclusive access; DEST is only written before threads exist.
    let (sink, dest) = unsafe { (&mut *core::ptr::addr_of_mut!(SINK), &*core::ptr::addr_of!(DEST)) };
    let now = sys::now_ms();
    refill(sink, now);
    write_suppressed(sink, dest, now, false);
    if sink.tokens_milli >= 1000 {
        // Within the rate: written, even while a `suppressed` count waits for its interval (a
        // line held then would be lost, not late: an `rlimit_nofile` or `sandboxed` after a flood).
        sink.tokens_milli -= 1000;
        write_line(sink, dest, level, args);
    } else {
        // Over the rate: one more for the `suppressed` line to count, so that the log never
        // shows a gap it does not explain.
        if sink.suppressed == 0 {
            sink.suppressed_since_ms = now;
        }
        sink.suppressed += 1;
    }
    SINK_BUSY.store(false, Release);
}

/// Writes the `suppressed` line for the lines held back, at most once per
/// SUPPRESSED_EVERY_MS and when the rate allows (`force`: at exit or before keepfix goes silent
/// under a seccomp filter, whatever the time and the rate: the last chance to say it).
fn write_suppressed(sink: &mut SinkState, dest: &Dest, now: u64, force: bool) {
    if sink.suppressed == 0 || (sink.tokens_milli < 1000 && !force) {
        return;
    }
    let due = sink.suppressed_written_ms == 0 || now.saturating_sub(sink.suppressed_written_ms) >= SUPPRESSED_EVERY_MS;
    if !due && !force {
        return;
    }
    sink.tokens_milli = sink.tokens_milli.saturating_sub(1000);
    let e = Event::Suppressed { lines: sink.suppressed, seconds: now.saturating_sub(sink.suppressed_since_ms) / 1000 };
    sink.suppressed = 0;
    sink.suppressed_written_ms = now.max(1);
    write_line(sink, dest, e.level(), format_args!("{e}"));
}

/// Writes out a pending `suppressed` line when it is due; the watchdog calls it each tick, and
/// the destructor (and the seccomp pause) with `at_exit` (then at once, whatever the rate).
pub fn flush_suppressed(at_exit: bool) {
    if SINK_BUSY.swap(true, Acquire) {
        return;
    }
    // SAFETY: as in emit().
    let (sink, dest) = unsafe { (&mut *core::ptr::addr_of_mut!(SINK), &*core::ptr::addr_of!(DEST)) };
    let now = sys::now_ms();
    refill(sink, now);
    write_suppressed(sink, dest, now, at_exit);
    SINK_BUSY.store(false, Release);
}

fn refill(sink: &mut SinkState, now: u64) {
    if sink.refill_ms == 0 {
        sink.refill_ms = now;
    }
    let elapsed = now.saturating_sub(sink.refill_ms);
    sink.tokens_milli = (sink.tokens_milli + elapsed * RATE_PER_S).min(BURST * 1000);
    sink.refill_ms = now;
}

/// Lines that could not be written at once (destination full or gone), since load.
pub fn dropped_lines() -> u64 {
    if SINK_BUSY.swap(true, Acquire) {
        return 0;
    }
    // SAFETY: as in emit().
    let n = unsafe { (*core::ptr::addr_of!(SINK)).dropped };
    SINK_BUSY.store(false, Release);
    n
}

fn write_line(sink: &mut SinkState, dest: &Dest, level: Level, args: fmt::Arguments<'_>) {
    let mut line = Line::new();
    let pid = PID.load(Relaxed);
    let ok = match dest.kind {
        DestKind::Stderr => {
            let journal = stderr_is_journal(dest);
            if journal {
                let _ = write!(line, "<{}>", level as u8);
            }
            let _ = write!(line, "keepfix[{pid}]: ");
            let _ = line.write_fmt(args);
            line.finish();
            write_stderr(dest, line.as_bytes())
        }
        DestKind::Syslog => {
            // LOG_DAEMON; the receiver adds the timestamp.
            let _ = write!(line, "<{}>keepfix[{pid}]: ", 3 * 8 + level as u8);
            let _ = line.write_fmt(args);
            line.finish();
            write_syslog(sink, line.as_bytes())
        }
        DestKind::File => {
            let (secs, ms) = sys::wall_time();
            write_timestamp(&mut line, secs, ms);
            let _ = write!(line, " keepfix[{pid}]: ");
            let _ = line.write_fmt(args);
            line.finish();
            write_file(sink, dest, line.as_bytes())
        }
    };
    if !ok {
        sink.dropped += 1;
    }
}

/// fd 2's device, inode and file type, if it is open.
fn stderr_identity() -> Option<(u64, u64, u32)> {
    let st = rustix::fs::fstat(sys::borrow(2)?).ok()?;
    Some((st.st_dev, st.st_ino, st.st_mode & libc::S_IFMT))
}

/// A destination a log line may go to: a tty or character device, a pipe or FIFO, a regular file,
/// or the journal's stream socket. Not a directory, a block device, or any other socket.
fn log_like((dev, ino, fmt): (u64, u64, u32), journal: Option<(u64, u64)>) -> bool {
    match fmt {
        libc::S_IFCHR | libc::S_IFIFO | libc::S_IFREG => true,
        libc::S_IFSOCK => journal == Some((dev, ino)),
        _ => false,
    }
}

fn stderr_is_journal(dest: &Dest) -> bool {
    let (Some((dev, ino)), Some((d, i, _))) = (dest.journal, dest.stderr_at_load) else { return false };
    (dev, ino) == (d, i)
}

/// fd 2, if it is still the log-like object it was at load. The first time it is not (closed,
/// replaced by dup2 or a new open), keepfix gives stderr up for good.
fn stderr_fd(dest: &Dest) -> Option<(rustix::fd::BorrowedFd<'static>, u32)> {
    let at_load = dest.stderr_at_load?;
    if STDERR_GONE.load(Relaxed) {
        return None;
    }
    if stderr_identity() != Some(at_load) {
        STDERR_GONE.store(true, Relaxed);
        return None;
    }
    Some((sys::borrow(2)?, at_load.2))
}

/// Writes to fd 2 if it is still the destination it was at load. Never blocks, never raises
/// SIGPIPE in a thread that could take it (the watchdog blocks every signal; the constructor
/// checks the pipe first).
fn write_stderr(dest: &Dest, bytes: &[u8]) -> bool {
    let Some((fd, fmt)) = stderr_fd(dest) else { return false };
    if fmt == libc::S_IFSOCK {
        // Only the journal's stream gets here (log_like).
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        return rustix::net::send(fd, bytes, flags).is_ok_and(|n| n == bytes.len());
    }
    if fmt == libc::S_IFIFO && !crate::hooksafe::settings::on_watchdog_thread() {
        // A pipe whose reader is gone would raise SIGPIPE in this (the program's) thread.
        let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::OUT)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        if rustix::event::poll(&mut pfd, Some(&zero)).is_err()
            || pfd[0].revents().intersects(rustix::event::PollFlags::ERR | rustix::event::PollFlags::HUP)
        {
            return false;
        }
    }
    write_nowait(fd, bytes)
}

/// The errno that made keepfix give pwritev2(RWF_NOWAIT) up, at the first line, for good; 0 while
/// it works. ENOSYS: the kernel has no pwritev2 (before 4.6, qemu-user). EOPNOTSUPP or EINVAL:
/// the destination does not take RWF_NOWAIT (a tty; an older kernel's pipe or buffered file write;
/// any before 4.14). Remembered, not tried again per line.
static NOWAIT_FAILED: AtomicI32 = AtomicI32::new(0);

/// Why keepfix writes its lines with poll and write() instead of pwritev2(RWF_NOWAIT): the errno
/// pwritev2 gave, or `None` while it works.
pub fn nowait_failed() -> Option<i32> {
    Some(NOWAIT_FAILED.load(Relaxed)).filter(|&e| e != 0)
}

fn write_nowait(fd: rustix::fd::BorrowedFd<'_>, bytes: &[u8]) -> bool {
    if NOWAIT_FAILED.load(Relaxed) == 0 {
        let iov = [rustix::io::IoSlice::new(bytes)];
        match rustix::io::pwritev2(fd, &iov, u64::MAX, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(n) => return n == bytes.len(),
            // No pwritev2 here (an old kernel, qemu-user), or no RWF_NOWAIT for this
            // destination (a tty, an old kernel's pipe or file): a plain write from now on.
            Err(e @ (rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL)) => {
                NOWAIT_FAILED.store(e.raw_os_error(), Relaxed)
            }
            Err(_) => return false,
        }
    }
    write_if_ready(fd, bytes)
}

/// write() only when poll says the destination takes data now, so that it does not block (a full
/// pipe drops the line). A regular file always has room.
fn write_if_ready(fd: rustix::fd::BorrowedFd<'_>, bytes: &[u8]) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut pfd = [PollFd::new(&fd, PollFlags::OUT)];
    if poll(&mut pfd, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })) != Ok(1) || pfd[0].revents() != PollFlags::OUT {
        return false;
    }
    rustix::io::write(fd, bytes).is_ok_and(|n| n == bytes.len())
}

fn write_syslog(sink: &mut SinkState, bytes: &[u8]) -> bool {
    for _attempt in 0..2 {
        if sink.fd < 0 || !crate::hooksafe::ownfd::is_own(sink.fd) {
            sink.fd = connect_syslog().unwrap_or(-1);
        }
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        // Through ownfd::with: the program may have closed that number and opened its own there.
        match crate::hooksafe::ownfd::with(sink.fd, |fd| rustix::net::send(fd, bytes, flags))
            .unwrap_or(Err(rustix::io::Errno::NOTCONN))
        {
            Ok(_) => return true,
            // syslogd restarted: connect again once.
            Err(rustix::io::Errno::CONNREFUSED) | Err(rustix::io::Errno::NOTCONN) => {
                crate::hooksafe::ownfd::close(sink.fd);
                sink.fd = -1;
            }
            Err(_) => return false,
        }
    }
    false
}

fn connect_syslog() -> Option<RawFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let s = rustix::net::socket_with(AddressFamily::UNIX, SocketType::DGRAM, SocketFlags::CLOEXEC, None).ok()?;
    let s = sys::own(s);
    let addr = SocketAddrUnix::new("/dev/log").ok()?;
    rustix::net::connect(s.as_fd(), &addr).ok()?;
    crate::hooksafe::ownfd::install(s)
}

fn write_file(sink: &mut SinkState, dest: &Dest, bytes: &[u8]) -> bool {
    let now = sys::now_ms();
    let path = dest.path.get(..dest.path_len).unwrap_or(&[]);
    // Reopen when logrotate moved the file away, or when our fd is no longer what we opened.
    if sink.fd >= 0 && (now.saturating_sub(sink.file_checked_ms) > 10_000 || !crate::hooksafe::ownfd::is_own(sink.fd)) {
        sink.file_checked_ms = now;
        let ours = sys::borrow(sink.fd).and_then(|fd| rustix::fs::fstat(fd).ok()).map(|st| (st.st_dev, st.st_ino));
        let at_path = rustix::fs::stat(path).ok().map(|st| (st.st_dev, st.st_ino));
        if ours != Some(sink.file_id) || at_path != Some(sink.file_id) || !crate::hooksafe::ownfd::is_own(sink.fd) {
            if crate::hooksafe::ownfd::is_own(sink.fd) {
                crate::hooksafe::ownfd::close(sink.fd);
            }
            sink.fd = -1;
        }
    }
    if sink.fd < 0 {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOCTTY;
        let Ok(f) = rustix::fs::open(path, flags, Mode::from_raw_mode(0o640)) else { return false };
        let f = sys::own(f);
        let Ok(st) = rustix::fs::fstat(f.as_fd()) else { return false };
        sink.file_id = (st.st_dev, st.st_ino);
        sink.file_checked_ms = now;
        sink.fd = crate::hooksafe::ownfd::install(f).unwrap_or(-1);
    }
    crate::hooksafe::ownfd::with(sink.fd, |fd| write_nowait(fd, bytes)).unwrap_or(false)
}

/// An RFC 3339 UTC timestamp, computed without libc (no locale, no locks).
fn write_timestamp(line: &mut Line, secs: i64, ms: u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let _ = write!(line, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem / 60 % 60, rem % 60);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let mut l = Line::new();
        write_timestamp(&mut l, 0, 0);
        assert_eq!(l.as_bytes(), b"1970-01-01T00:00:00.000Z");
        let mut l = Line::new();
        write_timestamp(&mut l, 1_795_574_760, 123); // date -u -d @1795574760
        assert_eq!(l.as_bytes(), b"2026-11-25T02:46:00.123Z");
    }

    #[test]
    fn long_lines_are_cut_and_stay_one_line() {
        let mut l = Line::new();
        for _ in 0..200 {
            let _ = l.write_str("0123456789");
        }
        l.finish();
        let b = l.as_bytes();
        assert_eq!(b.len(), 1024);
        assert!(b.ends_with(b"...\n"));
        assert_eq!(b.iter().filter(|&&c| c == b'\n').count(), 1);
    }
}
