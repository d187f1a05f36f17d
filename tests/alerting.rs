//! Fleet alerting (issue 15, item 4): examples/prometheus/keepfix-alerts.yml and its unit tests,
//! and examples/grafana/keepfix-dashboard.json, checked with promtool (Debian's `prometheus`
//! package) against what keepfix really writes:
//! - `promtool check metrics` on the metrics file of a real server under keepfix;
//! - `promtool check rules` on the alert rules, and `promtool test rules` on their unit tests
//!   (each alert fires where it should and stays quiet where it should);
//! - every metric and label value the rules and the dashboard name is in that real file, and
//!   every dashboard query is valid PromQL (promtool checks it as a recording rule).
//!
//! Needs promtool: without it each test fails with the install command (`.ci/run` installs it),
//! here as under CI, so that a missing tool shows in the harness's summary.
//!
//! Checked to fail without the feature: a metric renamed in src/event.rs
//! (keepfix_close_wait_oldest_seconds → keepfix_close_wait_oldest_age) fails
//! the_rules_and_the_dashboard_name_only_what_keepfix_writes; a rule's `for: 5m` removed fails
//! promtool test rules (the alert fires while it should still be pending).
mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn examples() -> PathBuf {
    root().join("examples")
}

fn rules_file() -> PathBuf {
    examples().join("prometheus/keepfix-alerts.yml")
}

fn dashboard() -> Value {
    let p = examples().join("grafana/keepfix-dashboard.json");
    let text = std::fs::read_to_string(&p).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not valid JSON: {e}", p.display()))
}

/// promtool, or a failure that says how to install it.
fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "promtool is not installed: apt-get install prometheus (.ci/run does). It checks the alert rules, their unit tests and a real metrics file"
    );
    Command::new("promtool")
}

/// Runs promtool; its output on failure.
fn run(mut c: Command, what: &str) -> String {
    let o = c.output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{what} failed ({}):\n{out}", o.status);
    out
}

/// A real metrics file: leak_eof_server under keepfix in close mode, after it released one leak
/// (so that the CLOSE_WAIT counters have counted something).
fn real_metrics_file() -> String {
    let dir = TempDir::new("alerting");
    let mut p = Run::new("leak_eof_server")
        .env("KEEPFIX_METRICS", dir.str())
        .env("KEEPFIX_SCAN_INTERVAL", "100ms")
        .env("KEEPFIX_CLOSE_WAIT", "close")
        .env("KEEPFIX_CLOSE_WAIT_AFTER", "0s")
        .args(["0"])
        .spawn();
    let port = p.port();
    drop(ping(port));
    let pid = p.pid();
    eventually("the metrics file counts the released leak", Duration::from_secs(10), || {
        metrics(dir.path(), pid)
            .is_some_and(|m| m.get("keepfix_close_wait_actions_total{action=\"shutdown\"}") == Some(&1.0))
    });
    std::fs::read_to_string(dir.path().join(format!("keepfix-{pid}.prom"))).unwrap()
}

/// Metric name → the label values each label takes, in a metrics file.
fn names_and_labels(text: &str) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut m: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, _) = line.rsplit_once(' ').unwrap();
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let e = m.entry(name.to_string()).or_default();
        for (k, v) in matchers(labels.trim_end_matches('}')) {
            e.entry(k).or_default().insert(v);
        }
    }
    m
}

/// The `label="value"` pairs (equality only) in a selector's or a series' braces.
fn matchers(inner: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = inner;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].rsplit([',', '{', ' ']).next().unwrap_or("").trim();
        let after = &rest[eq + 2..];
        let end = after.find('"').unwrap_or(after.len());
        // `=~` and `!=` are regular expressions or negations: only plain equality is a value.
        if !key.is_empty() && !key.ends_with(['!', '~']) && !rest[..eq].ends_with(['!', '~']) {
            out.push((key.to_string(), after[..end].to_string()));
        }
        rest = &after[(end + 1).min(after.len())..];
    }
    out
}

/// Each `keepfix_…` metric named in `text`, with the label values its selectors ask for.
fn selectors(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = vec![];
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("keepfix_").map(|j| i + j) {
        let starts_word = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
        let end = text[at..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).map_or(text.len(), |j| at + j);
        if starts_word {
            let labels = if text[end..].starts_with('{') {
                let close = text[end..].find('}').map_or(text.len(), |j| end + j);
                matchers(&text[end + 1..close])
            } else {
                vec![]
            };
            out.push((text[at..end].to_string(), labels));
        }
        i = end;
    }
    out
}

