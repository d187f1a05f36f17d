/*
 * load_client - a load / demo client doing many short sessions.
 *
 * Models: ordinary client traffic: N sessions of connect, send "ping\n",
 * read "pong\n" (2 s timeout), optionally hold H ms, close - with up to P
 * sessions in flight (P threads, each doing its share of N).  With --rst the
 * close is abortive (SO_LINGER {1, 0}: RST instead of FIN).  Failures are
 * counted, never fatal.  SIGTERM/SIGINT stop starting new sessions.
 *   --timeout-ms T  wait at most T ms for the pong instead of 2000, and at
 *                   most T ms for connect() too (a non-blocking connect; a
 *                   server whose accept queue is full drops our SYNs, and a
 *                   blocking connect would retry for two minutes).  Running
 *                   out of either counts as a timeout.
 *
 * Usage: load_client [--count N] [--parallel P] [--hold-ms H] [--timeout-ms T]
 *                    [--rst] HOST PORT      (HOST numeric, IPv4 or IPv6)
 * stdout: RESULT ok=A fail=B connect_fail=C timeout=D elapsed_ms=E
 * exit:   0 if every session succeeded, else 1
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>

#define USAGE \
    "usage: load_client [--count N] [--parallel P] [--hold-ms H] [--timeout-ms T] [--rst] HOST PORT"

static struct sockaddr_storage addr;
static socklen_t addrlen;
static long hold_ms;
static long timeout_ms = 2000;
static int connect_timeout; /* --timeout-ms given: bound connect() too */
static int rst;
static long n_ok, n_fail, n_connect_fail, n_timeout; /* __atomic counters */

static void add(long *c)
{
    __atomic_add_fetch(c, 1, __ATOMIC_RELAXED);
}

/* connect() that gives up after timeout_ms: 0, or -1 with errno set
 * (ETIMEDOUT when the time ran out, e.g. the server's accept queue is full
 * and its SYNs are dropped).  The fd is blocking again afterwards. */
static int connect_within(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    int r = connect(fd, (struct sockaddr *)&addr, addrlen);
    if (r < 0 && errno == EINPROGRESS) {
        long long deadline = now_ms() + timeout_ms;
        for (;;) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            struct pollfd p = { fd, POLLOUT, 0 };
            int n = poll(&p, 1, (int)left);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -1;
            if (n > 0)
                break;
        }
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            return -1;
        if (err) {
            errno = err;
            return -1;
        }
        r = 0;
    }
    if (r < 0)
        return -1;
    return fcntl(fd, F_SETFL, fl);
}

/* One session; returns 0 on success. */
static int session(void)
{
    int fd = socket(addr.ss_family, SOCK_STREAM, 0);
    if (fd < 0) {
        add(&n_connect_fail);
        return -1;
    }
    int ok = -1;
    char line[64];
    ssize_t r;
    if ((connect_timeout ? connect_within(fd) : connect(fd, (struct sockaddr *)&addr, addrlen)) < 0) {
        add(errno == ETIMEDOUT ? &n_timeout : &n_connect_fail);
    } else if (write_all(fd, "ping\n", 5) < 0) {
        /* counted as a plain failure */
    } else if ((r = read_line(fd, line, sizeof line, (int)timeout_ms)) < 0 && errno == ETIMEDOUT) {
        add(&n_timeout);
    } else if (r > 0 && strcmp(line, "pong") == 0) {
        ok = 0;
        if (hold_ms > 0)
            sleep_ms(hold_ms);
    }
    if (rst) {
        struct linger lg = { 1, 0 };
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(fd);
    return ok;
}

static void *runner(void *arg)
{
    long todo = (long)arg;
    for (long i = 0; i < todo && !g_term; i++)
        add(session() == 0 ? &n_ok : &n_fail);
    return NULL;
}

int main(int argc, char **argv)
{
    proto_init();
    long count = 100, parallel = 1;
    static const struct option opts[] = {
        { "count", required_argument, NULL, 'n' },
        { "parallel", required_argument, NULL, 'p' },
        { "hold-ms", required_argument, NULL, 'h' },
        { "timeout-ms", required_argument, NULL, 't' },
        { "rst", no_argument, NULL, 'r' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'n')
            count = parse_long(optarg, "--count");
        else if (c == 'p')
            parallel = parse_long(optarg, "--parallel");
        else if (c == 'h')
            hold_ms = parse_long(optarg, "--hold-ms");
        else if (c == 't') {
            timeout_ms = parse_long(optarg, "--timeout-ms");
            connect_timeout = 1;
        } else if (c == 'r')
            rst = 1;
        else
            die(USAGE);
    }
    if (argc - optind != 2 || count < 0 || parallel < 1 || parallel > 1024 ||
        timeout_ms < 1 || timeout_ms > 3600000)
        die(USAGE);
    int family = strchr(argv[optind], ':') ? AF_INET6 : AF_INET;
    addrlen = make_addr(family, argv[optind], parse_port(argv[optind + 1]), &addr);
    if (parallel > count && count > 0)
        parallel = count;

    long long t0 = now_ms();
    if (parallel == 1) {
        runner((void *)count);
    } else {
        pthread_t *tids = calloc((size_t)parallel, sizeof *tids);
        for (long i = 0; i < parallel; i++) {
            long share = count / parallel + (i < count % parallel ? 1 : 0);
            if (pthread_create(&tids[i], NULL, runner, (void *)share) != 0)
                die("pthread_create failed");
        }
        for (long i = 0; i < parallel; i++)
            pthread_join(tids[i], NULL);
    }
    printf("RESULT ok=%ld fail=%ld connect_fail=%ld timeout=%ld elapsed_ms=%lld\n", n_ok, n_fail,
           n_connect_fail, n_timeout, now_ms() - t0);
    return n_fail ? 1 : 0;
}
