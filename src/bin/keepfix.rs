//! The `keepfix` command: runs a program with libkeepfix.so preloaded (`run`), shows what a running
//! process does with its fds and TCP sockets (`status`), validates the KEEPFIX_* environment
//! (`check`), shows keepfix at work on a leaky server (`demo`), and rescues a running process from
//! outside (`rescue`).
//!
//! It shares the library's configuration parser through `#[path]` and never links or loads the
//! library itself. This file owns the command line, the exit codes and the error type; each
//! subcommand lives in its own module.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout, clippy::print_stderr)]

#[path = "../config.rs"]
#[allow(dead_code, clippy::indexing_slicing)]
mod config;

// The crate root is src/bin/keepfix.rs (Cargo.toml's [[bin]]), so the subcommands' modules, in
// src/bin/keepfix/, are named by path.
#[path = "keepfix/check.rs"]
mod check;
#[path = "keepfix/demo.rs"]
mod demo;
#[path = "keepfix/inject.rs"]
mod inject;
#[path = "keepfix/library.rs"]
mod library;
#[path = "keepfix/netcls.rs"]
mod netcls;
#[path = "keepfix/output.rs"]
mod output;
#[path = "keepfix/preflight.rs"]
mod preflight;
#[path = "keepfix/procfs.rs"]
mod procfs;
#[path = "keepfix/prom.rs"]
mod prom;
#[path = "keepfix/rescue.rs"]
mod rescue;
#[path = "keepfix/run.rs"]
mod run;
#[path = "keepfix/status.rs"]
mod status;
#[path = "keepfix/tcp.rs"]
mod tcp;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit codes, the same for every subcommand (see `keepfix --help`).
pub mod exit {
    pub const OK: u8 = 0;
    /// A requested process could not be read, the configuration has errors, or the demo failed.
    pub const FAILED: u8 = 1;
    /// A bad argument or flag value.
    pub const USAGE: u8 = 2;
    /// libkeepfix.so was not found.
    pub const NO_LIBRARY: u8 = 3;
    /// `run`: the program was found but could not be executed.
    pub const CANNOT_EXEC: u8 = 126;
    /// `run`: the program was not found.
    pub const NOT_FOUND: u8 = 127;
}

/// Why a subcommand stopped: the message (printed after `keepfix: `) and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    /// Empty when the subcommand has already said what went wrong.
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    /// A failure whose messages are already on stderr.
    pub fn reported(code: u8) -> Failure {
        Failure { code, message: String::new() }
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    status: a requested process could not be read; check: the configuration has errors;
       demo: keepfix did not fix the leak, or the demo could not run;
       rescue: a process could not be rescued
  2    a bad argument or flag value
  3    libkeepfix.so was not found (set KEEPFIX_LIB to its path)
  126  run: the program could not be executed
  127  run: the program was not found";

#[derive(Parser)]
#[command(
    name = "keepfix",
    version,
    about = "TCP keepalive and CLOSE_WAIT repair for programs you cannot change",
    long_about = "TCP keepalive and CLOSE_WAIT repair for programs you cannot change.\n\n\
        keepfix runs a program with libkeepfix.so preloaded: every TCP socket of the program gets \
        keepalive, and sockets the program forgets in CLOSE_WAIT are found and (if asked) released.",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(Box<run::RunArgs>),
    Status(status::StatusArgs),
    Check(check::CheckArgs),
    Demo(demo::DemoArgs),
    Rescue(Box<rescue::RescueArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args).map(|never| match never {}),
        Command::Status(args) => status::status(&args),
        Command::Check(args) => check::check(&args),
        Command::Demo(args) => demo::demo(&args),
        Command::Rescue(args) => rescue::rescue(&args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            if !failure.message.is_empty() {
                output::error(&failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}
