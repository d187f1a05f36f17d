/*
 * harm_strict_ka - a program that sets its own keepalive timings, some stricter, some looser.
 *
 * Models: a server that tunes keepalive itself: on its listener (before
 * listen) SO_KEEPALIVE=1, TCP_KEEPIDLE=3, TCP_KEEPINTVL=5, TCP_KEEPCNT=1; on
 * the connection it accepts TCP_KEEPINTVL=5 again; an outbound connection
 * (to its own listener) with TCP_KEEPINTVL=4 set before connect(); and a
 * second listener with a LOOSER TCP_KEEPIDLE=7200 and TCP_KEEPCNT=20.
 * It reads back every option with getsockopt and reports it, then waits for
 * the test.
 *
 * Usage: harm_strict_ka
 * stdout: READY port=P, SOCK name=NAME fd=N ka=K idle=I intvl=V cnt=C
 *         (NAME: listener, accepted, outbound, loose), DONE
 */
#define _GNU_SOURCE
#include "common.h"

static void set(int fd, int level, int name, int v)
{
    if (setsockopt(fd, level, name, &v, sizeof v) < 0)
        die("setsockopt %d:", name);
}

static int get(int fd, int level, int name)
{
    int v = -1;
    socklen_t l = sizeof v;
    getsockopt(fd, level, name, &v, &l);
    return v;
}

static void report(const char *name, int fd)
{
    printf("SOCK name=%s fd=%d ka=%d idle=%d intvl=%d cnt=%d\n", name, fd, get(fd, SOL_SOCKET, SO_KEEPALIVE),
           get(fd, IPPROTO_TCP, TCP_KEEPIDLE), get(fd, IPPROTO_TCP, TCP_KEEPINTVL), get(fd, IPPROTO_TCP, TCP_KEEPCNT));
}

int main(void)
{
    proto_init();
    int lfd = bind_on(AF_INET, 0, 0, 0);
    set(lfd, SOL_SOCKET, SO_KEEPALIVE, 1);
    set(lfd, IPPROTO_TCP, TCP_KEEPIDLE, 3);
    set(lfd, IPPROTO_TCP, TCP_KEEPINTVL, 5);
    set(lfd, IPPROTO_TCP, TCP_KEEPCNT, 1);
    if (listen(lfd, 128) < 0)
        die("listen:");
    int loose = bind_on(AF_INET, 0, 0, 0);
    set(loose, SOL_SOCKET, SO_KEEPALIVE, 1);
    set(loose, IPPROTO_TCP, TCP_KEEPIDLE, 7200);
    set(loose, IPPROTO_TCP, TCP_KEEPCNT, 20);
    if (listen(loose, 128) < 0)
        die("listen:");
    int out = socket(AF_INET, SOCK_STREAM, 0);
    if (out < 0)
        die("socket:");
    set(out, IPPROTO_TCP, TCP_KEEPINTVL, 4);
    struct sockaddr_storage ss;
    socklen_t len = make_addr(AF_INET, "127.0.0.1", local_port(lfd), &ss);
    if (connect(out, (struct sockaddr *)&ss, len) < 0)
        die("connect:");
    int acc = accept(lfd, NULL, NULL);
    if (acc < 0)
        die("accept:");
    set(acc, IPPROTO_TCP, TCP_KEEPINTVL, 5);
    print_ready(lfd);
    report("listener", lfd);
    report("accepted", acc);
    report("outbound", out);
    report("loose", loose);
    printf("DONE\n");
    wait_for_test();
    return 0;
}
