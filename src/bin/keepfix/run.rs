//! `keepfix run`: validates the flags and the KEEPFIX_* environment with the library's own parser,
//! sets the variables, adds libkeepfix.so to LD_PRELOAD and execs the program, so that its pid is
//! the one `keepfix run` was started as.

use crate::config;
use crate::{Failure, exit, library, output};
use clap::Args;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Run a program with keepfix
#[derive(Args)]
#[command(
    long_about = "Run PROGRAM with libkeepfix.so preloaded.\n\n\
        Each flag sets the KEEPFIX_* variable of the same name (flags override the environment). \
        keepfix checks every value first: a bad flag stops it (exit 2); a bad KEEPFIX_* variable \
        already in the environment is reported, and the library uses its default. Then keepfix \
        adds libkeepfix.so to LD_PRELOAD (keeping the entries already there) and executes the \
        program in its own place: the pid stays the same.\n\n\
        Durations are like 60, 200ms, 1.5s, 10m or 1h (a bare number is seconds).\n\n\
        The library is $KEEPFIX_LIB if set, else libkeepfix.so next to the keepfix executable, \
        else ../lib/keepfix/libkeepfix.so beside it.",
    after_help = "Exit status: the program's own; keepfix's: 2 a bad flag, 3 libkeepfix.so not found, 126 the \
        program cannot be executed, 127 it is not found.\n\n\
        Example:\n  keepfix run --close-wait close --metrics /var/lib/node_exporter -- /usr/sbin/legacyd -f"
)]
pub struct RunArgs {
    /// Idle time before the first keepalive probe (KEEPFIX_IDLE, default 60s)
    #[arg(long, value_name = "DURATION")]
    idle: Option<String>,
    /// Time between probes (KEEPFIX_INTVL, default 10s)
    #[arg(long, value_name = "DURATION")]
    intvl: Option<String>,
    /// Unanswered probes before the connection is dropped (KEEPFIX_CNT, default 6)
    #[arg(long, value_name = "N")]
    cnt: Option<String>,
    /// TCP_USER_TIMEOUT: a duration, auto (idle + intvl x cnt) or off (KEEPFIX_USER_TIMEOUT)
    #[arg(long, value_name = "DURATION|auto|off")]
    user_timeout: Option<String>,
    /// Let the program turn keepalive off on its sockets (KEEPFIX_RESPECT_APP=1)
    #[arg(long)]
    respect_app: bool,
    /// What to do with sockets left in CLOSE_WAIT: off, log, shutdown or close (KEEPFIX_CLOSE_WAIT)
    #[arg(long, value_name = "MODE")]
    close_wait: Option<String>,
    /// How long a socket sits in CLOSE_WAIT before keepfix acts (KEEPFIX_CLOSE_WAIT_AFTER, default 30s)
    #[arg(long, value_name = "DURATION")]
    close_wait_after: Option<String>,
    /// A CLOSE_WAIT socket with unread data: keep it, or drop the data (KEEPFIX_CLOSE_WAIT_UNREAD)
    #[arg(long, value_name = "keep|drop")]
    close_wait_unread: Option<String>,
    /// How often keepfix looks for CLOSE_WAIT and counts fds (KEEPFIX_SCAN_INTERVAL, default 5s)
    #[arg(long, value_name = "DURATION")]
    scan_interval: Option<String>,
    /// Warn when this percent of RLIMIT_NOFILE is in use, or off (KEEPFIX_NOFILE_WARN, default 80)
    #[arg(long, value_name = "PERCENT|off")]
    nofile_warn: Option<String>,
    /// Raise the soft RLIMIT_NOFILE to the hard limit at start (KEEPFIX_NOFILE_RAISE=1)
    #[arg(long)]
    nofile_raise: bool,
    /// Where keepfix logs: stderr, syslog or an absolute file path (KEEPFIX_LOG)
    #[arg(long, value_name = "stderr|syslog|/PATH")]
    log: Option<String>,
    /// Write Prometheus metrics to DIR/keepfix-PID.prom (KEEPFIX_METRICS)
    #[arg(long, value_name = "DIR")]
    metrics: Option<String>,
    /// The program to run and its arguments (after --)
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "PROGRAM")]
    command: Vec<OsString>,
}

/// One flag given on the command line, and the variable it sets.
struct FlagValue {
    flag: &'static str,
    var: &'static str,
    value: String,
}

