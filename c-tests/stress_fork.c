/*
 * stress_fork - fork(), vfork(), posix_spawn(), exec chains and short-lived threads, while
 * other threads churn TCP connections into CLOSE_WAIT and keepfix's watchdog releases them.
 *
 * Models: a pre-forking / spawning legacy daemon (CGI-style helpers, worker processes,
 * re-exec'd helpers that inherit a client connection) running next to a connection leak: every
 * process boundary is crossed while other threads are inside keepfix's hooks and while the
 * watchdog is in the middle of releasing sockets.
 *
 * CHURN threads: socket(), connect() to our listener, accept() (any pending connection), a dup()
 * closed at once, close() the client side: the server side falls into CLOSE_WAIT, its EOF is read
 * and it is closed LATE (32) connections later (every close must return 0).
 * The main thread, until SECONDS are up, cycles through:
 *   closeall  fork(); the child closes every fd from 3 below keepfix's own numbers, the way a
 *             daemon does, timing each close: one slower than 1 s (a hook waiting for a release
 *             the parent's watchdog was doing at fork time) or a wrong return value (0 for an
 *             open fd, -1 EBADF for a closed one) fails it;
 *   leak      (every 40th round, 25 at most) fork(); the child closes what it inherited
 *             (closefrom(3)), makes a connection of its own,
 *             leaks its server side into CLOSE_WAIT, waits (5 s at most) until its own watchdog
 *             shut it down (TCP state CLOSE or LAST_ACK), prints CHILD_LEAK, lingers 200 ms so
 *             that the watchdog's log line gets out, and exits;
 *   vfork     vfork(); the child closes the listener and a leaked socket, and execs /bin/true;
 *   spawn     posix_spawn() of ourselves (--spawned) with a file action putting a tracked
 *             connection on fd 3 and KEEPFIX_IDLE=41 in the environment: the new image checks
 *             from inside that keepfix adopted fd 3 (SO_KEEPALIVE on, TCP_KEEPIDLE 41);
 *   thread    a thread that makes, dups and closes a connection, joined at once.
 * (The vfork child and the spawned image keep no other fd: closefrom(3), and a closefrom file
 * action.)
 * Once, at the start (under churn): an exec chain.  fork(); the child execs ourselves (--chain)
 * DEPTH times, passing a tracked connection on fd 3 and, at level k, KEEPFIX_IDLE=80+k; the last
 * image prints LEAF pid=P fd=3 idle=I and waits until the main process ends (a pipe on fd 4).
 * Children are reaped as they end; any still running 10 s after the last round is reported
 * (HUNG) and killed.  --fork-fn _Fork uses glibc's _Fork(), which runs no atfork handlers, for
 * closeall and leak.
 *
 *   stress_fork [--seconds S] [--threads T] [--depth D] [--fork-fn fork|_Fork] [--hold]
 * --hold: after STATS, wait for the test (stdin EOF or SIGTERM) before exiting.
 * stdout: READY port=P, LEAF pid=P fd=3 idle=I, CHILD_LEAK pid=P fd=N released=0|1,
 *         CHILD_FAIL pid=P kind=K status=S, HUNG pid=P kind=K, FAIL where=W ret=R errno=E, and
 *         STATS rounds=R closeall=N leak=N vfork=N spawn=N thread=N churn=N child_failures=F
 *               hung=H failures=X
 * exit: 0 if child_failures, hung and failures are all 0.
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>

extern char **environ;

/* Child exit statuses. */
#define C_OK 0
#define C_SLOW_CLOSE 10
#define C_BAD_CLOSE 11
#define C_NOT_RELEASED 12
#define C_SPAWN_NO_KEEPALIVE 13
#define C_SPAWN_WRONG_IDLE 14

static int lfd;
static struct sockaddr_storage laddr;
static socklen_t laddrlen;
static volatile int stop;
static long failures, churned; /* __atomic */

static void fail(const char *where, long ret, int err)
{
    if (__atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED) <= 30)
        printf("FAIL where=%s ret=%ld errno=%d\n", where, ret, err);
}

/* A connection to our own listener: the client side in *c, an accepted connection in *a. */
static int make_pair(int *c, int *a)
{
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (*c < 0)
        return -1;
    int r;
    while ((r = connect(*c, (struct sockaddr *)&laddr, laddrlen)) < 0 && errno == EINTR)
        ;
    if (r < 0) {
        close(*c);
        return -1;
    }
    while ((*a = accept(lfd, NULL, NULL)) < 0 && errno == EINTR)
        ;
    if (*a < 0) {
        close(*c);
        return -1;
    }
    return 0;
}

