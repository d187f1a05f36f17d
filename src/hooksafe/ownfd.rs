//! keepfix's own fds: the epoll set and the reserve fd (a duplicate of it), /proc/self/fd and
//! /proc/self/status (given back to the program when accept() hits EMFILE), and the log file or
//! syslog socket when configured.
//!
//! They live just below min(soft limit, 1024), so that the numbers the program gets (lowest free
//! first) are the ones it would get without keepfix. Opening a file gives the lowest free number,
//! though, for an instant: so the long-lived fds are made before the watchdog thread exists (in
//! the hook that starts it), and a later open moves its fd high at once.
//!
//! The numbers are the program's. A close(), close_range() or closefrom() of one closes it and
//! returns what it would for any open fd, and keepfix opens its own again elsewhere when it needs
//! it. Each fd is marked Own in the fd table, and every system call keepfix makes on one is
//! bracketed by [`with`]: Own → Own|BUSY → Own, by compare-and-swap. A program close() that comes
//! during such a call is handed over (keepfix closes the number right after its call), so a call
//! of keepfix's can never reach a file or socket the program opens at that number next.

use crate::hooksafe::fdtable::{self, State};
use crate::sys::{self, Fd};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering::*};
use rustix::fd::{BorrowedFd, RawFd};
use rustix::fs::{Mode, OFlags};

/// Below this soft RLIMIT_NOFILE keepfix holds no fd of its own ("lean"): every fd would be one
/// the program counts on (a server under `ulimit -n 16` serves a dozen clients), and placing
/// them anywhere changes the numbers the program gets. The watchdog then finds CLOSE_WAIT by a
/// TCP_INFO scan of its tracked sockets each tick (at most this many), counts fds by probing
/// each number, and has no reserve fd for EMFILE. A log file, syslog or metrics, when asked for,
/// still take theirs.
pub const LEAN_BELOW: u64 = 64;

/// Is the soft limit so low that keepfix holds no fd of its own? One getrlimit.
pub fn lean() -> bool {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.is_some_and(|s| s < LEAN_BELOW)
}

fn base() -> i32 {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024);
    (soft.min(1024) as i32 - 16).max(3)
}

/// Moves `fd` high, marks it Own, and hands the number over (to be closed with [`close`]). If no
/// high number is free, it stays where it is.
pub fn install(fd: Fd) -> Option<RawFd> {
    let fd = high(fd);
    fdtable::slot_alloc(fd.raw())?.set_own(fd.raw());
    Some(fd.into_raw())
}

fn high(fd: Fd) -> Fd {
    match rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), base()) {
        Ok(h) => sys::own(h),
        Err(_) => fd,
    }
}

/// Is `fd` still one of keepfix's own? (False once the program took the number with dup2.)
pub fn is_own(fd: RawFd) -> bool {
    fdtable::slot(fd).is_some_and(|s| s.load().state() == State::Own)
}

/// Closes one of keepfix's own fds, if it still is one. The close is a use like any other: the
/// number cannot change hands between the check and the close.
pub fn close(fd: RawFd) {
    if let Some(s) = fdtable::slot(fd) {
        if s.begin_own_use().is_some() {
            // Ours; EBADF in a forked child whose fork raced the open (see sys::close_raw).
            let _ = sys::close_raw(fd);
            s.force_none();
        }
    }
}

/// Runs `f` on keepfix's own fd `fd`, if it still is one: the only way keepfix makes a system
/// call on one of its long-lived fds. `None` if the program has taken the number.
pub fn with<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Option<R> {
    let s = fdtable::slot(fd)?;
    let busy = s.begin_own_use()?;
    // SAFETY: the number is keepfix's (Own, and BUSY holds it there) until end_own_use.
    let r = f(unsafe { BorrowedFd::borrow_raw(fd) });
    s.end_own_use(busy, fd);
    Some(r)
}

/// In a forked child. fork() copies the fd table before memory while the parent's watchdog
/// runs, so an Own mark may name an fd the child does not have (opened after the copy), or a
/// /proc or temporary fd of the parent's. Keeps the marks of the fds in `keep` the child has,
/// closes every other marked fd it has, and clears the other marks: a program's file that takes
/// such a number later is its own. Async-signal-safe (a _Fork() child runs it from a hook).
pub fn after_fork_child(keep: &[RawFd]) {
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if m.state() != State::Own {
            return;
        }
        let present = sys::fd_exists(fd);
        if present && keep.contains(&fd) && !m.has(fdtable::flag::BUSY) {
            return;
        }
        // A busy mark is the parent thread's: it never clears here.
        s.force_none();
        if present && !m.has(fdtable::flag::CLOSE_PENDING) {
            let _ = sys::close_raw(fd);
        }
    });
    for c in [&PROC_FD, &PROC_STATUS] {
        c.store(-1, Relaxed);
    }
    PROC_PID.store(0, Relaxed);
}

