/*
 * break_handover - does close() still close when keepfix's thread stalls right after a release?
 *
 * A leaky server near its fd limit: it opens /dev/null until fd FILL-1, then accepts connections,
 * reads each to EOF (a 0-byte read()) and keeps it (the classic leak). Meanwhile a worker thread
 * opens B files (--batch, 1..8), closes and re-checks them in a loop, as any file I/O does: after
 * each close() that returned 0 it asks the kernel whether the number still holds that very file
 * (same st_dev and st_ino). That can only be true if close() returned 0 without closing.
 *
 * stdout:
 *   READY port=P
 *   FILLED fd=N               fillers opened up to fd N
 *   EOF fd=N                  a connection read to EOF (kept open)
 *   CLOSE_NOOP fd=N           close(N) returned 0, yet N still holds the worker's file
 *   CLOSE_ERR fd=N errno=E    close() of the worker's file failed
 *   STILL_OPEN fd=N           at the end: a number whose close returned 0 still holds the file
 *   STATS loops=L noops=K still_open=S
 *
 * usage: break_handover [--fill N] [--conns K] [--batch B] DIR     (commands on stdin: EOF ends it)
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sys/stat.h>

static char g_path[4096];
static volatile int g_stop;
static long g_loops;
static int g_noop[64];
static int g_nnoop;

static int g_batch = 1;

static void *worker(void *arg)
{
    (void)arg;
    while (!g_stop) {
        int fds[8];
        struct stat st[8];
        int n = 0;
        while (n < g_batch) {
            int fd = open(g_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (fd < 0)
                break;
            if (fstat(fd, &st[n]) != 0)
                die("fstat:");
            fds[n++] = fd;
        }
        if (n == 0) {
            usleep(100);
            continue;
        }
        for (int i = 0; i < n; i++) {
            int fd = fds[i];
            struct stat b;
            if (close(fd) != 0) {
                printf("CLOSE_ERR fd=%d errno=%d\n", fd, errno);
                continue;
            }
            g_loops++;
            if (fcntl(fd, F_GETFD) >= 0 && fstat(fd, &b) == 0 && st[i].st_dev == b.st_dev && st[i].st_ino == b.st_ino) {
                printf("CLOSE_NOOP fd=%d\n", fd);
                if (g_nnoop < 64)
                    g_noop[g_nnoop++] = fd;
                /* The number is not ours any more, as far as we know: never touch it again. */
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int fill = 100, conns = 14;
    static const struct option opts[] = {
        { "fill", required_argument, 0, 'f' }, { "conns", required_argument, 0, 'c' },
        { "batch", required_argument, 0, 'b' }, { 0, 0, 0, 0 }
    };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'f')
            fill = (int)parse_long(optarg, "fill");
        else if (o == 'c')
            conns = (int)parse_long(optarg, "conns");
        else if (o == 'b')
            g_batch = (int)parse_long(optarg, "batch") % 9;
        else
            die("usage: break_handover [--fill N] [--conns K] DIR");
    }
    if (optind + 1 != argc)
        die("usage: break_handover [--fill N] [--conns K] DIR");
    snprintf(g_path, sizeof g_path, "%s/worker.log", argv[optind]);
    proto_init();
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    int last = fill_fds_to(fill - 1);
    printf("FILLED fd=%d\n", last);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        die("pthread_create");
    for (int i = 0; i < conns && !g_term; i++) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            printf("ACCEPT_ERR errno=%d\n", errno);
            sleep_ms(10);
            continue;
        }
        char buf[256];
        ssize_t n;
        while ((n = read(c, buf, sizeof buf)) > 0)
            ;
        if (n == 0)
            printf("EOF fd=%d\n", c);
        else
            printf("READ_ERR fd=%d errno=%d\n", c, errno);
        /* leaked: never closed */
    }
    wait_for_test();
    g_stop = 1;
    pthread_join(t, NULL);
    int still = 0;
    for (int i = 0; i < g_nnoop; i++) {
        struct stat st;
        if (fcntl(g_noop[i], F_GETFD) >= 0 && fstat(g_noop[i], &st) == 0 && S_ISREG(st.st_mode)) {
            printf("STILL_OPEN fd=%d\n", g_noop[i]);
            still++;
        }
    }
    printf("STATS loops=%ld noops=%d still_open=%d\n", g_loops, g_nnoop, still);
    return 0;
}
