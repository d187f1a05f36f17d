//! The interposed libc functions: the only code a program calls into.
//!
//! Each hook calls the real function and returns exactly what it returned, with its errno. Around
//! that call it keeps the fd table right and puts keepalive on TCP sockets, using only atomics and
//! raw syscalls (which leave errno alone). The common case (an fd keepfix does not track) costs an
//! atomic load or two. Hooks never lock, never allocate, never log (they defer to the watchdog),
//! and never start the watchdog from a call a signal handler or a vfork child would make.
//!
//! `hooks!` generates, for each function: the exported symbol, the lookup of the real one, and the
//! pass-through used while keepfix is inactive (before the constructor, when disabled, in a vfork
//! child). A symbol missing from the C library makes its hook fail with ENOSYS.

use crate::hooksafe::fdtable::{self, Meta, Role, State, flag};
use crate::hooksafe::keepalive::{self, Opt};
use crate::hooksafe::settings::Runtime;
use crate::hooksafe::{emfile, release};
use crate::sys::{self, errno, set_errno};
use crate::watchdog::control::{self as watchdog, Why};
use core::ffi::{c_int, c_uint, c_void};
use core::sync::atomic::{AtomicI32, Ordering::Relaxed};
use libc::{fd_set, rlimit, sockaddr, socklen_t, timespec, timeval};

macro_rules! hooks {
    ($( fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $imp:path; )*) => {
        mod sym {
            use crate::real::Sym;
            $(
                #[allow(non_upper_case_globals)]
                pub static $name: Sym = Sym::new(match core::ffi::CStr::from_bytes_with_nul(
                    concat!(stringify!($name), "\0").as_bytes()) { Ok(c) => c, Err(_) => panic!() });
            )*
        }

        /// The functions we interpose, as the C library implements them.
        pub mod real {
            use super::*;
            $(
                #[inline]
                pub unsafe fn $name($($arg: $ty),*) -> $ret {
                    let p = sym::$name.get();
                    if p.is_null() {
                        set_errno(libc::ENOSYS);
                        return -1;
                    }
                    // SAFETY: dlsym found the C library's function of this name and signature.
                    let f: unsafe extern "C" fn($($ty),*) -> $ret = unsafe { core::mem::transmute(p) };
                    unsafe { f($($arg),*) }
                }
            )*
        }

        $(
            #[cfg_attr(not(test), unsafe(no_mangle))]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
                match crate::hooksafe::settings::active() {
                    // SAFETY: the program's arguments, passed on as they came.
                    Some(rt) => unsafe { $imp(rt, $($arg),*) },
                    None => unsafe { real::$name($($arg),*) },
                }
            }
        )*

        /// Looks every real function up now, so that no hook ever enters dlsym later.
        pub fn resolve_all() {
            $( sym::$name.resolve(); )*
            SYM_FCNTL.resolve();
            SYM_FCNTL64.resolve();
            SYM_CLOSEFROM.resolve();
            SYM_FCLOSE.resolve();
            SYM_SYSCALL.resolve();
            reads::resolve_all();
            SYM_PRCTL.resolve();
        }
    };
}

hooks! {
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int => on_socket;
    fn listen(fd: c_int, backlog: c_int) -> c_int => on_listen;
    fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => on_accept;
    fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int => on_accept4;
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => on_connect;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int => on_setsockopt;
    fn close(fd: c_int) -> c_int => on_close;
    fn dup(fd: c_int) -> c_int => on_dup;
    fn dup2(old: c_int, new: c_int) -> c_int => on_dup2;
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int => on_dup3;
    fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int => on_close_range;
    fn select(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, t: *mut timeval) -> c_int => on_select;
    fn pselect(n: c_int, r: *mut fd_set, w: *mut fd_set, e: *mut fd_set, t: *const timespec, m: *const libc::sigset_t) -> c_int => on_pselect;
    fn setrlimit(resource: c_int, rlim: *const rlimit) -> c_int => on_setrlimit;
    fn setrlimit64(resource: c_int, rlim: *const rlimit) -> c_int => on_setrlimit64;
    fn prlimit(pid: libc::pid_t, resource: c_int, new: *const rlimit, old: *mut rlimit) -> c_int => on_prlimit;
    fn prlimit64(pid: libc::pid_t, resource: c_int, new: *const rlimit, old: *mut rlimit) -> c_int => on_prlimit64;
    fn fork() -> c_int => on_fork;
    fn unshare(flags: c_int) -> c_int => on_unshare;
    fn setns(fd: c_int, nstype: c_int) -> c_int => on_setns;
    fn capset(hdr: *mut c_void, data: *const c_void) -> c_int => on_capset;
    fn setuid(uid: libc::uid_t) -> c_int => on_setuid;
    fn setgid(gid: libc::gid_t) -> c_int => on_setgid;
    fn seteuid(uid: libc::uid_t) -> c_int => on_seteuid;
    fn setegid(gid: libc::gid_t) -> c_int => on_setegid;
    fn setreuid(r: libc::uid_t, e: libc::uid_t) -> c_int => on_setreuid;
    fn setregid(r: libc::gid_t, e: libc::gid_t) -> c_int => on_setregid;
    fn setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t) -> c_int => on_setresuid;
    fn setresgid(r: libc::gid_t, e: libc::gid_t, s: libc::gid_t) -> c_int => on_setresgid;
    fn setgroups(n: usize, list: *const libc::gid_t) -> c_int => on_setgroups;
    fn initgroups(user: *const core::ffi::c_char, group: libc::gid_t) -> c_int => on_initgroups;
}

