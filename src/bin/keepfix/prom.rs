//! keepfix's own figures for a process, from the metrics file its watchdog writes
//! (`KEEPFIX_METRICS=DIR` → `DIR/keepfix-PID.prom`, Prometheus text format; see src/metrics.rs for
//! the metric names).

use crate::config;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What keepfix itself counted in a process.
#[derive(Clone, Debug, Serialize)]
pub struct KeepfixFigures {
    /// The metrics file read.
    pub file: String,
    /// Seconds since the file was last written (it is rewritten at every scan).
    pub age_seconds: f64,
    /// Sockets found left in CLOSE_WAIT (or dead) since the program started.
    pub close_wait_found: u64,
    /// Sockets held in CLOSE_WAIT right now, found and not yet released.
    pub close_wait_held: u64,
    /// fd numbers keepfix freed (vacated: the socket closed) for the program, in close mode.
    pub released: u64,
    /// Sockets keepfix shut down (KEEPFIX_CLOSE_WAIT=shutdown or close).
    pub shut_down: u64,
    /// accept() calls that failed with EMFILE or ENFILE.
    pub emfile_events: u64,
    /// Open fds, as keepfix counted them for its last write; a lower bound when
    /// `fds_used_exact` is false (keepfix could take no count: keepfix_fds_used_min).
    pub fds_used: u64,
    pub fds_used_exact: bool,
}

/// The metrics file of `pid`, if its environment turns metrics on.
pub fn metrics_file(pid: u32, keepfix_env: &[(String, String)]) -> Option<PathBuf> {
    let get = |k: &str| keepfix_env.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone());
    let (cfg, _) = config::parse(get, keepfix_env.iter().map(|(k, _)| k.as_str()), false);
    let dir = cfg.metrics_dir?;
    let dir = dir.to_string_lossy();
    // The process names its file with its own pid and path: in a container (PID and mount
    // namespaces) those are the namespace's, reached through /proc/PID/root.
    let own_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("NSpid:")).and_then(|l| l.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(pid);
    let file = format!("{}/keepfix-{own_pid}.prom", dir.trim_end_matches('/'));
    Some(PathBuf::from(if own_pid == pid { file } else { format!("/proc/{pid}/root{file}") }))
}

/// The figures in `path`, or `None` if it is missing or not keepfix's.
pub fn read(path: &Path) -> Option<KeepfixFigures> {
    let text = std::fs::read_to_string(path).ok()?;
    let age_seconds = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let samples: Vec<Sample> = text.lines().filter_map(Sample::parse).collect();
    let value = |name: &str, label: Option<(&str, &str)>| -> u64 {
        let v = samples
            .iter()
            .filter(|s| s.name == name && label.is_none_or(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|s| s.value)
            .sum::<f64>();
        if v.is_finite() && v > 0.0 { v as u64 } else { 0 }
    };
    if !samples.iter().any(|s| s.name == "keepfix_up") {
        return None;
    }
    let counted = samples.iter().any(|s| s.name == "keepfix_fds_used");
    Some(KeepfixFigures {
        file: path.display().to_string(),
        age_seconds,
        close_wait_found: value("keepfix_close_wait_found_total", None),
        close_wait_held: value("keepfix_sockets", Some(("state", "close_wait"))),
        released: value("keepfix_close_wait_actions_total", Some(("action", "vacated"))),
        shut_down: value("keepfix_close_wait_actions_total", Some(("action", "shutdown"))),
        emfile_events: value("keepfix_emfile_total", None),
        fds_used: if counted { value("keepfix_fds_used", None) } else { value("keepfix_fds_used_min", None) },
        fds_used_exact: counted,
    })
}

/// One sample line: `name{label="value",...} number`.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn parse(line: &str) -> Option<Sample> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
            None => (series, Vec::new()),
        };
        Some(Sample { name: name.to_string(), labels, value })
    }
}

/// `a="x",b="y\"z"` → pairs, with the text format's escapes undone.
fn parse_labels(mut text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(',').to_string(), value));
        text = rest.get(end + 1..)?;
    }
    Some(labels)
}
