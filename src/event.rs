//! keepfix's event vocabulary: every line keepfix writes is an [`Event`], and this module alone
//! says how it reads: its name, its fields and their order, its severity, errno as a name,
//! quoting of outside text, and the names of the metrics. A hook never formats anything: it
//! defers a small record (hooksafe::ring), and the watchdog turns it into an Event here.
//!
//! The rules every line keeps (issue 13):
//! - `used=N` is a count just taken; a figure that is only a lower bound is written `used_min=N`.
//! - A breakdown of the fds by kind is either counted (`tcp=… other_fds=…`) or says
//!   `breakdown=not_counted` with the reason.
//! - A summary is written only when it reports something.
//! - `suppressed` is written at most once per [`SUPPRESSED_EVERY_MS`].
//!
//! README.md's "Log lines" table has one row per name in [`NAMES`], and tests check both ways.

use crate::addr::Addr;
use crate::config::{Config, Diagnostic as Diag};
use crate::sys::tcp_state;
use core::fmt::{self, Display, Formatter, Write as _};

/// syslog severities; journald reads them from a `<N>` prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

/// How often, at most, a `suppressed` line is written (ms).
pub const SUPPRESSED_EVERY_MS: u64 = 10_000;

/// Every event name, in the README's order.
#[cfg_attr(not(test), allow(dead_code))]
pub const NAMES: &[&str] = &[
    "config",
    "start",
    "adopt",
    "app_override",
    "keepalive_failed",
    "close_wait",
    "close_wait_summary",
    "nofile",
    "nofile_recovered",
    "nofile_raise",
    "rlimit_nofile",
    "emfile",
    "vacate",
    "watchdog_stalled",
    "select_nfds_too_big",
    "suppressed",
    "events_dropped",
    "watchdog_unavailable",
    "watchdog_stopped",
    "watchdog_restarted",
    "sandboxed",
    "metrics",
    "degraded",
];

/// What keepfix did about a socket left in CLOSE_WAIT (the `action=` of a `close_wait` line and
/// the `action` label of keepfix_close_wait_actions_total).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Log mode: reported, nothing changed.
    Logged,
    /// shutdown(SHUT_RDWR): the peer got our FIN; the socket stays at its number.
    Shutdown,
    /// Reset or timed out (state CLOSE): nothing left to shut down.
    Dead,
    /// Unread data is waiting: kept (KEEPFIX_CLOSE_WAIT_UNREAD=keep).
    KeptUnread,
    /// SIGPIPE has its default disposition: a shutdown could kill the program on its next write.
    KeptSigpipe,
    /// Its number was freed (close mode, near the limit or at EMFILE).
    Vacated,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Logged => "logged",
            Action::Shutdown => "shutdown",
            Action::Dead => "dead",
            Action::KeptUnread => "kept_unread",
            Action::KeptSigpipe => "kept_sigpipe",
            Action::Vacated => "vacated",
        }
    }

    /// Nothing was changed: the line is a warning, not a notice of what keepfix did.
    pub fn changed_nothing(self) -> bool {
        matches!(self, Action::Logged | Action::KeptUnread | Action::KeptSigpipe)
    }
}

/// errno as its name (`EMFILE`), or its number if keepfix has no name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Display for Errno {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match errno_name(self.0) {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

fn errno_name(e: i32) -> Option<&'static str> {
    Some(match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ELOOP => "ELOOP",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EDQUOT => "EDQUOT",
        _ => return None,
    })
}

/// Text from outside (an environment variable, a path) as a quoted string, with control
/// characters, quotes and non-ASCII escaped, so that a line stays one line of text.
pub struct Quoted<'a>(pub &'a [u8]);

impl Display for Quoted<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for &b in self.0.iter().take(200) {
            match b {
                b'"' | b'\\' => write!(f, "\\{}", b as char)?,
                0x20..=0x7e => f.write_char(b as char)?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        if self.0.len() > 200 {
            f.write_str("...")?;
        }
        f.write_char('"')
    }
}

/// How many fds the process holds, as far as keepfix knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Used {
    /// Counted just now (/proc/self/fd).
    Counted(u64),
    /// Not counted (no /proc, or keepfix gave its /proc fd back at EMFILE): at least this many,
    /// from the highest fd number the kernel handed out, or the limit at EMFILE.
    AtLeast(u64),
}

