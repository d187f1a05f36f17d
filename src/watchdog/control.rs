//! The watchdog's control: starting keepfix's one background thread, stepping it aside, ending
//! it, and its main loop (which writes what hooks deferred, watches for CLOSE_WAIT, keeps count of
//! fds against RLIMIT_NOFILE, and writes metrics through the modules below this one).
//!
//! It starts lazily, only in a process that has TCP connections, and never in the constructor
//! (other libraries' constructors may not have run yet): at the first listen(), accept() or
//! connect(); just before main() when sockets were inherited at exec (the `__libc_start_main`
//! hook in lifecycle); and in a forked child (LAZY) only once the child outlives a scan tick or
//! goes back to accept() holding its last connection (see [`child_due`]). pthread_create() is not
//! async-signal-safe, so calls a signal handler typically makes (close, dup, dup2) never start it:
//! one that interrupted malloc() would re-enter it. A child made by _Fork() (no fork handlers) is
//! LAZY too, from the first hook that notices it. It blocks every signal the C library lets it
//! block, so
//! the program's handlers never run on it, and a SIGPIPE from a log write stays pending here. It
//! holds nothing a hook waits on, except the few syscalls of a release (see fdtable).
//!
//! It is a guest of the program's task budget (RLIMIT_NPROC, a cgroup's pids.max): when it cannot
//! be created, keepfix says so once and runs with hooks only; when the program's fork() fails with
//! EAGAIN, the watchdog gives its task to the program (see [`give_way`]); and a forked child gets
//! a watchdog of its own only while the task limit is far away (see [`prepare_fork`]).
//!
//! It needs nothing the program has but its fds and /proc/self: it drops every capability as it
//! starts. It steps aside for calls that need a process without it (see [`pause`]): unshare and
//! setns calls the kernel refuses to a multi-threaded process, credential changes (so that a new
//! thread inherits the caller's), and a seccomp filter (for good: from then on keepfix makes no
//! system call of its own). One protocol ends it in every case: the caller sets STOP to a reason,
//! pokes the futex the thread sleeps on, and waits (at most 250 ms) until the kernel reports the
//! thread's task gone. Each tick it also compares its uid and gid with the thread group
//! leader's: a change made by raw system calls that it did not follow ends it, and the next
//! listen/accept/connect starts a new one, with the caller's credentials.

use crate::event::{Event, Stopped};
use crate::hooksafe::settings::{self, Runtime, WATCHDOG_TID as TID, on_watchdog_thread};
use crate::hooksafe::{emfile, log, ownfd, wake};
use crate::sys;
use crate::watchdog::report::report_deferred;
use crate::watchdog::stats::{CPU_NS, TICK_LAST_NS, TICK_MAX_NS, TICKS, clock_ns};
use crate::watchdog::{detector, metrics, monitor};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering::*};

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const FAILED: u8 = 2;
/// It gave way (fork() needed its task, or its heap ran out): never started again here, nor in a
/// child forked from here.
const STOPPED: u8 = 3;
/// It ended for a call that needed a process without it ([`pause`]), or because its credentials
/// are not the program's any more: it may be started again.
const PAUSED: u8 = 4;
/// A forked child whose parent's watchdog was running: it gets one of its own only when it
/// outlives a scan tick and still uses TCP (see [`child_due`]); until then it costs nothing.
const LAZY: u8 = 5;

/// Why the thread is asked to end (STOP). The larger wins when two ask at once: the permanent
/// reasons over a pause.
const STOP_NONE: u8 = 0;
const STOP_PAUSE: u8 = 1;
const STOP_FORK: u8 = 2;
const STOP_SANDBOX: u8 = 3;

/// What a paused call was: the reason a restarted thread gives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Why {
    Unshare = 1,
    Setns = 2,
    Credentials = 3,
    Seccomp = 4,
    /// The thread found its credentials differ from the thread group leader's.
    CredentialsChanged = 5,
}

impl Why {
    fn name(v: u8) -> &'static str {
        match v {
            1 => "unshare",
            2 => "setns",
            3 => "credentials",
            4 => "seccomp_failed",
            _ => "credentials_changed",
        }
    }
}

