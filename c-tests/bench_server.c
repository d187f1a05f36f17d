/*
 * bench_server - the accept-heavy server of the benchmark suite.
 *
 * Models: an HTTP/1.0-style server, one short connection per request, as
 * cheap per connection as a server gets: a blocking accept() loop on
 * 127.0.0.1 that reads the request (one read()), answers "pong\n" and closes (the
 * server closes first).  No output per connection, so the benchmark measures
 * the accept path and not stdout.  With --sink it closes every connection
 * as soon as it is accepted, without reading (a peer for connect() loops).
 * The listen backlog is 4096, so a fast client never sees dropped SYNs.
 *   --count N  exit after N connections (0 = until SIGTERM)
 *
 * Usage: bench_server [--count N] [--sink] PORT    (PORT 0 = kernel chooses)
 * stdout: READY port=P, ACCEPT_ERR errno=E,
 *         STATS accepted=A served=S errors=E cpu_us=U (getrusage, all threads)
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>

#define USAGE "usage: bench_server [--count N] [--sink] PORT"

int main(int argc, char **argv)
{
    proto_init();
    long count = 0;
    int sink = 0;
    static const struct option opts[] = {
        { "count", required_argument, NULL, 'n' },
        { "sink", no_argument, NULL, 's' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'n')
            count = parse_long(optarg, "--count");
        else if (c == 's')
            sink = 1;
        else
            die(USAGE);
    }
    if (optind != argc - 1 || count < 0)
        die(USAGE);
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    if (listen(lfd, 4096) < 0)
        die("listen:");
    print_ready(lfd);

    long accepted = 0, served = 0, errors = 0;
    while (!g_term && (count == 0 || accepted < count)) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno != EINTR) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
            }
            continue;
        }
        accepted++;
        if (!sink) {
            /* One read: the client sends its request in one write. */
            char buf[256];
            ssize_t n = read(cfd, buf, sizeof buf);
            if (n > 0 && write_all(cfd, "pong\n", 5) == 0)
                served++;
            else
                errors++;
        }
        close(cfd);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long long cpu_us = (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 +
                       ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
    printf("STATS accepted=%ld served=%ld errors=%ld cpu_us=%lld\n", accepted, served, errors, cpu_us);
    return 0;
}
