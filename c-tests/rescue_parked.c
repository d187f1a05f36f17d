/*
 * rescue_parked - a leaking server with threads parked in blocking calls, for
 * `keepfix rescue --release` (tests/rescue_release.rs).  Started WITHOUT keepfix.
 *
 * The main thread is a poll() server that answers "pong\n" per line and, like
 * leak_eof_server, forgets a connection at EOF: drops it from its poll set and
 * never closes it (CLOSE_WAIT).  It also reads commands on stdin:
 *   close N   close(N)  -> CLOSED fd=N ret=R errno=E
 *   write N   write(N, "x", 1) -> WROTE fd=N ret=R errno=E
 *   read N    read(N, buf, 1)  -> READ fd=N ret=R errno=E
 *   cloexec N fcntl(N, F_SETFD, FD_CLOEXEC) -> CLOEXEC fd=N ret=R
 *   soft N    setrlimit(RLIMIT_NOFILE) soft N, hard kept -> SOFT n=N ret=R
 *   fill      dup(2) until EMFILE -> FILLED fds=N (the program at its limit)
 *   stats     -> STATS file_ok=K file_err=F
 *   vfork MS  a new thread prints VFORKING tid=T and vfork()s a child that sleeps
 *             MS ms: the thread waits in D state meanwhile (no ptrace stop reaches
 *             it), then prints VFORKED
 *
 * --threads: one thread parked in each of read (a pipe), accept (a second
 * listener), futex (raw FUTEX_WAIT), pthread_cond_wait, poll (with a timeout:
 * restart_syscall), epoll_wait (no timeout, and with a timeout), nanosleep and
 * sigtimedwait (SIGUSR2, blocked).  Each prints PARKED name=X and blocks; no
 * event ever comes, so ANY return is wrong: it prints
 *   UNEXPECTED name=X ret=R errno=E
 * and parks again.  A writer thread pwrite()s a file every millisecond and
 * prints FILE_ERR op=pwrite errno=E on failure.  The main thread's own poll
 * prints UNEXPECTED name=main ... for an EINTR it was not sent a signal for.
 *
 * --seccomp: after setup, a seccomp filter kills the process on open, openat
 * and socketpair (a sandboxed server that opens nothing once it runs).
 *
 * Usage: rescue_parked [--threads] [--seccomp] PORT
 * stdout: READY port=P pipe=FD listener2=FD, PARKED name=X, ACCEPT fd=N,
 *         EOF fd=N, the command answers, UNEXPECTED ..., FILE_ERR ...
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <sys/wait.h>

static int pipe_rd, listener2;
static uint32_t futex_word;
static pthread_mutex_t cond_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int writer_fd;
static long file_ok, file_err;

static void unexpected(const char *name, long ret, int err)
{
    printf("UNEXPECTED name=%s ret=%ld errno=%d\n", name, ret, err);
}

static void *parked(void *arg)
{
    const char *name = arg;
    char tname[16];
    snprintf(tname, sizeof tname, "p_%s", name);
    pthread_setname_np(pthread_self(), tname);
    printf("PARKED name=%s\n", name);
    for (;;) {
        long r = 0;
        errno = 0;
        if (!strcmp(name, "read")) {
            char c;
            r = read(pipe_rd, &c, 1);
        } else if (!strcmp(name, "accept")) {
            r = accept(listener2, NULL, NULL);
        } else if (!strcmp(name, "futex")) {
            r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        } else if (!strcmp(name, "condwait")) {
            /* glibc retries a spurious futex return itself: only a wakeup would return. */
            pthread_mutex_lock(&cond_mu);
            r = pthread_cond_wait(&cond, &cond_mu);
            pthread_mutex_unlock(&cond_mu);
            errno = (int)r;
        } else if (!strcmp(name, "poll")) {
            struct pollfd p = { pipe_rd, POLLIN, 0 };
            r = poll(&p, 1, 3600 * 1000);
        } else if (!strcmp(name, "epoll") || !strcmp(name, "epoll_t")) {
            static int ep = -1;
            static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
            pthread_mutex_lock(&mu);
            if (ep < 0) {
                ep = epoll_create1(EPOLL_CLOEXEC);
                struct epoll_event ev = { .events = EPOLLIN, .data.fd = pipe_rd };
                if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, pipe_rd, &ev) < 0)
                    die("epoll:");
            }
            pthread_mutex_unlock(&mu);
            struct epoll_event out;
            r = epoll_wait(ep, &out, 1, !strcmp(name, "epoll") ? -1 : 3600 * 1000);
        } else if (!strcmp(name, "nanosleep")) {
            struct timespec ts = { 3600, 0 };
            r = nanosleep(&ts, NULL);
        } else if (!strcmp(name, "sigwait")) {
            sigset_t s;
            sigemptyset(&s);
            sigaddset(&s, SIGUSR2);
            struct timespec ts = { 3600, 0 };
            r = sigtimedwait(&s, NULL, &ts);
        }
        unexpected(name, r, errno);
        sleep_ms(10);
    }
    return NULL;
}

