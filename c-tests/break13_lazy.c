/*
 * break13_lazy - a prefork worker and its cousins, against keepfix's lazy watchdog in forked
 * children (issue 13, change 1). The parent listens (its watchdog starts there), then forks one
 * worker, which is LAZY: it gets a watchdog of its own only after a scan tick, at its next
 * listen/accept/connect/read of a tracked socket, or at once when it goes back to accept() still
 * holding the connection it accepted last.
 *
 * MODE:
 *   one      the worker accepts one connection, reads it to EOF, forgets to close it, and goes
 *            back to accept() (blocking, for ever): the case the design covers (control).
 *   proxy    a prefork proxy's worker: it accepts a client, connect()s to a backend (BACKEND,
 *            the test's listener), reads the client to EOF, closes the backend connection (the
 *            last one it made) and forgets the client's, then goes back to accept().
 *   forkfn   as `one`, but the worker is made with _Fork() (no fork handlers).
 *   connect  the worker makes its own socket(), connect()s it to the listener (the handshake
 *            completes in the backlog), and sleeps.
 *   nested   the worker forks a grandchild at once and sleeps; the grandchild does what `one`
 *            does (LEAKED names the grandchild).
 *   setuid   the worker drops to nobody (setgroups, setgid, setuid) while LAZY, then does what
 *            `one` does.
 *   mt       8 threads made after the fork connect() fresh sockets to BACKEND (a closed port:
 *            refused at once) in a loop for 2 s, so that several reach the tick's start at
 *            once; then the worker prints MT pid=W keepfix_threads=K (its tasks named keepfix)
 *            and sleeps.
 *
 * Usage: break13_lazy MODE PORT [BACKEND]
 * stdout: READY port=P, WORKER pid=W, then the worker's LEAKED pid=W fd=N (one, proxy, forkfn,
 *         nested), MT ... (mt)
 *         or CONNECTED pid=W fd=N (connect). The parent ends on stdin EOF or SIGTERM and kills
 *         the worker.
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/wait.h>

static int mt_port;

static void *connector(void *arg)
{
    (void)arg;
    struct sockaddr_storage ss;
    socklen_t len = make_addr(AF_INET, "127.0.0.1", mt_port, &ss);
    long long end = now_ms() + 2000;
    while (now_ms() < end) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            continue;
        (void)connect(s, (struct sockaddr *)&ss, len);
        close(s);
    }
    return NULL;
}

static int keepfix_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    int n = 0;
    if (!d)
        return -1;
    while ((e = readdir(d))) {
        char path[300], comm[64] = "";
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (f) {
            if (fgets(comm, sizeof comm, f) && !strcmp(comm, "keepfix\n"))
                n++;
            fclose(f);
        }
    }
    closedir(d);
    return n;
}

static void drain_to_eof(int fd)
{
    char buf[512];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
    }
}

static int connect_to(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_storage ss;
    socklen_t len = make_addr(AF_INET, "127.0.0.1", port, &ss);
    if (s < 0 || connect(s, (struct sockaddr *)&ss, len) < 0)
        die("connect:");
    return s;
}

/* A worker ends with the parent, which the test kills: none is left behind (a leftover nobody
 * worker counts against another test's RLIMIT_NPROC). Credential changes clear the setting, so
 * it is made again after them. */
static void die_with_parent(pid_t parent)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(0);
}

static void worker(const char *mode, int l, int port, int backend, pid_t parent)
{
    die_with_parent(parent);
    if (!strcmp(mode, "connect")) {
        int s = connect_to(port);
        printf("CONNECTED pid=%d fd=%d\n", (int)getpid(), s);
        fflush(stdout);
        for (;;)
            pause();
    }
    if (!strcmp(mode, "setuid")) {
        gid_t none[1] = { 65534 };
        if (setgroups(1, none) < 0 || setgid(65534) < 0 || setuid(65534) < 0)
            die("setuid:");
        die_with_parent(parent);
        mode = "one";
    }
    if (!strcmp(mode, "nested")) {
        pid_t worker_pid = getpid();
        pid_t g = fork();
        if (g < 0)
            die("fork:");
        if (g > 0)
            for (;;)
                pause();
        die_with_parent(worker_pid); /* the grandchild ends with the worker the parent kills */
        mode = "one";
    }
    if (!strcmp(mode, "mt")) {
        pthread_t t[8];
        mt_port = backend;
        for (int i = 0; i < 8; i++)
            if (pthread_create(&t[i], NULL, connector, NULL) != 0)
                die("pthread_create");
        for (int i = 0; i < 8; i++)
            pthread_join(t[i], NULL);
        printf("MT pid=%d keepfix_threads=%d\n", (int)getpid(), keepfix_threads());
        fflush(stdout);
        for (;;)
            pause();
    }
    int c1 = accept(l, NULL, NULL);
    if (c1 < 0)
        die("accept:");
    int c2 = -1;
    if (!strcmp(mode, "proxy"))
        c2 = connect_to(backend);
    drain_to_eof(c1);
    if (c2 >= 0)
        close(c2);
    /* c1 is forgotten: in CLOSE_WAIT, held for ever. */
    printf("LEAKED pid=%d fd=%d\n", (int)getpid(), c1);
    fflush(stdout);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c >= 0)
            close(c);
        else if (errno != EINTR)
            die("accept:");
    }
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 3 && argc != 4)
        die("usage: break13_lazy one|proxy|forkfn|connect PORT [BACKEND]");
    int backend = argc == 4 ? parse_port(argv[3]) : 0;
    const char *mode = argv[1];
    int l = bind_host_on(AF_INET, "127.0.0.1", parse_port(argv[2]), 0, 0);
    if (listen(l, 16) < 0)
        die("listen:");
    int port = local_port(l);
    printf("READY port=%d\n", port);
    fflush(stdout);
    pid_t parent = getpid();
    pid_t w = !strcmp(mode, "forkfn") ? _Fork() : fork();
    if (w < 0)
        die("fork:");
    if (w == 0)
        worker(mode, l, port, backend, parent);
    printf("WORKER pid=%d\n", (int)w);
    char b[64];
    while (!g_term && read(0, b, sizeof b) > 0)
        ;
    kill(w, SIGKILL);
    waitpid(w, NULL, 0);
    return 0;
}
