/*
 * harm_closefrom - a daemon's closefrom(3) on a kernel without close_range.
 *
 * Models: a program that starts listening (so a preloaded library's thread
 * is running), then runs where close_range(2) is refused (a seccomp filter
 * returns ENOSYS for it, as on kernels before 5.9 or under a strict
 * container profile), calls closefrom(3) like any daemonising code, makes
 * its listener again, and opens files until EMFILE (or fd 1000), writing
 * "file FD\n" into each.  It serves connections (one line, "pong\n", close)
 * until stdin reaches EOF, then writes "end FD\n" into each file and closes
 * each one, checking that close() returns 0.
 *
 * Usage: harm_closefrom DIR   (files are DIR/f<fd>; run it with a small RLIMIT_NOFILE)
 * stdout: READY port=P (the listener made after closefrom), SECCOMP ok=1,
 *         FILES count=N first=A last=B, WRITE_ERR fd=N errno=E,
 *         CLOSE_ERR fd=N errno=E, STATS files=N close_err=C write_err=W served=S
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

static void refuse_close_range(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_close_range, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { sizeof f / sizeof f[0], f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("PR_SET_NO_NEW_PRIVS:");
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
        die("PR_SET_SECCOMP:");
    if (syscall(__NR_close_range, 1000000, 1000001, 0) == 0 || errno != ENOSYS)
        die("the filter does not refuse close_range");
    printf("SECCOMP ok=1\n");
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: harm_closefrom DIR");
    int first = listen_on(AF_INET, 0, 0, 0); /* starts the library's thread */
    (void)first;
    refuse_close_range();
    closefrom(3);
    int lfd = listen_on(AF_INET, 0, 0, 0);
    set_nonblock(lfd);
    int files[1024], n = 0;
    long write_err = 0, close_err = 0, served = 0;
    for (;;) {
        char tmp[4096], path[4096];
        snprintf(tmp, sizeof tmp, "%s/new", argv[1]);
        int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_APPEND, 0644);
        if (fd < 0)
            break;
        snprintf(path, sizeof path, "%s/f%d", argv[1], fd);
        if (rename(tmp, path) < 0)
            die("rename:");
        files[n++] = fd;
        if (n == 1000)
            break;
    }
    /* Leave room for a connection or two. */
    for (int k = 0; k < 3 && n > 0; k++) {
        if (close(files[--n]) != 0) {
            printf("CLOSE_ERR fd=%d errno=%d\n", files[n], errno);
            close_err++;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/f%d", argv[1], files[n]);
        unlink(path);
    }
    for (int i = 0; i < n; i++) {
        char b[32];
        int len = snprintf(b, sizeof b, "file %d\n", files[i]);
        if (write(files[i], b, (size_t)len) != len) {
            printf("WRITE_ERR fd=%d errno=%d\n", files[i], errno);
            write_err++;
        }
    }
    printf("FILES count=%d first=%d last=%d\n", n, n ? files[0] : -1, n ? files[n - 1] : -1);
    print_ready(lfd);
    for (;;) {
        struct pollfd p[2] = { { lfd, POLLIN, 0 }, { 0, POLLIN, 0 } };
        if (poll(p, 2, 100) < 0 && !g_term)
            continue;
        if (g_term || (p[1].revents && read(0, (char[64]){ 0 }, 64) <= 0))
            break;
        if (p[0].revents & POLLIN) {
            int c = accept(lfd, NULL, NULL);
            if (c < 0)
                continue;
            char b[256];
            ssize_t r = read_line(c, b, sizeof b, 1000);
            if (r > 0 && write(c, "pong\n", 5) == 5)
                served++;
            close(c);
        }
    }
    for (int i = 0; i < n; i++) {
        char b[32];
        int len = snprintf(b, sizeof b, "end %d\n", files[i]);
        if (write(files[i], b, (size_t)len) != len) {
            printf("WRITE_ERR fd=%d errno=%d\n", files[i], errno);
            write_err++;
        }
        if (close(files[i]) != 0) {
            printf("CLOSE_ERR fd=%d errno=%d\n", files[i], errno);
            close_err++;
        }
    }
    printf("STATS files=%d close_err=%ld write_err=%ld served=%ld\n", n, close_err, write_err, served);
    return 0;
}
