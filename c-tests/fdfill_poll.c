/*
 * fdfill_poll - the EMFILE spin.
 *
 * Models: a server whose fd table is full: it opens /dev/null until open()
 * fails with EMFILE, closes K of them again (--spare K, default 0) and then
 * runs a level-triggered poll() loop on its listener (1000 ms timeout).
 * Once fds run out, accept() fails with EMFILE, the connection stays in the
 * accept queue, poll() reports POLLIN again at once and the loop spins at
 * 100% CPU - the wakeup counter shows it.  Accepted connections are kept
 * (never closed).
 *   --nofile N   (extension) first set the soft RLIMIT_NOFILE to N, so the
 *                fill does not have to open a huge number of fds.
 *
 * Usage: fdfill_poll [--spare K] [--nofile N] PORT
 * stdout: READY port=P, FILLED fds=X (fds held after filling; /proc/self/fd
 *         counted before the fill, plus what was opened, minus K),
 *         ACCEPT fd=N, ACCEPT_ERR errno=24 (first EMFILE only),
 *         ACCEPT_ERR errno=E (any other error),
 *         STATS wakeups=W emfile=M accepted=A errors=E
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>

int main(int argc, char **argv)
{
    proto_init();
    long spare = 0, nofile = -1;
    static const struct option opts[] = {
        { "spare", required_argument, NULL, 's' },
        { "nofile", required_argument, NULL, 'n' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            spare = parse_long(optarg, "--spare");
        else if (c == 'n')
            nofile = parse_long(optarg, "--nofile");
        else
            die("usage: fdfill_poll [--spare K] [--nofile N] PORT");
    }
    if (optind != argc - 1 || spare < 0)
        die("usage: fdfill_poll [--spare K] [--nofile N] PORT");
    if (nofile > 0) {
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = (rlim_t)nofile;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            die("setrlimit:");
    }
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);

    /* Fill the fd table.  Counting needs an fd for /proc/self/fd, so count
     * first and add what we open. */
    int before = count_open_fds();
    int *fill = NULL;
    long nfill = 0, cap = 0;
    for (;;) {
        int fd = open("/dev/null", O_RDONLY);
        if (fd < 0) {
            if (errno != EMFILE)
                die("open /dev/null:");
            break;
        }
        if (nfill == cap) {
            cap = cap ? cap * 2 : 1024;
            fill = realloc(fill, (size_t)cap * sizeof *fill);
            if (!fill)
                die("out of memory");
        }
        fill[nfill++] = fd;
    }
    for (long i = 0; i < spare && nfill > 0; i++)
        close(fill[--nfill]);
    printf("FILLED fds=%ld\n", before + nfill);

    long wakeups = 0, emfile = 0, accepted = 0, errors = 0;
    while (!g_term) {
        struct pollfd p = { lfd, POLLIN, 0 };
        int r = poll(&p, 1, 1000);
        wakeups++;
        if (r <= 0 || !(p.revents & POLLIN))
            continue;
        int cfd = accept(lfd, NULL, NULL);
        if (cfd >= 0) {
            printf("ACCEPT fd=%d\n", cfd); /* kept forever */
            accepted++;
        } else if (errno == EMFILE) {
            if (emfile++ == 0)
                printf("ACCEPT_ERR errno=%d\n", EMFILE);
            /* THE BUG: nothing frees an fd, the next poll() returns at once. */
        } else if (errno != EINTR) {
            printf("ACCEPT_ERR errno=%d\n", errno);
            errors++;
        }
    }
    printf("STATS wakeups=%ld emfile=%ld accepted=%ld errors=%ld\n", wakeups, emfile, accepted,
           errors);
    return 0;
}
