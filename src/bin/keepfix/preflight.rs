//! `keepfix rescue`'s preflight: what the kernel and /proc say about a process before anything is
//! changed in it, and whether rescue can work on it at all. A refusal names the process and the
//! reason (gone, permission, Yama, already traced, seccomp, kernel), so that the person at the
//! terminal knows what to change.
//!
//! Everything here only reads: /proc/PID/status, /proc/PID/fd, /proc/sys, and one pidfd_getfd
//! whose duplicate is closed at once.

use crate::output;
use crate::status::FdUse;
use rustix::fd::{AsRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};
use serde::Serialize;
use std::io;

/// pidfd_getfd appeared in Linux 5.6 (pidfd_open in 5.3).
pub const MIN_KERNEL: (u32, u32) = (5, 6);
/// Capability bits of /proc/PID/status CapEff (include/uapi/linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;
/// SIGPIPE's bit in the SigIgn and SigCgt masks (bit signo - 1).
const SIGPIPE_BIT: u32 = 13 - 1;

/// What /proc/PID/status says (the fields rescue needs).
#[derive(Clone, Debug, Default)]
pub struct ProcStatus {
    pub state: char,
    /// The thread group (process) the id belongs to: not the id itself for a thread's id.
    pub tgid: u32,
    pub ppid: u32,
    pub tracer_pid: u32,
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub cap_eff: u64,
    pub threads: u32,
    /// 0 none, 1 strict, 2 filter; None on a kernel built without seccomp.
    pub seccomp: Option<u8>,
}

/// Reads /proc/PID/status, or /proc/self/status for `None`.
pub fn proc_status(pid: Option<u32>) -> io::Result<ProcStatus> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".into(),
    };
    Ok(parse_status(&std::fs::read_to_string(path)?))
}

fn parse_status(text: &str) -> ProcStatus {
    let mut s = ProcStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        let hex = || u64::from_str_radix(value, 16).unwrap_or(0);
        match key {
            "State" => s.state = value.chars().next().unwrap_or('?'),
            "Tgid" => s.tgid = value.parse().unwrap_or(0),
            "PPid" => s.ppid = value.parse().unwrap_or(0),
            "TracerPid" => s.tracer_pid = value.parse().unwrap_or(0),
            "Uid" => {
                for (slot, word) in s.uids.iter_mut().zip(value.split_whitespace()) {
                    *slot = word.parse().unwrap_or(u32::MAX);
                }
            }
            "SigIgn" => s.sig_ign = hex(),
            "SigCgt" => s.sig_cgt = hex(),
            "CapEff" => s.cap_eff = hex(),
            "Threads" => s.threads = value.parse().unwrap_or(0),
            "Seccomp" => s.seccomp = value.parse().ok(),
            _ => {}
        }
    }
    s
}

/// SIGPIPE's disposition in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sigpipe {
    /// SIG_IGN: a write to a shut-down socket returns EPIPE.
    Ignored,
    /// A handler: it runs, and the write returns EPIPE.
    Caught,
    /// SIG_DFL: a write to a shut-down socket kills the process.
    Default,
}

impl ProcStatus {
    pub fn sigpipe(&self) -> Sigpipe {
        if self.sig_ign >> SIGPIPE_BIT & 1 == 1 {
            Sigpipe::Ignored
        } else if self.sig_cgt >> SIGPIPE_BIT & 1 == 1 {
            Sigpipe::Caught
        } else {
            Sigpipe::Default
        }
    }

    fn has_cap(&self, cap: u32) -> bool {
        self.cap_eff >> cap & 1 == 1
    }
}

/// Seccomp mode, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Seccomp {
    None,
    Strict,
    Filter,
    Unknown,
}

impl Seccomp {
    fn of(mode: Option<u8>) -> Seccomp {
        match mode {
            Some(0) => Seccomp::None,
            Some(1) => Seccomp::Strict,
            Some(2) => Seccomp::Filter,
            _ => Seccomp::Unknown,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Seccomp::None => "none",
            Seccomp::Strict => "strict",
            Seccomp::Filter => "filter",
            Seccomp::Unknown => "unknown",
        }
    }
}