static void *writer(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "p_writer");
    char buf[4096];
    memset(buf, 'w', sizeof buf);
    for (unsigned i = 0;; i++) {
        if (pwrite(writer_fd, buf, sizeof buf, (off_t)(i % 64) * (off_t)sizeof buf) != (ssize_t)sizeof buf) {
            printf("FILE_ERR op=pwrite errno=%d\n", errno);
            __atomic_add_fetch(&file_err, 1, __ATOMIC_RELAXED);
        } else {
            __atomic_add_fetch(&file_ok, 1, __ATOMIC_RELAXED);
        }
        struct timespec ts = { 0, 1000000 };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    return NULL;
}

/* The vfork command's thread: in D state until the child exits. */
static void *vforker(void *arg)
{
    int ms = *(int *)arg;
    printf("VFORKING tid=%d\n", (int)gettid());
    fflush(stdout);
    pid_t child = vfork();
    if (child == 0) {
        struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
        syscall(SYS_nanosleep, &ts, NULL);
        _exit(0);
    }
    int st;
    while (child > 0 && waitpid(child, &st, 0) < 0 && errno == EINTR)
        ;
    printf("VFORKED pid=%d\n", (int)child);
    return NULL;
}

static void install_seccomp(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_openat, 3, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socketpair, 2, 0),
#ifdef SYS_open
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_open, 1, 0),
#else
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_openat, 1, 0),
#endif
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    };
    struct sock_fprog prog = { sizeof f / sizeof f[0], f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("PR_SET_NO_NEW_PRIVS:");
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog) != 0)
        die("seccomp:");
}

