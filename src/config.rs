//! Configuration: the `KEEPFIX_*` variables, their defaults, and their validation.
//!
//! This module is pure: it takes a lookup function and returns a [`Config`] plus one
//! [`Diagnostic`] per problem. It does no I/O, so the library (at load time) and the `keepfix`
//! command (`check`, `run`) share it through `#[path]`. A bad value never stops anything: it
//! yields a diagnostic naming the variable, the value and what is used instead.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Every variable keepfix reads, in the order `keepfix check` prints them.
pub const VARIABLES: &[&str] = &[
    "KEEPFIX_IDLE",
    "KEEPFIX_INTVL",
    "KEEPFIX_CNT",
    "KEEPFIX_USER_TIMEOUT",
    "KEEPFIX_RESPECT_APP",
    "KEEPFIX_LOG",
    "KEEPFIX_DISABLE",
    "KEEPFIX_CLOSE_WAIT",
    "KEEPFIX_CLOSE_WAIT_AFTER",
    "KEEPFIX_CLOSE_WAIT_UNREAD",
    "KEEPFIX_SCAN_INTERVAL",
    "KEEPFIX_NOFILE_WARN",
    "KEEPFIX_NOFILE_RAISE",
    "KEEPFIX_METRICS",
];

/// Variables that belong to the `keepfix` command, not to the library; known, so not "unknown".
pub const COMMAND_VARIABLES: &[&str] = &["KEEPFIX_LIB"];

