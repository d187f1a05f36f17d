//! What /proc says of a process: its name, fds (and which are sockets), RLIMIT_NOFILE, whether
//! libkeepfix.so is mapped, its environment and its network namespace. Every read tolerates the
//! process or an fd going away meanwhile; errors keep their io::ErrorKind so that callers can tell
//! "no such process" from "permission denied".

use std::io;
use std::os::unix::ffi::OsStrExt;

/// One open fd: its number and, for a socket, the socket's inode.
#[derive(Clone, Copy, Debug)]
pub struct Fd {
    pub fd: i32,
    pub socket_inode: Option<u64>,
}

/// The process's name (comm).
pub fn comm(pid: u32) -> io::Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/comm"))?.trim_end_matches('\n').to_string())
}

/// The open fds. An fd closed between listing and reading its link is left out.
pub fn fds(pid: u32) -> io::Result<Vec<Fd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else { continue };
        let Ok(link) = std::fs::read_link(entry.path()) else { continue };
        let socket_inode =
            link.as_os_str().to_str().and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
        fds.push(Fd { fd, socket_inode });
    }
    fds.sort_by_key(|f| f.fd);
    Ok(fds)
}

/// RLIMIT_NOFILE, soft and hard, from /proc/PID/limits; `None` is unlimited.
pub fn nofile_limits(pid: u32) -> io::Result<(Option<u64>, Option<u64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no \"Max open files\" in /proc/PID/limits"))?;
    let mut words = line.split_whitespace().map(|w| w.parse::<u64>().ok());
    let soft = words.next().flatten();
    let hard = words.next().flatten();
    Ok((soft, hard))
}

/// Whether libkeepfix.so is mapped into the process.
pub fn has_keepfix(pid: u32) -> io::Result<bool> {
    let maps = std::fs::read(format!("/proc/{pid}/maps"))?;
    Ok(maps.split(|b| *b == b'\n').any(|line| {
        let file = line.rsplit(|b| *b == b'/').next().unwrap_or_default();
        file.starts_with(b"libkeepfix")
    }))
}

/// The KEEPFIX_* variables the process was started with.
pub fn keepfix_environ(pid: u32) -> io::Result<Vec<(String, String)>> {
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(environ
        .split(|b| *b == 0)
        .filter(|entry| entry.starts_with(b"KEEPFIX_"))
        .filter_map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (k, v) = text.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// The network namespace, as its /proc/PID/ns/net link (`net:[4026531840]`).
pub fn net_namespace(pid: Option<u32>) -> io::Result<Vec<u8>> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/ns/net"),
        None => "/proc/self/ns/net".to_string(),
    };
    Ok(std::fs::read_link(path)?.as_os_str().as_bytes().to_vec())
}

/// Every process id in /proc, in order.
pub fn pids() -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> =
        std::fs::read_dir("/proc")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    Ok(pids)
}

/// The processes other than `except` that hold any of these socket inodes, by inode (read from
/// every /proc/PID/fd keepfix may list; a process whose fds it may not read is not seen).
pub fn socket_holders(inodes: &[u64], except: &[u32]) -> std::collections::HashMap<u64, Vec<u32>> {
    let mut found: std::collections::HashMap<u64, Vec<u32>> = std::collections::HashMap::new();
    for pid in pids().unwrap_or_default().into_iter().filter(|p| !except.contains(p)) {
        let Ok(fds) = fds(pid) else { continue };
        for ino in fds.iter().filter_map(|f| f.socket_inode).filter(|i| inodes.contains(i)) {
            let holders = found.entry(ino).or_default();
            if !holders.contains(&pid) {
                holders.push(pid);
            }
        }
    }
    found
}
