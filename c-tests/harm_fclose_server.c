/*
 * harm_fclose_server - closes connections behind close()'s back, then logs to the freed numbers.
 *
 * Models: legacy code that reads a request through stdio (fdopen + fgets to
 * EOF) and ends it with fclose(), and code that closes with
 * syscall(SYS_close): neither reaches an interposed close().  Then it opens
 * two log files (they get the freed numbers) and, for SECONDS seconds,
 * appends a numbered line to each every 10 ms, while it accepts and leaks
 * more connections (reads each to EOF, never closes: the classic bug).
 * Each connection waits HOLD ms after its EOF before being closed, so that
 * a watchdog has time to act on it first.
 *
 * Usage: harm_fclose_server [--seconds S] [--hold-ms MS] DIR PORT
 *        (logs are DIR/log1 and DIR/log2)
 * stdout: READY port=P, ACCEPT fd=N, CLOSED fd=N how=fclose|syscall ret=R,
 *         LOG name=log1|log2 fd=N, EOF fd=N, ACCEPT_ERR errno=E,
 *         WRITE_ERR fd=N errno=E, CLOSE fd=N ret=R errno=E,
 *         STATS lines=L write_err=W leaked=K accept_err=X
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/syscall.h>

int main(int argc, char **argv)
{
    proto_init();
    int seconds = 4, hold = 400;
    static const struct option opts[] = { { "seconds", 1, 0, 's' }, { "hold-ms", 1, 0, 'h' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            seconds = (int)parse_long(optarg, "seconds");
        else if (c == 'h')
            hold = (int)parse_long(optarg, "hold-ms");
        else
            die("usage: harm_fclose_server [--seconds S] [--hold-ms MS] DIR PORT");
    }
    if (optind + 2 != argc)
        die("usage: harm_fclose_server [--seconds S] [--hold-ms MS] DIR PORT");
    const char *dir = argv[optind];
    int lfd = listen_on(AF_INET, parse_port(argv[optind + 1]), 0, 0);
    print_ready(lfd);

    /* Connection 1: stdio to EOF, then fclose(). */
    int a = accept(lfd, NULL, NULL);
    if (a < 0)
        die("accept:");
    printf("ACCEPT fd=%d\n", a);
    FILE *f = fdopen(a, "r+");
    if (!f)
        die("fdopen:");
    char line[256];
    while (fgets(line, sizeof line, f))
        ;
    sleep_ms(hold);
    printf("CLOSED fd=%d how=fclose ret=%d\n", a, fclose(f));

    /* Connection 2: read() to EOF, then syscall(SYS_close). */
    int b = accept(lfd, NULL, NULL);
    if (b < 0)
        die("accept:");
    printf("ACCEPT fd=%d\n", b);
    while (read(b, line, sizeof line) > 0)
        ;
    sleep_ms(hold);
    printf("CLOSED fd=%d how=syscall ret=%ld\n", b, syscall(SYS_close, b));

    char p1[4096], p2[4096];
    snprintf(p1, sizeof p1, "%s/log1", dir);
    snprintf(p2, sizeof p2, "%s/log2", dir);
    int logs[2] = { open(p1, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644),
                    open(p2, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644) };
    if (logs[0] < 0 || logs[1] < 0)
        die("open logs:");
    printf("LOG name=log1 fd=%d\nLOG name=log2 fd=%d\n", logs[0], logs[1]);

    set_nonblock(lfd);
    long lines = 0, write_err = 0, leaked = 0, accept_err = 0;
    long long end = now_ms() + seconds * 1000LL, next = now_ms();
    struct pset conns = { 0 };
    while (!g_term && now_ms() < end) {
        if (now_ms() >= next) {
            for (int i = 0; i < 2; i++) {
                char b2[64];
                int n = snprintf(b2, sizeof b2, "log%d line %06ld\n", i + 1, lines);
                ssize_t r = write(logs[i], b2, (size_t)n);
                if (r != n) {
                    printf("WRITE_ERR fd=%d errno=%d\n", logs[i], r < 0 ? errno : 0);
                    write_err++;
                }
            }
            lines++;
            next += 10;
        }
        struct pset ps = { 0 };
        pset_add(&ps, lfd, POLLIN);
        for (size_t i = 0; i < conns.n; i++)
            pset_add(&ps, conns.p[i].fd, POLLIN);
        int wait = (int)(next - now_ms());
        poll(ps.p, ps.n, wait < 0 ? 0 : wait);
        for (size_t i = 1; i < ps.n; i++) {
            if (!ps.p[i].revents)
                continue;
            char buf[512];
            ssize_t n = read(ps.p[i].fd, buf, sizeof buf);
            if (n <= 0) {
                printf("EOF fd=%d\n", ps.p[i].fd);
                leaked++;
                for (size_t k = 0; k < conns.n; k++)
                    if (conns.p[k].fd == ps.p[i].fd) {
                        pset_del(&conns, k);
                        break;
                    }
            }
        }
        if (ps.p[0].revents & POLLIN) {
            int fd = accept(lfd, NULL, NULL);
            if (fd >= 0) {
                printf("ACCEPT fd=%d\n", fd);
                pset_add(&conns, fd, POLLIN);
            } else if (errno != EAGAIN) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                accept_err++;
                sleep_ms(5);
            }
        }
        free(ps.p);
    }
    for (int i = 0; i < 2; i++) {
        int r = close(logs[i]);
        printf("CLOSE fd=%d ret=%d errno=%d\n", logs[i], r, r < 0 ? errno : 0);
    }
    printf("STATS lines=%ld write_err=%ld leaked=%ld accept_err=%ld\n", lines, write_err, leaked, accept_err);
    return 0;
}
