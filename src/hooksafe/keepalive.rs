//! Keepalive: deciding which sockets are TCP, and putting keepfix's options on them (the stricter
//! of the program's value and keepfix's wins). Adoption at load is lifecycle::adopt's.
//!
//! All calls here are rustix raw syscalls: they never re-enter our setsockopt hook and never
//! touch errno, so a hook can call them between the real call and its return.

use crate::hooksafe::fdtable::{self, flag};
use crate::sys;
use core::ffi::c_int;
use rustix::fd::{BorrowedFd, RawFd};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketType, sockopt};

pub use crate::hooksafe::settings::Keepalive as Settings;

/// One keepalive option a program may set itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opt {
    KeepAlive,
    Idle,
    Intvl,
    Cnt,
    UserTimeout,
}

impl Opt {
    /// The option a setsockopt(level, name) call sets, if it is one keepfix manages.
    #[inline]
    pub fn of(level: c_int, name: c_int) -> Option<Opt> {
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => Some(Opt::KeepAlive),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => Some(Opt::Idle),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => Some(Opt::Intvl),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => Some(Opt::Cnt),
            (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT) => Some(Opt::UserTimeout),
            _ => None,
        }
    }
    pub fn app_flag(self) -> u32 {
        match self {
            Opt::KeepAlive => flag::APP_KEEPALIVE,
            Opt::Idle => flag::APP_IDLE,
            Opt::Intvl => flag::APP_INTVL,
            Opt::Cnt => flag::APP_CNT,
            Opt::UserTimeout => flag::APP_USER_TIMEOUT,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Opt::KeepAlive => "SO_KEEPALIVE",
            Opt::Idle => "TCP_KEEPIDLE",
            Opt::Intvl => "TCP_KEEPINTVL",
            Opt::Cnt => "TCP_KEEPCNT",
            Opt::UserTimeout => "TCP_USER_TIMEOUT",
        }
    }
    pub fn from_index(i: i64) -> Opt {
        match i {
            1 => Opt::Idle,
            2 => Opt::Intvl,
            3 => Opt::Cnt,
            4 => Opt::UserTimeout,
            _ => Opt::KeepAlive,
        }
    }
    pub fn index(self) -> i64 {
        self as i64
    }
    /// keepfix's value for this option, or `None` if keepfix leaves it alone.
    pub fn ours(self, s: &Settings) -> Option<u32> {
        match self {
            Opt::KeepAlive => Some(1),
            Opt::Idle => Some(s.idle_s),
            Opt::Intvl => Some(s.intvl_s),
            Opt::Cnt => Some(s.cnt),
            Opt::UserTimeout => s.user_timeout_ms,
        }
    }
}

/// Whose value of an option a program just set stays in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The program's value is at least as strict as keepfix's (finds a dead peer as fast or
    /// faster): it stays.
    Program,
    /// keepfix's is stricter: it goes back on.
    Ours,
    /// keepfix has no value of its own for this option (TCP_USER_TIMEOUT unset).
    Untouched,
}

/// The stricter of the program's `value` for `opt` and keepfix's: keepalive on beats off, a
/// shorter idle time, interval or user timeout and fewer probes beat longer and more. A
/// TCP_USER_TIMEOUT of 0 means the kernel's default (no bound), the loosest of all. A value that
/// could not be read (None) counts as the program's: keepfix never fights what it cannot see.
pub fn stricter(opt: Opt, value: Option<c_int>, s: &Settings) -> Verdict {
    let Some(ours) = opt.ours(s) else { return Verdict::Untouched };
    let Some(v) = value else { return Verdict::Program };
    let v = v as i64;
    let ours = i64::from(ours);
    let program_wins = match opt {
        Opt::KeepAlive => v != 0,
        Opt::UserTimeout => v > 0 && v <= ours,
        Opt::Idle | Opt::Intvl | Opt::Cnt => v > 0 && v <= ours,
    };
    if program_wins { Verdict::Program } else { Verdict::Ours }
}

