/*
 * stress_vacate_reuse - a socket the program still owns must not be really closed by keepfix
 * ("vacated"): its number would go to a file, and the program's own later use of its number
 * would land on the file.
 *
 * Models: a connection pool (or an idle-timeout sweep) that notices a dead connection only at
 * its next use, much later: it writes its request to the fd, sees the failure, and closes it.
 * Under fd pressure, keepfix in close mode really closes old placeholders to free fds, but only
 * those of sockets whose end (EOF, error) the program had read; this pool never read its EOF.
 * Step by step, deterministically (run it with RLIMIT_NOFILE 64, KEEPFIX_CLOSE_WAIT=close,
 * KEEPFIX_CLOSE_WAIT_AFTER=0s and a short KEEPFIX_SCAN_INTERVAL):
 *   1. a connection to its own listener; the client side closes: the pooled server side `a` is
 *      in CLOSE_WAIT, and the pool does not notice (it keeps `a`, unread);
 *   2. waits (5 s at most) until keepfix shut `a` down (TCP state CLOSE);
 *   3. opens /dev/zero until 90% of the fd limit is in use, and watches for 5 s whether keepfix
 *      vacates `a` (/proc/self/fd/a gone: VACATED ok=1, the defect); closes those fds again;
 *   4. opens a data file: the kernel gives it the lowest free number;
 *   5. the pool uses its connection: write(a, "pool request\n"), then close(a);
 *   6. the file is written and read back through its own fd.
 * stdout: LEAKED fd=A, RELEASED fd=A ok=0|1, VACATED fd=A ok=0|1, FILE fd=F,
 *         POOL_WRITE ret=R errno=E, POOL_CLOSE ret=R errno=E,
 *         FILE_CHECK write=R errno=E content=ok|foreign|short,
 *         DONE harmed=0|1 (harmed: the file fd was closed or got the pool's bytes)
 * Without keepfix step 2 times out (ok=0) and nothing is harmed.
 *
 *   stress_vacate_reuse DIR
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>

static int points_to(int fd, const char *what)
{
    char path[64], link[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n < 0)
        return what == NULL;
    link[n] = '\0';
    return what && strcmp(link, what) == 0;
}

/* Waits until fd points to `what` (NULL: is closed); 1 if it did within 5 s. */
static int wait_for(int fd, const char *what)
{
    for (int i = 0; i < 500; i++) {
        if (points_to(fd, what))
            return 1;
        sleep_ms(10);
    }
    return 0;
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: stress_vacate_reuse DIR");
    int lfd, c, a;
    loopback_pair(&lfd, &c, &a);
    close(c);
    /* Something else of the program's takes the client's number, so that the next free number
     * after `a` is vacated is `a` itself. */
    if (open("/dev/null", O_RDONLY) < 0)
        die("open /dev/null:");
    printf("LEAKED fd=%d\n", a);
    int released = 0;
    for (int i = 0; i < 500 && !(released = shut_down_by_keepfix(a)); i++)
        sleep_ms(10);
    printf("RELEASED fd=%d ok=%d\n", a, released);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    long want = (long)rl.rlim_cur * 9 / 10 + 1;
    int fill[4096], nfill = 0;
    while (count_open_fds() < want && nfill < 4096) {
        int f = open("/dev/zero", O_RDONLY);
        if (f < 0)
            break;
        fill[nfill++] = f;
    }
    printf("VACATED fd=%d ok=%d\n", a, wait_for(a, NULL));
    while (nfill > 0)
        close(fill[--nfill]);

    char path[4096];
    snprintf(path, sizeof path, "%s/vacate.%d", argv[1], (int)getpid());
    int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (f < 0)
        die("open %s:", path);
    unlink(path);
    printf("FILE fd=%d\n", f);

    /* The pool's next use of its connection, and its close. */
    errno = 0;
    ssize_t w = write(a, "pool request\n", 13);
    printf("POOL_WRITE ret=%zd errno=%d\n", w, w < 0 ? errno : 0);
    errno = 0;
    int r = close(a);
    printf("POOL_CLOSE ret=%d errno=%d\n", r, r < 0 ? errno : 0);

    /* The file's own I/O. */
    static const char data[] = "file data\n";
    errno = 0;
    ssize_t fw = pwrite(f, data, sizeof data - 1, 0);
    int fe = fw < 0 ? errno : 0;
    char back[64] = { 0 };
    ssize_t fr = fw > 0 ? pread(f, back, sizeof back - 1, 0) : -1;
    const char *content = fr == (ssize_t)sizeof data - 1 && memcmp(back, data, sizeof data - 1) == 0 ? "ok"
                          : fr > 0                                                                    ? "foreign"
                                                                                                      : "short";
    printf("FILE_CHECK write=%zd errno=%d content=%s\n", fw, fe, content);
    int harmed = fw != (ssize_t)sizeof data - 1 || strcmp(content, "ok") != 0;
    printf("DONE harmed=%d\n", harmed);
    return 0;
}