/// The kernel's bounds (include/net/tcp.h: MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT).
pub const MAX_KEEPIDLE_S: u64 = 32767;
pub const MAX_KEEPINTVL_S: u64 = 32767;
pub const MAX_KEEPCNT: u64 = 127;
/// TCP_USER_TIMEOUT is an int of milliseconds.
pub const MAX_USER_TIMEOUT_MS: u64 = i32::MAX as u64;
/// The longest value printed back in a diagnostic; the rest is cut.
const MAX_SHOWN_VALUE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserTimeout {
    Off,
    /// idle + intvl × cnt: consistent with keepalive, and bounds unacknowledged data too.
    Auto,
    Millis(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogDest {
    Stderr,
    Syslog,
    File(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseWaitMode {
    Off,
    Log,
    Shutdown,
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unread {
    /// A socket with unread received data is logged, never released.
    Keep,
    /// It is released anyway; the unread bytes are lost.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub idle_s: u32,
    pub intvl_s: u32,
    pub cnt: u32,
    pub user_timeout: UserTimeout,
    pub respect_app: bool,
    pub log: LogDest,
    pub disable: bool,
    pub close_wait: CloseWaitMode,
    pub close_wait_after_ms: u64,
    pub close_wait_unread: Unread,
    pub scan_interval_ms: u64,
    /// Percent of the soft RLIMIT_NOFILE at which the first warning comes; 0 = off.
    pub nofile_warn_pct: u8,
    pub nofile_raise: bool,
    pub metrics_dir: Option<PathBuf>,
}

impl Default for Config {
    /// The defaults find a dead peer in idle + intvl × cnt = 60 + 10 × 6 = 120 s: well under the
    /// idle timeouts of common NATs and load balancers (AWS NLB 350 s, Azure LB 240 s, GCP 600 s),
    /// and a probe every 60 s keeps their state alive. See README.md, "Why these defaults".
    fn default() -> Self {
        Config {
            idle_s: 60,
            intvl_s: 10,
            cnt: 6,
            user_timeout: UserTimeout::Off,
            respect_app: false,
            log: LogDest::Stderr,
            disable: false,
            close_wait: CloseWaitMode::Log,
            close_wait_after_ms: 30_000,
            close_wait_unread: Unread::Keep,
            scan_interval_ms: 5_000,
            nofile_warn_pct: 80,
            nofile_raise: false,
            metrics_dir: None,
        }
    }
}

impl Config {
    /// TCP_USER_TIMEOUT in milliseconds, if one is to be set.
    pub fn user_timeout_ms(&self) -> Option<u32> {
        match self.user_timeout {
            UserTimeout::Off => None,
            UserTimeout::Millis(ms) => Some(ms),
            UserTimeout::Auto => {
                let s = u64::from(self.idle_s) + u64::from(self.intvl_s) * u64::from(self.cnt);
                Some(u32::try_from(s * 1000).unwrap_or(u32::MAX))
            }
        }
    }

    /// How long a silent dead peer takes to be found: idle + intvl × cnt, in seconds.
    pub fn detection_s(&self) -> u64 {
        u64::from(self.idle_s) + u64::from(self.intvl_s) * u64::from(self.cnt)
    }

    /// The effective value of one variable, as `keepfix check` prints it.
    pub fn show(&self, var: &str) -> String {
        match var {
            "KEEPFIX_IDLE" => format!("{}s", self.idle_s),
            "KEEPFIX_INTVL" => format!("{}s", self.intvl_s),
            "KEEPFIX_CNT" => self.cnt.to_string(),
            "KEEPFIX_USER_TIMEOUT" => match self.user_timeout {
                UserTimeout::Off => "off".into(),
                UserTimeout::Auto => format!("auto ({})", show_ms(self.user_timeout_ms().map_or(0, u64::from))),
                UserTimeout::Millis(ms) => show_ms(u64::from(ms)),
            },
            "KEEPFIX_RESPECT_APP" => show_bool(self.respect_app),
            "KEEPFIX_LOG" => match &self.log {
                LogDest::Stderr => "stderr".into(),
                LogDest::Syslog => "syslog".into(),
                LogDest::File(p) => p.display().to_string(),
            },
            "KEEPFIX_DISABLE" => show_bool(self.disable),
            "KEEPFIX_CLOSE_WAIT" => self.close_wait.name().into(),
            "KEEPFIX_CLOSE_WAIT_AFTER" => show_ms(self.close_wait_after_ms),
            "KEEPFIX_CLOSE_WAIT_UNREAD" => match self.close_wait_unread {
                Unread::Keep => "keep".into(),
                Unread::Drop => "drop".into(),
            },
            "KEEPFIX_SCAN_INTERVAL" => show_ms(self.scan_interval_ms),
            "KEEPFIX_NOFILE_WARN" => match self.nofile_warn_pct {
                0 => "off".into(),
                p => format!("{p}%"),
            },
            "KEEPFIX_NOFILE_RAISE" => show_bool(self.nofile_raise),
            "KEEPFIX_METRICS" => match &self.metrics_dir {
                None => "off".into(),
                Some(p) => p.display().to_string(),
            },
            _ => String::new(),
        }
    }
}

impl CloseWaitMode {
    pub fn name(self) -> &'static str {
        match self {
            CloseWaitMode::Off => "off",
            CloseWaitMode::Log => "log",
            CloseWaitMode::Shutdown => "shutdown",
            CloseWaitMode::Close => "close",
        }
    }

    /// Does this mode shut suspects down (shutdown and close)?
    pub fn acts(self) -> bool {
        matches!(self, CloseWaitMode::Shutdown | CloseWaitMode::Close)
    }
}

/// One problem with one variable. `Display` gives the log line's text after `keepfix[PID]: `.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub var: String,
    /// The raw value, if the problem is with a value.
    pub value: Option<String>,
    /// What is wrong, e.g. "is not a duration".
    pub problem: String,
    /// What is used instead, e.g. "using 60s"; empty when nothing needs saying.
    pub outcome: String,
    /// A warning (the value was adjusted, or a variable is unknown) rather than an error
    /// (the value was rejected).
    pub warning: bool,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A name comes from the environment too (an unknown KEEPFIX_* one): anything but a plain
        // name is quoted, so a newline or an escape sequence in it cannot forge or recolour a line.
        if self.var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            write!(f, "config {}", self.var)?;
        } else {
            write!(f, "config {}", quote(&self.var))?;
        }
        if let Some(v) = &self.value {
            write!(f, "={}", quote(v))?;
        }
        write!(f, " {}", self.problem)?;
        if !self.outcome.is_empty() {
            write!(f, "; {}", self.outcome)?;
        }
        Ok(())
    }
}

/// The rules of a duration variable.
struct DurationRule {
    /// Smallest accepted value, in milliseconds.
    min_ms: u64,
    max_ms: u64,
    /// The kernel takes whole seconds: round a fraction up, and say so.
    whole_seconds: bool,
}

/// Reads the configuration. `get` returns a variable's value; `names` lists every environment
/// variable name, so that misspelt `KEEPFIX_*` names are reported. `secure` is true under secure
/// execution (setuid, setgid, file capabilities): paths from the environment are then refused.
pub fn parse<'a>(
    get: impl Fn(&str) -> Option<String>,
    names: impl IntoIterator<Item = &'a str>,
    secure: bool,
) -> (Config, Vec<Diagnostic>) {
    let mut c = Config::default();
    let mut d = Vec::new();
    let sec = |s: u64| DurationRule { min_ms: 1000, max_ms: s * 1000, whole_seconds: true };

    if let Some(v) = get("KEEPFIX_IDLE") {
        if let Some(ms) = duration_var(&mut d, "KEEPFIX_IDLE", &v, sec(MAX_KEEPIDLE_S), "60s") {
            c.idle_s = (ms / 1000) as u32;
        }
    }
    if let Some(v) = get("KEEPFIX_INTVL") {
        if let Some(ms) = duration_var(&mut d, "KEEPFIX_INTVL", &v, sec(MAX_KEEPINTVL_S), "10s") {
            c.intvl_s = (ms / 1000) as u32;
        }
    }
    if let Some(v) = get("KEEPFIX_CNT") {
        match parse_count(&v) {
            Some(n) if (1..=MAX_KEEPCNT).contains(&n) => c.cnt = n as u32,
            Some(_) => d.push(err("KEEPFIX_CNT", &v, format!("is out of range 1..{MAX_KEEPCNT}"), "using 6")),
            None => d.push(err("KEEPFIX_CNT", &v, "is not a whole number", "using 6")),
        }
    }
    if let Some(v) = get("KEEPFIX_USER_TIMEOUT") {
        let t = v.trim().to_ascii_lowercase();
        c.user_timeout = match t.as_str() {
            "off" => UserTimeout::Off,
            "auto" => UserTimeout::Auto,
            _ => {
                let rule = DurationRule { min_ms: 0, max_ms: MAX_USER_TIMEOUT_MS, whole_seconds: false };
                match duration_var(&mut d, "KEEPFIX_USER_TIMEOUT", &v, rule, "off") {
                    Some(0) | None => UserTimeout::Off,
                    Some(ms) => UserTimeout::Millis(ms as u32),
                }
            }
        };
        if let Some(ms) = c.user_timeout_ms() {
            let detect_ms = c.detection_s() * 1000;
            if u64::from(ms) > detect_ms && c.user_timeout != UserTimeout::Auto {
                d.push(Diagnostic {
                    var: "KEEPFIX_USER_TIMEOUT".into(),
                    value: Some(v.clone()),
                    problem: format!(
                        "is longer than idle + intvl x cnt = {}s, which makes keepalive find dead peers later",
                        c.detection_s()
                    ),
                    outcome: "using it anyway (auto would match)".into(),
                    warning: true,
                });
            }
        }
    }
    if let Some(v) = get("KEEPFIX_RESPECT_APP") {
        c.respect_app = bool_var(&mut d, "KEEPFIX_RESPECT_APP", &v, false);
    }
    if let Some(v) = get("KEEPFIX_DISABLE") {
        c.disable = bool_var(&mut d, "KEEPFIX_DISABLE", &v, false);
    }
    if let Some(v) = get("KEEPFIX_LOG") {
        match v.trim() {
            "stderr" | "" => c.log = LogDest::Stderr,
            "syslog" => c.log = LogDest::Syslog,
            p if !p.starts_with('/') => {
                d.push(err("KEEPFIX_LOG", &v, "is not stderr, syslog or an absolute file path", "using stderr"))
            }
            _ if secure => d.push(err(
                "KEEPFIX_LOG",
                &v,
                "is a file path, refused under secure execution (setuid/setgid)",
                "using stderr",
            )),
            p => c.log = LogDest::File(PathBuf::from(p)),
        }
    }
    if let Some(v) = get("KEEPFIX_CLOSE_WAIT") {
        c.close_wait = match v.trim().to_ascii_lowercase().as_str() {
            "off" | "0" => CloseWaitMode::Off,
            "log" => CloseWaitMode::Log,
            "shutdown" => CloseWaitMode::Shutdown,
            "close" => CloseWaitMode::Close,
            _ => {
                d.push(err("KEEPFIX_CLOSE_WAIT", &v, "is not off, log, shutdown or close", "using log"));
                CloseWaitMode::Log
            }
        };
    }
    if let Some(v) = get("KEEPFIX_CLOSE_WAIT_AFTER") {
        let rule = DurationRule { min_ms: 0, max_ms: u64::from(u32::MAX) * 1000, whole_seconds: false };
        if let Some(ms) = duration_var(&mut d, "KEEPFIX_CLOSE_WAIT_AFTER", &v, rule, "30s") {
            c.close_wait_after_ms = ms;
        }
    }
    if let Some(v) = get("KEEPFIX_CLOSE_WAIT_UNREAD") {
        c.close_wait_unread = match v.trim().to_ascii_lowercase().as_str() {
            "keep" => Unread::Keep,
            "drop" => Unread::Drop,
            _ => {
                d.push(err("KEEPFIX_CLOSE_WAIT_UNREAD", &v, "is not keep or drop", "using keep"));
                Unread::Keep
            }
        };
    }
    if let Some(v) = get("KEEPFIX_SCAN_INTERVAL") {
        let rule = DurationRule { min_ms: 1, max_ms: 24 * 3600 * 1000, whole_seconds: false };
        if let Some(ms) = duration_var(&mut d, "KEEPFIX_SCAN_INTERVAL", &v, rule, "5s") {
            c.scan_interval_ms = ms;
        }
    }
    if let Some(v) = get("KEEPFIX_NOFILE_WARN") {
        let t = v.trim().trim_end_matches('%');
        match (t.eq_ignore_ascii_case("off"), parse_count(t)) {
            (true, _) | (_, Some(0)) => c.nofile_warn_pct = 0,
            (_, Some(n)) if n <= 100 => c.nofile_warn_pct = n as u8,
            (_, Some(_)) => d.push(err("KEEPFIX_NOFILE_WARN", &v, "is out of range 1..100 (percent)", "using 80")),
            (_, None) => d.push(err("KEEPFIX_NOFILE_WARN", &v, "is not a percentage or off", "using 80")),
        }
    }
    if let Some(v) = get("KEEPFIX_NOFILE_RAISE") {
        c.nofile_raise = bool_var(&mut d, "KEEPFIX_NOFILE_RAISE", &v, false);
    }
    if let Some(v) = get("KEEPFIX_METRICS") {
        let p = v.trim();
        if p.is_empty() || p == "off" {
            c.metrics_dir = None;
        } else if !p.starts_with('/') {
            d.push(err("KEEPFIX_METRICS", &v, "is not an absolute directory path", "metrics off"));
        } else if secure {
            d.push(err(
                "KEEPFIX_METRICS",
                &v,
                "is a path, refused under secure execution (setuid/setgid)",
                "metrics off",
            ));
        } else {
            c.metrics_dir = Some(PathBuf::from(p));
        }
    }
    for name in names {
        if name.starts_with("KEEPFIX_") && !VARIABLES.contains(&name) && !COMMAND_VARIABLES.contains(&name) {
            let mut outcome = String::from("ignored");
            if let Some(best) = closest(name) {
                let _ = write!(outcome, " (did you mean {best}?)");
            }
            d.push(Diagnostic {
                var: name.to_string(),
                value: None,
                problem: "is not a keepfix variable".into(),
                outcome,
                warning: true,
            });
        }
    }
    (c, d)
}

