/*
 * oldkernel - runs a program as if the kernel were Linux 3.10 (RHEL 7, CentOS 7) or 4.18 (RHEL 8).
 *
 * Installs a seccomp filter (prctl(PR_SET_NO_NEW_PRIVS), then seccomp(SECCOMP_SET_MODE_FILTER), a
 * BPF program), then execs the program: the filter stays for it and for everything it forks or
 * execs.  What the filter does, for the version given:
 *   - every system call added after that version fails with ENOSYS.  On x86_64, 3.10's last call is
 *     finit_module (313): sched_setattr (314, 3.14), renameat2 (316, 3.15), seccomp (317, 3.17),
 *     getrandom (318, 3.17), memfd_create (319, 3.17), bpf (321, 3.18), execveat (322, 3.19),
 *     userfaultfd (323, 4.3), membarrier (324, 4.3), mlock2 (325, 4.4), copy_file_range (326, 4.5),
 *     preadv2/pwritev2 (327/328, 4.6), pkey_* (329-331, 4.9), statx (332, 4.11), io_pgetevents
 *     (333, 4.18), rseq (334, 4.18), and from 424 on: pidfd_send_signal and io_uring_* (5.1), the
 *     new mount API (5.2), pidfd_open and clone3 (5.3), openat2 and pidfd_getfd (5.6), faccessat2
 *     (5.8), close_range (5.9), process_madvise (5.10), epoll_pwait2 (5.11), landlock (5.13),
 *     futex_waitv (5.16), and later.  4.18's last is rseq (334).  x32 calls count as absent.
 *   - madvise with advice the kernel did not know: MADV_FREE (8, 4.5), MADV_WIPEONFORK and
 *     MADV_KEEPONFORK (18/19, 4.14), MADV_COLD and later (20.., 5.4): EINVAL.
 *   - getsockopt/setsockopt of SOL_SOCKET options past the version's last (3.10: 45,
 *     SO_SELECT_ERR_QUEUE; 4.18: 60, SO_ZEROCOPY), e.g. SO_MEMINFO (55, 4.12), and IPPROTO_TCP
 *     options past its last (3.10: 24, TCP_TIMESTAMP; 4.18: 36, TCP_INQ): ENOPROTOOPT.
 *   - prctl options past the version's last (3.10: 40, PR_GET_TID_ADDRESS; 4.18: 53,
 *     PR_SET_SPECULATION_CTRL), e.g. PR_CAP_AMBIENT (47, 4.3) and PR_GET_AUXV (6.4): EINVAL.
 *   - futex FUTEX_LOCK_PI2 (13, 5.14): ENOSYS.
 *   - 4.18 only: pwritev2 with RWF_NOWAIT: EOPNOTSUPP (pipes, ttys and buffered writes to files
 *     took RWF_NOWAIT later); getrandom with GRND_INSECURE (5.6): EINVAL.
 * What a filter cannot change: the length of struct tcp_info the kernel writes (104 bytes on
 * 3.10, 200 on 4.18), the size of /proc/PID/fd (the fd count since 6.2), flags old kernels ignored
 * (O_TMPFILE, MAP_FIXED_NOREPLACE, CLONE_PIDFD), and the vDSO.
 *
 * Built static (tests/common's oldkernel()), so that LD_PRELOAD is for the program only.
 *
 * Usage: oldkernel 3.10|4.18 PROG [ARGS...]
 * Exit: 2 for bad arguments, 126 when the filter cannot be installed, 127 when exec fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#define NR_MADVISE 28
#define NR_GETSOCKOPT 55
#define NR_SETSOCKOPT 54
#define NR_PRCTL 157
#define NR_FUTEX 202
#define NR_PWRITEV2 328
#define NR_GETRANDOM 318
#define FIRST_AFTER_3_10 314
#define FIRST_AFTER_4_18 335
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#define NR_MADVISE 233
#define NR_GETSOCKOPT 209
#define NR_SETSOCKOPT 208
#define NR_PRCTL 167
#define NR_FUTEX 98
#define NR_PWRITEV2 287
#define NR_GETRANDOM 278
#define FIRST_AFTER_3_10 274
#define FIRST_AFTER_4_18 294
#else
#error "oldkernel knows the system call numbers of x86_64 and aarch64 only"
#endif

#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))

/* The filter, built instruction by instruction. */
static struct sock_filter insn[128];
static unsigned n_insn;

static void emit(struct sock_filter s)
{
	if (n_insn < sizeof insn / sizeof insn[0])
		insn[n_insn++] = s;
}
static void load(unsigned off) { emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, off)); }
static void ret(unsigned v) { emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, v)); }
static void allow(void) { ret(SECCOMP_RET_ALLOW); }
/* Fails the call with errno e when `A op k` holds (op: BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET). */
static void fail_if(unsigned op, unsigned k, int e)
{
	emit((struct sock_filter)BPF_JUMP(BPF_JMP | op | BPF_K, k, 0, 1));
	ret(SECCOMP_RET_ERRNO | (unsigned)e);
}
/* A rule for one system call: begin_rule() tests A == nr (A holds nr at every rule's start);
 * end_rule() allows the call when nothing in the rule failed it, and patches the jump over. */
