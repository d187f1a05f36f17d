//! Releasing what the program forgot, in whichever thread acts: the rules that say a socket is
//! in use, shared or forgotten, and the vacate (freeing a number) that a hook at EMFILE or the
//! watchdog near the limit performs inside the fd table's release protocol. The totals since
//! load. Hook-safe: no allocation, no lock, bounded.

use crate::config::{CloseWaitMode, Unread};
use crate::hooksafe::fdtable::{self, Meta, Role, State, flag};
use crate::hooksafe::settings::Runtime;
use crate::sys::{self, tcp_state};
use core::sync::atomic::{AtomicU64, Ordering::*};
use rustix::fd::RawFd;

/// Totals since load, for metrics and summaries.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub found: u64,
    pub logged: u64,
    pub shutdown: u64,
    pub vacated: u64,
    pub unread_kept: u64,
}

pub static FOUND: AtomicU64 = AtomicU64::new(0);
pub static LOGGED: AtomicU64 = AtomicU64::new(0);
pub static SHUT: AtomicU64 = AtomicU64::new(0);
pub static VACATED: AtomicU64 = AtomicU64::new(0);
pub static UNREAD_KEPT: AtomicU64 = AtomicU64::new(0);
/// The program closed a number keepfix had vacated.
pub static PROGRAM_CLOSED: AtomicU64 = AtomicU64::new(0);
/// How long a socket another process may share must be quiet before keepfix acts on it.
pub const SHARED_QUIET_MS: u64 = 2_000;

pub fn totals() -> Totals {
    Totals {
        found: FOUND.load(Relaxed),
        logged: LOGGED.load(Relaxed),
        shutdown: SHUT.load(Relaxed),
        vacated: VACATED.load(Relaxed),
        unread_kept: UNREAD_KEPT.load(Relaxed),
    }
}

pub fn note_program_closed(_vacated: bool) {
    PROGRAM_CLOSED.fetch_add(1, Relaxed);
}

pub fn program_closed() -> u64 {
    PROGRAM_CLOSED.load(Relaxed)
}

/// Marks the socket as acted on (shut down, dead, or left for SIGPIPE's sake): the same socket
/// (generation), whatever flags a hook set meanwhile (SAW_EOF, say).
pub fn mark_acted(slot: &fdtable::Slot, m: Meta) {
    slot.update(|cur| (cur.is_tracked() && cur.generation() == m.generation()).then(|| cur.with_flags(flag::ACTED, 0)));
}

/// Is the connection still in use, so that nothing may be done to it yet? Something unsent or
/// unacknowledged (SIOCOUTQ), or data sent (by any process that holds the socket: TCP_INFO sees
/// them all) within KEEPFIX_CLOSE_WAIT_AFTER, or within 2 s for a socket another fd or process
/// may share (a forked child may be streaming to a peer that half-closed).
pub fn in_use(fd: RawFd, info: &sys::TcpInfo, m: Meta, slot: &fdtable::Slot, after_ms: u64) -> bool {
    if info.state == tcp_state::CLOSE {
        // Reset or timed out: nothing can be sent any more (and SIOCOUTQ keeps counting the
        // bytes that were in flight when the reset came).
        return false;
    }
    let quiet = if maybe_shared(m, slot) { after_ms.max(SHARED_QUIET_MS) } else { after_ms };
    sys::unsent_bytes(fd) > 0 || u64::from(info.last_data_sent_ms) < quiet
}

/// May another fd of this process, or another process, hold this socket? Duplicated (SHARED),
/// seen before a fork, or inherited at exec.
pub fn maybe_shared(m: Meta, slot: &fdtable::Slot) -> bool {
    m.has(flag::SHARED)
        || slot.info().1 != fdtable::fork_epoch()
        || matches!(m.role(), Role::Inherited | Role::InheritedListener)
}

/// Bytes received and not yet read by the program (SIOCINQ).
pub fn unread_bytes(fd: RawFd) -> u32 {
    sys::borrow(fd).and_then(|b| rustix::io::ioctl_fionread(b).ok()).map_or(0, |n| n.min(u64::from(u32::MAX)) as u32)
}