fn err(var: &str, value: &str, problem: impl Into<String>, outcome: &str) -> Diagnostic {
    Diagnostic {
        var: var.into(),
        value: Some(value.into()),
        problem: problem.into(),
        outcome: outcome.into(),
        warning: false,
    }
}

fn bool_var(d: &mut Vec<Diagnostic>, var: &str, v: &str, default: bool) -> bool {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => true,
        "0" | "no" | "false" | "off" | "" => false,
        _ => {
            let using = if default { "using 1" } else { "using 0" };
            d.push(err(var, v, "is not 0 or 1", using));
            default
        }
    }
}

/// Parses and checks one duration variable. Returns the value to use in milliseconds, or `None`
/// when the default stays (a diagnostic has then been pushed).
fn duration_var(d: &mut Vec<Diagnostic>, var: &str, v: &str, rule: DurationRule, default: &str) -> Option<u64> {
    let using = format!("using {default}");
    let Some(ms) = parse_duration_ms(v) else {
        d.push(err(var, v, "is not a duration (like 60, 200ms, 1.5s, 10m or 1h)", &using));
        return None;
    };
    let range = if rule.whole_seconds {
        format!("{}s..{}s", rule.min_ms / 1000, rule.max_ms / 1000)
    } else {
        format!("{}..{}", show_ms(rule.min_ms), show_ms(rule.max_ms))
    };
    let rounded = if rule.whole_seconds { ms.div_ceil(1000) * 1000 } else { ms };
    if rounded < rule.min_ms || rounded > rule.max_ms {
        d.push(err(var, v, format!("is out of range {range}"), &using));
        return None;
    }
    if rounded != ms {
        d.push(Diagnostic {
            var: var.into(),
            value: Some(v.into()),
            problem: "is not a whole number of seconds, which the kernel needs".into(),
            outcome: format!("rounded up to {}", show_ms(rounded)),
            warning: true,
        });
    }
    Some(rounded)
}

