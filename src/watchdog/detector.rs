//! The CLOSE_WAIT detector, on the watchdog's thread: finds the sockets a program forgot (the
//! peer closed, the program never did), and logs, shuts down or frees them by the rules of
//! hooksafe::release, without ever harming the program.
//!
//! ## Detection: cost grows with leaks, not with connections
//! Every connection that outlives a scan tick is added once to the watchdog's own edge-triggered
//! epoll set, for EPOLLRDHUP (the peer's FIN) and EPOLLHUP/EPOLLERR (a reset, a keepalive
//! timeout). Traffic never wakes it: data wake-ups do not match those events. A socket closed by
//! the program leaves the set by itself. So a tick costs O(new long-lived connections + events +
//! suspects), and each suspect is re-checked with TCP_INFO before anything is done.
//!
//! ## Acting: the rules
//! - `log` writes one line.
//! - `shutdown` and `close` shut a suspect down (our FIN, after anything still queued) once it has
//!   been quiet for KEEPFIX_CLOSE_WAIT_AFTER and nothing of it is in use: nothing unsent or
//!   unacknowledged (SIOCOUTQ), no data sent for that long (TCP_INFO, which sees a forked copy's
//!   writes too; at least 2 s for a socket another process may share). The socket stays at its
//!   number: the program's epoll registration stays, read() gives EOF, write() an error. No
//!   placeholder is ever swapped in. Where SIGPIPE has its default disposition, keepfix does not
//!   shut down (the plain program's first write to a dead connection succeeds; after our FIN it
//!   would raise SIGPIPE and kill it): it says so once.
//! - `close` also frees numbers ("vacates": really closes them), only near RLIMIT_NOFILE (the
//!   table past 90%) or when accept() hits EMFILE, and only sockets the program is provably done
//!   with: it saw their end itself (a read returned 0: flag SAW_EOF, set by the read hooks),
//!   nothing of them is unsent, no data was sent for KEEPFIX_CLOSE_WAIT_AFTER, no other fd or
//!   process may share them, and (unless KEEPFIX_CLOSE_WAIT_UNREAD=drop) nothing is unread. The
//!   close happens inside the fd table's release protocol, after the socket's identity (inode)
//!   was checked again, with SO_LINGER turned off so that it cannot wait.
//!
//! A socket with unread data is kept unless KEEPFIX_CLOSE_WAIT_UNREAD=drop.

use crate::addr;
use crate::config::{CloseWaitMode, Unread};
use crate::event::{Action, Event};
use crate::hooksafe::fdtable::{self, Meta, Role, State, flag};
use crate::hooksafe::log;
use crate::hooksafe::release::{self, FOUND, LOGGED, SHUT, UNREAD_KEPT, in_use, mark_acted, unread_bytes};
use crate::hooksafe::settings::Runtime;
use crate::hooksafe::{ownfd, wake};
use crate::sys::{self, tcp_state};
use core::sync::atomic::Ordering::*;
use rustix::event::epoll;
use rustix::fd::RawFd;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher};

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
    done: Option<Action>,
}

/// What a release attempt ended with.
enum Outcome {
    /// The slot changed under us, or no fd was free to look at it: nothing was done.
    Raced,
    /// The fd no longer holds the socket we saw (closed behind our back): forgotten.
    Gone,
    /// The socket is not in CLOSE_WAIT or dead any more (the program shut it down, say).
    NotLeaked,
    KeptUnread(u32),
    /// Still in use (unsent data, or data sent lately, maybe by another process): not yet.
    InUse,
    /// SIGPIPE would kill the program at its next write: left as it is.
    KeptSigpipe,
    /// Done: logged (log mode), shut down, or found dead.
    Done(Action),
}

pub struct Detector {
    rt: &'static Runtime,
    /// The tracked sockets were all (re)registered since the epoll set was made.
    registered_all: bool,
    /// The epoll set they were registered in.
    epoll_seen: Option<RawFd>,
    /// Keyed by fd number with a fixed hasher: std's RandomState asks getrandom(2) for its keys,
    /// and where that is missing (Linux < 3.17) opens /dev/urandom through libc and keeps it open,
    /// on a low number of the program's. fd numbers are the kernel's, no flood to fear.
    leaks: HashMap<RawFd, Leak, BuildHasherDefault<DefaultHasher>>,
    /// Lines written this tick; above a few, the rest go into one summary.
    lines_this_tick: u32,
    folded: [u64; 4],
    last_summary_ms: u64,
}