int main(int argc, char **argv)
{
    int threads = 0, sandbox = 0;
    static struct option opts[] = { { "threads", no_argument, 0, 't' }, { "seccomp", no_argument, 0, 's' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 't')
            threads = 1;
        else if (c == 's')
            sandbox = 1;
        else
            die("usage: rescue_parked [--threads] [--seccomp] PORT");
    }
    if (optind != argc - 1)
        die("usage: rescue_parked [--threads] [--seccomp] PORT");
    proto_init();

    /* SIGUSR2 is for sigtimedwait only: blocked in every thread. */
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, NULL);

    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    int pfd[2];
    if (pipe(pfd) < 0)
        die("pipe:");
    pipe_rd = pfd[0];
    listener2 = listen_on(AF_INET, 0, 0, 0);
    char path[] = "/tmp/rescue_parked.XXXXXX";
    writer_fd = mkstemp(path);
    if (writer_fd < 0)
        die("mkstemp:");
    unlink(path);
    if (sandbox)
        install_seccomp();

    pthread_t t;
    if (threads) {
        static const char *names[] = { "read", "accept", "futex", "condwait", "poll", "epoll", "epoll_t", "nanosleep", "sigwait" };
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (pthread_create(&t, NULL, parked, (void *)names[i]) != 0)
                die("pthread_create");
        if (pthread_create(&t, NULL, writer, NULL) != 0)
            die("pthread_create");
    }
    printf("READY port=%d pipe=%d listener2=%d\n", local_port(lfd), pipe_rd, listener2);

    struct pset ps = { 0 };
    pset_add(&ps, 0, POLLIN);
    pset_add(&ps, lfd, POLLIN);
    struct linebuf lb = { .len = 0 };
    while (!g_term) {
        int n = poll(ps.p, (nfds_t)ps.n, -1);
        if (n < 0) {
            if (errno == EINTR && g_term)
                break;
            unexpected("main", n, errno);
            continue;
        }
        for (size_t i = 0; i < ps.n; i++) {
            struct pollfd p = ps.p[i];
            if (!p.revents)
                continue;
            if (p.fd == 0) {
                if (lb_fill(&lb, 0) < 0) {
                    g_term = 1;
                    break;
                }
                char cmd[256];
                while (lb_getline(&lb, cmd, sizeof cmd)) {
                    int fd = -1;
                    char buf[1];
                    if (sscanf(cmd, "close %d", &fd) == 1) {
                        errno = 0;
                        int r = close(fd);
                        printf("CLOSED fd=%d ret=%d errno=%d\n", fd, r, r ? errno : 0);
                    } else if (sscanf(cmd, "write %d", &fd) == 1) {
                        errno = 0;
                        long r = write(fd, "x", 1);
                        printf("WROTE fd=%d ret=%ld errno=%d\n", fd, r, r < 0 ? errno : 0);
                    } else if (sscanf(cmd, "read %d", &fd) == 1) {
                        errno = 0;
                        long r = read(fd, buf, 1);
                        printf("READ fd=%d ret=%ld errno=%d\n", fd, r, r < 0 ? errno : 0);
                    } else if (sscanf(cmd, "cloexec %d", &fd) == 1) {
                        printf("CLOEXEC fd=%d ret=%d\n", fd, fcntl(fd, F_SETFD, FD_CLOEXEC));
                    } else if (sscanf(cmd, "soft %d", &fd) == 1) {
                        struct rlimit rl;
                        getrlimit(RLIMIT_NOFILE, &rl);
                        rl.rlim_cur = (rlim_t)fd;
                        printf("SOFT n=%d ret=%d\n", fd, setrlimit(RLIMIT_NOFILE, &rl));
                    } else if (!strcmp(cmd, "fill")) {
                        int k = 0;
                        while (dup(2) >= 0)
                            k++;
                        printf("FILLED fds=%d errno=%d\n", k, errno);
                    } else if (sscanf(cmd, "vfork %d", &fd) == 1) {
                        static int ms;
                        ms = fd;
                        pthread_t vt;
                        if (pthread_create(&vt, NULL, vforker, &ms) != 0)
                            die("pthread_create");
                        pthread_detach(vt);
                    } else if (!strcmp(cmd, "stats")) {
                        printf("STATS file_ok=%ld file_err=%ld\n", __atomic_load_n(&file_ok, __ATOMIC_RELAXED),
                               __atomic_load_n(&file_err, __ATOMIC_RELAXED));
                    }
                }
            } else if (p.fd == lfd) {
                int cfd = accept(lfd, NULL, NULL);
                if (cfd < 0) {
                    printf("ACCEPT_ERR errno=%d\n", errno);
                    sleep_ms(10);
                    continue;
                }
                printf("ACCEPT fd=%d\n", cfd);
                pset_add(&ps, cfd, POLLIN);
            } else {
                char buf[4096];
                ssize_t r = read(p.fd, buf, sizeof buf);
                if (r < 0 && (errno == EINTR || errno == EAGAIN))
                    continue;
                if (r <= 0) {
                    /* The bug: forgotten, never closed. */
                    printf("EOF fd=%d\n", p.fd);
                    pset_del(&ps, i);
                    i--;
                    continue;
                }
                answer_lines(p.fd, buf, r);
            }
        }
    }
    printf("STATS file_ok=%ld file_err=%ld\n", file_ok, file_err);
    return 0;
}
