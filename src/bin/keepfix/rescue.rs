//! `keepfix rescue PID...`: relief for a server that is already running and leaking, from outside
//! and without a pause. Through pidfd_getfd keepfix takes a duplicate of each of the process's TCP
//! sockets, one at a time, and through it:
//! - puts keepalive with keepfix's timings on it (listeners too: their options are copied to every
//!   connection accepted later), the stricter value winning per option, as in the library;
//! - shuts down (SHUT_RDWR) a socket left idle in CLOSE_WAIT for at least `--after`, with nothing
//!   unsent and (unless `--include-unread`) nothing unread, unless SIGPIPE is at its default
//!   disposition (a later write would kill the program) and `--force` is not given;
//! - closes the duplicate at once (it keeps the socket alive while it is open).
//!
//! Every decision is made on the object the duplicate holds (inode, TCP_INFO), never on a number:
//! if the program closed the number and reused it meanwhile, keepfix sees the new object and acts
//! on that one's state, or leaves it. The fd numbers stay the program's: freeing them needs a
//! change inside the process (`--release`, which stops it: src/bin/keepfix/inject.rs).

use crate::config;
use crate::preflight::{self, Access, Preflight, Refusal, Sigpipe};
use crate::status::TcpCounts;
use crate::{Failure, exit, output, procfs};
use clap::Args;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketType, sockopt};
use rustix::process::PidfdGetfdFlags;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const JSON_FIELDS: &str = "\
JSON (--json): {\"dry_run\", \"pass\", \"processes\": [PROCESS, ...], \"failed\": [FAILED, ...]}; with --watch
one such object per pass, each on one line. pass counts from 1. A bad argument (exit 2) prints no JSON, only its
message on stderr; every other outcome, exit 1 included, prints the object. FAILED is {pid, reason (gone,
permission, yama, traced, seccomp, kernel), message}. PROCESS is
  pid, program     number; string (comm)
  preflight        {kernel, keepfix_uid, target_uid, cap_sys_ptrace, yama_ptrace_scope (null: no
                    Yama), tracer_pid, seccomp and keepfix_seccomp (none, strict, filter, unknown),
                    sigpipe (ignored, caught, default), fds: {used, soft_limit, hard_limit},
                    keepfix_loaded (libkeepfix.so mapped in it; null: cannot tell)}
  before, after    {fds, tcp_states: {established, syn_sent, syn_recv, fin_wait1, fin_wait2,
                    time_wait, close, close_wait, last_ack, listen, closing, total}, other_sockets}:
                    the process's TCP fds by state (TCP_INFO through the duplicate, so CLOSE too)
                    before anything was done and after
  keepalive        [{fd, inode, role (listener, connection), state, local, peer, before, after,
                    action, error, accept_queue}]: every TCP socket. before/after are {on, idle_s,
                    intvl_s, cnt, user_timeout_ms}; after is what the socket has now (under
                    --dry-run: what it would get). action: set, would_set, kept (already at least
                    as strict), app (--respect-app: keepalive was on), failed (error says why).
                    accept_queue (a listener's, else null): connections queued before, which did
                    not inherit
  close_wait       [{fd, inode, local, peer, idle_ms, recv_q, send_q, action, error}]: every socket
                    found in CLOSE_WAIT. action: shut_down, would_shut_down, refused_sigpipe (SIGPIPE
                    at its default in the process, or in another process holding the socket, which
                    error names), recent (idle less than --after), sending (unsent or unacknowledged bytes), unread
                    (received data the program has not read; --include-unread), changed (no
                    longer the same socket in CLOSE_WAIT when keepfix acted), failed
  close            [{fd, inode, local}]: sockets in CLOSE (reset, timed out, or never connected),
                    their fd still open; ss and sock_diag cannot see them
  nofile           null without --raise-nofile; else {soft_before, hard, soft_after, uses_select
                    (true, false, null: cannot tell), decided_by, action (raised, would_raise,
                    unchanged, failed), error}
  release          null without --release; else {dry_run, placeholder, released: [{fd, peer}],
                    skipped: [{fd, peer, reason}], stops (times the process was stopped),
                    longest_stop_us, total_stop_us, threads, seccomp_suspended, interrupted
                    (keepfix got SIGINT/SIGTERM mid-way: restored, detached, the rest left), error
                    (null, or why the process could not be stopped or injected into: exit 1)}
  summary          {tcp_sockets, listeners, keepalive_set (under --dry-run: would set),
                    keepalive_kept, keepalive_app, keepalive_failed, close_wait, shut_down (under
                    --dry-run: would shut down), refused_sigpipe, close_wait_left, close}";

/// Rescue running processes: keepalive and CLOSE_WAIT shutdown from outside, no restart
#[derive(Args)]
#[command(
    long_about = "Rescue running processes, from outside and without pausing them: for each PID, \
        through duplicates of its sockets (pidfd_getfd, Linux 5.6+):\n\n\
        - every TCP socket, listeners included, gets keepalive with keepfix's timings (the defaults, \
        or --idle, --intvl, --cnt, --user-timeout as for `keepfix run`); per option the stricter \
        value wins, so keepfix never loosens what the program set. A listener passes the options on \
        to every connection it accepts later.\n\
        - every socket in CLOSE_WAIT idle (TCP_INFO: no data received, no ack received, no data \
        sent; under --watch an ack stops counting once passes have seen the socket in CLOSE_WAIT \
        for --after, since keepalive probes are answered by acks) for at least --after, with nothing unsent and nothing left unread (unless \
        --include-unread), is shut down (shutdown SHUT_RDWR): the peer gets its FIN, the \
        program's pollers wake, its reads return 0, its writes fail with EPIPE. Not where SIGPIPE \
        is at its default disposition (the write would kill the program), unless --force.\n\
        - sockets in CLOSE (reset or timed out, fd still open) are counted and listed.\n\
        - with --release, the sockets shut down are freed: with every thread of the process stopped \
        (ptrace, about 10 ms at most per stop, the longest reported), each is checked again and its \
        number gets a placeholder (a unix socket whose peer is closed: read 0, write EPIPE, like the \
        shut-down socket); the number stays occupied and the program's own close() of it returns 0. \
        keepfix never closes a number of the program.\n\n\
        A preflight prints what will and will not work before anything changes. The fd numbers stay \
        the program's: rescue frees no fd; for that the program must close them, or be restarted \
        under `keepfix run`.\n\n\
        Needs ptrace access to the process: the same uid (and a dumpable process), or root \
        (CAP_SYS_PTRACE). Yama's ptrace_scope and a seccomp filter on keepfix itself (Docker's \
        default profile without CAP_SYS_PTRACE) can forbid it. A process already traced (a debugger) \
        is left alone.\n\n\
        Exit 0; 1 when a PID could not be rescued (each is named on stderr with the reason: gone, \
        permission, Yama, already traced, seccomp, kernel); 2 for a bad argument.",
    after_help = JSON_FIELDS
)]
pub struct RescueArgs {
    /// Processes to rescue
    #[arg(value_name = "PID", required = true, value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    pids: Vec<u32>,
    /// Idle time before the first keepalive probe (default 60s)
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    idle: Option<String>,
    /// Time between probes (default 10s)
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    intvl: Option<String>,
    /// Unanswered probes before the connection is dropped (default 6)
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    cnt: Option<String>,
    /// TCP_USER_TIMEOUT: a duration, auto (idle + intvl x cnt) or off (default off: left alone)
    #[arg(long, value_name = "DURATION|auto|off", allow_hyphen_values = true)]
    user_timeout: Option<String>,
    /// Touch only sockets without keepalive: the program's settings stay, even looser ones
    #[arg(long)]
    respect_app: bool,
    /// How long a socket must sit idle in CLOSE_WAIT before it is shut down (default 30s; 0s allowed)
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    after: Option<String>,
    /// Shut down even where SIGPIPE is at its default disposition (a later write kills the program)
    #[arg(long)]
    force: bool,
    /// Shut down CLOSE_WAIT sockets with received data the program has not read yet, too (it may
    /// still read it and answer; the data stays readable)
    #[arg(long)]
    include_unread: bool,
    /// Raise the soft RLIMIT_NOFILE to the hard limit (at most 1024 if the program uses select())
    #[arg(long)]
    raise_nofile: bool,
    /// Free the sockets shut down: stop the process (ptrace, at most about 10 ms at a time) and put
    /// a placeholder over each one's number; the number stays the program's
    #[arg(long)]
    release: bool,
    /// Repeat every DURATION (new sockets, outbound ones too, get keepalive) until SIGINT or SIGTERM
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    watch: Option<String>,
    /// Change nothing; say what would be done
    #[arg(long)]
    dry_run: bool,
    /// Print JSON instead of text (fields below)
    #[arg(long)]
    json: bool,
}