static STATE: AtomicU8 = AtomicU8::new(IDLE);
/// Sockets were adopted at load, or the parent's watchdog was running at fork: start it at the
/// next safe point (before main, or in fork()'s child handler).
static WANTED: AtomicBool = AtomicBool::new(false);
/// Someone asked the watchdog to end, and why (STOP_*).
static STOP: AtomicU8 = AtomicU8::new(STOP_NONE);
/// The task id of the thread that ended last: a stopper waits until the kernel has let it go.
static LAST_TID: AtomicI32 = AtomicI32::new(0);
/// Program threads inside a paused call: while any is, no thread is started.
static PAUSERS: AtomicU32 = AtomicU32::new(0);
/// A pause ended a thread (or refused a start) while another pause was still under way: the last
/// one to end starts it again.
static RESTART_PENDING: AtomicBool = AtomicBool::new(false);
/// Why the next thread starts (a `Why`, 0 for the first start): its first line says so.
static RESTART_WHY: AtomicU8 = AtomicU8::new(0);
/// The thread ended because its credentials were not the leader's: a start first checks that the
/// caller's are (else the new thread would end at once, and again at every accept()).
static CRED_CHECK: AtomicBool = AtomicBool::new(false);
/// `watchdog_stopped reason=credentials_changed` was logged.
static CRED_LOGGED: AtomicBool = AtomicBool::new(false);
/// Set by fork()'s prepare handler: the child may start a watchdog of its own.
static CHILD_MAY_START: AtomicBool = AtomicBool::new(true);
/// A `watchdog_unavailable` line was logged for forked children already.
static CHILDREN_LOGGED: AtomicBool = AtomicBool::new(false);
/// When prepare_fork last read the task limit (ms): it reads it at most once a second, so that a
/// fork-per-connection server pays no system call per fork.
static CHILD_CHECKED_MS: AtomicU64 = AtomicU64::new(0);
/// In a LAZY child: the time (ms) from which a hook may start its watchdog.
static LAZY_DUE_MS: AtomicU64 = AtomicU64::new(0);
/// This process is a forked child (its tree's `start` line is its ancestor's).
static IS_CHILD: AtomicBool = AtomicBool::new(false);
/// A watchdog thread ran in this process (it may have written a metrics file).
static RAN_HERE: AtomicBool = AtomicBool::new(false);

/// A watchdog thread has run in this process.
pub fn ran_here() -> bool {
    RAN_HERE.load(Relaxed)
}

pub fn want_start() {
    WANTED.store(true, Relaxed);
}

/// Sockets are waiting for a watchdog to be started at the next safe point.
pub fn wanted() -> bool {
    WANTED.load(Relaxed)
}

/// At a point where creating a thread is safe (not in a signal handler, not inside malloc):
/// starts the watchdog if sockets are waiting for it.
pub fn start_if_wanted(rt: &'static Runtime) {
    if WANTED.swap(false, Relaxed) {
        ensure_started(rt);
    }
}

/// Starts the watchdog if it is not running. One relaxed load when it is.
#[inline]
pub fn ensure_started(rt: &'static Runtime) {
    settings::check_forked();
    match STATE.load(Relaxed) {
        IDLE => start(rt),
        LAZY => child_due(rt),
        _ => {}
    }
}

/// In a forked child that has no watchdog yet (LAZY): starts one once the child has lived a scan
/// tick. Called by listen/accept/connect only: never by read, write, close or dup, which signal
/// handlers call (a SIGIO-driven server reads its sockets in one), where pthread_create() could
/// deadlock on the malloc lock the handler interrupted. One relaxed load anywhere else; here a
/// vDSO clock read, no system call, until it is due.
#[inline]
pub fn child_due(rt: &'static Runtime) {
    if STATE.load(Relaxed) == LAZY && sys::now_ms() >= LAZY_DUE_MS.load(Relaxed) {
        start_child(rt);
    }
}