/// Every `expr` of the dashboard's panels and of their targets.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn promtool_check_metrics_accepts_a_real_metrics_file() {
    let mut c = promtool();
    let text = real_metrics_file();
    assert!(text.starts_with("# keepfix pid="), "{text}");
    c.args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    // Lint findings (a counter without _total, a missing HELP…) are printed, and fail the check.
    assert!(o.status.success() && out.trim().is_empty(), "promtool check metrics ({}):\n{out}\n{text}", o.status);
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let mut c = promtool();
    c.args(["check", "rules"]).arg(rules_file());
    let out = run(c, "promtool check rules");
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let mut c = promtool();
    c.args(["test", "rules", "keepfix-alerts.test.yml"]).current_dir(examples().join("prometheus"));
    let out = run(c, "promtool test rules");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Each alert of the rules file has a unit test that expects it to fire, and one quiet case.
#[test]
fn every_alert_has_a_firing_and_a_quiet_test() {
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let tests = std::fs::read_to_string(examples().join("prometheus/keepfix-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 8, "{alerts:?}");
    // The tests' `alertname: X` lines, each followed by its expectation.
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(a) = l.strip_prefix("alertname: ") {
            match lines.get(i + 1) {
                Some(&"exp_alerts: []") => quiet.insert(a),
                Some(&"exp_alerts:") => fired.insert(a),
                other => panic!("alertname {a} is followed by {other:?}"),
            };
        }
    }
    for a in &alerts {
        assert!(
            fired.contains(a) && quiet.contains(a),
            "{a}: fires in a test {}, quiet in one {}",
            fired.contains(a),
            quiet.contains(a)
        );
        assert!(rules.contains(&format!("- alert: {a}\n")), "{a}");
    }
    // Every rule tells the on-call engineer what to do.
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap();
        assert!(block.contains("summary:") && block.contains("description:"), "{name} lacks a summary or description");
        assert!(block.contains("keepfix status"), "{name}'s description names no `keepfix status`");
    }
}

#[test]
fn the_rules_and_the_dashboard_name_only_what_keepfix_writes() {
    let mut c = promtool();
    let real = names_and_labels(&real_metrics_file());
    let event_rs = std::fs::read_to_string(root().join("src/event.rs")).unwrap();
    let conditional: BTreeSet<String> = selectors(&event_rs)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| event_rs.contains(&format!("\"{n}\"")) && !real.contains_key(n))
        .collect();
    assert!(conditional.contains("keepfix_fds_used_min"), "{conditional:?}");
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let mut exprs = vec![];
    dashboard_exprs(&dashboard(), &mut exprs);
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut used = BTreeSet::new();
    for (source, text) in
        std::iter::once(("keepfix-alerts.yml", rules.clone())).chain(exprs.iter().map(|e| ("the dashboard", e.clone())))
    {
        for (name, labels) in selectors(&text) {
            let Some(have) = real.get(&name) else {
                // Written only in a state the real file is not in (keepfix_fds_used_min: no fd
                // count could be taken), and named in the one module that owns the names.
                assert!(
                    labels.is_empty() && conditional.contains(&name),
                    "{source} names {name}, which keepfix does not write (it writes {:?})",
                    real.keys()
                );
                used.insert(name);
                continue;
            };
            for (k, v) in labels {
                assert!(
                    have.get(&k).is_some_and(|vs| vs.contains(&v)),
                    "{source}: {name}{{{k}=\"{v}\"}} matches nothing keepfix writes ({have:?})"
                );
            }
            used.insert(name);
        }
        for w in
            text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("node_textfile_"))
        {
            assert!(["node_textfile_mtime_seconds", "node_textfile_scrape_error"].contains(&w), "{source}: {w}");
        }
    }
    for must in [
        "keepfix_close_wait_oldest_seconds",
        "keepfix_fds_used",
        "keepfix_fds_limit",
        "keepfix_emfile_total",
        "keepfix_log_dropped_total",
        "keepfix_up",
    ] {
        assert!(used.contains(must), "nothing uses {must}");
    }

    // The dashboard's queries are PromQL: promtool checks them as recording rules, with
    // Grafana's variables given values.
    let mut yml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let q = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("$program", ".*")
            .replace("$pid", ".*");
        yml.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&q).unwrap()
        ));
    }
    let dir = TempDir::new("dashboard-rules");
    let f = dir.path().join("dashboard.yml");
    std::fs::write(&f, &yml).unwrap();
    c.args(["check", "rules"]).arg(&f);
    run(c, &format!("promtool check rules on the dashboard's queries\n{yml}"));
}

#[test]
fn the_dashboard_is_a_grafana_dashboard() {
    let d = dashboard();
    assert_eq!(d["uid"], "keepfix");
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(vars, ["datasource", "instance", "program", "pid"]);
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "{} has no query", p["title"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
}
