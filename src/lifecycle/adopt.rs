//! At load: the TCP sockets the process already holds (inherited across exec from inetd, systemd
//! or a parent) are adopted: tracked, and given keepfix's options. Runs in the constructor only.

use crate::event::Event;
use crate::hooksafe::fdtable::{self, Role, flag};
use crate::hooksafe::keepalive::{Opt, Settings, apply, probe_tcp, stricter_already};
use crate::sys;
use crate::watchdog::fds::for_each_open_fd;
use rustix::fd::RawFd;
use rustix::io::Errno;
use rustix::net::sockopt;

/// At load time: finds the TCP sockets the process already holds (inherited across exec from
/// inetd, systemd or a parent) and adopts them: tracked, and given keepfix's options. A listener
/// may have connections queued from before; their accepted sockets are checked one by one
/// (flag CHECK_ACCEPTED). Reads /proc/self/fd, or probes the first fds if /proc is missing.
pub fn adopt_inherited(s: &Settings) {
    let listen_fds = systemd_listen_fds();
    let mut adopt = |fd: RawFd| {
        let Some(b) = sys::borrow(fd) else { return };
        let Some(v6) = probe_tcp(b) else { return };
        let listening = sockopt::socket_acceptconn(b).unwrap_or(false);
        let info = sys::tcp_info(fd).ok();
        let mut flags = 0;
        // Under KEEPFIX_RESPECT_APP, keepalive someone already put on an inherited socket (a
        // systemd socket unit's KeepAlive=, say) is theirs.
        if s.respect_app && sockopt::socket_keepalive(b).unwrap_or(false) {
            flags |= flag::APP_ANY;
        } else {
            // Never loosen what the socket already has (a systemd socket unit's KeepAlive=...).
            flags |= stricter_already(fd, s);
        }
        let role = if listening {
            flags |= flag::CHECK_ACCEPTED;
            Role::InheritedListener
        } else {
            if info.is_some_and(|i| i.state != sys::tcp_state::CLOSE && i.state != sys::tcp_state::SYN_SENT) {
                flags |= flag::CONNECTED;
            }
            Role::Inherited
        };
        let Some(slot) = fdtable::slot_alloc(fd) else { return };
        slot.track(fd, role, v6, flags, sys::now_s());
        let result = apply(fd, s, flags & flag::APP_ANY);
        if result.is_ok() {
            slot.set_flags(flag::CONFIGURED, 0);
        }
        // An inherited connection can leak (inetd-style): it wants the watchdog before main(). A
        // listener alone does not: its first accept() or listen() starts it, and until then the
        // process stays single-threaded (a helper exec'd with an open listener can still enter a
        // user namespace).
        if role == Role::Inherited {
            crate::watchdog::control::want_start();
        }
        report_adopted(fd, role, v6, listen_fds.is_some_and(|(lo, hi)| (lo..hi).contains(&fd)), info, result);
    };
    if !for_each_open_fd(&mut adopt) {
        for fd in 0..256 {
            adopt(fd);
        }
    }
}

fn report_adopted(
    fd: RawFd,
    role: Role,
    _v6: bool,
    activated: bool,
    info: Option<sys::TcpInfo>,
    result: Result<(), (Opt, Errno)>,
) {
    let failed = result.err().map(|(opt, e)| (opt.name(), e.raw_os_error()));
    let local = crate::addr::local(fd);
    let peer = crate::addr::peer(fd);
    let source = if activated {
        "LISTEN_FDS"
    } else if fd <= 2 {
        "stdio"
    } else {
        "inherited"
    };
    let state = info.map_or(u8::MAX, |i| i.state);
    crate::hooksafe::log::event(&Event::Adopt { fd, role: role.name(), local, peer, state, source, failed });
}

/// The fd range systemd passed (LISTEN_FDS), if LISTEN_PID names this process.
fn systemd_listen_fds() -> Option<(RawFd, RawFd)> {
    let pid: i32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    if pid != sys::getpid() {
        return None;
    }
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    Some((3, 3 + n.clamp(0, 65536)))
}