/// A short-lived fd of keepfix's (a /proc file, a metrics file being written), high and Own
/// while open. Dropping it closes it, unless the program took the number meanwhile (a dup2 onto
/// it): then it is the program's.
pub struct Temp(RawFd);

impl Temp {
    pub fn open(path: &str, flags: OFlags, mode: Mode) -> Result<Temp, rustix::io::Errno> {
        let fd = high(sys::own(rustix::fs::open(path, flags | OFlags::CLOEXEC, mode)?));
        if let Some(s) = fdtable::slot_alloc(fd.raw()) {
            s.set_own(fd.raw());
        }
        Ok(Temp(fd.into_raw()))
    }
    /// Runs `f` on the fd if it is still keepfix's (see [`with`]).
    pub fn with<R>(&self, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Option<R> {
        match fdtable::slot(self.0) {
            Some(_) => with(self.0, f),
            // SAFETY: the table had no room to mark it, so nothing could take it: ours.
            None => Some(f(unsafe { BorrowedFd::borrow_raw(self.0) })),
        }
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        match fdtable::slot(self.0) {
            Some(_) => close(self.0),
            // Ours (the table had no room to mark it).
            None => {
                let _ = sys::close_raw(self.0);
            }
        }
    }
}

/// /proc/self/fd and /proc/self/status, and the pid they belong to (a forked child needs its own).
static PROC_FD: AtomicI32 = AtomicI32::new(-1);
static PROC_STATUS: AtomicI32 = AtomicI32::new(-1);
static PROC_PID: AtomicI32 = AtomicI32::new(0);

fn cached(cell: &AtomicI32, open: impl FnOnce() -> Option<RawFd>) -> Option<RawFd> {
    let fd = cell.load(Acquire);
    if fd >= 0 && is_own(fd) {
        return Some(fd);
    }
    let new = open()?;
    match cell.compare_exchange(fd, new, AcqRel, Acquire) {
        Ok(_) => Some(new),
        Err(theirs) => {
            close(new);
            Some(theirs)
        }
    }
}

/// Opens the /proc files the watchdog reads every tick, from the hook that starts it: an open()
/// takes the lowest free number for an instant, which on the watchdog's thread could race a
/// program thread's own open() and hand it the next number instead.
pub fn prepare() {
    if lean() {
        return;
    }
    let _ = fd_dir();
    let _ = fd_table_size();
}

/// In lean mode (see [`LEAN_BELOW`]), from the watchdog: gives up the /proc files it holds (the
/// program lowered its limit with setrlimit, say).
pub fn shed() {
    for c in [&PROC_FD, &PROC_STATUS] {
        let fd = c.swap(-1, AcqRel);
        if fd >= 0 && is_own(fd) {
            close(fd);
        }
    }
}

/// Until when (coarse monotonic seconds) keepfix opens no /proc file again after giving its own
/// back: the program needed those numbers a moment ago.
static GAVE_WAY_UNTIL: AtomicU32 = AtomicU32::new(0);
const GIVE_WAY_S: u32 = 60;

/// Gives the program back the fds keepfix can do without (the cached /proc files): accept() hit
/// EMFILE, and those numbers would be free without keepfix. For a minute keepfix then opens no
/// /proc file (no fd count, no census: the log says `used=` only from what it knows). Returns
/// how many it closed. Async-signal-safe.
pub fn give_way() -> usize {
    GAVE_WAY_UNTIL.store(sys::now_s().wrapping_add(GIVE_WAY_S), Relaxed);
    [&PROC_FD, &PROC_STATUS]
        .iter()
        .filter(|c| {
            let fd = c.swap(-1, AcqRel);
            fd >= 0 && is_own(fd) && {
                close(fd);
                true
            }
        })
        .count()
}

/// keepfix's thread found one of its long-lived fds gone (a close-everything loop, a closefrom,
/// give_way): it never opens one itself, since an open() takes the lowest free number for an
/// instant, which another thread of the program may be about to get. The next listen, accept or
/// connect reopens it, in the program's thread, after the program's own call (see [`reopen_wanted`]).
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Is a long-lived fd of keepfix's to be made again? One relaxed load, for the hooks.
#[inline]
pub fn reopen_wanted() -> bool {
    REOPEN.load(Relaxed)
}

/// Asks the next listen/accept/connect hook to make keepfix's long-lived fds again.
pub fn want_reopen() {
    REOPEN.store(true, Relaxed);
}

/// In the program's thread, from a hook: clears the request (the caller makes the fds).
pub fn take_reopen() -> bool {
    REOPEN.swap(false, Relaxed)
}

fn proc_file(cell: &AtomicI32, path: &str, flags: OFlags) -> Option<RawFd> {
    if lean() {
        return None;
    }
    let until = GAVE_WAY_UNTIL.load(Relaxed);
    if until != 0 && sys::now_s() < until {
        let fd = cell.load(Acquire);
        return (fd >= 0 && is_own(fd)).then_some(fd);
    }
    if crate::hooksafe::settings::on_watchdog_thread() {
        let fd = cell.load(Acquire);
        if fd >= 0 && is_own(fd) && PROC_PID.load(Relaxed) == sys::getpid() {
            return Some(fd);
        }
        want_reopen();
        return None;
    }
    let pid = sys::getpid();
    if PROC_PID.load(Relaxed) != pid {
        for c in [&PROC_FD, &PROC_STATUS] {
            let old = c.swap(-1, AcqRel);
            if old >= 0 {
                close(old);
            }
        }
        PROC_PID.store(pid, Relaxed);
    }
    cached(cell, || install(sys::own(rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty()).ok()?)))
}

