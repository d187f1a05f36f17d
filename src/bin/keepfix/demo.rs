//! `keepfix demo`: what keepfix does for a leaky server, in one command. It compiles the sample
//! server that never close()s a finished connection, runs it twice under `ulimit -n 64` (alone,
//! then with libkeepfix.so in close mode), drives each run with the same load client, measures
//! both with the code of `keepfix status`, and prints the figures side by side.
//!
//! Every child is killed and the temporary directory removed on every way out: errors, Ctrl-C
//! and SIGTERM (a flag the wait loops check), and keepfix itself being killed (the children get
//! SIGKILL through PR_SET_PDEATHSIG).

#[path = "demo/sample.rs"]
mod sample;

use crate::status::{self, Tables};
use crate::{Failure, exit, library, output};
use clap::Args;
use sample::{Interrupt, Programs, Server};
use std::path::Path;
use std::time::{Duration, Instant};

/// The server's fd limit: small, so that the leak shows in seconds.
const NOFILE: u64 = 64;
/// Clients in flight at once, and how long each waits for connect() and for its answer. The run
/// without keepfix, whose clients hang once the fd table is full, ends in about
/// (N - 60) / 16 × 0.3 s.
const PARALLEL: u32 = 16;
const CLIENT_TIMEOUT_MS: u64 = 300;
/// keepfix's settings for the second run: release a socket the first time it is seen in
/// CLOSE_WAIT, and look ten times a second.
const KEEPFIX_ENV: [(&str, &str); 3] =
    [("KEEPFIX_CLOSE_WAIT", "close"), ("KEEPFIX_CLOSE_WAIT_AFTER", "0s"), ("KEEPFIX_SCAN_INTERVAL", "100ms")];
/// keepfix log lines shown: the first of each kind of event, and a few CLOSE_WAIT releases.
const LOG_LINES_SHOWN: usize = 6;
const CLOSE_WAIT_LINES_SHOWN: usize = 2;

/// Show what keepfix does for a server that leaks connections
#[derive(Args)]
#[command(long_about = "Show what keepfix does for a server that never close()s a finished connection.\n\n\
        keepfix compiles two sample programs with gcc in a temporary directory (the leaky server \
        c-tests/leak_eof_server.c and the client c-tests/load_client.c), then runs the server twice \
        with `ulimit -n 64`: once alone, once with libkeepfix.so and KEEPFIX_CLOSE_WAIT=close \
        KEEPFIX_CLOSE_WAIT_AFTER=0s KEEPFIX_SCAN_INTERVAL=100ms. Each run serves N short client \
        sessions. The figures of both runs are printed side by side. With 300 clients it takes about 6 seconds.\n\n\
        Exit 0 when keepfix served every client and left no socket in CLOSE_WAIT, 1 otherwise \
        (or when the demo could not run: gcc missing, ...), 3 when libkeepfix.so is not found.")]
pub struct DemoArgs {
    /// How many client sessions each run serves
    #[arg(long, value_name = "N", default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
}

/// What one run of the server came to.
struct Outcome {
    served: u64,
    close_wait: usize,
    fds_used: usize,
    fd_limit: Option<u64>,
    accept_errors: Option<u64>,
    shut_down: Option<u64>,
    freed: Option<u64>,
    keepfix_log: Vec<String>,
    elapsed: Duration,
}

pub fn demo(args: &DemoArgs) -> Result<u8, Failure> {
    let lib = library::find_or_build()?;
    let interrupt = Interrupt::install()?;
    let clients = args.clients;
    output::line(&format!(
        "keepfix demo: a server that never close()s a finished connection, under `ulimit -n {NOFILE}`,\n\
         serving {clients} clients: first alone, then with keepfix (KEEPFIX_CLOSE_WAIT=close).\n"
    ));
    let programs = Programs::build().or_else(|failure| {
        interrupt.check()?; // Ctrl-C reaches gcc too: say so rather than "gcc failed"
        Err(failure)
    })?;
    output::line(&format!("Compiled leak_eof_server and load_client in {}", programs.dir().display()));

    output::out("Run 1 of 2: leak_eof_server alone ... ");
    let plain = run_once(&programs, None, clients, &interrupt)?;
    output::line(&format!("done in {:.1} s", plain.elapsed.as_secs_f64()));
    output::out("Run 2 of 2: leak_eof_server with keepfix ... ");
    let kept = run_once(&programs, Some(&lib), clients, &interrupt)?;
    output::line(&format!("done in {:.1} s\n", kept.elapsed.as_secs_f64()));

    output::out(&figures(&plain, &kept, clients));
    output::out(&log_excerpt(&kept));
    output::line(&verdict(&plain, &kept, clients));

    if kept.served == u64::from(clients) && kept.close_wait == 0 {
        Ok(exit::OK)
    } else {
        Err(Failure::new(
            exit::FAILED,
            format!(
                "with keepfix the server served {} of {clients} clients and left {} sockets in CLOSE_WAIT; \
                 expected all served and none left",
                kept.served, kept.close_wait
            ),
        ))
    }
}