impl Used {
    pub fn value(self) -> u64 {
        match self {
            Used::Counted(n) | Used::AtLeast(n) => n,
        }
    }
}

impl Display for Used {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Used::Counted(n) => write!(f, "used={n}"),
            Used::AtLeast(n) => write!(f, "used_min={n}"),
        }
    }
}

/// The process's fds by kind, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub used: u64,
    pub tcp: u64,
    pub tcp_by_state: [u64; 12],
    pub other_sockets: u64,
    pub other_fds: u64,
    pub keepfix: u64,
}

/// A breakdown: counted, or why not.
#[derive(Clone, Copy, Debug)]
pub enum Breakdown {
    Counted(Census),
    /// `breakdown=not_counted reason=…`
    NotCounted(&'static str),
}

impl Breakdown {
    /// The `used=` figure that goes with it: the census's own count, or `fallback` as a lower
    /// bound.
    pub fn used(&self, fallback: u64) -> Used {
        match self {
            Breakdown::Counted(c) => Used::Counted(c.used),
            Breakdown::NotCounted(_) => Used::AtLeast(fallback),
        }
    }
}

impl Display for Breakdown {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let c = match self {
            Breakdown::NotCounted(why) => return write!(f, "breakdown=not_counted reason={why}"),
            Breakdown::Counted(c) => c,
        };
        let s = |st: u8| c.tcp_by_state.get(st as usize).copied().unwrap_or(0);
        let named = s(tcp_state::ESTABLISHED) + s(tcp_state::CLOSE_WAIT) + s(tcp_state::CLOSE) + s(tcp_state::LISTEN);
        write!(
            f,
            "tcp={} tcp_established={} tcp_close_wait={} tcp_close={} tcp_listen={} tcp_other={} other_sockets={} other_fds={} keepfix={}",
            c.tcp,
            s(tcp_state::ESTABLISHED),
            s(tcp_state::CLOSE_WAIT),
            s(tcp_state::CLOSE),
            s(tcp_state::LISTEN),
            c.tcp.saturating_sub(named),
            c.other_sockets,
            c.other_fds,
            c.keepfix
        )
    }
}

/// Why keepfix's thread ended.
#[derive(Clone, Copy, Debug)]
pub enum Stopped {
    ForkEagain,
    NoMemory { heap_mapped: usize, heap_limit: usize },
    CredentialsChanged,
}

/// What accept() at EMFILE led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmfileAction {
    /// Numbers of forgotten sockets were freed and the accept() retried: it succeeded.
    FreedAndAccepted {
        freed: u64,
    },
    /// The waiting connection was accepted on the reserve fd and closed at once.
    RejectedPendingConnection {
        errno: i32,
    },
    /// Another process may serve the connection: left alone.
    NoneSharedListener {
        errno: i32,
    },
    NoneNoReserveFd {
        errno: i32,
    },
    NoneNoPendingConnection {
        errno: i32,
    },
}

