//! The watchdog's own cost, for metrics: ticks, the last and the longest, and its CPU time.

use crate::sys;
use core::sync::atomic::{AtomicU64, Ordering::*};

/// The last and the longest periodic tick, in nanoseconds, and the thread's CPU time: metrics.
pub static TICK_LAST_NS: AtomicU64 = AtomicU64::new(0);
pub static TICK_MAX_NS: AtomicU64 = AtomicU64::new(0);
pub static TICKS: AtomicU64 = AtomicU64::new(0);
pub static CPU_NS: AtomicU64 = AtomicU64::new(0);

/// (ticks, last tick ns, longest tick ns, watchdog CPU ns) since the watchdog started.
pub fn tick_stats() -> (u64, u64, u64, u64) {
    (TICKS.load(Relaxed), TICK_LAST_NS.load(Relaxed), TICK_MAX_NS.load(Relaxed), CPU_NS.load(Relaxed))
}

pub fn clock_ns(id: rustix::time::ClockId) -> u64 {
    let t = sys::clock_gettime(id);
    (t.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(t.tv_nsec as u64)
}