/// Is this process a forked child without a watchdog yet? One relaxed load.
#[inline]
pub fn is_lazy() -> bool {
    STATE.load(Relaxed) == LAZY
}

/// The last connection a LAZY child connected ([0]) and the last it accepted ([1]): (fd << 32) |
/// generation, or 0. Two words: a prefork proxy's worker connects to its backend after it
/// accepted its client, and must still be seen holding the client when it closed the backend.
static CHILD_CONN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// A LAZY child accepted (`accepted`) or connected `fd` (slot generation `generation`). A
/// _Fork() child is repaired first: its repair clears these words.
#[inline]
pub fn child_connection(fd: i32, generation: u32, accepted: bool) {
    settings::check_forked();
    if is_lazy() {
        if let Some(c) = CHILD_CONN.get(usize::from(accepted)) {
            c.store((u64::from(fd as u32) << 32) | u64::from(generation), Relaxed);
        }
    }
}

/// A LAZY child is about to block in accept(): if it still holds the last connection it accepted
/// or connected (a prefork worker that left it open), it needs a watchdog now, whatever its age:
/// nothing else may run in it for hours. A few loads when it closed them.
#[inline]
pub fn child_accepting(rt: &'static Runtime) {
    // An unrepaired _Fork() child still has its parent's RUNNING: repaired here, it is LAZY.
    settings::check_forked();
    if !is_lazy() {
        return;
    }
    let held = CHILD_CONN.iter().any(|c| {
        let c = c.load(Relaxed);
        let (fd, generation) = ((c >> 32) as i32, c as u32);
        c != 0
            && crate::hooksafe::fdtable::slot(fd).is_some_and(|s| {
                let m = s.load();
                m.is_tracked() && m.generation() == generation
            })
    });
    if held {
        start_child(rt);
    } else {
        child_due(rt);
    }
}

#[cold]
fn start_child(rt: &'static Runtime) {
    if !is_lazy() {
        return;
    }
    let _errno = sys::ErrnoGuard::save();
    // accept() and connect() are async-signal-safe too, and a handler may call them while the
    // thread it interrupted is inside malloc(): pthread_create() would then wait for ever for the
    // arena lock (it callocs the new thread's TLS vector). Not from a handler: a tick later, the
    // next hook tries again.
    if sys::maybe_in_signal_handler() {
        let tick = settings::get().map_or(1000, |rt| rt.cfg.scan_interval_ms.max(1));
        LAZY_DUE_MS.store(sys::now_ms() + tick, Relaxed);
        return;
    }
    // The task limit, as prepare_fork would have checked it: only the parent can give a task back.
    // Read before the state changes: a store of STOPPED after LAZY -> IDLE could overwrite the
    // RUNNING of a thread another hook started meanwhile (from IDLE, without this check), and a
    // pause would then not end that thread before a setuid.
    let far = tasks_far_away();
    if STATE.compare_exchange(LAZY, if far { IDLE } else { STOPPED }, SeqCst, Relaxed).is_err() || !far {
        return;
    }
    start(rt);
}

#[cold]
fn start(rt: &'static Runtime) {
    if settings::sandboxed() || PAUSERS.load(SeqCst) != 0 {
        return;
    }
    let _errno = sys::ErrnoGuard::save();
    if CRED_CHECK.load(Relaxed) && ownfd::leader_ids().is_some_and(|l| l != sys::thread_ids()) {
        // This thread's credentials are not the process's (a raw setresuid of one thread): a
        // thread started from it would end at its first tick. Another caller will start it.
        return;
    }
    if STATE.compare_exchange(IDLE, RUNNING, SeqCst, Relaxed).is_err() {
        return;
    }
    // Paired with pause(): a pauser that came between the check above and the exchange either
    // sees RUNNING (and waits for the thread to end) or is seen here.
    if PAUSERS.load(SeqCst) != 0 {
        STATE.store(IDLE, SeqCst);
        RESTART_PENDING.store(true, Relaxed);
        return;
    }
    CRED_CHECK.store(false, Relaxed);
    // keepfix's long-lived fds are made here, in the program's thread, before the watchdog exists:
    // an open() takes the lowest free number for an instant, which must not race the program's
    // own allocation (a daemon's close(0); open("/dev/null") relies on getting 0).
    ownfd::prepare();
    wake::prepare(rt);
    emfile::open_reserve();
    // SAFETY: plain pthread calls on local storage. The new thread inherits the full signal mask;
    // glibc's pthread_sigmask keeps its own internal signals (cancellation, setxid) unblocked.
    let ok = unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, 256 * 1024);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut t: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut t, &attr, thread_main, rt as *const Runtime as *mut libc::c_void);
        libc::pthread_attr_destroy(&mut attr);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        r
    };
    if ok != 0 {
        STATE.store(FAILED, Relaxed);
        // No thread of ours exists to write it: this is the program's thread, at a safe point
        // (listen, accept, connect, before main, fork's child handler); emit never blocks.
        log::event(&Event::WatchdogUnavailable { errno: ok });
    }
}