/// What rescue does to each socket, from the flags.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
    pub user_timeout_ms: Option<u32>,
    pub respect_app: bool,
    pub after_ms: u64,
    pub force: bool,
    pub include_unread: bool,
    pub raise_nofile: bool,
    pub release: bool,
    pub dry_run: bool,
}

/// The flags, checked with the library's own parser (the same rules and messages as `run`).
fn settings(args: &RescueArgs) -> Result<(Settings, Option<Duration>), Failure> {
    let flags: Vec<(&str, &str, String)> = [
        ("--idle", "KEEPFIX_IDLE", args.idle.clone()),
        ("--intvl", "KEEPFIX_INTVL", args.intvl.clone()),
        ("--cnt", "KEEPFIX_CNT", args.cnt.clone()),
        ("--user-timeout", "KEEPFIX_USER_TIMEOUT", args.user_timeout.clone()),
        ("--after", "KEEPFIX_CLOSE_WAIT_AFTER", args.after.clone()),
    ]
    .into_iter()
    .filter_map(|(flag, var, value)| Some((flag, var, value?)))
    .collect();
    let vars: BTreeMap<&str, String> = flags.iter().map(|(_, var, value)| (*var, value.clone())).collect();
    let (c, diagnostics) = config::parse(|k| vars.get(k).cloned(), vars.keys().copied(), false);
    let mut errors = Vec::new();
    for d in &diagnostics {
        let Some((flag, _, value)) = flags.iter().find(|(_, var, _)| *var == d.var) else { continue };
        let shown = config::quote(value);
        if d.warning {
            output::warning(&format!("{flag} {shown} {}; {}", d.problem, d.outcome));
        } else {
            errors.push(format!("{flag} {shown} {}", d.problem));
        }
    }
    let watch = match &args.watch {
        None => None,
        Some(v) => match config::parse_duration_ms(v) {
            Some(ms) if ms >= 10 => Some(Duration::from_millis(ms)),
            Some(_) => {
                errors.push(format!("--watch {} is too short (10ms at least)", config::quote(v)));
                None
            }
            None => {
                errors.push(format!("--watch {} is not a duration (like 10s, 500ms, 5m)", config::quote(v)));
                None
            }
        },
    };
    if !errors.is_empty() {
        for e in &errors {
            output::error(e);
        }
        return Err(Failure::reported(exit::USAGE));
    }
    let s = Settings {
        idle_s: c.idle_s,
        intvl_s: c.intvl_s,
        cnt: c.cnt,
        user_timeout_ms: c.user_timeout_ms(),
        respect_app: args.respect_app,
        after_ms: c.close_wait_after_ms,
        force: args.force,
        include_unread: args.include_unread,
        raise_nofile: args.raise_nofile,
        release: args.release,
        dry_run: args.dry_run,
    };
    Ok((s, watch))
}

// ---- keepalive ----------------------------------------------------------------------------

/// A socket's keepalive options, as getsockopt reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Keepalive {
    pub on: bool,
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
    pub user_timeout_ms: u32,
}

impl Keepalive {
    fn read(fd: BorrowedFd<'_>) -> rustix::io::Result<Keepalive> {
        Ok(Keepalive {
            on: sockopt::socket_keepalive(fd)?,
            idle_s: sockopt::tcp_keepidle(fd)?.as_secs() as u32,
            intvl_s: sockopt::tcp_keepintvl(fd)?.as_secs() as u32,
            cnt: sockopt::tcp_keepcnt(fd)?,
            // An MPTCP listener has no TCP_USER_TIMEOUT (EOPNOTSUPP): none is in force.
            user_timeout_ms: sockopt::tcp_user_timeout(fd)
                .or_else(|e| if e == Errno::OPNOTSUPP { Ok(0) } else { Err(e) })?,
        })
    }

    /// `on 60/10/6` (idle/intvl/cnt), `+ut 5000ms` when TCP_USER_TIMEOUT is set.
    fn show(&self) -> String {
        let ut = if self.user_timeout_ms > 0 { format!(" ut {}ms", self.user_timeout_ms) } else { String::new() };
        format!("{} {}/{}/{}{ut}", if self.on { "on" } else { "off" }, self.idle_s, self.intvl_s, self.cnt)
    }
}

/// What keepfix sets on one socket: each `Some` is set, SO_KEEPALIVE last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepalivePlan {
    pub idle_s: Option<u32>,
    pub intvl_s: Option<u32>,
    pub cnt: Option<u32>,
    pub user_timeout_ms: Option<u32>,
    pub turn_on: bool,
}

impl KeepalivePlan {
    fn is_empty(&self) -> bool {
        *self == KeepalivePlan::default()
    }

