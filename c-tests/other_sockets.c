/*
 * other_sockets - a program that only makes NON-TCP sockets.
 *
 * Models: the bulk of any real program's sockets that are not TCP: UDP, UDP6,
 * unix socketpairs, unix datagram and listening stream sockets (abstract
 * address), netlink, raw ICMP.  A preload library must leave them alone and,
 * like every well-behaved libc wrapper, must not clobber errno on success.
 * Before each call errno is set to 4242; after a successful call we check it
 * is still 4242.
 *
 * Usage: other_sockets
 * stdout: SOCK kind=K fd=N errno_kept=1        (or errno_kept=0 errno=E)
 *         SOCK_ERR kind=K errno=E              (the creation failed)
 *         SKIP kind=raw                        (no CAP_NET_RAW)
 *         CALL name=NAME ret=R errno_kept=1    (or errno_kept=0 errno=E)
 *         READY, then waits for stdin EOF / SIGTERM, then STATS errors=E
 * kinds: udp udp6 unix_pair_a unix_pair_b unix_dgram unix_listen netlink raw
 * calls: connect_udp setsockopt_udp bind_unix listen_unix dup_unix close_unix_dup
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/netlink.h>
#include <stddef.h>
#include <sys/un.h>

#define MAGIC 4242
static long errors;

static void report_errno(int err)
{
    if (err == MAGIC) {
        printf(" errno_kept=1\n");
    } else {
        printf(" errno_kept=0 errno=%d\n", err);
        errors++;
    }
}

/* Reports a socket creation: ret is the fd, err the errno right after it. */
static int sock_report(const char *kind, int fd, int err)
{
    if (fd < 0) {
        printf("SOCK_ERR kind=%s errno=%d\n", kind, err);
        errors++;
        return fd;
    }
    printf("SOCK kind=%s fd=%d", kind, fd);
    report_errno(err);
    return fd;
}

static void call_report(const char *name, int ret, int err)
{
    if (ret < 0) {
        printf("CALL name=%s ret=%d errno=%d\n", name, ret, err);
        errors++;
        return;
    }
    printf("CALL name=%s ret=%d", name, ret);
    report_errno(err);
}

/* errno = MAGIC; run expr; capture errno right away. */
#define TRY(var, err, expr) do { errno = MAGIC; var = (expr); err = errno; } while (0)

int main(void)
{
    proto_init();
    int fd, r, e;

    TRY(fd, e, socket(AF_INET, SOCK_DGRAM, 0));
    int udp = sock_report("udp", fd, e);
    TRY(fd, e, socket(AF_INET6, SOCK_DGRAM, 0));
    sock_report("udp6", fd, e);

    int pair[2] = { -1, -1 };
    TRY(r, e, socketpair(AF_UNIX, SOCK_STREAM, 0, pair));
    if (r < 0) {
        sock_report("unix_pair_a", -1, e);
    } else {
        sock_report("unix_pair_a", pair[0], e);
        sock_report("unix_pair_b", pair[1], e);
    }

    TRY(fd, e, socket(AF_UNIX, SOCK_DGRAM, 0));
    sock_report("unix_dgram", fd, e);

    TRY(fd, e, socket(AF_UNIX, SOCK_STREAM, 0));
    int ul = sock_report("unix_listen", fd, e);
    if (ul >= 0) {
        /* abstract address: sun_path[0] == '\0', nothing in the filesystem */
        struct sockaddr_un un = { .sun_family = AF_UNIX };
        int n = snprintf(un.sun_path + 1, sizeof un.sun_path - 1,
                         "keepfix-other-sockets-%d", (int)getpid());
        socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
        TRY(r, e, bind(ul, (struct sockaddr *)&un, len));
        call_report("bind_unix", r, e);
        TRY(r, e, listen(ul, 128));
        call_report("listen_unix", r, e);
    }

    TRY(fd, e, socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE));
    sock_report("netlink", fd, e);

    TRY(fd, e, socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    if (fd < 0 && (e == EPERM || e == EACCES))
        printf("SKIP kind=raw\n");
    else
        sock_report("raw", fd, e);

    if (udp >= 0) {
        struct sockaddr_storage ss;
        socklen_t len = make_addr(AF_INET, "127.0.0.1", 9, &ss);
        TRY(r, e, connect(udp, (struct sockaddr *)&ss, len));
        call_report("connect_udp", r, e);
        int size = 65536;
        TRY(r, e, setsockopt(udp, SOL_SOCKET, SO_RCVBUF, &size, sizeof size));
        call_report("setsockopt_udp", r, e);
    }
    if (pair[0] >= 0) {
        int d;
        TRY(d, e, dup(pair[0]));
        call_report("dup_unix", d, e);
        if (d >= 0) {
            TRY(r, e, close(d));
            call_report("close_unix_dup", r, e);
        }
    }

    printf("READY\n");
    wait_for_test();
    printf("STATS errors=%ld\n", errors);
    return 0;
}
