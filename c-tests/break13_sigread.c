/*
 * break13_sigread - a forked worker whose signal handler reads a TCP socket (a SIGIO/SIGALRM
 * driven poller: recv() is async-signal-safe, so POSIX allows it there) while its main thread
 * is inside malloc(). Against keepfix's lazy watchdog (issue 13): the read hooks start a LAZY
 * child's watchdog once the child outlived a scan tick, and starting it calls pthread_create(),
 * which is not async-signal-safe: it allocates the new thread's TLS vector with calloc(), and
 * the interrupted malloc() holds the arena lock.
 *
 * The parent listens (its watchdog starts), connects to itself and accepts, so it holds a
 * tracked connection; then it forks WORKERS workers one after the other. Each worker starts two
 * threads with 256 KiB stacks that sleep with SIGALRM blocked (they take the stack that the
 * parent's watchdog left in glibc's cache, so a new thread needs a new stack and TLS), arms a
 * 2 ms SIGALRM timer whose handler does recv(conn, MSG_PEEK|MSG_DONTWAIT), and mallocs and
 * frees blocks of 2 to 64 KiB (past tcache, under the arena lock) for RUN_MS milliseconds. Then
 * it prints DONE and exits. The parent waits RUN_MS + 2 s for each; a worker that has not ended
 * by then is HUNG (its main thread's wchan is printed) and killed.
 *
 * With --connect the handler instead makes a socket(), connect()s it to a closed port (refused at
 * once) and closes it: connect() is async-signal-safe too, and it starts a LAZY child's watchdog.
 *
 * Usage: break13_sigread [--connect] WORKERS RUN_MS
 * stdout: READY, DONE pid=W threads=T handlers=H, HUNG pid=W wchan=..., SUMMARY done=D hung=H
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <sys/wait.h>

static int conn = -1, use_connect;
static struct sockaddr_storage closed_addr;
static socklen_t closed_len;
static volatile sig_atomic_t handled;

static void on_alarm(int sig)
{
    (void)sig;
    int saved = errno;
    if (use_connect) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s >= 0) {
            (void)connect(s, (struct sockaddr *)&closed_addr, closed_len);
            close(s);
        }
    } else {
        char b;
        (void)recv(conn, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    }
    handled++;
    errno = saved;
}

static void *sleeper(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static int threads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    struct dirent *e;
    if (!d)
        return -1;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static void work(long run_ms, pid_t parent)
{
    /* Ends with the parent, which the test may kill: no worker is left behind. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(0);
    sigset_t alrm;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    pthread_sigmask(SIG_BLOCK, &alrm, NULL);
    for (int i = 0; i < 2; i++) {
        pthread_attr_t a;
        pthread_t t;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        if (pthread_create(&t, &a, sleeper, NULL) != 0)
            die("pthread_create");
        pthread_attr_destroy(&a);
    }
    pthread_sigmask(SIG_UNBLOCK, &alrm, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = { { 0, 2000 }, { 0, 2000 } };
    setitimer(ITIMER_REAL, &it, NULL);
    void *p[32] = { 0 };
    unsigned seed = (unsigned)getpid();
    long long end = now_ms() + run_ms;
    while (now_ms() < end) {
        for (int i = 0; i < 32; i++) {
            free(p[i]);
            p[i] = malloc(2048 + rand_r(&seed) % (62 * 1024));
        }
    }
    struct itimerval off = { { 0, 0 }, { 0, 0 } };
    setitimer(ITIMER_REAL, &off, NULL);
    printf("DONE pid=%d threads=%d handlers=%d\n", (int)getpid(), threads(), (int)handled);
    fflush(stdout);
    _exit(0);
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc == 4 && !strcmp(argv[1], "--connect")) {
        use_connect = 1;
        argv++;
        argc--;
    }
    if (argc != 3)
        die("usage: break13_sigread [--connect] WORKERS RUN_MS");
    long workers = parse_long(argv[1], "workers"), run_ms = parse_long(argv[2], "run_ms");
    /* A port nobody listens on: a listener's, closed again. */
    int tmp = bind_host_on(AF_INET, "127.0.0.1", 0, 0, 0);
    closed_len = make_addr(AF_INET, "127.0.0.1", local_port(tmp), &closed_addr);
    close(tmp);
    int l = bind_host_on(AF_INET, "127.0.0.1", 0, 0, 0);
    if (listen(l, 16) < 0)
        die("listen:");
    struct sockaddr_storage ss;
    socklen_t len = make_addr(AF_INET, "127.0.0.1", local_port(l), &ss);
    int cl = socket(AF_INET, SOCK_STREAM, 0);
    if (cl < 0 || connect(cl, (struct sockaddr *)&ss, len) < 0)
        die("connect:");
    conn = accept(l, NULL, NULL);
    if (conn < 0)
        die("accept:");
    printf("READY port=%d\n", local_port(l));
    fflush(stdout);
    int done = 0, hung = 0;
    for (long i = 0; i < workers && !g_term; i++) {
        pid_t parent = getpid();
        pid_t w = fork();
        if (w < 0)
            die("fork:");
        if (w == 0)
            work(run_ms, parent);
        long long deadline = now_ms() + run_ms + 2000;
        int ended = 0;
        while (now_ms() < deadline) {
            if (waitpid(w, NULL, WNOHANG) == w) {
                ended = 1;
                break;
            }
            sleep_ms(10);
        }
        if (ended) {
            done++;
            continue;
        }
        char path[64], wchan[64] = "?";
        snprintf(path, sizeof path, "/proc/%d/wchan", (int)w);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(wchan, sizeof wchan, f))
                strcpy(wchan, "?");
            fclose(f);
        }
        printf("HUNG pid=%d wchan=%s\n", (int)w, wchan);
        fflush(stdout);
        hung++;
        kill(w, SIGKILL);
        waitpid(w, NULL, 0);
    }
    printf("SUMMARY done=%d hung=%d\n", done, hung);
    fflush(stdout);
    return 0;
}
