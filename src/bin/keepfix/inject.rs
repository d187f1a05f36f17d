//! `keepfix rescue --release`: frees the sockets that rescue has shut down, inside the running
//! process, without a restart and without ever closing one of its fd numbers.
//!
//! For each batch: PTRACE_SEIZE and PTRACE_INTERRUPT every thread (the task list is read again
//! until no new thread shows up), wait for each stop with a timeout (a thread in D state never
//! stops: keepfix gives up, detaches and says so), then, with the whole process stopped:
//! - re-verify each candidate: a duplicate through pidfd_getfd has the inode decided on, and the
//!   socket is shut down (LAST_ACK or CLOSE);
//! - in one thread, at a `syscall` instruction (the one its own call used, or one in the vDSO),
//!   inject socketpair(AF_UNIX) and close the second end: the placeholder, a socket whose peer is
//!   gone, which answers read() 0 and write() EPIPE as the shut-down socket did;
//! - inject dup3(placeholder, N, O_CLOEXEC as N had) for each candidate: the socket leaves N, the
//!   number stays occupied, and the program's own close(N) later closes the placeholder;
//! - close keepfix's duplicate (the socket's last reference: it is freed here, with SO_LINGER off
//!   so that nothing waits), then inject close(placeholder);
//! - restore the registers, the signal mask and the scratch bytes exactly, and detach. A call the
//!   stop interrupted restarts as after any signal; calls that a stop fails with EINTR
//!   (epoll_wait, sigtimedwait, reads with a timeout) are handed back as -ERESTARTNOHAND, so the
//!   kernel restarts them unless a signal handler runs (then they return EINTR, as they would);
//!   on aarch64 they are re-armed by hand (see `hand_back`).
//!
//! A batch ends when its stop nears `max_stop`; the next one starts after the process has run
//! again. SIGINT or SIGTERM of keepfix ends the batch at the next step, restored and detached.
//! keepfix never injects close() of one of the program's numbers.

#[cfg(target_arch = "aarch64")]
#[path = "inject/aarch64.rs"]
mod arch;
#[cfg(target_arch = "x86_64")]
#[path = "inject/x86_64.rs"]
mod arch;

use rustix::fd::{AsRawFd, OwnedFd};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the placeholder is, for the report.
pub const PLACEHOLDER: &str = "unix socket whose peer is closed (read 0, write EPIPE)";

/// A socket rescue decided to release: its number, the socket's inode then, and its peer.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub fd: i32,
    pub inode: u64,
    pub peer: String,
    /// Whether the number has O_CLOEXEC (its dup3 keeps it): read from /proc/PID/fdinfo before
    /// the stop, at 10 µs a read (a third of the stop per socket). The inode check under the
    /// stop still decides; only an fcntl(F_SETFD) on a forgotten socket in between would be missed.
    cloexec: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Released {
    pub fd: i32,
    pub peer: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub fd: i32,
    pub peer: String,
    pub reason: String,
}

/// What `--release` did to one process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReleaseReport {
    pub dry_run: bool,
    pub placeholder: &'static str,
    pub released: Vec<Released>,
    pub skipped: Vec<Skipped>,
    /// How many times the whole process was stopped, the longest stop, and all of them together.
    pub stops: u32,
    pub longest_stop_us: u64,
    pub total_stop_us: u64,
    /// Threads stopped (the most in one stop).
    pub threads: usize,
    /// The process runs under seccomp; keepfix suspended it for the injected calls (root only).
    pub seccomp_suspended: bool,
    /// keepfix got SIGINT or SIGTERM and stopped early (everything restored and detached).
    pub interrupted: bool,
    /// Why the release stopped short for the whole process (already traced, a thread that does
    /// not stop, seccomp without root...); null when it ran to the end.
    pub error: Option<String>,
}

/// How long a stop may last, and how long a thread may take to stop.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_stop: Duration,
    pub stop_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_stop: Duration::from_millis(10), stop_timeout: Duration::from_millis(500) }
    }
}

/// What `--dry-run` says: each candidate would be released (nothing is stopped or checked).
pub fn dry_run(candidates: &[Candidate]) -> ReleaseReport {
    ReleaseReport {
        dry_run: true,
        placeholder: PLACEHOLDER,
        released: candidates.iter().map(|c| Released { fd: c.fd, peer: c.peer.clone() }).collect(),
        ..ReleaseReport::default()
    }
}

/// The candidates of a pass: the sockets rescue shut down (or, under --dry-run, would).
pub fn candidates(targets: impl IntoIterator<Item = (i32, u64, Option<std::net::SocketAddr>)>) -> Vec<Candidate> {
    targets
        .into_iter()
        .map(|(fd, inode, peer)| Candidate {
            fd,
            inode,
            peer: peer.map_or_else(|| "?".into(), |p| p.to_string()),
            cloexec: false,
        })
        .collect()
}

