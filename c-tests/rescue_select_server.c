/*
 * rescue_select_server - an old-style select() server that forgets connections
 * at EOF, for `keepfix rescue` (started without keepfix).
 *
 * Models: a single-threaded select() loop (so `keepfix rescue --raise-nofile`
 * must keep its soft limit at 1024 or below) that answers "pong\n" per line
 * and, when read() returns 0, forgets the fd without close(): CLOSE_WAIT.
 *   --sigpipe-default  SIGPIPE back to SIG_DFL (a write to a shut-down socket
 *                      kills the process), as in a program that never thought
 *                      about SIGPIPE.
 * stdin: "poke" writes "late\n" once to every forgotten connection (the
 *        program writing its answer late) and prints POKE fd=N ret=R errno=E,
 *        then POKED count=K.
 *
 * Usage: rescue_select_server [--sigpipe-default] PORT
 * stdout: READY port=P, ACCEPT fd=N, EOF fd=N, POKE ..., POKED count=K,
 *         STATS accepted=A served=S leaked=L
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/select.h>

int main(int argc, char **argv)
{
    proto_init();
    int sigpipe_default = 0;
    static const struct option opts[] = {
        { "sigpipe-default", no_argument, NULL, 's' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            sigpipe_default = 1;
        else
            die("usage: rescue_select_server [--sigpipe-default] PORT");
    }
    if (optind != argc - 1)
        die("usage: rescue_select_server [--sigpipe-default] PORT");
    if (sigpipe_default)
        signal(SIGPIPE, SIG_DFL);
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);

    int live[FD_SETSIZE], nlive = 0;     /* connections being served */
    int leaked[FD_SETSIZE], nleaked = 0; /* forgotten at EOF, never closed */
    long accepted = 0, served = 0;
    int stdin_open = 1;

    while (!g_term) {
        fd_set rd;
        FD_ZERO(&rd);
        FD_SET(lfd, &rd);
        int maxfd = lfd;
        if (stdin_open)
            FD_SET(0, &rd);
        for (int i = 0; i < nlive; i++) {
            FD_SET(live[i], &rd);
            if (live[i] > maxfd)
                maxfd = live[i];
        }
        struct timeval tv = { 0, 100000 };
        if (select(maxfd + 1, &rd, NULL, NULL, &tv) <= 0)
            continue;

        if (stdin_open && FD_ISSET(0, &rd)) {
            char line[64];
            ssize_t n = read(0, line, sizeof line - 1);
            if (n <= 0) {
                stdin_open = 0;
            } else if (strncmp(line, "poke", 4) == 0) {
                for (int i = 0; i < nleaked; i++) {
                    errno = 0;
                    ssize_t r = write(leaked[i], "late\n", 5);
                    printf("POKE fd=%d ret=%zd errno=%d\n", leaked[i], r, r < 0 ? errno : 0);
                }
                printf("POKED count=%d\n", nleaked);
            }
        }
        for (int i = 0; i < nlive;) {
            int fd = live[i];
            if (!FD_ISSET(fd, &rd)) {
                i++;
                continue;
            }
            char buf[4096];
            ssize_t n = read(fd, buf, sizeof buf);
            if (n > 0) {
                int k = answer_lines(fd, buf, n);
                if (k > 0)
                    served += k;
                i++;
                continue;
            }
            if (n < 0 && errno == EINTR) {
                i++;
                continue;
            }
            printf("EOF fd=%d\n", fd);
            /* THE BUG: forgotten, not closed. */
            leaked[nleaked++] = fd;
            live[i] = live[--nlive];
        }
        if (FD_ISSET(lfd, &rd)) {
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0)
                continue;
            if (cfd >= FD_SETSIZE || nlive + nleaked >= FD_SETSIZE - 8)
                die("fd %d: too many for select()", cfd);
            printf("ACCEPT fd=%d\n", cfd);
            accepted++;
            live[nlive++] = cfd;
        }
    }
    printf("STATS accepted=%ld served=%ld leaked=%d\n", accepted, served, nleaked);
    return 0;
}
