/*
 * many_files - a server that holds connections and opens many files.
 *
 * Models: a program with lots of non-socket fds next to its sockets (and
 * fds that get reused): a preload library tracking fds must keep files and
 * sockets apart and not run out of fds itself.  It accepts and holds
 * connections (never reads or closes them) in a poll loop over stdin and the
 * listener, and obeys commands on stdin, one per line:
 *   open N    open N more fds of /dev/null (stops at the first failure)
 *   close N   close N of the files it holds (the most recent first)
 *   count     report the number of open fds (from /proc/self/fd)
 *   rlimit [N] set RLIMIT_NOFILE to its current values, or its soft limit to N
 * stdin EOF or SIGTERM: print STATS and exit 0.
 *
 * Usage: many_files PORT
 * stdout: READY port=P, ACCEPT fd=N, ACCEPT_ERR errno=E, OPENED total=T,
 *         OPEN_ERR errno=E total=T, CLOSED total=T, FDS n=X, RLIMIT rc=R soft=S, UNKNOWN cmd=W,
 *         STATS accepted=A files=T errors=E
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>

static int *files;
static long nfiles, fcap, errors;

static void do_open(long n)
{
    for (long i = 0; i < n; i++) {
        int fd = open("/dev/null", O_RDONLY);
        if (fd < 0) {
            printf("OPEN_ERR errno=%d total=%ld\n", errno, nfiles);
            errors++;
            return;
        }
        if (nfiles == fcap) {
            fcap = fcap ? fcap * 2 : 64;
            files = realloc(files, (size_t)fcap * sizeof *files);
            if (!files)
                die("out of memory");
        }
        files[nfiles++] = fd;
    }
    printf("OPENED total=%ld\n", nfiles);
}

static void do_close(long n)
{
    while (n-- > 0 && nfiles > 0)
        close(files[--nfiles]);
    printf("CLOSED total=%ld\n", nfiles);
}

static void command(char *cmd)
{
    char word[32];
    long n = 0;
    int k = sscanf(cmd, "%31s %ld", word, &n);
    if (k < 1)
        return; /* empty line */
    if (k == 2 && strcmp(word, "open") == 0)
        do_open(n);
    else if (k == 2 && strcmp(word, "close") == 0)
        do_close(n);
    else if (strcmp(word, "count") == 0)
        printf("FDS n=%d\n", count_open_fds());
    else if (strcmp(word, "rlimit") == 0) {
        /* "rlimit": set RLIMIT_NOFILE to what it is (as a JVM does); "rlimit N": soft to N. */
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        if (k == 2)
            rl.rlim_cur = (rlim_t)n;
        int r = setrlimit(RLIMIT_NOFILE, &rl);
        printf("RLIMIT rc=%d soft=%ld\n", r, (long)rl.rlim_cur);
    }
    else
        printf("UNKNOWN cmd=%s\n", word);
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: many_files PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[1]), 0, 0);
    print_ready(lfd);

    struct linebuf lb = { .len = 0 };
    long accepted = 0;
    while (!g_term && !lb.eof) {
        struct pollfd p[2] = { { 0, POLLIN, 0 }, { lfd, POLLIN, 0 } };
        if (poll(p, 2, 100) <= 0)
            continue;
        if (p[1].revents & POLLIN) {
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                errors++;
                sleep_ms(10);
            } else {
                printf("ACCEPT fd=%d\n", cfd); /* held forever, never read */
                accepted++;
            }
        }
        if (p[0].revents) {
            if (p[0].revents & POLLNVAL)
                lb.eof = 1; /* no stdin at all */
            else
                lb_fill(&lb, 0);
            char cmd[256];
            while (lb_getline(&lb, cmd, sizeof cmd))
                command(cmd);
        }
    }
    printf("STATS accepted=%ld files=%ld errors=%ld\n", accepted, nfiles, errors);
    return 0;
}