/// Why a process cannot be rescued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Gone,
    Permission,
    Yama,
    Traced,
    Seccomp,
    Kernel,
}

/// A refusal: the reason and the whole message (`process PID: ...`).
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub pid: u32,
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    fn new(pid: u32, reason: Reason, what: impl std::fmt::Display) -> Refusal {
        Refusal { pid, reason, message: format!("process {pid}: {what}") }
    }
}

/// What the preflight found, printed before anything is changed (`preflight` in the JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Preflight {
    /// The running kernel's release (uname -r).
    pub kernel: String,
    /// keepfix's effective uid, and the target's real uid.
    pub keepfix_uid: u32,
    pub target_uid: u32,
    /// keepfix holds CAP_SYS_PTRACE (needed for another uid's process).
    pub cap_sys_ptrace: bool,
    /// /proc/sys/kernel/yama/ptrace_scope; null without Yama.
    pub yama_ptrace_scope: Option<u8>,
    /// TracerPid: always 0 here (a traced process is refused).
    pub tracer_pid: u32,
    /// The target's seccomp mode (matters to --release only), and keepfix's own.
    pub seccomp: Seccomp,
    pub keepfix_seccomp: Seccomp,
    pub sigpipe: Sigpipe,
    pub fds: FdUse,
    /// libkeepfix.so is mapped in the process (null: /proc/PID/maps unreadable).
    pub keepfix_loaded: Option<bool>,
}

impl Preflight {
    /// The preflight as text lines (indented by the caller).
    pub fn lines(&self, force: bool) -> Vec<String> {
        let mut l = Vec::new();
        l.push(format!(
            "kernel:    {} (pidfd_getfd, Linux {}.{}+): works, tried on keepfix's own fd",
            self.kernel, MIN_KERNEL.0, MIN_KERNEL.1
        ));
        let access = if self.keepfix_uid == self.target_uid {
            format!("same uid {} as keepfix: ok", self.target_uid)
        } else {
            let how = if self.cap_sys_ptrace { "with CAP_SYS_PTRACE" } else { "the kernel allows it" };
            format!("uid {} (keepfix is uid {}, {how}): ok", self.target_uid, self.keepfix_uid)
        };
        l.push(format!("access:    {access}"));
        l.push(format!(
            "yama:      {}",
            match self.yama_ptrace_scope {
                None => "not in this kernel".to_string(),
                Some(s) => format!("ptrace_scope {s}: ok for this process"),
            }
        ));
        l.push("traced:    no (TracerPid 0)".into());
        l.push(format!(
            "keepfix:   {}",
            match self.keepfix_loaded {
                Some(true) => "libkeepfix.so is loaded in it: its own keepalive and CLOSE_WAIT handling run already",
                Some(false) => "not loaded (restart it under `keepfix run` for the lasting cure)",
                None => "unknown (cannot read /proc/PID/maps)",
            }
        ));
        l.push(format!(
            "seccomp:   {} (no bearing without --release); keepfix's own: {}",
            self.seccomp.name(),
            self.keepfix_seccomp.name()
        ));
        l.push(format!(
            "SIGPIPE:   {}",
            match (self.sigpipe, force) {
                (Sigpipe::Ignored, _) => "ignored: a shut-down socket gives the program EPIPE; shutdown allowed",
                (Sigpipe::Caught, _) => "caught by a handler: a shut-down socket gives EPIPE; shutdown allowed",
                (Sigpipe::Default, false) =>
                    "default (a write to a shut-down socket would kill the program): no shutdown without --force",
                (Sigpipe::Default, true) =>
                    "default (a write to a shut-down socket would kill the program): shutdown anyway (--force)",
            }
        ));
        let percent = self
            .fds
            .soft_limit
            .filter(|s| *s > 0)
            .map(|s| format!(" ({}%)", self.fds.used as u64 * 100 / s))
            .unwrap_or_default();
        let limit = |l: Option<u64>| l.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        let near = self.fds.soft_limit.is_some_and(|s| s > 0 && self.fds.used as u64 * 100 / s >= 80);
        l.push(format!(
            "fds:       {} used of soft limit {}{percent}, hard limit {}{}",
            self.fds.used,
            limit(self.fds.soft_limit),
            limit(self.fds.hard_limit),
            if near { ": near the limit (rescue frees no fd; --raise-nofile buys time)" } else { "" }
        ));
        l
    }
}

