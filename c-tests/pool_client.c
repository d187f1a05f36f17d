/*
 * pool_client - a connection pool that never notices a dead connection.
 *
 * Models: the client-side leak: a pool of outbound connections that is
 * filled once and then used round-robin; when the server closes a pooled
 * connection the client never notices (no read while idle), so the socket
 * sits in CLOSE_WAIT, and the next "use" of it fails.  The pool never closes
 * or replaces a connection.  Commands come on stdin, one per line:
 *   use   pick the next connection (round-robin), send "ping\n", read one
 *         line (2 s timeout) and print USE
 *   quit  print STATS and exit 0 (so does stdin EOF or SIGTERM)
 *
 * Usage: pool_client HOST PORT SIZE          (HOST numeric IPv4)
 * stdout: CONNECTED fd=N lport=P (each), CONNECT_ERR errno=E, READY size=SIZE,
 *         USE fd=N ok=1 | USE fd=N ok=0 errno=E | USE fd=N ok=0 eof=1,
 *         UNKNOWN cmd=WORD, STATS uses=U ok=K failed=F
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 4)
        die("usage: pool_client HOST PORT SIZE");
    struct sockaddr_storage ss;
    socklen_t alen = make_addr(AF_INET, argv[1], parse_port(argv[2]), &ss);
    long size = parse_long(argv[3], "SIZE");
    if (size < 1)
        die("SIZE must be >= 1");

    int *pool = calloc((size_t)size, sizeof *pool);
    long n = 0;
    for (long i = 0; i < size; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket:");
        if (connect(fd, (struct sockaddr *)&ss, alen) < 0) {
            printf("CONNECT_ERR errno=%d\n", errno);
            close(fd);
            continue;
        }
        pool[n++] = fd;
        printf("CONNECTED fd=%d lport=%d\n", fd, local_port(fd));
    }
    printf("READY size=%ld\n", n);

    struct linebuf lb = { .len = 0 };
    long uses = 0, oks = 0, next = 0;
    while (!g_term) {
        char cmd[256];
        if (!lb_getline(&lb, cmd, sizeof cmd)) {
            if (lb.eof)
                break;
            struct pollfd p = { 0, POLLIN, 0 };
            if (poll(&p, 1, 100) > 0)
                lb_fill(&lb, 0);
            continue;
        }
        if (strcmp(cmd, "quit") == 0)
            break;
        if (cmd[0] == '\0')
            continue;
        if (strcmp(cmd, "use") != 0) {
            for (char *q = cmd; *q; q++) /* keep the line one token */
                if (*q == ' ' || *q == '\t' || *q == '=')
                    *q = '_';
            printf("UNKNOWN cmd=%s\n", cmd);
            continue;
        }
        if (n == 0) {
            printf("USE fd=-1 ok=0 errno=%d\n", ENOTCONN);
            uses++;
            continue;
        }
        int fd = pool[next++ % n];
        uses++;
        char line[256];
        ssize_t r;
        if (write_all(fd, "ping\n", 5) < 0) {
            printf("USE fd=%d ok=0 errno=%d\n", fd, errno);
        } else if ((r = read_line(fd, line, sizeof line, 2000)) < 0) {
            printf("USE fd=%d ok=0 errno=%d\n", fd, errno);
        } else if (r == 0) {
            printf("USE fd=%d ok=0 eof=1\n", fd);
        } else {
            printf("USE fd=%d ok=1\n", fd);
            oks++;
        }
        /* THE BUG: a failed connection stays in the pool as it is. */
    }
    printf("STATS uses=%ld ok=%ld failed=%ld\n", uses, oks, uses - oks);
    return 0;
}
