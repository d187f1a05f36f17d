//! The process lifecycle: initialisation at load, fork and vfork, and exit.
//!
//! Load: the constructor reads the configuration once, logs any problem with it, resolves every
//! real function, registers the fork handlers and adopts the TCP sockets already open. Until it
//! has run, and when KEEPFIX_DISABLE=1, every hook passes straight through.
//!
//! fork: the prepare handler advances the fork epoch (sockets seen before may now be shared with a
//! child); the child handler notes its pid and lets its watchdog start again.
//!
//! vfork: the child shares our memory but not our fd table, so its hooks must not touch the table.
//! The vfork hook raises a counter around the real syscall; while it is raised, a hook whose
//! getpid() differs from ours is the child's and passes straight through.

use crate::config::{self, Config};
use crate::{fdtable, hooks, keepalive, log, metrics, nofile, sys, watchdog};
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering::*};
use std::sync::OnceLock;

pub struct Runtime {
    pub cfg: Config,
    pub ka: keepalive::Settings,
    /// The program's name (comm), read at load.
    pub program: String,
}

static RT: OnceLock<Runtime> = OnceLock::new();
static PID: AtomicI32 = AtomicI32::new(0);
/// Threads of this process inside vfork() right now (see the vfork hook).
static VFORK_DEPTH: AtomicU32 = AtomicU32::new(0);

/// The runtime, if keepfix is active for this call: initialised, enabled, and not in a vfork
/// child. An acquire load, plus a relaxed one.
#[inline]
pub fn active() -> Option<&'static Runtime> {
    let rt = RT.get()?;
    if VFORK_DEPTH.load(Relaxed) != 0 && sys::getpid() != PID.load(Relaxed) {
        return None;
    }
    Some(rt)
}

/// The runtime, for keepfix's own thread.
pub fn get() -> Option<&'static Runtime> {
    RT.get()
}

/// The constructor's work.
pub fn init() {
    let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("KEEPFIX_").then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let (cfg, diags) = config::parse(lookup, env.iter().map(|(k, _)| k.as_str()), secure);
    let journal = std::env::var_os("JOURNAL_STREAM");
    log::init(&cfg.log, journal.as_ref().map(|j| j.as_encoded_bytes()));
    for d in &diags {
        let level = if d.warning { log::Level::Warning } else { log::Level::Err };
        log::emit(level, format_args!("{d}"));
    }
    if cfg.disable {
        return;
    }
    PID.store(sys::getpid(), Relaxed);
    hooks::resolve_all();
    // SAFETY: plain function pointers with the C signature.
    unsafe { libc::pthread_atfork(Some(atfork_prepare), None, Some(atfork_child)) };
    if cfg.nofile_raise {
        nofile::raise_at_load();
    }
    let ka = keepalive::Settings::from_config(&cfg);
    let program = rustix::thread::name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if RT.set(Runtime { cfg, ka, program }).is_err() {
        return;
    }
    keepalive::adopt_inherited(&ka);
}

/// The destructor's work, at normal exit: what hooks deferred is written, the metrics file goes.
pub fn fini() {
    watchdog::at_exit();
    metrics::remove_at_exit();
}

extern "C" fn atfork_prepare() {
    fdtable::note_fork();
}

extern "C" fn atfork_child() {
    let pid = sys::getpid();
    PID.store(pid, Relaxed);
    log::set_pid(pid);
    log::after_fork_child();
    watchdog::after_fork_child();
}

/// Called by the vfork hook when the syscall failed in the parent.
#[cfg(all(target_arch = "x86_64", not(test)))]
extern "C" fn vfork_failed(e: core::ffi::c_int) -> libc::pid_t {
    sys::set_errno(e);
    -1
}

/// vfork() itself: the syscall, with VFORK_DEPTH raised until the parent resumes. It cannot be an
/// ordinary function: the child returns into our frame and may reuse the stack before the parent
/// does, so (as glibc does) the return address is kept in a register across the syscall.
#[cfg(all(target_arch = "x86_64", not(test)))]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn vfork() -> libc::pid_t {
    core::arch::naked_asm!(
        "pop rdi",
        "lock inc dword ptr [rip + {depth}]",
        "mov eax, 58", // SYS_vfork
        "syscall",
        "push rdi",
        "test eax, eax",
        "jz 2f",
        // The parent: the child has exec'd or exited.
        "lock dec dword ptr [rip + {depth}]",
        "cmp rax, -4095",
        "jae 3f",
        "2:",
        "ret",
        "3:",
        "neg eax",
        "mov edi, eax",
        "jmp {failed}",
        depth = sym VFORK_DEPTH,
        failed = sym vfork_failed,
    )
}
