/*
 * echo_server - the plain, well-behaved IPv4 server.
 *
 * Models: a classic single-threaded poll() server.  socket(AF_INET,
 * SOCK_STREAM, 0), bind 127.0.0.1, plain accept() (not accept4), answers
 * "pong\n" for every line and closes a connection as soon as read() returns
 * 0 (EOF) or an error.  Nothing is leaked: keepfix must not disturb it.
 *
 * Usage: echo_server PORT        (PORT 0 = kernel chooses)
 * stdout: READY port=P, ACCEPT fd=N, CLOSE fd=N, ACCEPT_ERR errno=E,
 *         READ_ERR/WRITE_ERR fd=N errno=E, STATS accepted=A served=S errors=E
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: echo_server PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), 0, 0);
    print_ready(lfd);

    struct pset ps = { 0 };
    pset_add(&ps, lfd, POLLIN);
    long accepted = 0, served = 0, errors = 0;

    while (!g_term) {
        if (poll(ps.p, ps.n, 100) <= 0)
            continue; /* timeout or EINTR: re-check the flag */

        if (ps.p[0].revents & POLLIN) {
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
            } else {
                printf("ACCEPT fd=%d\n", cfd);
                accepted++;
                pset_add(&ps, cfd, POLLIN);
            }
        }

        for (size_t i = 1; i < ps.n;) {
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
            /* EOF or error: a well-behaved server closes the connection. */
            close(fd);
            printf("CLOSE fd=%d\n", fd);
            pset_del(&ps, i); /* entry i now holds another fd: do not advance */
        }
    }
    printf("STATS accepted=%ld served=%ld errors=%ld\n", accepted, served, errors);
    return 0;
}