/// The report as text, for rescue's per-process report (each line indented by two).
pub fn text(r: &ReleaseReport) -> String {
    let would = if r.dry_run { "would " } else { "" };
    let mut t = format!(
        "  release:    {would}put a placeholder ({}) over {} shut-down socket(s); skipped {}",
        r.placeholder,
        r.released.len(),
        r.skipped.len()
    );
    if !r.dry_run && r.stops > 0 {
        t += &format!(
            "; the process was stopped {} time(s), longest {:.2} ms, {:.2} ms in all ({} threads)",
            r.stops,
            r.longest_stop_us as f64 / 1000.0,
            r.total_stop_us as f64 / 1000.0,
            r.threads
        );
    }
    if r.seccomp_suspended && !r.dry_run {
        t += "; its seccomp filter was suspended for the injected calls";
    }
    t += "
";
    if !r.released.is_empty() || !r.skipped.is_empty() {
        let mut rows = vec![["FD", "PEER", "RELEASE"].map(String::from)];
        for x in &r.released {
            rows.push([
                x.fd.to_string(),
                x.peer.clone(),
                if r.dry_run {
                    "would release: free the socket, keep the number with the placeholder".to_string()
                } else {
                    "released: the socket freed, the number holds the placeholder".to_string()
                },
            ]);
        }
        for x in &r.skipped {
            rows.push([x.fd.to_string(), x.peer.clone(), format!("skipped: {}", x.reason)]);
        }
        for l in crate::output::table(&rows).lines() {
            t += &format!("    {l}\n");
        }
    }
    if r.interrupted {
        t += "    interrupted (SIGINT/SIGTERM): the process was restored and let go; the rest is left as it was\n";
    }
    if let Some(e) = &r.error {
        t += &format!("    not (all) released: {e}\n");
    }
    t
}

/// The preflight's seccomp line under --release: what the release will do about the filter.
/// `line` is the preflight's own seccomp line, whose end (keepfix's own mode) is kept.
pub fn preflight_seccomp(target: &crate::preflight::Seccomp, line: &str) -> String {
    use crate::preflight::Seccomp;
    let what = match target {
        Seccomp::None => "none: --release injects its calls as they are".to_string(),
        Seccomp::Unknown => "unknown (--release treats the filter as absent)".to_string(),
        _ if may_suspend_seccomp() => "on: --release suspends it for its own calls (root)".to_string(),
        _ => "on: --release will refuse (suspending it needs CAP_SYS_ADMIN, keepfix not under seccomp)".to_string(),
    };
    let own = line.rsplit_once("keepfix's own:").map_or("", |(_, o)| o.trim());
    format!("seccomp:   {what}; keepfix's own: {own}")
}

/// Whether keepfix may suspend a target's seccomp filter (PTRACE_O_SUSPEND_SECCOMP): the kernel
/// allows it to a tracer with CAP_SYS_ADMIN that is not under seccomp itself.
fn may_suspend_seccomp() -> bool {
    let own = |k: &str| status_field("/proc/self/status", k);
    let cap_sys_admin =
        own("CapEff").and_then(|c| u64::from_str_radix(&c, 16).ok()).is_some_and(|c| c & (1 << 21) != 0);
    cap_sys_admin && own("Seccomp").is_none_or(|m| m == "0")
}

// ---- ptrace -------------------------------------------------------------------------------------

const PTRACE_CONT: u32 = 7;
const PTRACE_DETACH: u32 = 17;
const PTRACE_SYSCALL: u32 = 24;
const PTRACE_SEIZE: u32 = 0x4206;
const PTRACE_INTERRUPT: u32 = 0x4207;
const PTRACE_GETSIGMASK: u32 = 0x420a;
const PTRACE_SETSIGMASK: u32 = 0x420b;
const PTRACE_O_TRACESYSGOOD: usize = 1;
const PTRACE_SETOPTIONS: u32 = 0x4200;
const PTRACE_O_EXITKILL: usize = 1 << 20;
const PTRACE_O_SUSPEND_SECCOMP: usize = 1 << 21;
const PTRACE_EVENT_STOP: i32 = 128;

const EINTR: i64 = 4;
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// The kernel's TCP states (include/net/tcp_states.h) that a shut-down CLOSE_WAIT socket reaches.
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;

fn ptrace(req: u32, tid: i32, addr: usize, data: usize) -> io::Result<i64> {
    // SAFETY: the requests used here read or write only the buffers the callers pass (sized for
    // them) or nothing at all.
    let r = unsafe { libc::ptrace(req as _, tid, addr as *mut libc::c_void, data as *mut libc::c_void) };
    if r == -1 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// waitpid(tid, __WALL), blocking or not.
fn wait(tid: i32, block: bool) -> io::Result<Option<i32>> {
    let mut status = 0;
    let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: waitpid writes one int.
        let r = unsafe { libc::waitpid(tid, &mut status, flags) };
        match r {
            0 => return Ok(None),
            r if r > 0 => return Ok(Some(status)),
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
}

/// What a thread's wait status says.
enum Event {
    /// PTRACE_EVENT_STOP; `group` when it is a job-control stop (the process was stopped).
    Stop {
        group: bool,
    },
    /// A syscall-entry or -exit stop (SIGTRAP | 0x80).
    Syscall,
    /// A signal on its way to the thread: it must be passed on.
    Signal(i32),
    Gone,
}

fn event(status: i32) -> Event {
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Event::Gone;
    }
    let sig = libc::WSTOPSIG(status);
    if status >> 16 == PTRACE_EVENT_STOP {
        return Event::Stop { group: matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) };
    }
    if sig == libc::SIGTRAP | 0x80 {
        return Event::Syscall;
    }
    Event::Signal(sig)
}

// ---- keepfix's own SIGINT and SIGTERM -------------------------------------------------------------

