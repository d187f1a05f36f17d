//! Finding libkeepfix.so, for `run`, `demo` and `check`: `$KEEPFIX_LIB` if set, else next to the
//! keepfix executable, else in `../lib/keepfix/` beside it. Always an absolute, resolved path.
//! Under `cargo run`, the demo may build it first.

use crate::{Failure, exit, output};
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "libkeepfix.so";

/// The library to preload, or a failure (exit 3) that says where keepfix looked.
pub fn find() -> Result<PathBuf, Failure> {
    if let Some(value) = std::env::var_os("KEEPFIX_LIB").filter(|v| !v.is_empty()) {
        let shown = value.to_string_lossy().into_owned();
        let path = PathBuf::from(&value);
        return match std::fs::canonicalize(&path) {
            Ok(p) if p.is_file() => usable(p),
            Ok(_) => Err(Failure::new(
                exit::NO_LIBRARY,
                format!("KEEPFIX_LIB=\"{shown}\" is not a file; set it to the path of {FILE_NAME} or unset it"),
            )),
            Err(e) => Err(Failure::new(
                exit::NO_LIBRARY,
                format!(
                    "KEEPFIX_LIB=\"{shown}\" cannot be used ({}); set it to the path of {FILE_NAME} or unset it",
                    output::io_error(&e)
                ),
            )),
        };
    }
    let candidates = candidates()?;
    for candidate in &candidates {
        if let Ok(p) = std::fs::canonicalize(candidate) {
            if p.is_file() {
                return usable(p);
            }
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| format!("  {}", c.display())).collect();
    Err(Failure::new(
        exit::NO_LIBRARY,
        format!(
            "cannot find {FILE_NAME}; looked in:\n{}\nset KEEPFIX_LIB to its path (cargo build --release builds it)",
            looked.join("\n")
        ),
    ))
}

/// Like [`find`], but under `cargo run` a missing library is first built with the same profile:
/// `cargo run --release -- demo` builds it along with the command, `cargo run --bin keepfix` does
/// not.
pub fn find_or_build() -> Result<PathBuf, Failure> {
    let missing = match find() {
        Ok(lib) => return Ok(lib),
        Err(failure) => failure,
    };
    let under_cargo_run = std::env::var_os("KEEPFIX_LIB").is_none_or(|v| v.is_empty())
        && std::env::var("CARGO_PKG_NAME").is_ok_and(|n| n == env!("CARGO_PKG_NAME"))
        && std::env::var_os("CARGO_MANIFEST_DIR").is_some();
    let (Some(cargo), true) = (std::env::var_os("CARGO"), under_cargo_run) else { return Err(missing) };
    let profile_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut command = std::process::Command::new(cargo);
    command.args(["build", "--lib"]);
    match profile_dir.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    output::line(&format!("{FILE_NAME} is not built yet: building it (cargo build --lib, {profile_dir} profile) ..."));
    match command.status() {
        Ok(status) if status.success() => find(),
        Ok(status) => Err(Failure::new(exit::NO_LIBRARY, format!("cargo build --lib failed ({status})"))),
        Err(e) => {
            Err(Failure::new(exit::NO_LIBRARY, format!("cannot run cargo build --lib: {}", output::io_error(&e))))
        }
    }
}

/// Where the library is looked for when KEEPFIX_LIB is not set, in order.
fn candidates() -> Result<Vec<PathBuf>, Failure> {
    let exe = std::env::current_exe().map_err(|e| {
        Failure::new(exit::NO_LIBRARY, format!("cannot tell where the keepfix executable is: {}", output::io_error(&e)))
    })?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    Ok(vec![dir.join(FILE_NAME), dir.join("..").join("lib").join("keepfix").join(FILE_NAME)])
}

/// LD_PRELOAD splits its list at spaces and colons: a path with either cannot be preloaded.
fn usable(path: PathBuf) -> Result<PathBuf, Failure> {
    let text = path.to_string_lossy();
    if text.contains([' ', ':']) {
        return Err(Failure::new(
            exit::NO_LIBRARY,
            format!("{} contains a space or a colon, which LD_PRELOAD cannot carry; move it", path.display()),
        ));
    }
    Ok(path)
}
