//! Writing what hooks deferred (the ring), on the watchdog's thread or by the destructor.

use crate::event::errno_name;
use crate::hooksafe::{emfile as nofile, keepalive, log, ring};
use crate::sys;
use crate::watchdog::monitor;

/// Writes the lines hooks deferred. Also called by the destructor at exit, so that a short-lived
/// program's events are not lost.
pub fn report_deferred(monitor: &monitor::Monitor) {
    use log::{Level, emit};
    use ring::Deferred;
    // A census reads every fd: at most one per batch, however many EMFILE events came.
    let mut census: Option<monitor::Census> = None;
    ring::drain(|kind, fd, a, b| match kind {
        Deferred::AppKeepaliveOff => {
            let opt = keepalive::Opt::from_index(a);
            let what = if opt == keepalive::Opt::KeepAlive { "kept_on" } else { "restored" };
            let action = if b != 0 { what } else { "restore_failed" };
            emit(
                Level::Notice,
                format_args!(
                    "app_override fd={fd} option={} action={action} note=\"the program changed a keepalive option; KEEPFIX_RESPECT_APP=1 lets it (logged once per option)\"",
                    opt.name()
                ),
            );
        }
        Deferred::KeepaliveFailed => emit(
            Level::Warning,
            format_args!(
                "keepalive_failed fd={fd} option={} errno={}",
                keepalive::Opt::from_index(a).name(),
                errno_name(b as i32)
            ),
        ),
        Deferred::StuckRelease => emit(
            Level::Warning,
            format_args!(
                "watchdog_stalled waited_us={} note=\"a hook found keepfix's thread inside a release or a use of its own fd for longer than this; the program's call went on without it (a close was handed over, a dup2 got EBUSY); logged once\"",
                crate::hooksafe::fdtable::WAIT_US
            ),
        ),
        Deferred::SelectTooBig => emit(
            Level::Err,
            format_args!(
                "select_nfds_too_big nfds={a} fd_setsize={} note=\"select() on fd >= 1024 reads and writes past fd_set: a memory-corrupting bug in the program\"",
                libc::FD_SETSIZE
            ),
        ),
        Deferred::Emfile => {
            let action = match a {
                nofile::EMFILE_FREED => "freed_and_accepted",
                nofile::EMFILE_SHARED_LISTENER => "none_shared_listener",
                nofile::EMFILE_REJECTED_CONNECTION => "rejected_pending_connection",
                nofile::EMFILE_NO_RESERVE => "none_no_reserve_fd",
                _ => "none_no_pending_connection",
            };
            let (soft, _) = nofile::limits();
            let c = census.get_or_insert_with(monitor::Census::take);
            let what = if a == nofile::EMFILE_FREED {
                format!("freed={b}")
            } else {
                format!("errno={}", errno_name(b as i32))
            };
            emit(
                Level::Warning,
                format_args!(
                    "emfile listener={fd} action={action} {what} used={} limit={soft} {}",
                    c.used,
                    c.breakdown()
                ),
            );
        }
        Deferred::ReleasedAtEmfile => emit(
            Level::Notice,
            format_args!(
                "close_wait fd={fd} peer=- local=- age=0s state={} unread=0 action=vacated reason=emfile",
                sys::tcp_state::name(a as u8)
            ),
        ),
        Deferred::ChildrenWithoutWatchdog => emit(
            Level::Notice,
            format_args!(
                "watchdog_unavailable in=forked_children reason=task_limit rlimit_nproc={a} system_tasks={b} note=\"children forked near the task limit run with hooks only, so that keepfix's threads never take a task the program needs\""
            ),
        ),
        Deferred::RlimitChanged => {
            emit(Level::Notice, format_args!("rlimit_nofile soft={a} hard={b} used={}", monitor.used()))
        }
    });
    let dropped = ring::take_dropped();
    if dropped > 0 {
        emit(Level::Warning, format_args!("events_dropped count={dropped} reason=ring_full"));
    }
}
