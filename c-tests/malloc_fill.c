/*
 * malloc_fill - how much memory the program can malloc under an address-space limit.
 *
 * Models: a program sized to its RLIMIT_AS (a container's memory limit, `ulimit -v`).  It
 * listens on 127.0.0.1 (keepfix's thread starts), makes LEAKS connections to itself, accepts
 * them and closes the client ends, leaking the accepted ends in CLOSE_WAIT (keepfix's detector
 * finds them; in close mode it releases them), waits SETTLE_MS, then mallocs 1 MiB blocks,
 * touching every page, until malloc fails.  It prints the total and waits for the test (stdin
 * EOF) before freeing everything and exiting 0.
 *
 * Usage: malloc_fill [--leaks N] [--settle-ms MS]
 * stdout: READY port=P, TOTAL mib=N
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    long leaks = 8, settle_ms = 1000;
    static const struct option opts[] = {
        { "leaks", required_argument, 0, 'l' }, { "settle-ms", required_argument, 0, 's' }, { 0, 0, 0, 0 }
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'l')
            leaks = parse_long(optarg, "leaks");
        else if (c == 's')
            settle_ms = parse_long(optarg, "settle-ms");
        else
            die("usage: malloc_fill [--leaks N] [--settle-ms MS]");
    }
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    int port = local_port(lfd);
    for (long i = 0; i < leaks; i++) {
        struct sockaddr_storage ss;
        socklen_t len = make_addr(AF_INET, "127.0.0.1", port, &ss);
        int cfd = socket(AF_INET, SOCK_STREAM, 0);
        if (cfd < 0 || connect(cfd, (struct sockaddr *)&ss, len) < 0)
            die("connect:");
        int afd = accept(lfd, NULL, NULL);
        if (afd < 0)
            die("accept:");
        close(cfd); /* the peer closes; afd is leaked in CLOSE_WAIT */
    }
    sleep_ms(settle_ms);

    void **blocks = NULL;
    long n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            long ncap = cap ? cap * 2 : 256;
            void **nb = realloc(blocks, ncap * sizeof *nb);
            if (!nb)
                break;
            blocks = nb;
            cap = ncap;
        }
        char *p = malloc(1 << 20);
        if (!p)
            break;
        for (long off = 0; off < (1 << 20); off += 4096)
            p[off] = 1;
        blocks[n++] = p;
    }
    printf("TOTAL mib=%ld\n", n);
    char buf[64];
    while (!g_term && read(0, buf, sizeof buf) > 0)
        ;
    for (long i = 0; i < n; i++)
        free(blocks[i]);
    free(blocks);
    return 0;
}
