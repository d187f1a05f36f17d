//! The fd table: what keepfix knows about each file descriptor number, lock-free.
//!
//! One 16-byte [`Slot`] of atomics per fd number, in chunks of 1024 that are mmapped on first use
//! (so the table grows with the fds actually used, never to the hard limit up front) and never
//! freed. Hooks read and write slots with single atomic operations; nothing here locks or
//! allocates through malloc, so every function is async-signal-safe.
//!
//! ## The release protocol
//! keepfix closes a number the program forgot ("vacates" it) only inside this protocol. Between
//! its decision and its close() the program may close the number and get it back from accept().
//! So every hook that changes what a number refers to first *claims* the slot with a
//! compare-and-swap that bumps its generation, and a release moves a slot to `Releasing` only by
//! a compare-and-swap from the exact word it inspected, checks the slot again just before its
//! close(), and ends with a compare-and-swap from its own `Releasing` word. Whoever swaps first
//! wins. A hook that finds `Releasing` spins for at most [`WAIT_US`] (a release is a few
//! non-blocking system calls); if it is still there (keepfix's thread stopped or starved), the hook
//! never takes the slot over: a close() is handed to the release (flag CLOSE_PENDING: the
//! releaser closes the number when it ends, and the program gets 0 now), a dup2()/dup3() onto the
//! number fails with EBUSY, as the kernel's own dup2 may.

use core::ptr::null_mut;
use core::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use rustix::fd::RawFd;

const CHUNK_SHIFT: u32 = 10;
const CHUNK_LEN: usize = 1 << CHUNK_SHIFT;
const DIR_LEN: usize = 1 << 12;
/// fds at or above this are not tracked (4 194 304, above any sane RLIMIT_NOFILE).
pub const MAX_FD: usize = DIR_LEN * CHUNK_LEN;

/// What an fd number holds, as far as keepfix knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Nothing keepfix tracks.
    None = 0,
    /// A TCP socket keepfix tracks.
    Tracked = 1,
    /// keepfix is closing this number (vacating it), right now.
    Releasing = 2,
    /// keepfix really closed the forgotten socket to free the fd; a later close() of this number
    /// by the program is answered 0, unless the number was reused meanwhile.
    Vacated = 4,
    /// One of keepfix's own fds: invisible to the program's close().
    Own = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// socket() was called; neither listen() nor connect() yet.
    Socket = 0,
    Listener = 1,
    Accepted = 2,
    Outbound = 3,
    /// A connection open when the library loaded (inetd style).
    Inherited = 4,
    /// A listener open when the library loaded (systemd socket activation).
    InheritedListener = 5,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Socket => "socket",
            Role::Listener => "listener",
            Role::Accepted => "accepted",
            Role::Outbound => "outbound",
            Role::Inherited => "inherited",
            Role::InheritedListener => "inherited-listener",
        }
    }
    pub fn is_listener(self) -> bool {
        matches!(self, Role::Listener | Role::InheritedListener)
    }
    pub const ALL: [Role; 6] =
        [Role::Socket, Role::Listener, Role::Accepted, Role::Outbound, Role::Inherited, Role::InheritedListener];
}

/// Flag bits of [`Meta`].
pub mod flag {
    /// keepalive options are on the socket (set by keepfix, or inherited from a listener it set).
    pub const CONFIGURED: u32 = 1 << 0;
    /// A listener whose queued connections may predate its options: check what accept() returns.
    pub const CHECK_ACCEPTED: u32 = 1 << 1;
    /// Known to have been connected: accepted, connect() returned 0, or seen ESTABLISHED.
    pub const CONNECTED: u32 = 1 << 2;
    /// Another fd of this process may refer to the same socket (dup, dup2, F_DUPFD).
    pub const SHARED: u32 = 1 << 3;
    /// In the watchdog's epoll set.
    pub const WATCHED: u32 = 1 << 4;
    /// keepfix has acted on this socket already (shutdown, or logged as left in CLOSE_WAIT).
    pub const ACTED: u32 = 1 << 5;
    /// The program set these keepalive options itself (KEEPFIX_RESPECT_APP bookkeeping).
    pub const APP_KEEPALIVE: u32 = 1 << 6;
    pub const APP_IDLE: u32 = 1 << 7;
    pub const APP_INTVL: u32 = 1 << 8;
    pub const APP_CNT: u32 = 1 << 9;
    pub const APP_USER_TIMEOUT: u32 = 1 << 10;
    pub const APP_ANY: u32 = APP_KEEPALIVE | APP_IDLE | APP_INTVL | APP_CNT | APP_USER_TIMEOUT;
    /// connect() is in progress (EINPROGRESS): the watchdog watches for it to complete.
    pub const CONNECTING: u32 = 1 << 11;
    /// The program itself saw the end of this connection: one of its reads returned 0 (with room
    /// to read), or failed with the error of a reset or timed-out connection. Only such sockets
    /// are ever vacated: the read that returns the last data also consumes the FIN, so an empty
    /// receive queue proves nothing, and a program that has not seen the end (a pool yet to
    /// notice) may still use the number.
    pub const SAW_EOF: u32 = 1 << 12;
    /// The program closed this number while keepfix was releasing it (or using its own fd
    /// there): the releaser closes it when it is done.
    pub const CLOSE_PENDING: u32 = 1 << 13;
    /// One of keepfix's own fds is inside a system call of keepfix's right now.
    pub const BUSY: u32 = 1 << 14;
    /// A program's close_range()/closefrom() closed this own fd while keepfix was using it: when
    /// the use ends, the mark goes (the number is not keepfix's to close any more).
    pub const GONE: u32 = 1 << 15;
}

