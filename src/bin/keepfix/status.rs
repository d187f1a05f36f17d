//! `keepfix status`: per process, fds against RLIMIT_NOFILE, TCP sockets by state, the ones left
//! in CLOSE_WAIT, whether keepfix is loaded, and keepfix's own figures. With no PID, one line per
//! process that has TCP sockets. `inspect` is also what `keepfix demo` measures with.

use crate::prom::{self, KeepfixFigures};
use crate::tcp::{self, Source, TcpTable};
use crate::{Failure, exit, output, procfs};
use clap::Args;
use serde::Serialize;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;

const JSON_FIELDS: &str = "\
JSON (--json): {\"processes\": [PROCESS, ...]}, one PROCESS per PID read, where PROCESS is
  pid               number
  program           string: the process name (comm)
  keepfix_loaded    true, false, or null when /proc/PID/maps cannot be read
  fds               {used, soft_limit, hard_limit}: open fds and RLIMIT_NOFILE (null = unlimited)
  tcp_source        \"sock_diag\", or \"proc_net_tcp\" for a process in another network namespace
  tcp_states        {established, syn_sent, syn_recv, fin_wait1, fin_wait2, time_wait, close,
                     close_wait, last_ack, listen, closing, total}: the process's TCP fds by state
  other_sockets     socket fds in no TCP table: unix, UDP, netlink, and TCP sockets in state CLOSE
  close_wait        [{fd, local, peer, recv_q, send_q}]: each fd in CLOSE_WAIT (queues in bytes)
  keepfix_metrics   null, or keepfix's figures from KEEPFIX_METRICS=DIR/keepfix-PID.prom:
                    {file, age_seconds, close_wait_found, close_wait_held, released (fd numbers
                     freed in close mode), shut_down, emfile_events, fds_used, fds_used_exact (false: fds_used is a lower bound)}";

/// Show fds, TCP socket states and CLOSE_WAIT sockets of processes
#[derive(Args)]
#[command(
    long_about = "Show, for each PID: the program, whether keepfix is loaded in it, fds in use against \
        RLIMIT_NOFILE, its TCP sockets by state, each socket left in CLOSE_WAIT (fd, local and peer \
        address, unread and unsent bytes), and keepfix's own figures when the process writes \
        metrics (KEEPFIX_METRICS).\n\n\
        With no PID: one line per process that has TCP sockets, most CLOSE_WAIT first.\n\n\
        Socket states come from NETLINK_SOCK_DIAG; for a process in another network namespace, \
        from /proc/PID/net/tcp and tcp6. Counts are per fd. Seeing other users' processes needs \
        root.\n\n\
        Exit 0, or 1 when a PID given could not be read (each one is named on stderr).",
    after_help = JSON_FIELDS
)]
pub struct StatusArgs {
    /// Processes to show (default: every process with TCP sockets)
    #[arg(value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pids: Vec<u32>,
    /// Print JSON instead of text (fields below)
    #[arg(long)]
    json: bool,
}

/// Everything `status` reports on one process.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub program: String,
    pub keepfix_loaded: Option<bool>,
    pub fds: FdUse,
    pub tcp_source: Source,
    pub tcp_states: TcpCounts,
    pub other_sockets: usize,
    pub close_wait: Vec<CloseWaitSocket>,
    pub keepfix_metrics: Option<KeepfixFigures>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct FdUse {
    pub used: usize,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
}

/// TCP fds by state.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TcpCounts {
    pub established: usize,
    pub syn_sent: usize,
    pub syn_recv: usize,
    pub fin_wait1: usize,
    pub fin_wait2: usize,
    pub time_wait: usize,
    pub close: usize,
    pub close_wait: usize,
    pub last_ack: usize,
    pub listen: usize,
    pub closing: usize,
    pub total: usize,
}

impl TcpCounts {
    /// Counts one fd in `state` (numbers of include/net/tcp_states.h).
    pub fn add(&mut self, state: u8) {
        let slot = match state {
            1 => &mut self.established,
            2 => &mut self.syn_sent,
            3 | 12 => &mut self.syn_recv,
            4 => &mut self.fin_wait1,
            5 => &mut self.fin_wait2,
            6 => &mut self.time_wait,
            7 => &mut self.close,
            8 => &mut self.close_wait,
            9 => &mut self.last_ack,
            10 => &mut self.listen,
            _ => &mut self.closing,
        };
        *slot += 1;
        self.total += 1;
    }

