/*
 * break14_swap - changes things between `keepfix rescue`'s scan and its shutdown (breaker 14).
 *
 * It connects to itself twice, A and B, and shuts the client sides down for writing
 * (SHUT_WR), so that both server sides sit in CLOSE_WAIT: A's at a low number NA, B's at
 * the highest number NB. Between them, --fillers N socketpairs (2N unix sockets, which
 * rescue duplicates and looks at too) make rescue's scan take a while. It then watches A's
 * SO_KEEPALIVE: rescue's scan (its first look at each socket) turns it on. At that moment,
 * which is before rescue's second look at NA (the shutdown pass):
 *   --mode swap     dup2(NB, NA) and close(NB): NA now holds B, which rescue never decided
 *                   on (its scan finds NB closed). Rescue must see that the object at NA
 *                   changed (the inode, through the duplicate it would shut down) and leave it.
 *   --mode sigpipe  SIGPIPE goes back to SIG_DFL: rescue must read the disposition again at
 *                   the shutdown and refuse (without --force).
 *   --mode blocked  (nothing at that moment) SIGPIPE is at SIG_DFL but blocked in the only
 *                   thread from the start: a write to a shut-down socket would leave it pending,
 *                   and it kills the process once unblocked. Rescue must count it as default.
 *   --mode resethand (nothing at that moment) SIGPIPE is caught by a handler installed with
 *                   SA_RESETHAND, as glibc's signal() does in a program built with -std=c99
 *                   (System V semantics): it runs once, then SIGPIPE is back at SIG_DFL.
 * stdin "poke": writes "late\n" to A's and B's server sides, printing POKE fd=N ret=R errno=E
 * for each (the program answering late).
 * stdin "check": reports whether the client sides of A and B have seen a FIN (a peek that
 * returns 0), i.e. whether their server sides were shut down or closed.
 *
 * Usage: break14_swap --mode swap|sigpipe|blocked|resethand [--fillers N]
 * stdout: READY na=NA nb=NB inode_a=I inode_b=J, KEEPALIVE_SEEN after_ms=T, SWAPPED na=NA
 *         | SIGDFL, CHECK a_eof=0|1 b_eof=0|1, TIMEOUT (no keepalive within 60 s)
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>
#include <sys/stat.h>

static unsigned long inode_of(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? (unsigned long)st.st_ino : 0;
}

static void on_sigpipe(int sig)
{
    (void)sig;
}

static int saw_eof(int fd)
{
    char c;
    return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

int main(int argc, char **argv)
{
    proto_init();
    const char *mode = "swap";
    long fillers = 2000;
    static const struct option opts[] = {
        { "mode", required_argument, NULL, 'm' },
        { "fillers", required_argument, NULL, 'f' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm')
            mode = optarg;
        else if (c == 'f')
            fillers = parse_long(optarg, "fillers");
        else
            die("usage: break14_swap --mode swap|sigpipe|blocked|resethand [--fillers N]");
    }
    int swap = strcmp(mode, "swap") == 0;
    int resethand = strcmp(mode, "resethand") == 0;
    int blocked = strcmp(mode, "blocked") == 0 || resethand; /* nothing to do when keepalive shows */
    if (!swap && !blocked && strcmp(mode, "sigpipe") != 0)
        die("bad --mode '%s'", mode);
    if (resethand) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_sigpipe;
        sa.sa_flags = SA_RESETHAND | SA_NODEFER;
        sigaction(SIGPIPE, &sa, NULL);
    }
    if (blocked && !resethand) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGPIPE);
        signal(SIGPIPE, SIG_DFL);
        sigprocmask(SIG_BLOCK, &set, NULL);
    }

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)(2 * fillers + 64) > rl.rlim_cur) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0 || (rlim_t)(2 * fillers + 64) > rl.rlim_cur)
            die("RLIMIT_NOFILE too small for %ld fillers", fillers);
    }

    int lfd, ca, sa, cb, sb;
    loopback_pair(&lfd, &ca, &sa);
    for (long i = 0; i < fillers; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
            die("socketpair:");
    }
    /* B: a second connection, accepted last, so at the highest number. */
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(lfd, (struct sockaddr *)&ss, &len) < 0)
        die("getsockname:");
    cb = socket(AF_INET, SOCK_STREAM, 0);
    if (cb < 0 || connect(cb, (struct sockaddr *)&ss, len) < 0)
        die("connect:");
    sb = accept(lfd, NULL, NULL);
    if (sb < 0)
        die("accept:");
    shutdown(ca, SHUT_WR);
    shutdown(cb, SHUT_WR);
    printf("READY na=%d nb=%d inode_a=%lu inode_b=%lu\n", sa, sb, inode_of(sa), inode_of(sb));

    long long start = now_ms();
    for (;;) {
        int on = 0;
        socklen_t l = sizeof on;
        if (getsockopt(sa, SOL_SOCKET, SO_KEEPALIVE, &on, &l) == 0 && on)
            break;
        if (now_ms() - start > 60000) {
            printf("TIMEOUT\n");
            return 1;
        }
    }
    if (swap) {
        if (dup2(sb, sa) < 0)
            die("dup2:");
        close(sb);
    } else if (!blocked) {
        signal(SIGPIPE, SIG_DFL);
    }
    printf("KEEPALIVE_SEEN after_ms=%lld\n", now_ms() - start);
    if (swap)
        printf("SWAPPED na=%d\n", sa);
    else if (!blocked)
        printf("SIGDFL\n");

    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "check", 5) == 0)
            printf("CHECK a_eof=%d b_eof=%d\n", saw_eof(ca), saw_eof(cb));
        if (strncmp(line, "poke", 4) == 0) {
            int fds[2] = { sa, swap ? -1 : sb };
            for (int i = 0; i < 2; i++) {
                if (fds[i] < 0)
                    continue;
                ssize_t r = write(fds[i], "late\n", 5);
                printf("POKE fd=%d ret=%zd errno=%d\n", fds[i], r, r < 0 ? errno : 0);
            }
        }
    }
    return 0;
}