// --- Reads: the program seeing the end of a connection ---------------------------------------
//
// A read that returns 0 with room to read, or fails with the error of a dead connection, is the
// one exact sign that the program has seen the end of a connection (the read that returns the
// last data consumes the FIN with it, so an empty receive queue proves nothing). These hooks call
// the real function first, whatever keepfix's state, and look at anything else only when the
// result is <= 0: the common read costs one branch more than libc's (and the lookup of the real
// function).

macro_rules! read_hooks {
    ($( fn $name:ident($fd:ident: c_int $(, $arg:ident: $ty:ty)* $(,)?) room($r:ident) $room:expr; )*) => {
        mod reads {
            use super::*;
            mod sym {
                use crate::real::Sym;
                $(
                    #[allow(non_upper_case_globals)]
                    pub static $name: Sym = Sym::new(match core::ffi::CStr::from_bytes_with_nul(
                        concat!(stringify!($name), "\0").as_bytes()) { Ok(c) => c, Err(_) => panic!() });
                )*
            }
            pub fn resolve_all() {
                $( sym::$name.resolve(); )*
            }
            $(
                #[cfg_attr(not(test), unsafe(no_mangle))]
                pub unsafe extern "C" fn $name($fd: c_int $(, $arg: $ty)*) -> isize {
                    let p = sym::$name.get();
                    if p.is_null() {
                        set_errno(libc::ENOSYS);
                        return -1;
                    }
                    // SAFETY: dlsym found the C library's function of this name and signature;
                    // the program's arguments, passed on as they came.
                    let f: unsafe extern "C" fn(c_int $(, $ty)*) -> isize = unsafe { core::mem::transmute(p) };
                    let $r = unsafe { f($fd $(, $arg)*) };
                    if $r <= 0 && crate::hooksafe::settings::active().is_some() {
                        read_end($fd, $r, $room);
                    }
                    $r
                }
            )*
        }
    };
}

read_hooks! {
    fn read(fd: c_int, buf: *mut c_void, n: usize) room(r) n > 0;
    fn __read_chk(fd: c_int, buf: *mut c_void, n: usize, buflen: usize) room(r) { let _ = (buf, buflen); n > 0 };
    fn readv(fd: c_int, iov: *const libc::iovec, cnt: c_int) room(r) r < 0 || iov_room(iov, cnt);
    fn recv(fd: c_int, buf: *mut c_void, n: usize, flags: c_int) room(r) { let _ = (buf, flags); n > 0 };
    fn __recv_chk(fd: c_int, buf: *mut c_void, n: usize, buflen: usize, flags: c_int) room(r) { let _ = (buf, buflen, flags); n > 0 };
    fn recvfrom(fd: c_int, buf: *mut c_void, n: usize, flags: c_int, a: *mut sockaddr, l: *mut socklen_t) room(r) { let _ = (buf, flags, a, l); n > 0 };
    fn __recvfrom_chk(fd: c_int, buf: *mut c_void, n: usize, buflen: usize, flags: c_int, a: *mut sockaddr, l: *mut socklen_t) room(r) { let _ = (buf, buflen, flags, a, l); n > 0 };
    // SAFETY: the call used this msghdr; reading it is what libc did.
    fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) room(r) { let _ = flags; r < 0 || (!msg.is_null() && iov_room(unsafe { (*msg).msg_iov }, unsafe { (*msg).msg_iovlen } as c_int)) };
}

/// After a read of `fd` that returned `r` (<= 0) with `room` bytes of room: marks a tracked
/// socket whose end the program saw. Leaves errno as the read set it.
#[cold]
fn read_end(fd: c_int, r: isize, room: bool) {
    let end = if r == 0 {
        room
    } else {
        matches!(errno(), libc::ECONNRESET | libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EPIPE)
    };
    if !end {
        return;
    }
    if let Some(s) = fdtable::slot(fd) {
        let m = s.load();
        if m.is_tracked() && !m.has(flag::SAW_EOF) {
            s.set_flags(flag::SAW_EOF, 0);
        }
    }
}

fn iov_room(iov: *const libc::iovec, cnt: c_int) -> bool {
    if iov.is_null() || cnt <= 0 {
        return false;
    }
    // SAFETY: the read succeeded (returned 0) with this iovec array, so the kernel read it.
    (0..cnt as usize).any(|i| unsafe { (*iov.add(i)).iov_len } > 0)
}

// --- Sockets ----------------------------------------------------------------------------------

unsafe fn on_socket(_rt: &'static Runtime, domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    let fd = unsafe { real::socket(domain, ty, protocol) };
    if fd < 0 {
        return fd;
    }
    match keepalive::is_tcp_request(domain, ty, protocol) {
        // Options wait for listen() or connect(): a socket that does neither costs nothing.
        Some(v6) => {
            if let Some(slot) = fdtable::slot_alloc(fd) {
                slot.track(fd, Role::Socket, v6, 0, sys::now_s());
            }
        }
        None => forget(fd),
    }
    fd
}

unsafe fn on_listen(rt: &'static Runtime, fd: c_int, backlog: c_int) -> c_int {
    // Options must be on the listener before connections arrive: accepted sockets copy them when
    // their handshake completes, and then no accept() costs a system call.
    let slot = match fdtable::slot(fd).filter(|s| s.load().is_tracked()) {
        Some(s) => Some(s),
        // A TCP socket keepfix has not seen made (by a raw syscall, say): adopt it now.
        None => sys::borrow(fd)
            .and_then(keepalive::probe_tcp)
            .and_then(|v6| fdtable::slot_alloc(fd).map(|s| (s, v6)))
            .map(|(s, v6)| {
                s.track(fd, Role::Socket, v6, 0, sys::now_s());
                s
            }),
    };
    if let Some(s) = slot {
        if !s.load().has(flag::CONFIGURED) {
            keepalive::configure(fd, s, &rt.ka);
        }
    }
    let r = unsafe { real::listen(fd, backlog) };
    if r == 0 {
        if let Some(s) = slot {
            s.update(|m| (m.is_tracked() && m.role() == Role::Socket).then(|| m.with_role(Role::Listener)));
            watchdog::ensure_started(rt);
            reopen_own_fds(rt);
        }
    }
    r
}

