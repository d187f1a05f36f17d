//! keepfix's own fds: the epoll set, the /dev/null that placeholders and the reserve come from,
//! the reserve fd, the /proc/self/fd directory, and the log file or syslog socket.
//!
//! They are marked Own in the fd table, so the program's close(), close_range() and closefrom()
//! pass them by, and they live just below min(soft limit, 1024), so that the numbers the program
//! gets (lowest free first) are the ones it would get without keepfix. Opening a file gives the
//! lowest free number, though, for an instant: so the long-lived fds are made before the watchdog
//! thread exists (in the hook that starts it), and a later open moves its fd high at once.

use crate::fdtable::{self, State};
use crate::sys::{self, Fd};
use core::sync::atomic::{AtomicI32, Ordering::*};
use rustix::fd::{BorrowedFd, RawFd};
use rustix::fs::{Mode, OFlags};

/// /dev/null, read-write: what placeholders are dup3()ed from.
static NULL: AtomicI32 = AtomicI32::new(-1);
/// /proc/self/fd and /proc/self/status, and the pid they belong to (a forked child needs its own).
static PROC_FD: AtomicI32 = AtomicI32::new(-1);
static PROC_STATUS: AtomicI32 = AtomicI32::new(-1);
static PROC_PID: AtomicI32 = AtomicI32::new(0);

fn base() -> i32 {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024);
    (soft.min(1024) as i32 - 16).max(3)
}

/// Moves `fd` high, marks it Own, and hands the number over (to be closed with [`close`]). If no
/// high number is free, it stays where it is.
pub fn install(fd: Fd) -> Option<RawFd> {
    let fd = high(fd);
    fdtable::slot_alloc(fd.raw())?.set_own();
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

/// Closes one of keepfix's own fds, if it still is one.
pub fn close(fd: RawFd) {
    if let Some(s) = fdtable::slot(fd) {
        if s.load().state() == State::Own {
            s.clear_own();
            // Ours; EBADF in a forked child whose fork raced the open (see sys::close_raw).
            let _ = sys::close_raw(fd);
        }
    }
}

/// In a forked child. fork() copies the fd table before memory while the parent's watchdog
/// runs, so an Own mark may name an fd the child does not have (opened after the copy), or a
/// /proc or temporary fd of the parent's. Keeps the marks of the fds in `keep` the child has,
/// closes every other marked fd it has, and clears the other marks: a program's file that takes
/// such a number later is its own. Async-signal-safe (a _Fork() child runs it from a hook).
pub fn after_fork_child(keep: &[RawFd]) {
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        if s.load().state() != State::Own {
            return;
        }
        let present = sys::fd_exists(fd);
        if present && keep.contains(&fd) {
            return;
        }
        s.clear_own();
        if present {
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
            s.set_own();
        }
        Ok(Temp(fd.into_raw()))
    }
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: open while self lives (or the program's now, and then kernel-checked).
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        match fdtable::slot(self.0) {
            Some(s) if s.load().state() != State::Own => {}
            Some(s) => {
                s.clear_own();
                let _ = sys::close_raw(self.0);
            }
            // Ours (the table had no room to mark it).
            None => {
                let _ = sys::close_raw(self.0);
            }
        }
    }
}

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

/// Opens the long-lived fds the watchdog uses, from the hook that starts it: an open() takes
/// the lowest free number for an instant, which on the watchdog's thread could race a program
/// thread's own open() and hand it the next number instead.
pub fn prepare() {
    let _ = null();
    let _ = proc_fd_dir();
    let _ = fd_table_size();
}

/// The /dev/null placeholders are made from, opened on first use.
pub fn null() -> Option<RawFd> {
    cached(&NULL, || {
        let f = rustix::fs::open("/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).ok()?;
        install(sys::own(f))
    })
}

/// The /dev/null fd if it is open, without opening it.
pub fn null_fd() -> RawFd {
    NULL.load(Acquire)
}

/// A new high fd for /dev/null (the reserve), made without ever taking a low number.
pub fn dup_null() -> Option<RawFd> {
    let n = sys::borrow(null()?)?;
    let fd = sys::own(rustix::io::fcntl_dupfd_cloexec(n, base()).ok()?);
    fdtable::slot_alloc(fd.raw())?.set_own();
    Some(fd.into_raw())
}

/// The /proc files of this process the watchdog reads every tick, kept open so that reading them
/// takes no new fd. Inherited across fork they are the parent's: a child opens its own.
fn proc_file(cell: &AtomicI32, path: &str, flags: OFlags) -> Option<RawFd> {
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

fn fd_dir() -> Option<RawFd> {
    proc_file(&PROC_FD, "/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY)
}

/// The open /proc/self/fd directory of this process, rewound, for the watchdog's scans.
pub fn proc_fd_dir() -> Option<RawFd> {
    let fd = fd_dir()?;
    rustix::fs::seek(sys::borrow(fd)?, rustix::fs::SeekFrom::Start(0)).ok()?;
    Some(fd)
}

/// The number of open fds of this process, for one fstat: since Linux 6.2 the size of
/// /proc/PID/fd is that count (the kernel weighs its open-fd bitmap), where reading the directory
/// costs about a microsecond per fd. `None` on older kernels, which report 0.
pub fn open_fd_count() -> Option<u64> {
    let st = rustix::fs::fstat(sys::borrow(fd_dir()?)?).ok()?;
    u64::try_from(st.st_size).ok().filter(|&n| n > 0)
}

/// The size of this process's kernel fd table (FDSize in /proc/self/status): a power of two at
/// least as large as the number of open fds, read at the same cost whatever that number is.
pub fn fd_table_size() -> Option<u64> {
    let fd = proc_file(&PROC_STATUS, "/proc/self/status", OFlags::RDONLY)?;
    let mut buf = [0u8; 2048];
    let n = rustix::io::pread(sys::borrow(fd)?, &mut buf, 0).ok()?;
    let text = core::str::from_utf8(buf.get(..n)?).ok()?;
    let rest = text.get(text.find("FDSize:")? + 7..)?;
    rest.split_whitespace().next()?.parse().ok()
}
