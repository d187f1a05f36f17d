/*
 * inetd_echo - an inetd-style service.
 *
 * Models: a program started by inetd (or a wrapper like inetd_launch) whose
 * connection is already fd 0 (read side) and fd 1 (write side).  It never
 * creates, accepts or connects a socket itself, so a preload library only
 * sees sockets it inherited.  For every line read from fd 0 it writes
 * "pong\n" to fd 1; at EOF on fd 0 it exits 0.  It writes NOTHING else,
 * anywhere - not even to stderr, which in inetd setups may be the socket too.
 * A failed read or write makes it exit 1, silently.
 *
 * Usage: inetd_echo        (normally: inetd_launch PORT -- inetd_echo)
 */
#define _GNU_SOURCE
#include "common.h"

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a dead peer gives EPIPE, not a signal */
    char buf[4096];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            return 0;
        if (n < 0 || answer_lines(1, buf, n) < 0)
            return 1;
    }
}