impl RunArgs {
    /// The flags given, in the order of config::VARIABLES.
    fn flag_values(&self) -> Vec<FlagValue> {
        let switch = |on: bool| on.then(|| "1".to_string());
        let all = [
            ("--idle", "KEEPFIX_IDLE", self.idle.clone()),
            ("--intvl", "KEEPFIX_INTVL", self.intvl.clone()),
            ("--cnt", "KEEPFIX_CNT", self.cnt.clone()),
            ("--user-timeout", "KEEPFIX_USER_TIMEOUT", self.user_timeout.clone()),
            ("--respect-app", "KEEPFIX_RESPECT_APP", switch(self.respect_app)),
            ("--log", "KEEPFIX_LOG", self.log.clone()),
            ("--close-wait", "KEEPFIX_CLOSE_WAIT", self.close_wait.clone()),
            ("--close-wait-after", "KEEPFIX_CLOSE_WAIT_AFTER", self.close_wait_after.clone()),
            ("--close-wait-unread", "KEEPFIX_CLOSE_WAIT_UNREAD", self.close_wait_unread.clone()),
            ("--scan-interval", "KEEPFIX_SCAN_INTERVAL", self.scan_interval.clone()),
            ("--nofile-warn", "KEEPFIX_NOFILE_WARN", self.nofile_warn.clone()),
            ("--nofile-raise", "KEEPFIX_NOFILE_RAISE", switch(self.nofile_raise)),
            ("--metrics", "KEEPFIX_METRICS", self.metrics.clone()),
        ];
        all.into_iter().filter_map(|(flag, var, value)| Some(FlagValue { flag, var, value: value? })).collect()
    }
}

/// Runs the program; returns only on failure.
pub fn run(args: RunArgs) -> Result<Infallible, Failure> {
    let flags = args.flag_values();
    validate(&flags)?;
    let lib = library::find()?;
    let [program, program_args @ ..] = args.command.as_slice() else {
        return Err(Failure::new(exit::USAGE, "no program given: keepfix run [FLAGS] -- PROGRAM [ARGS...]"));
    };
    let mut command = Command::new(program);
    command.args(program_args);
    for f in &flags {
        command.env(f.var, &f.value);
    }
    command.env("LD_PRELOAD", with_preload(std::env::var_os("LD_PRELOAD").as_deref(), &lib));
    let error = command.exec();
    let shown = program.to_string_lossy();
    Err(match error.kind() {
        std::io::ErrorKind::NotFound => {
            let place = if Path::new(program).components().count() > 1 { "" } else { " in PATH" };
            Failure::new(exit::NOT_FOUND, format!("cannot run \"{shown}\": not found{place}"))
        }
        std::io::ErrorKind::PermissionDenied => Failure::new(
            exit::CANNOT_EXEC,
            format!("cannot run \"{shown}\": permission denied (is it an executable file?)"),
        ),
        _ => Failure::new(exit::CANNOT_EXEC, format!("cannot run \"{shown}\": {}", output::io_error(&error))),
    })
}

/// Checks the flags and the KEEPFIX_* environment together, as the library will read them.
/// A flag's error stops `run` (exit 2); everything else is printed as a warning.
fn validate(flags: &[FlagValue]) -> Result<(), Failure> {
    let mut vars: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("KEEPFIX_").then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    for f in flags {
        vars.insert(f.var.to_string(), f.value.clone());
    }
    let (_, diagnostics) = config::parse(|k| vars.get(k).cloned(), vars.keys().map(String::as_str), false);
    let mut errors = Vec::new();
    for d in &diagnostics {
        match flags.iter().find(|f| f.var == d.var) {
            Some(f) if d.warning => {
                output::warning(&format!("{} {} {}; {}", f.flag, config::quote(&f.value), d.problem, d.outcome))
            }
            Some(f) => errors.push(format!("{} {} {}", f.flag, config::quote(&f.value), d.problem)),
            None => output::warning(&d.to_string()),
        }
    }
    if let Some(dir) = flags.iter().find(|f| f.var == "KEEPFIX_METRICS").map(|f| Path::new(&f.value)) {
        if dir.is_absolute() && !dir.is_dir() {
            output::warning(&format!(
                "--metrics \"{}\" is not a directory; keepfix will log that it cannot write there",
                dir.display()
            ));
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    for e in &errors {
        output::error(e);
    }
    Err(Failure::reported(exit::USAGE))
}

/// LD_PRELOAD with the library added after the entries already there (space- or colon-separated),
/// unless it is one of them already. Other entries are kept byte for byte.
fn with_preload(current: Option<&OsStr>, lib: &Path) -> OsString {
    let current = current.map(OsStr::as_bytes).unwrap_or_default();
    let mut entries: Vec<&[u8]> = current.split(|b| *b == b' ' || *b == b':').filter(|e| !e.is_empty()).collect();
    let already = entries
        .iter()
        .map(|e| Path::new(OsStr::from_bytes(e)))
        .any(|e| e == lib || std::fs::canonicalize(e).is_ok_and(|p| p == lib));
    if !already {
        entries.push(lib.as_os_str().as_bytes());
    }
    OsString::from_vec(entries.join(&b':'))
}
