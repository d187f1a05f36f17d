/*
 * common.h - small helpers shared by the keepfix sample "legacy" programs.
 *
 * Every program #defines _GNU_SOURCE before including anything, then includes
 * this header.  All helpers are static; the ones a program may not use are
 * marked unused so that -Wall -Wextra -Werror stays quiet.
 *
 * stdout protocol: line-buffered, one machine-readable line per event,
 * "WORD key=value key=value".  Humans get stderr.
 */
#ifndef KEEPFIX_CTESTS_COMMON_H
#define KEEPFIX_CTESTS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define UNUSED __attribute__((unused))

/* Print a diagnostic to stderr and exit 1. */
static UNUSED __attribute__((format(printf, 1, 2), noreturn)) void die(const char *fmt, ...)
{
    va_list ap;
    int saved = errno;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", program_invocation_short_name);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (fmt[0] && fmt[strlen(fmt) - 1] == ':')
        fprintf(stderr, " %s", strerror(saved));
    fputc('\n', stderr);
    exit(1);
}

/* ---- termination flag ------------------------------------------------- */

static volatile sig_atomic_t g_term;

static void on_term(int sig)
{
    (void)sig;
    g_term = 1;
}

/*
 * SIGTERM/SIGINT set g_term.  No SA_RESTART, so a blocking call made while
 * the signal arrives returns EINTR and the main loop notices the flag.
 * SIGPIPE is ignored so that writing to a reset peer gives EPIPE.
 */
static UNUSED void install_term_handlers(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Standard start of every program: line-buffered stdout + signal handling. */
static UNUSED void proto_init(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    install_term_handlers();
}

/* ---- small utilities -------------------------------------------------- */

/* CPU time (user + system, µs) of this process, all its threads, and its reaped children. */
static UNUSED long long tree_cpu_us(void)
{
    long long us = 0;
    struct rusage ru;
    int who[2] = { RUSAGE_SELF, RUSAGE_CHILDREN };
    for (int i = 0; i < 2; i++)
        if (getrusage(who[i], &ru) == 0)
            us += (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec +
                  ru.ru_stime.tv_usec;
    return us;
}

static UNUSED long parse_long(const char *s, const char *what)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        die("bad %s: '%s'", what, s);
    return v;
}

static UNUSED int parse_port(const char *s)
{
    long v = parse_long(s, "port");
    if (v < 0 || v > 65535)
        die("bad port: '%s'", s);
    return (int)v;
}

static UNUSED long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static UNUSED void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR && !g_term)
        ;
}

static UNUSED int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* Local port of a socket (IPv4 or IPv6), -1 on error. */
static UNUSED int local_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -1;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -1;
}

/* Number of open fds of this process: entries of /proc/self/fd minus the
 * directory's own fd.  Returns -1 if the directory cannot be opened. */
static UNUSED int count_open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (de->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1;
}

/* ---- sockets ---------------------------------------------------------- */

/* Fill *ss with the numeric address host:port; returns the length or dies. */
static UNUSED socklen_t make_addr(int family, const char *host, int port,
                                  struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
            die("bad IPv6 address '%s'", host);
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
        die("bad IPv4 address '%s'", host);
    return sizeof *a;
}

/*
 * socket(family, SOCK_STREAM|type_flags, protocol) + SO_REUSEADDR + bind to
 * host (a numeric address) on port.  Not listening yet.
 */
static UNUSED int bind_host_on(int family, const char *host, int port, int type_flags, int protocol)
{
    struct sockaddr_storage ss;
    socklen_t len = make_addr(family, host, port, &ss);
    int fd = socket(family, SOCK_STREAM | type_flags, protocol);
    if (fd < 0)
        die("socket:");
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        die("setsockopt SO_REUSEADDR:");
    if (bind(fd, (struct sockaddr *)&ss, len) < 0)
        die("bind port %d:", port);
    return fd;
}

/* bind_host_on() on loopback (127.0.0.1 or ::1). */
static UNUSED int bind_on(int family, int port, int type_flags, int protocol)
{
    return bind_host_on(family, family == AF_INET6 ? "::1" : "127.0.0.1", port, type_flags, protocol);
}

/* bind_on() + listen(fd, 128). */
static UNUSED int listen_on(int family, int port, int type_flags, int protocol)
{
    int fd = bind_on(family, port, type_flags, protocol);
    if (listen(fd, 128) < 0)
        die("listen:");
    return fd;
}

/* Prints "READY port=P" with the port the kernel really gave us. */
/* A connection to ourselves over IPv4 loopback: a listener, the client side and the accepted
 * side.  Dies on failure. */
static UNUSED void loopback_pair(int *lfd, int *client, int *server)
{
    *lfd = listen_on(AF_INET, 0, 0, 0);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(*lfd, (struct sockaddr *)&ss, &len) < 0)
        die("getsockname:");
    *client = socket(AF_INET, SOCK_STREAM, 0);
    if (*client < 0 || connect(*client, (struct sockaddr *)&ss, len) < 0)
        die("connect:");
    *server = accept(*lfd, NULL, NULL);
    if (*server < 0)
        die("accept:");
}

static UNUSED void print_ready(int lfd)
{
    printf("READY port=%d\n", local_port(lfd));
}

/* write() all of buf; for non-blocking fds waits (up to 2 s per chunk) for
 * POLLOUT.  Returns 0 or -1 with errno set. */
