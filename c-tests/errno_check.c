/*
 * errno_check - compares every hooked call's return value and errno with libc.
 *
 * Models: nothing legacy - it is a conformance probe.  The test runs it
 * without and with LD_PRELOAD=libkeepfix.so and diffs stdout, so the output
 * is fully deterministic: no ports, pids, addresses or timings; fd numbers
 * are printed and every fd is closed before it could shift later numbers.
 * Before each call errno is set to 4242, so a successful call that leaves
 * errno alone prints errno=4242.  errno_check64.c builds this same file with
 * _FILE_OFFSET_BITS=64, where fcntl() becomes fcntl64().
 *
 * Covers the calls keepfix interposes: socket listen accept accept4 connect
 * setsockopt close dup dup2 dup3 fcntl/fcntl64 close_range closefrom select
 * (plus socketpair).
 *
 * Usage: errno_check
 * stdout: CASE name ret=R errno=E      (one per call under test)
 *         FACT name value=V [errno=E]  (derived facts: flags, lengths, ...)
 *         DONE
 * Stderr: a human-readable note for every CASE that did not give the errno
 * that plain Linux/glibc gives (informational only; exit status is 0).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "common.h"
#include <limits.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/un.h>

#define MAGIC 4242

/* CASE(name, expected_errno, call): errno = 4242, run the call, print the
 * line and return the call's result (as long).  expected_errno (0 = success
 * expected) only feeds the stderr note. */
#define CASE(name, expect, call)                                     \
    ({                                                               \
        errno = MAGIC;                                               \
        long r__ = (long)(call);                                     \
        int e__ = errno;                                             \
        report(name, r__, e__, expect);                              \
        r__;                                                         \
    })

static void report(const char *name, long ret, int err, int expect)
{
    printf("CASE %s ret=%ld errno=%d\n", name, ret, err);
    if (expect == 0 ? ret < 0 : (ret >= 0 || err != expect))
        fprintf(stderr, "errno_check: note: %s ret=%ld errno=%d (%s), plain Linux gives %s\n",
                name, ret, err, strerror(err), expect ? strerror(expect) : "success");
}

static void fact(const char *name, long value)
{
    printf("FACT %s value=%ld\n", name, value);
}

