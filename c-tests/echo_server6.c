/*
 * echo_server6 - the well-behaved IPv6 server built on epoll and accept4.
 *
 * Models: a modern-looking server.  socket(AF_INET6,
 * SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC, IPPROTO_TCP), bind ::1, a
 * level-triggered epoll loop, accept4(..., SOCK_NONBLOCK|SOCK_CLOEXEC) until
 * EAGAIN.  Answers "pong\n" per line, closes on EOF or error.  The ACCEPT line
 * reports the flags really found on the new fd (F_GETFD / F_GETFL), so a
 * preload library that loses accept4's flags is caught.
 *
 * Usage: echo_server6 PORT        (PORT 0 = kernel chooses)
 * stdout: READY port=P, ACCEPT fd=N cloexec=0|1 nonblock=0|1, CLOSE fd=N,
 *         ACCEPT_ERR errno=E, READ_ERR/WRITE_ERR fd=N errno=E,
 *         STATS accepted=A served=S errors=E
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/epoll.h>

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: echo_server6 PORT");
    int lfd = listen_on(AF_INET6, parse_port(argv[1]), SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    print_ready(lfd);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1:");
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
        die("epoll_ctl:");
    long accepted = 0, served = 0, errors = 0;

    while (!g_term) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) { /* accept everything that is queued */
                    struct sockaddr_in6 peer;
                    socklen_t len = sizeof peer;
                    int cfd = accept4(lfd, (struct sockaddr *)&peer, &len,
                                      SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) {
                        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                            printf("ACCEPT_ERR errno=%d\n", errno);
                            errors++;
                        }
                        break;
                    }
                    int cloexec = (fcntl(cfd, F_GETFD) & FD_CLOEXEC) != 0;
                    int nonblock = (fcntl(cfd, F_GETFL) & O_NONBLOCK) != 0;
                    printf("ACCEPT fd=%d cloexec=%d nonblock=%d\n", cfd, cloexec, nonblock);
                    accepted++;
                    struct epoll_event cev = { .events = EPOLLIN, .data.fd = cfd };
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev) < 0)
                        die("epoll_ctl:");
                }
                continue;
            }

            char buf[4096];
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && (errno == EAGAIN || errno == EINTR))
                continue; /* level-triggered: we will be told again */
            if (r > 0) {
                int k = answer_lines(fd, buf, r);
                if (k >= 0) {
                    served += k;
                    continue;
                }
                printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
                errors++;
            } else if (r < 0) {
                printf("READ_ERR fd=%d errno=%d\n", fd, errno);
                errors++;
            }
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            close(fd);
            printf("CLOSE fd=%d\n", fd);
        }
    }
    printf("STATS accepted=%ld served=%ld errors=%ld\n", accepted, served, errors);
    return 0;
}