/// Is the socket at `fd` (word `m`) one the program is provably done with, so that its number may
/// be freed? See the module's rules. Returns its inode if so. A few system calls, no allocation.
pub fn forgotten(rt: &Runtime, fd: RawFd, m: Meta, slot: &fdtable::Slot) -> Option<(u64, u32)> {
    if !m.is_tracked() || !m.has(flag::SAW_EOF) || m.role().is_listener() || maybe_shared(m, slot) {
        return None;
    }
    let info = sys::tcp_info(fd).ok()?;
    if !matches!(info.state, tcp_state::CLOSE_WAIT | tcp_state::CLOSE | tcp_state::LAST_ACK) {
        return None;
    }
    if in_use(fd, &info, m, slot, rt.cfg.close_wait_after_ms)
        || u64::from(info.last_data_recv_ms) < rt.cfg.close_wait_after_ms
        || (rt.cfg.close_wait_unread == Unread::Keep && unread_bytes(fd) > 0)
    {
        return None;
    }
    let st = rustix::fs::fstat(sys::borrow(fd)?).ok()?;
    (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some((st.st_ino, info.last_data_recv_ms))
}

/// The `K` entries with the greatest key seen by [`Oldest::offer`], in a fixed array: the
/// EMFILE path runs in a hook, where nothing may allocate.
struct Oldest<const K: usize> {
    items: [(u64, RawFd, Meta, u64); K],
    len: usize,
}

impl<const K: usize> Oldest<K> {
    fn new() -> Self {
        Oldest { items: [(0, -1, Meta(0), 0); K], len: 0 }
    }
    fn offer(&mut self, key: u64, fd: RawFd, m: Meta, ino: u64) {
        let pos = self.items.iter().take(self.len).position(|it| it.0 < key).unwrap_or(self.len);
        if pos >= K {
            return;
        }
        if let Some(tail) = self.items.get_mut(pos..) {
            tail.rotate_right(1);
        }
        if let Some(it) = self.items.get_mut(pos) {
            *it = (key, fd, m, ino);
        }
        self.len = (self.len + 1).min(K);
    }
    fn iter(&self) -> impl Iterator<Item = &(u64, RawFd, Meta, u64)> {
        self.items.iter().take(self.len)
    }
}

/// Frees the number `fd`: closes the socket there for good, inside the release protocol, if the
/// slot still holds `m`, the fd still holds the socket of inode `ino`, and it is still
/// forgotten. SO_LINGER goes off first, so the close cannot wait. The number becomes Vacated: a
/// later close() of it by the program is answered 0. Signals are blocked meanwhile (a handler in
/// this thread that closed the number would wait on this very release).
pub fn vacate(rt: &Runtime, fd: RawFd, m: Meta, ino: u64) -> bool {
    let Some(s) = fdtable::slot(fd) else { return false };
    let _blocked = sys::SignalsBlocked::all();
    let Some(rel) = s.begin_release(fd, m, ino) else { return false };
    let same = sys::borrow(fd).and_then(|b| rustix::fs::fstat(b).ok()).is_some_and(|st| st.st_ino == ino);
    if !same || forgotten(rt, fd, m, s).is_none() {
        s.end_release(fd, rel, rel.with_state(State::Tracked), false);
        return false;
    }
    sys::linger_off(fd);
    // The last check: a program close() from here on is handed over to end_release.
    let closed = s.still(rel) && sys::close_raw(fd).is_ok();
    let ok = s.end_release(fd, rel, rel.with_state(State::Vacated), closed);
    if closed {
        VACATED.fetch_add(1, Relaxed);
    }
    closed && ok
}

/// Frees up to 8 numbers of forgotten sockets, oldest data first, from the accept() hook at
/// EMFILE: no allocation, at most `budget` fds looked at. Returns how many were freed, and how
/// many it tried (a try fails when a slot changed meanwhile).
pub fn vacate_forgotten(rt: &Runtime, budget: usize) -> (usize, usize) {
    if rt.cfg.close_wait != CloseWaitMode::Close {
        return (0, 0);
    }
    let mut checked = 0usize;
    let mut oldest = Oldest::<8>::new();
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if checked >= budget || !m.is_tracked() || !m.has(flag::SAW_EOF) {
            return;
        }
        checked += 1;
        if let Some((ino, idle_ms)) = forgotten(rt, fd, m, s) {
            oldest.offer(u64::from(idle_ms), fd, m, ino);
        }
    });
    let tried = oldest.iter().count();
    let mut freed = 0;
    for &(_, fd, m, ino) in oldest.iter() {
        if vacate(rt, fd, m, ino) {
            freed += 1;
            crate::hooksafe::ring::defer(
                crate::hooksafe::ring::Deferred::ReleasedAtEmfile,
                fd,
                i64::from(tcp_state::CLOSE_WAIT),
                0,
            );
        }
    }
    (freed, tried)
}