/// The first word of a slot: state, role, family, flags and generation, packed so that one
/// compare-and-swap covers them all.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Meta(pub u64);

impl Meta {
    const STATE_MASK: u64 = 0x7;
    const ROLE_SHIFT: u32 = 3;
    const V6_BIT: u64 = 1 << 6;
    const FLAG_SHIFT: u32 = 7;
    const GEN_SHIFT: u32 = 32;

    pub fn new(state: State, role: Role, v6: bool, flags: u32, generation: u32) -> Meta {
        Meta(
            state as u64
                | (role as u64) << Self::ROLE_SHIFT
                | if v6 { Self::V6_BIT } else { 0 }
                | u64::from(flags & 0x01ff_ffff) << Self::FLAG_SHIFT
                | u64::from(generation) << Self::GEN_SHIFT,
        )
    }
    pub fn state(self) -> State {
        match self.0 & Self::STATE_MASK {
            1 => State::Tracked,
            2 => State::Releasing,
            4 => State::Vacated,
            5 => State::Own,
            _ => State::None,
        }
    }
    pub fn role(self) -> Role {
        match (self.0 >> Self::ROLE_SHIFT) & 0x7 {
            1 => Role::Listener,
            2 => Role::Accepted,
            3 => Role::Outbound,
            4 => Role::Inherited,
            5 => Role::InheritedListener,
            _ => Role::Socket,
        }
    }
    pub fn v6(self) -> bool {
        self.0 & Self::V6_BIT != 0
    }
    pub fn flags(self) -> u32 {
        ((self.0 >> Self::FLAG_SHIFT) & 0x01ff_ffff) as u32
    }
    pub fn has(self, f: u32) -> bool {
        self.flags() & f == f
    }
    pub fn generation(self) -> u32 {
        (self.0 >> Self::GEN_SHIFT) as u32
    }
    pub fn with_state(self, s: State) -> Meta {
        Meta((self.0 & !Self::STATE_MASK) | s as u64)
    }
    pub fn with_role(self, r: Role) -> Meta {
        Meta::new(self.state(), r, self.v6(), self.flags(), self.generation())
    }
    pub fn with_flags(self, set: u32, clear: u32) -> Meta {
        Meta::new(self.state(), self.role(), self.v6(), (self.flags() & !clear) | set, self.generation())
    }
    /// Sets flags whatever the state (with_flags is the same; named for the words of releases and
    /// own fds, whose flags are not a socket's).
    pub fn with_flags_any(self, set: u32) -> Meta {
        self.with_flags(set, 0)
    }
    /// The same content under the next generation: what a hook writes when it claims a slot.
    pub fn next_gen(self) -> Meta {
        Meta::new(self.state(), self.role(), self.v6(), self.flags(), self.generation().wrapping_add(1))
    }
    pub fn with_generation(self, g: u32) -> Meta {
        Meta((self.0 & 0xffff_ffff) | u64::from(g) << Self::GEN_SHIFT)
    }
    pub fn is_tracked(self) -> bool {
        self.state() == State::Tracked
    }
    /// keepfix is acting on the number: a release under way, or its own fd inside a system call.
    pub fn is_unsettled(self) -> bool {
        self.state() == State::Releasing || (self.state() == State::Own && self.has(flag::BUSY))
    }
}