/// fork() failed with EAGAIN (RLIMIT_NPROC or pids.max): if the watchdog is running, ends it and
/// waits (up to 250 ms, on this failure path only) until the kernel has given its task back, so
/// that the program's fork() can be retried. From then on this process (and any child it forks)
/// runs with hooks only. Returns true if the task was given back. Called from the program's
/// thread, in the fork hook.
pub fn give_way() -> bool {
    stop_thread(STOP_FORK)
}

/// Asks the running thread to end for `code` and waits (at most 250 ms) until its task is gone.
/// True if a thread was running and is gone now; false if none was running, or it did not end in
/// time (it still ends at its next tick, as asked). Never from the watchdog itself.
fn stop_thread(code: u8) -> bool {
    if on_watchdog_thread() {
        return false;
    }
    // The thread sleeps on a futex that poke() wakes, and its tick is milliseconds: it is gone
    // in well under a millisecond. The bound only keeps a stuck thread from holding the caller.
    let deadline = sys::now_ms() + 250;
    let mut saw_running = false;
    loop {
        match STATE.load(SeqCst) {
            RUNNING => {
                saw_running = true;
                STOP.fetch_max(code, AcqRel);
                wake::poke();
            }
            PAUSED | STOPPED | IDLE if saw_running => {
                let tid = LAST_TID.load(Acquire);
                if tid == 0 || !sys::thread_exists(tid) {
                    return true;
                }
            }
            _ => return false,
        }
        if sys::now_ms() > deadline {
            return false;
        }
        let _ = rustix::thread::nanosleep(&rustix::thread::Timespec { tv_sec: 0, tv_nsec: 200_000 });
    }
}

/// A call that needs keepfix's thread out of the way is under way (see [`pause`]).
pub struct Paused {
    rt: &'static Runtime,
    why: Why,
    /// This pause ended a running thread: it starts one again.
    stopped: bool,
}

/// Before a call that the kernel refuses to a multi-threaded process (unshare(CLONE_NEWUSER),
/// setns into a user or mount namespace), that changes the calling thread's credentials only
/// (capset, raw setresuid), or that glibc applies to every thread and that keepfix's thread,
/// without capabilities, would fail (glibc aborts the process when its threads' results differ),
/// or a seccomp filter: ends keepfix's thread (bounded, as give_way) and keeps it from starting
/// until [`Paused::resume`]. Called from the program's thread, in a hook, where starting a thread
/// afterwards is safe (these are not calls of a signal handler in practice). errno is kept.
pub fn pause(rt: &'static Runtime, why: Why) -> Paused {
    let _errno = sys::ErrnoGuard::save();
    PAUSERS.fetch_add(1, SeqCst);
    let code = if why == Why::Seccomp { STOP_SANDBOX } else { STOP_PAUSE };
    let stopped = stop_thread(code);
    if why == Why::Seccomp && !stopped && STATE.load(Acquire) != RUNNING {
        // No thread of ours to write it: this one, before the filter is in place.
        log_sandboxed();
    }
    Paused { rt, why, stopped }
}