    /// `ESTABLISHED 2, CLOSE_WAIT 3, LISTEN 1`: the states present.
    pub fn summary(&self) -> String {
        let all = [
            ("ESTABLISHED", self.established),
            ("SYN_SENT", self.syn_sent),
            ("SYN_RECV", self.syn_recv),
            ("FIN_WAIT1", self.fin_wait1),
            ("FIN_WAIT2", self.fin_wait2),
            ("TIME_WAIT", self.time_wait),
            ("CLOSE", self.close),
            ("CLOSE_WAIT", self.close_wait),
            ("LAST_ACK", self.last_ack),
            ("LISTEN", self.listen),
            ("CLOSING", self.closing),
        ];
        let present: Vec<String> = all.iter().filter(|(_, n)| *n > 0).map(|(s, n)| format!("{s} {n}")).collect();
        if present.is_empty() { "none".into() } else { present.join(", ") }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CloseWaitSocket {
    pub fd: i32,
    pub local: String,
    pub peer: String,
    pub recv_q: u32,
    pub send_q: u32,
}

/// Why one process could not be shown.
#[derive(Debug)]
pub struct ProcessError {
    pub kind: io::ErrorKind,
    pub message: String,
}

impl ProcessError {
    fn new(pid: u32, what: &str, e: &io::Error) -> ProcessError {
        let message = match e.kind() {
            io::ErrorKind::NotFound => format!("process {pid}: no such process"),
            io::ErrorKind::PermissionDenied => format!("process {pid}: permission denied (run as its user or root)"),
            _ => format!("process {pid}: cannot read {what}: {}", output::io_error(e)),
        };
        ProcessError { kind: e.kind(), message }
    }
}

/// The TCP tables, read once each: keepfix's own namespace through sock_diag, and others from
/// /proc/PID/net/tcp of a process in them.
pub struct Tables {
    own_namespace: Option<Vec<u8>>,
    own: Option<TcpTable>,
    sock_diag_failed: bool,
    others: HashMap<Vec<u8>, TcpTable>,
}

impl Tables {
    pub fn new() -> Tables {
        Tables {
            own_namespace: procfs::net_namespace(None).ok(),
            own: None,
            sock_diag_failed: false,
            others: HashMap::new(),
        }
    }

    fn for_pid(&mut self, pid: u32) -> io::Result<&TcpTable> {
        let namespace = procfs::net_namespace(Some(pid)).ok();
        let same = namespace.is_some() && namespace == self.own_namespace;
        if same && !self.sock_diag_failed && self.own.is_none() {
            match tcp::sock_diag() {
                Ok(table) => self.own = Some(table),
                Err(e) => {
                    self.sock_diag_failed = true;
                    output::warning(&format!(
                        "NETLINK_SOCK_DIAG failed ({}); reading /proc/PID/net/tcp instead",
                        output::io_error(&e)
                    ));
                }
            }
        }
        if same {
            if let Some(table) = &self.own {
                return Ok(table);
            }
        }
        // Another namespace, or one we cannot name, or sock_diag failed: the process's own view.
        let key = namespace.unwrap_or_else(|| format!("pid:{pid}").into_bytes());
        Ok(match self.others.entry(key) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => slot.insert(tcp::proc_net_tcp(pid)?),
        })
    }
}

/// Reads everything `status` shows about one process.
pub fn inspect(pid: u32, tables: &mut Tables) -> Result<ProcessStatus, ProcessError> {
    let program = procfs::comm(pid).map_err(|e| ProcessError::new(pid, "/proc/PID/comm", &e))?;
    let fds = procfs::fds(pid).map_err(|e| ProcessError::new(pid, "/proc/PID/fd", &e))?;
    let (soft_limit, hard_limit) = procfs::nofile_limits(pid).unwrap_or((None, None));
    let keepfix_loaded = procfs::has_keepfix(pid).ok();
    let table = tables.for_pid(pid).map_err(|e| ProcessError::new(pid, "its TCP sockets", &e))?;

    let mut tcp_states = TcpCounts::default();
    let mut other_sockets = 0;
    let mut close_wait = Vec::new();
    for fd in &fds {
        let Some(inode) = fd.socket_inode else { continue };
        let Some(socket) = table.sockets.get(&inode) else {
            other_sockets += 1;
            continue;
        };
        tcp_states.add(socket.state);
        if socket.state == tcp::CLOSE_WAIT {
            close_wait.push(CloseWaitSocket {
                fd: fd.fd,
                local: socket.local.to_string(),
                peer: socket.peer.to_string(),
                recv_q: socket.recv_q,
                send_q: socket.send_q,
            });
        }
    }
    let tcp_source = table.source;
    let keepfix_metrics = procfs::keepfix_environ(pid)
        .ok()
        .and_then(|env| prom::metrics_file(pid, &env))
        .and_then(|path| prom::read(&path));
    Ok(ProcessStatus {
        pid,
        program,
        keepfix_loaded,
        fds: FdUse { used: fds.len(), soft_limit, hard_limit },
        tcp_source,
        tcp_states,
        other_sockets,
        close_wait,
        keepfix_metrics,
    })
}

#[derive(Serialize)]
struct Report<'a> {
    processes: &'a [ProcessStatus],
}