/// One line.
pub enum Event<'a> {
    /// A bad or adjusted KEEPFIX_* value, at load.
    Config(&'a Diag),
    Start(&'a Config),
    Adopt {
        fd: i32,
        role: &'static str,
        local: Addr,
        peer: Addr,
        state: u8,
        source: &'static str,
        /// None: keepalive is on; Some((option, errno)): setting it failed.
        failed: Option<(&'static str, i32)>,
    },
    AppOverride {
        fd: i32,
        option: &'static str,
        action: &'static str,
    },
    KeepaliveFailed {
        fd: i32,
        option: &'static str,
        errno: i32,
    },
    CloseWait {
        fd: i32,
        peer: Addr,
        local: Addr,
        age_s: u64,
        state: u8,
        unread: u32,
        action: Action,
        /// `reason=emfile` when a hook freed it at EMFILE.
        at_emfile: bool,
    },
    CloseWaitSummary {
        held: usize,
        oldest_age_s: u64,
        /// Lines folded into this one, by action: logged, shutdown, vacated, kept_unread.
        new: [u64; 4],
        total_found: u64,
        total_logged: u64,
        total_shutdown: u64,
        total_vacated: u64,
    },
    Nofile {
        used: Used,
        limit: u64,
        level: u8,
        breakdown: Breakdown,
    },
    NofileRecovered {
        used: Used,
        limit: u64,
    },
    /// KEEPFIX_NOFILE_RAISE=1 at load: Ok(new soft limit, None = unlimited) or Err(errno).
    NofileRaise {
        soft: u64,
        result: Result<Option<u64>, i32>,
    },
    /// The program changed RLIMIT_NOFILE (setrlimit, prlimit): the values after the call, -1 for
    /// unlimited. Written only when they differ from the ones before.
    RlimitNofile {
        soft: i64,
        hard: i64,
        used: Used,
    },
    Emfile {
        listener: i32,
        action: EmfileAction,
        used: Used,
        limit: u64,
        breakdown: Breakdown,
    },
    Vacate {
        count: usize,
        used: Used,
        limit: u64,
    },
    WatchdogStalled {
        waited_us: u64,
    },
    SelectTooBig {
        nfds: i64,
    },
    Suppressed {
        lines: u64,
        seconds: u64,
    },
    EventsDropped {
        count: u64,
    },
    WatchdogUnavailable {
        errno: i32,
    },
    ChildrenWithoutWatchdog {
        rlimit_nproc: i64,
        system_tasks: i64,
    },
    WatchdogStopped(Stopped),
    WatchdogRestarted {
        reason: &'static str,
    },
    Sandboxed,
    MetricsFailed {
        path: &'a [u8],
        errno: i32,
    },
    MetricsRecovered {
        path: &'a [u8],
    },
    /// A kernel feature keepfix goes without (README, "Old kernels"), once after `start`.
    Degraded {
        feature: &'static str,
        errno: i32,
        note: &'static str,
    },
}

impl Event<'_> {
    /// The line's first word: one of [`NAMES`].
    pub fn name(&self) -> &'static str {
        match self {
            Event::Config(_) => "config",
            Event::Start(_) => "start",
            Event::Adopt { .. } => "adopt",
            Event::AppOverride { .. } => "app_override",
            Event::KeepaliveFailed { .. } => "keepalive_failed",
            Event::CloseWait { .. } => "close_wait",
            Event::CloseWaitSummary { .. } => "close_wait_summary",
            Event::Nofile { .. } => "nofile",
            Event::NofileRecovered { .. } => "nofile_recovered",
            Event::NofileRaise { .. } => "nofile_raise",
            Event::RlimitNofile { .. } => "rlimit_nofile",
            Event::Emfile { .. } => "emfile",
            Event::Vacate { .. } => "vacate",
            Event::WatchdogStalled { .. } => "watchdog_stalled",
            Event::SelectTooBig { .. } => "select_nfds_too_big",
            Event::Suppressed { .. } => "suppressed",
            Event::EventsDropped { .. } => "events_dropped",
            Event::WatchdogUnavailable { .. } | Event::ChildrenWithoutWatchdog { .. } => "watchdog_unavailable",
            Event::WatchdogStopped(_) => "watchdog_stopped",
            Event::WatchdogRestarted { .. } => "watchdog_restarted",
            Event::Sandboxed => "sandboxed",
            Event::MetricsFailed { .. } | Event::MetricsRecovered { .. } => "metrics",
            Event::Degraded { .. } => "degraded",
        }
    }

    pub fn level(&self) -> Level {
        match self {
            Event::Config(d) => {
                if d.warning {
                    Level::Warning
                } else {
                    Level::Err
                }
            }
            Event::Start(_) | Event::WatchdogRestarted { .. } => Level::Info,
            Event::Adopt { failed, .. } => {
                if failed.is_some() {
                    Level::Warning
                } else {
                    Level::Info
                }
            }
            Event::CloseWait { action, .. } => {
                if action.changed_nothing() {
                    Level::Warning
                } else {
                    Level::Notice
                }
            }
            Event::NofileRaise { result, .. } => {
                if result.is_ok() {
                    Level::Notice
                } else {
                    Level::Warning
                }
            }
            Event::SelectTooBig { .. } | Event::WatchdogStopped(Stopped::NoMemory { .. }) => Level::Err,
            Event::AppOverride { .. }
            | Event::NofileRecovered { .. }
            | Event::RlimitNofile { .. }
            | Event::Vacate { .. }
            | Event::ChildrenWithoutWatchdog { .. }
            | Event::WatchdogStopped(Stopped::CredentialsChanged)
            | Event::Sandboxed
            | Event::MetricsRecovered { .. }
            | Event::Degraded { .. } => Level::Notice,
            Event::KeepaliveFailed { .. }
            | Event::CloseWaitSummary { .. }
            | Event::Nofile { .. }
            | Event::Emfile { .. }
            | Event::WatchdogStalled { .. }
            | Event::Suppressed { .. }
            | Event::EventsDropped { .. }
            | Event::WatchdogUnavailable { .. }
            | Event::WatchdogStopped(_)
            | Event::MetricsFailed { .. } => Level::Warning,
        }
    }
}

