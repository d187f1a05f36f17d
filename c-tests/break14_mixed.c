/*
 * break14_mixed - thousands of fds that are not TCP sockets, and a TCP socket in another network
 * namespace, around two CLOSE_WAIT sockets (breaker 14).
 *
 * Holds --pipes N pipes (one byte waiting in each), --eventfds M eventfds (counter 5 each), an
 * epoll fd watching every TCP socket, a timerfd, a memfd, /dev/null, a UDP and a unix datagram
 * socket, a listener and a connection to itself whose client side is shut down for writing (its
 * server side in CLOSE_WAIT). With --netns (root) it then moves to a new network namespace,
 * brings its lo up, and makes a second such CLOSE_WAIT pair there: `ss` and /proc/net/tcp of the
 * first namespace do not show it, but pidfd_getfd reaches it.
 * stdin "check": every fd still holds the object it held at the start (st_dev, st_ino), every
 * pipe still has its byte, every eventfd its 5, epoll still answers; and whether each CLOSE_WAIT
 * pair's client saw a FIN.
 *
 * Usage: break14_mixed [--pipes N] [--eventfds M] [--netns]
 * stdout: READY fds=F host_cw=FD ns_cw=FD (-1 without --netns),
 *         CHECK same=1|0 pipes_ok=P eventfds_ok=E epoll=K host_eof=0|1 ns_eof=0|1
 */
#define _GNU_SOURCE
#include "common.h"
#include <net/if.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/timerfd.h>

#define MAXFD 20000
static dev_t g_dev[MAXFD];
static ino_t g_ino[MAXFD];
static int g_pipe[MAXFD][2];
static int g_efd[MAXFD];

static void half_closed_pair(int *client, int *server)
{
    int lfd;
    loopback_pair(&lfd, client, server);
    shutdown(*client, SHUT_WR);
}

static int saw_eof(int fd)
{
    char c;
    return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

int main(int argc, char **argv)
{
    proto_init();
    long pipes = 1000, eventfds = 1000;
    int netns = 0;
    static const struct option opts[] = {
        { "pipes", required_argument, NULL, 'p' },
        { "eventfds", required_argument, NULL, 'e' },
        { "netns", no_argument, NULL, 'n' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'p')
            pipes = parse_long(optarg, "pipes");
        else if (c == 'e')
            eventfds = parse_long(optarg, "eventfds");
        else if (c == 'n')
            netns = 1;
        else
            die("usage: break14_mixed [--pipes N] [--eventfds M] [--netns]");
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max < MAXFD ? rl.rlim_max : MAXFD;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)(2 * pipes + eventfds + 64) > rl.rlim_cur)
        die("RLIMIT_NOFILE too small");

    int hc, hs, nc = -1, ns = -1;
    half_closed_pair(&hc, &hs);
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = hs };
    epoll_ctl(ep, EPOLL_CTL_ADD, hs, &ev);
    if (pipes > MAXFD / 4 || eventfds > MAXFD / 4)
        die("too many");
    for (long i = 0; i < pipes; i++) {
        if (pipe(g_pipe[i]) < 0)
            die("pipe:");
        if (write(g_pipe[i][1], "x", 1) != 1)
            die("write:");
    }
    for (long i = 0; i < eventfds; i++) {
        g_efd[i] = eventfd(5, 0);
        if (g_efd[i] < 0)
            die("eventfd:");
    }
    timerfd_create(CLOCK_MONOTONIC, 0);
    memfd_create("b14", 0);
    open("/dev/null", O_RDWR);
    socket(AF_INET, SOCK_DGRAM, 0);
    socket(AF_UNIX, SOCK_DGRAM, 0);
    if (netns) {
        if (unshare(CLONE_NEWNET) < 0)
            die("unshare(CLONE_NEWNET):");
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strcpy(ifr.ifr_name, "lo");
        if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
            die("SIOCGIFFLAGS:");
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            die("SIOCSIFFLAGS:");
        close(s);
        half_closed_pair(&nc, &ns);
        struct epoll_event ev2 = { .events = EPOLLIN, .data.fd = ns };
        epoll_ctl(ep, EPOLL_CTL_ADD, ns, &ev2);
    }
    int maxfd = 0;
    for (int fd = 0; fd < MAXFD; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0) {
            g_dev[fd] = st.st_dev;
            g_ino[fd] = st.st_ino;
            maxfd = fd;
        }
    }
    printf("READY fds=%d host_cw=%d ns_cw=%d\n", count_open_fds(), hs, ns);

    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "check", 5) != 0)
            continue;
        int same = 1;
        for (int fd = 0; fd <= maxfd; fd++) {
            struct stat st;
            if (g_ino[fd] && (fstat(fd, &st) < 0 || st.st_dev != g_dev[fd] || st.st_ino != g_ino[fd]))
                same = 0;
        }
        long pipes_ok = 0, efd_ok = 0;
        for (long i = 0; i < pipes; i++) {
            char b;
            if (read(g_pipe[i][0], &b, 1) == 1 && b == 'x' && write(g_pipe[i][1], "x", 1) == 1)
                pipes_ok++;
        }
        for (long i = 0; i < eventfds; i++) {
            uint64_t v = 0;
            int e = g_efd[i];
            if (read(e, &v, 8) == 8 && v == 5) {
                efd_ok++;
                v = 5;
                if (write(e, &v, 8) != 8)
                    efd_ok--;
            }
        }
        struct epoll_event out[4];
        int k = epoll_wait(ep, out, 4, 0);
        printf("CHECK same=%d pipes_ok=%ld eventfds_ok=%ld epoll=%d host_eof=%d ns_eof=%d\n", same, pipes_ok,
               efd_ok, k, saw_eof(hc), nc >= 0 ? saw_eof(nc) : -1);
    }
    return 0;
}
