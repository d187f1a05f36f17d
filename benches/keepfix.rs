//! keepfix's benchmark suite: `cargo bench --bench keepfix` (about 10 minutes; with
//! `KEEPFIX_BENCH_QUICK=1`, a smoke run of about a minute).
//!
//! It builds the release libkeepfix.so and the sample C programs (c-tests/bench_*.c and
//! load_client), runs every measurement side by side with the plain program in the same run, in
//! alternating rounds (the order of the variants rotates each round), and writes BENCHMARKS.md
//! (quick mode: target/bench/BENCHMARKS-quick.md; `KEEPFIX_BENCH_OUT` overrides) with the machine,
//! its load, the method, the commands and the tables. A figure is a median over rounds, with the
//! spread (min..max); a ratio is taken within each round, against the plain run next to it.
//!
//! Other knobs: `cargo bench --bench keepfix -- 1 4` (or `KEEPFIX_BENCH_ONLY=1,4`) runs only the
//! sections whose names start with those (`2`, `4-5`; a selection that names no section is refused
//! before anything runs); `KEEPFIX_BENCH_SIZES=1000,10000` sets the connection counts of sections
//! 4-5; `KEEPFIX_BENCH_LIB=PATH` measures another build of libkeepfix.so (before/after comparisons).
//!
//! Layout: this file has `main`, the section list ([`sections!`]) and what the sections share (the
//! plan, the variants, [`Ctx`], [`alternate`], strace and bench_fdops runs). Each section is a file
//! of benches/keepfix/. Programs run through tests/common's [`common::Run`] and [`common::Proc`],
//! the integration tests' harness, which also builds the C programs.
//!
//! Needs: gcc, strace, valgrind (callgrind), and Debian's libkeepalive0 for the peer column
//! (installed with apt-get when missing and we are root; its columns are left out otherwise).
//! Root is needed for nothing else; RLIMIT_NOFILE is raised up to the hard limit only.

#[path = "../tests/common/mod.rs"]
mod common;

use common::Run;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The sections, in the order they run: `module => "N. name"`. Each is benches/keepfix/MODULE.rs,
/// whose `pub fn run(cx: &mut Ctx) -> Vec<String>` writes its part of BENCHMARKS.md into `cx.out`
/// and returns its rows of the summary table. Adding a section is its file and one line here.
macro_rules! sections {
    ($($module:ident => $name:literal,)*) => {
        #[path = "keepfix"]
        mod section {
            $(pub mod $module;)*
        }
        const SECTIONS: &[(&str, Section)] = &[$(($name, section::$module::run)),*];
    };
}

sections! {
    accept => "1. accept throughput",
    syscalls => "2. system calls",
    hook_cost => "3. hook cost",
    outbound => "6. outbound connect",
    watchdog_memory => "4-5. watchdog and memory",
    children => "7. children",
    rescue_pause => "8. rescue --release pause",
}

const LIBKEEPALIVE: &str = "/usr/lib/libkeepalive.so";

/// How big each measurement is: full (the published table) or quick (a smoke run).
struct Plan {
    quick: bool,
    /// Rounds of alternating variants for the timed measurements.
    rounds: usize,
    /// Connections per accept-throughput run.
    accept_conns: u64,
    /// Iterations per fd-call loop, and per connect() loop.
    fdops_iters: u64,
    connect_iters: u64,
    /// Connections per strace run (the second run has twice as many).
    strace_conns: u64,
    /// Held connections for the watchdog and memory measurements.
    hold_sizes: Vec<u64>,
    /// How long the watchdog's CPU time is watched, at each size.
    window: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 2,
                accept_conns: 3000,
                fdops_iters: 100_000,
                connect_iters: 2000,
                strace_conns: 500,
                hold_sizes: vec![1000, 5000],
                window: Duration::from_secs(6),
            }
        } else {
            Plan {
                quick,
                rounds: 7,
                accept_conns: 20_000,
                fdops_iters: 1_000_000,
                connect_iters: 10_000,
                strace_conns: 2000,
                hold_sizes: vec![1000, 10_000, 50_000, 100_000],
                window: Duration::from_secs(60),
            }
        }
    }
}

/// A way to run a program: plain, or with a preload library and its environment.
#[derive(Clone)]
struct Variant {
    name: &'static str,
    preload: Option<PathBuf>,
    env: Vec<(&'static str, &'static str)>,
}

