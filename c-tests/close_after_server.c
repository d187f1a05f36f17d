/*
 * close_after_server - closes every connection a while after accepting it.
 *
 * Models: a server with an idle/lifetime timeout (or a proxy, or a server
 * that restarts its workers): it answers "pong\n" per line and closes each
 * connection MS milliseconds after accepting it, whatever the client does.
 * Used to push pool_client's pooled connections into CLOSE_WAIT.  A
 * connection whose peer closes first (EOF) or errors is closed at once.
 *
 * Usage: close_after_server [--delay MS] PORT        (default 200 ms)
 * stdout: READY port=P, ACCEPT fd=N, CLOSE fd=N, ACCEPT_ERR errno=E,
 *         READ_ERR/WRITE_ERR fd=N errno=E, STATS accepted=A served=S errors=E
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    long delay = 200;
    static const struct option opts[] = {
        { "delay", required_argument, NULL, 'd' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'd')
            delay = parse_long(optarg, "--delay");
        else
            die("usage: close_after_server [--delay MS] PORT");
    }
    if (optind != argc - 1)
        die("usage: close_after_server [--delay MS] PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);

    struct pset ps = { 0 };
    long long *deadline = NULL; /* deadline[i] belongs to ps.p[i] (i >= 1) */
    size_t dcap = 0;
    pset_add(&ps, lfd, POLLIN);
    long accepted = 0, served = 0, errors = 0;

    while (!g_term) {
        long long now = now_ms();
        int timeout = 100;
        for (size_t i = 1; i < ps.n; i++)
            if (deadline[i] - now < timeout)
                timeout = deadline[i] - now > 0 ? (int)(deadline[i] - now) : 0;
        int r = poll(ps.p, ps.n, timeout);
        if (r < 0)
            continue;

        now = now_ms();
        for (size_t i = 1; i < ps.n;) {
            int fd = ps.p[i].fd, done = 0;
            if (ps.p[i].revents) {
                ps.p[i].revents = 0;
                char buf[4096];
                ssize_t n = read(fd, buf, sizeof buf);
                if (n > 0) {
                    int k = answer_lines(fd, buf, n);
                    if (k >= 0) {
                        served += k;
                    } else {
                        printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
                        errors++;
                        done = 1;
                    }
                } else if (n == 0) {
                    done = 1;
                } else if (errno != EINTR && errno != EAGAIN) {
                    printf("READ_ERR fd=%d errno=%d\n", fd, errno);
                    errors++;
                    done = 1;
                }
            }
            if (done || deadline[i] <= now) {
                close(fd);
                printf("CLOSE fd=%d\n", fd);
                deadline[i] = deadline[ps.n - 1]; /* same move as pset_del */
                pset_del(&ps, i);
                continue;
            }
            i++;
        }

        if (ps.p[0].revents & POLLIN) {
            ps.p[0].revents = 0;
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
                continue;
            }
            printf("ACCEPT fd=%d\n", cfd);
            accepted++;
            pset_add(&ps, cfd, POLLIN);
            if (ps.cap > dcap) {
                dcap = ps.cap;
                deadline = realloc(deadline, dcap * sizeof *deadline);
                if (!deadline)
                    die("out of memory");
            }
            deadline[ps.n - 1] = now_ms() + delay;
        }
    }
    printf("STATS accepted=%ld served=%ld errors=%ld\n", accepted, served, errors);
    return 0;
}