impl core::fmt::Debug for Meta {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Meta({:?} {} v6={} flags={:#x} gen={})",
            self.state(),
            self.role().name(),
            self.v6(),
            self.flags(),
            self.generation()
        )
    }
}

/// One fd number's entry: 16 bytes.
#[repr(C)]
pub struct Slot {
    meta: AtomicU64,
    /// Low half: when keepfix first saw this socket (or released it), in coarse monotonic
    /// seconds. High half: the fork epoch at that time (see [`fork_epoch`]).
    info: AtomicU64,
}

const _: () = assert!(core::mem::size_of::<Slot>() == 16);

#[repr(C)]
struct Chunk {
    slots: [Slot; CHUNK_LEN],
}

static DIR: [AtomicPtr<Chunk>; DIR_LEN] = [const { AtomicPtr::new(null_mut()) }; DIR_LEN];
/// One bit per chunk: a socket was newly tracked in it since the watchdog last looked.
static DIRTY: [AtomicU64; DIR_LEN / 64] = [const { AtomicU64::new(0) }; DIR_LEN / 64];
/// One past the highest chunk ever allocated: scans stop there.
static CHUNKS_END: AtomicUsize = AtomicUsize::new(0);
/// Chunks allocated, for the memory figure in metrics.
static CHUNKS_ALLOCATED: AtomicUsize = AtomicUsize::new(0);
/// The fds whose release is under way, in any thread (a release takes a cell for its few system
/// calls; with all cells taken, a release waits for the next chance).
static RELEASING: [AtomicI32; 8] = [const { AtomicI32::new(-1) }; 8];
/// The thread doing each of those releases: a hook that waited in vain checks that it is alive.
static RELEASER: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];
/// The inode of the socket each of those releases acts on: a hook that waited in vain checks
/// whether the number still holds it (keepfix's close has not happened yet) or not.
static RELEASE_INO: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Counts fork() calls of this process and its ancestors since load: a socket seen before the
/// latest fork may have a copy in a child process.
static FORK_EPOCH: AtomicU32 = AtomicU32::new(0);

pub fn fork_epoch() -> u32 {
    FORK_EPOCH.load(Relaxed)
}

/// Called in fork()'s prepare step: sockets tracked so far may now be shared with a child.
pub fn note_fork() {
    FORK_EPOCH.fetch_add(1, Relaxed);
}

/// The slot of `fd`, if its chunk exists. Never allocates.
#[inline]
pub fn slot(fd: RawFd) -> Option<&'static Slot> {
    let fd = usize::try_from(fd).ok()?;
    let chunk = DIR.get(fd >> CHUNK_SHIFT)?.load(Acquire);
    if chunk.is_null() {
        return None;
    }
    // SAFETY: chunks are never freed, and a non-null pointer was published with Release after
    // its (zeroed) memory was mapped.
    unsafe { (*chunk).slots.get(fd & (CHUNK_LEN - 1)) }
}

/// The slot of `fd`, mapping its chunk if needed (one mmap per 1024 fd numbers, ever).
/// `None` if the fd is out of range or the kernel refused memory: the fd then goes untracked.
pub fn slot_alloc(fd: RawFd) -> Option<&'static Slot> {
    if let Some(s) = slot(fd) {
        return Some(s);
    }
    let idx = usize::try_from(fd).ok()? >> CHUNK_SHIFT;
    let cell = DIR.get(idx)?;
    let size = core::mem::size_of::<Chunk>();
    // SAFETY: a fresh anonymous mapping; zeroed memory is a valid Chunk (all atomics 0 = None).
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            null_mut(),
            size,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .ok()? as *mut Chunk;
    match cell.compare_exchange(null_mut(), p, AcqRel, Acquire) {
        Ok(_) => {
            CHUNKS_END.fetch_max(idx + 1, AcqRel);
            CHUNKS_ALLOCATED.fetch_add(1, Relaxed);
        }
        Err(_) => {
            // Another thread mapped it first: use theirs.
            // SAFETY: p is our own mapping, never published.
            let _ = unsafe { rustix::mm::munmap(p.cast(), size) };
        }
    }
    slot(fd)
}

/// Bytes of table memory mapped so far.
pub fn mapped_bytes() -> usize {
    CHUNKS_ALLOCATED.load(Relaxed) * core::mem::size_of::<Chunk>()
}

fn mark_dirty(fd: RawFd) {
    let chunk = (fd as usize) >> CHUNK_SHIFT;
    if let Some(word) = DIRTY.get(chunk / 64) {
        let bit = 1u64 << (chunk % 64);
        // Load first: the common case is "already set", and a load keeps the line shared.
        if word.load(Relaxed) & bit == 0 {
            word.fetch_or(bit, Release);
        }
    }
}

