/*
 * bench_hold_client - holds many idle connections, closes some, and times
 * the two ways a watchdog could find CLOSE_WAIT sockets without keepfix's
 * epoll set.
 *
 * Models: the far side of a big server: N idle client connections.  They
 * come from source addresses 127.0.0.2 .. 127.0.0.(1+S) (bind with
 * IP_BIND_ADDRESS_NO_PORT), so that N may exceed one address's ephemeral
 * port range.  Then, on commands from stdin:
 *   close K    closes K connections spread evenly over the N: the server's
 *              side of each goes to CLOSE_WAIT.
 *   measure R  R rounds; each times getsockopt(TCP_INFO) on every one of its
 *              N sockets (the per-fd polling cost), and one NETLINK_SOCK_DIAG
 *              dump of the machine's IPv4 TCP sockets filtered on CLOSE_WAIT
 *              (the sock_diag cost; it walks every socket of the machine).
 * EOF on stdin (or SIGTERM) exits.
 *
 * Usage: bench_hold_client [--sources S] HOST PORT N
 * stdout: CONNECTED n=N ms=T, CLOSED k=K,
 *         SAMPLE tcpinfo_ns=A diag_ns=B diag_found=C   (one per round)
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>

#define USAGE "usage: bench_hold_client [--sources S] HOST PORT N"

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One NETLINK_SOCK_DIAG dump of IPv4 TCP sockets in CLOSE_WAIT; returns how
 * many it reported, or -1. */
static long diag_close_wait(void)
{
    int nl = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (nl < 0)
        return -1;
    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 req;
    } msg;
    memset(&msg, 0, sizeof msg);
    msg.nlh.nlmsg_len = sizeof msg;
    msg.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    msg.nlh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    msg.req.sdiag_family = AF_INET;
    msg.req.sdiag_protocol = IPPROTO_TCP;
    msg.req.idiag_states = 1u << 8; /* TCP_CLOSE_WAIT */
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    if (sendto(nl, &msg, sizeof msg, 0, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(nl);
        return -1;
    }
    static char buf[1 << 16];
    long found = 0;
    for (;;) {
        ssize_t n = recv(nl, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            found = -1;
            break;
        }
        struct nlmsghdr *h = (struct nlmsghdr *)buf;
        int done = 0;
        for (; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) {
                done = 1;
                break;
            }
            found++;
        }
        if (done)
            break;
    }
    close(nl);
    return found;
}

int main(int argc, char **argv)
{
    proto_init();
    long sources = 8;
    static const struct option opts[] = {
        { "sources", required_argument, NULL, 's' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            sources = parse_long(optarg, "--sources");
        else
            die(USAGE);
    }
    if (argc - optind != 3 || sources < 1 || sources > 200)
        die(USAGE);
    struct sockaddr_storage dst;
    socklen_t dlen = make_addr(AF_INET, argv[optind], parse_port(argv[optind + 1]), &dst);
    long n = parse_long(argv[optind + 2], "N");
    if (n < 1)
        die(USAGE);
    int *fds = calloc((size_t)n, sizeof *fds);
    if (!fds)
        die("calloc:");

    long long t0 = now_ms();
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket (connection %ld):", i);
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = { .sin_family = AF_INET };
        src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(i % sources));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0)
            die("bind (connection %ld):", i);
        if (connect(fd, (struct sockaddr *)&dst, dlen) < 0)
            die("connect (connection %ld):", i);
        fds[i] = fd;
    }
    printf("CONNECTED n=%ld ms=%lld\n", n, now_ms() - t0);

    char line[128];
    while (!g_term && fgets(line, sizeof line, stdin)) {
        long k;
        if (sscanf(line, "close %ld", &k) == 1 && k > 0 && k <= n) {
            long step = n / k;
            for (long j = 0; j < k; j++) {
                close(fds[j * step]);
                fds[j * step] = -1;
            }
            printf("CLOSED k=%ld\n", k);
        } else if (sscanf(line, "measure %ld", &k) == 1 && k > 0) {
            for (long r = 0; r < k; r++) {
                struct tcp_info ti;
                long long a = now_ns();
                for (long i = 0; i < n; i++) {
                    socklen_t len = sizeof ti;
                    if (fds[i] >= 0)
                        getsockopt(fds[i], IPPROTO_TCP, TCP_INFO, &ti, &len);
                }
                long long b = now_ns();
                long found = diag_close_wait();
                long long d = now_ns();
                printf("SAMPLE tcpinfo_ns=%lld diag_ns=%lld diag_found=%ld\n", b - a, d - b, found);
            }
        } else {
            fprintf(stderr, "bench_hold_client: unknown command: %s", line);
        }
    }
    return 0;
}