static void *churn(void *arg)
{
    (void)arg;
    int ring[32];
    for (int k = 0; k < 32; k++)
        ring[k] = -1;
    for (unsigned long i = 0; !stop; i++) {
        int c, a, r;
        if (make_pair(&c, &a) < 0) {
            fail("churn_pair", -1, errno);
            sleep_ms(1);
            continue;
        }
        int d = dup(a);
        if (d < 0 || (r = close(d)) != 0)
            fail("churn_dup_close", d, errno);
        if ((r = close(c)) != 0)
            fail("churn_close_client", r, errno);
        /* Read the EOF (the program has seen the end: keepfix may free the number), and
         * close it late. */
        char b;
        ssize_t n;
        while ((n = read(a, &b, 1)) < 0 && errno == EINTR)
            ;
        if (n != 0)
            fail("churn_read_eof", (long)n, errno);
        int k = (int)(i % 32);
        if (ring[k] >= 0 && (r = close(ring[k])) != 0)
            fail("churn_close_late", r, errno);
        ring[k] = a;
        __atomic_add_fetch(&churned, 1, __ATOMIC_RELAXED);
    }
    for (int k = 0; k < 32; k++)
        if (ring[k] >= 0)
            close(ring[k]);
    return NULL;
}

/* keepfix keeps its own fds just below min(soft limit, 1024): the child leaves those alone. */
static int closeall_limit(void)
{
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    long soft = rl.rlim_cur > 1024 ? 1024 : (long)rl.rlim_cur;
    return (int)(soft - 17);
}

static int child_closeall(void)
{
    int limit = closeall_limit();
    int status = C_OK;
    for (int fd = 3; fd < limit; fd++) {
        int open_before = fcntl(fd, F_GETFD) >= 0;
        long long t0 = now_ms();
        errno = 0;
        int r = close(fd);
        int e = errno;
        if (now_ms() - t0 > 1000) {
            dprintf(1, "SLOW_CLOSE pid=%d fd=%d ms=%lld\n", (int)getpid(), fd, now_ms() - t0);
            status = C_SLOW_CLOSE;
        }
        if (open_before ? r != 0 : (r != -1 || e != EBADF)) {
            dprintf(1, "BAD_CLOSE pid=%d fd=%d open=%d ret=%d errno=%d\n", (int)getpid(), fd, open_before, r, e);
            if (status == C_OK)
                status = C_BAD_CLOSE;
        }
    }
    return status;
}

static int child_leak(void)
{
    /* A worker keeps nothing of its parent's (so its watchdog's lines are about its own socket);
     * then a listener and connection of its own. */
    closefrom(3);
    int l = listen_on(AF_INET, 0, 0, 0);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    getsockname(l, (struct sockaddr *)&ss, &len);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&ss, len) < 0)
        return C_NOT_RELEASED;
    int a = accept(l, NULL, NULL);
    if (a < 0)
        return C_NOT_RELEASED;
    close(c);
    int released = 0;
    for (int i = 0; i < 500 && !released; i++) {
        released = shut_down_by_keepfix(a);
        if (!released)
            sleep_ms(10);
    }
    dprintf(1, "CHILD_LEAK pid=%d fd=%d released=%d\n", (int)getpid(), a, released);
    sleep_ms(200);
    return released ? C_OK : C_NOT_RELEASED;
}

/* The posix_spawn()ed image: keepfix (loaded afresh) must have adopted fd 3. */
static int spawned(void)
{
    int on = 0, idle = 0;
    socklen_t l1 = sizeof on, l2 = sizeof idle;
    if (getsockopt(3, SOL_SOCKET, SO_KEEPALIVE, &on, &l1) != 0 || !on)
        return C_SPAWN_NO_KEEPALIVE;
    if (getsockopt(3, IPPROTO_TCP, TCP_KEEPIDLE, &idle, &l2) != 0 || idle != 41)
        return C_SPAWN_WRONG_IDLE;
    return C_OK;
}

