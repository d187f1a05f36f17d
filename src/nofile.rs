//! RLIMIT_NOFILE: knowing how close the process is to its fd limit, warning in time, and keeping
//! EMFILE in accept() from turning a poll loop into a busy loop.
//!
//! Hot path: accept() returns the lowest free fd, so fd N means at least N+1 fds are open; hooks
//! keep the highest such N in one atomic. The watchdog takes an exact count (reading
//! /proc/self/fd) when that hint or the last count comes near the warning level, and once a minute
//! otherwise. When accept() fails with EMFILE, the hook first frees the numbers of sockets the
//! program is provably done with (close mode, see closewait) and retries; failing that, and only
//! if a connection is waiting and no other process may share the listener (one that could serve
//! it), it uses a reserve fd to accept that connection and close it at once, so the client is not
//! left hanging and a level-triggered loop does not spin. The program still gets EMFILE.

use crate::closewait;
use crate::config::CloseWaitMode;
use crate::fdtable::{self, State};
use crate::log::{self, Deferred, Level, emit};
use crate::ownfd;
use crate::runtime::Runtime;
use crate::sys::{self, errno, set_errno, tcp_state};
use core::ffi::c_int;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::*};
use rustix::fd::RawFd;
use rustix::process::{Resource, getrlimit};

static MAX_FD_SEEN: AtomicI32 = AtomicI32::new(-1);
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
        closewait::poke();
    }
}

/// The reserve fd (an Own /dev/null), or -1.
pub fn reserve_fd() -> RawFd {
    RESERVE.load(Acquire)
}

/// Sets the fd number from which accept() wakes the watchdog (the soft limit may change).
fn set_poke_at(soft: u64) {
    POKE_AT.store(i32::try_from(soft / 4 * 3).unwrap_or(i32::MAX), Relaxed);
}

/// select()/pselect() with nfds > FD_SETSIZE: fd_set holds 1024 bits, so the kernel reads and
/// writes past it. Logged once as an error; counted always.
pub fn select_too_big(nfds: c_int) {
    SELECT_TOO_BIG.fetch_add(1, Relaxed);
    if !SELECT_LOGGED.swap(true, Relaxed) {
        log::defer(Deferred::SelectTooBig, -1, i64::from(nfds), 0);
    }
}

pub fn select_too_big_count() -> u64 {
    SELECT_TOO_BIG.load(Relaxed)
}

/// setrlimit/prlimit changed RLIMIT_NOFILE: note the new limits for the log.
pub fn limit_changed() {
    let l = getrlimit(Resource::Nofile);
    let v = |x: Option<u64>| x.map_or(-1, |v| v.min(i64::MAX as u64) as i64);
    log::defer(Deferred::RlimitChanged, -1, v(l.current), v(l.maximum));
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
    let Some(ep) = closewait::epoll_fd() else { return };
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
    closewait::poke();
    if rt.cfg.close_wait == CloseWaitMode::Close {
        // A few rounds: while the watchdog releases a batch, the slots this scan picked change
        // under it, and every try fails although there is plenty to free a moment later.
        for _round in 0..4 {
            // Releases in this thread: a signal handler here must not close one half-way.
            let (freed, tried) = closewait::vacate_forgotten(rt, 4096);
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
                log::defer(Deferred::Emfile, lfd, EMFILE_FREED, freed as i64);
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
    log::defer(Deferred::Emfile, lfd, action, i64::from(e));
    set_errno(e);
    -1
}

/// Counts by kind of what the process's fds are, for warning lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct Census {
    pub used: u64,
    pub tcp: u64,
    pub tcp_by_state: [u64; 12],
    pub other_sockets: u64,
    pub other_fds: u64,
    pub keepfix: u64,
}

impl Census {
    pub fn take() -> Census {
        let mut c = Census::default();
        crate::keepalive::for_each_open_fd(&mut |fd| {
            c.used += 1;
            let mut tracked = false;
            if let Some(s) = fdtable::slot(fd) {
                match s.load().state() {
                    State::Own => {
                        c.keepfix += 1;
                        return;
                    }
                    State::Tracked => tracked = true,
                    _ => {}
                }
            }
            let Some(b) = sys::borrow(fd) else { return };
            // A socket the table tracks is TCP: one TCP_INFO, no probing.
            if tracked {
                if let Ok(i) = sys::tcp_info(fd) {
                    c.tcp += 1;
                    if let Some(n) = c.tcp_by_state.get_mut(i.state as usize) {
                        *n += 1;
                    }
                    return;
                }
            }
            let is_sock = rustix::fs::fstat(b).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK);
            if !is_sock {
                c.other_fds += 1;
            } else if crate::keepalive::probe_tcp(b).is_some() {
                c.tcp += 1;
                let st = sys::tcp_info(fd).map_or(0, |i| i.state) as usize;
                if let Some(n) = c.tcp_by_state.get_mut(st) {
                    *n += 1;
                }
            } else {
                c.other_sockets += 1;
            }
        });
        c
    }

    /// `tcp=… tcp_established=… tcp_close_wait=… …`, the breakdown part of a line.
    pub fn breakdown(&self) -> impl core::fmt::Display + '_ {
        struct B<'a>(&'a Census);
        impl core::fmt::Display for B<'_> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                let c = self.0;
                let s = |st: u8| c.tcp_by_state.get(st as usize).copied().unwrap_or(0);
                let named =
                    s(tcp_state::ESTABLISHED) + s(tcp_state::CLOSE_WAIT) + s(tcp_state::CLOSE) + s(tcp_state::LISTEN);
                write!(
                    f,
                    "tcp={} tcp_established={} tcp_close_wait={} tcp_close={} tcp_listen={} tcp_other={} other_sockets={} other_fds={} keepfix={}",
                    c.tcp,
                    s(tcp_state::ESTABLISHED),
                    s(tcp_state::CLOSE_WAIT),
                    s(tcp_state::CLOSE),
                    s(tcp_state::LISTEN),
                    c.tcp.saturating_sub(named),
                    c.other_sockets,
                    c.other_fds,
                    c.keepfix
                )
            }
        }
        B(self)
    }
}