/// How long a hook waits, at most, for a release or a use of keepfix's own fd to end: those are
/// a few non-blocking system calls, a few microseconds.
pub const WAIT_US: u64 = 1000;

/// Is this word one that a hook must wait for: a release, or keepfix's own fd in a system call?
fn unsettled(m: Meta) -> bool {
    m.is_unsettled()
}

/// Waits, at most [`WAIT_US`], for a `Releasing` slot (or a busy own fd) to settle, and returns
/// the word then, settled or not. After fork a child resets releases (see [`after_fork_child`]).
fn wait_settled(slot: &Slot) -> Meta {
    let m = Meta(slot.meta.load(Acquire));
    if !unsettled(m) {
        return m;
    }
    wait_settled_slow(slot)
}

#[cold]
fn wait_settled_slow(slot: &Slot) -> Meta {
    // A _Fork() child's copy of a release the parent was doing never ends: repair it first.
    crate::hooksafe::settings::check_forked();
    let start = crate::sys::now_us();
    let mut spins = 0u32;
    loop {
        let m = Meta(slot.meta.load(Acquire));
        if !unsettled(m) {
            return m;
        }
        spins += 1;
        if spins < 64 {
            core::hint::spin_loop();
        } else {
            rustix::thread::sched_yield();
            if crate::sys::now_us().wrapping_sub(start) > WAIT_US {
                if let Some(taken) = take_over_from_the_dead(slot, m) {
                    return taken;
                }
                static SAID: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, Relaxed) {
                    crate::hooksafe::ring::defer(crate::hooksafe::ring::Deferred::StuckRelease, -1, 0, 0);
                }
                return m;
            }
        }
    }
}

/// After the bounded wait: if the release on this slot belongs to a thread that no longer exists
/// (keepfix's thread killed by a seccomp filter, say), nothing can finish it: the slot goes back
/// to Tracked (a handed-over close is done now), and the caller goes on. A live thread, stopped or
/// starved, keeps its release: the caller hands over or fails with EBUSY instead.
fn take_over_from_the_dead(this: &Slot, m: Meta) -> Option<Meta> {
    if m.state() != State::Releasing {
        return None;
    }
    let i = RELEASING.iter().position(|c| {
        let fd = c.load(Acquire);
        fd >= 0 && slot(fd).is_some_and(|s| core::ptr::eq(s, this))
    })?;
    let tid = RELEASER.get(i)?.load(Acquire);
    if tid <= 0 || crate::sys::thread_exists(tid) {
        return None;
    }
    let back = m.with_state(State::Tracked).with_flags(0, flag::CLOSE_PENDING).next_gen();
    this.meta.compare_exchange(m.0, back.0, AcqRel, Acquire).ok()?;
    if m.has(flag::CLOSE_PENDING) {
        if let Some(fd) = RELEASING.get(i).map(|c| c.load(Acquire)) {
            let _ = crate::sys::close_raw(fd);
        }
    }
    if let Some(c) = RELEASING.get(i) {
        c.store(-1, Release);
    }
    Some(back)
}

impl Slot {
    pub fn load(&self) -> Meta {
        Meta(self.meta.load(Acquire))
    }

    /// When keepfix first saw the socket (coarse monotonic seconds) and the fork epoch then.
    pub fn info(&self) -> (u32, u32) {
        let v = self.info.load(Relaxed);
        (v as u32, (v >> 32) as u32)
    }

    pub fn set_seen(&self, seen_s: u32) {
        self.info.store(u64::from(seen_s) | u64::from(fork_epoch()) << 32, Relaxed);
    }

    /// Applies `f` to the current word with a compare-and-swap loop, after any release settles.
    /// `f` returns the new word, or `None` to leave the slot as it is. Returns (old, new).
    /// `f` sees a word still unsettled only after the bounded wait ran out: it decides.
    pub fn update(&self, mut f: impl FnMut(Meta) -> Option<Meta>) -> (Meta, Meta) {
        let mut cur = wait_settled(self);
        let mut waited = unsettled(cur);
        loop {
            let Some(new) = f(cur) else { return (cur, cur) };
            match self.meta.compare_exchange_weak(cur.0, new.0, AcqRel, Acquire) {
                Ok(_) => return (cur, new),
                Err(actual) => {
                    cur = Meta(actual);
                    if unsettled(cur) && !waited {
                        cur = wait_settled(self);
                        waited = unsettled(cur);
                    }
                }
            }
        }
    }

