/*
 * harm_pollout_writer - a writer that sleeps in poll(POLLOUT) while its peer does not read.
 *
 * Models: a streaming server (logs, a download) that writes 4 KiB chunks to a
 * non-blocking connection and waits in poll(POLLOUT, 1 s) whenever the send
 * buffer is full.  Its client sent a request and half-closed, and does not
 * read: the server's read() consumed the request and the FIN, the socket is
 * in CLOSE_WAIT, and the writer blocks in poll for ever.  It stops at a write
 * error, or at 1 TiB (or SIGTERM).
 *
 * Usage: harm_pollout_writer PORT
 * stdout: READY port=P, ACCEPT fd=N, WRITE_ERR fd=N errno=E,
 *         STATS written=B polls=P write_calls=W
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: harm_pollout_writer PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), 0, 0);
    print_ready(lfd);
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept:");
    printf("ACCEPT fd=%d\n", fd);
    char req[256];
    struct pollfd q = { fd, POLLIN, 0 };
    if (poll(&q, 1, 2000) > 0 && read(fd, req, sizeof req) < 0)
        printf("READ_ERR fd=%d errno=%d\n", fd, errno);
    set_nonblock(fd);
    static char chunk[4096];
    memset(chunk, 'w', sizeof chunk);
    long long written = 0, polls = 0, calls = 0;
    while (!g_term && written < (1LL << 40)) {
        ssize_t n = write(fd, chunk, sizeof chunk);
        calls++;
        if (n > 0) {
            written += n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
            break;
        }
        struct pollfd p = { fd, POLLOUT, 0 };
        poll(&p, 1, 1000);
        polls++;
    }
    printf("STATS written=%lld polls=%lld write_calls=%lld\n", written, polls, calls);
    return 0;
}
