//! The demo's moving parts: the sample C programs (embedded, compiled into a temporary directory
//! that goes away with them), the server and client processes (killed when dropped), and the
//! Ctrl-C/SIGTERM flag every wait checks.

use crate::{Failure, exit, output};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const COMMON_H: &str = include_str!("../../../../c-tests/common.h");
const LEAK_EOF_SERVER_C: &str = include_str!("../../../../c-tests/leak_eof_server.c");
const LOAD_CLIENT_C: &str = include_str!("../../../../c-tests/load_client.c");

/// How often the wait loops look at their child and at the interrupt flag.
const TICK: Duration = Duration::from_millis(20);

/// Set by SIGINT, SIGTERM or SIGHUP: the demo stops, cleaning up on its way out.
#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> Result<Interrupt, Failure> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
            signal_hook::flag::register(signal, Arc::clone(&flag)).map_err(|e| {
                Failure::new(exit::FAILED, format!("cannot install a signal handler: {}", output::io_error(&e)))
            })?;
        }
        Ok(Interrupt(flag))
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn check(&self) -> Result<(), Failure> {
        if self.is_set() {
            Err(Failure::new(exit::FAILED, "interrupted; the sample programs were stopped and their files removed"))
        } else {
            Ok(())
        }
    }
}

/// A private temporary directory, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, Failure> {
        let base = std::env::temp_dir();
        let mut last_error = None;
        for attempt in 0..100u32 {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let path = base.join(format!("keepfix-demo.{}.{nanos}.{attempt}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => {
                    last_error = Some(e);
                    break;
                }
            }
        }
        let why = last_error.map_or_else(String::new, |e| output::io_error(&e));
        Err(Failure::new(
            exit::FAILED,
            format!("cannot make a temporary directory in {} ({why}); set TMPDIR to a writable one", base.display()),
        ))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped, whatever happened before.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A command for a sample program: a clean KEEPFIX_*/LD_PRELOAD environment, and SIGKILL when
/// keepfix dies, so that no sample program outlives the demo.
fn sample_command(program: &Path, nofile: Option<u64>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEEPFIX_") || name == "LD_PRELOAD" {
            command.env_remove(name);
        }
    }
    // SAFETY: the closure runs in the child between fork and exec, and only makes system calls
    // (close_range, prctl, prlimit64), which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // fds keepfix inherited (from a shell, a CI runner) would take fd numbers from the
            // server's 64: they close at exec. Best effort: CLOSE_RANGE_CLOEXEC needs Linux 5.11;
            // the raw syscall, because glibc before 2.34 (the release build's 2.17) has no wrapper.
            libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC);
            let os_error = |e: rustix::io::Errno| std::io::Error::from_raw_os_error(e.raw_os_error());
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).map_err(os_error)?;
            if let Some(n) = nofile {
                let limit = rustix::process::Rlimit { current: Some(n), maximum: Some(n) };
                rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).map_err(os_error)?;
            }
            Ok(())
        });
    }
    command
}

/// The compiled sample programs, in their temporary directory.
pub struct Programs {
    dir: TempDir,
    server: PathBuf,
    client: PathBuf,
}