/// `unlimited` or the number.
struct Limit(Option<u64>);

impl Display for Limit {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("unlimited"),
        }
    }
}

fn rlim(v: i64) -> Limit {
    Limit(u64::try_from(v).ok())
}

fn pct(used: Used, limit: u64) -> u64 {
    used.value().saturating_mul(100) / limit.max(1)
}

impl Display for Event<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            // config.rs's Diag writes its own `config KEEPFIX_…` line (the command prints it too).
            Event::Config(d) => return write!(f, "{d}"),
            _ => f.write_str(self.name())?,
        }
        match *self {
            Event::Config(_) => Ok(()),
            Event::Start(cfg) => write!(
                f,
                " idle={}s intvl={}s cnt={} user_timeout={} close_wait={} close_wait_after={} scan_interval={} nofile_warn={} detection={}s",
                cfg.idle_s,
                cfg.intvl_s,
                cfg.cnt,
                cfg.show("KEEPFIX_USER_TIMEOUT"),
                cfg.close_wait.name(),
                cfg.show("KEEPFIX_CLOSE_WAIT_AFTER"),
                cfg.show("KEEPFIX_SCAN_INTERVAL"),
                cfg.show("KEEPFIX_NOFILE_WARN"),
                cfg.detection_s()
            ),
            Event::Adopt { fd, role, local, peer, state, source, failed } => {
                write!(
                    f,
                    " fd={fd} role={role} local={local} peer={peer} state={} source={source}",
                    tcp_state::name(state)
                )?;
                match failed {
                    None => f.write_str(" action=keepalive_on"),
                    Some((option, e)) => write!(f, " action=failed option={option} errno={}", Errno(e)),
                }
            }
            Event::AppOverride { fd, option, action } => write!(
                f,
                " fd={fd} option={option} action={action} note=\"the program changed a keepalive option; KEEPFIX_RESPECT_APP=1 lets it (logged once per option)\""
            ),
            Event::KeepaliveFailed { fd, option, errno } => write!(f, " fd={fd} option={option} errno={}", Errno(errno)),
            Event::CloseWait { fd, peer, local, age_s, state, unread, action, at_emfile } => {
                write!(
                    f,
                    " fd={fd} peer={peer} local={local} age={age_s}s state={} unread={unread} action={}",
                    tcp_state::name(state),
                    action.name()
                )?;
                if at_emfile { f.write_str(" reason=emfile") } else { Ok(()) }
            }
            Event::CloseWaitSummary {
                held,
                oldest_age_s,
                new: [l, s, v, u],
                total_found,
                total_logged,
                total_shutdown,
                total_vacated,
            } => write!(
                f,
                " held={held} oldest_age={oldest_age_s}s new_logged={l} new_shutdown={s} new_vacated={v} new_unread_kept={u} total_found={total_found} total_logged={total_logged} total_shutdown={total_shutdown} total_vacated={total_vacated}"
            ),
            Event::Nofile { used, limit, level, breakdown } => {
                write!(f, " {used} limit={limit} pct={} level={level} {breakdown}", pct(used, limit))
            }
            Event::NofileRecovered { used, limit } => write!(f, " {used} limit={limit} pct={}", pct(used, limit)),
            Event::NofileRaise { soft, result } => match result {
                Ok(new) => write!(
                    f,
                    " soft={soft} new_soft={} hard={} note=\"select() breaks at fd >= 1024\"",
                    Limit(new),
                    Limit(new)
                ),
                Err(e) => write!(f, " soft={soft} action=failed errno={}", Errno(e)),
            },
            Event::RlimitNofile { soft, hard, used } => write!(f, " soft={} hard={} {used}", rlim(soft), rlim(hard)),
            Event::Emfile { listener, action, used, limit, breakdown } => {
                let (name, detail) = match action {
                    EmfileAction::FreedAndAccepted { freed } => ("freed_and_accepted", Err(freed)),
                    EmfileAction::RejectedPendingConnection { errno } => ("rejected_pending_connection", Ok(errno)),
                    EmfileAction::NoneSharedListener { errno } => ("none_shared_listener", Ok(errno)),
                    EmfileAction::NoneNoReserveFd { errno } => ("none_no_reserve_fd", Ok(errno)),
                    EmfileAction::NoneNoPendingConnection { errno } => ("none_no_pending_connection", Ok(errno)),
                };
                write!(f, " listener={listener} action={name}")?;
                match detail {
                    Err(freed) => write!(f, " freed={freed}")?,
                    Ok(e) => write!(f, " errno={}", Errno(e))?,
                }
                write!(f, " {used} limit={limit} {breakdown}")
            }
            Event::Vacate { count, used, limit } => write!(f, " count={count} {used} limit={limit} reason=near_limit"),
            Event::WatchdogStalled { waited_us } => write!(
                f,
                " waited_us={waited_us} note=\"a hook found keepfix's thread inside a release or a use of its own fd for longer than this; the program's call went on without it (a close was handed over, a dup2 got EBUSY); logged once\""
            ),
            Event::SelectTooBig { nfds } => write!(
                f,
                " nfds={nfds} fd_setsize={} note=\"select() on fd >= 1024 reads and writes past fd_set: a memory-corrupting bug in the program\"",
                libc::FD_SETSIZE
            ),
            Event::Suppressed { lines, seconds } => write!(f, " lines={lines} seconds={seconds} reason=rate_limit"),
            Event::EventsDropped { count } => write!(f, " count={count} reason=ring_full"),
            Event::WatchdogUnavailable { errno } => write!(
                f,
                " reason={} note=\"keepfix could not start its thread (a task limit?); keepalive goes on, CLOSE_WAIT, fd warnings and metrics do not\"",
                Errno(errno)
            ),
            Event::ChildrenWithoutWatchdog { rlimit_nproc, system_tasks } => write!(
                f,
                " in=forked_children reason=task_limit rlimit_nproc={rlimit_nproc} system_tasks={system_tasks} note=\"children forked near the task limit run with hooks only, so that keepfix's threads never take a task the program needs\""
            ),
            Event::WatchdogStopped(Stopped::ForkEagain) => f.write_str(
                " reason=fork_eagain note=\"the program's fork() hit its task limit: keepfix's thread gives its task back and the fork is retried; keepalive goes on, CLOSE_WAIT, fd warnings and metrics do not\"",
            ),
            Event::WatchdogStopped(Stopped::NoMemory { heap_mapped, heap_limit }) => write!(
                f,
                " reason=no_memory heap_mapped={heap_mapped} heap_limit={heap_limit} note=\"keepfix's own heap is full or the address space is; keepalive goes on\""
            ),
            Event::WatchdogStopped(Stopped::CredentialsChanged) => f.write_str(
                " reason=credentials_changed note=\"the program's uid or gid changed without keepfix's thread (a raw system call): the thread ends and starts again, with the program's credentials, at the next listen, accept or connect (logged once)\"",
            ),
            Event::WatchdogRestarted { reason } => write!(
                f,
                " reason={reason} note=\"keepfix's thread stepped aside for the program's call and is back\""
            ),
            Event::Sandboxed => f.write_str(
                " note=\"the program installs a seccomp filter: keepfix's thread ends and keepfix makes no system call of its own from now on (no keepalive on new sockets, no CLOSE_WAIT handling, fd warnings or metrics)\"",
            ),
            Event::MetricsFailed { path, errno } => write!(
                f,
                " path={} action=failed errno={} note=\"the file is stale until a line says recovered\"",
                Quoted(path),
                Errno(errno)
            ),
            Event::MetricsRecovered { path } => write!(f, " path={} action=recovered", Quoted(path)),
            Event::Degraded { feature, errno, note } => {
                write!(f, " feature={feature} reason={} note=\"{note}\"", Errno(errno))
            }
        }
    }
}

