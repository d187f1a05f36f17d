/*
 * stress_sigstart - the first hooked call that may start keepfix's watchdog comes from a signal
 * handler, while the interrupted thread holds the malloc lock.
 *
 * Models: a process in which keepfix's watchdog is not running yet although it tracks a socket:
 *   --mode fork  a forked child (the watchdog thread did not come along; it starts again at the
 *                child's next such call);
 *   --mode exec  a program exec'd with a TCP connection on fd 3 (adopted at load; the watchdog
 *                starts at the first socket call).
 * Its main thread allocates and frees 64 KiB blocks in a loop (inside malloc most of the time),
 * and a SIGALRM handler (every 200 us) does close(dup(sock)), which is async-signal-safe.  If a
 * hook started the watchdog thread from the handler, pthread_create() re-enters malloc: in a
 * single-threaded process that corrupts the heap (glibc aborts), and with another thread (every
 * odd child has an idle one) the arena lock is held: the process hangs for ever.
 *
 * The parent runs CHILDREN such processes one after another, each for CHILD_MS ms (default 50),
 * and waits for each at most 1.5 s; a child still running then is reported (with the kernel's
 * wchan of each of its threads) and killed.  A child that dies (glibc's heap checks abort when
 * malloc was re-entered) or whose handler saw a failed call is reported too.  It stops after 3
 * such children.
 *
 *   stress_sigstart [--mode fork|exec] [--children N] [--child-ms MS]
 *   (internal: stress_sigstart --child FD MS THREADED)
 * stdout: READY, HANG child=PID threads=T wchan=W,W,..., BAD_EXIT child=PID status=S, then
 *         DONE children=N hung=H bad_exit=B
 * exit: 0 if no child hung or failed.
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>

static int sock_fd = -1;
static long child_ms = 50;
static volatile long handler_runs, handler_fail;

static void on_alarm(int sig)
{
    (void)sig;
    int saved = errno;
    int d = dup(sock_fd);
    if (d < 0 || close(d) != 0)
        handler_fail++;
    handler_runs++;
    errno = saved;
}

static void *idle_thread(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

/* The child's life: CHILD_MS ms of malloc/free under a 200 us SIGALRM. With `threaded`, an idle
 * second thread exists (glibc's malloc then locks its arena: a re-entered malloc deadlocks;
 * single-threaded, it corrupts the heap). Exit status: 0 ok, 2 a handler check failed, 3 the
 * handler never ran. */
static int child_body(int fd, int threaded)
{
    sock_fd = fd;
    if (threaded) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        pthread_t t;
        if (pthread_create(&t, NULL, idle_thread, NULL) != 0)
            return 4;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = { { 0, 200 }, { 0, 200 } };
    setitimer(ITIMER_REAL, &it, NULL);
    long long end = now_ms() + child_ms;
    void *volatile keep[4] = { 0 };
    unsigned n = 0;
    while (now_ms() < end) {
        for (int k = 0; k < 64; k++) {
            unsigned i = n++ % 4;
            free(keep[i]);
            keep[i] = malloc(65536 + (n % 7) * 4096);
            if (keep[i])
                ((volatile char *)keep[i])[0] = 1;
        }
    }
    struct itimerval off = { { 0, 0 }, { 0, 0 } };
    setitimer(ITIMER_REAL, &off, NULL);
    if (handler_fail)
        return 2;
    if (handler_runs == 0)
        return 3;
    return 0;
}

/* The wchan of every thread of pid, comma-separated. */
static void wchans(int pid, char *out, size_t size, int *threads)
{
    char path[128];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    out[0] = '\0';
    *threads = 0;
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char p2[320], w[64] = "?";
        snprintf(p2, sizeof p2, "/proc/%d/task/%s/wchan", pid, de->d_name);
        FILE *f = fopen(p2, "r");
        if (f) {
            if (!fgets(w, sizeof w, f))
                strcpy(w, "?");
            fclose(f);
        }
        size_t l = strlen(out);
        snprintf(out + l, size - l, "%s%s", l ? "," : "", w);
        (*threads)++;
    }
    closedir(d);
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc == 5 && strcmp(argv[1], "--child") == 0) {
        child_ms = parse_long(argv[3], "ms");
        return child_body((int)parse_long(argv[2], "fd"), argv[4][0] == '1');
    }
    const char *mode = "fork";
    long children = 40;
    static const struct option opts[] = {
        { "mode", required_argument, NULL, 'm' },
        { "children", required_argument, NULL, 'n' },
        { "child-ms", required_argument, NULL, 't' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm')
            mode = optarg;
        else if (c == 'n')
            children = parse_long(optarg, "--children");
        else if (c == 't')
            child_ms = parse_long(optarg, "--child-ms");
        else
            die("usage: stress_sigstart [--mode fork|exec] [--children N] [--child-ms MS]");
    }
    int exec_mode = strcmp(mode, "exec") == 0;
    if (!exec_mode && strcmp(mode, "fork") != 0)
        die("bad --mode: '%s'", mode);

    /* A TCP connection: this process's TCP calls start keepfix's watchdog here. */
    int lfd, cl, a;
    loopback_pair(&lfd, &cl, &a);
    /* For --mode exec: the connection goes to fd 3 of the exec'd child, inherited. */
    printf("READY\n");

    long hung = 0, bad = 0, ran = 0;
    for (long i = 0; i < children && hung + bad < 3; i++, ran++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork:");
        if (pid == 0) {
            if (!exec_mode)
                _exit(child_body(a, (int)(i & 1)));
            if (dup2(a, 3) < 0)
                _exit(4);
            char ms[32];
            snprintf(ms, sizeof ms, "%ld", child_ms);
            char *args[] = { argv[0], "--child", "3", ms, (i & 1) ? "1" : "0", NULL };
            execv("/proc/self/exe", args);
            _exit(5);
        }
        int st = 0, done = 0;
        long long deadline = now_ms() + 1500;
        while (now_ms() < deadline) {
            pid_t w = waitpid(pid, &st, WNOHANG);
            if (w == pid) {
                done = 1;
                break;
            }
            sleep_ms(5);
        }
        if (!done) {
            char w[2048];
            int threads;
            wchans(pid, w, sizeof w, &threads);
            printf("HANG child=%d threads=%d wchan=%s\n", (int)pid, threads, w);
            hung++;
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            continue;
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            printf("BAD_EXIT child=%d status=%d\n", (int)pid, st);
            bad++;
        }
    }
    printf("DONE children=%ld hung=%ld bad_exit=%ld\n", ran, hung, bad);
    return hung || bad ? 1 : 0;
}