    /// A new socket got this number (socket, accept, dup): whatever was here is gone (the kernel
    /// handed the number out afresh, so even a release that is still marked here has ended).
    pub fn track(&self, fd: RawFd, role: Role, v6: bool, flags: u32, seen_s: u32) -> Meta {
        let (_, new) =
            self.update(|old| Some(Meta::new(State::Tracked, role, v6, flags, old.generation().wrapping_add(1))));
        self.set_seen(seen_s);
        mark_dirty(fd);
        new
    }

    /// The number is about to be closed or replaced by the program: forget it. keepfix's own fd
    /// there is given up (the number is the program's to close: keepfix opens its fd again
    /// elsewhere when it needs it). A release still under way after the bounded wait, or an own
    /// fd inside a system call, is left as it is: see [`Slot::hand_over_close`].
    /// Returns the word it had, so the caller knows what the program is closing.
    pub fn claim(&self) -> Meta {
        let (old, _) = self.update(|old| match old.state() {
            State::None | State::Releasing => None,
            State::Own if old.has(flag::BUSY) => None,
            _ => Some(Meta::new(State::None, Role::Socket, false, 0, old.generation().wrapping_add(1))),
        });
        old
    }

    /// After the bounded wait found keepfix still acting on this number (word `m`): does the
    /// number still hold the object keepfix acts on (the socket being released, or keepfix's own
    /// fd)? `Some(true)`: keepfix's own close has not happened, so a program close may be handed
    /// over. `Some(false)`: keepfix closed it already (its thread stalled before it could say so)
    /// and the number is empty or holds a new object, the program's: its close or dup2 goes on
    /// as it would without keepfix. `None`: cannot tell (nothing recorded). One fstat.
    pub fn holds_acted_object(&self, fd: RawFd, m: Meta) -> Option<bool> {
        let want = match m.state() {
            State::Releasing => {
                let i = RELEASING.iter().position(|c| c.load(Acquire) == fd)?;
                RELEASE_INO.get(i)?.load(Acquire)
            }
            State::Own => self.info.load(Relaxed),
            _ => return None,
        };
        if want == 0 {
            return None;
        }
        let now = crate::sys::borrow(fd).and_then(|b| rustix::fs::fstat(b).ok()).map(|st| st.st_ino);
        Some(now == Some(want))
    }

    /// The program closes a number that keepfix is still releasing (or using, for its own fd)
    /// after the bounded wait: hands the close over to keepfix (flag CLOSE_PENDING), which closes
    /// the number when it is done. Returns false if the slot settled meanwhile: claim again.
    pub fn hand_over_close(&self, seen: Meta) -> bool {
        let pending = seen.with_flags_any(flag::CLOSE_PENDING);
        seen.has(flag::CLOSE_PENDING) || self.meta.compare_exchange(seen.0, pending.0, AcqRel, Acquire).is_ok()
    }

    /// Puts back a word taken by [`Slot::claim`] when the call it guarded failed and changed
    /// nothing; only if no one has touched the slot since.
    pub fn unclaim(&self, old: Meta) {
        let claimed = Meta::new(State::None, Role::Socket, false, 0, old.generation().wrapping_add(1));
        let back = Meta::new(old.state(), old.role(), old.v6(), old.flags(), old.generation().wrapping_add(2));
        let _ = self.meta.compare_exchange(claimed.0, back.0, AcqRel, Relaxed);
    }

    /// Sets and clears flags on a tracked slot (any other state is left alone).
    pub fn set_flags(&self, set: u32, clear: u32) -> Meta {
        self.update(|m| {
            (m.is_tracked() && (m.flags() & set != set || m.flags() & clear != 0)).then(|| m.with_flags(set, clear))
        })
        .1
    }

    /// Replaces the word if it is still exactly `expected`; bumps the generation. The watchdog's
    /// only way to change a slot the program may be changing too.
    pub fn replace_if(&self, expected: Meta, new: Meta) -> bool {
        self.meta.compare_exchange(expected.0, new.next_gen().0, AcqRel, Acquire).is_ok()
    }

