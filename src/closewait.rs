//! CLOSE_WAIT: finding the sockets a program forgot (the peer closed, the program never did) and
//! logging, shutting down or releasing them, safely.
//!
//! ## Detection: cost grows with leaks, not with connections
//! Every connection that outlives a scan tick is added once to the watchdog's own edge-triggered
//! epoll set, for EPOLLRDHUP (the peer's FIN) and EPOLLHUP/EPOLLERR (a reset, a keepalive
//! timeout). Traffic never wakes it: data wake-ups do not match those events. A socket closed by
//! the program leaves the set by itself. So a tick costs O(new long-lived connections + events +
//! suspects), and each suspect is re-checked with TCP_INFO before anything is done.
//!
//! ## Acting
//! `log` writes one line. `shutdown` sends our FIN and wakes the program. `close` shuts the socket
//! down and then swaps a placeholder (/dev/null) onto its number with dup3, keeping FD_CLOEXEC:
//! the socket is gone, the number stays the program's, and its own later close() just closes the
//! placeholder. Near RLIMIT_NOFILE the oldest placeholders are really closed ("vacated"), but only
//! those whose socket's end (EOF or error) the program had read when keepfix released it: a
//! program that has not seen the end (a pool yet to notice) may still write to the number, and a
//! vacated number goes to the next file it opens. Every
//! action happens inside the fd table's release protocol, so it can never hit a number the program
//! closed and reused meanwhile. A socket with unread data is kept unless
//! KEEPFIX_CLOSE_WAIT_UNREAD=drop; shutdown() sends our FIN after any data still queued, and a
//! close with an empty receive queue never sends a reset.

use crate::addr;
use crate::config::{CloseWaitMode, Unread};
use crate::fdtable::{self, Meta, Role, State, flag};
use crate::log::{Level, emit};
use crate::ownfd;
use crate::runtime::Runtime;
use crate::sys::{self, tcp_state};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::*};
use rustix::event::epoll;
use rustix::fd::RawFd;
use std::collections::HashMap;

/// Totals since load, for metrics and summaries.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub found: u64,
    pub logged: u64,
    pub shutdown: u64,
    pub closed: u64,
    pub vacated: u64,
    pub unread_kept: u64,
}

static FOUND: AtomicU64 = AtomicU64::new(0);
static LOGGED: AtomicU64 = AtomicU64::new(0);
static SHUT: AtomicU64 = AtomicU64::new(0);
static CLOSED: AtomicU64 = AtomicU64::new(0);
static VACATED: AtomicU64 = AtomicU64::new(0);
static UNREAD_KEPT: AtomicU64 = AtomicU64::new(0);
/// The program closed a number keepfix had released (placeholder, or vacated).
static PROGRAM_CLOSED: AtomicU64 = AtomicU64::new(0);
/// The watchdog's epoll set, and the eventfd in it that hooks use to wake the watchdog early.
static EPOLL: AtomicI32 = AtomicI32::new(-1);
static WAKE: AtomicI32 = AtomicI32::new(-1);
static POKED: AtomicBool = AtomicBool::new(false);
const WAKE_DATA: u64 = u64::MAX;

/// Makes the epoll set and its eventfd, in the hook that starts the watchdog (see ownfd on why).
pub fn prepare(_rt: &Runtime) {
    if EPOLL.load(Acquire) >= 0 {
        return;
    }
    let Some(ep) = epoll::create(epoll::CreateFlags::CLOEXEC).ok().and_then(|e| ownfd::install(sys::own(e))) else {
        return;
    };
    let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
    if let Some(w) = rustix::event::eventfd(0, flags).ok().and_then(|w| ownfd::install(sys::own(w))) {
        if let (Some(e), Some(b)) = (sys::borrow(ep), sys::borrow(w)) {
            let _ = epoll::add(e, b, epoll::EventData::new_u64(WAKE_DATA), epoll::EventFlags::IN);
        }
        WAKE.store(w, Release);
    }
    EPOLL.store(ep, Release);
}

/// Wakes the watchdog for a tick now (the fd table is nearly full). One write, at most once per
/// tick; async-signal-safe.
pub fn poke() {
    if POKED.swap(true, AcqRel) {
        return;
    }
    if let Some(w) = sys::borrow(WAKE.load(Acquire)).filter(|_| ownfd::is_own(WAKE.load(Relaxed))) {
        let _ = rustix::io::write(w, &1u64.to_ne_bytes());
    }
}

