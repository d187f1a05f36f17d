/*
 * epoll_et_server - edge-triggered epoll server that ignores EOF.
 *
 * Models: an epoll(EPOLLIN|EPOLLET) server that registers no EPOLLRDHUP and,
 * when read() returns 0, prints EOF and does nothing else: no close, no
 * EPOLL_CTL_DEL.  With edge triggering nothing wakes it up again for that
 * fd, so it does not spin - it just leaks the socket in CLOSE_WAIT.  The
 * listener and connections are non-blocking; it reads until EAGAIN and keeps
 * serving new clients.
 *
 * Usage: epoll_et_server PORT
 * stdout: READY port=P, ACCEPT fd=N, EOF fd=N (once per connection),
 *         READ_ERR/WRITE_ERR fd=N errno=E, ACCEPT_ERR errno=E,
 *         STATS accepted=A served=S eof=E errors=R
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/epoll.h>

/* eof_seen[fd]: EOF already reported for the connection now using fd */
static char *eof_seen;
static size_t eof_cap;

static void eof_mark(int fd, char v)
{
    if ((size_t)fd >= eof_cap) {
        size_t ncap = (size_t)fd * 2 + 64;
        eof_seen = realloc(eof_seen, ncap);
        if (!eof_seen)
            die("out of memory");
        memset(eof_seen + eof_cap, 0, ncap - eof_cap);
        eof_cap = ncap;
    }
    eof_seen[fd] = v;
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: epoll_et_server PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), SOCK_NONBLOCK, 0);
    print_ready(lfd);

    int ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1:");
    struct epoll_event ev = { .events = EPOLLIN | EPOLLET, .data.fd = lfd };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
        die("epoll_ctl:");
    long accepted = 0, served = 0, eofs = 0, errors = 0;

    while (!g_term) {
        struct epoll_event evs[64];
        int n = epoll_wait(ep, evs, 64, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) { /* edge-triggered: drain the accept queue */
                    int cfd = accept(lfd, NULL, NULL);
                    if (cfd < 0) {
                        if (errno != EAGAIN && errno != EINTR) {
                            printf("ACCEPT_ERR errno=%d\n", errno);
                            errors++;
                        }
                        break;
                    }
                    set_nonblock(cfd);
                    printf("ACCEPT fd=%d\n", cfd);
                    accepted++;
                    eof_mark(cfd, 0);
                    struct epoll_event cev = { .events = EPOLLIN | EPOLLET, .data.fd = cfd };
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev) < 0) {
                        printf("EPOLL_ERR fd=%d errno=%d\n", cfd, errno);
                        errors++;
                    }
                }
                continue;
            }
            for (;;) { /* edge-triggered: read until EAGAIN */
                char buf[4096];
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) {
                    int k = answer_lines(fd, buf, r);
                    if (k < 0) {
                        printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
                        errors++;
                        break;
                    }
                    served += k;
                    continue;
                }
                if (r == 0) {
                    if (!eof_seen[fd]) {
                        printf("EOF fd=%d\n", fd);
                        eofs++;
                        eof_mark(fd, 1);
                    }
                    /* THE BUG: no close(), no EPOLL_CTL_DEL. */
                } else if (errno != EAGAIN && errno != EINTR) {
                    printf("READ_ERR fd=%d errno=%d\n", fd, errno);
                    errors++;
                }
                break;
            }
        }
    }
    printf("STATS accepted=%ld served=%ld eof=%ld errors=%ld\n", accepted, served, eofs, errors);
    return 0;
}