/// A duration: a whole number of seconds ("60"), or a number with a unit ms, s, m or h
/// ("200ms", "1.5s", "10m"). Returns milliseconds, rounding a fraction of a millisecond up.
pub fn parse_duration_ms(v: &str) -> Option<u64> {
    let t = v.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit_ms: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" => 1000,
        "ms" => 1,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') || frac.len() > 9 {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut ms = whole.checked_mul(unit_ms)?;
    if !frac.is_empty() {
        // frac / 10^len × unit_ms, rounded up to a whole millisecond.
        let scale = 10u64.pow(frac.len() as u32);
        let f: u64 = frac.parse().ok()?;
        let part = (u128::from(f) * u128::from(unit_ms)).div_ceil(u128::from(scale));
        ms = ms.checked_add(u64::try_from(part).ok()?)?;
    }
    Some(ms)
}

fn parse_count(v: &str) -> Option<u64> {
    let t = v.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// Milliseconds as the shortest exact text: 60000 → "60s", 1500 → "1500ms", 0 → "0s".
pub fn show_ms(ms: u64) -> String {
    if ms % 1000 == 0 { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

fn show_bool(b: bool) -> String {
    if b { "1".into() } else { "0".into() }
}

/// A value as a quoted string with control characters and non-ASCII escaped (`\u{1b}`), cut to a
/// sane length: printable ASCII only, so no terminal escape, bidi override or newline gets through.
pub fn quote(v: &str) -> String {
    let mut out = String::from("\"");
    for (i, ch) in v.chars().enumerate() {
        if i == MAX_SHOWN_VALUE {
            out.push_str("...");
            break;
        }
        if ch.is_ascii() {
            out.extend(ch.escape_debug());
        } else {
            out.extend(ch.escape_unicode());
        }
    }
    out.push('"');
    out
}

/// The known variable nearest to a misspelt one, if it is near enough to be a typo.
fn closest(name: &str) -> Option<&'static str> {
    VARIABLES
        .iter()
        .map(|v| (edit_distance(name, v), *v))
        .filter(|(dist, _)| *dist <= 3)
        .min_by_key(|(dist, _)| *dist)
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(vars: &[(&str, &str)]) -> (Config, Vec<String>) {
        run_secure(vars, false)
    }

    fn run_secure(vars: &[(&str, &str)], secure: bool) -> (Config, Vec<String>) {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (c, d) = parse(|k| map.get(k).cloned(), map.keys().map(String::as_str), secure);
        (c, d.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn defaults_detect_a_dead_peer_in_two_minutes() {
        let (c, d) = run(&[]);
        assert!(d.is_empty());
        assert_eq!((c.idle_s, c.intvl_s, c.cnt), (60, 10, 6));
        assert_eq!(c.detection_s(), 120);
        assert_eq!(c.user_timeout_ms(), None);
        assert_eq!(c.close_wait, CloseWaitMode::Log);
        assert_eq!(c.close_wait_after_ms, 30_000);
        assert_eq!(c.scan_interval_ms, 5_000);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("60"), Some(60_000));
        assert_eq!(parse_duration_ms(" 200ms "), Some(200));
        assert_eq!(parse_duration_ms("1s"), Some(1000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("0.0001s"), Some(1));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("1H"), Some(3_600_000));
        for bad in ["", "abc", "-1", "1d", "1.2.3s", ".", "1 2", "s", "99999999999999999999", "1e3"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_duration_names_variable_value_and_default() {
        let (c, d) = run(&[("KEEPFIX_IDLE", "abc")]);
        assert_eq!(c.idle_s, 60);
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("config KEEPFIX_IDLE=\"abc\" is not a duration"), "{}", d[0]);
        assert!(d[0].ends_with("; using 60s"), "{}", d[0]);
    }

    #[test]
    fn kernel_ranges() {
        let (c, d) = run(&[("KEEPFIX_IDLE", "0"), ("KEEPFIX_INTVL", "40000"), ("KEEPFIX_CNT", "128")]);
        assert_eq!((c.idle_s, c.intvl_s, c.cnt), (60, 10, 6));
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.iter().any(|l| l.contains("KEEPFIX_IDLE=\"0\" is out of range 1s..32767s; using 60s")));
        assert!(d.iter().any(|l| l.contains("KEEPFIX_INTVL=\"40000\" is out of range")));
        assert!(d.iter().any(|l| l.contains("KEEPFIX_CNT=\"128\" is out of range 1..127; using 6")));
        let (c, d) = run(&[("KEEPFIX_IDLE", "32767"), ("KEEPFIX_INTVL", "1"), ("KEEPFIX_CNT", "127")]);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!((c.idle_s, c.intvl_s, c.cnt), (32767, 1, 127));
    }

    #[test]
    fn fractions_of_seconds_round_up_and_say_so() {
        let (c, d) = run(&[("KEEPFIX_IDLE", "1500ms"), ("KEEPFIX_INTVL", "200ms")]);
        assert_eq!((c.idle_s, c.intvl_s), (2, 1));
        assert_eq!(d.len(), 2);
        assert!(d[0].contains("KEEPFIX_IDLE=\"1500ms\"") && d[0].contains("rounded up to 2s"), "{}", d[0]);
    }

    #[test]
    fn user_timeout() {
        let (c, _) = run(&[("KEEPFIX_USER_TIMEOUT", "auto")]);
        assert_eq!(c.user_timeout_ms(), Some(120_000));
        let (c, d) = run(&[("KEEPFIX_USER_TIMEOUT", "5000ms")]);
        assert_eq!((c.user_timeout_ms(), d.len()), (Some(5000), 0));
        let (c, d) = run(&[("KEEPFIX_USER_TIMEOUT", "off")]);
        assert_eq!((c.user_timeout_ms(), d.len()), (None, 0));
        let (c, d) = run(&[("KEEPFIX_USER_TIMEOUT", "soon")]);
        assert_eq!(c.user_timeout_ms(), None);
        assert!(d[0].contains("KEEPFIX_USER_TIMEOUT=\"soon\" is not a duration"));
        let (c, d) = run(&[("KEEPFIX_USER_TIMEOUT", "10m")]);
        assert_eq!(c.user_timeout_ms(), Some(600_000));
        assert!(d[0].contains("longer than idle + intvl x cnt = 120s"), "{d:?}");
    }

    #[test]
    fn switches_modes_and_paths() {
        let (c, d) = run(&[
            ("KEEPFIX_RESPECT_APP", "1"),
            ("KEEPFIX_DISABLE", "maybe"),
            ("KEEPFIX_LOG", "relative/file"),
            ("KEEPFIX_CLOSE_WAIT", "close"),
            ("KEEPFIX_CLOSE_WAIT_AFTER", "0s"),
            ("KEEPFIX_SCAN_INTERVAL", "0s"),
            ("KEEPFIX_CLOSE_WAIT_UNREAD", "drop"),
            ("KEEPFIX_NOFILE_WARN", "150"),
        ]);
        assert!(c.respect_app);
        assert!(!c.disable);
        assert_eq!(c.log, LogDest::Stderr);
        assert_eq!(c.close_wait, CloseWaitMode::Close);
        assert_eq!(c.close_wait_after_ms, 0);
        assert_eq!(c.scan_interval_ms, 5000);
        assert_eq!(c.close_wait_unread, Unread::Drop);
        assert_eq!(c.nofile_warn_pct, 80);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d.iter().any(|l| l.contains("KEEPFIX_DISABLE=\"maybe\" is not 0 or 1; using 0")));
        assert!(d.iter().any(|l| l.contains("KEEPFIX_SCAN_INTERVAL=\"0s\" is out of range 1ms..")));
        let (c, _) = run(&[("KEEPFIX_LOG", "/var/log/keepfix.log"), ("KEEPFIX_METRICS", "/run/metrics")]);
        assert_eq!(c.log, LogDest::File("/var/log/keepfix.log".into()));
        assert_eq!(c.metrics_dir, Some("/run/metrics".into()));
    }

    #[test]
    fn secure_execution_refuses_paths() {
        let (c, d) = run_secure(&[("KEEPFIX_LOG", "/tmp/x.log"), ("KEEPFIX_METRICS", "/tmp/m")], true);
        assert_eq!(c.log, LogDest::Stderr);
        assert_eq!(c.metrics_dir, None);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|l| l.contains("secure execution")));
    }

    #[test]
    fn unknown_variables_are_named_with_a_suggestion() {
        let (_, d) = run(&[("KEEPFIX_IDEL", "5"), ("KEEPFIX_LIB", "/x"), ("OTHER", "1")]);
        assert_eq!(d, vec!["config KEEPFIX_IDEL is not a keepfix variable; ignored (did you mean KEEPFIX_IDLE?)"]);
    }

    #[test]
    fn hostile_values_are_quoted_and_cut() {
        let long = "\u{1b}[31m".to_string() + &"x".repeat(500);
        let (_, d) = run(&[("KEEPFIX_CNT", &long)]);
        assert!(!d[0].contains('\u{1b}'));
        assert!(d[0].contains("\\u{1b}") && d[0].contains("..."));
        assert!(d[0].len() < 200);
    }

    #[test]
    fn hostile_names_and_non_ascii_stay_one_printable_line() {
        let (_, d) = run(&[("KEEPFIX_\nkeepfix[1]: forged \u{1b}[2J", "1"), ("KEEPFIX_CNT", "\u{202e}9")]);
        assert_eq!(d.len(), 2, "{d:?}");
        for l in &d {
            assert!(l.bytes().all(|b| (0x20..0x7f).contains(&b)), "{l:?}");
        }
        assert!(d.iter().any(|l| l.starts_with("config \"KEEPFIX_\\nkeepfix[1]: forged \\u{1b}[2J\" is not")), "{d:?}");
        assert!(d.iter().any(|l| l.contains("KEEPFIX_CNT=\"\\u{202e}9\"")), "{d:?}");
    }
}
