//! The settings every hook reads, and the process facts they depend on: the configuration
//! (read once at load), whether keepfix is active for this call (initialised, enabled, not
//! sandboxed, not in a vfork child), the pid, and the fork page that tells a _Fork() child from
//! its parent. The bottom of the hook-safe layer: lock-free loads only.

use crate::config::Config;
use crate::sys;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, Ordering::*};
use std::sync::OnceLock;

/// keepfix's keepalive settings, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
    pub user_timeout_ms: Option<u32>,
    pub respect_app: bool,
}

impl Keepalive {
    pub fn from_config(c: &crate::config::Config) -> Keepalive {
        Keepalive {
            idle_s: c.idle_s,
            intvl_s: c.intvl_s,
            cnt: c.cnt,
            user_timeout_ms: c.user_timeout_ms(),
            respect_app: c.respect_app,
        }
    }
}

pub struct Runtime {
    pub cfg: Config,
    pub ka: Keepalive,
    /// The program's name (comm), read at load.
    pub program: String,
}

static RT: OnceLock<Runtime> = OnceLock::new();
/// A page the kernel zeroes in every child (MADV_WIPEONFORK); its first word is FORK_SEEN in a
/// process whose fork handlers ran (or that is not a child), FORK_REPAIRING while a hook repairs
/// a _Fork() child. Null if the kernel lacks MADV_WIPEONFORK (before 4.14).
pub static FORK_PAGE: AtomicPtr<AtomicU32> = AtomicPtr::new(core::ptr::null_mut());
/// The errno of madvise(MADV_WIPEONFORK) when it failed, else 0.
static FORK_PAGE_ERRNO: AtomicI32 = AtomicI32::new(0);
pub const FORK_SEEN: u32 = 1;
pub const FORK_REPAIRING: u32 = 2;
pub static PID: AtomicI32 = AtomicI32::new(0);
/// Threads of this process inside vfork() right now (see the vfork hook).
pub static VFORK_DEPTH: AtomicU32 = AtomicU32::new(0);

/// The program installed a seccomp filter: keepfix makes no system call of its own any more,
/// and every hook passes straight through (see watchdog::pause).
static SANDBOXED: AtomicBool = AtomicBool::new(false);

pub fn sandboxed() -> bool {
    SANDBOXED.load(Relaxed)
}

pub fn set_sandboxed() {
    SANDBOXED.store(true, Release);
}

/// The runtime, if keepfix is active for this call: initialised, enabled, not sandboxed, and not
/// in a vfork child. An acquire load, plus two relaxed ones.
#[inline]
pub fn active() -> Option<&'static Runtime> {
    let rt = RT.get()?;
    if SANDBOXED.load(Relaxed) {
        return None;
    }
    if VFORK_DEPTH.load(Relaxed) != 0 && sys::getpid() != PID.load(Relaxed) {
        return None;
    }
    Some(rt)
}

/// The runtime, for keepfix's own thread.
pub fn get() -> Option<&'static Runtime> {
    RT.get()
}

/// Makes the settings the ones every hook reads; false if they were set already.
pub fn set(rt: Runtime) -> bool {
    RT.set(rt).is_ok()
}

/// The watchdog thread's task id, 0 when none runs (the watchdog sets it).
pub static WATCHDOG_TID: AtomicI32 = AtomicI32::new(0);

/// Is the caller keepfix's watchdog thread?
pub fn on_watchdog_thread() -> bool {
    let t = WATCHDOG_TID.load(Relaxed);
    t != 0 && t == rustix::thread::gettid().as_raw_nonzero().get()
}

/// What a child made without fork handlers runs first (set at load by the lifecycle layer, which
/// owns the repair: it reaches the watchdog's state, above this layer).
static FORK_REPAIR: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

pub fn set_fork_repair(f: fn()) {
    FORK_REPAIR.store(f as *mut (), Release);
}

pub fn map_fork_page() {
    use rustix::mm::{Advice, MapFlags, ProtFlags};
    // SAFETY: a fresh anonymous mapping, never unmapped.
    let Ok(p) = (unsafe {
        rustix::mm::mmap_anonymous(core::ptr::null_mut(), 4096, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)
    }) else {
        return;
    };
    // SAFETY: the mapping just made.
    if let Err(e) = unsafe { rustix::mm::madvise(p, 4096, Advice::LinuxWipeOnFork) } {
        FORK_PAGE_ERRNO.store(e.raw_os_error(), Relaxed);
        // SAFETY: ours, unused.
        let _ = unsafe { rustix::mm::munmap(p, 4096) };
        return;
    }
    let w = p.cast::<AtomicU32>();
    // SAFETY: page-aligned, zeroed, lives for ever.
    unsafe { (*w).store(FORK_SEEN, Release) };
    FORK_PAGE.store(w, Release);
}

/// Why there is no fork page: madvise's errno (EINVAL before Linux 4.14), or `None`.
pub fn fork_page_failed() -> Option<i32> {
    Some(FORK_PAGE_ERRNO.load(Relaxed)).filter(|&e| e != 0)
}

pub fn fork_word() -> Option<&'static AtomicU32> {
    // SAFETY: null, or the page mapped by map_fork_page, never unmapped.
    unsafe { FORK_PAGE.load(Acquire).as_ref() }
}

/// In a child made without fork handlers (_Fork(), a raw fork or clone syscall), repairs the
/// copied state first. Two loads when nothing is to do; hooks that start the watchdog or wait
/// for a release call it.
#[inline]
pub fn check_forked() {
    if let Some(w) = fork_word() {
        if w.load(Acquire) != FORK_SEEN {
            repair_unhandled_fork(w);
        }
    }
}

#[cold]
fn repair_unhandled_fork(w: &AtomicU32) {
    // FORK_REPAIRING: the repair is under way (and may be this thread's own, further up).
    if w.compare_exchange(0, FORK_REPAIRING, AcqRel, Acquire).is_ok() {
        let _errno = sys::ErrnoGuard::save();
        let f = FORK_REPAIR.load(Acquire);
        if !f.is_null() {
            // SAFETY: set_fork_repair stored a `fn()`.
            let f: fn() = unsafe { core::mem::transmute(f) };
            f();
        }
    }
}