/// Set by SIGINT or SIGTERM once a release has begun: the injection stops at its next step.
fn interrupted() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // A failure leaves the default action: keepfix would die mid-injection, as without this.
            let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
        }
        flag
    })
}

/// Whether keepfix has been asked to stop (SIGINT or SIGTERM) since a release began.
pub fn was_interrupted() -> bool {
    interrupted().load(Ordering::Relaxed)
}

// ---- /proc --------------------------------------------------------------------------------------

fn tids(pid: u32) -> io::Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn status_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()))
}

/// fd -> socket inode, for every socket fd of `pid`.
fn socket_inodes(pid: u32) -> HashMap<i32, u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return HashMap::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd = e.file_name().to_str()?.parse().ok()?;
        let link = std::fs::read_link(e.path()).ok()?;
        let ino = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
        Some((fd, ino))
    })
    .collect()
}

/// The candidates whose socket something else also holds: another fd of the process, or another
/// process (a forked child). Releasing the number would not free such a socket, and an epoll
/// registration of N would live on under the other reference.
fn shared(pid: u32, candidates: &[Candidate]) -> HashMap<u64, String> {
    let wanted: HashSet<u64> = candidates.iter().map(|c| c.inode).collect();
    let mut by_inode: HashMap<u64, Vec<i32>> = HashMap::new();
    for (fd, ino) in socket_inodes(pid) {
        if wanted.contains(&ino) {
            by_inode.entry(ino).or_default().push(fd);
        }
    }
    let mut out = HashMap::new();
    for (ino, mut fds) in by_inode {
        if fds.len() > 1 {
            fds.sort_unstable();
            out.insert(ino, format!("the socket is also at fd {fds:?} of the process"));
        }
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(other) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if other == pid || other == std::process::id() {
            continue;
        }
        for (_, ino) in socket_inodes(other) {
            if wanted.contains(&ino) {
                out.entry(ino).or_insert_with(|| format!("process {other} holds the socket too"));
            }
        }
    }
    out
}

/// Whether the fd's flags in /proc/PID/fdinfo have O_CLOEXEC (dup3 must keep it).
fn cloexec(pid: u32, fd: i32) -> io::Result<bool> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u64::from_str_radix(f.trim(), 8).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no flags in fdinfo"))?;
    Ok(flags & libc::O_CLOEXEC as u64 != 0)
}

fn tcp_state(fd: &OwnedFd) -> Option<u8> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    (r == 0 && len > 0).then_some(info[0])
}

/// Turns SO_LINGER off on keepfix's duplicate, so that dropping the socket's last reference never
/// waits (the process is stopped meanwhile). The socket is shut down; nothing is lost that
/// lingering would have saved, the kernel still sends what is queued.
fn no_linger(fd: &OwnedFd) {
    let l = libc::linger { l_onoff: 0, l_linger: 0 };
    // SAFETY: a valid linger struct.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn errno_name(e: i64) -> String {
    io::Error::from_raw_os_error(e as i32).to_string()
}

// ---- one stop -----------------------------------------------------------------------------------

struct Thread {
    tid: i32,
    /// The registers at the stop, and what they are set back to (with the EINTR hand-back).
    regs: arch::Regs,
    restore: arch::Regs,
}

/// The process, every thread stopped.
struct Stop {
    pid: u32,
    started: Instant,
    threads: Vec<Thread>,
    /// Seized threads that have not stopped (yet).
    waiting: Vec<i32>,
    /// Detached already, or never seized.
    done: bool,
    /// aarch64: each thread's /proc/TID/syscall just before its interrupt (see `hand_back`).
    before: HashMap<i32, String>,
    /// The ptrace options every thread was seized with.
    options: usize,
}

/// Why a stop could not be made: the whole release is given up, with this reason.
struct Refused(String);

