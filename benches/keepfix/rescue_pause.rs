//! Section 8: how long `keepfix rescue --release` stops a running server, at 1, 100 and 1000
//! sockets to release (issue 14: "no stop longer than about 10 ms").
//!
//! Each round starts a fresh `rescue_parked --threads` (11 threads: the poll() server and ten
//! threads parked in blocking calls or writing a file), started without keepfix, leaks N
//! connections into CLOSE_WAIT, and runs `keepfix rescue --release --after 0s --json` on it once.
//! The figures are keepfix's own: from the first PTRACE_INTERRUPT to the last detach of each stop.

use crate::{Ctx, common, stat};
use std::time::Duration;

/// One round at `n` sockets: (longest stop ms, number of stops, total stopped ms, threads).
fn round(n: usize) -> (f64, f64, f64, f64) {
    let mut p = common::Run::new("rescue_parked").plain().nofile(4096).args(["--threads", "0"]).spawn();
    let port = p.port();
    for _ in 0..n {
        drop(common::ping(port));
        p.expect("EOF");
    }
    let pid = p.pid();
    common::eventually("the leaked sockets in CLOSE_WAIT", Duration::from_secs(30), || {
        common::tcp_fds(pid).iter().filter(|s| s.state == common::CLOSE_WAIT).count() == n
    });
    let out = std::process::Command::new(common::keepfix_bin())
        .args(["rescue", "--release", "--after", "0s", "--json", &pid.to_string()])
        .output()
        .expect("keepfix rescue");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rescue --json");
    let r = &json["processes"][0]["release"];
    let released = r["released"].as_array().map_or(0, Vec::len);
    assert_eq!(released, n, "rescue --release released {released} of {n}: {r}");
    let ms = |k: &str| r[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let (_, status) = p.stop();
    assert!(status.success(), "rescue_parked after the release: {status}");
    (
        ms("longest_stop_us"),
        r["stops"].as_f64().unwrap_or(f64::NAN),
        ms("total_stop_us"),
        r["threads"].as_f64().unwrap_or(0.0),
    )
}

pub fn run(cx: &mut Ctx) -> Vec<String> {
    let rounds = if cx.plan.quick { 3 } else { 10 };
    cx.say("## 8. `keepfix rescue --release`: how long the process is stopped\n");
    cx.say(&format!(
        "`target/release/c-tests/rescue_parked --threads 0` (11 threads, started without keepfix), N connections \
         leaked into CLOSE_WAIT, then `keepfix rescue --release --after 0s --json PID`, {rounds} rounds per N, a \
         fresh server each. A stop lasts from the first PTRACE_INTERRUPT to the last detach; keepfix ends a \
         batch when a stop nears 10 ms and stops the process again for the rest.\n"
    ));
    cx.say(
        "| sockets released | threads | stops | longest stop, ms | all stops together, ms | stopped µs per socket |",
    );
    cx.say("|---|---|---|---|---|---|");
    let mut worst = 0f64;
    let mut longest_at = vec![];
    for n in [1usize, 100, 1000] {
        let rs: Vec<(f64, f64, f64, f64)> = (0..rounds).map(|_| round(n)).collect();
        let longest = stat(&rs.iter().map(|r| r.0).collect::<Vec<_>>());
        let stops = stat(&rs.iter().map(|r| r.1).collect::<Vec<_>>());
        let total = stat(&rs.iter().map(|r| r.2).collect::<Vec<_>>());
        let per = stat(&rs.iter().map(|r| r.2 * 1000.0 / n as f64).collect::<Vec<_>>());
        worst = worst.max(longest.max);
        longest_at.push(format!("{n}: {:.2} ms", longest.median));
        cx.say(&format!(
            "| {n} | {} | {} | {} | {} | {} |",
            rs.first().map_or(0.0, |r| r.3),
            stops.show(0),
            longest.show(2),
            total.show(2),
            per.show(1)
        ));
        eprintln!("  {n} sockets: longest stop {}", longest.show(2));
    }
    cx.say(
        "\nThe stop of a batch is: interrupting every thread and waiting for each to reach its stop (the \
         threads must be scheduled to get there, so a loaded machine lengthens it), then per socket a \
         pidfd_getfd, fstat and TCP_INFO, one injected dup3 (two ptrace syscall stops) and the close of \
         keepfix's duplicate (the socket is freed there), then the restore and the detach. The fd flags are \
         read from /proc/PID/fdinfo before the stop.\n",
    );
    let met = if worst <= 12.0 { "met" } else { "not met on this run (see section 8)" };
    vec![format!(
        "| 7 | rescue --release: longest stop of the process (median at {}) | about 10 ms | worst {worst:.2} ms | {met} |",
        longest_at.join(", ")
    )]
}