unsafe fn on_accept(rt: &'static Runtime, fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    watchdog::child_accepting(rt);
    let r = unsafe { real::accept(fd, addr, len) };
    if r >= 0 {
        on_accepted(rt, fd, r);
        return r;
    }
    let e = errno();
    if e == libc::EMFILE || e == libc::ENFILE {
        return emfile::accept_failed(rt, fd, e, &mut || unsafe { real::accept(fd, addr, len) }, &|n| {
            on_accepted(rt, fd, n)
        });
    }
    r
}

unsafe fn on_accept4(rt: &'static Runtime, fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    watchdog::child_accepting(rt);
    let r = unsafe { real::accept4(fd, addr, len, flags) };
    if r >= 0 {
        on_accepted(rt, fd, r);
        return r;
    }
    let e = errno();
    if e == libc::EMFILE || e == libc::ENFILE {
        return emfile::accept_failed(rt, fd, e, &mut || unsafe { real::accept4(fd, addr, len, flags) }, &|n| {
            on_accepted(rt, fd, n)
        });
    }
    r
}

/// Tracks a socket accept() returned. Zero system calls when the listener was configured before
/// its connections arrived (keepalive is inherited); otherwise one getsockopt, plus the options
/// when the connection predates them.
fn on_accepted(rt: &'static Runtime, lfd: c_int, nfd: c_int) {
    emfile::saw_fd(nfd);
    let Some((ls, lm)) = fdtable::slot(lfd).map(|s| (s, s.load())).filter(|(_, m)| m.is_tracked()) else {
        forget(nfd);
        return;
    };
    let Some(ns) = fdtable::slot_alloc(nfd) else { return };
    let app = lm.flags() & flag::APP_ANY;
    let inherited = lm.has(flag::CONFIGURED) && !lm.has(flag::CHECK_ACCEPTED);
    let flags = flag::CONNECTED | app | if inherited { flag::CONFIGURED } else { 0 };
    ns.track(nfd, Role::Accepted, lm.v6(), flags, sys::now_s());
    watchdog::child_connection(nfd, ns.load().generation(), true);
    if !inherited {
        if lm.has(flag::CHECK_ACCEPTED) && lm.has(flag::CONFIGURED) && keepalive::has_ours(nfd, &rt.ka, app) {
            // This connection completed its handshake after keepfix configured the listener. The
            // accept queue is FIFO, so every later one did too: stop checking.
            ls.set_flags(0, flag::CHECK_ACCEPTED);
            ns.set_flags(flag::CONFIGURED, 0);
        } else {
            keepalive::configure(nfd, ns, &rt.ka);
        }
    }
    watchdog::ensure_started(rt);
    reopen_own_fds(rt);
}

/// keepfix's thread lost one of its long-lived fds and never opens one itself (ownfd::want_reopen):
/// made again here, in the program's thread, after the program's own call took its number. One
/// relaxed load when nothing is wanted. Leaves errno alone.
#[inline]
fn reopen_own_fds(rt: &'static Runtime) {
    if crate::hooksafe::ownfd::reopen_wanted() {
        reopen_own_fds_now(rt);
    }
}

#[cold]
fn reopen_own_fds_now(rt: &'static Runtime) {
    if crate::hooksafe::ownfd::take_reopen() {
        let _errno = sys::ErrnoGuard::save();
        crate::hooksafe::ownfd::prepare();
        crate::hooksafe::wake::prepare(rt);
        emfile::open_reserve();
    }
}

unsafe fn on_connect(rt: &'static Runtime, fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(s) = fdtable::slot(fd).filter(|s| s.load().is_tracked()) else {
        return unsafe { real::connect(fd, addr, len) };
    };
    if !s.load().has(flag::CONFIGURED) {
        keepalive::configure(fd, s, &rt.ka);
    }
    let r = unsafe { real::connect(fd, addr, len) };
    let e = errno();
    // The kernel read *addr only if it did not fail with EFAULT; look at it only after success.
    let unspec = (r == 0 || e == libc::EINPROGRESS || e == libc::EALREADY)
        && !addr.is_null()
        && len as usize >= core::mem::size_of::<libc::sa_family_t>()
        && i32::from(unsafe { core::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) }) == libc::AF_UNSPEC;
    if unspec {
        // connect(AF_UNSPEC) disconnects: the socket is fresh again.
        if r == 0 {
            s.set_flags(0, flag::CONNECTED | flag::CONNECTING);
        }
    } else if r == 0 {
        s.update(|m| m.is_tracked().then(|| outbound(m).with_flags(flag::CONNECTED, flag::CONNECTING)));
    } else if e == libc::EINPROGRESS {
        s.update(|m| m.is_tracked().then(|| outbound(m).with_flags(flag::CONNECTING, 0)));
    }
    if r == 0 || e == libc::EINPROGRESS {
        watchdog::child_connection(fd, s.load().generation(), false);
    }
    watchdog::ensure_started(rt);
    reopen_own_fds(rt);
    set_errno(e);
    r
}

fn outbound(m: Meta) -> Meta {
    if m.role() == Role::Socket { m.with_role(Role::Outbound) } else { m }
}

