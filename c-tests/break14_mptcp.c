/*
 * break14_mptcp - a server whose listener is MPTCP (IPPROTO_MPTCP), as Go 1.24 and later make
 * them by default on Linux (breaker 14).
 *
 * A plain TCP client falls back: its accepted connection is an ordinary TCP socket, which
 * inherits the listener's keepalive options as a TCP listener's would. The server answers
 * "pong\n" per line and closes at EOF (no leak).
 *
 * Usage: break14_mptcp PORT
 * stdout: NOMPTCP errno=E (the kernel has no MPTCP; exits 0), READY port=P, ACCEPT fd=N proto=P
 */
#define _GNU_SOURCE
#include "common.h"

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: break14_mptcp PORT");
    int probe = socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP);
    if (probe < 0) {
        printf("NOMPTCP errno=%d\n", errno);
        return 0;
    }
    close(probe);
    int lfd = listen_on(AF_INET, parse_port(argv[1]), 0, IPPROTO_MPTCP);
    print_ready(lfd);
    struct pollfd p[64];
    int n = 1;
    p[0] = (struct pollfd){ lfd, POLLIN, 0 };
    while (!g_term) {
        if (poll(p, n, 100) <= 0)
            continue;
        for (int i = n - 1; i >= 0; i--) {
            if (!(p[i].revents & (POLLIN | POLLHUP)))
                continue;
            if (i == 0) {
                int cfd = accept(lfd, NULL, NULL);
                if (cfd < 0)
                    continue;
                int proto = 0;
                socklen_t l = sizeof proto;
                getsockopt(cfd, SOL_SOCKET, SO_PROTOCOL, &proto, &l);
                printf("ACCEPT fd=%d proto=%d\n", cfd, proto);
                if (n < 64)
                    p[n++] = (struct pollfd){ cfd, POLLIN, 0 };
                continue;
            }
            char b[256];
            ssize_t r = read(p[i].fd, b, sizeof b);
            if (r <= 0) {
                close(p[i].fd);
                p[i] = p[--n];
                continue;
            }
            for (ssize_t k = 0; k < r; k++)
                if (b[k] == '\n')
                    write_all(p[i].fd, "pong\n", 5);
        }
    }
    return 0;
}
