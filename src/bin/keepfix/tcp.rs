//! The TCP socket table of a network namespace: every socket by inode, with its state, addresses
//! and queues. Read with NETLINK_SOCK_DIAG (inet_diag, IPv4 and IPv6, every state) for keepfix's
//! own namespace, or from /proc/PID/net/tcp and tcp6 for a process in another one.
//!
//! Neither lists a socket in state CLOSE (a fresh socket, a failed connect, a reset peer): such a
//! socket is in no table at all.

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use serde::Serialize;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The kernel's TCP_CLOSE_WAIT (include/net/tcp_states.h): the peer closed, we have not.
pub const CLOSE_WAIT: u8 = 8;

/// One TCP socket as the kernel's table shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub state: u8,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Bytes received and not yet read by the program (for a listener: the accept queue).
    pub recv_q: u32,
    /// Bytes sent and not yet acknowledged (for a listener: the backlog).
    pub send_q: u32,
}

/// Where a table came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    SockDiag,
    ProcNetTcp,
}

/// TCP sockets by inode.
pub struct TcpTable {
    pub sockets: HashMap<u64, TcpSocket>,
    pub source: Source,
}

/// The table of keepfix's own network namespace, through NETLINK_SOCK_DIAG.
pub fn sock_diag() -> io::Result<TcpTable> {
    let mut sockets = HashMap::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, &mut sockets)?;
    }
    Ok(TcpTable { sockets, source: Source::SockDiag })
}

/// One inet_diag dump of every TCP socket of one address family.
fn dump(family: u8, sockets: &mut HashMap<u64, TcpSocket>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    };
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    packet.finalize();
    let mut request_bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut request_bytes);
    socket.send(&request_bytes, 0)?;

    // A dump comes in datagrams of at most 32 KiB, each holding whole messages.
    let mut datagram = vec![0u8; 64 * 1024];
    loop {
        let len = socket.recv(&mut &mut datagram[..], 0)?;
        let mut rest = datagram.get(..len).unwrap_or_default();
        while !rest.is_empty() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}")))?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let h = &response.header;
                    sockets.insert(
                        u64::from(h.inode),
                        TcpSocket {
                            state: h.state,
                            local: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                            peer: SocketAddr::new(h.socket_id.destination_address, h.socket_id.destination_port),
                            recv_q: h.recv_queue,
                            send_q: h.send_queue,
                        },
                    );
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(match e.code {
                        Some(code) => io::Error::from_raw_os_error(-code.get()),
                        None => io::Error::new(io::ErrorKind::InvalidData, "sock_diag answered with an ACK"),
                    });
                }
                _ => {}
            }
            // Messages are 4-byte aligned; a zero length would loop forever.
            let advance = (message.header.length as usize).next_multiple_of(4);
            if advance == 0 {
                break;
            }
            rest = rest.get(advance..).unwrap_or_default();
        }
    }
}

/// The table of the network namespace of `pid`, from /proc/PID/net/tcp and tcp6.
pub fn proc_net_tcp(pid: u32) -> io::Result<TcpTable> {
    let mut sockets = HashMap::new();
    for name in ["tcp", "tcp6"] {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{name}")) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6.
            Err(e) if e.kind() == io::ErrorKind::NotFound && name == "tcp6" => continue,
            Err(e) => return Err(e),
        };
        sockets.extend(text.lines().skip(1).filter_map(parse_proc_net_line));
    }
    Ok(TcpTable { sockets, source: Source::ProcNetTcp })
}

/// One line of /proc/net/tcp{,6}:
/// `sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode ...`.
fn parse_proc_net_line(line: &str) -> Option<(u64, TcpSocket)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [_, local, peer, state, queues, _, _, _, _, inode, ..] = words.as_slice() else { return None };
    let inode: u64 = inode.parse().ok()?;
    if inode == 0 {
        return None; // TIME_WAIT, SYN_RECV: no socket a process holds
    }
    let (tx, rx) = queues.split_once(':')?;
    Some((
        inode,
        TcpSocket {
            state: u8::from_str_radix(state, 16).ok()?,
            local: parse_hex_addr(local)?,
            peer: parse_hex_addr(peer)?,
            recv_q: u32::from_str_radix(rx, 16).ok()?,
            send_q: u32::from_str_radix(tx, 16).ok()?,
        },
    ))
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6): the address as the kernel's 32-bit words in
/// host byte order, then the port.
fn parse_hex_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(all(test, target_endian = "little"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines() {
        let v4 = "   0: 0100007F:1F90 0100007F:D431 08 00000002:00000010 00:00000000 00000000  0  0 4242 1 0";
        let (inode, s) = parse_proc_net_line(v4).unwrap();
        assert_eq!(inode, 4242);
        assert_eq!(s.state, CLOSE_WAIT);
        assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.peer, "127.0.0.1:54321".parse().unwrap());
        assert_eq!((s.recv_q, s.send_q), (16, 2));
        let v6 = "   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 99 1";
        let (_, s) = parse_proc_net_line(v6).unwrap();
        assert_eq!(s.local, "[::1]:80".parse().unwrap());
        assert_eq!(s.state, 10); // LISTEN
        assert!(parse_proc_net_line("  sl  local_address rem_address   st").is_none());
    }
}
