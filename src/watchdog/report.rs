//! Writing what hooks deferred (the ring), on the watchdog's thread or by the destructor: each
//! record becomes an Event (event.rs says how it reads).

use crate::addr::Addr;
use crate::event::{Action, Breakdown, EmfileAction, Event, Used};
use crate::hooksafe::{emfile, keepalive, log, ring};
use crate::watchdog::monitor;

/// Writes the lines hooks deferred. Also called by the destructor at exit, so that a short-lived
/// program's events are not lost.
pub fn report_deferred() {
    use ring::Deferred;
    // A census reads every fd: at most one per batch, however many EMFILE events came.
    let mut census: Option<Breakdown> = None;
    ring::drain(|kind, fd, a, b| match kind {
        Deferred::AppKeepaliveOff => {
            let opt = keepalive::Opt::from_index(a);
            let what = if opt == keepalive::Opt::KeepAlive { "kept_on" } else { "restored" };
            let action = if b != 0 { what } else { "restore_failed" };
            log::event(&Event::AppOverride { fd, option: opt.name(), action });
        }
        Deferred::KeepaliveFailed => {
            log::event(&Event::KeepaliveFailed { fd, option: keepalive::Opt::from_index(a).name(), errno: b as i32 })
        }
        Deferred::StuckRelease => log::event(&Event::WatchdogStalled { waited_us: crate::hooksafe::fdtable::WAIT_US }),
        Deferred::SelectTooBig => log::event(&Event::SelectTooBig { nfds: a }),
        Deferred::Emfile => {
            let e = b as i32;
            let action = match a {
                emfile::EMFILE_FREED => EmfileAction::FreedAndAccepted { freed: b as u64 },
                emfile::EMFILE_SHARED_LISTENER => EmfileAction::NoneSharedListener { errno: e },
                emfile::EMFILE_REJECTED_CONNECTION => EmfileAction::RejectedPendingConnection { errno: e },
                emfile::EMFILE_NO_RESERVE => EmfileAction::NoneNoReserveFd { errno: e },
                _ => EmfileAction::NoneNoPendingConnection { errno: e },
            };
            let (soft, _) = emfile::limits();
            let breakdown = *census.get_or_insert_with(monitor::census);
            // At EMFILE the table held at least the limit.
            let used = breakdown.used(soft);
            log::event(&Event::Emfile { listener: fd, action, used, limit: soft, breakdown });
        }
        Deferred::ReleasedAtEmfile => log::event(&Event::CloseWait {
            fd,
            peer: Addr::Unknown,
            local: Addr::Unknown,
            age_s: 0,
            state: a as u8,
            unread: 0,
            action: Action::Vacated,
            at_emfile: true,
        }),
        Deferred::ChildrenWithoutWatchdog => {
            log::event(&Event::ChildrenWithoutWatchdog { rlimit_nproc: a, system_tasks: b })
        }
        Deferred::RlimitChanged => {
            log::event(&Event::RlimitNofile {
                soft: a,
                hard: b,
                used: monitor::used_now().unwrap_or(Used::AtLeast(0)),
            });
        }
    });
    let dropped = ring::take_dropped();
    if dropped > 0 {
        log::event(&Event::EventsDropped { count: dropped });
    }
}
