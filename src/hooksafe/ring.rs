//! The deferred-event ring: what hooks report for the watchdog to log. Many producers (hooks, any
//! thread, signal handlers), one consumer. Lock-free, allocation-free, async-signal-safe.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering::*};
use rustix::fd::RawFd;

/// What hooks report for the watchdog to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Deferred {
    /// The program turned keepalive off on a tracked socket; a = option, b = 1 if kept on.
    AppKeepaliveOff = 1,
    /// A keepalive setsockopt failed; a = option, b = errno.
    KeepaliveFailed = 2,
    /// A hook waited fdtable::WAIT_US for a release or an own-fd use and went on without it.
    StuckRelease = 3,
    /// select() with nfds > FD_SETSIZE; a = nfds.
    SelectTooBig = 4,
    /// accept() hit EMFILE; a = what keepfix did (see emfile), b = errno or the numbers freed.
    Emfile = 5,
    /// setrlimit/prlimit changed RLIMIT_NOFILE; a = new soft limit, b = new hard limit.
    RlimitChanged = 6,
    /// accept() hit EMFILE and released a socket left in CLOSE_WAIT at once; a = TCP state.
    ReleasedAtEmfile = 7,
    /// fork()ed children get no watchdog (a task limit is near); a = RLIMIT_NPROC, b = system tasks.
    ChildrenWithoutWatchdog = 8,
}

impl Deferred {
    fn from_u32(v: u32) -> Option<Deferred> {
        Some(match v {
            1 => Deferred::AppKeepaliveOff,
            2 => Deferred::KeepaliveFailed,
            3 => Deferred::StuckRelease,
            4 => Deferred::SelectTooBig,
            5 => Deferred::Emfile,
            6 => Deferred::RlimitChanged,
            7 => Deferred::ReleasedAtEmfile,
            8 => Deferred::ChildrenWithoutWatchdog,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The deferred-event ring: many producers (hooks, any thread, signal handlers), one consumer.

const RING_LEN: u64 = 256;

struct Rec {
    /// 2 × turn: empty and ready for the writer of that turn; 2 × turn + 1: full.
    seq: AtomicU64,
    kind: AtomicU32,
    fd: AtomicI32,
    a: AtomicI64,
    b: AtomicI64,
}

static RING: [Rec; RING_LEN as usize] = [const {
    Rec {
        seq: AtomicU64::new(0),
        kind: AtomicU32::new(0),
        fd: AtomicI32::new(0),
        a: AtomicI64::new(0),
        b: AtomicI64::new(0),
    }
}; RING_LEN as usize];
static HEAD: AtomicU64 = AtomicU64::new(0);
static TAIL: AtomicU64 = AtomicU64::new(0);
static CONSUMER: AtomicBool = AtomicBool::new(false);
static RING_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Records an event for the watchdog to log. Lock-free, allocation-free, async-signal-safe; when
/// the ring is full the event is counted and dropped.
pub fn defer(kind: Deferred, fd: RawFd, a: i64, b: i64) {
    let mut pos = HEAD.load(Relaxed);
    loop {
        let Some(rec) = RING.get((pos % RING_LEN) as usize) else { return };
        let turn = pos / RING_LEN;
        let seq = rec.seq.load(Acquire);
        if seq == 2 * turn {
            match HEAD.compare_exchange_weak(pos, pos + 1, Relaxed, Relaxed) {
                Ok(_) => {
                    rec.kind.store(kind as u32, Relaxed);
                    rec.fd.store(fd, Relaxed);
                    rec.a.store(a, Relaxed);
                    rec.b.store(b, Relaxed);
                    rec.seq.store(2 * turn + 1, Release);
                    return;
                }
                Err(actual) => pos = actual,
            }
        } else if seq < 2 * turn {
            RING_DROPPED.fetch_add(1, Relaxed);
            return;
        } else {
            pos = HEAD.load(Relaxed);
        }
    }
}

/// Takes every recorded event, oldest first. One consumer at a time: a second caller gets none.
pub fn drain(mut f: impl FnMut(Deferred, RawFd, i64, i64)) {
    if CONSUMER.swap(true, Acquire) {
        return;
    }
    let mut pos = TAIL.load(Relaxed);
    while let Some(rec) = RING.get((pos % RING_LEN) as usize) {
        let turn = pos / RING_LEN;
        if rec.seq.load(Acquire) != 2 * turn + 1 {
            break;
        }
        let (k, fd, a, b) = (rec.kind.load(Relaxed), rec.fd.load(Relaxed), rec.a.load(Relaxed), rec.b.load(Relaxed));
        rec.seq.store(2 * (turn + 1), Release);
        pos += 1;
        if let Some(k) = Deferred::from_u32(k) {
            f(k, fd, a, b);
        }
    }
    TAIL.store(pos, Relaxed);
    CONSUMER.store(false, Release);
}

/// Events dropped because the ring was full, since the last call.
pub fn take_dropped() -> u64 {
    RING_DROPPED.swap(0, Relaxed)
}

/// In a forked child: events the parent recorded are the parent's to log; a half-written record
/// would stall the ring, so it starts afresh.
pub fn after_fork_child() {
    if CONSUMER.load(Relaxed) {
        CONSUMER.store(false, Release);
    }
    // Empty and whole (no record claimed and not yet written): nothing to reset, and its pages
    // stay shared with the parent (no copy-on-write fault per child).
    if HEAD.load(Relaxed) == TAIL.load(Relaxed) {
        return;
    }
    for r in RING.iter() {
        r.seq.store(0, Relaxed);
    }
    HEAD.store(0, Relaxed);
    TAIL.store(0, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_order_and_counts_overflow() {
        for i in 0..(RING_LEN as i64 + 10) {
            defer(Deferred::Emfile, 7, i, 0);
        }
        let mut seen = Vec::new();
        // The ring is the process's: a test of the fd table in another thread may defer its own
        // event meanwhile (a hook that waited), so only this test's records are compared.
        drain(|k, fd, a, _| {
            if (k, fd) == (Deferred::Emfile, 7) {
                seen.push(a);
            }
        });
        assert!(seen.len() >= RING_LEN as usize - 8, "{} records kept", seen.len());
        assert_eq!(seen, (0..seen.len() as i64).collect::<Vec<_>>());
        defer(Deferred::SelectTooBig, 1, 2, 3);
        let mut again = Vec::new();
        drain(|k, fd, a, b| again.push((k, fd, a, b)));
        assert!(again.contains(&(Deferred::SelectTooBig, 1, 2, 3)), "{again:?}");
    }
}