impl Stop {
    fn begin(pid: u32, options: usize, limits: &Limits) -> Result<Stop, Refused> {
        let mut stop = Stop {
            pid,
            started: Instant::now(),
            threads: vec![],
            waiting: vec![],
            done: false,
            before: HashMap::new(),
            options,
        };
        let mut seen: HashSet<i32> = HashSet::new();
        loop {
            let listed = tids(pid).map_err(|e| Refused(format!("cannot list its threads: {e}")))?;
            let new: Vec<i32> = listed.into_iter().filter(|t| !seen.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                seen.insert(tid);
                if cfg!(target_arch = "aarch64")
                    && let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
                {
                    stop.before.insert(tid, text);
                }
                match ptrace(PTRACE_SEIZE, tid, 0, options) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(e) => {
                        stop.end_quietly();
                        return Err(Refused(seize_refusal(pid, tid, &e)));
                    }
                }
                stop.waiting.push(tid);
                // A thread that exited in between is found by its wait status.
                let _ = ptrace(PTRACE_INTERRUPT, tid, 0, 0);
            }
            stop.wait_all(limits)?;
        }
        Ok(stop)
    }

    /// Waits for every seized thread to stop (at most `stop_timeout` from the first interrupt).
    fn wait_all(&mut self, limits: &Limits) -> Result<(), Refused> {
        let deadline = Instant::now() + limits.stop_timeout;
        let mut spins = 0u32;
        while !self.waiting.is_empty() {
            let mut i = 0;
            while i < self.waiting.len() {
                let tid = self.waiting[i];
                let status = match wait(tid, false) {
                    Ok(None) => {
                        i += 1;
                        continue;
                    }
                    Ok(Some(s)) => s,
                    Err(_) => {
                        self.waiting.swap_remove(i);
                        continue;
                    }
                };
                match event(status) {
                    Event::Stop { group: true } => {
                        self.waiting.swap_remove(i);
                        self.threads.push(Thread { tid, regs: zero_regs(tid)?, restore: zero_regs(tid)? });
                        self.end_quietly();
                        return Err(Refused(
                            "it is stopped (job control: SIGSTOP or SIGTSTP); continue it first".into(),
                        ));
                    }
                    Event::Stop { group: false } => {
                        self.waiting.swap_remove(i);
                        let regs = match arch::get_regs(tid) {
                            Ok(r) => r,
                            Err(e) => {
                                let _ = ptrace(PTRACE_DETACH, tid, 0, 0);
                                self.end_quietly();
                                return Err(Refused(format!("cannot read the registers of thread {tid}: {e}")));
                            }
                        };
                        let restore = hand_back(&regs, self.pid, tid, self.before.get(&tid).map(String::as_str));
                        self.threads.push(Thread { tid, regs, restore });
                        if !regs.is_native() {
                            self.end_quietly();
                            return Err(Refused("it is a 32-bit process; keepfix injects 64-bit calls only".into()));
                        }
                    }
                    // Passed on: the interrupt is still pending, the thread stops right after.
                    Event::Signal(sig) => {
                        let _ = ptrace(PTRACE_CONT, tid, 0, sig as usize);
                        i += 1;
                    }
                    Event::Syscall => i += 1,
                    Event::Gone => {
                        self.waiting.swap_remove(i);
                    }
                }
            }
            if self.waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let stuck = self.waiting.clone();
                let states: Vec<String> = stuck
                    .iter()
                    .map(|t| {
                        let state = status_field(&format!("/proc/{}/task/{t}/status", self.pid), "State")
                            .unwrap_or_else(|| "?".into());
                        format!("{t} ({state})")
                    })
                    .collect();
                self.end_quietly();
                return Err(Refused(format!(
                    "thread {} did not stop within {} ms (a thread in D state, uninterruptible, never does); \
                     nothing was changed",
                    states.join(", "),
                    limits.stop_timeout.as_millis()
                )));
            }
            spins += 1;
            if spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }

    /// Detaches every stopped thread, with its registers as the stop found them (with the EINTR
    /// hand-back). Threads that never stopped stay seized: the kernel detaches them when they
    /// stop or when keepfix exits; `end_quietly` waits a little for them first.
    fn end_quietly(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        for t in &self.threads {
            let _ = arch::set_regs(t.tid, &t.restore);
            let _ = ptrace(PTRACE_DETACH, t.tid, 0, 0);
        }
        // Stragglers (D state): detach each as soon as it stops, for up to a second; the ones
        // still running are kept for `tidy`, since they will stop when they leave D state.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.waiting.is_empty() && Instant::now() < deadline {
            self.waiting.retain(|&tid| !let_go(tid));
            std::thread::sleep(Duration::from_millis(1));
        }
        stragglers().lock().unwrap_or_else(|e| e.into_inner()).append(&mut self.waiting);
    }
}

/// Threads seized and interrupted that had not stopped when keepfix gave up on them. Each stops
/// when it leaves D state, and would stay stopped until keepfix detaches it or exits.
fn stragglers() -> &'static std::sync::Mutex<Vec<i32>> {
    static S: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    &S
}

/// Detaches `tid` if it has stopped (or is gone); false while it still runs.
fn let_go(tid: i32) -> bool {
    match wait(tid, false) {
        Ok(None) => false,
        Ok(Some(s)) => match event(s) {
            Event::Gone => true,
            Event::Signal(sig) => ptrace(PTRACE_DETACH, tid, 0, sig as usize).is_ok(),
            _ => ptrace(PTRACE_DETACH, tid, 0, 0).is_ok(),
        },
        Err(_) => true,
    }
}

/// Lets go of the threads an earlier release gave up on and that have stopped since (rescue
/// calls it on every --watch pass; the kernel lets the rest go when keepfix exits).
pub fn tidy() {
    stragglers().lock().unwrap_or_else(|e| e.into_inner()).retain(|&tid| !let_go(tid));
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.end_quietly();
    }
}

fn zero_regs(tid: i32) -> Result<arch::Regs, Refused> {
    arch::get_regs(tid).map_err(|e| Refused(format!("cannot read the registers of thread {tid}: {e}")))
}

/// The registers a thread gets back. A call in the list that the stop failed with EINTR gets
/// -ERESTARTNOHAND instead, which the kernel turns into a restart, or into EINTR again if a
/// signal handler runs, exactly as for a call interrupted by a signal.
#[cfg(target_arch = "x86_64")]
fn hand_back(regs: &arch::Regs, _pid: u32, _tid: i32, _before: Option<&str>) -> arch::Regs {
    let mut r = *regs;
    if let Some(nr) = regs.syscall_nr()
        && regs.ret() == -EINTR
        && arch::EINTR_RERUN.contains(&nr)
    {
        r.set_ret(-ERESTARTNOHAND);
    }
    r
}