    /// Starts a release of fd `fd`, inspected as `expected`: the watchdog's, or an accept() hook's
    /// at EMFILE. The fd is registered first, so that a fork() at any instant leaves the child
    /// able to undo a release whose thread it does not have (see [`after_fork_child`]).
    /// `ino` is the inode of the socket the release acts on.
    pub fn begin_release(&self, fd: RawFd, expected: Meta, ino: u64) -> Option<Meta> {
        let (i, cell) =
            RELEASING.iter().enumerate().find(|(_, c)| c.compare_exchange(-1, fd, AcqRel, Relaxed).is_ok())?;
        if let Some(t) = RELEASER.get(i) {
            t.store(rustix::thread::gettid().as_raw_nonzero().get(), Release);
        }
        if let Some(n) = RELEASE_INO.get(i) {
            n.store(ino, Release);
        }
        let rel = expected.with_state(State::Releasing);
        match self.meta.compare_exchange(expected.0, rel.0, AcqRel, Acquire) {
            Ok(_) => Some(rel),
            Err(_) => {
                cell.store(-1, Release);
                None
            }
        }
    }

    /// Is the slot still exactly the release `rel`? Checked just before the release's close().
    pub fn still(&self, rel: Meta) -> bool {
        self.meta.load(Acquire) == rel.0
    }

    /// Ends a release begun with [`Slot::begin_release`]: stores `new` under the next generation,
    /// by a compare-and-swap from `rel`. `closed` says whether the release closed the number. If
    /// the program closed the number meanwhile (CLOSE_PENDING), its close is done here: the number
    /// is closed (if the release did not) and forgotten. If a hook replaced the word after the
    /// bounded wait (the kernel handed the number out afresh), that word stands. Returns true if
    /// `new` was stored.
    pub fn end_release(&self, fd: RawFd, rel: Meta, new: Meta, closed: bool) -> bool {
        let stored = Meta(new.0).with_generation(rel.generation().wrapping_add(1));
        let ok = match self.meta.compare_exchange(rel.0, stored.0, AcqRel, Acquire) {
            Ok(_) => true,
            Err(cur) if Meta(cur).state() == State::Releasing && Meta(cur).has(flag::CLOSE_PENDING) => {
                if !closed {
                    let _ = crate::sys::close_raw(fd);
                }
                let gone = Meta::new(State::None, Role::Socket, false, 0, rel.generation().wrapping_add(1));
                self.meta.store(gone.0, Release);
                false
            }
            Err(_) => false,
        };
        if let Some(c) = RELEASING.iter().find(|c| c.load(Relaxed) == fd) {
            c.store(-1, Release);
        }
        ok
    }

    /// Changes flags the watchdog keeps (WATCHED, ACTED, CONNECTED) if the word is still exactly
    /// `expected`, without a new generation: the socket is the same one.
    pub fn replace_same_gen(&self, expected: Meta, new: Meta) -> bool {
        self.meta.compare_exchange(expected.0, new.with_generation(expected.generation()).0, AcqRel, Acquire).is_ok()
    }

    /// Forgets whatever the slot says, whatever its state: the kernel just gave the number out
    /// afresh, so it is stale (even an Own mark: our fd was closed behind our back).
    pub fn reset(&self) {
        self.update(|m| {
            (m.state() != State::None)
                .then(|| Meta::new(State::None, Role::Socket, false, 0, m.generation().wrapping_add(1)))
        });
    }

    /// Marks one of keepfix's own fds, with the inode of what `fd` (this slot's number) holds.
    pub fn set_own(&self, fd: RawFd) {
        let ino = crate::sys::borrow(fd).and_then(|b| rustix::fs::fstat(b).ok()).map_or(0, |st| st.st_ino);
        self.update(|m| Some(Meta::new(State::Own, Role::Socket, false, 0, m.generation().wrapping_add(1))));
        self.info.store(ino, Relaxed);
    }

    /// Starts a system call of keepfix's on its own fd at this number: Own → Own|BUSY, by a
    /// compare-and-swap, so that a program close() or dup2() of the number in the meantime waits
    /// (bounded) or is handed over instead of letting keepfix's call reach the program's next
    /// file there. None if the number is not keepfix's any more.
    pub fn begin_own_use(&self) -> Option<Meta> {
        let m = self.load();
        if m.state() != State::Own || m.has(flag::BUSY) {
            return None;
        }
        let busy = m.with_flags_any(flag::BUSY);
        self.meta.compare_exchange(m.0, busy.0, AcqRel, Acquire).ok().map(|_| busy)
    }

