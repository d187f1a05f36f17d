/*
 * leak_eof_server - THE classic bug: forgets to close() a connection at EOF.
 *
 * Models: a single-threaded poll() server that answers "pong\n" per line,
 * and when read() returns 0 (peer closed) prints EOF, drops the fd from its
 * poll set and never closes it: the socket sits in CLOSE_WAIT forever and
 * the fd leaks.  A read error (ECONNRESET, ...) is leaked the same way.
 * When accept() fails (EMFILE once the leak has eaten all fds) it prints
 * ACCEPT_ERR and sleeps 10 ms so it does not spin.
 *   --read-delay MS   slow reader: a connection is not read at all until MS
 *                     ms after it was accepted; at EOF it prints the total
 *                     bytes read (READ fd=N bytes=B) before EOF fd=N.
 *   --file-thread PATH  a second thread does file I/O on PATH in a loop
 *                     (create+write 4 KiB pattern, close, reopen, read back,
 *                     compare, close) to catch a library that closes or
 *                     reuses the wrong fd; failures print FILE_ERR.
 *
 * Usage: leak_eof_server [--file-thread PATH] [--read-delay MS] PORT
 * stdout: READY port=P, ACCEPT fd=N, READ fd=N bytes=B (with --read-delay),
 *         EOF fd=N, READ_ERR fd=N errno=E, WRITE_ERR fd=N errno=E,
 *         ACCEPT_ERR errno=E, FILE_ERR op=OP errno=E, FILE_ERR op=compare,
 *         STATS accepted=A served=S eof=E leaked=L accept_err=X errors=R
 *               [file_ok=K file_err=F]
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>

/* ---- the file thread ---------------------------------------------------- */

static const char *file_path;
static int file_stop; /* set by main, read with __atomic */
static long file_ok, file_err; /* written by the file thread only */

static int file_fail(const char *op, int err)
{
    if (err)
        printf("FILE_ERR op=%s errno=%d\n", op, err);
    else
        printf("FILE_ERR op=%s\n", op);
    file_err++;
    return -1;
}

