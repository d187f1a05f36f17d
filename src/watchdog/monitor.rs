//! The fd limit, on the watchdog's thread: an exact count of the process's fds when the hooks'
//! hint or the last count nears the warning level (and once a minute otherwise), the warnings at
//! each level with a breakdown by kind (the census), and freeing the numbers of forgotten sockets
//! near the limit.

use crate::config::CloseWaitMode;
use crate::event::{Breakdown, Census, Event, Used};
use crate::hooksafe::emfile::{MAX_FD_SEEN, limits, set_poke_at};
use crate::hooksafe::fdtable::{self, Meta, State, flag};
use crate::hooksafe::log;
use crate::hooksafe::settings::Runtime;
use crate::hooksafe::{ownfd, release};
use crate::sys;
use core::sync::atomic::Ordering::*;
use rustix::fd::RawFd;
/// The process's fds by kind, counted now; or why they could not be (no fd free to read
/// /proc/self/fd with, at a full table, and too many numbers to probe one by one).
pub fn census() -> Breakdown {
    let mut c = Census::default();
    // Rare (an EMFILE batch, a warning level) and read by an operator: probes whatever the time.
    crate::watchdog::fds::allow_next_probe();
    let counted = crate::watchdog::fds::for_each_open_fd(&mut |fd| {
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
        } else if crate::hooksafe::keepalive::probe_tcp(b).is_some() {
            c.tcp += 1;
            let st = sys::tcp_info(fd).map_or(0, |i| i.state) as usize;
            if let Some(n) = c.tcp_by_state.get_mut(st) {
                *n += 1;
            }
        } else {
            c.other_sockets += 1;
        }
    });
    if counted { Breakdown::Counted(c) } else { Breakdown::NotCounted("proc_fd_unavailable") }
}

/// Counts the open fds: the size of /proc/self/fd, or its entries (less the directory's own).
pub fn count_open_fds() -> Option<u64> {
    if let Some(n) = ownfd::open_fd_count() {
        return Some(n);
    }
    let mut n = 0u64;
    crate::watchdog::fds::for_each_open_fd(&mut |_| n += 1).then_some(n)
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
                let freed = vacate_forgotten_many(rt, want.max(1));
                if freed > 0 {
                    log::event(&Event::Vacate { count: freed, used: Used::Counted(used), limit: soft });
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
            let breakdown = census();
            let used = breakdown.used(used);
            log::event(&Event::Nofile { used, limit: soft, level: reached, breakdown });
        } else if self.level > 0 && pct + 5 < warn {
            self.level = 0;
            log::event(&Event::NofileRecovered { used: Used::Counted(used), limit: soft });
        }
    }
}

/// The watchdog's version of [`release::vacate_forgotten`], for any number: near the limit it frees many.
pub fn vacate_forgotten_many(rt: &Runtime, n: usize) -> usize {
    if rt.cfg.close_wait != CloseWaitMode::Close {
        return 0;
    }
    let mut all: Vec<(u32, RawFd, Meta, u64)> = Vec::new();
    fdtable::for_each(0, fdtable::MAX_FD - 1, |fd, s| {
        let m = s.load();
        if m.is_tracked() && m.has(flag::SAW_EOF) {
            if let Some((ino, idle_ms)) = release::forgotten(rt, fd, m, s) {
                all.push((idle_ms, fd, m, ino));
            }
        }
    });
    all.sort_unstable_by_key(|&(idle, fd, _, _)| (core::cmp::Reverse(idle), fd));
    all.iter().take(n).filter(|&&(_, fd, m, ino)| release::vacate(rt, fd, m, ino)).count()
}

/// How many fds the process holds now: counted, or (when no count can be taken) at least the
/// open numbers up to the highest accept() ever returned, probed now. Not that number plus one:
/// it never goes down, and a server that peaked and closed its fds would be said to hold them
/// still. One fcntl per number, at most fds::PROBE_MAX, and at most once a second on keepfix's
/// thread (fds::probe_allowed): None when neither can be had now. For lines and metrics.
pub fn used_now() -> Option<Used> {
    match count_open_fds() {
        Some(n) => Some(Used::Counted(n)),
        None => {
            let top = MAX_FD_SEEN.load(Relaxed).min(crate::watchdog::fds::PROBE_MAX as i32 - 1);
            if top < 0 || !crate::watchdog::fds::probe_allowed(top as u64 + 1) {
                return None;
            }
            Some(Used::AtLeast((0..=top).filter(|&fd| sys::fd_exists(fd)).count() as u64))
        }
    }
}
