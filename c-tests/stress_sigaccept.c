/*
 * stress_sigaccept - a signal handler closes a connection while the interrupted thread is inside
 * accept(), which (keepfix, close mode, KEEPFIX_CLOSE_WAIT_AFTER=0s, fd table full) is releasing
 * that very connection.
 *
 * Models: a leaky single-threaded server with an idle sweep run from a timer signal: the main
 * loop accepts connections and never closes them (the leak), and a SIGALRM handler closes the
 * oldest connection still open every --sweep-us microseconds (close() is async-signal-safe).  The
 * clients (a child process) connect and reset at once, faster than the sweep closes, so the fd
 * table fills up and accept() meets EMFILE.  There keepfix releases the oldest dead connections
 * from inside accept(), in the program's own thread, inside its release protocol; a close() of
 * the same number from a handler on that thread must not wait for a release that cannot finish
 * until the handler returns.
 *
 * The handler times each close() and checks its result (0: the number is the program's until it
 * closes it).  Run it under RLIMIT_NOFILE 64.
 *
 *   stress_sigaccept [--seconds S] [--sweep-us U]
 * stdout: READY port=P, SLOW_CLOSE fd=N ms=M (from main, after the fact), then
 *         STATS accepted=A emfile=E sweeps=W close_fail=F slowest_close_ms=M
 * exit: 0 if close_fail == 0 and every close took less than 1 s.
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/time.h>
#include <sys/wait.h>

#define MAXC 65536
static int conns[MAXC];
static volatile long head, tail; /* conns[tail..head) are open, oldest first */
static volatile long sweeps, close_fail, slowest_ms, slow_fd = -1;

static void on_alarm(int sig)
{
    (void)sig;
    int saved = errno;
    if (tail < head) {
        int fd = conns[tail % MAXC];
        tail++;
        long long t0 = now_ms();
        int r = close(fd);
        long long dt = now_ms() - t0;
        if (r != 0)
            close_fail++;
        if (dt > slowest_ms) {
            slowest_ms = dt;
            slow_fd = fd;
        }
        sweeps++;
    }
    errno = saved;
}

int main(int argc, char **argv)
{
    proto_init();
    long seconds = 5, sweep_us = 2000;
    static const struct option opts[] = {
        { "seconds", required_argument, NULL, 's' },
        { "sweep-us", required_argument, NULL, 'u' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            seconds = parse_long(optarg, "--seconds");
        else if (c == 'u')
            sweep_us = parse_long(optarg, "--sweep-us");
        else
            die("usage: stress_sigaccept [--seconds S] [--sweep-us U]");
    }
    int lfd = listen_on(AF_INET, 0, 0, 0);
    if (listen(lfd, 4096) < 0) /* a burst of clients must not overflow the queue (1 s SYN retry) */
        die("listen:");
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(lfd, (struct sockaddr *)&ss, &len) < 0)
        die("getsockname:");
    print_ready(lfd);
    fflush(stdout);

    /* The clients: connect, hang up, again, until the parent is done. */
    pid_t client = fork();
    if (client < 0)
        die("fork:");
    if (client == 0) {
        close(lfd);
        for (;;) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (s < 0) {
                sleep_ms(1);
                continue;
            }
            if (connect(s, (struct sockaddr *)&ss, len) < 0)
                sleep_ms(1);
            /* A reset: no TIME_WAIT here to collide with, and the server's side is dead (CLOSE),
             * which keepfix releases like CLOSE_WAIT. */
            struct linger lg = { 1, 0 };
            setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(s);
            if (getppid() == 1)
                _exit(0);
        }
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = { { 0, sweep_us }, { 0, sweep_us } };
    setitimer(ITIMER_REAL, &it, NULL);

    long accepted = 0, emfile = 0;
    long long deadline = now_ms() + seconds * 1000;
    sigset_t alrm, old;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    while (!g_term && now_ms() < deadline) {
        int a = accept(lfd, NULL, NULL);
        if (a < 0) {
            if (errno == EMFILE || errno == ENFILE)
                emfile++;
            continue;
        }
        accepted++;
        /* THE BUG: never closed here; the sweep closes it some day. */
        pthread_sigmask(SIG_BLOCK, &alrm, &old);
        if (head - tail < MAXC)
            conns[head++ % MAXC] = a;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    struct itimerval off = { { 0, 0 }, { 0, 0 } };
    setitimer(ITIMER_REAL, &off, NULL);
    kill(client, SIGKILL);
    waitpid(client, NULL, 0);
    if (slowest_ms >= 1000)
        printf("SLOW_CLOSE fd=%ld ms=%ld\n", slow_fd, slowest_ms);
    printf("STATS accepted=%ld emfile=%ld sweeps=%ld close_fail=%ld slowest_close_ms=%ld\n", accepted, emfile, sweeps,
           close_fail, slowest_ms);
    return close_fail || slowest_ms >= 1000 ? 1 : 0;
}