impl Variant {
    fn apply(&self, c: &mut Command) {
        c.env_remove("LD_PRELOAD");
        for (k, _) in std::env::vars() {
            if k.starts_with("KEEPFIX_") {
                c.env_remove(k);
            }
        }
        if let Some(p) = &self.preload {
            c.env("LD_PRELOAD", p);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
    }
    /// `prog`, run this way through tests/common's harness (the environment cleared of KEEPFIX_
    /// variables and LD_PRELOAD first, as `apply` does).
    fn run(&self, prog: &Path) -> Run {
        let mut r = Run::path(prog.to_path_buf()).plain();
        if let Some(p) = &self.preload {
            r = r.env("LD_PRELOAD", p.to_str().expect("a UTF-8 library path"));
        }
        for (k, v) in &self.env {
            r = r.env(k, v);
        }
        r
    }
    /// The environment as a shell prefix, for the commands printed in BENCHMARKS.md.
    fn shell(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            let _ = write!(s, "{k}={v} ");
        }
        if let Some(p) = &self.preload {
            let shown = if p.starts_with(common::root()) {
                p.strip_prefix(common::root()).unwrap_or(p).display().to_string()
            } else {
                p.display().to_string()
            };
            let _ = write!(s, "LD_PRELOAD={shown} ");
        }
        s
    }
}

/// median, min and max of a sample.
#[derive(Clone, Copy, Default)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(xs: &[f64]) -> Stat {
    if xs.is_empty() {
        return Stat { median: f64::NAN, min: f64::NAN, max: f64::NAN };
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Stat { median, min: v[0], max: v[n - 1] }
}

impl Stat {
    fn show(&self, digits: usize) -> String {
        format!("{:.d$} ({:.d$}..{:.d$})", self.median, self.min, self.max, d = digits)
    }
}

fn field(line: &str, key: &str) -> f64 {
    common::field(line, key).parse().unwrap_or_else(|_| panic!("no number {key}= in {line:?}"))
}

/// Runs a command to the end and returns its stdout.
fn output(c: &mut Command) -> String {
    let o = c.stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sh(cmd: &str) -> String {
    output(Command::new("sh").args(["-c", cmd])).trim().to_string()
}

/// The soft limit to give the programs: the hard limit, capped (keepfix's fd table does not care).
fn hard_nofile() -> u64 {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit into a local.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
    l.rlim_max.min(1 << 20)
}

struct Ctx {
    plan: Plan,
    plain: Variant,
    keepfix: Variant,
    close: Variant,
    libka: Option<Variant>,
    prog: BTreeMap<&'static str, PathBuf>,
    out: String,
    /// Why a goal was missed, one paragraph each, for the summary.
    gaps: Vec<String>,
}

impl Ctx {
    fn p(&self, name: &str) -> &Path {
        &self.prog[name]
    }
    fn say(&mut self, s: &str) {
        self.out.push_str(s);
        self.out.push('\n');
    }
    /// The variants compared for the accept and socket measurements: plain first.
    fn variants(&self) -> Vec<Variant> {
        let mut v = vec![self.plain.clone(), self.keepfix.clone(), self.close.clone()];
        v.extend(self.libka.clone());
        v
    }
}

/// One figure of one variant over the rounds, and its ratio to plain's in each round.
struct Series {
    vals: Vec<f64>,
    ratios: Vec<f64>,
}

/// Runs `f` for every variant (plain first in `vs`), `rounds` times, the order rotating each
/// round. `f` measures two figures; each comes back per variant as a [`Series`].
fn alternate(vs: &[Variant], rounds: usize, mut f: impl FnMut(&Variant) -> (f64, f64)) -> Vec<(Series, Series)> {
    let mut vals = vec![vec![(0.0, 0.0); rounds]; vs.len()];
    for r in 0..rounds {
        for k in 0..vs.len() {
            let i = (k + r) % vs.len();
            vals[i][r] = f(&vs[i]);
        }
        eprintln!("  round {}/{rounds}: {:?}", r + 1, vals.iter().map(|v| v[r].0.round()).collect::<Vec<_>>());
    }
    let series = |i: usize, pick: fn(&(f64, f64)) -> f64| {
        let v: Vec<f64> = vals[i].iter().map(pick).collect();
        let ratios = v.iter().zip(vals[0].iter().map(pick)).map(|(a, b)| a / b).collect();
        Series { vals: v, ratios }
    };
    (0..vs.len()).map(|i| (series(i, |x| x.0), series(i, |x| x.1))).collect()
}

/// The sections asked for: the arguments (`cargo bench --bench keepfix -- 2 3`; cargo's own
/// `--bench` flag and any other flag are not selections), else KEEPFIX_BENCH_ONLY (`2,3`). None: all.
fn selection() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if !args.is_empty() {
        return Some(args);
    }
    let only = std::env::var("KEEPFIX_BENCH_ONLY").ok()?;
    Some(only.split(',').map(|o| o.trim().to_string()).collect())
}