    /// The options the socket will have once the plan is applied.
    fn outcome(&self, mut k: Keepalive) -> Keepalive {
        k.on |= self.turn_on;
        k.idle_s = self.idle_s.unwrap_or(k.idle_s);
        k.intvl_s = self.intvl_s.unwrap_or(k.intvl_s);
        k.cnt = self.cnt.unwrap_or(k.cnt);
        k.user_timeout_ms = self.user_timeout_ms.unwrap_or(k.user_timeout_ms);
        k
    }
}

/// The library's rule (src/keepalive.rs `stricter`): the program's value stays when it finds a
/// dead peer at least as fast as keepfix's, i.e. it is set (> 0) and no larger.
fn program_wins(value: u32, ours: u32) -> bool {
    value > 0 && value <= ours
}

/// What to set on a socket whose options are `cur`; `None` under --respect-app when the socket
/// already has keepalive (the program's, left alone). As in the library, the timings count as the
/// program's only while SO_KEEPALIVE is on (off, they are in force nowhere); TCP_USER_TIMEOUT
/// applies without keepalive too, so the program's shorter one always stays.
pub fn plan_keepalive(cur: &Keepalive, s: &Settings) -> Option<KeepalivePlan> {
    if s.respect_app && cur.on {
        return None;
    }
    let timing = |value: u32, ours: u32| (!(cur.on && program_wins(value, ours))).then_some(ours);
    let idle_s = timing(cur.idle_s, s.idle_s).filter(|v| *v != cur.idle_s);
    let intvl_s = timing(cur.intvl_s, s.intvl_s).filter(|v| *v != cur.intvl_s);
    let cnt = timing(cur.cnt, s.cnt).filter(|v| *v != cur.cnt);
    let user_timeout_ms = s.user_timeout_ms.filter(|ours| !program_wins(cur.user_timeout_ms, *ours));
    Some(KeepalivePlan { idle_s, intvl_s, cnt, user_timeout_ms, turn_on: !cur.on })
}

/// Applies a plan through the duplicate: timings first, SO_KEEPALIVE last, so that a connection
/// whose handshake completes on a listener part-way through inherits either keepalive off, or on
/// with every timing in place. On failure, names the option.
fn apply_keepalive(fd: BorrowedFd<'_>, p: &KeepalivePlan) -> Result<(), String> {
    let fail = |opt: &str, e: Errno| format!("{opt}: {}", preflight::errno_text(e));
    if let Some(v) = p.idle_s {
        sockopt::set_tcp_keepidle(fd, Duration::from_secs(v.into())).map_err(|e| fail("TCP_KEEPIDLE", e))?;
    }
    if let Some(v) = p.intvl_s {
        sockopt::set_tcp_keepintvl(fd, Duration::from_secs(v.into())).map_err(|e| fail("TCP_KEEPINTVL", e))?;
    }
    if let Some(v) = p.cnt {
        sockopt::set_tcp_keepcnt(fd, v).map_err(|e| fail("TCP_KEEPCNT", e))?;
    }
    if let Some(v) = p.user_timeout_ms {
        sockopt::set_tcp_user_timeout(fd, v).map_err(|e| fail("TCP_USER_TIMEOUT", e))?;
    }
    if p.turn_on {
        sockopt::set_socket_keepalive(fd, true).map_err(|e| fail("SO_KEEPALIVE", e))?;
    }
    Ok(())
}

// ---- one socket, seen through its duplicate --------------------------------------------------

/// The TCP_INFO fields rescue uses (include/uapi/linux/tcp.h).
#[derive(Clone, Copy, Debug, Default)]
struct Info {
    state: u8,
    /// For a listener: connections waiting in the accept queue.
    unacked: u32,
    last_data_sent_ms: u32,
    last_data_recv_ms: u32,
    last_ack_recv_ms: u32,
}

impl Info {
    fn read(fd: BorrowedFd<'_>) -> Option<Info> {
        // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a valid buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len)
        };
        (r == 0 && len >= 68).then_some(Info {
            state: info.tcpi_state,
            unacked: info.tcpi_unacked,
            last_data_sent_ms: info.tcpi_last_data_sent,
            last_data_recv_ms: info.tcpi_last_data_recv,
            last_ack_recv_ms: info.tcpi_last_ack_recv,
        })
    }

    /// How long nothing has happened on the connection: no data received, no ack received (the
    /// peer acknowledging what the program sent, or its FIN), no data sent. An ACK counts only
    /// until the socket has been seen in CLOSE_WAIT for `in_close_wait_ms` (by earlier --watch
    /// passes): the FIN came before that, and the ACKs since answer keepalive probes (each
    /// resets last_ack_recv, so with keepalive idle below --after the socket would never be idle).
    fn idle_ms(&self, in_close_wait_ms: u32) -> u32 {
        self.last_data_recv_ms.min(self.last_ack_recv_ms.max(in_close_wait_ms)).min(self.last_data_sent_ms)
    }
}

/// The kernel's TCP states (include/net/tcp_states.h).
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LISTEN: u8 = 10;

fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// A TCP socket, or an MPTCP listener (Go 1.24 and later listen with MPTCP by default): it takes
/// keepalive options and passes them on to the plain TCP connections it accepts from clients
/// without MPTCP. An MPTCP connection is left alone: its TCP_INFO is only its first subflow's.
fn is_tcp(fd: BorrowedFd<'_>) -> bool {
    use rustix::net::ipproto;
    let domain = sockopt::socket_domain(fd);
    matches!(domain, Ok(AddressFamily::INET) | Ok(AddressFamily::INET6))
        && sockopt::socket_type(fd).is_ok_and(|t| t == SocketType::STREAM)
        && match sockopt::socket_protocol(fd) {
            Ok(Some(p)) if p == ipproto::TCP => true,
            Ok(Some(p)) if p == ipproto::MPTCP => sockopt::socket_acceptconn(fd).unwrap_or(false),
            _ => false,
        }
}

fn local_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()
}

fn peer_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    SocketAddr::try_from(rustix::net::getpeername(fd).ok()??).ok()
}

/// Bytes sent and not yet acknowledged, or not yet sent (SIOCOUTQ). An error counts as some.
fn send_queue(fd: BorrowedFd<'_>) -> u32 {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    if r == 0 { n.max(0) as u32 } else { u32::MAX }
}

/// Bytes received and not yet read by the program (SIOCINQ).
fn recv_queue(fd: BorrowedFd<'_>) -> u32 {
    rustix::io::ioctl_fionread(fd).map_or(0, |n| n.min(u64::from(u32::MAX)) as u32)
}

fn show_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_string(), |a| a.to_string())
}

// ---- the report ---------------------------------------------------------------------------------

/// TCP fds by state, and other sockets, at one moment.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Snapshot {
    pub fds: usize,
    pub tcp_states: TcpCounts,
    pub other_sockets: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Listener,
    Connection,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepaliveAction {
    Set,
    WouldSet,
    Kept,
    App,
    Failed,
}

