/*
 * rescue_seccomp_exec - runs a command under a seccomp filter that makes
 * pidfd_getfd fail with EPERM and allows everything else.
 *
 * Models: Docker's default seccomp profile, which allows pidfd_getfd only to a
 * container with CAP_SYS_PTRACE; `keepfix rescue` run there must say that its
 * own sandbox is what stops it.
 *
 * Usage: rescue_seccomp_exec PROGRAM [ARGS...]
 * stdout: whatever PROGRAM prints
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#else
#error "rescue_seccomp_exec: unknown architecture"
#endif

#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif

int main(int argc, char **argv)
{
    if (argc < 2)
        die("usage: rescue_seccomp_exec PROGRAM [ARGS...]");
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_pidfd_getfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { sizeof f / sizeof f[0], f };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("PR_SET_NO_NEW_PRIVS:");
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
        die("PR_SET_SECCOMP:");
    execvp(argv[1], argv + 1);
    die("exec %s:", argv[1]);
}
