//! RLIMIT_NOFILE in the hooks: the highest fd number seen (accept() returns the lowest free one,
//! so fd N means at least N+1 are open), the reserve fd, select() past FD_SETSIZE, and EMFILE
//! in accept(). When accept() fails with EMFILE, the hook first frees the numbers of sockets the
//! program is provably done with (close mode, see release) and retries; failing that, and only
//! if a connection is waiting and no other process may share the listener (one that could serve
//! it), it uses a reserve fd to accept that connection and close it at once, so the client is not
//! left hanging and a level-triggered loop does not spin. The program still gets EMFILE.
//! Hook-safe: no allocation, no lock.

use crate::config::CloseWaitMode;
use crate::hooksafe::fdtable::{self};
use crate::hooksafe::ownfd;
use crate::hooksafe::ring::{self, Deferred};
use crate::hooksafe::settings::Runtime;
use crate::hooksafe::{release, wake};
use crate::sys::{self, errno, set_errno};
use core::ffi::c_int;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering::*};
use rustix::fd::RawFd;
use rustix::process::{Resource, getrlimit};

pub static MAX_FD_SEEN: AtomicI32 = AtomicI32::new(-1);
/// accept() returning an fd at or above this wakes the watchdog (3/4 of the soft limit).
static POKE_AT: AtomicI32 = AtomicI32::new(i32::MAX);
static RESERVE: AtomicI32 = AtomicI32::new(-1);
static EMFILE_EVENTS: AtomicU64 = AtomicU64::new(0);
static EMFILE_REJECTED: AtomicU64 = AtomicU64::new(0);
static SELECT_LOGGED: AtomicBool = AtomicBool::new(false);
static SELECT_TOO_BIG: AtomicU64 = AtomicU64::new(0);

/// What accept_failed did, in the deferred Emfile event.
pub const EMFILE_NOTHING: i64 = 0;
pub const EMFILE_FREED: i64 = 1;
pub const EMFILE_REJECTED_CONNECTION: i64 = 2;
pub const EMFILE_NO_RESERVE: i64 = 3;
pub const EMFILE_SHARED_LISTENER: i64 = 4;

pub fn emfile_events() -> (u64, u64) {
    (EMFILE_EVENTS.load(Relaxed), EMFILE_REJECTED.load(Relaxed))
}

/// An fd number the kernel just returned from accept(): at least that many fds are open.
#[inline]
pub fn saw_fd(fd: c_int) {
    if fd > MAX_FD_SEEN.load(Relaxed) {
        MAX_FD_SEEN.fetch_max(fd, Relaxed);
    }
    if fd >= POKE_AT.load(Relaxed) {
        wake::poke();
    }
}

/// The reserve fd (an Own /dev/null), or -1.
pub fn reserve_fd() -> RawFd {
    RESERVE.load(Acquire)
}

/// Sets the fd number from which accept() wakes the watchdog (the soft limit may change).
pub fn set_poke_at(soft: u64) {
    POKE_AT.store(i32::try_from(soft / 4 * 3).unwrap_or(i32::MAX), Relaxed);
}

/// select()/pselect() with nfds > FD_SETSIZE: fd_set holds 1024 bits, so the kernel reads and
/// writes past it. Logged once as an error; counted always.
pub fn select_too_big(nfds: c_int) {
    SELECT_TOO_BIG.fetch_add(1, Relaxed);
    if !SELECT_LOGGED.swap(true, Relaxed) {
        ring::defer(Deferred::SelectTooBig, -1, i64::from(nfds), 0);
    }
}

pub fn select_too_big_count() -> u64 {
    SELECT_TOO_BIG.load(Relaxed)
}

/// The soft and hard RLIMIT_NOFILE keepfix last knew (-1 unlimited, -2 not read yet).
static KNOWN_SOFT: AtomicI64 = AtomicI64::new(-2);
static KNOWN_HARD: AtomicI64 = AtomicI64::new(-2);

fn nofile_now() -> (i64, i64) {
    let l = getrlimit(Resource::Nofile);
    let v = |x: Option<u64>| x.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
    (v(l.current), v(l.maximum))
}

/// At load: the limits the program starts with.
pub fn note_limits() {
    let (soft, hard) = nofile_now();
    KNOWN_SOFT.store(soft, Relaxed);
    KNOWN_HARD.store(hard, Relaxed);
}

/// setrlimit/prlimit succeeded on RLIMIT_NOFILE: if a value changed (a JVM sets them to what they
/// already are), note the new limits for the log. One getrlimit.
pub fn limit_changed() {
    let (soft, hard) = nofile_now();
    let old_soft = KNOWN_SOFT.swap(soft, Relaxed);
    let old_hard = KNOWN_HARD.swap(hard, Relaxed);
    if (old_soft, old_hard) != (soft, hard) {
        ring::defer(Deferred::RlimitChanged, -1, soft, hard);
    }
}

