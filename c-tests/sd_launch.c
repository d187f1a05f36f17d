/*
 * sd_launch - a minimal systemd socket-activation launcher.
 *
 * Models: systemd starting a service with Sockets= / ListenStream=.  Creates
 * N listening sockets on 127.0.0.1 (ephemeral ports), moves them to fds
 * 3, 4, ... (inheritable: not close-on-exec), sets LISTEN_FDS=N and
 * LISTEN_PID=<own pid> (exec keeps the pid) and prints READY.  With
 * --queue K it then waits (10 ms steps, at most 10 s) until the listener on
 * fd 3 has K fully established connections in its accept queue - TCP_INFO's
 * tcpi_unacked is the accept-queue length for a listening socket - and prints
 * QUEUED n=K.  So the test can connect clients that are queued before the
 * (preloaded) service ever runs.  Finally it applies the -e variables and
 * execvp()s PROG.
 *
 * Usage: sd_launch [-e NAME=VALUE]... [--queue K] [--count N] [--idle S] -- PROG [ARGS...]
 * stdout: READY port=P1 [port2=P2 port3=P3 ...], QUEUED n=K,
 *         QUEUE_TIMEOUT n=X want=K (then exit 1)
 */
#define _GNU_SOURCE
#include "common.h"

#define USAGE "usage: sd_launch [-e NAME=VALUE]... [--queue K] [--count N] [--idle S] -- PROG [ARGS...]"

static int accept_queue_len(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    memset(&ti, 0, sizeof ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
        die("getsockopt TCP_INFO:");
    return (int)ti.tcpi_unacked;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    char *envs[64];
    int nenv = 0, queue = -1, count = 1, idle = 0;
    static const struct option opts[] = {
        { "queue", required_argument, NULL, 'q' },
        { "count", required_argument, NULL, 'n' },
        { "idle", required_argument, NULL, 'i' },
        { "env", required_argument, NULL, 'e' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "+e:", opts, NULL)) != -1) {
        if (c == 'e' && nenv < 64 && strchr(optarg, '='))
            envs[nenv++] = optarg;
        else if (c == 'q')
            queue = (int)parse_long(optarg, "--queue");
        else if (c == 'n')
            count = (int)parse_long(optarg, "--count");
        else if (c == 'i')
            idle = (int)parse_long(optarg, "--idle");
        else
            die(USAGE);
    }
    if (optind < argc && strcmp(argv[optind], "--") == 0)
        optind++;
    if (optind >= argc || count < 1 || count > 64)
        die(USAGE);
    char **prog = &argv[optind];

    /* Create the listeners, park them above the target range, then move them
     * to 3, 4, ... so that no listener is clobbered while moving. */
    int tmp[64], ports[64];
    for (int i = 0; i < count; i++) {
        int fd = listen_on(AF_INET, 0, 0, 0);
        /* --idle S: TCP_KEEPIDLE on the listener with SO_KEEPALIVE left off, as a service whose
         * unit sets the timing and whose code turns keepalive on per connection. */
        if (idle > 0 && setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) < 0)
            die("TCP_KEEPIDLE:");
        ports[i] = local_port(fd);
        tmp[i] = fcntl(fd, F_DUPFD, 3 + count);
        if (tmp[i] < 0)
            die("F_DUPFD:");
        close(fd);
    }
    for (int i = 0; i < count; i++) {
        if (dup2(tmp[i], 3 + i) < 0) /* dup2 clears FD_CLOEXEC on 3+i */
            die("dup2:");
        close(tmp[i]);
    }

    char buf[32];
    snprintf(buf, sizeof buf, "%d", count);
    setenv("LISTEN_FDS", buf, 1);
    snprintf(buf, sizeof buf, "%d", (int)getpid());
    setenv("LISTEN_PID", buf, 1);

    printf("READY port=%d", ports[0]);
    for (int i = 1; i < count; i++)
        printf(" port%d=%d", i + 1, ports[i]);
    printf("\n");

    if (queue >= 0) {
        int n = 0;
        for (int waited = 0; (n = accept_queue_len(3)) < queue && waited < 10000; waited += 10)
            sleep_ms(10);
        if (n < queue) {
            printf("QUEUE_TIMEOUT n=%d want=%d\n", n, queue);
            return 1;
        }
        printf("QUEUED n=%d\n", queue);
    }
    fflush(stdout);

    for (int i = 0; i < nenv; i++) {
        char *eq = strchr(envs[i], '=');
        *eq = '\0';
        setenv(envs[i], eq + 1, 1);
        *eq = '=';
    }
    execvp(prog[0], prog);
    fprintf(stderr, "sd_launch: exec %s: %s\n", prog[0], strerror(errno));
    _exit(127);
}