unsafe fn on_setsockopt(
    rt: &'static Runtime,
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    let r = unsafe { real::setsockopt(fd, level, name, val, len) };
    let Some(opt) = Opt::of(level, name) else { return r };
    if r != 0 {
        return r;
    }
    let Some(s) = fdtable::slot(fd).filter(|s| s.load().is_tracked()) else { return r };
    // The call succeeded, so the kernel read an int from val: it is valid to read here.
    let value =
        (!val.is_null() && len as usize >= 4).then(|| unsafe { core::ptr::read_unaligned(val.cast::<c_int>()) });
    if rt.ka.respect_app {
        // The program's own settings win, on this socket and on what a listener passes on.
        s.set_flags(opt.app_flag(), 0);
        return r;
    }
    match keepalive::stricter(opt, value, &rt.ka) {
        // The program's value is at least as strict as keepfix's: it stays, here and on what a
        // listener passes on (APP_* flags keep keepfix from setting it again).
        keepalive::Verdict::Program => {
            s.set_flags(opt.app_flag(), 0);
        }
        keepalive::Verdict::Ours => {
            s.set_flags(0, opt.app_flag());
            // keepfix's stricter value goes back on. The program still gets what libc returned.
            let kept = keepalive::reapply(fd, opt, &rt.ka).is_ok();
            if keepalive::first_override(opt) {
                crate::hooksafe::ring::defer(
                    crate::hooksafe::ring::Deferred::AppKeepaliveOff,
                    fd,
                    opt.index(),
                    i64::from(kept),
                );
            }
        }
        keepalive::Verdict::Untouched => {}
    }
    r
}

// --- The fd set -------------------------------------------------------------------------------

/// A number the kernel just handed out for something keepfix does not track: whatever the table
/// remembers of that number is stale.
#[inline]
fn forget(fd: c_int) {
    if let Some(s) = fdtable::slot(fd) {
        if s.load().state() != State::None {
            s.reset();
        }
    }
}

unsafe fn on_close(rt: &'static Runtime, fd: c_int) -> c_int {
    let Some(s) = fdtable::slot(fd) else { return unsafe { real::close(fd) } };
    if s.load().state() == State::None {
        return unsafe { real::close(fd) };
    }
    let saved = errno();
    match before_close(s, fd) {
        Closing::HandedOver => {
            // keepfix is acting on this number right now and will close it when it is done: the
            // program's close has succeeded as far as it can tell.
            set_errno(saved);
            0
        }
        Closing::Vacated => {
            // keepfix closed this number to free an fd; the program closes it now. It succeeds,
            // unless the number holds something new, which is then the program's to close.
            let r = unsafe { real::close(fd) };
            if r == -1 && errno() == libc::EBADF {
                release::note_program_closed(true);
                set_errno(saved);
                return 0;
            }
            r
        }
        Closing::Plain(old) => {
            if old.is_tracked() && old.has(flag::ACTED) && rt.cfg.close_wait.acts() {
                // A number keepfix had shut down: the program's own close, at last.
                release::note_program_closed(false);
            }
            unsafe { real::close(fd) }
        }
    }
}

/// What a close of a number the table knows about must do.
enum Closing {
    /// Call the real close (keepfix's own fd there is given up first: the number is the
    /// program's to close, and keepfix opens its fd again elsewhere when it needs it). The word
    /// the number had.
    Plain(Meta),
    /// keepfix vacated the number: a close that finds nothing there succeeds.
    Vacated,
    /// keepfix is still releasing the number (or using its own fd there) after the bounded
    /// wait: the close was handed over; do not call the real one.
    HandedOver,
}

/// Forgets the number before the program closes it. Async-signal-safe.
fn before_close(s: &'static fdtable::Slot, fd: c_int) -> Closing {
    loop {
        let old = s.claim();
        match old.state() {
            _ if old.is_unsettled() => {
                // keepfix is still acting on the number after the bounded wait. If keepfix's own
                // close of it is done already (its thread stalled before it said so), the number
                // is the program's again: a plain close, which finds nothing (0) or the program's
                // new file.
                if s.holds_acted_object(fd, old) == Some(false) {
                    return Closing::Vacated;
                }
                if s.hand_over_close(old) {
                    return Closing::HandedOver;
                }
            }
            State::Vacated => return Closing::Vacated,
            _ => return Closing::Plain(old),
        }
    }
}

/// Marks `old` shared before it is duplicated, so that keepfix never frees the number of a socket
/// another fd still refers to, and waits longer before shutting it down. Returns its word, if it
/// is tracked.
fn share(old: c_int) -> Option<Meta> {
    let s = fdtable::slot(old)?;
    s.load().is_tracked().then(|| s.set_flags(flag::SHARED, 0)).filter(|m| m.is_tracked())
}

/// Records that `new` now refers to the same socket as `old` (whose word was `m`).
fn copy_entry(old: c_int, new: c_int, m: Option<Meta>) {
    // The old slot is looked up again only for a tracked socket (the common dup is of a file).
    match m.and_then(|m| Some((m, fdtable::slot(old)?))) {
        Some((m, os)) => {
            if let Some(ns) = fdtable::slot_alloc(new) {
                ns.track(new, m.role(), m.v6(), (m.flags() | flag::SHARED) & !flag::WATCHED, os.info().0);
            }
        }
        None => forget(new),
    }
}

unsafe fn on_dup(_rt: &'static Runtime, fd: c_int) -> c_int {
    let m = share(fd);
    let r = unsafe { real::dup(fd) };
    if r >= 0 {
        copy_entry(fd, r, m);
    }
    r
}

/// dup2 and dup3: `new` is replaced, so it is claimed first (after any release on it settles).
/// If keepfix is still acting on `new` after the bounded wait, the call fails with EBUSY (which
/// the kernel's dup2 may return too) rather than race keepfix's close of that number.
fn dup_onto(old: c_int, new: c_int, call: &mut dyn FnMut() -> c_int) -> c_int {
    if old == new {
        return call();
    }
    let m = share(old);
    let ns = fdtable::slot(new);
    let prior = ns.map(|s| s.claim());
    if let (Some(s), Some(p)) = (ns, prior.filter(|p| p.is_unsettled())) {
        // Still acting on it: EBUSY, unless keepfix's close of it is done already (then the
        // number is the program's to fill).
        if s.holds_acted_object(new, p) != Some(false) {
            set_errno(libc::EBUSY);
            return -1;
        }
    }
    let r = call();
    if r < 0 {
        let e = errno();
        if let (Some(s), Some(p)) = (ns, prior) {
            s.unclaim(p);
        }
        set_errno(e);
        return r;
    }
    copy_entry(old, new, m);
    r
}