impl Paused {
    /// After the call. `took_effect`: a seccomp filter is in place (keepfix then stays out of the
    /// way for good); ignored for the other calls, after which the thread is started again (with
    /// the caller's credentials and namespaces) if this pause ended it. errno is kept.
    pub fn resume(self, took_effect: bool) {
        let _errno = sys::ErrnoGuard::save();
        if self.why == Why::Seccomp && took_effect {
            settings::set_sandboxed();
        }
        let restart = self.stopped || RESTART_PENDING.swap(false, Relaxed);
        if PAUSERS.fetch_sub(1, SeqCst) != 1 {
            if restart {
                RESTART_PENDING.store(true, Relaxed);
            }
            return;
        }
        if settings::sandboxed() {
            return;
        }
        let _ = STOP.compare_exchange(STOP_PAUSE, STOP_NONE, AcqRel, Relaxed);
        let _ = STOP.compare_exchange(STOP_SANDBOX, STOP_NONE, AcqRel, Relaxed);
        let _ = STATE.compare_exchange(PAUSED, IDLE, SeqCst, Relaxed);
        if matches!(self.why, Why::Unshare | Why::Setns) {
            ownfd::refresh_proc_files();
        }
        if self.why == Why::Credentials {
            // Only from a thread whose credentials are the process's (a raw setresuid of one
            // thread, through syscall(3), leaves the others as they were): else the next
            // listen/accept/connect of such a thread starts it.
            CRED_CHECK.store(true, Relaxed);
        }
        if restart {
            RESTART_WHY.store(self.why as u8, Relaxed);
            ensure_started(self.rt);
        }
    }
}

/// Called before a seccomp filter is installed, by the watchdog or (when it is not running) the
/// hook itself. Once per process.
fn log_sandboxed() {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if LOGGED.swap(true, Relaxed) {
        return;
    }
    log::event(&Event::Sandboxed);
    // keepfix makes no system call from now on: the count of lines held back is said now or never.
    log::flush_suppressed(true);
}

/// Called by fork()'s prepare handler: decides whether the child may start a watchdog of its own.
/// Under a task limit within reach, a child's thread would take a task that the program's next
/// fork() needs, and only the parent's thread can give its task back (give_way). So a child gets
/// one only if RLIMIT_NPROC is unlimited, the real user is root (who is not held to it), or the
/// soft limit is more than twice the number of tasks on the whole system (an upper bound of this
/// user's count) plus 64.
/// The answer is read at most once a second (a vDSO clock read otherwise): a fork-per-connection
/// server pays no system call per fork.
pub fn prepare_fork() {
    if STATE.load(Relaxed) != RUNNING {
        return;
    }
    let now = sys::now_ms();
    if now < CHILD_CHECKED_MS.load(Relaxed) + 1000 && CHILD_CHECKED_MS.load(Relaxed) != 0 {
        return;
    }
    CHILD_CHECKED_MS.store(now, Relaxed);
    CHILD_MAY_START.store(tasks_far_away(), Relaxed);
}

/// RLIMIT_NPROC is unlimited, the real user is root, or the soft limit is more than twice the
/// number of tasks on the whole system plus 64.
fn tasks_far_away() -> bool {
    match rustix::process::getrlimit(rustix::process::Resource::Nproc).current {
        None => true,
        Some(l) => rustix::process::getuid().is_root() || l > 2 * sys::system_tasks() + 64,
    }
}

/// After a successful fork(), in the parent: says once that children run without a watchdog.
pub fn after_fork_parent() {
    if !CHILD_MAY_START.load(Relaxed) && STATE.load(Relaxed) == RUNNING && !CHILDREN_LOGGED.swap(true, Relaxed) {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nproc).current.unwrap_or(0);
        crate::hooksafe::ring::defer(
            crate::hooksafe::ring::Deferred::ChildrenWithoutWatchdog,
            -1,
            limit as i64,
            sys::system_tasks() as i64,
        );
    }
}

