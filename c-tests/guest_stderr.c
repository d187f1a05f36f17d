/*
 * guest_stderr - a program whose fd 2 is (or becomes) something keepfix must not write to.
 *
 * Models: a program that hands its stderr to a private channel.  MODE:
 *   socketpair  before its first socket call, dup2()s one end of an AF_UNIX
 *               SOCK_STREAM socketpair onto fd 2 (an RPC channel to a helper);
 *               the other end is the "peer"
 *   none        leaves fd 2 as it was at exec (a control)
 * Then it listens on 127.0.0.1 (keepfix's thread starts and logs `start`),
 * turns SO_KEEPALIVE off on the listener (an `app_override` line on keepfix's
 * next tick), waits WAIT_MS, and reads (without blocking) everything that
 * arrived at the peer end.
 *
 * Usage: guest_stderr [--wait-ms MS] MODE
 * stdout: READY port=P, PEER bytes=N (socketpair mode: what the peer end received), DONE
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    long wait_ms = 1000;
    static const struct option opts[] = { { "wait-ms", required_argument, 0, 'w' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'w')
            wait_ms = parse_long(optarg, "wait-ms");
        else
            die("usage: guest_stderr [--wait-ms MS] socketpair|none");
    }
    if (argc - optind != 1)
        die("usage: guest_stderr [--wait-ms MS] socketpair|none");
    const char *mode = argv[optind];
    int peer = -1;
    if (strcmp(mode, "socketpair") == 0) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
            die("socketpair:");
        if (dup2(sv[0], 2) < 0)
            die("dup2:");
        close(sv[0]);
        peer = sv[1];
    } else if (strcmp(mode, "none") != 0) {
        die("bad mode '%s'", mode);
    }
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    int zero = 0;
    setsockopt(lfd, SOL_SOCKET, SO_KEEPALIVE, &zero, sizeof zero);
    sleep_ms(wait_ms);
    if (peer >= 0) {
        long total = 0;
        char buf[4096];
        ssize_t n;
        while ((n = recv(peer, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
            total += n;
            fprintf(stdout, "PEER_DATA %.*s", (int)n, buf);
        }
        printf("\nPEER bytes=%ld\n", total);
    }
    printf("DONE\n");
    return 0;
}
