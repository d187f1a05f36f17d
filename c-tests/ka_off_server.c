/*
 * ka_off_server - a server that explicitly turns TCP keepalive OFF.
 *
 * Models: legacy code that calls setsockopt(SO_KEEPALIVE, 0) on its listener
 * (before listen()) and on every accepted socket, optionally also tuning
 * TCP_KEEPIDLE.  Tests check what the program sees (return values, errno,
 * the getsockopt read-back) and what the kernel really has.  Otherwise it is
 * echo_server: poll loop, plain accept(), "pong\n" per line, close on EOF.
 *
 * Usage: ka_off_server [--idle SECS] PORT
 * stdout: READY port=P, ACCEPT fd=N,
 *         SETSOCKOPT fd=N opt=SO_KEEPALIVE|TCP_KEEPIDLE val=V ret=R errno=E
 *           (errno is set to 0 just before the call, printed right after it),
 *         GETSOCKOPT fd=N SO_KEEPALIVE=V [TCP_KEEPIDLE=V]   (after the sets),
 *         CLOSE fd=N, ACCEPT_ERR errno=E, READ_ERR/WRITE_ERR fd=N errno=E,
 *         STATS accepted=A served=S errors=E
 */
#define _GNU_SOURCE
#include "common.h"

static void set_opt(int fd, int level, int opt, const char *name, int val)
{
    errno = 0;
    int ret = setsockopt(fd, level, opt, &val, sizeof val);
    int err = errno;
    printf("SETSOCKOPT fd=%d opt=%s val=%d ret=%d errno=%d\n", fd, name, val, ret, err);
}

/* SO_KEEPALIVE=0 (and TCP_KEEPIDLE=idle if idle > 0), then read back. */
static void keepalive_off(int fd, int idle)
{
    set_opt(fd, SOL_SOCKET, SO_KEEPALIVE, "SO_KEEPALIVE", 0);
    if (idle > 0)
        set_opt(fd, IPPROTO_TCP, TCP_KEEPIDLE, "TCP_KEEPIDLE", idle);

    int ka = -1, v_idle = -1;
    socklen_t len = sizeof ka;
    if (getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &ka, &len) < 0)
        ka = -errno;
    if (idle > 0) {
        len = sizeof v_idle;
        if (getsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &v_idle, &len) < 0)
            v_idle = -errno;
        printf("GETSOCKOPT fd=%d SO_KEEPALIVE=%d TCP_KEEPIDLE=%d\n", fd, ka, v_idle);
    } else {
        printf("GETSOCKOPT fd=%d SO_KEEPALIVE=%d\n", fd, ka);
    }
}

int main(int argc, char **argv)
{
    proto_init();
    int idle = 0;
    static const struct option opts[] = {
        { "idle", required_argument, NULL, 'i' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'i')
            idle = (int)parse_long(optarg, "--idle");
        else
            die("usage: ka_off_server [--idle SECS] PORT");
    }
    if (optind != argc - 1)
        die("usage: ka_off_server [--idle SECS] PORT");

    /* The listener: keepalive off before listen(); TCP_KEEPIDLE only on
     * accepted sockets. */
    int lfd = bind_on(AF_INET, parse_port(argv[optind]), 0, 0);
    keepalive_off(lfd, 0);
    if (listen(lfd, 128) < 0)
        die("listen:");
    print_ready(lfd);

    struct pset ps = { 0 };
    pset_add(&ps, lfd, POLLIN);
    long accepted = 0, served = 0, errors = 0;

    while (!g_term) {
        if (poll(ps.p, ps.n, 100) <= 0)
            continue;

        if (ps.p[0].revents & POLLIN) {
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
            } else {
                printf("ACCEPT fd=%d\n", cfd);
                accepted++;
                keepalive_off(cfd, idle);
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
            close(fd);
            printf("CLOSE fd=%d\n", fd);
            pset_del(&ps, i);
        }
    }
    printf("STATS accepted=%ld served=%ld errors=%ld\n", accepted, served, errors);
    return 0;
}
