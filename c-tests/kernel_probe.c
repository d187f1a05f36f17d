/*
 * kernel_probe - asks the kernel, by raw system calls, for each feature whose version matters to
 * keepfix, and prints what it answered: `NAME=ok` or `NAME=ERRNO` (ENOSYS, EINVAL, ...).
 *
 * Run under c-tests/oldkernel.c to see what the emulated version gives, and without it for the
 * control (the real kernel).  Each probe is harmless: invalid fds, a private page, its own pipe
 * and socket.
 *
 * Usage: kernel_probe
 * stdout: one NAME=RESULT line per probe, then DONE.  Exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static void say(const char *name, long r)
{
	if (r < 0)
		printf("%s=%s\n", name, strerrorname_np(errno));
	else
		printf("%s=ok\n", name);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	char buf[256];

	/* System calls, by number (a libc wrapper might emulate one). */
	say("close_range", syscall(SYS_close_range, ~0U, ~0U, 0));
	long r = syscall(SYS_pwritev2, -1, NULL, 0, 0, 0, 0);
	say("pwritev2", r < 0 && errno == EBADF ? 0 : r);
	say("statx", syscall(SYS_statx, AT_FDCWD, "/", 0, 0x7ff, buf));
	say("pidfd_open", syscall(SYS_pidfd_open, getpid(), 0));
	r = syscall(SYS_clone3, NULL, 0);
	say("clone3", r < 0 && errno == EINVAL ? 0 : r);
	r = syscall(SYS_rseq, NULL, 0, 0, 0);
	say("rseq", r < 0 && (errno == EINVAL || errno == EBUSY || errno == EPERM) ? 0 : r);
	say("membarrier", syscall(SYS_membarrier, 0 /* MEMBARRIER_CMD_QUERY */, 0));
	say("getrandom", syscall(SYS_getrandom, buf, 1, 1 /* GRND_NONBLOCK */));
	say("getrandom_insecure", syscall(SYS_getrandom, buf, 1, 4 /* GRND_INSECURE */));
	r = syscall(SYS_memfd_create, "probe", 1 /* MFD_CLOEXEC */);
	say("memfd_create", r);
	if (r >= 0)
		close((int)r);
	r = syscall(SYS_epoll_pwait2, -1, NULL, 1, NULL, NULL, 0);
	say("epoll_pwait2", r < 0 && errno == EBADF ? 0 : r);
	r = syscall(SYS_io_uring_setup, 0, NULL);
	say("io_uring_setup", r < 0 && (errno == EINVAL || errno == EFAULT || errno == EPERM) ? 0 : r);
	r = syscall(SYS_openat2, AT_FDCWD, "/", NULL, 0);
	say("openat2", r < 0 && (errno == EINVAL || errno == EFAULT) ? 0 : r);
	unsigned action = 0x7fff0000U; /* SECCOMP_RET_ALLOW */
	say("seccomp", syscall(SYS_seccomp, 2 /* SECCOMP_GET_ACTION_AVAIL */, 0, &action));
	say("epoll_create1", syscall(SYS_epoll_create1, 02000000 /* EPOLL_CLOEXEC */));
	say("prlimit64", syscall(SYS_prlimit64, 0, 7 /* RLIMIT_NOFILE */, NULL, buf));
	r = syscall(SYS_tgkill, getpid(), (int)syscall(SYS_gettid), 0);
	say("tgkill", r);

	/* Flags and options. */
	int p[2];
	if (pipe(p) == 0) {
		struct iovec iov = {.iov_base = "x", .iov_len = 1};
		say("pwritev2_nowait_pipe", syscall(SYS_pwritev2, p[1], &iov, 1, -1L, 0, 8 /* RWF_NOWAIT */));
		say("f_dupfd_cloexec", fcntl(p[0], F_DUPFD_CLOEXEC, 10));
	}
	void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	say("madv_dontneed", madvise(page, 4096, MADV_DONTNEED));
	say("madv_free", madvise(page, 4096, 8 /* MADV_FREE */));
	say("madv_wipeonfork", madvise(page, 4096, 18 /* MADV_WIPEONFORK */));
	say("madv_cold", madvise(page, 4096, 20 /* MADV_COLD */));
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	say("sock_cloexec", s);
	int one = 1;
	socklen_t len = sizeof buf;
	say("so_keepalive", setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one));
	len = sizeof buf;
	say("so_meminfo", getsockopt(s, SOL_SOCKET, 55 /* SO_MEMINFO */, buf, &len));
	int ms = 5000;
	say("tcp_user_timeout", setsockopt(s, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms));
	say("tcp_keepidle", setsockopt(s, IPPROTO_TCP, TCP_KEEPIDLE, &ms, sizeof ms));
	len = sizeof buf;
	say("tcp_info", getsockopt(s, IPPROTO_TCP, TCP_INFO, buf, &len));
	say("tcp_notsent_lowat", setsockopt(s, IPPROTO_TCP, 25 /* TCP_NOTSENT_LOWAT */, &ms, sizeof ms));
	say("tcp_inq", setsockopt(s, IPPROTO_TCP, 36 /* TCP_INQ */, &one, sizeof one));
	say("pr_get_name", prctl(PR_GET_NAME, buf, 0, 0, 0));
	say("pr_cap_ambient", prctl(47 /* PR_CAP_AMBIENT */, 1 /* IS_SET */, 0, 0, 0));
	say("pr_get_auxv", prctl(0x41555856 /* PR_GET_AUXV */, buf, sizeof buf, 0, 0));
	uint32_t word = 0;
	r = syscall(SYS_futex, &word, 13 /* FUTEX_LOCK_PI2 */ | FUTEX_PRIVATE_FLAG, 0, NULL, NULL, 0);
	say("futex_lock_pi2", r);
	if (r == 0)
		syscall(SYS_futex, &word, FUTEX_UNLOCK_PI | FUTEX_PRIVATE_FLAG, 0, NULL, NULL, 0);
	printf("DONE\n");
	return 0;
}
