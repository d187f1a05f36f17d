/*
 * break14_kaoff - a server that sets its keepalive timing on the listener and turns keepalive on
 * only on each connection it accepts (breaker 14).
 *
 * Models: a server that configures TCP_KEEPIDLE 5 s on its listener (inherited by every accepted
 * connection) but leaves SO_KEEPALIVE off there, and sets SO_KEEPALIVE on each connection once it
 * has accepted it (say, only for the clients it keeps). Its connections probe after 5 s idle.
 * `keepfix rescue` sees the listener with keepalive off: if it takes the 5 s for "in force
 * nowhere" and puts its own 60 s there, every later connection probes after 60 s instead: looser
 * than what the program asked for.
 *
 * Usage: break14_kaoff
 * stdout: READY port=P, ACCEPT fd=N ka=K idle=I
 */
#define _GNU_SOURCE
#include "common.h"

int main(void)
{
    proto_init();
    int lfd = bind_on(AF_INET, 0, 0, 0);
    int idle = 5, one = 1;
    if (setsockopt(lfd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) < 0)
        die("setsockopt TCP_KEEPIDLE:");
    if (listen(lfd, 16) < 0)
        die("listen:");
    print_ready(lfd);
    while (!g_term) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0)
            continue;
        if (setsockopt(cfd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) < 0)
            die("setsockopt SO_KEEPALIVE:");
        int ka = 0, got = 0;
        socklen_t l = sizeof ka;
        getsockopt(cfd, SOL_SOCKET, SO_KEEPALIVE, &ka, &l);
        l = sizeof got;
        getsockopt(cfd, IPPROTO_TCP, TCP_KEEPIDLE, &got, &l);
        printf("ACCEPT fd=%d ka=%d idle=%d\n", cfd, ka, got);
    }
    return 0;
}