/// Is `section` one of those selected (a selection is a prefix of its name: `2`, `4-5`)?
fn wanted(selected: &Option<Vec<String>>, section: &str) -> bool {
    selected.as_ref().is_none_or(|s| s.iter().any(|o| section.starts_with(o.as_str())))
}

/// One part of the suite: writes its section into `Ctx::out`, returns its summary rows.
type Section = fn(&mut Ctx) -> Vec<String>;

fn main() {
    let quick = std::env::var("KEEPFIX_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut plan = Plan::new(quick);
    if let Ok(v) = std::env::var("KEEPFIX_BENCH_SIZES") {
        plan.hold_sizes = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    }
    let selected = selection();
    for s in selected.iter().flatten() {
        if !SECTIONS.iter().any(|(name, _)| name.starts_with(s.as_str())) {
            let names: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
            eprintln!("keepfix bench: no section starts with {s:?}; the sections are: {}", names.join(", "));
            std::process::exit(2);
        }
    }
    let t_start = Instant::now();
    let load_start = sh("cat /proc/loadavg");
    eprintln!("keepfix bench ({} mode); load: {load_start}", if quick { "quick" } else { "full" });

    // KEEPFIX_BENCH_LIB: measure another build (a before/after comparison), not this tree's.
    let lib = std::env::var_os("KEEPFIX_BENCH_LIB").map(PathBuf::from).unwrap_or_else(common::lib);
    let mut prog = BTreeMap::new();
    for name in ["bench_server", "bench_fdops", "bench_hold_client", "leak_noread_server", "load_client"] {
        prog.insert(name, common::c_program(name));
    }
    let libka = ensure_libkeepalive().then(|| Variant {
        name: "libkeepalive",
        preload: Some(PathBuf::from(LIBKEEPALIVE)),
        // The same timings as keepfix's defaults, so both do the same work.
        env: vec![("KEEPIDLE", "60"), ("KEEPINTVL", "10"), ("KEEPCNT", "6")],
    });
    let mut cx = Ctx {
        plan,
        plain: Variant { name: "plain", preload: None, env: vec![] },
        keepfix: Variant { name: "keepfix", preload: Some(lib.clone()), env: vec![] },
        close: Variant { name: "keepfix close", preload: Some(lib), env: vec![("KEEPFIX_CLOSE_WAIT", "close")] },
        libka,
        prog,
        out: String::new(),
        gaps: vec![],
    };

    let mut summary = Vec::new();
    let mut body = String::new();
    for &(name, f) in SECTIONS {
        if !wanted(&selected, name) {
            continue;
        }
        eprintln!("== {name}");
        cx.out.clear();
        summary.extend(f(&mut cx));
        body.push_str(&cx.out);
    }
    let load_end = sh("cat /proc/loadavg");
    let doc = document(&cx, &summary, &body, &load_start, &load_end, t_start.elapsed());
    let out = std::env::var_os("KEEPFIX_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| {
        if quick {
            common::target_dir().join("../bench/BENCHMARKS-quick.md")
        } else {
            common::root().join("BENCHMARKS.md")
        }
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).expect("output dir");
    }
    std::fs::write(&out, doc).expect("write BENCHMARKS.md");
    eprintln!("wrote {} in {:.0?}", out.display(), t_start.elapsed());
}

/// Installs Debian's libkeepalive0 if it is missing (as root, with apt-get). False if unavailable.
fn ensure_libkeepalive() -> bool {
    if Path::new(LIBKEEPALIVE).exists() {
        return true;
    }
    eprintln!("installing libkeepalive0 (the peer column) with apt-get");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "libkeepalive0"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    Path::new(LIBKEEPALIVE).exists()
}

