/*
 * harm_emfile_server - a server that answers each request late, on the fd it kept.
 *
 * Models: an HTTP/1.0-style server whose clients send one request line
 * ("client-ID\n") and shut down their write side.  The server's single read()
 * returns the request and consumes the FIN at once, but it never makes a
 * 0-byte read.  It keeps the fd, accepts more clients, and DELAY ms after the
 * accept writes "reply-for-client-ID\n" to the fd it kept, then closes it.
 * When accept() fails (EMFILE) it waits 10 ms (its replies free fds).
 *   --mode loop     single thread, poll() on the listener (default)
 *   --mode epoll    single thread, epoll (LT) for the listener and requests
 *   --mode threads  main thread accepts, one detached thread per connection
 *   --journal PATH --journal-after K: after the K-th accept the server opens
 *                   PATH (O_APPEND) and keeps it open; every later accept and
 *                   reply appends "journal accept id=ID\n" / "journal reply id=ID\n".
 *
 * Usage: harm_emfile_server [--mode M] [--delay-ms MS] [--journal PATH --journal-after K] PORT
 * stdout: READY port=P, ACCEPT fd=N, REQ fd=N id=ID, DUP_FD fd=N (accept gave a
 *         number the server still holds), ACCEPT_ERR errno=E, JOURNAL fd=N,
 *         JOURNAL_ERR errno=E, REPLY fd=N id=ID ret=R errno=E, CLOSE fd=N ret=R errno=E,
 *         STATS accepted=A replied=R reply_err=W dup_fd=D accept_err=X
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>
#include <sys/epoll.h>

#define MAXC 512
struct conn {
    int fd, id;
    long long due;
};
static struct conn conns[MAXC];
static int nconns;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int delay_ms = 300, journal_after = -1, journal_fd = -1;
static const char *journal_path;
static long accepted, replied, reply_err, dup_fd, accept_err;

static void journal(const char *what, int id)
{
    if (journal_fd < 0)
        return;
    char b[64];
    int n = snprintf(b, sizeof b, "journal %s id=%d\n", what, id);
    if (write(journal_fd, b, (size_t)n) != n)
        printf("JOURNAL_ERR errno=%d\n", errno);
}

/* Called with mu held, right after accept() returned fd. */
static void note_accept(int fd)
{
    printf("ACCEPT fd=%d\n", fd);
    accepted++;
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd == fd) {
            printf("DUP_FD fd=%d\n", fd);
            dup_fd++;
        }
    if (journal_path && journal_fd < 0 && accepted == journal_after) {
        journal_fd = open(journal_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (journal_fd < 0)
            printf("JOURNAL_ERR errno=%d\n", errno);
        else
            printf("JOURNAL fd=%d\n", journal_fd);
    }
}

/* One read() of the request; returns the client id or -1. */
static int read_request(int fd)
{
    struct pollfd p = { fd, POLLIN, 0 };
    if (poll(&p, 1, 2000) <= 0)
        return -1;
    char b[128];
    ssize_t n = read(fd, b, sizeof b - 1);
    if (n <= 0)
        return -1;
    b[n] = 0;
    int id = -1;
    if (sscanf(b, "client-%d", &id) != 1)
        return -1;
    printf("REQ fd=%d id=%d\n", fd, id);
    return id;
}

static void reply(int fd, int id)
{
    char b[64];
    int n = snprintf(b, sizeof b, "reply-for-client-%d\n", id);
    ssize_t r = write(fd, b, (size_t)n);
    int e = r < 0 ? errno : 0;
    printf("REPLY fd=%d id=%d ret=%zd errno=%d\n", fd, id, r, e);
    if (r == n)
        replied++;
    else
        reply_err++;
    journal("reply", id);
    int c = close(fd);
    printf("CLOSE fd=%d ret=%d errno=%d\n", fd, c, c < 0 ? errno : 0);
}

static void add_conn(int fd, int id)
{
    if (nconns < MAXC)
        conns[nconns++] = (struct conn){ fd, id, now_ms() + delay_ms };
}

static void del_conn(int fd)
{
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd == fd) {
            conns[i] = conns[--nconns];
            return;
        }
}

/* Replies to every connection whose time came; returns ms until the next one (or 100). */
static int reply_due(void)
{
    long long now = now_ms(), next = now + 100;
    for (int i = 0; i < nconns;) {
        if (conns[i].id >= 0 && conns[i].due <= now) {
            struct conn c = conns[i];
            conns[i] = conns[--nconns];
            reply(c.fd, c.id);
            continue;
        }
        if (conns[i].id >= 0 && conns[i].due < next)
            next = conns[i].due;
        i++;
    }
    return (int)(next - now);
}

