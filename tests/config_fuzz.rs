//! Hostile configuration (issue 7, item 7): garbage in every KEEPFIX_* variable never crashes or
//! hangs a program; it only yields clear one-line messages and the defaults.
//!
//! Two levels:
//! - The parser itself (src/config.rs, included by path as the `keepfix` command does), fuzzed with
//!   proptest: arbitrary values (any Unicode, control characters, long strings), arbitrary variable
//!   names, valid values mixed with invalid ones, secure and not. Properties: it returns quickly,
//!   every field stays within the kernel's ranges, a rejected value leaves that field at its default,
//!   every message is one line of printable text of bounded length naming its variable, and under
//!   secure execution no path is ever taken from the environment.
//! - The real library, loaded in a real server: echo_server started with hostile bytes (including
//!   non-UTF-8 and 100 KB values) in every variable at once. It must start, serve, carry the default
//!   keepalive options (checked from outside with pidfd_getfd), exit cleanly, and its stderr must be
//!   only `keepfix[PID]: ` lines without raw control bytes.
//!
//! Checked to fail without the feature: dropping the range check on KEEPFIX_CNT in src/config.rs
//! (`Some(n) if (1..=MAX_KEEPCNT)...` accepting any n) fails `fields_stay_in_range…`; making
//! `quote()` push chars unescaped fails `messages_are_one_printable_line…` and
//! `garbage_in_every_variable…` (raw ESC and newlines reach stderr).
mod common;
use common::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../src/config.rs"]
#[allow(dead_code, clippy::indexing_slicing)]
mod config;
use config::{CloseWaitMode, Config, LogDest, UserTimeout};

/// The longest message line the parser may produce: quote() cuts a value to 64 characters, each
/// escaped to at most 10 bytes (`\u{10ffff}`), plus the variable name and the fixed text.
const MAX_MESSAGE: usize = 1200;

fn parse_map(m: &HashMap<String, String>, secure: bool) -> (Config, Vec<config::Diagnostic>) {
    config::parse(|k| m.get(k).cloned(), m.keys().map(String::as_str), secure)
}

/// Strings that look almost right: numbers with odd units, signs, spaces, huge values, keywords.
fn near_miss() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ \t]{0,2}[-+]?[0-9]{0,25}(\\.[0-9]{0,12})?[ ]?(ms|s|m|min|h|d|S|MS|us|%|e3)?[ \t]{0,2}",
        prop::sample::select(vec![
            "",
            " ",
            "off",
            "OFF",
            "auto",
            "log",
            "close",
            "shutdown",
            "keep",
            "drop",
            "stderr",
            "syslog",
            "1",
            "0",
            "yes",
            "on",
            "true",
            "/",
            "/tmp/x",
            "//",
            "/dev/null",
            "NaN",
            "inf",
            "0x10",
            "１２",
            "١٢",
            "½s",
            "1.5.5",
        ])
        .prop_map(String::from),
        any::<String>(),
        "\\PC{0,300}",
        // Control characters, escapes and newlines.
        "[\\x00-\\x1f\\x7f\"\\\\a-z0-9]{0,80}",
    ]
}

