/*
 * stress_signals - close(), dup(), dup2(), dup3() and F_DUPFD from a signal handler, at a
 * high rate, while the interrupted thread is itself inside socket, listen, connect, accept,
 * close, dup, dup2, dup3, fcntl and setsockopt, as fast as it can.
 *
 * Models: legacy programs whose signal handlers touch fds (a SIGCHLD or SIGALRM handler that
 * duplicates a listener and closes the copy, redirects a number with dup2, closes a spare): a
 * preload library whose hooks took a lock, allocated, or waited for the interrupted thread would
 * deadlock or crash here.  The main thread also leaks connections into CLOSE_WAIT (the server
 * side of connections whose client side it closed), LEAK at a time, and closes each one late,
 * when its ring slot is reused: with keepfix in close mode its watchdog releases them meanwhile.
 *
 * Signals: SIGUSR1 from a second thread (pthread_kill in a loop, --gap-us apart), and SIGALRM
 * from setitimer every --itimer-us microseconds (0 turns either off); both run the same handler on
 * the main thread.
 * Before each call the main thread stores which call it is making in a volatile flag and clears
 * it afterwards; the handler counts the runs that found the flag set (HITS line), which proves
 * the handler really ran while the main thread was inside that call.
 *
 * Every return value is checked against what it must be (and errno on failures; on success
 * errno must be left alone, so it is set to a sentinel before each call).  The handler saves
 * and restores errno, never prints, and records failures in counters; main prints them.
 *
 * The handler also makes a connection of its own each run (socket, connect, accept on a second
 * listener), closes the client side, and closes the server side H_RING runs later, so that its
 * close() may find keepfix's watchdog in the middle of releasing that very socket.
 *
 *   stress_signals [--seconds S] [--leak K] [--gap-us G] [--itimer-us T] [--hold]
 * --hold: after DONE, wait for the test (stdin EOF or SIGTERM) before exiting.
 * stdout: READY, then at the end
 *   HITS socket=N listen=N connect=N accept=N close=N dup=N dup2=N dup3=N fcntl=N setsockopt=N
 *        outside=N total=N
 *   LOOP iterations=N listens=N connects=N late_closes=N handler_late_closes=N
 *   FAIL where=W op=O ret=R errno=E  (each failure of the main thread, at most 20)
 *   HANDLER_FAIL op=O count=N        (each failed check of the handler)
 *   DONE failures=F handler_failures=H
 * exit: 0 if F == 0 and H == 0, else 1.
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/time.h>

enum op {
    OP_NONE,
    OP_SOCKET,
    OP_LISTEN,
    OP_CONNECT,
    OP_ACCEPT,
    OP_CLOSE,
    OP_DUP,
    OP_DUP2,
    OP_DUP3,
    OP_FCNTL,
    OP_SETSOCKOPT,
    OP_COUNT
};
static const char *op_names[OP_COUNT] = { "outside", "socket", "listen", "connect", "accept", "close",
                                          "dup",     "dup2",   "dup3",   "fcntl",   "setsockopt" };

/* Handler checks. */
enum hop { H_DUP, H_CLOSE_DUP, H_DUP2_TRACKED, H_CLOSE_DUP2, H_DUP3_TRACKED, H_CLOSE_DUP3, H_DUP2_PIPE,
           H_CLOSE_PIPE, H_CLOSE_UNOPENED, H_FCNTL, H_CLOSE_FCNTL, H_SOCKET, H_CONNECT, H_ACCEPT, H_CLOSE_CLIENT,
           H_CLOSE_LATE, H_COUNT };
static const char *hop_names[H_COUNT] = { "dup_listener",  "close_dup",     "dup2_listener", "close_dup2",
                                          "dup3_conn",     "close_dup3",    "dup2_pipe",     "close_dup2_pipe",
                                          "close_unopened", "fdupfd_conn",  "close_fdupfd",  "socket",
                                          "connect",        "accept",       "close_client",  "close_late" };

/* The handler's own fd numbers, never used by the main thread. */
#define H_FD_LISTENER 600
#define H_FD_CONN 601
#define H_FD_PIPE 602
#define H_FD_NEVER 603
#define H_FD_FCNTL_MIN 610