/// fork(): when it fails with EAGAIN (the program's task limit) while keepfix's thread holds a
/// task, the thread gives it back and the fork is retried once (watchdog::give_way).
unsafe fn on_fork(_rt: &'static Runtime) -> c_int {
    // SAFETY: the real fork().
    let pid = unsafe { real::fork() };
    if pid > 0 {
        watchdog::after_fork_parent();
    }
    if pid >= 0 || errno() != libc::EAGAIN {
        return pid;
    }
    let gave_way = {
        let _errno = sys::ErrnoGuard::save();
        watchdog::give_way()
    };
    if !gave_way {
        return pid;
    }
    // SAFETY: the real fork(), again.
    let pid = unsafe { real::fork() };
    if pid > 0 {
        watchdog::after_fork_parent();
    }
    pid
}

unsafe fn on_dup2(_rt: &'static Runtime, old: c_int, new: c_int) -> c_int {
    dup_onto(old, new, &mut || unsafe { real::dup2(old, new) })
}

unsafe fn on_dup3(_rt: &'static Runtime, old: c_int, new: c_int, flags: c_int) -> c_int {
    dup_onto(old, new, &mut || unsafe { real::dup3(old, new, flags) })
}

// fcntl and fcntl64 are variadic in C. The exported hooks take the third argument as a usize,
// which carries an int, a long or a pointer alike on x86_64 and aarch64 Linux; the real function
// is called through a variadic pointer with that one argument.
static SYM_FCNTL: crate::real::Sym = crate::real::Sym::new(c"fcntl");
static SYM_FCNTL64: crate::real::Sym = crate::real::Sym::new(c"fcntl64");
static SYM_CLOSEFROM: crate::real::Sym = crate::real::Sym::new(c"closefrom");

type VariadicFcntl = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;

unsafe fn call_fcntl(sym: &crate::real::Sym, fd: c_int, cmd: c_int, arg: usize) -> c_int {
    let p = sym.get();
    if p.is_null() {
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: the C library's fcntl, called with the program's arguments.
    let f: VariadicFcntl = unsafe { core::mem::transmute(p) };
    unsafe { f(fd, cmd, arg) }
}

unsafe fn fcntl_hook(sym: &crate::real::Sym, fd: c_int, cmd: c_int, arg: usize) -> c_int {
    let Some(_rt) =
        crate::hooksafe::settings::active().filter(|_| cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC)
    else {
        return unsafe { call_fcntl(sym, fd, cmd, arg) };
    };
    let m = share(fd);
    let r = unsafe { call_fcntl(sym, fd, cmd, arg) };
    if r >= 0 {
        copy_entry(fd, r, m);
    }
    r
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    unsafe { fcntl_hook(&SYM_FCNTL, fd, cmd, arg) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    unsafe { fcntl_hook(&SYM_FCNTL64, fd, cmd, arg) }
}

/// Forgets every known fd in `first..=last` before a close_range/closefrom, and returns the
/// sub-ranges to really close: the range minus the numbers whose close was handed over to
/// keepfix (a release still under way). At most 8 such numbers are split out; past that the rest
/// of the range is left to the handed-over closes' owners... which cannot happen: at most 8
/// releases run at once (fdtable's RELEASING cells) plus keepfix's few own fds.
fn claim_range(first: u32, last: u32) -> ([(u32, u32); 17], usize) {
    // The Own marks decide what is given up: in an unrepaired _Fork() child they may be stale.
    crate::hooksafe::settings::check_forked();
    let mut held = [u32::MAX; 16];
    let mut n_held = 0;
    fdtable::for_each(first as usize, last as usize, |fd, s| {
        if s.load().state() == State::None {
            return;
        }
        if let Closing::HandedOver = before_close(s, fd) {
            if let Some(o) = held.get_mut(n_held) {
                *o = fd as u32;
                n_held += 1;
            }
        }
    });
    let held = held.get_mut(..n_held).unwrap_or(&mut []);
    held.sort_unstable();
    let mut ranges = [(0u32, 0u32); 17];
    let mut n = 0;
    let mut lo = first;
    for &o in held.iter() {
        if o > lo {
            if let Some(r) = ranges.get_mut(n) {
                *r = (lo, o - 1);
                n += 1;
            }
        }
        lo = o.saturating_add(1);
        if o == u32::MAX {
            return (ranges, n);
        }
    }
    if lo <= last {
        if let Some(r) = ranges.get_mut(n) {
            *r = (lo, last);
            n += 1;
        }
    }
    (ranges, n)
}

/// 0 until probed; -1 when close_range works; else its errno.
static CLOSE_RANGE_FAILS: AtomicI32 = AtomicI32::new(0);

/// close_range(2)'s errno where the kernel lacks it (ENOSYS before Linux 5.9) or a seccomp profile
/// refuses it (EPERM), or `None`. Probed at the program's first close_range or closefrom (where it
/// exists, close_range(1, 0) is EINVAL), never before: a profile that kills on it would kill the
/// program for a call it never makes. Async-signal-safe.
fn close_range_fails() -> Option<c_int> {
    let mut v = CLOSE_RANGE_FAILS.load(Relaxed);
    if v == 0 {
        v = match sys::close_range_raw(1, 0, 0) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => -1,
            Err(e) => e.raw_os_error(),
        };
        CLOSE_RANGE_FAILS.store(v, Relaxed);
    }
    (v > 0).then_some(v)
}

unsafe fn on_close_range(_rt: &'static Runtime, first: c_uint, last: c_uint, flags: c_int) -> c_int {
    // CLOSE_RANGE_CLOEXEC closes nothing; a bad range is the kernel's to refuse. Where
    // close_range fails whatever it is given, it closes nothing either: the numbers stay known.
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0 || first > last || close_range_fails().is_some() {
        return unsafe { real::close_range(first, last, flags) };
    }
    let (ranges, n) = claim_range(first, last);
    let mut result = 0;
    for &(lo, hi) in ranges.get(..n).unwrap_or(&[]) {
        let r = unsafe { real::close_range(lo, hi, flags) };
        if r != 0 && result == 0 {
            result = r;
        }
    }
    forget_closed_own(first, last);
    if result != 0 {
        return result;
    }
    if n == 0 {
        // Every fd of the range was handed over: validate the flags as the kernel would.
        return unsafe { real::close_range(last, last, flags | libc::CLOSE_RANGE_CLOEXEC as c_int) }.min(0);
    }
    0
}

/// closefrom(3) never reaches an interposed close() (glibc calls close_range inside), so it is
/// hooked itself: close_range over the sub-ranges claim_range returns, or, where close_range is
/// missing (Linux < 5.9, a seccomp profile without it), keepfix's own walk of /proc/self/fd. It
/// never falls back on the C library's closefrom, whose own walk would close the numbers whose
/// close was handed over to keepfix.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn closefrom(lowfd: c_int) {
    let real_closefrom = |fd: c_int| {
        let p = SYM_CLOSEFROM.get();
        if !p.is_null() {
            // SAFETY: the C library's closefrom.
            let f: unsafe extern "C" fn(c_int) = unsafe { core::mem::transmute(p) };
            unsafe { f(fd) }
        }
    };
    if crate::hooksafe::settings::active().is_none() || lowfd < 0 {
        return real_closefrom(lowfd);
    }
    // Where close_range fails, the C library's closefrom walks /proc/self/fd and leaves errno
    // as close_range set it: so does this one.
    let fails = close_range_fails();
    let mut left = fails.unwrap_or_else(errno);
    let (ranges, n) = claim_range(lowfd as u32, u32::MAX);
    for &(lo, hi) in ranges.get(..n).unwrap_or(&[]) {
        let r = match fails {
            Some(e) => Err(e),
            None => sys::close_range_raw(lo, hi, 0).map_err(|e| e.raw_os_error()),
        };
        if let Err(e) = r {
            left = e;
            closefrom_walk(lo, hi);
        }
    }
    forget_closed_own(lowfd as u32, u32::MAX);
    set_errno(left);
}