/// arm64 has forgotten the call by the time the thread stops, and its x0 (the first argument)
/// holds -EINTR: the call is re-armed by hand (x0 from /proc/TID/syscall read before the
/// interrupt, pc back onto its `svc`), only if that reading matches the registers and no signal
/// is pending for the thread. A signal arriving between that check and the detach would find the
/// call re-armed and not see EINTR (a narrow race that x86_64's hand-back does not have).
#[cfg(target_arch = "aarch64")]
fn hand_back(regs: &arch::Regs, pid: u32, tid: i32, before: Option<&str>) -> arch::Regs {
    let mut r = *regs;
    if regs.ret() != -EINTR || !arch::EINTR_RERUN.contains(&regs.last_nr()) {
        return r;
    }
    let Some(before) = before else { return r };
    let parse = |w: &str| w.strip_prefix("0x").map_or_else(|| w.parse().ok(), |h| u64::from_str_radix(h, 16).ok());
    let w: Vec<u64> = before.split_whitespace().filter_map(parse).collect();
    // nr, six arguments, sp, pc
    let [nr, a0, a1, a2, a3, a4, a5, _sp, pc] = w.as_slice() else { return r };
    if *nr as i64 != regs.last_nr()
        || *pc != regs.pc()
        || [*a1, *a2, *a3, *a4, *a5] != [1, 2, 3, 4, 5].map(|i| regs.arg(i))
    {
        return r;
    }
    let mask = |k: &str| {
        status_field(&format!("/proc/{pid}/task/{tid}/status"), k).and_then(|v| u64::from_str_radix(&v, 16).ok())
    };
    let (Some(pnd), Some(shd), Some(blk)) = (mask("SigPnd"), mask("ShdPnd"), mask("SigBlk")) else { return r };
    if (pnd | shd) & !blk != 0 {
        return r;
    }
    r.set_ret(*a0 as i64);
    r.set_pc(regs.pc() - arch::SYSCALL_LEN);
    r
}

/// Whether the kernel still has to restart the call these registers are in: only its signal
/// code does that, so the injector thread must pass through a stop there before it is let go.
fn restart_pending(regs: &arch::Regs) -> bool {
    regs.syscall_nr().is_some()
        && matches!(-regs.ret(), ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK)
}

fn seize_refusal(pid: u32, tid: i32, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::EPERM) {
        let tracer = status_field(&format!("/proc/{pid}/task/{tid}/status"), "TracerPid")
            .and_then(|t| t.parse::<u32>().ok())
            .unwrap_or(0);
        if tracer != 0 {
            let name = std::fs::read_to_string(format!("/proc/{tracer}/comm")).unwrap_or_default();
            return format!(
                "it is already traced by process {tracer} ({}); a process has one tracer at a time",
                name.trim()
            );
        }
        let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok();
        return match yama.as_deref().map(str::trim) {
            Some(s @ ("1" | "2" | "3")) => format!(
                "ptrace refused (EPERM) with Yama's ptrace_scope {s}: --release needs to trace the process \
                 (run as root with CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0)"
            ),
            _ => "ptrace refused (EPERM): --release needs to trace the process (same uid and a dumpable process, \
                  or CAP_SYS_PTRACE)"
                .into(),
        };
    }
    format!("ptrace(PTRACE_SEIZE) of thread {tid} failed: {e}")
}

// ---- the injector -------------------------------------------------------------------------------

/// One thread used to run the injected calls.
struct Injector<'a> {
    tid: i32,
    mem: &'a File,
    /// Where its calls run: an address holding the system call instruction.
    insn: u64,
    base: arch::Regs,
}

impl Injector<'_> {
    /// Runs one system call in the thread and returns its result (-errno on failure). The thread
    /// is at a ptrace stop before and after (a syscall-exit stop after).
    fn call(&self, nr: i64, args: [u64; 6]) -> io::Result<i64> {
        arch::set_regs(self.tid, &self.base.call(self.insn, nr, args))?;
        // To the entry stop, then to the exit stop.
        for _ in 0..2 {
            ptrace(PTRACE_SYSCALL, self.tid, 0, 0)?;
            loop {
                let status = wait(self.tid, true)?.unwrap_or_default();
                match event(status) {
                    Event::Syscall => break,
                    Event::Gone => return Err(io::Error::other("the thread exited")),
                    // Every signal is blocked in this thread meanwhile; one that is not (SIGKILL
                    // ends it, a fault) is passed on as the kernel would deliver it.
                    Event::Signal(sig) => {
                        ptrace(PTRACE_SYSCALL, self.tid, 0, sig as usize)?;
                    }
                    Event::Stop { .. } => {
                        ptrace(PTRACE_SYSCALL, self.tid, 0, 0)?;
                    }
                }
            }
        }
        Ok(arch::get_regs(self.tid)?.ret())
    }

    fn peek(&self, addr: u64) -> io::Result<[u8; 8]> {
        let mut b = [0u8; 8];
        self.mem.read_exact_at(&mut b, addr)?;
        Ok(b)
    }

    fn poke(&self, addr: u64, b: [u8; 8]) -> io::Result<()> {
        self.mem.write_all_at(&b, addr)
    }
}

/// An address of `tid`'s memory holding the system call instruction: just before or at its pc
/// (the instruction its own call used), else in the vDSO, else in any executable mapping.
fn find_insn(pid: u32, mem: &File, regs: &arch::Regs, vdso: &mut Option<Option<u64>>) -> Option<u64> {
    let len = arch::SYSCALL_INSN.len();
    for at in [regs.pc().wrapping_sub(arch::SYSCALL_LEN), regs.pc()] {
        let mut b = vec![0u8; len];
        if mem.read_exact_at(&mut b, at).is_ok() && b == arch::SYSCALL_INSN {
            return Some(at);
        }
    }
    *vdso.get_or_insert_with(|| scan_text(pid, mem))
}