static void *conn_thread(void *arg)
{
    int fd = (int)(long)arg;
    int id = read_request(fd);
    pthread_mutex_lock(&mu);
    if (id >= 0)
        journal("accept", id);
    pthread_mutex_unlock(&mu);
    if (id >= 0)
        sleep_ms(delay_ms);
    pthread_mutex_lock(&mu);
    del_conn(fd);
    if (id >= 0)
        reply(fd, id);
    pthread_mutex_unlock(&mu);
    return NULL;
}

static int accept_one(int lfd)
{
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0 && errno != EAGAIN && errno != EINTR) {
        printf("ACCEPT_ERR errno=%d\n", errno);
        accept_err++;
    }
    return fd;
}

int main(int argc, char **argv)
{
    proto_init();
    const char *mode = "loop";
    static const struct option opts[] = { { "mode", 1, 0, 'm' }, { "delay-ms", 1, 0, 'd' },
                                          { "journal", 1, 0, 'j' }, { "journal-after", 1, 0, 'k' },
                                          { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm')
            mode = optarg;
        else if (c == 'd')
            delay_ms = (int)parse_long(optarg, "delay");
        else if (c == 'j')
            journal_path = optarg;
        else if (c == 'k')
            journal_after = (int)parse_long(optarg, "journal-after");
        else
            die("usage: harm_emfile_server [--mode loop|epoll|threads] [--delay-ms MS] [--journal PATH --journal-after K] PORT");
    }
    if (optind >= argc)
        die("missing PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);

    if (!strcmp(mode, "threads")) {
        while (!g_term) {
            int fd = accept_one(lfd);
            if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE)
                    sleep_ms(10);
                continue;
            }
            pthread_mutex_lock(&mu);
            note_accept(fd);
            add_conn(fd, -1);
            pthread_mutex_unlock(&mu);
            pthread_t t;
            pthread_attr_t a;
            pthread_attr_init(&a);
            pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &a, conn_thread, (void *)(long)fd) != 0)
                die("pthread_create");
            pthread_attr_destroy(&a);
        }
    } else if (!strcmp(mode, "epoll")) {
        set_nonblock(lfd);
        int ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0)
            die("epoll_create1:");
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
        long long paused_until = 0;
        while (!g_term) {
            int wait = reply_due();
            if (paused_until && now_ms() >= paused_until) {
                ev.events = EPOLLIN;
                epoll_ctl(ep, EPOLL_CTL_MOD, lfd, &ev);
                paused_until = 0;
            }
            if (paused_until && wait > 10)
                wait = 10;
            struct epoll_event evs[64];
            int n = epoll_wait(ep, evs, 64, wait);
            for (int i = 0; i < n; i++) {
                int fd = evs[i].data.fd;
                if (fd == lfd) {
                    int nfd = accept_one(lfd);
                    if (nfd < 0 && (errno == EMFILE || errno == ENFILE)) {
                        ev.events = 0;
                        epoll_ctl(ep, EPOLL_CTL_MOD, lfd, &ev);
                        paused_until = now_ms() + 10;
                    }
                    if (nfd < 0)
                        continue;
                    note_accept(nfd);
                    add_conn(nfd, -1);
                    struct epoll_event cev = { .events = EPOLLIN, .data.fd = nfd };
                    epoll_ctl(ep, EPOLL_CTL_ADD, nfd, &cev);
                    continue;
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                int id = read_request(fd);
                for (int k = 0; k < nconns; k++)
                    if (conns[k].fd == fd && conns[k].id < 0) {
                        conns[k].id = id;
                        conns[k].due = now_ms() + delay_ms;
                    }
                if (id >= 0)
                    journal("accept", id);
            }
        }
    } else {
        set_nonblock(lfd);
        while (!g_term) {
            int wait = reply_due();
            struct pollfd p = { lfd, POLLIN, 0 };
            if (poll(&p, 1, wait) <= 0)
                continue;
            int fd = accept_one(lfd);
            if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE)
                    sleep_ms(wait < 10 ? wait : 10);
                continue;
            }
            note_accept(fd);
            int id = read_request(fd);
            if (id >= 0) {
                add_conn(fd, id);
                journal("accept", id);
            } else {
                close(fd);
            }
        }
    }
    pthread_mutex_lock(&mu);
    printf("STATS accepted=%ld replied=%ld reply_err=%ld dup_fd=%ld accept_err=%ld\n", accepted, replied,
           reply_err, dup_fd, accept_err);
    return 0;
}
