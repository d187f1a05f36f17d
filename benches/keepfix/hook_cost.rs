//! Section 3: what the hooks cost on fds that are not sockets (and on a never-connected socket),
//! in CPU time and in callgrind's instruction counts.

use crate::{Ctx, Stat, Variant, alternate, fdops_ns, stat, status};
use std::collections::BTreeMap;
use std::process::Command;

/// Instructions per iteration of a bench_fdops mode under callgrind, from N and 2N iterations.
fn instructions(cx: &Ctx, v: &Variant, mode: &str, n: u64) -> Option<f64> {
    let run = |n: u64| -> Option<f64> {
        let mut c = Command::new("valgrind");
        c.args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(cx.p("bench_fdops"))
            .args([mode.to_string(), n.to_string()]);
        v.apply(&mut c);
        let o = c.output().ok().filter(|o| o.status.success())?;
        let err = String::from_utf8_lossy(&o.stderr);
        let line = err.lines().find(|l| l.contains("Collected :"))?;
        line.rsplit(' ').next()?.trim().parse().ok()
    };
    // bench_fdops runs n + n/10 iterations.
    Some((run(2 * n)? - run(n)?) / (n as f64 * 1.1))
}

pub fn run(cx: &mut Ctx) -> Vec<String> {
    let n = cx.plan.fdops_iters;
    cx.say("## 3. Hook cost on non-socket fds\n");
    cx.say(&format!(
        "`bench_fdops MODE {n}`: a loop of {n} iterations timed inside the program (after a warm-up of {} \
         iterations), {} alternating rounds. `dupclose` is dup() of a pipe end plus close() (two hooked calls); \
         `pipe_rw` is a one-byte write() and read() on a pipe (write() is not hooked; read() is, for one \
         branch on its result: a read returning 0 is how keepfix learns that the program saw a connection's end); \
         `socket_close` is a TCP socket() closed without ever connecting. A `_tcp` loop runs in a process that \
         also holds a TCP listener, as a server does: keepfix's table and its watchdog thread exist then. The \
         ratio is on the process's CPU time per iteration (CLOCK_PROCESS_CPUTIME_ID, all threads), which time \
         spent waiting for a CPU on this loaded machine does not inflate; wall time is shown too. Instructions \
         per iteration are user-space instructions counted by callgrind (N and 2N iterations, subtracted): \
         exact and repeatable, they show what the hooks add without the noise of the shared machine.\n",
        n / 10,
        cx.plan.rounds
    ));
    cx.say("| loop | variant | CPU ns per iteration | CPU ratio to plain | wall ns per iteration | instructions per iteration |");
    cx.say("|---|---|---|---|---|---|");
    let mut summary = vec![];
    let cg_n = if cx.plan.quick { 5000 } else { 20_000 };
    let mut valgrind_failed = false;
    let mut ins_of: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for mode in ["dupclose", "dupclose_tcp", "pipe_rw", "pipe_rw_tcp", "socket_close"] {
        let mut vs = vec![cx.plain.clone(), cx.keepfix.clone()];
        if mode == "socket_close" {
            vs.extend(cx.libka.clone());
        }
        let res = alternate(&vs, cx.plan.rounds, |v| fdops_ns(cx, v, mode, n, None));
        let tcp = mode.ends_with("_tcp");
        for (v, (wall, cpu)) in vs.iter().zip(&res) {
            // callgrind with a TCP socket under keepfix: see the note below the table.
            let ins = if tcp { None } else { instructions(cx, v, mode, cg_n) };
            valgrind_failed |= ins.is_none() && !tcp;
            if let Some(i) = ins {
                ins_of.insert((mode, v.name), i);
            }
            cx.say(&format!(
                "| {mode} | {} | {} | {} | {} | {} |",
                v.name,
                stat(&cpu.vals).show(1),
                stat(&cpu.ratios).show(3),
                stat(&wall.vals).show(1),
                ins.map_or("n/a".into(), |i| format!("{i:.1}"))
            ));
            if v.name == "keepfix" && mode != "socket_close" {
                let r = stat(&cpu.ratios);
                if r.median > 1.05 {
                    let gap = hook_gap(mode, r, stat(&res[0].1.vals).median, &ins_of);
                    cx.gaps.push(gap);
                }
                summary.push(format!(
                    "| 3 | {mode}, keepfix / plain (CPU) | ≤ 1.05 | {:.3} | {} |",
                    r.median,
                    status(r.median <= 1.05)
                ));
            }
        }
    }
    // The control: the plain loops with and without one more (idle) thread.
    let mut control = vec![];
    for base in ["dupclose", "pipe_rw"] {
        let threaded = format!("{base}_thread");
        let mut ratios = vec![];
        for r in 0..cx.plan.rounds {
            let (a, b) = if r % 2 == 0 { (base, threaded.as_str()) } else { (threaded.as_str(), base) };
            let x = fdops_ns(cx, &cx.plain, a, n, None).1;
            let y = fdops_ns(cx, &cx.plain, b, n, None).1;
            let (single, multi) = if r % 2 == 0 { (x, y) } else { (y, x) };
            ratios.push(multi / single);
        }
        control.push(format!("`{base}`: {}", stat(&ratios).show(3)));
    }
    cx.say(&format!(
        "\n**Control, without keepfix:** the plain loops in a process with one more, idle, thread \
         (`bench_fdops dupclose_thread`, `pipe_rw_thread`) against the same loops without it, CPU ratio: {}. \
         Once a process has a second thread, glibc takes the slower path of its cancellable calls (close(), \
         read(), write(), accept(), connect()...: asynchronous cancellation is enabled and restored around \
         the system call, two atomic operations). keepfix's watchdog is such a thread in every process that \
         made a TCP socket: that is what the `_tcp` rows show on top of the hooks, and `pipe_rw_tcp`, whose \
         read() keepfix hooks only for one branch, shows it on top of that. A program that runs threads of its own pays it already.\n",
        control.join(", ")
    ));
    cx.say(&format!(
        "\nCommands: `[ENV] target/release/c-tests/bench_fdops MODE {n}`; instructions: \
         `[ENV] valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/c-tests/bench_fdops MODE N` \
         for N = {cg_n} and {}.\n\n\
         What keepfix adds on a non-socket fd: dup() and close() look the fd up in the table (an atomic load \
         of the chunk pointer, then of the slot's word, which says \"untracked\"), dup() also clears any \
         stale entry under the new number; read() calls the real read() first and looks at keepfix's \
         state only when it returns 0 or fails (write() is not interposed). On a \
         never-connected TCP socket, socket() records the fd in the table and close() clears it, with no \
         system call; libkeepalive makes its 4 setsockopt calls in every socket().\n",
        2 * cg_n
    ));
    if valgrind_failed {
        cx.say(
            "**n/a under callgrind:** a program that makes a TCP socket under keepfix crashes under valgrind \
             (SIGSEGV in rustix's vDSO set-up, `rustix::backend::param::auxv::check_elf_base`, at keepfix's \
             first clock_gettime): rustix reads the kernel's auxiliary vector, whose vDSO address valgrind \
             does not map for its guest. Outside valgrind nothing is wrong; the instruction counts are given \
             where keepfix never reaches that call.\n",
        );
    }
    summary
}

