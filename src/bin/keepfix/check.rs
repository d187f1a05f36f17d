//! `keepfix check`: reads the KEEPFIX_* environment with the library's own parser and prints the
//! configuration a program started now would get, where each value comes from, and every problem.

use crate::config;
use crate::{Failure, exit, library, output};
use clap::Args;
use std::collections::BTreeMap;

/// Validate the KEEPFIX_* environment and show the effective configuration
#[derive(Args)]
#[command(
    long_about = "Validate the KEEPFIX_* variables of this environment, as libkeepfix.so will read them, \
        and print the effective configuration: VARIABLE, VALUE and SOURCE (environment, default, or \
        default (invalid value) when the variable is set but rejected). Then each problem on its own \
        line on stderr: errors name a variable whose value the library will ignore; warnings name a \
        value it adjusts, or an unknown KEEPFIX_ variable (a typo).\n\n\
        Exit 0 when there is no error (warnings allowed), 1 when there is at least one.",
    after_help = "Example:\n  KEEPFIX_IDLE=30 KEEPFIX_CLOSE_WAIT=close keepfix check"
)]
pub struct CheckArgs {}

pub fn check(_args: &CheckArgs) -> Result<u8, Failure> {
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("KEEPFIX_").then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    let (cfg, diagnostics) = config::parse(|k| env.get(k).cloned(), env.keys().map(String::as_str), false);
    let rejected = |var: &str| diagnostics.iter().any(|d| d.var == var && !d.warning);

    let mut rows = vec![["VARIABLE".to_string(), "VALUE".to_string(), "SOURCE".to_string()]];
    for var in config::VARIABLES {
        let source = match (env.contains_key(*var), rejected(var)) {
            (false, _) => "default",
            (true, false) => "environment",
            (true, true) => "default (invalid value)",
        };
        rows.push([var.to_string(), cfg.show(var), source.to_string()]);
    }
    output::out(&output::table(&rows));

    let mut errors = 0;
    let mut warnings = 0;
    for d in &diagnostics {
        if d.warning {
            warnings += 1;
            output::warning(&d.to_string());
        } else {
            errors += 1;
            output::error(&format!("error: {d}"));
        }
    }
    match library::find() {
        Ok(lib) => output::line(&format!("\nlibrary: {}", lib.display())),
        Err(failure) if env.contains_key("KEEPFIX_LIB") => {
            errors += 1;
            output::error(&format!("error: {}", failure.message));
        }
        Err(failure) => {
            warnings += 1;
            output::warning(&format!("{} (keepfix run and demo need it)", failure.message));
        }
    }
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    if errors == 0 {
        output::line(&format!("configuration OK ({})", plural(warnings, "warning")));
        Ok(exit::OK)
    } else {
        output::line(&format!("configuration has {}, {}", plural(errors, "error"), plural(warnings, "warning")));
        Ok(exit::FAILED)
    }
}
