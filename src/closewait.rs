//! CLOSE_WAIT: finding the sockets a program forgot (the peer closed, the program never did) and
//! logging, shutting down or freeing them, without ever harming the program.
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
use crate::fdtable::{self, Meta, Role, State, flag};
use crate::log::{Level, emit};
use crate::ownfd;
use crate::runtime::Runtime;
use crate::sys::{self, tcp_state};
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};
use rustix::event::epoll;
use rustix::fd::RawFd;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher};

/// Totals since load, for metrics and summaries.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub found: u64,
    pub logged: u64,
    pub shutdown: u64,
    pub vacated: u64,
    pub unread_kept: u64,
}

static FOUND: AtomicU64 = AtomicU64::new(0);
static LOGGED: AtomicU64 = AtomicU64::new(0);
static SHUT: AtomicU64 = AtomicU64::new(0);
static VACATED: AtomicU64 = AtomicU64::new(0);
static UNREAD_KEPT: AtomicU64 = AtomicU64::new(0);
/// The program closed a number keepfix had vacated.
static PROGRAM_CLOSED: AtomicU64 = AtomicU64::new(0);
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

/// In a fork child: the epoll set is the parent's; the child makes its own.
pub fn after_fork_child() {
    let fd = EPOLL.swap(-1, AcqRel);
    if fd >= 0 {
        ownfd::close(fd);
    }
    POKE.store(0, Relaxed);
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
    ShutDown(&'static str),
}

pub struct Detector {
    rt: &'static Runtime,
    /// The tracked sockets were all (re)registered since the epoll set was made.
    registered_all: bool,
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
/// A socket another process may share is in use while anyone sent data on it this recently.
const SHARED_QUIET_MS: u64 = 2_000;

impl Detector {
    pub fn new(rt: &'static Runtime) -> Detector {
        Detector {
            rt,
            registered_all: false,
            leaks: HashMap::default(),
            lines_this_tick: 0,
            folded: [0; 4],
            last_summary_ms: sys::now_ms(),
        }
    }

    pub fn epoll_fd(&self) -> Option<RawFd> {
        epoll_fd()
    }

    /// Sleeps up to `timeout_ms` (or until a hook pokes), then examines the socket events that
    /// came. keepfix never blocks in a system call on its own fd (the program may close that
    /// number at any time): the sleep is on a futex, the epoll set is read without waiting.
    /// Returns true if a hook asked for a tick now.
    pub fn wait(&mut self, timeout_ms: u64) -> bool {
        let timeout = rustix::thread::Timespec {
            tv_sec: (timeout_ms / 1000) as i64,
            tv_nsec: ((timeout_ms % 1000) * 1_000_000) as i64,
        };
        if POKE.load(Acquire) == 0 {
            let _ = rustix::thread::futex::wait(&POKE, rustix::thread::futex::Flags::PRIVATE, 0, Some(&timeout));
        }
        let poked = POKE.swap(0, AcqRel) != 0;
        let Some(ep) = self.epoll_fd() else { return poked };
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
        if self.epoll_fd().is_none() && self.rt.cfg.close_wait != CloseWaitMode::Off {
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
            if let (Some(ep), Some(t)) = (self.epoll_fd(), sys::borrow(fd)) {
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
                "kept_unread"
            }
            Outcome::KeptSigpipe => "kept_sigpipe",
            Outcome::ShutDown(a) => a,
        };
        if action != "kept_unread" {
            leak.done = Some(action);
        }
        match action {
            "logged" | "kept_sigpipe" => LOGGED.fetch_add(1, Relaxed),
            "kept_unread" => 0,
            _ => SHUT.fetch_add(1, Relaxed),
        };
        let (peer, local, state, unread) = (leak.peer, leak.local, leak.state, leak.unread);
        if matches!(action, "shutdown" | "dead") {
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
        Outcome::ShutDown("logged")
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
            let acted = matches!(outcome, Outcome::ShutDown(_) | Outcome::KeptSigpipe);
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
        if let Outcome::ShutDown(_) | Outcome::KeptSigpipe = outcome {
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
            return Outcome::ShutDown("dead");
        }
        if sys::sigpipe_kills() {
            return Outcome::KeptSigpipe;
        }
        // Our FIN goes out after any data still queued, and pollers wake (IN|RDHUP|HUP), even
        // if another reference to the socket exists. The socket stays at its number.
        let _ = rustix::net::shutdown(b, rustix::net::Shutdown::Both);
        Outcome::ShutDown("shutdown")
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
                "logged" | "kept_sigpipe" => 0,
                "vacated" => 2,
                "kept_unread" => 3,
                _ => 1,
            };
            if let Some(c) = self.folded.get_mut(i) {
                *c += 1;
            }
            return;
        }
        let level =
            if matches!(action, "logged" | "kept_unread" | "kept_sigpipe") { Level::Warning } else { Level::Notice };
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
                "close_wait_summary held={held} oldest_age={oldest}s new_logged={fl} new_shutdown={fs} new_vacated={fc} new_unread_kept={fu} total_found={} total_logged={} total_shutdown={} total_vacated={}",
                t.found, t.logged, t.shutdown, t.vacated
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
        if ownfd::lean() {
            // No epoll set and no /proc file below ownfd::LEAN_BELOW: tick() scans instead.
            let ep = EPOLL.swap(-1, AcqRel);
            if ep >= 0 {
                ownfd::close(ep);
            }
            ownfd::shed();
            return;
        }
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

/// Marks the socket as acted on (shut down, dead, or left for SIGPIPE's sake): the same socket
/// (generation), whatever flags a hook set meanwhile (SAW_EOF, say).
fn mark_acted(slot: &fdtable::Slot, m: Meta) {
    slot.update(|cur| (cur.is_tracked() && cur.generation() == m.generation()).then(|| cur.with_flags(flag::ACTED, 0)));
}

/// Is the connection still in use, so that nothing may be done to it yet? Something unsent or
/// unacknowledged (SIOCOUTQ), or data sent (by any process that holds the socket: TCP_INFO sees
/// them all) within KEEPFIX_CLOSE_WAIT_AFTER, or within 2 s for a socket another fd or process
/// may share (a forked child may be streaming to a peer that half-closed).
fn in_use(fd: RawFd, info: &sys::TcpInfo, m: Meta, slot: &fdtable::Slot, after_ms: u64) -> bool {
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
fn maybe_shared(m: Meta, slot: &fdtable::Slot) -> bool {
    m.has(flag::SHARED)
        || slot.info().1 != fdtable::fork_epoch()
        || matches!(m.role(), Role::Inherited | Role::InheritedListener)
}

/// Bytes received and not yet read by the program (SIOCINQ).
fn unread_bytes(fd: RawFd) -> u32 {
    sys::borrow(fd).and_then(|b| rustix::io::ioctl_fionread(b).ok()).map_or(0, |n| n.min(u64::from(u32::MAX)) as u32)
}

/// Is the socket at `fd` (word `m`) one the program is provably done with, so that its number may
/// be freed? See the module's rules. Returns its inode if so. A few system calls, no allocation.
fn forgotten(rt: &Runtime, fd: RawFd, m: Meta, slot: &fdtable::Slot) -> Option<(u64, u32)> {
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
fn vacate(rt: &Runtime, fd: RawFd, m: Meta, ino: u64) -> bool {
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
            crate::log::defer(crate::log::Deferred::ReleasedAtEmfile, fd, i64::from(tcp_state::CLOSE_WAIT), 0);
        }
    }
    (freed, tried)
}

/// The watchdog's version of [`vacate_forgotten`], for any number: near the limit it frees many.
pub fn vacate_forgotten_many(rt: &Runtime, n: usize) -> usize {
    if rt.cfg.close_wait != CloseWaitMode::Close {
        return 0;
    }
    let mut all: Vec<(u32, RawFd, Meta, u64)> = Vec::new();
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if m.is_tracked() && m.has(flag::SAW_EOF) {
            if let Some((ino, idle_ms)) = forgotten(rt, fd, m, s) {
                all.push((idle_ms, fd, m, ino));
            }
        }
    });
    all.sort_unstable_by_key(|&(idle, fd, _, _)| (core::cmp::Reverse(idle), fd));
    all.iter().take(n).filter(|&&(_, fd, m, ino)| vacate(rt, fd, m, ino)).count()
}
