/*
 * guest_seccomp - a program that sandboxes itself (a browser's network process, an sshd
 * pre-auth child, a service under a strict seccomp profile) and then keeps using TCP.
 *
 * Models: the program listens on 127.0.0.1 (a preloaded library's thread starts), then installs
 * a seccomp whitelist of the calls it needs itself (read, write, close, socket, connect, accept,
 * bind, listen, getsockname, exit, exit_group, brk, mmap, munmap, futex, rt_sigreturn, poll),
 * every other call killing the process (SECCOMP_RET_KILL_PROCESS).  Then it connects to its
 * listener, accepts, sends a byte across, closes both, makes and listens on a new socket, and
 * waits for stdin EOF.  In `strict` mode it enters SECCOMP_MODE_STRICT instead (read, write,
 * exit, sigreturn only) after making its connection, moves a byte across it, and ends its
 * thread with SYS_exit: the process must end with it.
 *
 * Usage: guest_seccomp prctl|syscall-prctl|syscall-seccomp|strict
 * stdout: READY port=P, SECCOMP via=V ok=1, CONNECT rc=R, ACCEPT ok=1, BYTE ok=1,
 *         LISTEN rc=R, DONE.  Exits 0.
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

static void say(const char *s)
{
    if (write(1, s, strlen(s)) < 0)
        _exit(3);
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: guest_seccomp prctl|syscall-prctl|syscall-seccomp|strict");
    const char *via = argv[1];
    int lfd = listen_on(AF_INET, 0, 0, 0); /* the library's thread starts */
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    if (getsockname(lfd, (struct sockaddr *)&sa, &len) < 0)
        die("getsockname:");
    print_ready(lfd);
    sleep_ms(300);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("PR_SET_NO_NEW_PRIVS:");
    char line[128];
    if (!strcmp(via, "strict")) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0 || connect(c, (struct sockaddr *)&sa, len) < 0)
            die("connect:");
        int s = accept(lfd, NULL, NULL);
        if (s < 0)
            die("accept:");
        fflush(stdout);
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0) < 0)
            die("PR_SET_SECCOMP strict:");
        say("SECCOMP via=strict ok=1\n");
        char b = 'x';
        int ok = write(c, &b, 1) == 1 && read(s, &b, 1) == 1 && b == 'x';
        say(ok ? "BYTE ok=1\nDONE\n" : "BYTE ok=0\nDONE\n");
        while (read(0, line, sizeof line) > 0) {
        }
        syscall(SYS_exit, 0);
        for (;;) {
        }
    }
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        ALLOW(__NR_read), ALLOW(__NR_write), ALLOW(__NR_close), ALLOW(__NR_socket),
        ALLOW(__NR_connect), ALLOW(__NR_accept), ALLOW(__NR_accept4), ALLOW(__NR_bind),
        ALLOW(__NR_listen), ALLOW(__NR_getsockname), ALLOW(__NR_exit), ALLOW(__NR_exit_group),
        ALLOW(__NR_brk), ALLOW(__NR_mmap), ALLOW(__NR_munmap), ALLOW(__NR_futex),
        ALLOW(__NR_rt_sigreturn), ALLOW(__NR_poll),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    };
    struct sock_fprog prog = { sizeof f / sizeof f[0], f };
    long r;
    if (!strcmp(via, "prctl"))
        r = prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
    else if (!strcmp(via, "syscall-prctl"))
        r = syscall(SYS_prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
    else
        r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
    if (r != 0)
        die("seccomp:");
    printf("SECCOMP via=%s ok=1\n", via);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    printf("CONNECT rc=%d\n", c < 0 ? -1 : connect(c, (struct sockaddr *)&sa, len));
    int s = accept(lfd, NULL, NULL);
    printf("ACCEPT ok=%d\n", s >= 0);
    char b = 'x';
    printf("BYTE ok=%d\n", write(c, &b, 1) == 1 && read(s, &b, 1) == 1 && b == 'x');
    printf("CLOSE rc=%d\n", close(c) | close(s));
    int l2 = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in any = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int lr = l2 < 0 || bind(l2, (struct sockaddr *)&any, sizeof any) < 0 ? -1 : listen(l2, 8);
    printf("LISTEN rc=%d\n", lr);
    printf("DONE\n");
    while (read(0, line, sizeof line) > 0) {
    }
    return 0;
}
