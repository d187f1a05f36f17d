/*
 * bench_fdops - tight loops of the calls a preload library sits on, timed.
 *
 * Models: the hot paths of any program: fd calls on non-socket fds, and
 * making TCP sockets.  Each mode runs N iterations (after N/10 warm-up ones)
 * and reports the mean wall time (CLOCK_MONOTONIC) and CPU time of the
 * process (CLOCK_PROCESS_CPUTIME_ID, all threads) per iteration:
 *   dupclose      dup(pipe) + close()              (2 hooked calls)
 *   pipe_rw       write(pipe, 1 byte) + read(pipe)  (calls keepfix does not hook)
 *   socket_close  socket(AF_INET, SOCK_STREAM) + close(), never connected
 *   connect       socket() + connect(HOST:PORT) + SO_LINGER {1, 0} + close():
 *                 blocking connect, closed with a reset so that no TIME_WAIT
 *                 piles up (HOST numeric IPv4; a peer such as bench_server --sink)
 * A mode may end in:
 *   _tcp          the process also holds a TCP listener, as a server does (a
 *                 preload library then has sockets to track, and may have
 *                 started a thread)
 *   _thread       the process has one more, idle, thread: the control for what
 *                 glibc's cancellable calls (close, read, write, accept...)
 *                 cost once a process is multi-threaded
 *
 * Usage: bench_fdops MODE N [HOST PORT]
 * stdout: RESULT mode=M n=N ns_per_iter=X cpu_ns_per_iter=C failed=F
 * exit:   0, or 1 if a call failed
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>

#define USAGE "usage: bench_fdops dupclose|pipe_rw|socket_close|connect[_tcp|_thread] N [HOST PORT]"

static int pfd[2];
static struct sockaddr_storage addr;
static socklen_t addrlen;
static long failed;

static void iter_dupclose(void)
{
    int fd = dup(pfd[0]);
    if (fd < 0 || close(fd) < 0)
        failed++;
}

static void iter_pipe_rw(void)
{
    char c = 'x';
    if (write(pfd[1], &c, 1) != 1 || read(pfd[0], &c, 1) != 1)
        failed++;
}

static void iter_socket_close(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || close(fd) < 0)
        failed++;
}

static void iter_connect(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        failed++;
        return;
    }
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0)
        failed++;
    /* Abortive close: no TIME_WAIT, so a long loop never runs out of
     * ephemeral ports (connect() would then search the port range). */
    struct linger lg = { 1, 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static void *idle_thread(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static long long now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 3 && argc != 5)
        die(USAGE);
    const char *mode = argv[1];
    long n = parse_long(argv[2], "N");
    char base[64];
    snprintf(base, sizeof base, "%s", mode);
    int with_tcp = 0, with_thread = 0;
    size_t len = strlen(base);
    if (len > 4 && strcmp(base + len - 4, "_tcp") == 0) {
        with_tcp = 1;
        base[len - 4] = '\0';
    } else if (len > 7 && strcmp(base + len - 7, "_thread") == 0) {
        with_thread = 1;
        base[len - 7] = '\0';
    }
    void (*iter)(void);
    if (strcmp(base, "dupclose") == 0)
        iter = iter_dupclose;
    else if (strcmp(base, "pipe_rw") == 0)
        iter = iter_pipe_rw;
    else if (strcmp(base, "socket_close") == 0)
        iter = iter_socket_close;
    else if (strcmp(base, "connect") == 0 && argc == 5) {
        iter = iter_connect;
        addrlen = make_addr(AF_INET, argv[3], parse_port(argv[4]), &addr);
    } else
        die(USAGE);
    if (with_tcp)
        listen_on(AF_INET, 0, 0, 0);
    if (with_thread) {
        pthread_t t;
        if (pthread_create(&t, NULL, idle_thread, NULL) != 0)
            die("pthread_create failed");
    }
    if (n < 1 || pipe(pfd) < 0)
        die(USAGE);
    for (long i = 0; i < n / 10; i++)
        iter();
    failed = 0;
    long long t0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    for (long i = 0; i < n; i++)
        iter();
    long long t1 = now_ns(CLOCK_MONOTONIC), c1 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    printf("RESULT mode=%s n=%ld ns_per_iter=%.1f cpu_ns_per_iter=%.1f failed=%ld\n", mode, n,
           (double)(t1 - t0) / (double)n, (double)(c1 - c0) / (double)n, failed);
    return failed ? 1 : 0;
}
