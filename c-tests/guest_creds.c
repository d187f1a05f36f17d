/*
 * guest_creds - a root server that drops its privileges after it listens (as servers bind port
 * 80 and then become www-data), in one of four ways:
 *   glibc    setgroups, setresgid, setresuid to nobody through the C library (which applies
 *            them to every thread of the process);
 *   capset   capset(2) through the C library, dropping every capability and keeping uid 0 (what
 *            libcap's cap_set_proc does: it changes the calling thread only);
 *   syscall  syscall(SYS_setresgid) and syscall(SYS_setresuid) to nobody, on the main thread
 *            only;
 *   asm      the same two system calls as raw syscall instructions (no C library at all).
 * Then it listens once more (the next point where a library may start a thread) and waits for
 * stdin EOF; the test reads /proc/PID/task/ALL/status meanwhile.
 *
 * Usage: guest_creds glibc|capset|syscall|asm   (run as root)
 * stdout: READY port=P, CHANGED how=H rc=R errno=E, AGAIN port=P.  Exits 0.
 */
#define _GNU_SOURCE
#include "common.h"
#include <grp.h>
#include <linux/capability.h>
#include <sys/syscall.h>

int capset(cap_user_header_t hdrp, const cap_user_data_t datap);

static long raw3(long nr, long a, long b, long c)
{
#if defined(__x86_64__)
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "0"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
#else
    return syscall(nr, a, b, c) == 0 ? 0 : -errno;
#endif
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: guest_creds glibc|capset|syscall|asm");
    const char *how = argv[1];
    int lfd = listen_on(AF_INET, 0, 0, 0); /* the library's thread starts */
    print_ready(lfd);
    sleep_ms(300);
    const long nobody = 65534;
    long r = 0;
    if (!strcmp(how, "glibc")) {
        r = setgroups(0, NULL) | setresgid(nobody, nobody, nobody) | setresuid(nobody, nobody, nobody);
    } else if (!strcmp(how, "capset")) {
        struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
        struct __user_cap_data_struct d[2];
        memset(d, 0, sizeof d);
        r = capset(&h, d);
    } else if (!strcmp(how, "syscall")) {
        r = syscall(SYS_setresgid, nobody, nobody, nobody) | syscall(SYS_setresuid, nobody, nobody, nobody);
    } else if (!strcmp(how, "asm")) {
        long a = raw3(SYS_setresgid, nobody, nobody, nobody);
        long b = raw3(SYS_setresuid, nobody, nobody, nobody);
        r = a ? a : b;
        if (r < 0) {
            errno = (int)-r;
            r = -1;
        }
    } else {
        die("usage: guest_creds glibc|capset|syscall|asm");
    }
    printf("CHANGED how=%s rc=%ld errno=%d\n", how, r, r ? errno : 0);
    sleep_ms(500);
    int l2 = listen_on(AF_INET, 0, 0, 0); /* a safe point: a library may start its thread again */
    printf("AGAIN port=%d\n", local_port(l2));
    wait_for_test();
    return 0;
}
