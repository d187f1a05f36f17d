/*
 * harm_epoll_mod - an epoll server that changes and removes the registration of a dead connection.
 *
 * Models: an epoll (edge-triggered) server.  A connection's request is read
 * with one read() (the client half-closed: that read also consumes the FIN;
 * no 0-byte read follows).  The fd stays registered.  On the stdin command
 * "check" it does, on every connection it holds, epoll_ctl(MOD,
 * EPOLLIN|EPOLLOUT|EPOLLET), epoll_ctl(DEL), then one read(), and reports
 * each result.
 *
 * Usage: harm_epoll_mod PORT
 * stdout: READY port=P, ACCEPT fd=N, REQ fd=N bytes=B,
 *         CHECK fd=N mod=R mod_errno=E del=R del_errno=E read=R read_errno=E,
 *         STATS accepted=A
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/epoll.h>

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: harm_epoll_mod PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), SOCK_NONBLOCK, 0);
    print_ready(lfd);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.events = EPOLLIN;
    ev.data.fd = 0;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    int conns[256], n = 0;
    long accepted = 0;
    struct linebuf lb = { .len = 0 };
    while (!g_term) {
        struct epoll_event evs[16];
        int k = epoll_wait(ep, evs, 16, 100);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                if (c < 0)
                    continue;
                accepted++;
                printf("ACCEPT fd=%d\n", c);
                struct epoll_event cev = { .events = EPOLLIN | EPOLLET, .data.fd = c };
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                if (n < 256)
                    conns[n++] = c;
            } else if (fd == 0) {
                char cmd[64];
                if (lb_fill(&lb, 0) < 0) {
                    g_term = 1;
                    break;
                }
                while (lb_getline(&lb, cmd, sizeof cmd)) {
                    if (strcmp(cmd, "check"))
                        continue;
                    for (int j = 0; j < n; j++) {
                        struct epoll_event m = { .events = EPOLLIN | EPOLLOUT | EPOLLET, .data.fd = conns[j] };
                        int mr = epoll_ctl(ep, EPOLL_CTL_MOD, conns[j], &m);
                        int me = mr < 0 ? errno : 0;
                        int dr = epoll_ctl(ep, EPOLL_CTL_DEL, conns[j], NULL);
                        int de = dr < 0 ? errno : 0;
                        char b[64];
                        ssize_t rr = read(conns[j], b, sizeof b);
                        printf("CHECK fd=%d mod=%d mod_errno=%d del=%d del_errno=%d read=%zd read_errno=%d\n",
                               conns[j], mr, me, dr, de, rr, rr < 0 ? errno : 0);
                    }
                }
            } else if (evs[i].events & EPOLLIN) {
                char b[256];
                ssize_t r = read(fd, b, sizeof b);
                printf("REQ fd=%d bytes=%zd\n", fd, r);
            }
        }
    }
    printf("STATS accepted=%ld\n", accepted);
    return 0;
}