    /// After a program's close_range() or closefrom(): keepfix may have made an own fd in the
    /// range after the claim pass, which the close then took. Its mark goes (a busy one when its
    /// use ends), so that keepfix never uses a number it no longer holds.
    pub fn forget_own_if_closed(&self, fd: RawFd) {
        let m = self.load();
        if m.state() != State::Own || crate::sys::fd_exists(fd) {
            return;
        }
        let new = if m.has(flag::BUSY) {
            m.with_flags_any(flag::GONE)
        } else {
            Meta::new(State::None, Role::Socket, false, 0, m.generation().wrapping_add(1))
        };
        let _ = self.meta.compare_exchange(m.0, new.0, AcqRel, Acquire);
    }

    /// Ends a use begun with [`Slot::begin_own_use`]. Returns false if the program closed the
    /// number meanwhile: keepfix then closes its fd there, as the program asked, and forgets it.
    pub fn end_own_use(&self, busy: Meta, fd: RawFd) -> bool {
        let back = busy.with_flags(0, flag::BUSY);
        match self.meta.compare_exchange(busy.0, back.0, AcqRel, Acquire) {
            Ok(_) => true,
            Err(cur) => {
                // Only a handed-over close, or a range close that took the fd, changes a busy
                // word. A handed-over close is done here (the number stayed ours meanwhile).
                let gone = Meta::new(State::None, Role::Socket, false, 0, busy.generation().wrapping_add(1));
                if cur == busy.with_flags_any(flag::CLOSE_PENDING).0 {
                    let _ = crate::sys::close_raw(fd);
                    let _ = self.meta.compare_exchange(cur, gone.0, AcqRel, Acquire);
                } else if Meta(cur).state() == State::Own && Meta(cur).has(flag::GONE) {
                    let _ = self.meta.compare_exchange(cur, gone.0, AcqRel, Acquire);
                }
                false
            }
        }
    }
}

