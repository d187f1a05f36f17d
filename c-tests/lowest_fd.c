/*
 * lowest_fd - a program that relies on open() returning the lowest free number (a daemon's
 * close(0); open("/dev/null") trick, or code that keeps an fd-indexed array dense), while it
 * keeps closing every fd above its listener with closefrom() (a CGI host before exec, say).
 *
 * Each closefrom() also takes keepfix's own fds, which keepfix makes again. If keepfix ever
 * opened one of them in its own thread, the open() would hold the lowest free number for an
 * instant, and this program's next open() would get another number.
 *
 * Usage: lowest_fd [--seconds S] PORT
 * stdout: READY port=P, STATS sweeps=N opens=M wrong=W (opens that did not get the lowest
 *         free number)
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    int seconds = 2;
    if (argc >= 3 && !strcmp(argv[1], "--seconds"))
        seconds = (int)parse_long(argv[2], "--seconds"), argv += 2, argc -= 2;
    if (argc != 2)
        die("usage: lowest_fd [--seconds S] PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), 0, 0);
    print_ready(lfd);
    fflush(stdout);
    long sweeps = 0, opens = 0, wrong = 0;
    long long end = now_ms() + seconds * 1000LL;
    while (now_ms() < end) {
        closefrom(lfd + 1);
        sweeps++;
        /* The lowest free number is lfd + 1 now (0, 1, 2 and the listener are open). */
        long long until = now_ms() + 5;
        while (now_ms() < until) {
            int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                die("open:");
            opens++;
            if (fd != lfd + 1)
                wrong++;
            close(fd);
        }
        /* A connection of its own, as a server would accept one: keepfix makes its fds again
         * in this thread, after the call. */
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)local_port(lfd)),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a) < 0)
            die("connect:");
        int s = accept(lfd, NULL, NULL);
        if (s >= 0)
            close(s);
        close(c);
    }
    printf("STATS sweeps=%ld opens=%ld wrong=%ld\n", sweeps, opens, wrong);
    return 0;
}