/// The heap could not grow. On the watchdog's thread: it stops for good, and the program goes on
/// with hooks only (they never allocate, and wait for nothing the watchdog holds but a release's
/// few syscalls). It cannot unwind out of the allocation, so it sleeps for ever, keeping its task.
/// Elsewhere (the constructor, say) it returns, and Rust aborts as for any failed allocation.
pub fn out_of_memory() {
    if !on_watchdog_thread() {
        return;
    }
    STATE.store(STOPPED, Relaxed);
    log::event(&Event::WatchdogStopped(Stopped::NoMemory {
        heap_mapped: crate::alloc::mapped(),
        heap_limit: crate::alloc::LIMIT,
    }));
    loop {
        let _ = rustix::thread::nanosleep(&rustix::thread::Timespec { tv_sec: 3600, tv_nsec: 0 });
    }
}

extern "C" fn thread_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    TID.store(rustix::thread::gettid().as_raw_nonzero().get(), Relaxed);
    // keepfix acts only on its own process's fds and /proc/self: it needs no capability, and
    // keeps none, whatever the program holds (capset of this thread alone).
    sys::drop_capabilities();
    let _ = rustix::thread::set_name(c"keepfix");
    // SAFETY: the &'static Runtime passed to pthread_create.
    let rt: &'static Runtime = unsafe { &*(arg as *const Runtime) };
    run(rt);
    core::ptr::null_mut()
}

/// In a forked child: the thread did not come along; fork()'s child handler starts a new one
/// (start_if_wanted). Async-signal-safe: a _Fork() child runs it from a hook.
pub fn after_fork_child() {
    // Each store only if it changes something: a page the child does not write stays shared with
    // the parent (no copy-on-write fault), and a fork-per-connection server forks per request.
    macro_rules! set {
        ($a:expr, $v:expr) => {
            if $a.load(Relaxed) != $v {
                $a.store($v, Relaxed);
            }
        };
    }
    set!(TID, 0);
    set!(LAST_TID, 0);
    // No pause of the parent's goes on here: the threads that made them did not come along.
    set!(PAUSERS, 0);
    let pending = RESTART_PENDING.load(Relaxed);
    set!(RESTART_PENDING, false);
    if STOP.load(Relaxed) != STOP_FORK {
        set!(STOP, STOP_NONE);
    }
    set!(IS_CHILD, true);
    set!(RAN_HERE, false);
    for c in &CHILD_CONN {
        set!(c, 0);
    }
    let st = STATE.load(Relaxed);
    if st == RUNNING || (st == PAUSED && !settings::sandboxed()) || (st == IDLE && pending) || st == LAZY {
        if CHILD_MAY_START.load(Relaxed) {
            let tick = settings::get().map_or(1000, |rt| rt.cfg.scan_interval_ms.max(1));
            LAZY_DUE_MS.store(sys::now_ms() + tick, Relaxed);
            set!(STATE, LAZY);
        } else {
            STATE.store(STOPPED, Relaxed);
        }
    }
    // Releases the parent had under way first: the rest may touch those slots.
    crate::hooksafe::fdtable::after_fork_child();
    // The copies of the parent's own fds are closed now, while this child has one thread: the
    // copy of the fd table may name fds the child does not have (opened after it), and a number
    // the program takes later must never be closed as keepfix's. A few system calls; the thread
    // itself waits until the child has work (LAZY).
    settle_inherited_fds();
}

/// Closes what a forked child copied of the parent's own fds (keeping the reserve and the log's
/// fd), before a watchdog of its own makes new ones.
fn settle_inherited_fds() {
    let keep = [emfile::reserve_fd(), log::own_fd()];
    ownfd::after_fork_child(&keep);
    wake::after_fork_child();
}