static UNUSED int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd p = { fd, POLLOUT, 0 };
                int r = poll(&p, 1, 2000);
                if (r == 0) {
                    errno = ETIMEDOUT;
                    return -1;
                }
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/*
 * The "serving" part of the protocol: the client sends lines, we answer
 * "pong\n" for each '\n' seen in buf.  Returns the number of pongs written
 * or -1 with errno set.
 */
static UNUSED int answer_lines(int fd, const char *buf, ssize_t n)
{
    static const char pongs[] = "pong\npong\npong\npong\npong\npong\npong\npong\n";
    int lines = 0;
    for (ssize_t i = 0; i < n; i++)
        if (buf[i] == '\n')
            lines++;
    for (int left = lines; left > 0;) {
        int k = left > 8 ? 8 : left;
        if (write_all(fd, pongs, (size_t)k * 5) < 0)
            return -1;
        left -= k;
    }
    return lines;
}

/*
 * Reads one line (up to '\n', which is stripped) from fd into buf, waiting at
 * most timeout_ms in total (-1 = forever).  Returns the line length, 0 on EOF
 * before any byte, or -1 with errno set (ETIMEDOUT on timeout).  Reads one
 * byte at a time so that nothing after the line is consumed.
 */
static UNUSED ssize_t read_line(int fd, char *buf, size_t size, int timeout_ms)
{
    size_t len = 0;
    long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        int wait = -1;
        if (deadline >= 0) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            wait = (int)left;
        }
        struct pollfd p = { fd, POLLIN, 0 };
        int r = poll(&p, 1, wait);
        if (r < 0)
            return -1;
        if (r == 0)
            continue; /* deadline check above */
        char c;
        ssize_t n = read(fd, &c, 1);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        if (n == 0) {
            if (len == 0)
                return 0;
            break;
        }
        if (c == '\n')
            break;
        if (len + 1 < size)
            buf[len++] = c;
    }
    buf[len] = '\0';
    return (ssize_t)len;
}

/* ---- line reader for stdin commands ------------------------------------ */

struct linebuf {
    char buf[4096];
    size_t len;
    int eof;
};

/* Reads what is available on fd into lb (call after poll said POLLIN).
 * Returns 0, or -1 on EOF / error (lb->eof set). */
static UNUSED int lb_fill(struct linebuf *lb, int fd)
{
    if (lb->len == sizeof lb->buf)
        lb->len = 0; /* overlong line: drop it */
    ssize_t n = read(fd, lb->buf + lb->len, sizeof lb->buf - lb->len);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 0;
    if (n <= 0) {
        lb->eof = 1;
        return -1;
    }
    lb->len += (size_t)n;
    return 0;
}

/* Takes the next complete line out of lb into out (without '\n').
 * Returns 1 if a line was returned, 0 if none is complete yet. */
static UNUSED int lb_getline(struct linebuf *lb, char *out, size_t size)
{
    char *nl = memchr(lb->buf, '\n', lb->len);
    if (!nl)
        return 0;
    size_t n = (size_t)(nl - lb->buf);
    size_t c = n < size - 1 ? n : size - 1;
    memcpy(out, lb->buf, c);
    out[c] = '\0';
    if (c > 0 && out[c - 1] == '\r')
        out[c - 1] = '\0';
    lb->len -= n + 1;
    memmove(lb->buf, nl + 1, lb->len);
    return 1;
}

/*
 * "Wait for the test": returns when stdin reaches EOF or g_term is set
 * (SIGTERM/SIGINT).  Anything read from stdin is discarded.  If fd 0 is not
 * open at all, only the signal ends the wait.
 */
static UNUSED void wait_for_test(void)
{
    int stdin_ok = 1;
    while (!g_term) {
        struct pollfd p = { 0, POLLIN, 0 };
        int r = poll(&p, stdin_ok ? 1 : 0, 100);
        if (r <= 0)
            continue;
        if (p.revents & POLLNVAL) {
            stdin_ok = 0;
            continue;
        }
        char buf[512];
        ssize_t n = read(0, buf, sizeof buf);
        if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
            return;
    }
}

/* ---- a growable poll set ------------------------------------------------ */

struct pset {
    struct pollfd *p;
    size_t n, cap;
};

static UNUSED void pset_add(struct pset *s, int fd, short events)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->p = realloc(s->p, s->cap * sizeof *s->p);
        if (!s->p)
            die("out of memory");
    }
    s->p[s->n].fd = fd;
    s->p[s->n].events = events;
    s->p[s->n].revents = 0;
    s->n++;
}

/* Removes entry i (order is not kept: the last entry takes its place). */
static UNUSED void pset_del(struct pset *s, size_t i)
{
    s->p[i] = s->p[--s->n];
}

/* Has keepfix released (shut down) this connection? It is still a socket at its number, no
 * longer in CLOSE_WAIT: LAST_ACK until the peer acknowledges our FIN, then CLOSE. */
static inline int shut_down_by_keepfix(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
        return 0;
    return ti.tcpi_state == TCP_CLOSE || ti.tcpi_state == TCP_LAST_ACK;
}

/* Opens /dev/null until the highest fd is `upto` (the table filled below it); returns it. */
static UNUSED int fill_fds_to(int upto)
{
    int last = -1;
    while (last < upto) {
        last = open("/dev/null", O_RDONLY);
        if (last < 0)
            die("open filler:");
    }
    return last;
}

#endif