fn document(cx: &Ctx, summary: &[String], body: &str, load0: &str, load1: &str, took: Duration) -> String {
    let mut d = String::new();
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    let _ = writeln!(d, "# keepfix benchmarks\n");
    let _ = writeln!(
        d,
        "Generated by `{}cargo bench --bench keepfix` ({} mode, {:.0} s). Every figure comes from that one run; \
         re-run it to reproduce them. The suite lives in [`benches/keepfix.rs`](benches/keepfix.rs) and [`benches/keepfix/`](benches/keepfix/) and drives the \
         C programs of [`c-tests/`](c-tests/README.md) (`bench_server`, `bench_fdops`, `bench_hold_client`, \
         `leak_noread_server`, `load_client`), built with `gcc -O2` into `target/release/c-tests/`.\n",
        if cx.plan.quick { "KEEPFIX_BENCH_QUICK=1 " } else { "" },
        if cx.plan.quick { "quick" } else { "full" },
        took.as_secs_f64()
    );
    let _ = writeln!(d, "## Machine\n");
    let _ = writeln!(d, "| | |\n|---|---|");
    let _ = writeln!(d, "| CPU | {} × {} |", sh("nproc"), cpu.trim());
    let _ = writeln!(d, "| kernel | {} |", sh("uname -r"));
    let _ = writeln!(d, "| C library | {} |", sh("ldd --version | head -1"));
    let _ = writeln!(d, "| compiler | {}, gcc {} |", sh("rustc --version"), sh("gcc -dumpfullversion"));
    let _ = writeln!(d, "| RLIMIT_NOFILE hard limit | {} |", hard_nofile());
    let _ = writeln!(
        d,
        "| load average (1, 5, 15 min) at start | {} |",
        load0.split(' ').take(3).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(d, "| load average at end | {} |", load1.split(' ').take(3).collect::<Vec<_>>().join(", "));
    let _ = writeln!(
        d,
        "\nThe machine is shared with other engineers' builds and test runs; the load averages above say how \
         busy it was around this run. That is why every timed figure is a median over alternating rounds with its \
         spread, and why the system call and instruction counts (exact, load-independent) carry the weight of \
         the zero-cost claims.\n"
    );
    let _ = writeln!(d, "## Method\n");
    let _ = writeln!(
        d,
        "- **Side by side.** Each timed measurement runs every variant (plain, keepfix with defaults, keepfix \
         with `KEEPFIX_CLOSE_WAIT=close`, and Debian's libkeepalive0 configured with the same timings: \
         `KEEPIDLE=60 KEEPINTVL=10 KEEPCNT=6`) once per round, the order rotating from round to round. A ratio \
         is computed inside each round against the plain run of that round; the table gives the median over \
         rounds and the spread as (min..max).\n\
         - **Counts, not only times.** System calls are counted with `strace -f -c` (all threads, keepfix's \
         watchdog included) at N and 2N connections; the difference divided by N is the per-connection figure, \
         free of start-up costs. Instructions are counted with valgrind's callgrind the same way (N and 2N \
         iterations).\n\
         - **Only the server is preloaded** in the accept and watchdog measurements; the load client is plain.\n"
    );
    let _ = writeln!(d, "## Summary\n");
    let _ = writeln!(d, "| # | measure | goal | result | status |\n|---|---|---|---|---|");
    for s in summary {
        let _ = writeln!(d, "{s}");
    }
    d.push('\n');
    if !cx.gaps.is_empty() {
        let _ = writeln!(d, "### Where a goal is not met, and why\n");
        for g in &cx.gaps {
            let _ = writeln!(d, "- {g}");
        }
        d.push('\n');
    }
    d.push_str(CHANGES);
    d.push('\n');
    d.push_str(body);
    d
}

/// What the suite found and what was changed for it (history: measured before and after each
/// change, with the command given).
const CHANGES: &str = "## Changes made for these goals\n\n\
- **The fd count is one fstat** (src/ownfd.rs `open_fd_count`, used by `nofile::count_open_fds`). The \
first run of section 4 showed the watchdog's steady tick growing with the connections: 8.65 ms at \
10,000 and 18.4 ms at 19,000, 0.15% and 0.30% of a core. The cause: the RLIMIT_NOFILE monitor counted \
the fds exactly by reading /proc/self/fd (about a microsecond per fd), every tick once the kernel's fd \
table size passed half the warning level, once a minute otherwise. Since Linux 6.2 the size of \
/proc/PID/fd is the count itself; older kernels report 0 and keep the directory read. After: 0.054 ms \
and 0.098 ms, 0.006% and 0.012% of a core (`KEEPFIX_BENCH_QUICK=1 KEEPFIX_BENCH_ONLY=4 \
KEEPFIX_BENCH_SIZES=10000,19000 cargo bench --bench keepfix`, with `KEEPFIX_BENCH_LIB=` pointing at the \
build before the change for the first figures).\n\
- **Fixed in the suite itself:** `strace -c`'s `total` row is not a system call (counting it doubled \
every figure); bench_fdops's warm-up iterations are counted in its strace runs (N + N/10); CPU time \
rather than wall time for the loops, since on this loaded machine wall time mostly measures waiting \
for a CPU.\n";

fn status(met: bool) -> &'static str {
    if met { "met" } else { "**not met** (see below)" }
}