/// One run: the server (with keepfix if `lib` is given), the clients, then the measurements.
fn run_once(programs: &Programs, lib: Option<&Path>, clients: u32, interrupt: &Interrupt) -> Result<Outcome, Failure> {
    let started = Instant::now();
    let mut env: Vec<(&str, String)> = Vec::new();
    if let Some(lib) = lib {
        env.push(("LD_PRELOAD", lib.display().to_string()));
        env.extend(KEEPFIX_ENV.iter().map(|(k, v)| (*k, v.to_string())));
        // keepfix's own figures (sockets released), read by the code of `keepfix status`.
        env.push(("KEEPFIX_METRICS", programs.dir().display().to_string()));
    }
    let mut server = Server::start(programs, &env, NOFILE, interrupt)?;
    let served = programs.load(server.port(), clients, PARALLEL, CLIENT_TIMEOUT_MS, interrupt)?;

    // keepfix scans every 100 ms: give it a few scans to release what the last clients left,
    // then wait for a metrics file written after that (it is rewritten at every scan).
    let measure = || {
        status::inspect(server.pid(), &mut Tables::new())
            .map_err(|e| Failure::new(exit::FAILED, format!("leak_eof_server: {}", e.message)))
    };
    let mut report = measure()?;
    if lib.is_some() {
        let deadline = Instant::now() + Duration::from_secs(3);
        while report.tcp_states.close_wait > 0 && Instant::now() < deadline {
            interrupt.check()?;
            std::thread::sleep(Duration::from_millis(50));
            report = measure()?;
        }
        let settled = Instant::now();
        let fresh = |r: &status::ProcessStatus| {
            r.keepfix_metrics.as_ref().is_some_and(|m| m.age_seconds < settled.elapsed().as_secs_f64())
        };
        while !fresh(&report) && Instant::now() < deadline {
            interrupt.check()?;
            std::thread::sleep(Duration::from_millis(50));
            report = measure()?;
        }
    }
    let stats = server.stop()?;
    let accept_errors = stats.as_deref().and_then(|s| field(s, "accept_err")).and_then(|v| v.parse().ok());
    Ok(Outcome {
        served,
        close_wait: report.tcp_states.close_wait,
        fds_used: report.fds.used,
        fd_limit: report.fds.soft_limit,
        accept_errors,
        shut_down: report.keepfix_metrics.as_ref().map(|m| m.shut_down),
        freed: report.keepfix_metrics.as_ref().map(|m| m.released),
        keepfix_log: server.stderr_lines().into_iter().filter(|l| l.contains("keepfix[")).collect(),
        elapsed: started.elapsed(),
    })
}

/// The value of `key=` in a `WORD key=value ...` line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The side-by-side table.
fn figures(plain: &Outcome, kept: &Outcome, clients: u32) -> String {
    let fds =
        |o: &Outcome| format!("{} / {}", o.fds_used, o.fd_limit.map_or_else(|| "unlimited".into(), |l| l.to_string()));
    let opt = |v: Option<u64>| v.map_or_else(|| "?".into(), |n| n.to_string());
    let rows = [
        ["".to_string(), "without keepfix".into(), "with keepfix".into()],
        [format!("clients served (of {clients})"), plain.served.to_string(), kept.served.to_string()],
        ["sockets left in CLOSE_WAIT".into(), plain.close_wait.to_string(), kept.close_wait.to_string()],
        ["fds in use / limit".into(), fds(plain), fds(kept)],
        ["accept() errors (EMFILE)".into(), opt(plain.accept_errors), opt(kept.accept_errors)],
        ["sockets keepfix shut down".into(), "-".into(), opt(kept.shut_down)],
        ["fd numbers keepfix freed".into(), "-".into(), opt(kept.freed)],
    ];
    let widths = [rows.iter().map(|r| r[0].len()).max().unwrap_or(0), 15, 12];
    let mut text = String::new();
    for [label, a, b] in &rows {
        text += &format!("  {label:<w0$}  {a:>w1$}  {b:>w2$}\n", w0 = widths[0], w1 = widths[1], w2 = widths[2]);
    }
    text.push('\n');
    text
}

/// A few of keepfix's log lines from the second run: the first line of each kind of event
/// (`keepfix[PID]: KIND ...`), and the first few releases.
fn log_excerpt(kept: &Outcome) -> String {
    if kept.keepfix_log.is_empty() {
        return "keepfix wrote no log lines (is libkeepfix.so the right build?)\n\n".into();
    }
    let mut shown: Vec<&str> = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    let mut close_waits = 0;
    for line in &kept.keepfix_log {
        let kind = line.split_whitespace().nth(1).unwrap_or_default();
        let wanted = if kind == "close_wait" { close_waits < CLOSE_WAIT_LINES_SHOWN } else { !kinds.contains(&kind) };
        if wanted && shown.len() < LOG_LINES_SHOWN {
            close_waits += usize::from(kind == "close_wait");
            kinds.push(kind);
            shown.push(line);
        }
    }
    let mut text =
        format!("keepfix's log (the server's stderr), {} of {} lines:\n", shown.len(), kept.keepfix_log.len());
    for line in shown {
        text += &format!("  {line}\n");
    }
    text.push('\n');
    text
}

/// One sentence on what the operator is seeing.
fn verdict(plain: &Outcome, kept: &Outcome, clients: u32) -> String {
    let all = u64::from(clients);
    if kept.served == all && kept.close_wait == 0 && plain.served < all {
        format!(
            "What you see: alone, the server kept every finished connection open in CLOSE_WAIT until its \
             {NOFILE} fds were gone, then could accept no one ({} of {clients} served); with keepfix, the \
             same unchanged binary served all {clients}, because keepfix found each forgotten socket in \
             CLOSE_WAIT, shut it down, and freed its number once the table ran short (the program had \
             read its EOF: it was done with it).",
            plain.served
        )
    } else if kept.served == all && kept.close_wait == 0 {
        format!(
            "What you see: {clients} clients were too few to exhaust {NOFILE} fds, so both runs served everyone; \
             run with more clients (the default is 300) to see the leak stop the server."
        )
    } else {
        format!(
            "What you see: keepfix did not keep the server going: {} of {clients} served, {} sockets left \
             in CLOSE_WAIT; its log lines above say what it did.",
            kept.served, kept.close_wait
        )
    }
}