/// Makes the reserve fd: when the watchdog starts, and again after each use. It is a dup of
/// keepfix's /dev/null, so it never takes a low number.
pub fn open_reserve() {
    let r = RESERVE.load(Acquire);
    if ownfd::lean() {
        // No reserve below ownfd::LEAN_BELOW: that fd is the program's.
        if r >= 0 && RESERVE.compare_exchange(r, -1, AcqRel, Acquire).is_ok() {
            ownfd::close(r);
        }
        return;
    }
    if r >= 0 && ownfd::is_own(r) {
        return;
    }
    let Some(ep) = wake::epoll_fd() else { return };
    if let Some(fd) = ownfd::dup_own(ep) {
        if RESERVE.compare_exchange(r, fd, AcqRel, Acquire).is_err() {
            ownfd::close(fd);
        }
    }
}

fn connection_pending(lfd: RawFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let Some(b) = sys::borrow(lfd) else { return false };
    let mut p = [PollFd::new(&b, PollFlags::IN)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    poll(&mut p, Some(&zero)).is_ok_and(|n| n > 0) && p[0].revents().contains(PollFlags::IN)
}

/// May another process hold this listener? Made before the latest fork, duplicated, inherited at
/// exec or from systemd, or not tracked at all (unknown counts as shared).
fn listener_maybe_shared(lfd: RawFd) -> bool {
    fdtable::slot(lfd).is_none_or(|s| {
        let m = s.load();
        !m.is_tracked()
            || m.role() != fdtable::Role::Listener
            || m.has(fdtable::flag::SHARED)
            || s.info().1 != fdtable::fork_epoch()
    })
}

/// accept()/accept4() failed with EMFILE or ENFILE (errno `e`). `retry` calls the real accept
/// again; `accepted` tracks a socket it returns. Returns what the program gets, with its errno.
pub fn accept_failed(
    rt: &'static Runtime,
    lfd: RawFd,
    e: c_int,
    retry: &mut dyn FnMut() -> c_int,
    accepted: &dyn Fn(c_int),
) -> c_int {
    EMFILE_EVENTS.fetch_add(1, Relaxed);
    wake::poke();
    if rt.cfg.close_wait == CloseWaitMode::Close {
        // A few rounds: while the watchdog releases a batch, the slots this scan picked change
        // under it, and every try fails although there is plenty to free a moment later.
        for _round in 0..4 {
            // Releases in this thread: a signal handler here must not close one half-way.
            let (freed, tried) = release::vacate_forgotten(rt, 4096);
            if freed == 0 {
                if tried == 0 {
                    break;
                }
                rustix::thread::sched_yield();
                continue;
            }
            let r = retry();
            if r >= 0 {
                accepted(r);
                ring::defer(Deferred::Emfile, lfd, EMFILE_FREED, freed as i64);
                return r;
            }
            let e2 = errno();
            if e2 != libc::EMFILE && e2 != libc::ENFILE {
                return r;
            }
        }
    }
    // keepfix gives back the fds it can do without: without keepfix those numbers would be free.
    if ownfd::give_way() > 0 {
        let r = retry();
        if r >= 0 {
            accepted(r);
            return r;
        }
        let e2 = errno();
        if e2 != libc::EMFILE && e2 != libc::ENFILE {
            return r;
        }
    }
    // Never block where libc would not have: only with a connection already waiting.
    let mut action = EMFILE_NOTHING;
    if listener_maybe_shared(lfd) {
        // Another process holding this listener (a prefork sibling, the parent that passed it
        // on) may have fds to spare: the connection is theirs to serve, not ours to turn away.
        action = EMFILE_SHARED_LISTENER;
    } else if connection_pending(lfd) {
        let reserve = RESERVE.swap(-1, AcqRel);
        if reserve >= 0 && ownfd::is_own(reserve) {
            ownfd::close(reserve);
            let r = retry();
            if r >= 0 {
                // SAFETY: the connection we just accepted; the program never saw it.
                unsafe { rustix::io::close(r) };
                EMFILE_REJECTED.fetch_add(1, Relaxed);
                action = EMFILE_REJECTED_CONNECTION;
            }
            open_reserve();
        } else {
            action = EMFILE_NO_RESERVE;
        }
    }
    ring::defer(Deferred::Emfile, lfd, action, i64::from(e));
    set_errno(e);
    -1
}

/// The soft and hard limits, `u64::MAX` for unlimited.
pub fn limits() -> (u64, u64) {
    let l = getrlimit(Resource::Nofile);
    (l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX))
}
