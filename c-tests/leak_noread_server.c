/*
 * leak_noread_server - accepts connections and never touches them again.
 *
 * Models: a server that accepts, maybe greets, and then forgets the
 * connection entirely (no read, no close): when the peer goes away the socket
 * stays in CLOSE_WAIT with unread data, and the fd leaks.  Blocking accept()
 * loop; SIGTERM interrupts accept() (no SA_RESTART).
 *
 * Usage: leak_noread_server [--greet] PORT
 * stdout: READY port=P, ACCEPT fd=N, WRITE_ERR fd=N errno=E (--greet),
 *         ACCEPT_ERR errno=E, STATS accepted=A errors=E
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    int greet = 0;
    static const struct option opts[] = {
        { "greet", no_argument, NULL, 'g' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'g')
            greet = 1;
        else
            die("usage: leak_noread_server [--greet] PORT");
    }
    if (optind != argc - 1)
        die("usage: leak_noread_server [--greet] PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);

    long accepted = 0, errors = 0;
    while (!g_term) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno != EINTR) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
                sleep_ms(10);
            }
            continue;
        }
        printf("ACCEPT fd=%d\n", cfd);
        accepted++;
        if (greet && write_all(cfd, "hello\n", 6) < 0) {
            printf("WRITE_ERR fd=%d errno=%d\n", cfd, errno);
            errors++;
        }
        /* THE BUG: cfd is never read and never closed. */
    }
    printf("STATS accepted=%ld errors=%ld\n", accepted, errors);
    return 0;
}