static int is_cloexec(int fd)
{
    return (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
}

static int is_nonblock(int fd)
{
    return (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
}

/* A fresh socket / listener, created outside of any CASE. */
static int tcp_socket(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket:");
    return fd;
}

static int udp_socket(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket:");
    return fd;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int tcp_listener(struct sockaddr_in *addr)
{
    int fd = tcp_socket();
    *addr = loopback(0);
    socklen_t len = sizeof *addr;
    if (bind(fd, (struct sockaddr *)addr, sizeof *addr) < 0 || listen(fd, 128) < 0 ||
        getsockname(fd, (struct sockaddr *)addr, &len) < 0)
        die("listener:");
    return fd;
}

static int tcp_connect(const struct sockaddr_in *addr)
{
    int fd = tcp_socket();
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0)
        die("connect:");
    return fd;
}

/* The loopback handshake is done when connect() returns, but make sure the
 * connection really sits in the accept queue before a CASE accepts it. */
static void wait_readable(int lfd)
{
    struct pollfd p = { lfd, POLLIN, 0 };
    poll(&p, 1, 2000);
}

static void test_socket(void)
{
    int fd;
    fd = CASE("socket_inet_stream", 0, socket(AF_INET, SOCK_STREAM, 0));
    close(fd);
    fd = CASE("socket_inet_stream_nb_cloexec", 0,
              socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP));
    fact("socket_nb_cloexec_cloexec", is_cloexec(fd));
    fact("socket_nb_cloexec_nonblock", is_nonblock(fd));
    close(fd);
    fd = CASE("socket_inet6_stream", 0, socket(AF_INET6, SOCK_STREAM, 0));
    close(fd);
    CASE("socket_bad_family", EAFNOSUPPORT, socket(9999, SOCK_STREAM, 0));
    CASE("socket_bad_type", EINVAL, socket(AF_INET, 9999, 0));
    CASE("socket_stream_udp_proto", EPROTONOSUPPORT, socket(AF_INET, SOCK_STREAM, IPPROTO_UDP));
    fd = CASE("socket_inet_dgram", 0, socket(AF_INET, SOCK_DGRAM, 0));
    close(fd);
}

static void test_listen(int devnull)
{
    int fd = tcp_socket();
    struct sockaddr_in a = loopback(0);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind:");
    CASE("listen_tcp", 0, listen(fd, 128));
    close(fd);
    fd = udp_socket();
    CASE("listen_udp", EOPNOTSUPP, listen(fd, 128));
    close(fd);
    CASE("listen_badfd", EBADF, listen(-1, 128));
    CASE("listen_file", ENOTSOCK, listen(devnull, 128));
}

static void test_accept(int devnull)
{
    struct sockaddr_in la, peer;
    socklen_t len;
    int fd = tcp_socket();
    CASE("accept_not_listening", EINVAL, accept(fd, NULL, NULL));
    close(fd);
    CASE("accept_badfd", EBADF, accept(-1, NULL, NULL));
    CASE("accept_file", ENOTSOCK, accept(devnull, NULL, NULL));

    int lfd = tcp_listener(&la);
    set_nonblock(lfd);
    CASE("accept_nonblock_empty", EAGAIN, accept(lfd, NULL, NULL));

    int cfd = tcp_connect(&la);
    memset(&peer, 0, sizeof peer);
    len = sizeof peer;
    wait_readable(lfd);
    fd = CASE("accept_real", 0, accept(lfd, (struct sockaddr *)&peer, &len));
    fact("accept_real_addrlen", len);
    fact("accept_real_family", peer.sin_family);
    fact("accept_real_peer_is_loopback", peer.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
    fact("accept_real_cloexec", is_cloexec(fd));
    fact("accept_real_nonblock", is_nonblock(fd));
    close(fd);
    close(cfd);

    /* addrlen smaller than the address: truncated, but the real size is returned */
    cfd = tcp_connect(&la);
    memset(&peer, 0, sizeof peer);
    len = 2; /* room for sin_family only */
    wait_readable(lfd);
    fd = CASE("accept_short_addrlen", 0, accept(lfd, (struct sockaddr *)&peer, &len));
    fact("accept_short_addrlen_len", len);
    fact("accept_short_addrlen_family", peer.sin_family);
    fact("accept_short_addrlen_port_untouched", peer.sin_port == 0);
    close(fd);
    close(cfd);

    cfd = tcp_connect(&la);
    wait_readable(lfd);
    fd = CASE("accept_null_addr", 0, accept(lfd, NULL, NULL));
    close(fd);
    close(cfd);

    /* accept4 */
    CASE("accept4_bad_flags", EINVAL, accept4(lfd, NULL, NULL, 0x40000000));
    cfd = tcp_connect(&la);
    len = sizeof peer;
    wait_readable(lfd);
    fd = CASE("accept4_cloexec_nonblock", 0,
              accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC | SOCK_NONBLOCK));
    fact("accept4_cloexec", is_cloexec(fd));
    fact("accept4_nonblock", is_nonblock(fd));
    fact("accept4_addrlen", len);
    close(fd);
    close(cfd);
    cfd = tcp_connect(&la);
    wait_readable(lfd);
    fd = CASE("accept4_noflags", 0, accept4(lfd, NULL, NULL, 0));
    fact("accept4_noflags_cloexec", is_cloexec(fd));
    fact("accept4_noflags_nonblock", is_nonblock(fd));
    close(fd);
    close(cfd);
    CASE("accept4_badfd", EBADF, accept4(-1, NULL, NULL, 0));
    CASE("accept4_file", ENOTSOCK, accept4(devnull, NULL, NULL, 0));
    close(lfd);
}

static void test_connect(int devnull)
{
    struct sockaddr_in la, dead;
    /* a port that is certainly closed: bind one, note it, close it */
    int fd = tcp_socket();
    dead = loopback(0);
    socklen_t len = sizeof dead;
    if (bind(fd, (struct sockaddr *)&dead, sizeof dead) < 0 ||
        getsockname(fd, (struct sockaddr *)&dead, &len) < 0)
        die("bind:");
    close(fd);
    fd = tcp_socket();
    CASE("connect_refused", ECONNREFUSED, connect(fd, (struct sockaddr *)&dead, sizeof dead));
    close(fd);

    int lfd = tcp_listener(&la);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CASE("connect_nonblock", EINPROGRESS, connect(fd, (struct sockaddr *)&la, sizeof la));
    close(fd);
    CASE("connect_badfd", EBADF, connect(-1, (struct sockaddr *)&la, sizeof la));

    fd = tcp_socket();
    CASE("connect_blocking", 0, connect(fd, (struct sockaddr *)&la, sizeof la));
    CASE("connect_again_isconn", EISCONN, connect(fd, (struct sockaddr *)&la, sizeof la));
    struct sockaddr unspec = { .sa_family = AF_UNSPEC };
    CASE("connect_unspec_disconnect", 0, connect(fd, &unspec, sizeof unspec));
    close(fd);

    fd = udp_socket();
    CASE("connect_udp", 0, connect(fd, (struct sockaddr *)&la, sizeof la));
    close(fd);
    CASE("connect_file", ENOTSOCK, connect(devnull, (struct sockaddr *)&la, sizeof la));
    fd = tcp_socket();
    CASE("connect_short_addrlen", EINVAL, connect(fd, (struct sockaddr *)&la, 1));
    close(fd);
    close(lfd); /* the queued, never-accepted connections go with it */
}

static int getopt_int(int fd, int level, int opt)
{
    int v = -1;
    socklen_t len = sizeof v;
    if (getsockopt(fd, level, opt, &v, &len) < 0)
        return -errno;
    return v;
}

static void test_setsockopt(int devnull)
{
    int one = 1, v;
    int fd = tcp_socket();
#define SETI(name, expect, level, opt, val) \
    (v = (val), CASE(name, expect, setsockopt(fd, level, opt, &v, sizeof v)))
    SETI("setsockopt_so_keepalive_1", 0, SOL_SOCKET, SO_KEEPALIVE, 1);
    SETI("setsockopt_so_keepalive_0", 0, SOL_SOCKET, SO_KEEPALIVE, 0);
    SETI("setsockopt_tcp_keepidle_0", EINVAL, IPPROTO_TCP, TCP_KEEPIDLE, 0);
    SETI("setsockopt_tcp_keepidle_40000", EINVAL, IPPROTO_TCP, TCP_KEEPIDLE, 40000);
    SETI("setsockopt_tcp_keepcnt_200", EINVAL, IPPROTO_TCP, TCP_KEEPCNT, 200);
    SETI("setsockopt_tcp_keepintvl_5", 0, IPPROTO_TCP, TCP_KEEPINTVL, 5);
    SETI("setsockopt_tcp_user_timeout_neg", EINVAL, IPPROTO_TCP, TCP_USER_TIMEOUT, -1);
    SETI("setsockopt_tcp_user_timeout_5000", 0, IPPROTO_TCP, TCP_USER_TIMEOUT, 5000);
    SETI("setsockopt_level_9999", ENOPROTOOPT, 9999, SO_KEEPALIVE, 1);
    CASE("setsockopt_so_keepalive_optlen1", EINVAL,
         setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, 1));
    CASE("setsockopt_optval_null", EFAULT, setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, NULL, 4));
    CASE("setsockopt_badfd", EBADF, setsockopt(-1, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one));
    CASE("setsockopt_file", ENOTSOCK,
         setsockopt(devnull, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one));
    /* the values the program set (and that keepfix must not change) */
    fact("tcp_keepintvl_readback", getopt_int(fd, IPPROTO_TCP, TCP_KEEPINTVL));
    fact("tcp_user_timeout_readback", getopt_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT));
    close(fd);

    fd = udp_socket();
    SETI("setsockopt_udp_tcp_keepidle", ENOPROTOOPT, IPPROTO_TCP, TCP_KEEPIDLE, 60);
    SETI("setsockopt_udp_so_keepalive", 0, SOL_SOCKET, SO_KEEPALIVE, 1);
    fact("udp_so_keepalive_after_set", getopt_int(fd, SOL_SOCKET, SO_KEEPALIVE));
    close(fd);
