//! Section 2: the system calls keepfix adds per accepted connection, counted by strace.

use crate::{Ctx, Variant, extra_calls, output, status, strace_counts};
use std::collections::BTreeMap;
use std::process::Command;

fn server_strace(cx: &Ctx, v: &Variant, n: u64) -> BTreeMap<String, u64> {
    let lc = cx.p("load_client").to_path_buf();
    strace_counts(cx, v, "bench_server", &[format!("--count={n}"), "0".into()], |port| {
        output(Command::new(&lc).args([
            format!("--count={n}"),
            "--parallel=2".into(),
            "127.0.0.1".into(),
            port.to_string(),
        ]));
    })
}

pub fn run(cx: &mut Ctx) -> Vec<String> {
    let n = cx.plan.strace_conns;
    cx.say("## 2. Extra system calls per accepted connection\n");
    cx.say(&format!(
        "`strace -f -c` of `bench_server` serving {n} and then {} connections from `load_client --parallel=2`; \
         per connection = (calls at 2N − calls at N) / N, so start-up costs cancel out. \"Fixed\" is what is \
         left at N: keepfix's start (its thread, its own fds) and the watchdog's ticks, whatever the traffic.\n",
        2 * n
    ));
    cx.say("| variant | calls per connection | extra per connection vs plain | fixed extra (whole run) | fixed extra by call |");
    cx.say("|---|---|---|---|---|");
    let mut summary = vec![];
    let vs = cx.variants();
    for v in vs.iter().skip(1) {
        let (plain_per, per, fixed, diff) = extra_calls(cx, v, n, 1.0, &server_strace);
        cx.say(&format!("| {} | {:.2} | {:+.3} | {:+.0} | {} |", v.name, plain_per + per, per, fixed, diff));
        if v.name.starts_with("keepfix") {
            summary.push(format!(
                "| 2 | extra system calls per accepted connection, {} | 0 | {:+.3} | {} |",
                v.name,
                per,
                status(per.abs() < 0.05)
            ));
        }
    }
    cx.say(&format!(
        "\nCommand: `strace -f -c -o OUT -E LD_PRELOAD=target/release/libkeepfix.so \
         target/release/c-tests/bench_server --count={n} 0` (and `--count={}`), driven by \
         `load_client --count=N --parallel=2 127.0.0.1 PORT`. The plain server makes 4 calls per connection \
         (accept, read, write, close).\n",
        2 * n
    ));
    summary
}
