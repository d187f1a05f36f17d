/*
 * prefork_server - a pre-forking server whose workers leak at EOF.
 *
 * Models: the Apache-prefork / classic Unix daemon: the parent creates the
 * listener and forks W workers that all block in accept() on the shared
 * listener, one connection at a time.  At EOF a worker forgets the fd (unless
 * --no-leak).  The preload library runs in every process and must cope with
 * inherited sockets and fork().  Workers die with the parent
 * (PR_SET_PDEATHSIG).  The parent prints READY after every worker printed
 * its WORKER line (synchronised through a pipe); on SIGTERM it kills and
 * reaps the workers and prints STATS (worker counters are kept in shared
 * memory).
 *
 * Usage: prefork_server [--workers W] [--no-leak] PORT
 * stdout: WORKER pid=PID (each), READY port=P, ACCEPT pid=PID fd=N,
 *         EOF pid=PID fd=N, CLOSE pid=PID fd=N (--no-leak),
 *         READ_ERR/WRITE_ERR pid=PID fd=N errno=E, ACCEPT_ERR pid=PID errno=E,
 *         STATS workers=W reaped=R accepted=A served=S eof=E errors=R cpu_us=U
 *         (U: the CPU time, getrusage, of the parent and its reaped workers)
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

struct counters {
    long accepted, served, eofs, errors;
};

static struct counters *shared; /* MAP_SHARED: summed by the parent */

static void count(long *field, long n)
{
    __atomic_add_fetch(field, n, __ATOMIC_RELAXED);
}

/* Serve one connection until EOF or error; returns nothing. */
static void serve(int fd, int pid, int no_leak)
{
    char buf[4096];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) {
            if (g_term)
                return;
            continue;
        }
        if (n > 0) {
            int k = answer_lines(fd, buf, n);
            if (k >= 0) {
                count(&shared->served, k);
                continue;
            }
            printf("WRITE_ERR pid=%d fd=%d errno=%d\n", pid, fd, errno);
            count(&shared->errors, 1);
        } else if (n == 0) {
            printf("EOF pid=%d fd=%d\n", pid, fd);
            count(&shared->eofs, 1);
        } else {
            printf("READ_ERR pid=%d fd=%d errno=%d\n", pid, fd, errno);
            count(&shared->errors, 1);
        }
        break;
    }
    if (no_leak) {
        close(fd);
        printf("CLOSE pid=%d fd=%d\n", pid, fd);
    }
    /* else THE BUG: the fd is forgotten. */
}

static void worker(int lfd, int ready_w, pid_t parent, int no_leak)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) /* the parent died before prctl() */
        _exit(0);
    int pid = (int)getpid();
    printf("WORKER pid=%d\n", pid);
    fflush(stdout);
    if (write(ready_w, "x", 1) != 1)
        _exit(1);
    close(ready_w);

    while (!g_term) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno != EINTR) {
                printf("ACCEPT_ERR pid=%d errno=%d\n", pid, errno);
                count(&shared->errors, 1);
                sleep_ms(10);
            }
            continue;
        }
        printf("ACCEPT pid=%d fd=%d\n", pid, cfd);
        count(&shared->accepted, 1);
        serve(cfd, pid, no_leak);
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    proto_init();
    int nworkers = 2, no_leak = 0;
    static const struct option opts[] = {
        { "workers", required_argument, NULL, 'w' },
        { "no-leak", no_argument, NULL, 'n' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'w')
            nworkers = (int)parse_long(optarg, "--workers");
        else if (c == 'n')
            no_leak = 1;
        else
            die("usage: prefork_server [--workers W] [--no-leak] PORT");
    }
    if (optind != argc - 1 || nworkers < 1 || nworkers > 256)
        die("usage: prefork_server [--workers W] [--no-leak] PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);

    shared = mmap(NULL, sizeof *shared, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        die("mmap:");
    int ready[2];
    if (pipe(ready) < 0)
        die("pipe:");

    pid_t parent = getpid(), pids[256];
    for (int i = 0; i < nworkers; i++) {
        fflush(stdout);
        pids[i] = fork();
        if (pids[i] < 0)
            die("fork:");
        if (pids[i] == 0) {
            close(ready[0]);
            worker(lfd, ready[1], parent, no_leak);
        }
    }
    close(ready[1]);
    for (int got = 0; got < nworkers;) { /* one byte per worker: WORKER printed */
        char b;
        ssize_t n = read(ready[0], &b, 1);
        if (n == 1)
            got++;
        else if (n == 0 || (n < 0 && errno != EINTR))
            die("a worker died during start-up");
        else if (g_term)
            break;
    }
    close(ready[0]);
    if (!g_term)
        print_ready(lfd);

    int alive = nworkers;
    while (!g_term && alive > 0) {
        poll(NULL, 0, 100);
        while (waitpid(-1, NULL, WNOHANG) > 0) /* a worker died on its own */
            alive--;
    }
    for (int i = 0; i < nworkers; i++)
        kill(pids[i], SIGTERM);
    int reaped = nworkers - alive;
    while (alive > 0) {
        if (waitpid(-1, NULL, 0) > 0) {
            alive--;
            reaped++;
        } else if (errno != EINTR) {
            break;
        }
    }
    printf("STATS workers=%d reaped=%d accepted=%ld served=%ld eof=%ld errors=%ld cpu_us=%lld\n", nworkers,
           reaped, shared->accepted, shared->served, shared->eofs, shared->errors, tree_cpu_us());
    return 0;
}