fn run(rt: &'static Runtime) {
    let cfg = &rt.cfg;
    RAN_HERE.store(true, Relaxed);
    let why = RESTART_WHY.swap(0, Relaxed);
    if why != 0 {
        log::event(&Event::WatchdogRestarted { reason: Why::name(why) });
    } else if !IS_CHILD.load(Relaxed) {
        // A forked child logs only what it does: its tree's `start` line is its ancestor's.
        log::event(&Event::Start(cfg));
        log_degraded();
    }
    let mut detector = detector::Detector::new(rt);
    let mut monitor = monitor::Monitor::new();
    let mut metrics = metrics::Writer::new(rt);
    let interval = cfg.scan_interval_ms.max(1);
    let mut next = sys::now_ms();
    let mut poked = false;
    let mut next_cred_check = 0;
    loop {
        let stop = STOP.load(Acquire);
        if stop != STOP_NONE {
            report_deferred();
            match stop {
                STOP_FORK => log::event(&Event::WatchdogStopped(Stopped::ForkEagain)),
                STOP_SANDBOX => log_sandboxed(),
                _ => {}
            }
            end_thread(if stop == STOP_FORK { STOPPED } else { PAUSED });
            return;
        }
        // At most every 250 ms: reading /proc/self/status takes the program's mmap lock, and
        // poked ticks (a nearly full fd table) can come every millisecond.
        if sys::now_ms() >= next_cred_check && {
            next_cred_check = sys::now_ms() + 250;
            credentials_differ()
        } {
            report_deferred();
            if !CRED_LOGGED.swap(true, Relaxed) {
                log::event(&Event::WatchdogStopped(Stopped::CredentialsChanged));
            }
            CRED_CHECK.store(true, Relaxed);
            RESTART_WHY.store(Why::CredentialsChanged as u8, Relaxed);
            end_thread(IDLE);
            return;
        }
        let now = sys::now_ms();
        report_deferred();
        if now >= next || poked {
            let t0 = clock_ns(rustix::time::ClockId::Monotonic);
            detector.repair();
            detector.tick(now);
            monitor.tick(rt, now, interval);
            emfile::open_reserve();
            let took = clock_ns(rustix::time::ClockId::Monotonic).saturating_sub(t0);
            TICKS.fetch_add(1, Relaxed);
            TICK_LAST_NS.store(took, Relaxed);
            TICK_MAX_NS.fetch_max(took, Relaxed);
            CPU_NS.store(clock_ns(rustix::time::ClockId::ThreadCPUTime), Relaxed);
            metrics.write(&detector, now);
            log::flush_suppressed(false);
            next = now + interval;
        }
        poked = detector.wait(next.saturating_sub(sys::now_ms()).max(1));
    }
}

/// After a process's first start line (not again in the forked children of one that said it): one
/// line per kernel feature keepfix goes without (README, "Old kernels").
fn log_degraded() {
    static SAID: AtomicBool = AtomicBool::new(false);
    if SAID.swap(true, Relaxed) {
        return;
    }
    let notes = [
        (
            "pwritev2",
            log::nowait_failed().filter(|&e| e == libc::ENOSYS),
            "no pwritev2 (Linux < 4.6): log lines go out with write() once poll says there is room; another writer filling the pipe in between can make keepfix's thread wait",
        ),
        (
            "MADV_WIPEONFORK",
            settings::fork_page_failed(),
            "(Linux < 4.14) a child made without fork handlers (a raw fork or clone system call, _Fork) is not noticed and keeps its parent's state; fork() children are not affected",
        ),
    ];
    for (feature, failed, note) in notes {
        if let Some(errno) = failed {
            log::event(&Event::Degraded { feature, errno, note });
        }
    }
}

/// The thread's last act: says it is gone, as `state`.
fn end_thread(state: u8) {
    LAST_TID.store(TID.load(Relaxed), Release);
    TID.store(0, Release);
    STATE.store(state, SeqCst);
}

/// Are this thread's uid or gid (real, effective, saved) not the thread group leader's any more?
/// One pread of /proc/self/status (the leader's) and two raw syscalls a tick.
fn credentials_differ() -> bool {
    ownfd::leader_ids().is_some_and(|l| l != sys::thread_ids())
}

/// At exit (the destructor): log what is still deferred.
pub fn at_exit() {
    // Under the program's seccomp filter keepfix makes no system call, not even at exit.
    if settings::get().is_some() && !settings::sandboxed() {
        report_deferred();
        log::flush_suppressed(true);
    }
}