/* One level of the exec chain: fd 3 is the connection, fd 4 the pipe from the main process. */
static int chain(int level)
{
    if (level == 0) {
        int idle = 0;
        socklen_t l = sizeof idle;
        getsockopt(3, IPPROTO_TCP, TCP_KEEPIDLE, &idle, &l);
        dprintf(1, "LEAF pid=%d fd=3 idle=%d\n", (int)getpid(), idle);
        char b;
        while (read(4, &b, 1) < 0 && errno == EINTR)
            ;
        return 0;
    }
    char idle[32], next[16];
    snprintf(idle, sizeof idle, "%d", 40 + level - 1);
    snprintf(next, sizeof next, "%d", level - 1);
    setenv("KEEPFIX_IDLE", idle, 1);
    char *args[] = { "stress_fork", "--chain", next, NULL };
    execv("/proc/self/exe", args);
    return 1;
}

static void *short_thread(void *arg)
{
    (void)arg;
    int c, a;
    if (make_pair(&c, &a) == 0) {
        int d = dup(a), r;
        if (d < 0 || (r = close(d)) != 0)
            fail("thread_dup_close", d, errno);
        if ((r = close(c)) != 0)
            fail("thread_close_client", r, errno);
        if ((r = close(a)) != 0)
            fail("thread_close", r, errno);
    }
    return NULL;
}

/* Children still to reap. */
struct kid {
    pid_t pid;
    const char *kind;
};
static struct kid kids[4096];
static int nkids;
static long child_failures;

static void add_kid(pid_t pid, const char *kind)
{
    if (nkids < 4096)
        kids[nkids++] = (struct kid){ pid, kind };
}