static volatile sig_atomic_t in_call;
static volatile long hits[OP_COUNT];
static volatile long hfail[H_COUNT];
static int lfd, conn_a, conn_c, pipe_fds[2];
/* The handler's own listener, and its own ring of connections leaked into CLOSE_WAIT. */
#define H_RING 64
static int h_lfd, h_ring[H_RING];
static unsigned h_runs;
static struct sockaddr_storage h_addr;
static socklen_t h_addrlen;
static volatile long h_late_closes;

static void on_sig(int sig)
{
    (void)sig;
    int saved = errno;
    hits[in_call]++;
    int d = dup(lfd);
    if (d < 0)
        hfail[H_DUP]++;
    else if (close(d) != 0)
        hfail[H_CLOSE_DUP]++;
    if (dup2(lfd, H_FD_LISTENER) != H_FD_LISTENER)
        hfail[H_DUP2_TRACKED]++;
    else if (close(H_FD_LISTENER) != 0)
        hfail[H_CLOSE_DUP2]++;
    if (dup3(conn_a, H_FD_CONN, O_CLOEXEC) != H_FD_CONN)
        hfail[H_DUP3_TRACKED]++;
    else if (close(H_FD_CONN) != 0)
        hfail[H_CLOSE_DUP3]++;
    if (dup2(pipe_fds[0], H_FD_PIPE) != H_FD_PIPE)
        hfail[H_DUP2_PIPE]++;
    else if (close(H_FD_PIPE) != 0)
        hfail[H_CLOSE_PIPE]++;
    errno = 0;
    if (close(H_FD_NEVER) != -1 || errno != EBADF)
        hfail[H_CLOSE_UNOPENED]++;
    int f = fcntl(conn_c, F_DUPFD_CLOEXEC, H_FD_FCNTL_MIN);
    if (f < H_FD_FCNTL_MIN)
        hfail[H_FCNTL]++;
    else if (close(f) != 0)
        hfail[H_CLOSE_FCNTL]++;
    /* A connection of its own, leaked into CLOSE_WAIT and closed H_RING runs later: that close
     * may meet keepfix's watchdog in the middle of releasing it. */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) {
        hfail[H_SOCKET]++;
    } else if (connect(s, (struct sockaddr *)&h_addr, h_addrlen) != 0) {
        hfail[H_CONNECT]++;
        close(s);
    } else {
        int a = accept(h_lfd, NULL, NULL);
        if (a < 0)
            hfail[H_ACCEPT]++;
        if (close(s) != 0)
            hfail[H_CLOSE_CLIENT]++;
        /* Its EOF is read (keepfix releases such a socket at once), then it is closed late. */
        char b;
        if (a >= 0)
            while (read(a, &b, 1) < 0 && errno == EINTR)
                ;
        unsigned slot = h_runs++ % H_RING;
        if (h_ring[slot] > 0) {
            if (close(h_ring[slot]) != 0)
                hfail[H_CLOSE_LATE]++;
            h_late_closes++;
        }
        h_ring[slot] = a;
    }
    errno = saved;
}

static volatile int stop_sender;
static pthread_t main_thread;
static long gap_us = 20;

