/*
 * break_dupsweep - a program that keeps re-using the high fd numbers where keepfix makes its
 * private duplicates, while keepfix shuts its forgotten sockets down through those duplicates.
 *
 * Models: legacy code that moves connections to fixed high numbers (dup2 to 1012 + k) after a
 * close_range() sweep, in a thread of its own, beside a leaky accept loop.  The first LIVE
 * connections are kept open and never forgotten; the rest are read to EOF and leaked.  If
 * keepfix ever shut a socket down through a number that the sweeper had refilled with a live
 * connection, that live client would get a FIN.
 *
 * Usage: break_dupsweep [--live N] [--seconds S]   (run with RLIMIT_NOFILE 1024)
 * stdout: READY port=P, LIVE fd=N (each), STATS sweeps=S moved=M busy=B leaked=L
 *         live_broken=K (live connections no longer ESTABLISHED at the end)
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/close_range.h>
#include <pthread.h>
#include <sys/syscall.h>

static int g_live[8], g_nlive;
static volatile int g_stop;
static long g_sweeps, g_moved, g_busy;

static void *sweeper(void *arg)
{
    (void)arg;
    while (!g_stop) {
        /* Under RLIMIT_NOFILE 1024 keepfix's own fds sit at 1008..1011 and its duplicates land
         * just above: the sweep takes 1012..1023. */
        syscall(SYS_close_range, 1012, 1023, 0);
        for (int k = 0; k < 12; k++) {
            if (dup2(g_live[k % g_nlive], 1012 + k) == 1012 + k)
                g_moved++;
            else if (errno == EBUSY)
                g_busy++;
        }
        g_sweeps++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    proto_init();
    int seconds = 3;
    g_nlive = 4;
    static const struct option opts[] = { { "live", required_argument, 0, 'l' },
                                          { "seconds", required_argument, 0, 's' },
                                          { 0, 0, 0, 0 } };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'l')
            g_nlive = (int)parse_long(optarg, "live");
        else if (o == 's')
            seconds = (int)parse_long(optarg, "seconds");
        else
            die("usage: break_dupsweep [--live N] [--seconds S]");
    }
    if (g_nlive < 1 || g_nlive > 8)
        die("--live is 1..8");
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    for (int i = 0; i < g_nlive; i++) {
        g_live[i] = accept(lfd, NULL, NULL);
        if (g_live[i] < 0)
            die("accept live:");
        printf("LIVE fd=%d\n", g_live[i]);
    }
    pthread_t t;
    if (pthread_create(&t, NULL, sweeper, NULL) != 0)
        die("pthread_create");
    set_nonblock(lfd);
    long leaked = 0;
    long deadline = now_ms() + seconds * 1000L;
    while (now_ms() < deadline) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            sleep_ms(1);
            continue;
        }
        char b[256];
        while (read_line(c, b, sizeof b, 200) > 0)
            ;
        leaked++; /* THE BUG: never closed */
    }
    g_stop = 1;
    pthread_join(t, NULL);
    int broken = 0;
    for (int i = 0; i < g_nlive; i++) {
        struct tcp_info ti;
        socklen_t len = sizeof ti;
        if (getsockopt(g_live[i], IPPROTO_TCP, TCP_INFO, &ti, &len) != 0 || ti.tcpi_state != TCP_ESTABLISHED)
            broken++;
    }
    printf("STATS sweeps=%ld moved=%ld busy=%ld leaked=%ld live_broken=%d\n", g_sweeps, g_moved, g_busy, leaked,
           broken);
    return 0;
}