/// The first system call instruction in the vDSO, or else in an executable mapping.
fn scan_text(pid: u32, mem: &File) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut areas: Vec<(u64, u64, bool)> = maps
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (range, perms) = (w.next()?, w.next()?);
            if !perms.contains('x') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?, l.ends_with("[vdso]")))
        })
        .collect();
    areas.sort_by_key(|a| !a.2);
    let step = arch::SYSCALL_LEN as usize;
    for (start, end, _) in areas {
        let size = (end - start).min(1 << 20) as usize;
        let mut buf = vec![0u8; size];
        if mem.read_exact_at(&mut buf, start).is_err() {
            continue;
        }
        // x86's `syscall` may sit at any byte; arm64's `svc` is 4-byte aligned.
        let stride = if step == 4 { 4 } else { 1 };
        let found = (0..size.saturating_sub(arch::SYSCALL_INSN.len()))
            .step_by(stride)
            .find(|&i| buf.get(i..i + arch::SYSCALL_INSN.len()) == Some(arch::SYSCALL_INSN));
        if let Some(i) = found {
            return Some(start + i as u64);
        }
    }
    None
}

// ---- the release --------------------------------------------------------------------------------

/// Releases `candidates` in `pid` (see the module's comment). The report's `error` names why
/// nothing (more) could be done: the process as a whole could not be stopped or injected into.
pub fn release(pid: u32, candidates: &[Candidate], limits: Limits) -> ReleaseReport {
    let mut report = ReleaseReport { placeholder: PLACEHOLDER, ..ReleaseReport::default() };
    if let Err(why) = release_into(pid, candidates, limits, &mut report) {
        report.error = Some(why);
    }
    report
}

fn release_into(pid: u32, candidates: &[Candidate], limits: Limits, report: &mut ReleaseReport) -> Result<(), String> {
    if candidates.is_empty() {
        return Ok(());
    }
    let flag = interrupted();
    flag.store(false, Ordering::Relaxed);

    // Seccomp: an injected call that the filter kills would kill the process. Suspend the filter
    // for the injection (needs CAP_SYS_ADMIN), or refuse.
    let seccomp = tids(pid)
        .unwrap_or_default()
        .iter()
        .filter_map(|t| status_field(&format!("/proc/{pid}/task/{t}/status"), "Seccomp"))
        .any(|s| s != "0");
    let mut options = PTRACE_O_TRACESYSGOOD;
    if seccomp {
        if !may_suspend_seccomp() {
            return Err("it runs under seccomp: an injected call its filter forbids could kill it, and suspending \
                 the filter for keepfix's calls (PTRACE_O_SUSPEND_SECCOMP) needs CAP_SYS_ADMIN (root) and keepfix \
                 not under seccomp itself; nothing was stopped"
                .into());
        }
        options |= PTRACE_O_SUSPEND_SECCOMP;
        report.seccomp_suspended = true;
    }

    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("cannot open /proc/{pid}/mem: {e}"))?;
    let pidfd = Pid::from_raw(pid as i32)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
        .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).map_err(errno))
        .map_err(|e| format!("pidfd_open: {e}"))?;

    let shared = shared(pid, candidates);
    let mut todo: std::collections::VecDeque<Candidate> = std::collections::VecDeque::new();
    for c in candidates {
        let skip = |reason| Skipped { fd: c.fd, peer: c.peer.clone(), reason };
        match (shared.get(&c.inode), cloexec(pid, c.fd)) {
            (Some(why), _) => report.skipped.push(skip(format!("{why}: releasing this number would not free it"))),
            (None, Err(e)) => report.skipped.push(skip(format!("cannot read its fd flags: {e}"))),
            (None, Ok(cloexec)) => todo.push_back(Candidate { cloexec, ..c.clone() }),
        }
    }

    tidy();
    // A thread in D state (uninterruptible: a vfork parent, a hung NFS call) does not stop until
    // it leaves it: do not begin while one stays in it for 100 ms (a disk wait passes sooner).
    // One that enters it just after this look is waited for (`stop_timeout`), then given up on.
    let in_d = || {
        tids(pid).unwrap_or_default().into_iter().find(|tid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
            stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('D'))
        })
    };
    for look in 0.. {
        match in_d() {
            None => break,
            Some(tid) if look >= 20 => {
                return Err(format!(
                    "thread {tid} is in D state (uninterruptible sleep: it would not stop for ptrace); nothing \
                     was stopped or changed; try again later"
                ));
            }
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }

    let mut vdso = None;
    while !todo.is_empty() {
        if flag.load(Ordering::Relaxed) {
            report.interrupted = true;
            break;
        }
        let mut stop = match Stop::begin(pid, options, &limits) {
            Ok(s) => s,
            Err(Refused(why)) => {
                let why = if seccomp && why.contains("EPERM") {
                    format!(
                        "{why}; it runs under seccomp and suspending the filter for the injected calls \
                         (PTRACE_O_SUSPEND_SECCOMP) needs root"
                    )
                } else {
                    why
                };
                return Err(why);
            }
        };
        let result = batch(&stop, &mem, &pidfd, &mut todo, report, &limits, &mut vdso);
        stop.end_quietly();
        let took = stop.started.elapsed();
        report.stops += 1;
        report.threads = report.threads.max(stop.threads.len());
        let us = took.as_micros() as u64;
        report.longest_stop_us = report.longest_stop_us.max(us);
        report.total_stop_us += us;
        result?;
        if !todo.is_empty() {
            // Let the process run about as long as it was stopped before the next batch.
            std::thread::sleep(took.max(Duration::from_millis(2)));
        }
    }
    if flag.load(Ordering::Relaxed) {
        report.interrupted = true;
    }
    Ok(())
}