static void *sender(void *arg)
{
    (void)arg;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    struct timespec ts = { gap_us / 1000000, (gap_us % 1000000) * 1000 };
    while (!stop_sender) {
        pthread_kill(main_thread, SIGUSR1);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* ---- main-thread checks ------------------------------------------------ */

#define SENTINEL 4242
static long failures;

static void fail(const char *where, enum op op, long ret, int err)
{
    if (failures++ < 20)
        printf("FAIL where=%s op=%s ret=%ld errno=%d\n", where, op_names[op], ret, err);
}

/* Calls EXPR with in_call = OP; checks COND (with `r` the result) and that errno is untouched
 * on success. */
#define CALL(op, where, expr, cond)                                \
    ({                                                             \
        errno = SENTINEL;                                          \
        in_call = (op);                                            \
        long r = (long)(expr);                                     \
        in_call = OP_NONE;                                         \
        int e = errno;                                             \
        if (!(cond))                                               \
            fail(where, op, r, e);                                 \
        else if (e != SENTINEL)                                    \
            fail(where "_errno", op, r, e);                        \
        r;                                                         \
    })

static struct sockaddr_storage laddr;
static socklen_t laddrlen;

/* connect() to our listener; a signal may interrupt it (EINTR): then it completes by itself. */
static int connect_listener(int s)
{
    errno = SENTINEL;
    in_call = OP_CONNECT;
    int r = connect(s, (struct sockaddr *)&laddr, laddrlen);
    in_call = OP_NONE;
    int e = errno;
    if (r == 0) {
        if (e != SENTINEL)
            fail("connect_errno", OP_CONNECT, r, e);
        return 0;
    }
    if (e != EINTR) {
        fail("connect", OP_CONNECT, r, e);
        return -1;
    }
    struct pollfd p = { s, POLLOUT, 0 };
    while (poll(&p, 1, 2000) < 0 && errno == EINTR)
        ;
    int err = -1;
    socklen_t len = sizeof err;
    if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        fail("connect_eintr", OP_CONNECT, -1, err);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    proto_init();
    long seconds = 4, leak = 100, itimer_us = 100;
    int hold = 0;
    static const struct option opts[] = {
        { "seconds", required_argument, NULL, 's' },
        { "leak", required_argument, NULL, 'k' },
        { "gap-us", required_argument, NULL, 'g' },
        { "itimer-us", required_argument, NULL, 't' },
        { "hold", no_argument, NULL, 'h' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            seconds = parse_long(optarg, "--seconds");
        else if (c == 'k')
            leak = parse_long(optarg, "--leak");
        else if (c == 'g')
            gap_us = parse_long(optarg, "--gap-us");
        else if (c == 't')
            itimer_us = parse_long(optarg, "--itimer-us");
        else if (c == 'h')
            hold = 1;
        else
            die("usage: stress_signals [--seconds S] [--leak K] [--gap-us G] [--itimer-us T] [--hold]");
    }
    if (leak < 1 || leak > 200)
        die("--leak must be 1..200");

    lfd = listen_on(AF_INET, 0, 0, 0);
    laddrlen = sizeof laddr;
    if (getsockname(lfd, (struct sockaddr *)&laddr, &laddrlen) < 0)
        die("getsockname:");
    conn_c = socket(AF_INET, SOCK_STREAM, 0);
    if (conn_c < 0 || connect(conn_c, (struct sockaddr *)&laddr, laddrlen) < 0)
        die("connect:");
    conn_a = accept(lfd, NULL, NULL);
    if (conn_a < 0)
        die("accept:");
    if (pipe(pipe_fds) < 0)
        die("pipe:");
    h_lfd = listen_on(AF_INET, 0, 0, 0);
    h_addrlen = sizeof h_addr;
    if (getsockname(h_lfd, (struct sockaddr *)&h_addr, &h_addrlen) < 0)
        die("getsockname:");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sigemptyset(&sa.sa_mask);
    /* One handler at a time: a nested run would close the numbers the outer one is using. */
    sigaddset(&sa.sa_mask, SIGUSR1);
    sigaddset(&sa.sa_mask, SIGALRM);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);

    /* The sender must not take SIGALRM (it goes to the main thread). */
    main_thread = pthread_self();
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGALRM);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    pthread_t tid;
    if (gap_us > 0 && pthread_create(&tid, NULL, sender, NULL) != 0)
        die("pthread_create failed");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    struct itimerval it = { { 0, itimer_us }, { 0, itimer_us } };
    if (itimer_us > 0 && setitimer(ITIMER_REAL, &it, NULL) < 0)
        die("setitimer:");
    printf("READY port=%d\n", local_port(lfd));

    int *ring = calloc((size_t)leak, sizeof *ring);
    for (long i = 0; i < leak; i++)
        ring[i] = -1;
    long iterations = 0, listens = 0, connects = 0, late_closes = 0;
    long long deadline = now_ms() + seconds * 1000;
    int one = 1, zero = 0;
    while (now_ms() < deadline && !g_term) {
        iterations++;
        int s = (int)CALL(OP_SOCKET, "socket", socket(AF_INET, SOCK_STREAM, 0), r >= 0);
        if (s < 0)
            continue;
        if (iterations % 4 == 0) {
            /* A listener that never accepts: bind, listen, close. */
            struct sockaddr_storage ss;
            socklen_t len = make_addr(AF_INET, "127.0.0.1", 0, &ss);
            if (bind(s, (struct sockaddr *)&ss, len) < 0)
                fail("bind", OP_NONE, -1, errno);
            CALL(OP_LISTEN, "listen", listen(s, 4), r == 0);
            listens++;
            CALL(OP_CLOSE, "close_listener", close(s), r == 0);
            continue;
        }
        if (connect_listener(s) < 0) {
            CALL(OP_CLOSE, "close_failed", close(s), r == 0);
            continue;
        }
        connects++;
        int a = (int)CALL(OP_ACCEPT, "accept", accept(lfd, NULL, NULL), r >= 0);
        if (a < 0) {
            CALL(OP_CLOSE, "close_client", close(s), r == 0);
            continue;
        }
        CALL(OP_SETSOCKOPT, "setsockopt", setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, (iterations & 1) ? &one : &zero,
                                                     sizeof one), r == 0);
        int d = (int)CALL(OP_DUP, "dup", dup(a), r >= 0);
        CALL(OP_DUP2, "dup2", dup2(s, 500), r == 500);
        CALL(OP_DUP3, "dup3", dup3(a, 501, O_CLOEXEC), r == 501);
        int f = (int)CALL(OP_FCNTL, "fcntl", fcntl(s, F_DUPFD, 510), r >= 510);
        if (d >= 0)
            CALL(OP_CLOSE, "close_dup", close(d), r == 0);
        CALL(OP_CLOSE, "close_dup2", close(500), r == 0);
        CALL(OP_CLOSE, "close_dup3", close(501), r == 0);
        if (f >= 0)
            CALL(OP_CLOSE, "close_fcntl", close(f), r == 0);
        /* The client side goes: the server side `a` falls into CLOSE_WAIT, its EOF is read, and
         * it is leaked until its ring slot comes round again (keepfix in close mode releases it
         * meanwhile). */
        CALL(OP_CLOSE, "close_client", close(s), r == 0);
        /* Its EOF is read first: keepfix releases a socket whose end the program read at once. */
        char b;
        while (read(a, &b, 1) < 0 && errno == EINTR)
            ;
        long slot = connects % leak;
        if (ring[slot] >= 0) {
            CALL(OP_CLOSE, "close_late", close(ring[slot]), r == 0);
            late_closes++;
        }
        ring[slot] = a;
    }
    struct itimerval off = { { 0, 0 }, { 0, 0 } };
    setitimer(ITIMER_REAL, &off, NULL);
    stop_sender = 1;
    if (gap_us > 0)
        pthread_join(tid, NULL);
    /* Both pairs the handler used are still what they were. */
    int type = 0;
    socklen_t tl = sizeof type;
    if (getsockopt(conn_a, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM)
        fail("conn_a_gone", OP_NONE, -1, errno);
    if (write(conn_c, "x", 1) != 1)
        fail("conn_c_write", OP_NONE, -1, errno);
    char ch;
    if (read(conn_a, &ch, 1) != 1 || ch != 'x')
        fail("conn_a_read", OP_NONE, -1, errno);

    long total = 0;
    printf("HITS");
    for (int i = 1; i < OP_COUNT; i++) {
        printf(" %s=%ld", op_names[i], hits[i]);
        total += hits[i];
    }
    total += hits[OP_NONE];
    printf(" outside=%ld total=%ld\n", hits[OP_NONE], total);
    printf("LOOP iterations=%ld listens=%ld connects=%ld late_closes=%ld handler_late_closes=%ld\n", iterations,
           listens, connects, late_closes, h_late_closes);
    long hf = 0;
    for (int i = 0; i < H_COUNT; i++) {
        if (hfail[i]) {
            printf("HANDLER_FAIL op=%s count=%ld\n", hop_names[i], hfail[i]);
            hf += hfail[i];
        }
    }
    printf("DONE failures=%ld handler_failures=%ld\n", failures, hf);
    if (hold)
        wait_for_test();
    return failures || hf ? 1 : 0;
}
