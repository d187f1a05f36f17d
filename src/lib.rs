//! libkeepfix.so: a preload library that puts TCP keepalive on every TCP socket of a program it
//! cannot change, tracks those sockets, releases the ones the program leaves in CLOSE_WAIT, and
//! warns before the process runs out of fds.
//!
//! The modules form layers; each imports only from the layers below it
//! (scripts/modgraph.py checks that the graph has no cycle):
//!
//! 3. `hooks` (the interposed libc functions: thin shims, the only code a program calls) and
//!    `lifecycle` (load, fork, vfork, exec and exit; adoption of inherited sockets at load).
//! 2. `watchdog`: keepfix's one background thread: the CLOSE_WAIT detector, the fd-limit monitor,
//!    metrics, writing deferred events. May allocate; never runs inside a hook, but for the few
//!    hook-safe entry points of `watchdog::control`.
//! 1. `hooksafe`: the state and operations a hook may touch: settings, the fd table, keepfix's own
//!    fds, the log sink and the deferred-event ring, keepalive options, releases and EMFILE.
//!    Async-signal-safe, allocation-free, lock-free.
//! 0. base: `sys` (raw syscalls), `real` (the real libc functions), `config` (the KEEPFIX_*
//!    parser, shared with the command), `event` (the event vocabulary), `addr`, `alloc`
//!    (keepfix's own heap).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
#![cfg_attr(test, allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing, clippy::panic))]

mod addr;
mod alloc;
#[allow(clippy::indexing_slicing)]
mod config;
mod event;
mod hooks;
mod hooksafe;
mod lifecycle;
mod real;
mod sys;
mod watchdog;

/// Runs when the library is loaded, before the program's main().
#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = {
    extern "C" fn init() {
        lifecycle::init();
    }
    init
};

/// Runs at normal exit.
#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = {
    extern "C" fn fini() {
        lifecycle::fini();
    }
    fini
};
