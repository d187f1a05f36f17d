/*
 * stress_churn - fd reuse under keepfix's automatic release: client sockets falling into
 * CLOSE_WAIT in some threads, file I/O checked byte for byte in others.
 *
 * Models: a multi-threaded program with a connection leak (an outbound client whose peer closes
 * and which forgets some of its connections, closes some promptly at EOF and some much later)
 * next to threads that do ordinary file I/O.  keepfix, in close mode, releases the leaked
 * sockets (a placeholder takes the number) and, near RLIMIT_NOFILE, really closes old
 * placeholders ("vacate") while every thread keeps opening and closing fds.  Whatever keepfix
 * does, no thread may ever see EBADF, another thread's data, or a close() that fails.
 *
 * Socket thread t, iteration i: socket(), connect() to the server (which closes every connection
 * at once), then by a fixed pseudo-random choice:
 *   prompt (50%)  read() until EOF (0), then close(): races keepfix's release of the same socket;
 *   leak   (30%)  read() until EOF, then forget the fd: never closed (the classic bug);
 *   late   (20%)  keep it, unread, in the thread's ring of LATE fds, close() it when the slot
 *                 comes round (keepfix releases it meanwhile, but must never vacate its number:
 *                 the program has not seen its end and will close it).
 * (--mix P,L: P and L out of 10 are prompt and leak, the rest late; default 5,3.)
 * File thread f, iteration i: open DIR/churn.<pid>.<f> (O_RDWR|O_CREAT|O_TRUNC), write 4 KiB
 * unique to (f, i), fstat, pread it back and compare, fstat again (same inode), close().
 *
 *   stress_churn [--sock-threads S] [--file-threads F] [--seconds T] [--late L] [--mix P,L]
 *                [--hold] --dir DIR HOST PORT
 *   stress_churn --server PORT        (the peer: 2 threads accept and close at once)
 * --hold: after STATS, wait for the test (stdin EOF or SIGTERM) before exiting.
 * stdout (client): READY, then
 *   FAIL thread=sock|file id=N iter=I op=OP ret=R errno=E   (each failure, at most 30)
 *   STATS connects=C prompt=P leaked=L late=T file_rounds=R connect_fail=X emfile=M failures=F
 * stdout (server): READY port=P; STATS accepted=A on SIGTERM.
 * exit: 0 if failures == 0, else 1.
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sys/stat.h>

static struct sockaddr_storage srv;
static socklen_t srvlen;
static const char *dir;
static long late_len = 16;
/* Out of 10 connections: how many are closed promptly, leaked for good; the rest closed late. */
static long mix_prompt = 5, mix_leak = 3;
static volatile int stop;
static long failures, connects, prompt, leaked, late, file_rounds, connect_fail, emfile; /* __atomic */

static void add(long *c, long n)
{
    __atomic_add_fetch(c, n, __ATOMIC_RELAXED);
}

static void fail(const char *kind, long id, long iter, const char *op, long ret, int err)
{
    if (__atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED) <= 30)
        printf("FAIL thread=%s id=%ld iter=%ld op=%s ret=%ld errno=%d\n", kind, id, iter, op, ret, err);
}

/* A small deterministic generator: the same choices every run. */
static unsigned long mix(unsigned long x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53UL;
    x ^= x >> 33;
    return x;
}

static void *sock_thread(void *arg)
{
    long id = (long)arg;
    int *ring = malloc((size_t)late_len * sizeof *ring);
    for (long k = 0; k < late_len; k++)
        ring[k] = -1;
    long next_late = 0;
    for (long i = 0; !stop; i++) {
        int fd = socket(srv.ss_family, SOCK_STREAM, 0);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                add(&emfile, 1);
                sleep_ms(1);
            } else {
                fail("sock", id, i, "socket", fd, errno);
            }
            continue;
        }
        int r;
        while ((r = connect(fd, (struct sockaddr *)&srv, srvlen)) < 0 && errno == EINTR)
            ;
        if (r < 0) {
            if (errno == EBADF || errno == ENOTSOCK)
                fail("sock", id, i, "connect", r, errno);
            else
                add(&connect_fail, 1);
            if ((r = close(fd)) != 0)
                fail("sock", id, i, "close_after_connect_fail", r, errno);
            continue;
        }
        add(&connects, 1);
        unsigned long choice = mix((unsigned long)id << 40 | (unsigned long)i) % 10;
        if (choice < (unsigned long)(mix_prompt + mix_leak)) {
            /* The server closes at once; read its EOF (or keepfix's placeholder's). */
            char buf[64];
            ssize_t n;
            while ((n = read(fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
                ;
            if (n < 0)
                fail("sock", id, i, "read", n, errno);
            if (choice >= (unsigned long)mix_prompt) {
                add(&leaked, 1); /* THE BUG: EOF seen, and the fd forgotten. */
                continue;
            }
            if ((r = close(fd)) != 0)
                fail("sock", id, i, "close_prompt", r, errno);
            add(&prompt, 1);
        } else {
            long k = next_late++ % late_len;
            if (ring[k] >= 0) {
                if ((r = close(ring[k])) != 0)
                    fail("sock", id, i, "close_late", r, errno);
                add(&late, 1);
            }
            ring[k] = fd;
        }
    }
    free(ring);
    return NULL;
}

static void *file_thread(void *arg)
{
    long id = (long)arg;
    char path[4096];
    snprintf(path, sizeof path, "%s/churn.%d.%ld", dir, (int)getpid(), id);
    static __thread char out[4096], in[4096];
    for (long i = 0; !stop; i++) {
        char unit[32];
        snprintf(unit, sizeof unit, "%03ld:%011ld|", id % 1000, i % 100000000000L);
        for (size_t k = 0; k < sizeof out; k += 16)
            memcpy(out + k, unit, 16);
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                add(&emfile, 1);
                sleep_ms(1);
            } else {
                fail("file", id, i, "open", fd, errno);
            }
            continue;
        }
        struct stat st1, st2;
        if (fstat(fd, &st1) != 0) {
            fail("file", id, i, "fstat", -1, errno);
        } else if (write_all(fd, out, sizeof out) != 0) {
            fail("file", id, i, "write", -1, errno);
        } else {
            sched_yield(); /* a window for another thread's mistake to land on this fd */
            ssize_t n = pread(fd, in, sizeof in, 0);
            if (n != (ssize_t)sizeof in)
                fail("file", id, i, "pread", n, n < 0 ? errno : 0);
            else if (memcmp(in, out, sizeof in) != 0)
                fail("file", id, i, "compare", 0, 0);
            else if (fstat(fd, &st2) != 0)
                fail("file", id, i, "fstat2", -1, errno);
            else if (st1.st_ino != st2.st_ino || st1.st_dev != st2.st_dev)
                fail("file", id, i, "inode_changed", 0, 0);
        }
        int r = close(fd);
        if (r != 0)
            fail("file", id, i, "close", r, errno);
        add(&file_rounds, 1);
    }
    unlink(path);
    return NULL;
}