fn env_map() -> impl Strategy<Value = HashMap<String, String>> {
    let known = prop::sample::select(config::VARIABLES.to_vec()).prop_map(String::from);
    let other = prop_oneof![
        "KEEPFIX_[A-Z_]{0,20}",
        "KEEPFIX_\\PC{0,40}",
        Just("KEEPFIX_".to_string()),
        Just("KEEPFIX_LIB".to_string()),
    ];
    prop::collection::hash_map(prop_oneof![4 => known, 1 => other], near_miss(), 0..20)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn fields_stay_in_range_and_rejected_values_leave_the_default(m in env_map(), secure in any::<bool>()) {
        let t0 = Instant::now();
        let (c, d) = parse_map(&m, secure);
        prop_assert!(t0.elapsed() < Duration::from_secs(1), "parse took {:?}", t0.elapsed());
        let def = Config::default();
        prop_assert!((1..=config::MAX_KEEPIDLE_S).contains(&u64::from(c.idle_s)));
        prop_assert!((1..=config::MAX_KEEPINTVL_S).contains(&u64::from(c.intvl_s)));
        prop_assert!((1..=config::MAX_KEEPCNT).contains(&u64::from(c.cnt)));
        prop_assert!(c.nofile_warn_pct <= 100);
        prop_assert!(c.scan_interval_ms >= 1 && c.scan_interval_ms <= 24 * 3600 * 1000);
        if let UserTimeout::Millis(ms) = c.user_timeout {
            prop_assert!(ms > 0 && u64::from(ms) <= config::MAX_USER_TIMEOUT_MS);
        }
        if let Some(ms) = c.user_timeout_ms() {
            prop_assert!(ms > 0);
        }
        if let LogDest::File(p) = &c.log {
            prop_assert!(p.is_absolute());
        }
        if let Some(p) = &c.metrics_dir {
            prop_assert!(p.is_absolute());
        }
        // An error (not a warning) means the value was refused: that field keeps its default.
        for e in d.iter().filter(|e| !e.warning) {
            let same = match e.var.as_str() {
                "KEEPFIX_IDLE" => c.idle_s == def.idle_s,
                "KEEPFIX_INTVL" => c.intvl_s == def.intvl_s,
                "KEEPFIX_CNT" => c.cnt == def.cnt,
                "KEEPFIX_USER_TIMEOUT" => c.user_timeout == UserTimeout::Off,
                "KEEPFIX_RESPECT_APP" => c.respect_app == def.respect_app,
                "KEEPFIX_DISABLE" => c.disable == def.disable,
                "KEEPFIX_LOG" => c.log == def.log,
                "KEEPFIX_CLOSE_WAIT" => c.close_wait == CloseWaitMode::Log,
                "KEEPFIX_CLOSE_WAIT_AFTER" => c.close_wait_after_ms == def.close_wait_after_ms,
                "KEEPFIX_CLOSE_WAIT_UNREAD" => c.close_wait_unread == def.close_wait_unread,
                "KEEPFIX_SCAN_INTERVAL" => c.scan_interval_ms == def.scan_interval_ms,
                "KEEPFIX_NOFILE_WARN" => c.nofile_warn_pct == def.nofile_warn_pct,
                "KEEPFIX_NOFILE_RAISE" => c.nofile_raise == def.nofile_raise,
                "KEEPFIX_METRICS" => c.metrics_dir.is_none(),
                other => return Err(TestCaseError::fail(format!("error for unknown variable {other}"))),
            };
            prop_assert!(same, "{} was refused but its field changed: {:?}", e, c);
        }
    }

    #[test]
    fn messages_are_one_printable_line_naming_their_variable(m in env_map(), secure in any::<bool>()) {
        let (_, d) = parse_map(&m, secure);
        for e in &d {
            let line = e.to_string();
            // A plain name as it is; any other name quoted and escaped like a value.
            let plain = e.var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            let head = if plain { format!("config {}", e.var) } else { format!("config {}", config::quote(&e.var)) };
            prop_assert!(line.starts_with(&head), "{}", line);
            prop_assert!(!line.chars().any(char::is_control), "raw control character in {:?}", line);
            prop_assert!(line.len() <= MAX_MESSAGE + e.var.len() * 4, "{} bytes: {:?}", line.len(), line);
            prop_assert!(m.contains_key(&e.var), "message for a variable that was not set: {}", line);
        }
        // Every set variable that is known and whose value was not valid is named at most once
        // as an error.
        for v in config::VARIABLES {
            prop_assert!(d.iter().filter(|e| e.var == *v && !e.warning).count() <= 1);
        }
    }

    #[test]
    fn secure_execution_never_takes_a_path(m in env_map(), p in "/[\\PC]{0,60}") {
        let mut m = m;
        m.insert("KEEPFIX_LOG".into(), p.clone());
        m.insert("KEEPFIX_METRICS".into(), p);
        let (c, _) = parse_map(&m, true);
        prop_assert!(!matches!(c.log, LogDest::File(_)), "{:?}", c.log);
        prop_assert_eq!(c.metrics_dir, None);
    }

    #[test]
    fn valid_values_are_taken_exactly(idle in 1u32..=32767, intvl in 1u32..=32767, cnt in 1u32..=127,
                                      unit in prop::sample::select(vec!["", "s", "000ms"])) {
        let m: HashMap<String, String> = [
            ("KEEPFIX_IDLE", format!("{idle}{unit}")),
            ("KEEPFIX_INTVL", format!(" {intvl}{unit} ")),
            ("KEEPFIX_CNT", cnt.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let (c, d) = parse_map(&m, false);
        prop_assert!(d.is_empty(), "{:?}", d);
        prop_assert_eq!((c.idle_s, c.intvl_s, c.cnt), (idle, intvl, cnt));
    }

    #[test]
    fn durations_parse_or_refuse_without_panicking(s in near_miss()) {
        if let Some(ms) = config::parse_duration_ms(&s) {
            // Whatever was accepted starts with a digit or a dot and means what it says.
            let t = s.trim();
            prop_assert!(t.starts_with(|c: char| c.is_ascii_digit() || c == '.'), "{:?} -> {}", s, ms);
        }
    }

    #[test]
    fn durations_mean_what_they_say(whole in 0u64..1_000_000, frac in 0u32..1000,
                                    unit in prop::sample::select(vec![("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)])) {
        let (name, ms_per) = unit;
        let s = format!("{whole}.{frac:03}{name}");
        let want = whole * ms_per + (u64::from(frac) * ms_per).div_ceil(1000);
        prop_assert_eq!(config::parse_duration_ms(&s), Some(want), "{}", s);
    }
}

// ---------------------------------------------------------------------------------------------
// The real library in a real program.

/// Runs echo_server under keepfix with exactly these KEEPFIX_* variables (raw bytes), serves two
/// clients, checks the accepted socket's keepalive options from outside, stops it, and returns
/// (keepalive, stderr). Fails the test if it does not start within 10 s (a hang) or does not exit
/// cleanly.
fn run_with(vars: &[(OsString, OsString)]) -> (Ka, String) {
    let mut c = Command::new(c_program("echo_server"));
    c.arg("0").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KEEPFIX_") {
            c.env_remove(k);
        }
    }
    c.env("LD_PRELOAD", lib());
    c.envs(vars.iter().map(|(k, v)| (k, v)));
    let mut child = c.spawn().expect("spawn echo_server");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut s);
        s
    });
    let next = |prefix: &str| loop {
        let l = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no {prefix} line within 10 s"));
        if l.starts_with(prefix) {
            return l;
        }
    };
    let port: u16 = field(&next("READY"), "port").parse().unwrap();
    let _c1 = ping(port);
    let fd: i32 = field(&next("ACCEPT"), "fd").parse().unwrap();
    let got = keepalive_of(pid, fd);
    let _c2 = ping(port);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("echo_server did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "echo_server exited with {status}");
    let err = err_reader.join().unwrap();
    (got, String::from_utf8(err).expect("keepfix's log is valid UTF-8 (non-ASCII is escaped)"))
}

/// Every stderr line is keepfix's, one line each, printable ASCII only.
fn check_log(err: &str) {
    for l in err.lines() {
        assert!(l.starts_with("keepfix["), "a line that is not keepfix's (a value broke a line?): {l:?}");
        assert!(l.bytes().all(|b| (0x20..0x7f).contains(&b)), "raw byte in {l:?}");
    }
}

fn hostile_values() -> Vec<Vec<u8>> {
    vec![
        b"\x1b[31mred\x1b[0m\nkeepfix[1]: config forged line".to_vec(),
        vec![0xff, 0xfe, b'1', 0x80, b's'],
        "x".repeat(100_000).into_bytes(),
        "9".repeat(5000).into_bytes(),
        b"-1".to_vec(),
        b"1e9".to_vec(),
        "\u{202e}evil\u{200b}".as_bytes().to_vec(),
        b"%s%s%s%n".to_vec(),
        b"relative/../../etc/passwd".to_vec(),
        b"\t\r\n".to_vec(),
    ]
}

#[test]
fn garbage_in_every_variable_runs_with_defaults_and_clear_lines() {
    for (round, value) in hostile_values().into_iter().enumerate() {
        let vars: Vec<(OsString, OsString)> =
            config::VARIABLES.iter().map(|k| (OsString::from(k), OsString::from_vec(value.clone()))).collect();
        let t0 = Instant::now();
        let (got, err) = run_with(&vars);
        assert_eq!(got, ka(60, 10, 6), "round {round}: default keepalive expected; stderr:\n{err}");
        check_log(&err);
        // One error line per variable, each naming it (a blank value is the same as empty, which
        // switches, KEEPFIX_LOG and KEEPFIX_METRICS take as their default: those may be silent).
        for v in config::VARIABLES {
            let n = err.lines().filter(|l| l.contains(&format!("config {v}="))).count();
            assert!(n <= 1, "round {round}: {n} lines for {v}:\n{err}");
            if !value.trim_ascii().is_empty() {
                assert_eq!(n, 1, "round {round}: no line for {v}:\n{err}");
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "round {round} took {:?}", t0.elapsed());
    }
}

#[test]
fn garbage_variable_names_are_reported_not_fatal() {
    let vars = vec![
        (OsString::from("KEEPFIX_IDEL"), OsString::from("5")),
        (OsString::from("KEEPFIX_".to_string() + &"Z".repeat(20_000)), OsString::from("1")),
        (OsString::from_vec(b"KEEPFIX_\xff\xfe".to_vec()), OsString::from("1")),
        (OsString::from("KEEPFIX_\u{1b}[2J"), OsString::from("1")),
    ];
    let (got, err) = run_with(&vars);
    assert_eq!(got, ka(60, 10, 6));
    check_log(&err);
    assert!(
        err.contains("config KEEPFIX_IDEL is not a keepfix variable; ignored (did you mean KEEPFIX_IDLE?)"),
        "{err}"
    );
}

proptest! {
    // Each case starts a real process: few cases, but random ones, on top of the fixed set above.
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_in_every_variable_never_break_the_program(values in prop::collection::vec(prop::collection::vec(1u8..=255, 0..200), 14)) {
        let vars: Vec<(OsString, OsString)> = config::VARIABLES
            .iter()
            .zip(values)
            // A value starting with '/' would be a real log file or metrics directory path: keep
            // the fuzzer from creating files at random places.
            .map(|(k, v)| match *k {
                "KEEPFIX_LOG" | "KEEPFIX_METRICS" => (OsString::from(k), OsString::from_vec([b"x".as_slice(), &v].concat())),
                _ => (OsString::from(k), OsString::from_vec(v)),
            })
            .collect();
        let (got, err) = run_with(&vars);
        check_log(&err);
        // Random bytes are almost never a valid timing, but when one is, it is taken: the socket
        // has either the default or the value the parser accepted.
        let m: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned())).collect();
        let (c, _) = parse_map(&m, false);
        if c.disable {
            prop_assert!(!got.on, "KEEPFIX_DISABLE accepted: the socket is left alone");
        } else {
            prop_assert_eq!((got.on, got.idle, got.intvl, got.cnt), (true, c.idle_s as i32, c.intvl_s as i32, c.cnt as i32));
        }
    }
}