impl Programs {
    /// Writes the embedded sources into a new temporary directory and compiles them with gcc.
    pub fn build() -> Result<Programs, Failure> {
        let dir = TempDir::new()?;
        let write = |name: &str, text: &str| {
            std::fs::write(dir.0.join(name), text).map_err(|e| {
                Failure::new(
                    exit::FAILED,
                    format!("cannot write {}: {}", dir.0.join(name).display(), output::io_error(&e)),
                )
            })
        };
        write("common.h", COMMON_H)?;
        write("leak_eof_server.c", LEAK_EOF_SERVER_C)?;
        write("load_client.c", LOAD_CLIENT_C)?;
        let server = compile(&dir.0, "leak_eof_server")?;
        let client = compile(&dir.0, "load_client")?;
        Ok(Programs { dir, server, client })
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Runs load_client against 127.0.0.1:port and returns how many sessions were served.
    pub fn load(
        &self,
        port: u16,
        clients: u32,
        parallel: u32,
        timeout_ms: u64,
        interrupt: &Interrupt,
    ) -> Result<u64, Failure> {
        let mut command = sample_command(&self.client, None);
        command
            .args(["--count", &clients.to_string(), "--parallel", &parallel.to_string()])
            .args(["--timeout-ms", &timeout_ms.to_string(), "127.0.0.1", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child =
            Guarded(command.spawn().map_err(|e| {
                Failure::new(exit::FAILED, format!("cannot start load_client: {}", output::io_error(&e)))
            })?);
        // Every session ends within two timeouts (connect, then answer), and up to 32 run at once.
        let sessions_per_thread = u64::from(clients.div_ceil(parallel.max(1)));
        let limit = Duration::from_millis(2 * timeout_ms * sessions_per_thread) + Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        loop {
            interrupt.check()?;
            match child.0.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() > deadline => {
                    return Err(Failure::new(
                        exit::FAILED,
                        format!("load_client did not finish within {} s", limit.as_secs()),
                    ));
                }
                Ok(None) => std::thread::sleep(TICK),
                Err(e) => {
                    return Err(Failure::new(
                        exit::FAILED,
                        format!("cannot wait for load_client: {}", output::io_error(&e)),
                    ));
                }
            }
        }
        let mut stdout = String::new();
        if let Some(mut out) = child.0.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        stdout
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .and_then(|l| super::field(l, "ok"))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Failure::new(exit::FAILED, format!("load_client printed no RESULT line: {stdout:?}")))
    }
}

fn compile(dir: &Path, name: &str) -> Result<PathBuf, Failure> {
    let out = dir.join(name);
    let result = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(dir.join(format!("{name}.c")))
        .stdin(Stdio::null())
        .output();
    match result {
        Ok(o) if o.status.success() => Ok(out),
        Ok(o) => Err(Failure::new(
            exit::FAILED,
            format!("gcc could not compile {name}.c:\n{}", String::from_utf8_lossy(&o.stderr).trim_end()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Failure::new(
            exit::FAILED,
            "the demo compiles two small C programs and needs gcc, which is not installed \
             (Debian/Ubuntu: apt-get install gcc)",
        )),
        Err(e) => Err(Failure::new(exit::FAILED, format!("cannot run gcc: {}", output::io_error(&e)))),
    }
}

/// The lines of a pipe until it closes, as text even where they are not UTF-8: a reader that
/// stopped early would leave the server blocked on a full pipe.
fn lossy_lines(pipe: impl Read) -> impl Iterator<Item = String> {
    BufReader::new(pipe).split(b'\n').map_while(Result::ok).map(|l| String::from_utf8_lossy(&l).into_owned())
}

/// The sample server, running: its stdout protocol lines and its stderr (keepfix's log).
pub struct Server {
    child: Guarded,
    port: u16,
    lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    interrupt: Interrupt,
}

impl Server {
    /// Starts leak_eof_server with `env` and RLIMIT_NOFILE `nofile`, and waits for its READY line.
    pub fn start(
        programs: &Programs,
        env: &[(&str, String)],
        nofile: u64,
        interrupt: &Interrupt,
    ) -> Result<Server, Failure> {
        let mut command = sample_command(&programs.server, Some(nofile));
        command.arg("0").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = Guarded(command.spawn().map_err(|e| {
            Failure::new(exit::FAILED, format!("cannot start leak_eof_server: {}", output::io_error(&e)))
        })?);
        // Only the protocol lines the demo needs are kept: the run without keepfix prints an
        // ACCEPT_ERR line a hundred times a second.
        let (tx, lines) = channel();
        if let Some(out) = child.0.stdout.take() {
            std::thread::spawn(move || {
                for line in lossy_lines(out) {
                    if (line.starts_with("READY") || line.starts_with("STATS")) && tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.0.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in lossy_lines(err) {
                    let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
                    if sink.len() < 10_000 {
                        sink.push(line);
                    }
                }
            });
        }
        let mut server = Server { child, port: 0, lines, stderr, interrupt: interrupt.clone() };
        let ready = server.wait_line("READY", Duration::from_secs(10))?;
        server.port = super::field(&ready, "port")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| Failure::new(exit::FAILED, format!("leak_eof_server printed a bad READY line: {ready}")))?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Stops the server with SIGTERM (it then prints STATS and exits) and returns its STATS line.
    pub fn stop(&mut self) -> Result<Option<String>, Failure> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match self.wait_line("STATS", Duration::from_secs(5)) {
            Ok(line) => Ok(Some(line)),
            Err(_) if !self.interrupt.is_set() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn wait_line(&mut self, prefix: &str, within: Duration) -> Result<String, Failure> {
        let deadline = Instant::now() + within;
        loop {
            self.interrupt.check()?;
            match self.lines.recv_timeout(TICK) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) | Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Ok(_) | Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    let stderr = self.stderr_lines();
                    let tail: Vec<&str> = stderr.iter().rev().take(5).rev().map(String::as_str).collect();
                    return Err(Failure::new(
                        exit::FAILED,
                        format!(
                            "leak_eof_server printed no {prefix} line within {} s; its last stderr lines:\n{}",
                            within.as_secs(),
                            tail.join("\n")
                        ),
                    ));
                }
            }
        }
    }
}
