/*
 * fork_fill - how many workers a pre-forking server gets under RLIMIT_NPROC.
 *
 * Models: a pre-forking server started under a per-user process limit (systemd's TasksMax,
 * `ulimit -u`).  It listens on 127.0.0.1 (keepfix's thread starts), then forks workers until
 * fork() fails.  Each worker blocks in accept() on the shared listener, as a pre-forked worker
 * does, until its parent tells it to stop.  The parent prints how many it got and the errno of
 * the fork that failed, waits for the test (stdin EOF), then stops and reaps every worker and
 * exits 0.
 *
 * Usage: fork_fill [--max N]
 * stdout: READY port=P, WORKERS n=N errno=E
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
    proto_init();
    long max = 64;
    static const struct option opts[] = { { "max", required_argument, 0, 'm' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm')
            max = parse_long(optarg, "max");
        else
            die("usage: fork_fill [--max N]");
    }
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    /* Give keepfix's thread time to be running (it starts at listen()). */
    sleep_ms(200);
    pid_t pids[256];
    long n = 0;
    int err = 0;
    while (n < max && n < 256) {
        pid_t p = fork();
        if (p < 0) {
            err = errno;
            break;
        }
        if (p == 0) {
            for (;;) {
                int cfd = accept(lfd, NULL, NULL);
                if (cfd >= 0)
                    close(cfd);
                else if (errno != EINTR)
                    sleep_ms(100);
            }
        }
        pids[n++] = p;
    }
    printf("WORKERS n=%ld errno=%d\n", n, err);
    char buf[64];
    while (!g_term && read(0, buf, sizeof buf) > 0)
        ;
    for (long i = 0; i < n; i++)
        kill(pids[i], SIGKILL);
    for (long i = 0; i < n; i++)
        waitpid(pids[i], NULL, 0);
    return 0;
}
