//! The process lifecycle: initialisation at load, fork and vfork, and exit.
//!
//! Load: the constructor reads the configuration once, logs any problem with it, resolves every
//! real function, registers the fork handlers and adopts the TCP sockets already open. Until it
//! has run, and when KEEPFIX_DISABLE=1, every hook passes straight through.
//!
//! fork: the prepare handler advances the fork epoch (sockets seen before may now be shared with a
//! child); the child handler notes its pid, repairs what the copy caught half-way (releases under
//! way, marks of keepfix's fds), and starts the child's watchdog if the parent's was running.
//! _Fork() runs no handlers: a page mapped MADV_WIPEONFORK, which the kernel zeroes in every
//! child, tells the hooks that they run in such a child, and the first to notice does the repairs.
//!
//! exec: sockets inherited at exec are adopted by the constructor; their watchdog starts just
//! before main(), from our `__libc_start_main`, where creating a thread is safe.
//!
//! vfork: the child shares our memory but not our fd table, so its hooks must not touch the table.
//! The vfork hook raises a counter around the real syscall; while it is raised, a hook whose
//! getpid() differs from ours is the child's and passes straight through.

use crate::config::{self, Config};
use crate::{fdtable, hooks, keepalive, log, metrics, nofile, sys, watchdog};
use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, Ordering::*};
use std::sync::OnceLock;

pub struct Runtime {
    pub cfg: Config,
    pub ka: keepalive::Settings,
    /// The program's name (comm), read at load.
    pub program: String,
}

static RT: OnceLock<Runtime> = OnceLock::new();
/// A page the kernel zeroes in every child (MADV_WIPEONFORK); its first word is FORK_SEEN in a
/// process whose fork handlers ran (or that is not a child), FORK_REPAIRING while a hook repairs
/// a _Fork() child. Null if the kernel lacks MADV_WIPEONFORK (before 4.14).
static FORK_PAGE: AtomicPtr<AtomicU32> = AtomicPtr::new(core::ptr::null_mut());
const FORK_SEEN: u32 = 1;
const FORK_REPAIRING: u32 = 2;
static PID: AtomicI32 = AtomicI32::new(0);
/// Threads of this process inside vfork() right now (see the vfork hook).
static VFORK_DEPTH: AtomicU32 = AtomicU32::new(0);

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

/// The constructor's work.
pub fn init() {
    crate::alloc::init();
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
    // Before the KEEPFIX_DISABLE check: a switched-off hook still calls the real function, and
    // must not look it up later (dlsym in a signal handler, or in every forked child).
    hooks::resolve_all();
    if cfg.disable {
        return;
    }
    PID.store(sys::getpid(), Relaxed);
    map_fork_page();
    MAIN_SYM.resolve();
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
    if sandboxed() {
        return;
    }
    watchdog::at_exit();
    if watchdog::ran_here() {
        metrics::remove_at_exit();
    }
}

extern "C" fn atfork_prepare() {
    fdtable::note_fork();
    watchdog::prepare_fork();
}

extern "C" fn atfork_child() {
    if let Some(w) = fork_word() {
        w.store(FORK_REPAIRING, Release);
    }
    repair_child();
}

/// What a child must fix in the state it copied. Async-signal-safe.
fn repair_child() {
    let pid = sys::getpid();
    PID.store(pid, Relaxed);
    log::set_pid(pid);
    log::after_fork_child();
    watchdog::after_fork_child();
    if let Some(w) = fork_word() {
        w.store(FORK_SEEN, Release);
    }
}

fn map_fork_page() {
    use rustix::mm::{Advice, MapFlags, ProtFlags};
    // SAFETY: a fresh anonymous mapping, never unmapped.
    let Ok(p) = (unsafe {
        rustix::mm::mmap_anonymous(core::ptr::null_mut(), 4096, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)
    }) else {
        return;
    };
    // SAFETY: the mapping just made.
    if unsafe { rustix::mm::madvise(p, 4096, Advice::LinuxWipeOnFork) }.is_err() {
        // SAFETY: ours, unused.
        let _ = unsafe { rustix::mm::munmap(p, 4096) };
        return;
    }
    let w = p.cast::<AtomicU32>();
    // SAFETY: page-aligned, zeroed, lives for ever.
    unsafe { (*w).store(FORK_SEEN, Release) };
    FORK_PAGE.store(w, Release);
}

fn fork_word() -> Option<&'static AtomicU32> {
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
        crate::alloc::after_unhandled_fork();
        fdtable::note_fork();
        repair_child();
    }
}

// --- exec: the watchdog of inherited sockets starts before main --------------------------------

type MainFn = unsafe extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) -> c_int;
static MAIN_SYM: crate::real::Sym = crate::real::Sym::new(c"__libc_start_main");
static PROGRAM_MAIN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

/// The program's main(), called through us: every constructor has run, no signal handler of the
/// program's is running, and no other thread exists yet, so starting the watchdog here is safe.
unsafe extern "C" fn main_trampoline(argc: c_int, argv: *mut *mut c_char, envp: *mut *mut c_char) -> c_int {
    if let Some(rt) = active() {
        watchdog::start_if_wanted(rt);
    }
    let p = PROGRAM_MAIN.load(Acquire);
    // SAFETY: the main() the C start-up code handed to __libc_start_main.
    let main: MainFn = unsafe { core::mem::transmute(p) };
    unsafe { main(argc, argv, envp) }
}

/// glibc's start-up entry, called by the program's _start. Only main() is wrapped, and only when
/// sockets were adopted at load; everything is passed on as it came.
#[cfg(not(test))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_start_main(
    main: Option<MainFn>,
    argc: c_int,
    argv: *mut *mut c_char,
    init: *mut c_void,
    fini: *mut c_void,
    rtld_fini: *mut c_void,
    stack_end: *mut c_void,
) -> c_int {
    type StartFn = unsafe extern "C" fn(
        Option<MainFn>,
        c_int,
        *mut *mut c_char,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
    ) -> c_int;
    let real = MAIN_SYM.get();
    if real.is_null() {
        // Cannot happen with glibc; nothing sensible to return to.
        // SAFETY: ends the process.
        unsafe { libc::_exit(127) };
    }
    let mut main = main;
    if let Some(m) = main.filter(|_| watchdog::wanted()) {
        PROGRAM_MAIN.store(m as *mut c_void, Release);
        main = Some(main_trampoline);
    }
    // SAFETY: dlsym found the C library's __libc_start_main.
    let f: StartFn = unsafe { core::mem::transmute(real) };
    unsafe { f(main, argc, argv, init, fini, rtld_fini, stack_end) }
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