/// After the process entered a namespace: opens /proc/self/fd and /proc/self/status again, from
/// the program's thread (before the watchdog starts again). A /proc file shows ids as its
/// opener's user namespace maps them, so the old ones would show the leader's ids as another
/// namespace sees them. One that cannot be opened (a mount namespace whose /proc is another pid
/// namespace's) stays as it was.
pub fn refresh_proc_files() {
    if PROC_PID.load(Relaxed) != sys::getpid() {
        return;
    }
    for (cell, path, flags) in [
        (&PROC_FD, "/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY),
        (&PROC_STATUS, "/proc/self/status", OFlags::RDONLY),
    ] {
        let Some(new) =
            rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty()).ok().and_then(|f| install(sys::own(f)))
        else {
            continue;
        };
        let old = cell.swap(new, AcqRel);
        if old >= 0 {
            close(old);
        }
    }
}

fn fd_dir() -> Option<RawFd> {
    proc_file(&PROC_FD, "/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY)
}

/// A new high duplicate of keepfix's own fd `src` (the reserve, from the epoll fd), made without
/// ever taking a low number, and marked Own.
pub fn dup_own(src: RawFd) -> Option<RawFd> {
    let fd = with(src, |n| rustix::io::fcntl_dupfd_cloexec(n, base()).ok())??;
    let fd = sys::own(fd);
    fdtable::slot_alloc(fd.raw())?.set_own(fd.raw());
    Some(fd.into_raw())
}

/// A private duplicate of the program's fd `fd`, at a high number (never the lowest free one a
/// program thread may be about to get), closed by raw syscall when dropped. Not marked Own: it is
/// used and closed by the same call of keepfix's.
pub fn dup_high(fd: RawFd) -> Option<Fd> {
    rustix::io::fcntl_dupfd_cloexec(sys::borrow(fd)?, base()).ok().map(sys::own)
}

/// The open /proc/self/fd directory of this process, for the watchdog's scans (each call on it
/// through [`with`]).
pub fn proc_fd_dir() -> Option<RawFd> {
    fd_dir()
}

/// The number of open fds of this process, for one fstat: since Linux 6.2 the size of
/// /proc/PID/fd is that count (the kernel weighs its open-fd bitmap), where reading the directory
/// costs about a microsecond per fd. `None` on older kernels, which report 0.
pub fn open_fd_count() -> Option<u64> {
    let st = with(fd_dir()?, |d| rustix::fs::fstat(d).ok())??;
    u64::try_from(st.st_size).ok().filter(|&n| n > 0)
}

/// The size of this process's kernel fd table (FDSize in /proc/self/status): a power of two at
/// least as large as the number of open fds, read at the same cost whatever that number is.
pub fn fd_table_size() -> Option<u64> {
    let fd = proc_file(&PROC_STATUS, "/proc/self/status", OFlags::RDONLY)?;
    let mut buf = [0u8; 2048];
    let n = with(fd, |f| rustix::io::pread(f, &mut buf, 0).ok())??;
    let text = core::str::from_utf8(buf.get(..n)?).ok()?;
    let rest = text.get(text.find("FDSize:")? + 7..)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The thread group leader's real, effective and saved uid, then gid, from /proc/self/status
/// (which describes the leader), in the order of [`sys::thread_ids`].
pub fn leader_ids() -> Option<[u32; 6]> {
    let fd = proc_file(&PROC_STATUS, "/proc/self/status", OFlags::RDONLY)?;
    let mut buf = [0u8; 2048];
    let n = with(fd, |f| rustix::io::pread(f, &mut buf, 0).ok())??;
    let text = core::str::from_utf8(buf.get(..n)?).ok()?;
    let mut out = [0u32; 6];
    for (k, key) in ["\nUid:", "\nGid:"].iter().enumerate() {
        let rest = text.get(text.find(key)? + key.len()..)?;
        let mut it = rest.split_whitespace();
        for i in 0..3 {
            *out.get_mut(k * 3 + i)? = it.next()?.parse().ok()?;
        }
    }
    Some(out)
}
