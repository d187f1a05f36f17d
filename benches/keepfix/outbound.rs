//! Section 6: outbound sockets, the cost of keepalive per connect().

use crate::{Ctx, Variant, alternate, extra_calls, fdops_ns, stat, strace_counts};

pub fn run(cx: &mut Ctx) -> Vec<String> {
    let n = cx.plan.connect_iters;
    let mut sink = cx.plain.run(cx.p("bench_server")).args(["--sink", "0"]).spawn();
    let port = sink.port();
    let mut vs = vec![cx.plain.clone(), cx.keepfix.clone()];
    vs.extend(cx.libka.clone());
    let res = alternate(&vs, cx.plan.rounds, |v| fdops_ns(cx, v, "connect", n, Some(port)));
    let sn = cx.plan.strace_conns;
    cx.say("## 6. Outbound sockets: the cost of keepalive per connect()\n");
    cx.say(&format!(
        "`bench_fdops connect {n} 127.0.0.1 PORT`: socket(), blocking connect() to a plain `bench_server --sink` \
         (accepts and closes), SO_LINGER {{1, 0}} and close() (a reset: without it the TIME_WAIT sockets of \
         earlier runs exhaust the ephemeral ports and connect() times become the kernel's port search); {} \
         alternating rounds, CPU time of the connecting process. System calls \
         per connect from `strace -f -c` at N and 2N ({sn} and {} connects, plus the 10% warm-up).\n",
        cx.plan.rounds,
        2 * sn
    ));
    cx.say("| variant | CPU ns per socket+connect+linger+close | CPU ratio to plain | extra CPU ns per connect | wall ns | extra system calls per connect | extra system calls per never-connected socket |");
    cx.say("|---|---|---|---|---|---|---|");
    let connect_run = |cx: &Ctx, v: &Variant, k: u64| {
        strace_counts(
            cx,
            v,
            "bench_fdops",
            &["connect".into(), k.to_string(), "127.0.0.1".into(), port.to_string()],
            |_| {},
        )
    };
    let socket_run = |cx: &Ctx, v: &Variant, k: u64| {
        strace_counts(cx, v, "bench_fdops", &["socket_close".into(), k.to_string()], |_| {})
    };
    let mut summary = vec![];
    let plain_med = stat(&res[0].1.vals).median;
    for (i, (v, (wall, cpu))) in vs.iter().zip(&res).enumerate() {
        let (calls, sock_calls) = if i == 0 {
            (0.0, 0.0)
        } else {
            // bench_fdops runs N + N/10 iterations (its warm-up).
            (extra_calls(cx, v, sn, 1.1, &connect_run).1, extra_calls(cx, v, sn, 1.1, &socket_run).1)
        };
        let extra_ns = stat(&cpu.vals).median - plain_med;
        cx.say(&format!(
            "| {} | {} | {} | {:+.0} | {} | {:+.2} | {:+.2} |",
            v.name,
            stat(&cpu.vals).show(0),
            stat(&cpu.ratios).show(3),
            extra_ns,
            stat(&wall.vals).show(0),
            calls,
            sock_calls
        ));
        if v.name == "keepfix" {
            summary.push(format!(
                "| 6 | outbound: extra work per connect(), keepfix | least correct work | {calls:+.2} system calls and {extra_ns:+.0} ns CPU per connect; {sock_calls:+.2} per never-connected socket | met (see section 6) |"
            ));
        }
    }
    sink.stop();
    cx.say(
        "\nCommands: `target/release/c-tests/bench_server --sink 0`, then \
         `[ENV] target/release/c-tests/bench_fdops connect N 127.0.0.1 PORT` and \
         `strace -f -c -o OUT -E LD_PRELOAD=target/release/libkeepfix.so target/release/c-tests/bench_fdops connect N 127.0.0.1 PORT`.\n\n\
         An outbound socket has no listener to inherit from, so keepalive costs one setsockopt per option: \
         SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT (TCP_USER_TIMEOUT only when configured). \
         Linux has no call that sets several socket options at once, and per-socket values are the only way to \
         get keepfix's timings without changing the machine-wide sysctls, so 4 calls is the least correct \
         work for a socket that connects. keepfix makes them at connect(), not at socket(): a socket that \
         never connects (or listens) costs nothing, where libkeepalive pays them in every socket() (last \
         column). They are made once per socket (a CONFIGURED flag in the table), so repeated connect() calls \
         on a non-blocking socket cost nothing more. Left on the table: a connect() that fails at once \
         (ECONNREFUSED, ENETUNREACH) has paid its 4 calls too; setting the options after connect() returns \
         0 or EINPROGRESS would spare them, at the price of a short window in which an established \
         connection has no keepalive yet.\n",
    );
    summary
}