/// Calls `f(fd, slot)` for every fd in `first..=last` whose chunk exists. O(mapped chunks in the
/// range), for close_range, closefrom and the watchdog's sweeps.
pub fn for_each(first: usize, last: usize, mut f: impl FnMut(RawFd, &'static Slot)) {
    let end_chunk = CHUNKS_END.load(Acquire);
    let mut c = first >> CHUNK_SHIFT;
    while c < end_chunk && c <= last >> CHUNK_SHIFT {
        let p = DIR.get(c).map_or(null_mut(), |d| d.load(Acquire));
        if !p.is_null() {
            let lo = (c << CHUNK_SHIFT).max(first);
            let hi = ((c << CHUNK_SHIFT) + CHUNK_LEN - 1).min(last);
            for fd in lo..=hi {
                // SAFETY: as in slot().
                if let Some(s) = unsafe { (*p).slots.get(fd & (CHUNK_LEN - 1)) } {
                    f(fd as RawFd, s);
                }
            }
        }
        c += 1;
    }
}

/// Calls `f` for every slot in chunks marked dirty since the last call, and clears the marks.
/// The watchdog's way to find new sockets without walking every long-lived connection.
pub fn drain_dirty(mut f: impl FnMut(RawFd, &'static Slot)) {
    for (w, word) in DIRTY.iter().enumerate() {
        if word.load(Relaxed) == 0 {
            continue;
        }
        let bits = word.swap(0, Acquire);
        for b in 0..64 {
            if bits & (1 << b) != 0 {
                let c = w * 64 + b;
                for_each(c << CHUNK_SHIFT, (c << CHUNK_SHIFT) + CHUNK_LEN - 1, &mut f);
            }
        }
    }
}

/// Marks every mapped chunk dirty, so the watchdog looks at all of it again.
pub fn mark_all_dirty_again() {
    let end = CHUNKS_END.load(Acquire);
    for c in 0..end {
        if let Some(w) = DIRTY.get(c / 64) {
            w.fetch_or(1 << (c % 64), Release);
        }
    }
}

/// After fork(), in the child: the releases under way in the parent's threads will not finish
/// here. The child's fd is the socket, or already closed, depending on when fork() came; the
/// child's watchdog checks what it is before doing anything.
pub fn after_fork_child() {
    for c in RELEASING.iter().filter(|c| c.load(Relaxed) != -1) {
        let fd = c.swap(-1, AcqRel);
        if let Some(s) = slot(fd) {
            let m = s.load();
            if m.state() == State::Releasing {
                s.meta.store(m.with_state(State::Tracked).with_flags(0, flag::CLOSE_PENDING).next_gen().0, Release);
            }
        }
    }
}

impl Slot {
    /// In a forked child only (one thread): forgets the word whatever it is, without waiting: a
    /// busy mark of the parent's thread never clears here.
    pub fn force_none(&self) {
        let m = self.load();
        self.meta.store(Meta::new(State::None, Role::Socket, false, 0, m.generation().wrapping_add(1)).0, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_packs_and_unpacks() {
        let m = Meta::new(State::Tracked, Role::Outbound, true, flag::CONNECTED | flag::SHARED, 0xdead_beef);
        assert_eq!(m.state(), State::Tracked);
        assert_eq!(m.role(), Role::Outbound);
        assert!(m.v6());
        assert!(m.has(flag::CONNECTED) && m.has(flag::SHARED) && !m.has(flag::WATCHED));
        assert_eq!(m.generation(), 0xdead_beef);
        assert_eq!(m.next_gen().generation(), 0xdead_bef0);
        assert_eq!(m.with_state(State::Releasing).role(), Role::Outbound);
        assert_eq!(Meta(0).state(), State::None);
    }

    #[test]
    fn claim_bumps_generation_so_a_stale_release_fails() {
        let s = slot_alloc(5000).unwrap();
        let seen = s.track(5000, Role::Accepted, false, 0, 1);
        // The watchdog inspected `seen`; the program closes the fd and accept() reuses it.
        assert_eq!(s.claim().state(), State::Tracked);
        let again = s.track(5000, Role::Accepted, false, 0, 2);
        assert_ne!(seen, again);
        assert!(s.begin_release(5000, seen, 0).is_none());
        let rel = s.begin_release(5000, again, 0).unwrap();
        assert_eq!(s.load().state(), State::Releasing);
        assert!(s.end_release(5000, rel, rel.with_state(State::Vacated), true));
        assert_eq!(s.load().state(), State::Vacated);
        assert_eq!(s.claim().state(), State::Vacated);
        assert_eq!(s.load().state(), State::None);
    }

    #[test]
    fn a_close_during_a_release_is_handed_over_and_done_by_the_releaser() {
        let s = slot_alloc(5003).unwrap();
        let m = s.track(5003, Role::Accepted, false, 0, 1);
        let rel = s.begin_release(5003, m, 0).unwrap();
        // The program's close() finds the release still under way: claim leaves it alone.
        assert_eq!(s.claim().state(), State::Releasing);
        assert!(s.hand_over_close(s.load()));
        assert!(!s.still(rel), "the release must see that the program closed the number");
        // The releaser closed nothing (number 5003 is not open: EBADF is ignored): it closes it.
        assert!(!s.end_release(5003, rel, rel.with_state(State::Vacated), false));
        assert_eq!(s.load().state(), State::None);
    }

    #[test]
    fn a_new_socket_at_the_number_wins_over_a_stale_release() {
        let s = slot_alloc(5004).unwrap();
        let m = s.track(5004, Role::Accepted, false, 0, 1);
        let rel = s.begin_release(5004, m, 0).unwrap();
        // After the bounded wait, the kernel handed the number out afresh: that word stands.
        let fresh = s.track(5004, Role::Outbound, false, 0, 2);
        assert!(!s.still(rel));
        assert!(!s.end_release(5004, rel, rel.with_state(State::Vacated), true));
        assert_eq!(s.load(), fresh);
    }

    #[test]
    fn own_fds_are_given_up_to_a_claim_unless_busy() {
        let s = slot_alloc(5001).unwrap();
        s.set_own(5001);
        assert_eq!(s.claim().state(), State::Own);
        assert_eq!(s.load().state(), State::None);
        s.set_own(5001);
        let busy = s.begin_own_use().unwrap();
        assert_eq!(s.claim().state(), State::Own, "a busy own fd is left alone");
        assert!(s.load().has(flag::BUSY));
        assert!(s.hand_over_close(s.load()));
        // The use ends: keepfix must close it (it was handed the program's close).
        assert!(!s.end_own_use(busy, 5001));
        assert_eq!(s.load().state(), State::None);
    }

    #[test]
    fn unclaim_restores_only_an_untouched_slot() {
        let s = slot_alloc(5002).unwrap();
        s.track(5002, Role::Listener, false, flag::CONFIGURED, 1);
        let old = s.claim();
        s.unclaim(old);
        assert_eq!(s.load().role(), Role::Listener);
        let old = s.claim();
        s.track(5002, Role::Accepted, false, 0, 1);
        s.unclaim(old);
        assert_eq!(s.load().role(), Role::Accepted);
    }

    #[test]
    fn out_of_range_fds_are_untracked() {
        assert!(slot(-1).is_none());
        assert!(slot_alloc(MAX_FD as RawFd).is_none());
    }
}