const LINES_PER_TICK: u32 = 10;
const SUMMARY_EVERY_MS: u64 = 60_000;

impl Detector {
    pub fn new(rt: &'static Runtime) -> Detector {
        Detector {
            rt,
            registered_all: false,
            epoll_seen: None,
            leaks: HashMap::default(),
            lines_this_tick: 0,
            folded: [0; 4],
            last_summary_ms: sys::now_ms(),
        }
    }

    /// Sleeps up to `timeout_ms` (or until a hook pokes), then examines the socket events that
    /// came. keepfix never blocks in a system call on its own fd (the program may close that
    /// number at any time): the sleep is on a futex, the epoll set is read without waiting.
    /// Returns true if a hook asked for a tick now.
    pub fn wait(&mut self, timeout_ms: u64) -> bool {
        let poked = wake::wait(timeout_ms);
        let Some(ep) = wake::epoll_fd() else { return poked };
        let mut buf = [core::mem::MaybeUninit::<epoll::Event>::uninit(); 256];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        let mut got: Vec<u64> = Vec::new();
        let _ = ownfd::with(ep, |b| {
            if let Ok((events, _)) = epoll::wait(b, &mut buf, Some(&zero)) {
                got.extend(events.iter().map(|ev| ev.data.u64()));
            }
        });
        if self.rt.cfg.close_wait == CloseWaitMode::Off {
            return poked;
        }
        let now = sys::now_ms();
        for data in got {
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
        if wake::epoll_fd().is_none() && self.rt.cfg.close_wait != CloseWaitMode::Off {
            self.scan(now);
        }
        self.register_new();
        if self.rt.cfg.close_wait != CloseWaitMode::Off {
            self.review(now);
        }
        self.summarise(now);
    }

    /// Without an epoll set (lean mode): looks at every tracked connection with TCP_INFO, as
    /// the epoll set's events would have. O(tracked sockets), which lean mode bounds.
    fn scan(&mut self, now: u64) {
        let mut suspects: Vec<(RawFd, Meta)> = Vec::new();
        fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
            let m = s.load();
            if m.is_tracked() && !m.role().is_listener() && !m.has(flag::ACTED) && !self.leaks.contains_key(&fd) {
                suspects.push((fd, m));
            }
        });
        for (fd, m) in suspects {
            self.examine(fd, m, now);
        }
    }

    /// Adds sockets tracked since the last tick to the epoll set, and finishes the configuration
    /// of sockets that got connected without a connect() keepfix saw.
    fn register_new(&mut self) {
        let ep = wake::epoll_fd();
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
                crate::hooksafe::keepalive::configure(fd, slot, &rt.ka);
                slot.set_flags(flag::CONNECTED, 0);
            }
            if rt.cfg.close_wait == CloseWaitMode::Off {
                return;
            }
            let Some(ep) = ep else { return };
            let Some(target) = sys::borrow(fd) else { return };
            let m = slot.load();
            let data = epoll::EventData::new_u64(u64::from(fd as u32) | u64::from(m.generation()) << 32);
            let mut events = epoll::EventFlags::RDHUP | epoll::EventFlags::ET;
            if !m.has(flag::CONNECTED) {
                // Learn when it connects: a reset is a leak only for a socket that was connected.
                events |= epoll::EventFlags::OUT;
            }
            let added = ownfd::with(ep, |ep| match epoll::add(ep, target, data, events) {
                Err(rustix::io::Errno::EXIST) => epoll::modify(ep, target, data, events),
                r => r,
            });
            if added.is_some_and(|a| a.is_ok()) && !slot.replace_same_gen(m, m.with_flags(flag::WATCHED, 0)) {
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
            if let (Some(ep), Some(t)) = (wake::epoll_fd(), sys::borrow(fd)) {
                let data = epoll::EventData::new_u64(u64::from(fd as u32) | u64::from(m.generation()) << 32);
                let _ =
                    ownfd::with(ep, |ep| epoll::modify(ep, t, data, epoll::EventFlags::RDHUP | epoll::EventFlags::ET));
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
        let outcome = match cfg.close_wait {
            CloseWaitMode::Off => return,
            CloseWaitMode::Log => self.observe(fd, m),
            CloseWaitMode::Shutdown | CloseWaitMode::Close => self.release(fd, slot, m, now),
        };
        let Some(leak) = self.leaks.get_mut(&fd) else { return };
        let age_s = now.saturating_sub(leak.first_ms) / 1000;
        let action = match outcome {
            Outcome::Raced | Outcome::InUse => return,
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
                Action::KeptUnread
            }
            Outcome::KeptSigpipe => Action::KeptSigpipe,
            Outcome::Done(a) => a,
        };
        if action != Action::KeptUnread {
            leak.done = Some(action);
        }
        match action {
            Action::Logged | Action::KeptSigpipe => LOGGED.fetch_add(1, Relaxed),
            Action::KeptUnread => 0,
            Action::Shutdown | Action::Dead | Action::Vacated => SHUT.fetch_add(1, Relaxed),
        };
        let (peer, local, state, unread) = (leak.peer, leak.local, leak.state, leak.unread);
        if matches!(action, Action::Shutdown | Action::Dead) {
            // No longer a socket left in CLOSE_WAIT: its slot says ACTED, so it is not taken up
            // again; in close mode its number may be freed later (vacate_forgotten).
            self.leaks.remove(&fd);
        }
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
        Outcome::Done(Action::Logged)
    }

    /// Shutdown and close modes: shuts the socket down through a private duplicate (checked to
    /// be the same socket), so that no step can reach a number the program reused meanwhile, and
    /// no release protocol is needed: the number itself is not touched.
    fn release(&mut self, fd: RawFd, slot: &'static fdtable::Slot, m: Meta, _now: u64) -> Outcome {
        let Some(leak) = self.leaks.get(&fd) else { return Outcome::Gone };
        let ino = leak.ino;
        // High, so that it never takes the lowest free number a program thread is about to get.
        let dup = if ownfd::lean() { None } else { ownfd::dup_high(fd) };
        let Some(dup) = dup else {
            // No fd to spare for a duplicate (lean mode, see ownfd::LEAN_BELOW, or no free
            // number above keepfix's base): the socket is shut down at its number, inside the
            // release protocol (a program close or dup2 of the number waits, bounded, or is
            // handed over).
            let Some(rel) = slot.begin_release(fd, m, ino) else { return Outcome::Raced };
            let outcome = self.release_through(fd, fd, ino, slot, m);
            let acted = matches!(outcome, Outcome::Done(_) | Outcome::KeptSigpipe);
            let back = rel.with_state(State::Tracked).with_flags(if acted { flag::ACTED } else { 0 }, 0);
            if slot.end_release(fd, rel, back, false) {
                // The release moved the generation on: the suspect follows it.
                if let Some(l) = self.leaks.get_mut(&fd) {
                    l.generation = slot.load().generation();
                }
            }
            return outcome;
        };
        let outcome = self.release_through(dup.raw(), fd, ino, slot, m);
        if let Outcome::Done(_) | Outcome::KeptSigpipe = outcome {
            if sys::borrow(fd).and_then(|b| rustix::fs::fstat(b).ok()).is_none_or(|st| st.st_ino != ino) {
                // The program closed it meanwhile: ours is the last reference; its close must
                // not wait here for SO_LINGER.
                sys::linger_off(dup.raw());
            }
            mark_acted(slot, m);
        }
        outcome
    }

    /// The checks and the shutdown of a release, on `h`: a private duplicate of the program's
    /// `fd`, or `fd` itself inside the release protocol. `h` is checked to be the socket of
    /// inode `ino` first.
    fn release_through(&mut self, h: RawFd, fd: RawFd, ino: u64, slot: &fdtable::Slot, m: Meta) -> Outcome {
        let Some(b) = sys::borrow(h) else { return Outcome::Gone };
        if rustix::fs::fstat(b).map(|st| st.st_ino) != Ok(ino) {
            return Outcome::Gone;
        }
        let Ok(info) = sys::tcp_info(h) else { return Outcome::Gone };
        if let Some(l) = self.leaks.get_mut(&fd) {
            l.state = info.state;
        }
        if info.state != tcp_state::CLOSE_WAIT && info.state != tcp_state::CLOSE {
            return Outcome::NotLeaked;
        }
        let unread = unread_bytes(h);
        if let Some(l) = self.leaks.get_mut(&fd) {
            l.unread = unread;
        }
        if unread > 0 && self.rt.cfg.close_wait_unread == Unread::Keep {
            return Outcome::KeptUnread(unread);
        }
        if in_use(h, &info, m, slot, self.rt.cfg.close_wait_after_ms) {
            return Outcome::InUse;
        }
        if info.state == tcp_state::CLOSE {
            // Dead already (reset, timed out): nothing to send. It waits for the program's close,
            // or, in close mode, to be vacated once the program has seen its end.
            return Outcome::Done(Action::Dead);
        }
        if sys::sigpipe_kills() {
            return Outcome::KeptSigpipe;
        }
        // Our FIN goes out after any data still queued, and pollers wake (IN|RDHUP|HUP), even
        // if another reference to the socket exists. The socket stays at its number.
        let _ = rustix::net::shutdown(b, rustix::net::Shutdown::Both);
        Outcome::Done(Action::Shutdown)
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
        action: Action,
    ) {
        self.lines_this_tick += 1;
        if self.lines_this_tick > LINES_PER_TICK {
            let i = match action {
                Action::Logged | Action::KeptSigpipe => 0,
                Action::Vacated => 2,
                Action::KeptUnread => 3,
                Action::Shutdown | Action::Dead => 1,
            };
            if let Some(c) = self.folded.get_mut(i) {
                *c += 1;
            }
            return;
        }
        log::event(&Event::CloseWait { fd, peer, local, age_s, state, unread, action, at_emfile: false });
    }

    /// A summary line when this tick folded lines, and once a minute while suspects are held.
    fn summarise(&mut self, now: u64) {
        let folded: u64 = self.folded.iter().sum();
        let held = self.leaks.len();
        if !summary_due(held, folded, &mut self.last_summary_ms, now) {
            return;
        }
        let oldest_age_s = self.leaks.values().map(|l| now.saturating_sub(l.first_ms) / 1000).max().unwrap_or(0);
        let t = release::totals();
        log::event(&Event::CloseWaitSummary {
            held,
            oldest_age_s,
            new: self.folded,
            total_found: t.found,
            total_logged: t.logged,
            total_shutdown: t.shutdown,
            total_vacated: t.vacated,
        });
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
        if ownfd::lean() {
            // No epoll set and no /proc file below ownfd::LEAN_BELOW: tick() scans instead.
            wake::drop_epoll();
            ownfd::shed();
            return;
        }
        let ep = wake::epoll_fd();
        if ep.is_none() {
            // Lost (the program took its number): tick() scans meanwhile, and the next listen,
            // accept or connect makes a new set, in the program's thread.
            wake::forget_epoll();
            wake::prepare(self.rt);
        }
        if ep != self.epoll_seen {
            self.epoll_seen = ep;
            self.registered_all = false;
        }
        if ep.is_some() && !self.registered_all {
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

/// Is a `close_wait_summary` line due? When this tick folded lines into it, or once a minute
/// while suspects are held. The minute runs only while some are held, so it starts with the first
/// one: a summary never reports nothing (issue 13, D4). Updates `last` when it is due.
fn summary_due(held: usize, folded: u64, last: &mut u64, now: u64) -> bool {
    if held == 0 {
        *last = now;
    }
    let due = folded > 0 || (held > 0 && now.saturating_sub(*last) >= SUMMARY_EVERY_MS);
    if due {
        *last = now;
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_suspect_after_a_quiet_minute_gets_no_summary_at_once() {
        // The detector was made at 0; nothing was held for 90 s; a suspect comes.
        let mut last = 0;
        for t in (0..90_000).step_by(100) {
            assert!(!summary_due(0, 0, &mut last, t));
        }
        assert!(!summary_due(1, 0, &mut last, 90_000), "an empty summary as the first suspect came");
        assert!(!summary_due(1, 0, &mut last, 149_000));
        assert!(summary_due(1, 0, &mut last, 150_000), "no summary a minute after the first suspect");
        assert!(!summary_due(1, 0, &mut last, 150_100));
        // Lines folded this tick: a summary at once, whatever the minute.
        assert!(summary_due(1, 3, &mut last, 150_200));
    }
}