/// Counts the open fds: the size of /proc/self/fd, or its entries (less the directory's own).
pub fn count_open_fds() -> Option<u64> {
    if let Some(n) = ownfd::open_fd_count() {
        return Some(n);
    }
    let mut n = 0u64;
    crate::keepalive::for_each_open_fd(&mut |_| n += 1).then_some(n)
}

/// The soft and hard limits, `u64::MAX` for unlimited.
pub fn limits() -> (u64, u64) {
    let l = getrlimit(Resource::Nofile);
    (l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX))
}

/// The watchdog's side: counts, warnings, and freeing the numbers of forgotten sockets near the
/// limit.
pub struct Monitor {
    level: u8,
    last_used: u64,
    ticks: u64,
    last_warn_ms: u64,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new()
    }
}

impl Monitor {
    pub fn new() -> Monitor {
        Monitor { level: 0, last_used: 0, ticks: 0, last_warn_ms: 0 }
    }

    /// The last exact count of open fds.
    pub fn used(&self) -> u64 {
        self.last_used
    }

    pub fn tick(&mut self, rt: &'static Runtime, now: u64, tick_ms: u64) {
        self.ticks += 1;
        let (soft, _) = limits();
        set_poke_at(soft);
        if soft == u64::MAX || soft == 0 {
            return;
        }
        let warn = u64::from(rt.cfg.nofile_warn_pct);
        let close_mode = rt.cfg.close_wait == CloseWaitMode::Close;
        // An exact count reads all of /proc/self/fd: O(fds). It is taken when the cheap bounds say
        // usage may be half way to the warning (the kernel's fd table size, the highest fd accept()
        // returned, the last count), and once a minute anyway.
        let hint = (MAX_FD_SEEN.load(Relaxed).max(-1) + 1) as u64;
        let table = ownfd::fd_table_size().unwrap_or(u64::MAX);
        let watch_from = soft * warn.max(40) / 200;
        let every = (60_000 / tick_ms.max(1)).max(1);
        let need = close_mode
            || table >= watch_from
            || hint.max(self.last_used) >= watch_from
            || self.ticks % every == 1
            || self.level > 0;
        if !need {
            return;
        }
        let Some(used) = count_open_fds() else { return };
        MAX_FD_SEEN.store(-1, Relaxed);
        self.last_used = used;
        if close_mode {
            // Numbers of sockets the program is provably done with are freed, oldest first, only
            // when the table passes 90% of the limit, and then down to 75%.
            let high = soft.saturating_sub((soft / 10).max(2));
            if used >= high {
                let want = used.saturating_sub(soft * 3 / 4) as usize;
                let freed = closewait::vacate_forgotten_many(rt, want.max(1));
                if freed > 0 {
                    emit(
                        Level::Notice,
                        format_args!("vacate count={freed} used={used} limit={soft} reason=near_limit"),
                    );
                    self.last_used = used.saturating_sub(freed as u64);
                }
            }
        }
        if warn == 0 {
            return;
        }
        let used = self.last_used;
        let pct = used * 100 / soft;
        let levels = [warn, warn + (100 - warn.min(100)) / 2, warn + 3 * (100 - warn.min(100)) / 4];
        let reached = levels.iter().rev().find(|&&l| pct >= l).copied().unwrap_or(0) as u8;
        if reached > self.level {
            self.level = reached;
            self.last_warn_ms = now;
            let c = Census::take();
            emit(
                Level::Warning,
                format_args!("nofile used={} limit={soft} pct={pct} level={reached} {}", c.used, c.breakdown()),
            );
        } else if self.level > 0 && pct + 5 < warn {
            self.level = 0;
            emit(Level::Notice, format_args!("nofile_recovered used={used} limit={soft} pct={pct}"));
        }
    }
}

/// KEEPFIX_NOFILE_RAISE=1: the soft limit goes up to the hard limit at load time.
pub fn raise_at_load() {
    let l = getrlimit(Resource::Nofile);
    let (Some(soft), hard) = (l.current, l.maximum) else { return };
    let new = hard.unwrap_or(u64::MAX);
    if new <= soft {
        return;
    }
    let r = rustix::process::setrlimit(Resource::Nofile, rustix::process::Rlimit { current: hard, maximum: hard });
    let shown = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |v| v.to_string());
    match r {
        Ok(()) => emit(
            Level::Notice,
            format_args!(
                "nofile_raise soft={soft} new_soft={} hard={} note=\"select() breaks at fd >= 1024\"",
                shown(hard),
                shown(hard)
            ),
        ),
        Err(e) => {
            emit(Level::Warning, format_args!("nofile_raise soft={soft} action=failed errno={}", e.raw_os_error()))
        }
    }
}
