//! Listing the process's open fds (/proc/self/fd, or probing the first numbers without /proc),
//! for the census and for adoption at load. Allocates: never from a hook.

use crate::sys;
use rustix::fd::{BorrowedFd, RawFd};

/// Calls `f` with every open fd number, from /proc/self/fd. False if /proc is not there.
/// The watchdog reads the directory through a cached fd of its own (no new fd, so it never takes
/// a number the program is about to get); the constructor, before main(), opens it afresh.
pub fn for_each_open_fd(f: &mut dyn FnMut(RawFd)) -> bool {
    use rustix::fs::{Mode, OFlags};
    if crate::hooksafe::settings::on_watchdog_thread() {
        let Some(dir) = crate::hooksafe::ownfd::proc_fd_dir() else { return probe_fds(f) };
        let fds = crate::hooksafe::ownfd::with(dir, |b| {
            rustix::fs::seek(b, rustix::fs::SeekFrom::Start(0)).ok()?;
            Some(read_fd_dir(b, None))
        });
        let Some(Some(fds)) = fds else { return false };
        for fd in fds {
            f(fd);
        }
        return true;
    }
    let transient;
    let dir = {
        let Ok(d) =
            rustix::fs::open("/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        else {
            return probe_fds(f);
        };
        transient = Some(sys::own(d));
        transient.as_ref().map_or(-1, |d| d.raw())
    };
    let Some(b) = sys::borrow(dir) else { return false };
    let fds = read_fd_dir(b, Some(dir));
    drop(transient);
    for fd in fds {
        f(fd);
    }
    true
}

/// The largest soft limit below which the fds are probed one by one when /proc cannot be read.
pub const PROBE_MAX: u64 = 16384;

/// When keepfix's thread last probed more than ownfd::LEAN_BELOW numbers (ms, 0: never).
static PROBED_AT_MS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// May `n` numbers be probed now? Always for a few (lean mode) and off keepfix's thread; on it,
/// at most once a second: /proc/self/fd is given back for a minute at EMFILE, and a probe of
/// every number each tick (every 10 ms, say) would take the CPU the program needs to catch up.
/// A count that is not taken is said to be so (not_counted, no fd gauge), never made up.
/// The next probe is allowed whatever the time: for a census (an EMFILE line, a warning level),
/// which is rare and which an operator reads.
pub fn allow_next_probe() {
    PROBED_AT_MS.store(0, core::sync::atomic::Ordering::Relaxed);
}

pub fn probe_allowed(n: u64) -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    if n <= crate::hooksafe::ownfd::LEAN_BELOW || !crate::hooksafe::settings::on_watchdog_thread() {
        return true;
    }
    let now = sys::now_ms().max(1);
    let at = PROBED_AT_MS.load(Relaxed);
    if at != 0 && now < at + 1000 {
        return false;
    }
    PROBED_AT_MS.store(now, Relaxed);
    true
}

/// Without a /proc/self/fd to read (lean mode, see ownfd::LEAN_BELOW, or no fd free to open it
/// with): asks the kernel about each number below the soft limit, one fcntl(F_GETFD) each,
/// opening nothing.
fn probe_fds(f: &mut dyn FnMut(RawFd)) -> bool {
    let Some(soft) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current else { return false };
    // One fcntl per number: at most PROBE_MAX (a few milliseconds), on the watchdog's thread or
    // at exit, when /proc/self/fd cannot be read (lean mode, or no fd free to open it with).
    if soft > PROBE_MAX || !probe_allowed(soft) {
        return false;
    }
    for fd in 0..soft as RawFd {
        if sys::fd_exists(fd) {
            f(fd);
        }
    }
    true
}

/// The numbers in an open /proc/PID/fd directory, less `skip` (the directory's own fd).
fn read_fd_dir(b: BorrowedFd<'_>, skip: Option<RawFd>) -> Vec<RawFd> {
    use rustix::fs::RawDir;
    let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 8192];
    let mut fds = Vec::new();
    let mut it = RawDir::new(b, &mut buf);
    while let Some(Ok(ent)) = it.next() {
        if let Some(fd) = ent.file_name().to_str().ok().and_then(|s| s.parse::<RawFd>().ok()) {
            if Some(fd) != skip {
                fds.push(fd);
            }
        }
    }
    fds
}
