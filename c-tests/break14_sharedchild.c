/*
 * break14_sharedchild - a fork-per-request server whose parent leaks its copy of each connection
 * and whose children run with SIGPIPE at SIG_DFL (breaker 14).
 *
 * Models: a CGI-style host. The parent ignores SIGPIPE, accepts, forks, and forgets its copy of
 * the connection (never closed: the parent's CLOSE_WAIT leak once the client half-closes). The
 * child puts SIGPIPE back to SIG_DFL (as a program exec'd by it would have it), reads the request
 * to EOF (the client sends it and shuts down its write side, waiting for the answer), works
 * WORK ms, then writes its answer and exits. `keepfix rescue PARENT` sees the parent's SIGPIPE
 * ignored and the socket idle in CLOSE_WAIT; a shutdown kills the child when it answers.
 *
 * Usage: break14_sharedchild [--work-ms MS] PORT
 * stdout: READY port=P, ACCEPT fd=N child=PID, REAPED child=PID exited=E signal=S
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
    proto_init();
    long work_ms = 2000;
    static const struct option opts[] = {
        { "work-ms", required_argument, NULL, 'w' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'w')
            work_ms = parse_long(optarg, "work-ms");
        else
            die("usage: break14_sharedchild [--work-ms MS] PORT");
    }
    if (optind != argc - 1)
        die("usage: break14_sharedchild [--work-ms MS] PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    set_nonblock(lfd);
    print_ready(lfd);
    while (!g_term) {
        int st;
        pid_t done;
        while ((done = waitpid(-1, &st, WNOHANG)) > 0)
            printf("REAPED child=%d exited=%d signal=%d\n", (int)done, WIFEXITED(st) ? WEXITSTATUS(st) : -1,
                   WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        struct pollfd p = { lfd, POLLIN, 0 };
        if (poll(&p, 1, 20) <= 0)
            continue;
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0)
            continue;
        pid_t child = fork();
        if (child < 0)
            die("fork:");
        if (child == 0) {
            signal(SIGPIPE, SIG_DFL);
            close(lfd);
            char b[256];
            ssize_t n;
            while ((n = read(cfd, b, sizeof b)) > 0)
                ;
            sleep_ms(work_ms);
            const char answer[] = "answer\n";
            ssize_t w = write(cfd, answer, sizeof answer - 1);
            _exit(w == (ssize_t)(sizeof answer - 1) ? 0 : 3);
        }
        printf("ACCEPT fd=%d child=%d\n", cfd, (int)child);
        /* THE BUG: the parent never closes its copy of cfd. */
    }
    return 0;
}
