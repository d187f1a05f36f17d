//! The watchdog's wake-up and its epoll set: the futex word a hook pokes for a tick now (the fd
//! table is nearly full), and the epoll set of long-lived connections the detector reads.
//! Hook-safe: poke() is one atomic swap and at most one futex wake.

use crate::hooksafe::ownfd;
use crate::hooksafe::settings::Runtime;
use crate::sys;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering::*};
use rustix::event::epoll;
use rustix::fd::RawFd;

/// The watchdog's epoll set.
static EPOLL: AtomicI32 = AtomicI32::new(-1);
/// A hook asked for a tick now (the fd table is nearly full): the watchdog sleeps on this word
/// (a futex: no fd, so nothing of keepfix's can be written into a number the program reused).
static POKE: AtomicU32 = AtomicU32::new(0);

/// Makes the epoll set, in the hook that starts the watchdog (see ownfd on why).
pub fn prepare(_rt: &Runtime) {
    if EPOLL.load(Acquire) >= 0 || ownfd::lean() {
        return;
    }
    if crate::hooksafe::settings::on_watchdog_thread() {
        // Never an open of keepfix's own on its thread (see ownfd::want_reopen).
        ownfd::want_reopen();
        return;
    }
    if let Some(ep) = epoll::create(epoll::CreateFlags::CLOEXEC).ok().and_then(|e| ownfd::install(sys::own(e))) {
        EPOLL.store(ep, Release);
    }
}

/// The epoll set's fd, if keepfix still holds it.
pub fn epoll_fd() -> Option<RawFd> {
    Some(EPOLL.load(Acquire)).filter(|&e| e >= 0 && ownfd::is_own(e))
}

/// Wakes the watchdog for a tick now (the fd table is nearly full). One futex wake, at most
/// once per tick; async-signal-safe.
pub fn poke() {
    if POKE.swap(1, AcqRel) == 0 {
        let _ = rustix::thread::futex::wake(&POKE, rustix::thread::futex::Flags::PRIVATE, 1);
    }
}

/// In a fork child: the epoll set is the parent's; the child makes its own.
pub fn after_fork_child() {
    if EPOLL.load(Relaxed) >= 0 {
        let fd = EPOLL.swap(-1, AcqRel);
        if fd >= 0 {
            ownfd::close(fd);
        }
    }
    if POKE.load(Relaxed) != 0 {
        POKE.store(0, Relaxed);
    }
}

/// The watchdog's sleep: until poked or `timeout_ms` passed. True if poked.
pub fn wait(timeout_ms: u64) -> bool {
    let timeout = rustix::thread::Timespec {
        tv_sec: (timeout_ms / 1000) as i64,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as i64,
    };
    if POKE.load(Acquire) == 0 {
        let _ = rustix::thread::futex::wait(&POKE, rustix::thread::futex::Flags::PRIVATE, 0, Some(&timeout));
    }
    POKE.swap(0, AcqRel) != 0
}

/// The detector lost its set (lean mode, or the program took its number): gives it up.
pub fn drop_epoll() {
    let ep = EPOLL.swap(-1, AcqRel);
    if ep >= 0 {
        ownfd::close(ep);
    }
}

/// The set's number no longer holds it: forget the number (never close it: it is the program's).
pub fn forget_epoll() {
    EPOLL.store(-1, Release);
}
