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

pub mod adopt;

use crate::config;
use crate::event::Event;
use crate::hooks;
use crate::hooksafe::settings::{self, FORK_REPAIRING, FORK_SEEN, PID, Runtime, active, fork_word, sandboxed};
use crate::hooksafe::{emfile, fdtable, keepalive, log};
use crate::sys;
use crate::watchdog::{control as watchdog, metrics};
use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicPtr, Ordering::*};
use rustix::process::Resource;

/// The constructor's work.
pub fn init() {
    crate::alloc::init();
    crate::alloc::set_oom_handler(watchdog::out_of_memory);
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
        log::event(&Event::Config(d));
    }
    // Before the KEEPFIX_DISABLE check: a switched-off hook still calls the real function, and
    // must not look it up later (dlsym in a signal handler, or in every forked child).
    hooks::resolve_all();
    if cfg.disable {
        return;
    }
    PID.store(sys::getpid(), Relaxed);
    settings::map_fork_page();
    settings::set_fork_repair(repair_unhandled_fork);
    MAIN_SYM.resolve();
    // SAFETY: plain function pointers with the C signature.
    unsafe { libc::pthread_atfork(Some(atfork_prepare), None, Some(atfork_child)) };
    if cfg.nofile_raise {
        raise_nofile();
    }
    emfile::note_limits();
    let ka = keepalive::Settings::from_config(&cfg);
    let program = rustix::thread::name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !settings::set(Runtime { cfg, ka, program }) {
        return;
    }
    adopt::adopt_inherited(&ka);
}

/// KEEPFIX_NOFILE_RAISE=1: the soft limit goes up to the hard limit at load time.
fn raise_nofile() {
    let l = rustix::process::getrlimit(Resource::Nofile);
    let (Some(soft), hard) = (l.current, l.maximum) else { return };
    let new = hard.unwrap_or(u64::MAX);
    if new <= soft {
        return;
    }
    let r = rustix::process::setrlimit(Resource::Nofile, rustix::process::Rlimit { current: hard, maximum: hard });
    let result = r.map(|()| hard).map_err(|e| e.raw_os_error());
    log::event(&Event::NofileRaise { soft, result });
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

/// A child made without fork handlers (_Fork(), a raw fork or clone syscall): what the fork
/// handlers would have done, run by the first hook that notices (settings::check_forked).
fn repair_unhandled_fork() {
    crate::alloc::after_unhandled_fork();
    fdtable::note_fork();
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
#[cfg(all(any(target_arch = "x86_64", target_arch = "aarch64"), not(test)))]
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
        depth = sym settings::VFORK_DEPTH,
        failed = sym vfork_failed,
    )
}

/// The aarch64 twin of the x86_64 vfork above. aarch64 has no vfork syscall: glibc makes it
/// clone(CLONE_VM | CLONE_VFORK | SIGCHLD) with the caller's stack, as here. The return address
/// is in x30, never on the stack, and the kernel keeps every register but x0 across `svc`, so the
/// parent's x9 (the counter's address) and x30 survive whatever the child did to the stack.
/// The counter moves with exclusive load/store loops (no LSE: any ARMv8.0 core), each followed by
/// a full barrier as x86's `lock` gives. (qemu-user runs CLONE_VFORK as a plain fork: the child
/// then has a copy of the raised counter and passes straight through, which is as safe.)
#[cfg(all(target_arch = "aarch64", not(test)))]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn vfork() -> libc::pid_t {
    core::arch::naked_asm!(
        "adrp x9, {depth}",
        "add x9, x9, :lo12:{depth}",
        "1:",
        "ldxr w10, [x9]",
        "add w10, w10, #1",
        "stxr w11, w10, [x9]",
        "cbnz w11, 1b",
        "dmb ish",
        "mov x0, #0x4111", // CLONE_VM | CLONE_VFORK | SIGCHLD
        "mov x1, xzr",     // the caller's stack
        "mov x2, xzr",
        "mov x3, xzr",
        "mov x4, xzr",
        "mov x8, #220", // SYS_clone
        "svc #0",
        "cbz x0, 2f",
        // The parent: the child has exec'd or exited.
        "3:",
        "ldxr w10, [x9]",
        "sub w10, w10, #1",
        "stxr w11, w10, [x9]",
        "cbnz w11, 3b",
        "dmb ish",
        "cmn x0, #4095",
        "b.hs 4f",
        "2:",
        "ret",
        "4:",
        "neg w0, w0",
        "b {failed}",
        depth = sym settings::VFORK_DEPTH,
        failed = sym vfork_failed,
    )
}