pub fn status(args: &StatusArgs) -> Result<u8, Failure> {
    let mut tables = Tables::new();
    let mut processes = Vec::new();
    let mut failed = false;
    if args.pids.is_empty() {
        let pids = procfs::pids()
            .map_err(|e| Failure::new(exit::FAILED, format!("cannot list /proc: {}", output::io_error(&e))))?;
        let mut unreadable = 0;
        for pid in pids {
            match inspect(pid, &mut tables) {
                Ok(p) if p.tcp_states.total > 0 => processes.push(p),
                Ok(_) => {}
                Err(e) if e.kind == io::ErrorKind::PermissionDenied => unreadable += 1,
                Err(_) => {} // it exited meanwhile
            }
        }
        processes.sort_by(|a, b| b.tcp_states.close_wait.cmp(&a.tcp_states.close_wait).then(a.pid.cmp(&b.pid)));
        if unreadable > 0 {
            output::warning(&format!(
                "{unreadable} processes could not be read (permission denied); run as root to see all"
            ));
        }
    } else {
        for &pid in &args.pids {
            match inspect(pid, &mut tables) {
                Ok(p) => processes.push(p),
                Err(e) => {
                    output::error(&e.message);
                    failed = true;
                }
            }
        }
    }
    if args.json {
        let json = serde_json::to_string_pretty(&Report { processes: &processes })
            .map_err(|e| Failure::new(exit::FAILED, format!("cannot write JSON: {e}")))?;
        output::line(&json);
    } else if args.pids.is_empty() && processes.is_empty() {
        output::line("no process with TCP sockets (that this user may read)");
    } else if args.pids.is_empty() {
        output::out(&listing(&processes));
    } else {
        let blocks: Vec<String> = processes.iter().map(details).collect();
        output::out(&blocks.join("\n"));
    }
    Ok(if failed { exit::FAILED } else { exit::OK })
}

fn limit(l: Option<u64>) -> String {
    l.map_or_else(|| "unlimited".into(), |n| n.to_string())
}

fn yes_no(loaded: Option<bool>) -> &'static str {
    match loaded {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// One line per process.
fn listing(processes: &[ProcessStatus]) -> String {
    let mut rows = vec![
        ["PID", "COMM", "FDS", "SOFT LIMIT", "ESTABLISHED", "CLOSE_WAIT", "LISTEN", "OTHER TCP", "KEEPFIX"]
            .map(String::from),
    ];
    for p in processes {
        let t = &p.tcp_states;
        rows.push([
            p.pid.to_string(),
            p.program.clone(),
            p.fds.used.to_string(),
            limit(p.fds.soft_limit),
            t.established.to_string(),
            t.close_wait.to_string(),
            t.listen.to_string(),
            (t.total - t.established - t.close_wait - t.listen).to_string(),
            yes_no(p.keepfix_loaded).to_string(),
        ]);
    }
    output::table(&rows)
}

/// The full report on one process.
fn details(p: &ProcessStatus) -> String {
    let mut text = format!("PID {} ({})\n", p.pid, p.program);
    let keepfix = match p.keepfix_loaded {
        Some(true) => "loaded",
        Some(false) => "not loaded",
        None => "unknown (cannot read /proc/PID/maps)",
    };
    text += &format!("  keepfix:        {keepfix}\n");
    let percent = p
        .fds
        .soft_limit
        .filter(|l| *l > 0)
        .map(|l| format!(" ({}% of the soft limit)", p.fds.used as u64 * 100 / l))
        .unwrap_or_default();
    text += &format!(
        "  fds:            {} in use, soft limit {}, hard limit {}{percent}\n",
        p.fds.used,
        limit(p.fds.soft_limit),
        limit(p.fds.hard_limit)
    );
    text += &format!("  tcp sockets:    {}\n", p.tcp_states.summary());
    text += &format!("  other sockets:  {} (unix, udp, or tcp in state CLOSE)\n", p.other_sockets);
    if !p.close_wait.is_empty() {
        text += "  CLOSE_WAIT (the peer closed, the program did not):\n";
        let mut rows = vec![["FD", "LOCAL", "PEER", "RECV-Q", "SEND-Q"].map(String::from)];
        for s in &p.close_wait {
            rows.push([s.fd.to_string(), s.local.clone(), s.peer.clone(), s.recv_q.to_string(), s.send_q.to_string()]);
        }
        for line in output::table(&rows).lines() {
            text += &format!("    {line}\n");
        }
    }
    if let Some(m) = &p.keepfix_metrics {
        text += &format!("  keepfix's figures ({}, written {:.0}s ago):\n", m.file, m.age_seconds);
        text += &format!(
            "    CLOSE_WAIT found {}, numbers freed {}, shut down {}, held now {}; EMFILE events {}; fds used {}{}\n",
            m.close_wait_found,
            m.released,
            m.shut_down,
            m.close_wait_held,
            m.emfile_events,
            if m.fds_used_exact { "" } else { "at least " },
            m.fds_used
        );
    }
    text
}
