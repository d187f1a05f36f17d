/*
 * stress_forkown - forked children that use every fd number they can get, while the parent's
 * keepfix watchdog opens and closes fds of its own (a metrics file every tick).
 *
 * Models: a pre-forking server under a low RLIMIT_NOFILE whose workers use many fds.  fork()
 * copies the fd table before it copies memory, and the parent's other threads run meanwhile: a
 * child can inherit keepfix's bookkeeping of an fd the parent opened after the fd table was
 * copied.  keepfix marks its own fds so that the program's close() does not touch them; a mark
 * without its fd in the child would make the child's close() of its own file at that number fail
 * with EBADF, and leave the file open.
 *
 * The parent makes a TCP connection (keepfix's watchdog starts), then forks CHILDREN children,
 * one after another.  Each child opens /dev/null until EMFILE (every free number, those just
 * below the limit included), then closes each fd it opened: each close must return 0.  With
 * --dup2, the child's first hooked call is a dup2 of the inherited connection, which starts its
 * own watchdog: keepfix then closes the fds of the parent's it believes it inherited.  With
 * --fresh R: R processes, each of which makes its connection (its watchdog starts and, at its
 * first tick, opens a /proc file of its own) and at once forks 8 such --dup2 children.
 *
 *   stress_forkown [--children N] [--dup2] [--fresh R]     (run it with RLIMIT_NOFILE 64)
 * stdout: READY, BAD_CLOSE child=PID fd=N errno=E (from children), CHILD_DIED pid=P status=S,
 *         DONE children=N bad=B died=D
 * exit: 0 if B == 0 and D == 0.
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>
#include <sys/wait.h>

static int child(int sock, int use_dup2)
{
    if (use_dup2 && dup2(sock, 20) != 20)
        return 3;
    int fds[4096], n = 0;
    while (n < 4096) {
        int f = open("/dev/null", O_RDONLY);
        if (f < 0)
            break;
        fds[n++] = f;
    }
    int bad = 0;
    for (int i = 0; i < n; i++) {
        errno = 0;
        if (close(fds[i]) != 0) {
            dprintf(1, "BAD_CLOSE child=%d fd=%d errno=%d\n", (int)getpid(), fds[i], errno);
            bad = 1;
        }
    }
    return bad;
}

/* A connection of our own: keepfix's watchdog starts (again, in a forked process). */
static int make_conn(void)
{
    int lfd, cl, a;
    loopback_pair(&lfd, &cl, &a);
    return a;
}

/* Reaps pid: 0 ok, 1 a bad close, 2 died. */
static int reap(pid_t pid)
{
    int st = 0;
    waitpid(pid, &st, 0);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        return 0;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 1)
        return 1;
    printf("CHILD_DIED pid=%d status=%d\n", (int)pid, st);
    fflush(stdout);
    return 2;
}

/* --fresh: a process whose watchdog has just started forks BURST children back to back. */
static int fresh_parent(int burst)
{
    int a = make_conn();
    pid_t kids[64];
    for (int i = 0; i < burst; i++) {
        kids[i] = fork();
        if (kids[i] == 0)
            _exit(child(a, 1));
    }
    int worst = 0;
    for (int i = 0; i < burst; i++) {
        int r = kids[i] > 0 ? reap(kids[i]) : 2;
        worst = r > worst ? r : worst;
    }
    return worst;
}

int main(int argc, char **argv)
{
    proto_init();
    long children = 500, fresh = 0;
    int use_dup2 = 0;
    static const struct option opts[] = {
        { "children", required_argument, NULL, 'n' },
        { "dup2", no_argument, NULL, 'd' },
        { "fresh", required_argument, NULL, 'f' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'n')
            children = parse_long(optarg, "--children");
        else if (c == 'd')
            use_dup2 = 1;
        else if (c == 'f')
            fresh = parse_long(optarg, "--fresh");
        else
            die("usage: stress_forkown [--children N] [--dup2] [--fresh R]");
    }
    printf("READY\n");
    fflush(stdout);
    long bad = 0, died = 0;
    if (fresh > 0) {
        /* R fresh processes, each forking 8 children as soon as its watchdog started. */
        for (long i = 0; i < fresh; i++) {
            pid_t pid = fork();
            if (pid < 0)
                die("fork:");
            if (pid == 0)
                _exit(fresh_parent(8));
            int r = reap(pid);
            bad += r == 1;
            died += r == 2;
        }
        printf("DONE children=%ld bad=%ld died=%ld\n", fresh * 8, bad, died);
        return bad || died ? 1 : 0;
    }
    int a = make_conn();
    for (long i = 0; i < children; i++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork:");
        if (pid == 0)
            _exit(child(a, use_dup2));
        int r = reap(pid);
        bad += r == 1;
        died += r == 2;
    }
    printf("DONE children=%ld bad=%ld died=%ld\n", children, bad, died);
    return bad || died ? 1 : 0;
}
