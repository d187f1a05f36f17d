/*
 * sd_server - a systemd socket-activated service.
 *
 * Models: a daemon that never creates its listening sockets: it takes them
 * from systemd (LISTEN_FDS / LISTEN_PID, fds 3 .. 3+LISTEN_FDS-1), exactly
 * like sd_listen_fds(1) does (checks LISTEN_PID == getpid(), unsets the
 * variables, marks the fds close-on-exec).  Connections may already be
 * waiting in the accept queue when it starts.  Then it behaves like
 * echo_server over all listeners: poll loop, plain accept(), "pong\n" per
 * line, close on EOF or error.
 *
 * Usage: sd_server        (normally: sd_launch [...] -- sd_server)
 * stdout: READY fds=N, ACCEPT fd=N, CLOSE fd=N, ACCEPT_ERR errno=E,
 *         READ_ERR/WRITE_ERR fd=N errno=E, STATS accepted=A served=S errors=E
 */
#define _GNU_SOURCE
#include "common.h"

#define SD_LISTEN_FDS_START 3

int main(void)
{
    proto_init();
    const char *e_pid = getenv("LISTEN_PID"), *e_fds = getenv("LISTEN_FDS");
    if (!e_pid || !e_fds)
        die("LISTEN_PID / LISTEN_FDS not set: not socket-activated");
    if (parse_long(e_pid, "LISTEN_PID") != (long)getpid())
        die("LISTEN_PID=%s is not my pid %d", e_pid, (int)getpid());
    int nfds = (int)parse_long(e_fds, "LISTEN_FDS");
    if (nfds < 1)
        die("LISTEN_FDS=%s: no sockets", e_fds);
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");

    struct pset ps = { 0 };
    for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + nfds; fd++) {
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
            die("inherited fd %d:", fd);
        pset_add(&ps, fd, POLLIN);
    }
    printf("READY fds=%d\n", nfds);

    long accepted = 0, served = 0, errors = 0;
    while (!g_term) {
        if (poll(ps.p, ps.n, 100) <= 0)
            continue;

        for (int i = 0; i < nfds; i++) {
            if (!(ps.p[i].revents & POLLIN))
                continue;
            int cfd = accept(ps.p[i].fd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
            } else {
                printf("ACCEPT fd=%d\n", cfd);
                accepted++;
                pset_add(&ps, cfd, POLLIN);
            }
        }

        for (size_t i = (size_t)nfds; i < ps.n;) {
            int fd = ps.p[i].fd;
            if (!ps.p[i].revents) {
                i++;
                continue;
            }
            ps.p[i].revents = 0;
            char buf[4096];
            ssize_t n = read(fd, buf, sizeof buf);
            if (n < 0 && errno == EINTR) {
                i++;
                continue;
            }
            if (n > 0) {
                int k = answer_lines(fd, buf, n);
                if (k >= 0) {
                    served += k;
                    i++;
                    continue;
                }
                printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
                errors++;
            } else if (n < 0) {
                printf("READ_ERR fd=%d errno=%d\n", fd, errno);
                errors++;
            }
            close(fd);
            printf("CLOSE fd=%d\n", fd);
            pset_del(&ps, i);
        }
    }
    printf("STATS accepted=%ld served=%ld errors=%ld\n", accepted, served, errors);
    return 0;
}