static unsigned begin_rule(unsigned nr)
{
	emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 0));
	return n_insn - 1;
}
static void end_rule(unsigned at)
{
	allow();
	insn[at].jf = (unsigned char)(n_insn - at - 1);
}

struct version {
	const char *name;
	unsigned first_missing;  /* first system call number the version lacks */
	int madv_free;           /* knows MADV_FREE (8) */
	unsigned madv_first_new; /* first advice past 8 it lacks (100, 101 are old) */
	unsigned so_last, tcp_last, pr_last;
	int rwf_nowait_fails;    /* pwritev2(RWF_NOWAIT) gives EOPNOTSUPP */
	int grnd_insecure_fails; /* getrandom(GRND_INSECURE) gives EINVAL */
};

static const struct version versions[] = {
	{"3.10", FIRST_AFTER_3_10, 0, 18, 45, 24, 40, 0, 0},
	{"4.18", FIRST_AFTER_4_18, 1, 20, 60, 36, 53, 1, 1},
};

static void build(const struct version *v)
{
	load(offsetof(struct seccomp_data, arch));
	emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0));
	allow(); /* another ABI (i386 on x86_64): not emulated */
	load(offsetof(struct seccomp_data, nr));
	fail_if(BPF_JGE, v->first_missing, ENOSYS);

	unsigned r = begin_rule(NR_MADVISE);
	load(ARG_LO(2));
	if (!v->madv_free)
		fail_if(BPF_JEQ, 8, EINVAL);
	emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 100, 2, 0)); /* to the allow */
	fail_if(BPF_JGE, v->madv_first_new, EINVAL);
	end_rule(r);

	unsigned sockopt[] = {NR_GETSOCKOPT, NR_SETSOCKOPT};
	for (int i = 0; i < 2; i++) {
		r = begin_rule(sockopt[i]);
		load(ARG_LO(1));
		emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 1 /* SOL_SOCKET */, 0, 4));
		load(ARG_LO(2));
		fail_if(BPF_JGT, v->so_last, ENOPROTOOPT);
		allow();
		emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 6 /* IPPROTO_TCP */, 0, 3));
		load(ARG_LO(2));
		fail_if(BPF_JGT, v->tcp_last, ENOPROTOOPT);
		end_rule(r);
	}

	r = begin_rule(NR_PRCTL);
	load(ARG_LO(0));
	emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x59616d61 /* PR_SET_PTRACER */, 0, 1));
	allow();
	fail_if(BPF_JGT, v->pr_last, EINVAL);
	end_rule(r);

	r = begin_rule(NR_FUTEX);
	load(ARG_LO(1));
	emit((struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0x7f));
	fail_if(BPF_JEQ, 13 /* FUTEX_LOCK_PI2 */, ENOSYS);
	end_rule(r);

	if (v->rwf_nowait_fails) {
		r = begin_rule(NR_PWRITEV2);
		load(ARG_LO(5)); /* flags: pwritev2(fd, iov, iovcnt, pos_l, pos_h, flags) */
		fail_if(BPF_JSET, 8 /* RWF_NOWAIT */, EOPNOTSUPP);
		end_rule(r);
	}
	if (v->grnd_insecure_fails) {
		r = begin_rule(NR_GETRANDOM);
		load(ARG_LO(2));
		fail_if(BPF_JSET, 4 /* GRND_INSECURE */, EINVAL);
		end_rule(r);
	}
	allow();
}

int main(int argc, char **argv)
{
	const struct version *v = NULL;
	if (argc >= 3) {
		for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++)
			if (strcmp(argv[1], versions[i].name) == 0)
				v = &versions[i];
	}
	if (!v) {
		fprintf(stderr, "usage: oldkernel 3.10|4.18 PROG [ARGS...]%s%s\n", argc >= 2 ? ": unknown version " : "",
			argc >= 2 ? argv[1] : "");
		return 2;
	}
	build(v);
	if (n_insn >= sizeof insn / sizeof insn[0]) {
		fprintf(stderr, "oldkernel: the filter is too long\n");
		return 126;
	}
	struct sock_fprog prog = {.len = (unsigned short)n_insn, .filter = insn};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
		fprintf(stderr, "oldkernel: prctl(PR_SET_NO_NEW_PRIVS): %s\n", strerror(errno));
		return 126;
	}
	/* SPEC_ALLOW: a filtered task otherwise runs with the speculative store bypass mitigation
	 * on, slower than the program would run on the old kernel; the emulation is of system calls.
	 * Without the flag where the kernel does not know it (before 4.17), and with prctl where
	 * seccomp(2) itself is missing (under another oldkernel 3.10, for one). */
	long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, &prog);
	if (r != 0 && errno == EINVAL)
		r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
	if (r != 0 && (errno != ENOSYS || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0)) {
		fprintf(stderr, "oldkernel: seccomp(SECCOMP_SET_MODE_FILTER): %s\n", strerror(errno));
		return 126;
	}
	execvp(argv[2], argv + 2);
	fprintf(stderr, "oldkernel: exec %s: %s\n", argv[2], strerror(errno));
	return 127;
}
