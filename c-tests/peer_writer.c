/*
 * peer_writer - a server for dead-peer tests across network namespaces.
 *
 * Models: a legacy server that holds its connections open and never sets
 * any keepalive option itself.  It binds ADDR (not only loopback: the test
 * runs it in a network namespace and connects from another one through a
 * veth pair), accepts connections and watches them with poll():
 *   - default: reads; answers "pong\n" per line; at EOF prints EOF and closes,
 *     at a read error prints READ_ERR (e.g. errno=110 ETIMEDOUT when
 *     keepalive or TCP_USER_TIMEOUT gave up on a vanished peer) and closes.
 *   --write: also writes a 1 KiB chunk to every connection every 20 ms
 *     (non-blocking; a full send buffer just waits), so that after the peer
 *     vanishes there is always unacknowledged data in flight.  A write error
 *     prints WRITE_ERR and closes.
 * It never sets SO_KEEPALIVE, TCP_KEEPIDLE, TCP_USER_TIMEOUT or anything of
 * the kind: whatever the sockets have comes from keepfix (or the kernel).
 *
 * Usage: peer_writer [--write] [--bind ADDR] PORT   (ADDR default 0.0.0.0)
 * stdout: READY port=P, ACCEPT fd=N, EOF fd=N, CLOSE fd=N,
 *         READ_ERR fd=N errno=E, WRITE_ERR fd=N errno=E,
 *         STATS accepted=A served=S written=W errors=E
 */
#define _GNU_SOURCE
#include "common.h"

#define USAGE "usage: peer_writer [--write] [--bind ADDR] PORT"

int main(int argc, char **argv)
{
    proto_init();
    const char *bind_addr = "0.0.0.0";
    int do_write = 0;
    static const struct option opts[] = {
        { "write", no_argument, NULL, 'w' },
        { "bind", required_argument, NULL, 'b' },
        { NULL, 0, NULL, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'w':
            do_write = 1;
            break;
        case 'b':
            bind_addr = optarg;
            break;
        default:
            die(USAGE);
        }
    }
    if (optind + 1 != argc)
        die(USAGE);

    int lfd = bind_host_on(AF_INET, bind_addr, parse_port(argv[optind]), 0, 0);
    if (listen(lfd, 128) < 0)
        die("listen:");
    print_ready(lfd);

    static char chunk[1024];
    memset(chunk, 'x', sizeof chunk);
    chunk[sizeof chunk - 1] = '\n';

    struct pset ps = { 0 };
    pset_add(&ps, lfd, POLLIN);
    long accepted = 0, served = 0, written = 0, errors = 0;
    long long next_write = now_ms();

    while (!g_term) {
        int timeout = 100;
        if (do_write) {
            long long left = next_write - now_ms();
            timeout = left < 0 ? 0 : (int)left;
        }
        int r = poll(ps.p, ps.n, timeout);
        if (r < 0)
            continue; /* EINTR: re-check the flag */

        if (ps.p[0].revents & POLLIN) {
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
            } else {
                set_nonblock(cfd);
                printf("ACCEPT fd=%d\n", cfd);
                accepted++;
                pset_add(&ps, cfd, POLLIN);
            }
        }
        int write_now = do_write && now_ms() >= next_write;
        if (write_now)
            next_write = now_ms() + 20;

        for (size_t i = 1; i < ps.n;) {
            int fd = ps.p[i].fd;
            short rev = ps.p[i].revents;
            ps.p[i].revents = 0;
            int failed = 0;
            if (rev) {
                char buf[4096];
                ssize_t n = read(fd, buf, sizeof buf);
                if (n > 0) {
                    int k = answer_lines(fd, buf, n);
                    if (k < 0) {
                        printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
                        failed = 1;
                    } else {
                        served += k;
                    }
                } else if (n == 0) {
                    printf("EOF fd=%d\n", fd);
                    failed = 2; /* not an error */
                } else if (errno != EAGAIN && errno != EINTR) {
                    printf("READ_ERR fd=%d errno=%d\n", fd, errno);
                    failed = 1;
                }
            }
            if (!failed && write_now) {
                ssize_t n = write(fd, chunk, sizeof chunk);
                if (n > 0) {
                    written += n;
                } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                    printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
                    failed = 1;
                }
            }
            if (failed) {
                if (failed == 1)
                    errors++;
                close(fd);
                printf("CLOSE fd=%d\n", fd);
                pset_del(&ps, i);
                continue;
            }
            i++;
        }
    }
    printf("STATS accepted=%ld served=%ld written=%ld errors=%ld\n", accepted, served, written, errors);
    return 0;
}