/// One batch, under `stop`: as many candidates as fit in the stop's budget (at least one).
fn batch(
    stop: &Stop,
    mem: &File,
    pidfd: &OwnedFd,
    todo: &mut std::collections::VecDeque<Candidate>,
    report: &mut ReleaseReport,
    limits: &Limits,
    vdso: &mut Option<Option<u64>>,
) -> Result<(), String> {
    let pid = stop.pid;
    // The injector: a thread with no call to restart if there is one (it is let go from its
    // syscall-exit stop directly), with an instruction found near its pc if possible.
    let mut order: Vec<&Thread> = stop.threads.iter().collect();
    order.sort_by_key(|t| restart_pending(&t.restore));
    let mut chosen = None;
    for t in order {
        if let Some(insn) = find_insn(pid, mem, &t.regs, vdso) {
            chosen = Some((t, insn));
            break;
        }
    }
    let Some((thread, insn)) = chosen else {
        return Err("no system call instruction found in its memory".into());
    };
    let inj = Injector { tid: thread.tid, mem, insn, base: thread.regs };

    // Block every signal in the injector meanwhile (SIGKILL cannot be): a signal arriving now
    // stays pending, and is delivered after the restore as if keepfix had not been there.
    let mut sigmask: u64 = 0;
    ptrace(PTRACE_GETSIGMASK, inj.tid, 8, (&raw mut sigmask) as usize)
        .map_err(|e| format!("PTRACE_GETSIGMASK: {e}"))?;
    let all: u64 = !0;
    ptrace(PTRACE_SETSIGMASK, inj.tid, 8, (&raw const all) as usize).map_err(|e| format!("PTRACE_SETSIGMASK: {e}"))?;
    // While the injector's registers are keepfix's, keepfix dying (SIGKILL, the OOM killer) would
    // let it run on with them: a program that continues with wrong registers may write wrong
    // bytes anywhere. PTRACE_O_EXITKILL kills the process instead, for that window only.
    let _ = ptrace(PTRACE_SETOPTIONS, inj.tid, 0, stop.options | PTRACE_O_EXITKILL);

    // Scratch memory for socketpair's two ints: below the thread's stack pointer, past the red
    // zone (128 bytes on x86_64), saved and written back.
    let scratch = (thread.regs.sp().wrapping_sub(256)) & !15;
    let saved = inj.peek(scratch);
    let mut outcome = match &saved {
        Ok(_) => inject_batch(&inj, scratch, Work { pid, pidfd, todo, report, limits, started: stop.started }),
        Err(e) => Err(format!("cannot read its stack at {scratch:#x}: {e}")),
    };

    // Restore: scratch bytes, signal mask, registers; then let the injector go.
    if let Ok(bytes) = saved
        && let Err(e) = inj.poke(scratch, bytes)
    {
        outcome = outcome.and(Err(format!("could not write its stack back at {scratch:#x}: {e}")));
    }
    let _ = ptrace(PTRACE_SETSIGMASK, inj.tid, 8, (&raw const sigmask) as usize);
    match arch::set_regs(inj.tid, &thread.restore) {
        Ok(()) => {
            let _ = ptrace(PTRACE_SETOPTIONS, inj.tid, 0, stop.options);
        }
        Err(e) => outcome = outcome.and(Err(format!("could not restore the registers of thread {}: {e}", inj.tid))),
    }
    if restart_pending(&thread.restore) {
        // The kernel restarts an interrupted call only on its way out of its signal code: bring
        // the thread back into a stop there (PTRACE_INTERRUPT), so that the detach (end_quietly)
        // lets it go from where the kernel restarts the call, or delivers a pending signal. (A
        // detach also sends the thread through that code on the kernels seen so far, 6.x:
        // __ptrace_unlink wakes it with TIF_SIGPENDING; keepfix does not rely on that.)
        let _ = ptrace(PTRACE_INTERRUPT, inj.tid, 0, 0);
        let _ = ptrace(PTRACE_CONT, inj.tid, 0, 0);
        while let Ok(Some(status)) = wait(inj.tid, true) {
            match event(status) {
                Event::Stop { .. } | Event::Gone => break,
                Event::Signal(sig) => {
                    let _ = ptrace(PTRACE_CONT, inj.tid, 0, sig as usize);
                }
                Event::Syscall => {
                    let _ = ptrace(PTRACE_CONT, inj.tid, 0, 0);
                }
            }
        }
    }
    outcome
}

/// What one batch works through: the process, what is left to do, and the report.
struct Work<'a> {
    pid: u32,
    pidfd: &'a OwnedFd,
    todo: &'a mut std::collections::VecDeque<Candidate>,
    report: &'a mut ReleaseReport,
    limits: &'a Limits,
    started: Instant,
}

