//! Writing to the terminal: lines, tables, messages and I/O errors. A closed pipe
//! (`keepfix status | head -1`) is not worth a crash: a failed write is dropped.

use std::io::Write;

/// Text for stdout, as is, at once (a line the demo has begun shows before its work is done).
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// One line for stdout.
pub fn line(text: &str) {
    out(&format!("{text}\n"));
}

/// An I/O error as a person reads it: "No such file or directory", without "(os error 2)".
pub fn io_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(i)) => text[..i].to_string(),
        _ => text,
    }
}

/// One message for stderr: `keepfix: MESSAGE`.
pub fn error(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "keepfix: {message}");
}

/// One warning for stderr: `keepfix: warning: MESSAGE`.
pub fn warning(message: &str) {
    error(&format!("warning: {message}"));
}

/// Rows as left-aligned columns, two spaces apart.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}
