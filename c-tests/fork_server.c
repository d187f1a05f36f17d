/*
 * fork_server - a fork-per-connection server (inetd-style daemons, CGI hosts, PostgreSQL's
 * postmaster, old sendmail): the parent accepts, forks a child per connection and closes its
 * copy; the child serves the connection and exits.
 *
 * A child reads lines and answers "pong" to each, until EOF. Then, by default, it closes the
 * connection and exits. With --linger MS it keeps the connection it has seen the end of for MS
 * milliseconds more, and every 200 ms makes a short connection to the server's own port (as a
 * backend queries its database): a long-lived child that forgot its socket.
 *
 * Just before it exits, a child prints CHILD pid=P threads=T fd=N served=S (T: the threads in
 * its /proc/self/task). The parent reaps children (SIGCHLD) and on SIGTERM or stdin EOF prints
 * STATS accepted=A forks=F cpu_us=U (U: the CPU time, getrusage, of the parent and of every child
 * reaped so far).
 *
 * Usage: fork_server [--linger MS] [--quiet] PORT
 * stdout: READY port=P, CHILD ..., STATS ...
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/wait.h>

static int threads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    struct dirent *e;
    if (!d)
        return -1;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static void reap(int sig)
{
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    errno = saved;
}

static int g_port; /* the listener's port: a lingering child connects to it, as a backend
                    * talks to its database */

static void serve(int fd, long linger_ms, int quiet)
{
    char buf[4096];
    long served = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (served == 0 && n >= 2 && buf[0] == 'q' && buf[1] == '\n') {
            /* A lingering sibling's query: answered by exiting, without a CHILD line. */
            close(fd);
            _exit(0);
        }
        int k = answer_lines(fd, buf, n);
        if (k < 0)
            break;
        served += k;
    }
    if (linger_ms > 0) {
        long long end = now_ms() + linger_ms;
        while (now_ms() < end) {
            sleep_ms(200);
            struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)g_port),
                                     .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
            int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (c >= 0 && connect(c, (struct sockaddr *)&a, sizeof a) == 0)
                (void)write(c, "q\n", 2);
            if (c >= 0)
                close(c);
        }
    }
    if (!quiet)
        printf("CHILD pid=%d threads=%d fd=%d served=%ld\n", (int)getpid(), threads(), fd, served);
    fflush(stdout);
    close(fd);
}

int main(int argc, char **argv)
{
    long linger_ms = 0;
    int quiet = 0;
    static const struct option opts[] = {
        { "linger", required_argument, 0, 'l' },
        { "quiet", no_argument, 0, 'q' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'l')
            linger_ms = parse_long(optarg, "--linger");
        else if (c == 'q')
            quiet = 1;
        else
            die("usage: fork_server [--linger MS] [--quiet] PORT");
    }
    if (optind != argc - 1)
        die("usage: fork_server [--linger MS] [--quiet] PORT");
    proto_init();
    struct sigaction sa = { 0 };
    sa.sa_handler = reap;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    g_port = local_port(lfd);
    print_ready(lfd);
    fflush(stdout);
    long accepted = 0, forks = 0;
    while (!g_term) {
        struct pollfd p[2] = { { lfd, POLLIN, 0 }, { 0, POLLIN, 0 } };
        int r = poll(p, 2, 200);
        if (r < 0 && errno == EINTR)
            continue;
        if (p[1].revents & (POLLIN | POLLHUP)) {
            char b[64];
            if (read(0, b, sizeof b) <= 0)
                break;
        }
        if (!(p[0].revents & POLLIN))
            continue;
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        accepted++;
        pid_t pid = fork();
        if (pid == 0) {
            close(lfd);
            serve(fd, linger_ms, quiet);
            _exit(0);
        }
        if (pid > 0)
            forks++;
        close(fd);
    }
    printf("STATS accepted=%ld forks=%ld cpu_us=%lld\n", accepted, forks, tree_cpu_us());
    return 0;
}
