/*
 * guest_closeall - a daemon's close-everything loop that trusts what it sees.
 *
 * Models: daemonising code that closes every fd from 3 up whose fcntl(F_GETFD) succeeds, and
 * treats a failing close() as a fatal error (as many do, to catch double closes).  It first
 * listens on 127.0.0.1 and takes one connection, so that a preloaded library's thread and fds
 * exist; right after each close it checks that fcntl says the number is closed, then listens
 * again and serves one more connection ("pong\n"), to show the library goes on working.
 *
 * Usage: guest_closeall
 * stdout: READY port=P (first listener), CLOSED count=N bad=B still_open=S,
 *         READY port=P (second listener), SERVED ok=0|1, then exit status 0 (B == S == 0) or 1.
 */
#define _GNU_SOURCE
#include "common.h"

int main(void)
{
    proto_init();
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    int c = accept(lfd, NULL, NULL);
    if (c < 0)
        die("accept:");
    sleep_ms(300); /* the library's thread runs a few ticks */
    int count = 0, bad = 0, still = 0;
    for (int fd = 3; fd < 1024; fd++) {
        if (fcntl(fd, F_GETFD) == -1)
            continue;
        count++;
        if (close(fd) != 0) {
            fprintf(stderr, "close(%d) failed: %s\n", fd, strerror(errno));
            bad++;
        }
        /* Right after its close the number is free (the library may open an fd of its own
         * again later, on its next tick: that is a new fd, not this one). */
        if (fcntl(fd, F_GETFD) != -1)
            still++;
    }
    printf("CLOSED count=%d bad=%d still_open=%d\n", count, bad, still);
    int l2 = listen_on(AF_INET, 0, 0, 0);
    print_ready(l2);
    int c2 = accept(l2, NULL, NULL);
    char b[64];
    int ok = c2 >= 0 && read_line(c2, b, sizeof b, 2000) > 0 && write(c2, "pong\n", 5) == 5;
    printf("SERVED ok=%d\n", ok);
    return bad || still || !ok;
}