/// Options whose override by the program was logged already (once per process and option).
static OVERRIDE_LOGGED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// True the first time the program overrides `opt` in this process.
pub fn first_override(opt: Opt) -> bool {
    let bit = opt.app_flag();
    OVERRIDE_LOGGED.fetch_or(bit, core::sync::atomic::Ordering::Relaxed) & bit == 0
}

/// The order options are set in: timings first and SO_KEEPALIVE last, so a connection whose
/// handshake completes on a listener part-way through either inherits keepalive off, or on with
/// every timing already in place.
const ORDER: [Opt; 5] = [Opt::Idle, Opt::Intvl, Opt::Cnt, Opt::UserTimeout, Opt::KeepAlive];

/// Is socket(domain, type, protocol) a TCP socket? `Some(is_ipv6)` if so.
#[inline]
pub fn is_tcp_request(domain: c_int, ty: c_int, protocol: c_int) -> Option<bool> {
    if ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != libc::SOCK_STREAM {
        return None;
    }
    if protocol != 0 && protocol != libc::IPPROTO_TCP {
        return None;
    }
    match domain {
        libc::AF_INET => Some(false),
        libc::AF_INET6 => Some(true),
        _ => None,
    }
}

/// Asks the kernel whether `fd` is a TCP socket: `Some(is_ipv6)` if so. Non-sockets cost one
/// failed getsockopt.
pub fn probe_tcp(fd: BorrowedFd<'_>) -> Option<bool> {
    let v6 = match sockopt::socket_domain(fd).ok()? {
        AddressFamily::INET => false,
        AddressFamily::INET6 => true,
        _ => return None,
    };
    if sockopt::socket_type(fd).ok()? != SocketType::STREAM {
        return None;
    }
    match sockopt::socket_protocol(fd).ok()? {
        Some(p) if p == rustix::net::ipproto::TCP => Some(v6),
        _ => None,
    }
}

fn set(fd: BorrowedFd<'_>, opt: Opt, v: u32) -> Result<(), Errno> {
    match opt {
        Opt::KeepAlive => sockopt::set_socket_keepalive(fd, v != 0),
        Opt::Idle => sockopt::set_tcp_keepidle(fd, core::time::Duration::from_secs(v.into())),
        Opt::Intvl => sockopt::set_tcp_keepintvl(fd, core::time::Duration::from_secs(v.into())),
        Opt::Cnt => sockopt::set_tcp_keepcnt(fd, v),
        Opt::UserTimeout => sockopt::set_tcp_user_timeout(fd, v),
    }
}

fn get(fd: BorrowedFd<'_>, opt: Opt) -> Result<u32, Errno> {
    match opt {
        Opt::KeepAlive => sockopt::socket_keepalive(fd).map(u32::from),
        Opt::Idle => sockopt::tcp_keepidle(fd).map(|d| d.as_secs() as u32),
        Opt::Intvl => sockopt::tcp_keepintvl(fd).map(|d| d.as_secs() as u32),
        Opt::Cnt => sockopt::tcp_keepcnt(fd),
        Opt::UserTimeout => sockopt::tcp_user_timeout(fd),
    }
}

/// Puts keepfix's options on a TCP socket, except those in `skip` (APP_* flags: options whose
/// program value stays, because it is stricter or under KEEPFIX_RESPECT_APP). On failure, says
/// which option and why.
pub fn apply(fd: RawFd, s: &Settings, skip: u32) -> Result<(), (Opt, Errno)> {
    let Some(b) = sys::borrow(fd) else { return Err((Opt::KeepAlive, Errno::BADF)) };
    for opt in ORDER {
        if skip & opt.app_flag() != 0 {
            continue;
        }
        if let Some(v) = opt.ours(s) {
            set(b, opt, v).map_err(|e| (opt, e))?;
        }
    }
    Ok(())
}