static void reap(int block_ms)
{
    long long deadline = now_ms() + block_ms;
    do {
        for (int i = 0; i < nkids;) {
            int st;
            pid_t w = waitpid(kids[i].pid, &st, WNOHANG);
            if (w == kids[i].pid) {
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                    printf("CHILD_FAIL pid=%d kind=%s status=%d\n", (int)w, kids[i].kind, st);
                    child_failures++;
                }
                kids[i] = kids[--nkids];
                continue;
            }
            i++;
        }
        if (nkids > 0 && block_ms > 0)
            sleep_ms(5);
    } while (nkids > 0 && now_ms() < deadline);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--chain") == 0)
        return chain((int)parse_long(argv[2], "level"));
    if (argc == 2 && strcmp(argv[1], "--spawned") == 0)
        return spawned();
    proto_init();
    long seconds = 8, threads = 2, depth = 3;
    const char *fork_fn = "fork";
    int hold = 0;
    static const struct option opts[] = {
        { "seconds", required_argument, NULL, 's' },
        { "threads", required_argument, NULL, 't' },
        { "depth", required_argument, NULL, 'd' },
        { "fork-fn", required_argument, NULL, 'f' },
        { "hold", no_argument, NULL, 'h' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 's')
            seconds = parse_long(optarg, "--seconds");
        else if (c == 't')
            threads = parse_long(optarg, "--threads");
        else if (c == 'd')
            depth = parse_long(optarg, "--depth");
        else if (c == 'f')
            fork_fn = optarg;
        else if (c == 'h')
            hold = 1;
        else
            die("usage: stress_fork [--seconds S] [--threads T] [--depth D] [--fork-fn fork|_Fork] [--hold]");
    }
    int use_underscore_fork = strcmp(fork_fn, "_Fork") == 0;
    if (!use_underscore_fork && strcmp(fork_fn, "fork") != 0)
        die("bad --fork-fn: '%s'", fork_fn);
    if (threads < 1 || threads > 16 || depth < 1 || depth > 20)
        die("bad --threads or --depth");

    lfd = listen_on(AF_INET, 0, 0, 0);
    if (listen(lfd, 1024) < 0)
        die("listen:");
    laddrlen = sizeof laddr;
    if (getsockname(lfd, (struct sockaddr *)&laddr, &laddrlen) < 0)
        die("getsockname:");
    /* The connections that cross exec: to fd 3 of spawned images, and of the chain's images. */
    int pass_c, pass_a, chain_c, chain_a;
    if (make_pair(&pass_c, &pass_a) < 0 || make_pair(&chain_c, &chain_a) < 0)
        die("pair:");
    int chain_pipe[2];
    if (pipe(chain_pipe) < 0)
        die("pipe:");
    fcntl(chain_pipe[1], F_SETFD, FD_CLOEXEC);
    print_ready(lfd);

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t *tids = calloc((size_t)threads, sizeof *tids);
    for (long i = 0; i < threads; i++)
        if (pthread_create(&tids[i], NULL, churn, NULL) != 0)
            die("pthread_create failed");
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    /* The exec chain, under churn.  Not in the very first moments of the watchdog: a child forked
     * while the watchdog opens its first fds may inherit their marks without them (see
     * stress_forkown --fresh), which this program is not about. */
    sleep_ms(200);
    fflush(stdout);
    pid_t chain_pid = fork();
    if (chain_pid < 0)
        die("fork:");
    if (chain_pid == 0) {
        dup2(chain_a, 3);
        dup2(chain_pipe[0], 4);
        closefrom(5);
        char lv[16];
        snprintf(lv, sizeof lv, "%ld", depth);
        char *args[] = { "stress_fork", "--chain", lv, NULL };
        execv("/proc/self/exe", args);
        _exit(1);
    }
    add_kid(chain_pid, "chain");
    close(chain_a); /* the chain's images alone hold it now (and set its options) */

    /* The environment of spawned images: ours, with KEEPFIX_IDLE=41. */
    int nenv = 0;
    while (environ[nenv])
        nenv++;
    char **spawn_env = calloc((size_t)nenv + 2, sizeof *spawn_env);
    int k = 0;
    for (int i = 0; i < nenv; i++)
        if (strncmp(environ[i], "KEEPFIX_IDLE=", 13) != 0)
            spawn_env[k++] = environ[i];
    spawn_env[k++] = "KEEPFIX_IDLE=41";
    spawn_env[k] = NULL;

    long rounds = 0, n_closeall = 0, n_leak = 0, n_vfork = 0, n_spawn = 0, n_thread = 0;
    long long deadline = now_ms() + seconds * 1000;
    while (!g_term && now_ms() < deadline) {
        rounds++;
        fflush(stdout);
        switch (rounds % 5) {
        case 0:
        case 1: {
            int leak = rounds % 40 == 1 && n_leak < 25;
            pid_t pid = use_underscore_fork ? _Fork() : fork();
            if (pid < 0) {
                fail("fork", pid, errno);
                break;
            }
            if (pid == 0)
                _exit(leak ? child_leak() : child_closeall());
            add_kid(pid, leak ? "leak" : "closeall");
            if (leak)
                n_leak++;
            else
                n_closeall++;
            break;
        }
        case 2: {
            int victim = pass_c;
            pid_t pid = vfork();
            if (pid < 0) {
                fail("vfork", pid, errno);
                break;
            }
            if (pid == 0) {
                close(lfd);
                close(victim);
                closefrom(3);
                execl("/bin/true", "true", (char *)NULL);
                _exit(127);
            }
            add_kid(pid, "vfork");
            n_vfork++;
            break;
        }
        case 3: {
            posix_spawn_file_actions_t fa;
            posix_spawn_file_actions_init(&fa);
            posix_spawn_file_actions_adddup2(&fa, pass_a, 3);
            posix_spawn_file_actions_addclosefrom_np(&fa, 4);
            pid_t pid;
            char *args[] = { "stress_fork", "--spawned", NULL };
            int r = posix_spawn(&pid, "/proc/self/exe", &fa, NULL, args, spawn_env);
            posix_spawn_file_actions_destroy(&fa);
            if (r != 0) {
                fail("posix_spawn", -1, r);
                break;
            }
            add_kid(pid, "spawn");
            n_spawn++;
            break;
        }
        case 4: {
            pthread_t t;
            if (pthread_create(&t, NULL, short_thread, NULL) == 0) {
                pthread_join(t, NULL);
                n_thread++;
            }
            break;
        }
        }
        reap(0);
        if (nkids > 200)
            reap(50);
    }
    stop = 1;
    for (long i = 0; i < threads; i++)
        pthread_join(tids[i], NULL);
    close(chain_pipe[1]); /* the chain's leaf exits */
    reap(10000);
    long hung = nkids;
    for (int i = 0; i < nkids; i++) {
        printf("HUNG pid=%d kind=%s\n", (int)kids[i].pid, kids[i].kind);
        kill(kids[i].pid, SIGKILL);
        waitpid(kids[i].pid, NULL, 0);
    }
    printf("STATS rounds=%ld closeall=%ld leak=%ld vfork=%ld spawn=%ld thread=%ld churn=%ld child_failures=%ld "
           "hung=%ld failures=%ld\n",
           rounds, n_closeall, n_leak, n_vfork, n_spawn, n_thread, churned, child_failures, hung, failures);
    if (hold)
        wait_for_test();
    return child_failures || hung || failures ? 1 : 0;
}