/// The metrics' names: every one the metrics file can have.
pub mod metric {
    pub const CLOSE_WAIT_ACTIONS_TOTAL: &str = "keepfix_close_wait_actions_total";
    pub const CLOSE_WAIT_FOUND_TOTAL: &str = "keepfix_close_wait_found_total";
    pub const CLOSE_WAIT_OLDEST_SECONDS: &str = "keepfix_close_wait_oldest_seconds";
    pub const CONFIG_KEEPCNT: &str = "keepfix_config_keepcnt";
    pub const CONFIG_SECONDS: &str = "keepfix_config_seconds";
    pub const EMFILE_REJECTED_TOTAL: &str = "keepfix_emfile_rejected_total";
    pub const EMFILE_TOTAL: &str = "keepfix_emfile_total";
    pub const FDS_LIMIT: &str = "keepfix_fds_limit";
    pub const FDS_USED: &str = "keepfix_fds_used";
    pub const FDS_USED_MIN: &str = "keepfix_fds_used_min";
    pub const LOG_DROPPED_TOTAL: &str = "keepfix_log_dropped_total";
    pub const RELEASED_CLOSED_BY_PROGRAM_TOTAL: &str = "keepfix_released_closed_by_program_total";
    pub const SELECT_TOO_BIG_TOTAL: &str = "keepfix_select_too_big_total";
    pub const SOCKETS: &str = "keepfix_sockets";
    pub const TABLE_BYTES: &str = "keepfix_table_bytes";
    pub const TRACKED_SOCKETS: &str = "keepfix_tracked_sockets";
    pub const UP: &str = "keepfix_up";
    pub const WATCHDOG_CPU_SECONDS_TOTAL: &str = "keepfix_watchdog_cpu_seconds_total";
    pub const WATCHDOG_TICK_SECONDS: &str = "keepfix_watchdog_tick_seconds";
    pub const WATCHDOG_TICKS_TOTAL: &str = "keepfix_watchdog_ticks_total";

