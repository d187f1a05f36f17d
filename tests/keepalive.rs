//! Issue 2: keepalive on every TCP socket, checked from outside the program.
mod common;
use common::*;

#[test]
fn accepted_socket_inherits_keepalive_from_listener() {
    let mut p = Run::new("echo_server")
        .env("KEEPFIX_IDLE", "7")
        .env("KEEPFIX_INTVL", "3")
        .env("KEEPFIX_CNT", "4")
        .args(["0"])
        .spawn();
    let port = p.port();
    let _c = ping(port);
    let fd: i32 = field(&p.expect("ACCEPT"), "fd").parse().unwrap();
    assert_eq!(keepalive_of(p.pid(), fd), ka(7, 3, 4));
    let listener = tcp_fds(p.pid()).into_iter().find(|t| t.state == LISTEN).unwrap();
    assert_eq!(keepalive_of(p.pid(), listener.fd), ka(7, 3, 4));
}