/* One round trip; returns 0 or -1 (already reported). */
static int file_round(unsigned round)
{
    char out[4096], in[4096];
    for (size_t i = 0; i < sizeof out; i++)
        out[i] = (char)(i * 7 + round);

    int fd = open(file_path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0)
        return file_fail("open_w", errno);
    if (write_all(fd, out, sizeof out) < 0) {
        file_fail("write", errno);
        close(fd);
        return -1;
    }
    if (close(fd) < 0)
        return file_fail("close_w", errno);

    fd = open(file_path, O_RDONLY);
    if (fd < 0)
        return file_fail("open_r", errno);
    size_t got = 0;
    while (got < sizeof in) {
        ssize_t n = read(fd, in + got, sizeof in - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            file_fail("read", errno);
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    if (close(fd) < 0)
        return file_fail("close_r", errno);
    if (got != sizeof in || memcmp(in, out, sizeof in) != 0)
        return file_fail("compare", 0);
    return 0;
}

static void *file_thread(void *arg)
{
    (void)arg;
    for (unsigned round = 0; !__atomic_load_n(&file_stop, __ATOMIC_RELAXED); round++) {
        if (file_round(round) == 0)
            file_ok++;
        else
            sleep_ms(10); /* do not flood stdout while fds are exhausted */
    }
    return NULL;
}

/* ---- the server ----------------------------------------------------------- */

struct conn {
    int fd;
    long long ready_at; /* when we start reading it (--read-delay) */
    long bytes;
};

int main(int argc, char **argv)
{
    proto_init();
    long read_delay = -1;
    static const struct option opts[] = {
        { "file-thread", required_argument, NULL, 'f' },
        { "read-delay", required_argument, NULL, 'd' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'f')
            file_path = optarg;
        else if (c == 'd')
            read_delay = parse_long(optarg, "--read-delay");
        else
            die("usage: leak_eof_server [--file-thread PATH] [--read-delay MS] PORT");
    }
    if (optind != argc - 1)
        die("usage: leak_eof_server [--file-thread PATH] [--read-delay MS] PORT");

    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);

    pthread_t tid;
    if (file_path) {
        /* the thread must not take SIGTERM/SIGINT: main's poll() gets EINTR */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        if (pthread_create(&tid, NULL, file_thread, NULL) != 0)
            die("pthread_create failed");
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    print_ready(lfd);

    struct conn *conns = NULL; /* connections still in the poll set */
    size_t nconns = 0, cap = 0;
    struct pollfd *pfd = NULL;
    long accepted = 0, served = 0, eofs = 0, leaked = 0, accept_err = 0, errors = 0;

    while (!g_term) {
        /* Poll set: the listener plus every connection whose delay is over. */
        long long now = now_ms();
        int timeout = 100;
        pfd = realloc(pfd, (nconns + 1) * sizeof *pfd);
        size_t *idx = malloc((nconns + 1) * sizeof *idx);
        size_t np = 0;
        pfd[np++] = (struct pollfd){ lfd, POLLIN, 0 };
        for (size_t i = 0; i < nconns; i++) {
            if (conns[i].ready_at > now) {
                if (conns[i].ready_at - now < timeout)
                    timeout = (int)(conns[i].ready_at - now);
                continue;
            }
            idx[np] = i;
            pfd[np++] = (struct pollfd){ conns[i].fd, POLLIN, 0 };
        }
        int r = poll(pfd, np, timeout);
        if (r <= 0) {
            free(idx);
            continue;
        }

        /* Connections first (indices into conns stay valid until we compact). */
        for (size_t k = 1; k < np; k++) {
            if (!pfd[k].revents)
                continue;
            struct conn *cn = &conns[idx[k]];
            char buf[4096];
            ssize_t n = read(cn->fd, buf, sizeof buf);
            if (n < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (n > 0) {
                cn->bytes += n;
                int lines = answer_lines(cn->fd, buf, n);
                if (lines >= 0) {
                    served += lines;
                } else {
                    printf("WRITE_ERR fd=%d errno=%d\n", cn->fd, errno);
                    errors++; /* keep it: the next read tells EOF or error */
                }
                continue;
            }
            if (n == 0) {
                if (read_delay >= 0)
                    printf("READ fd=%d bytes=%ld\n", cn->fd, cn->bytes);
                printf("EOF fd=%d\n", cn->fd);
                eofs++;
            } else {
                printf("READ_ERR fd=%d errno=%d\n", cn->fd, errno);
                errors++;
            }
            /* THE BUG: forget the fd without close(). */
            leaked++;
            cn->fd = -1;
        }
        size_t j = 0;
        for (size_t i = 0; i < nconns; i++)
            if (conns[i].fd >= 0)
                conns[j++] = conns[i];
        nconns = j;
        free(idx);

        if (pfd[0].revents & POLLIN) {
            int cfd = accept(lfd, NULL, NULL);
            if (cfd < 0) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                accept_err++;
                sleep_ms(10);
                continue;
            }
            printf("ACCEPT fd=%d\n", cfd);
            accepted++;
            if (nconns == cap) {
                cap = cap ? cap * 2 : 16;
                conns = realloc(conns, cap * sizeof *conns);
                if (!conns)
                    die("out of memory");
            }
            conns[nconns++] = (struct conn){ cfd, now_ms() + (read_delay > 0 ? read_delay : 0), 0 };
        }
    }

    if (file_path) { /* stop the thread first: its lines must not split ours */
        __atomic_store_n(&file_stop, 1, __ATOMIC_RELAXED);
        pthread_join(tid, NULL);
    }
    printf("STATS accepted=%ld served=%ld eof=%ld leaked=%ld accept_err=%ld errors=%ld",
           accepted, served, eofs, leaked, accept_err, errors);
    if (file_path)
        printf(" file_ok=%ld file_err=%ld", file_ok, file_err);
    printf("\n");
    return 0;
}
