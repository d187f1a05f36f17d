/*
 * break14_pidns - a PID reused while `keepfix rescue --watch` watches it (breaker 14).
 *
 * Runs as PID 1 of a new pid namespace, with its own /proc:
 *   unshare --pid --fork --mount-proc break14_pidns KEEPFIX
 * 1. forks the target T, which holds a TCP listener and pauses;
 * 2. runs `KEEPFIX rescue --json --watch 500ms T` (in the namespace, so it sees T's number);
 * 3. after keepfix's second pass, kills and reaps T, sets /proc/sys/kernel/ns_last_pid to T-1
 *    and forks an impostor, which so gets T's number, holding a listener of its own (L2, no
 *    keepalive);
 * 4. waits for keepfix to end, and reads L2's SO_KEEPALIVE (init keeps a copy of L2): keepfix
 *    must not have touched the impostor (its pidfd names the dead T);
 * 5. then, as a container's PID 1 holding L2, runs `KEEPFIX rescue --json 1` on itself.
 *
 * stdout: KF LINE (keepfix's stdout), RESULT target=T impostor=I keepfix_exit=C keepalive=K,
 *         PID1 exit=C keepalive=K
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/prctl.h>
#include <sys/wait.h>

static volatile pid_t g_keepfix;

static void on_alarm(int sig)
{
    (void)sig;
    if (g_keepfix > 0)
        kill(g_keepfix, SIGTERM); /* a keepfix that watches the impostor would never end */
}

static int keepalive(int fd)
{
    int on = -1;
    socklen_t l = sizeof on;
    getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, &l);
    return on;
}

static pid_t pauser(void)
{
    pid_t p = fork();
    if (p < 0)
        die("fork:");
    if (p == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;)
            pause();
    }
    return p;
}

/* Waits up to ms for pid; returns its wait status, or -1. */
static int wait_for(pid_t pid, long ms)
{
    long long end = now_ms() + ms;
    int st;
    while (now_ms() < end) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return st;
        sleep_ms(10);
    }
    return -1;
}

static int run_keepfix(char *const argv[], int show)
{
    int pfd[2];
    if (pipe(pfd) < 0)
        die("pipe:");
    pid_t k = fork();
    if (k == 0) {
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    FILE *f = fdopen(pfd[0], "r");
    char line[1 << 16];
    while (fgets(line, sizeof line, f))
        if (show)
            printf("KF %s", line);
    fclose(f);
    int st = wait_for(k, 10000);
    return st >= 0 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2)
        die("usage: break14_pidns KEEPFIX");
    if (getpid() != 1)
        die("not PID 1 of a pid namespace (run under unshare --pid --fork --mount-proc)");
    int l1 = listen_on(AF_INET, 0, 0, 0);
    pid_t target = pauser();
    close(l1);
    int l2 = listen_on(AF_INET, 0, 0, 0);

    char tpid[16];
    snprintf(tpid, sizeof tpid, "%d", (int)target);
    int pfd[2];
    if (pipe(pfd) < 0)
        die("pipe:");
    pid_t k = fork();
    if (k == 0) {
        close(l2);
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execl(argv[1], argv[1], "rescue", "--json", "--watch", "500ms", tpid, (char *)NULL);
        _exit(127);
    }
    close(pfd[1]);
    g_keepfix = k;
    signal(SIGALRM, on_alarm);
    alarm(20);
    FILE *f = fdopen(pfd[0], "r");
    char line[1 << 16];
    pid_t impostor = -1;
    while (fgets(line, sizeof line, f)) {
        printf("KF %s", line);
        if (impostor < 0 && strstr(line, "\"pass\":2")) {
            kill(target, SIGKILL);
            waitpid(target, NULL, 0);
            FILE *n = fopen("/proc/sys/kernel/ns_last_pid", "w");
            if (!n || fprintf(n, "%d", (int)target - 1) < 0 || fclose(n) != 0)
                die("cannot write ns_last_pid:");
            impostor = pauser(); /* holds l2 */
            alarm(5);
        }
    }
    fclose(f);
    int st = wait_for(k, 10000);
    printf("RESULT target=%d impostor=%d keepfix_exit=%d keepalive=%d\n", (int)target, (int)impostor,
           st >= 0 && WIFEXITED(st) ? WEXITSTATUS(st) : -1, keepalive(l2));

    char *self[] = { argv[1], "rescue", "--json", "1", NULL };
    int code = run_keepfix(self, 0);
    printf("PID1 exit=%d keepalive=%d\n", code, keepalive(l2));
    if (impostor > 0)
        kill(impostor, SIGKILL);
    return 0;
}