#[derive(Clone, Debug, Serialize)]
pub struct KeepaliveEntry {
    pub fd: i32,
    pub inode: u64,
    pub role: Role,
    pub state: &'static str,
    pub local: String,
    pub peer: String,
    pub before: Keepalive,
    pub after: Keepalive,
    pub action: KeepaliveAction,
    pub error: Option<String>,
    /// A listener's accept queue: connections whose handshake completed before keepalive was set
    /// on it, so they did not inherit it (a later pass covers them once accepted). Null for a
    /// connection.
    pub accept_queue: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseWaitAction {
    ShutDown,
    WouldShutDown,
    RefusedSigpipe,
    Recent,
    Sending,
    Unread,
    Changed,
    Failed,
}

#[derive(Clone, Debug, Serialize)]
pub struct CloseWaitEntry {
    pub fd: i32,
    pub inode: u64,
    pub local: String,
    pub peer: String,
    #[serde(skip)]
    pub peer_addr: Option<SocketAddr>,
    pub idle_ms: u32,
    pub recv_q: u32,
    pub send_q: u32,
    pub action: CloseWaitAction,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeadSocket {
    pub fd: i32,
    pub inode: u64,
    pub local: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NofileAction {
    Raised,
    WouldRaise,
    Unchanged,
    Failed,
}

#[derive(Clone, Debug, Serialize)]
pub struct NofileEntry {
    pub soft_before: Option<u64>,
    pub hard: Option<u64>,
    pub soft_after: Option<u64>,
    pub uses_select: Option<bool>,
    pub decided_by: String,
    pub action: NofileAction,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub tcp_sockets: usize,
    pub listeners: usize,
    pub keepalive_set: usize,
    pub keepalive_kept: usize,
    pub keepalive_app: usize,
    pub keepalive_failed: usize,
    pub close_wait: usize,
    pub shut_down: usize,
    pub refused_sigpipe: usize,
    pub close_wait_left: usize,
    pub close: usize,
}

/// A socket keepfix shut down: what a release step needs to find it again and check that it is
/// still the same object (the inode) before it touches the number.
#[allow(dead_code)] // taken by the release step (--release)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    pub fd: i32,
    pub inode: u64,
    pub peer: Option<SocketAddr>,
}

/// Everything rescue did to one process.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessRescue {
    pub pid: u32,
    pub program: String,
    pub preflight: Preflight,
    pub before: Snapshot,
    pub keepalive: Vec<KeepaliveEntry>,
    pub close_wait: Vec<CloseWaitEntry>,
    pub close: Vec<DeadSocket>,
    pub nofile: Option<NofileEntry>,
    /// The release step's report (`--release`); null when it did not run.
    pub release: Option<crate::inject::ReleaseReport>,
    pub after: Snapshot,
    pub summary: Summary,
}

impl ProcessRescue {
    /// The sockets shut down in this pass, for a release step.
    #[allow(dead_code)] // taken by the release step (--release)
    pub fn shut_down(&self) -> Vec<Target> {
        self.close_wait
            .iter()
            .filter(|c| c.action == CloseWaitAction::ShutDown)
            .map(|c| Target { fd: c.fd, inode: c.inode, peer: c.peer_addr })
            .collect()
    }
}

#[derive(Serialize)]
struct Report<'a> {
    dry_run: bool,
    pass: u64,
    processes: &'a [ProcessRescue],
    failed: &'a [Refusal],
}

// ---- one process ---------------------------------------------------------------------------

/// A duplicate of the process's `fd`; `Ok(None)` when the number is closed.
fn duplicate(access: &Access, pid: u32, fd: i32) -> Result<Option<OwnedFd>, Refusal> {
    match rustix::process::pidfd_getfd(&access.pidfd, fd, PidfdGetfdFlags::empty()) {
        Ok(d) => Ok(Some(d)),
        Err(Errno::BADF) => Ok(None),
        Err(Errno::SRCH) => Err(exited(pid)),
        // Anything else (EPERM after a credential change, EMFILE on keepfix's side): the socket
        // is left alone, and counted as not seen.
        Err(_) => Ok(None),
    }
}

fn exited(pid: u32) -> Refusal {
    Refusal { pid, reason: preflight::Reason::Gone, message: format!("process {pid}: exited during the rescue") }
}

fn socket_fds(pid: u32) -> Result<Vec<procfs::Fd>, Refusal> {
    let fds = procfs::fds(pid).map_err(|_| exited(pid))?;
    Ok(fds)
}

/// Counts the process's TCP fds by state, through duplicates (read only).
fn snapshot(pid: u32, access: &Access) -> Result<Snapshot, Refusal> {
    let fds = socket_fds(pid)?;
    let mut snap = Snapshot { fds: fds.len(), ..Snapshot::default() };
    for f in fds.iter().filter(|f| f.socket_inode.is_some()) {
        let Some(dup) = duplicate(access, pid, f.fd)? else { continue };
        match (is_tcp(dup.as_fd()), Info::read(dup.as_fd())) {
            (true, Some(info)) => snap.tcp_states.add(info.state),
            _ => snap.other_sockets += 1,
        }
    }
    Ok(snap)
}

/// Pass 1: every TCP socket gets keepalive; the CLOSE_WAIT and CLOSE ones are noted.
struct Scan {
    before: Snapshot,
    keepalive: Vec<KeepaliveEntry>,
    candidates: Vec<(i32, u64)>,
    close: Vec<DeadSocket>,
}

fn scan(pid: u32, access: &Access, s: &Settings) -> Result<Scan, Refusal> {
    let fds = socket_fds(pid)?;
    let mut scan = Scan {
        before: Snapshot { fds: fds.len(), ..Snapshot::default() },
        keepalive: Vec::new(),
        candidates: Vec::new(),
        close: Vec::new(),
    };
    for f in fds.iter().filter(|f| f.socket_inode.is_some()) {
        let Some(dup) = duplicate(access, pid, f.fd)? else { continue };
        let fd = dup.as_fd();
        // The inode of what the duplicate holds: the number may have been reused since the listing.
        let inode = rustix::fs::fstat(fd).map_or(0, |st| st.st_ino);
        let (true, Some(info)) = (is_tcp(fd), Info::read(fd)) else {
            scan.before.other_sockets += 1;
            continue;
        };
        scan.before.tcp_states.add(info.state);
        let local = local_addr(fd);
        let peer = peer_addr(fd);
        match info.state {
            CLOSE_WAIT => scan.candidates.push((f.fd, inode)),
            CLOSE => scan.close.push(DeadSocket { fd: f.fd, inode, local: show_addr(local) }),
            _ => {}
        }
        let role = if info.state == LISTEN { Role::Listener } else { Role::Connection };
        let before = match Keepalive::read(fd) {
            Ok(k) => k,
            Err(e) => {
                scan.keepalive.push(KeepaliveEntry {
                    fd: f.fd,
                    inode,
                    role,
                    state: state_name(info.state),
                    local: show_addr(local),
                    peer: show_addr(peer),
                    before: Keepalive::default(),
                    after: Keepalive::default(),
                    action: KeepaliveAction::Failed,
                    error: Some(format!("cannot read its options: {}", preflight::errno_text(e))),
                    accept_queue: None,
                });
                continue;
            }
        };
        let (action, after, error) = match plan_keepalive(&before, s) {
            None => (KeepaliveAction::App, before, None),
            Some(p) if p.is_empty() => (KeepaliveAction::Kept, before, None),
            Some(p) if s.dry_run => (KeepaliveAction::WouldSet, p.outcome(before), None),
            Some(p) => {
                let result = apply_keepalive(fd, &p);
                let now = Keepalive::read(fd).unwrap_or_else(|_| p.outcome(before));
                match result {
                    Ok(()) => (KeepaliveAction::Set, now, None),
                    Err(e) => (KeepaliveAction::Failed, now, Some(e)),
                }
            }
        };
        scan.keepalive.push(KeepaliveEntry {
            fd: f.fd,
            inode,
            role,
            state: state_name(info.state),
            local: show_addr(local),
            peer: show_addr(peer),
            before,
            after,
            action,
            error,
            accept_queue: (role == Role::Listener).then_some(info.unacked),
        });
        // `dup` is dropped here: keepfix's reference to the socket is gone before the next one.
    }
    Ok(scan)
}