/// Sets one option back to keepfix's value (after the program changed it).
pub fn reapply(fd: RawFd, opt: Opt, s: &Settings) -> Result<(), Errno> {
    match (sys::borrow(fd), opt.ours(s)) {
        (Some(b), Some(v)) => set(b, opt, v),
        _ => Ok(()),
    }
}

/// Does the socket already carry keepfix's options (say, inherited from its listener)? Stops at
/// the first difference, so a socket without keepalive costs one getsockopt.
pub fn has_ours(fd: RawFd, s: &Settings, skip: u32) -> bool {
    let Some(b) = sys::borrow(fd) else { return false };
    ORDER
        .iter()
        .rev()
        .all(|&opt| skip & opt.app_flag() != 0 || opt.ours(s).is_none_or(|v| get(b, opt).is_ok_and(|got| got == v)))
}

/// The APP_* flags of the options on `fd` whose current value is already at least as strict as
/// keepfix's: for a socket keepfix did not see made (inherited at exec, made by a raw syscall),
/// whose options it cannot know from the setsockopt hook. One getsockopt per option.
pub fn stricter_already(fd: RawFd, s: &Settings) -> u32 {
    let Some(b) = sys::borrow(fd) else { return 0 };
    // Per option, whether keepalive is on yet or not: a program may set a short idle on a
    // listener and turn keepalive on per accepted connection, which inherit it. (A value never
    // set reads as the system's default, 7200/75/9 unless net.ipv4.tcp_keepalive_* were lowered:
    // stricter than keepfix's only if an administrator made it so, and then it stays too.)
    let on = sockopt::socket_keepalive(b).unwrap_or(false);
    let timings = ORDER
        .iter()
        .filter(|&&opt| {
            opt != Opt::KeepAlive && get(b, opt).is_ok_and(|v| stricter(opt, Some(v as c_int), s) == Verdict::Program)
        })
        .fold(0, |acc, opt| acc | opt.app_flag());
    if on { timings | flag::APP_KEEPALIVE } else { timings }
}

/// Applies keepfix's options to a freshly tracked socket and records the outcome in its slot;
/// a failure is deferred to the watchdog's log.
pub fn configure(fd: RawFd, slot: &fdtable::Slot, s: &Settings) {
    let skip = slot.load().flags() & flag::APP_ANY;
    match apply(fd, s, skip) {
        Ok(()) => {
            slot.set_flags(flag::CONFIGURED, 0);
        }
        Err((opt, e)) => crate::hooksafe::ring::defer(
            crate::hooksafe::ring::Deferred::KeepaliveFailed,
            fd,
            opt.index(),
            e.raw_os_error().into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_socket_calls_are_tcp() {
        use libc::*;
        assert_eq!(is_tcp_request(AF_INET, SOCK_STREAM, 0), Some(false));
        assert_eq!(is_tcp_request(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP), Some(true));
        assert_eq!(is_tcp_request(AF_INET, SOCK_DGRAM, 0), None);
        assert_eq!(is_tcp_request(AF_UNIX, SOCK_STREAM, 0), None);
        assert_eq!(is_tcp_request(AF_INET, SOCK_STREAM, IPPROTO_UDP), None);
        assert_eq!(is_tcp_request(AF_INET, SOCK_STREAM, 262 /* MPTCP */), None);
        assert_eq!(is_tcp_request(AF_INET, SOCK_RAW, IPPROTO_TCP), None);
        assert_eq!(is_tcp_request(AF_NETLINK, SOCK_STREAM, 0), None);
    }

    #[test]
    fn options_map_to_flags() {
        assert_eq!(Opt::of(libc::SOL_SOCKET, libc::SO_KEEPALIVE), Some(Opt::KeepAlive));
        assert_eq!(Opt::of(libc::IPPROTO_TCP, libc::TCP_NODELAY), None);
        for (i, o) in [Opt::KeepAlive, Opt::Idle, Opt::Intvl, Opt::Cnt, Opt::UserTimeout].iter().enumerate() {
            assert_eq!(Opt::from_index(i as i64), *o);
            assert_eq!(o.index(), i as i64);
        }
    }
}