    /// All of them, for the README's metrics table check.
    #[cfg_attr(not(test), allow(dead_code))]
    pub const ALL: &[&str] = &[
        CLOSE_WAIT_ACTIONS_TOTAL,
        CLOSE_WAIT_FOUND_TOTAL,
        CLOSE_WAIT_OLDEST_SECONDS,
        CONFIG_KEEPCNT,
        CONFIG_SECONDS,
        EMFILE_REJECTED_TOTAL,
        EMFILE_TOTAL,
        FDS_LIMIT,
        FDS_USED,
        FDS_USED_MIN,
        LOG_DROPPED_TOTAL,
        RELEASED_CLOSED_BY_PROGRAM_TOTAL,
        SELECT_TOO_BIG_TOTAL,
        SOCKETS,
        TABLE_BYTES,
        TRACKED_SOCKETS,
        UP,
        WATCHDOG_CPU_SECONDS_TOTAL,
        WATCHDOG_TICK_SECONDS,
        WATCHDOG_TICKS_TOTAL,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_a_name_or_its_number() {
        assert_eq!(format!("{}", Errno(libc::EMFILE)), "EMFILE");
        assert_eq!(format!("{}", Errno(4095)), "4095");
    }

    #[test]
    fn used_says_when_it_is_a_lower_bound() {
        assert_eq!(format!("{}", Used::Counted(12)), "used=12");
        assert_eq!(format!("{}", Used::AtLeast(32)), "used_min=32");
    }

    #[test]
    fn a_breakdown_not_counted_says_so() {
        let line = format!("{}", Breakdown::NotCounted("no_proc_fd"));
        assert_eq!(line, "breakdown=not_counted reason=no_proc_fd");
    }

    #[test]
    fn quoted_escapes_control_bytes() {
        assert_eq!(format!("{}", Quoted(b"a\nb\"c\x1b")), "\"a\\x0ab\\\"c\\x1b\"");
    }

    /// Every event name has a row in README.md's "Log lines" table, and every row names an event.
    #[test]
    fn the_readme_log_table_lists_every_event_and_only_those() {
        let readme = include_str!("../README.md");
        let section = readme.split("\n## Log lines").nth(1).unwrap().split("\n## ").next().unwrap();
        let mut rows: Vec<&str> =
            section.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split([' ', '`']).next()).collect();
        rows.dedup();
        let mut names: Vec<&str> = NAMES.to_vec();
        for r in &rows {
            assert!(names.contains(r), "README.md's log table has `{r}`, which keepfix never writes");
        }
        names.retain(|n| !rows.contains(n));
        assert!(names.is_empty(), "events missing from README.md's log table: {names:?}");
    }
}