/// Pass 2: each CLOSE_WAIT socket is looked at again through a fresh duplicate (the same inode,
/// still in CLOSE_WAIT, idle long enough, nothing unsent, SIGPIPE read again) and shut down.
fn shut_down(
    pid: u32,
    access: &Access,
    candidates: &[(i32, u64)],
    s: &Settings,
) -> Result<Vec<CloseWaitEntry>, Refusal> {
    // Forget the sockets no longer in CLOSE_WAIT (closed, shut down, gone to CLOSE).
    access.close_wait_since.borrow_mut().retain(|ino, _| candidates.iter().any(|c| c.1 == *ino));
    let mut entries = Vec::new();
    // Other processes holding a candidate (a forked child that inherited it, a socket passed on):
    // a shutdown reaches them too, so their SIGPIPE counts as much as the target's. One walk of
    // /proc per pass, and only with candidates.
    let holders = if candidates.is_empty() || s.force {
        std::collections::HashMap::new()
    } else {
        let inodes: Vec<u64> = candidates.iter().map(|c| c.1).collect();
        procfs::socket_holders(&inodes, &[pid, std::process::id()])
    };
    for &(fd_num, inode) in candidates {
        let mut entry = CloseWaitEntry {
            fd: fd_num,
            inode,
            local: "-".into(),
            peer: "-".into(),
            peer_addr: None,
            idle_ms: 0,
            recv_q: 0,
            send_q: 0,
            action: CloseWaitAction::Changed,
            error: None,
        };
        // SIGPIPE as it is now (not as the preflight saw it), read before the duplicate is taken:
        // while keepfix holds it, a close() by the program releases neither the socket nor its
        // epoll registrations, so that window is kept to a few system calls.
        let sigpipe = preflight::proc_status(Some(pid)).map_err(|_| exited(pid))?.sigpipe();
        let other_default = holders.get(&inode).and_then(|h| {
            h.iter()
                .copied()
                .find(|h| preflight::proc_status(Some(*h)).is_ok_and(|st| st.sigpipe() == Sigpipe::Default))
        });
        let Some(dup) = duplicate(access, pid, fd_num)? else {
            entries.push(entry); // closed by the program meanwhile
            continue;
        };
        let fd = dup.as_fd();
        let same = rustix::fs::fstat(fd).is_ok_and(|st| st.st_ino == inode);
        let info = Info::read(fd).filter(|i| same && i.state == CLOSE_WAIT);
        let Some(info) = info else {
            entries.push(entry);
            continue;
        };
        entry.local = show_addr(local_addr(fd));
        entry.peer_addr = peer_addr(fd);
        entry.peer = show_addr(entry.peer_addr);
        let since = *access.close_wait_since.borrow_mut().entry(inode).or_insert_with(Instant::now);
        entry.idle_ms = info.idle_ms(since.elapsed().as_millis().min(u128::from(u32::MAX)) as u32);
        entry.recv_q = recv_queue(fd);
        entry.send_q = send_queue(fd);
        entry.action = if entry.send_q > 0 {
            CloseWaitAction::Sending
        } else if entry.recv_q > 0 && !s.include_unread {
            CloseWaitAction::Unread
        } else if u64::from(entry.idle_ms) < s.after_ms {
            CloseWaitAction::Recent
        } else if sigpipe == Sigpipe::Default && !s.force {
            CloseWaitAction::RefusedSigpipe
        } else if let Some(other) = other_default.filter(|_| !s.force) {
            let comm = procfs::comm(other).unwrap_or_else(|_| "?".into());
            entry.error = Some(format!("process {other} ({comm}) holds it too, with SIGPIPE at its default"));
            CloseWaitAction::RefusedSigpipe
        } else if s.dry_run {
            CloseWaitAction::WouldShutDown
        } else {
            match rustix::net::shutdown(fd, rustix::net::Shutdown::Both) {
                Ok(()) => CloseWaitAction::ShutDown,
                Err(e) => {
                    entry.error = Some(format!("shutdown: {}", preflight::errno_text(e)));
                    CloseWaitAction::Failed
                }
            }
        };
        entries.push(entry);
    }
    Ok(entries)
}

/// select() and its fortified FD_SET helper: a program that calls them breaks at fd 1024.
const SELECT_SYMBOLS: &[&str] =
    &["select", "__select", "__select64", "pselect", "__pselect64", "__fdelt_chk", "__fdelt_warn"];

/// Does the program call select()? Read from /proc/PID/exe's dynamic symbols (the executable
/// only, not its libraries); for a static executable, from its symbol table. `None`: cannot tell.
fn uses_select(pid: u32) -> (Option<bool>, String) {
    use object::{Object, ObjectSymbol};
    let path = format!("/proc/{pid}/exe");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return (None, format!("cannot read {path} ({})", output::io_error(&e))),
    };
    let cache = object::ReadCache::new(file);
    let elf = match object::File::parse(&cache) {
        Ok(f) => f,
        Err(e) => return (None, format!("{path} is not an ELF file keepfix can read ({e})")),
    };
    let found = |mut names: Box<dyn Iterator<Item = String> + '_>| names.find(|n| SELECT_SYMBOLS.contains(&n.as_str()));
    if elf.dynamic_symbol_table().is_some() {
        let count = elf.dynamic_symbols().count();
        let names = elf.dynamic_symbols().filter_map(|s| s.name().ok().map(str::to_string));
        return match found(Box::new(names)) {
            Some(name) => (Some(true), format!("{name} is among {path}'s dynamic symbols")),
            None => (
                Some(false),
                format!(
                    "no select, pselect or __fdelt_chk among {path}'s {count} dynamic symbols (its libraries \
                     are not read)"
                ),
            ),
        };
    }
    if elf.symbol_table().is_some() {
        let names = elf.symbols().filter_map(|s| s.name().ok().map(str::to_string));
        return match found(Box::new(names)) {
            Some(name) => (Some(true), format!("static executable; {name} is in {path}'s symbol table")),
            None => (Some(false), format!("static executable; no select in {path}'s symbol table")),
        };
    }
    (None, format!("{path} has no symbol table (static and stripped): cannot tell, so treated as using select"))
}