/// After a range close: own fds keepfix made in the range after the claim pass were closed too.
fn forget_closed_own(first: u32, last: u32) {
    fdtable::for_each(first as usize, last as usize, |fd, s| {
        if s.load().state() == State::Own {
            s.forget_own_if_closed(fd);
        }
    });
}

/// closefrom without close_range: closes every open fd in `lo..=hi`, as found in /proc/self/fd
/// (read into a stack buffer, again from the start until a pass closes nothing), each after the
/// fd table forgets it. Without /proc, each number up to the soft limit. Allocation-free.
fn closefrom_walk(lo: u32, hi: u32) {
    use rustix::fs::{Mode, OFlags, RawDir};
    let close_one = |fd: u32| {
        if let Some(s) = fdtable::slot(fd as c_int) {
            if s.load().state() != State::None {
                if let Closing::HandedOver = before_close(s, fd as c_int) {
                    return false;
                }
            }
        }
        sys::close_raw(fd as c_int).is_ok()
    };
    let dir = rustix::fs::open("/proc/self/fd", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty());
    let Ok(dir) = dir.map(sys::own) else {
        let (soft, _) = emfile::limits();
        for fd in lo..=hi.min(soft.min(u64::from(u32::MAX)) as u32) {
            close_one(fd);
        }
        return;
    };
    let me = dir.raw() as u32;
    for _pass in 0..64 {
        let mut closed = 0;
        if rustix::fs::seek(dir.as_fd(), rustix::fs::SeekFrom::Start(0)).is_err() {
            break;
        }
        let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut it = RawDir::new(dir.as_fd(), &mut buf);
        while let Some(Ok(ent)) = it.next() {
            let Some(fd) = ent.file_name().to_str().ok().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if fd >= lo && fd <= hi && fd != me && close_one(fd) {
                closed += 1;
            }
        }
        if closed == 0 {
            break;
        }
    }
}

// fclose() closes its fd inside the C library, out of our close(): `fclose(fdopen(sock))` would
// leave the table saying the socket is there. The number is forgotten first, as close() does.
static SYM_FCLOSE: crate::real::Sym = crate::real::Sym::new(c"fclose");

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn fclose(fp: *mut libc::FILE) -> c_int {
    if crate::hooksafe::settings::active().is_some() && !fp.is_null() {
        let saved = errno();
        // SAFETY: the program's FILE, which fclose is about to use too.
        let fd = unsafe { libc::fileno(fp) };
        if let Some(s) = fdtable::slot(fd).filter(|s| s.load().state() != State::None) {
            if let Closing::HandedOver = before_close(s, fd) {
                // The C library closes the number itself, now: keepfix's release must not.
                s.reset();
            }
        }
        set_errno(saved);
    }
    let p = SYM_FCLOSE.get();
    if p.is_null() {
        set_errno(libc::ENOSYS);
        return libc::EOF;
    }
    // SAFETY: the C library's fclose with the program's argument.
    let f: unsafe extern "C" fn(*mut libc::FILE) -> c_int = unsafe { core::mem::transmute(p) };
    unsafe { f(fp) }
}