#undef SETI

    /* keepfix must never touch non-TCP sockets: fresh ones read 0 */
    fd = udp_socket();
    fact("udp_so_keepalive_fresh", getopt_int(fd, SOL_SOCKET, SO_KEEPALIVE));
    close(fd);
    fd = socket(AF_INET6, SOCK_DGRAM, 0);
    fact("udp6_so_keepalive_fresh", getopt_int(fd, SOL_SOCKET, SO_KEEPALIVE));
    close(fd);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    fact("unix_so_keepalive_fresh", getopt_int(fd, SOL_SOCKET, SO_KEEPALIVE));
    close(fd);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
        die("socketpair:");
    fact("unixpair_so_keepalive_fresh", getopt_int(sv[0], SOL_SOCKET, SO_KEEPALIVE));
    close(sv[0]);
    close(sv[1]);
}

static void test_close(void)
{
    int fd = tcp_socket();
    CASE("close_ok", 0, close(fd));
    CASE("close_badfd", EBADF, close(-1));
    CASE("close_already_closed", EBADF, close(fd));
    CASE("close_100000", EBADF, close(100000));
    CASE("close_intmax", EBADF, close(INT_MAX));
    fd = udp_socket();
    CASE("close_udp", 0, close(fd));
    fd = open("/dev/null", O_RDONLY);
    CASE("close_file", 0, close(fd));
}