/// The soft limit to set, if any: the hard limit, or at most 1024 for a program that may use
/// select(); never lower than it is.
pub fn nofile_target(soft: u64, hard: u64, uses_select: Option<bool>) -> Option<u64> {
    let cap = if uses_select == Some(false) { hard } else { hard.min(1024) };
    (cap > soft).then_some(cap)
}

fn raise_nofile(pid: u32, dry_run: bool) -> NofileEntry {
    let (uses, decided_by) = uses_select(pid);
    let mut entry = NofileEntry {
        soft_before: None,
        hard: None,
        soft_after: None,
        uses_select: uses,
        decided_by,
        action: NofileAction::Unchanged,
        error: None,
    };
    let pid_t = pid as libc::pid_t;
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reads the limit into `old`.
    if unsafe { libc::prlimit(pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) } != 0 {
        entry.action = NofileAction::Failed;
        entry.error = Some(format!("prlimit: {}", output::io_error(&std::io::Error::last_os_error())));
        return entry;
    }
    let finite = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    entry.soft_before = finite(old.rlim_cur);
    entry.hard = finite(old.rlim_max);
    entry.soft_after = entry.soft_before;
    // RLIMIT_NOFILE cannot go past fs.nr_open, whatever the hard limit says.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|t| t.trim().parse().ok());
    let (Some(soft), Some(hard)) = (entry.soft_before, entry.hard.or(nr_open)) else { return entry };
    let Some(target) = nofile_target(soft, hard, uses) else { return entry };
    if dry_run {
        entry.action = NofileAction::WouldRaise;
        entry.soft_after = Some(target);
        return entry;
    }
    let new = libc::rlimit { rlim_cur: target, rlim_max: old.rlim_max };
    // SAFETY: sets the soft limit; the hard one is passed back unchanged.
    if unsafe { libc::prlimit(pid_t, libc::RLIMIT_NOFILE, &raw const new, std::ptr::null_mut()) } != 0 {
        entry.action = NofileAction::Failed;
        entry.error = Some(format!("prlimit: {}", output::io_error(&std::io::Error::last_os_error())));
        return entry;
    }
    entry.action = NofileAction::Raised;
    entry.soft_after = Some(target);
    entry
}

/// Rescues one process: preflight, keepalive on every TCP socket, shutdown of the CLOSE_WAIT
/// ones, the soft fd limit, and a last look.
/// `show_preflight` gets the preflight before anything is changed.
pub fn rescue_pid(
    pid: u32,
    access: &Access,
    s: &Settings,
    show_preflight: &mut dyn FnMut(&str, &Preflight),
) -> Result<ProcessRescue, Refusal> {
    let preflight = preflight::check(pid, access)?;
    let program = procfs::comm(pid).unwrap_or_else(|_| "?".into());
    show_preflight(&program, &preflight);
    let scan = scan(pid, access, s)?;
    let close_wait = shut_down(pid, access, &scan.candidates, s)?;
    let mut report = ProcessRescue {
        pid,
        program,
        preflight,
        before: scan.before,
        keepalive: scan.keepalive,
        close_wait,
        close: scan.close,
        nofile: None,
        release: None,
        after: Snapshot::default(),
        summary: Summary::default(),
    };
    if s.release && access.alive() {
        // The sockets shut down in this pass (under --dry-run: those that would be), re-verified
        // under the stop by the release step.
        let targets = report.close_wait.iter().filter(|c| {
            c.action == CloseWaitAction::ShutDown || (s.dry_run && c.action == CloseWaitAction::WouldShutDown)
        });
        let candidates = crate::inject::candidates(targets.map(|c| (c.fd, c.inode, c.peer_addr)));
        report.release = Some(if s.dry_run {
            crate::inject::dry_run(&candidates)
        } else {
            crate::inject::release(pid, &candidates, crate::inject::Limits::default())
        });
    }
    if s.raise_nofile && access.alive() {
        report.nofile = Some(raise_nofile(pid, s.dry_run));
    }
    report.after = snapshot(pid, access)?;
    report.summary = summarise(&report);
    Ok(report)
}

fn summarise(r: &ProcessRescue) -> Summary {
    let ka = |a: &[KeepaliveAction]| r.keepalive.iter().filter(|k| a.contains(&k.action)).count();
    let cw = |a: &[CloseWaitAction]| r.close_wait.iter().filter(|c| a.contains(&c.action)).count();
    let shut = [CloseWaitAction::ShutDown, CloseWaitAction::WouldShutDown];
    Summary {
        tcp_sockets: r.keepalive.len(),
        listeners: r.keepalive.iter().filter(|k| k.role == Role::Listener).count(),
        keepalive_set: ka(&[KeepaliveAction::Set, KeepaliveAction::WouldSet]),
        keepalive_kept: ka(&[KeepaliveAction::Kept]),
        keepalive_app: ka(&[KeepaliveAction::App]),
        keepalive_failed: ka(&[KeepaliveAction::Failed]),
        close_wait: r.close_wait.len(),
        shut_down: cw(&shut),
        refused_sigpipe: cw(&[CloseWaitAction::RefusedSigpipe]),
        close_wait_left: r.close_wait.len() - cw(&shut),
        close: r.close.len(),
    }
}

// ---- text --------------------------------------------------------------------------------------

fn snapshot_line(s: &Snapshot) -> String {
    format!("{}; other sockets {}; fds {}", s.tcp_states.summary(), s.other_sockets, s.fds)
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}\n")).collect()
}

/// `PID 1234 (name)`, the first line of a process's report.
fn header(pid: u32, program: &str, s: &Settings) -> String {
    format!("PID {pid} ({program}){}\n", if s.dry_run { ", dry run: nothing changed" } else { "" })
}

/// The preflight, printed before anything is changed.
fn preflight_text(p: &Preflight, s: &Settings) -> String {
    let mut t = String::from("  preflight:\n");
    for l in p.lines(s.force) {
        // With --release the target's seccomp mode matters: say what the release will do.
        let l = match l.strip_prefix("seccomp:") {
            Some(_) if s.release => crate::inject::preflight_seccomp(&p.seccomp, &l),
            _ => l,
        };
        t += &format!("    {l}\n");
    }
    t
}

