/*
 * out_client - a client holding outbound connections open.
 *
 * Models: a program that connects out (blocking connect(), or with
 * --nonblock the SOCK_NONBLOCK + EINPROGRESS + poll(POLLOUT) + SO_ERROR
 * dance) and then keeps its connections idle.  keepfix must put keepalive on
 * outbound sockets too, however they were connected.
 *
 * Usage: out_client [--nonblock] [--v6] HOST PORT COUNT   (HOST numeric)
 * stdout: CONNECTED fd=N lport=P (each), CONNECT_ERR errno=E (each failure),
 *         READY count=COUNT connected=C, then after stdin EOF or SIGTERM:
 *         CLOSE fd=N (each), STATS connected=C errors=E
 */
#define _GNU_SOURCE
#include "common.h"

#define USAGE "usage: out_client [--nonblock] [--v6] HOST PORT COUNT"

/* Returns a connected fd, or -1 with errno set. */
static int connect_one(int family, const struct sockaddr_storage *ss, socklen_t len, int nonblock)
{
    int fd = socket(family, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        return -1;
    int r = connect(fd, (const struct sockaddr *)ss, len);
    if (r < 0 && nonblock && errno == EINPROGRESS) {
        struct pollfd p = { fd, POLLOUT, 0 };
        int err = 0;
        socklen_t elen = sizeof err;
        do
            r = poll(&p, 1, 5000);
        while (r < 0 && errno == EINTR && !g_term);
        if (r == 0)
            err = ETIMEDOUT;
        else if (r < 0)
            err = errno;
        else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
            err = errno;
        r = err ? -1 : 0;
        errno = err;
    }
    if (r < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

int main(int argc, char **argv)
{
    proto_init();
    int nonblock = 0, family = AF_INET;
    static const struct option opts[] = {
        { "nonblock", no_argument, NULL, 'n' },
        { "v6", no_argument, NULL, '6' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'n')
            nonblock = 1;
        else if (c == '6')
            family = AF_INET6;
        else
            die(USAGE);
    }
    if (argc - optind != 3)
        die(USAGE);
    struct sockaddr_storage ss;
    socklen_t len = make_addr(family, argv[optind], parse_port(argv[optind + 1]), &ss);
    long count = parse_long(argv[optind + 2], "COUNT");
    if (count < 0)
        die(USAGE);

    int *fds = calloc((size_t)count + 1, sizeof *fds);
    long connected = 0, errors = 0;
    for (long i = 0; i < count && !g_term; i++) {
        int fd = connect_one(family, &ss, len, nonblock);
        if (fd < 0) {
            printf("CONNECT_ERR errno=%d\n", errno);
            errors++;
            continue;
        }
        fds[connected++] = fd;
        printf("CONNECTED fd=%d lport=%d\n", fd, local_port(fd));
    }
    printf("READY count=%ld connected=%ld\n", count, connected);

    wait_for_test();

    for (long i = 0; i < connected; i++) {
        close(fds[i]);
        printf("CLOSE fd=%d\n", fds[i]);
    }
    printf("STATS connected=%ld errors=%ld\n", connected, errors);
    return 0;
}
