/*
 * harm_shared_listener - two pre-forked workers on one listener, one of them out of fds.
 *
 * Models: a prefork server whose workers share the listener (forked after
 * listen).  Worker 1 has filled its own fd table (it opens /dev/null until
 * EMFILE: a leak of its own) and keeps polling the non-blocking listener
 * and calling accept(), which fails with EMFILE (it pauses 1 ms after each).
 * Worker 2 is healthy but busy: it calls accept() 2 ms after poll() woke
 * it, answers "pong\n" per line until EOF, closes.  A connection worker 1 cannot take stays queued for worker 2.
 *
 * Usage: harm_shared_listener PORT
 * stdout: READY port=P, WORKER n=1|2 pid=PID, FULL pid=PID fds=N (worker 1),
 *         ACCEPT pid=PID fd=N, ACCEPT_ERR pid=PID errno=E (first 5 only),
 *         CLOSE pid=PID fd=N, STATS pid=PID accepted=A served=S accept_err=X
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/wait.h>

static void worker(int n, int lfd)
{
    printf("WORKER n=%d pid=%d\n", n, getpid());
    long accepted = 0, served = 0, accept_err = 0;
    if (n == 1) {
        int count = 0;
        while (open("/dev/null", O_RDONLY) >= 0)
            count++;
        printf("FULL pid=%d fds=%d\n", getpid(), count);
    }
    while (!g_term && getppid() != 1) {
        struct pollfd p = { lfd, POLLIN, 0 };
        if (poll(&p, 1, 100) <= 0)
            continue;
        if (n == 2)
            sleep_ms(2); /* a busy worker: it gets to accept() 2 ms after the wakeup */
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                if (accept_err++ < 5)
                    printf("ACCEPT_ERR pid=%d errno=%d\n", getpid(), errno);
                sleep_ms(1);
            }
            continue;
        }
        accepted++;
        printf("ACCEPT pid=%d fd=%d\n", getpid(), fd);
        char b[512];
        ssize_t r;
        struct pollfd q = { fd, POLLIN, 0 };
        while (poll(&q, 1, 2000) > 0 && (r = read(fd, b, sizeof b)) > 0) {
            int k = answer_lines(fd, b, r);
            if (k > 0)
                served += k;
        }
        close(fd);
        printf("CLOSE pid=%d fd=%d\n", getpid(), fd);
    }
    printf("STATS pid=%d accepted=%ld served=%ld accept_err=%ld\n", getpid(), accepted, served, accept_err);
    fflush(stdout);
    _exit(0);
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: harm_shared_listener PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), SOCK_NONBLOCK, 0);
    pid_t pids[2];
    for (int n = 1; n <= 2; n++) {
        fflush(stdout);
        pids[n - 1] = fork();
        if (pids[n - 1] < 0)
            die("fork:");
        if (pids[n - 1] == 0)
            worker(n, lfd);
    }
    print_ready(lfd);
    wait_for_test();
    for (int n = 0; n < 2; n++)
        kill(pids[n], SIGTERM);
    for (int n = 0; n < 2; n++)
        waitpid(pids[n], NULL, 0);
    return 0;
}