/// The text report on one process after its header and preflight: before, what was done, after.
fn details(r: &ProcessRescue, s: &Settings) -> String {
    let would = if s.dry_run { "would " } else { "" };
    let mut t = format!("  before:     {}\n", snapshot_line(&r.before));
    let m = &r.summary;
    t += &format!(
        "  keepalive:  {}set on {} of {} TCP sockets ({} listener{}); {} already as strict; {} the program's \
         (--respect-app); {} failed\n",
        would,
        m.keepalive_set,
        m.tcp_sockets,
        m.listeners,
        if m.listeners == 1 { "" } else { "s" },
        m.keepalive_kept,
        m.keepalive_app,
        m.keepalive_failed
    );
    let changed: Vec<&KeepaliveEntry> = r
        .keepalive
        .iter()
        .filter(|k| matches!(k.action, KeepaliveAction::Set | KeepaliveAction::WouldSet | KeepaliveAction::Failed))
        .collect();
    if !changed.is_empty() {
        let mut rows = vec![["FD", "ROLE", "STATE", "LOCAL", "PEER", "BEFORE", "AFTER", "NOTE"].map(String::from)];
        for k in changed {
            rows.push([
                k.fd.to_string(),
                match k.role {
                    Role::Listener => "listener".into(),
                    Role::Connection => "connection".into(),
                },
                k.state.to_string(),
                k.local.clone(),
                k.peer.clone(),
                k.before.show(),
                k.after.show(),
                k.error.clone().unwrap_or_default(),
            ]);
        }
        t += &indent(&output::table(&rows), "    ");
    }
    for k in r.keepalive.iter().filter(|k| k.accept_queue.unwrap_or(0) > 0 && k.action != KeepaliveAction::Kept) {
        t += &format!(
            "    listener fd {}: {} connections already queued did not inherit it; a later pass (--watch) \
             covers them once accepted\n",
            k.fd,
            k.accept_queue.unwrap_or(0)
        );
    }
    if !r.close_wait.is_empty() {
        t += &format!(
            "  CLOSE_WAIT: {}, {}shut down {}, refused (SIGPIPE) {}, left {}\n",
            m.close_wait, would, m.shut_down, m.refused_sigpipe, m.close_wait_left
        );
        let mut rows = vec![["FD", "LOCAL", "PEER", "IDLE", "RECV-Q", "SEND-Q", "ACTION"].map(String::from)];
        for c in &r.close_wait {
            let action = match c.action {
                CloseWaitAction::ShutDown => "shut down".to_string(),
                CloseWaitAction::WouldShutDown => "would shut down".into(),
                CloseWaitAction::RefusedSigpipe => match &c.error {
                    Some(holder) => format!("refused: {holder}; a later write would kill it (--force)"),
                    None => "refused: SIGPIPE is at its default, a later write would kill the program (--force)".into(),
                },
                CloseWaitAction::Recent => format!("left: idle less than --after {}", config::show_ms(s.after_ms)),
                CloseWaitAction::Sending => "left: data unsent or unacknowledged".into(),
                CloseWaitAction::Unread => "left: the program has not read what it received (--include-unread)".into(),
                CloseWaitAction::Changed => "left: closed or changed since the scan".into(),
                CloseWaitAction::Failed => format!("failed: {}", c.error.clone().unwrap_or_default()),
            };
            rows.push([
                c.fd.to_string(),
                c.local.clone(),
                c.peer.clone(),
                config::show_ms(u64::from(c.idle_ms)),
                c.recv_q.to_string(),
                c.send_q.to_string(),
                action,
            ]);
        }
        t += &indent(&output::table(&rows), "    ");
    } else {
        t += "  CLOSE_WAIT: none\n";
    }
    if !r.close.is_empty() {
        t += &format!(
            "  CLOSE:      {} (reset, timed out or never connected; the fd is still open; ss cannot see them)\n",
            r.close.len()
        );
        let mut rows = vec![["FD", "LOCAL", "INODE"].map(String::from)];
        for d in &r.close {
            rows.push([d.fd.to_string(), d.local.clone(), d.inode.to_string()]);
        }
        t += &indent(&output::table(&rows), "    ");
    }
    if let Some(rel) = &r.release {
        t += &crate::inject::text(rel);
    }
    if let Some(n) = &r.nofile {
        let limit = |l: Option<u64>| l.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        let what = match n.action {
            NofileAction::Raised => format!("soft limit raised {} -> {}", limit(n.soft_before), limit(n.soft_after)),
            NofileAction::WouldRaise => {
                format!("soft limit would be raised {} -> {}", limit(n.soft_before), limit(n.soft_after))
            }
            NofileAction::Unchanged => format!("soft limit stays {}", limit(n.soft_before)),
            NofileAction::Failed => format!("cannot raise the soft limit: {}", n.error.clone().unwrap_or_default()),
        };
        let select = match n.uses_select {
            Some(true) => "uses select(), so at most 1024",
            Some(false) => "no select()",
            None => "select() unknown, so at most 1024",
        };
        t += &format!("  nofile:     {what} (hard {}); {select}: {}\n", limit(n.hard), n.decided_by);
    }
    t += &format!("  after:      {}\n", snapshot_line(&r.after));
    t
}

/// One line for a process a later --watch pass found nothing new to do in.
fn quiet_line(r: &ProcessRescue) -> String {
    format!("PID {} ({}): nothing new to do; {}\n", r.pid, r.program, snapshot_line(&r.after))
}

fn did_something(r: &ProcessRescue) -> bool {
    let m = &r.summary;
    m.keepalive_set + m.keepalive_failed + m.shut_down + m.refused_sigpipe > 0
        || r.nofile.as_ref().is_some_and(|n| n.action != NofileAction::Unchanged)
        || r.release.as_ref().is_some_and(|x| !x.released.is_empty() || x.error.is_some())
}

// ---- the command -------------------------------------------------------------------------------