pub fn totals() -> Totals {
    Totals {
        found: FOUND.load(Relaxed),
        logged: LOGGED.load(Relaxed),
        shutdown: SHUT.load(Relaxed),
        closed: CLOSED.load(Relaxed),
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

/// In a fork child: the epoll set and the eventfd are the parent's; the child makes its own.
pub fn after_fork_child() {
    // The inherited epoll fd is the parent's set: the child makes its own.
    for cell in [&EPOLL, &WAKE] {
        let fd = cell.swap(-1, AcqRel);
        if fd >= 0 {
            ownfd::close(fd);
        }
    }
    POKED.store(false, Relaxed);
}

/// A socket found left behind.
struct Leak {
    generation: u32,
    ino: u64,
    first_ms: u64,
    /// Peer and local address, read when first seen (SO_PEERNAME still works later, but the
    /// number may have been released by then).
    peer: addr::Addr,
    local: addr::Addr,
    state: u8,
    unread: u32,
    /// An `unread` line was written for it already.
    unread_logged: bool,
    /// What was done: None while waiting for KEEPFIX_CLOSE_WAIT_AFTER.
    done: Option<&'static str>,
}

/// What a release attempt ended with.
enum Outcome {
    /// The slot changed under us: the program closed or reused the number. Nothing was done.
    Raced,
    /// The fd no longer holds the socket we saw (closed behind our back): forgotten.
    Gone,
    /// The socket is not in CLOSE_WAIT or dead any more (the program shut it down, say).
    NotLeaked,
    KeptUnread(u32),
    ShutDown(&'static str),
    /// Replaced by a placeholder; true if the program had read the socket's end (SAW_END).
    Closed(bool),
}

pub struct Detector {
    rt: &'static Runtime,
    /// The tracked sockets were all (re)registered since the epoll set was made.
    registered_all: bool,
    leaks: HashMap<RawFd, Leak>,
    /// Lines written this tick; above a few, the rest go into one summary.
    lines_this_tick: u32,
    folded: [u64; 4],
    last_summary_ms: u64,
    /// The program's epoll fds, from /proc, and when they were read.
    epoll_fds: Option<(u64, Vec<RawFd>)>,
}

const LINES_PER_TICK: u32 = 10;
const SUMMARY_EVERY_MS: u64 = 60_000;

impl Detector {
    pub fn new(rt: &'static Runtime) -> Detector {
        Detector {
            rt,
            registered_all: false,
            leaks: HashMap::new(),
            lines_this_tick: 0,
            folded: [0; 4],
            last_summary_ms: sys::now_ms(),
            epoll_fds: None,
        }
    }

    pub fn epoll_fd(&self) -> Option<RawFd> {
        Some(EPOLL.load(Acquire)).filter(|&e| e >= 0 && ownfd::is_own(e))
    }

    /// Waits up to `timeout_ms` for socket events, and examines those that come. Returns true
    /// if a hook asked for a tick now.
    pub fn wait(&mut self, timeout_ms: u64) -> bool {
        let Some(ep) = self.epoll_fd() else {
            sleep_ms(timeout_ms);
            return false;
        };
        let mut buf = [core::mem::MaybeUninit::<epoll::Event>::uninit(); 256];
        let timeout = rustix::event::Timespec {
            tv_sec: (timeout_ms / 1000) as i64,
            tv_nsec: ((timeout_ms % 1000) * 1_000_000) as i64,
        };
        let Some(b) = sys::borrow(ep) else { return false };
        let Ok((events, _)) = epoll::wait(b, &mut buf, Some(&timeout)) else {
            sleep_ms(timeout_ms.min(100));
            return false;
        };
        let now = sys::now_ms();
        let mut poked = false;
        for ev in events.iter() {
            let data = ev.data.u64();
            if data == WAKE_DATA {
                if let Some(w) = sys::borrow(WAKE.load(Acquire)) {
                    let mut b = [0u8; 8];
                    let _ = rustix::io::read(w, &mut b);
                }
                POKED.store(false, Release);
                poked = true;
                continue;
            }
            if self.rt.cfg.close_wait == CloseWaitMode::Off {
                continue;
            }
            let fd = data as u32 as RawFd;
            let generation = (data >> 32) as u32;
            let Some(slot) = fdtable::slot(fd) else { continue };
            let m = slot.load();
            if m.is_tracked() && m.generation() == generation {
                self.examine(fd, m, now);
            }
        }
        poked
    }

    /// The periodic part: watch new sockets, act on suspects whose time has come, summarise.
    pub fn tick(&mut self, now: u64) {
        self.lines_this_tick = 0;
        self.register_new();
        if self.rt.cfg.close_wait != CloseWaitMode::Off {
            self.review(now);
        }
        self.summarise(now);
    }

    /// Adds sockets tracked since the last tick to the epoll set, and finishes the configuration
    /// of sockets that got connected without a connect() keepfix saw.
    fn register_new(&mut self) {
        let ep = self.epoll_fd();
        let rt = self.rt;
        let mut redo = false;
        fdtable::drain_dirty(|fd, slot| {
            let m = slot.load();
            if !m.is_tracked() || m.has(flag::WATCHED) || m.role().is_listener() {
                return;
            }
            if !m.has(flag::CONFIGURED)
                && m.role() == Role::Socket
                && sys::tcp_info(fd).is_ok_and(|i| i.state == tcp_state::ESTABLISHED)
            {
                crate::keepalive::configure(fd, slot, &rt.ka);
                slot.set_flags(flag::CONNECTED, 0);
            }
            if rt.cfg.close_wait == CloseWaitMode::Off {
                return;
            }
            let Some(ep) = ep.and_then(sys::borrow) else { return };
            let Some(target) = sys::borrow(fd) else { return };
            let m = slot.load();
            let data = epoll::EventData::new_u64(u64::from(fd as u32) | u64::from(m.generation()) << 32);
            let mut events = epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
            if !m.has(flag::CONNECTED) {
                // Learn when it connects: a reset is a leak only for a socket that was connected.
                events |= epoll::EventFlags::OUT;
            }
            let added = match epoll::add(ep, target, data, events) {
                Err(rustix::io::Errno::EXIST) => epoll::modify(ep, target, data, events),
                r => r,
            };
            if added.is_ok() && !slot.replace_same_gen(m, m.with_flags(flag::WATCHED, 0)) {
                redo = true;
            }
        });
        if redo {
            // A slot changed while we registered it; its chunk is looked at again next tick.
            fdtable::mark_all_dirty_again();
        }
    }

    /// Looks at a socket an event was reported for.
    fn examine(&mut self, fd: RawFd, m: Meta, now: u64) {
        let Ok(info) = sys::tcp_info(fd) else {
            // Not a TCP socket any more: closed behind keepfix's back (fclose(fdopen()), say).
            if let Some(s) = fdtable::slot(fd) {
                s.replace_if(m, Meta::new(State::None, Role::Socket, false, 0, 0));
            }
            return;
        };
        let connected = m.has(flag::CONNECTED) || info.state == tcp_state::ESTABLISHED;
        if !m.has(flag::CONNECTED) && connected {
            if let Some(s) = fdtable::slot(fd) {
                s.replace_same_gen(m, m.with_flags(flag::CONNECTED, flag::CONNECTING));
            }
            if let (Some(ep), Some(t)) = (self.epoll_fd().and_then(sys::borrow), sys::borrow(fd)) {
                let data = epoll::EventData::new_u64(u64::from(fd as u32) | u64::from(m.generation()) << 32);
                let _ = epoll::modify(ep, t, data, epoll::EventFlags::RDHUP | epoll::EventFlags::ET);
            }
        }
        let leaked = info.state == tcp_state::CLOSE_WAIT || (info.state == tcp_state::CLOSE && connected);
        if !leaked || m.has(flag::ACTED) {
            return;
        }
        if self.leaks.get(&fd).is_some_and(|l| l.generation == m.generation()) {
            return;
        }
        let ino = sys::borrow(fd).and_then(|b| rustix::fs::fstat(b).ok()).map_or(0, |st| st.st_ino);
        FOUND.fetch_add(1, Relaxed);
        self.leaks.insert(
            fd,
            Leak {
                generation: m.generation(),
                ino,
                first_ms: now,
                peer: addr::peer(fd),
                local: addr::local(fd),
                state: info.state,
                unread: 0,
                unread_logged: false,
                done: None,
            },
        );
        if self.rt.cfg.close_wait_after_ms == 0 {
            self.act(fd, now);
        }
    }

    /// Goes over the suspects: drops those the program closed, acts on those whose time came.
    fn review(&mut self, now: u64) {
        let fds: Vec<RawFd> = self.leaks.keys().copied().collect();
        for fd in fds {
            let current = fdtable::slot(fd).map(|s| s.load());
            let Some(leak) = self.leaks.get(&fd) else { continue };
            let alive = current.is_some_and(|m| m.is_tracked() && m.generation() == leak.generation);
            if !alive {
                self.leaks.remove(&fd);
                continue;
            }
            if leak.done.is_none() {
                self.act(fd, now);
            }
        }
    }

    /// Acts on one suspect, if KEEPFIX_CLOSE_WAIT_AFTER has passed.
    fn act(&mut self, fd: RawFd, now: u64) {
        let cfg = &self.rt.cfg;
        let Some(leak) = self.leaks.get(&fd) else { return };
        if now.saturating_sub(leak.first_ms) < cfg.close_wait_after_ms {
            return;
        }
        let Some(slot) = fdtable::slot(fd) else { return };
        let m = slot.load();
        if !m.is_tracked() || m.generation() != leak.generation {
            self.leaks.remove(&fd);
            return;
        }
        if cfg.close_wait == CloseWaitMode::Close
            && now.saturating_sub(leak.first_ms) < cfg.close_wait_after_ms + SAW_END_GRACE_MS
            && !program_saw_end(fd)
        {
            // The program may be about to read its EOF: give it a moment, so that the placeholder
            // can record that it did (only such placeholders may be vacated later).
            return;
        }
        let outcome = match cfg.close_wait {
            CloseWaitMode::Off => return,
            CloseWaitMode::Log => self.observe(fd, m),
            CloseWaitMode::Shutdown | CloseWaitMode::Close => self.release(fd, slot, m, now),
        };
        let Some(leak) = self.leaks.get_mut(&fd) else { return };
        let age_s = now.saturating_sub(leak.first_ms) / 1000;
        let action = match outcome {
            Outcome::Raced => return,
            Outcome::Gone | Outcome::NotLeaked => {
                self.leaks.remove(&fd);
                return;
            }
            Outcome::KeptUnread(n) => {
                leak.unread = n;
                if leak.unread_logged {
                    return;
                }
                leak.unread_logged = true;
                UNREAD_KEPT.fetch_add(1, Relaxed);
                "kept_unread"
            }
            Outcome::ShutDown(a) => a,
            Outcome::Closed(_) => "closed",
        };
        if action != "kept_unread" {
            leak.done = Some(action);
        }
        match action {
            "logged" => LOGGED.fetch_add(1, Relaxed),
            "closed" => CLOSED.fetch_add(1, Relaxed),
            "kept_unread" => 0,
            _ => SHUT.fetch_add(1, Relaxed),
        };
        let (peer, local, state, unread) = (leak.peer, leak.local, leak.state, leak.unread);
        self.line(fd, peer, local, age_s, state, unread, action);
    }

    /// Log mode: re-check, read the unread byte count, mark as reported.
    fn observe(&mut self, fd: RawFd, m: Meta) -> Outcome {
        let Ok(info) = sys::tcp_info(fd) else { return Outcome::Gone };
        if info.state != tcp_state::CLOSE_WAIT && info.state != tcp_state::CLOSE {
            return Outcome::NotLeaked;
        }
        let unread = unread_bytes(fd);
        if let Some(l) = self.leaks.get_mut(&fd) {
            l.unread = unread;
            l.state = info.state;
        }
        if let Some(s) = fdtable::slot(fd) {
            s.replace_same_gen(m, m.with_flags(flag::ACTED, 0));
        }
        Outcome::ShutDown("logged")
    }

    /// Shutdown and close modes, inside the fd table's release protocol.
    fn release(&mut self, fd: RawFd, slot: &'static fdtable::Slot, m: Meta, _now: u64) -> Outcome {
        let Some(leak) = self.leaks.get(&fd) else { return Outcome::Gone };
        let ino = leak.ino;
        // Decide about other references before claiming: reading /proc must not happen while a
        // program thread may be waiting on the slot.
        let maybe_shared =
            m.has(flag::SHARED) && self.other_fd_shares(fd, ino) || slot.info().1 != fdtable::fork_epoch();
        let in_epoll = maybe_shared && self.in_program_epoll(fd, ino);
        let Some(rel) = slot.begin_release(fd, m) else { return Outcome::Raced };
        // From here to end_release the program cannot close or replace `fd`: its hooks wait.
        let outcome = self.release_claimed(fd, ino, maybe_shared, in_epoll);
        let new = match outcome {
            Outcome::Closed(saw_end) => {
                rel.with_state(State::Placeholder).with_flags(if saw_end { flag::SAW_END } else { 0 }, 0)
            }
            Outcome::Gone => Meta::new(State::None, Role::Socket, false, 0, 0),
            Outcome::ShutDown(_) => rel.with_state(State::Tracked).with_flags(flag::ACTED, 0),
            _ => rel.with_state(State::Tracked),
        };
        slot.end_release(fd, rel, new, sys::now_s());
        if let (Outcome::KeptUnread(_), Some(l)) = (&outcome, self.leaks.get_mut(&fd)) {
            // The slot's generation moved on; follow it, so the socket stays a suspect.
            l.generation = slot.load().generation();
        }
        if let Some(l) = self.leaks.get_mut(&fd) {
            if let Ok(info) = sys::tcp_info(fd) {
                l.state = info.state;
            }
        }
        outcome
    }

    fn release_claimed(&mut self, fd: RawFd, ino: u64, maybe_shared: bool, in_epoll: bool) -> Outcome {
        let Some(b) = sys::borrow(fd) else { return Outcome::Gone };
        if rustix::fs::fstat(b).map(|st| st.st_ino) != Ok(ino) {
            return Outcome::Gone;
        }
        let Ok(info) = sys::tcp_info(fd) else { return Outcome::Gone };
        if info.state != tcp_state::CLOSE_WAIT && info.state != tcp_state::CLOSE {
            return Outcome::NotLeaked;
        }
        let unread = unread_bytes(fd);
        let saw_end = program_saw_end(fd);
        if let Some(l) = self.leaks.get_mut(&fd) {
            l.unread = unread;
            l.state = info.state;
        }
        if unread > 0 && self.rt.cfg.close_wait_unread == Unread::Keep {
            return Outcome::KeptUnread(unread);
        }
        // Our FIN goes out after any data still queued, and pollers wake, even if another
        // reference to the socket exists. A socket already in CLOSE answers ENOTCONN: fine.
        let _ = rustix::net::shutdown(b, rustix::net::Shutdown::Both);
        if self.rt.cfg.close_wait == CloseWaitMode::Shutdown {
            return Outcome::ShutDown("shutdown");
        }
        if in_epoll {
            // Another reference may keep the socket alive, and the program's epoll set holds it
            // under this number: a swap would leave an entry it could never delete.
            return Outcome::ShutDown("shutdown_shared");
        }
        let _ = maybe_shared;
        match swap_placeholder(fd) {
            Ok(()) => Outcome::Closed(saw_end),
            Err(_) => Outcome::ShutDown("shutdown_no_placeholder"),
        }
    }

    /// Is another fd of this process the same socket? Only fds flagged SHARED can be (the dup
    /// hooks flag both sides), so this looks at those alone.
    fn other_fd_shares(&self, fd: RawFd, ino: u64) -> bool {
        let mut found = false;
        fdtable::for_each(0, fdtable::MAX_FD - 1, |other, s| {
            if found || other == fd {
                return;
            }
            let m = s.load();
            if m.is_tracked() && m.has(flag::SHARED) {
                found = sys::borrow(other).and_then(|b| rustix::fs::fstat(b).ok()).is_some_and(|st| st.st_ino == ino);
            }
        });
        found
    }

    /// Is the socket registered in one of the program's epoll sets? Reads the `tfd:` lines of
    /// /proc/self/fdinfo of each epoll fd (found once a minute at most).
    fn in_program_epoll(&mut self, fd: RawFd, ino: u64) -> bool {
        let now = sys::now_ms();
        let stale = self.epoll_fds.as_ref().is_none_or(|(t, _)| now.saturating_sub(*t) > 60_000);
        if stale {
            self.epoll_fds = Some((now, program_epoll_fds()));
        }
        let needle = format!("tfd: {fd:>8} ");
        let ino_hex = format!("ino:{ino:x}");
        self.epoll_fds.as_ref().is_some_and(|(_, list)| {
            list.iter().any(|epfd| {
                read_small(&format!("/proc/self/fdinfo/{epfd}"))
                    .is_some_and(|t| t.lines().any(|l| l.starts_with(&needle) && l.contains(&ino_hex)))
            })
        })
    }

    /// One event line, or a fold into this tick's summary once there are many.
    #[allow(clippy::too_many_arguments)]
    fn line(
        &mut self,
        fd: RawFd,
        peer: addr::Addr,
        local: addr::Addr,
        age_s: u64,
        state: u8,
        unread: u32,
        action: &str,
    ) {
        self.lines_this_tick += 1;
        if self.lines_this_tick > LINES_PER_TICK {
            let i = match action {
                "logged" => 0,
                "closed" => 2,
                "kept_unread" => 3,
                _ => 1,
            };
            if let Some(c) = self.folded.get_mut(i) {
                *c += 1;
            }
            return;
        }
        let level = if action == "logged" || action == "kept_unread" { Level::Warning } else { Level::Notice };
        emit(
            level,
            format_args!(
                "close_wait fd={fd} peer={peer} local={local} age={age_s}s state={} unread={unread} action={action}",
                tcp_state::name(state)
            ),
        );
    }

    /// A summary line when this tick folded lines, and once a minute while suspects are held.
    fn summarise(&mut self, now: u64) {
        let folded: u64 = self.folded.iter().sum();
        let held = self.leaks.len();
        let due = held > 0 && now.saturating_sub(self.last_summary_ms) >= SUMMARY_EVERY_MS;
        if folded == 0 && !due {
            return;
        }
        self.last_summary_ms = now;
        let oldest = self.leaks.values().map(|l| now.saturating_sub(l.first_ms) / 1000).max().unwrap_or(0);
        let t = totals();
        let [fl, fs, fc, fu] = self.folded;
        emit(
            Level::Warning,
            format_args!(
                "close_wait_summary held={held} oldest_age={oldest}s new_logged={fl} new_shutdown={fs} new_closed={fc} new_unread_kept={fu} total_found={} total_logged={} total_shutdown={} total_closed={} total_vacated={}",
                t.found, t.logged, t.shutdown, t.closed, t.vacated
            ),
        );
        self.folded = [0; 4];
    }

    /// Suspects held right now, and the age of the oldest in seconds.
    pub fn held(&self, now: u64) -> (usize, u64) {
        let oldest = self.leaks.values().map(|l| now.saturating_sub(l.first_ms) / 1000).max().unwrap_or(0);
        (self.leaks.len(), oldest)
    }

    /// Makes sure every tracked socket is in the current epoll set: at start (in a forked child,
    /// the WATCHED marks are the parent's), and after the set was lost (the program took its
    /// number with dup2).
    pub fn repair(&mut self) {
        if self.epoll_fd().is_none() {
            EPOLL.store(-1, Release);
            prepare(self.rt);
            self.registered_all = false;
        }
        if !self.registered_all {
            self.registered_all = true;
            fdtable::for_each(0, fdtable::MAX_FD - 1, |_, s| {
                if s.load().has(flag::WATCHED) {
                    s.set_flags(0, flag::WATCHED);
                }
            });
            fdtable::mark_all_dirty_again();
        }
    }
}

/// How long close mode waits, past KEEPFIX_CLOSE_WAIT_AFTER, for the program to read the end of
/// a dead socket before releasing it anyway. A program that reads its EOF does so within
/// microseconds of the FIN; the watchdog sees the FIN at the same instant.
const SAW_END_GRACE_MS: u64 = 250;

/// Has the program read the end of this dead socket? In CLOSE_WAIT the peer's FIN stays in the
/// receive queue (charged to SO_MEMINFO's rmem_alloc) until a read() consumes it; a reset or a
/// keepalive timeout leaves an error pending (POLLERR) until a read() or write() reports it.
/// Unknown counts as not seen.
fn program_saw_end(fd: RawFd) -> bool {
    const SO_MEMINFO: i32 = 55;
    let mut mem = [0u8; 4];
    let queued = match sys::getsockopt_raw(fd, libc::SOL_SOCKET, SO_MEMINFO, &mut mem) {
        Ok(4..) => u32::from_ne_bytes(mem) != 0,
        _ => true,
    };
    let Some(b) = sys::borrow(fd) else { return false };
    let mut p = [rustix::event::PollFd::new(&b, rustix::event::PollFlags::IN)];
    let error_pending = match rustix::event::poll(&mut p, Some(&rustix::time::Timespec::default())) {
        Ok(_) => p.first().is_some_and(|p| p.revents().contains(rustix::event::PollFlags::ERR)),
        Err(_) => true,
    };
    !queued && !error_pending
}

/// Bytes received and not yet read by the program (SIOCINQ).
fn unread_bytes(fd: RawFd) -> u32 {
    sys::borrow(fd).and_then(|b| rustix::io::ioctl_fionread(b).ok()).map_or(0, |n| n.min(u64::from(u32::MAX)) as u32)
}

/// dup3()s /dev/null onto `fd`, keeping its close-on-exec flag. The socket's last reference goes
/// with it; the number stays valid for the program.
fn swap_placeholder(fd: RawFd) -> Result<(), rustix::io::Errno> {
    let b = sys::borrow(fd).ok_or(rustix::io::Errno::BADF)?;
    let cloexec = rustix::io::fcntl_getfd(b)?.contains(rustix::io::FdFlags::CLOEXEC);
    let null = ownfd::null().and_then(sys::borrow).ok_or(rustix::io::Errno::NOENT)?;
    let flags = if cloexec { rustix::io::DupFlags::CLOEXEC } else { rustix::io::DupFlags::empty() };
    // SAFETY: `fd` stays the program's number; we only change what it refers to, inside the
    // release protocol. ManuallyDrop: the target must not be closed by us.
    let mut target =
        core::mem::ManuallyDrop::new(unsafe { <rustix::fd::OwnedFd as rustix::fd::FromRawFd>::from_raw_fd(fd) });
    rustix::io::dup3(null, &mut target, flags)
}

/// The `K` entries with the greatest key seen by [`Oldest::offer`], in a fixed array: the
/// EMFILE path runs in a hook, where nothing may allocate.
struct Oldest<const K: usize> {
    items: [(u64, RawFd, Meta); K],
    len: usize,
}

impl<const K: usize> Oldest<K> {
    fn new() -> Self {
        Oldest { items: [(0, -1, Meta(0)); K], len: 0 }
    }
    fn offer(&mut self, key: u64, fd: RawFd, m: Meta) {
        let pos = self.items.iter().take(self.len).position(|it| it.0 < key).unwrap_or(self.len);
        if pos >= K {
            return;
        }
        if let Some(tail) = self.items.get_mut(pos..) {
            tail.rotate_right(1);
        }
        if let Some(it) = self.items.get_mut(pos) {
            *it = (key, fd, m);
        }
        self.len = (self.len + 1).min(K);
    }
    fn iter(&self) -> impl Iterator<Item = &(u64, RawFd, Meta)> {
        self.items.iter().take(self.len)
    }
}

/// Closes the socket or placeholder at `fd` for good, inside the release protocol, if the slot
/// still holds `m` and `still` approves what is there; the number becomes Vacated: a later close()
/// of it by the program is answered 0.
fn vacate(fd: RawFd, m: Meta, still: impl FnOnce() -> bool) -> bool {
    let Some(s) = fdtable::slot(fd) else { return false };
    let Some(rel) = s.begin_release(fd, m) else { return false };
    if !still() {
        s.end_release(fd, rel, rel.with_state(m.state()), sys::now_s());
        return false;
    }
    if let Some(b) = sys::borrow(fd).filter(|_| m.state() == State::Tracked) {
        let _ = rustix::net::shutdown(b, rustix::net::Shutdown::Both);
    }
    // SAFETY: the program's number, closed on its behalf while its hooks wait on the slot.
    unsafe { rustix::io::close(fd) };
    s.end_release(fd, rel, rel.with_state(State::Vacated), sys::now_s());
    VACATED.fetch_add(1, Relaxed);
    true
}

/// Really closes up to 8 placeholders, oldest first, to free fds: accept() calls it at EMFILE,
/// from the hook, so it must not allocate. Returns how many were closed, and how many it tried
/// (a try fails when the watchdog changed the slot meanwhile).
pub fn vacate_oldest(n: usize) -> (usize, usize) {
    let mut oldest = Oldest::<8>::new();
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if m.state() == State::Placeholder && m.has(flag::SAW_END) {
            // Oldest first: the smallest release time is the greatest key.
            oldest.offer(u64::from(u32::MAX - s.info().0), fd, m);
        }
    });
    let tried = oldest.iter().take(n).count();
    (oldest.iter().take(n).filter(|&&(_, fd, m)| vacate(fd, m, || true)).count(), tried)
}

/// The watchdog's version of [`vacate_oldest`], for any number: near the limit it frees many.
pub fn vacate_oldest_many(n: usize) -> usize {
    let mut all: Vec<(u32, RawFd, Meta)> = Vec::new();
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if m.state() == State::Placeholder && m.has(flag::SAW_END) {
            all.push((s.info().0, fd, m));
        }
    });
    all.sort_unstable_by_key(|&(when, fd, _)| (when, fd));
    all.iter().take(n).filter(|&&(_, fd, m)| vacate(fd, m, || true)).count()
}

