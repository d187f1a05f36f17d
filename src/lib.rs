//! libkeepfix.so: a preload library that puts TCP keepalive on every TCP socket of a program it
//! cannot change, tracks those sockets, releases the ones the program leaves in CLOSE_WAIT, and
//! warns before the process runs out of fds.
//!
//! Where things live:
//! - `hooks`: the interposed libc functions, the only code a program calls.
//! - `fdtable`: the lock-free, fd-indexed table of what keepfix knows.
//! - `keepalive`: which sockets are TCP, and setting their options; adoption at load.
//! - `closewait`: finding and releasing sockets the program forgot.
//! - `nofile`: RLIMIT_NOFILE warnings and EMFILE handling.
//! - `watchdog`: the background thread that runs detection, logging and metrics.
//! - `log`, `metrics`: what keepfix tells the operator.
//! - `ownfd`: the few fds keepfix holds itself.
//! - `config`: the KEEPFIX_* variables (shared with the `keepfix` command).
//! - `alloc`: keepfix's own heap (never the program's malloc).
//! - `runtime`: load, fork, vfork and exit. `real`: the real functions. `sys`: raw syscalls.
//!   `addr`: addresses in log lines.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
#![cfg_attr(test, allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing, clippy::panic))]

mod addr;
mod alloc;
mod closewait;
#[allow(clippy::indexing_slicing)]
mod config;
mod fdtable;
mod hooks;
mod keepalive;
mod log;
mod metrics;
mod nofile;
mod ownfd;
mod real;
mod runtime;
mod sys;
mod watchdog;

/// Runs when the library is loaded, before the program's main().
#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = {
    extern "C" fn init() {
        runtime::init();
    }
    init
};

/// Runs at normal exit.
#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = {
    extern "C" fn fini() {
        runtime::fini();
    }
    fini
};