// syscall(3): a program (or libseccomp, libcap, a language runtime) that makes a system call by
// number still goes through the C library's syscall(), which is interposable. The fd calls are
// routed through their hooks, so the table stays right; everything else goes straight on. The
// exported function takes six fixed word-sized arguments, which is how the variadic ones arrive
// on x86_64 and aarch64 Linux, and forwards all six.
static SYM_SYSCALL: crate::real::Sym = crate::real::Sym::new(c"syscall");

type VariadicSyscall = unsafe extern "C" fn(libc::c_long, ...) -> libc::c_long;

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn syscall(
    n: libc::c_long,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
    f: usize,
) -> libc::c_long {
    let p = SYM_SYSCALL.get();
    if p.is_null() {
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: the C library's syscall(), with the program's arguments.
    let real: VariadicSyscall = unsafe { core::mem::transmute(p) };
    let call = || unsafe { real(n, a, b, c, d, e, f) };
    let Some(rt) = crate::hooksafe::settings::active() else { return call() };
    let r = match n {
        libc::SYS_close => Some(unsafe { on_close(rt, a as c_int) }),
        libc::SYS_close_range => Some(unsafe { on_close_range(rt, a as c_uint, b as c_uint, c as c_int) }),
        libc::SYS_dup => Some(unsafe { on_dup(rt, a as c_int) }),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_dup2 => Some(unsafe { on_dup2(rt, a as c_int, b as c_int) }),
        libc::SYS_dup3 => Some(unsafe { on_dup3(rt, a as c_int, b as c_int, c as c_int) }),
        _ => None,
    };
    if let Some(r) = r {
        return libc::c_long::from(r);
    }
    let why = match n {
        libc::SYS_unshare if unshare_needs_one_thread(a as c_int) => Why::Unshare,
        libc::SYS_setns if setns_needs_one_thread(b as c_int) => Why::Setns,
        libc::SYS_seccomp if installs_seccomp(a) => Why::Seccomp,
        libc::SYS_prctl if a as c_int == libc::PR_SET_SECCOMP && installs_seccomp_prctl(b) => Why::Seccomp,
        libc::SYS_setuid
        | libc::SYS_setgid
        | libc::SYS_setreuid
        | libc::SYS_setregid
        | libc::SYS_setresuid
        | libc::SYS_setresgid
        | libc::SYS_setfsuid
        | libc::SYS_setfsgid
        | libc::SYS_setgroups
        | libc::SYS_capset => Why::Credentials,
        _ => return call(),
    };
    // A filter is in place unless the call failed, or a SECCOMP_FILTER_FLAG_TSYNC call returned
    // the id of a thread it could not synchronise (NEW_LISTENER makes success an fd).
    const TSYNC: usize = 1;
    const NEW_LISTENER: usize = 8;
    let tsync_failed = |r: libc::c_long| n == libc::SYS_seccomp && r > 0 && b & TSYNC != 0 && b & NEW_LISTENER == 0;
    paused(rt, why, call, |&r| r == 0 || (r > 0 && !tsync_failed(r)))
}

// --- Calls keepfix's thread must step aside for -------------------------------------------------
//
// The kernel refuses some calls to a multi-threaded process; some change the calling thread's
// credentials only (keepfix's thread must not keep more than the program's); glibc applies the
// setuid family to every thread and aborts the process if the results differ (keepfix's thread,
// holding no capability, would fail where the caller succeeds); a seccomp filter means keepfix
// makes no system call of its own any more. Each hook ends keepfix's thread first (a bounded
// wait, watchdog::pause), makes the real call, returns its result and errno as they came, and
// starts the thread again afterwards, from the caller (so with its credentials and namespaces),
// except after a seccomp filter took effect.

/// Runs `call` with keepfix's thread out of the way; `took_effect` says whether a seccomp filter
/// is now in place (the call succeeded).
fn paused<R>(rt: &'static Runtime, why: Why, call: impl FnOnce() -> R, took_effect: impl Fn(&R) -> bool) -> R {
    let p = watchdog::pause(rt, why);
    let r = call();
    p.resume(took_effect(&r));
    r
}

/// unshare(2) returns EINVAL to a multi-threaded process for CLONE_NEWUSER (which implies
/// CLONE_THREAD), CLONE_THREAD, CLONE_SIGHAND and CLONE_VM (kernel/fork.c,
/// check_unshare_flags). Namespaces are per thread otherwise: CLONE_NEWNS, CLONE_NEWNET and the
/// rest move the caller alone, and CLONE_FS gives it a copy of its own.
fn unshare_needs_one_thread(flags: c_int) -> bool {
    flags & (libc::CLONE_NEWUSER | libc::CLONE_THREAD | libc::CLONE_SIGHAND | libc::CLONE_VM) != 0
}

/// setns(2) refuses, to a thread that shares its process's filesystem attributes or to a
/// multi-threaded process: a user namespace (EINVAL), a mount namespace (EINVAL: fs_struct shared
/// with keepfix's thread, measured), a time namespace (EUSERS). nstype 0 (any type) and a pidfd's
/// flags may be any of these: keepfix steps aside for them too.
fn setns_needs_one_thread(nstype: c_int) -> bool {
    const CLONE_NEWTIME: c_int = 0x80;
    nstype == 0 || nstype & (libc::CLONE_NEWUSER | libc::CLONE_NEWNS | CLONE_NEWTIME) != 0
}

/// seccomp(2)'s SECCOMP_SET_MODE_STRICT (0) and SECCOMP_SET_MODE_FILTER (1).
fn installs_seccomp(op: usize) -> bool {
    op == 0 || op == 1
}

/// prctl(PR_SET_SECCOMP)'s SECCOMP_MODE_STRICT (1) and SECCOMP_MODE_FILTER (2).
fn installs_seccomp_prctl(mode: usize) -> bool {
    mode == 1 || mode == 2
}

unsafe fn on_unshare(rt: &'static Runtime, flags: c_int) -> c_int {
    let call = || unsafe { real::unshare(flags) };
    if !unshare_needs_one_thread(flags) {
        return call();
    }
    paused(rt, Why::Unshare, call, |_| false)
}

unsafe fn on_setns(rt: &'static Runtime, fd: c_int, nstype: c_int) -> c_int {
    let call = || unsafe { real::setns(fd, nstype) };
    if !setns_needs_one_thread(nstype) {
        return call();
    }
    paused(rt, Why::Setns, call, |_| false)
}

unsafe fn on_capset(rt: &'static Runtime, hdr: *mut c_void, data: *const c_void) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::capset(hdr, data) }, |_| false)
}

unsafe fn on_setuid(rt: &'static Runtime, uid: libc::uid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setuid(uid) }, |_| false)
}

unsafe fn on_setgid(rt: &'static Runtime, gid: libc::gid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setgid(gid) }, |_| false)
}

unsafe fn on_seteuid(rt: &'static Runtime, uid: libc::uid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::seteuid(uid) }, |_| false)
}

unsafe fn on_setegid(rt: &'static Runtime, gid: libc::gid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setegid(gid) }, |_| false)
}

unsafe fn on_setreuid(rt: &'static Runtime, r: libc::uid_t, e: libc::uid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setreuid(r, e) }, |_| false)
}

unsafe fn on_setregid(rt: &'static Runtime, r: libc::gid_t, e: libc::gid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setregid(r, e) }, |_| false)
}

unsafe fn on_setresuid(rt: &'static Runtime, r: libc::uid_t, e: libc::uid_t, s: libc::uid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setresuid(r, e, s) }, |_| false)
}

unsafe fn on_setresgid(rt: &'static Runtime, r: libc::gid_t, e: libc::gid_t, s: libc::gid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setresgid(r, e, s) }, |_| false)
}

unsafe fn on_setgroups(rt: &'static Runtime, n: usize, list: *const libc::gid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::setgroups(n, list) }, |_| false)
}

/// initgroups(3) calls glibc's own setgroups inside the C library, past our hook.
unsafe fn on_initgroups(rt: &'static Runtime, user: *const core::ffi::c_char, group: libc::gid_t) -> c_int {
    paused(rt, Why::Credentials, || unsafe { real::initgroups(user, group) }, |_| false)
}

// prctl(2) is variadic in C. The exported hook takes four unsigned longs after the option, which
// is how the variadic ones arrive on x86_64 and aarch64 Linux, and forwards all four.
static SYM_PRCTL: crate::real::Sym = crate::real::Sym::new(c"prctl");

type VariadicPrctl = unsafe extern "C" fn(c_int, ...) -> c_int;

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn prctl(
    option: c_int,
    a: libc::c_ulong,
    b: libc::c_ulong,
    c: libc::c_ulong,
    d: libc::c_ulong,
) -> c_int {
    let p = SYM_PRCTL.get();
    if p.is_null() {
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: the C library's prctl(), with the program's arguments.
    let real: VariadicPrctl = unsafe { core::mem::transmute(p) };
    let call = || unsafe { real(option, a, b, c, d) };
    match crate::hooksafe::settings::active() {
        Some(rt) if option == libc::PR_SET_SECCOMP && installs_seccomp_prctl(a as usize) => {
            paused(rt, Why::Seccomp, call, |&r| r == 0)
        }
        _ => call(),
    }
}

// --- fd limits --------------------------------------------------------------------------------

unsafe fn on_select(
    _rt: &'static Runtime,
    n: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    t: *mut timeval,
) -> c_int {
    if n > libc::FD_SETSIZE as c_int {
        emfile::select_too_big(n);
    }
    unsafe { real::select(n, r, w, e, t) }
}

unsafe fn on_pselect(
    _rt: &'static Runtime,
    n: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    t: *const timespec,
    m: *const libc::sigset_t,
) -> c_int {
    if n > libc::FD_SETSIZE as c_int {
        emfile::select_too_big(n);
    }
    unsafe { real::pselect(n, r, w, e, t, m) }
}

unsafe fn on_setrlimit(_rt: &'static Runtime, resource: c_int, rlim: *const rlimit) -> c_int {
    let r = unsafe { real::setrlimit(resource, rlim) };
    if r == 0 && resource == libc::RLIMIT_NOFILE as c_int {
        emfile::limit_changed();
    }
    r
}

unsafe fn on_setrlimit64(_rt: &'static Runtime, resource: c_int, rlim: *const rlimit) -> c_int {
    let r = unsafe { real::setrlimit64(resource, rlim) };
    if r == 0 && resource == libc::RLIMIT_NOFILE as c_int {
        emfile::limit_changed();
    }
    r
}

unsafe fn on_prlimit(
    _rt: &'static Runtime,
    pid: libc::pid_t,
    resource: c_int,
    new: *const rlimit,
    old: *mut rlimit,
) -> c_int {
    let r = unsafe { real::prlimit(pid, resource, new, old) };
    if r == 0 && !new.is_null() && resource == libc::RLIMIT_NOFILE as c_int {
        emfile::limit_changed();
    }
    r
}

unsafe fn on_prlimit64(
    _rt: &'static Runtime,
    pid: libc::pid_t,
    resource: c_int,
    new: *const rlimit,
    old: *mut rlimit,
) -> c_int {
    let r = unsafe { real::prlimit64(pid, resource, new, old) };
    if r == 0 && !new.is_null() && resource == libc::RLIMIT_NOFILE as c_int {
        emfile::limit_changed();
    }
    r
}