/* ---- the server ------------------------------------------------------------- */

static int srv_lfd;
static long accepted;

static void *acceptor(void *arg)
{
    (void)arg;
    for (;;) {
        int c = accept(srv_lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE)
                sleep_ms(1);
            continue;
        }
        close(c);
        add(&accepted, 1);
    }
    return NULL;
}

static int server(int port)
{
    srv_lfd = listen_on(AF_INET, port, 0, 0);
    if (listen(srv_lfd, 4096) < 0)
        die("listen:");
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t t;
    for (int i = 0; i < 2; i++)
        if (pthread_create(&t, NULL, acceptor, NULL) != 0)
            die("pthread_create failed");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    print_ready(srv_lfd);
    wait_for_test();
    printf("STATS accepted=%ld\n", __atomic_load_n(&accepted, __ATOMIC_RELAXED));
    return 0;
}

int main(int argc, char **argv)
{
    proto_init();
    long socks = 4, files = 4, seconds = 10;
    int hold = 0, server_mode = 0;
    static const struct option opts[] = {
        { "sock-threads", required_argument, NULL, 's' },
        { "file-threads", required_argument, NULL, 'f' },
        { "seconds", required_argument, NULL, 't' },
        { "late", required_argument, NULL, 'l' },
        { "mix", required_argument, NULL, 'm' },
        { "dir", required_argument, NULL, 'd' },
        { "hold", no_argument, NULL, 'h' },
        { "server", no_argument, NULL, 'S' },
        { 0, 0, 0, 0 },
    };
    const char *usage = "usage: stress_churn [--sock-threads S] [--file-threads F] [--seconds T] [--late L] "
                        "[--mix P,L] [--hold] --dir DIR HOST PORT | stress_churn --server PORT";
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            socks = parse_long(optarg, "--sock-threads");
        else if (c == 'f')
            files = parse_long(optarg, "--file-threads");
        else if (c == 't')
            seconds = parse_long(optarg, "--seconds");
        else if (c == 'l')
            late_len = parse_long(optarg, "--late");
        else if (c == 'd')
            dir = optarg;
        else if (c == 'm') {
            if (sscanf(optarg, "%ld,%ld", &mix_prompt, &mix_leak) != 2 || mix_prompt < 0 || mix_leak < 0 ||
                mix_prompt + mix_leak > 10)
                die("bad --mix: '%s'", optarg);
        }
        else if (c == 'h')
            hold = 1;
        else if (c == 'S')
            server_mode = 1;
        else
            die("%s", usage);
    }
    if (server_mode) {
        if (optind != argc - 1)
            die("%s", usage);
        return server(parse_port(argv[optind]));
    }
    if (optind != argc - 2 || !dir || socks < 1 || socks > 64 || files < 0 || files > 64 || late_len < 1)
        die("%s", usage);
    int family = strchr(argv[optind], ':') ? AF_INET6 : AF_INET;
    srvlen = make_addr(family, argv[optind], parse_port(argv[optind + 1]), &srv);

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t *tids = calloc((size_t)(socks + files), sizeof *tids);
    for (long i = 0; i < socks; i++)
        if (pthread_create(&tids[i], NULL, sock_thread, (void *)i) != 0)
            die("pthread_create failed");
    for (long i = 0; i < files; i++)
        if (pthread_create(&tids[socks + i], NULL, file_thread, (void *)i) != 0)
            die("pthread_create failed");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    printf("READY\n");
    long long deadline = now_ms() + seconds * 1000;
    while (!g_term && now_ms() < deadline)
        sleep_ms(50);
    stop = 1;
    for (long i = 0; i < socks + files; i++)
        pthread_join(tids[i], NULL);
    printf("STATS connects=%ld prompt=%ld leaked=%ld late=%ld file_rounds=%ld connect_fail=%ld emfile=%ld "
           "failures=%ld\n",
           connects, prompt, leaked, late, file_rounds, connect_fail, emfile, failures);
    if (hold)
        wait_for_test();
    return failures ? 1 : 0;
}