// --- Measurements shared by several sections -----------------------------------------------------

/// `strace -f -c` of a program; returns the calls per system call name.
fn strace_counts(
    cx: &Ctx,
    v: &Variant,
    prog: &str,
    args: &[String],
    driver: impl FnOnce(u16),
) -> BTreeMap<String, u64> {
    let file = std::env::temp_dir().join(format!("keepfix-bench-strace-{}.txt", std::process::id()));
    let mut sargs: Vec<String> = vec!["-f".into(), "-c".into(), "-o".into(), file.display().to_string()];
    for (k, val) in &v.env {
        sargs.push(format!("-E{k}={val}"));
    }
    if let Some(p) = &v.preload {
        sargs.push(format!("-ELD_PRELOAD={}", p.display()));
    }
    sargs.push(cx.p(prog).display().to_string());
    sargs.extend(args.iter().cloned());
    let mut p = Run::path("strace".into()).plain().args(sargs).spawn();
    if prog == "bench_server" {
        let port = p.port();
        driver(port);
        p.expect_within("STATS", Duration::from_secs(60));
    } else {
        p.expect_within("RESULT", Duration::from_secs(120));
    }
    p.finish();
    let text = std::fs::read_to_string(&file).expect("strace output");
    let _ = std::fs::remove_file(&file);
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        let name = cols.last().copied().unwrap_or("");
        if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() && name != "total" {
            if let Ok(calls) = cols[3].parse::<u64>() {
                m.insert(name.to_string(), calls);
            }
        }
    }
    m
}

fn total(m: &BTreeMap<String, u64>) -> i64 {
    m.values().sum::<u64>() as i64
}

/// Extra calls of `v` over plain: (plain's calls per unit of work, extra per unit, fixed extra,
/// the calls whose count differs at `n`). `run(n)` does `n × units` units of work.
fn extra_calls(
    cx: &Ctx,
    v: &Variant,
    n: u64,
    units: f64,
    run: &dyn Fn(&Ctx, &Variant, u64) -> BTreeMap<String, u64>,
) -> (f64, f64, f64, String) {
    let (p1, p2) = (run(cx, &cx.plain, n), run(cx, &cx.plain, 2 * n));
    let (k1, k2) = (run(cx, v, n), run(cx, v, 2 * n));
    let work = n as f64 * units;
    let plain_per = (total(&p2) - total(&p1)) as f64 / work;
    let per = (total(&k2) - total(&k1)) as f64 / work - plain_per;
    let fixed = (total(&k1) - total(&p1)) as f64 - per * work;
    let mut diff = vec![];
    for (name, &c) in &k1 {
        let d = c as i64 - p1.get(name).copied().unwrap_or(0) as i64;
        if d != 0 {
            diff.push(format!("{name} {d:+}"));
        }
    }
    (plain_per, per, fixed, diff.join(", "))
}

/// (wall ns, CPU ns) per iteration of a bench_fdops loop.
fn fdops_ns(cx: &Ctx, v: &Variant, mode: &str, n: u64, peer: Option<u16>) -> (f64, f64) {
    let mut c = Command::new(cx.p("bench_fdops"));
    c.args([mode.to_string(), n.to_string()]);
    if let Some(port) = peer {
        c.args(["127.0.0.1".to_string(), port.to_string()]);
    }
    v.apply(&mut c);
    let out = output(&mut c);
    assert_eq!(field(&out, "failed"), 0.0, "bench_fdops {mode}: {out}");
    (field(&out, "ns_per_iter"), field(&out, "cpu_ns_per_iter"))
}