/// An open pidfd of the process: every duplicate is taken through it, so that a pid reused by
/// another process after this one exited (during a pass, or between --watch passes) is never
/// touched: pidfd_getfd then fails with ESRCH.
pub struct Access {
    pub pidfd: OwnedFd,
    /// When each socket (by inode) was first seen in CLOSE_WAIT, by this pass or an earlier one
    /// of a --watch: a lower bound on the time since its peer's FIN, which keepalive's ACKs do
    /// not move (they do move TCP_INFO's last_ack_recv).
    pub close_wait_since: std::cell::RefCell<std::collections::HashMap<u64, std::time::Instant>>,
}

impl Access {
    /// Is the process still running? (A pidfd polls readable once the process has exited.)
    pub fn alive(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(&self.pidfd, rustix::event::PollFlags::IN)];
        let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
    }
}

/// The kernel release, and whether it is at least `MIN_KERNEL`.
fn kernel() -> (String, bool) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (release, (major, minor) >= MIN_KERNEL)
}

fn yama_scope() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}

/// Is `pid` a descendant of keepfix (Yama's ptrace_scope 1 lets a process trace its descendants)?
fn is_descendant(pid: u32) -> bool {
    let me = std::process::id();
    let mut p = pid;
    for _ in 0..4096 {
        if p == me {
            return true;
        }
        if p <= 1 {
            return false;
        }
        match proc_status(Some(p)) {
            Ok(s) => p = s.ppid,
            Err(_) => return false,
        }
    }
    false
}

/// Can keepfix take a duplicate of its own fd? Not on a kernel without pidfd_getfd, nor under a
/// seccomp filter that forbids it (Docker's default profile without CAP_SYS_PTRACE).
fn own_getfd() -> Result<(), Errno> {
    let pidfd = rustix::process::pidfd_open(rustix::process::getpid(), PidfdFlags::empty())?;
    rustix::process::pidfd_getfd(&pidfd, pidfd.as_raw_fd(), PidfdGetfdFlags::empty()).map(drop)
}

/// Opens the process (once: a --watch keeps it). Refuses when keepfix cannot take duplicates at
/// all (kernel, keepfix's own seccomp filter) or the process does not exist.
pub fn open(pid: u32) -> Result<Access, Refusal> {
    let (kernel, kernel_ok) = kernel();
    let keepfix_seccomp = Seccomp::of(proc_status(None).unwrap_or_default().seccomp);
    if let Err(e) = own_getfd() {
        let err = errno_text(e);
        return Err(if keepfix_seccomp == Seccomp::Filter {
            Refusal::new(
                pid,
                Reason::Seccomp,
                format!(
                    "keepfix runs under a seccomp filter that forbids pidfd_open or pidfd_getfd ({err}); \
                     Docker's default profile allows them only with CAP_SYS_PTRACE (--cap-add SYS_PTRACE)"
                ),
            )
        } else if !kernel_ok || e == Errno::NOSYS {
            Refusal::new(
                pid,
                Reason::Kernel,
                format!(
                    "kernel {kernel} has no pidfd_getfd ({err}); Linux {}.{} or later is needed",
                    MIN_KERNEL.0, MIN_KERNEL.1
                ),
            )
        } else {
            Refusal::new(pid, Reason::Kernel, format!("pidfd_getfd fails even on keepfix's own fd: {err}"))
        });
    }
    match rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::empty()) {
        Ok(pidfd) => Ok(Access { pidfd, close_wait_since: Default::default() }),
        Err(Errno::SRCH) => Err(Refusal::new(pid, Reason::Gone, "no such process")),
        Err(e) => Err(Refusal::new(pid, Reason::Kernel, format!("pidfd_open failed: {}", errno_text(e)))),
    }
}