/// At EMFILE in close mode with KEEPFIX_CLOSE_WAIT_AFTER=0s, from the accept hook, when no
/// placeholder is left to close: closes up to 8 of the sockets the program has left in CLOSE_WAIT
/// (or dead) without waiting for the watchdog's next tick. It takes only those whose end the
/// program has read (see [`program_saw_end`]), whose last data came longest ago, and skips any
/// with unread data (unless KEEPFIX_CLOSE_WAIT_UNREAD=drop) or that another fd or process may
/// share.
/// At most `budget` TCP_INFO calls; no allocation; each release is deferred to the log. Returns
/// how many were released, and how many it tried.
pub fn release_now(rt: &Runtime, budget: usize) -> (usize, usize) {
    if rt.cfg.close_wait != CloseWaitMode::Close || rt.cfg.close_wait_after_ms != 0 {
        return (0, 0);
    }
    let epoch = fdtable::fork_epoch();
    // Only sockets whose end the program has read: closing the number of one it may still use
    // would hand that number to its next open().
    let dead = |fd: RawFd, st: u8, m: Meta| {
        (st == tcp_state::CLOSE_WAIT || (st == tcp_state::CLOSE && m.has(flag::CONNECTED))) && program_saw_end(fd)
    };
    let keep_unread = rt.cfg.close_wait_unread == Unread::Keep;
    let mut checked = 0usize;
    let mut oldest = Oldest::<8>::new();
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if checked >= budget || !m.is_tracked() || m.role().is_listener() || m.has(flag::SHARED) || s.info().1 != epoch
        {
            return;
        }
        checked += 1;
        if let Ok(i) = sys::tcp_info(fd) {
            if dead(fd, i.state, m) && !(keep_unread && unread_bytes(fd) > 0) {
                oldest.offer(u64::from(i.last_data_recv_ms), fd, m);
            }
        }
    });
    let mut released = 0;
    for &(_, fd, m) in oldest.iter() {
        let mut state = 0;
        // Inside the release protocol: check again that it is the same dead socket.
        let ok = vacate(fd, m, || {
            state = sys::tcp_info(fd).map_or(0, |i| i.state);
            dead(fd, state, m) && !(keep_unread && unread_bytes(fd) > 0)
        });
        if ok {
            FOUND.fetch_add(1, Relaxed);
            CLOSED.fetch_add(1, Relaxed);
            released += 1;
            crate::log::defer(crate::log::Deferred::ReleasedAtEmfile, fd, i64::from(state), 0);
        }
    }
    (released, oldest.iter().count())
}

fn program_epoll_fds() -> Vec<RawFd> {
    let mut out = Vec::new();
    crate::keepalive::for_each_open_fd(&mut |fd| {
        if ownfd::is_own(fd) {
            return;
        }
        let path = format!("/proc/self/fd/{fd}");
        if let Ok(link) = rustix::fs::readlink(path.as_str(), Vec::new()) {
            if link.as_bytes() == b"anon_inode:[eventpoll]" {
                out.push(fd);
            }
        }
    });
    out
}

/// Reads a small /proc file into a String, through keepfix's own fd (closed by raw syscall).
pub fn read_small(path: &str) -> Option<String> {
    use rustix::fs::{Mode, OFlags};
    let f = ownfd::Temp::open(path, OFlags::RDONLY, Mode::empty()).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match rustix::io::read(f.as_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or(&[])),
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
        if out.len() > 1 << 24 {
            break;
        }
    }
    String::from_utf8(out).ok()
}

fn sleep_ms(ms: u64) {
    let t = rustix::thread::Timespec { tv_sec: (ms / 1000) as i64, tv_nsec: ((ms % 1000) * 1_000_000) as i64 };
    let _ = rustix::thread::nanosleep(&t);
}