/// Why a section-3 loop is more than 5% over plain.
fn hook_gap(mode: &str, r: Stat, plain_ns: f64, ins_of: &BTreeMap<(&str, &str), f64>) -> String {
    let head = format!(
        "**3, {mode}**: CPU time {:.3} of plain's ({:.3}..{:.3}), plain being {plain_ns:.0} ns.",
        r.median, r.min, r.max
    );
    let thread = "keepfix's watchdog thread makes the process multi-threaded, and glibc then wraps each \
                  cancellable call (close, read, write...) in two atomic operations: the control below the \
                  table of section 3 measures that alone, without keepfix. It is the price of having a thread \
                  at all; a program with threads of its own already pays it. Not changed here: the way out \
                  is not to start the thread when it has nothing to do (KEEPFIX_CLOSE_WAIT=off, no \
                  KEEPFIX_METRICS, KEEPFIX_NOFILE_WARN=off), a design change for src/watchdog.rs, which \
                  another change is editing.";
    let hooks = match (ins_of.get(&("dupclose", "keepfix")), ins_of.get(&("dupclose", "plain"))) {
        (Some(k), Some(p)) => format!(
            "The hooks add {:.0} instructions per dup+close (callgrind: {k:.0} against {p:.0}), a few dozen \
             nanoseconds against two of the cheapest system calls there are. callgrind_annotate puts them \
             in the exported hooks' entry (the active() check, the real function's pointer) and in dup()'s \
             bookkeeping: it looks up the old fd's slot, and the new fd's to drop any stale entry, and \
             copy_entry() looks the old slot up a second time even when it is untracked (letting it do so \
             only when share() returned a word would trim that; not done here).",
            k - p
        ),
        _ => "The hooks add a table lookup per call.".into(),
    };
    match mode {
        "pipe_rw_tcp" => format!("{head} read() costs one branch more (write() is not hooked): {thread}"),
        "dupclose_tcp" => format!("{head} Two causes. {hooks} And {thread}"),
        _ => format!(
            "{head} {hooks} pipe_rw (read()'s one branch) is the control: its ratio is the noise of the machine."
        ),
    }
}