/// The preflight: reads everything it reports and refuses a process rescue cannot work on.
pub fn check(pid: u32, access: &Access) -> Result<Preflight, Refusal> {
    let (kernel, _) = kernel();
    let gone = |detail: &str| Refusal::new(pid, Reason::Gone, format!("no such process{detail}"));
    let status = match proc_status(Some(pid)) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone("")),
        Err(e) => {
            return Err(Refusal::new(
                pid,
                Reason::Permission,
                format!("cannot read /proc/{pid}/status: {}", output::io_error(&e)),
            ));
        }
    };
    // What /proc says is about the pidfd's process only while that one is alive (its pid cannot
    // be reused before it is reaped).
    if !access.alive() {
        return Err(gone(" (it has exited)"));
    }
    if matches!(status.state, 'Z' | 'X') {
        return Err(gone(if status.threads > 1 {
            " (its main thread has exited; its other threads run on, but their fds cannot be reached through it)"
        } else {
            " (it has exited: a zombie waiting for its parent)"
        }));
    }
    let me = proc_status(None).unwrap_or_default();
    let keepfix_uid = rustix::process::geteuid().as_raw();
    let yama = yama_scope();
    let cap_sys_ptrace = me.has_cap(CAP_SYS_PTRACE);
    if status.tracer_pid != 0 {
        let tracer = crate::procfs::comm(status.tracer_pid).unwrap_or_else(|_| "?".into());
        return Err(Refusal::new(
            pid,
            Reason::Traced,
            format!(
                "already traced by process {} ({tracer}): a debugger or another tool is in control of it; \
                 detach it first",
                status.tracer_pid
            ),
        ));
    }
    let keepfix_seccomp = Seccomp::of(me.seccomp);
    let fds = match crate::procfs::fds(pid) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone("")),
        Err(e) => {
            let why = if keepfix_uid != 0 && keepfix_uid != status.uids[0] {
                format!(
                    "cannot list /proc/{pid}/fd ({}): it runs as uid {}, keepfix as uid {keepfix_uid}; \
                     run keepfix as that user or as root (CAP_SYS_PTRACE)",
                    output::io_error(&e),
                    status.uids[0]
                )
            } else {
                format!(
                    "cannot list /proc/{pid}/fd ({}): the process is not dumpable (set-user-ID, or \
                     PR_SET_DUMPABLE 0), or its uids differ from keepfix's; run keepfix as root",
                    output::io_error(&e)
                )
            };
            return Err(Refusal::new(pid, Reason::Permission, why));
        }
    };
    // Every duplicate sets the socket's cgroup-v1 net_cls classid and net_prio index to the
    // taker's: keepfix first joins the process's cgroups of those (src/bin/keepfix/netcls.rs).
    if let Err(why) = crate::netcls::join(pid) {
        return Err(Refusal::new(pid, Reason::Permission, why));
    }
    // One duplicate, closed at once, proves that the others will work: pidfd_getfd checks ptrace
    // access (PTRACE_MODE_ATTACH_REALCREDS), which Yama can forbid.
    for fd in fds.iter().filter(|f| f.socket_inode.is_some()).chain(fds.iter()) {
        match rustix::process::pidfd_getfd(&access.pidfd, fd.fd, PidfdGetfdFlags::empty()) {
            Ok(_duplicate) => break,
            Err(Errno::BADF) => continue, // closed meanwhile
            Err(Errno::SRCH) => return Err(gone("")),
            Err(e) => return Err(getfd_refusal(pid, e, &status, yama, cap_sys_ptrace)),
        }
    }
    let (soft_limit, hard_limit) = crate::procfs::nofile_limits(pid).unwrap_or((None, None));
    Ok(Preflight {
        kernel,
        keepfix_uid,
        target_uid: status.uids[0],
        cap_sys_ptrace,
        yama_ptrace_scope: yama,
        tracer_pid: status.tracer_pid,
        seccomp: Seccomp::of(status.seccomp),
        keepfix_seccomp,
        sigpipe: status.sigpipe(),
        fds: FdUse { used: fds.len(), soft_limit, hard_limit },
        keepfix_loaded: crate::procfs::has_keepfix(pid).ok(),
    })
}