static void test_dup(void)
{
    int s = tcp_socket(), fd;
    fd = CASE("dup_ok", 0, dup(s));
    close(fd);
    CASE("dup_badfd", EBADF, dup(-1));

    fd = CASE("dup2_ok", 0, dup2(s, 50));
    fact("dup2_ok_cloexec", is_cloexec(50));
    close(50);
    CASE("dup2_same_valid", 0, dup2(s, s));
    CASE("dup2_same_invalid", EBADF, dup2(99, 99));
    CASE("dup2_bad_oldfd", EBADF, dup2(99, 51));
    CASE("dup2_newfd_neg", EBADF, dup2(s, -1));
    CASE("dup2_newfd_intmax", EBADF, dup2(s, INT_MAX));
    int victim = tcp_socket();
    CASE("dup2_replace_socket", 0, dup2(s, victim));
    {
        struct stat a, b;
        fstat(s, &a);
        fstat(victim, &b);
        fact("dup2_replace_same_file", a.st_ino == b.st_ino);
    }
    close(victim);

    fd = CASE("dup3_cloexec", 0, dup3(s, 52, O_CLOEXEC));
    fact("dup3_cloexec_flag", is_cloexec(52));
    close(52);
    fd = CASE("dup3_noflags", 0, dup3(s, 52, 0));
    fact("dup3_noflags_flag", is_cloexec(52));
    close(52);
    CASE("dup3_same", EINVAL, dup3(s, s, 0));
    CASE("dup3_bad_flags", EINVAL, dup3(s, 53, 0x1234));
    CASE("dup3_bad_oldfd", EBADF, dup3(99, 53, 0));
    close(s);
}

static void test_fcntl(void)
{
    int s = tcp_socket(), fd;
    fd = CASE("fcntl_dupfd_20", 0, fcntl(s, F_DUPFD, 20));
    fact("fcntl_dupfd_20_ge_20", fd >= 20);
    fact("fcntl_dupfd_20_cloexec", is_cloexec(fd));
    close(fd);
    fd = CASE("fcntl_dupfd_cloexec", 0, fcntl(s, F_DUPFD_CLOEXEC, 0));
    fact("fcntl_dupfd_cloexec_flag", is_cloexec(fd));
    close(fd);
    CASE("fcntl_dupfd_neg", EINVAL, fcntl(s, F_DUPFD, -1));
    CASE("fcntl_dupfd_intmax", EINVAL, fcntl(s, F_DUPFD, INT_MAX));
    CASE("fcntl_getfd", 0, fcntl(s, F_GETFD));
    CASE("fcntl_setfd", 0, fcntl(s, F_SETFD, FD_CLOEXEC));
    CASE("fcntl_getfd_after_set", 0, fcntl(s, F_GETFD));
    CASE("fcntl_getfl", 0, fcntl(s, F_GETFL));
    CASE("fcntl_setfl_nonblock", 0, fcntl(s, F_SETFL, O_NONBLOCK));
    CASE("fcntl_getfl_after_set", 0, fcntl(s, F_GETFL));
    CASE("fcntl_bad_cmd", EINVAL, fcntl(s, 9999));
    CASE("fcntl_badfd", EBADF, fcntl(-1, F_GETFD));
    CASE("fcntl_dupfd_badfd", EBADF, fcntl(-1, F_DUPFD, 0));
    close(s);
}

