//! Socket addresses for log lines: the local and peer address of an fd, printed as
//! `127.0.0.1:8080` or `[::1]:8080`, without allocating.
//!
//! The peer comes from getsockopt(SO_PEERNAME), which (unlike getpeername) still answers once a
//! reset or a keepalive timeout has moved the socket to CLOSE: the sockets keepfix reports most.

use crate::sys;
use core::fmt;
use core::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use rustix::fd::RawFd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    V4(SocketAddrV4),
    V6(SocketAddrV6),
    Unknown,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::V4(a) => write!(f, "{a}"),
            Addr::V6(a) => write!(f, "[{}]:{}", a.ip(), a.port()),
            Addr::Unknown => f.write_str("-"),
        }
    }
}

/// Decodes a `struct sockaddr_in` or `sockaddr_in6` from raw bytes.
pub fn decode(b: &[u8]) -> Addr {
    let family = array(b, 0).map_or(0, u16::from_ne_bytes);
    let port = array(b, 2).map_or(0, u16::from_be_bytes);
    match i32::from(family) {
        libc::AF_INET => match array::<4>(b, 4) {
            Some(a) => Addr::V4(SocketAddrV4::new(Ipv4Addr::from(a), port)),
            None => Addr::Unknown,
        },
        libc::AF_INET6 => match array::<16>(b, 8) {
            Some(a) => Addr::V6(SocketAddrV6::new(Ipv6Addr::from(a), port, 0, 0)),
            None => Addr::Unknown,
        },
        _ => Addr::Unknown,
    }
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

/// The peer's address, also for sockets already in CLOSE. SO_PEERNAME refuses a buffer longer
/// than the address (EINVAL), so it is asked for an IPv6 address first, then an IPv4 one.
pub fn peer(fd: RawFd) -> Addr {
    for len in [core::mem::size_of::<libc::sockaddr_in6>(), core::mem::size_of::<libc::sockaddr_in>()] {
        let mut b = [0u8; 28];
        let Some(buf) = b.get_mut(..len) else { continue };
        match sys::getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_PEERNAME, buf) {
            Ok(n) => return decode(b.get(..n).unwrap_or(&[])),
            Err(rustix::io::Errno::INVAL) => continue,
            Err(_) => return Addr::Unknown,
        }
    }
    Addr::Unknown
}

/// The local address.
pub fn local(fd: RawFd) -> Addr {
    let mut b = [0u8; 128];
    match sys::getsockname_raw(fd, &mut b) {
        Ok(n) => decode(b.get(..n).unwrap_or(&[])),
        Err(_) => Addr::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_families() {
        let mut v4 = [0u8; 16];
        v4[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(decode(&v4).to_string(), "127.0.0.1:8080");
        let mut v6 = [0u8; 28];
        v6[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[23] = 1;
        assert_eq!(decode(&v6).to_string(), "[::1]:443");
        assert_eq!(decode(&[1, 2]).to_string(), "-");
    }
}