fn pid_of(pid: u32) -> Result<Pid, Refusal> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| Refusal::new(pid, Reason::Gone, "no such process (not a valid pid)"))
}

/// Why pidfd_getfd was refused: Yama, or plain permission (keepfix's own seccomp filter was ruled
/// out by `open`).
fn getfd_refusal(pid: u32, e: Errno, status: &ProcStatus, yama: Option<u8>, cap_sys_ptrace: bool) -> Refusal {
    let err = errno_text(e);
    match yama {
        Some(3) => {
            return Refusal::new(
                pid,
                Reason::Yama,
                format!(
                    "pidfd_getfd failed ({err}): Yama's ptrace_scope is 3, no process may be traced (until reboot)"
                ),
            );
        }
        Some(2) if !cap_sys_ptrace => {
            return Refusal::new(
                pid,
                Reason::Yama,
                format!(
                    "pidfd_getfd failed ({err}): Yama's ptrace_scope is 2, only CAP_SYS_PTRACE may trace; run as root"
                ),
            );
        }
        Some(1) if !cap_sys_ptrace && !is_descendant(pid) => {
            return Refusal::new(
                pid,
                Reason::Yama,
                format!(
                    "pidfd_getfd failed ({err}): Yama's ptrace_scope is 1, a process may trace only its \
                     descendants; run as root (CAP_SYS_PTRACE) or set kernel.yama.ptrace_scope=0"
                ),
            );
        }
        _ => {}
    }
    let keepfix_uid = rustix::process::geteuid().as_raw();
    let why = if status.uids[0] != keepfix_uid && !cap_sys_ptrace {
        format!(
            "pidfd_getfd failed ({err}): it runs as uid {}, keepfix as uid {keepfix_uid} without CAP_SYS_PTRACE; \
             run keepfix as that user or as root",
            status.uids[0]
        )
    } else {
        format!(
            "pidfd_getfd failed ({err}): the kernel refuses ptrace access (a non-dumpable or more privileged process)"
        )
    };
    Refusal::new(pid, Reason::Permission, why)
}

pub fn errno_text(e: Errno) -> String {
    output::io_error(&io::Error::from_raw_os_error(e.raw_os_error()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_and_sigpipe() {
        let text = "Name:\tx\nState:\tS (sleeping)\nPPid:\t7\nTracerPid:\t0\nUid:\t0\t1\t2\t3\n\
                    SigIgn:\t0000000000001000\nSigCgt:\t0000000000000000\nCapEff:\t0000000000080000\nSeccomp:\t2\n";
        let s = parse_status(text);
        assert_eq!((s.state, s.ppid, s.uids), ('S', 7, [0, 1, 2, 3]));
        assert_eq!(s.sigpipe(), Sigpipe::Ignored);
        assert!(s.has_cap(CAP_SYS_PTRACE));
        assert_eq!(Seccomp::of(s.seccomp), Seccomp::Filter);
        let caught = parse_status("SigIgn:\t0\nSigCgt:\t0000000000001002\n");
        assert_eq!(caught.sigpipe(), Sigpipe::Caught);
        assert_eq!(parse_status("SigIgn:\t0000000000000800\nSigCgt:\t0\n").sigpipe(), Sigpipe::Default);
    }

    #[test]
    fn yama_and_permission_are_told_apart() {
        let other_uid = ProcStatus { uids: [4242; 4], ..ProcStatus::default() };
        let reason = |yama, cap| getfd_refusal(1, Errno::PERM, &other_uid, yama, cap).reason;
        assert_eq!(reason(Some(3), true), Reason::Yama);
        assert_eq!(reason(Some(2), false), Reason::Yama);
        assert_eq!(reason(Some(1), false), Reason::Yama); // pid 1 is no descendant of the test
        assert_eq!(reason(Some(2), true), Reason::Permission);
        assert_eq!(reason(Some(0), false), Reason::Permission);
        assert_eq!(reason(None, false), Reason::Permission);
        let m = getfd_refusal(1, Errno::PERM, &other_uid, Some(1), false).message;
        assert!(m.starts_with("process 1: ") && m.contains("ptrace_scope is 1"), "{m}");
    }
}