/* Opens /dev/null at fds first..last (dup2 onto fixed numbers). */
static void open_at(int first, int last)
{
    int n = open("/dev/null", O_RDONLY);
    if (n < 0)
        die("open /dev/null:");
    for (int fd = first; fd <= last; fd++)
        if (dup2(n, fd) < 0)
            die("dup2:");
    close(n);
}

static void closed_facts(const char *prefix, int first, int last)
{
    for (int fd = first; fd <= last; fd++) {
        errno = MAGIC;
        int r = fcntl(fd, F_GETFD);
        printf("FACT %s_%d value=%d errno=%d\n", prefix, fd, r, errno);
    }
}

static void test_close_range(void)
{
    CASE("close_range_inverted", EINVAL, close_range(10, 5, 0));
    CASE("close_range_bad_flags", EINVAL, close_range(60, 62, 0x80000000u));
    open_at(60, 62);
    CASE("close_range_real", 0, close_range(60, 62, 0));
    closed_facts("close_range_real_getfd", 60, 62);

    open_at(63, 65);
    CASE("close_range_cloexec", 0, close_range(63, 65, CLOSE_RANGE_CLOEXEC));
    for (int fd = 63; fd <= 65; fd++) {
        char name[64];
        snprintf(name, sizeof name, "close_range_cloexec_%d", fd);
        fact(name, is_cloexec(fd));
        close(fd);
    }

    /* closefrom returns nothing: report ret=0 and the errno after it */
    open_at(70, 72);
    errno = MAGIC;
    closefrom(70);
    report("closefrom_70", 0, errno, 0);
    closed_facts("closefrom_getfd", 70, 72);
}

static void test_select(int devnull)
{
    struct timeval tv = { 0, 0 };
    fd_set rd;
    CASE("select_nothing", 0, select(0, NULL, NULL, NULL, &tv));
    tv = (struct timeval){ 0, 0 };
    CASE("select_neg_nfds", EINVAL, select(-1, NULL, NULL, NULL, &tv));
    FD_ZERO(&rd);
    FD_SET(devnull, &rd);
    tv = (struct timeval){ 0, 0 };
    CASE("select_devnull", 0, select(devnull + 1, &rd, NULL, NULL, &tv));
    fact("select_devnull_isset", FD_ISSET(devnull, &rd) != 0);
    FD_ZERO(&rd);
    FD_SET(99, &rd); /* not open */
    tv = (struct timeval){ 0, 0 };
    CASE("select_badfd", EBADF, select(100, &rd, NULL, NULL, &tv));
}

static void test_socketpair(void)
{
    int sv[2] = { -1, -1 };
    CASE("socketpair_unix", 0, socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
    fact("socketpair_fd0", sv[0]);
    fact("socketpair_fd1", sv[1]);
    CASE("socketpair_close_0", 0, close(sv[0]));
    CASE("socketpair_close_1", 0, close(sv[1]));
    CASE("socketpair_inet", EOPNOTSUPP, socketpair(AF_INET, SOCK_STREAM, 0, sv));
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    int devnull = open("/dev/null", O_RDWR); /* the "regular file" fd, kept all along */
    if (devnull < 0)
        die("open /dev/null:");
    fact("devnull_fd", devnull);

    test_socket();
    test_listen(devnull);
    test_accept(devnull);
    test_connect(devnull);
    test_setsockopt(devnull);
    test_close();
    test_dup();
    test_fcntl();
    test_close_range();
    test_select(devnull);
    test_socketpair();

    close(devnull);
    /* the next free fd: proves nothing leaked along the way */
    int fd = open("/dev/null", O_RDONLY);
    fact("next_free_fd", fd);
    close(fd);
    printf("DONE\n");
    return 0;
}