/// The injected calls of one batch: the placeholder, one dup3 per candidate, its close.
fn inject_batch(inj: &Injector, scratch: u64, work: Work) -> Result<(), String> {
    let pid = work.pid;
    let io = |e: io::Error| format!("injection failed: {e}");
    let socketpair = |inj: &Injector| {
        inj.call(
            arch::NR_SOCKETPAIR,
            [libc::AF_UNIX as u64, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64, 0, scratch, 0, 0],
        )
    };
    let mut r = socketpair(inj).map_err(io)?;
    // At its fd limit the process has no two free numbers: raise its soft limit by two for the
    // placeholder's life (keepfix's own prlimit, no injection), then put it back.
    let mut old_limit = None;
    if r == -i64::from(libc::EMFILE) {
        // SAFETY: prlimit reads and writes one rlimit each.
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut l) } == 0
            && l.rlim_cur != libc::RLIM_INFINITY
        {
            // Every number below the soft limit is taken (some above it may be too, opened before
            // a lower limit was set): the new limit is just past the first two free numbers.
            let open: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
                .unwrap_or_default();
            let soft = (l.rlim_cur..).filter(|n| !open.contains(n)).nth(1).map_or(l.rlim_cur + 2, |n| n + 1);
            let raised = libc::rlimit { rlim_cur: soft, rlim_max: l.rlim_max.max(soft) };
            // SAFETY: as above.
            if unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &raised, std::ptr::null_mut()) } == 0 {
                old_limit = Some(l);
                r = socketpair(inj).map_err(io)?;
            } else {
                let e = io::Error::last_os_error();
                return Err(format!(
                    "it is at its fd limit (RLIMIT_NOFILE {}, hard {}) and the placeholder needs two free numbers \
                     for a moment: raising the limit to {soft} failed ({e}; above the hard limit that takes \
                     CAP_SYS_RESOURCE); raise its hard limit (prlimit --pid PID --nofile=SOFT:HARD) and retry",
                    l.rlim_cur, l.rlim_max
                ));
            }
        }
    }
    let result = if r != 0 {
        Err(format!("the placeholder could not be made: socketpair in the process failed: {}", errno_name(-r)))
    } else {
        match inj.peek(scratch) {
            Err(e) => Err(format!("cannot read the placeholder's numbers: {e}")),
            Ok(b) => {
                let sv0 = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                let sv1 = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
                let r = inj.call(arch::NR_CLOSE, [sv1 as u64, 0, 0, 0, 0, 0]).map_err(io);
                let r = r.and_then(|_| dup_all(inj, sv0, work));
                // The placeholder's own number, never one of the program's.
                let closed = inj.call(arch::NR_CLOSE, [sv0 as u64, 0, 0, 0, 0, 0]).map_err(io);
                r.and(closed.map(drop))
            }
        }
    };
    if let Some(l) = old_limit {
        // SAFETY: prlimit reads one rlimit.
        unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &l, std::ptr::null_mut()) };
    }
    result
}

/// dup3(placeholder, N) for each candidate that is still what was decided on, until the stop's
/// budget is spent (at least one is done per batch, so that every batch makes progress).
fn dup_all(inj: &Injector, placeholder: i32, work: Work) -> Result<(), String> {
    let Work { pidfd, todo, report, limits, started, .. } = work;
    // Leave a fifth of the budget for the restore and the detach (0.3 ms measured at 11 threads).
    let budget = limits.max_stop * 4 / 5;
    let mut done = 0;
    while let Some(c) = todo.front().cloned() {
        if done > 0 && (started.elapsed() >= budget || interrupted().load(Ordering::Relaxed)) {
            break;
        }
        todo.pop_front();
        done += 1;
        let skip = |report: &mut ReleaseReport, reason: String| {
            report.skipped.push(Skipped { fd: c.fd, peer: c.peer.clone(), reason });
        };
        // Under the stop: the number still holds the socket decided on, and it is shut down.
        let dup = match rustix::process::pidfd_getfd(pidfd, c.fd, PidfdGetfdFlags::empty()) {
            Ok(d) => d,
            Err(e) => {
                skip(report, format!("the program closed it meanwhile ({})", errno(e)));
                continue;
            }
        };
        match rustix::fs::fstat(&dup) {
            Ok(st) if st.st_ino == c.inode => {}
            _ => {
                skip(report, "the number now holds another file or socket".into());
                continue;
            }
        }
        match tcp_state(&dup) {
            Some(TCP_LAST_ACK | TCP_CLOSE) => {}
            Some(TCP_CLOSE_WAIT) => {
                skip(report, "not shut down (still CLOSE_WAIT)".into());
                continue;
            }
            s => {
                skip(report, format!("TCP state {s:?}: not a shut-down socket"));
                continue;
            }
        }
        let flags = if c.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        no_linger(&dup);
        let r = inj.call(arch::NR_DUP3, [placeholder as u64, c.fd as u64, flags, 0, 0, 0]).map_err(|e| {
            todo.push_front(c.clone());
            format!("injection failed: {e}")
        })?;
        if r == i64::from(c.fd) {
            report.released.push(Released { fd: c.fd, peer: c.peer.clone() });
        } else {
            skip(report, format!("dup3 in the process failed: {}", errno_name(-r)));
        }
        // The socket's last reference: freed now, while the process is stopped, so that its epoll
        // registrations are gone before the program runs again.
        drop(dup);
    }
    Ok(())
}