pub fn rescue(args: &RescueArgs) -> Result<u8, Failure> {
    let (s, watch) = settings(args)?;
    let stop = Arc::new(AtomicBool::new(false));
    if watch.is_some() {
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(|e| {
                Failure::new(exit::FAILED, format!("cannot install a signal handler: {}", output::io_error(&e)))
            })?;
        }
    }
    let mut pids: Vec<u32> = Vec::new();
    for &pid in &args.pids {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    // A thread's id has a /proc entry too, but pidfd_open refuses it: say what it is.
    let threads: Vec<String> = pids
        .iter()
        .filter_map(|&pid| {
            let tgid = preflight::proc_status(Some(pid)).ok()?.tgid;
            (tgid != 0 && tgid != pid).then(|| {
                format!("PID {pid} is a thread of process {tgid} (a thread id, not a process id): give {tgid}")
            })
        })
        .collect();
    if !threads.is_empty() {
        threads.iter().for_each(|t| output::error(t));
        return Err(Failure::reported(exit::USAGE));
    }
    // Each process is opened once (a pidfd), and every later pass works through the same pidfd.
    let mut opened: Vec<(u32, Access)> = Vec::new();
    let mut failed_any = false;
    let mut pass = 0u64;
    loop {
        pass += 1;
        let mut processes = Vec::new();
        let mut failed = Vec::new();
        if watch.is_some() && !args.json {
            output::line(&format!("pass {pass}"));
        }
        crate::inject::tidy();
        for &pid in &pids {
            if crate::inject::was_interrupted() {
                break;
            }
            let access = match opened.iter().position(|(p, _)| *p == pid) {
                Some(i) => Ok(i),
                None => preflight::open(pid).map(|a| {
                    opened.push((pid, a));
                    opened.len() - 1
                }),
            };
            // Text: the preflight is printed as soon as it is known, before anything changes
            // (on the first pass; a later one prints only what it did).
            let mut show = |program: &str, p: &Preflight| {
                if !args.json && pass == 1 {
                    output::out(&(header(pid, program, &s) + &preflight_text(p, &s)));
                }
            };
            let result = access.and_then(|i| rescue_pid(pid, &opened[i].1, &s, &mut show));
            if let (Ok(r), false) = (&result, args.json) {
                output::out(&if pass == 1 {
                    details(r, &s)
                } else if did_something(r) {
                    header(pid, &r.program, &s) + &details(r, &s)
                } else {
                    quiet_line(r)
                });
            }
            match result {
                Ok(r) => {
                    if let Some(e) = r.release.as_ref().and_then(|x| x.error.as_ref()) {
                        output::error(&format!("PID {pid}: --release: {e}"));
                        failed_any = true;
                    }
                    if r.release.as_ref().is_some_and(|x| x.interrupted) && watch.is_none() {
                        output::error(&format!(
                            "PID {pid}: --release interrupted (SIGINT/SIGTERM): the process was restored \
                             and let go; the sockets not released yet stay shut down at their numbers"
                        ));
                        failed_any = true;
                    }
                    processes.push(r)
                }
                Err(refusal) => {
                    output::error(&refusal.message);
                    failed.push(refusal);
                }
            }
        }
        failed_any |= !failed.is_empty();
        if args.json {
            let report = Report { dry_run: s.dry_run, pass, processes: &processes, failed: &failed };
            let json =
                if watch.is_some() { serde_json::to_string(&report) } else { serde_json::to_string_pretty(&report) }
                    .map_err(|e| Failure::new(exit::FAILED, format!("cannot write JSON: {e}")))?;
            output::line(&json);
        }
        // A process that cannot be rescued (gone, refused) is not tried again.
        pids.retain(|p| !failed.iter().any(|f| f.pid == *p));
        let Some(period) = watch else { break };
        if crate::inject::was_interrupted() {
            stop.store(true, Ordering::Relaxed);
        }
        if pids.is_empty() {
            output::error("no process left to watch");
            break;
        }
        let until = Instant::now() + period;
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
        }
        if stop.load(Ordering::Relaxed) {
            if !args.json {
                output::line(&format!("stopped after {pass} passes"));
            }
            break;
        }
    }
    Ok(if failed_any { exit::FAILED } else { exit::OK })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            idle_s: 60,
            intvl_s: 10,
            cnt: 6,
            user_timeout_ms: None,
            respect_app: false,
            after_ms: 30_000,
            force: false,
            include_unread: false,
            raise_nofile: false,
            release: false,
            dry_run: false,
        }
    }

    fn ka(on: bool, idle_s: u32, intvl_s: u32, cnt: u32, user_timeout_ms: u32) -> Keepalive {
        Keepalive { on, idle_s, intvl_s, cnt, user_timeout_ms }
    }

    #[test]
    fn kernel_defaults_get_all_of_keepfix() {
        let p = plan_keepalive(&ka(false, 7200, 75, 9, 0), &settings()).unwrap();
        assert_eq!(
            p,
            KeepalivePlan { idle_s: Some(60), intvl_s: Some(10), cnt: Some(6), user_timeout_ms: None, turn_on: true }
        );
    }

    #[test]
    fn the_stricter_value_wins_per_option() {
        // Go's 15 s idle and interval, the kernel's 9 probes: 15 stays, 15 -> 10, 9 -> 6.
        let p = plan_keepalive(&ka(true, 15, 15, 9, 0), &settings()).unwrap();
        assert_eq!(
            p,
            KeepalivePlan { idle_s: None, intvl_s: Some(10), cnt: Some(6), user_timeout_ms: None, turn_on: false }
        );
        // Keepalive off: the timings are in force nowhere, keepfix's are set.
        let p = plan_keepalive(&ka(false, 5, 5, 2, 0), &settings()).unwrap();
        assert_eq!((p.idle_s, p.intvl_s, p.cnt, p.turn_on), (Some(60), Some(10), Some(6), true));
        // Already keepfix's: nothing to do.
        assert!(plan_keepalive(&ka(true, 60, 10, 6, 0), &settings()).unwrap().is_empty());
    }

    #[test]
    fn user_timeout_only_when_asked_and_never_longer() {
        let mut s = settings();
        assert_eq!(plan_keepalive(&ka(true, 60, 10, 6, 0), &s).unwrap().user_timeout_ms, None);
        s.user_timeout_ms = Some(120_000);
        assert_eq!(plan_keepalive(&ka(true, 60, 10, 6, 0), &s).unwrap().user_timeout_ms, Some(120_000));
        assert_eq!(plan_keepalive(&ka(false, 60, 10, 6, 5_000), &s).unwrap().user_timeout_ms, None);
        assert_eq!(plan_keepalive(&ka(true, 60, 10, 6, 500_000), &s).unwrap().user_timeout_ms, Some(120_000));
    }

    #[test]
    fn respect_app_leaves_sockets_with_keepalive() {
        let mut s = settings();
        s.respect_app = true;
        assert!(plan_keepalive(&ka(true, 7200, 75, 9, 0), &s).is_none());
        assert!(plan_keepalive(&ka(false, 7200, 75, 9, 0), &s).unwrap().turn_on);
    }

    #[test]
    fn nofile_never_past_1024_with_select() {
        assert_eq!(nofile_target(1024, 524_288, Some(false)), Some(524_288));
        assert_eq!(nofile_target(256, 524_288, Some(true)), Some(1024));
        assert_eq!(nofile_target(256, 524_288, None), Some(1024));
        assert_eq!(nofile_target(1024, 524_288, Some(true)), None);
        assert_eq!(nofile_target(4096, 4096, Some(false)), None);
        assert_eq!(nofile_target(2048, 524_288, None), None); // never lowered
    }
}
