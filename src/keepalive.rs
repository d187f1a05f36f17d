//! Keepalive: deciding which sockets are TCP, putting keepfix's options on them, and adopting
//! the TCP sockets a process already holds when the library loads (inetd, systemd, exec).
//!
//! All calls here are rustix raw syscalls: they never re-enter our setsockopt hook and never
//! touch errno, so a hook can call them between the real call and its return.

use crate::fdtable::{self, Role, flag};
use crate::sys;
use core::ffi::c_int;
use rustix::fd::{BorrowedFd, RawFd};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketType, sockopt};

/// keepfix's keepalive settings, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
    pub user_timeout_ms: Option<u32>,
    pub respect_app: bool,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Settings {
        Settings {
            idle_s: c.idle_s,
            intvl_s: c.intvl_s,
            cnt: c.cnt,
            user_timeout_ms: c.user_timeout_ms(),
            respect_app: c.respect_app,
        }
    }
}

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
    // Keepalive off makes the timings moot: only once it is on do they count as the program's.
    if !sockopt::socket_keepalive(b).unwrap_or(false) {
        return 0;
    }
    ORDER
        .iter()
        .filter(|&&opt| {
            opt != Opt::KeepAlive && get(b, opt).is_ok_and(|v| stricter(opt, Some(v as c_int), s) == Verdict::Program)
        })
        .fold(flag::APP_KEEPALIVE, |acc, opt| acc | opt.app_flag())
}

/// Applies keepfix's options to a freshly tracked socket and records the outcome in its slot;
/// a failure is deferred to the watchdog's log.
pub fn configure(fd: RawFd, slot: &fdtable::Slot, s: &Settings) {
    let skip = slot.load().flags() & flag::APP_ANY;
    match apply(fd, s, skip) {
        Ok(()) => {
            slot.set_flags(flag::CONFIGURED, 0);
        }
        Err((opt, e)) => {
            crate::log::defer(crate::log::Deferred::KeepaliveFailed, fd, opt.index(), e.raw_os_error().into())
        }
    }
}

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
            crate::watchdog::want_start();
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
    use crate::log::{Level, emit};
    let local = crate::addr::local(fd);
    let peer = crate::addr::peer(fd);
    let source = if activated {
        "LISTEN_FDS"
    } else if fd <= 2 {
        "stdio"
    } else {
        "inherited"
    };
    let state = info.map_or("UNKNOWN", |i| sys::tcp_state::name(i.state));
    match result {
        Ok(()) => emit(
            Level::Info,
            format_args!(
                "adopt fd={fd} role={} local={local} peer={peer} state={state} source={source} action=keepalive_on",
                role.name()
            ),
        ),
        Err((opt, e)) => emit(
            Level::Warning,
            format_args!(
                "adopt fd={fd} role={} local={local} peer={peer} state={state} source={source} action=failed option={} errno={}",
                role.name(),
                opt.name(),
                e.raw_os_error()
            ),
        ),
    }
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

/// Calls `f` with every open fd number, from /proc/self/fd. False if /proc is not there.
/// The watchdog reads the directory through a cached fd of its own (no new fd, so it never takes
/// a number the program is about to get); the constructor, before main(), opens it afresh.
pub fn for_each_open_fd(f: &mut dyn FnMut(RawFd)) -> bool {
    use rustix::fs::{Mode, OFlags};
    if crate::watchdog::on_watchdog_thread() {
        let Some(dir) = crate::ownfd::proc_fd_dir() else { return probe_fds(f) };
        let fds = crate::ownfd::with(dir, |b| {
            rustix::fs::seek(b, rustix::fs::SeekFrom::Start(0)).ok()?;
            Some(read_fd_dir(b, None))
        });
        let Some(Some(fds)) = fds else { return false };
        for fd in fds {
            f(fd);
        }
        return true;
    }
    let transient;
    let dir = {
        let Ok(d) =
            rustix::fs::open("/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        else {
            return false;
        };
        transient = Some(sys::own(d));
        transient.as_ref().map_or(-1, |d| d.raw())
    };
    let Some(b) = sys::borrow(dir) else { return false };
    let fds = read_fd_dir(b, Some(dir));
    drop(transient);
    for fd in fds {
        f(fd);
    }
    true
}

/// Without a /proc/self/fd of keepfix's own (lean mode, see ownfd::LEAN_BELOW): asks the
/// kernel about each number below the soft limit, one fcntl(F_GETFD) each, opening nothing.
fn probe_fds(f: &mut dyn FnMut(RawFd)) -> bool {
    let Some(soft) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current else { return false };
    if soft > crate::ownfd::LEAN_BELOW {
        return false;
    }
    for fd in 0..soft as RawFd {
        if sys::fd_exists(fd) {
            f(fd);
        }
    }
    true
}

/// The numbers in an open /proc/PID/fd directory, less `skip` (the directory's own fd).
fn read_fd_dir(b: BorrowedFd<'_>, skip: Option<RawFd>) -> Vec<RawFd> {
    use rustix::fs::RawDir;
    let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 8192];
    let mut fds = Vec::new();
    let mut it = RawDir::new(b, &mut buf);
    while let Some(Ok(ent)) = it.next() {
        if let Some(fd) = ent.file_name().to_str().ok().and_then(|s| s.parse::<RawFd>().ok()) {
            if Some(fd) != skip {
                fds.push(fd);
            }
        }
    }
    fds
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
