/*
 * break13_forkexec - a fork+exec-per-connection server (xinetd, tcpserver, sshd's re-exec, a
 * CGI host): the parent accepts, forks, and the child puts the connection on fd 0 and 1 and
 * exec()s the service PROG, which inherits keepfix's LD_PRELOAD with the rest of the
 * environment. Against issue 13's "one process tree logs one start line" and "a child that
 * serves one request and exits never gets a thread".
 *
 * Usage: break13_forkexec PORT PROG [ARGS...]
 * stdout: READY port=P; on stdin EOF or SIGTERM: STATS accepted=A
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/prctl.h>
#include <sys/wait.h>

static void reap(int sig)
{
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    errno = saved;
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc < 3)
        die("usage: break13_forkexec PORT PROG [ARGS...]");
    int l = bind_host_on(AF_INET, "127.0.0.1", parse_port(argv[1]), 0, 0);
    if (listen(l, 64) < 0)
        die("listen:");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = reap;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    printf("READY port=%d\n", local_port(l));
    long accepted = 0;
    struct pollfd p[2] = { { .fd = 0, .events = POLLIN }, { .fd = l, .events = POLLIN } };
    while (!g_term) {
        if (poll(p, 2, 1000) < 0)
            continue;
        if (p[0].revents) {
            char b[64];
            if (read(0, b, sizeof b) <= 0)
                break;
        }
        if (!(p[1].revents & POLLIN))
            continue;
        int c = accept(l, NULL, NULL);
        if (c < 0)
            continue;
        accepted++;
        pid_t parent = getpid();
        pid_t k = fork();
        if (k == 0) {
            /* Ends with the server, which the test kills. */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(0);
            dup2(c, 0);
            dup2(c, 1);
            close(c);
            close(l);
            execvp(argv[2], argv + 2);
            _exit(127);
        }
        close(c);
    }
    printf("STATS accepted=%ld\n", accepted);
    return 0;
}
