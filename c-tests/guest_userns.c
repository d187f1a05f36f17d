/*
 * guest_userns - a program that enters a new user namespace (a sandboxing daemon, a container
 * runtime, `unshare -U`), which the kernel allows only to a single-threaded process.
 *
 * Models:
 *   exec-probe    a server whose listener is not close-on-exec runs a helper (as system() would):
 *                 it listens, forks, and the child execs `guest_userns probe`; the listener is
 *                 inherited and never used there.
 *   probe         the helper: counts its threads as main() starts, then calls
 *                 unshare(CLONE_NEWUSER) by a raw syscall instruction (no C library, no hook: what
 *                 the process looks like to the kernel, not what a hook can do about it).
 *   unshare [close]  a server that listened once (a preloaded library's thread starts), optionally
 *                 closed its socket, and then enters user namespaces: a forked child through
 *                 unshare(3), another through syscall(SYS_unshare), another joins its own mount
 *                 namespace through setns(2) (also refused to a process whose threads share its
 *                 filesystem attributes), and last the process itself through unshare(3).
 *
 * stdout: READY, THREADS at=main n=N, UNSHARE via=V rc=R errno=E threads_after=N, SETNS ...,
 *         DONE.  Exits 0; waits for stdin EOF before exiting in the unshare mode.
 */
#define _GNU_SOURCE
#include "common.h"
#include <dirent.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static int threads(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static long raw_unshare(long flags)
{
#if defined(__x86_64__)
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "0"((long)SYS_unshare), "D"(flags) : "rcx", "r11", "memory");
    return r;
#else
    return syscall(SYS_unshare, flags) == 0 ? 0 : -errno;
#endif
}

/* One attempt, in a forked child so that each starts from the same state. */
static void in_child(const char *via)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork:");
    if (pid == 0) {
        /* A worker that lives on and listens: a preloaded library's thread starts in it too
         * (keepfix starts a forked child's only once the child has outlived its scan tick). */
        sleep_ms(150);
        int own = listen_on(AF_INET, 0, 0, 0);
        int before = threads();
        int r, e;
        if (!strcmp(via, "libc")) {
            r = unshare(CLONE_NEWUSER);
        } else if (!strcmp(via, "syscall")) {
            r = (int)syscall(SYS_unshare, CLONE_NEWUSER);
        } else {
            int fd = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
            r = setns(fd, CLONE_NEWNS);
        }
        e = r < 0 ? errno : 0;
        sleep_ms(300);
        printf("%s via=%s rc=%d errno=%d threads_before=%d threads_after=%d\n",
               strcmp(via, "setns") ? "UNSHARE" : "SETNS", via, r, e, before, threads());
        fflush(stdout);
        close(own);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc >= 2 && !strcmp(argv[1], "probe")) {
        int n = threads();
        long r = raw_unshare(CLONE_NEWUSER);
        printf("THREADS at=main n=%d\n", n);
        printf("UNSHARE via=raw rc=%d errno=%ld\n", r == 0 ? 0 : -1, r == 0 ? 0 : -r);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "exec-probe")) {
        int lfd = listen_on(AF_INET, 0, 0, 0); /* not close-on-exec */
        print_ready(lfd);
        pid_t pid = fork();
        if (pid < 0)
            die("fork:");
        if (pid == 0) {
            execl("/proc/self/exe", argv[0], "probe", (char *)NULL);
            _exit(127);
        }
        int st;
        waitpid(pid, &st, 0);
        printf("DONE child=%d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "unshare")) {
        int lfd = listen_on(AF_INET, 0, 0, 0); /* the library's thread starts */
        print_ready(lfd);
        sleep_ms(300);
        if (argc >= 3 && !strcmp(argv[2], "close"))
            close(lfd);
        printf("THREADS at=main n=%d\n", threads());
        in_child("libc");
        in_child("syscall");
        in_child("setns");
        int r = unshare(CLONE_NEWUSER);
        int e = r < 0 ? errno : 0;
        sleep_ms(300);
        printf("UNSHARE via=self rc=%d errno=%d threads_after=%d\n", r, e, threads());
        printf("DONE\n");
        wait_for_test();
        return 0;
    }
    die("usage: guest_userns probe|exec-probe|unshare [close]");
}
